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
    /// Unit id.
    #[arg(long)]
    pub unit: u8,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub op: RawOp,
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
    /// Read COUNT registers or bits from ADDRESS.
    Read {
        table: Table,
        #[arg(value_parser = parse_u16)]
        address: u16,
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
    /// Write a coil (on/off) or holding register value(s).
    Write {
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
    pub async fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        let bi = c
            .bus_index(&self.bus)
            .with_context(|| format!("no bus {:?} in {}", self.bus, c.source))?;
        let mut link = Link::new(&c.buses[bi]);
        let unit = self.unit;
        match self.op {
            RawOp::Read {
                table: t,
                address,
                count,
                ty,
                order,
                json: as_json,
            } => {
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
