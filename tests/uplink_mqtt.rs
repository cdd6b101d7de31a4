//! Store-and-forward against a real Mosquitto: normal flow, broker outage, crash (SIGKILL), the
//! outbox cap, and malformed commands. Every wait is bounded.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::broker::{validate, Broker, Msg, Subscriber};
use common::{wait_until, wait_until_every, ConfigText};
use meterd::config::Config;
use meterd::daemon::Daemon;
use meterd::store::{self, Kind, NewRecord};
use meterd::uplink::NoCommands;
use serde_json::{json, Value};

fn building(units: u8, profile: &str) -> String {
    let mut b = String::from("[[endpoint]]\nname = \"lan\"\nkind = \"tcp\"\n");
    for u in 1..=units {
        b += &format!("[[unit]]\nendpoint = \"lan\"\nunit = {u}\nprofile = \"{profile}\"\nload_w = {}\nstart_kwh = {}\n", 100 * u32::from(u), 1000 * u32::from(u));
    }
    b
}

fn devices(units: u8, profile: &str, interval: &str) -> String {
    let mut d = format!("[poll]\ninterval = \"{interval}\"\ntimeout = \"1s\"\n");
    for u in 1..=units {
        d += &format!(
            "[[device]]\nname = \"m{u}\"\nbus = \"lan\"\nunit = {u}\nprofile = \"{profile}\"\n"
        );
    }
    d
}

/// `[store]` and `[mqtt]`, and every poll reported whole: these tests drive the outbox and the
/// link with volume (the report policy has its own test).
fn uplink_sections(dir: &Path, port: u16, extra_mqtt: &str, extra_store: &str) -> String {
    ConfigText::sections()
        .store(dir, extra_store)
        .mqtt(port, extra_mqtt)
        .with("[report]\nevery_poll = true")
        .text()
        .to_string()
}

/// Publishes the cloud command `name` with `body` to the test gateway (the future owns what it needs).
fn command(sub: &Subscriber, name: &str, body: Value) -> impl std::future::Future<Output = ()> {
    let c = sub.client.clone();
    let topic = format!("test/gw/cmd/{name}");
    async move {
        c.publish(topic, rumqttc::QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
    }
}

/// Every value of `register` of `device` that reached the cloud, with its record.
fn values_of(msgs: &[Msg], device: &str, register: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m.topic == "test/gw/telemetry")
        .flat_map(|m| json_of(m)["records"].as_array().unwrap().clone())
        .filter(|r| r["device"] == device && r["values"].get(register).is_some())
        .collect()
}

fn json_of(m: &Msg) -> Value {
    serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("{}: {e}", m.topic))
}

/// Every record seq received on `topic`, in arrival order.
fn seqs(msgs: &[Msg], topic: &str) -> Vec<i64> {
    msgs.iter()
        .filter(|m| m.topic == topic)
        .flat_map(|m| {
            json_of(m)["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["seq"].as_i64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Seqs 1..=upto of the outbox, each received at least once, given the non-telemetry ones too.
fn assert_complete(msgs: &[Msg], upto: i64) {
    let mut all: Vec<i64> = ["test/gw/telemetry", "test/gw/events", "test/gw/audit"]
        .iter()
        .flat_map(|t| seqs(msgs, t))
        .collect();
    all.sort_unstable();
    all.dedup();
    let missing: Vec<i64> = (1..=upto)
        .filter(|s| all.binary_search(s).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{} seq(s) missing up to {upto}, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// Within each message, seqs rise; a redelivery repeats a whole message (same `seq_first..seq_last`).
fn assert_ordered(msgs: &[Msg]) {
    for m in msgs.iter().filter(|m| m.topic == "test/gw/telemetry") {
        let v = json_of(m);
        let s: Vec<i64> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_i64().unwrap())
            .collect();
        assert!(s.windows(2).all(|w| w[0] < w[1]), "unordered message {s:?}");
        assert_eq!(v["seq_first"].as_i64(), s.first().copied());
        assert_eq!(v["seq_last"].as_i64(), s.last().copied());
    }
}

fn config_text(sim: &meterd::sim::RunningSim, devices: &str, uplink: &str) -> ConfigText {
    ConfigText::gateway("gw", "UTC")
        .buses_of(sim, "")
        .with(devices)
        .with(uplink)
}

fn config(sim: &meterd::sim::RunningSim, devices: &str, uplink: &str) -> Config {
    config_text(sim, devices, uplink).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_reach_a_subscriber_with_the_right_values_and_schemas() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-normal", "test/#").await;
    let sim = common::start(&building(2, "eastron_sdm120")).await;
    let dir = tempfile::tempdir().unwrap();
    // The default report policy: the first poll of each device goes out whole.
    let cfg = config(
        &sim,
        &devices(2, "eastron_sdm120", "200ms"),
        ConfigText::sections()
            .store(dir.path(), "")
            .mqtt(broker.port, "")
            .text(),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();

    let msgs = sub
        .wait_for("m2's import_kwh", Duration::from_secs(15), |m| {
            !values_of(m, "m2", "import_kwh").is_empty()
        })
        .await;
    for m in msgs.iter().filter(|m| m.topic == "test/gw/telemetry") {
        validate("telemetry.schema.json", &json_of(m));
    }
    let r = values_of(&msgs, "m2", "import_kwh").remove(0);
    let kwh = r["values"]["import_kwh"].as_f64().unwrap();
    assert!((kwh - 2000.0).abs() < 0.01, "{r}");
    assert!(r.get("quality").is_none(), "every value good: {r}");
    assert!(r["ts"].as_str().unwrap().ends_with('Z'), "{r}");
    // One record per poll with all the device's registers, not one per register.
    let registers = cfg.device("m2").unwrap().profile.registers.len();
    assert_eq!(r["values"].as_object().unwrap().len(), registers, "{r}");
    // The retained site model says what each register of each device measures.
    let model = msgs
        .iter()
        .find(|m| m.topic == "test/gw/config")
        .expect("the site model on connect");
    let model = json_of(model);
    // Retained: a backend that connects later gets it at once.
    let late = Subscriber::connect(broker.cloud_port, "sub-late", "test/gw/config").await;
    let got = late
        .wait_for("the retained site model", Duration::from_secs(5), |m| {
            !m.is_empty()
        })
        .await;
    assert!(got[0].retain, "the site model is retained");
    assert_eq!(json_of(&got[0])["model_hash"], model["model_hash"]);
    validate("config.schema.json", &model);
    assert_eq!(model["config_hash"], cfg.hash.as_str());
    let m2 = model["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "m2")
        .unwrap();
    assert_eq!(m2["registers"]["import_kwh"]["quantity"], "energy_kwh");
    assert_eq!(m2["registers"]["import_kwh"]["unit"], "kWh");
    let birth = msgs
        .iter()
        .find(|m| m.topic == "test/gw/status")
        .expect("birth message");
    let b = json_of(birth);
    validate("status.schema.json", &b);
    assert_eq!(b["state"], "online");
    assert_eq!(b["config_hash"], cfg.hash.as_str());
    assert_ordered(&msgs);

    // A clean stop publishes the retained offline status.
    daemon.stop().await;
    let msgs = sub
        .wait_for("offline status", Duration::from_secs(10), |m| {
            m.iter()
                .any(|m| m.topic == "test/gw/status" && json_of(m)["state"] == "offline")
        })
        .await;
    let bye = msgs
        .iter()
        .rev()
        .find(|m| m.topic == "test/gw/status")
        .unwrap();
    validate("status.schema.json", &json_of(bye));
    assert_eq!(json_of(bye)["reason"], "shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_polling_never_stops() {
    let mut broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-outage", "test/#").await;
    let sim = common::start(&building(4, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        &devices(4, "chint_ddsu666", "100ms"),
        &uplink_sections(dir.path(), broker.port, "batch_max_records = 50\n", ""),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    sub.wait_for("first telemetry", Duration::from_secs(15), |m| {
        m.iter().any(|m| m.topic == "test/gw/telemetry")
    })
    .await;

    broker.stop();
    let polls = |d: &Daemon| {
        d.bus_status
            .iter()
            .flat_map(|s| s.snapshot())
            .map(|s| s.polls_ok)
            .sum::<u64>()
    };
    let (polls_before, rows_before) = (polls(&daemon), daemon.store.stats().await.rows);
    // Polling goes on while the broker is down, and the outbox keeps one record per poll.
    let during = wait_until(
        "polls buffered during the outage",
        Duration::from_secs(10),
        async || {
            let s = daemon.store.stats().await;
            let polled = polls(&daemon) - polls_before;
            if polled >= 4 * 20 && s.rows > rows_before + 4 * 20 {
                Ok(s)
            } else {
                Err(format!(
                    "{polled} polls, outbox {rows_before} -> {} rows",
                    s.rows
                ))
            }
        },
    )
    .await;
    let outage_last_seq = during.last_seq;

    broker.restart();
    // Everything recorded during the outage is acknowledged (deleted only on PUBACK) ...
    wait_until(
        "the backlog to drain",
        Duration::from_secs(30),
        async || {
            let s = daemon.store.stats().await;
            if s.oldest_seq.is_none_or(|o| o > outage_last_seq) {
                Ok(())
            } else {
                Err(format!("oldest {:?}", s.oldest_seq))
            }
        },
    )
    .await;
    // ... and arrives at the subscriber, complete, each message in seq order.
    let msgs = sub
        .wait_for("the whole backlog", Duration::from_secs(15), |m| {
            let mut s = seqs(m, "test/gw/telemetry");
            s.sort_unstable();
            s.dedup();
            s.len() as i64 >= outage_last_seq
        })
        .await;
    assert_complete(&msgs, outage_last_seq);
    assert_ordered(&msgs);
    // The backlog (seq <= outage_last_seq, sent after the restart) was replayed oldest first.
    let replay: Vec<i64> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/telemetry")
        .map(|m| json_of(m)["seq_first"].as_i64().unwrap())
        .filter(|s| *s > rows_before as i64 && *s <= outage_last_seq)
        .collect();
    let mut dedup = replay.clone();
    dedup.dedup();
    assert!(
        dedup.windows(2).all(|w| w[0] < w[1]),
        "backlog out of order: {dedup:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_goes_silent_is_noticed_by_keepalive_and_loses_nothing() {
    // A 4G link that dies without a reset: the connection stays open, nothing gets through.
    let mut broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-silent", "test/#").await;
    let sim = common::start(&building(2, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        &devices(2, "chint_ddsu666", "200ms"),
        &uplink_sections(dir.path(), broker.port, "keep_alive = \"5s\"\n", ""),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    sub.wait_for("first telemetry", Duration::from_secs(15), |m| {
        m.iter().any(|m| m.topic == "test/gw/telemetry")
    })
    .await;

    broker.blackhole();
    let silent_at = meterd::clock::Clock::system().instant();
    // Keepalive (5 s) notices the missing PINGRESP: the session is declared down, not trusted.
    wait_until(
        "keepalive to declare the silent link down",
        Duration::from_secs(30),
        async || {
            if daemon.uplink.lock().unwrap().connected {
                Err("still taken for connected".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    let noticed_after = meterd::clock::Clock::system().since(silent_at);
    assert!(
        noticed_after >= Duration::from_secs(4),
        "declared down before keepalive could notice ({noticed_after:?}): not a silent link"
    );
    let silent_last_seq = daemon.store.stats().await.last_seq;

    broker.restart();
    let msgs = sub
        .wait_for(
            "everything recorded while silent",
            Duration::from_secs(30),
            |m| {
                let mut s: Vec<i64> = ["test/gw/telemetry", "test/gw/events", "test/gw/audit"]
                    .iter()
                    .flat_map(|t| seqs(m, t))
                    .collect();
                s.sort_unstable();
                s.dedup();
                s.len() as i64 >= silent_last_seq
            },
        )
        .await;
    assert_complete(&msgs, silent_last_seq);
    assert_ordered(&msgs);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_replaying_a_backlog_loses_nothing() {
    let mut broker = Broker::start();
    let port = broker.port;
    let sub = Subscriber::connect(broker.cloud_port, "sub-crash", "test/#").await;
    broker.stop();
    let sim = common::start(&building(20, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    // The same config as a file for the real process.
    let text = config_text(
        &sim,
        &devices(20, "chint_ddsu666", "50ms"),
        &uplink_sections(
            dir.path(),
            port,
            "batch_max_records = 10\ninflight = 1\n",
            "",
        ),
    );
    // Invalid text fails here, not silently in the child process.
    text.build();
    let cfg_path = dir.path().join("meterd.toml");
    std::fs::write(&cfg_path, text.text()).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_meterd"))
            .args(["--log-level", "warn", "run", "--config"])
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let db = dir.path().join("outbox.db");

    // Build a backlog with the broker down.
    let mut daemon = run();
    wait_until(
        "a backlog of 4000 polls",
        Duration::from_secs(30),
        async || {
            let rows = store::read_stats(&db, meterd::clock::Clock::system().now_ms())
                .map_or(0, |s| s.rows);
            if rows >= 4000 {
                Ok(())
            } else {
                Err(format!("{rows} rows"))
            }
        },
    )
    .await;
    // Bring the broker back and kill the daemon as soon as the replay has started.
    broker.restart();
    wait_until_every(
        "the replay to start",
        Duration::from_secs(20),
        Duration::from_millis(5),
        async || {
            if sub.take().iter().any(|m| m.topic == "test/gw/telemetry") {
                Ok(())
            } else {
                Err("no telemetry at the subscriber yet".into())
            }
        },
    )
    .await;
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    let at_kill = store::read_stats(&db, meterd::clock::Clock::system().now_ms()).unwrap();
    // Killed mid-replay: the subscriber has seen part of the backlog, and records are still waiting
    // (some may have been published but not yet deleted: those come again, with the same seq).
    assert!(
        at_kill.rows > 0,
        "killed mid-replay, backlog left ({at_kill:?})"
    );
    let seq_at_kill = at_kill.last_seq;

    // Restart: the rest of the backlog goes out, oldest first; nothing is missing.
    let mut daemon = run();
    wait_until(
        "the backlog to drain after the restart",
        Duration::from_secs(60),
        async || {
            let s = store::read_stats(&db, meterd::clock::Clock::system().now_ms()).unwrap();
            if s.oldest_seq.is_none_or(|o| o > seq_at_kill) {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    let after = store::read_stats(&db, meterd::clock::Clock::system().now_ms()).unwrap();
    assert!(
        after.last_seq > seq_at_kill,
        "seq continues after the restart"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    let msgs = sub
        .wait_for("every seq up to the kill", Duration::from_secs(20), |m| {
            let mut s = seqs(m, "test/gw/telemetry");
            s.sort_unstable();
            s.dedup();
            s.len() as i64 >= seq_at_kill
        })
        .await;
    assert_complete(&msgs, seq_at_kill);
    assert_ordered(&msgs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_drops_oldest_telemetry_keeps_audit_and_says_so() {
    let mut broker = Broker::start();
    let port = broker.port;
    let sub = Subscriber::connect(broker.cloud_port, "sub-cap", "test/#").await;
    broker.stop();
    let sim = common::start(&building(10, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        &devices(10, "chint_ddsu666", "50ms"),
        &uplink_sections(dir.path(), port, "", "max_rows = 1000\n"),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    let audit = NewRecord {
        kind: Kind::Audit,
        topic: "audit".into(),
        ts: meterd::clock::Clock::system().now(),
        payload: json!({"event": "relay_switched", "relay": "room-101/door", "from": "closed", "to": "open"}).to_string().into_bytes(),
    };
    daemon.store.append(vec![audit]).await.unwrap();
    wait_until(
        "the cap to drop telemetry",
        Duration::from_secs(20),
        async || {
            let s = daemon.store.stats().await;
            if s.dropped_total > 0 {
                Ok(())
            } else {
                Err(format!("{} rows, none dropped", s.rows))
            }
        },
    )
    .await;
    let s = daemon.store.stats().await;
    assert!(
        s.rows <= 1001 + 10 * 7,
        "outbox held to its cap: {}",
        s.rows
    );
    assert_eq!(s.by_kind[Kind::Audit as usize], 1, "audit survives the cap");

    broker.restart();
    let msgs = sub
        .wait_for(
            "overflow event and audit record",
            Duration::from_secs(20),
            |m| {
                m.iter().any(|m| m.topic == "test/gw/events")
                    && m.iter().any(|m| m.topic == "test/gw/audit")
            },
        )
        .await;
    let ev = msgs.iter().find(|m| m.topic == "test/gw/events").unwrap();
    let v = json_of(ev);
    validate("events.schema.json", &v);
    let e = &v["records"][0];
    assert_eq!(e["event"], "outbox_overflow");
    assert_eq!(e["reason"], "max_rows");
    assert!(
        e["seq_first"].as_i64().unwrap() >= 1 && e["seq_last"].as_i64() >= e["seq_first"].as_i64()
    );
    let a = json_of(msgs.iter().find(|m| m.topic == "test/gw/audit").unwrap());
    assert_eq!(a["records"][0]["event"], "relay_switched");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_get_error_replies_and_change_nothing() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-cmd", "test/gw/#").await;
    let sim = common::start(&building(1, "eastron_sdm120")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        &devices(1, "eastron_sdm120", "200ms"),
        &uplink_sections(dir.path(), broker.port, "", ""),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    sub.wait_for("birth", Duration::from_secs(15), |m| {
        m.iter().any(|m| m.topic == "test/gw/status")
    })
    .await;

    let huge = format!("{{\"id\":\"big\",\"pad\":\"{}\"}}", "x".repeat(1024 * 1024));
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        ("ping", b"{not json".to_vec(), None, "not valid JSON"),
        ("ping", b"42".to_vec(), None, "expected a JSON object"),
        (
            "ping",
            br#"{"id": 7}"#.to_vec(),
            None,
            "\"id\" must be a string",
        ),
        (
            "ping",
            br#"{"noid": true}"#.to_vec(),
            None,
            "missing \"id\"",
        ),
        (
            "reboot_now",
            br#"{"id": "c-unknown"}"#.to_vec(),
            Some("c-unknown"),
            "unknown command",
        ),
        (
            "BAD-name",
            br#"{"id": "c-name"}"#.to_vec(),
            Some("c-name"),
            "must be 1-64 characters",
        ),
        (
            "ping",
            huge.into_bytes(),
            None,
            "exceeds the 65536-byte limit",
        ),
        ("ping", vec![0xff, 0xfe, 0x00], None, "not valid JSON"),
    ];
    for (name, payload, _, _) in &cases {
        sub.client
            .publish(
                format!("test/gw/cmd/{name}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
    }
    sub.client
        .publish(
            "test/gw/cmd/ping",
            rumqttc::QoS::AtLeastOnce,
            false,
            br#"{"id": "c-ok"}"#.to_vec(),
        )
        .await
        .unwrap();
    let msgs = sub
        .wait_for("all replies", Duration::from_secs(20), |m| {
            m.iter().filter(|m| m.topic == "test/gw/reply").count() > cases.len()
        })
        .await;
    let replies: Vec<Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(json_of)
        .collect();
    for r in &replies {
        validate("reply.schema.json", r);
    }
    for (name, _, id, why) in &cases {
        let found = replies.iter().any(|r| {
            r["ok"] == false
                && r["error"].as_str().unwrap().contains(why)
                && r["id"] == json!(id)
                && r["command"] == *name
        });
        assert!(found, "no error reply for {name} ({why}) in {replies:#?}");
    }
    let ok = replies.iter().find(|r| r["id"] == "c-ok").unwrap();
    assert_eq!(ok["ok"], true);
    // The daemon kept running: telemetry still flows after the bad commands.
    let n = sub
        .take()
        .iter()
        .filter(|m| m.topic == "test/gw/telemetry")
        .count();
    sub.wait_for(
        "telemetry after the commands",
        Duration::from_secs(10),
        |m| m.iter().filter(|m| m.topic == "test/gw/telemetry").count() > n + 2,
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file_and_a_client_certificate() {
    let (broker, certs) = Broker::start_tls();
    let sim = common::start(&building(1, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let tls = format!(
        "[mqtt.tls]\nca_file = \"{0}/ca.pem\"\nclient_cert = \"{0}/client.crt\"\nclient_key = \"{0}/client.key\"\n",
        certs.display()
    );
    // The broker's certificate names localhost: connect by that name.
    let uplink = uplink_sections(dir.path(), broker.port, "", "")
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"")
        + &tls;
    let cfg = config(&sim, &devices(1, "chint_ddsu666", "200ms"), &uplink);
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    let s = wait_until(
        "a record acknowledged over TLS",
        Duration::from_secs(20),
        async || {
            let s = daemon.uplink.lock().unwrap().clone();
            if s.records_acked > 0 {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    assert!(s.connected);
    daemon.stop().await;

    // Without the client certificate the broker refuses the connection and the error says so.
    let without_cert = uplink_sections(dir.path(), broker.port, "", "")
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"")
        + &format!("[mqtt.tls]\nca_file = \"{}/ca.pem\"\n", certs.display());
    let cfg = config(&sim, &devices(1, "chint_ddsu666", "200ms"), &without_cert);
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    let (e, s) = wait_until(
        "the refusal recorded",
        Duration::from_secs(20),
        async || {
            let s = daemon.uplink.lock().unwrap().clone();
            match &s.last_error {
                Some(e) => Ok((e.clone(), s)),
                None => Err("no error recorded".into()),
            }
        },
    )
    .await;
    assert!(e.contains(&format!("localhost:{}", broker.port)), "{e}");
    assert_eq!(s.records_acked, 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_reads_a_meters_counter_history_from_the_gateway() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-hist", "test/gw/#").await;
    let sim = common::start(&building(1, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        &devices(1, "chint_ddsu666", "500ms"),
        &uplink_sections(dir.path(), broker.port, "", ""),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    let publish = |name: &str, body: Value| command(&sub, name, body);
    // A meter's counter history, from the gateway's own samples (the first poll is always kept).
    sub.wait_for("m1 polled", Duration::from_secs(10), |m| {
        m.iter().any(|m| m.topic == "test/gw/telemetry")
    })
    .await;
    let window = json!({
        "from": (meterd::clock::Clock::system().now() - chrono::Duration::hours(1)).to_rfc3339(),
        "to": (meterd::clock::Clock::system().now() + chrono::Duration::hours(1)).to_rfc3339(),
    });
    let mut h = window.clone();
    h["id"] = json!("h-1");
    h["device"] = json!("m1");
    publish("get_history", h).await;
    let mut bad = window.clone();
    bad["id"] = json!("h-bad");
    bad["device"] = json!("m1");
    bad["quantity"] = json!("power_w");
    publish("get_history", bad).await;
    let msgs = sub
        .wait_for("both replies", Duration::from_secs(10), |m| {
            m.iter().filter(|m| m.topic == "test/gw/reply").count() >= 2
        })
        .await;
    let replies: BTreeMap<String, Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(json_of)
        .inspect(|v| validate("reply.schema.json", v))
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    let history = &replies["h-1"];
    assert_eq!(history["ok"], true, "{history}");
    let samples = history["result"]["samples"].as_array().unwrap();
    assert!(!samples.is_empty(), "{history}");
    let kwh = samples[0]["value"].as_f64().unwrap();
    assert!(
        (1000.0..1000.1).contains(&kwh),
        "m1 started at 1000 kWh: {history}"
    );
    assert!(samples[0]["ts"].as_str().unwrap().ends_with('Z'));
    assert!(history["result"]["next_after"].is_null(), "one page");
    assert_eq!(replies["h-bad"]["ok"], false);
    assert!(replies["h-bad"]["error"]
        .as_str()
        .unwrap()
        .contains("billing counters"));
    daemon.stop().await;
}

/// The key the cloud signs `set_tariff` with in these tests, and its public half as configured.
fn tariff_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[5u8; 32])
}

fn tariff_key_hex() -> String {
    use std::fmt::Write as _;
    tariff_key()
        .verifying_key()
        .to_bytes()
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A `set_tariff` command signed with [`tariff_key`].
fn signed(id: &str, mut args: Value) -> Value {
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;
    args["expires_at"] =
        json!((meterd::clock::Clock::system().now() + chrono::Duration::minutes(5)).to_rfc3339());
    let sig = tariff_key().sign(&meterd::enforce::auth::signed_content(
        "set_tariff",
        id,
        &args,
    ));
    args["sig"] = json!(base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()));
    args["id"] = json!(id);
    args
}

/// Before the fix `set_tariff` was unsigned and answered `ok` before it was checked against the
/// site or on disk. Sends a malformed, an unsigned, a refused (bands on the pool's tariff) and a
/// good one (elec 0.85 → 1.20): only the good one changes anything, and it is audited.
async fn set_tariffs_checked_and_audited(sub: &Subscriber, from: &str) {
    let publish = |name: &str, body: Value| command(sub, name, body);
    publish(
        "set_tariff",
        signed(
            "t-bad",
            json!({"name": "elec", "utility": "electricity", "price": "abc", "effective_from": from}),
        ),
    )
    .await;
    publish(
        "set_tariff",
        json!({"id": "t-unsigned", "name": "elec", "utility": "electricity", "price": "9.99",
               "effective_from": from}),
    )
    .await;
    // Bands on the tariff that prices the pool: refused whole, nothing changed.
    publish(
        "set_tariff",
        signed(
            "t-banded",
            json!({"name": "elec", "utility": "electricity", "price": "1.05", "effective_from": from,
                   "bands": [{"name": "peak", "from": "08:00", "to": "22:00", "price": "1.30"}]}),
        ),
    )
    .await;
    publish(
        "set_tariff",
        signed(
            "t-1",
            json!({"name": "elec", "utility": "electricity", "price": "1.20", "effective_from": from}),
        ),
    )
    .await;
    let msgs = sub
        .wait_for(
            "the tariff replies and the audit",
            Duration::from_secs(20),
            |m| {
                m.iter().filter(|m| m.topic == "test/gw/reply").count() >= 4
                    && m.iter().any(|m| m.topic == "test/gw/audit")
            },
        )
        .await;
    // One audit record, of the change that was made: what the tariff was and what it is now.
    let audits: Vec<Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/audit")
        .map(json_of)
        .inspect(|v| validate("audit.schema.json", v))
        .flat_map(|v| v["records"].as_array().cloned().unwrap_or_else(|| vec![v]))
        .filter(|r| r["event"] == "tariff_set")
        .collect();
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert_eq!(
        (
            audits[0]["id"].as_str(),
            audits[0]["previous"]["price"]["micros"].as_i64(),
            audits[0]["current"]["price"]["micros"].as_i64()
        ),
        (Some("t-1"), Some(850_000), Some(1_200_000))
    );
    let replies: BTreeMap<String, Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(json_of)
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(replies["t-bad"]["ok"], false);
    assert!(replies["t-bad"]["error"]
        .as_str()
        .unwrap()
        .contains("price"));
    assert_eq!(replies["t-1"]["ok"], true);
    assert_eq!(replies["t-unsigned"]["ok"], false);
    assert!(replies["t-unsigned"]["error"]
        .as_str()
        .unwrap()
        .contains("unsigned"));
    assert_eq!(replies["t-banded"]["ok"], false);
    assert!(
        replies["t-banded"]["error"]
            .as_str()
            .unwrap()
            .contains("pool \"common\" is priced by tariff \"elec\""),
        "{}",
        replies["t-banded"]
    );
}

/// Before the fix a new price re-ran a billed month at it. A version from a day a bill already
/// covers is refused whole: the month stays as billed.
async fn a_price_for_a_billed_month_is_refused(sub: &Subscriber, month: &str) {
    command(
        sub,
        "set_tariff",
        signed(
            "t-past",
            json!({"name": "elec", "utility": "electricity", "price": "2.00",
                   "effective_from": format!("{month}-01")}),
        ),
    )
    .await;
    let msgs = sub
        .wait_for("the refusal", Duration::from_secs(10), |m| {
            m.iter()
                .any(|m| m.topic == "test/gw/reply" && json_of(m)["id"] == "t-past")
        })
        .await;
    let r = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(json_of)
        .find(|v| v["id"] == "t-past")
        .unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains(&format!("would change {month}, already billed")),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tariff_and_apportion_commands_publish_versioned_results() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-acct", "test/gw/#").await;
    let sim = common::start(&building(3, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let topo = r#"
        [[room]]
        id = "A"
        area_m2 = 60
        [[room]]
        id = "B"
        area_m2 = 40
        [[tariff]]
        name = "elec"
        utility = "electricity"
        price = "0.85"
        [[meter]]
        name = "m1"
        utility = "electricity"
        pool = "common"
        [[meter]]
        name = "m2"
        utility = "electricity"
        room = "A"
        [[meter]]
        name = "m3"
        utility = "electricity"
        room = "B"
        [[pool]]
        name = "common"
        utility = "electricity"
        rooms = ["*"]
        method = { area = 1.0 }
        tariff = "elec"
    "#;
    let cfg = config(
        &sim,
        &format!("{}\n{topo}", devices(3, "chint_ddsu666", "500ms")),
        &format!(
            "{}\n[enforcement]\npublic_key = \"{}\"\n",
            uplink_sections(dir.path(), broker.port, "", ""),
            tariff_key_hex()
        ),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    sub.wait_for("birth", Duration::from_secs(15), |m| {
        m.iter().any(|m| m.topic == "test/gw/status")
    })
    .await;
    // Last month of the test's clock (the gateway's timezone here is UTC).
    let month = common::month_before(meterd::clock::Clock::system().now()).2;
    let publish = |name: &str, body: Value| command(&sub, name, body);
    // A price from the first day of that month, which no bill has covered yet.
    set_tariffs_checked_and_audited(&sub, &format!("{month}-01")).await;
    publish("apportion", json!({"id": "a-bad", "period": "2026-13"})).await;
    publish("apportion", json!({"id": "a-1", "period": month})).await;
    let msgs = sub
        .wait_for("replies and the result", Duration::from_secs(20), |m| {
            m.iter().filter(|m| m.topic == "test/gw/reply").count() >= 6
                && m.iter().any(|m| m.topic == "test/gw/results/apportionment")
                && m.iter().any(|m| m.topic == "test/gw/results/bill")
        })
        .await;
    let replies: BTreeMap<String, Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(json_of)
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(replies["a-bad"]["ok"], false);
    assert!(replies["a-bad"]["error"]
        .as_str()
        .unwrap()
        .contains("expected YYYY-MM"));
    assert_eq!(replies["a-1"]["ok"], true);
    // The retained site model is published again with the tariff version the cloud set.
    let msgs = sub
        .wait_for(
            "the site model with the new price",
            Duration::from_secs(10),
            |m| {
                m.iter().any(|m| {
                    m.topic == "test/gw/config"
                        && json_of(m)["tariff_changes"][0]["tariff"]["price"]["micros"] == 1_200_000
                })
            },
        )
        .await;
    let models: Vec<Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/config")
        .map(json_of)
        .inspect(|v| validate("config.schema.json", v))
        .collect();
    let (first, last) = (&models[0], models.last().unwrap());
    assert!(
        first.get("tariff_changes").is_none(),
        "the configured tariffs only at first"
    );
    assert_ne!(
        first["model_hash"], last["model_hash"],
        "a new tariff is a new model"
    );
    assert_eq!(
        first["config_hash"], last["config_hash"],
        "the file did not change"
    );
    let res = json_of(
        msgs.iter()
            .find(|m| m.topic == "test/gw/results/apportionment")
            .unwrap(),
    );
    validate("results.schema.json", &res);
    let pool = &res["records"][0];
    assert_eq!(pool["period"], month.as_str());
    assert_eq!(pool["version"], 1);
    assert_eq!(
        pool["price"]["micros"], 1_200_000,
        "the tariff set by the cloud is used"
    );
    // October has no history in this fresh outbox: every figure is zero and each gap is said.
    assert!(pool["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap().contains("no consumption")));
    // One bill per room, each provisional and naming the meter it lacks, never a silent 0.
    let bills: Vec<Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/results/bill")
        .map(json_of)
        .inspect(|b| validate("bill.schema.json", b))
        .flat_map(|b| b["records"].as_array().unwrap().clone())
        .collect();
    let rooms: Vec<&str> = bills.iter().map(|b| b["room"].as_str().unwrap()).collect();
    assert_eq!(rooms, vec!["A", "B"]);
    for (b, meter) in bills.iter().zip(["m2", "m3"]) {
        assert_eq!(b["provisional"], true);
        assert_eq!(
            (b["version"].as_i64(), b["period"].as_str()),
            (Some(1), Some(month.as_str()))
        );
        assert!(b["ts"].as_str().is_some() && b["config_hash"].as_str().is_some());
        let notes = b["notes"].to_string();
        assert!(
            notes.contains(&format!("meter {meter}: no reading")),
            "{notes}"
        );
    }
    // The kept version answers get_bill.
    publish(
        "get_bill",
        json!({"id": "gb-1", "period": month, "room": "B"}),
    )
    .await;
    let msgs = sub
        .wait_for("get_bill reply", Duration::from_secs(10), |m| {
            m.iter()
                .any(|m| m.topic == "test/gw/reply" && json_of(m)["id"] == "gb-1")
        })
        .await;
    let r = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(json_of)
        .find(|v| v["id"] == "gb-1")
        .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (
            r["result"]["version"].as_i64(),
            r["result"]["bills"][0]["room"].as_str()
        ),
        (Some(1), Some("B"))
    );
    a_price_for_a_billed_month_is_refused(&sub, &month).await;
    daemon.stop().await;
}

/// Before the fix a burst of ~200 commands overflowed rumqttc's request queue ("Failed to send mqtt
/// requests to eventloop"), the session dropped and, with a clean session, 134 of 206 commands never
/// got a reply. Now: 500 commands in one burst (a third malformed) while 1,000 readings a second flow;
/// every command is answered exactly once, the session never drops, telemetry keeps its rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_commands_during_1000_readings_a_second_is_answered_once_each() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-burst", "test/gw/#").await;
    // 25 DTSU666s of 11 registers polled every 250 ms: 1,100 readings a second.
    let sim = common::start(&building(25, "chint_dtsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        &devices(25, "chint_dtsu666", "250ms"),
        &uplink_sections(dir.path(), broker.port, "", ""),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    sub.wait_for("birth", Duration::from_secs(15), |m| {
        m.iter().any(|m| m.topic == "test/gw/status")
    })
    .await;
    // Readings taken (by their own time) in [from, to) that reached the subscriber: polling and
    // delivery together. Replies share the link with telemetry, so telemetry may arrive a little
    // later during a burst; what counts is that it was taken on time and arrives.
    let readings =
        |msgs: &[Msg], from: chrono::DateTime<Utc>, to: chrono::DateTime<Utc>| -> usize {
            // One record per poll carries all its values: count the values, once per seq.
            let mut seqs: Vec<(i64, usize)> = msgs
                .iter()
                .filter(|m| m.topic == "test/gw/telemetry")
                .flat_map(|m| json_of(m)["records"].as_array().unwrap().clone())
                .filter(|r| {
                    let ts =
                        chrono::DateTime::parse_from_rfc3339(r["ts"].as_str().unwrap()).unwrap();
                    ts >= from && ts < to
                })
                .map(|r| {
                    (
                        r["seq"].as_i64().unwrap(),
                        r["values"].as_object().map_or(0, serde_json::Map::len),
                    )
                })
                .collect();
            seqs.sort_unstable();
            seqs.dedup();
            seqs.iter().map(|(_, n)| n).sum()
        };
    // The rate before the burst, over 3 s.
    let before_from = meterd::clock::Clock::system().now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_to = meterd::clock::Clock::system().now();

    let mut o = rumqttc::MqttOptions::new("cloud", "127.0.0.1", broker.cloud_port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (cloud, mut ev) = rumqttc::AsyncClient::new(o, 1024);
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let mut with_id = Vec::new();
    let mut without_id = 0;
    let burst_start = meterd::clock::Clock::system().instant();
    let burst_from = meterd::clock::Clock::system().now();
    for i in 0..500 {
        let (name, payload): (&str, Vec<u8>) = match i % 6 {
            0 => ("ping", b"{not json".to_vec()),
            1 => ("ping", br#"{"noid": 1}"#.to_vec()),
            2 => ("reboot_now", format!(r#"{{"id": "u-{i}"}}"#).into_bytes()),
            3 => ("status", format!(r#"{{"id": "s-{i}"}}"#).into_bytes()),
            _ => ("ping", format!(r#"{{"id": "p-{i}"}}"#).into_bytes()),
        };
        match i % 6 {
            0 | 1 => without_id += 1,
            2 => with_id.push(format!("u-{i}")),
            3 => with_id.push(format!("s-{i}")),
            _ => with_id.push(format!("p-{i}")),
        }
        cloud
            .publish(
                format!("test/gw/cmd/{name}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    sub.wait_for("500 replies", Duration::from_secs(60), |m| {
        m.iter().filter(|m| m.topic == "test/gw/reply").count() >= 500
    })
    .await;
    let answered_in = meterd::clock::Clock::system().since(burst_start);
    let burst_to = meterd::clock::Clock::system().now();
    // The outbox goes out in seq order: once a reading taken a second after the burst has arrived,
    // everything queued behind the replies (telemetry, any duplicate reply) has too.
    let settled = burst_to + chrono::Duration::seconds(1);
    let end = settled + chrono::Duration::seconds(1);
    let msgs_after = sub
        .wait_for(
            "a reading taken after the burst",
            Duration::from_secs(20),
            |m| readings(m, settled, end) > 0,
        )
        .await;
    let rate_before = readings(&msgs_after, before_from, before_to) as f64
        / (before_to - before_from).as_seconds_f64();
    let rate_during = readings(&msgs_after, burst_from, burst_to) as f64
        / (burst_to - burst_from).as_seconds_f64();
    let replies: Vec<Value> = msgs_after
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(json_of)
        .collect();
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut null_ids = 0;
    for r in &replies {
        validate("reply.schema.json", r);
        match r["id"].as_str() {
            Some(id) => *per_id.entry(id.to_string()).or_default() += 1,
            None => null_ids += 1,
        }
    }
    for id in &with_id {
        assert_eq!(
            per_id.get(id),
            Some(&1),
            "command {id} answered {:?} times",
            per_id.get(id)
        );
    }
    assert_eq!(per_id.len(), with_id.len(), "replies to ids never sent");
    assert_eq!(
        null_ids, without_id,
        "one reply per command without a readable id"
    );
    assert!(replies
        .iter()
        .filter(|r| r["id"].as_str().is_some_and(|i| i.starts_with("p-")))
        .all(|r| r["ok"] == true));
    assert!(replies
        .iter()
        .filter(|r| r["id"].as_str().is_some_and(|i| i.starts_with("u-")))
        .all(|r| r["ok"] == false));
    let uplink = daemon.uplink.lock().unwrap().clone();
    assert_eq!(
        uplink.reconnects, 0,
        "the session dropped: {:?}",
        uplink.last_error
    );
    assert!(uplink.connected);
    println!(
        "500 commands ({} without an id) answered in {answered_in:?}, each once; telemetry {rate_before:.0}/s before, {rate_during:.0}/s during; reconnects {}",
        without_id, uplink.reconnects
    );
    assert!(
        rate_before >= 900.0,
        "the load is not there: {rate_before:.0} readings/s"
    );
    assert!(
        rate_during >= rate_before * 0.8,
        "telemetry fell from {rate_before:.0}/s to {rate_during:.0}/s during the burst"
    );
    pump.abort();
    daemon.stop().await;
}

/// Before the fix the client's packet limit was twice the batch size: one results record larger
/// than that (a pool of thousands of rooms) failed its publish, the session dropped, and on every
/// reconnect the same record came first: the uplink was wedged. Now the limit covers the largest
/// record the outbox hands out, and a record above even that is set aside with an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_record_never_wedges_the_uplink() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-big", "test/gw/#").await;
    let sim = common::start(&building(1, "chint_dtsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        &sim,
        &devices(1, "chint_dtsu666", "500ms"),
        &uplink_sections(dir.path(), broker.port, "batch_max_bytes = 65536\n", ""),
    );
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    sub.wait_for("birth", Duration::from_secs(15), |m| {
        m.iter().any(|m| m.topic == "test/gw/status")
    })
    .await;
    let record = |kb: usize, tag: &str| NewRecord {
        kind: Kind::Result,
        topic: "results/apportionment".into(),
        ts: meterd::clock::Clock::system().now(),
        payload: json!({"pool": tag, "pad": "r".repeat(kb * 1024)})
            .to_string()
            .into_bytes(),
    };
    // 900 KiB: more than 2 × batch_max_bytes, less than a record may be.
    daemon
        .store
        .append(vec![record(900, "large")])
        .await
        .unwrap();
    // 1.5 MiB: more than any record may be.
    daemon
        .store
        .append(vec![record(1536, "huge")])
        .await
        .unwrap();
    let msgs = sub
        .wait_for(
            "the large record and the event for the huge one",
            Duration::from_secs(20),
            |m| {
                let results = m
                    .iter()
                    .filter(|m| m.topic == "test/gw/results/apportionment")
                    .count();
                let event = m.iter().filter(|m| m.topic == "test/gw/events").any(|m| {
                    json_of(m)["records"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|r| r["event"] == "record_too_large")
                });
                results >= 1 && event
            },
        )
        .await;
    let big = msgs
        .iter()
        .find(|m| m.topic == "test/gw/results/apportionment")
        .unwrap();
    assert_eq!(json_of(big)["records"][0]["pool"], "large");
    assert!(big.payload.len() > 900 * 1024);
    let ev = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/events")
        .flat_map(|m| json_of(m)["records"].as_array().unwrap().clone())
        .find(|r| r["event"] == "record_too_large")
        .unwrap();
    let batch = msgs
        .iter()
        .find(|m| {
            m.topic == "test/gw/events"
                && json_of(m)["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["event"] == "record_too_large")
        })
        .unwrap();
    validate("events.schema.json", &json_of(batch));
    assert_eq!(ev["topic"], "results/apportionment");
    assert!(ev["bytes"].as_u64().unwrap() > 1536 * 1024);
    // Set aside, not lost.
    assert_eq!(daemon.store.stats().await.oversized, 1);
    // Telemetry keeps flowing, and the session never dropped.
    let n = sub
        .take()
        .iter()
        .filter(|m| m.topic == "test/gw/telemetry")
        .count();
    sub.wait_for("telemetry after", Duration::from_secs(10), |m| {
        m.iter().filter(|m| m.topic == "test/gw/telemetry").count() > n + 2
    })
    .await;
    let uplink = daemon.uplink.lock().unwrap().clone();
    assert_eq!(uplink.reconnects, 0, "{:?}", uplink.last_error);
    daemon.stop().await;
}

/// The bill contract over MQTT: October is billed while the gateway's link is down; after the
/// replay a backend rebuilds each room's bill from the topics alone (the retained site model and
/// the counter history it asks for with `get_history`) and gets the gateway's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_billed_during_an_outage_is_rebuilt_by_the_backend_from_the_topics_alone() {
    let mut broker = Broker::start();
    // The backend ingests on a shared subscription (two consumers); the retained site model comes
    // on an ordinary one (brokers do not send retained messages to shared subscriptions).
    let group = "$share/ingest/test/gw/#";
    let ingest = [
        Subscriber::connect(broker.cloud_port, "bills-1", group).await,
        Subscriber::connect(broker.cloud_port, "bills-2", group).await,
    ];
    let sub = Subscriber::connect(broker.cloud_port, "sub-bills", "test/gw/config").await;
    let union = || -> Vec<Msg> { ingest.iter().flat_map(Subscriber::take).collect() };
    broker.stop();
    let sim = common::start(&building(2, "chint_ddsu666")).await;
    let dir = tempfile::tempdir().unwrap();
    let topo = r#"
        [[room]]
        id = "A"
        [[room]]
        id = "B"
        [[meter]]
        name = "m1"
        utility = "electricity"
        room = "A"
        [[meter]]
        name = "m2"
        utility = "electricity"
        room = "B"
        [[tariff]]
        name = "elec"
        utility = "electricity"
        price = "0.8523"
        rooms = ["*"]
    "#;
    let cfg = config(
        &sim,
        &format!("{}\n{topo}", devices(2, "chint_ddsu666", "500ms")),
        &uplink_sections(dir.path(), broker.port, "", ""),
    );
    // The gateway ran through last month (of the test's clock): its history holds the readings
    // around both month ends (1.2 kW and 0.45 kW rooms, counters at 0.01 kWh), and that month is
    // the one to bill. Before the fix the dates were October's, right only while it was November.
    let clock = common::mid_month_clock();
    let (start, end, month) = common::month_before(clock.now());
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&Utc)
    };
    let s = chrono::Duration::seconds;
    let samples: Vec<store::Sample> = [
        ("m1", start - s(5), 1520.37),
        ("m1", start + s(4), 1520.37),
        ("m1", end - s(2), 2413.16),
        ("m1", end + s(3), 2413.17),
        ("m2", start - s(9), 88.12),
        ("m2", start + s(8), 88.13),
        ("m2", end - s(6), 422.91),
        ("m2", end + s(6), 422.92),
    ]
    .iter()
    .map(|(d, t, v)| store::Sample {
        device: (*d).into(),
        quantity: "energy_kwh".into(),
        ts_ms: t.timestamp_millis(),
        value: *v,
    })
    .collect();
    store::Store::open(&cfg.store.path, cfg.store.caps, clock.clock())
        .unwrap()
        .record_history(&samples)
        .unwrap();
    rusqlite::Connection::open(&cfg.store.path)
        .unwrap()
        .execute(
            "INSERT INTO meta (key, value) VALUES ('billing_since', ?1)",
            [&month],
        )
        .unwrap();
    let daemon = Daemon::start(&cfg, &clock.clock(), Arc::new(NoCommands), None).unwrap();
    wait_until(
        "last month billed into the outbox",
        Duration::from_secs(20),
        async || {
            let s = daemon.store.stats().await;
            if s.by_kind[Kind::Result as usize] >= 2 {
                Ok(())
            } else {
                Err(format!(
                    "{} result records",
                    s.by_kind[Kind::Result as usize]
                ))
            }
        },
    )
    .await;
    let up_at = clock.now();
    broker.restart();
    let msgs = wait_until("the replayed bills", Duration::from_secs(20), async || {
        let m = union();
        let n = m
            .iter()
            .filter(|m| m.topic == "test/gw/results/bill")
            .flat_map(|m| json_of(m)["records"].as_array().unwrap().clone())
            .count();
        if n >= 2 {
            Ok(m)
        } else {
            Err(format!("{n} bill records"))
        }
    })
    .await;
    let bills: BTreeMap<String, Value> = msgs
        .iter()
        .filter(|m| m.topic == "test/gw/results/bill")
        .inspect(|m| validate("bill.schema.json", &json_of(m)))
        .flat_map(|m| json_of(m)["records"].as_array().unwrap().clone())
        .map(|b| (b["room"].as_str().unwrap().to_string(), b))
        .collect();
    let model = sub
        .wait_for("the site model", Duration::from_secs(10), |m| !m.is_empty())
        .await;
    let model = json_of(model.last().unwrap());

    // The backend asks for each billing meter's history around the month and prices it itself.
    for (i, device) in ["m1", "m2"].iter().enumerate() {
        let c = sub.client.clone();
        let body = json!({"id": format!("h-{i}"), "device": device,
            "from": (start - chrono::Duration::hours(1)).to_rfc3339(),
            "to": (end + chrono::Duration::hours(1)).to_rfc3339()});
        c.publish(
            "test/gw/cmd/get_history",
            rumqttc::QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .unwrap();
    }
    let msgs = wait_until("the histories", Duration::from_secs(10), async || {
        let m = union();
        let n = m
            .iter()
            .filter(|m| {
                m.topic == "test/gw/reply"
                    && json_of(m)["id"]
                        .as_str()
                        .is_some_and(|i| i.starts_with("h-"))
            })
            .count();
        if n >= 2 {
            Ok(m)
        } else {
            Err(format!("{n} history replies"))
        }
    })
    .await;
    for (room, meter) in model["meters"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(n, m)| m["room"].as_str().map(|r| (r.to_string(), n.clone())))
    {
        let history = msgs
            .iter()
            .filter(|m| m.topic == "test/gw/reply")
            .map(json_of)
            .find(|v| v["result"]["device"] == meter.as_str())
            .unwrap();
        let samples = history["result"]["samples"].as_array().unwrap();
        // The bill rests on the first reading at or after each boundary (within 5 minutes).
        let first_after = |b: chrono::DateTime<Utc>| {
            samples
                .iter()
                .find(|s| at(s["ts"].as_str().unwrap()) >= b)
                .map(|s| s["value"].as_f64().unwrap())
                .unwrap()
        };
        let used = ((first_after(end) - first_after(start)) * 1000.0).round() as i64;
        let micros = model["tariffs"]["elec"]["price"]["micros"]
            .as_i64()
            .unwrap();
        // fen = Wh × micro-CNY / 10^7, half to even (docs/mqtt.md).
        let n = i128::from(used) * i128::from(micros);
        let (q, r) = (n / 10_000_000, n % 10_000_000);
        let cost = if 2 * r > 10_000_000 || (2 * r == 10_000_000 && q % 2 == 1) {
            q + 1
        } else {
            q
        };
        let bill = &bills[&room];
        assert_eq!(
            bill["meters"][0]["consumption_milli"], used,
            "room {room}: {bill}"
        );
        assert_eq!(
            bill["own"][0]["amount"].as_i64().unwrap(),
            i64::try_from(cost).unwrap(),
            "room {room}"
        );
        assert_eq!(bill["provisional"], false);
        // Stamped when it was computed (during the outage), not when it was delivered.
        assert!(at(bill["ts"].as_str().unwrap()) < up_at, "{bill}");
    }
    daemon.stop().await;
}
