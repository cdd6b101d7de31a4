//! `meterd bench`: throughput, CPU and memory measured against the targets, on this machine.
//!
//! The simulator runs as a separate `meterd simulate` process wherever meterd's own CPU or memory is
//! measured, so the figures are meterd's alone. CPU is read from `/proc/<pid>/stat` (utime + stime in
//! `USER_HZ` = 100 ticks/s, the fixed Linux ABI) and memory from `VmRSS`/`VmHWM` in `/proc/<pid>/status`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};

use crate::clock::Clock;
use crate::config::Config;
use crate::daemon::Engine;
use crate::modbus::bus::BusStatus;
use crate::modbus::timing;
use crate::reading::Quality;
use crate::sim;

mod daemon;
mod dlt645;
mod wire;

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Which {
    /// 1,000 meters × 4 floats over Modbus TCP: readings/s and CPU (target ≥ 20,000 readings/s).
    TcpReadings,
    /// 100,000 float points/s from 20 TCP endpoints: CPU ≤ 25 % of a core, RSS ≤ 30 MiB.
    Points,
    /// RS485 at 9600 8E1 emulated on a pty: transactions/s ≥ 90 % of the line's theoretical maximum.
    Rtu,
    /// DL/T 645-2007 meters at 2400 8E1 emulated on a pty: transactions/s ≥ 90 % of the line's
    /// theoretical maximum.
    Dlt645,
    /// Whole daemon, bus to broker: 50 meters × 4 floats at 100 ms to a local Mosquitto (targets
    /// ≤ 8 µs of `meterd run` CPU per reading, every poll on schedule, p99 ≤ 20 ms, RSS ≤ 16 MiB).
    Daemon,
    /// Whole daemon, bus to broker: 1,000 meters × 10 floats at 1 s (targets ≤ 15 % of one core,
    /// RSS ≤ 30 MiB, no missed deadline).
    #[value(alias = "memory")]
    LargeSite,
    /// Whole daemon, outbox to broker: 24 h of outage of the 1,000-meter site drains while live data
    /// flows (targets ≥ 50,000 readings/s, RSS flat).
    Backlog,
    /// Outbox writes in batched transactions (target ≥ 200,000 readings/s).
    OutboxWrite,
    /// 1,000,000 buffered readings replayed to a local Mosquitto at `QoS` 1 (target ≥ 100,000 readings/s,
    /// memory flat in the backlog size).
    Replay,
    /// Monthly apportionment of 20,000 rooms in 200 pools (target < 1 s).
    Apportion,
    /// `meterd bill` for 20,000 rooms from a month of history, flat and peak/valley tariffs
    /// (targets < 5 s flat, < 30 s with bands).
    Bill,
    /// Telemetry bytes per device per day on the cellular link for the sample building at 10 s
    /// polling, before and after the report policy (target >= 10x less).
    Wire,
    /// All of the above.
    All,
}

/// `meterd bench`
#[derive(Debug, Args)]
pub struct BenchCmd {
    #[arg(value_enum, default_value = "all")]
    pub which: Which,
    /// Length of each measurement window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub measure: Duration,
}

impl BenchCmd {
    /// Runs the chosen benchmark(s) and prints figure, target and verdict.
    pub async fn execute(self) -> Result<()> {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        println!(
            "meterd bench on {cores} core(s); measurement window {:?}",
            self.measure
        );
        let all = self.which == Which::All;
        let wants = |w: Which| all || self.which == w;
        let mut failed = Vec::new();
        if wants(Which::TcpReadings) && !tcp_readings(self.measure).await? {
            failed.push("tcp-readings");
        }
        if wants(Which::Points) && !points(self.measure).await? {
            failed.push("points");
        }
        if wants(Which::Rtu) && !rtu(self.measure).await? {
            failed.push("rtu");
        }
        if wants(Which::Dlt645) && !dlt645::line(self.measure).await? {
            failed.push("dlt645");
        }
        if wants(Which::Daemon) && !daemon::building_50(self.measure).await? {
            failed.push("daemon");
        }
        if wants(Which::LargeSite) && !daemon::large_site(self.measure).await? {
            failed.push("large-site");
        }
        if wants(Which::Backlog) && !daemon::backlog().await? {
            failed.push("backlog");
        }
        if wants(Which::OutboxWrite) && !outbox_write().await? {
            failed.push("outbox-write");
        }
        if wants(Which::Replay) && !replay().await? {
            failed.push("replay");
        }
        if wants(Which::Apportion) && !apportion_bench()? {
            failed.push("apportion");
        }
        if wants(Which::Bill) && !bill_bench()? {
            failed.push("bill");
        }
        if wants(Which::Wire) && !wire::wire()? {
            failed.push("wire");
        }
        if !failed.is_empty() {
            bail!("targets missed: {}", failed.join(", "));
        }
        Ok(())
    }
}

/// The benchmarks' clock: they time real work on the system's clock (what they measure, the
/// daemon, gets the same clock through `Daemon::start`).
fn clock() -> Clock {
    Clock::system()
}

/// CPU seconds used so far by a process.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// (`VmRSS`, `VmHWM`) of a process in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// A scratch directory with a building, profiles and a config; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("meterd-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("profiles"))?;
        Ok(Scratch(dir))
    }
    fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.0.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for Scratch {
    /// Removed unless `METERD_BENCH_KEEP` is set (to inspect or profile what was measured).
    fn drop(&mut self) {
        if std::env::var_os("METERD_BENCH_KEEP").is_some() {
            println!("    scratch kept: {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A profile of `n` contiguous float32 input registers from address 0.
fn float_profile(name: &str, n: usize) -> String {
    let mut s = format!("[profile]\nname = \"{name}\"\nsource = \"synthetic benchmark block\"\nfunction = \"input\"\ntype = \"f32\"\n");
    let quantities = ["voltage_v", "current_a", "power_w", "energy_kwh"];
    for i in 0..n {
        // Real quantities, so the simulator serves non-zero values (an "other" register reads 0).
        let q = quantities[i % quantities.len()];
        let _ = write!(
            s,
            "[[register]]\nname = \"p{i}\"\nquantity = \"{q}\"\naddress = {}\n",
            i * 2
        );
    }
    s
}

fn building(endpoints: usize, units: usize, profile: &str, kind: &str) -> String {
    let mut s = String::from("[building]\nname = \"bench\"\n");
    for e in 0..endpoints {
        let _ = write!(s, "[[endpoint]]\nname = \"ep{e}\"\nkind = \"{kind}\"\n");
        for u in 1..=units {
            let _ = write!(s, "[[unit]]\nendpoint = \"ep{e}\"\nunit = {u}\nprofile = \"{profile}\"\nload_w = 1000.0\n");
        }
    }
    s
}

/// Config polling `endpoints × units` devices; bus `epN` is rewritten to the simulator's address.
fn config_text(
    endpoints: usize,
    units: usize,
    profile: &str,
    interval: &str,
    concurrency: usize,
    addrs: &HashMap<String, String>,
) -> String {
    let mut s = format!("[gateway]\nid = \"bench\"\nsite = \"bench\"\ntimezone = \"UTC\"\n[poll]\ninterval = \"{interval}\"\ntimeout = \"2s\"\nmax_gap = 8\n");
    for e in 0..endpoints {
        let name = format!("ep{e}");
        let (host, port) = addrs
            .get(&name)
            .and_then(|a| a.rsplit_once(':'))
            .unwrap_or(("127.0.0.1", "502"));
        let _ = write!(s, "[[bus]]\nname = \"{name}\"\nkind = \"tcp\"\nhost = \"{host}\"\nport = {port}\nmax_concurrent = {concurrency}\n");
        for u in 1..=units {
            let _ = write!(s, "[[device]]\nname = \"{name}-u{u}\"\nbus = \"{name}\"\nunit = {u}\nprofile = \"{profile}\"\n");
        }
    }
    s
}

/// Starts `meterd simulate` on a building file and returns the endpoint addresses it printed.
fn spawn_simulator(building: &Path) -> Result<(ChildGuard, HashMap<String, String>)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--log-level", "warn", "simulate", "--building"])
        .arg(building)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting meterd simulate")?;
    let stdout = child.stdout.take().context("simulator stdout")?;
    let guard = ChildGuard(child);
    let mut addrs = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line.starts_with("serving") {
            return Ok((guard, addrs));
        }
        // "endpoint ep0 modbus tcp 127.0.0.1:40123"
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() >= 5 && parts[0] == "endpoint" {
            addrs.insert(parts[1].to_string(), parts[parts.len() - 1].to_string());
        }
    }
    bail!("the simulator exited before serving")
}

/// Kills a child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// [`measure_engine`] on a runtime like `meterd run`'s (one thread; see main.rs), in a thread of its
/// own: the engine-only figures then hold for the daemon (timers, the precise inter-frame sleep).
fn measure_engine_as_daemon(
    config: Config,
    warmup: Duration,
    window: Duration,
    sim_pid: Option<u32>,
) -> Result<Measured> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(measure_engine(&config, warmup, window, sim_pid))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the engine-only run panicked"))?
}

/// Runs the engine for `warmup + window`, counting good readings and polls in the window.
async fn measure_engine(
    config: &Config,
    warmup: Duration,
    window: Duration,
    sim_pid: Option<u32>,
) -> Result<Measured> {
    let me = std::process::id();
    let mut engine = Engine::start(config, &clock());
    let t_start = clock().instant();
    let mut counting = false;
    let (mut readings, mut cpu0, mut sim0, mut t0) = (0u64, 0.0, 0.0, t_start);
    let mut polls0 = 0;
    let mut rss_max = 0;
    let mut sample = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            batch = engine.readings.recv() => {
                let Some(batch) = batch else { bail!("engine stopped") };
                if counting {
                    readings += batch.iter().filter(|r| r.quality == Quality::Good).count() as u64;
                }
            }
            _ = sample.tick() => {
                let now = clock().instant();
                if counting {
                    rss_max = rss_max.max(memory_kib(me)?.0);
                    if now - t0 >= window {
                        let wall = (now - t0).as_secs_f64();
                        let cpu = cpu_seconds(me)? - cpu0;
                        let sim_cpu = match sim_pid { Some(p) => cpu_seconds(p)? - sim0, None => 0.0 };
                        let polls = polls_ok(&engine.status) - polls0;
                        engine.stop();
                        return Ok(Measured {
                            readings_per_s: readings as f64 / wall,
                            polls_per_s: polls as f64 / wall,
                            cpu_pct: cpu / wall * 100.0,
                            sim_cpu_pct: sim_cpu / wall * 100.0,
                            rss_kib: rss_max,
                            missed: missed(&engine.status),
                        });
                    }
                } else if now - t_start >= warmup {
                    counting = true;
                    t0 = now;
                    cpu0 = cpu_seconds(me)?;
                    sim0 = match sim_pid { Some(p) => cpu_seconds(p)?, None => 0.0 };
                    polls0 = polls_ok(&engine.status);
                }
            }
        }
    }
}

fn polls_ok(status: &[std::sync::Arc<BusStatus>]) -> u64 {
    status
        .iter()
        .flat_map(|s| s.snapshot())
        .map(|d| d.polls_ok)
        .sum()
}

fn missed(status: &[std::sync::Arc<BusStatus>]) -> u64 {
    status
        .iter()
        .flat_map(|s| s.snapshot())
        .map(|d| d.missed_deadlines)
        .sum()
}

struct Measured {
    readings_per_s: f64,
    polls_per_s: f64,
    cpu_pct: f64,
    sim_cpu_pct: f64,
    rss_kib: u64,
    missed: u64,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

async fn tcp_readings(window: Duration) -> Result<bool> {
    let (endpoints, units) = (10, 100);
    let scratch = Scratch::new("tcp")?;
    scratch.write("profiles/bench_4f.toml", &float_profile("bench_4f", 4))?;
    let b = scratch.write(
        "building.toml",
        &building(endpoints, units, "bench_4f", "tcp"),
    )?;
    let (sim_child, addrs) = spawn_simulator(&b)?;
    let sim_pid = sim_child.0.id();
    println!("\n[tcp-readings] scope: engine only (poll and decode in this process; no recorder, store or uplink: `meterd bench daemon` measures the whole daemon). Request-bound, Modbus TCP: {} meters x 4 float32 values on {endpoints} loopback endpoints (simulator in its own process)", endpoints * units);
    let mut pass = true;
    for (label, interval) in [
        ("at the target rate (200 ms interval)", "200ms"),
        ("saturated (10 ms interval)", "10ms"),
    ] {
        let text = config_text(endpoints, units, "bench_4f", interval, 4, &addrs);
        let config = Config::from_str_at(&text, "bench", &scratch.0)?;
        let m = measure_engine(&config, Duration::from_secs(3), window, Some(sim_pid)).await?;
        let ok = m.readings_per_s >= 20_000.0;
        if label.starts_with("saturated") {
            pass &= ok;
        }
        println!(
            "    {label}: {:.0} readings/s ({:.0} polls/s), meterd CPU {:.1}% of one core, simulator CPU {:.1}%, meterd RSS {:.1} MiB{}",
            m.readings_per_s,
            m.polls_per_s,
            m.cpu_pct,
            m.sim_cpu_pct,
            m.rss_kib as f64 / 1024.0,
            if label.starts_with("saturated") { format!("  (target >= 20000 readings/s: {})", verdict(ok)) } else { String::new() }
        );
    }
    drop(sim_child);
    Ok(pass)
}

async fn points(window: Duration) -> Result<bool> {
    let endpoints = 20;
    let scratch = Scratch::new("points")?;
    scratch.write("profiles/bulk_5000.toml", &float_profile("bulk_5000", 5000))?;
    let b = scratch.write("building.toml", &building(endpoints, 1, "bulk_5000", "tcp"))?;
    let (sim_child, addrs) = spawn_simulator(&b)?;
    let text = config_text(endpoints, 1, "bulk_5000", "1s", 1, &addrs);
    let config = Config::from_str_at(&text, "bench", &scratch.0)?;
    let requests: usize = config.devices.iter().map(|d| d.plan.requests.len()).sum();
    println!("\n[points] scope: engine only (poll and decode in this process). Point-bound (cf. EMQ Neuron 3.2.1: 100,000 points/s used 30% of a 4-core Xeon, 497 MB): {endpoints} TCP endpoints x 5,000 contiguous float32 at 1 s = 100,000 points/s, {requests} requests/s");
    let m = measure_engine(
        &config,
        Duration::from_secs(3),
        window,
        Some(sim_child.0.id()),
    )
    .await?;
    let (rss, hwm) = memory_kib(std::process::id())?;
    let cpu_ok = m.cpu_pct <= 25.0;
    let mem_ok = m.rss_kib as f64 / 1024.0 <= 30.0;
    let rate_ok = m.readings_per_s >= 95_000.0;
    println!(
        "    points/s: {:.0} (target 100000: {}), missed deadlines {}",
        m.readings_per_s,
        verdict(rate_ok),
        m.missed
    );
    println!(
        "    meterd CPU: {:.1}% of one core (target <= 25%: {})",
        m.cpu_pct,
        verdict(cpu_ok)
    );
    println!(
        "    meterd RSS: {:.1} MiB peak during the window (now {:.1}, high-water {:.1}) (target <= 30 MiB: {})",
        m.rss_kib as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        verdict(mem_ok)
    );
    println!("    simulator CPU: {:.1}%", m.sim_cpu_pct);
    Ok(cpu_ok && mem_ok && rate_ok)
}

async fn rtu(window: Duration) -> Result<bool> {
    let baud = 9600;
    let turnaround = Duration::from_millis(5);
    let units = 4;
    let mut text = format!("[building]\nname = \"rtu bench\"\n[[endpoint]]\nname = \"line\"\nkind = \"rtu\"\nbaud = {baud}\nparity = \"even\"\nresponse_delay = \"5ms\"\n");
    for u in 1..=units {
        let _ = write!(
            text,
            "[[unit]]\nendpoint = \"line\"\nunit = {u}\nprofile = \"bench_4f\"\nload_w = 500.0\n"
        );
    }
    let scratch = Scratch::new("rtu")?;
    scratch.write("profiles/bench_4f.toml", &float_profile("bench_4f", 4))?;
    let profiles = crate::config::load_profiles(&scratch.0.join("profiles"))
        .map_err(|i| anyhow::anyhow!("{i:?}"))?;
    let b = sim::Building::from_str_named(&text, "rtu bench")?;
    let running = sim::start(&b, &profiles).await?;
    let Some(sim::EndpointAddr::Pty(path)) = running.addr("line").cloned() else {
        bail!("no pty")
    };
    let mut cfg = format!(
        "[gateway]\nid = \"bench\"\nsite = \"bench\"\ntimezone = \"UTC\"\n[poll]\ninterval = \"10ms\"\n[[bus]]\nname = \"line\"\nkind = \"rtu\"\ndevice = \"{}\"\nbaud = {baud}\nparity = \"even\"\ntimeout = \"1s\"\n",
        path.display()
    );
    for u in 1..=units {
        let _ = write!(
            cfg,
            "[[device]]\nname = \"m{u}\"\nbus = \"line\"\nunit = {u}\nprofile = \"bench_4f\"\n"
        );
    }
    let config = Config::from_str_at(&cfg, "bench", &scratch.0)?;
    let count = config.devices[0].plan.requests[0].count as usize;
    let (req, resp) = (8usize, 5 + 2 * count);
    let t35 = timing::t35(baud);
    let tx = timing::wire_time(req + resp, baud, 11) + 2 * t35 + turnaround;
    let theoretical = 1.0 / tx.as_secs_f64();
    println!("\n[rtu] scope: engine only (bus efficiency), on a runtime like `meterd run`'s. RTU {baud} baud 8E1 emulated on a pty ({units} meters, 1 request of {count} registers each)");
    println!("    transaction = (request {req} B + response {resp} B) x 11 / {baud} + 2 x t3.5 ({:.3} ms) + turnaround ({} ms) = {:.3} ms", t35.as_secs_f64() * 1000.0, turnaround.as_millis(), tx.as_secs_f64() * 1000.0);
    let m = measure_engine_as_daemon(config, Duration::from_secs(2), window, None)?;
    let ratio = m.polls_per_s / theoretical;
    let ok = ratio >= 0.9;
    println!(
        "    theoretical {theoretical:.2} transactions/s; achieved {:.2} transactions/s = {:.1}% (target >= 90%: {})",
        m.polls_per_s,
        ratio * 100.0,
        verdict(ok)
    );
    drop(running);
    Ok(ok)
}

/// A realistic reading, as the engine produces them.
fn sample_reading(i: usize) -> crate::reading::Reading {
    use std::sync::Arc;
    crate::reading::Reading {
        device: Arc::from(format!("room-{}", 100 + i % 1000).as_str()),
        register: Arc::from("import_kwh"),
        quantity: crate::modbus::profile::Quantity::EnergyKwh,
        value: Some(5123.25 + i as f64 * 0.001),
        unit: Arc::from("kWh"),
        ts: clock().now(),
        quality: Quality::Good,
        raw: crate::reading::RawWords::new(&[0x45A0, 0x1A20]),
        error: None,
    }
}

async fn outbox_write() -> Result<bool> {
    use crate::store::{self, Caps, Store};
    let scratch = Scratch::new("outbox")?;
    let total = 1_000_000usize;
    let per_poll = 100;
    println!("\n[outbox-write] scope: store only. Outbox write: {total} readings serialized to JSON and written through the store task (group commit, WAL, synchronous=NORMAL), {per_poll} per poll batch");
    let handle = store::spawn(Store::open(
        &scratch.0.join("outbox.db"),
        Caps::default(),
        clock(),
    )?)?;
    let polls: Vec<Vec<crate::reading::Reading>> = (0..total / per_poll)
        .map(|b| {
            (0..per_poll)
                .map(|i| sample_reading(b * per_poll + i))
                .collect()
        })
        .collect();
    let t0 = clock().instant();
    for poll in polls {
        // What the daemon's recorder does with a batch: one record per device poll (here every
        // reading is another device's, so one record each, as with `every_poll`).
        handle
            .append(
                poll.chunk_by(|a, b| a.device == b.device)
                    .filter_map(crate::report::poll_record)
                    .collect(),
            )
            .await?;
    }
    handle.flush().await;
    let secs = clock().since(t0).as_secs_f64();
    let stats = handle.stats().await;
    let rate = total as f64 / secs;
    let ok = rate >= 200_000.0 && stats.rows == total as u64;
    println!(
        "    {:.0} readings/s ({total} in {secs:.2} s, {} rows on disk, {:.0} bytes/reading payload) (target >= 200000: {})",
        rate,
        stats.rows,
        stats.payload_bytes as f64 / stats.rows.max(1) as f64,
        verdict(ok)
    );
    Ok(ok)
}

/// A Mosquitto on a free loopback port for the replay benchmark; killed on drop.
fn spawn_mosquitto(dir: &Path) -> Result<(ChildGuard, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nmax_inflight_messages 0\n"))?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto (install it: apt-get install -y mosquitto)")?;
    let guard = ChildGuard(child);
    let deadline = clock().instant() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if clock().instant() > deadline {
            bail!("mosquitto did not start on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((guard, port))
}

async fn replay() -> Result<bool> {
    use crate::store::{self, Caps, Store};
    use crate::uplink::{Identity, NoCommands, Uplink, UplinkStatus};
    use std::sync::{Arc, Mutex};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scratch = Scratch::new("replay")?;
    let total = 1_000_000usize;
    let db = scratch.0.join("outbox.db");
    {
        let mut s = Store::open(&db, Caps::default(), clock())?;
        for b in 0..total / 10_000 {
            let recs: Vec<_> = (0..10_000)
                .filter_map(|i| crate::report::poll_record(&[sample_reading(b * 10_000 + i)]))
                .collect();
            s.append(&recs)?;
        }
    }
    let (_broker, port) = spawn_mosquitto(&scratch.0)?;
    let text = format!("[gateway]\nid = \"bench\"\nsite = \"bench\"\ntimezone = \"UTC\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ntopic_prefix = \"bench\"\n");
    let config = Config::from_str_at(&text, "bench", &scratch.0)?;
    let mqtt = config.mqtt.clone().context("mqtt section")?;
    println!(
        "\n[replay] scope: store and uplink in this process (the whole daemon: `meterd bench backlog`). Backlog replay: {total} buffered readings to a local Mosquitto, QoS 1, {} readings per PUBLISH, {} in flight",
        mqtt.batch_max_records, mqtt.inflight
    );
    let rss_before = memory_kib(std::process::id())?.0;
    let handle = store::spawn(Store::open(&db, Caps::default(), clock())?)?;
    let status = Arc::new(Mutex::new(UplinkStatus::default()));
    let uplink = Uplink {
        config: mqtt,
        identity: Identity {
            gateway: "bench".into(),
            site: "bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            config_hash: config.hash.clone(),
            started_at: clock().now(),
        },
        store: handle.clone(),
        status: status.clone(),
        commands: Arc::new(NoCommands),
        model: tokio::sync::watch::channel(Arc::new(config.site_model_bytes())).1,
        clock: clock(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t0 = clock().instant();
    let task = tokio::spawn(uplink.run(stop_rx));
    let acked = || status.lock().map_or(0, |s| s.records_acked);
    let (mut rss_100k, mut t_100k) = (0u64, 0.0);
    let deadline = clock().instant() + Duration::from_secs(300);
    loop {
        let n = acked();
        if rss_100k == 0 && n >= 100_000 {
            rss_100k = memory_kib(std::process::id())?.0;
            t_100k = clock().since(t0).as_secs_f64();
        }
        if n >= total as u64 {
            break;
        }
        if clock().instant() > deadline {
            bail!("replay did not finish in 300 s ({n} acked)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = clock().since(t0).as_secs_f64();
    let rss_1m = memory_kib(std::process::id())?.0;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let left = handle.stats().await.rows;
    let rate = total as f64 / secs;
    let rate_ok = rate >= 100_000.0;
    // Flat memory: the last 900k readings may not add more than 8 MiB over the first 100k.
    let flat = rss_1m <= rss_100k + 8 * 1024;
    println!("    {rate:.0} readings/s ({total} acknowledged in {secs:.2} s; first 100k in {t_100k:.2} s), {left} left in the outbox (target >= 100000: {})", verdict(rate_ok));
    println!(
        "    RSS {:.1} MiB before, {:.1} MiB at 100k acknowledged, {:.1} MiB at 1M acknowledged (flat in backlog size: {})",
        rss_before as f64 / 1024.0,
        rss_100k as f64 / 1024.0,
        rss_1m as f64 / 1024.0,
        verdict(flat)
    );
    Ok(rate_ok && flat && left == 0)
}

fn apportion_bench() -> Result<bool> {
    use crate::modbus::profile::Quantity;
    use crate::topology::{self, Boundary, RawMeter, RawPool, RawTariff, Room, Utility};
    use std::collections::{BTreeMap, BTreeSet};
    let (rooms_n, pools_n) = (20_000usize, 200usize);
    let per_pool = rooms_n / pools_n;
    println!("\n[apportion] scope: the pure apportionment core. Monthly apportionment: {rooms_n} rooms with their meters, {pools_n} pools (area 40 % + consumption 40 % + headcount 20 %, each with a common-area meter and the loss of its floor meter)");
    let rooms: Vec<(String, Room)> = (0..rooms_n)
        .map(|i| {
            (
                format!("room[{i}]"),
                Room {
                    id: format!("r{i:05}"),
                    name: String::new(),
                    area_m2: Some(20.0 + (i % 97) as f64),
                    headcount: Some(1.0 + (i % 5) as f64),
                    floor: Some((i / per_pool) as i32),
                    life_critical: false,
                },
            )
        })
        .collect();
    let meter = |name: String,
                 parent: Option<String>,
                 room: Option<String>,
                 pool: Option<String>| RawMeter {
        name,
        utility: Utility::Electricity,
        device: None,
        expr: None,
        parent,
        room,
        pool,
        rollover: None,
        max_rate: None,
    };
    let mut meters = Vec::new();
    let mut pools = Vec::new();
    for p in 0..pools_n {
        let floor = format!("floor{p:03}");
        meters.push((
            format!("meter[f{p}]"),
            meter(floor.clone(), None, None, None),
        ));
        meters.push((
            format!("meter[c{p}]"),
            meter(
                format!("common{p:03}"),
                Some(floor.clone()),
                None,
                Some(format!("pool{p:03}")),
            ),
        ));
        for r in p * per_pool..(p + 1) * per_pool {
            meters.push((
                format!("meter[{r}]"),
                meter(
                    format!("m{r:05}"),
                    Some(floor.clone()),
                    Some(format!("r{r:05}")),
                    None,
                ),
            ));
        }
        pools.push((
            format!("pool[{p}]"),
            RawPool {
                name: format!("pool{p:03}"),
                utility: Utility::Electricity,
                rooms: (p * per_pool..(p + 1) * per_pool)
                    .map(|r| format!("r{r:05}"))
                    .collect(),
                method: [
                    (topology::Basis::Area, 0.4),
                    (topology::Basis::Consumption, 0.4),
                    (topology::Basis::Headcount, 0.2),
                ]
                .into(),
                floor_weights: BTreeMap::new(),
                fixed: BTreeMap::new(),
                include_loss_of: vec![floor.clone()],
                tariff: Some("elec".into()),
            },
        ));
    }
    let tariffs = vec![(
        "tariff[0]".to_string(),
        RawTariff {
            name: "elec".into(),
            utility: Utility::Electricity,
            price: "0.8523".into(),
            currency: "CNY".into(),
            decimals: 2,
            bands: Vec::new(),
            rooms: vec!["*".into()],
            effective_from: None,
        },
    )];
    let devices: BTreeMap<String, BTreeSet<Quantity>> = meters
        .iter()
        .map(|(_, m)| (m.name.clone(), [Quantity::EnergyKwh].into()))
        .collect();
    let t_build = clock().instant();
    let (site, issues) = topology::build(rooms, meters, pools, tariffs, 5.0, &devices);
    let build_s = clock().since(t_build).as_secs_f64();
    if !issues.is_empty() {
        bail!(
            "synthetic site invalid: {:?}",
            &issues[..issues.len().min(3)]
        );
    }
    // Month-start and month-end counters for every device, as read from the history.
    let mut boundaries = BTreeMap::new();
    for (i, m) in site.meters.values().enumerate() {
        let used = if m.name.starts_with("floor") {
            0.0
        } else {
            50.0 + (i % 400) as f64
        };
        boundaries.insert(
            m.name.clone(),
            (
                Boundary {
                    value: 1000.0,
                    estimated: false,
                },
                Boundary {
                    value: 1000.0 + used,
                    estimated: false,
                },
            ),
        );
    }
    // Floors: what their children used, plus 3 % loss.
    let totals: BTreeMap<String, f64> = site
        .meters
        .values()
        .filter(|m| m.name.starts_with("floor"))
        .map(|f| {
            (
                f.name.clone(),
                site.children(&f.name)
                    .iter()
                    .map(|c| boundaries[&c.name].1.value - 1000.0)
                    .sum::<f64>()
                    * 1.03,
            )
        })
        .collect();
    for (f, t) in totals {
        boundaries.insert(
            f,
            (
                Boundary {
                    value: 1000.0,
                    estimated: false,
                },
                Boundary {
                    value: 1000.0 + t,
                    estimated: false,
                },
            ),
        );
    }
    let t0 = clock().instant();
    let devices_c =
        crate::apportion::device_consumption(&site, &boundaries, &BTreeMap::new(), 720.0);
    let cons = topology::meter_consumption(&site, &devices_c);
    let balances = topology::balances(&site, &cons);
    let results = crate::apportion::apportion(&site, &cons, "2026-10");
    let json = serde_json::to_vec(&results)?;
    let secs = clock().since(t0).as_secs_f64();
    let exact = results.iter().all(|r| {
        r.rooms.iter().map(|x| x.share_milli).sum::<i64>() == r.common_milli
            && r.rooms
                .iter()
                .map(|x| x.share_amount.unwrap_or(0))
                .sum::<i64>()
                == r.amount.unwrap_or(0)
    });
    let ok = secs < 1.0 && exact && results.len() == pools_n;
    println!(
        "    {:.3} s for consumption, {} balances, {} pools and their JSON ({} KiB); every pool's shares sum exactly: {} (target < 1 s: {}); topology validation {:.3} s",
        secs,
        balances.len(),
        results.len(),
        json.len() / 1024,
        exact,
        verdict(ok),
        build_s
    );
    Ok(ok)
}

/// `meterd bill` as a field engineer runs it, on a scratch site of 20,000 rooms (100 per floor, a
/// floor meter with its loss and a lift pool per floor) with a month of boundary readings in a
/// scratch outbox. Scope: the whole command (config, history look-ups, bills, output), run as a
/// child process; checks it printed a bill for every room.
fn bill_bench() -> Result<bool> {
    use std::fmt::Write as _;
    let (rooms_n, per_floor) = (20_000usize, 100usize);
    let floors = rooms_n / per_floor;
    println!("\n[bill] scope: the whole `meterd bill` command. meterd bill: {rooms_n} rooms, {floors} floors (floor meter + lift pool with the floor's loss), October from the history");
    let scratch = Scratch::new("bill")?;
    let dir = scratch.0.clone();
    let mut ok = true;
    for banded in [false, true] {
        let db = dir.join(format!("outbox-{banded}.db"));
        let mut cfg = format!(
            "[gateway]\nid = \"bench\"\nsite = \"bench\"\ntimezone = \"Asia/Shanghai\"\ncontrol_socket = \"{}\"\n[store]\npath = \"{}\"\n",
            dir.join("none.sock").display(),
            db.display()
        );
        let tariff = if banded {
            "[[tariff]]\nname = \"home\"\nutility = \"electricity\"\nprice = \"0.6170\"\nrooms = [\"*\"]\nbands = [{ name = \"peak\", from = \"06:00\", to = \"22:00\", price = \"0.6170\" }, { name = \"valley\", from = \"22:00\", to = \"06:00\", price = \"0.3070\" }]\n"
        } else {
            "[[tariff]]\nname = \"home\"\nutility = \"electricity\"\nprice = \"0.8523\"\nrooms = [\"*\"]\n"
        };
        cfg += tariff;
        cfg += "[[tariff]]\nname = \"common\"\nutility = \"electricity\"\nprice = \"0.8523\"\n";
        let mut devices: Vec<String> = Vec::new();
        for f in 0..floors {
            let _ = write!(cfg, "[[meter]]\nname = \"floor{f:03}\"\nutility = \"electricity\"\n[[meter]]\nname = \"lift{f:03}\"\nutility = \"electricity\"\nparent = \"floor{f:03}\"\npool = \"lift{f:03}\"\n");
            let _ = write!(cfg, "[[pool]]\nname = \"lift{f:03}\"\nutility = \"electricity\"\nrooms = [{}]\nmethod = {{ area = 1.0 }}\ninclude_loss_of = [\"floor{f:03}\"]\ntariff = \"common\"\n",
                (f * per_floor..(f + 1) * per_floor).map(|r| format!("\"r{r:05}\"")).collect::<Vec<_>>().join(", "));
            devices.push(format!("floor{f:03}"));
            devices.push(format!("lift{f:03}"));
            for r in f * per_floor..(f + 1) * per_floor {
                let _ = write!(cfg, "[[room]]\nid = \"r{r:05}\"\narea_m2 = {}\n[[meter]]\nname = \"m{r:05}\"\nutility = \"electricity\"\nparent = \"floor{f:03}\"\nroom = \"r{r:05}\"\n", 20 + r % 80);
                devices.push(format!("m{r:05}"));
            }
        }
        // One Modbus TCP gateway per 200 meters (unit ids 1–200).
        for (i, d) in devices.iter().enumerate() {
            if i % 200 == 0 {
                let _ = write!(
                    cfg,
                    "[[bus]]\nname = \"gw{}\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\nport = {}\n",
                    i / 200,
                    20_000 + i / 200
                );
            }
            let _ = write!(cfg, "[[device]]\nname = \"{d}\"\nbus = \"gw{}\"\nunit = {}\nprofile = \"chint_ddsu666\"\n", i / 200, i % 200 + 1);
        }
        let path = dir.join(format!("bench-{banded}.toml"));
        std::fs::write(&path, &cfg)?;
        // History: a reading at the month's start and end, and at every band change when banded.
        let config = crate::config::Config::from_path(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (from, to) = crate::accounting::period_bounds("2026-10", config.gateway.timezone)?;
        let cal = crate::daemon::calendar(&config);
        let mut instants = vec![from];
        while let Some(t) = instants
            .last()
            .map(|t| cal.next_after(*t))
            .filter(|t| *t <= to)
        {
            instants.push(t);
        }
        let mut store = crate::store::Store::open(&db, crate::store::Caps::default(), clock())?;
        let mut samples = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let kw = if d.starts_with("floor") {
                0.0
            } else {
                0.3 + (i % 28) as f64 * 0.1
            };
            for t in &instants {
                let h = (*t - from).num_seconds() as f64 / 3600.0;
                let v = if d.starts_with("floor") {
                    // The floor meter: its rooms and lift (0.3–3 kW each) plus 3 % loss.
                    let base = devices.iter().position(|x| x == d).unwrap_or(0);
                    (base + 1..base + 2 + per_floor)
                        .map(|j| 0.3 + (j % 28) as f64 * 0.1)
                        .sum::<f64>()
                        * 1.03
                        * h
                } else {
                    kw * h
                };
                samples.push(crate::store::Sample {
                    device: d.clone(),
                    quantity: "energy_kwh".into(),
                    ts_ms: t.timestamp_millis(),
                    value: 1000.0 + (v * 100.0).floor() / 100.0,
                });
            }
            if samples.len() > 200_000 {
                store.record_history(&samples)?;
                samples.clear();
            }
        }
        store.record_history(&samples)?;
        drop(store);
        let exe = std::env::current_exe()?;
        let t0 = clock().instant();
        let o = std::process::Command::new(&exe)
            .args(["bill", "--period", "2026-10", "--config"])
            .arg(&path)
            .output()?;
        let secs = clock().since(t0).as_secs_f64();
        let text = String::from_utf8_lossy(&o.stdout);
        let rooms_listed = text
            .lines()
            .filter(|l| l.starts_with('r') && l.contains("electricity"))
            .count();
        let priced = text.lines().filter(|l| l.contains(" CNY ")).count();
        let target = if banded { 30.0 } else { 5.0 };
        let good =
            o.status.success() && rooms_listed == rooms_n && priced == rooms_n && secs < target;
        println!(
            "    {}: {secs:.2} s for {rooms_listed} room bills ({priced} priced; {} history rows) (target < {target} s: {})",
            if banded { "peak/valley tariff, 62 band changes" } else { "flat tariff" },
            devices.len() * instants.len(),
            verdict(good)
        );
        if !o.status.success() {
            println!(
                "    meterd bill failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        ok &= good;
        // The usual case once the month ran: the kept version is read, not recomputed.
        let t0 = clock().instant();
        let r = std::process::Command::new(&exe)
            .args([
                "recompute",
                "--period",
                "2026-10",
                "--reason",
                "bench",
                "--config",
            ])
            .arg(&path)
            .output()?;
        let run_s = clock().since(t0).as_secs_f64();
        let t0 = clock().instant();
        let o = std::process::Command::new(&exe)
            .args(["bill", "--period", "2026-10", "--config"])
            .arg(&path)
            .output()?;
        let read_s = clock().since(t0).as_secs_f64();
        let text = String::from_utf8_lossy(&o.stdout);
        let kept = text.starts_with("2026-10 — version 1 of 1");
        let listed = text
            .lines()
            .filter(|l| l.starts_with('r') && l.contains("electricity"))
            .count();
        let good =
            r.status.success() && o.status.success() && kept && listed == rooms_n && read_s < 5.0;
        println!(
            "      monthly run (compute + keep + {} outbox records): {run_s:.2} s; meterd bill on the kept version: {read_s:.2} s for {listed} rooms (target < 5 s: {})",
            rooms_n + floors,
            verdict(good)
        );
        if !r.status.success() {
            println!(
                "    meterd recompute failed: {}",
                String::from_utf8_lossy(&r.stderr)
            );
        }
        ok &= good;
    }
    Ok(ok)
}
