//! Wiring: one function that starts the tasks and reads like the architecture diagram.
//!
//! ```text
//! bus tasks ──Batch──▶ recorder ──NewRecord──▶ store thread (SQLite outbox) ──▶ uplink (MQTT)
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::Config;
use crate::modbus::bus::{self, Batch, BusStatus};
use crate::modbus::profile::Quantity;
use crate::reading::Quality;
use crate::reading::Reading;
use crate::store::{self, Kind, NewRecord, Sample, Store, StoreError, StoreHandle};
use crate::uplink::{Chain, CommandHandler, Identity, Uplink, UplinkStatus};

/// Capacity of the readings channel, in poll batches. Large enough to absorb a slow consumer for a
/// few seconds; past that the bus tasks wait (backpressure) rather than drop readings.
pub(crate) const READINGS_CAPACITY: usize = 4096;

/// The running polling engine.
pub struct Engine {
    /// Every poll's readings, in completion order.
    pub readings: mpsc::Receiver<Batch>,
    /// Live counters per bus.
    pub status: Vec<Arc<BusStatus>>,
    /// Where to send relay actions, by device name (to the bus task that owns the device).
    pub actuators: std::collections::HashMap<String, mpsc::Sender<bus::Actuation>>,
    /// One sender per bus task, for liveness probes.
    pub buses: Vec<mpsc::Sender<bus::Actuation>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts one task per bus that has devices, and the task that has every bus read its billing
    /// meters at each billing boundary of `clock`.
    #[must_use]
    pub fn start(config: &Config, clock: &Clock) -> Engine {
        let (tx, rx) = mpsc::channel(READINGS_CAPACITY);
        let mut status = Vec::new();
        let mut tasks = Vec::new();
        let (boundary_tx, boundary_rx) = watch::channel(0u64);
        tasks.push(tokio::spawn(boundary_clock(
            calendar(config),
            boundary_tx,
            clock.clone(),
        )));
        let mut actuators = std::collections::HashMap::new();
        let mut buses = Vec::new();
        for (i, b) in config.buses.iter().enumerate() {
            let devices: Vec<_> = config
                .devices
                .iter()
                .filter(|d| d.bus == i)
                .cloned()
                .collect();
            let s = bus::new_status(b, &devices);
            status.push(s.clone());
            let (act_tx, act_rx) = mpsc::channel(64);
            for d in &devices {
                actuators.insert(d.name.to_string(), act_tx.clone());
            }
            if !devices.is_empty() {
                buses.push(act_tx.clone());
            }
            tasks.push(tokio::spawn(bus::run(
                b.clone(),
                devices,
                tx.clone(),
                s,
                act_rx,
                Some(boundary_rx.clone()),
                clock.clone(),
            )));
        }
        Engine {
            readings: rx,
            status,
            actuators,
            buses,
            tasks,
        }
    }

    /// Stops every bus task.
    pub fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Signals every billing boundary of `calendar` (wall clock). Re-reads the clock at least once a
/// minute, so a clock set by NTP after boot moves the next boundary with it.
async fn boundary_clock(calendar: crate::bill::Calendar, tx: watch::Sender<u64>, clock: Clock) {
    let mut next = calendar.next_after(clock.now());
    loop {
        clock.nap_until(next, Duration::from_secs(60)).await;
        let now = clock.now();
        if now >= next {
            tracing::debug!(boundary = %next, "billing boundary: reading the billing meters");
            tx.send_modify(|n| *n += 1);
            next = calendar.next_after(now);
        } else {
            // A clock set backwards makes an earlier boundary the next one.
            next = next.min(calendar.next_after(now));
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create the outbox directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
}

/// Why the watchdog is not pinged: the task that did not answer its probe.
#[derive(Debug, Error)]
pub(crate) enum Unhealthy {
    #[error("bus task {0} is not taking requests")]
    BusBusy(usize),
    #[error("bus task {bus} did not answer within {within:?}")]
    BusSlow { bus: usize, within: Duration },
    #[error("bus task {0} stopped")]
    BusStopped(usize),
    #[error("store thread did not answer within {0:?}")]
    StoreSlow(Duration),
}

/// The `clock_jump` event: when the wall clock was stepped, from what to what.
pub(crate) fn clock_jump_record(j: &crate::clock::ClockJump) -> NewRecord {
    let mut v = serde_json::to_value(j).unwrap_or_default();
    v["event"] = serde_json::json!("clock_jump");
    v["ts"] = serde_json::json!(j.to.to_rfc3339());
    NewRecord {
        kind: Kind::Event,
        topic: "events".into(),
        ts: j.to,
        payload: v.to_string().into_bytes(),
    }
}

/// Keeps billing-counter samples for the history: one per device and quantity per `every`, and at
/// every billing boundary (month start, band change) the last reading before it and the first at or
/// after it, with their exact times, so bills rest on real readings around each boundary.
pub struct HistorySampler {
    every_ms: i64,
    boundaries: crate::bill::BoundaryWatch,
    /// Per counter: the time of the last kept sample, and the last reading seen (kept or not) as
    /// its time and value.
    last: std::collections::HashMap<(Arc<str>, Quantity), (i64, Option<Seen>)>,
}

impl HistorySampler {
    /// A sampler keeping one sample per `every` and the readings around `calendar`'s boundaries.
    #[must_use]
    pub fn new(every: Duration, calendar: crate::bill::Calendar) -> HistorySampler {
        HistorySampler {
            every_ms: every.as_millis() as i64,
            boundaries: crate::bill::BoundaryWatch::new(calendar),
            last: std::collections::HashMap::default(),
        }
    }

    /// The samples of `batch` that are due.
    pub fn take(&mut self, batch: &[Reading]) -> Vec<Sample> {
        let mut out = Vec::new();
        for r in batch {
            if r.quality != Quality::Good
                || !matches!(r.quantity, Quantity::EnergyKwh | Quantity::WaterM3)
            {
                continue;
            }
            let (Some(value), ts) = (r.value, r.ts.timestamp_millis()) else {
                continue;
            };
            let sample = || Sample {
                device: r.device.to_string(),
                quantity: r.quantity.as_str().to_string(),
                ts_ms: ts,
                value,
            };
            let prev_ts = self
                .last
                .get(&(r.device.clone(), r.quantity))
                .and_then(|(_, p)| p.as_ref().map(|p| p.0));
            let crossed = match prev_ts.and_then(chrono::DateTime::from_timestamp_millis) {
                Some(a) => self.boundaries.crossed(a, r.ts),
                None => false,
            };
            let (kept, prev) = self
                .last
                .entry((r.device.clone(), r.quantity))
                .or_insert((i64::MIN, None));
            // Samples are kept in time order only: after the clock was set back, a reading stamped
            // at or before the last kept sample would be billed a second time.
            if crossed {
                if let Some((p_ts, p_value)) = prev.take().filter(|p| p.0 > *kept) {
                    *kept = p_ts;
                    out.push(Sample {
                        ts_ms: p_ts,
                        value: p_value,
                        ..sample()
                    });
                }
            }
            if ts > *kept && (crossed || *kept == i64::MIN || ts - *kept >= self.every_ms) {
                *kept = ts;
                out.push(sample());
            }
            *prev = Some((ts, value));
        }
        out
    }
}

/// A counter reading's time (ms) and value.
type Seen = (i64, f64);

/// The site's billing calendar: month starts and the band changes of every tariff version (prepaid
/// deducts at the rooms' tariffs).
pub fn calendar(config: &Config) -> crate::bill::Calendar {
    let site = &config.site;
    crate::bill::Calendar::new(
        config.gateway.timezone,
        site.tariffs
            .values()
            .chain(site.tariff_changes.iter().map(|c| &c.tariff))
            .map(crate::topology::Tariff::tou),
    )
}

/// The enforcer's setup with the tariffs the cloud set at an earlier run, so prepaid deducts at
/// them from the first reading on.
fn enforcer_setup(config: &Config) -> crate::enforce::config::Setup {
    let mut setup = config.enforcer_setup();
    if let Ok(conn) = store::open_read_only(&config.store.path) {
        let mut site = setup.site.clone();
        if crate::accounting::apply_tariff_overrides(&conn, &mut site, config.gateway.timezone)
            .is_ok_and(|l| !l.is_empty())
        {
            setup.reprice(site);
        }
    }
    setup
}

/// A tariff the cloud set reaches prepaid deduction too (one pricing path): every site the
/// accounting task sends goes to the enforcer, until either side stops.
async fn forward_prices(
    mut prices: watch::Receiver<Arc<crate::topology::Site>>,
    enforcer: mpsc::Sender<crate::enforce::task::Input>,
) {
    while prices.changed().await.is_ok() {
        let site = prices.borrow_and_update().clone();
        if enforcer
            .send(crate::enforce::task::Input::Prices(site))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The whole daemon: engine → recorder → store → uplink, and the accounting task.
pub struct Daemon {
    pub bus_status: Vec<Arc<BusStatus>>,
    pub store: StoreHandle,
    pub uplink: Arc<Mutex<UplinkStatus>>,
    engine: Engine,
    recorder: JoinHandle<u64>,
    accounting: JoinHandle<()>,
    /// Enforcement and its control socket.
    tasks: Vec<JoinHandle<()>>,
    uplink_task: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

impl Daemon {
    /// Opens the outbox and starts every task. The engine starts only after the store is open, so no
    /// reading is taken that could not be kept.
    ///
    /// `tap`, if given, receives a copy of every batch (best effort: a slow tap misses batches, the
    /// outbox never does); `meterd demo` draws its live table from it.
    pub fn start(
        config: &Config,
        clock: &Clock,
        commands: Arc<dyn CommandHandler>,
        tap: Option<mpsc::Sender<Batch>>,
    ) -> Result<Daemon, DaemonError> {
        // rustls needs one process-wide crypto provider; ring cross-compiles cleanly for ARM.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let model = Arc::new(config.site_model_bytes());
        if let Some(dir) = config.store.path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|source| DaemonError::StateDir {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
        }
        let store = store::spawn(Store::open(
            &config.store.path,
            config.store.caps,
            clock.clone(),
        )?)?;
        let mut engine = Engine::start(config, clock);
        let bus_status = engine.status.clone();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(config.clone());
        let mut tasks = Vec::new();

        // Enforcement: rules loaded and relays read before anything is switched (see enforce::task).
        let mut handlers: Vec<Arc<dyn CommandHandler>> = Vec::new();
        // Ids of signed commands already used (relay commands and recomputations share them).
        let seen = Arc::new(Mutex::new(crate::enforce::task::load_seen(
            &config.store.path,
        )?));
        let enforcement = if config.enforcement.is_empty() {
            None
        } else {
            let (enf_tx, enf_rx) = mpsc::channel(256);
            let setup = Arc::new(enforcer_setup(config));
            let enforcer = crate::enforce::task::Enforcer::open(
                setup.clone(),
                engine.actuators.clone(),
                store.clone(),
                clock.clone(),
            )?;
            tasks.push(tokio::spawn(enforcer.run(enf_rx, shutdown_rx.clone())));
            handlers.push(Arc::new(crate::enforce::task::EnforcementCommands {
                key: config.enforcement.public_key,
                config: setup,
                seen: seen.clone(),
                tx: enf_tx.clone(),
                clock: clock.clone(),
            }));
            handlers.push(Arc::new(crate::enforce::ledger::LedgerQuery {
                path: config.store.path.clone(),
                timezone: config.gateway.timezone,
            }));
            Some(enf_tx)
        };
        let enforcement_tx = enforcement.clone();

        let (_, dummy) = mpsc::channel(1);
        let mut readings = std::mem::replace(&mut engine.readings, dummy);
        let recorder_store = store.clone();
        // The newest reading of every register, for the web view (only kept while it is on).
        let live = config
            .web
            .enabled()
            .then(|| Arc::new(Mutex::new(crate::web::Live::new())));
        let recorder_live = live.clone();
        let mut sampler = HistorySampler::new(config.topology.history_every, calendar(config));
        let mut reporter = crate::report::Reporter::new(config.report.clone(), calendar(config));
        let recorder_clock = clock.clone();
        let recorder = tokio::spawn(async move {
            let clock = recorder_clock;
            let mut n = 0u64;
            let mut watch = crate::clock::ClockWatch::default();
            let mono = clock.instant();
            // The first look: a gateway that boots with a wrong clock says so at once.
            let first = watch.observe(clock.now(), 0);
            if !first.plausible {
                tracing::warn!(now = %clock.now(), "the wall clock is not plausible (no RTC, NTP not synced?): readings are marked clock_unsynced until it is set");
            }
            while let Some(batch) = readings.recv().await {
                n += batch.len() as u64;
                if let Some(j) = watch
                    .observe(clock.now(), clock.since(mono).as_millis() as i64)
                    .jump
                {
                    tracing::warn!(from = %j.from, to = %j.to, by_s = j.by_s, "the wall clock was stepped");
                    let _ = recorder_store.append(vec![clock_jump_record(&j)]).await;
                }
                if let Some(tap) = &tap {
                    let _ = tap.try_send(batch.clone());
                }
                if let Some(live) = &recorder_live {
                    crate::web::note(live, &batch);
                }
                if let Some(enf) = &enforcement {
                    // Prepaid deduction and the fire alarm; never blocks storing the readings.
                    let _ = enf.try_send(crate::enforce::task::Input::Readings(batch.clone()));
                }
                // Billing history rests on real times only.
                let mut samples = sampler.take(&batch);
                samples.retain(|s| s.ts_ms >= crate::clock::PLAUSIBLE_FROM_MS);
                if !samples.is_empty() {
                    recorder_store.record_history(samples).await;
                }
                // What of the poll goes to the cloud (the report policy); everything above saw it all.
                if let Some(record) = reporter.poll(&batch) {
                    if recorder_store.append(vec![record]).await.is_err() {
                        break;
                    }
                }
            }
            n
        });
        let (acct_tx, acct_rx) = mpsc::channel(4);
        let (model_tx, model_rx) = watch::channel(model);
        let (prices_tx, mut prices_rx) = watch::channel(Arc::new(config.site.clone()));
        prices_rx.mark_unchanged();
        if let Some(enf) = enforcement_tx.clone() {
            tasks.push(tokio::spawn(forward_prices(prices_rx, enf)));
        }
        let accounting = tokio::spawn(crate::accounting::run(
            shared.clone(),
            store.clone(),
            acct_rx,
            shutdown_rx.clone(),
            crate::accounting::Outputs {
                model: model_tx,
                prices: prices_tx,
            },
            clock.clone(),
        ));
        handlers.push(Arc::new(crate::accounting::AccountingCommands {
            requests: acct_tx.clone(),
            timezone: config.gateway.timezone,
            key: config.enforcement.public_key,
            seen,
            path: config.store.path.clone(),
            clock: clock.clone(),
        }));
        handlers.push(commands);
        let commands: Arc<dyn CommandHandler> = Arc::new(Chain(handlers));
        let uplink = Arc::new(Mutex::new(UplinkStatus::default()));
        let uplink_task = config.mqtt.clone().map(|m| {
            let u = Uplink {
                config: m,
                identity: Identity {
                    gateway: config.gateway.id.clone(),
                    site: config.gateway.site.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    config_hash: config.hash.clone(),
                    started_at: clock.now(),
                },
                store: store.clone(),
                status: uplink.clone(),
                commands,
                model: model_rx,
                clock: clock.clone(),
            };
            tokio::spawn(u.run(shutdown_rx))
        });
        let control = crate::control::ControlState {
            gateway: config.gateway.id.clone(),
            config_source: config.source.clone(),
            config_hash: config.hash.clone(),
            started_at: clock.now(),
            clock: clock.clone(),
            buses: bus_status.clone(),
            store: store.clone(),
            uplink: uplink_task.as_ref().map(|_| uplink.clone()),
            enforcement: enforcement_tx,
            accounting: (!config.site.is_empty()).then_some(acct_tx),
        };
        if let Some(live) = live {
            let web = crate::web::WebState {
                config: shared.clone(),
                control: control.clone(),
                live,
            };
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::web::serve(web).await {
                    tracing::error!(error = %e, "web view unavailable");
                }
            }));
        }
        let socket = config.gateway.control_socket.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::control::serve(socket.clone(), control).await {
                tracing::error!(socket = %socket.display(), error = %e, "local control socket unavailable; `meterd status` and `meterd relay` will not reach this daemon");
            }
        }));
        Ok(Daemon {
            bus_status,
            store,
            uplink,
            engine,
            recorder,
            accounting,
            tasks,
            uplink_task,
            shutdown,
        })
    }

    /// Liveness for the systemd watchdog: every bus task's dispatcher answers a probe (so it is not
    /// wedged and has a free poller) and the store thread answers, each within `within`.
    pub(crate) async fn healthy(&self, within: Duration) -> Result<(), Unhealthy> {
        for (i, tx) in self.engine.buses.iter().enumerate() {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let probe = bus::Actuation {
                device: String::new(),
                output: String::new(),
                set: None,
                reply,
            };
            tx.try_send(probe).map_err(|_| Unhealthy::BusBusy(i))?;
            tokio::time::timeout(within, rx)
                .await
                .map_err(|_| Unhealthy::BusSlow { bus: i, within })?
                .map_err(|_| Unhealthy::BusStopped(i))?
                .ok();
        }
        tokio::time::timeout(within, self.store.depth())
            .await
            .map_err(|_| Unhealthy::StoreSlow(within))?;
        Ok(())
    }

    /// Stops polling, commits what was read, publishes the offline status and disconnects.
    pub async fn stop(mut self) {
        self.engine.stop();
        drop(self.engine);
        // The recorder ends once the bus tasks' senders are gone; give it a moment to hand over.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.recorder).await;
        self.store.flush().await;
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.accounting).await;
        for t in &self.tasks {
            t.abort();
        }
        if let Some(t) = self.uplink_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    /// Before the fix: the clock set back an hour, then stepped forward a day over a band change.
    /// At the crossing the sampler kept the last reading before it, stamped in the repeated hour
    /// and so before samples already kept: the counter went down in time order and the hour's
    /// consumption would be billed twice.
    #[test]
    fn a_clock_set_back_then_stepped_over_a_band_change_keeps_no_sample_from_the_repeated_hour() {
        let tz = chrono_tz::Asia::Shanghai;
        // Peak 08:00–22:00, valley 22:00–08:00: a day's step crosses both band changes.
        let calendar = crate::bill::Calendar::new(tz, [crate::tou::tests::peak_valley()]);
        let mut sampler = HistorySampler::new(Duration::from_secs(60), calendar);
        // 1.2 kW polled every 10 s from 12:00 Shanghai, the counter at 0.01 kWh.
        let t0 = chrono::TimeZone::with_ymd_and_hms(&tz, 2026, 12, 10, 12, 0, 0)
            .unwrap()
            .with_timezone(&Utc);
        let mut kept = Vec::new();
        let mut wh = 5_123_400.0_f64;
        let mut poll = |at: chrono::DateTime<Utc>, sampler: &mut HistorySampler| {
            wh += 1200.0 * 10.0 / 3600.0;
            let r = crate::enforce::test_support::reading(at, (wh / 10.0).floor() / 100.0);
            kept.extend(sampler.take(&[r]));
        };
        let s = chrono::Duration::seconds;
        for k in 0..30 {
            poll(t0 + s(10 * k), &mut sampler);
        }
        // Set back an hour (the clock now reads 11:05), 20 minutes of polls, then a day ahead.
        let back = t0 + s(300) - chrono::Duration::hours(1);
        for k in 0..120 {
            poll(back + s(10 * k), &mut sampler);
        }
        let ahead = back + s(1200) + chrono::Duration::days(1);
        for k in 0..30 {
            poll(ahead + s(10 * k), &mut sampler);
        }
        assert!(
            kept.windows(2)
                .all(|w| w[0].ts_ms < w[1].ts_ms && w[0].value <= w[1].value),
            "samples in time order, the counter never going down: {:?}",
            kept.iter().map(|s| (s.ts_ms, s.value)).collect::<Vec<_>>()
        );
        assert!(kept.iter().any(|s| s.ts_ms >= ahead.timestamp_millis()));
    }

    #[test]
    fn a_reading_taken_before_the_clock_was_set_is_marked_and_the_step_is_an_event() {
        let at = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap()
                .with_timezone(&Utc)
        };
        let mut r = crate::enforce::test_support::reading(at("1970-01-01T00:00:42Z"), 1520.37);
        let record = |r: &Reading| crate::report::poll_record(std::slice::from_ref(r)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&record(&r).payload).unwrap();
        assert_eq!(v["clock_unsynced"], true);
        assert_eq!(
            v["ts"], "1970-01-01T00:00:42.000Z",
            "the time it was read, as the gateway had it"
        );
        r.ts = at("2026-11-30T00:05:00Z");
        let v: serde_json::Value = serde_json::from_slice(&record(&r).payload).unwrap();
        assert!(v.get("clock_unsynced").is_none());

        let mut w = crate::clock::ClockWatch::default();
        w.observe(at("1970-01-01T00:00:42Z"), 42_000);
        let j = w.observe(at("2026-11-29T16:05:00Z"), 43_000).jump.unwrap();
        let e: serde_json::Value = serde_json::from_slice(&clock_jump_record(&j).payload).unwrap();
        assert_eq!(e["event"], "clock_jump");
        assert_eq!(e["from"], "1970-01-01T00:00:43Z");
        assert_eq!(e["plausible"], true);
    }
}
