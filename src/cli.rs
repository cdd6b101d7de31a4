//! The field engineer's command line. Each subcommand is one type with one `execute`.
//!
//! Exit codes (stable, documented in the README): 0 success; 1 a runtime failure (bus, device, I/O);
//! 2 bad usage (clap); 3 the configuration is invalid or unreadable; 4 a device answered with a Modbus
//! exception.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::{self, Config, ConfigError, Transport};
use crate::modbus::bus::{self, DeviceStatus};
use crate::modbus::decode::{self, ByteOrder, DataType, WordOrder};
use crate::modbus::link::{Data, Link, LinkError};
use crate::modbus::plan::ReadRequest;
use crate::modbus::profile::Function;
use crate::reading::{Quality, Reading};
use crate::{daemon, sim};

/// Exit code: the configuration is invalid or cannot be read.
pub const EXIT_CONFIG: i32 = 3;
/// Exit code: the device answered with a Modbus exception.
pub const EXIT_EXCEPTION: i32 = 4;

/// meterd: Modbus meter polling at the edge of a building.
#[derive(Debug, Parser)]
#[command(name = "meterd", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace or a tracing directive). Default: RUST_LOG, then
    /// `[gateway] log_level` for `run`, then info.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: poll every configured device.
    Run(RunCmd),
    /// Validate a configuration and list every problem.
    Check(CheckCmd),
    /// Read one device now and print its decoded values.
    Read(ReadCmd),
    /// Find which unit ids answer on a bus.
    Scan(ScanCmd),
    /// Read or write registers and coils by address (like mbpoll).
    Raw(RawCmd),
    /// List the device profiles, or show one.
    Profiles(ProfilesCmd),
    /// Show the outbox: depth, oldest record, last publish error.
    Buffer(BufferCmd),
    /// Draw the meter trees with the latest readings and each node's loss.
    Topology(TopologyCmd),
    /// Compute the apportionment of common consumption for a month.
    Apportion(ApportionCmd),
    /// Per-room bills of a month: readings, consumption by band, pool shares, total.
    #[command(disable_version_flag = true)]
    Bill(BillCmd),
    /// Recompute a month's bills as a new version (after a correction), with per-room adjustments.
    Recompute(RecomputeCmd),
    /// Override a room's relays by hand, or list desired vs actual relay states.
    Relay(RelayCmd),
    /// Ask the running daemon how it is doing: buses, devices, outbox, MQTT, relays.
    Status(StatusCmd),
    /// Run the installation acceptance pass (hil/bench.toml), on hardware or the simulator.
    Acceptance(crate::acceptance::AcceptanceCmd),
    /// Serve a virtual building over Modbus TCP and RTU (pty).
    Simulate(SimulateCmd),
    /// Run the simulator and the daemon together on the built-in sample building.
    Demo(DemoCmd),
    /// Measure throughput, CPU and memory against the targets.
    Bench(crate::bench::BenchCmd),
}

/// `--config` shared by the commands that need one.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
}

impl ConfigArg {
    fn load(&self) -> Result<Config> {
        Config::from_path(&self.config).map_err(config_failure)
    }
}

/// Marks a config error so `main` exits with [`EXIT_CONFIG`].
#[derive(Debug)]
pub struct InvalidConfig(pub ConfigError);

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for InvalidConfig {}

fn config_failure(e: ConfigError) -> anyhow::Error {
    anyhow::Error::new(InvalidConfig(e))
}

/// Marks a Modbus exception so `main` exits with [`EXIT_EXCEPTION`].
#[derive(Debug)]
pub struct DeviceException(pub LinkError);
impl std::fmt::Display for DeviceException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for DeviceException {}

fn link_failure(e: LinkError) -> anyhow::Error {
    if e.device_answered() {
        anyhow::Error::new(DeviceException(e))
    } else {
        anyhow::Error::new(e)
    }
}

/// Writes to stdout; a closed pipe (`meterd read … | head`) ends the process quietly.
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// An aligned text table: the human output of every read command.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(headers.to_vec());
    s += &line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(|x| x.as_str())
            .collect(),
    );
    for r in rows {
        s += &line(r.iter().map(|c| c.as_str()).collect());
    }
    s
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

fn fmt_value(r: &Reading) -> String {
    match r.value {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
    }
}

// ---- run ----------------------------------------------------------------------------------------

/// `meterd run`
#[derive(Debug, Args)]
pub struct RunCmd {
    #[command(flatten)]
    pub config: ConfigArg,
}

impl RunCmd {
    /// Loads the config (refusing an invalid one) and runs until SIGINT/SIGTERM; SIGHUP reloads.
    pub async fn execute(self) -> Result<()> {
        use sd_notify::NotifyState;
        use tokio::signal::unix::{signal, SignalKind};
        let mut config = self.config.load()?;
        let mut daemon = start_daemon(&config)?;
        let _ = sd_notify::notify(
            false,
            &[
                NotifyState::Ready,
                NotifyState::Status(&status_line(&config)),
            ],
        );
        let mut wd_usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut wd_usec);
        let period = if watchdog {
            Duration::from_micros(wd_usec / 2)
        } else {
            Duration::from_secs(60)
        };
        let mut wd = tokio::time::interval(period);
        wd.tick().await;
        let mut summary = tokio::time::interval(Duration::from_secs(60));
        summary.tick().await;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = wd.tick(), if watchdog => {
                    // Ping only when the bus tasks and the store are alive: a wedged task gets us restarted.
                    match daemon.healthy(period / 2).await {
                        Ok(()) => { let _ = sd_notify::notify(false, &[NotifyState::Watchdog]); }
                        Err(e) => tracing::error!(error = %e, "watchdog: not pinging systemd"),
                    }
                }
                _ = summary.tick() => {
                    let (ok, failed, offline) = totals(&daemon.bus_status.iter().flat_map(|s| s.snapshot()).collect::<Vec<_>>());
                    let outbox_rows = daemon.store.depth().await;
                    tracing::info!(polls_ok = ok, polls_failed = failed, offline, outbox_rows, "polling summary");
                }
                _ = hup.recv() => {
                    let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
                    match self.config.load() {
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused: the new configuration is invalid; still running the old one"),
                        Ok(new) => {
                            tracing::info!(config = %new.source, hash = %new.hash, "reloading");
                            // The outbox and the enforcement state live in SQLite; the new daemon
                            // reads every relay before switching anything, so nothing flickers.
                            daemon.stop().await;
                            daemon = start_daemon(&new)?;
                            config = new;
                        }
                    }
                    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(&status_line(&config))]);
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
        tracing::info!("meterd stopping");
        daemon.stop().await;
        Ok(())
    }
}

fn start_daemon(config: &Config) -> Result<daemon::Daemon> {
    tracing::info!(config = %config.source, hash = %config.hash, buses = config.buses.len(), devices = config.devices.len(), gateway = %config.gateway.id, outbox = %config.store.path.display(), mqtt = config.mqtt.is_some(), relays = config.enforcement.relays.len(), "meterd starting");
    Ok(daemon::Daemon::start(
        config,
        std::sync::Arc::new(crate::uplink::NoCommands),
        None,
    )?)
}

fn status_line(c: &Config) -> String {
    format!(
        "polling {} device(s) on {} bus(es); config {}",
        c.devices.len(),
        c.buses.len(),
        c.hash
    )
}

// ---- status -------------------------------------------------------------------------------------

/// `meterd status`
#[derive(Debug, Args)]
pub struct StatusCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long)]
    pub json: bool,
}

impl StatusCmd {
    /// Asks the running daemon over its control socket.
    pub async fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        let v = crate::control::request(
            &c.gateway.control_socket,
            &serde_json::json!({"op": "status"}),
        )
        .await?;
        if self.json {
            out(&json(&v)?);
            return Ok(());
        }
        let s = |x: &serde_json::Value| match x {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out(&format!(
            "meterd {} on {}: up {} s, config {} ({})\n",
            s(&v["version"]),
            s(&v["gateway"]),
            s(&v["uptime_s"]),
            s(&v["config"]["hash"]),
            s(&v["config"]["source"])
        ));
        let mut rows = Vec::new();
        let mut lines = String::new();
        for b in v["buses"].as_array().into_iter().flatten() {
            let l = &b["line"];
            let n = |k: &str| l[k].as_u64().unwrap_or(0);
            if n("foreign_frames") + n("mismatched_frames") + n("noise_bytes") + n("stale_bytes")
                > 0
            {
                lines += &format!(
                    "bus {}: dropped {} frames of other units, {} late or mismatched answers, {} bytes of noise, {} stale bytes\n",
                    s(&b["name"]),
                    n("foreign_frames"),
                    n("mismatched_frames"),
                    n("noise_bytes"),
                    n("stale_bytes")
                );
            }
            for d in b["devices"].as_array().into_iter().flatten() {
                let ok = d["polls_ok"].as_u64().unwrap_or(0);
                let failed = d["polls_failed"].as_u64().unwrap_or(0);
                let rate = if ok + failed > 0 {
                    format!("{:.1} %", ok as f64 * 100.0 / (ok + failed) as f64)
                } else {
                    "-".into()
                };
                rows.push(vec![
                    s(&b["name"]),
                    s(&d["name"]),
                    s(&d["unit"]),
                    rate,
                    format!("{ok}/{failed}"),
                    d["last_latency_ms"]
                        .as_f64()
                        .map(|l| format!("{l:.1}"))
                        .unwrap_or_else(|| "-".into()),
                    s(&d["offline_since"]),
                    s(&d["last_error"]).chars().take(60).collect(),
                ]);
            }
        }
        out(&table(
            &[
                "bus",
                "device",
                "unit",
                "success",
                "ok/failed",
                "latency_ms",
                "offline since",
                "last error",
            ],
            &rows,
        ));
        out(&lines);
        let o = &v["outbox"];
        out(&format!(
            "\noutbox: {} record(s) waiting, oldest {}, last publish error {}, store error {}\n",
            s(&o["rows"]),
            s(&o["oldest_ts"]),
            s(&o["last_publish_error"]),
            s(&v["store_error"])
        ));
        let m = &v["mqtt"];
        if m.is_null() {
            out("mqtt: not configured\n");
        } else {
            out(&format!(
                "mqtt: {} since {}, {} record(s) acknowledged, {} reconnect(s), last error {}\n",
                if m["connected"] == true {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                s(&m["connected_since"]),
                s(&m["records_acked"]),
                s(&m["reconnects"]),
                s(&m["last_error"])
            ));
        }
        if let Some(relays) = v["relays"].as_array() {
            let rows: Vec<Vec<String>> = relays
                .iter()
                .map(|r| {
                    vec![
                        s(&r["relay"]),
                        s(&r["room"]),
                        s(&r["desired"]),
                        s(&r["actual"]),
                        s(&r["rule"]),
                    ]
                })
                .collect();
            out("\n");
            out(&table(
                &["relay", "room", "desired", "actual", "rule"],
                &rows,
            ));
        }
        Ok(())
    }
}

fn totals(devices: &[DeviceStatus]) -> (u64, u64, usize) {
    (
        devices.iter().map(|d| d.polls_ok).sum(),
        devices.iter().map(|d| d.polls_failed).sum(),
        devices.iter().filter(|d| d.offline_since.is_some()).count(),
    )
}

// ---- check --------------------------------------------------------------------------------------

/// `meterd check`
#[derive(Debug, Args)]
pub struct CheckCmd {
    #[command(flatten)]
    pub config: ConfigArg,
}

impl CheckCmd {
    /// Prints a summary of a valid config; an invalid one fails with every problem listed.
    pub fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        let requests: usize = c.devices.iter().map(|d| d.plan.requests.len()).sum();
        out(&format!(
            "{}: OK: gateway {} ({}), {} bus(es), {} device(s), {} read request(s) per full poll cycle, {} profile(s); topology: {} meter node(s), {} room(s), {} pool(s); enforcement: {} relay(s), {} prepaid account(s); uplink: {}\n",
            c.source,
            c.gateway.id,
            c.gateway.timezone,
            c.buses.len(),
            c.devices.len(),
            requests,
            c.profiles.len(),
            c.site.meters.len(),
            c.site.rooms.len(),
            c.site.pools.len(),
            c.enforcement.relays.len(),
            c.enforcement.prepaid.len(),
            c.mqtt.as_ref().map(|m| format!("mqtt {}:{}", m.host, m.port)).unwrap_or_else(|| "none (outbox only)".into())
        ));
        Ok(())
    }
}

// ---- read ---------------------------------------------------------------------------------------

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
    pub async fn execute(self) -> Result<()> {
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
        let mut link = Link::new(&c.buses[dev.bus]);
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
                _ = tokio::time::sleep(self.every) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
}

// ---- scan ---------------------------------------------------------------------------------------

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

fn parse_units(s: &str) -> Result<UnitRange, String> {
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

fn parse_u16(s: &str) -> Result<u16, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?}: expected a number 0-65535 (decimal or 0x hex)"))
}

/// One unit's answer during a scan.
#[derive(Debug, Serialize)]
pub struct ScanHit {
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

// ---- raw ----------------------------------------------------------------------------------------

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
struct RawRow {
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
                                value: decode::decode(w, ty, wo, bo).ok().map(|v| v.as_f64()),
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
                                    .map(|v| v.to_string())
                                    .unwrap_or_else(|| "(incomplete)".into()),
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

fn confirm(what: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "{what}: refusing to write without confirmation on a non-interactive input; pass --yes"
        );
    }
    eprint!("{what}\nProceed? [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

// ---- profiles -----------------------------------------------------------------------------------

/// `meterd profiles [NAME]`
#[derive(Debug, Args)]
pub struct ProfilesCmd {
    /// Directory of site profiles in addition to the built-in ones.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Show this profile's register table.
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

impl ProfilesCmd {
    /// Lists or shows profiles.
    pub fn execute(self) -> Result<()> {
        let dir = self
            .dir
            .unwrap_or_else(|| Path::new(config::DEFAULT_PATH).with_file_name("profiles"));
        let lib =
            config::load_profiles(&dir).map_err(|i| config_failure(ConfigError::Invalid(i)))?;
        match self.name {
            None => {
                if self.json {
                    out(&json(
                        &lib.values().map(|p| p.as_ref()).collect::<Vec<_>>(),
                    )?);
                } else {
                    let rows: Vec<Vec<String>> = lib
                        .values()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                p.registers.len().to_string(),
                                p.description.clone(),
                            ]
                        })
                        .collect();
                    out(&table(&["profile", "registers", "description"], &rows));
                }
            }
            Some(n) => {
                let p = lib
                    .get(&n)
                    .with_context(|| format!("no profile {n:?}; `meterd profiles` lists them"))?;
                if self.json {
                    out(&json(p.as_ref())?);
                } else {
                    out(&format!(
                        "{}: {}\nsource: {}\n",
                        p.name, p.description, p.source
                    ));
                    if let Some(c) = &p.commissioning {
                        out(&format!("commissioning: {c}\n"));
                    }
                    let rows: Vec<Vec<String>> = p
                        .registers
                        .iter()
                        .map(|r| {
                            vec![
                                r.name.to_string(),
                                r.quantity.to_string(),
                                r.function.to_string(),
                                format!("{:#06x}", r.address),
                                format!("{:?}", r.ty).to_lowercase(),
                                r.scale.to_string(),
                                r.unit.to_string(),
                            ]
                        })
                        .collect();
                    out(&table(
                        &[
                            "register", "quantity", "table", "address", "type", "scale", "unit",
                        ],
                        &rows,
                    ));
                }
            }
        }
        Ok(())
    }
}

// ---- buffer -------------------------------------------------------------------------------------

/// `meterd buffer`
#[derive(Debug, Args)]
pub struct BufferCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long)]
    pub json: bool,
}

impl BufferCmd {
    /// Reads the outbox the daemon writes (read-only; safe while it runs).
    pub fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        let s = crate::store::read_stats(&c.store.path)?;
        if self.json {
            out(&json(&s)?);
            return Ok(());
        }
        let age = s
            .oldest_ts
            .map(|t| {
                let secs = (chrono::Utc::now() - t).num_seconds().max(0);
                format!(
                    "{} ({}h{:02}m{:02}s ago)",
                    t.to_rfc3339(),
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60
                )
            })
            .unwrap_or_else(|| "-".into());
        let rows = vec![
            vec!["outbox".into(), c.store.path.display().to_string()],
            vec!["records waiting".into(), s.rows.to_string()],
            vec![
                "  telemetry / events / results / audit / replies".into(),
                format!(
                    "{} / {} / {} / {} / {}",
                    s.by_kind[0], s.by_kind[1], s.by_kind[2], s.by_kind[3], s.by_kind[4]
                ),
            ],
            vec![
                "set aside (too large to publish)".into(),
                s.oversized.to_string(),
            ],
            vec!["payload bytes".into(), s.payload_bytes.to_string()],
            vec!["oldest record".into(), age],
            vec!["last seq assigned".into(), s.last_seq.to_string()],
            vec![
                "dropped by the cap (total)".into(),
                s.dropped_total.to_string(),
            ],
            vec![
                "last publish ok".into(),
                s.last_publish_ok.clone().unwrap_or_else(|| "-".into()),
            ],
            vec![
                "last publish error".into(),
                s.last_publish_error
                    .clone()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ],
            vec![
                "store error".into(),
                s.store_error
                    .clone()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ],
        ];
        out(&table(&["", ""], &rows));
        Ok(())
    }
}

// ---- topology -----------------------------------------------------------------------------------

/// `meterd topology`
#[derive(Debug, Args)]
pub struct TopologyCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Balance window ending now.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Emit Graphviz instead of the tree.
    #[arg(long, conflicts_with = "json")]
    pub dot: bool,
    #[arg(long)]
    pub json: bool,
}

/// One node as `topology --json` prints it.
#[derive(Debug, Serialize)]
struct NodeView {
    name: String,
    utility: crate::topology::Utility,
    parent: Option<String>,
    device: Option<String>,
    room: Option<String>,
    pool: Option<String>,
    latest: Option<f64>,
    latest_ts: Option<String>,
    consumption: Option<f64>,
    balance: Option<crate::topology::Balance>,
}

impl TopologyCmd {
    /// Draws the trees from the config and the daemon's counter history.
    pub fn execute(self) -> Result<()> {
        use crate::topology::Source;
        let c = self.config.load()?;
        if c.site.is_empty() {
            bail!("{}: no [[meter]] nodes configured; see config/meterd.toml for the [[room]], [[meter]] and [[pool]] sections", c.source);
        }
        let (from, to) = crate::accounting::live_window(&c, self.window);
        let conn = crate::store::open_read_only(&c.store.path);
        let (cons, balances, latest) = match &conn {
            Ok(conn) => {
                let cons = crate::accounting::consumption(conn, &c, from, to)?;
                let balances = crate::topology::balances(&c.site, &cons);
                let mut latest = BTreeMap::new();
                for m in c.site.meters.values() {
                    if let Source::Device(d) = &m.source {
                        let now = chrono::Utc::now().timestamp_millis();
                        let w = crate::store::history_window(
                            conn,
                            d,
                            m.utility.quantity().as_str(),
                            now,
                            now,
                        )?;
                        if let Some((ts, v)) = w.last() {
                            latest.insert(
                                m.name.clone(),
                                (
                                    *v,
                                    chrono::DateTime::from_timestamp_millis(*ts)
                                        .map(|t| t.to_rfc3339())
                                        .unwrap_or_default(),
                                ),
                            );
                        }
                    }
                }
                (cons, balances, latest)
            }
            Err(e) => {
                eprintln!("meterd: no readings to show ({e}); showing the configured trees only");
                (BTreeMap::new(), Vec::new(), BTreeMap::new())
            }
        };
        let views: Vec<NodeView> = c
            .site
            .meters
            .values()
            .map(|m| NodeView {
                name: m.name.clone(),
                utility: m.utility,
                parent: m.parent.clone(),
                device: match &m.source {
                    Source::Device(d) => Some(d.clone()),
                    Source::Virtual(_) => None,
                },
                room: m.room.clone(),
                pool: m.pool.clone(),
                latest: latest.get(&m.name).map(|x| x.0),
                latest_ts: latest.get(&m.name).map(|x| x.1.clone()),
                consumption: cons.get(&m.name).map(|x| x.value),
                balance: balances.iter().find(|b| b.node == m.name).cloned(),
            })
            .collect();
        let threshold = c.site.loss_threshold_pct;
        if self.json {
            out(&json(&views)?);
        } else if self.dot {
            let mut s = String::from(
                "digraph meterd {\n  rankdir=TB;\n  node [shape=box, fontname=\"Helvetica\"];\n",
            );
            for v in &views {
                let (label, color) = match &v.balance {
                    Some(b) => (
                        format!("{}\\nloss {:.1} %", v.name, b.loss_pct),
                        loss_color(b.loss_pct, threshold).1,
                    ),
                    None => (v.name.clone(), "black"),
                };
                let room = v
                    .room
                    .as_ref()
                    .map(|r| format!("\\nroom {r}"))
                    .unwrap_or_default();
                let pool = v
                    .pool
                    .as_ref()
                    .map(|p| format!("\\npool {p}"))
                    .unwrap_or_default();
                s += &format!(
                    "  \"{}\" [label=\"{label}{room}{pool}\", color={color}];\n",
                    v.name
                );
                if let Some(p) = &v.parent {
                    s += &format!("  \"{p}\" -> \"{}\";\n", v.name);
                }
            }
            s += "}\n";
            out(&s);
        } else {
            let colour = std::io::stdout().is_terminal();
            let mut text = format!(
                "balance window: {} to {} (threshold {threshold} %)\n",
                from.with_timezone(&c.gateway.timezone)
                    .format("%Y-%m-%d %H:%M:%S"),
                to.with_timezone(&c.gateway.timezone).format("%H:%M:%S %Z")
            );
            let mut roots: Vec<&NodeView> = views.iter().filter(|v| v.parent.is_none()).collect();
            roots.sort_by_key(|v| (v.utility, v.name.clone()));
            for r in roots {
                draw(
                    &mut text,
                    &views,
                    r,
                    "",
                    true,
                    true,
                    threshold,
                    c.site.meters[&r.name].utility.unit(),
                    colour,
                );
            }
            out(&text);
        }
        Ok(())
    }
}

fn loss_color(pct: f64, threshold: f64) -> (&'static str, &'static str) {
    if !pct.is_finite() || pct.abs() > threshold {
        ("\x1b[31m", "red")
    } else if pct.abs() > threshold / 2.0 {
        ("\x1b[33m", "orange")
    } else {
        ("\x1b[32m", "darkgreen")
    }
}

#[allow(clippy::too_many_arguments)]
fn draw(
    text: &mut String,
    all: &[NodeView],
    v: &NodeView,
    prefix: &str,
    last: bool,
    root: bool,
    threshold: f64,
    unit: &str,
    colour: bool,
) {
    let branch = if root {
        ""
    } else if last {
        "└─ "
    } else {
        "├─ "
    };
    let mut line = format!("{prefix}{branch}{}", v.name);
    if let Some(d) = &v.device {
        if d != &v.name {
            line += &format!(" [{d}]");
        }
    } else {
        line += " [virtual]";
    }
    if let Some(r) = &v.room {
        line += &format!(" → room {r}");
    }
    if let Some(p) = &v.pool {
        line += &format!(" → pool {p}");
    }
    if let Some(l) = v.latest {
        line += &format!("  {l:.3} {unit}");
    }
    if let Some(c) = v.consumption {
        line += &format!("  +{c:.3} {unit}");
    }
    if let Some(b) = &v.balance {
        let (ansi, _) = loss_color(b.loss_pct, threshold);
        let mut l = format!("loss {:.1} %", b.loss_pct);
        if let Some(s) = &b.suspect {
            l += &format!(" — suspect {}", s.meter);
            if let Some(u) = &s.belongs_under {
                l += &format!(" (balances under {u})");
            }
        }
        if colour {
            line += &format!("  {ansi}{l}\x1b[0m");
        } else {
            line += &format!("  {l}");
        }
    }
    text.push_str(&line);
    text.push('\n');
    let mut kids: Vec<&NodeView> = all
        .iter()
        .filter(|k| k.parent.as_deref() == Some(v.name.as_str()))
        .collect();
    kids.sort_by_key(|k| k.name.clone());
    let child_prefix = if root {
        prefix.to_string()
    } else {
        format!("{prefix}{}", if last { "   " } else { "│  " })
    };
    let n = kids.len();
    for (i, k) in kids.into_iter().enumerate() {
        draw(
            text,
            all,
            k,
            &child_prefix,
            i + 1 == n,
            false,
            threshold,
            unit,
            colour,
        );
    }
}

// ---- bill and recompute -------------------------------------------------------------------------

/// `meterd bill --period 2026-10 [--room R] [--version N] [--json]`
#[derive(Debug, Args)]
pub struct BillCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Month in the site's timezone, `YYYY-MM`.
    #[arg(long)]
    pub period: String,
    /// One room's statement, line by line.
    #[arg(long)]
    pub room: Option<String>,
    /// A past version (default: the latest).
    #[arg(long)]
    pub version: Option<i64>,
    #[arg(long)]
    pub json: bool,
}

impl BillCmd {
    /// Reads the kept run of the period (read-only, safe beside the daemon); a period not run yet is
    /// computed now from the history and said so.
    pub fn execute(self) -> Result<()> {
        let mut c = self.config.load()?;
        let conn = crate::store::open_read_only(&c.store.path)?;
        let tz = c.gateway.timezone;
        crate::accounting::period_bounds(&self.period, tz)?;
        let run = crate::store::load_run(&conn, &self.period, self.version)?;
        let versions = crate::store::run_versions(&conn, &self.period)?;
        let (st, header) = match (run, self.version) {
            (Some(r), _) => {
                let st: crate::bill::Statement =
                    serde_json::from_str(&r.body).with_context(|| {
                        format!("stored version {} of {} is unreadable", r.version, r.period)
                    })?;
                let head = serde_json::json!({
                    "period": r.period, "version": r.version, "computed_at": r.computed_at,
                    "supersedes": r.supersedes, "reason": r.reason, "config_hash": r.config_hash,
                    "provisional": r.provisional, "published": true,
                });
                (st, head)
            }
            (None, Some(v)) => bail!(
                "no version {v} of {}; versions kept: {}",
                self.period,
                if versions.is_empty() {
                    "none".to_string()
                } else {
                    versions
                        .iter()
                        .map(|v| v.0.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            (None, None) => {
                crate::accounting::apply_tariff_overrides(&conn, &mut c.site)?;
                let st = crate::accounting::compute(&conn, &c, &self.period)?;
                let head = serde_json::json!({
                    "period": self.period, "version": null, "config_hash": c.hash,
                    "provisional": st.bills.iter().any(|b| b.provisional), "published": false,
                });
                (st, head)
            }
        };
        let bills: Vec<&crate::bill::RoomBill> = st
            .bills
            .iter()
            .filter(|b| self.room.as_ref().is_none_or(|r| *r == b.room))
            .collect();
        if let Some(room) = &self.room {
            if bills.is_empty() {
                bail!(
                    "room {room:?} has no bill for {} (no meter and no pool share)",
                    self.period
                );
            }
        }
        if self.json {
            let mut v = header;
            v["bills"] = serde_json::to_value(&bills)?;
            out(&json(&v)?);
            return Ok(());
        }
        match header["version"].as_i64() {
            Some(v) => out(&format!(
                "{} — version {v} of {} ({}), computed {}, reason: {}{}\n",
                self.period,
                versions.len(),
                versions
                    .iter()
                    .map(|v| v.0.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                header["computed_at"].as_str().unwrap_or(""),
                header["reason"].as_str().unwrap_or(""),
                header["supersedes"]
                    .as_i64()
                    .map(|s| format!(", supersedes version {s}"))
                    .unwrap_or_default()
            )),
            None => out(&format!(
                "{} — not run yet: computed now from the history (the monthly run publishes it)\n",
                self.period
            )),
        }
        if self.room.is_some() {
            for b in bills {
                out("\n");
                out(&crate::bill::explain(b, tz));
            }
            return Ok(());
        }
        out(&format!(
            "{:<12} {:<12} {:>14} {:>14} {:>14}  {}\n",
            "room", "utility", "own", "shared", "total", "status"
        ));
        for b in bills {
            let dec = b.own.first().map(|l| l.price.decimals).unwrap_or(2);
            let shared: i64 = b.shares.iter().map(|s| s.share_milli).sum();
            out(&format!(
                "{:<12} {:<12} {:>14} {:>14} {:>14}  {}\n",
                b.room,
                format!("{:?}", b.utility).to_lowercase(),
                format!("{:.3} {}", b.own_milli as f64 / 1000.0, b.unit),
                format!("{:.3} {}", shared as f64 / 1000.0, b.unit),
                b.total
                    .map(|t| format!(
                        "{} {}",
                        crate::bill::money(t, dec),
                        b.currency.clone().unwrap_or_default()
                    ))
                    .unwrap_or_else(|| "not priced".into()),
                if b.provisional {
                    format!("PROVISIONAL: {}", b.notes.join("; "))
                } else {
                    "final".into()
                }
            ));
        }
        Ok(())
    }
}

/// `meterd recompute --period 2026-10 --reason TEXT`
#[derive(Debug, Args)]
pub struct RecomputeCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Month in the site's timezone, `YYYY-MM`.
    #[arg(long)]
    pub period: String,
    /// Why (kept with the new version and sent with the adjustments).
    #[arg(long)]
    pub reason: String,
    #[arg(long)]
    pub json: bool,
}

impl RecomputeCmd {
    /// Through the running daemon (its one writer) when it runs; otherwise on the outbox directly.
    pub async fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        crate::accounting::period_bounds(&self.period, c.gateway.timezone)?;
        if self.reason.trim().is_empty() {
            bail!("--reason must say why (it goes into the trail)");
        }
        let by = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "unknown".into());
        let summary: crate::accounting::RunSummary = if c.gateway.control_socket.exists() {
            let req = serde_json::json!({"op": "recompute", "period": self.period, "reason": self.reason, "by": format!("cli:{by}")});
            let v = crate::control::request(&c.gateway.control_socket, &req).await?;
            if v["ok"] != serde_json::json!(true) {
                bail!(
                    "the daemon refused: {}",
                    v["error"].as_str().unwrap_or("no reason given")
                );
            }
            serde_json::from_value(v["run"].clone()).context("unreadable answer from the daemon")?
        } else {
            let store =
                crate::store::spawn(crate::store::Store::open(&c.store.path, c.store.caps)?)?;
            let req = crate::accounting::RunRequest {
                period: self.period.clone(),
                reason: format!("{} (by cli:{by}, daemon not running)", self.reason),
                command_id: None,
            };
            let mut cfg = c.clone();
            if let Ok(conn) = crate::store::open_read_only(&c.store.path) {
                crate::accounting::apply_tariff_overrides(&conn, &mut cfg.site)?;
            }
            let s = crate::accounting::run_period(&std::sync::Arc::new(cfg), &store, req)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            store.flush().await;
            s
        };
        if self.json {
            out(&json(&summary)?);
            return Ok(());
        }
        out(&format!(
            "{}: version {}{}{}; {} room bills; {} adjustment(s) queued on results/adjustment\n",
            summary.period,
            summary.version,
            summary
                .supersedes
                .map(|s| format!(" supersedes version {s}"))
                .unwrap_or_default(),
            if summary.provisional {
                " (provisional)"
            } else {
                ""
            },
            summary.bills,
            summary.adjustments.len()
        ));
        for a in &summary.adjustments {
            let m = |x: Option<i64>| {
                x.map(|v| crate::bill::money(v, 2))
                    .unwrap_or_else(|| "-".into())
            };
            out(&format!(
                "  {:<12} {:<12} old {:>12} new {:>12} difference {:>12} {}\n",
                a.room,
                format!("{:?}", a.utility).to_lowercase(),
                m(a.old_total),
                m(a.new_total),
                m(a.difference),
                a.currency.clone().unwrap_or_default()
            ));
        }
        Ok(())
    }
}

// ---- apportion ----------------------------------------------------------------------------------

/// `meterd apportion --period 2026-10`
#[derive(Debug, Args)]
pub struct ApportionCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Month in the site's timezone, `YYYY-MM`.
    #[arg(long)]
    pub period: String,
    /// Show the calculation for one room, step by step.
    #[arg(long)]
    pub explain: Option<String>,
    #[arg(long)]
    pub json: bool,
}

impl ApportionCmd {
    /// Computes from the counter history the daemon keeps (read-only).
    pub fn execute(self) -> Result<()> {
        let mut c = self.config.load()?;
        let conn = crate::store::open_read_only(&c.store.path)?;
        crate::accounting::apply_tariff_overrides(&conn, &mut c.site)?;
        let results = crate::accounting::apportion_period(&conn, &c, &self.period)?;
        if results.is_empty() {
            bail!("{}: no [[pool]] configured: nothing to apportion", c.source);
        }
        if let Some(room) = &self.explain {
            let mut any = false;
            for r in &results {
                if let Some(t) = crate::apportion::explain(r, room) {
                    out(&t);
                    out("\n");
                    any = true;
                }
            }
            if !any {
                bail!("room {room:?} is in no pool");
            }
            return Ok(());
        }
        if self.json {
            out(&json(&results)?);
            return Ok(());
        }
        for r in &results {
            let money = |a: Option<i64>| match (a, r.price) {
                (Some(a), Some(p)) => {
                    let d = 10i64.pow(p.decimals);
                    format!("{}.{:0w$}", a / d, a % d, w = p.decimals as usize)
                }
                _ => "-".into(),
            };
            out(&format!(
                "\npool {} ({:?}), period {}: common {}.{:03} {}{}{}{}\n",
                r.pool,
                r.utility,
                r.period,
                r.common_milli / 1000,
                r.common_milli % 1000,
                r.unit,
                r.amount
                    .map(|_| format!(
                        ", cost {} {}",
                        money(r.amount),
                        r.currency.clone().unwrap_or_default()
                    ))
                    .unwrap_or_default(),
                if r.estimated {
                    ", ESTIMATED (readings missing)"
                } else {
                    ""
                },
                r.method
                    .iter()
                    .map(|(b, w)| format!(", {b:?} {w}"))
                    .collect::<String>()
                    .to_lowercase()
            ));
            let rows: Vec<Vec<String>> = r
                .rooms
                .iter()
                .map(|x| {
                    vec![
                        x.room.clone(),
                        format!("{:.3}", x.own),
                        format!("{:.6}", x.coefficient),
                        format!("{}.{:03}", x.share_milli / 1000, x.share_milli % 1000),
                        money(x.share_amount),
                        money(x.own_amount),
                        money(x.share_amount.zip(x.own_amount).map(|(a, b)| a + b)),
                    ]
                })
                .collect();
            out(&table(
                &[
                    "room",
                    "own",
                    "coefficient",
                    "share",
                    "share cost",
                    "own cost",
                    "total",
                ],
                &rows,
            ));
            for w in &r.warnings {
                out(&format!("warning: {w}\n"));
            }
        }
        Ok(())
    }
}

// ---- relay --------------------------------------------------------------------------------------

/// What to do with a room's relays: `open` grants (door unlocked / supply on), `close` denies (door
/// locked / supply cut), `clear` removes manual overrides.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RelayAction {
    Open,
    Close,
    Clear,
}

/// `meterd relay list` or `meterd relay ROOM open|close|clear --reason TEXT [--for DURATION]`
#[derive(Debug, Args)]
pub struct RelayCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// `list`, or a room id.
    pub target: String,
    pub action: Option<RelayAction>,
    /// Only this relay of the room.
    #[arg(long)]
    pub relay: Option<String>,
    /// Why (recorded in the audit trail); required for open/close.
    #[arg(long)]
    pub reason: Option<String>,
    /// How long the override lasts (default: until cleared).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long)]
    pub json: bool,
}

impl RelayCmd {
    /// Talks to the running daemon over its local control socket.
    pub async fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        let req = match (self.target.as_str(), self.action) {
            ("list", None) => serde_json::json!({"op": "list"}),
            (_, None) => bail!(
                "say what to do: meterd relay {} open|close|clear --reason TEXT",
                self.target
            ),
            (room, Some(RelayAction::Clear)) => {
                serde_json::json!({"op": "clear_override", "room": room, "relay": self.relay})
            }
            (room, Some(a)) => {
                let reason = self
                    .reason
                    .clone()
                    .filter(|r| !r.trim().is_empty())
                    .context("--reason TEXT is required: it goes into the audit trail")?;
                let by = std::env::var("SUDO_USER")
                    .or_else(|_| std::env::var("USER"))
                    .unwrap_or_else(|_| "cli".into());
                serde_json::json!({"op": "override", "room": room, "relay": self.relay, "on": matches!(a, RelayAction::Open), "reason": reason, "for_s": self.duration.map(|d| d.as_secs()), "by": format!("cli:{by}")})
            }
        };
        let reply = crate::control::request(&c.gateway.control_socket, &req).await?;
        if reply["ok"] != true {
            bail!("{}", reply["error"].as_str().unwrap_or("refused"));
        }
        if self.json {
            out(&json(&reply)?);
        } else if let Some(relays) = reply["relays"].as_array().filter(|_| self.target == "list") {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
            let rows: Vec<Vec<String>> = relays
                .iter()
                .map(|r| {
                    vec![
                        s(&r["relay"]),
                        s(&r["room"]),
                        s(&r["kind"]),
                        s(&r["desired"]),
                        s(&r["actual"]),
                        s(&r["rule"]),
                        s(&r["reason"]),
                    ]
                })
                .collect();
            if reply["fire_alarm"] == true {
                out("FIRE ALARM ACTIVE: fail-open doors released\n");
            }
            out(&table(
                &["relay", "room", "kind", "desired", "actual", "rule", "why"],
                &rows,
            ));
        } else {
            out(&format!("{reply}\n"));
        }
        Ok(())
    }
}

// ---- simulate -----------------------------------------------------------------------------------

/// `meterd simulate --building F`
#[derive(Debug, Args)]
pub struct SimulateCmd {
    /// Building description (TOML); profiles are also read from `profiles/` next to it.
    #[arg(long)]
    pub building: PathBuf,
}

impl SimulateCmd {
    /// Serves the building until interrupted; prints where each endpoint listens.
    pub async fn execute(self) -> Result<()> {
        let (building, profiles) = sim::load(&self.building)?;
        let running = sim::start(&building, &profiles).await?;
        for (name, addr) in &running.endpoints {
            out(&format!("endpoint {name} {addr}\n"));
        }
        out(&format!(
            "serving {} unit(s); Ctrl-C to stop\n",
            building.unit.len()
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    }
}

// ---- demo ---------------------------------------------------------------------------------------

/// The sample building and the config that polls it, compiled in so the demo needs no files.
pub const DEMO_BUILDING: &str = include_str!("../config/building.toml");
/// Config of the demo; its buses are pointed at the simulator's endpoints of the same name.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// `meterd demo`
#[derive(Debug, Args)]
pub struct DemoCmd {
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Refresh the table this often.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub every: Duration,
}

/// Starts the embedded sample building and returns a config whose buses point at it.
pub async fn start_demo_building() -> Result<(sim::RunningSim, Config)> {
    let building = sim::Building::from_str_named(DEMO_BUILDING, "<builtin>/config/building.toml")?;
    let profiles: BTreeMap<_, _> = crate::modbus::profile::builtin()
        .map_err(|e| anyhow::anyhow!("built-in profiles: {e:?}"))?
        .into_iter()
        .map(|(k, v)| (k, std::sync::Arc::new(v)))
        .collect();
    let running = sim::start(&building, &profiles).await?;
    let mut config = Config::from_str_at(
        DEMO_CONFIG,
        "<builtin>/config/demo.toml",
        Path::new("/nonexistent"),
    )
    .map_err(config_failure)?;
    point_buses_at(&mut config, &running);
    // The demo's outbox and control socket are scratch files, removed when the demo ends.
    config.store.path = std::env::temp_dir().join(format!("meterd-demo-{}.db", std::process::id()));
    config.gateway.control_socket =
        std::env::temp_dir().join(format!("meterd-demo-{}.sock", std::process::id()));
    Ok((running, config))
}

/// Rewrites each bus whose name matches a simulator endpoint to that endpoint's address.
pub fn point_buses_at(config: &mut Config, sim: &sim::RunningSim) {
    for b in &mut config.buses {
        match (sim.addr(&b.name), &mut b.transport) {
            (Some(sim::EndpointAddr::Tcp(a)), Transport::Tcp { host, port, .. })
            | (Some(sim::EndpointAddr::RtuOverTcp(a)), Transport::RtuOverTcp { host, port, .. }) => {
                *host = a.ip().to_string();
                *port = a.port();
            }
            (Some(sim::EndpointAddr::Pty(p)), Transport::Rtu(s)) => {
                s.device = p.display().to_string()
            }
            _ => {}
        }
    }
}

impl DemoCmd {
    /// Runs the sample building and the engine, printing a live table.
    pub async fn execute(self) -> Result<()> {
        let (running, config) = start_demo_building().await?;
        for (name, addr) in &running.endpoints {
            out(&format!("simulator endpoint {name}: {addr}\n"));
        }
        out(&format!(
            "polling {} device(s) on {} bus(es) of \"{}\"; Ctrl-C to stop\n",
            config.devices.len(),
            config.buses.len(),
            config.gateway.site
        ));
        let (tap, mut readings) = tokio::sync::mpsc::channel(daemon::READINGS_CAPACITY);
        let daemon = daemon::Daemon::start(
            &config,
            std::sync::Arc::new(crate::uplink::NoCommands),
            Some(tap),
        )?;
        let mut latest: BTreeMap<(String, String), Reading> = BTreeMap::new();
        let deadline = self.duration.map(|d| Instant::now() + d);
        let mut tick = tokio::time::interval(self.every);
        tick.tick().await;
        loop {
            tokio::select! {
                batch = readings.recv() => {
                    let Some(batch) = batch else { break };
                    for r in batch {
                        latest.insert((r.device.to_string(), r.register.to_string()), r);
                    }
                }
                _ = tick.tick() => {
                    let depth = daemon.store.depth().await;
                    out(&demo_table(&config, &latest, &daemon.bus_status));
                    out(&format!("outbox {}: {depth} record(s) buffered for the cloud (no uplink in the demo)\n", config.store.path.display()));
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        daemon.stop().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", config.store.path.display()));
        }
        let _ = std::fs::remove_file(&config.gateway.control_socket);
        Ok(())
    }
}

fn demo_table(
    config: &Config,
    latest: &BTreeMap<(String, String), Reading>,
    buses: &[std::sync::Arc<crate::modbus::bus::BusStatus>],
) -> String {
    use crate::modbus::profile::Quantity as Q;
    let status: BTreeMap<String, DeviceStatus> = buses
        .iter()
        .flat_map(|s| s.snapshot())
        .map(|d| (d.name.clone(), d))
        .collect();
    let rows: Vec<Vec<String>> = config
        .devices
        .iter()
        .map(|d| {
            let get = |q: Q| {
                latest
                    .values()
                    .find(|r| *r.device == *d.name && r.quantity == q)
                    .map(|r| {
                        if r.quality == Quality::Good {
                            fmt_value(r)
                        } else {
                            format!("({:?})", r.quality).to_lowercase()
                        }
                    })
                    .unwrap_or_else(|| "".into())
            };
            let relays: String = latest
                .values()
                .filter(|r| *r.device == *d.name && r.quantity == Q::RelayState)
                .map(|r| if r.value == Some(1.0) { '1' } else { '0' })
                .collect();
            let s = status.get(&*d.name).cloned().unwrap_or_default();
            vec![
                d.name.to_string(),
                config.buses[d.bus].name.clone(),
                d.unit.to_string(),
                get(Q::EnergyKwh),
                get(Q::PowerW),
                get(Q::WaterM3),
                relays,
                format!("{}/{}", s.polls_ok, s.polls_failed),
                if s.offline_since.is_some() {
                    "OFFLINE".into()
                } else {
                    String::new()
                },
                s.last_error.unwrap_or_default().chars().take(60).collect(),
            ]
        })
        .collect();
    format!(
        "\n{}\n{}",
        chrono::Utc::now()
            .with_timezone(&config.gateway.timezone)
            .format("%Y-%m-%d %H:%M:%S %Z"),
        table(
            &[
                "device",
                "bus",
                "unit",
                "energy_kwh",
                "power_w",
                "water_m3",
                "relays",
                "ok/failed",
                "state",
                "last error"
            ],
            &rows
        )
    )
}
