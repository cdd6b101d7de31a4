//! A real Mosquitto on a free loopback port, started and stopped by PID, and a test subscriber.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub struct Broker {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Extra listener settings (TLS).
    listener_extra: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// Starts Mosquitto with persistence, so a subscriber's session and queued QoS 1 messages
    /// survive a broker restart.
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // Started as root, Mosquitto drops to its own user: let it write its persistence file.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut b = Broker {
            port: free_port(),
            child: None,
            dir,
            listener_extra: String::new(),
        };
        b.restart();
        b
    }

    /// A broker that only speaks TLS and requires a client certificate, with a throwaway CA made by
    /// `openssl`. Returns the broker and the directory holding `ca.pem`, `client.crt`, `client.key`.
    pub fn start_tls() -> (Broker, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let d = dir.path();
        let sh = |args: &str| {
            let ok = Command::new("sh")
                .arg("-c")
                .arg(args)
                .current_dir(d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok, "openssl failed: {args}");
        };
        sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=meterd-test-ca");
        sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost");
        // X.509 v3 (with extensions): webpki refuses v1 certificates.
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        sh("openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile server.ext");
        sh("openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=gw-tls");
        sh("openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.crt -days 2 -extfile client.ext");
        sh("chmod 644 *.key");
        let extra = format!(
            "cafile {0}/ca.pem\ncertfile {0}/server.crt\nkeyfile {0}/server.key\nrequire_certificate true\n",
            d.display()
        );
        let path = d.to_path_buf();
        let mut b = Broker {
            port: free_port(),
            child: None,
            dir,
            listener_extra: extra,
        };
        b.restart();
        (b, path)
    }

    fn conf(&self) -> PathBuf {
        let p = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &p,
            format!(
                "listener {} 127.0.0.1\n{}allow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\nlog_dest none\n",
                self.port,
                self.listener_extra,
                self.dir.path().display()
            ),
        )
        .unwrap();
        p
    }

    /// (Re)starts the broker on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.conf())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (apt-get install -y mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker with SIGTERM (it saves its persistence file) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
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
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.take();
            if pred(&msgs) {
                return msgs;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {} message(s)",
                msgs.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
