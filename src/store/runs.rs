//! Versioned billing runs: a recomputation is a new version naming the one it supersedes.

use rusqlite::{params, Connection, OptionalExtension};

use super::{NewRecord, Store, StoreError};

/// A billing run to keep.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewRun {
    pub period: String,
    /// When it was computed: the time its records carry too (not when the store wrote it).
    pub computed_at: chrono::DateTime<chrono::Utc>,
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
pub(crate) struct StoredRun {
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
pub(crate) fn load_run(
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

/// One version of a period in the list: (version, `computed_at`, supersedes, reason).
pub(crate) type RunVersion = (i64, String, Option<i64>, String);

/// Every version of a period, oldest first.
pub(crate) fn run_versions(conn: &Connection, period: &str) -> rusqlite::Result<Vec<RunVersion>> {
    let mut stmt = conn.prepare_cached(
        "SELECT version, computed_at, supersedes, reason FROM billing_runs WHERE period = ?1 ORDER BY version",
    )?;
    let rows = stmt.query_map([period], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    rows.collect()
}

/// Periods that have a run.
pub(crate) fn run_periods(
    conn: &Connection,
) -> rusqlite::Result<std::collections::BTreeSet<String>> {
    let mut stmt = conn.prepare_cached("SELECT DISTINCT period FROM billing_runs")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// Each period whose latest run is provisional, with the meters that run could not read at the
/// period's end (its statement's `unread`, empty for runs from before it was kept), oldest first.
pub(crate) fn provisional_runs(conn: &Connection) -> rusqlite::Result<Vec<(String, Vec<String>)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT period, json_extract(body, '$.unread') FROM billing_runs b WHERE provisional = 1
         AND version = (SELECT MAX(version) FROM billing_runs c WHERE c.period = b.period) ORDER BY period",
    )?;
    let rows = stmt.query_map([], |r| {
        let unread: Option<String> = r.get(1)?;
        let unread = unread
            .and_then(|u| serde_json::from_str(&u).ok())
            .unwrap_or_default();
        Ok((r.get(0)?, unread))
    })?;
    rows.collect()
}

/// The run a cloud command made, if it made one.
pub(crate) fn run_of_command(conn: &Connection, id: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT version FROM billing_runs WHERE command_id = ?1",
        [id],
        |r| r.get(0),
    )
    .optional()
}

/// Builds a run's outbox records once its version is known.
pub(crate) type RunRecords = Box<dyn FnOnce(i64) -> Vec<NewRecord> + Send>;

impl Store {
    /// Keeps a billing run and its outbox records in one durable transaction (`synchronous=FULL`):
    /// a version exists exactly when its results are queued for the cloud. Returns the version.
    pub(crate) fn save_run(
        &mut self,
        run: &NewRun,
        records: RunRecords,
    ) -> Result<i64, StoreError> {
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
            params![run.period, run.computed_at.to_rfc3339(), run.supersedes, run.reason, run.config_hash, i64::from(run.provisional), run.command_id, run.body],
        )
        .map_err(err)?;
        let version = tx.last_insert_rowid();
        let records = records(version);
        super::outbox::insert_records(&tx, &records, &mut self.rate, self.clock.now_ms())
            .map_err(err)?;
        let last = (!records.is_empty()).then(|| tx.last_insert_rowid());
        tx.commit().map_err(err)?;
        if let Some(last) = last {
            self.tail_reset(last);
        }
        let bytes = records.iter().map(|r| r.payload.len() as u64).sum();
        Ok((version, records.len() as u64, bytes))
    }
}
