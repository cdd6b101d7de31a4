//! Report policy: poll fast, send what matters.
//!
//! Every poll still reaches the history, the balances, prepaid and the rules; this module only
//! decides what of a device's poll goes to the cloud, and encodes it as one telemetry record per
//! poll (all the values sent, quality per value). Pure: `Reporter::poll` takes a poll's readings
//! (which carry their time) and returns the record or nothing.
//!
//! - Billing counters (energy, water, pulses) go out in the first poll of every `publish_every`
//!   slot (aligned to the epoch, so every gateway of a site reports on the same grid) and at every
//!   billing boundary; the policy never holds one back longer.
//! - Instantaneous values (power, voltage, current, flow, …) go out when they leave a deadband
//!   around the value last sent (`max(abs, rel × |last|)`), and at least every `max_silence`.
//! - States (relay read-back, digital inputs, valve bits) go out on every change, and at least
//!   every `max_silence`.
//! - A change of quality (a value that fails, recovers or goes stale) goes out at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::bill::{BoundaryWatch, Calendar};
use crate::modbus::profile::Quantity;
use crate::reading::{Quality, Reading};
use crate::store::{Kind, NewRecord};

/// How far an instantaneous value may move before it is sent again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadband {
    /// In the value's unit.
    pub abs: f64,
    /// A share of the last value sent (0.05 = 5 %).
    pub rel: f64,
}

impl Deadband {
    fn exceeded(self, last: f64, now: f64) -> bool {
        (now - last).abs() > self.abs.max(self.rel * last.abs())
    }
}

/// The `[report]` section: what goes to the cloud, per quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportPolicy {
    /// Billing counters go out at least once per slot of this length, and at every billing boundary.
    pub publish_every: Duration,
    /// Instantaneous values and states go out at least this often.
    pub max_silence: Duration,
    /// Per instantaneous quantity; a quantity without one is sent on any change.
    pub deadbands: BTreeMap<Quantity, Deadband>,
    /// Devices with their own counter interval (`[[device]] publish_every`).
    pub device_every: BTreeMap<String, Duration>,
    /// Commissioning: every poll goes out whole (the cost of the link is the operator's choice).
    pub every_poll: bool,
}

impl Default for ReportPolicy {
    /// 15-minute counters (the interval grid of China's electricity settlement), 15-minute
    /// silence, and deadbands a meter's own accuracy class would hide anyway.
    fn default() -> ReportPolicy {
        let rel = |rel: f64, abs: f64| Deadband { abs, rel };
        ReportPolicy {
            publish_every: Duration::from_secs(15 * 60),
            max_silence: Duration::from_secs(15 * 60),
            deadbands: BTreeMap::from([
                (Quantity::PowerW, rel(0.05, 20.0)),
                (Quantity::ReactivePowerVar, rel(0.05, 20.0)),
                (Quantity::ApparentPowerVa, rel(0.05, 20.0)),
                (Quantity::CurrentA, rel(0.05, 0.1)),
                (Quantity::VoltageV, rel(0.01, 1.0)),
                (Quantity::FrequencyHz, rel(0.0, 0.05)),
                (Quantity::PowerFactor, rel(0.0, 0.02)),
                (Quantity::FlowM3h, rel(0.05, 0.01)),
                (Quantity::PrepaidRemaining, rel(0.0, 0.01)),
                (Quantity::Other, rel(0.01, 0.0)),
            ]),
            device_every: BTreeMap::new(),
            every_poll: false,
        }
    }
}

/// How a quantity is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Counter,
    State,
    Instantaneous,
}

fn class(q: Quantity) -> Class {
    match q {
        Quantity::EnergyKwh
        | Quantity::EnergyExportKwh
        | Quantity::EnergyOtherKwh
        | Quantity::WaterM3
        | Quantity::PulseCount => Class::Counter,
        Quantity::RelayState | Quantity::DigitalInput | Quantity::ValveState => Class::State,
        Quantity::FlowM3h
        | Quantity::PowerW
        | Quantity::ReactivePowerVar
        | Quantity::ApparentPowerVa
        | Quantity::VoltageV
        | Quantity::CurrentA
        | Quantity::FrequencyHz
        | Quantity::PowerFactor
        | Quantity::PrepaidRemaining
        | Quantity::Other => Class::Instantaneous,
    }
}

/// What was last sent of one register.
#[derive(Debug, Clone, Copy)]
struct Sent {
    value: Option<f64>,
    quality: Quality,
    at: DateTime<Utc>,
}

/// One device's state in the report policy.
#[derive(Debug)]
struct DeviceSent {
    /// The device's previous poll, for the boundary check.
    polled: DateTime<Utc>,
    /// What was last sent of each register, in the order its polls list them (a poll's readings
    /// come in profile order, so the lookup is by position, checked by name).
    registers: Vec<(Arc<str>, Sent)>,
}

impl DeviceSent {
    /// The slot of the reading at position `i` of a poll named `name`.
    fn slot(&self, i: usize, name: &str) -> Option<usize> {
        match self.registers.get(i) {
            Some((n, _)) if **n == *name => Some(i),
            _ => self.registers.iter().position(|(n, _)| **n == *name),
        }
    }
}

/// The report policy's state: what was last sent of every register.
#[derive(Debug)]
pub struct Reporter {
    policy: ReportPolicy,
    boundaries: BoundaryWatch,
    /// Per device (looked up by `&str`, so a poll clones no key).
    last: HashMap<Arc<str>, DeviceSent>,
}

impl Reporter {
    /// A reporter for a site whose billing boundaries (month starts, band changes) are `calendar`'s.
    #[must_use]
    pub fn new(policy: ReportPolicy, calendar: Calendar) -> Reporter {
        Reporter {
            policy,
            boundaries: BoundaryWatch::new(calendar),
            last: HashMap::new(),
        }
    }

    /// One poll of one device (its readings, as the engine batches them) → the telemetry record to
    /// publish, or nothing when nothing in it needs sending.
    pub fn poll(&mut self, readings: &[Reading]) -> Option<NewRecord> {
        let first = readings.first()?;
        let device = &first.device;
        let at = readings.iter().map(|r| r.ts).max().unwrap_or(first.ts);
        let policy = &self.policy;
        let every = policy
            .device_every
            .get(device.as_ref())
            .copied()
            .unwrap_or(policy.publish_every);
        // A billing boundary passed since this device's previous poll: its counters go out now.
        let (state, boundary) = match self.last.get_mut(device.as_ref()) {
            Some(state) => {
                let boundary = self.boundaries.crossed(state.polled, at);
                state.polled = at;
                (state, boundary)
            }
            None => (
                self.last.entry(device.clone()).or_insert(DeviceSent {
                    polled: at,
                    registers: Vec::with_capacity(readings.len()),
                }),
                false,
            ),
        };
        let mut chosen: Vec<&Reading> = Vec::with_capacity(readings.len());
        for (i, r) in readings.iter().enumerate() {
            let sent = Sent {
                value: r.value,
                quality: r.quality,
                at: r.ts,
            };
            match state.slot(i, &r.register) {
                None => state.registers.push((r.register.clone(), sent)),
                Some(j) => {
                    let s = &mut state.registers[j].1;
                    if !(policy.every_poll || due(policy, r, s, every, boundary)) {
                        continue;
                    }
                    *s = sent;
                }
            }
            chosen.push(r);
        }
        if chosen.is_empty() {
            return None;
        }
        Some(encode(device, &chosen, boundary))
    }
}

/// Whether reading `r` goes out, given what was last sent of its register (`s`).
fn due(policy: &ReportPolicy, r: &Reading, s: &Sent, every: Duration, boundary: bool) -> bool {
    if r.quality != s.quality {
        return true;
    }
    let silent_for = (r.ts - s.at).to_std().unwrap_or(Duration::ZERO);
    match class(r.quantity) {
        Class::Counter => {
            boundary
                || slot(r.ts, every) != slot(s.at, every)
                // A clock stepped back: the grid restarts from here.
                || r.ts < s.at
        }
        Class::State => r.value != s.value || silent_for >= policy.max_silence,
        Class::Instantaneous => {
            silent_for >= policy.max_silence
                || r.ts < s.at
                || match (s.value, r.value) {
                    (Some(last), Some(now)) => policy
                        .deadbands
                        .get(&r.quantity)
                        .map_or(last != now, |d| d.exceeded(last, now)),
                    (a, b) => a.is_some() != b.is_some(),
                }
        }
    }
}

/// A poll with every value in it, as a record (what [`Reporter::poll`] sends when everything is
/// due). For tests and benchmarks that need a realistic record without a policy.
pub(crate) fn poll_record(readings: &[Reading]) -> Option<NewRecord> {
    let device = readings.first()?.device.clone();
    Some(encode(&device, &readings.iter().collect::<Vec<_>>(), false))
}

/// The slot of the `every` grid that `t` falls in.
fn slot(t: DateTime<Utc>, every: Duration) -> i64 {
    let every_ms = (every.as_millis() as i64).max(1);
    t.timestamp_millis().div_euclid(every_ms)
}

/// One telemetry record for a device's poll:
/// `{"device", "ts", "values": {register: number}, "quality"?: {register: "error"|"stale"},
/// "errors"?: {register: reason}, "boundary"?: true, "clock_unsynced"?: true}`.
/// `ts` is the poll's time (its latest reading); `quality` lists only values that are not good.
/// Keys are written in sorted order (registers too), straight from the readings without building a
/// JSON tree: this runs for every poll.
fn encode(device: &str, readings: &[&Reading], boundary: bool) -> NewRecord {
    // Both callers pass at least one reading: the record's time is always a reading's.
    let ts = readings.iter().map(|r| r.ts).max().unwrap_or_default();
    let mut sorted: Vec<&Reading> = readings.to_vec();
    sorted.sort_by(|a, b| a.register.cmp(&b.register));
    let record = Record {
        boundary,
        clock_unsynced: !crate::clock::plausible(ts),
        device,
        errors: Fields(
            sorted
                .iter()
                .filter_map(|r| Some((&*r.register, r.error.as_deref()?)))
                .collect(),
        ),
        quality: Fields(
            sorted
                .iter()
                .filter_map(|r| match r.quality {
                    Quality::Good => None,
                    Quality::Error => Some((&*r.register, "error")),
                    Quality::Stale => Some((&*r.register, "stale")),
                })
                .collect(),
        ),
        ts: ts.to_rfc3339_opts(SecondsFormat::Millis, true),
        values: Fields(
            sorted
                .iter()
                .filter_map(|r| Some((&*r.register, r.value?)))
                .collect(),
        ),
    };
    NewRecord {
        kind: Kind::Telemetry,
        topic: "telemetry".into(),
        ts,
        payload: serde_json::to_vec(&record).unwrap_or_default(),
    }
}

/// The telemetry record's fields, in the order they are written (sorted by name).
#[derive(serde::Serialize)]
struct Record<'a> {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    boundary: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    clock_unsynced: bool,
    device: &'a str,
    #[serde(skip_serializing_if = "Fields::is_empty")]
    errors: Fields<'a, &'a str>,
    #[serde(skip_serializing_if = "Fields::is_empty")]
    quality: Fields<'a, &'static str>,
    ts: String,
    values: Fields<'a, f64>,
}

/// `name → value` pairs written as a JSON object, in the order given (the site model uses it too).
pub(crate) struct Fields<'a, T>(pub(crate) Vec<(&'a str, T)>);

impl<T> Fields<'_, T> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: serde::Serialize> serde::Serialize for Fields<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::RawWords;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use serde_json::Value;

    fn reading(register: &str, quantity: Quantity, value: f64, ts: DateTime<Utc>) -> Reading {
        Reading {
            device: "room-101".into(),
            register: register.into(),
            quantity,
            value: Some(value),
            unit: quantity.default_unit().into(),
            ts,
            quality: Quality::Good,
            raw: RawWords::default(),
            error: None,
        }
    }

    fn shanghai() -> Calendar {
        Calendar::new(chrono_tz::Asia::Shanghai, [])
    }

    fn payload(r: &NewRecord) -> Value {
        serde_json::from_slice(&r.payload).unwrap()
    }

    /// 2026-10-31 23:40 Shanghai (15:40 UTC) plus `s` seconds.
    fn t(s: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 10, 31, 15, 40, 0).unwrap() + chrono::Duration::seconds(s)
    }

    #[test]
    fn counters_go_out_once_per_slot_and_at_the_month_boundary_off_the_grid() {
        // A 7-minute grid does not fall on 00:00 Shanghai: the month start is sent for its own sake.
        let policy = ReportPolicy {
            publish_every: Duration::from_secs(7 * 60),
            ..ReportPolicy::default()
        };
        let mut rep = Reporter::new(policy, shanghai());
        let mut kwh = 1034.25;
        let mut sent = Vec::new();
        // 40 minutes of 10 s polls at 1.2 kW: 0.0033 kWh a poll, a 0.01 kWh counter.
        for k in 0..240 {
            kwh += 1.2 * 10.0 / 3600.0;
            let shown = (kwh * 100.0_f64).floor() / 100.0;
            let r = reading("import_kwh", Quantity::EnergyKwh, shown, t(10 * k));
            if let Some(rec) = rep.poll(&[r]) {
                sent.push(payload(&rec));
            }
        }
        let slots: std::collections::BTreeSet<i64> = (0..240)
            .map(|k| slot(t(10 * k), Duration::from_secs(420)))
            .collect();
        let at_boundary: Vec<&Value> = sent.iter().filter(|v| v["boundary"] == true).collect();
        assert_eq!(at_boundary.len(), 1, "{sent:#?}");
        assert_eq!(
            at_boundary[0]["ts"], "2026-10-31T16:00:00.000Z",
            "the first poll at or after the month start"
        );
        assert_eq!(
            sent.len(),
            slots.len() + 1,
            "one per slot touched, plus the boundary"
        );
        assert!(sent.iter().all(|v| v["values"]["import_kwh"].is_number()));
    }

    #[test]
    fn a_poll_listing_its_registers_in_another_order_or_one_more_keeps_each_registers_own_state() {
        // A profile edited between polls (a register added in front): each register is compared
        // with what was last sent of that register, not of the one that used to sit at its place.
        let mut rep = Reporter::new(ReportPolicy::default(), shanghai());
        let v = |w: f64, k: i64| reading("voltage", Quantity::VoltageV, w, t(10 * k));
        let p = |w: f64, k: i64| reading("power", Quantity::PowerW, w, t(10 * k));
        let c = |w: f64, k: i64| reading("current", Quantity::CurrentA, w, t(10 * k));
        assert!(rep.poll(&[v(229.8, 0), p(1200.0, 0)]).is_some());
        // Both inside their deadbands, in the other order, with a new register in front.
        let rec = rep
            .poll(&[c(5.2, 1), p(1210.0, 1), v(230.1, 1)])
            .expect("the new register goes out");
        let values = payload(&rec)["values"].clone();
        assert_eq!(values, serde_json::json!({"current": 5.2}), "{values}");
        // A step of power in the new order goes out alone.
        let rec = rep
            .poll(&[c(5.2, 2), p(2400.0, 2), v(230.0, 2)])
            .expect("the power step");
        assert_eq!(
            payload(&rec)["values"],
            serde_json::json!({"power": 2400.0})
        );
    }

    #[test]
    fn power_inside_its_deadband_is_held_back_and_a_step_goes_out_at_once() {
        let mut rep = Reporter::new(ReportPolicy::default(), shanghai());
        let p = |w: f64, k: i64| reading("power", Quantity::PowerW, w, t(10 * k));
        assert!(
            rep.poll(&[p(1200.0, 0)]).is_some(),
            "first value always goes"
        );
        // ±3 % around 1.2 kW: inside 5 %.
        for (k, w) in [(1, 1236.0), (2, 1170.0), (3, 1210.0)] {
            assert!(rep.poll(&[p(w, k)]).is_none(), "{w} W held back");
        }
        // A kettle: 1.2 kW → 3.0 kW.
        let rec = rep.poll(&[p(3000.0, 4)]).expect("step sent");
        assert_eq!(payload(&rec)["values"]["power"], 3000.0);
        // At low loads the absolute band rules: 5 % of 300 W is 15 W, the band is 20 W.
        assert!(rep.poll(&[p(300.0, 5)]).is_some());
        assert!(rep.poll(&[p(310.0, 6)]).is_none());
    }

    #[test]
    fn an_unchanging_value_goes_out_again_after_the_maximum_silence() {
        let mut rep = Reporter::new(ReportPolicy::default(), shanghai());
        let mut sent = 0;
        // One hour of a constant 230.1 V polled every 10 s.
        for k in 0..360 {
            if rep
                .poll(&[reading("voltage", Quantity::VoltageV, 230.1, t(10 * k))])
                .is_some()
            {
                sent += 1;
            }
        }
        assert_eq!(sent, 4, "at 0, 15, 30 and 45 minutes");
    }

    #[test]
    fn a_relay_change_and_a_failing_value_go_out_at_once_with_their_quality() {
        let mut rep = Reporter::new(ReportPolicy::default(), shanghai());
        let relay = |on: f64, k: i64| reading("relay1", Quantity::RelayState, on, t(10 * k));
        let kwh = |k: i64| reading("import_kwh", Quantity::EnergyKwh, 512.5, t(10 * k));
        assert!(rep.poll(&[relay(1.0, 0), kwh(0)]).is_some());
        assert!(rep.poll(&[relay(1.0, 1), kwh(1)]).is_none());
        let rec = rep.poll(&[relay(0.0, 2), kwh(2)]).expect("relay change");
        let v = payload(&rec);
        assert_eq!(v["values"], serde_json::json!({"relay1": 0.0}));
        // The meter stops answering: the failure goes out now, with its reason.
        let mut failed = kwh(3);
        failed.value = None;
        failed.quality = Quality::Error;
        failed.error = Some("timeout after 1s".into());
        let v = payload(&rep.poll(&[relay(0.0, 3), failed]).expect("failure"));
        assert_eq!(v["quality"]["import_kwh"], "error");
        assert_eq!(v["errors"]["import_kwh"], "timeout after 1s");
        assert!(v["values"].get("import_kwh").is_none());
        // And its recovery.
        let v = payload(&rep.poll(&[relay(0.0, 4), kwh(4)]).expect("recovery"));
        assert_eq!(v["values"]["import_kwh"], 512.5);
        assert!(v.get("quality").is_none());
    }

    proptest! {
        /// Whatever a 0.3–3 kW load does, the cloud's last value of it is within the deadband of
        /// the truth, or was sent less than `max_silence` ago; and every 15-minute slot with a poll
        /// has its counter.
        #[test]
        fn the_cloud_view_stays_within_the_deadband_and_no_counter_slot_is_skipped(
            steps in proptest::collection::vec(-400.0f64..400.0, 50..400),
        ) {
            let policy = ReportPolicy::default();
            let band = policy.deadbands[&Quantity::PowerW];
            let mut rep = Reporter::new(policy.clone(), shanghai());
            let mut w = 1500.0f64;
            let mut kwh = 100.0f64;
            let mut cloud: Option<(f64, DateTime<Utc>)> = None;
            let mut counter_slots = std::collections::BTreeSet::new();
            let mut polled_slots = std::collections::BTreeSet::new();
            for (k, d) in steps.iter().enumerate() {
                let now = t(10 * k as i64);
                w = (w + d).clamp(300.0, 3000.0);
                kwh += w * 10.0 / 3.6e6;
                polled_slots.insert(slot(now, policy.publish_every));
                let rec = rep.poll(&[
                    reading("power", Quantity::PowerW, w, now),
                    reading("import_kwh", Quantity::EnergyKwh, (kwh * 100.0).floor() / 100.0, now),
                ]);
                if let Some(rec) = rec {
                    let v = payload(&rec);
                    if let Some(p) = v["values"]["power"].as_f64() {
                        cloud = Some((p, now));
                    }
                    if v["values"]["import_kwh"].is_number() {
                        counter_slots.insert(slot(now, policy.publish_every));
                    }
                }
                let (last, at) = cloud.expect("the first poll is sent");
                prop_assert!(
                    !band.exceeded(last, w) || (now - at).to_std().unwrap() < policy.max_silence,
                    "cloud shows {last} W, the load is {w} W"
                );
            }
            prop_assert_eq!(counter_slots, polled_slots);
        }
    }
}
