//! The outbox records: append (with the caps), fetch, ack, meta, stats, state writes in one
//! transaction (`transact`), command replies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::schema::SCHEMA;
use super::tail::{Tail, TAIL_BYTES};
use super::{
    meta_get, stats, Caps, Kind, NewRecord, RateKeeper, Remembered, Stats, StoreError, Stored,
    Write, MAX_RECORD_BYTES, REPLY_KEEP_MS,
};
use crate::clock::Clock;

/// The `SQLite` outbox.
pub struct Store {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
    pub(super) caps: Caps,
    pub(super) rows: u64,
    pub(super) bytes: u64,
    pub(super) dropped_total: u64,
    /// The age cap is checked at most once a minute: it needs a scan, the others are counters.
    pub(super) last_age_check: Option<tokio::time::Instant>,
    pub(super) last_prune: Option<tokio::time::Instant>,
    /// Stamps what the store writes itself (events, run times) and paces the caps.
    pub(super) clock: Clock,
    /// The newest committed rows, shared with the uplink's handle (see `tail`).
    pub(super) tail: Arc<Mutex<Tail>>,
    pub(super) rate: RateKeeper,
    /// Test fault: the next cap pass fails as on a full disk.
    #[cfg(test)]
    pub(super) fail_next_cap_pass: bool,
}

impl Store {
    /// Opens (creating if needed) the outbox at `path`; `clock` is the time its caps and its own
    /// records go by.
    pub fn open(path: &Path, caps: Caps, clock: Clock) -> Result<Store, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // Keep the page cache small (the gateway has little RAM) and the WAL from growing unbounded.
        conn.pragma_update(None, "cache_size", -2000).map_err(err)?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .map_err(err)?;
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let (rows, bytes): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)?;
        let dropped_total = meta_get(&conn, "dropped_total")
            .map_err(err)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let rate = RateKeeper::load(&conn).map_err(err)?;
        let store = Store {
            tail: Arc::new(Mutex::new(Tail::new(0, TAIL_BYTES))),
            rate,
            conn,
            path: path.to_path_buf(),
            caps,
            rows: rows as u64,
            bytes: bytes as u64,
            dropped_total,
            last_age_check: None,
            last_prune: None,
            clock,
            #[cfg(test)]
            fail_next_cap_pass: false,
        };
        store.tail_reset(store.last_seq()?);
        Ok(store)
    }

    pub(super) fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// A hard ceiling on the file, in pages: how tests reproduce a full disk.
    #[cfg(test)]
    pub(crate) fn set_max_page_count(&self, pages: u64) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, "max_page_count", pages as i64)
            .map_err(|e| self.err(e))
    }

    /// Appends records in one transaction and applies the caps. Returns the seq of the last record.
    pub fn append(&mut self, records: &[NewRecord]) -> Result<i64, StoreError> {
        self.append_remembering(records, &[])
    }

    /// [`Store::append`], and in the same transaction remembers command replies by id (see
    /// [`Store::replies_of`]).
    pub(crate) fn append_remembering(
        &mut self,
        records: &[NewRecord],
        remember: &[Remembered],
    ) -> Result<i64, StoreError> {
        self.append_all(records, remember, &[])
    }

    /// [`Store::append`], deleting acknowledged records (inclusive seq ranges) in the same
    /// transaction: the store thread's group commit of what the recorder and the uplink sent.
    pub(crate) fn append_acking(
        &mut self,
        records: &[NewRecord],
        acks: &[(i64, i64)],
    ) -> Result<i64, StoreError> {
        self.append_all(records, &[], acks)
    }

    fn append_all(
        &mut self,
        records: &[NewRecord],
        remember: &[Remembered],
        acks: &[(i64, i64)],
    ) -> Result<i64, StoreError> {
        if records.is_empty() {
            if !acks.is_empty() {
                self.ack(acks)?;
            }
            return self.last_seq();
        }
        let critical = records.iter().any(|r| r.kind.critical());
        if critical {
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .map_err(|e| self.err(e))?;
        }
        let result = self.insert(records, remember, acks);
        if critical {
            self.conn
                .pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| self.err(e))?;
        }
        let last = result?;
        self.rows += records.len() as u64;
        self.bytes += records
            .iter()
            .map(|r| r.payload.len().min(MAX_RECORD_BYTES) as u64)
            .sum::<u64>();
        // The records are committed: a failing cap pass (a full disk) must not make the caller hold
        // them and insert them again under new seqs. The caps are enforced again on the next write.
        if let Err(e) = self.enforce_caps(self.clock.now()) {
            tracing::error!(error = %e, "outbox: the cap pass failed; the records are stored, the cap is retried on the next write");
        }
        Ok(last)
    }

    pub(super) fn insert(
        &mut self,
        records: &[NewRecord],
        remember: &[Remembered],
        acks: &[(i64, i64)],
    ) -> Result<i64, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let known = self.tail_counted(acks);
        let tx = self.conn.transaction().map_err(err)?;
        let (acked_rows, acked_bytes) = delete_ranges(&tx, acks, known).map_err(err)?;
        insert_records(&tx, records, &mut self.rate, self.clock.now_ms()).map_err(err)?;
        let last = tx.last_insert_rowid();
        if !remember.is_empty() {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO command_replies (id, command, ts_ms, reply) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for r in remember {
                stmt.execute(params![r.id, r.command, r.ts_ms, r.reply])
                    .map_err(err)?;
            }
            drop(stmt);
            let keep_from = self.clock.now_ms() - REPLY_KEEP_MS;
            tx.execute("DELETE FROM command_replies WHERE ts_ms < ?1", [keep_from])
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.acked(acks, acked_rows, acked_bytes);
        self.tail_committed(records, last);
        Ok(last)
    }

    /// Tells the tail about records just committed with seqs up to `last`: plain telemetry (stored
    /// as given) is kept; anything else sends readers of these seqs to the table.
    fn tail_committed(&self, records: &[NewRecord], last: i64) {
        let Ok(mut tail) = self.tail.lock() else {
            return;
        };
        let plain = records
            .iter()
            .all(|r| r.kind == Kind::Telemetry && r.payload.len() <= MAX_RECORD_BYTES);
        if !plain {
            tail.reset(last);
            return;
        }
        let first = last - records.len() as i64 + 1;
        tail.push(
            records
                .iter()
                .zip(first..)
                .map(|(r, seq)| Stored {
                    seq,
                    kind: r.kind,
                    topic: r.topic.clone(),
                    ts_ms: r.ts.timestamp_millis(),
                    payload: r.payload.clone(),
                })
                .collect(),
        );
    }

    /// Rows were added or removed past the tail's knowledge; the newest seq is `last`.
    pub(super) fn tail_reset(&self, last: i64) {
        if let Ok(mut tail) = self.tail.lock() {
            tail.reset(last);
        }
    }

    /// The tail, for the store handle's fetches.
    pub(super) fn tail(&self) -> Arc<Mutex<Tail>> {
        self.tail.clone()
    }

    /// Runs `writes` and appends `records` in one transaction (see [`StoreHandle::transact`]).
    /// Returns the seq of the last record.
    pub(crate) fn transact(
        &mut self,
        records: &[NewRecord],
        writes: Vec<Write>,
        durable: bool,
    ) -> Result<i64, StoreError> {
        let full = durable || records.iter().any(|r| r.kind.critical());
        if full {
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .map_err(|e| self.err(e))?;
        }
        let result = (|| {
            let path = self.path.clone();
            let err = |source| StoreError::Sqlite {
                path: path.clone(),
                source,
            };
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(err)?;
            for w in writes {
                w(&tx).map_err(err)?;
            }
            insert_records(&tx, records, &mut self.rate, self.clock.now_ms()).map_err(err)?;
            let last = if records.is_empty() {
                None
            } else {
                Some(tx.last_insert_rowid())
            };
            tx.commit().map_err(err)?;
            Ok(last)
        })();
        if full {
            self.conn
                .pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| self.err(e))?;
        }
        match result? {
            Some(last) => {
                self.tail_reset(last);
                self.rows += records.len() as u64;
                self.bytes += records
                    .iter()
                    .map(|r| r.payload.len().min(MAX_RECORD_BYTES) as u64)
                    .sum::<u64>();
                Ok(last)
            }
            None => self.last_seq(),
        }
    }

    /// The replies already given to these command ids (those that have one).
    pub(crate) fn replies_of(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<u8>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT reply FROM command_replies WHERE id = ?1")
            .map_err(|e| self.err(e))?;
        let mut out = HashMap::new();
        for id in ids {
            if let Some(r) = stmt
                .query_row([id], |r| r.get::<_, Vec<u8>>(0))
                .optional()
                .map_err(|e| self.err(e))?
            {
                out.insert(id.clone(), r);
            }
        }
        Ok(out)
    }

    /// Drops telemetry past the caps and records an event that says how much: by timestamp what is
    /// older than `max_age`, then the oldest by seq while rows or bytes are over. With an implausible
    /// clock (a gateway without RTC before NTP) the age cap is skipped: "now" is nonsense, and records
    /// stamped before the clock was set are never "old" either.
    pub(super) fn enforce_caps(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_cap_pass) {
            return Err(self.err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some("database or disk is full".into()),
            )));
        }
        let check_age = crate::clock::plausible(now)
            && self
                .last_age_check
                .is_none_or(|t| self.clock.since(t) >= Duration::from_secs(60));
        if check_age {
            self.last_age_check = Some(self.clock.instant());
            let age_limit = now
                - chrono::Duration::from_std(self.caps.max_age).unwrap_or(chrono::Duration::MAX);
            // Among the oldest 100,000 rows (appended in about time order), those stamped at a
            // plausible time older than the limit.
            let aged = "seq IN (SELECT seq FROM outbox WHERE kind = 0 ORDER BY seq LIMIT 100000) AND ts_ms >= ?1 AND ts_ms < ?2";
            self.drop_telemetry(
                now,
                aged,
                &[
                    crate::clock::PLAUSIBLE_FROM_MS,
                    age_limit.timestamp_millis(),
                ],
                "max_age",
            )?;
        }
        let over_rows = self.rows.saturating_sub(self.caps.max_rows);
        let over_bytes = self.bytes > self.caps.max_bytes;
        if over_rows == 0 && !over_bytes {
            return Ok(());
        }
        // Drop in one go what the row cap needs; for bytes, 10 % headroom avoids dropping on every
        // append once full.
        let mut want = over_rows;
        if over_bytes {
            let avg = (self.bytes / self.rows.max(1)).max(1);
            let excess = self.bytes - self.caps.max_bytes + self.caps.max_bytes / 10;
            want = want.max(excess / avg + 1);
        }
        let reason = if over_rows > 0 {
            "max_rows"
        } else {
            "max_bytes"
        };
        let oldest = "seq IN (SELECT seq FROM outbox WHERE kind = 0 ORDER BY seq LIMIT ?1)";
        let dropped = self.drop_telemetry(now, oldest, &[want as i64], reason)?;
        if dropped == 0 {
            // Only results, audit, replies and events left: they are never dropped.
            tracing::warn!(
                rows = self.rows,
                bytes = self.bytes,
                "outbox over its cap but holds only records that are never dropped"
            );
        }
        Ok(())
    }

    /// Deletes the telemetry rows matching `filter` (an SQL condition on the outbox taking `args`)
    /// in one transaction with an `outbox_overflow` event; returns how many.
    pub(super) fn drop_telemetry(
        &mut self,
        now: DateTime<Utc>,
        filter: &str,
        args: &[i64],
        reason: &str,
    ) -> Result<u64, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let (first, last, n, freed): (Option<i64>, Option<i64>, i64, i64) = tx
            .query_row(
                &format!("SELECT min(seq), max(seq), count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE kind = 0 AND {filter}"),
                rusqlite::params_from_iter(args),
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(err)?;
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(0);
        };
        tx.execute(
            &format!("DELETE FROM outbox WHERE kind = 0 AND {filter}"),
            rusqlite::params_from_iter(args),
        )
        .map_err(err)?;
        let dropped_total = self.dropped_total + n as u64;
        let event = serde_json::json!({
            "event": "outbox_overflow",
            "reason": reason,
            "dropped": n,
            "seq_first": first,
            "seq_last": last,
            "dropped_total": dropped_total,
            "ts": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        tx.execute(
            "INSERT INTO outbox (kind, topic, ts_ms, payload) VALUES (?1, 'events', ?2, ?3)",
            params![
                Kind::Event as i64,
                now.timestamp_millis(),
                event.to_string().into_bytes()
            ],
        )
        .map_err(err)?;
        let event_seq = tx.last_insert_rowid();
        put_meta(&tx, "dropped_total", &dropped_total.to_string()).map_err(err)?;
        tx.commit().map_err(err)?;
        self.tail_reset(event_seq);
        tracing::warn!(
            dropped = n,
            seq_first = first,
            seq_last = last,
            reason,
            "outbox full: dropped telemetry"
        );
        self.dropped_total = dropped_total;
        self.rows = self.rows - n as u64 + 1;
        self.bytes = self.bytes - freed as u64 + event.to_string().len() as u64;
        Ok(n as u64)
    }

    /// Up to `limit` records with `after < seq <= upto`, oldest first.
    pub fn fetch(&self, after: i64, upto: i64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, kind, topic, ts_ms, payload FROM outbox WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after, upto, limit as i64], |r| {
                Ok(Stored {
                    seq: r.get(0)?,
                    kind: Kind::from_i64(r.get(1)?),
                    topic: r.get(2)?,
                    ts_ms: r.get(3)?,
                    payload: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Removes acknowledged records (inclusive seq ranges).
    pub(crate) fn ack(&mut self, ranges: &[(i64, i64)]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let known = self.tail_counted(ranges);
        let tx = self.conn.transaction().map_err(err)?;
        let (n, b) = delete_ranges(&tx, ranges, known).map_err(err)?;
        tx.commit().map_err(err)?;
        self.acked(ranges, n, b);
        Ok(())
    }

    /// What the tail knows of `ranges` (rows, bytes), so their delete needs no counting query.
    fn tail_counted(&self, ranges: &[(i64, i64)]) -> Option<(u64, u64)> {
        self.tail.lock().ok()?.counted(ranges)
    }

    /// Committed deletes of `ranges` (`rows` rows, `bytes` payload bytes) in the counters and tail.
    fn acked(&mut self, ranges: &[(i64, i64)], rows: u64, bytes: u64) {
        if ranges.is_empty() {
            return;
        }
        if let Ok(mut tail) = self.tail.lock() {
            tail.ack(ranges);
        }
        self.rows = self.rows.saturating_sub(rows);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// The newest seq ever assigned (0 for a fresh outbox), from `SQLite`'s own sequence.
    pub fn last_seq(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(v.unwrap_or(0))
    }

    /// Sets a status value (last publish error, …) that `meterd buffer` shows.
    pub(crate) fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        put_meta(&self.conn, key, value).map_err(|e| self.err(e))
    }

    /// Depth, age and the last errors.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        stats(&self.conn, self.clock.now_ms())
            .map_err(|e| self.err(e))
            .map(|mut s| {
                s.dropped_total = self.dropped_total;
                s.bytes_per_hour = self.rate.rate.per_hour(self.clock.now_ms());
                s
            })
    }
}

/// Inserts outbox records in the caller's transaction. A record larger than [`MAX_RECORD_BYTES`] is
/// kept whole in `oversized` and never handed to the uplink; a `record_too_large` event says where.
/// The record's payload carrying the time it describes: a record written without a top-level
/// `ts` gets the record's own time (RFC 3339 UTC, milliseconds), so every record on the wire stands
/// on its own. Telemetry is encoded with its `ts` already and passes untouched.
pub(crate) fn with_ts(r: &NewRecord) -> std::borrow::Cow<'_, [u8]> {
    if r.kind == Kind::Telemetry {
        return std::borrow::Cow::Borrowed(&r.payload);
    }
    match serde_json::from_slice::<serde_json::Value>(&r.payload) {
        Ok(serde_json::Value::Object(mut m)) if !m.contains_key("ts") => {
            m.insert(
                "ts".into(),
                serde_json::Value::from(r.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            );
            std::borrow::Cow::Owned(serde_json::Value::Object(m).to_string().into_bytes())
        }
        _ => std::borrow::Cow::Borrowed(&r.payload),
    }
}

/// Deletes inclusive seq ranges in the caller's transaction; returns (rows, payload bytes) deleted.
/// Deletes the inclusive seq `ranges`; returns the rows and payload bytes deleted (`known` when the
/// tail has counted them, else counted here first).
fn delete_ranges(
    tx: &Connection,
    ranges: &[(i64, i64)],
    known: Option<(u64, u64)>,
) -> rusqlite::Result<(u64, u64)> {
    let (mut n, mut b) = (0u64, 0u64);
    if ranges.is_empty() {
        return Ok((0, 0));
    }
    let mut del = tx.prepare_cached("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2")?;
    if let Some(known) = known {
        for (a, z) in ranges {
            del.execute([a, z])?;
        }
        return Ok(known);
    }
    let mut count = tx.prepare_cached(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE seq BETWEEN ?1 AND ?2",
    )?;
    for (a, z) in ranges {
        let (c, s): (i64, i64) = count.query_row([a, z], |r| Ok((r.get(0)?, r.get(1)?)))?;
        del.execute([a, z])?;
        n += c as u64;
        b += s as u64;
    }
    Ok((n, b))
}

/// Records inserted by one statement when a commit has that many in a row.
const INSERT_CHUNK: usize = 16;

/// `INSERT … VALUES (?, ?, ?, ?), …` for [`INSERT_CHUNK`] rows.
static INSERT_MANY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let rows = vec!["(?, ?, ?, ?)"; INSERT_CHUNK].join(", ");
    format!("INSERT INTO outbox (kind, topic, ts_ms, payload) VALUES {rows}")
});

/// Sets `key` in the meta table (inserted or replaced), inside whatever transaction `conn` is in.
pub(crate) fn put_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute([key, value])
    .map(drop)
}

pub(super) fn insert_records(
    tx: &Connection,
    records: &[NewRecord],
    rate: &mut RateKeeper,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO outbox (kind, topic, ts_ms, payload) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let bytes: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
    if let Some(saved) = rate.add(now_ms, bytes) {
        put_meta(tx, super::AppendRate::META_KEY, &saved)?;
    }
    let plain = |r: &NewRecord| r.payload.len() <= MAX_RECORD_BYTES;
    let mut i = 0;
    while i < records.len() {
        // Full chunks of plain records go in one statement each: one pass of the insert program
        // (and of AUTOINCREMENT's sequence update) for INSERT_CHUNK rows, seqs still in order.
        if let Some(chunk) = records
            .get(i..i + INSERT_CHUNK)
            .filter(|c| c.iter().all(plain))
        {
            let mut many = tx.prepare_cached(&INSERT_MANY)?;
            for (k, r) in chunk.iter().enumerate() {
                let at = 4 * k;
                many.raw_bind_parameter(at + 1, r.kind as i64)?;
                many.raw_bind_parameter(at + 2, &r.topic)?;
                many.raw_bind_parameter(at + 3, r.ts.timestamp_millis())?;
                many.raw_bind_parameter(at + 4, with_ts(r))?;
            }
            many.raw_execute()?;
            i += INSERT_CHUNK;
            continue;
        }
        let r = &records[i];
        i += 1;
        if plain(r) {
            stmt.execute(params![
                r.kind as i64,
                r.topic,
                r.ts.timestamp_millis(),
                with_ts(r)
            ])?;
            continue;
        }
        tx.execute(
            "INSERT INTO oversized (kind, topic, ts_ms, payload) VALUES (?1, ?2, ?3, ?4)",
            params![r.kind as i64, r.topic, r.ts.timestamp_millis(), r.payload],
        )?;
        let event = serde_json::json!({
            "event": "record_too_large",
            "topic": r.topic,
            "bytes": r.payload.len(),
            "limit": MAX_RECORD_BYTES,
            "kept_as": tx.last_insert_rowid(),
            "ts": r.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        tracing::error!(topic = %r.topic, bytes = r.payload.len(), "outbox record too large to publish; kept aside in the oversized table");
        stmt.execute(params![
            Kind::Event as i64,
            "events",
            r.ts.timestamp_millis(),
            event.to_string().into_bytes()
        ])?;
    }
    Ok(())
}
