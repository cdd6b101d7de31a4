//! `meterd scan`: finds which unit ids answer on a bus.

use super::*;

/// `meterd scan --bus B --units 1-247`
#[derive(Debug, Args)]
pub struct ScanCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Bus name from the configuration.
    #[arg(long)]
    pub bus: String,
    /// Unit ids to try: `1-247`, `1,2,10-20`.
    #[arg(long, default_value = "1-247", value_parser = parse_units)]
    pub units: UnitRange,
    /// Time to wait for each unit.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Register probed on each unit (holding table).
    #[arg(long, default_value_t = 0, value_parser = parse_u16)]
    pub register: u16,
    /// The protocol to probe with.
    #[arg(long, value_enum, default_value = "modbus")]
    pub protocol: RawProtocol,
    /// DL/T 645 / CJ/T 188: meter numbers to probe, `202411110001-202411110040,202411110099`.
    /// Without it, the single meter on the line is asked for its address (only one may be
    /// connected: several answer at once and garble each other).
    #[arg(long, value_parser = parse_addresses)]
    pub addresses: Option<AddressList>,
    #[arg(long)]
    pub json: bool,
}

/// Meter numbers to probe, as printed on their nameplates.
#[derive(Debug, Clone)]
pub struct AddressList(pub Vec<String>);

/// Most meter numbers one scan probes (each absent one costs a timeout on a slow line).
const MAX_ADDRESSES: u64 = 10_000;

fn parse_addresses(s: &str) -> Result<AddressList, String> {
    let mut v = Vec::new();
    let number = |t: &str| {
        let t = t.trim();
        (!t.is_empty() && t.len() <= 14 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<u64>().ok())
            .flatten()
            .map(|n| (n, t.len()))
            .ok_or_else(|| format!("{t:?}: expected a meter number (up to 14 digits) or a range like 202411110001-202411110040"))
    };
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let ((a, width), (b, _)) = (number(a)?, number(b)?);
        if a > b {
            return Err(format!("{part:?}: range runs backwards"));
        }
        if (b - a + 1) + v.len() as u64 > MAX_ADDRESSES {
            return Err(format!("{part:?}: more than {MAX_ADDRESSES} numbers; a missing meter costs its timeout, so probe the numbers the installation list gives"));
        }
        v.extend((a..=b).map(|n| format!("{n:0width$}")));
    }
    Ok(AddressList(v))
}

/// Progress and ETA of a scan on a terminal.
struct Progress {
    tty: bool,
    started: Instant,
    total: usize,
    clock: Clock,
}

impl Progress {
    fn new(total: usize, clock: &Clock) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            started: clock.instant(),
            total,
            clock: clock.clone(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.clock.since(self.started)
    }

    fn show(&self, done: usize, what: &str, found: usize) {
        if !self.tty {
            return;
        }
        let elapsed = self.elapsed().as_secs_f64();
        let eta = elapsed / done.max(1) as f64 * (self.total - done) as f64;
        let width = 30;
        let filled = width * done / self.total.max(1);
        eprint!(
            "\r[{}{}] {done}/{} {what}  found {found}  ETA {eta:>4.0}s ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.total
        );
    }

    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// A meter found by a DL/T 645 or CJ/T 188 scan.
#[derive(Debug, Serialize)]
pub(crate) struct MeterHit {
    pub address: String,
    /// `ok`, the meter's refusal, or `garbled` (bytes but no valid frame: two meters with one
    /// number, or noise).
    pub answer: String,
    pub latency_ms: f64,
}

/// A list of unit ids.
#[derive(Debug, Clone)]
pub struct UnitRange(pub Vec<u8>);

pub(super) fn parse_units(s: &str) -> Result<UnitRange, String> {
    let mut v = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: u8 = a
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: expected a unit id 0-255 or a range like 1-247"))?;
        let b: u8 = b
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: expected a unit id 0-255 or a range like 1-247"))?;
        if a > b {
            return Err(format!("{part:?}: range runs backwards"));
        }
        v.extend(a..=b);
    }
    Ok(UnitRange(v))
}

pub(super) fn parse_u16(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?}: expected a number 0-65535 (decimal or 0x hex)"))
}

/// One unit's answer during a scan.
#[derive(Debug, Serialize)]
pub(crate) struct ScanHit {
    pub unit: u8,
    /// `ok` or the exception it answered with (any answer proves a device is there).
    pub answer: String,
    pub latency_ms: f64,
}

impl ScanCmd {
    /// Probes every unit id once; shows progress and an ETA on a terminal.
    pub async fn execute(self, clock: &Clock) -> Result<()> {
        let c = self.config.load()?;
        let bi = c.bus_index(&self.bus).with_context(|| {
            format!(
                "no bus {:?} in {}; buses: {:?}",
                self.bus,
                c.source,
                c.buses.iter().map(|b| &b.name).collect::<Vec<_>>()
            )
        })?;
        let bus = &c.buses[bi];
        if self.protocol != RawProtocol::Modbus {
            return self.scan_meters(bus, clock).await;
        }
        let mut link = Link::new(bus, clock.clone());
        let mut hits = Vec::new();
        let total = self.units.0.len();
        let started = clock.instant();
        let progress = Progress::new(total, clock);
        for (i, unit) in self.units.0.iter().copied().enumerate() {
            let t0 = clock.instant();
            let req = ReadRequest {
                function: Function::Holding,
                address: self.register,
                count: 1,
            };
            let r = link.read(unit, req, self.timeout, Duration::ZERO).await;
            let latency_ms = clock.since(t0).as_secs_f64() * 1000.0;
            match r {
                Ok(_) => hits.push(ScanHit {
                    unit,
                    answer: "ok".into(),
                    latency_ms,
                }),
                // 0x0A/0x0B come from a TCP gateway saying nobody is there.
                Err(LinkError::Exception { code, .. }) if code != 0x0A && code != 0x0B => hits
                    .push(ScanHit {
                        unit,
                        answer: format!("exception {code:#04x}"),
                        latency_ms,
                    }),
                Err(e @ (LinkError::OpenSerial { .. } | LinkError::Connect { .. })) => {
                    return Err(e.into())
                }
                Err(_) => {}
            }
            progress.show(i + 1, &format!("unit {unit:>3}"), hits.len());
        }
        progress.end();
        if self.json {
            out(&json(&hits)?);
        } else {
            let rows: Vec<Vec<String>> = hits
                .iter()
                .map(|h| {
                    vec![
                        h.unit.to_string(),
                        h.answer.clone(),
                        format!("{:.1}", h.latency_ms),
                    ]
                })
                .collect();
            out(&format!(
                "bus {}: {} of {} unit id(s) answered in {:.1} s\n",
                bus.name,
                hits.len(),
                total,
                clock.since(started).as_secs_f64()
            ));
            out(&table(&["unit", "answer", "latency_ms"], &rows));
        }
        Ok(())
    }
}

impl ScanCmd {
    /// DL/T 645 / CJ/T 188: probes each listed meter number (energy 00010000, or a cold-water
    /// meter's current data 901F), or asks the single meter on the line for its address.
    async fn scan_meters(&self, bus: &crate::modbus::spec::Bus, clock: &Clock) -> Result<()> {
        use crate::{cjt188, dlt645};
        let mut line = super::raw::open_serial_line(bus).await?;
        let Some(addresses) = &self.addresses else {
            out(&format!("bus {}: asking the meter on the line for its address (works only with ONE meter connected: with several they answer at once and garble each other; give --addresses to probe a list)\n", bus.name));
            let found = match self.protocol {
                RawProtocol::Dlt645 => dlt645::client::Client::new(dlt645::frame::DEFAULT_PREAMBLE)
                    .read_address(&mut line, self.timeout)
                    .await
                    .map(|a| a.to_string())
                    .map_err(|e| anyhow::anyhow!("{e}")),
                _ => cjt188::client::Client::new(cjt188::DEFAULT_PREAMBLE)
                    .read_address(&mut line, cjt188::DiOrder::AsDisplayed, self.timeout)
                    .await
                    .map(|(t, a)| format!("{a} (type {:02X})", t.0))
                    .map_err(|e| anyhow::anyhow!("{e}")),
            }
            .with_context(|| format!("bus {}: no single meter answered", bus.name))?;
            out(&format!("address: {found}\n"));
            return Ok(());
        };
        let progress = Progress::new(addresses.0.len(), clock);
        let mut hits = Vec::new();
        let mut d645 = dlt645::client::Client::new(dlt645::frame::DEFAULT_PREAMBLE);
        let mut c188 = cjt188::client::Client::new(cjt188::DEFAULT_PREAMBLE);
        for (i, number) in addresses.0.iter().enumerate() {
            let t0 = clock.instant();
            let answer = if self.protocol == RawProtocol::Dlt645 {
                let a = dlt645::Address::parse(number)?;
                match d645
                    .read(&mut line, a, dlt645::Di::FORWARD_ACTIVE_KWH, self.timeout)
                    .await
                {
                    Ok(_) => Some("ok".to_string()),
                    Err(e) if e.meter_answered() => Some(e.to_string()),
                    Err(dlt645::client::ClientError::Line {
                        source: crate::exchange::ExchangeError::Timeout { garbled: true, .. },
                        ..
                    }) => Some("garbled".into()),
                    Err(_) => None,
                }
            } else {
                let a = cjt188::Address::parse(number)?;
                match c188
                    .read(
                        &mut line,
                        cjt188::MeterType::COLD_WATER,
                        a,
                        cjt188::DiOrder::AsDisplayed,
                        self.timeout,
                    )
                    .await
                {
                    Ok(_) => Some("ok".to_string()),
                    Err(cjt188::client::ClientError::Answer { source, .. }) => {
                        Some(source.to_string())
                    }
                    Err(cjt188::client::ClientError::Line {
                        source: crate::exchange::ExchangeError::Timeout { garbled: true, .. },
                        ..
                    }) => Some("garbled".into()),
                    Err(_) => None,
                }
            };
            if let Some(answer) = answer {
                hits.push(MeterHit {
                    address: number.clone(),
                    answer,
                    latency_ms: clock.since(t0).as_secs_f64() * 1000.0,
                });
            }
            progress.show(i + 1, number, hits.len());
        }
        progress.end();
        if self.json {
            out(&json(&hits)?);
        } else {
            out(&format!(
                "bus {}: {} of {} meter number(s) answered in {:.1} s\n",
                bus.name,
                hits.len(),
                addresses.0.len(),
                progress.elapsed().as_secs_f64()
            ));
            let rows: Vec<Vec<String>> = hits
                .iter()
                .map(|h| {
                    vec![
                        h.address.clone(),
                        h.answer.clone(),
                        format!("{:.1}", h.latency_ms),
                    ]
                })
                .collect();
            out(&table(&["address", "answer", "latency_ms"], &rows));
        }
        Ok(())
    }
}
