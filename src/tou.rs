//! Time-of-use pricing (峰/平/谷): bands of local time with their own price, and the exact split of a
//! counter's consumption across band changes. Pure; used by prepaid deduction and by the bills.
//!
//! Consumption between two counter points is assumed to flow evenly in time (the only honest
//! assumption without a reading in between), so an interval that crosses a band change is split in
//! proportion to the time spent in each band. Callers pass every reading they have inside a long
//! interval (history samples), so the even-flow assumption only ever spans the gaps between them.
//! Splits are done on cumulative integer thousandths, so the pieces always add up exactly.

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::money::Price;

/// Name of the part of the day no band covers (priced at the base price).
pub(crate) const BASE_BAND: &str = "base";

/// A band: `price` from `from` to `to` local time (wrapping midnight when `to < from`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Band {
    /// What bills and the ledger call it ("peak", "valley"); defaults to "HH:MM-HH:MM".
    pub name: String,
    pub from: NaiveTime,
    pub to: NaiveTime,
    pub price: Price,
}

/// A base price and optional time-of-use bands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TouPrice {
    pub base: Price,
    #[serde(default)]
    pub bands: Vec<Band>,
}

impl TouPrice {
    /// A flat price.
    pub fn flat(base: Price) -> TouPrice {
        TouPrice {
            base,
            bands: Vec::new(),
        }
    }

    /// The band in force at local time `t` and its price.
    pub(crate) fn band_at(&self, t: NaiveTime) -> (&str, Price) {
        self.bands
            .iter()
            .find(|b| {
                if b.from <= b.to {
                    t >= b.from && t < b.to
                } else {
                    t >= b.from || t < b.to
                }
            })
            .map_or((BASE_BAND, self.base), |b| (b.name.as_str(), b.price))
    }

    /// The price in force at local time `t`.
    #[cfg(test)]
    pub(crate) fn price_at(&self, t: NaiveTime) -> Price {
        self.band_at(t).1
    }

    /// Local times of day at which the price may change, sorted.
    pub fn changes(&self) -> Vec<NaiveTime> {
        let mut v: Vec<NaiveTime> = self.bands.iter().flat_map(|b| [b.from, b.to]).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The first band change strictly after `t`, if the tariff has bands.
    pub(crate) fn next_change(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
        next_local_time(&self.changes(), t, tz)
    }
}

/// Prices over time, as [`split`] needs them: the band (and its price) in force at an instant, the
/// next instant it may change, and instants a piece must not span even when the price stays (a
/// month start, a tariff version's first instant).
pub(crate) trait Prices {
    fn band_at_instant(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> (&str, Price);
    fn next_change(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> Option<DateTime<Utc>>;
    fn is_cut(&self, _t: DateTime<Utc>, _tz: chrono_tz::Tz) -> bool {
        false
    }
}

impl Prices for TouPrice {
    fn band_at_instant(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> (&str, Price) {
        self.band_at(t.with_timezone(&tz).time())
    }

    fn next_change(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
        TouPrice::next_change(self, t, tz)
    }
}

/// One version of a tariff, as a [`Schedule`] holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Version {
    /// Its first instant (`None` for the tariff's first version: in force from the start).
    pub from: Option<DateTime<Utc>>,
    pub tariff: String,
    /// The site date it took effect, as the bill names it.
    pub effective_from: Option<chrono::NaiveDate>,
    pub price: TouPrice,
}

/// The price of one room's own consumption over time: each tariff version from its first instant
/// (what the room's bill prices with), so prepaid deductions and the bill come from one engine.
/// Consumption is also cut at every month start (site time), so each deducted piece belongs to
/// exactly one month's statement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    /// Oldest first, never empty; the first has `from: None`.
    versions: Vec<Version>,
}

impl Schedule {
    /// The schedule of a first version and its later ones (any order).
    pub(crate) fn new(first: Version, mut later: Vec<Version>) -> Schedule {
        later.sort_by_key(|v| v.from);
        let mut versions = vec![Version {
            from: None,
            ..first
        }];
        versions.extend(later.into_iter().filter(|v| v.from.is_some()));
        Schedule { versions }
    }

    /// Every version, oldest first.
    pub(crate) fn versions(&self) -> &[Version] {
        &self.versions
    }

    /// The version in force at `t`.
    pub(crate) fn at(&self, t: DateTime<Utc>) -> &Version {
        self.versions
            .iter()
            .rev()
            .find(|v| v.from.is_none_or(|f| f <= t))
            .unwrap_or(&self.versions[0])
    }

    /// Whether any version has time-of-use bands (a long interval then needs the readings
    /// inside it).
    pub(crate) fn has_bands(&self) -> bool {
        self.versions.iter().any(|v| !v.price.bands.is_empty())
    }

    fn next_version(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.versions.iter().filter_map(|v| v.from).find(|f| *f > t)
    }
}

impl Prices for Schedule {
    fn band_at_instant(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> (&str, Price) {
        self.at(t).price.band_at(t.with_timezone(&tz).time())
    }

    fn next_change(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
        let band = self.at(t).price.next_change(t, tz);
        [band, self.next_version(t), Some(next_month_start(t, tz))]
            .into_iter()
            .flatten()
            .min()
    }

    fn is_cut(&self, t: DateTime<Utc>, tz: chrono_tz::Tz) -> bool {
        self.versions.iter().any(|v| v.from == Some(t))
            || next_month_start(t - Duration::milliseconds(1), tz) == t
    }
}

/// The first month start (00:00 on the 1st, site time; the earliest valid instant on a DST
/// change day) strictly after `t`.
pub(crate) fn next_month_start(t: DateTime<Utc>, tz: chrono_tz::Tz) -> DateTime<Utc> {
    use chrono::Datelike;
    let l = t.with_timezone(&tz);
    let (y, m) = if l.month() == 12 {
        (l.year() + 1, 1)
    } else {
        (l.year(), l.month() + 1)
    };
    first_of(y, m, tz).unwrap_or(t + Duration::days(31))
}

/// The start of the month (site time) that `t` lies in.
pub(crate) fn month_start(t: DateTime<Utc>, tz: chrono_tz::Tz) -> DateTime<Utc> {
    use chrono::Datelike;
    let l = t.with_timezone(&tz);
    first_of(l.year(), l.month(), tz)
        .filter(|s| *s <= t)
        .unwrap_or(t)
}

/// 00:00 on the 1st of month `m` of `y`, site time (the earliest valid instant; 01:00 where a DST
/// change skips midnight); `None` for a month that does not exist.
pub(crate) fn first_of(y: i32, m: u32, tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
    let d = chrono::NaiveDate::from_ymd_opt(y, m, 1)?.and_hms_opt(0, 0, 0)?;
    tz.from_local_datetime(&d)
        .earliest()
        .or_else(|| tz.from_local_datetime(&(d + Duration::hours(1))).earliest())
        .map(|d| d.with_timezone(&Utc))
}

/// The first instant strictly after `t` whose local time of day (in `tz`) is one of `times`.
pub(crate) fn next_local_time(
    times: &[NaiveTime],
    t: DateTime<Utc>,
    tz: chrono_tz::Tz,
) -> Option<DateTime<Utc>> {
    if times.is_empty() {
        return None;
    }
    let day = t.with_timezone(&tz).date_naive();
    // Three days cover any DST oddity; a time skipped by DST falls back to the next valid instant.
    (0..3)
        .flat_map(|d| {
            times
                .iter()
                .map(move |tm| (day + Duration::days(d)).and_time(*tm))
        })
        .filter_map(|l| {
            tz.from_local_datetime(&l)
                .earliest()
                .or_else(|| tz.from_local_datetime(&(l + Duration::hours(1))).earliest())
                .map(|x| x.with_timezone(&Utc))
        })
        .filter(|x| *x > t)
        .min()
}

/// A time-of-use band as written in `[[tariff]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBand {
    /// "peak", "flat", "valley"; defaults to "HH:MM-HH:MM".
    pub name: Option<String>,
    pub from: String,
    pub to: String,
    pub price: String,
}

fn time(s: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(s, "%H:%M").map_err(|_| format!("{s:?}: expected HH:MM"))
}

/// Validates time-of-use bands; problems as (key, message), every one of them.
pub(crate) fn parse_bands(
    key: &str,
    raw: &[RawBand],
    decimals: u32,
    issues: &mut Vec<(String, String)>,
) -> Vec<Band> {
    let mut out: Vec<Band> = Vec::new();
    for (i, b) in raw.iter().enumerate() {
        let k = format!("{key}.bands[{i}]");
        match (time(&b.from), time(&b.to), Price::parse(&b.price, decimals)) {
            (Ok(from), Ok(to), Ok(price)) if from != to => out.push(Band {
                name: b
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", b.from, b.to)),
                from,
                to,
                price,
            }),
            (Ok(_), Ok(_), Ok(_)) => issues.push((
                k,
                "from and to are the same time: a band needs a length (to < from wraps midnight)"
                    .into(),
            )),
            (f, t, pr) => issues.push((
                k,
                [f.err(), t.err(), pr.err()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
    }
    // Bands must not overlap: sample every minute of the day against every band.
    for m in 0..1440u32 {
        let t = NaiveTime::from_hms_opt(m / 60, m % 60, 0).unwrap_or_default();
        let covering: Vec<&str> = out
            .iter()
            .filter(|b| {
                TouPrice {
                    base: b.price,
                    bands: vec![(*b).clone()],
                }
                .band_at(t)
                .0 != BASE_BAND
            })
            .map(|b| b.name.as_str())
            .collect();
        if covering.len() > 1 {
            issues.push((
                format!("{key}.bands"),
                format!(
                    "bands {} overlap at {}; each minute of the day may have one band",
                    covering.join(" and "),
                    t.format("%H:%M")
                ),
            ));
            break;
        }
    }
    out
}

/// Consumption of one band over one stretch of time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Piece {
    pub band: String,
    pub price: Price,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Counter (thousandths) at `from` and `to`; interpolated where between readings.
    pub start_milli: i64,
    pub end_milli: i64,
}

impl Piece {
    /// Consumption in thousandths of a unit.
    pub(crate) fn milli(&self) -> i64 {
        self.end_milli - self.start_milli
    }
}

/// Splits the consumption between consecutive counter points `(time, thousandths)` (sorted by time,
/// non-decreasing counter) at every band change. The pieces' consumption sums exactly to
/// `last − first`.
pub(crate) fn split(
    price: &impl Prices,
    tz: chrono_tz::Tz,
    points: &[(DateTime<Utc>, i64)],
) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    for w in points.windows(2) {
        let ((t0, m0), (t1, m1)) = (w[0], w[1]);
        let mut cuts = vec![t0];
        let mut t = t0;
        while let Some(n) = price.next_change(t, tz).filter(|n| *n < t1) {
            cuts.push(n);
            t = n;
        }
        cuts.push(t1.max(t0));
        let span = i128::from((t1 - t0).num_milliseconds().max(1));
        let at = |x: DateTime<Utc>| -> i64 {
            if x >= t1 {
                return m1;
            }
            let f = i128::from((x - t0).num_milliseconds());
            m0 + ((i128::from(m1 - m0) * f).div_euclid(span)) as i64
        };
        for c in cuts.windows(2) {
            let (a, b) = (c[0], c[1]);
            let (band, p) = price.band_at_instant(a, tz);
            let (ma, mb) = (at(a), at(b));
            // Merge with the previous piece of the same band (consecutive readings, same band),
            // never across a cut (a month start, a new tariff version).
            if let Some(last) = out.last_mut() {
                if last.band == band && last.to == a && last.price == p && !price.is_cut(a, tz) {
                    last.to = b;
                    last.end_milli = mb;
                    continue;
                }
            }
            out.push(Piece {
                band: band.to_string(),
                price: p,
                from: a,
                to: b,
                start_milli: ma,
                end_milli: mb,
            });
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    /// Shanghai's common residential split: peak 08:00–22:00 at 0.5583, valley 22:00–08:00 at 0.3583.
    pub(crate) fn peak_valley() -> TouPrice {
        TouPrice {
            base: Price::parse("0.8523", 2).unwrap(),
            bands: vec![
                Band {
                    name: "peak".into(),
                    from: hm(8, 0),
                    to: hm(22, 0),
                    price: Price::parse("0.5583", 2).unwrap(),
                },
                Band {
                    name: "valley".into(),
                    from: hm(22, 0),
                    to: hm(8, 0),
                    price: Price::parse("0.3583", 2).unwrap(),
                },
            ],
        }
    }

    #[test]
    fn bands_wrap_midnight_and_the_rest_is_base() {
        let t = TouPrice {
            base: Price::parse("1.00", 2).unwrap(),
            bands: vec![Band {
                name: "night".into(),
                from: hm(22, 0),
                to: hm(7, 0),
                price: Price::parse("0.40", 2).unwrap(),
            }],
        };
        assert_eq!(t.band_at(hm(23, 0)).0, "night");
        assert_eq!(t.price_at(hm(3, 0)).micros, 400_000);
        assert_eq!(t.band_at(hm(12, 0)), (BASE_BAND, t.base));
        assert_eq!(t.changes(), vec![hm(7, 0), hm(22, 0)]);
    }

    #[test]
    fn an_outage_from_evening_to_morning_is_split_by_the_hours_in_each_band() {
        // Readings at 20:00 and 10:00 local (Shanghai) next day, 14.000 kWh in between (14 h):
        // 20–22 peak (2 h), 22–08 valley (10 h), 08–10 peak (2 h) at an even flow of 1 kWh/h.
        let tz = chrono_tz::Asia::Shanghai;
        let a = tz
            .with_ymd_and_hms(2026, 10, 14, 20, 0, 0)
            .unwrap()
            .with_timezone(&Utc);
        let b = a + Duration::hours(14);
        let pieces = split(&peak_valley(), tz, &[(a, 100_000), (b, 114_000)]);
        let summary: Vec<(&str, i64)> = pieces
            .iter()
            .map(|p| (p.band.as_str(), p.milli()))
            .collect();
        assert_eq!(
            summary,
            vec![("peak", 2_000), ("valley", 10_000), ("peak", 2_000)]
        );
        assert_eq!(pieces[1].from.with_timezone(&tz).time(), hm(22, 0));
    }

    #[test]
    fn consecutive_readings_in_one_band_merge_into_one_piece() {
        let tz = chrono_tz::Asia::Shanghai;
        let a = tz
            .with_ymd_and_hms(2026, 10, 14, 12, 0, 0)
            .unwrap()
            .with_timezone(&Utc);
        let pts: Vec<_> = (0..4)
            .map(|i| (a + Duration::seconds(10 * i), 5_000 + 3 * i))
            .collect();
        let p = split(&peak_valley(), tz, &pts);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].milli(), 9);
    }

    proptest::proptest! {
        #[test]
        fn pieces_add_up_exactly(
            start in 0i64..10_000_000,
            steps in proptest::collection::vec((1i64..200_000, 0i64..50_000), 1..30),
            hour in 0u32..24,
        ) {
            let tz = chrono_tz::Asia::Shanghai;
            let mut t = tz.with_ymd_and_hms(2026, 10, 31, hour, 0, 0).unwrap().with_timezone(&Utc);
            let mut m = start;
            let mut pts = vec![(t, m)];
            for (secs, used) in steps {
                t += Duration::seconds(secs);
                m += used;
                pts.push((t, m));
            }
            let pieces = split(&peak_valley(), tz, &pts);
            proptest::prop_assert_eq!(pieces.iter().map(Piece::milli).sum::<i64>(), m - start);
            proptest::prop_assert!(pieces.iter().all(|p| p.milli() >= 0));
        }
    }
}
