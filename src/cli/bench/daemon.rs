//! Whole-daemon benchmarks: `meterd run` as a field engineer starts it, measured from outside.
//!
//! Scope: the whole daemon, bus to broker: poll, decode, record, store, publish, acknowledge, delete.
//! Everything runs in a scratch directory (outbox, control socket, profiles, config); the simulator
//! and a Mosquitto on a free loopback port are separate processes, so the CPU and memory figures are
//! the daemon's alone. Readings are counted where the cloud would count them: a subscriber on the
//! broker parses every message; a run that delivered nothing, or whose daemon died, fails loudly.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use chrono::{DateTime, Utc};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{
    building, clock, cpu_seconds, float_profile, memory_kib, spawn_mosquitto, spawn_simulator,
    verdict, ChildGuard, Scratch,
};

/// A simulated site: `endpoints` Modbus TCP endpoints with `units` meters each, every meter with
/// `values` float32 registers, polled every `interval`.
pub(super) struct Site {
    pub(super) endpoints: usize,
    pub(super) units: usize,
    pub(super) values: usize,
    pub(super) interval: Duration,
    /// Transactions at once per endpoint (1 = a serial gateway behind each address).
    pub(super) concurrency: usize,
    /// `[report]` section: `every_poll = true` sends every reading, so every one is counted.
    pub(super) report: &'static str,
}

impl Site {
    fn meters(&self) -> usize {
        self.endpoints * self.units
    }

    fn profile(&self) -> String {
        format!("bench_{}f", self.values)
    }

    /// The daemon's config: scratch outbox and socket, the local broker, the simulator's addresses.
    fn config(
        &self,
        scratch: &Scratch,
        addrs: &std::collections::HashMap<String, String>,
        broker: u16,
    ) -> String {
        let mut s = format!(
            "[gateway]\nid = \"bench\"\nsite = \"bench\"\ntimezone = \"Asia/Shanghai\"\ncontrol_socket = \"{}\"\n\
             [store]\npath = \"{}\"\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\ntopic_prefix = \"bench\"\n\
             [report]\n{}\n\
             [poll]\ninterval = \"{}ms\"\ntimeout = \"2s\"\nmax_gap = 8\n",
            scratch.0.join("control.sock").display(),
            scratch.0.join("outbox.db").display(),
            self.report,
            self.interval.as_millis(),
        );
        let profile = self.profile();
        for e in 0..self.endpoints {
            let name = format!("ep{e}");
            let (host, port) = addrs
                .get(&name)
                .and_then(|a| a.rsplit_once(':'))
                .unwrap_or(("127.0.0.1", "502"));
            s.push_str(&format!(
                "[[bus]]\nname = \"{name}\"\nkind = \"tcp\"\nhost = \"{host}\"\nport = {port}\nmax_concurrent = {}\n",
                self.concurrency
            ));
            for u in 1..=self.units {
                s.push_str(&format!(
                    "[[device]]\nname = \"{name}-u{u}\"\nbus = \"{name}\"\nunit = {u}\nprofile = \"{profile}\"\n"
                ));
            }
        }
        s
    }
}

/// What the subscriber counted at the broker.
#[derive(Default)]
struct Counts {
    messages: u64,
    records: u64,
    readings: u64,
    /// Readings of records stamped before the daemon started (an outage's backlog).
    backlog_readings: u64,
    /// Poll-to-broker latency of live records while `timing` is on, ms.
    latencies_ms: Vec<i64>,
    timing: bool,
    /// Records that could not be parsed (a broken message is a failed run).
    unreadable: u64,
}

/// Everything one run needs; the children are killed and the scratch removed on drop.
pub(super) struct Running {
    daemon: ChildGuard,
    socket: PathBuf,
    counts: Arc<Mutex<Counts>>,
    subscriber: tokio::task::JoinHandle<()>,
    _sim: ChildGuard,
    broker: ChildGuard,
    /// Removed last, after the processes using it are gone.
    _scratch: Scratch,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// Prepares the scratch directory: profiles, building, the simulator and the broker.
pub(super) struct Prepared {
    scratch: Scratch,
    site_interval: Duration,
    config: PathBuf,
    sim: ChildGuard,
    broker: ChildGuard,
    port: u16,
}

pub(super) fn prepare(tag: &str, site: &Site) -> Result<Prepared> {
    let scratch = Scratch::new(tag)?;
    let profile = site.profile();
    scratch.write(
        &format!("profiles/{profile}.toml"),
        &float_profile(&profile, site.values),
    )?;
    let b = scratch.write(
        "building.toml",
        &building(site.endpoints, site.units, &profile, "tcp"),
    )?;
    let (sim, addrs) = spawn_simulator(&b)?;
    let (broker, port) = spawn_mosquitto(&scratch.0)?;
    let config = scratch.write("meterd.toml", &site.config(&scratch, &addrs, port))?;
    Ok(Prepared {
        scratch,
        site_interval: site.interval,
        config,
        sim,
        broker,
        port,
    })
}

impl Prepared {
    pub(super) fn outbox(&self) -> PathBuf {
        self.scratch.0.join("outbox.db")
    }

    /// Subscribes, then starts `meterd run` on the scratch config.
    pub(super) async fn start(self) -> Result<Running> {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let started = clock().now();
        let subscriber = subscribe(self.port, counts.clone(), started).await?;
        // `METERD_BENCH_DAEMON` measures another build's `meterd run` with this bench (before/after).
        let exe = match std::env::var_os("METERD_BENCH_DAEMON") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()?,
        };
        let child = Command::new(exe)
            .args(["--log-level", "warn", "run", "--config"])
            .arg(&self.config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .spawn()
            .context("starting meterd run")?;
        Ok(Running {
            daemon: ChildGuard(child),
            socket: self.scratch.0.join("control.sock"),
            counts,
            subscriber,
            _sim: self.sim,
            broker: self.broker,
            _scratch: self.scratch,
        })
    }
}

/// A subscriber on the bench topic, subscribed (SUBACK seen) before it returns.
async fn subscribe(
    port: u16,
    counts: Arc<Mutex<Counts>>,
    started: DateTime<Utc>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut o = MqttOptions::new(
        format!("bench-sub-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 * 1024 * 1024, 64 * 1024 * 1024);
    let (client, mut events) = AsyncClient::new(o, 64);
    client
        .subscribe("bench/bench/telemetry", QoS::AtLeastOnce)
        .await?;
    let deadline = clock().instant() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .context("no SUBACK from the bench broker within 10 s")?;
        if let Event::Incoming(Packet::SubAck(_)) = ev? {
            break;
        }
    }
    let started_ms = started.timestamp_millis();
    Ok(tokio::spawn(async move {
        let _client = client;
        while let Ok(ev) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let now = clock().now().timestamp_millis();
                count(&p.payload, now, started_ms, &counts);
            }
        }
    }))
}

/// Counts one telemetry message: `{"records": [{"ts", "values": {...}}, ...]}`.
fn count(payload: &[u8], now_ms: i64, started_ms: i64, counts: &Mutex<Counts>) {
    let Ok(mut c) = counts.lock() else { return };
    c.messages += 1;
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        c.unreadable += 1;
        return;
    };
    for rec in v["records"].as_array().into_iter().flatten() {
        let ts = rec["ts"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        let (Some(ts), Some(values)) = (ts, rec["values"].as_object()) else {
            c.unreadable += 1;
            continue;
        };
        let n = values.len() as u64;
        c.records += 1;
        c.readings += n;
        if ts < started_ms {
            c.backlog_readings += n;
        } else if c.timing {
            c.latencies_ms.push(now_ms - ts);
        }
    }
}

/// One look at the running daemon.
#[derive(Clone, Copy, Default)]
pub(super) struct Snapshot {
    pub(super) at: Option<Instant>,
    pub(super) cpu_s: f64,
    pub(super) broker_cpu_s: f64,
    pub(super) readings: u64,
    pub(super) backlog_readings: u64,
    pub(super) polls_ok: u64,
    pub(super) missed: u64,
    pub(super) outbox_rows: u64,
}

impl Running {
    pub(super) fn pid(&self) -> u32 {
        self.daemon.0.id()
    }

    /// Fails when the daemon has exited (a bench of a dead process measures nothing).
    pub(super) fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.daemon.0.try_wait()? {
            bail!("`meterd run` exited during the benchmark ({status}); nothing was measured");
        }
        if self.subscriber.is_finished() {
            bail!("the bench subscriber lost the broker; nothing was measured");
        }
        Ok(())
    }

    /// Waits until the broker has seen `readings` (the daemon is up and delivering), or fails.
    pub(super) async fn delivering(&mut self, readings: u64, within: Duration) -> Result<()> {
        let deadline = clock().instant() + within;
        loop {
            self.alive()?;
            let n = self.counts.lock().map_or(0, |c| c.readings);
            if n >= readings {
                return Ok(());
            }
            if clock().instant() > deadline {
                bail!("the broker saw {n} readings within {within:?} (expected at least {readings}): the daemon is not delivering; nothing was measured");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// CPU, counts at the broker and the daemon's own poll counters (over its control socket).
    pub(super) async fn snapshot(&mut self) -> Result<Snapshot> {
        self.alive()?;
        let status = crate::control::request(&self.socket, &json!({"op": "status"})).await?;
        let devices = status["buses"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|b| b["devices"].as_array().into_iter().flatten());
        let (mut polls_ok, mut missed) = (0, 0);
        for d in devices {
            polls_ok += d["polls_ok"].as_u64().unwrap_or(0);
            missed += d["missed_deadlines"].as_u64().unwrap_or(0);
        }
        let cpu_s = cpu_seconds(self.pid())?;
        let broker_cpu_s = cpu_seconds(self.broker.0.id())?;
        let c = self
            .counts
            .lock()
            .map_err(|_| anyhow::anyhow!("counts poisoned"))?;
        Ok(Snapshot {
            at: Some(clock().instant()),
            cpu_s,
            broker_cpu_s,
            readings: c.readings,
            backlog_readings: c.backlog_readings,
            polls_ok,
            missed,
            outbox_rows: status["outbox"]["rows"].as_u64().unwrap_or(0),
        })
    }

    /// Starts (or stops) recording poll-to-broker latencies; starting clears what was recorded.
    pub(super) fn time_latency(&self, on: bool) {
        if let Ok(mut c) = self.counts.lock() {
            if on {
                c.latencies_ms.clear();
            }
            c.timing = on;
        }
    }

    /// (p50, p99, count) of the recorded latencies, ms.
    pub(super) fn latency(&self) -> (i64, i64, usize) {
        let Ok(mut c) = self.counts.lock() else {
            return (0, 0, 0);
        };
        c.latencies_ms.sort_unstable();
        let n = c.latencies_ms.len();
        let at = |q: f64| {
            c.latencies_ms
                .get(((n as f64 * q) as usize).min(n.saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        (at(0.5), at(0.99), n)
    }

    pub(super) fn unreadable(&self) -> u64 {
        self.counts.lock().map_or(0, |c| c.unreadable)
    }
}

/// What a window of steady polling measured.
pub(super) struct Steady {
    pub(super) wall_s: f64,
    pub(super) readings: u64,
    pub(super) cpu_s: f64,
    pub(super) broker_cpu_s: f64,
    pub(super) polls: u64,
    pub(super) expected_polls: f64,
    pub(super) missed: u64,
    pub(super) rss_max_kib: u64,
    pub(super) p50_ms: i64,
    pub(super) p99_ms: i64,
    pub(super) timed: usize,
}

impl Steady {
    pub(super) fn us_per_reading(&self) -> f64 {
        self.cpu_s * 1e6 / self.readings.max(1) as f64
    }
    pub(super) fn cpu_pct(&self) -> f64 {
        self.cpu_s / self.wall_s * 100.0
    }
    pub(super) fn on_schedule(&self) -> bool {
        self.missed == 0 && self.polls as f64 >= 0.99 * self.expected_polls
    }
}

/// Starts the daemon on `site`, lets it settle, and measures a window of steady polling.
pub(super) async fn steady(
    tag: &str,
    site: &Site,
    warmup: Duration,
    window: Duration,
) -> Result<Steady> {
    let prepared = prepare(tag, site)?;
    let mut run = prepared.start().await?;
    let first = (site.meters() * site.values) as u64;
    run.delivering(first, Duration::from_secs(30)).await?;
    tokio::time::sleep(warmup).await;
    let a = run.snapshot().await?;
    run.time_latency(true);
    let end = clock().instant() + window;
    let mut rss_max_kib = 0;
    while clock().instant() < end {
        run.alive()?;
        rss_max_kib = rss_max_kib.max(memory_kib(run.pid())?.0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let b = run.snapshot().await?;
    run.time_latency(false);
    let (p50_ms, p99_ms, timed) = run.latency();
    let wall_s = b.at.zip(a.at).map_or(0.0, |(b, a)| (b - a).as_secs_f64());
    let m = Steady {
        wall_s,
        readings: b.readings - a.readings,
        cpu_s: b.cpu_s - a.cpu_s,
        broker_cpu_s: b.broker_cpu_s - a.broker_cpu_s,
        polls: b.polls_ok - a.polls_ok,
        expected_polls: site.meters() as f64 * wall_s / site.interval.as_secs_f64(),
        missed: b.missed - a.missed,
        rss_max_kib,
        p50_ms,
        p99_ms,
        timed,
    };
    if m.readings == 0 || m.cpu_s <= 0.0 || timed == 0 {
        bail!("the window measured nothing ({} readings at the broker, {:.2} s CPU): failing rather than printing a figure", m.readings, m.cpu_s);
    }
    if run.unreadable() > 0 {
        bail!(
            "{} records at the broker could not be read",
            run.unreadable()
        );
    }
    Ok(m)
}

/// Prints a steady window's figures, each with its target; true when all are met.
pub(super) fn print_steady(
    m: &Steady,
    us_target: Option<f64>,
    pct_target: Option<f64>,
    p99_target: Option<i64>,
    rss_target_mib: f64,
) -> bool {
    let mib = m.rss_max_kib as f64 / 1024.0;
    let us_ok = us_target.is_none_or(|t| m.us_per_reading() <= t);
    let pct_ok = pct_target.is_none_or(|t| m.cpu_pct() <= t);
    let lat_ok = p99_target.is_none_or(|t| m.p99_ms <= t);
    let rss_ok = mib <= rss_target_mib;
    let sched_ok = m.on_schedule();
    println!(
        "    delivered {:.0} readings/s at the broker ({} in {:.1} s)",
        m.readings as f64 / m.wall_s,
        m.readings,
        m.wall_s
    );
    println!(
        "    meterd run CPU: {:.2} us per reading delivered{}, {:.1}% of one core{}",
        m.us_per_reading(),
        us_target.map_or(String::new(), |t| format!(
            " (target <= {t}: {})",
            verdict(us_ok)
        )),
        m.cpu_pct(),
        pct_target.map_or(String::new(), |t| format!(
            " (target <= {t}%: {})",
            verdict(pct_ok)
        ))
    );
    println!(
        "    polls: {} done of {:.0} due, {} missed deadlines (every poll on schedule: {})",
        m.polls,
        m.expected_polls,
        m.missed,
        verdict(sched_ok)
    );
    println!(
        "    poll-to-broker latency over {} records: p50 {} ms, p99 {} ms{}",
        m.timed,
        m.p50_ms,
        m.p99_ms,
        p99_target.map_or(String::new(), |t| format!(
            " (target <= {t} ms: {})",
            verdict(lat_ok)
        ))
    );
    println!(
        "    meterd run RSS: {mib:.1} MiB peak (target <= {rss_target_mib} MiB: {}); mosquitto CPU {:.1}% of one core",
        verdict(rss_ok),
        m.broker_cpu_s / m.wall_s * 100.0
    );
    us_ok && pct_ok && lat_ok && rss_ok && sched_ok
}

/// Target 1: 50 meters x 4 floats at 100 ms, one port per meter, to Mosquitto at `QoS` 1.
pub(super) async fn building_50(window: Duration) -> Result<bool> {
    let site = Site {
        endpoints: 50,
        units: 1,
        values: 4,
        interval: Duration::from_millis(100),
        concurrency: 1,
        report: "every_poll = true",
    };
    println!("\n[daemon] whole daemon, bus to broker: `meterd run` polling 50 meters x 4 float32 at 100 ms (2,000 readings/s) over Modbus TCP, one port per meter, to a local Mosquitto at QoS 1, every reading reported ([report] every_poll); readings counted at the broker");
    let m = steady("daemon", &site, Duration::from_secs(3), window).await?;
    let ok = print_steady(&m, Some(8.0), None, Some(20), 16.0);
    engine_share(&site, &m, window)?;
    Ok(ok)
}

/// The same site polled by the engine alone (in this process: poll and decode, no recorder, store
/// or uplink), so the figure above splits into the engine's part and the rest of the daemon's.
fn engine_share(site: &Site, whole: &Steady, window: Duration) -> Result<()> {
    let prepared = prepare("engine", site)?;
    let text = std::fs::read_to_string(&prepared.config)?;
    let config = crate::config::Config::from_str_at(&text, "bench", &prepared.scratch.0)?;
    let m = super::measure_engine_as_daemon(config, Duration::from_secs(3), window, None)?;
    if m.readings_per_s <= 0.0 {
        bail!("the engine-only run read nothing");
    }
    let us = m.cpu_pct / 100.0 * 1e6 / m.readings_per_s;
    println!(
        "    of which the engine alone (scope: poll and decode, same site, in-process): {us:.2} us per reading ({:.0} readings/s); recorder, store and uplink: {:.2} us",
        m.readings_per_s,
        whole.us_per_reading() - us
    );
    Ok(())
}

/// Target 2: 1,000 meters x 10 floats at 1 s.
pub(super) async fn large_site(window: Duration) -> Result<bool> {
    let site = Site {
        endpoints: 40,
        units: 25,
        values: 10,
        interval: Duration::from_secs(1),
        concurrency: 1,
        report: "every_poll = true",
    };
    println!("\n[large-site] whole daemon, bus to broker: `meterd run` polling 1,000 meters x 10 float32 at 1 s (10,000 readings/s) behind 40 Modbus TCP gateways of 25 meters (one transaction at a time each), to a local Mosquitto at QoS 1, every reading reported; readings counted at the broker");
    let m = steady("large", &site, Duration::from_secs(3), window).await?;
    Ok(print_steady(&m, None, Some(15.0), None, 30.0))
}

/// Distinct meters behind the backlog: meter `d` replays trace `d % TRACES` under its own name and
/// time offset (simulating a day of a thousand meters through the policy would take minutes).
const TRACES: usize = 20;

/// Writes 24 h of the site's telemetry before `end` into the outbox, as an outage leaves it: field-like
/// values (`wire::Meter`: loads of 0.3–3 kW changing level, drifting mains voltage, 0.01 kWh counters)
/// polled at the site's interval through the real report policy with its defaults and encoder.
/// Returns (records, readings).
fn write_backlog(prepared: &Prepared, end: DateTime<Utc>) -> Result<(u64, u64)> {
    use crate::store::{Caps, NewRecord, Store};
    let text = std::fs::read_to_string(&prepared.config)?;
    let config = crate::config::Config::from_str_at(&text, "bench", &prepared.scratch.0)?;
    let step = chrono::Duration::from_std(prepared.site_interval)?;
    let polls = (86_400_000 / step.num_milliseconds().max(1)) as usize;
    let start = end - chrono::Duration::hours(24);
    let mut reporter = crate::report::Reporter::new(
        crate::report::ReportPolicy::default(),
        crate::daemon::calendar(&config),
    );
    // Per trace: (poll index, the record's JSON) of every poll the policy let out.
    let mut traces: Vec<Vec<(usize, serde_json::Map<String, Value>)>> = vec![Vec::new(); TRACES];
    for (t, trace) in traces.iter_mut().enumerate() {
        let device = config.devices.get(t).context("fewer devices than traces")?;
        let mut meter =
            super::wire::Meter::new(0xBAC0 + t as u64, step.num_milliseconds() as f64 / 1000.0);
        for k in 0..polls {
            let ts = start + step * i32::try_from(k)?;
            let poll = meter.poll(&device.name, &device.profile.registers, k as i64, ts);
            if let Some(r) = reporter.poll(&poll) {
                if let Value::Object(m) = serde_json::from_slice(&r.payload)? {
                    trace.push((k, m));
                }
            }
        }
    }
    let mut store = Store::open(&prepared.outbox(), Caps::default(), clock())?;
    let mut next = vec![0usize; config.devices.len()];
    let (mut records, mut readings) = (0u64, 0u64);
    let mut batch = Vec::with_capacity(10_000);
    for k in 0..polls {
        for (d, device) in config.devices.iter().enumerate() {
            let trace = &traces[d % TRACES];
            let Some((at, rec)) = trace.get(next[d]) else {
                continue;
            };
            if *at != k {
                continue;
            }
            next[d] += 1;
            let ts = start + step * i32::try_from(k)? + chrono::Duration::milliseconds(d as i64);
            let mut rec = rec.clone();
            rec.insert("device".into(), Value::from(&*device.name));
            rec.insert(
                "ts".into(),
                Value::from(ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            );
            readings += rec["values"].as_object().map_or(0, |v| v.len() as u64);
            records += 1;
            batch.push(NewRecord {
                kind: crate::store::Kind::Telemetry,
                topic: "telemetry".into(),
                ts,
                payload: serde_json::to_vec(&rec)?,
            });
            if batch.len() == 10_000 {
                store.append(&batch)?;
                batch.clear();
            }
        }
    }
    store.append(&batch)?;
    Ok((records, readings))
}

/// Target 3: 24 h of outage of the 1,000-meter site drains while live data keeps flowing.
pub(super) async fn backlog() -> Result<bool> {
    let site = Site {
        endpoints: 40,
        units: 25,
        values: 10,
        interval: Duration::from_secs(1),
        concurrency: 1,
        report: "every_poll = true",
    };
    let prepared = prepare("backlog", &site)?;
    let t = clock().instant();
    let (records, readings) = write_backlog(&prepared, clock().now())?;
    println!(
        "\n[backlog] whole daemon, outbox to broker: 24 h of outage of the 1,000-meter site (10 float32 each at 1 s, default report policy: {records} records, {readings} readings, written in {:.1} s) drains to a local Mosquitto at QoS 1 while the site is polled live with every reading reported",
        clock().since(t).as_secs_f64()
    );
    let mut run = prepared.start().await?;
    let t0 = clock().instant();
    let deadline = t0 + Duration::from_secs(600);
    let mut rss = Vec::new();
    let mut first_live = None;
    let drained = loop {
        run.alive()?;
        let (backlog_seen, live_seen) = run.counts.lock().map_or((0, 0), |c| {
            (c.backlog_readings, c.readings - c.backlog_readings)
        });
        if first_live.is_none() && live_seen > 0 {
            first_live = Some(clock().since(t0));
        }
        rss.push((backlog_seen, memory_kib(run.pid())?.0));
        if backlog_seen >= readings {
            break clock().since(t0);
        }
        if clock().instant() > deadline {
            bail!("the backlog did not drain in 600 s ({backlog_seen} of {readings} readings at the broker)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let end = run.snapshot().await?;
    let live = end.readings - end.backlog_readings;
    let rate = readings as f64 / drained.as_secs_f64();
    let live_rate = live as f64 / drained.as_secs_f64();
    // Flat: after the first tenth of the backlog, RSS may not grow by more than 4 MiB.
    let after_tenth = rss
        .iter()
        .find(|(n, _)| *n >= readings / 10)
        .map_or(0, |(_, k)| *k);
    let peak = rss.iter().map(|(_, k)| *k).max().unwrap_or(0);
    let flat = after_tenth > 0 && peak <= after_tenth + 4 * 1024;
    let rate_ok = rate >= 50_000.0;
    let live_ok = first_live.is_some_and(|t| t < drained / 2) && live_rate >= 1_000.0;
    println!(
        "    drained {readings} backlog readings in {:.1} s from the daemon's start: {rate:.0} readings/s (target >= 50000: {})",
        drained.as_secs_f64(),
        verdict(rate_ok)
    );
    println!(
        "    live meanwhile: {live} readings at the broker ({live_rate:.0}/s, first after {:.1} s) (live keeps flowing: {})",
        first_live.map_or(f64::NAN, |t| t.as_secs_f64()),
        verdict(live_ok)
    );
    println!(
        "    meterd run RSS: {:.1} MiB after the first tenth, {:.1} MiB peak (flat within 4 MiB: {}); {} rows left in the outbox",
        after_tenth as f64 / 1024.0,
        peak as f64 / 1024.0,
        verdict(flat),
        end.outbox_rows
    );
    Ok(rate_ok && live_ok && flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old memory bench ran `meterd run` on a config without `[store]` or a control socket, so
    /// it wrote into /var/lib/meterd/outbox.db and unlinked the live daemon's socket.
    #[test]
    fn a_bench_daemon_keeps_its_outbox_and_socket_in_its_scratch_directory() {
        let site = Site {
            endpoints: 2,
            units: 3,
            values: 4,
            interval: Duration::from_millis(100),
            concurrency: 1,
            report: "every_poll = true",
        };
        let scratch = Scratch::new("config-test").unwrap();
        let profile = site.profile();
        scratch
            .write(
                &format!("profiles/{profile}.toml"),
                &float_profile(&profile, 4),
            )
            .unwrap();
        let text = site.config(&scratch, &std::collections::HashMap::new(), 1883);
        let config = crate::config::Config::from_str_at(&text, "bench", &scratch.0).unwrap();
        assert!(
            config.store.path.starts_with(&scratch.0),
            "{:?}",
            config.store.path
        );
        assert!(
            config.gateway.control_socket.starts_with(&scratch.0),
            "{:?}",
            config.gateway.control_socket
        );
        assert_eq!(config.devices.len(), 6);
        assert!(config.report.every_poll);
    }
}
