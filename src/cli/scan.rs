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
    #[arg(long)]
    pub json: bool,
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
    pub async fn execute(self) -> Result<()> {
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
        let mut link = Link::new(bus);
        let mut hits = Vec::new();
        let total = self.units.0.len();
        let started = Instant::now();
        let tty = std::io::stderr().is_terminal();
        for (i, unit) in self.units.0.iter().copied().enumerate() {
            let t0 = Instant::now();
            let req = ReadRequest {
                function: Function::Holding,
                address: self.register,
                count: 1,
            };
            let r = link.read(unit, req, self.timeout, Duration::ZERO).await;
            let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
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
            if tty {
                let done = i + 1;
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / done as f64 * (total - done) as f64;
                let width = 30;
                let filled = width * done / total.max(1);
                eprint!(
                    "\r[{}{}] {done}/{total} unit {unit:>3}  found {}  ETA {eta:>4.0}s ",
                    "#".repeat(filled),
                    " ".repeat(width - filled),
                    hits.len()
                );
            }
        }
        if tty {
            eprintln!();
        }
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
                started.elapsed().as_secs_f64()
            ));
            out(&table(&["unit", "answer", "latency_ms"], &rows));
        }
        Ok(())
    }
}
