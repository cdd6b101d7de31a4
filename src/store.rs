//! The outbox: every reading, result and event is written here before it is published, and leaves
//! only when the broker acknowledged it. SQLite on disk is the source of truth; nothing in memory is.
//!
//! Durability choices (deliberate, see `open`):
//! - `journal_mode = WAL`: the writer never blocks `meterd buffer` readers, and a crashed process
//!   (SIGKILL, OOM) loses no committed transaction.
//! - `synchronous = NORMAL` for telemetry transactions: a *power loss* may roll back the last
//!   transactions since the previous WAL sync (typically under a second of readings). Acceptable because
//!   meters' counters are cumulative: the next reading carries the same energy, so no kWh is lost from a
//!   bill, only one sample point. It buys ~10× write throughput on SD cards and eMMC.
//! - `synchronous = FULL` for any transaction that carries a billing result or a relay audit event:
//!   those are fsync'd before the commit returns, because they cannot be re-derived.
//!
//! Sequence numbers come from `INTEGER PRIMARY KEY AUTOINCREMENT`, which SQLite guarantees never to
//! reuse, even after every row was acknowledged and deleted and the process restarted: the backend
//! deduplicates redeliveries by `seq`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

/// What a record is; decides its topic and whether the cap may drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Readings: dropped oldest-first when the outbox is full.
    Telemetry = 0,
    /// Operational events (outbox overflow, …): kept.
    Event = 1,
    /// Billing results: never dropped.
    Result = 2,
    /// Relay audit trail: never dropped.
    Audit = 3,
    /// The reply to a cloud command: never dropped (exactly one per command).
    Reply = 4,
}

impl Kind {
    fn from_i64(v: i64) -> Kind {
        match v {
            0 => Kind::Telemetry,
            1 => Kind::Event,
            2 => Kind::Result,
            4 => Kind::Reply,
            _ => Kind::Audit,
        }
    }

    /// Records whose loss on power failure is not acceptable.
    fn critical(self) -> bool {
        matches!(self, Kind::Result | Kind::Audit | Kind::Reply)
    }
}

/// A record to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub kind: Kind,
    /// Topic suffix under `{prefix}/{gateway}/`: `telemetry`, `events`, `results/apportion`, `audit`.
    pub topic: String,
    pub ts: DateTime<Utc>,
    /// A JSON object.
    pub payload: Vec<u8>,
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: i64,
    pub kind: Kind,
    pub topic: String,
    pub ts_ms: i64,
    pub payload: Vec<u8>,
}

/// Limits on the outbox; past any of them the oldest telemetry is dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Caps {
    pub max_rows: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            max_rows: 5_000_000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(30 * 86_400),
        }
    }
}

/// Why the store failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("outbox {path}: {source}; check that the directory exists, is writable by meterd and the disk is not full")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("outbox {path} does not exist; has meterd run here yet? (set [store] path)")]
    Missing { path: PathBuf },
    #[error("the store task has stopped")]
    Stopped,
}

/// Depth and health of the outbox, for `meterd buffer`, `status` and the birth message.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    pub rows: u64,
    pub payload_bytes: u64,
    pub oldest_ts: Option<DateTime<Utc>>,
    /// The lowest seq still waiting: everything below it was acknowledged by the broker (or dropped
    /// by the cap, which an event reports).
    pub oldest_seq: Option<i64>,
    pub last_seq: i64,
    /// Rows per kind (telemetry, event, result, audit, reply).
    pub by_kind: [u64; 5],
    /// Records too large to publish, kept aside in `oversized` (see [`MAX_RECORD_BYTES`]).
    pub oversized: u64,
    pub dropped_total: u64,
    pub last_publish_error: Option<String>,
    pub last_publish_ok: Option<String>,
    /// The last error writing to disk, if the store is currently failing.
    pub store_error: Option<String>,
}

/// The SQLite outbox.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    caps: Caps,
    rows: u64,
    bytes: u64,
    dropped_total: u64,
    /// The age cap is checked at most once a minute: it needs a scan, the others are counters.
    last_age_check: Option<std::time::Instant>,
    last_prune: Option<std::time::Instant>,
    /// Test fault: the next cap pass fails as on a full disk.
    #[cfg(test)]
    fail_next_cap_pass: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    INTEGER NOT NULL,
    topic   TEXT    NOT NULL,
    ts_ms   INTEGER NOT NULL,
    payload BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Billing counters (kWh, m3) sampled every [topology] history_every: interval boundaries for
-- balances and apportionment come from here, not from the outbox (which empties as it publishes).
CREATE TABLE IF NOT EXISTS history (
    device   TEXT    NOT NULL,
    quantity TEXT    NOT NULL,
    ts_ms    INTEGER NOT NULL,
    value    REAL    NOT NULL,
    PRIMARY KEY (device, quantity, ts_ms)
) WITHOUT ROWID;
-- Every billing run of a period (pools and per-room bills), versioned: a recomputation is a new
-- version naming the one it supersedes, why, and the config it was computed with.
CREATE TABLE IF NOT EXISTS billing_runs (
    version     INTEGER PRIMARY KEY AUTOINCREMENT,
    period      TEXT    NOT NULL,
    computed_at TEXT    NOT NULL,
    supersedes  INTEGER,
    reason      TEXT    NOT NULL,
    config_hash TEXT    NOT NULL,
    provisional INTEGER NOT NULL,
    command_id  TEXT UNIQUE,
    body        TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS billing_runs_period ON billing_runs (period, version);
-- The reply to every cloud command with an id, so a command resent with the same id gets the
-- original reply again (its effect is not applied twice). Kept 30 days.
CREATE TABLE IF NOT EXISTS command_replies (
    id      TEXT PRIMARY KEY,
    command TEXT    NOT NULL,
    ts_ms   INTEGER NOT NULL,
    reply   BLOB    NOT NULL
);
-- Records larger than a publish may be, set aside whole instead of wedging the uplink; an event
-- names each one. `meterd buffer` counts them.
CREATE TABLE IF NOT EXISTS oversized (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    INTEGER NOT NULL,
    topic   TEXT    NOT NULL,
    ts_ms   INTEGER NOT NULL,
    payload BLOB    NOT NULL
);
-- Runs from before per-room bills (kept readable, no longer written).
CREATE TABLE IF NOT EXISTS apportionment (
    version     INTEGER PRIMARY KEY AUTOINCREMENT,
    period      TEXT NOT NULL,
    computed_at TEXT NOT NULL,
    results     TEXT NOT NULL
);
";

/// The largest record the outbox hands to the uplink (the uplink's packet limit is set above it).
/// Results of large pools are split into parts below it; a reply above it is refused with a reason.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// A write of another module's state (enforcement rules, prepaid counters, ledger), run by the store
/// thread inside the transaction that also appends that step's outbox records: SQLite has one
/// writer, and a state change and the records that report it commit together or not at all.
pub type Write = Box<dyn FnOnce(&Connection) -> rusqlite::Result<()> + Send>;

/// How long a command's reply is kept for a resend with the same id: 30 days.
const REPLY_KEEP_MS: i64 = 30 * 86_400_000;

/// A command's reply, remembered by its id.
#[derive(Debug, Clone, PartialEq)]
pub struct Remembered {
    pub id: String,
    pub command: String,
    pub ts_ms: i64,
    pub reply: Vec<u8>,
}

/// One counter sample for the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub device: String,
    pub quantity: String,
    pub ts_ms: i64,
    pub value: f64,
}

/// History older than this is pruned (13 months: a year of bills plus a month of disputes).
const HISTORY_KEEP_MS: i64 = 400 * 86_400_000;

/// Samples of one counter around `[from, to]`: the last one before `from`, all inside, the first after
/// `to` (what interpolation at the boundaries needs). Works on any connection, read-only included.
pub fn history_window(
    conn: &Connection,
    device: &str,
    quantity: &str,
    from_ms: i64,
    to_ms: i64,
) -> rusqlite::Result<Vec<(i64, f64)>> {
    let mut out: Vec<(i64, f64)> = sample_at_or_before(conn, device, quantity, from_ms - 1)?
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
    out.extend(sample_after(conn, device, quantity, to_ms)?);
    Ok(out)
}

/// The last sample of a counter at or before `t_ms`.
fn sample_at_or_before(
    conn: &Connection,
    device: &str,
    quantity: &str,
    t_ms: i64,
) -> rusqlite::Result<Option<(i64, f64)>> {
    conn.prepare_cached(
        "SELECT ts_ms, value FROM history WHERE device = ?1 AND quantity = ?2 AND ts_ms <= ?3 ORDER BY ts_ms DESC LIMIT 1",
    )?
    .query_row(params![device, quantity, t_ms], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()
}

/// The first sample of a counter after `t_ms`.
fn sample_after(
    conn: &Connection,
    device: &str,
    quantity: &str,
    t_ms: i64,
) -> rusqlite::Result<Option<(i64, f64)>> {
    conn.prepare_cached(
        "SELECT ts_ms, value FROM history WHERE device = ?1 AND quantity = ?2 AND ts_ms > ?3 ORDER BY ts_ms LIMIT 1",
    )?
    .query_row(params![device, quantity, t_ms], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()
}

/// The last sample at or before `t` and the first after it: what the counter value at `t` needs.
pub fn history_around(
    conn: &Connection,
    device: &str,
    quantity: &str,
    t_ms: i64,
) -> rusqlite::Result<Vec<(i64, f64)>> {
    Ok(sample_at_or_before(conn, device, quantity, t_ms)?
        .into_iter()
        .chain(sample_after(conn, device, quantity, t_ms)?)
        .collect())
}

/// A billing run to keep.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    pub period: String,
    pub supersedes: Option<i64>,
    pub reason: String,
    pub config_hash: String,
    pub provisional: bool,
    /// The cloud command that asked for it (a resend finds the run instead of making another).
    pub command_id: Option<String>,
    /// The statement (pools and bills), JSON.
    pub body: String,
}

/// A kept billing run.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRun {
    pub version: i64,
    pub period: String,
    pub computed_at: String,
    pub supersedes: Option<i64>,
    pub reason: String,
    pub config_hash: String,
    pub provisional: bool,
    pub body: String,
}

/// The run of `period` with `version`, or its latest one.
pub fn load_run(
    conn: &Connection,
    period: &str,
    version: Option<i64>,
) -> rusqlite::Result<Option<StoredRun>> {
    conn.query_row(
        "SELECT version, period, computed_at, supersedes, reason, config_hash, provisional, body FROM billing_runs
         WHERE period = ?1 AND (?2 IS NULL OR version = ?2) ORDER BY version DESC LIMIT 1",
        params![period, version],
        |r| {
            Ok(StoredRun {
                version: r.get(0)?,
                period: r.get(1)?,
                computed_at: r.get(2)?,
                supersedes: r.get(3)?,
                reason: r.get(4)?,
                config_hash: r.get(5)?,
                provisional: r.get::<_, i64>(6)? != 0,
                body: r.get(7)?,
            })
        },
    )
    .optional()
}

/// One version of a period in the list: (version, computed_at, supersedes, reason).
pub type RunVersion = (i64, String, Option<i64>, String);

/// Every version of a period, oldest first.
pub fn run_versions(conn: &Connection, period: &str) -> rusqlite::Result<Vec<RunVersion>> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, computed_at, supersedes, reason FROM billing_runs WHERE period = ?1 ORDER BY version",
    )?;
    let rows = stmt.query_map([period], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    rows.collect()
}

/// Periods that have a run.
pub fn run_periods(conn: &Connection) -> rusqlite::Result<std::collections::BTreeSet<String>> {
    let mut stmt = conn.prepare_cached("SELECT DISTINCT period FROM billing_runs")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// The run a cloud command made, if it made one.
pub fn run_of_command(conn: &Connection, id: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT version FROM billing_runs WHERE command_id = ?1",
        [id],
        |r| r.get(0),
    )
    .optional()
}

/// Builds a run's outbox records once its version is known.
pub type RunRecords = Box<dyn FnOnce(i64) -> Vec<NewRecord> + Send>;

/// Opens an outbox read-only (CLI tools, the accounting task): safe beside the writer thanks to WAL.
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Missing {
            path: path.to_path_buf(),
        });
    }
    let err = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the outbox at `path`.
    pub fn open(path: &Path, caps: Caps) -> Result<Store, StoreError> {
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
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            caps,
            rows: rows as u64,
            bytes: bytes as u64,
            dropped_total,
            last_age_check: None,
            last_prune: None,
            #[cfg(test)]
            fail_next_cap_pass: false,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// A hard ceiling on the file, in pages: a second line of defence under the caps (and how tests
    /// reproduce a full disk).
    pub fn set_max_page_count(&self, pages: u64) -> Result<(), StoreError> {
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
    pub fn append_remembering(
        &mut self,
        records: &[NewRecord],
        remember: &[Remembered],
    ) -> Result<i64, StoreError> {
        if records.is_empty() {
            return self.last_seq();
        }
        let critical = records.iter().any(|r| r.kind.critical());
        if critical {
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .map_err(|e| self.err(e))?;
        }
        let result = self.insert(records, remember);
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
        if let Err(e) = self.enforce_caps(Utc::now()) {
            tracing::error!(error = %e, "outbox: the cap pass failed; the records are stored, the cap is retried on the next write");
        }
        Ok(last)
    }

    fn insert(
        &mut self,
        records: &[NewRecord],
        remember: &[Remembered],
    ) -> Result<i64, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO outbox (kind, topic, ts_ms, payload) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for r in records {
                if r.payload.len() > MAX_RECORD_BYTES {
                    // Kept whole, but never handed to the uplink: an event says where it is.
                    tx.execute(
                        "INSERT INTO oversized (kind, topic, ts_ms, payload) VALUES (?1, ?2, ?3, ?4)",
                        params![r.kind as i64, r.topic, r.ts.timestamp_millis(), r.payload],
                    )
                    .map_err(err)?;
                    let event = serde_json::json!({
                        "event": "record_too_large",
                        "topic": r.topic,
                        "bytes": r.payload.len(),
                        "limit": MAX_RECORD_BYTES,
                        "kept_as": tx.last_insert_rowid(),
                        "ts": r.ts.to_rfc3339(),
                    });
                    tracing::error!(topic = %r.topic, bytes = r.payload.len(), "outbox record too large to publish; kept aside in the oversized table");
                    stmt.execute(params![
                        Kind::Event as i64,
                        "events",
                        r.ts.timestamp_millis(),
                        event.to_string().into_bytes()
                    ])
                    .map_err(err)?;
                    continue;
                }
                stmt.execute(params![
                    r.kind as i64,
                    r.topic,
                    r.ts.timestamp_millis(),
                    r.payload
                ])
                .map_err(err)?;
            }
        }
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
            let keep_from = Utc::now().timestamp_millis() - REPLY_KEEP_MS;
            tx.execute("DELETE FROM command_replies WHERE ts_ms < ?1", [keep_from])
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(last)
    }

    /// Runs `writes` and appends `records` in one transaction (see [`StoreHandle::transact`]).
    /// Returns the seq of the last record.
    pub fn transact(
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
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO outbox (kind, topic, ts_ms, payload) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .map_err(err)?;
                for r in records {
                    stmt.execute(params![
                        r.kind as i64,
                        r.topic,
                        r.ts.timestamp_millis(),
                        r.payload
                    ])
                    .map_err(err)?;
                }
            }
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
                self.rows += records.len() as u64;
                self.bytes += records.iter().map(|r| r.payload.len() as u64).sum::<u64>();
                Ok(last)
            }
            None => self.last_seq(),
        }
    }

    /// The replies already given to these command ids (those that have one).
    pub fn replies_of(&self, ids: &[String]) -> Result<HashMap<String, Vec<u8>>, StoreError> {
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
    fn enforce_caps(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
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
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if check_age {
            self.last_age_check = Some(std::time::Instant::now());
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
    fn drop_telemetry(
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
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('dropped_total', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [dropped_total.to_string()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
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
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
            if let (true, Some(newest)) = (due, samples.iter().map(|s| s.ts_ms).max()) {
                tx.execute(
                    "DELETE FROM history WHERE ts_ms < ?1",
                    [newest - HISTORY_KEEP_MS],
                )
                .map_err(err)?;
                self.last_prune = Some(std::time::Instant::now());
            }
        }
        tx.commit().map_err(err)
    }

    /// Keeps a billing run and its outbox records in one durable transaction (`synchronous=FULL`):
    /// a version exists exactly when its results are queued for the cloud. Returns the version.
    pub fn save_run(&mut self, run: &NewRun, records: RunRecords) -> Result<i64, StoreError> {
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.err(e))?;
        let r = self.insert_run(run, records);
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| self.err(e))?;
        let (version, n, bytes) = r?;
        self.rows += n;
        self.bytes += bytes;
        Ok(version)
    }

    fn insert_run(
        &mut self,
        run: &NewRun,
        records: RunRecords,
    ) -> Result<(i64, u64, u64), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO billing_runs (period, computed_at, supersedes, reason, config_hash, provisional, command_id, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![run.period, Utc::now().to_rfc3339(), run.supersedes, run.reason, run.config_hash, run.provisional as i64, run.command_id, run.body],
        )
        .map_err(err)?;
        let version = tx.last_insert_rowid();
        let records = records(version);
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO outbox (kind, topic, ts_ms, payload) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for r in &records {
                stmt.execute(params![
                    r.kind as i64,
                    r.topic,
                    r.ts.timestamp_millis(),
                    r.payload
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        let bytes = records.iter().map(|r| r.payload.len() as u64).sum();
        Ok((version, records.len() as u64, bytes))
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
    pub fn ack(&mut self, ranges: &[(i64, i64)]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let (mut n, mut b) = (0u64, 0u64);
        {
            let mut count = tx
                .prepare_cached("SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE seq BETWEEN ?1 AND ?2")
                .map_err(err)?;
            let mut del = tx
                .prepare_cached("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2")
                .map_err(err)?;
            for (a, z) in ranges {
                let (c, s): (i64, i64) = count
                    .query_row([a, z], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(err)?;
                del.execute([a, z]).map_err(err)?;
                n += c as u64;
                b += s as u64;
            }
        }
        tx.commit().map_err(err)?;
        self.rows = self.rows.saturating_sub(n);
        self.bytes = self.bytes.saturating_sub(b);
        Ok(())
    }

    /// The newest seq ever assigned (0 for a fresh outbox), from SQLite's own sequence.
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
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Depth, age and the last errors.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        stats(&self.conn).map_err(|e| self.err(e)).map(|mut s| {
            s.dropped_total = self.dropped_total;
            s
        })
    }
}

fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn stats(conn: &Connection) -> rusqlite::Result<Stats> {
    let mut s = Stats::default();
    // One pass, constant memory: a GROUP BY here would sort the whole outbox in a temp table.
    let (k, bytes, oldest): ([i64; 5], i64, Option<i64>) = conn.query_row(
        "SELECT coalesce(sum(kind = 0), 0), coalesce(sum(kind = 1), 0), coalesce(sum(kind = 2), 0), coalesce(sum(kind = 3), 0),
                coalesce(sum(kind = 4), 0), coalesce(sum(length(payload)), 0), min(ts_ms) FROM outbox",
        [],
        |r| Ok(([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?], r.get(5)?, r.get(6)?)),
    )?;
    s.by_kind = k.map(|n| n as u64);
    s.oversized = conn
        .query_row("SELECT count(*) FROM oversized", [], |r| r.get::<_, i64>(0))
        .optional()
        .ok()
        .flatten()
        .unwrap_or(0) as u64;
    s.rows = s.by_kind.iter().sum();
    s.payload_bytes = bytes as u64;
    s.oldest_ts = oldest.and_then(DateTime::from_timestamp_millis);
    s.oldest_seq = conn.query_row("SELECT min(seq) FROM outbox", [], |r| r.get(0))?;
    s.last_seq = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    s.dropped_total = meta_get(conn, "dropped_total")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    s.last_publish_error = meta_get(conn, "last_publish_error")?;
    s.last_publish_ok = meta_get(conn, "last_publish_ok")?;
    s.store_error = meta_get(conn, "store_error")?;
    Ok(s)
}

/// Reads the stats of an outbox another process owns, without writing to it (`meterd buffer`).
pub fn read_stats(path: &Path) -> Result<Stats, StoreError> {
    let conn = open_read_only(path)?;
    stats(&conn).map_err(|source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    })
}

// ---- the store task -----------------------------------------------------------------------------

/// Requests to the store thread.
enum Command {
    Append(Vec<NewRecord>),
    Fetch {
        after: i64,
        upto: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Stored>, String>>,
    },
    Ack(Vec<(i64, i64)>),
    Meta(String, String),
    Stats(oneshot::Sender<Stats>),
    Depth(oneshot::Sender<u64>),
    Flush(oneshot::Sender<()>),
    MaxPages(u64),
    History(Vec<Sample>),
    Replies {
        ids: Vec<String>,
        reply: oneshot::Sender<HashMap<String, Vec<u8>>>,
    },
    Reply {
        records: Vec<NewRecord>,
        remember: Vec<Remembered>,
        done: oneshot::Sender<()>,
    },
    Transact {
        records: Vec<NewRecord>,
        writes: Vec<Write>,
        durable: bool,
        done: oneshot::Sender<Result<(), String>>,
    },
    SaveRun {
        run: NewRun,
        records: RunRecords,
        reply: oneshot::Sender<Result<i64, String>>,
    },
}

/// Records kept in memory while the disk refuses writes, before the oldest telemetry is dropped.
const SPILL_LIMIT: usize = 200_000;

/// Handle to the store thread; cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
    /// The newest committed seq; the uplink waits on it for new data.
    pub committed: watch::Receiver<i64>,
    /// The last disk error while one persists (disk full, read-only), for status.
    pub health: Arc<Mutex<Option<String>>>,
}

impl StoreHandle {
    /// Queues records for the next group commit. Waits only if the store is far behind.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<(), StoreError> {
        self.tx
            .send(Command::Append(records))
            .await
            .map_err(|_| StoreError::Stopped)
    }

    /// Sends the command `make` builds around a reply channel and waits for the reply.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| "store stopped".to_string())?;
        rx.await.map_err(|_| "store stopped".to_string())
    }

    /// Records with `after < seq <= upto`, oldest first.
    pub async fn fetch(&self, after: i64, upto: i64, limit: usize) -> Result<Vec<Stored>, String> {
        self.request(|reply| Command::Fetch {
            after,
            upto,
            limit,
            reply,
        })
        .await?
    }

    /// Deletes acknowledged records.
    pub async fn ack(&self, ranges: Vec<(i64, i64)>) {
        let _ = self.tx.send(Command::Ack(ranges)).await;
    }

    /// Records a status value shown by `meterd buffer`.
    pub async fn set_meta(&self, key: &str, value: String) {
        let _ = self.tx.send(Command::Meta(key.to_string(), value)).await;
    }

    /// Current depth and errors.
    pub async fn stats(&self) -> Stats {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Stats(tx)).await.is_err() {
            return Stats::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Records waiting, from the store's counter (no scan): for the birth message and live displays.
    pub async fn depth(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Depth(tx)).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Sets a hard ceiling on the outbox file in pages (see [`Store::set_max_page_count`]); writes past
    /// it fail like a full disk.
    pub async fn set_max_page_count(&self, pages: u64) {
        let _ = self.tx.send(Command::MaxPages(pages)).await;
    }

    /// Adds counter samples to the history (billing boundaries).
    pub async fn record_history(&self, samples: Vec<Sample>) {
        let _ = self.tx.send(Command::History(samples)).await;
    }

    /// The replies already given to these command ids.
    pub async fn replies_of(&self, ids: Vec<String>) -> HashMap<String, Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Replies { ids, reply }).await.is_err() {
            return HashMap::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Appends reply records and remembers them by command id, in one durable transaction;
    /// returns once they are committed (or held in memory if the disk refuses them).
    pub async fn reply(&self, records: Vec<NewRecord>, remember: Vec<Remembered>) {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Reply {
                records,
                remember,
                done,
            })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Runs `writes` and appends `records` in one transaction on the store thread (after what was
    /// queued before), with `synchronous=FULL` when `durable` (a state change that is acknowledged to
    /// someone). Nothing is written if any write fails; the error says why.
    pub async fn transact(
        &self,
        records: Vec<NewRecord>,
        writes: Vec<Write>,
        durable: bool,
    ) -> Result<(), String> {
        self.request(|done| Command::Transact {
            records,
            writes,
            durable,
            done,
        })
        .await?
    }

    /// Saves a billing run with its outbox records (built from the version); returns the version.
    pub async fn save_run(&self, run: NewRun, records: RunRecords) -> Result<i64, String> {
        self.request(|reply| Command::SaveRun {
            run,
            records,
            reply,
        })
        .await?
    }

    /// Waits until everything queued before this call is committed (or held in memory if the disk
    /// refuses it).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Runs the store on its own thread (SQLite calls block) and returns its handle. The thread ends
/// when every handle is dropped.
pub fn spawn(store: Store) -> Result<StoreHandle, StoreError> {
    let (tx, rx) = mpsc::channel(1024);
    let (committed_tx, committed) = watch::channel(store.last_seq()?);
    let health = Arc::new(Mutex::new(None));
    let h = health.clone();
    std::thread::Builder::new()
        .name("meterd-store".into())
        .spawn(move || store_loop(store, rx, committed_tx, h))
        .map_err(|_| StoreError::Stopped)?;
    Ok(StoreHandle {
        tx,
        committed,
        health,
    })
}

/// The store thread's state: the outbox, plus what it holds in memory while the disk refuses writes.
struct Writer {
    store: Store,
    spill: VecDeque<NewRecord>,
    spill_dropped: u64,
    last_error_log: Option<std::time::Instant>,
    committed: watch::Sender<i64>,
    health: Arc<Mutex<Option<String>>>,
}

impl Writer {
    /// Commits `batch` (after anything held in memory) in one transaction; on failure holds it.
    fn commit(&mut self, batch: Vec<NewRecord>, remember: &[Remembered]) {
        if batch.is_empty() && self.spill.is_empty() {
            return;
        }
        let mut all: Vec<NewRecord> = self.spill.drain(..).collect();
        all.extend(batch);
        match self.store.append_remembering(&all, remember) {
            Ok(last) => {
                self.committed.send_replace(last);
                if self
                    .health
                    .lock()
                    .map(|mut h| h.take().is_some())
                    .unwrap_or(false)
                {
                    tracing::info!("outbox writable again; stored the records held in memory");
                    let _ = self.store.set_meta("store_error", "");
                }
                if self.spill_dropped > 0 {
                    let event = serde_json::json!({"event": "outbox_spill_overflow", "dropped": self.spill_dropped});
                    let rec = NewRecord {
                        kind: Kind::Event,
                        topic: "events".into(),
                        ts: Utc::now(),
                        payload: event.to_string().into_bytes(),
                    };
                    if let Ok(last) = self.store.append(&[rec]) {
                        self.committed.send_replace(last);
                        self.spill_dropped = 0;
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if self
                    .last_error_log
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                {
                    tracing::error!(error = %msg, held = all.len(), "outbox write failed; polling continues, records held in memory");
                    self.last_error_log = Some(std::time::Instant::now());
                }
                if let Ok(mut h) = self.health.lock() {
                    *h = Some(msg);
                }
                self.spill.extend(all);
                while self.spill.len() > SPILL_LIMIT {
                    // Drop the oldest telemetry first; never results or audit.
                    match self.spill.iter().position(|r| r.kind == Kind::Telemetry) {
                        Some(i) => {
                            self.spill.remove(i);
                            self.spill_dropped += 1;
                        }
                        None => break,
                    }
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        let store = &mut self.store;
        match cmd {
            Command::Append(r) => self.commit(r, &[]),
            Command::Replies { ids, reply } => {
                let r = store.replies_of(&ids).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "command replies could not be read; commands are handled afresh");
                    HashMap::new()
                });
                let _ = reply.send(r);
            }
            Command::Reply {
                records,
                remember,
                done,
            } => {
                self.commit(records, &remember);
                let _ = done.send(());
            }
            Command::Transact {
                records,
                writes,
                durable,
                done,
            } => {
                // Records held from an earlier failure go first, in their own commit.
                self.commit(Vec::new(), &[]);
                let r = self.store.transact(&records, writes, durable);
                match r {
                    Ok(last) => {
                        self.committed.send_replace(last);
                        let _ = done.send(Ok(()));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "state change not written; its records are held in memory");
                        self.spill.extend(records);
                        let _ = done.send(Err(e.to_string()));
                    }
                }
            }
            Command::Fetch {
                after,
                upto,
                limit,
                reply,
            } => {
                let _ = reply.send(store.fetch(after, upto, limit).map_err(|e| e.to_string()));
            }
            Command::Ack(ranges) => {
                if let Err(e) = store.ack(&ranges) {
                    tracing::error!(error = %e, "outbox: could not delete acknowledged records; they will be sent again");
                }
            }
            Command::Meta(k, v) => {
                let _ = store.set_meta(&k, &v);
            }
            Command::Stats(reply) => {
                let mut s = store.stats().unwrap_or_default();
                s.store_error = self.health.lock().ok().and_then(|h| h.clone());
                s.rows += self.spill.len() as u64;
                let _ = reply.send(s);
            }
            Command::Depth(reply) => {
                let _ = reply.send(store.rows + self.spill.len() as u64);
            }
            Command::Flush(reply) => {
                let _ = reply.send(());
            }
            Command::MaxPages(pages) => {
                if let Err(e) = store.set_max_page_count(pages) {
                    tracing::error!(error = %e, "outbox: cannot set the page limit");
                }
            }
            Command::History(samples) => {
                if let Err(e) = store.record_history(&samples) {
                    tracing::error!(error = %e, "history: samples not stored; billing boundaries will be interpolated");
                }
            }
            Command::SaveRun {
                run,
                records,
                reply,
            } => {
                let r = store.save_run(&run, records).map_err(|e| e.to_string());
                if r.is_ok() {
                    if let Ok(last) = store.last_seq() {
                        self.committed.send_replace(last);
                    }
                }
                let _ = reply.send(r);
            }
        }
    }
}

fn store_loop(
    store: Store,
    mut rx: mpsc::Receiver<Command>,
    committed: watch::Sender<i64>,
    health: Arc<Mutex<Option<String>>>,
) {
    let mut w = Writer {
        store,
        spill: VecDeque::new(),
        spill_dropped: 0,
        last_error_log: None,
        committed,
        health,
    };
    loop {
        // Block for the next command, or retry what is held in memory every 200 ms.
        let first = if w.spill.is_empty() {
            match rx.blocking_recv() {
                Some(c) => Some(c),
                None => return,
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
            match rx.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        };
        // Group commit: consecutive appends already queued go into one transaction; any other command
        // first commits what came before it, so every command sees the effect of earlier ones.
        let mut batch: Vec<NewRecord> = Vec::new();
        let mut next = first;
        while let Some(cmd) = next {
            match cmd {
                Command::Append(mut r) => batch.append(&mut r),
                other => {
                    w.commit(std::mem::take(&mut batch), &[]);
                    w.handle(other);
                }
            }
            if batch.len() >= 50_000 {
                break;
            }
            next = rx.try_recv().ok();
        }
        w.commit(batch, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn rec(kind: Kind, n: usize) -> NewRecord {
        NewRecord {
            kind,
            topic: if kind == Kind::Telemetry {
                "telemetry".into()
            } else {
                "audit".into()
            },
            ts: Utc::now(),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
        }
    }

    /// Before the fix the age cap dropped the oldest telemetry by seq as soon as any of it looked
    /// old: readings stamped 1970 by a gateway without RTC went at once (and with them, by seq,
    /// young ones), and a clock in the future would have aged out everything.
    #[test]
    fn the_age_cap_drops_by_timestamp_and_never_on_a_wrong_clock() {
        let dir = tempfile::tempdir().unwrap();
        let caps = Caps {
            max_age: Duration::from_secs(30 * 86_400),
            ..Caps::default()
        };
        let mut s = Store::open(&dir.path().join("outbox.db"), caps).unwrap();
        // The append's own cap pass must not look at the age: this test sets "now" itself.
        s.last_age_check = Some(std::time::Instant::now());
        let at = |t: &str, n: usize| NewRecord {
            kind: Kind::Telemetry,
            topic: "telemetry".into(),
            ts: DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
        };
        // Boot without RTC: 1970 stamps; then NTP: real ones, a young one among old ones.
        s.append(&[
            at("1970-01-01T00:00:05Z", 1),
            at("1970-01-01T00:00:15Z", 2),
            at("2026-10-01T08:00:00Z", 3),
            at("2026-11-29T23:59:50Z", 4),
            at("2026-10-02T08:00:00Z", 5),
        ])
        .unwrap();
        let now = DateTime::parse_from_rfc3339("2026-11-30T00:05:00Z")
            .unwrap()
            .with_timezone(&Utc);
        // A wrong clock (2099): the age cap is not applied at all.
        s.last_age_check = None;
        s.enforce_caps(now + chrono::Duration::days(26_000))
            .unwrap();
        assert_eq!(s.fetch(0, i64::MAX, 100).unwrap().len(), 5);
        // The right clock: exactly the two plausible records older than 30 days go.
        s.last_age_check = None;
        s.enforce_caps(now).unwrap();
        let left: Vec<String> = s
            .fetch(0, i64::MAX, 100)
            .unwrap()
            .iter()
            .map(|r| String::from_utf8(r.payload.clone()).unwrap())
            .collect();
        assert_eq!(left[..3], [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":4}"#]);
        let ev: Value =
            serde_json::from_slice(&s.fetch(0, i64::MAX, 100).unwrap()[3].payload).unwrap();
        assert_eq!(
            (ev["reason"].clone(), ev["dropped"].clone()),
            (json!("max_age"), json!(2))
        );
        assert_eq!(
            (ev["seq_first"].clone(), ev["seq_last"].clone()),
            (json!(3), json!(5))
        );
    }

    #[test]
    fn a_reply_is_remembered_with_its_record_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let reply = br#"{"id":"c-1","command":"top_up","ok":false,"error":"top-up suspended"}"#;
        {
            let mut s = Store::open(&path, Caps::default()).unwrap();
            let rec = NewRecord {
                kind: Kind::Reply,
                topic: "reply".into(),
                ts: Utc::now(),
                payload: reply.to_vec(),
            };
            let remember = Remembered {
                id: "c-1".into(),
                command: "top_up".into(),
                ts_ms: Utc::now().timestamp_millis(),
                reply: reply.to_vec(),
            };
            s.append_remembering(&[rec], &[remember]).unwrap();
        }
        let s = Store::open(&path, Caps::default()).unwrap();
        let known = s.replies_of(&["c-1".into(), "c-2".into()]).unwrap();
        assert_eq!(known.len(), 1);
        assert_eq!(known["c-1"], reply.to_vec());
        let st = s.stats().unwrap();
        assert_eq!(st.by_kind[Kind::Reply as usize], 1);
        assert_eq!(s.fetch(0, i64::MAX, 10).unwrap()[0].kind, Kind::Reply);
    }

    #[test]
    fn a_cap_pass_failing_on_a_full_disk_after_the_insert_does_not_store_the_batch_twice() {
        let dir = tempfile::tempdir().unwrap();
        let caps = Caps {
            max_rows: 50,
            ..Caps::default()
        };
        let store = Store::open(&dir.path().join("o.db"), caps).unwrap();
        let mut w = Writer {
            store,
            spill: VecDeque::new(),
            spill_dropped: 0,
            last_error_log: None,
            committed: watch::channel(0).0,
            health: Arc::new(Mutex::new(None)),
        };
        w.commit((0..40).map(|i| rec(Kind::Telemetry, i)).collect(), &[]);
        // The next batch crosses the cap; its cap pass fails after the batch was committed.
        w.store.fail_next_cap_pass = true;
        w.commit((40..60).map(|i| rec(Kind::Telemetry, i)).collect(), &[]);
        w.commit((60..70).map(|i| rec(Kind::Telemetry, i)).collect(), &[]);
        let all = w.store.fetch(0, i64::MAX, 1000).unwrap();
        let mut seen = std::collections::HashSet::new();
        for r in all.iter().filter(|r| r.kind == Kind::Telemetry) {
            assert!(
                seen.insert(r.payload.clone()),
                "stored twice: {}",
                String::from_utf8_lossy(&r.payload)
            );
        }
        assert!(w.spill.is_empty(), "nothing held for a second insert");
        assert!(
            all.len() <= 51,
            "the cap applied on the next write: {}",
            all.len()
        );
        assert_eq!(
            *w.committed.borrow(),
            70,
            "the batches took seqs 1..=70, once"
        );
        assert!(
            w.store.last_seq().unwrap() <= 71,
            "only the overflow event after them"
        );
    }

    #[test]
    fn seq_is_monotonic_across_restarts_even_when_everything_was_acked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.db");
        let mut s = Store::open(&p, Caps::default()).unwrap();
        let last = s
            .append(&(0..10).map(|i| rec(Kind::Telemetry, i)).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(last, 10);
        s.ack(&[(1, 10)]).unwrap();
        assert_eq!(s.stats().unwrap().rows, 0);
        drop(s);
        let mut s = Store::open(&p, Caps::default()).unwrap();
        assert_eq!(s.append(&[rec(Kind::Telemetry, 0)]).unwrap(), 11);
    }

    #[test]
    fn the_row_cap_drops_oldest_telemetry_never_audit_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let caps = Caps {
            max_rows: 100,
            ..Caps::default()
        };
        let mut s = Store::open(&dir.path().join("o.db"), caps).unwrap();
        let mut batch: Vec<NewRecord> = (0..80).map(|i| rec(Kind::Telemetry, i)).collect();
        batch.push(rec(Kind::Audit, 999));
        s.append(&batch).unwrap();
        s.append(&(0..50).map(|i| rec(Kind::Telemetry, i)).collect::<Vec<_>>())
            .unwrap();
        let all = s.fetch(0, i64::MAX, 1000).unwrap();
        assert!(all.len() <= 101, "{}", all.len());
        assert!(all.iter().any(|r| r.kind == Kind::Audit), "audit survives");
        let ev = all
            .iter()
            .find(|r| r.topic == "events")
            .expect("overflow event");
        let v: serde_json::Value = serde_json::from_slice(&ev.payload).unwrap();
        assert_eq!(v["event"], "outbox_overflow");
        assert_eq!(v["seq_first"], 1);
        let dropped = v["dropped"].as_i64().unwrap();
        assert_eq!(v["seq_last"], dropped);
        // The oldest surviving telemetry follows the dropped range.
        let first_tel = all.iter().find(|r| r.kind == Kind::Telemetry).unwrap();
        assert_eq!(first_tel.seq, dropped + 1);
    }

    #[test]
    fn a_full_disk_is_an_error_and_nothing_committed_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("o.db"), Caps::default()).unwrap();
        s.append(&[rec(Kind::Audit, 1)]).unwrap();
        let pages: i64 = s
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        s.set_max_page_count(pages as u64).unwrap();
        let big: Vec<NewRecord> = (0..5000).map(|i| rec(Kind::Telemetry, i)).collect();
        let e = s.append(&big).unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        assert_eq!(
            s.fetch(0, i64::MAX, 10).unwrap().len(),
            1,
            "the audit record is still there"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<Kind>),
        /// Ack the k-th..(k+len)-th stored records (as the uplink does after a PUBACK).
        Ack(usize, usize),
        /// A publish that failed: nothing is acked, nothing changes.
        FailedPublish,
        Restart,
        Fetch(usize, usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let kind =
            prop_oneof![4 => Just(Kind::Telemetry), 1 => Just(Kind::Event), 1 => Just(Kind::Audit)];
        prop_oneof![
            4 => proptest::collection::vec(kind, 1..20).prop_map(Op::Append),
            3 => (0usize..40, 1usize..10).prop_map(|(k, n)| Op::Ack(k, n)),
            1 => Just(Op::FailedPublish),
            1 => Just(Op::Restart),
            2 => (0usize..40, 1usize..30).prop_map(|(k, n)| Op::Fetch(k, n)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The outbox against a plain in-memory queue: same records, same order, seqs never reused.
        #[test]
        fn outbox_behaves_like_an_ordered_queue(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("o.db");
            let mut store = Some(Store::open(&path, Caps::default()).unwrap());
            let mut model: std::collections::BTreeMap<i64, (Kind, Vec<u8>)> = Default::default();
            let mut next_seq = 1i64;
            for (i, op) in ops.into_iter().enumerate() {
                let s = store.as_mut().unwrap();
                match op {
                    Op::Append(kinds) => {
                        let recs: Vec<NewRecord> = kinds.iter().enumerate().map(|(j, k)| rec(*k, i * 100 + j)).collect();
                        let last = s.append(&recs).unwrap();
                        for r in recs {
                            model.insert(next_seq, (r.kind, r.payload));
                            next_seq += 1;
                        }
                        proptest::prop_assert_eq!(last, next_seq - 1);
                    }
                    Op::Ack(k, n) => {
                        let seqs: Vec<i64> = model.keys().copied().skip(k).take(n).collect();
                        if let (Some(a), Some(z)) = (seqs.first(), seqs.last()) {
                            s.ack(&[(*a, *z)]).unwrap();
                            model.retain(|q, _| q < a || q > z);
                        }
                    }
                    Op::FailedPublish => {}
                    Op::Restart => {
                        // Close before reopening, as a restarted process would.
                        drop(store.take());
                        store = Some(Store::open(&path, Caps::default()).unwrap());
                    }
                    Op::Fetch(k, n) => {
                        let after = model.keys().copied().nth(k).map(|q| q - 1).unwrap_or(0);
                        let got: Vec<(i64, Kind, Vec<u8>)> = s.fetch(after, i64::MAX, n).unwrap().into_iter().map(|r| (r.seq, r.kind, r.payload)).collect();
                        let want: Vec<(i64, Kind, Vec<u8>)> = model.range(after + 1..).take(n).map(|(q, (k, p))| (*q, *k, p.clone())).collect();
                        proptest::prop_assert_eq!(got, want);
                    }
                }
                let s = store.as_ref().unwrap();
                let st = s.stats().unwrap();
                proptest::prop_assert_eq!(st.rows, model.len() as u64);
                proptest::prop_assert_eq!(s.rows, model.len() as u64, "in-memory row counter tracks the table");
                proptest::prop_assert_eq!(st.last_seq, next_seq - 1);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_holds_records_in_memory_and_stores_them_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("o.db"), Caps::default()).unwrap();
        let pages: i64 = store
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        let h = spawn(store).unwrap();
        h.set_max_page_count(pages as u64).await;
        h.append((0..3000).map(|i| rec(Kind::Telemetry, i)).collect())
            .await
            .unwrap();
        h.append(vec![rec(Kind::Audit, 1)]).await.unwrap();
        h.flush().await;
        let health = h.health.lock().unwrap().clone();
        assert!(
            health.as_deref().is_some_and(|e| e.contains("full")),
            "{health:?}"
        );
        assert_eq!(h.depth().await, 3001, "held in memory, counted as waiting");
        // Space comes back: the next write stores everything that was held.
        h.set_max_page_count(1 << 30).await;
        h.append(vec![rec(Kind::Telemetry, 9)]).await.unwrap();
        h.flush().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.health.lock().unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "store never recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = h.stats().await;
        assert_eq!((s.rows, s.by_kind[Kind::Audit as usize]), (3002, 1));
        let all = h.fetch(0, i64::MAX, 10_000).await.unwrap();
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    }
}
