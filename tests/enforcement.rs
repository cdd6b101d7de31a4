//! Relay enforcement end to end: signed cloud commands over a real broker, the simulator's relay
//! board and prepaid meter, read-back, audit records, the fire alarm, a hand-switched relay, the
//! local control socket, and a restart that toggles nothing.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::broker::{Broker, Msg, Subscriber};
use common::{wait_until, ConfigText};
use ed25519_dalek::{Signer, SigningKey};
use meterd::config::Config;
use meterd::daemon::Daemon;
use meterd::uplink::NoCommands;
use serde_json::{json, Value};

const BUILDING: &str = r#"
[[endpoint]]
name = "lan"
kind = "tcp"

[[unit]]
endpoint = "lan"
unit = 10
profile = "relay_waveshare_8ch"

[[unit]]
endpoint = "lan"
unit = 11
profile = "relay_waveshare_8ch"
fault = "stuck"

[[unit]]
endpoint = "lan"
unit = 4
profile = "hiking_dds238_zn"
load_w = 36000.0
start_kwh = 100.0
"#;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// Doors, an old board and a prepaid meter in rooms 101, 104 and 105; relays and an account.
const SITE: &str = r#"
[[device]]
name = "doors"
bus = "lan"
unit = 10
profile = "relay_waveshare_8ch"

[[device]]
name = "old-doors"
bus = "lan"
unit = 11
profile = "relay_waveshare_8ch"

[[device]]
name = "meter104"
bus = "lan"
unit = 4
profile = "hiking_dds238_zn"

[[room]]
id = "101"
[[room]]
id = "104"
[[room]]
id = "105"

[[tariff]]
name = "elec"
utility = "electricity"
price = "100.00"
rooms = ["104"]

[[relay]]
name = "101-door"
room = "101"
kind = "door"
device = "doors"
output = "relay1"
fail_open = true

[[relay]]
name = "105-door"
room = "105"
kind = "door"
device = "old-doors"
output = "relay1"

[[relay]]
name = "104-power"
room = "104"
kind = "supply"
utility = "electricity"
device = "meter104"
output = "relay"

[[prepaid]]
room = "104"
utility = "electricity"
meter = "meter104"
tariff = "elec"
"#;

fn config_text(sim: &meterd::sim::RunningSim, dir: &Path, broker: u16) -> String {
    let pk: String = key()
        .verifying_key()
        .to_bytes()
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
    ConfigText::gateway("gw", "Europe/London")
        .gateway_key(&format!(
            "control_socket = \"{}\"",
            dir.join("control.sock").display()
        ))
        .with("[poll]\ninterval = \"200ms\"\ntimeout = \"500ms\"")
        .store(dir, "")
        .mqtt(broker, "")
        .with(&format!(
            r#"[enforcement]
public_key = "{pk}"
allowed_from = "00:00"
allowed_to = "23:59"
weekends = true
grace = "0s"
low_balance = 500
recheck_every = "300ms"
fire_alarm = {{ device = "doors", register = "input8", active = 1 }}"#
        ))
        .buses_of(sim, "max_concurrent = 2\n")
        .with(SITE)
        .text()
        .to_string()
}

fn signed(cmd: &str, id: &str, mut args: Value, expires_in: chrono::Duration) -> Value {
    args["expires_at"] = json!((meterd::clock::Clock::system().now() + expires_in).to_rfc3339());
    let sig = key().sign(&meterd::enforce::auth::signed_content(cmd, id, &args));
    args["sig"] = json!(base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()));
    args["id"] = json!(id);
    args
}

async fn send(sub: &Subscriber, cmd: &str, body: &Value) {
    sub.client
        .publish(
            format!("test/gw/cmd/{cmd}"),
            rumqttc::QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .unwrap();
}

fn payloads(msgs: &[Msg], topic: &str) -> Vec<Value> {
    msgs.iter()
        .filter(|m| m.topic == topic)
        .flat_map(|m| {
            serde_json::from_slice::<Value>(&m.payload).unwrap()["records"]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect()
}

fn reply(msgs: &[Msg], id: &str) -> Option<Value> {
    msgs.iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap())
        .find(|v| v["id"] == id)
}

async fn coil(sim: &meterd::sim::RunningSim, cfg: &Config, unit: u8, address: u16) -> bool {
    let mut link = meterd::modbus::link::Link::new(&cfg.buses[0], meterd::clock::Clock::system());
    let req = meterd::modbus::plan::ReadRequest {
        function: meterd::modbus::profile::Function::Coil,
        address,
        count: 1,
    };
    let _ = sim;
    match link
        .read(unit, req, Duration::from_secs(1), Duration::ZERO)
        .await
        .unwrap()
    {
        meterd::modbus::link::Data::Bits(b) => b[0],
        meterd::modbus::link::Data::Words(_) => unreachable!(),
    }
}

async fn until<F: Fn(&[Msg]) -> bool>(sub: &Subscriber, what: &str, f: F) -> Vec<Msg> {
    sub.wait_for(what, Duration::from_secs(20), f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::too_many_lines,
    reason = "one scenario told in order: each step starts from the relays and balances the last one left"
)]
async fn rules_drive_the_relays_with_readback_audit_and_authentication() {
    let broker = Broker::start();
    let sub = Subscriber::connect(broker.cloud_port, "sub-enf", "test/gw/#").await;
    let sim = common::start(BUILDING).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&sim, dir.path(), broker.port);
    let cfg = common::parse(&text);
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();

    // Start-up: the door relay (off on a fresh board) is switched on and confirmed by read-back; the
    // stuck board raises a mismatch alarm; the meter's relay is already on and is not touched.
    let msgs = until(&sub, "start-up audit", |m| {
        let a = payloads(m, "test/gw/audit");
        a.iter()
            .any(|r| r["event"] == "relay_switched" && r["relay"] == "101-door")
            && a.iter()
                .any(|r| r["event"] == "relay_mismatch" && r["relay"] == "105-door")
    })
    .await;
    let a = payloads(&msgs, "test/gw/audit");
    let sw = a
        .iter()
        .find(|r| r["event"] == "relay_switched" && r["relay"] == "101-door")
        .unwrap();
    assert_eq!(
        (
            sw["from"].clone(),
            sw["to"].clone(),
            sw["readback"].clone(),
            sw["confirmed"].clone()
        ),
        (json!("off"), json!("on"), json!("on"), json!(true))
    );
    assert!(
        !a.iter().any(|r| r["relay"] == "104-power"),
        "an already-on relay is not toggled"
    );
    assert!(coil(&sim, &cfg, 10, 0).await);

    // Security: forged, expired, unsigned and replayed commands are refused and change nothing.
    let good = signed(
        "freeze",
        "f-1",
        json!({"room": "101", "scope": "access", "reason": "lease terminated"}),
        chrono::Duration::minutes(5),
    );
    let mut forged = good.clone();
    forged["room"] = json!("104");
    forged["id"] = json!("f-forged");
    send(&sub, "freeze", &forged).await;
    send(
        &sub,
        "freeze",
        &signed(
            "freeze",
            "f-old",
            json!({"room": "101", "scope": "access"}),
            chrono::Duration::seconds(-5),
        ),
    )
    .await;
    send(
        &sub,
        "freeze",
        &json!({"id": "f-unsigned", "room": "101", "scope": "access"}),
    )
    .await;
    send(&sub, "freeze", &good).await;
    let msgs = until(&sub, "freeze reply", |m| reply(m, "f-1").is_some()).await;
    send(&sub, "freeze", &good).await; // QoS 1 redelivery or replay: same id
    let msgs2 = until(&sub, "refusals", |m| {
        ["f-forged", "f-old", "f-unsigned"]
            .iter()
            .all(|id| reply(m, id).is_some())
            && m.iter().filter(|x| x.topic == "test/gw/reply").count() >= 5
    })
    .await;
    assert_eq!(reply(&msgs, "f-1").unwrap()["ok"], true);
    assert!(reply(&msgs2, "f-forged").unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("bad signature"));
    assert!(reply(&msgs2, "f-old").unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("expired"));
    assert!(reply(&msgs2, "f-unsigned").unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("unsigned"));
    let replayed: Vec<Value> = msgs2
        .iter()
        .filter(|m| m.topic == "test/gw/reply")
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap())
        .filter(|v| v["id"] == "f-1")
        .collect();
    // Resent with the same id (its reply lost, or a QoS 1 redelivery): the original reply again,
    // word for word but for its seq; the command is not applied a second time.
    assert_eq!(replayed.len(), 2, "{replayed:?}");
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("seq");
        v
    };
    assert_eq!(strip(&replayed[0]), strip(&replayed[1]));
    assert_eq!(replayed[1]["result"], json!({"applied": "freeze"}));
    assert_ne!(replayed[0]["seq"], replayed[1]["seq"]);

    // The freeze turns the door off, confirmed by read-back, with the rule and the command id.
    let msgs = until(&sub, "door frozen", |m| {
        payloads(m, "test/gw/audit")
            .iter()
            .any(|r| r["relay"] == "101-door" && r["to"] == "off")
    })
    .await;
    let off = payloads(&msgs, "test/gw/audit")
        .into_iter()
        .find(|r| r["relay"] == "101-door" && r["to"] == "off")
        .unwrap();
    assert_eq!(off["rule"], "freeze");
    assert!(!coil(&sim, &cfg, 10, 0).await);
    assert!(
        !coil(&sim, &cfg, 11, 0).await,
        "the stuck board never moved"
    );

    // The cloud asks for the room's state: the freeze with its command, the door desired and
    // actually off. Unsigned (read-only); an unknown room is refused with the rooms there are.
    send(&sub, "get_state", &json!({"id": "s-1", "room": "101"})).await;
    send(&sub, "get_state", &json!({"id": "s-bad", "room": "999"})).await;
    let msgs = until(&sub, "state replies", |m| {
        reply(m, "s-1").is_some() && reply(m, "s-bad").is_some()
    })
    .await;
    let state = reply(&msgs, "s-1").unwrap();
    common::broker::validate("reply.schema.json", &state);
    assert_eq!(state["ok"], true, "{state}");
    let room = &state["result"]["rooms"]["101"];
    assert_eq!(room["access_freeze"]["by"], "f-1", "{room}");
    let door = &room["relays"][0];
    assert_eq!(
        (
            &door["relay"],
            &door["desired"],
            &door["actual"],
            &door["rule"]
        ),
        (
            &json!("101-door"),
            &json!("off"),
            &json!("off"),
            &json!("freeze")
        ),
        "{room}"
    );
    assert!(
        state["result"]["rooms"].get("104").is_none(),
        "one room asked"
    );
    let bad = reply(&msgs, "s-bad").unwrap();
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("101"), "{bad}");

    // Prepaid: a small balance is deducted locally from the meter (36 kW at 100.00/kWh = 1.00 per second),
    // warns, empties and cuts the supply (grace 0, window all day); a top-up restores it.
    send(
        &sub,
        "set_balance",
        &signed(
            "set_balance",
            "b-1",
            json!({"room": "104", "utility": "electricity", "balance": 300}),
            chrono::Duration::minutes(5),
        ),
    )
    .await;
    let msgs = until(&sub, "prepaid cut", |m| {
        payloads(m, "test/gw/audit")
            .iter()
            .any(|r| r["relay"] == "104-power" && r["to"] == "off")
    })
    .await;
    let ev = payloads(&msgs, "test/gw/events");
    assert!(
        ev.iter()
            .any(|e| e["event"] == "prepaid_reconciled" && e["cloud"] == 300),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| e["event"] == "prepaid_balance_empty"),
        "{ev:?}"
    );
    let cut = payloads(&msgs, "test/gw/audit")
        .into_iter()
        .find(|r| r["relay"] == "104-power" && r["to"] == "off")
        .unwrap();
    assert_eq!(
        (cut["rule"].clone(), cut["confirmed"].clone()),
        (json!("prepaid"), json!(true))
    );
    send(
        &sub,
        "top_up",
        &signed(
            "top_up",
            "t-1",
            json!({"room": "104", "utility": "electricity", "amount": 100_000}),
            chrono::Duration::minutes(5),
        ),
    )
    .await;
    until(&sub, "restore", |m| {
        payloads(m, "test/gw/audit")
            .iter()
            .any(|r| r["relay"] == "104-power" && r["to"] == "on")
    })
    .await;
    // The ledger explains the balance: the cloud's figure, each interval's deductions, the top-up;
    // every row's balance is the previous one's plus its amount.
    send(
        &sub,
        "get_ledger",
        &json!({"id": "g-1", "room": "104", "utility": "electricity", "from": (meterd::clock::Clock::system().now() - chrono::Duration::hours(1)).to_rfc3339(), "to": (meterd::clock::Clock::system().now() + chrono::Duration::hours(1)).to_rfc3339()}),
    )
    .await;
    let msgs = until(&sub, "ledger reply", |m| reply(m, "g-1").is_some()).await;
    let ledger = reply(&msgs, "g-1").unwrap();
    assert_eq!(ledger["ok"], true, "{ledger}");
    let rows = ledger["result"]["rows"].as_array().unwrap().clone();
    let kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"reconcile"), "{rows:#?}");
    assert_eq!(rows[0]["balance_after"], 300);
    assert!(
        kinds.contains(&"usage") && kinds.contains(&"top_up"),
        "{kinds:?}"
    );
    for w in rows.windows(2) {
        assert_eq!(
            w[0]["balance_after"].as_i64().unwrap() + w[1]["amount"].as_i64().unwrap(),
            w[1]["balance_after"].as_i64().unwrap(),
            "{rows:#?}"
        );
    }
    let usage = rows.iter().find(|r| r["kind"] == "usage").unwrap();
    assert!(
        usage["consumption"].as_i64().unwrap() > 0 && usage["amount"].as_i64().unwrap() < 0,
        "{usage}"
    );
    // The backend rebuilds the deductions from the site model's price alone: the counter runs on
    // from row to row (nothing unbilled), and what was deducted is the exact cost rounded down
    // within one fen (the fraction is carried, never lost or doubled).
    let model = msgs
        .iter()
        .rev()
        .find(|m| m.topic == "test/gw/config")
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap())
        .expect("the retained site model");
    let account = model["prepaid"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["room"] == "104")
        .unwrap();
    assert_eq!(account["tariff"], "elec");
    let micros = account["prices"][0]["price"]["base"]["micros"]
        .as_i64()
        .unwrap();
    let usage: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "usage").collect();
    for w in usage.windows(2) {
        assert_eq!(w[0]["end_counter"], w[1]["start_counter"], "{usage:#?}");
    }
    let consumed: i64 = usage
        .iter()
        .map(|r| r["consumption"].as_i64().unwrap())
        .sum();
    assert_eq!(
        consumed,
        usage.last().unwrap()["end_counter"].as_i64().unwrap()
            - usage[0]["start_counter"].as_i64().unwrap()
    );
    let exact = i128::from(consumed) * i128::from(micros); // fen × 10^7
    let deducted = -usage
        .iter()
        .map(|r| r["amount"].as_i64().unwrap())
        .sum::<i64>();
    let deducted = i128::from(deducted) * 10_000_000;
    assert!(
        deducted <= exact && exact - deducted < 10_000_000,
        "deducted {deducted}, exact {exact} (fen × 10^7)"
    );
    // In the lease quiet period top-ups are suspended, and say why.
    let soon = (meterd::clock::Clock::system().now() + chrono::Duration::days(2))
        .date_naive()
        .to_string();
    send(
        &sub,
        "set_lease",
        &signed(
            "set_lease",
            "l-1",
            json!({"room": "104", "lease_end": soon}),
            chrono::Duration::minutes(5),
        ),
    )
    .await;
    // The lease is applied (answered) before the top-up is sent.
    until(&sub, "the lease set", |m| reply(m, "l-1").is_some()).await;
    send(
        &sub,
        "top_up",
        &signed(
            "top_up",
            "t-2",
            json!({"room": "104", "utility": "electricity", "amount": 5000}),
            chrono::Duration::minutes(5),
        ),
    )
    .await;
    let msgs = until(&sub, "suspended top-up", |m| {
        payloads(m, "test/gw/audit")
            .iter()
            .any(|r| r["event"] == "command_rejected" && r["id"] == "t-2")
    })
    .await;
    let rej = payloads(&msgs, "test/gw/audit")
        .into_iter()
        .find(|r| r["id"] == "t-2")
        .unwrap();
    assert!(
        rej["error"].as_str().unwrap().contains("top-up suspended"),
        "{rej}"
    );
    send(
        &sub,
        "set_lease",
        &signed(
            "set_lease",
            "l-2",
            json!({"room": "104", "lease_end": soon, "renewed": true}),
            chrono::Duration::minutes(5),
        ),
    )
    .await;

    // Fire alarm: the frozen fail-open door is released.
    sim.set_input("lan", 10, 7, true);
    let msgs = until(&sub, "fire release", |m| {
        payloads(m, "test/gw/audit")
            .iter()
            .any(|r| r["relay"] == "101-door" && r["rule"] == "fire_alarm")
    })
    .await;
    assert!(payloads(&msgs, "test/gw/audit")
        .iter()
        .any(|r| r["event"] == "fire_alarm_on"));
    sim.set_input("lan", 10, 7, false);
    until(&sub, "fire over, door frozen again", |m| {
        let a = payloads(m, "test/gw/audit");
        a.iter().any(|r| r["event"] == "fire_alarm_off")
            && a.iter()
                .rev()
                .find(|r| r["relay"] == "101-door" && r["event"] == "relay_switched")
                .is_some_and(|r| r["to"] == "off")
    })
    .await;

    // A technician switches the door on in the cabinet: noticed and put back.
    sim.set_coil("lan", 10, 0, true);
    let msgs = until(&sub, "external change", |m| {
        payloads(m, "test/gw/audit")
            .iter()
            .any(|r| r["event"] == "relay_changed_externally")
    })
    .await;
    let ext = payloads(&msgs, "test/gw/audit")
        .into_iter()
        .find(|r| r["event"] == "relay_changed_externally")
        .unwrap();
    assert_eq!(
        (ext["relay"].clone(), ext["to"].clone()),
        (json!("101-door"), json!("on"))
    );
    wait_until("the door put back", Duration::from_secs(10), async || {
        if coil(&sim, &cfg, 10, 0).await {
            Err("door relay still on".into())
        } else {
            Ok(())
        }
    })
    .await;

    // The field engineer's override over the local socket beats the freeze, and `relay list` says why.
    let cfg_path = dir.path().join("meterd.toml");
    std::fs::write(&cfg_path, &text).unwrap();
    let bin = env!("CARGO_BIN_EXE_meterd");
    let o = std::process::Command::new(bin)
        .args([
            "relay",
            "101",
            "open",
            "--reason",
            "move-out inspection",
            "--for",
            "1h",
            "--config",
        ])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(coil(&sim, &cfg, 10, 0).await);
    let o = std::process::Command::new(bin)
        .args(["relay", "list", "--json", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let door = v["relays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["relay"] == "101-door")
        .unwrap()
        .clone();
    assert_eq!(
        (
            door["desired"].clone(),
            door["actual"].clone(),
            door["rule"].clone()
        ),
        (json!("on"), json!("on"), json!("override"))
    );
    assert!(door["reason"]
        .as_str()
        .unwrap()
        .contains("move-out inspection"));
    let o = std::process::Command::new(bin)
        .args(["relay", "101", "open", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--reason"),
        "a reason is required"
    );
    // The override's audit record reaches the broker shortly after the CLI's answer.
    until(&sub, "override audit record", |m| {
        payloads(m, "test/gw/audit").iter().any(|r| {
            r["relay"] == "101-door"
                && r["rule"] == "override"
                && r["reason"].as_str().unwrap().contains("cli:")
        })
    })
    .await;
    daemon.stop().await;

    // Restart: rules reload from SQLite, states are read first: nothing is written.
    let writes_door = sim.writes_seen("lan", 10);
    let writes_meter = sim.writes_seen("lan", 4);
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    // `relay list` is answered by the enforcer's main loop, after its start-up reads and first
    // decisions: once it answers with every relay's actual state, whatever the restart would have
    // written is written.
    wait_until(
        "the restarted enforcer answering",
        Duration::from_secs(15),
        async || {
            let o = std::process::Command::new(bin)
                .args(["relay", "list", "--json", "--config"])
                .arg(&cfg_path)
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
            let relays = v["relays"]
                .as_array()
                .ok_or_else(|| format!("no relays: {v}"))?;
            if relays.iter().all(|r| r["actual"].is_string()) {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await;
    assert_eq!(
        sim.writes_seen("lan", 10),
        writes_door,
        "restart toggled the door board"
    );
    assert_eq!(
        sim.writes_seen("lan", 4),
        writes_meter,
        "restart toggled the meter relay"
    );
    assert!(
        coil(&sim, &cfg, 10, 0).await,
        "the override survived the restart"
    );
    daemon.stop().await;

    // Every record of the day, as the cloud received it, matches its schema and carries its time.
    let all = sub.take();
    for (topic, schema) in [
        ("test/gw/audit", "audit.schema.json"),
        ("test/gw/events", "events.schema.json"),
        ("test/gw/telemetry", "telemetry.schema.json"),
    ] {
        let mut n = 0;
        for m in all.iter().filter(|m| m.topic == topic) {
            common::broker::validate(schema, &serde_json::from_slice(&m.payload).unwrap());
            n += 1;
        }
        assert!(n > 0, "no message on {topic}");
    }
    for m in all.iter().filter(|m| m.topic == "test/gw/reply") {
        common::broker::validate(
            "reply.schema.json",
            &serde_json::from_slice(&m.payload).unwrap(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_or_reload_during_a_fire_alarm_never_locks_a_frozen_rooms_fail_open_door() {
    let broker = Broker::start();
    let sim = common::start(BUILDING).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&sim, dir.path(), broker.port);
    let cfg = common::parse(&text);
    // Room 101's lease ended: its access is frozen (as a signed `freeze` would have left it).
    // The gateway ran before: the outbox and its tables exist.
    drop(
        meterd::store::Store::open(
            &cfg.store.path,
            cfg.store.caps,
            meterd::clock::Clock::system(),
        )
        .unwrap(),
    );
    let frozen = meterd::enforce::rules::RoomRules {
        access_freeze: Some(meterd::enforce::rules::Freeze {
            reason: "lease ended".into(),
            effective: meterd::clock::Clock::system().now() - chrono::Duration::days(1),
            by: "f-1".into(),
        }),
        ..Default::default()
    };
    rusqlite::Connection::open(&cfg.store.path)
        .unwrap()
        .execute(
            "INSERT INTO enforcement_rooms (room, rules) VALUES ('101', ?1)",
            [serde_json::to_string(&frozen).unwrap()],
        )
        .unwrap();
    // The fire alarm goes off; the running gateway releases the fail-open door.
    sim.set_input("lan", 10, 7, true);
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    wait_until(
        "the door released for the fire alarm",
        Duration::from_secs(15),
        async || {
            if coil(&sim, &cfg, 10, 0).await {
                Ok(())
            } else {
                Err("door relay off".into())
            }
        },
    )
    .await;
    daemon.stop().await;
    // A restart (watchdog, crash) and a reload (SIGHUP restarts the daemon in-process) while the
    // alarm is still on: not one write to the door board, the door stays open throughout.
    for what in ["restart", "reload"] {
        let writes = sim.writes_seen("lan", 10);
        let daemon = Daemon::start(
            &cfg,
            &meterd::clock::Clock::system(),
            Arc::new(NoCommands),
            None,
        )
        .unwrap();
        let end = meterd::clock::Clock::system().instant() + Duration::from_secs(3);
        while meterd::clock::Clock::system().instant() < end {
            assert!(
                coil(&sim, &cfg, 10, 0).await,
                "{what}: the door was locked during the fire alarm"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            sim.writes_seen("lan", 10),
            writes,
            "{what} wrote to the door board"
        );
        daemon.stop().await;
    }
}

/// The cloud's side of the contract: a backend ingesting through a shared subscription (two
/// consumers splitting the stream) rebuilds every relay action, with the time it happened, from the
/// topics alone, across a link outage with replay; and what it rebuilds equals the gateway's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_on_a_shared_subscription_rebuilds_every_relay_action_with_its_time_across_an_outage(
) {
    let mut broker = Broker::start();
    let group = "$share/ingest/test/gw/#";
    let ingest = [
        Subscriber::connect(broker.cloud_port, "ingest-1", group).await,
        Subscriber::connect(broker.cloud_port, "ingest-2", group).await,
    ];
    // Commands and the retained site model on ordinary subscriptions (retained messages are not
    // sent to shared subscriptions).
    let cloud = Subscriber::connect(broker.cloud_port, "cloud", "test/gw/config").await;
    let sim = common::start(BUILDING).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&sim, dir.path(), broker.port);
    let cfg = common::parse(&text);
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    let union = || -> Vec<Msg> { ingest.iter().flat_map(Subscriber::take).collect() };
    wait_until("the start-up audit", Duration::from_secs(20), async || {
        let a = payloads(&union(), "test/gw/audit");
        if a.iter()
            .any(|r| r["relay"] == "101-door" && r["event"] == "relay_switched")
        {
            Ok(())
        } else {
            Err(format!("{} audit records", a.len()))
        }
    })
    .await;

    // A freeze that takes effect 3 s from now, sent while the link is up; the link then fails, so
    // the door is switched (and audited) while the gateway cannot publish.
    let effective = meterd::clock::Clock::system().now() + chrono::Duration::seconds(3);
    let freeze = signed(
        "freeze",
        "f-late",
        json!({"room": "101", "scope": "access", "reason": "arrears", "effective_at": effective.to_rfc3339()}),
        chrono::Duration::minutes(5),
    );
    send(&cloud, "freeze", &freeze).await;
    wait_until("the freeze accepted", Duration::from_secs(10), async || {
        let msgs = union();
        match reply(&msgs, "f-late") {
            Some(r) if r["ok"] == true => Ok(()),
            Some(r) => Err(format!("refused: {r}")),
            None => Err("no reply yet".into()),
        }
    })
    .await;
    broker.stop();
    let down_at = meterd::clock::Clock::system().now();
    wait_until(
        "the door frozen at the relay",
        Duration::from_secs(15),
        async || {
            if coil(&sim, &cfg, 10, 0).await {
                Err("door still on".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    // The switch's audit record is in the outbox (to be replayed) before the link comes back.
    wait_until(
        "the freeze audited in the outbox",
        Duration::from_secs(10),
        async || {
            let rows = daemon.store.fetch(0, i64::MAX, 100_000).await.unwrap();
            let audited = rows.iter().filter(|r| r.topic == "audit").any(|r| {
                let v: Value = serde_json::from_slice(&r.payload).unwrap();
                v["relay"] == "101-door" && v["rule"] == "freeze" && v["event"] == "relay_switched"
            });
            if audited {
                Ok(())
            } else {
                Err(format!("{} records in the outbox", rows.len()))
            }
        },
    )
    .await;
    broker.restart();
    let up_at = meterd::clock::Clock::system().now();

    // The replay arrives; the backend's view of every relay is its last action by time.
    let msgs = ingest[0]
        .wait_for("the replayed freeze", Duration::from_secs(20), |_| {
            payloads(&union(), "test/gw/audit")
                .iter()
                .any(|r| r["relay"] == "101-door" && r["rule"] == "freeze")
        })
        .await;
    drop(msgs);
    let all = union();
    // Shared, not copied: each consumer got part of the stream, together all of it.
    let keys = |msgs: &[Msg]| -> std::collections::BTreeSet<(String, Vec<u8>)> {
        msgs.iter()
            .map(|m| (m.topic.clone(), m.payload.clone()))
            .collect()
    };
    let whole = keys(&all);
    for s in &ingest {
        let part = keys(&s.take());
        assert!(
            !part.is_empty() && part.len() < whole.len(),
            "a consumer got {} of {} messages: the group did not share the stream",
            part.len(),
            whole.len()
        );
    }
    let mut actions: Vec<Value> = payloads(&all, "test/gw/audit")
        .into_iter()
        .filter(|r| r["event"] == "relay_switched" || r["event"] == "relay_mismatch")
        .collect();
    for a in &actions {
        common::broker::validate(
            "audit.schema.json",
            &json!({"gateway": "gw", "seq_first": 1, "seq_last": 1, "records": [a]}),
        );
    }
    actions.sort_by_key(|a| a["ts"].as_str().unwrap().to_string());
    actions.dedup_by_key(|a| a["seq"].clone());
    let at = |a: &Value| {
        chrono::DateTime::parse_from_rfc3339(a["ts"].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let frozen = actions
        .iter()
        .find(|a| a["relay"] == "101-door" && a["rule"] == "freeze")
        .unwrap();
    assert_eq!(frozen["to"], "off");
    assert!(
        at(frozen) >= effective && at(frozen) >= down_at && at(frozen) < up_at,
        "the action's own time (during the outage), not when it was delivered: {frozen}"
    );
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for a in &actions {
        last.insert(
            a["relay"].as_str().unwrap().to_string(),
            a["readback"].as_str().unwrap().to_string(),
        );
    }
    // The gateway's own view.
    send(&cloud, "get_state", &json!({"id": "s-end"})).await;
    let state = wait_until("the gateway's state", Duration::from_secs(10), async || {
        reply(&union(), "s-end").ok_or_else(|| "no reply yet".to_string())
    })
    .await;
    let mut gateway: BTreeMap<String, String> = BTreeMap::new();
    for room in state["result"]["rooms"].as_object().unwrap().values() {
        for r in room["relays"].as_array().unwrap() {
            if let Some(actual) = r["actual"].as_str() {
                gateway.insert(r["relay"].as_str().unwrap().to_string(), actual.to_string());
            }
        }
    }
    for (relay, seen) in &last {
        assert_eq!(
            gateway.get(relay),
            Some(seen),
            "{relay}: the backend rebuilt {seen}, the gateway has {:?}",
            gateway.get(relay)
        );
    }
    // And the backend knows what each relay is from the retained site model.
    let model = cloud
        .wait_for("the site model", Duration::from_secs(5), |m| {
            m.iter().any(|m| m.topic == "test/gw/config")
        })
        .await;
    let model: Value = serde_json::from_slice(&model[0].payload).unwrap();
    for relay in last.keys() {
        assert!(
            model["relays"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == relay.as_str()),
            "{relay} is in the site model"
        );
    }
    daemon.stop().await;
}
