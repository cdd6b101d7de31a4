//! Billing-counter samples: kept every `history_every` and around billing boundaries; the
//! boundaries of balances and bills are read from here.

use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Store, StoreError};

/// One counter sample for the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub device: String,
    pub quantity: String,
    pub ts_ms: i64,
    pub value: f64,
}

/// History older than this is pruned (13 months: a year of bills plus a month of disputes).
pub(super) const HISTORY_KEEP_MS: i64 = 400 * 86_400_000;

/// One page of a counter's samples in `(after_ms, to_ms]` with `ts_ms >= from_ms`, oldest first,
/// at most `limit` (the cloud's `get_history`).
pub(crate) fn history_page(
    conn: &Connection,
    device: &str,
    quantity: &str,
    (from_ms, to_ms): (i64, i64),
    after_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(i64, f64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT ts_ms, value FROM history WHERE device = ?1 AND quantity = ?2 AND ts_ms >= ?3 AND ts_ms <= ?4 AND ts_ms > ?5 ORDER BY ts_ms LIMIT ?6",
    )?;
    let rows = stmt.query_map(
        params![device, quantity, from_ms, to_ms, after_ms, limit as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    rows.collect()
}

/// Samples of one counter around `[from, to]`: the last one before `from`, all inside, the first after
/// `to` (what interpolation at the boundaries needs). Works on any connection, read-only included.
pub(crate) fn history_window(
    conn: &Connection,
    device: &str,
    quantity: &str,
    from_ms: i64,
    to_ms: i64,
) -> rusqlite::Result<Vec<(i64, f64)>> {
    let mut out: Vec<(i64, f64)> = sample(conn, AT_OR_BEFORE, device, quantity, from_ms - 1)?
        .into_iter()
        .collect();
    let mut inside = conn.prepare_cached(
        "SELECT ts_ms, value FROM history WHERE device = ?1 AND quantity = ?2 AND ts_ms >= ?3 AND ts_ms <= ?4 ORDER BY ts_ms",
    )?;
    for r in inside.query_map(params![device, quantity, from_ms, to_ms], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })? {
        out.push(r?);
    }
    out.extend(sample(conn, AFTER, device, quantity, to_ms)?);
    Ok(out)
}

/// The last sample of a counter at or before `t_ms`.
const AT_OR_BEFORE: &str = "SELECT ts_ms, value FROM history WHERE device = ?1 AND quantity = ?2 AND ts_ms <= ?3 ORDER BY ts_ms DESC LIMIT 1";
/// The first sample of a counter after `t_ms`.
const AFTER: &str = "SELECT ts_ms, value FROM history WHERE device = ?1 AND quantity = ?2 AND ts_ms > ?3 ORDER BY ts_ms LIMIT 1";

/// One (time, value) sample of a counter, chosen by `sql` ([`AT_OR_BEFORE`] or [`AFTER`] `t_ms`).
fn sample(
    conn: &Connection,
    sql: &str,
    device: &str,
    quantity: &str,
    t_ms: i64,
) -> rusqlite::Result<Option<(i64, f64)>> {
    conn.prepare_cached(sql)?
        .query_row(params![device, quantity, t_ms], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
}

/// The last sample at or before `t` and the first after it: what the counter value at `t` needs.
pub(crate) fn history_around(
    conn: &Connection,
    device: &str,
    quantity: &str,
    t_ms: i64,
) -> rusqlite::Result<Vec<(i64, f64)>> {
    Ok(sample(conn, AT_OR_BEFORE, device, quantity, t_ms)?
        .into_iter()
        .chain(sample(conn, AFTER, device, quantity, t_ms)?)
        .collect())
}

impl Store {
    /// Adds counter samples to the history and prunes what is older than 13 months.
    pub fn record_history(&mut self, samples: &[Sample]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR REPLACE INTO history (device, quantity, ts_ms, value) VALUES (?1, ?2, ?3, ?4)")
                .map_err(err)?;
            for s in samples {
                stmt.execute(params![s.device, s.quantity, s.ts_ms, s.value])
                    .map_err(err)?;
            }
            // Pruning scans the table: once an hour is plenty for a 13-month horizon.
            let due = self
                .last_prune
                .is_none_or(|t| self.clock.since(t) >= Duration::from_secs(3600));
            if let (true, Some(newest)) = (due, samples.iter().map(|s| s.ts_ms).max()) {
                tx.execute(
                    "DELETE FROM history WHERE ts_ms < ?1",
                    [newest - HISTORY_KEEP_MS],
                )
                .map_err(err)?;
                self.last_prune = Some(self.clock.instant());
            }
        }
        tx.commit().map_err(err)
    }
}
