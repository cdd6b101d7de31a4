//! The prepaid ledger: every deduction, top-up and reconciliation, so a tenant's balance can be
//! explained line by line. Deductions are aggregated per history interval and band (one row per room,
//! interval and band, updated as readings come), so 1,000 prepaid rooms polled every 10 s add about
//! 100,000 rows a day at a 15-minute interval, not millions.
//!
//! Invariant: for consecutive rows of one account, `balance_after[i-1] + amount[i] = balance_after[i]`
//! (usage rows carry negative amounts).

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::{json, Value};

use super::prepaid::Charge;
use crate::topology::Utility;
use crate::uplink::{Answer, CommandHandler};

/// Adds one priced charge to its interval's row (created on the first charge of the interval, or the
/// first after a top-up or reconciliation, so rows in id order always chain their balances).
pub(crate) fn add_usage(
    tx: &Connection,
    room: &str,
    utility: Utility,
    interval_ms: i64,
    charge: &Charge,
    balance_after: i64,
) -> rusqlite::Result<()> {
    let p = &charge.piece;
    let epoch: i64 = tx
        .prepare_cached(
            "SELECT id FROM prepaid_ledger WHERE room = ?1 AND utility = ?2 AND kind <> 'usage' ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![room, utility_str(utility)], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    tx.prepare_cached(
        "INSERT INTO prepaid_ledger (room, utility, kind, interval_ms, band, start_ms, end_ms, start_counter, end_counter, consumption, price_micros, amount, balance_after, epoch)
         VALUES (?1, ?2, 'usage', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (room, utility, interval_ms, band, price_micros, epoch) WHERE kind = 'usage' DO UPDATE SET
            end_ms = excluded.end_ms, end_counter = excluded.end_counter,
            consumption = consumption + excluded.consumption, amount = amount + excluded.amount,
            balance_after = excluded.balance_after",
    )?
    .execute(params![
        room,
        utility_str(utility),
        interval_ms,
        p.band,
        p.from.timestamp_millis(),
        p.to.timestamp_millis(),
        p.start_milli,
        p.end_milli,
        p.milli(),
        p.price.micros,
        -charge.amount,
        balance_after,
        epoch
    ])?;
    Ok(())
}

/// A top-up (`amount` > 0) or a reconciliation (`amount` = cloud − local) as its own row.
pub(crate) fn add_adjustment(
    tx: &Connection,
    (room, utility): (&str, Utility),
    kind: &str,
    at: DateTime<Utc>,
    amount: i64,
    balance_after: i64,
    reference: &str,
) -> rusqlite::Result<()> {
    let ms = at.timestamp_millis();
    tx.prepare_cached(
        "INSERT INTO prepaid_ledger (room, utility, kind, interval_ms, start_ms, end_ms, amount, balance_after, ref)
         VALUES (?1, ?2, ?3, ?4, ?4, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![room, utility_str(utility), kind, ms, amount, balance_after, reference])?;
    Ok(())
}

fn utility_str(u: Utility) -> &'static str {
    match u {
        Utility::Electricity => "electricity",
        Utility::Water => "water",
    }
}

/// What an account's usage rows deducted for consumption in `[from, to)` (by the start of the
/// interval each row covers; deductions are cut at month starts, so a row lies in one month):
/// (band, price in micros, thousandths, minor units deducted), by band and price.
pub(crate) fn deducted(
    conn: &Connection,
    (room, utility): (&str, Utility),
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> rusqlite::Result<Vec<(String, i64, i64, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT band, price_micros, SUM(consumption), -SUM(amount) FROM prepaid_ledger
         WHERE room = ?1 AND utility = ?2 AND kind = 'usage' AND interval_ms >= ?3 AND interval_ms < ?4
         GROUP BY band, price_micros ORDER BY MIN(start_ms), band",
    )?;
    let rows = stmt
        .query_map(
            params![
                room,
                utility_str(utility),
                from.timestamp_millis(),
                to.timestamp_millis()
            ],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, Option<i64>>(1)?.unwrap_or(0),
                    r.get(2)?,
                    r.get(3)?,
                ))
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// One ledger row as the cloud and the CLI see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Row {
    pub id: i64,
    pub room: String,
    pub utility: String,
    pub kind: String,
    pub band: String,
    pub from: String,
    pub to: String,
    pub start_counter: Option<i64>,
    pub end_counter: Option<i64>,
    pub consumption: i64,
    pub price_micros: Option<i64>,
    pub amount: i64,
    pub balance_after: i64,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

/// Rows of a room (one utility or both) whose time lies in `[from, to)`, after id `after`, oldest
/// first, at most `limit`.
pub(crate) fn query(
    conn: &Connection,
    room: &str,
    utility: Option<Utility>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, room, utility, kind, band, start_ms, end_ms, start_counter, end_counter, consumption, price_micros, amount, balance_after, ref
         FROM prepaid_ledger WHERE room = ?1 AND (?2 IS NULL OR utility = ?2) AND end_ms >= ?3 AND start_ms < ?4 AND id > ?5
         ORDER BY id LIMIT ?6",
    )?;
    let ts = |ms: i64| {
        DateTime::<Utc>::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339()
    };
    let rows = stmt
        .query_map(
            params![
                room,
                utility.map(utility_str),
                from.timestamp_millis(),
                to.timestamp_millis(),
                after,
                limit as i64
            ],
            |r| {
                Ok(Row {
                    id: r.get(0)?,
                    room: r.get(1)?,
                    utility: r.get(2)?,
                    kind: r.get(3)?,
                    band: r.get(4)?,
                    from: ts(r.get(5)?),
                    to: ts(r.get(6)?),
                    start_counter: r.get(7)?,
                    end_counter: r.get(8)?,
                    consumption: r.get(9)?,
                    price_micros: r.get(10)?,
                    amount: r.get(11)?,
                    balance_after: r.get(12)?,
                    reference: r.get(13)?,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Most rows in one `get_ledger` reply; the reply says where to continue.
pub(crate) const PAGE: usize = 500;

/// The `get_ledger` cloud command: `{"room", "utility"?, "period": "2026-10"}` or `{"room", "from",
/// "to"}` (RFC 3339), `"after"` to page on. Read-only, so it needs no signature.
pub(crate) struct LedgerQuery {
    pub path: std::path::PathBuf,
    pub timezone: chrono_tz::Tz,
}

impl CommandHandler for LedgerQuery {
    fn handle(&self, _id: &str, name: &str, args: &Value) -> Option<Answer> {
        (name == "get_ledger").then(|| self.get_ledger(args).into())
    }
}

impl LedgerQuery {
    fn get_ledger(&self, args: &Value) -> crate::uplink::Reply {
        let room = args.get("room").and_then(Value::as_str).ok_or(
            "get_ledger needs {\"room\", \"period\": \"YYYY-MM\"} or {\"room\", \"from\", \"to\"}",
        )?;
        let utility = match args.get("utility").and_then(Value::as_str) {
            None => None,
            Some("electricity") => Some(Utility::Electricity),
            Some("water") => Some(Utility::Water),
            Some(other) => {
                return Err(format!(
                    "\"utility\" must be electricity or water, got {other:?}"
                ))
            }
        };
        let (from, to) = crate::bill::window_arg(args, self.timezone, "get_ledger")?;
        let after = args.get("after").and_then(Value::as_i64).unwrap_or(0);
        let conn = open(&self.path)?;
        let rows = query(&conn, room, utility, from, to, after, PAGE)
            .map_err(|e| format!("ledger: {e}"))?;
        let next = (rows.len() == PAGE)
            .then(|| rows.last().map(|r| r.id))
            .flatten();
        Ok(json!({
            "room": room,
            "from": from.to_rfc3339(),
            "to": to.to_rfc3339(),
            "rows": rows,
            "next_after": next,
        }))
    }
}

fn open(path: &Path) -> Result<Connection, String> {
    let conn = crate::store::open_read_only(path).map_err(|e| e.to_string())?;
    // A gateway without prepaid accounts has no ledger yet: an empty answer, not an error.
    let exists: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'prepaid_ledger'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(|e| e.to_string())?;
    if !exists {
        return Err("no prepaid ledger on this gateway (no [[prepaid]] account has run)".into());
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Price;
    use crate::tou::Piece;
    use chrono::TimeZone;

    #[test]
    fn charges_of_one_interval_and_band_aggregate_into_one_row_that_keeps_the_balance_chain() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::store::SCHEMA).unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 10, 14, 4, 0, 0).unwrap();
        let price = Price::parse("0.8523", 2).unwrap();
        let mut balance = 10_000;
        add_adjustment(
            &conn,
            ("101", Utility::Electricity),
            "top_up",
            t0,
            10_000,
            balance,
            "cmd-1",
        )
        .unwrap();
        // 90 readings 10 s apart, 3 Wh each, all in one 15-minute interval.
        for k in 0..90i64 {
            let from = t0 + chrono::Duration::seconds(10 * k);
            let charge = Charge {
                piece: Piece {
                    band: "base".into(),
                    price,
                    from,
                    to: from + chrono::Duration::seconds(10),
                    start_milli: 1_000 + 3 * k,
                    end_milli: 1_003 + 3 * k,
                },
                amount: i64::from(k % 4 == 0),
            };
            balance -= charge.amount;
            add_usage(
                &conn,
                "101",
                Utility::Electricity,
                t0.timestamp_millis(),
                &charge,
                balance,
            )
            .unwrap();
        }
        let rows = query(
            &conn,
            "101",
            None,
            t0,
            t0 + chrono::Duration::hours(1),
            0,
            10,
        )
        .unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let u = &rows[1];
        assert_eq!(
            (u.kind.as_str(), u.consumption, u.amount),
            ("usage", 270, -23)
        );
        assert_eq!((u.start_counter, u.end_counter), (Some(1_000), Some(1_270)));
        assert_eq!(rows[0].balance_after + u.amount, u.balance_after);
    }
}
