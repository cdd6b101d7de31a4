//! Accounting over real periods: balances every interval and the monthly apportionment, computed
//! from the counter history in the outbox database and published as results and events.
//!
//! The arithmetic is in [`crate::topology`] and [`crate::apportion`]; this module finds the counter
//! values at the period boundaries (site timezone), runs it on schedule or on demand, and keeps every
//! run versioned with its inputs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use rusqlite::Connection;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use crate::apportion::{self, PoolResult};
use crate::config::Config;
use crate::store::{self, Kind, NewRecord, StoreHandle};
use crate::topology::{self, Balance, Boundary, Consumption, Replacement, Source, Tariff};
use crate::uplink::CommandHandler;

/// Why a period could not be computed.
#[derive(Debug, Error)]
pub enum AccountingError {
    #[error("period {0:?}: expected YYYY-MM, e.g. 2026-10")]
    Period(String),
    #[error("history: {0}")]
    History(String),
}

/// `YYYY-MM` → the month's first and last instant in the site's timezone, as UTC.
pub fn period_bounds(
    period: &str,
    tz: chrono_tz::Tz,
) -> Result<(DateTime<Utc>, DateTime<Utc>), AccountingError> {
    let bad = || AccountingError::Period(period.to_string());
    let (y, m) = period.split_once('-').ok_or_else(bad)?;
    let (y, m): (i32, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    let first = NaiveDate::from_ymd_opt(y, m, 1).ok_or_else(bad)?;
    let next = if m == 12 {
        NaiveDate::from_ymd_opt(y + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(y, m + 1, 1)
    }
    .ok_or_else(bad)?;
    let local = |d: NaiveDate| {
        // Midnight may not exist on a DST change day: take the earliest valid instant.
        tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
            .earliest()
            .or_else(|| {
                tz.from_local_datetime(&d.and_hms_opt(1, 0, 0).unwrap_or_default())
                    .earliest()
            })
            .map(|t| t.with_timezone(&Utc))
    };
    Ok((local(first).ok_or_else(bad)?, local(next).ok_or_else(bad)?))
}

/// The month before the one containing `now` in the site's timezone.
pub fn previous_period(now: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    let l = now.with_timezone(&tz);
    let (y, m) = if l.month() == 1 {
        (l.year() - 1, 12)
    } else {
        (l.year(), l.month() - 1)
    };
    format!("{y:04}-{m:02}")
}

/// When the next scheduled apportionment is due: `day` of the next month at 00:05 site time.
pub fn next_run(now: DateTime<Utc>, tz: chrono_tz::Tz, day: u32) -> DateTime<Utc> {
    let l = now.with_timezone(&tz);
    let candidate = |y: i32, m: u32| {
        NaiveDate::from_ymd_opt(y, m, day)
            .and_then(|d| d.and_hms_opt(0, 5, 0))
            .and_then(|t| tz.from_local_datetime(&t).earliest())
            .map(|t| t.with_timezone(&Utc))
    };
    let this = candidate(l.year(), l.month());
    match this {
        Some(t) if t > now => t,
        _ => {
            let (y, m) = if l.month() == 12 {
                (l.year() + 1, 1)
            } else {
                (l.year(), l.month() + 1)
            };
            candidate(y, m).unwrap_or(now + chrono::Duration::days(31))
        }
    }
}

/// A window of `length` ending as late as the history allows: every counter needs a sample after
/// the window's end to interpolate it, so the window ends one sampling period (and a second) ago.
pub fn live_window(config: &Config, length: Duration) -> (DateTime<Utc>, DateTime<Utc>) {
    let lag = chrono::Duration::from_std(config.topology.history_every + Duration::from_secs(1))
        .unwrap_or_default();
    let to = Utc::now() - lag;
    (
        to - chrono::Duration::from_std(length).unwrap_or_default(),
        to,
    )
}

/// Every meter's consumption over `[from, to]`, from the history, with replacements applied.
pub fn consumption(
    conn: &Connection,
    config: &Config,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<BTreeMap<String, Consumption>, AccountingError> {
    let max_gap = 2 * config.topology.history_every.as_millis() as i64;
    let (f, t) = (from.timestamp_millis(), to.timestamp_millis());
    let mut boundaries: BTreeMap<String, (Boundary, Boundary)> = BTreeMap::new();
    for m in config.site.meters.values() {
        let Source::Device(dev) = &m.source else {
            continue;
        };
        let q = m.utility.quantity().as_str();
        let samples = store::history_window(conn, dev, q, f, t)
            .map_err(|e| AccountingError::History(e.to_string()))?;
        if let (Some(a), Some(b)) = (
            topology::value_at(&samples, f, max_gap, m.rollover),
            topology::value_at(&samples, t, max_gap, m.rollover),
        ) {
            boundaries.insert(dev.clone(), (a, b));
        }
    }
    let replacements: BTreeMap<String, Replacement> = config
        .replacements
        .iter()
        .filter(|r| r.at > from && r.at <= to)
        .map(|r| {
            (
                r.meter.clone(),
                Replacement {
                    final_reading: r.final_reading,
                    initial_reading: r.initial_reading,
                },
            )
        })
        .collect();
    let devices = apportion::device_consumption(&config.site, &boundaries, &replacements);
    Ok(topology::meter_consumption(&config.site, &devices))
}

/// Every pool for a month.
pub fn apportion_period(
    conn: &Connection,
    config: &Config,
    period: &str,
) -> Result<Vec<PoolResult>, AccountingError> {
    let (from, to) = period_bounds(period, config.gateway.timezone)?;
    let c = consumption(conn, config, from, to)?;
    Ok(apportion::apportion(&config.site, &c, period))
}

/// Every node's balance over `[from, to]`.
pub fn balances(
    conn: &Connection,
    config: &Config,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Balance>, AccountingError> {
    let c = consumption(conn, config, from, to)?;
    Ok(topology::balances(&config.site, &c))
}

/// The outbox record of one pool's result (topic `results/apportionment`).
pub fn result_record(version: i64, r: &PoolResult) -> NewRecord {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["version"] = json!(version);
    NewRecord {
        kind: Kind::Result,
        topic: "results/apportionment".into(),
        ts: Utc::now(),
        payload: v.to_string().into_bytes(),
    }
}

/// The event of a node whose balance is off.
pub fn balance_event(b: &Balance, from: DateTime<Utc>, to: DateTime<Utc>) -> NewRecord {
    let v = json!({
        "event": "balance_alarm",
        "node": b.node,
        "from": from.to_rfc3339(),
        "to": to.to_rfc3339(),
        "consumption": b.consumption,
        "children": b.children,
        "loss": b.loss,
        "loss_pct": if b.loss_pct.is_finite() { json!(b.loss_pct) } else { Value::Null },
        "estimated": b.estimated,
        "suspect": b.suspect.as_ref().map(|s| s.meter.clone()),
        "belongs_under": b.suspect.as_ref().and_then(|s| s.belongs_under.clone()),
    });
    NewRecord {
        kind: Kind::Event,
        topic: "events".into(),
        ts: Utc::now(),
        payload: v.to_string().into_bytes(),
    }
}

/// What the cloud can ask of the accounting task.
#[derive(Debug, Clone)]
pub enum Request {
    /// Compute and publish a month.
    Apportion(String),
    /// Set (or change) a tariff; persisted, and used from the next computation on.
    SetTariff(Tariff),
}

/// Meta key of the tariffs the cloud set (JSON list).
pub const TARIFF_OVERRIDES: &str = "tariff_overrides";

/// Applies the tariffs the cloud set (kept in the outbox database) over the configured ones.
pub fn apply_tariff_overrides(
    conn: &Connection,
    site: &mut topology::Site,
) -> Result<usize, AccountingError> {
    let raw: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [TARIFF_OVERRIDES],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| {
            if matches!(e, rusqlite::Error::QueryReturnedNoRows) {
                Ok(None)
            } else {
                Err(e)
            }
        })
        .map_err(|e| AccountingError::History(e.to_string()))?;
    let list: Vec<Tariff> = raw
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or_default();
    let n = list.len();
    for t in list {
        site.tariffs.insert(t.name.clone(), t);
    }
    Ok(n)
}

/// Cloud commands `apportion {"period": "2026-10"}` (results follow on `results/apportionment`) and
/// `set_tariff {"name", "utility", "price", "currency", "decimals"}`.
pub struct AccountingCommands {
    pub requests: mpsc::Sender<Request>,
    pub timezone: chrono_tz::Tz,
}

impl CommandHandler for AccountingCommands {
    fn handle(&self, _id: &str, name: &str, args: &Value) -> Option<Result<Value, String>> {
        let (request, reply) = match name {
            "apportion" => {
                let Some(period) = args.get("period").and_then(Value::as_str) else {
                    return Some(Err("apportion needs {\"period\": \"YYYY-MM\"}".into()));
                };
                if let Err(e) = period_bounds(period, self.timezone) {
                    return Some(Err(e.to_string()));
                }
                (
                    Request::Apportion(period.to_string()),
                    json!({"queued": period, "results_topic": "results/apportionment"}),
                )
            }
            "set_tariff" => {
                let raw: topology::RawTariff = match serde_json::from_value(args.clone()) {
                    Ok(r) => r,
                    Err(e) => return Some(Err(format!("set_tariff: {e}; expected {{\"name\", \"utility\", \"price\": \"0.8523\", \"currency\", \"decimals\"}}"))),
                };
                let price = match crate::money::Price::parse(&raw.price, raw.decimals) {
                    Ok(p) => p,
                    Err(e) => return Some(Err(format!("set_tariff: price {e}"))),
                };
                let t = Tariff {
                    name: raw.name,
                    utility: raw.utility,
                    price,
                    currency: raw.currency,
                };
                let reply = json!({"tariff": t.name, "price_micros": t.price.micros});
                (Request::SetTariff(t), reply)
            }
            _ => return None,
        };
        Some(match self.requests.try_send(request) {
            Ok(()) => Ok(reply),
            Err(_) => Err("the accounting task is busy; retry shortly".into()),
        })
    }
}

/// Runs one month and publishes it; returns the version.
async fn run_period(
    config: &Arc<Config>,
    store: &StoreHandle,
    period: String,
) -> Result<(i64, Vec<PoolResult>), String> {
    let c = config.clone();
    let p = period.clone();
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<PoolResult>, String> {
        let conn = store::open_read_only(&c.store.path).map_err(|e| e.to_string())?;
        apportion_period(&conn, &c, &p).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    let json = serde_json::to_string(&results).map_err(|e| e.to_string())?;
    let version = store.save_apportionment(&period, json).await?;
    store
        .append(results.iter().map(|r| result_record(version, r)).collect())
        .await
        .map_err(|e| e.to_string())?;
    Ok((version, results))
}

/// The accounting task: balance checks every `balance_every`, the monthly run, and on-demand runs.
pub async fn run(
    config: Arc<Config>,
    store: StoreHandle,
    mut requests: mpsc::Receiver<Request>,
    mut shutdown: watch::Receiver<bool>,
) {
    if config.site.is_empty() {
        return;
    }
    // Tariffs the cloud set earlier survive restarts.
    let mut config = config;
    let mut overrides: Vec<Tariff> = Vec::new();
    if let Ok(conn) = store::open_read_only(&config.store.path) {
        let mut c = (*config).clone();
        if let Ok(n) = apply_tariff_overrides(&conn, &mut c.site) {
            if n > 0 {
                tracing::info!(tariffs = n, "using tariffs set by the cloud");
                overrides = c
                    .site
                    .tariffs
                    .values()
                    .filter(|t| config.site.tariffs.get(&t.name) != Some(*t))
                    .cloned()
                    .collect();
                config = Arc::new(c);
            }
        }
    }
    let every = config.topology.balance_every;
    // Without an uplink nobody can ask for a run: the channel closes, the schedule goes on.
    let mut requests_open = true;
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        let due = next_run(
            Utc::now(),
            config.gateway.timezone,
            config.topology.apportion_day,
        );
        let until_due = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = ticker.tick() => {
                let (from, to) = live_window(&config, every);
                let c = config.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let conn = store::open_read_only(&c.store.path).map_err(|e| e.to_string())?;
                    balances(&conn, &c, from, to).map_err(|e| e.to_string())
                })
                .await;
                match r {
                    Ok(Ok(b)) => {
                        let alarms: Vec<NewRecord> = b.iter().filter(|b| b.alarm).map(|b| balance_event(b, from, to)).collect();
                        for b in b.iter().filter(|b| b.alarm) {
                            tracing::warn!(node = %b.node, loss_pct = b.loss_pct, suspect = ?b.suspect.as_ref().map(|s| &s.meter), "energy balance off");
                        }
                        if !alarms.is_empty() {
                            let _ = store.append(alarms).await;
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "balance check skipped"),
                    Err(e) => tracing::error!(error = %e, "balance check failed"),
                }
            }
            _ = tokio::time::sleep(until_due) => {
                let period = previous_period(Utc::now(), config.gateway.timezone);
                match run_period(&config, &store, period.clone()).await {
                    Ok((v, r)) => tracing::info!(period, version = v, pools = r.len(), "monthly apportionment published"),
                    Err(e) => tracing::error!(period, error = %e, "monthly apportionment failed"),
                }
                // Do not fire twice in the same minute.
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            r = requests.recv(), if requests_open => match r {
                None => requests_open = false,
                Some(Request::Apportion(period)) => match run_period(&config, &store, period.clone()).await {
                    Ok((v, r)) => tracing::info!(period, version = v, pools = r.len(), "apportionment published on request"),
                    Err(e) => tracing::error!(period, error = %e, "apportionment on request failed"),
                },
                Some(Request::SetTariff(t)) => {
                    tracing::info!(tariff = %t.name, price_micros = t.price.micros, "tariff set by the cloud");
                    overrides.retain(|o| o.name != t.name);
                    overrides.push(t.clone());
                    store.set_meta(TARIFF_OVERRIDES, serde_json::to_string(&overrides).unwrap_or_default()).await;
                    let mut c = (*config).clone();
                    c.site.tariffs.insert(t.name.clone(), t);
                    config = Arc::new(c);
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_months_follow_the_site_timezone() {
        let (a, b) = period_bounds("2026-10", chrono_tz::Asia::Shanghai).unwrap();
        assert_eq!(a.to_rfc3339(), "2026-09-30T16:00:00+00:00");
        assert_eq!(b.to_rfc3339(), "2026-10-31T16:00:00+00:00");
        // London leaves summer time on 25 Oct 2026: October has 31 days and one extra hour.
        let (a, b) = period_bounds("2026-10", chrono_tz::Europe::London).unwrap();
        assert_eq!((b - a).num_hours(), 31 * 24 + 1);
        assert_eq!(
            period_bounds("2026-12", chrono_tz::UTC)
                .unwrap()
                .1
                .to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
        assert!(period_bounds("2026-13", chrono_tz::UTC).is_err());
        assert!(period_bounds("October", chrono_tz::UTC).is_err());
    }

    #[test]
    fn the_monthly_run_is_on_the_configured_day_just_after_local_midnight() {
        let now = Utc.with_ymd_and_hms(2026, 10, 31, 17, 0, 0).unwrap(); // 1 Nov 01:00 in Shanghai
        assert_eq!(previous_period(now, chrono_tz::Asia::Shanghai), "2026-10");
        let due = next_run(now, chrono_tz::Asia::Shanghai, 1);
        assert_eq!(
            due.to_rfc3339(),
            "2026-11-30T16:05:00+00:00",
            "1 Nov 00:05 has passed: next is 1 Dec"
        );
        let before = Utc.with_ymd_and_hms(2026, 10, 31, 15, 0, 0).unwrap(); // 31 Oct 23:00 local
        assert_eq!(
            next_run(before, chrono_tz::Asia::Shanghai, 1).to_rfc3339(),
            "2026-10-31T16:05:00+00:00"
        );
    }
}
