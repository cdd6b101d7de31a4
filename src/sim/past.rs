//! The building's past as its meters would have counted it: counter samples that seed a demo's
//! history, so a month's bill, the balance window and the curves have data behind them from the first
//! second. Pure: the building, the instant its counters read their `start_*` values, the sample times
//! and an optional wiring change.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{Building, Fault, UnitProtocol, UnitSpec};
use crate::modbus::profile::Quantity;

/// A circuit moved between two meters at `at`: before it, `unit` was fed through `was_under`; the
/// building file describes the wiring after it.
#[derive(Debug, Clone)]
pub struct Rewiring {
    /// The moved unit, `endpoint:unit` (or `endpoint:address`).
    pub unit: String,
    /// The unit that fed it before.
    pub was_under: String,
    pub at: DateTime<Utc>,
}

/// One counter sample of a unit: its key (`endpoint:unit` or `endpoint:address`), the quantity
/// (`energy_kwh`, `water_m3`), the time and the counter value.
#[derive(Debug, Clone, PartialEq)]
pub struct PastSample {
    pub unit: String,
    pub quantity: Quantity,
    pub at: DateTime<Utc>,
    pub value: f64,
}

impl UnitSpec {
    /// How the building's `sum_of` names this unit: `endpoint:unit`, or `endpoint:address` for the
    /// meters addressed by their nameplate number.
    #[must_use]
    pub fn key(&self) -> String {
        match (self.protocol, &self.address) {
            (UnitProtocol::Modbus, _) | (_, None) => format!("{}:{}", self.endpoint, self.unit),
            (_, Some(a)) => format!("{}:{a}", self.endpoint),
        }
    }
}

/// Power (W) and flow (m³/h) through each unit under a wiring (unit → the units it measures).
fn through(
    units: &BTreeMap<String, &UnitSpec>,
    wiring: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, (f64, f64)> {
    fn of(
        key: &str,
        units: &BTreeMap<String, &UnitSpec>,
        wiring: &BTreeMap<String, Vec<String>>,
        depth: usize,
    ) -> (f64, f64) {
        let Some(u) = units.get(key) else {
            return (0.0, 0.0);
        };
        let mut w = (u.load_w, u.flow_m3h);
        if depth < 64 {
            for k in wiring.get(key).into_iter().flatten() {
                let (p, f) = of(k, units, wiring, depth + 1);
                w.0 += p;
                w.1 += f;
            }
        }
        w
    }
    units
        .keys()
        .map(|k| (k.clone(), of(k, units, wiring, 0)))
        .collect()
}

/// Every answering unit's energy and volume counters at each of `times` (all at or before `now`),
/// given that at `now` they read the building's `start_kwh` / `start_m3` and that loads and flows
/// were constant (apart from `rewired`). A counter that would have been below zero (a meter installed
/// later) has no sample there; a dead unit has none at all.
#[must_use]
pub fn counters(
    building: &Building,
    now: DateTime<Utc>,
    times: &[DateTime<Utc>],
    rewired: Option<&Rewiring>,
) -> Vec<PastSample> {
    let units: BTreeMap<String, &UnitSpec> = building.unit.iter().map(|u| (u.key(), u)).collect();
    let after: BTreeMap<String, Vec<String>> = units
        .iter()
        .map(|(k, u)| (k.clone(), u.sum_of.clone()))
        .collect();
    let mut before = after.clone();
    if let Some(r) = rewired {
        for feeds in before.values_mut() {
            feeds.retain(|k| *k != r.unit);
        }
        before
            .entry(r.was_under.clone())
            .or_default()
            .push(r.unit.clone());
    }
    let (now_through, then_through) = (through(&units, &after), through(&units, &before));
    let hours =
        |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).num_milliseconds().max(0) as f64 / 3.6e6;
    let mut out = Vec::new();
    for (key, u) in &units {
        if u.fault == Fault::Dead {
            continue;
        }
        let (p_now, f_now) = now_through[key];
        let (p_then, f_then) = then_through[key];
        for &t in times.iter().filter(|t| **t <= now) {
            // Hours of each wiring between t and now.
            let (h_now, h_then) = match rewired {
                Some(r) if t < r.at => (hours(r.at.min(now), now), hours(t, r.at.min(now))),
                _ => (hours(t, now), 0.0),
            };
            // (quantity, counter at `now`, rate now, counter at t): kWh from W, m³ from m³/h.
            for (quantity, start, rate_now, value) in [
                (
                    Quantity::EnergyKwh,
                    u.start_kwh,
                    p_now,
                    u.start_kwh - (p_now * h_now + p_then * h_then) / 1000.0,
                ),
                (
                    Quantity::WaterM3,
                    u.start_m3,
                    f_now,
                    u.start_m3 - (f_now * h_now + f_then * h_then),
                ),
            ] {
                if (start > 0.0 || rate_now > 0.0) && value >= 0.0 {
                    out.push(PastSample {
                        unit: key.clone(),
                        quantity,
                        at: t,
                        value,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const BUILDING: &str = r#"
[[endpoint]]
name = "lan"
kind = "tcp"
[[endpoint]]
name = "rs485"
kind = "rtu"

[[unit]]
endpoint = "lan"
unit = 1
profile = "chint_dtsu666"
sum_of = ["rs485:1", "lan:2"]
load_w = 300.0
start_kwh = 10000.0

[[unit]]
endpoint = "lan"
unit = 2
profile = "chint_dtsu666"
sum_of = ["rs485:2", "rs485:3"]
load_w = 100.0
start_kwh = 5000.0

[[unit]]
endpoint = "rs485"
unit = 1
profile = "eastron_sdm120"
load_w = 1200.0
start_kwh = 500.0

[[unit]]
endpoint = "rs485"
unit = 2
profile = "eastron_sdm120"
load_w = 900.0
start_kwh = 20.0

[[unit]]
endpoint = "rs485"
unit = 3
profile = "eastron_sdm120"
load_w = 2500.0
start_kwh = 900.0

[[unit]]
endpoint = "rs485"
unit = 4
profile = "eastron_sdm120"
fault = "dead"

[[unit]]
endpoint = "rs485"
protocol = "cjt188"
address = "20241111000301"
flow_m3h = 0.12
start_m3 = 412.37
"#;

    fn value(s: &[PastSample], unit: &str, at: DateTime<Utc>) -> Option<f64> {
        s.iter()
            .find(|p| p.unit == unit && p.at == at)
            .map(|p| p.value)
    }

    #[test]
    fn counters_run_back_from_their_start_values_and_a_moved_circuit_changes_only_its_feeders() {
        let b = Building::from_str_named(BUILDING, "test").unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 30, 8, 0, 0).unwrap();
        let at = now - chrono::Duration::minutes(20);
        let hour = now - chrono::Duration::hours(1);
        let times = [hour, at, now - chrono::Duration::minutes(10), now];
        let r = Rewiring {
            unit: "rs485:3".into(),
            was_under: "lan:1".into(),
            at,
        };
        let s = counters(&b, now, &times, Some(&r));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // At `now` every counter reads its start value.
        assert_eq!(value(&s, "lan:1", now), Some(10000.0));
        assert_eq!(value(&s, "rs485:3", now), Some(900.0));
        // The main incomer draws the same either way: 300 + 100 + 1200 + 900 + 2500 W for an hour.
        assert!(close(value(&s, "lan:1", hour).unwrap(), 10000.0 - 5.0));
        // The floor board: 100 + 900 + 2500 W for the last 20 minutes, 100 + 900 W before.
        assert!(close(value(&s, "lan:2", at).unwrap(), 5000.0 - 3.5 / 3.0));
        assert!(close(
            value(&s, "lan:2", hour).unwrap(),
            5000.0 - 3.5 / 3.0 - 1.0 * 2.0 / 3.0
        ));
        // The moved circuit's own meter counts its own load throughout.
        assert!(close(value(&s, "rs485:3", hour).unwrap(), 900.0 - 2.5));
        // A 20 kWh counter at 900 W was not there 23 hours before; a dead meter has no history.
        let day = now - chrono::Duration::hours(23);
        let s = counters(&b, now, &[day], None);
        assert_eq!(value(&s, "rs485:2", day), None);
        assert!(value(&s, "rs485:1", day).is_some());
        assert!(s.iter().all(|p| p.unit != "rs485:4"));
        // A water meter addressed by its number counts m³.
        let w = s.iter().find(|p| p.unit == "rs485:20241111000301").unwrap();
        assert_eq!(w.quantity, Quantity::WaterM3);
        assert!(close(w.value, 412.37 - 0.12 * 23.0));
    }
}
