//! The tests' MQTT broker and a test subscriber.
//!
//! By default the broker is rumqttd, embedded in the test process on a free loopback port, so
//! `cargo test` needs nothing but the Rust toolchain. With `METERD_TEST_BROKER=mosquitto` the same
//! tests run against a real Mosquitto started and stopped by PID (the interoperability suite,
//! run by `.ci/run`). Either way the gateway reaches the broker through a [`LinkProxy`]: an outage
//! is the link failing (`stop`/`restart`, `blackhole`), not the broker stopping, and the cloud side
//! (`cloud_port`) stays connected through it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::link::{LinkProxy, Mode};

pub struct Broker {
    /// The port the gateway connects to: the link proxy's.
    pub port: u16,
    /// The broker's own port, where the cloud (test subscribers, command senders) connects.
    pub cloud_port: u16,
    link: LinkProxy,
    /// Mosquitto's process when that backend runs; the embedded broker lives in its threads.
    mosquitto: Option<Child>,
    dir: tempfile::TempDir,
}

/// A loopback port free now and never handed to another test of this process. A test that stops
/// its broker restarts it on the same port; before, the kernel could give that port to a parallel
/// test in between, and the two then shared one broker (another gateway's retained site model, a
/// daemon publishing to the wrong test: seen as `config_hash` differing and a stalled backlog).
fn free_port() -> u16 {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed = HANDED.lock().unwrap();
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
    panic!("no loopback port left that this test process has not used");
}

fn use_mosquitto() -> bool {
    std::env::var("METERD_TEST_BROKER").is_ok_and(|v| v == "mosquitto")
}

/// PEM files of a throwaway CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate, made in-process.
fn make_certs(d: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "meterd-test-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose, base: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(d.join(format!("{base}.crt")), cert.pem()).unwrap();
        std::fs::write(d.join(format!("{base}.key")), key.serialize_pem()).unwrap();
    };
    std::fs::write(d.join("ca.pem"), ca_cert.pem()).unwrap();
    leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    leaf(
        vec![],
        "gw-tls",
        ExtendedKeyUsagePurpose::ClientAuth,
        "client",
    );
}

impl Broker {
    /// Starts a broker that keeps a subscriber's session and queued `QoS` 1 messages while it is
    /// away, behind a passing link.
    pub fn start() -> Broker {
        Broker::launch(false)
    }

    /// A broker that only speaks TLS and requires a client certificate, with a throwaway CA.
    /// Returns the broker and the directory holding `ca.pem`, `client.crt`, `client.key`.
    pub fn start_tls() -> (Broker, PathBuf) {
        let b = Broker::launch(true);
        let dir = b.dir.path().to_path_buf();
        (b, dir)
    }

    fn launch(tls: bool) -> Broker {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Started as root, Mosquitto drops to its own user: let it read and write here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        if tls {
            make_certs(dir.path());
        }
        let cloud_port = free_port();
        let mosquitto = if use_mosquitto() {
            Some(start_mosquitto(dir.path(), cloud_port, tls))
        } else {
            start_embedded(dir.path(), cloud_port, tls);
            None
        };
        let deadline = meterd::clock::Clock::system().instant() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", cloud_port)).is_err() {
            assert!(
                meterd::clock::Clock::system().instant() < deadline,
                "the broker did not start on port {cloud_port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let upstream = SocketAddr::from(([127, 0, 0, 1], cloud_port));
        let link = LinkProxy::start(free_port(), upstream);
        Broker {
            port: link.port,
            cloud_port,
            link,
            mosquitto,
            dir,
        }
    }

    /// The gateway loses its link: its connection is closed and new ones are refused.
    pub fn stop(&mut self) {
        self.link.set(Mode::Refuse);
    }

    /// The link is back.
    pub fn restart(&mut self) {
        self.link.set(Mode::Pass);
    }

    /// The link goes silent: connections stay open but nothing gets through either way.
    pub fn blackhole(&mut self) {
        self.link.set(Mode::Blackhole);
    }
}

fn start_mosquitto(dir: &Path, port: u16, tls: bool) -> Child {
    let tls = if tls {
        format!(
            "cafile {0}/ca.pem\ncertfile {0}/server.crt\nkeyfile {0}/server.key\nrequire_certificate true\n",
            dir.display()
        )
    } else {
        String::new()
    };
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\n{tls}allow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\nlog_dest none\n",
        ),
    )
    .unwrap();
    for f in ["server.key", "client.key"] {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644));
    }
    Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "METERD_TEST_BROKER=mosquitto needs mosquitto installed (apt-get install -y mosquitto)",
        )
}

/// rumqttd in its own threads for the rest of the test process (it has no stop; each test file is
/// its own process).
fn start_embedded(dir: &Path, port: u16, tls: bool) {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        // Above the gateway's largest record (1 MiB) and batch.
        max_payload_size: 16 * 1024 * 1024,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let tls = tls.then(|| rumqttd::TlsConfig::Rustls {
        capath: Some(dir.join("ca.pem").display().to_string()),
        certpath: dir.join("server.crt").display().to_string(),
        keypath: dir.join("server.key").display().to_string(),
    });
    let server = rumqttd::ServerSettings {
        name: format!("test-{port}"),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name(format!("rumqttd-{port}"))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                panic!("embedded broker on port {port}: {e}");
            }
        })
        .unwrap();
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.mosquitto.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = meterd::clock::Clock::system().instant() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none()
                && meterd::clock::Clock::system().instant() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// A persistent-session subscriber that reconnects by itself and records every message.
pub struct Subscriber {
    pub messages: Arc<Mutex<Vec<Msg>>>,
    pub client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    pub async fn connect(port: u16, id: &str, filter: &str) -> Subscriber {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        let (client, mut events) = AsyncClient::new(o, 64);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let messages: Arc<Mutex<Vec<Msg>>> = Arc::default();
        let m = messages.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => m.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("SUBACK")
            .unwrap();
        Subscriber {
            messages,
            client,
            task,
        }
    }

    pub fn take(&self) -> Vec<Msg> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits (bounded) until `pred` holds over the messages so far.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Msg]) -> bool,
    ) -> Vec<Msg> {
        super::wait_until(what, timeout, async || {
            let msgs = self.take();
            if pred(&msgs) {
                Ok(msgs)
            } else {
                Err(format!("got {} message(s)", msgs.len()))
            }
        })
        .await
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Validates JSON against one of the schemas shipped in docs/schemas.
pub fn validate(schema: &str, instance: &serde_json::Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/schemas")
        .join(schema);
    let schema_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.enable_format_assertions();
    compiler.add_resource(schema, schema_json).unwrap();
    let idx = compiler.compile(schema, &mut schemas).unwrap();
    if let Err(e) = schemas.validate(instance, idx) {
        panic!("{schema}: {e:#}\ninstance: {instance}");
    }
}
