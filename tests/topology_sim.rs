//! Topology and apportionment end to end: the simulator's meters are wired physically (a floor meter
//! measures what its rooms draw), the daemon records the counter history, and the accounting finds
//! the meter configured under the wrong parent.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::ConfigText;
use meterd::config::Config;
use meterd::daemon::Daemon;
use meterd::uplink::NoCommands;

const BUILDING: &str = r#"
[[endpoint]]
name = "lan"
kind = "tcp"

# main = floor1 + floor2 + 2 kW of losses (cables, transformer)
[[unit]]
endpoint = "lan"
unit = 1
profile = "chint_ddsu666"
sum_of = ["lan:2", "lan:3"]
load_w = 2000.0
start_kwh = 100.0

# floor1 feeds room A only; floor2 feeds rooms B and C
[[unit]]
endpoint = "lan"
unit = 2
profile = "chint_ddsu666"
sum_of = ["lan:4"]
start_kwh = 100.0

[[unit]]
endpoint = "lan"
unit = 3
profile = "chint_ddsu666"
sum_of = ["lan:5", "lan:6"]
start_kwh = 100.0

[[unit]]
endpoint = "lan"
unit = 4
profile = "chint_ddsu666"
load_w = 20000.0
start_kwh = 100.0

[[unit]]
endpoint = "lan"
unit = 5
profile = "chint_ddsu666"
load_w = 15000.0
start_kwh = 100.0

[[unit]]
endpoint = "lan"
unit = 6
profile = "chint_ddsu666"
load_w = 25000.0
start_kwh = 100.0
"#;

/// The topology as configured: meter mB is listed under floor1, but it is wired to floor2.
const TOPOLOGY: &str = r#"
[poll]
interval = "300ms"

[topology]
history_every = "1s"
balance_every = "4s"
loss_threshold_pct = 5.0

[[device]]
name = "main"
bus = "lan"
unit = 1
profile = "chint_ddsu666"
[[device]]
name = "floor1"
bus = "lan"
unit = 2
profile = "chint_ddsu666"
[[device]]
name = "floor2"
bus = "lan"
unit = 3
profile = "chint_ddsu666"
[[device]]
name = "mA"
bus = "lan"
unit = 4
profile = "chint_ddsu666"
[[device]]
name = "mB"
bus = "lan"
unit = 5
profile = "chint_ddsu666"
[[device]]
name = "mC"
bus = "lan"
unit = 6
profile = "chint_ddsu666"

[[room]]
id = "A"
area_m2 = 50
[[room]]
id = "B"
area_m2 = 30
[[room]]
id = "C"
area_m2 = 20

[[tariff]]
name = "elec"
utility = "electricity"
price = "0.85"

[[meter]]
name = "main"
utility = "electricity"
[[meter]]
name = "floor1"
utility = "electricity"
parent = "main"
[[meter]]
name = "floor2"
utility = "electricity"
parent = "main"
[[meter]]
name = "mA"
utility = "electricity"
parent = "floor1"
room = "A"
[[meter]]
name = "mB"
utility = "electricity"
parent = "floor1"
room = "B"
[[meter]]
name = "mC"
utility = "electricity"
parent = "floor2"
room = "C"

[[pool]]
name = "losses"
utility = "electricity"
rooms = ["*"]
method = { area = 0.5, consumption = 0.5 }
include_loss_of = ["main"]
tariff = "elec"
"#;

fn config(sim: &meterd::sim::RunningSim, dir: &Path) -> (Config, String) {
    let c = ConfigText::gateway("gw", "Asia/Shanghai")
        .store(dir, "")
        .with(TOPOLOGY)
        .buses_of(sim, "max_concurrent = 2\n");
    (c.build(), c.text().to_string())
}

/// The oldest of the counters' newest history samples: the latest instant every counter has a
/// sample at or after.
fn newest_of_every_counter(store: &Path) -> Option<i64> {
    meterd::store::open_read_only(store).ok().and_then(|c| {
        c.query_row(
            "SELECT min(newest) FROM (SELECT max(ts_ms) AS newest FROM history GROUP BY device)",
            [],
            |r| r.get(0),
        )
        .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miswired_meter_in_the_simulator_is_detected_and_named() {
    let sim = common::start(BUILDING).await;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, text) = config(&sim, dir.path());
    let started = meterd::clock::Clock::system().now();
    let daemon = Daemon::start(
        &cfg,
        &meterd::clock::Clock::system(),
        Arc::new(NoCommands),
        None,
    )
    .unwrap();
    // The daemon's own balance check raises an event naming the suspect.
    let alarms = common::wait_until(
        "a balance alarm for floor1 and 12 s of history",
        Duration::from_secs(20),
        async || {
            let records = daemon.store.fetch(0, i64::MAX, 100_000).await.unwrap();
            let alarms: Vec<serde_json::Value> = records
                .iter()
                .filter(|r| r.topic == "events")
                .map(|r| serde_json::from_slice(&r.payload).unwrap())
                .filter(|v: &serde_json::Value| v["event"] == "balance_alarm")
                .collect();
            // And 12 s of history behind the whole-run balance below (a 9 s window: a shorter one
            // measured the main loss at 1.69 % instead of 3.2 % once in CI), enough to say where the
            // miswired meter belongs.
            let enough = newest_of_every_counter(&cfg.store.path)
                .is_some_and(|t| t >= (started + chrono::Duration::seconds(12)).timestamp_millis());
            if enough && alarms.iter().any(|a| a["node"] == "floor1") {
                Ok(alarms)
            } else {
                Err(format!("alarms so far: {alarms:?}"))
            }
        },
    )
    .await;
    let floor1 = alarms
        .iter()
        .find(|a| a["node"] == "floor1")
        .unwrap_or_else(|| panic!("no alarm for floor1 in {alarms:?}"));
    assert_eq!(floor1["suspect"], "mB");
    assert_eq!(floor1["belongs_under"], "floor2");
    assert!(floor1["loss_pct"].as_f64().unwrap() < -50.0, "{floor1}");
    // The record as the outbox holds it (the uplink adds only its seq) matches the schema.
    let mut published = floor1.clone();
    published["seq"] = serde_json::json!(1);
    assert!(
        floor1["ts"].is_string(),
        "the event carries its time: {floor1}"
    );
    common::broker::validate(
        "events.schema.json",
        &serde_json::json!({"gateway": "gw", "seq_first": 1, "seq_last": 1, "records": [published]}),
    );

    // The same from the history, over the whole run: main balances within 1 %, floor1/floor2 do not.
    let conn = meterd::store::open_read_only(&cfg.store.path).unwrap();
    let from = started + chrono::Duration::seconds(2);
    // Up to the newest instant every counter has a sample at or after (a balance needs one on each
    // side of its bounds). `now - 1 s` was not: a loaded CI machine once left main's newest sample
    // older than that, and the balance had no node "main".
    let to = chrono::DateTime::from_timestamp_millis(
        newest_of_every_counter(&cfg.store.path).expect("history was waited for"),
    )
    .unwrap();
    let b = meterd::accounting::balances(&conn, &cfg, from, to).unwrap();
    let main = b.iter().find(|x| x.node == "main").unwrap();
    assert!(
        main.loss_pct > 2.0 && main.loss_pct < 4.5,
        "main loss {:.2} % (2 kW of 62 kW = 3.2 %)",
        main.loss_pct
    );
    let f1 = b.iter().find(|x| x.node == "floor1").unwrap();
    assert_eq!(
        f1.suspect
            .as_ref()
            .map(|s| (s.meter.as_str(), s.belongs_under.as_deref())),
        Some(("mB", Some("floor2")))
    );

    // Apportioning the window shares main's loss by 50 % area + 50 % consumption, exactly.
    let cons = meterd::accounting::consumption(&conn, &cfg, from, to).unwrap();
    let r = meterd::apportion::apportion(&cfg.site, &cons, "window");
    assert_eq!(
        r[0].rooms.iter().map(|x| x.share_milli).sum::<i64>(),
        r[0].common_milli
    );
    assert!(r[0].common_milli > 0);
    assert_eq!(
        r[0].rooms
            .iter()
            .map(|x| x.share_amount.unwrap())
            .sum::<i64>(),
        r[0].amount.unwrap()
    );
    daemon.stop().await;

    // The CLI draws the tree from the same history and names the suspect; --dot and --json work.
    let cfg_path = dir.path().join("meterd.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let bin = env!("CARGO_BIN_EXE_meterd");
    let o = std::process::Command::new(bin)
        .args(["topology", "--window", "6s", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        tree.contains("├─ floor1")
            && tree.contains("suspect mB (balances under floor2)")
            && tree.contains("→ room C"),
        "{tree}"
    );
    let o = std::process::Command::new(bin)
        .args(["topology", "--dot", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let dot = String::from_utf8_lossy(&o.stdout);
    assert!(
        dot.starts_with("digraph meterd {") && dot.contains("\"floor2\" -> \"mC\""),
        "{dot}"
    );
    let o = std::process::Command::new(bin)
        .args(["topology", "--json", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 6);
}

#[test]
fn apportion_command_prints_the_table_and_explains_a_room() {
    // A month of history written as the daemon would: main and three room meters.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let mut store = meterd::store::Store::open(
        &db,
        meterd::store::Caps::default(),
        meterd::clock::Clock::system(),
    )
    .unwrap();
    let (from, to) =
        meterd::accounting::period_bounds("2026-10", chrono_tz::Asia::Shanghai).unwrap();
    let sample = |d: &str, t: chrono::DateTime<chrono::Utc>, v: f64| meterd::store::Sample {
        device: d.into(),
        quantity: "energy_kwh".into(),
        ts_ms: t.timestamp_millis(),
        value: v,
    };
    let h = chrono::Duration::minutes(10);
    let mut samples = Vec::new();
    for (d, a, b) in [
        ("main", 1000.0, 2000.0),
        ("floor1", 100.0, 500.0),
        ("floor2", 100.0, 590.0),
        ("mA", 0.0, 400.0),
        ("mB", 0.0, 250.0),
        ("mC", 0.0, 340.0),
    ] {
        samples.push(sample(d, from - h, a));
        samples.push(sample(d, from + h, a));
        samples.push(sample(d, to - h, b));
        samples.push(sample(d, to + h, b));
    }
    store.record_history(&samples).unwrap();
    drop(store);
    let text = format!(
        "[gateway]\nid = \"gw\"\nsite = \"t\"\ntimezone = \"Asia/Shanghai\"\n[store]\npath = \"{}\"\n{TOPOLOGY}\n[[bus]]\nname = \"lan\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"\n",
        db.display()
    );
    let cfg_path = dir.path().join("meterd.toml");
    std::fs::write(&cfg_path, text).unwrap();
    let bin = env!("CARGO_BIN_EXE_meterd");
    let o = std::process::Command::new(bin)
        .args(["apportion", "--period", "2026-10", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // main 1000 kWh, floors 400 + 490 = 890 → loss 110 kWh = 93.50 CNY, shared 50 % area (.5/.3/.2)
    // + 50 % consumption (400/250/340 of 990).
    assert!(out.contains("common 110.000 kWh, cost 93.50 CNY"), "{out}");
    let v: serde_json::Value = {
        let o = std::process::Command::new(bin)
            .args(["apportion", "--period", "2026-10", "--json", "--config"])
            .arg(&cfg_path)
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let rooms = v[0]["rooms"].as_array().unwrap();
    let shares: Vec<i64> = rooms
        .iter()
        .map(|r| r["share_milli"].as_i64().unwrap())
        .collect();
    let amounts: Vec<i64> = rooms
        .iter()
        .map(|r| r["share_amount"].as_i64().unwrap())
        .collect();
    assert_eq!(shares.iter().sum::<i64>(), 110_000);
    assert_eq!(amounts.iter().sum::<i64>(), 9350);
    // A: .5×.5 + .5×400/990 = 0.452020… → 49722.2 Wh; B: .15 + 0.126263 = 0.276263 → 30388.9; C: .1 + 0.171717 → 29888.9
    assert_eq!(shares, vec![49_722, 30_389, 29_889]);
    let o = std::process::Command::new(bin)
        .args([
            "apportion",
            "--period",
            "2026-10",
            "--explain",
            "B",
            "--config",
        ])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let ex = String::from_utf8_lossy(&o.stdout);
    assert!(
        ex.contains("loss of main")
            && ex.contains("coefficient = 0.276263")
            && ex.contains("30.389 kWh"),
        "{ex}"
    );
    // The schema of the published result.
    let mut rec = v[0].clone();
    rec["version"] = serde_json::json!(1);
    rec["seq"] = serde_json::json!(5);
    // A published record also carries its time, the config hash and the segment it covers.
    rec["ts"] = serde_json::json!("2026-11-01T00:05:00+00:00");
    rec["config_hash"] = serde_json::json!("0123abcd");
    rec["from"] = serde_json::json!(from.to_rfc3339());
    rec["to"] = serde_json::json!(to.to_rfc3339());
    common::broker::validate(
        "results.schema.json",
        &serde_json::json!({"gateway": "gw", "seq_first": 5, "seq_last": 5, "records": [rec]}),
    );
}
