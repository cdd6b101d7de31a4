//! The site's metering topology: which meter feeds which, which room a meter bills, which meters are
//! common areas. Pure: built from config, then asked for consumption, balances and suspects.
//!
//! Each utility is a forest: master meter(s) → sub-meters → … Rooms hang off the meters that bill
//! them; common-area meters (lifts, HVAC, corridor lighting, pumps) belong to a pool whose consumption
//! is apportioned to rooms. A meter may be virtual: a sum/difference of other meters.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::modbus::profile::Quantity;

/// A metered utility; a tree never mixes two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Utility {
    Electricity,
    Water,
}

impl Utility {
    /// The cumulative counter billed for this utility.
    #[must_use]
    pub fn quantity(self) -> Quantity {
        match self {
            Utility::Electricity => Quantity::EnergyKwh,
            Utility::Water => Quantity::WaterM3,
        }
    }
    /// Unit of the counter.
    #[must_use]
    pub fn unit(self) -> &'static str {
        match self {
            Utility::Electricity => "kWh",
            Utility::Water => "m3",
        }
    }
}

/// A rentable unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Room {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub area_m2: Option<f64>,
    pub headcount: Option<f64>,
    pub floor: Option<i32>,
    /// Medical equipment or similar: utilities are never cut, rules only raise alarms.
    #[serde(default)]
    pub life_critical: bool,
}

/// Where a meter's counter comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Source {
    /// A polled device (by name).
    Device(String),
    /// `+a - b - c`: other meters' consumption combined.
    Virtual(Vec<(i8, String)>),
}

/// A node of a tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Meter {
    pub name: String,
    pub utility: Utility,
    pub source: Source,
    pub parent: Option<String>,
    /// The room this meter bills.
    pub room: Option<String>,
    /// The pool this common-area meter feeds.
    pub pool: Option<String>,
    /// The counter wraps to 0 after this value (e.g. 99999.99 kWh display or a u32 pulse register).
    pub rollover: Option<f64>,
    /// The most the counter can advance in an hour: the meter's rated kW (or m³/h for water). A
    /// counter that went down is taken as a wrap only when the consumption that implies fits it.
    pub max_rate: Option<f64>,
}

/// One part of an apportionment method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// Room floor area.
    Area,
    /// The room's own measured consumption in the period.
    Consumption,
    /// Headcount or traffic figure.
    Headcount,
    /// Coefficients given in config.
    Fixed,
}

/// A common-cost pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pool {
    pub name: String,
    pub utility: Utility,
    pub rooms: Vec<String>,
    /// Weighted mix of bases, weights summing to 1.
    pub method: Vec<(Basis, f64)>,
    /// Multiplier of a room's area/headcount by its floor (e.g. upper floors use the lift more).
    pub floor_weights: BTreeMap<i32, f64>,
    pub fixed: BTreeMap<String, f64>,
    /// Nodes whose loss (parent − Σ children) is added to the pool's common consumption.
    pub include_loss_of: Vec<String>,
    pub tariff: Option<String>,
}

/// A price for a utility.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tariff {
    pub name: String,
    pub utility: Utility,
    /// The base price (the whole day when there are no bands).
    pub price: crate::money::Price,
    pub currency: String,
    /// Time-of-use bands (峰/平/谷) for rooms' own consumption; pools are priced at the base price.
    #[serde(default)]
    pub bands: Vec<crate::tou::Band>,
    /// Rooms whose own consumption this tariff bills (ids, or `["*"]` for every room).
    #[serde(default)]
    pub rooms: Vec<String>,
    /// The site date this version takes effect (00:00 site time); `None` for a tariff's first
    /// version, in force from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_from: Option<chrono::NaiveDate>,
}

/// A later version of a tariff, in force from `at` (its `effective_from` at 00:00 site time) until
/// the next version of the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TariffChange {
    pub at: chrono::DateTime<chrono::Utc>,
    pub tariff: Tariff,
}

impl Tariff {
    /// The price schedule for splitting consumption by band.
    #[must_use]
    pub fn tou(&self) -> crate::tou::TouPrice {
        crate::tou::TouPrice {
            base: self.price,
            bands: self.bands.clone(),
        }
    }

    /// Whether this tariff bills `room`'s own consumption.
    pub(crate) fn bills_room(&self, room: &str) -> bool {
        self.rooms.iter().any(|r| r == "*" || r == room)
    }
}

/// A meter's room or parent from a date on (a correction, or a rewiring): periods from then on are
/// computed with it, earlier ones with what was true before.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assignment {
    pub meter: String,
    /// The first instant it holds: local midnight of its date, in UTC.
    pub from: chrono::DateTime<chrono::Utc>,
    /// The date as written (site time).
    pub date: chrono::NaiveDate,
    pub room: Option<String>,
    pub parent: Option<String>,
    /// Why (kept in the trail).
    pub reason: String,
}

/// The whole topology.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Site {
    pub rooms: BTreeMap<String, Room>,
    pub meters: BTreeMap<String, Meter>,
    pub pools: BTreeMap<String, Pool>,
    /// Each tariff's first version (see `tariff_changes` for the later ones).
    pub tariffs: BTreeMap<String, Tariff>,
    /// Later tariff versions, oldest first: [`Site::as_of`] applies those in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tariff_changes: Vec<TariffChange>,
    /// Loss above this share of a node's consumption raises an event.
    pub loss_threshold_pct: f64,
    /// Dated meter→room / meter→parent changes, oldest first.
    pub assignments: Vec<Assignment>,
    /// parent → children, built once so a 20,000-room site is not rescanned per node.
    #[serde(skip)]
    children_idx: BTreeMap<String, Vec<String>>,
    /// (room, utility) → meters billing it.
    #[serde(skip)]
    room_idx: BTreeMap<(String, Utility), Vec<String>>,
}

impl Site {
    /// Rebuilds the lookup indexes after the meters changed.
    pub(crate) fn index(&mut self) {
        self.children_idx.clear();
        self.room_idx.clear();
        for m in self.meters.values() {
            if let Some(p) = &m.parent {
                self.children_idx
                    .entry(p.clone())
                    .or_default()
                    .push(m.name.clone());
            }
            if let Some(r) = &m.room {
                self.room_idx
                    .entry((r.clone(), m.utility))
                    .or_default()
                    .push(m.name.clone());
            }
        }
    }

    /// Direct children of a meter.
    pub(crate) fn children(&self, name: &str) -> Vec<&Meter> {
        self.children_idx
            .get(name)
            .map(|v| v.iter().filter_map(|c| self.meters.get(c)).collect())
            .unwrap_or_default()
    }

    /// True when nothing is configured (no apportionment, no balance checks).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.meters.is_empty()
    }

    /// The site as it was at `t`: every assignment from `t` or earlier applied, in date order.
    pub(crate) fn as_of(&self, t: chrono::DateTime<chrono::Utc>) -> Site {
        let mut s = self.clone();
        let mut changed = false;
        for a in self.assignments.iter().filter(|a| a.from <= t) {
            if let Some(m) = s.meters.get_mut(&a.meter) {
                if a.room.is_some() {
                    m.room.clone_from(&a.room);
                }
                if a.parent.is_some() {
                    m.parent.clone_from(&a.parent);
                }
                changed = true;
            }
        }
        if changed {
            s.index();
        }
        for c in self.tariff_changes.iter().filter(|c| c.at <= t) {
            s.set_tariff(c.tariff.clone());
        }
        s
    }

    /// Instants in `(from, to)` where the site changes: a dated assignment or a tariff version
    /// takes effect. A bill is computed stretch by stretch between them.
    pub(crate) fn changes_in(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> Vec<chrono::DateTime<chrono::Utc>> {
        let mut cuts: Vec<_> = self
            .assignments
            .iter()
            .map(|a| a.from)
            .chain(self.tariff_changes.iter().map(|c| c.at))
            .filter(|t| *t > from && *t < to)
            .collect();
        cuts.sort();
        cuts.dedup();
        cuts
    }

    /// The tariff that bills `room`'s own consumption of `utility`, if any.
    pub(crate) fn room_tariff(&self, room: &str, utility: Utility) -> Option<&Tariff> {
        self.tariffs
            .values()
            .find(|t| t.utility == utility && t.bills_room(room))
    }

    /// The price of `room`'s own consumption of `utility` over time: the tariff that bills it from
    /// the start and after each version change, resolved as the bill resolves it (`None` when no
    /// tariff bills it from the start).
    pub(crate) fn price_schedule(
        &self,
        room: &str,
        utility: Utility,
    ) -> Option<crate::tou::Schedule> {
        let version = |from, t: &Tariff| crate::tou::Version {
            from,
            tariff: t.name.clone(),
            effective_from: t.effective_from,
            price: t.tou(),
        };
        let billing = |tariffs: &BTreeMap<String, Tariff>| {
            tariffs
                .values()
                .find(|t| t.utility == utility && t.bills_room(room))
                .map(|t| version(None, t))
        };
        let first = billing(&self.tariffs)?;
        // The tariffs as each change leaves them, as `as_of` applies them (without copying the
        // rest of the site once per change).
        let mut tariffs = self.tariffs.clone();
        let (mut later, mut last) = (Vec::new(), first.clone());
        for c in &self.tariff_changes {
            put_tariff(&mut tariffs, c.tariff.clone());
            let Some(v) = billing(&tariffs) else { continue };
            if (&v.tariff, v.effective_from, &v.price)
                != (&last.tariff, last.effective_from, &last.price)
            {
                last = crate::tou::Version {
                    from: Some(c.at),
                    ..v
                };
                later.push(last.clone());
            }
        }
        Some(crate::tou::Schedule::new(first, later))
    }

    /// Sets a tariff; one that names no rooms keeps the rooms of the tariff it replaces (a price
    /// change must not leave rooms unpriced).
    pub(crate) fn set_tariff(&mut self, t: Tariff) {
        put_tariff(&mut self.tariffs, t);
    }

    /// Rooms whose own consumption of a utility more than one tariff claims: (room, utility,
    /// the tariffs' names). Which one would bill it is not for the name's sort order to decide.
    pub(crate) fn rooms_billed_twice(&self) -> Vec<(String, Utility, Vec<String>)> {
        let mut out = Vec::new();
        for r in self.rooms.keys() {
            for u in [Utility::Electricity, Utility::Water] {
                let names: Vec<String> = self
                    .tariffs
                    .values()
                    .filter(|t| t.utility == u && t.bills_room(r))
                    .map(|t| t.name.clone())
                    .collect();
                if names.len() > 1 {
                    out.push((r.clone(), u, names));
                }
            }
        }
        out
    }

    /// What would be wrong with the site if tariff `t` were set (added, or replacing the one of its
    /// name): the checks `meterd check` makes of tariffs, for a change from the cloud.
    pub(crate) fn tariff_change_problems(&self, t: &Tariff) -> Vec<String> {
        let mut out = Vec::new();
        let mut after = self.clone();
        after.set_tariff(t.clone());
        let t = &after.tariffs[&t.name];
        for r in t.rooms.iter().filter(|r| *r != "*") {
            if !self.rooms.contains_key(r) {
                out.push(format!("rooms: unknown room {r:?}"));
            }
        }
        if let Some(old) = self.tariffs.get(&t.name) {
            if old.utility != t.utility {
                out.push(format!(
                    "tariff {:?} prices {}; a tariff keeps its utility (set another name)",
                    t.name,
                    utility_word(old.utility)
                ));
            }
        }
        for p in self.pools.values() {
            if p.tariff.as_deref() == Some(t.name.as_str()) && !t.bands.is_empty() {
                out.push(format!("pool {:?} is priced by tariff {:?}: a pool's common consumption is priced flat, so this tariff cannot have bands", p.name, t.name));
            }
        }
        for (r, u, names) in after.rooms_billed_twice() {
            if names.contains(&t.name) {
                out.push(format!(
                    "room {r:?} would be billed for {} by {} tariffs ({}); give it one (rooms = [...])",
                    utility_word(u),
                    names.len(),
                    names.join(", ")
                ));
            }
        }
        out
    }

    /// Meters of a given room.
    pub(crate) fn room_meters(&self, room: &str, utility: Utility) -> Vec<&Meter> {
        self.room_idx
            .get(&(room.to_string(), utility))
            .map(|v| v.iter().filter_map(|c| self.meters.get(c)).collect())
            .unwrap_or_default()
    }
}

// ---- raw config and validation ------------------------------------------------------------------

/// `[[meter]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeter {
    pub name: String,
    pub utility: Utility,
    /// Polled device; defaults to the meter's name. Not with `virtual`.
    pub device: Option<String>,
    /// e.g. `"main - sub1 - sub2"`.
    #[serde(rename = "virtual")]
    pub expr: Option<String>,
    pub parent: Option<String>,
    pub room: Option<String>,
    pub pool: Option<String>,
    pub rollover: Option<f64>,
    pub max_rate: Option<f64>,
}

/// `[[assignment]]` as written: `meter`, `from = "2026-10-15"`, and `room` and/or `parent`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAssignment {
    pub meter: String,
    pub from: String,
    pub room: Option<String>,
    pub parent: Option<String>,
    #[serde(default)]
    pub reason: String,
}

/// Validates dated assignments against the site (`tz` resolves their dates); every problem as
/// (key, message).
pub(crate) fn assignments(
    site: &Site,
    raw: Vec<(String, RawAssignment)>,
    tz: chrono_tz::Tz,
    issues: &mut Vec<(String, String)>,
) -> Vec<Assignment> {
    let mut out = Vec::new();
    for (key, a) in raw {
        let Some(m) = site.meters.get(&a.meter) else {
            issues.push((
                format!("{key}.meter"),
                format!("unknown meter {:?}", a.meter),
            ));
            continue;
        };
        let Ok(date) = chrono::NaiveDate::parse_from_str(&a.from, "%Y-%m-%d") else {
            issues.push((
                format!("{key}.from"),
                format!(
                    "{:?}: expected the first day it holds, YYYY-MM-DD (site time)",
                    a.from
                ),
            ));
            continue;
        };
        if a.room.is_none() && a.parent.is_none() {
            issues.push((
                key.clone(),
                "give room = \"...\" and/or parent = \"...\"".into(),
            ));
        }
        if let Some(r) = &a.room {
            if !site.rooms.contains_key(r) {
                issues.push((format!("{key}.room"), format!("unknown room {r:?}")));
            }
        }
        if let Some(p) = &a.parent {
            match site.meters.get(p) {
                None => issues.push((format!("{key}.parent"), format!("unknown meter {p:?}"))),
                Some(pm) if pm.utility != m.utility => issues.push((
                    format!("{key}.parent"),
                    format!(
                        "meter {p:?} is {} meter, {:?} is not",
                        lower(pm.utility),
                        a.meter
                    ),
                )),
                Some(_) if *p == a.meter => issues.push((
                    format!("{key}.parent"),
                    "a meter cannot be its own parent".into(),
                )),
                Some(_) => {}
            }
        }
        let from = site_midnight(date, tz);
        out.push(Assignment {
            meter: a.meter,
            from,
            date,
            room: a.room,
            parent: a.parent,
            reason: a.reason,
        });
    }
    out.sort_by_key(|a| a.from);
    out
}

/// `[[pool]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    pub utility: Utility,
    /// Room ids, or `["*"]` for every room.
    pub rooms: Vec<String>,
    /// Weights by basis, e.g. `{ area = 0.5, consumption = 0.5 }`.
    pub method: BTreeMap<Basis, f64>,
    #[serde(default)]
    pub floor_weights: BTreeMap<String, f64>,
    #[serde(default)]
    pub fixed: BTreeMap<String, f64>,
    #[serde(default)]
    pub include_loss_of: Vec<String>,
    pub tariff: Option<String>,
}

/// `[[tariff]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTariff {
    pub name: String,
    pub utility: Utility,
    /// Major currency units per kWh or m³, as a decimal string ("0.8523").
    pub price: String,
    #[serde(default = "cny")]
    pub currency: String,
    #[serde(default = "two")]
    pub decimals: u32,
    /// Time-of-use bands for rooms' own consumption.
    #[serde(default)]
    pub bands: Vec<crate::tou::RawBand>,
    /// Rooms whose own consumption this tariff bills (`["*"]` for all).
    #[serde(default)]
    pub rooms: Vec<String>,
    /// `"YYYY-MM-DD"` (site date): a new version of the tariff of this name from that day on.
    #[serde(default)]
    pub effective_from: Option<String>,
}

impl RawTariff {
    /// The version date, parsed: `Err` says what was expected.
    fn date(&self) -> Result<Option<chrono::NaiveDate>, String> {
        self.effective_from
            .as_deref()
            .map(|d| {
                chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| {
                    format!(
                        "{d:?}: expected the first day this version bills, YYYY-MM-DD (site time)"
                    )
                })
            })
            .transpose()
    }

    /// The tariff with its price and bands checked; problems go to `issues` under `key`.
    pub(crate) fn parse(&self, key: &str, issues: &mut Vec<(String, String)>) -> Option<Tariff> {
        let effective_from = match self.date() {
            Ok(d) => d,
            Err(e) => {
                issues.push((format!("{key}.effective_from"), e));
                None
            }
        };
        match crate::money::Price::parse(&self.price, self.decimals) {
            Ok(price) => Some(Tariff {
                name: self.name.clone(),
                utility: self.utility,
                price,
                currency: self.currency.clone(),
                bands: crate::tou::parse_bands(key, &self.bands, self.decimals, issues),
                rooms: self.rooms.clone(),
                effective_from,
            }),
            Err(e) => {
                issues.push((format!("{key}.price"), e));
                None
            }
        }
    }
}

/// [`Site::set_tariff`] on a map of tariffs.
fn put_tariff(tariffs: &mut BTreeMap<String, Tariff>, mut t: Tariff) {
    if t.rooms.is_empty() {
        if let Some(old) = tariffs.get(&t.name) {
            t.rooms.clone_from(&old.rooms);
        }
    }
    tariffs.insert(t.name.clone(), t);
}

/// The instant a site date begins (00:00 site time, the earliest one where a clock change repeats
/// it).
pub(crate) fn site_midnight(
    date: chrono::NaiveDate,
    tz: chrono_tz::Tz,
) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone;
    tz.from_local_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
        .earliest()
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_default()
}

/// `[[tariff]]` entries with their config keys.
pub(crate) type KeyedTariffs = Vec<(String, RawTariff)>;

/// `[[tariff]]` entries as each tariff's first version (undated, or its earliest date), which
/// [`build`] takes, and its later versions, for [`tariff_changes`]. Two undated entries of one
/// name are a problem: which one bills is not for the file's order to decide.
pub(crate) fn split_tariff_versions(
    raw: Vec<(String, RawTariff)>,
    issues: &mut Vec<(String, String)>,
) -> (KeyedTariffs, KeyedTariffs) {
    let mut by_name: BTreeMap<String, Vec<(String, RawTariff)>> = BTreeMap::new();
    for (k, t) in raw {
        by_name.entry(t.name.clone()).or_default().push((k, t));
    }
    let (mut first, mut later) = (Vec::new(), Vec::new());
    for (name, mut versions) in by_name {
        // Undated first, then by date; unparsable dates last (their error is reported later).
        versions.sort_by_key(|(_, t)| match t.date() {
            Ok(None) => (0, None),
            Ok(Some(d)) => (1, Some(d)),
            Err(_) => (2, None),
        });
        let undated = versions
            .iter()
            .filter(|(_, t)| t.effective_from.is_none())
            .count();
        if undated > 1 {
            issues.push((
                format!("tariff ({name})"),
                format!("{undated} [[tariff]] named {name:?} without effective_from: give the newer ones the date they take effect (effective_from = \"YYYY-MM-DD\")"),
            ));
        }
        let mut it = versions.into_iter();
        first.extend(it.next());
        later.extend(it);
    }
    (first, later)
}

/// The later versions of the site's tariffs, oldest first, each checked: a date, the utility of
/// the tariff's first version, no two versions of one name on one date, and at that date still no
/// room billed by two tariffs and no bands on a pool's tariff.
pub(crate) fn tariff_changes(
    site: &Site,
    later: Vec<(String, RawTariff)>,
    tz: chrono_tz::Tz,
    issues: &mut Vec<(String, String)>,
) -> Vec<TariffChange> {
    let mut out: Vec<(String, TariffChange)> = Vec::new();
    for (key, raw) in later {
        let Some(t) = raw.parse(&key, issues) else {
            continue;
        };
        let Some(date) = t.effective_from else {
            continue;
        };
        let Some(first) = site.tariffs.get(&t.name) else {
            continue;
        };
        if first.utility != t.utility {
            issues.push((
                format!("{key}.utility"),
                format!(
                    "tariff {:?} prices {}; a version keeps its tariff's utility",
                    t.name,
                    utility_word(first.utility)
                ),
            ));
            continue;
        }
        if first.effective_from == Some(date)
            || out
                .iter()
                .any(|(_, c)| c.tariff.name == t.name && c.tariff.effective_from == Some(date))
        {
            issues.push((
                format!("{key}.effective_from"),
                format!(
                    "tariff {:?} already has a version from {date}: one version a day",
                    t.name
                ),
            ));
            continue;
        }
        let at = site_midnight(date, tz);
        out.push((key, TariffChange { at, tariff: t }));
    }
    out.sort_by_key(|(_, c)| c.at);
    let mut site = site.clone();
    let mut changes = Vec::new();
    for (key, c) in out {
        for p in site.tariff_change_problems(&c.tariff) {
            issues.push((
                key.clone(),
                format!("from {}: {p}", c.tariff.effective_from.unwrap_or_default()),
            ));
        }
        site.set_tariff(c.tariff.clone());
        // Stored with the rooms it bills (kept from the version before when it names none).
        let tariff = site.tariffs[&c.tariff.name].clone();
        changes.push(TariffChange { tariff, ..c });
    }
    changes
}

fn cny() -> String {
    "CNY".into()
}
fn two() -> u32 {
    2
}

/// Parses `"a - b + c"`. Meter names may contain hyphens (`main-incomer - room-101`): a `-` is
/// an operator only standing alone or at a term's start or end, `+` always.
pub(crate) fn parse_expr(expr: &str) -> Result<Vec<(i8, String)>, String> {
    let mut out = Vec::new();
    let mut sign = 1i8;
    let mut expect_term = true;
    for tok in expr.split_whitespace().flat_map(split_ops) {
        match tok.as_str() {
            "+" | "-" if !expect_term => {
                sign = if tok == "-" { -1 } else { 1 };
                expect_term = true;
            }
            "+" | "-" => return Err(format!("{expr:?}: two operators in a row")),
            name if expect_term => {
                out.push((sign, name.to_string()));
                expect_term = false;
            }
            name => return Err(format!("{expr:?}: missing + or - before {name:?}")),
        }
    }
    if out.is_empty() || expect_term {
        return Err(format!(
            "{expr:?}: expected meter names joined by + and -, e.g. \"main - sub1 - sub2\""
        ));
    }
    Ok(out)
}

/// One whitespace-separated token as operators and names: `+` anywhere, `-` at either end.
fn split_ops(t: &str) -> Vec<String> {
    let mut v = Vec::new();
    for part in t.split_inclusive('+') {
        let (name, plus) = match part.strip_suffix('+') {
            Some(n) => (n, true),
            None => (part, false),
        };
        let lead = name.len() - name.trim_start_matches('-').len();
        let rest = name.trim_start_matches('-');
        let trail = rest.len() - rest.trim_end_matches('-').len();
        let core = rest.trim_end_matches('-');
        v.extend(std::iter::repeat_n("-".to_string(), lead));
        if !core.is_empty() {
            v.push(core.to_string());
        }
        v.extend(std::iter::repeat_n("-".to_string(), trail));
        if plus {
            v.push("+".into());
        }
    }
    v
}

/// Builds and validates the topology. `devices` maps each polled device to the billing quantities
/// its profile has. Problems come back as (key, message), every one of them.
#[must_use]
pub fn build(
    rooms: Vec<(String, Room)>,
    meters: Vec<(String, RawMeter)>,
    pools: Vec<(String, RawPool)>,
    tariffs: Vec<(String, RawTariff)>,
    loss_threshold_pct: f64,
    devices: &BTreeMap<String, BTreeSet<Quantity>>,
) -> (Site, Vec<(String, String)>) {
    let mut b = SiteBuilder {
        site: Site {
            loss_threshold_pct,
            ..Site::default()
        },
        issues: Vec::new(),
        devices,
        meter_keys: BTreeMap::new(),
    };
    b.rooms(rooms);
    b.meters(meters);
    b.site.index();
    b.check_trees();
    b.unmetered_devices();
    b.tariffs(tariffs);
    b.one_tariff_per_room();
    b.pools(pools);
    b.pool_references();
    b.unbilled_rooms();
    (b.site, b.issues)
}

/// Builds a [`Site`] section by section, collecting every problem as (key, message).
struct SiteBuilder<'a> {
    site: Site,
    issues: Vec<(String, String)>,
    devices: &'a BTreeMap<String, BTreeSet<Quantity>>,
    /// Config key of each meter node by name, for messages about it.
    meter_keys: BTreeMap<String, String>,
}

impl SiteBuilder<'_> {
    /// Rooms: ids present and unique, areas and headcounts ≥ 0.
    fn rooms(&mut self, rooms: Vec<(String, Room)>) {
        for (key, r) in rooms {
            if r.id.trim().is_empty() {
                self.issues
                    .push((format!("{key}.id"), "must not be empty".into()));
            }
            for (field, v) in [("area_m2", r.area_m2), ("headcount", r.headcount)] {
                if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                    self.issues
                        .push((format!("{key}.{field}"), "must be a number ≥ 0".into()));
                }
            }
            if self.site.rooms.insert(r.id.clone(), r.clone()).is_some() {
                self.issues
                    .push((format!("{key}.id"), format!("duplicate room id {:?}", r.id)));
            }
        }
    }

    /// Meter nodes: each reads one polled device that has the utility's counter, or is virtual;
    /// a device in two nodes would be counted twice.
    fn meters(&mut self, meters: Vec<(String, RawMeter)>) {
        let mut device_owner: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
        for (key, m) in meters {
            let source = match (&m.device, &m.expr) {
                (Some(_), Some(_)) => {
                    self.issues
                        .push((key.clone(), "set either device or virtual, not both".into()));
                    continue;
                }
                (_, Some(e)) => match parse_expr(e) {
                    Ok(terms) => Source::Virtual(terms),
                    Err(msg) => {
                        self.issues.push((format!("{key}.virtual"), msg));
                        continue;
                    }
                },
                (d, None) => {
                    let dev = d.clone().unwrap_or_else(|| m.name.clone());
                    match self.devices.get(&dev) {
                        None => self.issues.push((
                            format!("{key}.device"),
                            format!("no [[device]] named {dev:?}; a meter node reads a polled device (set device = \"...\") or is virtual"),
                        )),
                        Some(q) if !q.contains(&m.utility.quantity()) => self.issues.push((
                            format!("{key}.device"),
                            format!("device {dev:?} has no {} register: its profile cannot meter {:?}", m.utility.quantity(), m.utility),
                        )),
                        Some(_) => {}
                    }
                    if let Some((other, other_parent)) =
                        device_owner.insert(dev.clone(), (m.name.clone(), m.parent.clone()))
                    {
                        self.issues.push((
                            format!("{key}.device"),
                            format!(
                                "device {dev:?} is already meter {other:?} (parent {}); a meter with two parents ({}) double-counts: keep one node",
                                other_parent.as_deref().unwrap_or("none"),
                                m.parent.as_deref().unwrap_or("none")
                            ),
                        ));
                    }
                    Source::Device(dev)
                }
            };
            if let Some(r) = &m.room {
                if !self.site.rooms.contains_key(r) {
                    self.issues.push((
                        format!("{key}.room"),
                        format!("unknown room {r:?}; declare it in [[room]]"),
                    ));
                }
            }
            if m.rollover.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                self.issues.push((
                    format!("{key}.rollover"),
                    "must be a positive number".into(),
                ));
            }
            if m.max_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                self.issues.push((
                    format!("{key}.max_rate"),
                    "must be a positive number: the meter's rated kW (or m³/h for water), e.g. 13.8 for a 10(60) A single-phase meter".into(),
                ));
            }
            self.meter_keys.insert(m.name.clone(), key.clone());
            let node = Meter {
                name: m.name.clone(),
                utility: m.utility,
                source,
                parent: m.parent.clone(),
                room: m.room.clone(),
                pool: m.pool.clone(),
                rollover: m.rollover,
                max_rate: m.max_rate,
            };
            if self.site.meters.insert(m.name.clone(), node).is_some() {
                self.issues.push((
                    format!("{key}.name"),
                    format!("duplicate meter name {:?}", m.name),
                ));
            }
        }
    }

    /// Parents, utilities, cycles, virtual references.
    fn check_trees(&mut self) {
        // Parents, utilities, cycles, virtual references.
        for m in self.site.meters.values() {
            let key = &self.meter_keys[&m.name];
            if let Some(p) = &m.parent {
                match self.site.meters.get(p) {
                    None => self
                        .issues
                        .push((format!("{key}.parent"), format!("unknown meter {p:?}"))),
                    Some(pm) if pm.utility != m.utility => self.issues.push((
                        format!("{key}.parent"),
                        format!(
                            "{} meter {:?} under {} meter {p:?}: a tree never mixes utilities",
                            lower(m.utility),
                            m.name,
                            lower(pm.utility)
                        ),
                    )),
                    Some(_) => {}
                }
            }
            if let Source::Virtual(terms) = &m.source {
                for (_, t) in terms {
                    match self.site.meters.get(t) {
                        None => {
                            let parts: Vec<&str> = t.split('-').collect();
                            let hint = if parts.len() > 1
                                && parts.iter().all(|p| self.site.meters.contains_key(*p))
                            {
                                format!(
                                    "; to subtract, put spaces around the minus: {:?}",
                                    parts.join(" - ")
                                )
                            } else {
                                String::new()
                            };
                            self.issues.push((
                                format!("{key}.virtual"),
                                format!("unknown meter {t:?}{hint}"),
                            ));
                        }
                        Some(tm) if tm.utility != m.utility => self.issues.push((
                            format!("{key}.virtual"),
                            format!("{t:?} meters another utility"),
                        )),
                        Some(_) if t == &m.name => {
                            self.issues
                                .push((format!("{key}.virtual"), "refers to itself".into()));
                        }
                        Some(_) => {}
                    }
                }
            }
            // Walk up; a path longer than the number of meters is a cycle.
            let mut path = vec![m.name.clone()];
            let mut cur = m.parent.clone();
            while let Some(p) = cur {
                if path.contains(&p) {
                    if path[0] == *path.iter().min().unwrap_or(&path[0]) {
                        path.push(p);
                        self.issues.push((
                            format!("{key}.parent"),
                            format!("cycle: {}", path.join(" → ")),
                        ));
                    }
                    break;
                }
                path.push(p.clone());
                cur = self.site.meters.get(&p).and_then(|x| x.parent.clone());
            }
        }
    }

    /// Polled devices with a billing counter that no tree contains.
    fn unmetered_devices(&mut self) {
        // Polled self.devices with a billing counter that no tree contains.
        let used: BTreeSet<&String> = self
            .site
            .meters
            .values()
            .filter_map(|m| match &m.source {
                Source::Device(d) => Some(d),
                Source::Virtual(_) => None,
            })
            .collect();
        if !self.site.meters.is_empty() {
            for (dev, qs) in self.devices {
                if (qs.contains(&Quantity::EnergyKwh) || qs.contains(&Quantity::WaterM3))
                    && !used.contains(dev)
                {
                    self.issues.push((
                        format!("device ({dev})"),
                        "meters energy or water but is in no [[meter]] tree; add a [[meter]] node for it (its consumption would otherwise be unaccounted)".into(),
                    ));
                }
            }
        }
    }

    /// Tariffs: prices and time-of-use bands parse, rooms exist.
    fn tariffs(&mut self, tariffs: Vec<(String, RawTariff)>) {
        for (key, raw) in tariffs {
            let Some(t) = raw.parse(&key, &mut self.issues) else {
                continue;
            };
            for r in t.rooms.iter().filter(|r| *r != "*") {
                if !self.site.rooms.contains_key(r) {
                    self.issues
                        .push((format!("{key}.rooms"), format!("unknown room {r:?}")));
                }
            }
            self.site.tariffs.insert(t.name.clone(), t);
        }
    }

    /// One tariff per room and utility for own consumption.
    fn one_tariff_per_room(&mut self) {
        for (r, u, names) in self.site.rooms_billed_twice() {
            self.issues.push((
                format!("tariff ({})", names.join(", ")),
                format!(
                    "room {r:?} is billed for {} by {} tariffs; give each room one (rooms = [...])",
                    lower(u).trim_start_matches("an ").trim_start_matches("a "),
                    names.len()
                ),
            ));
        }
    }

    /// Pools: rooms exist, method weights sum to 1, every room has what the method needs.
    fn pools(&mut self, pools: Vec<(String, RawPool)>) {
        for (key, p) in pools {
            let rooms: Vec<String> = if p.rooms == ["*"] {
                self.site.rooms.keys().cloned().collect()
            } else {
                p.rooms.clone()
            };
            for r in &rooms {
                if !self.site.rooms.contains_key(r) {
                    self.issues
                        .push((format!("{key}.rooms"), format!("unknown room {r:?}")));
                }
            }
            if rooms.is_empty() {
                self.issues.push((
                    format!("{key}.rooms"),
                    "a pool needs at least one room".into(),
                ));
            }
            let total: f64 = p.method.values().sum();
            if p.method.is_empty()
                || (total - 1.0).abs() > 1e-9
                || p.method.values().any(|w| w.is_nan() || *w < 0.0)
            {
                self.issues.push((
                    format!("{key}.method"),
                    format!("weights must be ≥ 0 and sum to 1 (they sum to {total}); e.g. {{ area = 0.5, consumption = 0.5 }}"),
                ));
            }
            let mut floor_weights = BTreeMap::new();
            for (f, w) in &p.floor_weights {
                match f.parse::<i32>() {
                    Ok(f) if *w >= 0.0 => {
                        floor_weights.insert(f, *w);
                    }
                    _ => self.issues.push((
                        format!("{key}.floor_weights.{f}"),
                        "expected floor number = weight ≥ 0".into(),
                    )),
                }
            }
            for (basis, _) in p.method.iter().filter(|(_, w)| **w > 0.0) {
                for r in rooms.iter().filter_map(|r| self.site.rooms.get(r)) {
                    let missing = match basis {
                        Basis::Area => r.area_m2.is_none().then_some("area_m2"),
                        Basis::Headcount => r.headcount.is_none().then_some("headcount"),
                        Basis::Fixed => {
                            (!p.fixed.contains_key(&r.id)).then_some("a fixed coefficient")
                        }
                        Basis::Consumption => self
                            .site
                            .room_meters(&r.id, p.utility)
                            .is_empty()
                            .then_some("a meter of this utility"),
                    };
                    if let Some(what) = missing {
                        self.issues.push((
                            format!("{key}.method.{}", format!("{basis:?}").to_lowercase()),
                            format!("room {:?} has no {what}, which this method needs", r.id),
                        ));
                    }
                }
                if floor_weights.is_empty() {
                    continue;
                }
                for r in rooms.iter().filter_map(|r| self.site.rooms.get(r)) {
                    if matches!(basis, Basis::Area | Basis::Headcount)
                        && r.floor.is_none_or(|f| !floor_weights.contains_key(&f))
                    {
                        self.issues.push((
                            format!("{key}.floor_weights"),
                            format!("room {:?} has no floor with a weight", r.id),
                        ));
                    }
                }
            }
            for (r, c) in &p.fixed {
                if !rooms.contains(r) {
                    self.issues.push((
                        format!("{key}.fixed.{r}"),
                        format!("room {r:?} is not in this pool's rooms; a fixed coefficient is for a room the pool splits to"),
                    ));
                }
                if !c.is_finite() || *c < 0.0 {
                    self.issues.push((
                        format!("{key}.fixed.{r}"),
                        format!("{c}: expected a coefficient ≥ 0 (a negative one would bill the other rooms more than the pool)"),
                    ));
                }
            }
            if p.method.get(&Basis::Fixed).is_some_and(|w| *w > 0.0)
                && rooms
                    .iter()
                    .filter_map(|r| p.fixed.get(r))
                    .all(|c| *c <= 0.0)
            {
                self.issues.push((
                    format!("{key}.fixed"),
                    "the fixed coefficients are all 0: give at least one room a coefficient > 0"
                        .into(),
                ));
            }
            for l in &p.include_loss_of {
                if !self.site.meters.contains_key(l) {
                    self.issues.push((
                        format!("{key}.include_loss_of"),
                        format!("unknown meter {l:?}"),
                    ));
                }
            }
            if let Some(t) = &p.tariff {
                match self.site.tariffs.get(t) {
                    None => self.issues.push((format!("{key}.tariff"), format!("unknown tariff {t:?}"))),
                    Some(t) if t.utility != p.utility => self.issues.push((
                        format!("{key}.tariff"),
                        "tariff is for another utility".into(),
                    )),
                    Some(t) if !t.bands.is_empty() => self.issues.push((
                        format!("{key}.tariff"),
                        format!("tariff {:?} has time-of-use bands; a pool's common consumption is priced flat: give the pool a tariff without bands", t.name),
                    )),
                    Some(_) => {}
                }
            }
            self.site.pools.insert(
                p.name.clone(),
                Pool {
                    name: p.name.clone(),
                    utility: p.utility,
                    rooms,
                    method: p.method.iter().map(|(b, w)| (*b, *w)).collect(),
                    floor_weights,
                    fixed: p.fixed.clone(),
                    include_loss_of: p.include_loss_of.clone(),
                    tariff: p.tariff.clone(),
                },
            );
        }
    }

    /// Meters name pools that exist, of their utility.
    fn pool_references(&mut self) {
        for m in self.site.meters.values() {
            if let Some(p) = &m.pool {
                match self.site.pools.get(p) {
                    None => self.issues.push((
                        format!("{}.pool", self.meter_keys[&m.name]),
                        format!("unknown pool {p:?}"),
                    )),
                    Some(pool) if pool.utility != m.utility => self.issues.push((
                        format!("{}.pool", self.meter_keys[&m.name]),
                        "pool is for another utility".into(),
                    )),
                    Some(_) => {}
                }
            }
        }
    }

    /// Every room is billed by some meter.
    fn unbilled_rooms(&mut self) {
        if !self.site.meters.is_empty() {
            for r in self.site.rooms.values() {
                if self
                    .site
                    .room_meters(&r.id, Utility::Electricity)
                    .is_empty()
                    && self.site.room_meters(&r.id, Utility::Water).is_empty()
                {
                    self.issues.push((
                        format!("room ({})", r.id),
                        "no meter bills this room; set room = \"...\" on its meter".into(),
                    ));
                }
            }
        }
    }
}

/// "electricity" or "water", without the article [`lower`] gives.
fn utility_word(u: Utility) -> &'static str {
    lower(u).trim_start_matches("an ").trim_start_matches("a ")
}

fn lower(u: Utility) -> &'static str {
    match u {
        Utility::Electricity => "an electricity",
        Utility::Water => "a water",
    }
}

// ---- consumption and balance ---------------------------------------------------------------------

/// A counter value at an interval boundary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Boundary {
    pub value: f64,
    /// Interpolated across a gap in the readings.
    pub estimated: bool,
}

/// A meter exchange (`[[replacement]]`): when, the old meter's final reading and the new one's
/// first. A bill shows it so that a tenant can redo the consumption as the sum of both meters'.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Replacement {
    pub at: chrono::DateTime<chrono::Utc>,
    pub final_reading: f64,
    pub initial_reading: f64,
}

/// Consumption of one meter over an interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Consumption {
    pub value: f64,
    pub estimated: bool,
}

/// The consumption, in thousandths, of a counter that went down from `start` to `end` if that was a
/// wrap: only with a `rollover`, when it implies no more than half the register (the counter was in
/// its top half and is now in its bottom half) and no more than `max_advance` (the meter's rated
/// rate over the interval). Anything else (a reset, an exchange not recorded, a glitch) is not a
/// wrap: `None`.
pub(crate) fn wrap_milli(
    start_milli: i64,
    end_milli: i64,
    rollover: Option<f64>,
    max_advance: Option<f64>,
) -> Option<i64> {
    let max = crate::money::to_milli(rollover?);
    let implied = end_milli + max - start_milli;
    let fits = max_advance.is_none_or(|a| implied <= crate::money::to_milli(a));
    (end_milli < start_milli && implied <= max / 2 && fits).then_some(implied)
}

/// Interval consumption from a cumulative counter: the counter's advance over each meter's part of
/// the interval (from `start` to the first exchange's final reading, from its initial reading to
/// the next one's final, …, to `end`), each part allowed to wrap (`rollover`, when plausible:
/// [`wrap_milli`]). Returns `None` when a part went down unexplained (a reset nobody recorded, a
/// glitch): that figure must not be billed. `max_advance` is the most the meter can count over the
/// interval (its `max_rate` × the interval's hours); `exchanges` are those inside it, in time order.
pub(crate) fn counter_consumption(
    start: Boundary,
    end: Boundary,
    rollover: Option<f64>,
    max_advance: Option<f64>,
    exchanges: &[Replacement],
) -> Option<Consumption> {
    let estimated = start.estimated || end.estimated;
    // Differences of the readings as a bill prints them (thousandths): a tenant subtracting the
    // printed readings gets the same figure, and the band lines (split at readings rounded the
    // same way) add up to it exactly, whatever a float32 register's last digits were.
    let m = crate::money::to_milli;
    let mut readings = vec![m(start.value)];
    for x in exchanges {
        readings.extend([m(x.final_reading), m(x.initial_reading)]);
    }
    readings.push(m(end.value));
    let mut milli = 0;
    for part in readings.chunks(2) {
        let (a, b) = (part[0], part[1]);
        milli += if b >= a {
            b - a
        } else {
            wrap_milli(a, b, rollover, max_advance)?
        };
    }
    Some(Consumption {
        value: milli as f64 / 1000.0,
        estimated,
    })
}

/// The counter at time `t` from the samples around it: linear interpolation between the last sample
/// at or before `t` and the first after it. `estimated` when the bracketing samples are further apart
/// than `max_gap` (a reading is missing there). `samples` are (time, value) sorted by time.
pub(crate) fn value_at(
    samples: &[(i64, f64)],
    t: i64,
    max_gap: i64,
    rollover: Option<f64>,
) -> Option<Boundary> {
    let i = samples.partition_point(|(ts, _)| *ts <= t);
    let before = i.checked_sub(1).map(|k| samples[k]);
    let after = samples.get(i).copied();
    match (before, after) {
        (Some((tb, vb)), _) if tb == t => Some(Boundary {
            value: vb,
            estimated: false,
        }),
        (Some((tb, vb)), Some((ta, va))) => {
            let mut va = va;
            if va < vb {
                // Between two samples only a plausible wrap is bridged; after a reset the value
                // at `t` is unknown.
                wrap_milli(
                    crate::money::to_milli(vb),
                    crate::money::to_milli(va),
                    rollover,
                    None,
                )?;
                va += rollover?;
            }
            let f = (t - tb) as f64 / (ta - tb) as f64;
            let mut v = vb + (va - vb) * f;
            if let Some(max) = rollover {
                if v >= max {
                    v -= max;
                }
            }
            Some(Boundary {
                value: v,
                estimated: ta - tb > max_gap,
            })
        }
        _ => None,
    }
}

/// Consumption of every meter, virtual ones included, from the device counters' consumption.
pub(crate) fn meter_consumption(
    site: &Site,
    device: &BTreeMap<String, Consumption>,
) -> BTreeMap<String, Consumption> {
    let mut out = BTreeMap::new();
    for m in site.meters.values() {
        if let Source::Device(d) = &m.source {
            if let Some(c) = device.get(d) {
                out.insert(m.name.clone(), *c);
            }
        }
    }
    // Virtual meters may refer to virtual meters: resolve until nothing changes.
    for _ in 0..site.meters.len() {
        let mut changed = false;
        for m in site.meters.values() {
            if let Source::Virtual(terms) = &m.source {
                if out.contains_key(&m.name) {
                    continue;
                }
                let parts: Option<Vec<(i8, Consumption)>> = terms
                    .iter()
                    .map(|(s, t)| out.get(t).map(|c| (*s, *c)))
                    .collect();
                if let Some(parts) = parts {
                    let value = parts.iter().map(|(s, c)| f64::from(*s) * c.value).sum();
                    let estimated = parts.iter().any(|(_, c)| c.estimated);
                    out.insert(m.name.clone(), Consumption { value, estimated });
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    out
}

/// The balance of one node: its consumption against its children's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Balance {
    pub node: String,
    pub consumption: f64,
    pub children: f64,
    /// consumption − Σ children.
    pub loss: f64,
    pub loss_pct: f64,
    pub estimated: bool,
    /// Loss above the threshold, or children exceeding their parent beyond it.
    pub alarm: bool,
    /// The meter most likely wired to the wrong place, with where it probably belongs.
    pub suspect: Option<Suspect>,
}

/// A meter whose consumption does not fit where the topology puts it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suspect {
    pub meter: String,
    /// A parent under which the meter would balance both nodes, if one exists.
    pub belongs_under: Option<String>,
}

/// Balances of every node with children. Where a node's children exceed it (negative loss beyond the
/// threshold), the child whose removal balances the node is named; if moving it under another node
/// also brings that node's excess loss within the threshold, that node is named too.
#[must_use]
pub fn balances(site: &Site, consumption: &BTreeMap<String, Consumption>) -> Vec<Balance> {
    let threshold = site.loss_threshold_pct.max(0.0);
    let mut out = Vec::new();
    let raw: BTreeMap<&str, (f64, f64, bool)> = site
        .meters
        .values()
        .filter_map(|m| {
            let kids = site.children(&m.name);
            if kids.is_empty() {
                return None;
            }
            let own = consumption.get(&m.name)?;
            let mut sum = 0.0;
            let mut est = own.estimated;
            for k in &kids {
                let c = consumption.get(&k.name)?;
                sum += c.value;
                est |= c.estimated;
            }
            Some((m.name.as_str(), (own.value, sum, est)))
        })
        .collect();
    let pct = |loss: f64, base: f64| {
        if base.abs() > f64::EPSILON {
            loss / base * 100.0
        } else if loss.abs() > f64::EPSILON {
            f64::INFINITY.copysign(loss)
        } else {
            0.0
        }
    };
    for (node, (own, sum, est)) in &raw {
        let loss = own - sum;
        let loss_pct = pct(loss, *own);
        let alarm = loss_pct.abs() > threshold;
        let mut suspect = None;
        if loss_pct < -threshold {
            // Which child, removed, leaves the node balanced (|loss| within the threshold)?
            let mut best: Option<(f64, &str)> = None;
            for k in site.children(node) {
                let Some(c) = consumption.get(&k.name) else {
                    continue;
                };
                let l = pct(loss + c.value, *own).abs();
                if l <= threshold && best.is_none_or(|(b, _)| l < b) {
                    best = Some((l, k.name.as_str()));
                }
            }
            if let Some((_, child)) = best {
                let c = consumption[child].value;
                let belongs_under = raw
                    .iter()
                    .filter(|(other, _)| {
                        *other != node
                            && site.meters.get(**other).map(|m| m.utility)
                                == site.meters.get(*node).map(|m| m.utility)
                    })
                    .find(|(_, (o_own, o_sum, _))| {
                        let before = pct(o_own - o_sum, *o_own);
                        let after = pct(o_own - o_sum - c, *o_own);
                        before > threshold && after.abs() <= threshold
                    })
                    .map(|(n, _)| n.to_string());
                suspect = Some(Suspect {
                    meter: child.to_string(),
                    belongs_under,
                });
            }
        }
        out.push(Balance {
            node: node.to_string(),
            consumption: *own,
            children: *sum,
            loss,
            loss_pct,
            estimated: *est,
            alarm,
            suspect,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(v: f64) -> Boundary {
        Boundary {
            value: v,
            estimated: false,
        }
    }

    /// Before the fix a tariff from the cloud was applied as sent: a second tariff claiming a room
    /// billed it by whichever name sorted first, and bands on a pool's tariff were taken.
    #[test]
    fn a_tariff_change_that_would_bill_a_room_twice_or_band_a_pool_is_named() {
        let price = |p: &str| crate::money::Price::parse(p, 2).unwrap();
        let flat = |name: &str, rooms: &[&str]| Tariff {
            name: name.into(),
            utility: Utility::Electricity,
            price: price("0.8523"),
            currency: "CNY".into(),
            bands: Vec::new(),
            rooms: rooms.iter().map(|r| (*r).to_string()).collect(),
            effective_from: None,
        };
        let mut site = Site::default();
        for r in ["101", "102"] {
            site.rooms.insert(
                r.into(),
                Room {
                    id: r.into(),
                    name: String::new(),
                    area_m2: Some(40.0),
                    headcount: None,
                    floor: None,
                    life_critical: false,
                },
            );
        }
        site.set_tariff(flat("home", &["*"]));
        site.set_tariff(flat("stairs", &[]));
        site.pools.insert(
            "stairs".into(),
            Pool {
                name: "stairs".into(),
                utility: Utility::Electricity,
                rooms: vec!["101".into(), "102".into()],
                method: vec![(Basis::Area, 1.0)],
                floor_weights: BTreeMap::new(),
                fixed: BTreeMap::new(),
                include_loss_of: Vec::new(),
                tariff: Some("stairs".into()),
            },
        );
        assert!(site.tariff_change_problems(&flat("home", &[])).is_empty());
        let shop = site.tariff_change_problems(&flat("shop", &["102", "109"]));
        assert_eq!(
            shop,
            [
                "rooms: unknown room \"109\"",
                "room \"102\" would be billed for electricity by 2 tariffs (home, shop); give it one (rooms = [...])"
            ],
            "{shop:?}"
        );
        let mut banded = flat("stairs", &[]);
        banded.bands = crate::tou::parse_bands(
            "t",
            &[crate::tou::RawBand {
                name: Some("peak".into()),
                from: "08:00".into(),
                to: "22:00".into(),
                price: "1.0".into(),
            }],
            2,
            &mut Vec::new(),
        );
        let p = site.tariff_change_problems(&banded);
        assert!(
            p[0].contains("pool \"stairs\" is priced by tariff \"stairs\""),
            "{p:?}"
        );
        let mut water = flat("home", &[]);
        water.utility = Utility::Water;
        let p = site.tariff_change_problems(&water);
        assert!(p[0].contains("a tariff keeps its utility"), "{p:?}");
    }

    #[test]
    fn counter_rollover_replacement_and_unexplained_reset() {
        assert_eq!(
            counter_consumption(b(10.0), b(25.5), None, None, &[])
                .unwrap()
                .value,
            15.5
        );
        // A 5-digit kWh register wraps at 100000: 99990 → 15 is 25 kWh.
        assert_eq!(
            counter_consumption(b(99_990.0), b(15.0), Some(100_000.0), None, &[])
                .unwrap()
                .value,
            25.0
        );
        // Replaced mid-month: old meter 1200 → 1250 (final), new meter 0 → 30.
        let at = chrono::DateTime::UNIX_EPOCH;
        let r = Replacement {
            at,
            final_reading: 1250.0,
            initial_reading: 0.0,
        };
        assert_eq!(
            counter_consumption(b(1200.0), b(30.0), None, None, &[r])
                .unwrap()
                .value,
            80.0
        );
        // Two exchanges: 1200 → 1250, 0.02 → 7.5 (a faulty new meter), 0.01 → 30.
        let r2 = Replacement {
            at,
            final_reading: 7.5,
            initial_reading: 0.01,
        };
        let first = Replacement {
            initial_reading: 0.02,
            ..r
        };
        assert_eq!(
            counter_consumption(b(1200.0), b(30.0), None, None, &[first, r2])
                .unwrap()
                .value,
            87.47 // 50 + 7.48 + 29.99
        );
        // A part that goes down (the last meter reset from 0.01 to 0) is not billed.
        assert_eq!(
            counter_consumption(b(1200.0), b(0.0), None, None, &[first, r2]),
            None
        );
        assert_eq!(
            counter_consumption(b(100.0), b(50.0), None, None, &[]),
            None,
            "unexplained reset is not billed"
        );
    }

    /// Before the fix any decrease of a counter with `rollover` was a wrap: a meter reset from
    /// 5,150 to 0 kWh on a 999,999.99 register billed 994,849.99 kWh (847,900.55 CNY at 0.8523).
    #[test]
    fn a_counter_reset_is_not_taken_for_a_wrap_of_the_register() {
        let max = Some(999_999.99);
        // Reset from 5,150.00 to 0, then 12.34 kWh: not a wrap (it would be 994,862 kWh).
        assert_eq!(
            counter_consumption(b(5_150.0), b(12.34), max, None, &[]),
            None
        );
        // A real wrap: 999,990.00 → 15.00 is 24.99 kWh.
        assert_eq!(
            counter_consumption(b(999_990.0), b(15.0), max, None, &[])
                .unwrap()
                .value,
            24.99
        );
        // Near the top, but more than the meter can count in the interval: a 10(60) A meter
        // (13.8 kW) over a 720-hour month counts at most 9,936 kWh; 600,000 → 1,000 would be
        // 400,999.99.
        let month = Some(13.8 * 720.0);
        assert_eq!(
            counter_consumption(b(600_000.0), b(1_000.0), max, month, &[]),
            None
        );
        assert_eq!(
            counter_consumption(b(999_000.0), b(500.0), max, month, &[])
                .unwrap()
                .value,
            1_499.99
        );
        // A 5-digit display (wraps after 99,999.99): 99,950 → 30 is 80 kWh; 40,000 → 30 is not.
        let five = Some(99_999.99);
        assert!(counter_consumption(b(99_950.0), b(30.0), five, None, &[]).is_some());
        assert_eq!(
            counter_consumption(b(40_000.0), b(30.0), five, None, &[]),
            None
        );
        // Between two samples, likewise: a reset is not bridged.
        let s = [(0, 5_150.0), (900, 0.12)];
        assert_eq!(value_at(&s, 450, 1800, max), None);
        let s = [(0, 999_999.5), (900, 0.4)];
        assert!(value_at(&s, 450, 1800, max).is_some());
    }

    #[test]
    fn boundary_values_interpolate_across_gaps_and_say_so() {
        let s = [(0, 100.0), (900, 101.0), (1800, 102.0), (9000, 110.0)];
        assert_eq!(value_at(&s, 900, 1800, None), Some(b(101.0)));
        let v = value_at(&s, 1350, 1800, None).unwrap();
        assert!((v.value - 101.5).abs() < 1e-9 && !v.estimated);
        let v = value_at(&s, 5400, 1800, None).unwrap();
        assert!((v.value - 106.0).abs() < 1e-9);
        assert!(v.estimated, "two hours without a reading");
        assert_eq!(
            value_at(&s, 9500, 1800, None),
            None,
            "no reading after: cannot tell"
        );
        // Across a wrap at 1000: 990 → 10 over 20 s, midpoint is 1000 ≡ 0.
        let w = [(0, 990.0), (20, 10.0)];
        assert!((value_at(&w, 10, 60, Some(1000.0)).unwrap().value - 0.0).abs() < 1e-9);
    }

    #[test]
    fn virtual_meter_expressions_parse_signed_terms_and_reject_malformed_ones() {
        assert_eq!(
            parse_expr("main - sub1 - sub2").unwrap(),
            vec![(1, "main".into()), (-1, "sub1".into()), (-1, "sub2".into())]
        );
        assert_eq!(
            parse_expr("a+b").unwrap(),
            vec![(1, "a".into()), (1, "b".into())]
        );
        assert!(parse_expr("a - - b").is_err());
        assert!(parse_expr("a b").is_err());
        assert!(parse_expr("a -").is_err());
        assert_eq!(
            parse_expr("a -b").unwrap(),
            vec![(1, "a".into()), (-1, "b".into())]
        );
    }

    /// Before the fix every `-` split a name: the shipped example `main-incomer - common-hvac`
    /// read as main − incomer − common − hvac, and `meterd check` refused it (unknown meter
    /// "main", "incomer", …).
    #[test]
    fn a_virtual_meter_over_hyphenated_names_subtracts_the_meters_named() {
        assert_eq!(
            parse_expr("main-incomer - common-hvac").unwrap(),
            vec![(1, "main-incomer".into()), (-1, "common-hvac".into())]
        );
        assert_eq!(
            parse_expr("floor2-board -room-201+ room-202").unwrap(),
            vec![
                (1, "floor2-board".into()),
                (-1, "room-201".into()),
                (1, "room-202".into())
            ]
        );
    }
}
