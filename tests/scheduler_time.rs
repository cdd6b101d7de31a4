//! The bus task's timing over simulated hours, on tokio's paused clock: polls stay on their deadline
//! grid (no drift) and late polls skip deadlines instead of bunching.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ConfigText;
use meterd::config::{Config, Device};
use meterd::modbus::bus::{self, PollResult, Poller};
use tokio::sync::mpsc;
use tokio::time::Instant;

type Log = Arc<Mutex<Vec<(String, Instant)>>>;

/// Stands in for the wire: each poll takes a scripted time on the paused clock.
struct ClockPoller {
    log: Log,
    cost: fn(&str, usize) -> Duration,
    count: usize,
}

impl Poller for ClockPoller {
    fn poll<'a>(
        &'a mut self,
        device: &'a Device,
    ) -> Pin<Box<dyn Future<Output = PollResult> + Send + 'a>> {
        Box::pin(async move {
            self.log.lock().unwrap().push((
                device.name.to_string(),
                meterd::clock::Clock::system().instant(),
            ));
            let cost = (self.cost)(&device.name, self.count);
            self.count += 1;
            tokio::time::sleep(cost).await;
            PollResult {
                readings: Vec::new(),
                exceptions: Vec::new(),
                failure: None,
                latency: cost,
            }
        })
    }
}

fn config(devices: &[(&str, &str)]) -> Config {
    let mut c = ConfigText::gateway("t", "UTC")
        .with("[[bus]]\nname = \"b\"\nkind = \"tcp\"\nhost = \"127.0.0.1\"");
    for (i, (name, interval)) in devices.iter().enumerate() {
        c = c.with(&format!("[[device]]\nname = \"{name}\"\nbus = \"b\"\nunit = {}\nprofile = \"eastron_sdm120\"\ninterval = \"{interval}\"", i + 1));
    }
    c.build()
}

async fn run(
    config: &Config,
    cost: fn(&str, usize) -> Duration,
    for_how_long: Duration,
) -> (Vec<(String, Instant)>, Instant, Vec<bus::DeviceStatus>) {
    let log: Log = Arc::default();
    let poller = ClockPoller {
        log: log.clone(),
        cost,
        count: 0,
    };
    let (tx, mut rx) = mpsc::channel(16);
    let status = bus::new_status(&config.buses[0], &config.devices);
    let start = meterd::clock::Clock::system().instant();
    // No relay actions in these tests; the sender stays alive so the channel stays open.
    let (_actions, act_rx) = mpsc::channel(1);
    let task = tokio::spawn(bus::run_with(
        config.devices.clone(),
        vec![poller],
        tx,
        status.clone(),
        act_rx,
        meterd::clock::Clock::system(),
    ));
    let end = start + for_how_long;
    while let Ok(Some(_)) = tokio::time::timeout_at(end, rx.recv()).await {}
    task.abort();
    let entries = log.lock().unwrap().clone();
    (entries, start, status.snapshot())
}

#[tokio::test(start_paused = true)]
async fn six_simulated_hours_of_polls_stay_on_their_deadline_grid() {
    let c = config(&[("a", "10s"), ("b", "15s"), ("c", "60s")]);
    let cost = Duration::from_millis(37);
    let (log, start, status) = run(
        &c,
        |_, _| Duration::from_millis(37),
        Duration::from_secs(6 * 3600),
    )
    .await;
    let n = c.devices.len() as u32;
    for (i, d) in c.devices.iter().enumerate() {
        let interval = d.policy.interval;
        let anchor = interval * i as u32 / n;
        let polls: Vec<Instant> = log
            .iter()
            .filter(|(name, _)| name == &*d.name)
            .map(|(_, t)| *t)
            .collect();
        // Deadlines strictly before the end of the run: anchor + k × interval < 6 h.
        let span = Duration::from_secs(6 * 3600).checked_sub(anchor).unwrap();
        let expected = span.as_nanos().div_ceil(interval.as_nanos()) as u64;
        assert_eq!(polls.len() as u64, expected, "{}", d.name);
        for (k, t) in polls.iter().enumerate() {
            let due = start + anchor + interval * k as u32;
            // A poll may wait for the other devices' polls on the single line, never longer; and the
            // error does not grow with k (no drift).
            assert!(
                *t >= due && *t - due <= cost * 2,
                "{} poll {k}: {:?} late",
                d.name,
                *t - due
            );
        }
        for w in polls.windows(2) {
            assert!(
                w[1] - w[0] >= interval.checked_sub(cost * 2).unwrap(),
                "{} bunched: {:?}",
                d.name,
                w[1] - w[0]
            );
        }
    }
    assert!(status.iter().all(|s| s.missed_deadlines == 0));
    // The 10,000th-poll check: the 2,000th poll of the 10 s device is due at exactly 20,000 s.
    let a: Vec<Instant> = log
        .iter()
        .filter(|(name, _)| name == "a")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(a[2000] - start, Duration::from_secs(20_000));
}

#[tokio::test(start_paused = true)]
async fn slow_polls_skip_and_count_missed_deadlines_instead_of_bursting() {
    let c = config(&[("slow", "1s")]);
    // Every third poll hangs for 3.5 s (a meter answering at the edge of its timeout).
    let (log, start, status) = run(
        &c,
        |_, k| {
            if k % 3 == 2 {
                Duration::from_millis(3500)
            } else {
                Duration::from_millis(20)
            }
        },
        Duration::from_secs(600),
    )
    .await;
    for w in log.windows(2) {
        let gap = w[1].1 - w[0].1;
        assert!(gap >= Duration::from_secs(1), "burst: polls {gap:?} apart");
        assert_eq!(
            (w[1].1 - start).subsec_millis(),
            0,
            "polls stay on the 1 s grid"
        );
    }
    // Each slow poll covers deadlines t+1, t+2, t+3 → 3 missed per slow poll.
    let slow_polls = log.len() / 3;
    let missed = status[0].missed_deadlines as usize;
    assert!(
        (3 * slow_polls..=3 * slow_polls + 3).contains(&missed),
        "missed {missed} for {slow_polls} slow polls"
    );
}
