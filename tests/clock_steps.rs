//! The wall clock stepped under a polling daemon, as NTP or an operator steps a real one: the bus
//! keeps its cadence (its schedule runs on the monotonic clock), each step is an event, and no
//! reading enters the billing history twice or out of order.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, ConfigText};
use meterd::daemon::Daemon;
use meterd::uplink::NoCommands;

/// Two rooms at 1.2 kW and 0.45 kW, float32 counters (DDSU666) at 5,123 kWh and 88 kWh.
const BUILDING: &str = r#"
[[endpoint]]
name = "lan"
kind = "tcp"
[[unit]]
endpoint = "lan"
unit = 1
profile = "chint_ddsu666"
load_w = 1200
start_kwh = 5123.4
[[unit]]
endpoint = "lan"
unit = 2
profile = "chint_ddsu666"
load_w = 450
start_kwh = 88.13
"#;

/// Polled every 250 ms, history kept every second, and a time-of-use tariff, so a step of a day
/// skips two band changes (22:00 and 07:00) the billing meters are read at.
const SITE: &str = r#"
[poll]
interval = "250ms"
timeout = "1s"
[[device]]
name = "m1"
bus = "lan"
unit = 1
profile = "chint_ddsu666"
[[device]]
name = "m2"
bus = "lan"
unit = 2
profile = "chint_ddsu666"
[topology]
history_every = "1s"
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
bands = [{ name = "valley", from = "22:00", to = "07:00", price = "0.35" }]
"#;

fn polls(daemon: &Daemon) -> u64 {
    daemon
        .bus_status
        .iter()
        .flat_map(|b| b.snapshot())
        .map(|d| d.polls_ok)
        .sum()
}

/// Successful polls in a 2 s window: a measurement of the cadence, not a wait for the daemon.
async fn polls_in_2s(daemon: &Daemon) -> u64 {
    let before = polls(daemon);
    tokio::time::sleep(Duration::from_secs(2)).await;
    polls(daemon) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_clock_stepped_back_an_hour_and_forward_a_day_while_polling_bills_no_reading_twice_and_keeps_the_cadence(
) {
    let sim = common::start(BUILDING).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigText::gateway("gw", "Asia/Shanghai")
        .store(dir.path(), "")
        .buses_of(&sim, "")
        .with(SITE)
        .build();
    let clock = common::mid_month_clock();
    let daemon = Daemon::start(&cfg, &clock.clock(), Arc::new(NoCommands), None).unwrap();
    let history = || {
        let conn = meterd::store::open_read_only(&cfg.store.path).unwrap();
        let mut stmt = conn
            .prepare("SELECT device, ts_ms, value FROM history ORDER BY device, ts_ms")
            .unwrap();
        stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get(2)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect::<Vec<(String, i64, f64)>>()
    };
    wait_until(
        "billing history kept",
        Duration::from_secs(10),
        async || {
            let n = history().len();
            if n >= 6 {
                Ok(())
            } else {
                Err(format!("{n} samples"))
            }
        },
    )
    .await;
    let steady = polls_in_2s(&daemon).await;
    assert!(steady >= 10, "2 meters every 250 ms: {steady} polls in 2 s");

    // An operator sets the clock back an hour, then NTP puts it a day ahead.
    let back_at = clock.now();
    clock.step(chrono::Duration::hours(-1));
    let after_back = polls_in_2s(&daemon).await;
    let forward_at = clock.now();
    clock.step(chrono::Duration::days(1));
    let after_forward = polls_in_2s(&daemon).await;
    let end = clock.now();
    // The schedule is monotonic: neither a stall nor a storm of catch-up polls (a step over band
    // changes reads the billing meters once more, not once per change).
    for (what, n) in [("back", after_back), ("forward", after_forward)] {
        assert!(
            n * 10 >= steady * 7 && n * 10 <= steady * 13 + 40,
            "after the step {what}: {n} polls in 2 s, {steady} before"
        );
    }

    // Each step is an event with what the clock read before and after.
    let records = daemon.store.fetch(0, i64::MAX, 100_000).await.unwrap();
    let steps: Vec<f64> = records
        .iter()
        .filter(|r| r.topic == "events")
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap())
        .filter(|e| e["event"] == "clock_jump")
        .map(|e| e["by_s"].as_f64().unwrap())
        .collect();
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert!(
        (steps[0] + 3600.0).abs() < 5.0 && (steps[1] - 86_400.0).abs() < 5.0,
        "{steps:?}"
    );
    daemon.stop().await;

    // The billing history: per meter, in time order, the counter never goes down (a reading stamped
    // in the hour the clock repeated would sit before higher ones already kept, and be billed twice),
    // nothing was kept in the repeated hour, and sampling went on after the forward step.
    let samples = history();
    for device in ["m1", "m2"] {
        let series: Vec<(i64, f64)> = samples
            .iter()
            .filter(|s| s.0 == device)
            .map(|s| (s.1, s.2))
            .collect();
        assert!(
            series.windows(2).all(|w| w[0].1 <= w[1].1),
            "{device}: a counter going down in time order: {series:?}"
        );
        // While it was set back, the clock read from an hour before `back_at` to `forward_at`.
        let repeated = (back_at - chrono::Duration::hours(1)).timestamp_millis()
            ..=forward_at.timestamp_millis();
        let kept_in_repeated: Vec<_> = series.iter().filter(|s| repeated.contains(&s.0)).collect();
        assert!(
            kept_in_repeated.is_empty(),
            "{device}: kept in the repeated hour: {kept_in_repeated:?}"
        );
        let after = (forward_at + chrono::Duration::days(1)).timestamp_millis();
        assert!(
            series
                .iter()
                .any(|s| s.0 >= after && s.0 <= end.timestamp_millis()),
            "{device}: sampled after the forward step"
        );
    }
}
