//! `meterd read`: reads one device now and prints its decoded values.

use super::*;

/// `meterd read DEVICE`
#[derive(Debug, Args)]
pub struct ReadCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Device name from the configuration.
    pub device: String,
    /// Read again every interval until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Interval for --watch.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub every: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ReadCmd {
    /// Polls the device with its profile's plan and prints every register.
    pub async fn execute(self, clock: &Clock) -> Result<()> {
        let c = self.config.load()?;
        let dev = c
            .device(&self.device)
            .with_context(|| {
                format!(
                    "no device {:?} in {}; `meterd check` lists the configuration",
                    self.device, c.source
                )
            })?
            .clone();
        let mut link = Link::new(&c.buses[dev.bus], clock.clone());
        loop {
            let r = bus::poll_device(&mut link, &dev).await;
            if let Some(e) = r.failure {
                return Err(link_failure(e)).with_context(|| {
                    format!(
                        "device {} (bus {}, unit {})",
                        dev.name, c.buses[dev.bus].name, dev.unit
                    )
                });
            }
            if self.json {
                out(&json(&r.readings)?);
            } else {
                let rows: Vec<Vec<String>> = r
                    .readings
                    .iter()
                    .map(|x| {
                        vec![
                            x.register.to_string(),
                            x.quantity.to_string(),
                            fmt_value(x),
                            x.unit.to_string(),
                            format!("{:?}", x.quality).to_lowercase(),
                            x.raw
                                .as_slice()
                                .iter()
                                .map(|w| format!("{w:04X}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                            x.error.as_deref().unwrap_or("").to_string(),
                        ]
                    })
                    .collect();
                out(&format!(
                    "{} ({}, unit {} on {}) at {} in {:.1} ms\n",
                    dev.name,
                    dev.profile.name,
                    dev.unit,
                    c.buses[dev.bus].name,
                    r.readings
                        .first()
                        .map(|x| x.ts.to_rfc3339())
                        .unwrap_or_default(),
                    r.latency.as_secs_f64() * 1000.0
                ));
                out(&table(
                    &[
                        "register", "quantity", "value", "unit", "quality", "raw", "error",
                    ],
                    &rows,
                ));
            }
            if !self.watch {
                return Ok(());
            }
            tokio::select! {
                () = tokio::time::sleep(self.every) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
}
