//! `meterd run` as systemd runs it: readiness and watchdog over `NOTIFY_SOCKET`, `meterd status`,
//! SIGHUP reload (valid and invalid), SIGTERM stop with the offline status published.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::broker::{Broker, Subscriber};
use common::ConfigText;
use serde_json::Value;

const BUILDING: &str = r#"
[[endpoint]]
name = "lan"
kind = "tcp"
[[unit]]
endpoint = "lan"
unit = 1
profile = "chint_ddsu666"
load_w = 1000.0
[[unit]]
endpoint = "lan"
unit = 10
profile = "relay_waveshare_8ch"
"#;

const SITE: &str = r#"
[[device]]
name = "m1"
bus = "lan"
unit = 1
profile = "chint_ddsu666"
[[device]]
name = "doors"
bus = "lan"
unit = 10
profile = "relay_waveshare_8ch"
[[room]]
id = "101"
[[relay]]
name = "101-door"
room = "101"
kind = "door"
device = "doors"
output = "relay1"
"#;

fn config(addr: std::net::SocketAddr, dir: &Path, broker: u16, interval: &str) -> String {
    let lan = common::bus_toml("lan", &meterd::sim::EndpointAddr::Tcp(addr), "");
    ConfigText::gateway("gw", "UTC")
        .gateway_key(&format!(
            "control_socket = \"{}\"",
            dir.join("control.sock").display()
        ))
        .with(&format!("[poll]\ninterval = \"{interval}\""))
        .store(dir, "")
        .mqtt(broker, "")
        .with(&lan)
        .with(SITE)
        .text()
        .to_string()
}

fn try_status(cfg: &Path) -> Option<Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["status", "--json", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).unwrap())
}

fn status(cfg: &Path) -> Value {
    try_status(cfg).expect("meterd status answers")
}

/// [`common::wait_until`] for a plain condition.
async fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    common::wait_until(what, timeout, async || {
        if f() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_under_systemd_notify_status_reload_and_stop() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-svc", "test/gw/status").await;
    let sim = common::start(BUILDING).await;
    let addr = match sim.addr("lan").unwrap() {
        meterd::sim::EndpointAddr::Tcp(a) => *a,
        _ => unreachable!(),
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("meterd.toml");
    std::fs::write(&cfg, config(addr, dir.path(), broker.port, "500ms")).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // As systemd does: WATCHDOG_PID is the service's own pid (the shell execs into meterd).
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec {} run --config {}",
            env!("CARGO_BIN_EXE_meterd"),
            cfg.display()
        ))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "600000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("meterd.log")).unwrap(),
        ))
        .spawn()
        .unwrap();

    // systemd's view: READY=1, then a WATCHDOG=1 every ~300 ms while the tasks make progress. Keep
    // reading, as systemd does: a full notify socket would block the sender.
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = std::sync::Arc::default();
    let reader = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = notify.recv(&mut buf) {
            reader
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    });
    wait(
        "READY and three watchdog pings",
        Duration::from_secs(10),
        || {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|m| m.contains("WATCHDOG=1"))
                .count()
                >= 3
        },
    )
    .await;
    assert!(
        seen.lock().unwrap()[0].contains("READY=1"),
        "{:?}",
        seen.lock().unwrap()
    );

    // `meterd status` over the control socket.
    wait("first polls", Duration::from_secs(10), || {
        try_status(&cfg).is_some_and(|v| {
            v["buses"][0]["devices"][0]["polls_ok"]
                .as_u64()
                .unwrap_or(0)
                > 1
                && v["mqtt"]["connected"] == true
        })
    })
    .await;
    let v = status(&cfg);
    let hash1 = v["config"]["hash"].as_str().unwrap().to_string();
    assert_eq!(v["gateway"], "gw");
    assert_eq!(v["relays"][0]["relay"], "101-door");
    assert_eq!(v["relays"][0]["actual"], "on");
    let o = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("ok/failed") && text.contains("mqtt: connected") && text.contains("101-door"),
        "{text}"
    );

    // SIGHUP with a valid new config: applied; the outbox and the relay are untouched.
    let writes = sim.writes_seen("lan", 10);
    let last_seq = v["outbox"]["last_seq"].as_i64().unwrap();
    std::fs::write(&cfg, config(addr, dir.path(), broker.port, "300ms")).unwrap();
    let pid = child.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    // (While the daemon restarts inside the process the socket is briefly away.)
    // The status's relays come from the new enforcer's main loop, so once it answers with the door's
    // actual state, its start-up reads and first decisions are done: anything the reload would
    // have switched is switched.
    wait("reloaded config", Duration::from_secs(15), || {
        try_status(&cfg).is_some_and(|v| {
            v["config"]["hash"] != hash1.as_str() && v["relays"][0]["actual"] == "on"
        })
    })
    .await;
    let v = status(&cfg);
    let hash2 = v["config"]["hash"].as_str().unwrap().to_string();
    assert!(
        v["outbox"]["last_seq"].as_i64().unwrap() >= last_seq,
        "outbox kept across reload"
    );
    assert_eq!(sim.writes_seen("lan", 10), writes, "reload toggled a relay");

    // SIGHUP with a broken config: refused, the old one keeps running (asked with a copy of the good
    // config, which names the same socket).
    let good = dir.path().join("good.toml");
    std::fs::copy(&cfg, &good).unwrap();
    std::fs::write(&cfg, "[gateway]\nid = \"gw\"\n").unwrap();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let log = dir.path().join("meterd.log");
    wait("the reload refused", Duration::from_secs(15), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("reload refused"))
    })
    .await;
    assert_eq!(
        status(&good)["config"]["hash"],
        hash2.as_str(),
        "an invalid config is not applied"
    );
    std::fs::write(&cfg, config(addr, dir.path(), broker.port, "300ms")).unwrap();

    // SIGTERM: clean stop, offline status published.
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let end = meterd::clock::Clock::system().instant() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            meterd::clock::Clock::system().instant() < end,
            "meterd did not stop on SIGTERM: {}",
            std::fs::read_to_string(dir.path().join("meterd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code:?}");
    // Logs went to a file: a pipe nobody reads would fill up and block the daemon.
    let err = std::fs::read_to_string(dir.path().join("meterd.log")).unwrap();
    assert!(err.contains("reload refused"), "{err}");
    assert!(
        err.contains("gateway.timezone") || err.contains("missing field"),
        "the refusal names the problem: {err}"
    );
    let msgs = sub
        .wait_for("offline status", Duration::from_secs(10), |m| {
            m.iter().any(|m| {
                serde_json::from_slice::<Value>(&m.payload)
                    .is_ok_and(|v| v["state"] == "offline" && v["reason"] == "shutdown")
            })
        })
        .await;
    assert!(!msgs.is_empty());
}
