//! Per-room bills: a statement per room, utility and period that a tenant can check by hand. Pure:
//! counter readings at the period's boundaries (and at every band change when the room's tariff has
//! time-of-use bands) in, statements out.
//!
//! A period is cut into segments where a dated [`crate::topology::Assignment`] changes the topology;
//! each segment is computed with the site as it was then, and the room's lines are added up.
//!
//! Money (see [`crate::money`]): each own-consumption line is its band's consumption × price,
//! rounded half to even to the minor unit; pool shares are the pool's amount split by the largest
//! remainder method; a bill's total is the sum of its lines. A line that cannot be priced makes the
//! total `None` (never a silent 0), and a meter without a reading at a boundary makes the bill
//! provisional, with the meter named.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use crate::apportion::{self, BasisShare, PoolResult};
use crate::money::Price;
use crate::topology::{self, Boundary, Consumption, Replacement, Site, Source, Utility};
use crate::tou::{self, TouPrice};

/// `YYYY-MM` → the month's first and last instant in the site's timezone, as UTC; `None` for
/// anything else. Midnight may not exist on a DST change day: the earliest valid instant is taken.
pub(crate) fn month_bounds(
    period: &str,
    tz: chrono_tz::Tz,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (y, m) = period.split_once('-')?;
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    let first = tou::first_of(y, m, tz)?;
    Some((first, tou::next_month_start(first, tz)))
}

/// Billing boundaries: local midnight on the 1st of every month, and every band change of a
/// time-of-use tariff. The sampler keeps readings around them and the bus reads the billing meters
/// at them, so bills never rest on a reading hours away.
#[derive(Debug, Clone, PartialEq)]
pub struct Calendar {
    pub tz: chrono_tz::Tz,
    /// Local times of day at which some tariff's price changes.
    pub band_changes: Vec<NaiveTime>,
}

impl Calendar {
    /// The calendar of a site: its timezone and the band changes of every tariff (billing and
    /// prepaid).
    pub fn new(tz: chrono_tz::Tz, tariffs: impl IntoIterator<Item = TouPrice>) -> Calendar {
        let mut band_changes: Vec<NaiveTime> =
            tariffs.into_iter().flat_map(|t| t.changes()).collect();
        band_changes.sort();
        band_changes.dedup();
        Calendar { tz, band_changes }
    }

    /// The first billing boundary strictly after `t`.
    #[must_use]
    pub fn next_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let month = tou::next_month_start(t, self.tz);
        match tou::next_local_time(&self.band_changes, t, self.tz) {
            Some(b) if b < month => b,
            _ => month,
        }
    }

    /// Whether a boundary lies in `(a, b]`.
    #[must_use]
    pub fn crossed(&self, a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
        a < b && self.next_after(a) <= b
    }
}

/// The time window a query command asks for: `"period": "YYYY-MM"` (that month in the site's
/// timezone) or `"from"` and `"to"` (RFC 3339). The error names `command` and what to give.
pub(crate) fn window_arg(
    args: &serde_json::Value,
    tz: chrono_tz::Tz,
    command: &str,
) -> Result<(DateTime<Utc>, DateTime<Utc>), String> {
    if let Some(p) = args.get("period").and_then(serde_json::Value::as_str) {
        return month_bounds(p, tz)
            .ok_or_else(|| format!("{command}: \"period\" must be YYYY-MM (a month), got {p:?}"));
    }
    let t = |k: &str| {
        args.get(k)
            .and_then(serde_json::Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&Utc))
            .ok_or_else(|| {
                format!(
                    "{command}: \"{k}\" must be an RFC 3339 time, or give \"period\": \"YYYY-MM\""
                )
            })
    };
    Ok((t("from")?, t("to")?))
}

/// [`Calendar::crossed`] for a stream of readings in about time order: the next boundary is
/// computed once per boundary, not once per reading.
#[derive(Debug, Clone)]
pub struct BoundaryWatch {
    calendar: Calendar,
    /// `(t, next)`: no boundary lies in `(t, next)`, and `next` is one.
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl BoundaryWatch {
    #[must_use]
    pub fn new(calendar: Calendar) -> BoundaryWatch {
        BoundaryWatch {
            calendar,
            window: None,
        }
    }

    /// Whether a billing boundary lies in `(a, b]`.
    pub fn crossed(&mut self, a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
        let next = match self.window {
            Some((t, next)) if t <= a && a < next => next,
            _ => {
                let next = self.calendar.next_after(a);
                self.window = Some((a, next));
                next
            }
        };
        a < b && next <= b
    }
}

/// A counter reading as a bill shows it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Read {
    pub at: DateTime<Utc>,
    pub value: f64,
    /// Interpolated across a gap in the readings.
    pub estimated: bool,
}

/// One meter of the room over one segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterLine {
    pub meter: String,
    /// The polled device (absent for a virtual meter).
    pub device: Option<String>,
    pub start: Option<Read>,
    pub end: Option<Read>,
    /// Thousandths of a unit; `None` when a reading is missing.
    pub consumption_milli: Option<i64>,
    /// `ok`, `estimated`, `missing`, `counter_decrease` or `negative`.
    pub status: String,
    /// Exchanges of the meter inside the segment (`[[replacement]]`), in time order: the
    /// consumption is (first final − start) + (next final − initial) + … + (end − last initial).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exchanges: Vec<Replacement>,
    /// The smallest step the counter shows at its end reading, in units (0.01 for a 0.01 kWh
    /// counter; for a float32 register it grows with the value: 0.0078 kWh at 100,000 kWh). A
    /// reading, and so a band's consumption, is exact only to this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<f64>,
}

/// Own consumption in one band, priced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyLine {
    pub band: String,
    pub price: Price,
    pub milli: i64,
    pub amount: i64,
}

/// The room's share of one pool over the period (split once per pool and period).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareLine {
    pub pool: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The pool's common consumption (thousandths) and cost (minor units).
    pub common_milli: i64,
    pub common_amount: Option<i64>,
    pub bases: Vec<BasisShare>,
    pub coefficient: f64,
    pub share_milli: i64,
    pub amount: Option<i64>,
    pub price: Option<Price>,
    /// When a dated assignment cut the period: the room's coefficient in each stretch. The share is
    /// then Σ (stretch's common × coefficient), rounded once; `coefficient` is that sum ÷ the
    /// period's common consumption, and `bases` is empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<ShareSegment>,
}

/// A room's coefficient in one pool over one stretch of the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareSegment {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub common_milli: i64,
    pub bases: Vec<BasisShare>,
    pub coefficient: f64,
    /// The pool's price in this stretch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
}

/// The version of the room's tariff that priced one stretch of the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TariffUse {
    pub tariff: String,
    /// The version's first day (site date); `None` for the tariff's first version.
    pub effective_from: Option<chrono::NaiveDate>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// A room's statement for one utility and period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomBill {
    pub room: String,
    pub utility: Utility,
    pub period: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub unit: String,
    pub currency: Option<String>,
    pub tariff: Option<String>,
    /// Each version of the room's tariff in force during the period, with the stretch it priced
    /// (one when no version changed it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tariff_versions: Vec<TariffUse>,
    pub meters: Vec<MeterLine>,
    /// Own consumption, thousandths of a unit.
    pub own_milli: i64,
    pub own: Vec<EnergyLine>,
    pub shares: Vec<ShareLine>,
    /// Minor units; `None` when some line could not be priced (see `notes`).
    pub total: Option<i64>,
    /// A reading is missing or estimated: the figures may change when it is known.
    pub provisional: bool,
    pub notes: Vec<String>,
    /// A prepaid room: what its balance was charged for the period. Its own consumption is then
    /// paid already, and `total` is what is still due (the pool shares); `own` stays as the
    /// tariff's figure for the same consumption, to compare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepaid: Option<Prepaid>,
}

/// What a prepaid account deducted over a period (its ledger's usage rows), per band and price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prepaid {
    pub deducted: Vec<EnergyLine>,
    /// Σ deducted amounts, minor units.
    pub amount: i64,
    /// Σ own lines − Σ deducted: the per-reading rounding carried between bands (at most a fen
    /// per band line); anything larger is named in `notes`.
    pub difference: i64,
}

/// Turns a prepaid room's bill into its statement: the own consumption is shown as deducted
/// (`deducted`, from the ledger) and not charged again; `total` keeps only what is still due.
pub fn prepaid_statement(b: &mut RoomBill, deducted: Vec<EnergyLine>) {
    let own: i64 = b.own.iter().map(|l| l.amount).sum();
    let amount: i64 = deducted.iter().map(|l| l.amount).sum();
    let milli: i64 = deducted.iter().map(|l| l.milli).sum();
    let dec = b
        .own
        .first()
        .or(deducted.first())
        .map_or(2, |l| l.price.decimals);
    b.total = b.total.map(|t| t - own);
    b.notes.push(format!(
        "prepaid: {} {} of own consumption were deducted from the balance as read ({} in total, see the deducted lines); the own lines price the same consumption at the tariff and are not charged again",
        units(milli),
        b.unit,
        money(amount, dec)
    ));
    let allowed = b.own.len().max(deducted.len()) as i64;
    if (own - amount).abs() > allowed {
        b.notes.push(format!(
            "prepaid: the deductions ({}) and the tariff's figure for the period ({}) differ by more than the rounding of {allowed} line(s): readings missing at the bounds, or a counter event (see the meters); the ledger (get_ledger) lists every deduction",
            money(amount, dec),
            money(own, dec)
        ));
    }
    b.prepaid = Some(Prepaid {
        deducted,
        amount,
        difference: own - amount,
    });
}

/// The readings of one device over one segment: `(instant, reading)` at the segment's start, at
/// every band change inside it, and at its end.
pub(crate) type Series = Vec<(DateTime<Utc>, Option<Boundary>)>;

/// One stretch of a period with one topology.
pub struct Segment<'a> {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub site: &'a Site,
    /// By device name.
    pub series: &'a BTreeMap<String, Series>,
    /// By meter name: the exchanges strictly inside the segment, in time order. The device's
    /// series then holds, at each, the old meter's final reading followed by the new one's initial.
    pub exchanges: &'a BTreeMap<String, Vec<Replacement>>,
}

/// What a period's computation produced: the pools (per segment) and the rooms' bills.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub pools: Vec<serde_json::Value>,
    pub bills: Vec<RoomBill>,
    /// Counters that went down over a segment without a wrap or a recorded exchange: their
    /// consumption is not billed (the bills relying on them are provisional and say so), and each is
    /// published as a `counter_decrease` event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counter_decreases: Vec<CounterDecrease>,
    /// Rooms' meters whose consumption came out negative (a `virtual` meter whose inputs do not
    /// balance): never billed as a credit; each is published as a `negative_consumption` event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub negative: Vec<NegativeConsumption>,
    /// Meters read before the period's end but not at or after it when it was computed (a meter
    /// off the bus over the bound, billed as missing): when one of them is read, the accounting
    /// task computes the period again by itself (a new version with its adjustments). A meter with
    /// no reading before the end is not listed: no later reading can complete it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unread: Vec<String>,
}

/// A room's meter with negative consumption over a segment, and the meters it is computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NegativeConsumption {
    pub room: String,
    pub meter: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Thousandths of a unit (below zero).
    pub consumption_milli: i64,
    /// `(sign, meter, its consumption in thousandths)`, for a virtual meter.
    pub inputs: Vec<(i8, String, Option<i64>)>,
}

/// A counter lower at the end of a segment than at its start, not explained by a plausible wrap or
/// a recorded exchange: a reset, an exchange nobody recorded, or a glitch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterDecrease {
    pub meter: String,
    pub device: String,
    pub from: Read,
    pub to: Read,
    /// The register's wrap value, when configured (the decrease was too large to be a wrap).
    pub rollover: Option<f64>,
}

/// The counters of a segment that went down unexplained (see [`CounterDecrease`]).
fn decreases(seg: &Segment, consumption: &BTreeMap<String, Consumption>) -> Vec<CounterDecrease> {
    let mut out = Vec::new();
    for m in seg.site.meters.values() {
        let Source::Device(d) = &m.source else {
            continue;
        };
        if consumption.contains_key(&m.name) {
            continue;
        }
        if let Some((from, to)) = went_down_in(seg, &m.name, d) {
            out.push(CounterDecrease {
                meter: m.name.clone(),
                device: d.clone(),
                from,
                to,
                rollover: m.rollover,
            });
        }
    }
    out
}

/// Where `meter`'s counter went down unexplained in the segment: the two readings around the fall,
/// between any two consecutive readings (the bounds and, for a banded room, every band edge) of one
/// physical meter, a plausible wrap of its register (within its `max_rate`) apart. A reset the
/// counter has climbed back above by the month's end is caught by the readings at the band edges.
fn went_down_in(seg: &Segment, meter: &str, device: &str) -> Option<(Read, Read)> {
    let m = seg.site.meters.get(meter)?;
    lives(seg.series.get(device)?, exchanges(seg, meter))
        .into_iter()
        .find_map(|l| {
            let reads: Vec<Read> = l.iter().filter_map(|p| bound(Some(p))).collect();
            reads.windows(2).find_map(|w| {
                let hours = (w[1].at - w[0].at).num_seconds() as f64 / 3600.0;
                let (a, b) = (
                    crate::money::to_milli(w[0].value),
                    crate::money::to_milli(w[1].value),
                );
                let wrap = topology::wrap_milli(a, b, m.rollover, m.max_rate.map(|r| r * hours));
                (b < a && wrap.is_none()).then_some((w[0], w[1]))
            })
        })
}

fn exchanges<'s>(seg: &'s Segment, meter: &str) -> &'s [Replacement] {
    seg.exchanges.get(meter).map_or(&[], Vec::as_slice)
}

/// A device's series cut into the parts each physical meter counted: at every exchange, after the
/// old meter's final reading (the new one's initial starts the next part).
fn lives<'s>(
    series: &'s [(DateTime<Utc>, Option<Boundary>)],
    exchanges: &[Replacement],
) -> Vec<&'s [(DateTime<Utc>, Option<Boundary>)]> {
    let mut out = Vec::new();
    let mut rest = series;
    for x in exchanges {
        let value = |p: &(DateTime<Utc>, Option<Boundary>)| p.1.map(|b| b.value);
        let cut = rest.windows(2).position(|w| {
            w[0].0 == x.at
                && w[1].0 == x.at
                && value(&w[0]) == Some(x.final_reading)
                && value(&w[1]) == Some(x.initial_reading)
        });
        let Some(j) = cut else { break };
        out.push(&rest[..=j]);
        rest = &rest[j + 1..];
    }
    out.push(rest);
    out
}

/// A series point as a bill shows it (none where the reading is unknown).
fn bound(point: Option<&(DateTime<Utc>, Option<Boundary>)>) -> Option<Read> {
    point.and_then(|(t, b)| read(*t, *b))
}

fn read(at: DateTime<Utc>, b: Option<Boundary>) -> Option<Read> {
    b.map(|b| Read {
        at,
        value: b.value,
        estimated: b.estimated,
    })
}

/// Every meter's consumption in a segment, virtual ones included.
pub(crate) fn segment_consumption(seg: &Segment) -> BTreeMap<String, Consumption> {
    let mut bounds = BTreeMap::new();
    for (dev, s) in seg.series {
        if let (Some((_, Some(a))), Some((_, Some(b)))) = (s.first(), s.last()) {
            bounds.insert(dev.clone(), (*a, *b));
        }
    }
    let hours = (seg.to - seg.from).num_seconds() as f64 / 3600.0;
    let mut devices = apportion::device_consumption(seg.site, &bounds, seg.exchanges, hours);
    // A counter that fell inside the segment (a reset it has since climbed back above) has no
    // consumption the bounds could tell.
    for m in seg.site.meters.values() {
        if let Source::Device(d) = &m.source {
            if went_down_in(seg, &m.name, d).is_some() {
                devices.remove(d);
            }
        }
    }
    topology::meter_consumption(seg.site, &devices)
}

/// Thousandths per band of a meter's consumption in a segment, when it can be split: every point
/// known (a wrap of the register counts on from its top). Across an exchange each physical meter's part is split from its own
/// readings (the old meter's up to its final, the new one's from its initial).
fn band_split(
    seg: &Segment,
    consumption: &BTreeMap<String, Consumption>,
    meter: &str,
    price: &TouPrice,
    tz: chrono_tz::Tz,
) -> Option<BTreeMap<(String, i64), i64>> {
    let total = crate::money::to_milli(consumption.get(meter)?.value);
    let m = seg.site.meters.get(meter)?;
    match &m.source {
        Source::Device(d) => {
            let ex = exchanges(seg, meter);
            let parts = lives(seg.series.get(d)?, ex);
            if parts.len() != ex.len() + 1 {
                return None;
            }
            let mut out: BTreeMap<(String, i64), i64> = BTreeMap::new();
            let mut sum = 0;
            for part in parts {
                let pts: Option<Vec<(DateTime<Utc>, i64)>> = part
                    .iter()
                    .map(|(t, b)| b.map(|b| (*t, crate::money::to_milli(b.value))))
                    .collect();
                let mut pts = pts?;
                // Through a wrap of the register the readings after it count on from its top
                // (a fall that is no plausible wrap has no consumption, see `went_down_in`).
                let top = m.rollover.map(crate::money::to_milli);
                for i in 1..pts.len() {
                    if pts[i].1 < pts[i - 1].1 {
                        let top = top?;
                        for p in &mut pts[i..] {
                            p.1 += top;
                        }
                    }
                }
                sum += pts.last()?.1 - pts.first()?.1;
                for p in tou::split(price, tz, &pts) {
                    *out.entry((p.band.clone(), p.price.micros)).or_default() += p.milli();
                }
            }
            (sum == total).then_some(out)
        }
        Source::Virtual(terms) => {
            let mut out: BTreeMap<(String, i64), i64> = BTreeMap::new();
            for (sign, t) in terms {
                for (k, v) in band_split(seg, consumption, t, price, tz)? {
                    *out.entry(k).or_default() += i64::from(*sign) * v;
                }
            }
            Some(out)
        }
    }
}

/// The room's bill being built, created on first use.
fn bill_for<'b>(
    acc: &'b mut BTreeMap<(String, Utility), RoomBill>,
    site: &Site,
    room: &str,
    u: Utility,
    period: &str,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
) -> &'b mut RoomBill {
    acc.entry((room.to_string(), u)).or_insert_with(|| {
        let t = site.room_tariff(room, u);
        RoomBill {
            room: room.to_string(),
            utility: u,
            period: period.to_string(),
            from,
            to,
            unit: u.unit().to_string(),
            currency: t.map(|t| t.currency.clone()),
            tariff: t.map(|t| t.name.clone()),
            tariff_versions: Vec::new(),
            meters: Vec::new(),
            own_milli: 0,
            own: Vec::new(),
            shares: Vec::new(),
            total: Some(0),
            provisional: false,
            notes: Vec::new(),
            prepaid: None,
        }
    })
}

/// Bills of every room for a period made of `segments` (consecutive, covering it).
pub fn bills(period: &str, tz: chrono_tz::Tz, segments: &[Segment]) -> Statement {
    let mut pools = Vec::new();
    let mut acc: BTreeMap<(String, Utility), RoomBill> = BTreeMap::new();
    let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
        return Statement {
            pools,
            bills: Vec::new(),
            counter_decreases: Vec::new(),
            negative: Vec::new(),
            unread: Vec::new(),
        };
    };
    let (p_from, p_to) = (first.from, last.to);
    let mut counter_decreases = Vec::new();
    let mut negative = Vec::new();
    // Per pool: its result in each segment, and the meters missing in any.
    let mut pool_parts: BTreeMap<String, Vec<_>> = BTreeMap::new();
    let mut pool_missing: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for seg in segments {
        let site = seg.site;
        let consumption = segment_consumption(seg);
        counter_decreases.extend(decreases(seg, &consumption));
        // Pools first: their missing inputs make every member's bill provisional.
        let results: Vec<PoolResult> = apportion::apportion(site, &consumption, period);
        // The meters each pool's figures rest on: its common meters, the nodes whose loss it
        // carries and their children, and its rooms' meters when it splits by consumption.
        let mut common: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for m in site.meters.values() {
            if let Some(p) = &m.pool {
                common.entry(p.as_str()).or_default().push(m.name.as_str());
            }
        }
        for r in &results {
            let pool = &site.pools[&r.pool];
            let mut inputs: Vec<&str> = common.get(r.pool.as_str()).cloned().unwrap_or_default();
            for node in &pool.include_loss_of {
                inputs.push(node.as_str());
                inputs.extend(site.children(node).iter().map(|c| c.name.as_str()));
            }
            if pool
                .method
                .iter()
                .any(|(b, w)| *b == topology::Basis::Consumption && *w > 0.0)
            {
                for room in &pool.rooms {
                    inputs.extend(
                        site.room_meters(room, pool.utility)
                            .iter()
                            .map(|m| m.name.as_str()),
                    );
                }
            }
            let mut missing: Vec<String> = inputs
                .into_iter()
                .filter(|m| consumption.get(*m).is_none_or(|c| c.estimated))
                .map(str::to_string)
                .collect();
            missing.sort();
            missing.dedup();
            pool_missing
                .entry(r.pool.clone())
                .or_default()
                .extend(missing);
        }
        for r in results {
            pool_parts
                .entry(r.pool.clone())
                .or_default()
                .push((seg.from, seg.to, r));
        }
        // Own consumption of every metered room.
        for room in site.rooms.keys() {
            for u in [Utility::Electricity, Utility::Water] {
                let meters = site.room_meters(room, u);
                if meters.is_empty() {
                    continue;
                }
                let bill = bill_for(&mut acc, site, room, u, period, (p_from, p_to));
                let tariff = site.room_tariff(room, u);
                if let Some(t) = tariff {
                    match bill.tariff_versions.last_mut() {
                        Some(v) if v.tariff == t.name && v.effective_from == t.effective_from => {
                            v.to = seg.to;
                        }
                        _ => bill.tariff_versions.push(TariffUse {
                            tariff: t.name.clone(),
                            effective_from: t.effective_from,
                            from: seg.from,
                            to: seg.to,
                        }),
                    }
                }
                for m in meters {
                    negative.extend(own_meter(bill, seg, &consumption, m, tariff, (room, u), tz));
                }
            }
        }
    }
    // Pool shares: each pool's month split once (see [`apportion::month`]).
    let site = last.site;
    for (name, parts) in pool_parts {
        let Some(r) = apportion::month(parts) else {
            continue;
        };
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        v["from"] = serde_json::json!(p_from.to_rfc3339());
        v["to"] = serde_json::json!(p_to.to_rfc3339());
        pools.push(v);
        let missing: Vec<String> = pool_missing
            .remove(&name)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for share in &r.rooms {
            let bill = bill_for(
                &mut acc,
                site,
                &share.room,
                r.utility,
                period,
                (p_from, p_to),
            );
            if bill.currency.is_none() {
                bill.currency.clone_from(&r.currency);
            }
            if !missing.is_empty() {
                bill.provisional = true;
                bill.notes.push(format!(
                    "pool {}: meter(s) {} missing or estimated; the share may change",
                    r.pool,
                    missing.join(", ")
                ));
            }
            if share.share_amount.is_none() && share.share_milli != 0 {
                bill.total = None;
                bill.notes.push(format!(
                    "pool {} has no tariff: its share is not priced",
                    r.pool
                ));
            }
            bill.shares.push(ShareLine {
                pool: r.pool.clone(),
                from: p_from,
                to: p_to,
                common_milli: r.common_milli,
                common_amount: r.amount,
                bases: share.bases.clone(),
                coefficient: share.coefficient,
                share_milli: share.share_milli,
                amount: share.share_amount,
                price: r.price,
                segments: r
                    .segments
                    .iter()
                    .filter_map(|g| {
                        let x = g.rooms.iter().find(|x| x.room == share.room)?;
                        Some(ShareSegment {
                            from: g.from,
                            to: g.to,
                            common_milli: g.common_milli,
                            bases: x.bases.clone(),
                            coefficient: x.coefficient,
                            price: g.price,
                        })
                    })
                    .collect(),
            });
        }
    }
    let mut bills: Vec<RoomBill> = acc.into_values().collect();
    for b in &mut bills {
        for l in &mut b.own {
            l.amount = l.price.amount(l.milli);
        }
        b.notes.dedup();
        b.total = b.total.map(|_| {
            b.own.iter().map(|l| l.amount).sum::<i64>()
                + b.shares.iter().filter_map(|s| s.amount).sum::<i64>()
        });
    }
    Statement {
        pools,
        bills,
        counter_decreases,
        negative,
        unread: Vec::new(),
    }
}

/// One meter's line on a room's bill for one segment, and its own consumption priced by the
/// room's tariff (split by time-of-use band when the tariff has bands and the readings allow).
fn own_meter(
    bill: &mut RoomBill,
    seg: &Segment,
    consumption: &BTreeMap<String, Consumption>,
    m: &topology::Meter,
    tariff: Option<&topology::Tariff>,
    (room, u): (&str, Utility),
    tz: chrono_tz::Tz,
) -> Option<NegativeConsumption> {
    let device = match &m.source {
        Source::Device(d) => Some(d.clone()),
        Source::Virtual(_) => None,
    };
    let s = device.as_ref().and_then(|d| seg.series.get(d));
    let start = s.and_then(|s| bound(s.first()));
    let end = s.and_then(|s| bound(s.last()));
    let c = consumption.get(&m.name);
    let milli = c.map(|c| crate::money::to_milli(c.value));
    let down = match (&device, c) {
        (Some(d), None) => went_down_in(seg, &m.name, d),
        _ => None,
    };
    let status = match c {
        None if down.is_some() => "counter_decrease",
        None => "missing",
        Some(_) if milli.is_some_and(|v| v < 0) => "negative",
        Some(c) if c.estimated => "estimated",
        Some(_) => "ok",
    };
    let negative = (status == "negative").then(|| NegativeConsumption {
        room: room.to_string(),
        meter: m.name.clone(),
        from: seg.from,
        to: seg.to,
        consumption_milli: milli.unwrap_or_default(),
        inputs: match &m.source {
            Source::Virtual(terms) => terms
                .iter()
                .map(|(sign, t)| {
                    let c = consumption.get(t).map(|c| crate::money::to_milli(c.value));
                    (*sign, t.clone(), c)
                })
                .collect(),
            Source::Device(_) => Vec::new(),
        },
    });
    if let Some(n) = &negative {
        bill.provisional = true;
        let inputs: Vec<String> = n
            .inputs
            .iter()
            .map(|(sign, t, c)| {
                let v = c.map_or_else(|| "unknown".into(), units);
                format!("{} {t} {v}", if *sign < 0 { "−" } else { "+" })
            })
            .collect();
        bill.notes.push(format!(
            "meter {}: consumption came out at {} {} ({}): negative consumption is never billed; its inputs do not balance (a meter wired to the wrong place, a missing reading or an exchange); not billed until it is explained",
            m.name,
            units(n.consumption_milli),
            u.unit(),
            inputs.join(" ")
        ));
    }
    if let Some((a, b)) = down {
        bill.provisional = true;
        bill.notes.push(format!(
            "meter {}: the counter went down from {} at {} to {} at {}{}: a reset, an exchange not recorded as [[replacement]], or a glitch; consumption unknown, not billed until it is explained",
            m.name,
            units(crate::money::to_milli(a.value)),
            local(a.at, tz),
            units(crate::money::to_milli(b.value)),
            local(b.at, tz),
            m.rollover.map_or(String::new(), |r| format!(
                " (too far to be a wrap of its register at {r})"
            ))
        ));
    }
    match status {
        "missing" => {
            bill.provisional = true;
            bill.notes.push(format!(
                "meter {}: no reading {} {}: consumption unknown, not billed yet",
                m.name,
                if start.is_none() {
                    "at or before"
                } else {
                    "at or after"
                },
                local(if start.is_none() { seg.from } else { seg.to }, tz)
            ));
        }
        "estimated" => {
            bill.provisional = true;
            bill.notes.push(format!(
                "meter {}: a boundary reading is interpolated across missing readings (estimated)",
                m.name
            ));
        }
        _ => {}
    }
    bill.meters.push(MeterLine {
        meter: m.name.clone(),
        device,
        start,
        end,
        consumption_milli: milli,
        status: status.to_string(),
        exchanges: exchanges(seg, &m.name).to_vec(),
        resolution: None,
    });
    let Some(milli) = milli.filter(|_| negative.is_none()) else {
        return negative;
    };
    bill.own_milli += milli;
    let Some(t) = tariff else {
        if milli != 0 {
            bill.total = None;
            bill.notes.push(format!(
                "no [[tariff]] bills room {room}'s own {} (add it to a tariff's rooms): own consumption not priced",
                u.unit()
            ));
        }
        return None;
    };
    let split = if t.bands.is_empty() {
        None
    } else {
        let s = band_split(seg, consumption, &m.name, &t.tou(), tz);
        if s.is_none() {
            bill.notes.push(format!(
                "meter {}: not split by band (a reading at a band edge inside the period is missing); priced at the base price",
                m.name
            ));
        }
        s
    };
    let lines =
        split.unwrap_or_else(|| [((tou::BASE_BAND.to_string(), t.price.micros), milli)].into());
    for ((band, micros), v) in lines {
        match bill
            .own
            .iter_mut()
            .find(|l| l.band == band && l.price.micros == micros)
        {
            Some(l) => l.milli += v,
            None => bill.own.push(EnergyLine {
                band,
                price: Price {
                    micros,
                    decimals: t.price.decimals,
                },
                milli: v,
                amount: 0,
            }),
        }
    }
    None
}

fn local(t: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M").to_string()
}

fn units(milli: i64) -> String {
    let sign = if milli < 0 { "-" } else { "" };
    format!("{sign}{}.{:03}", milli.abs() / 1000, milli.abs() % 1000)
}

/// Minor units as a decimal amount ("1234" → "12.34").
#[must_use]
pub fn money(amount: i64, decimals: u32) -> String {
    let d = 10i64.pow(decimals);
    let sign = if amount < 0 { "-" } else { "" };
    format!(
        "{sign}{}.{:0w$}",
        amount.abs() / d,
        amount.abs() % d,
        w = decimals as usize
    )
}

/// The statement as a tenant reads it: readings, consumption, each line's arithmetic, the total.
pub fn explain(b: &RoomBill, tz: chrono_tz::Tz) -> String {
    let mut s = String::new();
    let cur = b.currency.clone().unwrap_or_default();
    let dec = b
        .own
        .first()
        .map(|l| l.price.decimals)
        .or_else(|| b.shares.iter().find_map(|x| x.price.map(|p| p.decimals)))
        .unwrap_or(2);
    let _ = writeln!(
        s,
        "Room {} — {:?} — {} ({} to {}){}",
        b.room,
        b.utility,
        b.period,
        local(b.from, tz),
        local(b.to, tz),
        if b.provisional {
            " — PROVISIONAL"
        } else {
            ""
        }
    );
    for v in &b.tariff_versions {
        let _ = writeln!(
            s,
            "Tariff {}{}: {} to {}",
            v.tariff,
            v.effective_from
                .map_or_else(String::new, |d| format!(" (version from {d})")),
            local(v.from, tz),
            local(v.to, tz)
        );
    }
    let _ = writeln!(s, "Meters:");
    for m in &b.meters {
        let r = |x: &Option<Read>| {
            x.map_or_else(
                || "missing".into(),
                |r| {
                    format!(
                        "{:.3} at {}{}",
                        r.value,
                        local(r.at, tz),
                        if r.estimated { " (estimated)" } else { "" }
                    )
                },
            )
        };
        let _ = writeln!(
            s,
            "  {:<16} start {:<34} end {:<34} = {} {}{}",
            m.meter,
            r(&m.start),
            r(&m.end),
            m.consumption_milli.map_or_else(|| "?".into(), units),
            b.unit,
            m.resolution
                .map_or_else(String::new, |x| format!(" (counter step {x} {})", b.unit))
        );
        for x in &m.exchanges {
            let _ = writeln!(
                s,
                "  {:<16} exchanged at {}: old meter's final {:.3}, new meter's initial {:.3}",
                "",
                local(x.at, tz),
                x.final_reading,
                x.initial_reading
            );
        }
    }
    let _ = writeln!(
        s,
        "Own consumption{}: {} {}",
        if b.prepaid.is_some() {
            " (at the tariff, to compare with the deductions)"
        } else {
            ""
        },
        units(b.own_milli),
        b.unit
    );
    // One band line: consumption × price = amount.
    let energy = |s: &mut String, l: &EnergyLine| {
        let _ = writeln!(
            s,
            "  {:<10} {} {} × {} {cur}/{} = {} {cur}",
            l.band,
            units(l.milli),
            b.unit,
            money(l.price.micros, 6),
            b.unit,
            money(l.amount, l.price.decimals)
        );
    };
    for l in &b.own {
        energy(&mut s, l);
    }
    if let Some(p) = &b.prepaid {
        let _ = writeln!(
            s,
            "Prepaid: deducted from the balance (paid, not charged again):"
        );
        for l in &p.deducted {
            energy(&mut s, l);
        }
        let _ = writeln!(
            s,
            "  deducted {} {cur}; at the tariff {} {cur} (rounding per reading: {})",
            money(p.amount, dec),
            money(p.amount + p.difference, dec),
            money(p.difference, dec)
        );
    }
    for x in &b.shares {
        let _ = writeln!(
            s,
            "Share of pool {} ({} to {}):",
            x.pool,
            local(x.from, tz),
            local(x.to, tz)
        );
        let basis = |s: &mut String, bases: &[BasisShare], indent: &str| {
            for bs in bases {
                let _ = writeln!(
                    s,
                    "{indent}{:?}: {:.3} → share {:.6} × weight {}",
                    bs.basis, bs.value, bs.share, bs.weight
                );
            }
        };
        basis(&mut s, &x.bases, "  ");
        for g in &x.segments {
            let _ = writeln!(
                s,
                "  {} to {}: common {} {}, coefficient {:.6}{}",
                local(g.from, tz),
                local(g.to, tz),
                units(g.common_milli),
                b.unit,
                g.coefficient,
                g.price.map_or_else(String::new, |p| format!(
                    ", at {} {cur}/{}",
                    money(p.micros, 6),
                    b.unit
                ))
            );
            basis(&mut s, &g.bases, "    ");
        }
        let _ = writeln!(
            s,
            "  coefficient {:.6} × common {} {} = {} {}{}",
            x.coefficient,
            units(x.common_milli),
            b.unit,
            units(x.share_milli),
            b.unit,
            match (x.amount, x.common_amount) {
                (Some(a), Some(c)) => format!(
                    "; cost {} {cur} of {} {cur} (largest remainder)",
                    money(a, dec),
                    money(c, dec)
                ),
                _ => String::new(),
            }
        );
    }
    let _ = writeln!(
        s,
        "{}: {}",
        if b.prepaid.is_some() { "Due" } else { "Total" },
        b.total.map_or_else(
            || "not priced (see notes)".into(),
            |t| format!("{} {cur}", money(t, dec))
        )
    );
    for n in &b.notes {
        let _ = writeln!(s, "Note: {n}");
    }
    s
}

/// Per-room differences between two versions of a period's bills.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adjustment {
    pub room: String,
    pub utility: Utility,
    pub old_total: Option<i64>,
    pub new_total: Option<i64>,
    /// new − old, minor units (`None` when either is not priced).
    pub difference: Option<i64>,
    pub currency: Option<String>,
}

/// Every room whose total changed (or that appears in only one version).
#[must_use]
pub fn adjustments(old: &[RoomBill], new: &[RoomBill]) -> Vec<Adjustment> {
    let key = |b: &RoomBill| (b.room.clone(), b.utility);
    let o: BTreeMap<_, _> = old.iter().map(|b| (key(b), b)).collect();
    let n: BTreeMap<_, _> = new.iter().map(|b| (key(b), b)).collect();
    let mut keys: Vec<_> = o.keys().chain(n.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (ob, nb) = (o.get(&k), n.get(&k));
            let old_total = ob.and_then(|b| b.total);
            let new_total = nb.and_then(|b| b.total);
            let difference = match (ob, nb) {
                (Some(_), Some(_)) => new_total.zip(old_total).map(|(a, b)| a - b),
                (None, Some(_)) => new_total,
                (Some(_), None) => old_total.map(|t| -t),
                (None, None) => None,
            };
            if difference == Some(0) {
                return None;
            }
            Some(Adjustment {
                room: k.0,
                utility: k.1,
                old_total,
                new_total,
                difference,
                currency: nb.or(ob).and_then(|b| b.currency.clone()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn a_query_window_is_a_site_month_or_two_times_and_a_bad_one_says_what_to_give() {
        let tz = chrono_tz::Asia::Shanghai;
        let (from, to) = window_arg(&json!({"period": "2026-10"}), tz, "get_ledger").unwrap();
        assert_eq!(from.to_rfc3339(), "2026-09-30T16:00:00+00:00");
        assert!(to > from && to < Utc.with_ymd_and_hms(2026, 10, 31, 16, 0, 1).unwrap());
        let (from, to) = window_arg(
            &json!({"from": "2026-11-30T08:00:00+08:00", "to": "2026-11-30T09:00:00Z"}),
            tz,
            "get_history",
        )
        .unwrap();
        assert_eq!((to - from).num_hours(), 9);
        let e = window_arg(&json!({"period": "2026-13"}), tz, "get_ledger").unwrap_err();
        assert!(
            e.starts_with("get_ledger: \"period\" must be YYYY-MM"),
            "{e}"
        );
        let e = window_arg(&json!({"from": "yesterday"}), tz, "get_history").unwrap_err();
        assert!(e.contains("\"from\" must be an RFC 3339 time"), "{e}");
    }
}
