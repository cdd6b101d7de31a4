//! `meterd demo`: the simulator and the daemon together on the built-in building.

use super::{
    config_failure, daemon, fmt_value, out, sim, table, Args, BTreeMap, Clock, Config,
    DeviceStatus, Duration, Path, Quality, Reading, Result, Transport,
};

/// The sample building and the config that polls it, compiled in so the demo needs no files.
pub(crate) const DEMO_BUILDING: &str = include_str!("../../config/building.toml");
/// Config of the demo; its buses are pointed at the simulator's endpoints of the same name.
pub(crate) const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

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

mod scenario;

/// How long before the demo starts room 103's circuit was moved to the floor-2 board (the building's
/// wiring now; its history before that has room 103 straight under the main incomer).
const REWIRED_AGO: chrono::Duration = chrono::Duration::minutes(20);

/// The demo's building, running, with the config that polls it.
pub(crate) struct DemoBuilding {
    pub sim: sim::RunningSim,
    pub config: Config,
    pub building: sim::Building,
    /// When the simulated counters read their start values.
    pub started: chrono::DateTime<chrono::Utc>,
    /// The clock the demo's daemon runs on.
    pub clock: Clock,
}

/// Starts the embedded sample building and returns a config whose buses point at it.
pub(crate) async fn start_demo_building(clock: &Clock) -> Result<DemoBuilding> {
    let building = sim::Building::from_str_named(DEMO_BUILDING, "<builtin>/config/building.toml")?;
    let profiles: BTreeMap<_, _> = crate::modbus::profile::builtin()
        .map_err(|e| anyhow::anyhow!("built-in profiles: {e:?}"))?
        .into_iter()
        .map(|(k, v)| (k, std::sync::Arc::new(v)))
        .collect();
    let started = clock.now();
    let running = sim::start(&building, &profiles).await?;
    // With the embedded broker, the daemon publishes to it as it would to the cloud's.
    let text = match broker_port() {
        Some(port) => format!("{DEMO_CONFIG}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n"),
        None => DEMO_CONFIG.to_string(),
    };
    let mut config = Config::from_str_at(
        &text,
        "<builtin>/config/demo.toml",
        Path::new("/nonexistent"),
    )
    .map_err(config_failure)?;
    point_buses_at(&mut config, &running);
    // The demo's outbox and control socket are scratch files, removed when the demo ends.
    config.store.path = std::env::temp_dir().join(format!("meterd-demo-{}.db", std::process::id()));
    config.gateway.control_socket =
        std::env::temp_dir().join(format!("meterd-demo-{}.sock", std::process::id()));
    // The web view on loopback with a fresh token: port 8080 when free, else any free port; the
    // listener bound here is the one served.
    let listener = std::net::TcpListener::bind(("127.0.0.1", 8080))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))?;
    config.web.listen = Some(listener.local_addr()?);
    config.web.bound = Some(crate::config::BoundListener::new(listener));
    config.web.token = Some(format!(
        "{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    ));
    Ok(DemoBuilding {
        sim: running,
        config,
        building,
        started,
        clock: clock.clone(),
    })
}

/// Fills the demo's history with the building's past counters, as the gateway would have recorded
/// them since a day before last month began (every 15 minutes, and every `history_every` over the
/// last 20 minutes), so last month's bill, the balance window and the curves have data at once.
/// `last_month` is the period before the one the demo starts in. Returns the samples written and
/// the first one's time.
fn seed_history(
    d: &DemoBuilding,
    last_month: &str,
) -> Result<(usize, chrono::DateTime<chrono::Utc>)> {
    use chrono::{DateTime, Utc};
    let config = &d.config;
    let now = d.started;
    let (last_month, this_month) =
        crate::accounting::period_bounds(last_month, config.gateway.timezone)?;
    let from = last_month - chrono::Duration::days(1);
    let quarter = 15 * 60 * 1000;
    let fine_from = now - REWIRED_AGO;
    let step = i64::try_from(config.topology.history_every.as_millis())
        .unwrap_or(60_000)
        .max(1000);
    let mut ms: std::collections::BTreeSet<i64> = [last_month, this_month, now]
        .iter()
        .map(DateTime::timestamp_millis)
        .collect();
    ms.extend(
        (from.timestamp_millis() / quarter..=fine_from.timestamp_millis() / quarter)
            .map(|q| q * quarter),
    );
    ms.extend((fine_from.timestamp_millis()..now.timestamp_millis()).step_by(step as usize));
    let times: Vec<DateTime<Utc>> = ms
        .into_iter()
        .filter_map(DateTime::from_timestamp_millis)
        .filter(|t| *t >= from && *t <= now)
        .collect();
    let rewired = sim::past::Rewiring {
        unit: "rs485-1:3".into(),
        was_under: "lan:1".into(),
        at: fine_from,
    };
    // Building unit key → the device and the counter its meter bills.
    let metered: BTreeMap<String, (String, &'static str)> = config
        .site
        .meters
        .values()
        .filter_map(|m| match &m.source {
            crate::topology::Source::Device(dev) => {
                let d = config.devices.iter().find(|x| *x.name == **dev)?;
                let key = format!(
                    "{}:{}",
                    config.buses[d.bus].name,
                    d.protocol.address().unwrap_or_else(|| d.unit.to_string())
                );
                Some((key, (dev.clone(), m.utility.quantity().as_str())))
            }
            crate::topology::Source::Virtual(_) => None,
        })
        .collect();
    let samples: Vec<crate::store::Sample> =
        sim::past::counters(&d.building, now, &times, Some(&rewired))
            .into_iter()
            .filter_map(|p| {
                let (device, quantity) = metered.get(&p.unit)?;
                (p.quantity.as_str() == *quantity).then(|| crate::store::Sample {
                    device: device.clone(),
                    quantity: (*quantity).to_string(),
                    ts_ms: p.at.timestamp_millis(),
                    value: p.value,
                })
            })
            .collect();
    let mut store =
        crate::store::Store::open(&config.store.path, config.store.caps, d.clock.clone())?;
    store.record_history(&samples)?;
    Ok((samples.len(), from))
}

/// Starts the embedded MQTT broker on loopback (port 1883 when free, else any free port) and
/// returns its port once it accepts connections; None in builds without it or when it fails.
#[cfg(feature = "demo-broker")]
fn broker_port() -> Option<u16> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 1883))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr())
        .ok()?
        .port();
    let server = rumqttd::ServerSettings {
        name: "demo".into(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            // Above the gateway's largest record (1 MiB).
            max_payload_size: 4 * 1024 * 1024,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 20,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(std::iter::once(("demo".to_string(), server)).collect()),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            if let Err(e) = rumqttd::Broker::new(config).start() {
                eprintln!("meterd demo: the embedded MQTT broker stopped: {e}");
            }
        })
        .ok()?;
    let deadline = crate::clock::Pace::now().after(Duration::from_secs(5));
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if deadline.remaining().is_none() {
            eprintln!("meterd demo: the embedded MQTT broker did not start; running without the MQTT side");
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(port)
}

/// A build without the embedded broker (the gateway packages): the demo has no MQTT side.
#[cfg(not(feature = "demo-broker"))]
fn broker_port() -> Option<u16> {
    None
}

/// Rewrites each bus whose name matches a simulator endpoint to that endpoint's address.
pub(crate) fn point_buses_at(config: &mut Config, sim: &sim::RunningSim) {
    for b in &mut config.buses {
        match (sim.addr(&b.name), &mut b.transport) {
            (Some(sim::EndpointAddr::Tcp(a)), Transport::Tcp { host, port, .. })
            | (Some(sim::EndpointAddr::RtuOverTcp(a)), Transport::RtuOverTcp { host, port, .. }) => {
                *host = a.ip().to_string();
                *port = a.port();
            }
            (Some(sim::EndpointAddr::Pty(p)), Transport::Rtu(s)) => {
                s.device = p.display().to_string();
            }
            _ => {}
        }
    }
}

impl DemoCmd {
    /// Runs the sample building and the engine, printing a live table.
    pub async fn execute(self, clock: &Clock) -> Result<()> {
        let demo = start_demo_building(clock).await?;
        for (name, addr) in &demo.sim.endpoints {
            out(&format!("simulator endpoint {name}: {addr}\n"));
        }
        let tz = demo.config.gateway.timezone;
        let last_month = crate::accounting::previous_period(demo.started, tz);
        let (seeded, since) = seed_history(&demo, &last_month)?;
        out(&format!(
            "history: {seeded} counter samples since {}, as the gateway would have recorded them (room 103's circuit moved to the floor-2 board {} minutes ago; the topology still puts it under the main incomer)\n",
            since.with_timezone(&tz).format("%Y-%m-%d %H:%M"),
            REWIRED_AGO.num_minutes()
        ));
        let DemoBuilding {
            sim, mut config, ..
        } = demo;
        let sim = std::sync::Arc::new(sim);
        match &config.mqtt {
            Some(m) => out(&format!(
                "MQTT: embedded broker on {}:{}; watch the traffic with: mosquitto_sub -p {} -t '{}/#' -v\n",
                m.host, m.port, m.port, m.topic_prefix
            )),
            None => out("MQTT: this build has no embedded broker (built without the demo-broker feature); records stay in the outbox\n"),
        }
        if let (Some(addr), Some(token)) = (config.web.listen, &config.web.token) {
            out(&format!(
                "web view: http://{addr}/topology/electricity?token={token}\n"
            ));
        }
        out(&format!(
            "polling {} device(s) on {} bus(es) of \"{}\"; Ctrl-C to stop\n",
            config.devices.len(),
            config.buses.len(),
            config.gateway.site
        ));
        // The demo plays the cloud: its own key signs relay commands, which the daemon checks.
        let key = ed25519_dalek::SigningKey::from_bytes(&std::array::from_fn(|_| fastrand::u8(..)));
        config.enforcement.public_key = Some(key.verifying_key());
        let (tap, mut readings) = tokio::sync::mpsc::channel(daemon::READINGS_CAPACITY);
        let daemon = daemon::Daemon::start(
            &config,
            clock,
            std::sync::Arc::new(crate::uplink::NoCommands),
            Some(tap),
        )?;
        let scenario = tokio::spawn(scenario::run(
            config.clone(),
            key,
            sim.clone(),
            last_month,
            clock.clone(),
        ));
        let mut latest: BTreeMap<(String, String), Reading> = BTreeMap::new();
        let deadline = self.duration.map(|d| clock.instant() + d);
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
                    out(&demo_table(&config, &latest, &daemon.bus_status, clock.now()));
                    let uplink = match (&config.mqtt, daemon.uplink.lock().map(|u| u.clone())) {
                        (Some(m), Ok(u)) if u.connected => format!("uplink connected to {}:{}, {} record(s) acknowledged", m.host, m.port, u.records_acked),
                        (Some(m), _) => format!("uplink to {}:{} not connected", m.host, m.port),
                        (None, _) => "no uplink in this build".to_string(),
                    };
                    out(&format!("outbox {}: {depth} record(s) waiting; {uplink}\n", config.store.path.display()));
                    if deadline.is_some_and(|d| clock.instant() >= d) {
                        break;
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        scenario.abort();
        daemon.stop().await;
        drop(sim);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", config.store.path.display()));
        }
        let _ = std::fs::remove_file(&config.gateway.control_socket);
        Ok(())
    }
}

pub(super) fn demo_table(
    config: &Config,
    latest: &BTreeMap<(String, String), Reading>,
    buses: &[std::sync::Arc<crate::modbus::bus::BusStatus>],
    now: chrono::DateTime<chrono::Utc>,
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
                    .map_or_else(String::new, |r| {
                        if r.quality == Quality::Good {
                            fmt_value(r)
                        } else {
                            format!("({:?})", r.quality).to_lowercase()
                        }
                    })
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
                d.protocol.address().unwrap_or_else(|| d.unit.to_string()),
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
        now.with_timezone(&config.gateway.timezone)
            .format("%Y-%m-%d %H:%M:%S %Z"),
        table(
            &[
                "device",
                "bus",
                "unit/address",
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
