//! `meterd demo`: the simulator and the daemon together on the built-in building.

use super::{
    config_failure, daemon, fmt_value, out, sim, table, Args, BTreeMap, Config, DeviceStatus,
    Duration, Instant, Path, Quality, Reading, Result, Transport,
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

/// Starts the embedded sample building and returns a config whose buses point at it.
pub(crate) async fn start_demo_building() -> Result<(sim::RunningSim, Config)> {
    let building = sim::Building::from_str_named(DEMO_BUILDING, "<builtin>/config/building.toml")?;
    let profiles: BTreeMap<_, _> = crate::modbus::profile::builtin()
        .map_err(|e| anyhow::anyhow!("built-in profiles: {e:?}"))?
        .into_iter()
        .map(|(k, v)| (k, std::sync::Arc::new(v)))
        .collect();
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
    // The web view on loopback with a fresh token: port 8080 when free, else any free port.
    let port = std::net::TcpListener::bind(("127.0.0.1", 8080))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())?;
    config.web.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    config.web.token = Some(format!(
        "{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    ));
    Ok((running, config))
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
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
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
    pub async fn execute(self) -> Result<()> {
        let (running, config) = start_demo_building().await?;
        for (name, addr) in &running.endpoints {
            out(&format!("simulator endpoint {name}: {addr}\n"));
        }
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
        let mut config = config;
        let key = ed25519_dalek::SigningKey::from_bytes(&std::array::from_fn(|_| fastrand::u8(..)));
        config.enforcement.public_key = Some(key.verifying_key());
        let (tap, mut readings) = tokio::sync::mpsc::channel(daemon::READINGS_CAPACITY);
        let daemon = daemon::Daemon::start(
            &config,
            std::sync::Arc::new(crate::uplink::NoCommands),
            Some(tap),
        )?;
        let scenario = config.mqtt.clone().map(|m| {
            tokio::spawn(scenario(
                m,
                config.gateway.id.clone(),
                config.gateway.timezone,
                key,
            ))
        });
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
                    let uplink = match (&config.mqtt, daemon.uplink.lock().map(|u| u.clone())) {
                        (Some(m), Ok(u)) if u.connected => format!("uplink connected to {}:{}, {} record(s) acknowledged", m.host, m.port, u.records_acked),
                        (Some(m), _) => format!("uplink to {}:{} not connected", m.host, m.port),
                        (None, _) => "no uplink in this build".to_string(),
                    };
                    out(&format!("outbox {}: {depth} record(s) waiting; {uplink}\n", config.store.path.display()));
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        if let Some(s) = scenario {
            s.abort();
        }
        daemon.stop().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", config.store.path.display()));
        }
        let _ = std::fs::remove_file(&config.gateway.control_socket);
        Ok(())
    }
}

/// The cloud's side of the demo, on the embedded broker: a tenant's door access frozen by a signed
/// command (the daemon switches the door relay and reads it back), then the month's bills computed.
/// Each step is printed; its effects show in the table, the web view and on MQTT.
async fn scenario(
    mqtt: crate::uplink::Mqtt,
    gateway: String,
    tz: chrono_tz::Tz,
    key: ed25519_dalek::SigningKey,
) {
    use ed25519_dalek::Signer as _;
    let prefix = format!("{}/{gateway}", mqtt.topic_prefix);
    let mut opts = rumqttc::MqttOptions::new("meterd-demo-cloud", mqtt.host.clone(), mqtt.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
    tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let send = |command: &'static str, mut args: serde_json::Value, sign: bool| {
        let id = format!("demo-{command}-{:08x}", fastrand::u32(..));
        args["id"] = id.clone().into();
        args["expires_at"] = (chrono::Utc::now() + chrono::Duration::minutes(10))
            .to_rfc3339()
            .into();
        if sign {
            let content = crate::enforce::auth::signed_content(command, &id, &args);
            let sig = key.sign(&content).to_bytes();
            args["sig"] =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sig).into();
        }
        let client = client.clone();
        let topic = format!("{prefix}/cmd/{command}");
        async move {
            let _ = client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, args.to_string())
                .await;
        }
    };
    tokio::time::sleep(Duration::from_secs(12)).await;
    send(
        "freeze",
        serde_json::json!({"room": "101", "scope": "access", "reason": "demo: lease terminated"}),
        true,
    )
    .await;
    out(&format!("\nscenario: the cloud froze room 101's door access with a signed command on {prefix}/cmd/freeze; the daemon switches 101-door off and reads it back (relays column, /relays, {prefix}/audit and {prefix}/reply)\n"));
    tokio::time::sleep(Duration::from_secs(12)).await;
    let period = chrono::Utc::now()
        .with_timezone(&tz)
        .format("%Y-%m")
        .to_string();
    send("apportion", serde_json::json!({"period": period}), false).await;
    out(&format!("\nscenario: the cloud asked for {period}'s bills ({prefix}/cmd/apportion): each room's bill, its readings and lines, on {prefix}/results/bill, and in /events\n"));
}

pub(super) fn demo_table(
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
        chrono::Utc::now()
            .with_timezone(&config.gateway.timezone)
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
