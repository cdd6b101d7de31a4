//! `meterd raw`: registers and coils by address, like mbpoll.

use super::*;

/// `meterd raw`
#[derive(Debug, Args)]
pub struct RawCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Bus name from the configuration.
    #[arg(long)]
    pub bus: String,
    /// Modbus unit id.
    #[arg(long, required_unless_present = "address")]
    pub unit: Option<u8>,
    /// The protocol to speak on the bus.
    #[arg(long, value_enum, default_value = "modbus")]
    pub protocol: RawProtocol,
    /// DL/T 645 / CJ/T 188: the meter's address, the number on its nameplate (12 / 14 digits).
    #[arg(long)]
    pub address: Option<String>,
    /// CJ/T 188: the meter type byte in hex (10 cold water, 11 hot water).
    #[arg(long, default_value = "10", value_parser = parse_hex_u8)]
    pub meter_type: u8,
    /// CJ/T 188: how the meter writes its data identifiers (90 1F as displayed, or reversed).
    #[arg(long, value_enum, default_value = "as-displayed")]
    pub di_order: DiOrderArg,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub op: RawOp,
}

/// Protocols `raw` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RawProtocol {
    Modbus,
    /// DL/T 645-2007 (China's electricity meters): `read DI`, e.g. `read 00010000`.
    Dlt645,
    /// CJ/T 188-2004 (China's water meters): `read 901F`, the current data.
    Cjt188,
}

/// CJ/T 188 DI byte orders as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiOrderArg {
    AsDisplayed,
    Reversed,
}

fn parse_hex_u8(s: &str) -> Result<u8, String> {
    u8::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{s:?}: expected a byte in hex, e.g. 10 for a cold-water meter"))
}

/// Object tables as named on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Table {
    Coil,
    Discrete,
    Holding,
    Input,
}

impl From<Table> for Function {
    fn from(t: Table) -> Function {
        match t {
            Table::Coil => Function::Coil,
            Table::Discrete => Function::DiscreteInput,
            Table::Holding => Function::Holding,
            Table::Input => Function::Input,
        }
    }
}

/// Byte layouts as field engineers name them.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Layout {
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl Layout {
    fn orders(self) -> (WordOrder, ByteOrder) {
        match self {
            Layout::Abcd => (WordOrder::Big, ByteOrder::Big),
            Layout::Cdab => (WordOrder::Little, ByteOrder::Big),
            Layout::Badc => (WordOrder::Big, ByteOrder::Little),
            Layout::Dcba => (WordOrder::Little, ByteOrder::Little),
        }
    }
}

/// A raw operation.
#[derive(Debug, Subcommand)]
pub enum RawOp {
    /// Modbus: read COUNT registers or bits of TABLE (coil, discrete, holding, input) from
    /// ADDRESS. DL/T 645: read the data identifier TABLE (8 hex digits, e.g. 00010000).
    Read {
        table: String,
        #[arg(value_parser = parse_u16)]
        address: Option<u16>,
        #[arg(default_value_t = 1)]
        count: u16,
        /// Also decode the registers as this type, value by value.
        #[arg(long = "type")]
        ty: Option<DataType>,
        #[arg(long, default_value = "abcd")]
        order: Layout,
        #[arg(long)]
        json: bool,
    },
    /// Write a coil (on/off) or holding register value(s) (Modbus).
    Write {
        #[arg(value_enum)]
        table: Table,
        #[arg(value_parser = parse_u16)]
        address: u16,
        /// `on`/`off` for a coil; one or more numbers for holding registers.
        #[arg(required = true)]
        values: Vec<String>,
        /// Use FC16 even for one register (meters that ignore FC06).
        #[arg(long)]
        multiple: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// One decoded row of `raw read`.
#[derive(Debug, Serialize)]
pub(super) struct RawRow {
    address: u16,
    raw: Vec<u16>,
    value: Option<f64>,
}

impl RawCmd {
    /// Reads or writes by address.
    pub async fn execute(self, clock: &Clock) -> Result<()> {
        let c = self.config.load()?;
        let bi = c
            .bus_index(&self.bus)
            .with_context(|| format!("no bus {:?} in {}", self.bus, c.source))?;
        match self.protocol {
            RawProtocol::Dlt645 => return self.execute_dlt645(&c.buses[bi]).await,
            RawProtocol::Cjt188 => return self.execute_cjt188(&c.buses[bi]).await,
            RawProtocol::Modbus => {}
        }
        let Some(unit) = self.unit else {
            bail!("give --unit for a Modbus device (or --protocol dlt645 --address NUMBER)");
        };
        let mut link = Link::new(&c.buses[bi], clock.clone());
        match self.op {
            RawOp::Read {
                table: what,
                address,
                count,
                ty,
                order,
                json: as_json,
            } => {
                let t = <Table as ValueEnum>::from_str(&what, true).map_err(|_| {
                    anyhow::anyhow!(
                        "{what:?} is not a Modbus table: expected coil, discrete, holding or input"
                    )
                })?;
                let Some(address) = address else {
                    bail!("give the register address to read from, e.g. read {what} 0x0000 2");
                };
                let req = ReadRequest {
                    function: t.into(),
                    address,
                    count,
                };
                let data = link
                    .read(unit, req, self.timeout, Duration::ZERO)
                    .await
                    .map_err(link_failure)?;
                let rows: Vec<RawRow> = match data {
                    Data::Bits(bits) => bits
                        .iter()
                        .enumerate()
                        .map(|(i, b)| RawRow {
                            address: address + i as u16,
                            raw: vec![u16::from(*b)],
                            value: Some(f64::from(u8::from(*b))),
                        })
                        .collect(),
                    Data::Words(words) => {
                        let ty = ty.unwrap_or(DataType::U16);
                        let (wo, bo) = order.orders();
                        let n = usize::from(ty.words());
                        words
                            .chunks(n)
                            .enumerate()
                            .map(|(i, w)| RawRow {
                                address: address + (i * n) as u16,
                                raw: w.to_vec(),
                                value: decode::decode(w, ty, wo, bo)
                                    .ok()
                                    .map(super::super::modbus::decode::RawValue::as_f64),
                            })
                            .collect()
                    }
                };
                if as_json {
                    out(&json(&rows)?);
                } else {
                    let rows: Vec<Vec<String>> = rows
                        .iter()
                        .map(|r| {
                            vec![
                                format!("{:#06x}", r.address),
                                r.address.to_string(),
                                r.raw
                                    .iter()
                                    .map(|w| format!("{w:04X}"))
                                    .collect::<Vec<_>>()
                                    .join(" "),
                                r.value
                                    .map_or_else(|| "(incomplete)".into(), |v| v.to_string()),
                            ]
                        })
                        .collect();
                    out(&table(&["address", "decimal", "raw", "value"], &rows));
                }
            }
            RawOp::Write {
                table: t,
                address,
                values,
                multiple,
                yes,
            } => {
                let what = format!(
                    "bus {} unit {unit}: write {:?} {address:#06x} = {}",
                    self.bus,
                    t,
                    values.join(" ")
                );
                if !yes && !confirm(&what)? {
                    bail!("not confirmed; nothing written (pass --yes to skip the question)");
                }
                match t {
                    Table::Coil => {
                        let on = match values.as_slice() {
                            [v] if v == "on" || v == "1" => true,
                            [v] if v == "off" || v == "0" => false,
                            _ => bail!("a coil takes exactly one value: on or off"),
                        };
                        link.write_coil(unit, address, on, self.timeout)
                            .await
                            .map_err(link_failure)?;
                    }
                    Table::Holding => {
                        let words: Vec<u16> = values
                            .iter()
                            .map(|v| parse_u16(v).map_err(anyhow::Error::msg))
                            .collect::<Result<_>>()?;
                        link.write_registers(unit, address, &words, multiple, self.timeout)
                            .await
                            .map_err(link_failure)?;
                    }
                    Table::Discrete | Table::Input => {
                        bail!("{t:?} is read-only in Modbus: write a coil or a holding register")
                    }
                }
                out(&format!("{what}: done\n"));
            }
        }
        Ok(())
    }
}

/// One row of `raw --protocol dlt645 read`.
#[derive(Debug, Serialize)]
struct Dlt645Row {
    address: String,
    di: String,
    /// The value bytes as the meter meant them (the +0x33 removed), first on the wire first.
    raw: String,
    /// Decoded with the format of a built-in profile's item of this DI, when one has it.
    value: Option<f64>,
    item: Option<String>,
    unit: Option<String>,
}

impl RawCmd {
    /// `raw --protocol dlt645`: one DI read from one meter, straight on the bus's line.
    async fn execute_dlt645(&self, bus: &crate::modbus::spec::Bus) -> Result<()> {
        use crate::dlt645::{client::Client, profile, Address, Di};
        let Some(address) = &self.address else {
            bail!("give the meter's address: --address NUMBER (the 12 digits on its nameplate)");
        };
        let address = Address::parse(address)?;
        let RawOp::Read {
            table: what,
            json: as_json,
            ..
        } = &self.op
        else {
            bail!("DL/T 645 writes need the meter's password and are not raw operations; relays are switched through [[relay]] and `meterd relay`");
        };
        let di = Di::parse(what).with_context(|| {
            format!("{what:?} is not a DL/T 645 data identifier: expected 8 hex digits as the standard's tables print it, DI3 first (e.g. 00010000 for forward active energy)")
        })?;
        let mut line = open_serial_line(bus).await?;
        let mut client = Client::new(crate::dlt645::frame::DEFAULT_PREAMBLE);
        let value = client
            .read(&mut line, address, di, self.timeout)
            .await
            .map_err(|e| anyhow::anyhow!("bus {}: {e}", bus.name))?;
        let library = profile::builtin().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let item = library
            .values()
            .flat_map(|p| p.items.iter())
            .find(|i| i.di == di);
        let row = Dlt645Row {
            address: address.to_string(),
            di: di.to_string(),
            raw: value
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(" "),
            value: item.and_then(|i| i.value(&value).ok()),
            item: item.map(|i| i.name.to_string()),
            unit: item.map(|i| i.unit.to_string()),
        };
        if *as_json {
            out(&json(&[&row])?);
        } else {
            let shown = row.value.map_or_else(
                || "(no built-in profile decodes this DI)".to_string(),
                |v| format!("{v} {}", row.unit.as_deref().unwrap_or_default()),
            );
            out(&table(
                &["meter", "di", "raw", "item", "value"],
                &[vec![
                    row.address.clone(),
                    row.di.clone(),
                    row.raw.clone(),
                    row.item.clone().unwrap_or_default(),
                    shown,
                ]],
            ));
        }
        Ok(())
    }
}

/// One row of `raw --protocol cjt188 read 901F`.
#[derive(Debug, Serialize)]
struct Cjt188Row {
    address: String,
    volume_m3: f64,
    settlement_m3: f64,
    meter_time: Option<String>,
    valve: String,
    battery_low: bool,
    status: String,
}

impl RawCmd {
    /// `raw --protocol cjt188`: the current data of one water meter.
    async fn execute_cjt188(&self, bus: &crate::modbus::spec::Bus) -> Result<()> {
        use crate::cjt188::{client::Client, Address, DiOrder, MeterType};
        let Some(address) = &self.address else {
            bail!("give the meter's address: --address NUMBER (the 14 digits on the meter)");
        };
        let address = Address::parse(address)?;
        let RawOp::Read {
            table: what,
            json: as_json,
            ..
        } = &self.op
        else {
            bail!("CJ/T 188 valves are switched through [[relay]], not raw writes");
        };
        if !what.eq_ignore_ascii_case("901F") {
            bail!("{what:?}: CJ/T 188 raw reads the current data, DI 901F (read 901F)");
        }
        let order = match self.di_order {
            DiOrderArg::AsDisplayed => DiOrder::AsDisplayed,
            DiOrderArg::Reversed => DiOrder::Reversed,
        };
        let mut line = open_serial_line(bus).await?;
        let mut client = Client::new(crate::cjt188::DEFAULT_PREAMBLE);
        let d = client
            .read(
                &mut line,
                MeterType(self.meter_type),
                address,
                order,
                self.timeout,
            )
            .await
            .map_err(|e| anyhow::anyhow!("bus {}: {e}", bus.name))?;
        let row = Cjt188Row {
            address: address.to_string(),
            volume_m3: d.volume_m3,
            settlement_m3: d.settlement_m3,
            meter_time: d.meter_time.map(|t| t.to_string()),
            valve: format!("{:?}", d.status.valve).to_lowercase(),
            battery_low: d.status.battery_low,
            status: format!("{:04X}", d.status.raw),
        };
        if *as_json {
            out(&json(&[&row])?);
        } else {
            out(&table(
                &[
                    "meter",
                    "volume m3",
                    "settlement m3",
                    "meter time",
                    "valve",
                    "battery",
                ],
                &[vec![
                    row.address.clone(),
                    format!("{:.2}", row.volume_m3),
                    format!("{:.2}", row.settlement_m3),
                    row.meter_time.clone().unwrap_or_else(|| "(invalid)".into()),
                    row.valve.clone(),
                    if row.battery_low { "LOW" } else { "ok" }.into(),
                ]],
            ));
        }
        Ok(())
    }
}

/// A serial bus's line as a byte stream: the local port, or a serial server's TCP socket.
pub(super) async fn open_serial_line(
    bus: &crate::modbus::spec::Bus,
) -> Result<Box<dyn crate::exchange::Line>> {
    use tokio_serial::SerialPortBuilderExt;
    match &bus.transport {
        Transport::Rtu(s) => {
            let parity = match s.parity {
                config::Parity::None => tokio_serial::Parity::None,
                config::Parity::Even => tokio_serial::Parity::Even,
                config::Parity::Odd => tokio_serial::Parity::Odd,
            };
            let port = tokio_serial::new(&s.device, s.baud)
                .parity(parity)
                .stop_bits(if s.stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                })
                .data_bits(tokio_serial::DataBits::Eight)
                .open_native_async()
                .with_context(|| format!("bus {}: cannot open {}", bus.name, s.device))?;
            Ok(Box::new(port))
        }
        Transport::RtuOverTcp {
            host,
            port,
            connect_timeout,
        } => {
            let stream = tokio::time::timeout(
                *connect_timeout,
                tokio::net::TcpStream::connect((host.as_str(), *port)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("bus {}: {host}:{port} did not accept within {connect_timeout:?}", bus.name))?
            .with_context(|| format!("bus {}: cannot connect to {host}:{port}", bus.name))?;
            Ok(Box::new(stream))
        }
        Transport::Tcp { .. } => bail!(
            "bus {} is Modbus TCP: DL/T 645 meters hang on a serial line (kind = \"rtu\") or a serial server passing raw bytes (kind = \"rtu_over_tcp\")",
            bus.name
        ),
    }
}
