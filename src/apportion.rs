//! Apportionment: a pool's common consumption (and cost) shared among its rooms by coefficients.
//!
//! Pure: (topology, consumption per meter) → per-room shares, with every input kept so a tenant can
//! check the arithmetic (`explain`). Coefficients of a pool sum to 1; consumption is split in
//! thousandths of a unit (Wh, litres) and money in minor units, both by the largest remainder method
//! (see [`crate::money`]), so the rooms' shares add up exactly to the pool's totals.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::money::{self, Price, Weight};
use crate::topology::{Basis, Consumption, Pool, Site, Source};

/// One basis value of one room, before and after normalising.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BasisShare {
    pub basis: Basis,
    pub weight: f64,
    /// The room's input (m², persons, kWh/m³, or the fixed figure), after any floor weight.
    pub value: f64,
    /// value / Σ values of the pool's rooms.
    pub share: f64,
}

/// A room's line in a pool's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomShare {
    pub room: String,
    /// The room's own metered consumption in the period.
    pub own: f64,
    pub bases: Vec<BasisShare>,
    /// Σ weight × share; the pool's coefficients sum to 1.
    pub coefficient: f64,
    /// The coefficient exactly (what the split uses; `coefficient` is it printed), kept for the
    /// month's split across segments.
    #[serde(skip)]
    pub(crate) exact: Weight,
    /// The room's part of the common consumption, thousandths of a unit.
    pub share_milli: i64,
    /// Minor currency units, if the pool has a tariff.
    pub share_amount: Option<i64>,
}

/// A pool's result for a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolResult {
    pub pool: String,
    pub period: String,
    pub utility: crate::topology::Utility,
    pub unit: String,
    pub method: Vec<(Basis, f64)>,
    /// Common-area meters and their consumption.
    pub common_meters: Vec<(String, f64)>,
    /// Node losses added to the pool (negative losses are not added; see warnings).
    pub losses: Vec<(String, f64)>,
    /// Total common consumption shared, thousandths of a unit.
    pub common_milli: i64,
    pub tariff: Option<String>,
    pub price: Option<Price>,
    pub currency: Option<String>,
    /// Cost of the common consumption, minor units.
    pub amount: Option<i64>,
    pub rooms: Vec<RoomShare>,
    /// Some input was interpolated across missing readings.
    pub estimated: bool,
    pub warnings: Vec<String>,
    /// When a dated assignment cut the month: each stretch's inputs and coefficients. The month's
    /// figures above are then their sums, and the shares are the month's amount split once by
    /// Σ (stretch's common consumption × room's coefficient), so rounding happens once per pool and
    /// month.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<PoolSegment>,
}

/// One stretch of a month with one topology: what its split rests on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSegment {
    pub from: chrono::DateTime<chrono::Utc>,
    pub to: chrono::DateTime<chrono::Utc>,
    pub common_meters: Vec<(String, f64)>,
    pub losses: Vec<(String, f64)>,
    /// Thousandths of a unit.
    pub common_milli: i64,
    pub rooms: Vec<SegmentRoom>,
    /// The pool's price in this stretch (a tariff version may change it mid-month).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
}

/// A room's inputs in one stretch of a month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentRoom {
    pub room: String,
    pub own: f64,
    pub bases: Vec<BasisShare>,
    pub coefficient: f64,
}

fn basis_value(site: &Site, pool: &Pool, basis: Basis, room: &str, own: f64) -> f64 {
    let r = &site.rooms[room];
    let floor_w = |v: f64| match (pool.floor_weights.is_empty(), r.floor) {
        (true, _) => v,
        (false, Some(f)) => v * pool.floor_weights.get(&f).copied().unwrap_or(1.0),
        (false, None) => v,
    };
    match basis {
        Basis::Area => floor_w(r.area_m2.unwrap_or(0.0)),
        Basis::Headcount => floor_w(r.headcount.unwrap_or(0.0)),
        Basis::Consumption => own.max(0.0),
        Basis::Fixed => pool.fixed.get(room).copied().unwrap_or(0.0),
    }
}

/// Computes one pool. `consumption` holds every meter's consumption for the period (virtual ones
/// included, see [`crate::topology::meter_consumption`]).
pub(crate) fn apportion_pool(
    site: &Site,
    pool: &Pool,
    consumption: &BTreeMap<String, Consumption>,
    period: &str,
) -> PoolResult {
    let mut warnings = Vec::new();
    let mut estimated = false;
    let mut rooms: Vec<String> = pool.rooms.clone();
    rooms.sort();
    rooms.dedup();
    // Own consumption per room.
    let own: Vec<f64> = rooms
        .iter()
        .map(|r| {
            site.room_meters(r, pool.utility)
                .iter()
                .map(|m| {
                    if let Some(c) = consumption.get(&m.name) {
                        estimated |= c.estimated;
                        c.value
                    } else {
                        warnings.push(format!(
                            "no consumption for meter {} (room {r}); counted as 0",
                            m.name
                        ));
                        0.0
                    }
                })
                .sum()
        })
        .collect();
    // Common consumption: the pool's meters plus the losses it carries.
    let mut common_meters = Vec::new();
    for m in site
        .meters
        .values()
        .filter(|m| m.pool.as_deref() == Some(pool.name.as_str()))
    {
        match consumption.get(&m.name) {
            Some(c) => {
                estimated |= c.estimated;
                common_meters.push((m.name.clone(), c.value));
            }
            None => warnings.push(format!(
                "no consumption for common meter {}; counted as 0",
                m.name
            )),
        }
    }
    let mut losses = Vec::new();
    for node in &pool.include_loss_of {
        let kids = site.children(node);
        let own_c = consumption.get(node);
        let kids_c: Option<f64> = kids
            .iter()
            .map(|k| consumption.get(&k.name).map(|c| c.value))
            .sum();
        match (own_c, kids_c) {
            (Some(o), Some(k)) => {
                estimated |= o.estimated;
                let loss = o.value - k;
                if loss < 0.0 {
                    warnings.push(format!("node {node}: children exceed it by {:.3}; no loss added (check the wiring)", -loss));
                } else {
                    losses.push((node.clone(), loss));
                }
            }
            _ => warnings.push(format!(
                "loss of {node} unknown (missing readings); not added"
            )),
        }
    }
    let common: f64 = common_meters.iter().map(|(_, v)| v).sum::<f64>()
        + losses.iter().map(|(_, v)| v).sum::<f64>();
    let common_milli = money::to_milli(common).max(0);

    // Coefficients, in floating point to print and exactly to split: basis values to 6 decimals
    // (own consumption to the Wh or litre), method weights normalised to sum to 1.
    let mut bases: Vec<Vec<BasisShare>> = vec![Vec::new(); rooms.len()];
    let mut coeff = vec![0.0; rooms.len()];
    let mut exact = vec![Weight::default(); rooms.len()];
    let weights_sum: Weight = pool.method.iter().map(|(_, w)| money::weight_of(*w)).sum();
    for (basis, weight) in &pool.method {
        let values: Vec<f64> = rooms
            .iter()
            .zip(&own)
            .map(|(r, o)| basis_value(site, pool, *basis, r, *o))
            .collect();
        let exact_values: Vec<Weight> = values
            .iter()
            .map(|v| match basis {
                Basis::Consumption => Weight::new(money::to_milli(*v).into(), 1000.into()),
                _ => money::weight_of(v.max(0.0)),
            })
            .collect();
        let sum: f64 = values.iter().sum();
        let exact_sum: Weight = exact_values.iter().sum();
        let equal = exact_sum == Weight::default();
        if equal && *weight > 0.0 {
            warnings.push(
                format!("{basis:?} is zero for every room: that part is shared equally")
                    .to_lowercase(),
            );
        }
        let exact_weight = if weights_sum == Weight::default() {
            Weight::default()
        } else {
            money::weight_of(*weight) / &weights_sum
        };
        for (i, v) in values.iter().enumerate() {
            let share = if equal {
                1.0 / rooms.len() as f64
            } else {
                v / sum
            };
            let exact_share = if equal {
                Weight::new(1.into(), rooms.len().into())
            } else {
                &exact_values[i] / &exact_sum
            };
            coeff[i] += weight * share;
            exact[i] += &exact_weight * exact_share;
            bases[i].push(BasisShare {
                basis: *basis,
                weight: *weight,
                value: *v,
                share,
            });
        }
    }
    let shares = money::largest_remainder(common_milli, &exact, &rooms);
    let tariff = pool.tariff.as_ref().and_then(|t| site.tariffs.get(t));
    let amount = tariff.map(|t| t.price.amount(common_milli));
    let share_amounts = amount.map(|a| money::largest_remainder(a, &exact, &rooms));
    let out_rooms = rooms
        .iter()
        .enumerate()
        .map(|(i, r)| RoomShare {
            room: r.clone(),
            own: own[i],
            bases: bases[i].clone(),
            coefficient: coeff[i],
            exact: exact[i].clone(),
            share_milli: shares[i],
            share_amount: share_amounts.as_ref().map(|s| s[i]),
        })
        .collect();
    PoolResult {
        pool: pool.name.clone(),
        period: period.to_string(),
        utility: pool.utility,
        unit: pool.utility.unit().to_string(),
        method: pool.method.clone(),
        common_meters,
        losses,
        common_milli,
        tariff: tariff.map(|t| t.name.clone()),
        price: tariff.map(|t| t.price),
        currency: tariff.map(|t| t.currency.clone()),
        amount,
        rooms: out_rooms,
        estimated,
        warnings,
        segments: Vec::new(),
    }
}

/// A pool's month from its stretches (consecutive, one per topology): one stretch is the month
/// itself; several are summed, and the month's consumption and amount are split once, each room
/// weighted by Σ (stretch's common consumption × its exact coefficient there). A room untouched by
/// a correction therefore keeps its share to the fen however the month is cut. When a tariff
/// version changes the price mid-month, the amount is Σ (stretch's common × its price), rounded
/// once, and each room's cost is weighted by Σ (common × price × coefficient).
pub(crate) fn month(
    mut parts: Vec<(
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        PoolResult,
    )>,
) -> Option<PoolResult> {
    if parts.len() <= 1 {
        return parts.pop().map(|(_, _, r)| r);
    }
    let last = parts.last()?.2.clone();
    // Σ thousandths × micro-units over the stretches: the month's exact cost.
    let cost: Option<i128> = parts
        .iter()
        .map(|(_, _, r)| {
            r.price
                .map(|p| i128::from(r.common_milli) * i128::from(p.micros))
        })
        .sum();
    let mut cost_weights: BTreeMap<String, Weight> = BTreeMap::new();
    let mut rooms: BTreeMap<String, (f64, Weight)> = BTreeMap::new();
    let mut common_meters: BTreeMap<String, f64> = BTreeMap::new();
    let mut losses: BTreeMap<String, f64> = BTreeMap::new();
    let mut common_milli = 0i64;
    let (mut estimated, mut warnings) = (false, Vec::new());
    let mut segments = Vec::new();
    for (from, to, r) in parts {
        common_milli += r.common_milli;
        estimated |= r.estimated;
        warnings.extend(
            r.warnings
                .iter()
                .map(|w| format!("{}: {w}", from.to_rfc3339())),
        );
        for (m, v) in &r.common_meters {
            *common_meters.entry(m.clone()).or_default() += v;
        }
        for (m, v) in &r.losses {
            *losses.entry(m.clone()).or_default() += v;
        }
        for x in &r.rooms {
            let e = rooms.entry(x.room.clone()).or_default();
            e.0 += x.own;
            e.1 += &x.exact * Weight::from_integer(r.common_milli.into());
            let micros = r.price.map_or(0, |p| p.micros);
            *cost_weights.entry(x.room.clone()).or_default() += &x.exact
                * Weight::from_integer((i128::from(r.common_milli) * i128::from(micros)).into());
        }
        segments.push(PoolSegment {
            from,
            to,
            common_meters: r.common_meters,
            losses: r.losses,
            common_milli: r.common_milli,
            price: r.price,
            rooms: r
                .rooms
                .into_iter()
                .map(|x| SegmentRoom {
                    room: x.room,
                    own: x.own,
                    bases: x.bases,
                    coefficient: x.coefficient,
                })
                .collect(),
        });
    }
    let keys: Vec<&String> = rooms.keys().collect();
    let weights: Vec<Weight> = rooms.values().map(|(_, w)| w.clone()).collect();
    let shares = money::largest_remainder(common_milli, &weights, &keys);
    let amount = cost
        .zip(last.price)
        .map(|(c, p)| money::div_round_half_even(c, 10i128.pow(9 - p.decimals)) as i64);
    let cost_weights: Vec<Weight> = rooms
        .keys()
        .map(|r| cost_weights.remove(r).unwrap_or_default())
        .collect();
    let amounts = amount.map(|a| money::largest_remainder(a, &cost_weights, &keys));
    let out_rooms = rooms
        .iter()
        .enumerate()
        .map(|(i, (room, (own, w)))| {
            let exact = if common_milli > 0 {
                w / Weight::from_integer(common_milli.into())
            } else {
                Weight::default()
            };
            RoomShare {
                room: room.clone(),
                own: *own,
                bases: Vec::new(),
                coefficient: num_traits::ToPrimitive::to_f64(&exact).unwrap_or(0.0),
                exact,
                share_milli: shares[i],
                share_amount: amounts.as_ref().map(|a| a[i]),
            }
        })
        .collect();
    Some(PoolResult {
        common_meters: common_meters.into_iter().collect(),
        losses: losses.into_iter().collect(),
        common_milli,
        amount,
        rooms: out_rooms,
        estimated,
        warnings,
        segments,
        ..last
    })
}

/// Every pool of the site.
#[must_use]
pub fn apportion(
    site: &Site,
    consumption: &BTreeMap<String, Consumption>,
    period: &str,
) -> Vec<PoolResult> {
    site.pools
        .values()
        .map(|p| apportion_pool(site, p, consumption, period))
        .collect()
}

fn units(milli: i64) -> String {
    format!("{}.{:03}", milli / 1000, (milli % 1000).abs())
}

fn minor(amount: i64, decimals: u32) -> String {
    let d = 10i64.pow(decimals);
    format!(
        "{}.{:0w$}",
        amount / d,
        (amount % d).abs(),
        w = decimals as usize
    )
}

/// One line per basis of a room's coefficient; `all` holds every room's bases (for the sums).
fn basis_lines(s: &mut String, bases: &[BasisShare], all: &[&[BasisShare]]) {
    for b in bases {
        let sum: f64 = all
            .iter()
            .map(|x| {
                x.iter()
                    .find(|y| y.basis == b.basis)
                    .map_or(0.0, |y| y.value)
            })
            .sum();
        let _ = writeln!(
            s,
            "     {:?}: {:.3} of {:.3} for all {} rooms = {:.6}, weight {:.2} → {:.6}",
            b.basis,
            b.value,
            sum,
            all.len(),
            b.share,
            b.weight,
            b.weight * b.share
        );
    }
}

/// The calculation for one room, step by step, for a tenant.
#[must_use]
pub fn explain(result: &PoolResult, room: &str) -> Option<String> {
    let r = result.rooms.iter().find(|x| x.room == room)?;
    let u = &result.unit;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Pool {:?}, period {}, room {room}",
        result.pool, result.period
    );
    let _ = writeln!(s, "1. Common consumption to share:");
    for (m, v) in &result.common_meters {
        let _ = writeln!(s, "     common-area meter {m}: {v:.3} {u}");
    }
    for (m, v) in &result.losses {
        let _ = writeln!(
            s,
            "     loss of {m} (its reading minus its sub-meters'): {v:.3} {u}"
        );
    }
    let _ = writeln!(
        s,
        "     total = {} {u} (rounded to 0.001 {u}, half to even)",
        units(result.common_milli)
    );
    if result.segments.is_empty() {
        let _ = writeln!(s, "2. Coefficient of room {room}:");
        let all: Vec<&[BasisShare]> = result.rooms.iter().map(|x| x.bases.as_slice()).collect();
        basis_lines(&mut s, &r.bases, &all);
        let _ = writeln!(
            s,
            "     coefficient = {:.6} (the pool's coefficients sum to 1)",
            r.coefficient
        );
    } else {
        let _ = writeln!(
            s,
            "2. Coefficient of room {room}: the month is cut where a dated assignment changed the topology"
        );
        for g in &result.segments {
            let Some(x) = g.rooms.iter().find(|x| x.room == room) else {
                continue;
            };
            let _ = writeln!(
                s,
                "   {} to {}: common {} {u}",
                g.from.to_rfc3339(),
                g.to.to_rfc3339(),
                units(g.common_milli)
            );
            let all: Vec<&[BasisShare]> = g.rooms.iter().map(|x| x.bases.as_slice()).collect();
            basis_lines(&mut s, &x.bases, &all);
            let _ = writeln!(s, "     coefficient = {:.6}", x.coefficient);
        }
        let _ = writeln!(
            s,
            "     for the month: Σ (common × coefficient) ÷ {} {u} = {:.6}",
            units(result.common_milli),
            r.coefficient
        );
    }
    let quota = result.common_milli as f64 * r.coefficient / 1000.0;
    let _ = writeln!(
        s,
        "3. Share: {} × {:.6} = {quota:.4} {u}; rounded down to 0.001 {u}, leftover thousandths go to the largest remainders (ties: lowest room id) → {} {u}",
        units(result.common_milli),
        r.coefficient,
        units(r.share_milli)
    );
    if let (Some(p), Some(amount), Some(share), Some(cur)) = (
        result.price,
        result.amount,
        r.share_amount,
        &result.currency,
    ) {
        let _ = writeln!(
            s,
            "4. Cost: pool {} {u} × {}.{:06} {cur}/{u} = {} {cur} (half to even); room share by the same coefficients and rule → {} {cur}",
            units(result.common_milli),
            p.micros / 1_000_000,
            p.micros % 1_000_000,
            minor(amount, p.decimals),
            minor(share, p.decimals)
        );
    }
    if result.estimated {
        let _ = writeln!(
            s,
            "Note: some readings were missing and interpolated; figures marked estimated."
        );
    }
    for w in &result.warnings {
        let _ = writeln!(s, "Warning: {w}");
    }
    Some(s)
}

/// Device counters at interval boundaries → every meter's consumption (the step between the history
/// and [`apportion`]). `boundaries` maps a device to its (start, end) values, `exchanges` a meter
/// to the exchanges inside the interval, in time order.
pub(crate) fn device_consumption(
    site: &Site,
    boundaries: &BTreeMap<String, (crate::topology::Boundary, crate::topology::Boundary)>,
    exchanges: &BTreeMap<String, Vec<crate::topology::Replacement>>,
    hours: f64,
) -> BTreeMap<String, Consumption> {
    let mut out = BTreeMap::new();
    for m in site.meters.values() {
        if let Source::Device(d) = &m.source {
            if let Some((a, b)) = boundaries.get(d) {
                if let Some(c) = crate::topology::counter_consumption(
                    *a,
                    *b,
                    m.rollover,
                    m.max_rate.map(|r| r * hours),
                    exchanges.get(&m.name).map_or(&[][..], Vec::as_slice),
                ) {
                    out.insert(d.clone(), c);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::profile::Quantity;
    use crate::topology::{self, Consumption, RawMeter, RawPool, RawTariff, Room};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        room: Vec<Room>,
        #[serde(default)]
        meter: Vec<RawMeter>,
        #[serde(default)]
        pool: Vec<RawPool>,
        #[serde(default)]
        tariff: Vec<RawTariff>,
    }

    /// A site from TOML; every meter's device exists and meters both utilities.
    fn site(text: &str) -> Site {
        let d: Doc = toml::from_str(text).unwrap();
        let devices: BTreeMap<String, BTreeSet<Quantity>> = d
            .meter
            .iter()
            .filter(|m| m.expr.is_none())
            .map(|m| {
                (
                    m.device.clone().unwrap_or(m.name.clone()),
                    [Quantity::EnergyKwh, Quantity::WaterM3].into(),
                )
            })
            .collect();
        let key = |p: &str, i| format!("{p}[{i}]");
        let (s, issues) = topology::build(
            d.room
                .into_iter()
                .enumerate()
                .map(|(i, r)| (key("room", i), r))
                .collect(),
            d.meter
                .into_iter()
                .enumerate()
                .map(|(i, r)| (key("meter", i), r))
                .collect(),
            d.pool
                .into_iter()
                .enumerate()
                .map(|(i, r)| (key("pool", i), r))
                .collect(),
            d.tariff
                .into_iter()
                .enumerate()
                .map(|(i, r)| (key("tariff", i), r))
                .collect(),
            5.0,
            &devices,
        );
        assert!(issues.is_empty(), "{issues:?}");
        s
    }

    fn c(pairs: &[(&str, f64)]) -> BTreeMap<String, Consumption> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Consumption {
                        value: *v,
                        estimated: false,
                    },
                )
            })
            .collect()
    }

    const ELEVATOR: &str = r#"
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
        name = "mA"
        utility = "electricity"
        parent = "main"
        room = "A"
        [[meter]]
        name = "mB"
        utility = "electricity"
        parent = "main"
        room = "B"
        [[meter]]
        name = "mC"
        utility = "electricity"
        parent = "main"
        room = "C"
        [[meter]]
        name = "lift1"
        utility = "electricity"
        parent = "main"
        pool = "lifts"
        [[meter]]
        name = "lift2"
        utility = "electricity"
        parent = "main"
        pool = "lifts"
        [[meter]]
        name = "lift3"
        utility = "electricity"
        parent = "main"
        pool = "lifts"
        [[pool]]
        name = "lifts"
        utility = "electricity"
        rooms = ["*"]
        method = { area = 1.0 }
        tariff = "elec"
    "#;

    #[test]
    fn elevator_case_bills_the_measured_18_7_percent_not_a_stale_12() {
        // The building drew 1000 kWh; after two lifts were added the lift meters measure 187 kWh
        // (18.7 %), where the old fixed coefficient would have billed 120 kWh (12 %).
        let s = site(ELEVATOR);
        let cons = c(&[
            ("main", 1000.0),
            ("mA", 400.0),
            ("mB", 250.0),
            ("mC", 163.0),
            ("lift1", 62.0),
            ("lift2", 65.0),
            ("lift3", 60.0),
        ]);
        let r = apportion_pool(&s, &s.pools["lifts"], &cons, "2026-10");
        assert_eq!(r.common_milli, 187_000);
        let got: Vec<(&str, i64, Option<i64>)> = r
            .rooms
            .iter()
            .map(|x| (x.room.as_str(), x.share_milli, x.share_amount))
            .collect();
        // By area 50/30/20: 93.5, 56.1, 37.4 kWh. Cost 187 × 0.85 = 158.95 CNY = 15895 fen →
        // 7947.5 / 4768.5 / 3179.0: one leftover fen, tie between A and B (.5 each) → A.
        assert_eq!(
            got,
            vec![
                ("A", 93_500, Some(7948)),
                ("B", 56_100, Some(4768)),
                ("C", 37_400, Some(3179))
            ]
        );
        assert_eq!(r.amount, Some(15_895));
        let text = explain(&r, "A").unwrap();
        assert!(
            text.contains("coefficient = 0.500000")
                && text.contains("93.500 kWh")
                && text.contains("79.48 CNY"),
            "{text}"
        );
    }

    #[test]
    fn mixed_method_area_half_consumption_half() {
        let text = ELEVATOR.replace(
            "method = { area = 1.0 }",
            "method = { area = 0.5, consumption = 0.5 }",
        );
        let s = site(&text);
        let cons = c(&[
            ("main", 800.0),
            ("mA", 300.0),
            ("mB", 100.0),
            ("mC", 100.0),
            ("lift1", 200.0),
            ("lift2", 0.0),
            ("lift3", 0.0),
        ]);
        let r = apportion_pool(&s, &s.pools["lifts"], &cons, "2026-10");
        // area .5/.3/.2, consumption .6/.2/.2 → .55/.25/.20 of 200 kWh.
        let coeff: Vec<f64> = r
            .rooms
            .iter()
            .map(|x| (x.coefficient * 1e6).round() / 1e6)
            .collect();
        assert_eq!(coeff, vec![0.55, 0.25, 0.2]);
        let shares: Vec<i64> = r.rooms.iter().map(|x| x.share_milli).collect();
        assert_eq!(shares, vec![110_000, 50_000, 40_000]);
    }

    #[test]
    fn water_tree_loss_shared_by_headcount() {
        let s = site(
            r#"
            [[room]]
            id = "101"
            headcount = 3
            [[room]]
            id = "102"
            headcount = 2
            [[room]]
            id = "103"
            headcount = 1
            [[meter]]
            name = "water-main"
            utility = "water"
            [[meter]]
            name = "w101"
            utility = "water"
            parent = "water-main"
            room = "101"
            [[meter]]
            name = "w102"
            utility = "water"
            parent = "water-main"
            room = "102"
            [[meter]]
            name = "w103"
            utility = "water"
            parent = "water-main"
            room = "103"
            [[pool]]
            name = "water-loss"
            utility = "water"
            rooms = ["101", "102", "103"]
            method = { headcount = 1.0 }
            include_loss_of = ["water-main"]
        "#,
        );
        let cons = c(&[
            ("water-main", 120.0),
            ("w101", 50.0),
            ("w102", 40.0),
            ("w103", 20.0),
        ]);
        let r = apportion_pool(&s, &s.pools["water-loss"], &cons, "2026-10");
        assert_eq!(r.losses, vec![("water-main".to_string(), 10.0)]);
        // 10 m³ = 10000 L by 3/2/1: 5000, 3333.33, 1666.67 → the leftover litre goes to 103 (.67).
        let shares: Vec<i64> = r.rooms.iter().map(|x| x.share_milli).collect();
        assert_eq!(shares, vec![5000, 3333, 1667]);
        let b = crate::topology::balances(&s, &cons);
        assert_eq!(b.len(), 1);
        assert!((b[0].loss_pct - 8.3333).abs() < 1e-3 && b[0].alarm, "{b:?}");
    }

    #[test]
    fn a_meter_wired_to_the_wrong_room_is_named() {
        // Physically, meter mB2 sits on floor 2's circuit but is configured under floor 1.
        let s = site(
            r#"
            [[room]]
            id = "A"
            [[room]]
            id = "B"
            [[room]]
            id = "C"
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
            name = "mB2"
            utility = "electricity"
            parent = "floor1"
            room = "B"
            [[meter]]
            name = "mC"
            utility = "electricity"
            parent = "floor2"
            room = "C"
        "#,
        );
        let cons = c(&[
            ("main", 302.0),
            ("floor1", 101.0),
            ("floor2", 200.0),
            ("mA", 100.0),
            ("mB2", 60.0),
            ("mC", 139.0),
        ]);
        let b = crate::topology::balances(&s, &cons);
        let f1 = b.iter().find(|x| x.node == "floor1").unwrap();
        assert!(f1.alarm && f1.loss < 0.0);
        assert_eq!(
            f1.suspect
                .as_ref()
                .map(|x| (x.meter.as_str(), x.belongs_under.as_deref())),
            Some(("mB2", Some("floor2")))
        );
        let f2 = b.iter().find(|x| x.node == "floor2").unwrap();
        assert!(f2.alarm && f2.suspect.is_none());
    }

    #[test]
    fn equal_coefficients_reached_by_two_routes_share_the_leftover_fen_by_room_id_not_by_float_noise(
    ) {
        // 150 flats, half of 64.8 m² with 2 persons, half of 43.2 m² with 3: by area 50 % + headcount
        // 50 % every flat's coefficient is exactly 1/150 (64.8/8100 + 2/375 = 43.2/8100 + 3/375),
        // but in floating point the two kinds differ in the last bits (0.006666666666666666 and
        // …667), and the leftover went to the 75 flats of 43.2 m² first. The lifts drew 117.361 kWh =
        // 100.03 CNY at 0.8523: 10,003 fen, 66.686… a flat; the 103 leftover fen go to the 103
        // lowest room ids, and the 117,361 Wh likewise (782.406… each, 61 leftover).
        let mut text = String::from(
            "[[tariff]]\nname = \"t\"\nutility = \"electricity\"\nprice = \"0.8523\"\n[[meter]]\nname = \"lifts\"\nutility = \"electricity\"\npool = \"p\"\n",
        );
        for i in 0..150 {
            let (area, heads) = if i % 2 == 0 { (64.8, 2) } else { (43.2, 3) };
            text += &format!("[[room]]\nid = \"{i:03}\"\narea_m2 = {area}\nheadcount = {heads}\n[[meter]]\nname = \"m{i:03}\"\nutility = \"electricity\"\nroom = \"{i:03}\"\n");
        }
        text += "[[pool]]\nname = \"p\"\nutility = \"electricity\"\nrooms = [\"*\"]\nmethod = { area = 0.5, headcount = 0.5 }\ntariff = \"t\"\n";
        let s = site(&text);
        let r = apportion_pool(&s, &s.pools["p"], &c(&[("lifts", 117.361)]), "x");
        assert_eq!((r.common_milli, r.amount), (117_361, Some(10_003)));
        for x in &r.rooms {
            let id: usize = x.room.parse().unwrap();
            assert_eq!(
                (x.share_amount, x.share_milli),
                (
                    Some(if id < 103 { 67 } else { 66 }),
                    if id < 61 { 783 } else { 782 }
                ),
                "room {}",
                x.room
            );
        }
    }

    fn rooms_strategy() -> impl Strategy<Value = Vec<(f64, f64, f64)>> {
        proptest::collection::vec((0.0f64..500.0, 0.0f64..10.0, 0.0f64..5000.0), 1..40)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn allocations_are_exact_non_negative_order_independent_and_coefficients_sum_to_1(
            rooms in rooms_strategy(),
            common in 0.0f64..100_000.0,
            w_area in 0.0f64..1.0,
            rotate in 0usize..40,
        ) {
            let mut text = String::from("[[tariff]]\nname = \"t\"\nutility = \"electricity\"\nprice = \"0.8523\"\n[[meter]]\nname = \"common\"\nutility = \"electricity\"\npool = \"p\"\n");
            let mut cons = vec![("common".to_string(), common)];
            let n = rooms.len();
            let order: Vec<usize> = (0..n).map(|i| (i + rotate) % n).collect();
            for &i in &order {
                let (area, heads, own) = rooms[i];
                text += &format!("[[room]]\nid = \"r{i:02}\"\narea_m2 = {area}\nheadcount = {heads}\n[[meter]]\nname = \"m{i:02}\"\nutility = \"electricity\"\nroom = \"r{i:02}\"\n");
                cons.push((format!("m{i:02}"), own));
            }
            let room_list: Vec<String> = order.iter().map(|i| format!("\"r{i:02}\"")).collect();
            text += &format!(
                "[[pool]]\nname = \"p\"\nutility = \"electricity\"\nrooms = [{}]\nmethod = {{ area = {w_area}, consumption = {} }}\ntariff = \"t\"\n",
                room_list.join(", "),
                1.0 - w_area
            );
            let s = site(&text);
            let cmap: BTreeMap<String, Consumption> = cons.into_iter().map(|(k, v)| (k, Consumption { value: v, estimated: false })).collect();
            let r = apportion_pool(&s, &s.pools["p"], &cmap, "x");
            prop_assert_eq!(r.rooms.iter().map(|x| x.share_milli).sum::<i64>(), r.common_milli);
            prop_assert_eq!(r.rooms.iter().map(|x| x.share_amount.unwrap()).sum::<i64>(), r.amount.unwrap());
            prop_assert!(r.rooms.iter().all(|x| x.share_milli >= 0 && x.share_amount.unwrap() >= 0));
            let csum: f64 = r.rooms.iter().map(|x| x.coefficient).sum();
            prop_assert!((csum - 1.0).abs() < 1e-9, "coefficients sum to {}", csum);
            // The same site listed in natural order gives identical results per room.
            let mut text2 = String::from("[[tariff]]\nname = \"t\"\nutility = \"electricity\"\nprice = \"0.8523\"\n[[meter]]\nname = \"common\"\nutility = \"electricity\"\npool = \"p\"\n");
            for (i, (area, heads, _)) in rooms.iter().enumerate() {
                text2 += &format!("[[room]]\nid = \"r{i:02}\"\narea_m2 = {area}\nheadcount = {heads}\n[[meter]]\nname = \"m{i:02}\"\nutility = \"electricity\"\nroom = \"r{i:02}\"\n");
            }
            let natural: Vec<String> = (0..n).map(|i| format!("\"r{i:02}\"")).collect();
            text2 += &format!("[[pool]]\nname = \"p\"\nutility = \"electricity\"\nrooms = [{}]\nmethod = {{ area = {w_area}, consumption = {} }}\ntariff = \"t\"\n", natural.join(", "), 1.0 - w_area);
            let s2 = site(&text2);
            let r2 = apportion_pool(&s2, &s2.pools["p"], &cmap, "x");
            prop_assert_eq!(r.rooms, r2.rooms);
        }
    }
}
