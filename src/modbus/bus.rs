//! The bus task: one per bus, owning its connections, driving the scheduler and emitting readings.
//!
//! Layout: a dispatcher (scheduler + bookkeeping) and N pollers, N = 1 on any RS485 line (one
//! transaction on the wire at a time) and `max_concurrent` on Modbus TCP. A device is handed to one
//! poller at a time; a slow or dead device occupies one poller for at most one timeout per attempt, and
//! once offline only one attempt per probe interval.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;

use super::decode;
use super::link::{Data, FailureKind, LineStats, Link, LinkError};
use super::reading::{Quality, RawWords, Reading};
use super::schedule::{Scheduler, Verdict};
use super::spec::{Bus, Device, Protocol};
use crate::clock::Clock;

/// The last good value of a register: value, raw words, when read.
type LastGood = Option<(f64, RawWords, DateTime<Utc>)>;

/// A batch of readings from one poll of one device.
pub type Batch = Vec<Reading>;

/// Counters and last state of one device, for `meterd status` and the logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub unit: u8,
    pub polls_ok: u64,
    pub polls_failed: u64,
    pub timeouts: u64,
    /// CRC or framing errors: bytes arrived but no valid frame.
    pub garbled: u64,
    pub transport_errors: u64,
    /// Modbus exception responses by code.
    pub exceptions: BTreeMap<u8, u64>,
    pub missed_deadlines: u64,
    pub last_error: Option<String>,
    pub last_latency_ms: Option<f64>,
    pub last_success: Option<DateTime<Utc>>,
    pub offline_since: Option<DateTime<Utc>>,
}

/// Live status of one bus, shared with whoever reports it.
#[derive(Debug, Serialize)]
pub struct BusStatus {
    pub name: String,
    pub devices: Mutex<Vec<DeviceStatus>>,
    /// What the line guard dropped on an RTU line (late answers, other units' frames, noise).
    pub line: Arc<LineStats>,
}

impl BusStatus {
    /// A copy of the device counters.
    pub fn snapshot(&self) -> Vec<DeviceStatus> {
        self.devices.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// What one attempt at polling a device produced.
#[derive(Debug)]
pub struct PollResult {
    /// Decoded readings; registers whose request got an exception carry quality `error`.
    pub readings: Vec<Reading>,
    /// Exceptions received (the device answered, so the poll still counts as a success).
    pub exceptions: Vec<LinkError>,
    /// A communication failure that aborted the poll.
    pub failure: Option<LinkError>,
    pub latency: Duration,
}

/// Why switching or reading an output failed. The enforcer treats them apart: a timeout or a broken
/// transport is worth retrying soon, a device that answered with an exception is not (it will say
/// the same again), and a configuration mistake needs a person.
#[derive(Debug, thiserror::Error)]
pub enum ActuateError {
    #[error("device {device} has no output {output:?}; check the profile's [[output]] names")]
    UnknownOutput { device: String, output: String },
    #[error("output {output:?} of {device} has no read-back register; the profile must name one")]
    NoReadback { device: String, output: String },
    #[error("device {0} is not on this bus")]
    NotOnBus(String),
    /// The transaction failed at `stage` (`read`, `write`, `read back`).
    #[error("{stage} of {device} {output}: {source}")]
    Link {
        device: String,
        output: String,
        stage: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("the bus task of device {0} is not running")]
    BusStopped(String),
    #[error("device {0}: DL/T 645 relay control needs password_level, password and operator in its [[device]]")]
    NoCredentials(String),
    #[error("this poller cannot switch outputs")]
    Unsupported,
}

impl ActuateError {
    /// A failed transaction at `stage` (`read`, `write`, `read back`) of `device`'s `output`.
    pub(crate) fn link(
        device: &Device,
        output: &str,
        stage: &'static str,
        source: LinkError,
    ) -> ActuateError {
        ActuateError::Link {
            device: device.name.to_string(),
            output: output.to_string(),
            stage,
            source,
        }
    }

    /// The device answered (a Modbus exception): retrying will not help.
    #[must_use]
    pub fn device_answered(&self) -> bool {
        matches!(self, ActuateError::Link { source, .. } if source.device_answered())
    }

    /// A short class for the audit trail: `timeout`, `garbled`, `exception`, `transport`, `config`,
    /// `bus`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            ActuateError::Link { source, .. } => match source.kind() {
                FailureKind::Timeout => "timeout",
                FailureKind::Garbled => "garbled",
                FailureKind::Exception(_) => "exception",
                FailureKind::Transport => "transport",
            },
            ActuateError::UnknownOutput { .. }
            | ActuateError::NoReadback { .. }
            | ActuateError::NotOnBus(_)
            | ActuateError::NoCredentials(_)
            | ActuateError::Unsupported => "config",
            ActuateError::BusStopped(_) => "bus",
        }
    }
}

/// A request to read (and optionally switch) one output of a device, executed by the bus task
/// between polls so the line is never shared: relay actions go through the same single transaction
/// slot as polling on RS485.
#[derive(Debug)]
pub struct Actuation {
    pub device: String,
    pub output: String,
    /// `Some(true)` energise/grant, `Some(false)` release/cut, `None` only read the state.
    pub set: Option<bool>,
    pub reply: tokio::sync::oneshot::Sender<Result<RelayState, ActuateError>>,
}

/// An output's state around an actuation, as read back from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RelayState {
    pub before: bool,
    pub after: bool,
    /// A write was sent (the state differed).
    pub wrote: bool,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Executes polls. The bus task uses [`Link`]; scheduler tests substitute a clock-driven poller.
pub trait Poller: Send + 'static {
    /// Reads every planned request of `device`.
    fn poll<'a>(&'a mut self, device: &'a Device) -> BoxFuture<'a, PollResult>;

    /// Reads an output's state and switches it if asked.
    fn actuate<'a>(
        &'a mut self,
        _device: &'a Device,
        _output: &'a str,
        _set: Option<bool>,
    ) -> BoxFuture<'a, Result<RelayState, ActuateError>> {
        Box::pin(async { Err(ActuateError::Unsupported) })
    }
}

impl Poller for Link {
    fn poll<'a>(&'a mut self, device: &'a Device) -> BoxFuture<'a, PollResult> {
        Box::pin(poll_device(self, device))
    }

    fn actuate<'a>(
        &'a mut self,
        device: &'a Device,
        output: &'a str,
        set: Option<bool>,
    ) -> BoxFuture<'a, Result<RelayState, ActuateError>> {
        Box::pin(actuate(self, device, output, set))
    }
}

/// Reads an output through its read-back register, writes it if it differs from `set`, and reads it
/// back again: a write's echo proves receipt, not that the contact moved.
pub async fn actuate(
    link: &mut Link,
    device: &Device,
    output: &str,
    set: Option<bool>,
) -> Result<RelayState, ActuateError> {
    match &device.protocol {
        Protocol::Modbus => {}
        Protocol::Dlt645(meter) => {
            return super::national::actuate_dlt645(link, device, output, meter, set).await;
        }
        Protocol::Cjt188(meter) => {
            return super::national::actuate_cjt188(link, device, output, *meter, set).await;
        }
    }
    let o = device
        .profile
        .outputs
        .iter()
        .find(|o| o.name == output)
        .ok_or_else(|| ActuateError::UnknownOutput {
            device: device.name.to_string(),
            output: output.to_string(),
        })?;
    let reg = o
        .readback
        .as_ref()
        .and_then(|r| {
            device
                .profile
                .registers
                .iter()
                .find(|x| &*x.name == r.as_str())
        })
        .ok_or_else(|| ActuateError::NoReadback {
            device: device.name.to_string(),
            output: output.to_string(),
        })?;
    let req = super::plan::ReadRequest {
        function: reg.function,
        address: reg.address,
        count: reg.width(),
    };
    let failed = |stage: &'static str| {
        move |source: LinkError| ActuateError::link(device, output, stage, source)
    };
    let before = read_state(link, device, req, o.on_value)
        .await
        .map_err(failed("read"))?;
    let Some(want) = set.filter(|w| *w != before) else {
        return Ok(RelayState {
            before,
            after: before,
            wrote: false,
        });
    };
    let r = if o.function == super::profile::Function::Coil {
        link.write_coil(device.unit, o.address, want, device.timeout)
            .await
    } else {
        let v = if want { o.on_value } else { o.off_value };
        link.write_registers(
            device.unit,
            o.address,
            &[v],
            o.write_multiple,
            device.timeout,
        )
        .await
    };
    r.map_err(failed("write"))?;
    let after = read_state(link, device, req, o.on_value)
        .await
        .map_err(failed("read back"))?;
    Ok(RelayState {
        before,
        after,
        wrote: true,
    })
}

/// An output's state: a coil's bit, or a register equal to (or, for valve state bits, containing)
/// the output's "on" value.
async fn read_state(
    link: &mut Link,
    device: &Device,
    req: super::plan::ReadRequest,
    on_value: u16,
) -> Result<bool, LinkError> {
    match link
        .read(device.unit, req, device.timeout, device.pause)
        .await?
    {
        Data::Bits(b) => Ok(b.first().copied().unwrap_or(false)),
        Data::Words(w) => Ok(w
            .first()
            .is_some_and(|v| *v == on_value || (on_value != 0 && (*v & on_value) != 0))),
    }
}

/// Reads a device's plan over `link` and decodes every register. Stops at the first communication
/// failure (the device is probably gone); goes on past exceptions (it answered).
pub async fn poll_device(link: &mut Link, device: &Device) -> PollResult {
    match &device.protocol {
        Protocol::Modbus => {}
        Protocol::Dlt645(meter) => {
            return super::national::poll_dlt645(link, device, meter).await;
        }
        Protocol::Cjt188(meter) => {
            return super::national::poll_cjt188(link, device, *meter).await;
        }
    }
    let started = link.clock().instant();
    let mut responses: Vec<Result<Data, LinkError>> =
        Vec::with_capacity(device.plan.requests.len());
    let mut ts = link.clock().now();
    for req in &device.plan.requests {
        let r = link
            .read(device.unit, *req, device.timeout, device.pause)
            .await;
        ts = link.clock().now();
        match r {
            Err(e) if !e.device_answered() => {
                return PollResult {
                    readings: Vec::new(),
                    exceptions: Vec::new(),
                    failure: Some(e),
                    latency: link.clock().since(started),
                };
            }
            r => responses.push(r),
        }
    }
    let readings = decode_readings(device, &responses, ts);
    let exceptions = responses.into_iter().filter_map(Result::err).collect();
    PollResult {
        readings,
        exceptions,
        failure: None,
        latency: link.clock().since(started),
    }
}

/// Turns the responses to a device's plan into one reading per profile register.
pub(crate) fn decode_readings(
    device: &Device,
    responses: &[Result<Data, LinkError>],
    ts: DateTime<Utc>,
) -> Vec<Reading> {
    let profile = &device.profile;
    let mut out = Vec::with_capacity(profile.registers.len());
    for (reg, slot) in profile.registers.iter().zip(&device.plan.slots) {
        let off = usize::from(slot.offset);
        let (value, raw, error): (Option<f64>, RawWords, Option<Arc<str>>) =
            match &responses[slot.request] {
                Ok(Data::Bits(bits)) => {
                    let b = bits[off];
                    (
                        Some(f64::from(u8::from(b))),
                        RawWords::new(&[u16::from(b)]),
                        None,
                    )
                }
                Ok(Data::Words(words)) => {
                    let w = &words[off..off + usize::from(reg.width())];
                    match decode::decode(w, reg.ty, reg.word_order, reg.byte_order) {
                        Ok(v) => (
                            Some(v.as_f64() * reg.scale + reg.offset),
                            RawWords::new(w),
                            None,
                        ),
                        Err(e) => (None, RawWords::new(w), Some(Arc::from(e.to_string()))),
                    }
                }
                Err(e) => (None, RawWords::default(), Some(Arc::from(e.to_string()))),
            };
        out.push(Reading {
            device: device.name.clone(),
            register: reg.name.clone(),
            quantity: reg.quantity,
            value,
            unit: reg.unit.clone(),
            ts,
            quality: if error.is_none() {
                Quality::Good
            } else {
                Quality::Error
            },
            raw,
            error,
        });
    }
    out
}

struct Done {
    worker: usize,
    /// The poll that finished, or `None` after an actuation.
    poll: Option<(usize, PollResult)>,
}

enum Job {
    Poll(usize),
    Actuate(usize, Actuation),
}

/// Runs the bus until `out` is closed. `devices` are the devices of this bus only.
pub async fn run(
    bus: Bus,
    devices: Vec<Device>,
    out: mpsc::Sender<Batch>,
    status: Arc<BusStatus>,
    actions: mpsc::Receiver<Actuation>,
    boundaries: Option<tokio::sync::watch::Receiver<u64>>,
    clock: Clock,
) {
    let pollers: Vec<Link> = (0..bus.concurrency().max(1))
        .map(|_| Link::with_stats(&bus, status.line.clone(), clock.clone()))
        .collect();
    run_with_boundaries(devices, pollers, out, status, actions, boundaries, clock).await;
}

/// The dispatcher, with the pollers given. Returns when `out` is closed.
pub async fn run_with<P: Poller>(
    devices: Vec<Device>,
    pollers: Vec<P>,
    out: mpsc::Sender<Batch>,
    status: Arc<BusStatus>,
    actions: mpsc::Receiver<Actuation>,
    clock: Clock,
) {
    run_with_boundaries(devices, pollers, out, status, actions, None, clock).await;
}

/// [`run_with`], plus a billing-boundary signal: each change of `boundaries` reads every device
/// with a billing counter (kWh, m³) as soon as a poller is free, off its deadline grid.
pub(crate) async fn run_with_boundaries<P: Poller>(
    devices: Vec<Device>,
    pollers: Vec<P>,
    out: mpsc::Sender<Batch>,
    status: Arc<BusStatus>,
    mut actions: mpsc::Receiver<Actuation>,
    mut boundaries: Option<tokio::sync::watch::Receiver<u64>>,
    clock: Clock,
) {
    if devices.is_empty() {
        return;
    }
    let devices: Arc<[Device]> = devices.into();
    let policies: Vec<_> = devices.iter().map(|d| d.policy).collect();
    let mut sched = Scheduler::new(&policies);
    let billing: Vec<usize> = devices
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            d.profile.registers.iter().any(|r| {
                matches!(
                    r.quantity,
                    crate::modbus::profile::Quantity::EnergyKwh
                        | crate::modbus::profile::Quantity::WaterM3
                )
            })
        })
        .map(|(i, _)| i)
        .collect();
    let mut last_good: Vec<Vec<LastGood>> = devices
        .iter()
        .map(|d| vec![None; d.profile.registers.len()])
        .collect();
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(pollers.len());
    // One poller (every RS485 line, a TCP endpoint taking one transaction at a time): the
    // dispatcher runs each job itself, without a task and two channel hops per poll. Several: a
    // task each, fed by a channel.
    let mut pollers = pollers;
    let mut single = if pollers.len() == 1 {
        pollers.pop()
    } else {
        None
    };
    let mut jobs = Vec::new();
    for (worker, mut poller) in pollers.into_iter().enumerate() {
        let (tx, mut rx) = mpsc::channel::<Job>(1);
        jobs.push(tx);
        let devices = devices.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let done = run_job(&mut poller, &devices, worker, job).await;
                if done_tx.send(done).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(done_tx);
    let workers = single.as_ref().map_or(jobs.len(), |_| 1);
    let mut idle: Vec<usize> = (0..workers).rev().collect();
    let start = clock.instant();
    let mut actions_open = true;
    let mut pending: Option<Actuation> = None;
    // One timer for the whole loop, moved to each next due time: a fresh `sleep_until` per poll
    // registers a timer entry and, being the earliest, wakes the runtime's driver through its eventfd
    // (a write and an extra epoll round per poll); moving a timer later touches neither.
    let mut due = std::pin::pin!(tokio::time::sleep_until(start));
    loop {
        let now = clock.since(start);
        // A job the dispatcher ran itself (single poller), handled below like a worker's.
        let mut ran: Option<Done> = None;
        // Relay actions first: a door should not wait behind a meter poll.
        while let Some(&w) = idle.last() {
            let a = match pending.take() {
                Some(a) => a,
                None => match actions.try_recv() {
                    Ok(a) => a,
                    Err(_) => break,
                },
            };
            let Some(d) = devices.iter().position(|d| *d.name == *a.device) else {
                let _ = a.reply.send(Err(ActuateError::NotOnBus(a.device.clone())));
                continue;
            };
            idle.pop();
            match hand(&mut single, &jobs, &devices, w, Job::Actuate(d, a)).await {
                Err(()) => return,
                Ok(Some(done)) => {
                    ran = Some(done);
                    break;
                }
                Ok(None) => {}
            }
        }
        while ran.is_none() {
            let Some(&w) = idle.last() else { break };
            let Some(d) = sched.pop_due(now) else { break };
            idle.pop();
            match hand(&mut single, &jobs, &devices, w, Job::Poll(d)).await {
                Err(()) => return,
                Ok(done) => ran = done,
            }
        }
        let done = if let Some(done) = ran {
            done
        } else {
            {
                let next = sched.next_due();
                if let Some(next) = next {
                    if due.deadline() != start + next {
                        due.as_mut().reset(start + next);
                    }
                }
                tokio::select! {
                    a = actions.recv(), if actions_open && pending.is_none() => {
                        match a {
                            Some(a) => pending = Some(a),
                            None => actions_open = false,
                        }
                        continue;
                    }
                    done = done_rx.recv(), if single.is_none() => {
                        let Some(done) = done else { return };
                        done
                    }
                    () = &mut due, if next.is_some() && !idle.is_empty() => continue,
                    r = async {
                        match boundaries.as_mut() {
                            Some(b) => b.changed().await,
                            None => std::future::pending().await,
                        }
                    }, if boundaries.is_some() => {
                        match r {
                            Ok(()) => {
                                let now = clock.since(start);
                                for &i in &billing {
                                    sched.poll_now(i, now);
                                }
                            }
                            Err(_) => boundaries = None,
                        }
                        continue;
                    }
                    () = out.closed() => return,
                }
            }
        };
        let Done { worker, poll } = done;
        idle.push(worker);
        let Some((device, result)) = poll else {
            continue;
        };
        let ok = result.failure.is_none();
        let verdict = sched.complete(device, ok, clock.since(start));
        let dev = &devices[device];
        let batch = account(
            &status,
            device,
            dev,
            &result,
            (verdict, sched.missed(device)),
            &mut last_good[device],
            clock.now(),
        );
        let batch = if ok { result.readings } else { batch };
        if !batch.is_empty() && out.send(batch).await.is_err() {
            return;
        }
    }
}

/// Runs one job on a poller.
async fn run_job<P: Poller>(poller: &mut P, devices: &[Device], worker: usize, job: Job) -> Done {
    let poll = match job {
        Job::Poll(device) => Some((device, poller.poll(&devices[device]).await)),
        Job::Actuate(device, a) => {
            let r = poller.actuate(&devices[device], &a.output, a.set).await;
            let _ = a.reply.send(r);
            None
        }
    };
    Done { worker, poll }
}

/// Gives `job` to worker `w`: the single poller runs it here and its outcome comes back at once;
/// a worker task reports through the done channel later. `Err` when the worker is gone.
async fn hand<P: Poller>(
    single: &mut Option<P>,
    jobs: &[mpsc::Sender<Job>],
    devices: &[Device],
    w: usize,
    job: Job,
) -> Result<Option<Done>, ()> {
    match single {
        Some(poller) => Ok(Some(run_job(poller, devices, w, job).await)),
        None => jobs[w].send(job).await.map(|()| None).map_err(|_| ()),
    }
}

/// Updates the counters and the last good values; for a failed poll returns the readings that say so
/// (error, or stale with the last good value once the device is offline).
fn account(
    status: &BusStatus,
    index: usize,
    dev: &Device,
    result: &PollResult,
    (verdict, missed): (Verdict, u64),
    last_good: &mut [LastGood],
    now: DateTime<Utc>,
) -> Vec<Reading> {
    if let Ok(mut all) = status.devices.lock() {
        let s = &mut all[index];
        s.missed_deadlines = missed;
        s.last_latency_ms = Some(result.latency.as_secs_f64() * 1000.0);
        for e in result.exceptions.iter().chain(result.failure.iter()) {
            match e.kind() {
                FailureKind::Timeout => s.timeouts += 1,
                FailureKind::Garbled => s.garbled += 1,
                FailureKind::Transport => s.transport_errors += 1,
                FailureKind::Exception(code) => *s.exceptions.entry(code).or_default() += 1,
            }
            s.last_error = Some(e.to_string());
        }
        if result.failure.is_none() {
            s.polls_ok += 1;
            s.last_success = Some(now);
            s.offline_since = None;
        } else {
            s.polls_failed += 1;
            if verdict == Verdict::WentOffline {
                s.offline_since = Some(now);
            }
        }
    }
    match verdict {
        Verdict::Polled => {}
        Verdict::BackOnline => tracing::info!(device = %dev.name, "device back online"),
        Verdict::Retrying => {
            tracing::debug!(device = %dev.name, error = %fmt_failure(result), "poll failed, retrying");
        }
        Verdict::Failed => {
            tracing::warn!(device = %dev.name, error = %fmt_failure(result), "poll failed");
        }
        Verdict::WentOffline => {
            tracing::warn!(device = %dev.name, error = %fmt_failure(result), probe = ?dev.policy.probe_interval, "device offline; probing at the slower rate");
        }
        Verdict::StillOffline => {
            tracing::debug!(device = %dev.name, "probe of offline device failed");
        }
    }
    if result.failure.is_none() {
        for (slot, r) in last_good.iter_mut().zip(&result.readings) {
            if let (Some(v), Quality::Good) = (r.value, r.quality) {
                *slot = Some((v, r.raw, r.ts));
            }
        }
        return Vec::new();
    }
    let stale = matches!(verdict, Verdict::WentOffline | Verdict::StillOffline);
    if verdict == Verdict::Retrying {
        return Vec::new();
    }
    let error: Arc<str> = Arc::from(fmt_failure(result).as_str());
    dev.profile
        .registers
        .iter()
        .zip(last_good.iter())
        .map(|(reg, last)| {
            let (value, raw, ts, quality) = match (stale, last) {
                (true, Some((v, raw, ts))) => (Some(*v), *raw, *ts, Quality::Stale),
                _ => (None, RawWords::default(), now, Quality::Error),
            };
            Reading {
                device: dev.name.clone(),
                register: reg.name.clone(),
                quantity: reg.quantity,
                value,
                unit: reg.unit.clone(),
                ts,
                quality,
                raw,
                error: Some(error.clone()),
            }
        })
        .collect()
}

fn fmt_failure(r: &PollResult) -> String {
    r.failure
        .as_ref()
        .map(std::string::ToString::to_string)
        .unwrap_or_default()
}

/// A fresh status block for the devices of one bus.
#[must_use]
pub fn new_status(bus: &Bus, devices: &[Device]) -> Arc<BusStatus> {
    Arc::new(BusStatus {
        name: bus.name.clone(),
        devices: Mutex::new(
            devices
                .iter()
                .map(|d| DeviceStatus {
                    name: d.name.to_string(),
                    unit: d.unit,
                    ..Default::default()
                })
                .collect(),
        ),
        line: Arc::default(),
    })
}
