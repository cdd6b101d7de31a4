//! The acceptance pass a field engineer runs on a new installation (and CI against the simulator):
//! every device answers and decodes, listed values match the meter's display, every listed relay
//! switches both ways with its state read back.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{out, table};
use crate::config::Config;
use crate::modbus::bus;
use crate::modbus::link::Link;

/// A bench description (`hil/bench.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BenchFile {
    pub bench: BenchInfo,
    #[serde(default)]
    pub check: Vec<Check>,
    #[serde(default)]
    pub toggle: Vec<Toggle>,
}

/// Which config the bench uses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BenchInfo {
    pub name: String,
    /// The gateway config, relative to the bench file.
    pub config: PathBuf,
}

/// A value to compare with what the meter's display shows.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Check {
    pub device: String,
    pub register: String,
    /// Expected value (the simulator's, or one noted from the display); asked for when absent.
    pub expect: Option<f64>,
    /// Allowed difference, in the register's unit.
    #[serde(default = "tolerance")]
    pub tolerance: f64,
}

fn tolerance() -> f64 {
    0.5
}

/// A relay output to switch and read back.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toggle {
    pub device: String,
    pub output: String,
}

/// One line of the report.
#[derive(Debug, Serialize)]
pub(crate) struct ReportStep {
    pub step: String,
    pub target: String,
    pub pass: bool,
    pub detail: String,
}

/// `meterd acceptance --bench hil/bench.toml [--sim hil/sim-building.toml]`
#[derive(Debug, Args)]
pub struct AcceptanceCmd {
    /// Bench description.
    #[arg(long)]
    pub bench: PathBuf,
    /// Run against this simulated building instead of the hardware (buses of the same names).
    #[arg(long)]
    pub sim: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

impl AcceptanceCmd {
    /// Runs every step and fails if any fails.
    pub async fn execute(self, clock: &crate::clock::Clock) -> Result<()> {
        let text = std::fs::read_to_string(&self.bench)
            .with_context(|| format!("reading {}", self.bench.display()))?;
        let bench: BenchFile = toml::from_str(&text)
            .with_context(|| format!("{}: not a bench description", self.bench.display()))?;
        let base = self.bench.parent().unwrap_or(Path::new("."));
        let mut config = Config::from_path(&base.join(&bench.bench.config))
            .map_err(|e| anyhow::Error::new(super::InvalidConfig(e)))?;
        let _sim = match &self.sim {
            Some(b) => {
                let (building, profiles) = crate::sim::load(b)?;
                let running = crate::sim::start(&building, &profiles).await?;
                super::point_buses_at(&mut config, &running);
                Some(running)
            }
            None => None,
        };
        let steps = run(&config, &bench, self.sim.is_some(), clock).await;
        let failed = steps.iter().filter(|s| !s.pass).count();
        if self.json {
            out(&(serde_json::to_string_pretty(&steps)? + "\n"));
        } else {
            out(&format!(
                "acceptance: {} ({}){}\n",
                bench.bench.name,
                config.source,
                if self.sim.is_some() {
                    " against the simulator"
                } else {
                    ""
                }
            ));
            let rows: Vec<Vec<String>> = steps
                .iter()
                .map(|s| {
                    vec![
                        s.step.clone(),
                        s.target.clone(),
                        if s.pass { "PASS".into() } else { "FAIL".into() },
                        s.detail.clone(),
                    ]
                })
                .collect();
            out(&table(&["step", "target", "result", "detail"], &rows));
            out(&format!(
                "{} passed, {} failed\n",
                steps.len() - failed,
                failed
            ));
        }
        if failed > 0 {
            bail!("{failed} acceptance step(s) failed");
        }
        Ok(())
    }
}

/// Runs the pass against `config` (real buses, or buses pointed at a simulator).
pub(crate) async fn run(
    config: &Config,
    bench: &BenchFile,
    simulated: bool,
    clock: &crate::clock::Clock,
) -> Vec<ReportStep> {
    let mut steps = Vec::new();
    let mut links: Vec<Link> = config
        .buses
        .iter()
        .map(|b| Link::new(b, clock.clone()))
        .collect();
    let mut readings = Vec::new();
    for d in &config.devices {
        let r = bus::poll_device(&mut links[d.bus], d).await;
        let bad = r
            .readings
            .iter()
            .filter(|x| x.quality != crate::reading::Quality::Good)
            .count();
        let pass = r.failure.is_none() && bad == 0;
        let detail = match &r.failure {
            Some(e) => e.to_string(),
            None if bad > 0 => format!(
                "{bad} register(s) not decoded: {}",
                r.readings
                    .iter()
                    .find_map(|x| x.error.as_deref())
                    .unwrap_or("")
            ),
            None => format!(
                "{} value(s) in {:.0} ms",
                r.readings.len(),
                r.latency.as_secs_f64() * 1000.0
            ),
        };
        steps.push(ReportStep {
            step: "read".into(),
            target: format!(
                "{} (unit {} on {})",
                d.name, d.unit, config.buses[d.bus].name
            ),
            pass,
            detail,
        });
        readings.extend(r.readings);
    }
    let interactive = !simulated && std::io::stdin().is_terminal();
    for c in &bench.check {
        let target = format!("{} {}", c.device, c.register);
        let Some(r) = readings
            .iter()
            .find(|r| *r.device == *c.device && *r.register == *c.register)
        else {
            steps.push(ReportStep {
                step: "display".into(),
                target,
                pass: false,
                detail: "no such device/register in the config".into(),
            });
            continue;
        };
        let Some(v) = r.value else {
            steps.push(ReportStep {
                step: "display".into(),
                target,
                pass: false,
                detail: "not read".into(),
            });
            continue;
        };
        let expect = match (c.expect, interactive) {
            (Some(e), _) => Some(e),
            (None, true) => ask(&format!(
                "{target}: meterd reads {v:.3} {}. Value on the meter's display? ",
                r.unit
            )),
            (None, false) => None,
        };
        let (pass, detail) = match expect {
            Some(e) => ((v - e).abs() <= c.tolerance, format!("read {v:.3} {}, expected {e} ± {}", r.unit, c.tolerance)),
            None => (false, format!("read {v:.3} {}; no expected value (set expect, or run on a terminal to enter the display reading)", r.unit)),
        };
        steps.push(ReportStep {
            step: "display".into(),
            target,
            pass,
            detail,
        });
    }
    for t in &bench.toggle {
        let target = format!("{} {}", t.device, t.output);
        let Some(d) = config.device(&t.device) else {
            steps.push(ReportStep {
                step: "toggle".into(),
                target,
                pass: false,
                detail: "no such device in the config".into(),
            });
            continue;
        };
        let link = &mut links[d.bus];
        let result = async {
            let first = bus::actuate(link, d, &t.output, None).await?;
            let flipped = bus::actuate(link, d, &t.output, Some(!first.after)).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let back = bus::actuate(link, d, &t.output, Some(first.after)).await?;
            Ok::<_, bus::ActuateError>((first.after, flipped.after, back.after))
        }
        .await;
        let (pass, detail) = match result {
            Ok((a, b, c)) => (
                b != a && c == a,
                format!(
                    "{} → {} → {} (read back each time)",
                    onoff(a),
                    onoff(b),
                    onoff(c)
                ),
            ),
            Err(e) => (false, e.to_string()),
        };
        steps.push(ReportStep {
            step: "toggle".into(),
            target,
            pass,
            detail,
        });
    }
    steps
}

fn onoff(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

fn ask(prompt: &str) -> Option<f64> {
    eprint!("{prompt}");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).ok()?;
    line.trim().parse().ok()
}
