//! The outbox: every reading, result and event is written here before it is published, and leaves
//! only when the broker acknowledged it. `SQLite` on disk is the source of truth; nothing in memory is.
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
//! Sequence numbers come from `INTEGER PRIMARY KEY AUTOINCREMENT`, which `SQLite` guarantees never to
//! reuse, even after every row was acknowledged and deleted and the process restarted: the backend
//! deduplicates redeliveries by `seq`.

//!
//! Layout: [`schema`] (every table, one place), [`outbox`] (the records and their caps),
//! [`history`] (billing-counter samples), [`runs`] (versioned billing runs) and [`writer`] (the one
//! thread through which every write goes, and its handle).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use thiserror::Error;

mod history;
mod outbox;
mod runs;
mod schema;
mod tail;
#[cfg(test)]
mod tests;
mod writer;

pub use history::*;
pub use outbox::*;
pub(crate) use runs::*;
pub use schema::SCHEMA;
pub use writer::*;

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
    /// Payload bytes written to the outbox per hour (the last full hour, or the current one so far
    /// extrapolated): what an outage fills the outbox with.
    pub bytes_per_hour: Option<u64>,
}

/// Bytes written to the outbox per clock hour, kept in `meta` so `meterd buffer` can say how many
/// hours of outage the byte cap holds at the current rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub(crate) struct AppendRate {
    /// Hours since the epoch of `bytes`.
    hour: i64,
    bytes: u64,
    /// The hour before `hour` (0 when no record was written in it).
    prev: u64,
}

impl AppendRate {
    pub(crate) const META_KEY: &'static str = "append_rate";

    /// `bytes` more written at `now_ms`.
    #[must_use]
    pub(crate) fn add(self, now_ms: i64, bytes: u64) -> AppendRate {
        let hour = now_ms.div_euclid(3_600_000);
        match hour - self.hour {
            0 => AppendRate {
                bytes: self.bytes + bytes,
                ..self
            },
            1 => AppendRate {
                hour,
                bytes,
                prev: self.bytes,
            },
            // A clock stepped back, or hours without writing: start again.
            _ => AppendRate {
                hour,
                bytes,
                prev: 0,
            },
        }
    }

    /// Bytes per hour at `now_ms`: the last full hour when it is the one before now, else the
    /// current hour so far extrapolated (after its first 5 minutes); `None` without a figure.
    #[must_use]
    pub(crate) fn per_hour(&self, now_ms: i64) -> Option<u64> {
        let hour = now_ms.div_euclid(3_600_000);
        let into_hour_ms = now_ms.rem_euclid(3_600_000);
        if hour == self.hour + 1 && self.bytes > 0 {
            Some(self.bytes)
        } else if hour == self.hour && self.prev > 0 {
            Some(self.prev.max(self.bytes))
        } else if hour == self.hour && into_hour_ms >= 300_000 {
            Some(self.bytes * 3_600_000 / into_hour_ms as u64)
        } else {
            None
        }
    }
}

/// The append rate as the writer keeps it: in memory, saved to `meta` (for `meterd buffer` in
/// another process) on the first write and then at most once a minute, so a commit does not pay
/// for a read, a JSON round trip and a write of it.
#[derive(Debug, Default)]
pub(crate) struct RateKeeper {
    pub(crate) rate: AppendRate,
    /// When it was last saved (wall ms).
    saved: Option<i64>,
}

impl RateKeeper {
    /// The rate saved in the outbox, if any.
    pub(crate) fn load(conn: &rusqlite::Connection) -> rusqlite::Result<RateKeeper> {
        Ok(RateKeeper {
            rate: meta_get(conn, AppendRate::META_KEY)?
                .and_then(|v| serde_json::from_str(&v).ok())
                .unwrap_or_default(),
            saved: None,
        })
    }

    /// `bytes` more written at `now_ms`; returns the value to save when it is time to.
    pub(crate) fn add(&mut self, now_ms: i64, bytes: u64) -> Option<String> {
        self.rate = self.rate.add(now_ms, bytes);
        // A clock stepped back saves at once rather than an hour late.
        if self
            .saved
            .is_some_and(|t| (0..60_000).contains(&(now_ms - t)))
        {
            return None;
        }
        self.saved = Some(now_ms);
        serde_json::to_string(&self.rate).ok()
    }
}

/// The largest record the outbox hands to the uplink (the uplink's packet limit is set above it).
/// Results of large pools are split into parts below it; a reply above it is refused with a reason.
pub(crate) const MAX_RECORD_BYTES: usize = 1 << 20;

/// A write of another module's state (enforcement rules, prepaid counters, ledger), run by the store
/// thread inside the transaction that also appends that step's outbox records: `SQLite` has one
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

pub(super) fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

pub(super) fn stats(conn: &Connection, now_ms: i64) -> rusqlite::Result<Stats> {
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
    s.bytes_per_hour = meta_get(conn, AppendRate::META_KEY)?
        .and_then(|v| serde_json::from_str::<AppendRate>(&v).ok())
        .and_then(|r| r.per_hour(now_ms));
    Ok(s)
}

/// Reads the stats of an outbox another process owns, without writing to it (`meterd buffer`);
/// `now_ms` is the wall time the write rate is taken at.
pub fn read_stats(path: &Path, now_ms: i64) -> Result<Stats, StoreError> {
    let conn = open_read_only(path)?;
    stats(&conn, now_ms).map_err(|source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    })
}
