//! The store thread: the one `SQLite` writer, its requests and its handle.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Kind, NewRecord, NewRun, Remembered, RunRecords, Sample, Stats, Store, StoreError, Stored,
    Write,
};

/// Requests to the store thread.
pub(super) enum StoreRequest {
    Append(Vec<NewRecord>),
    Fetch {
        after: i64,
        upto: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Stored>, StoreError>>,
    },
    Ack(Vec<(i64, i64)>),
    Meta(String, String),
    Stats(oneshot::Sender<Stats>),
    Depth(oneshot::Sender<u64>),
    Flush(oneshot::Sender<()>),
    #[cfg(test)]
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
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    SaveRun {
        run: NewRun,
        records: RunRecords,
        reply: oneshot::Sender<Result<i64, StoreError>>,
    },
}

/// How long the store thread gathers appends (and acks) after the first before it commits them in
/// one transaction: at 500 polls/s one commit, one wake-up of this thread and one publish round per
/// 10 ms instead of one per poll (fewer flash writes too), for at most 10 ms more latency.
pub(crate) const COMMIT_LINGER: Duration = Duration::from_millis(10);

/// Within the linger, appends stop being gathered once none has come for this long: the polls due
/// at one instant (a building's meters on their common grid) answer within a few milliseconds, and
/// their records need not wait out the rest of the linger.
pub(crate) const COMMIT_IDLE: Duration = Duration::from_millis(2);

/// How long acknowledged records may wait for the next append's transaction before they get one of
/// their own. Deleting them is not urgent: a record acknowledged but not yet deleted when the power
/// goes is sent again after the restart and the cloud drops it by its seq.
pub(crate) const ACK_LINGER: Duration = Duration::from_secs(1);

/// Records kept in memory while the disk refuses writes, before the oldest telemetry is dropped.
pub(super) const SPILL_LIMIT: usize = 200_000;

/// Handle to the store thread; cheap to clone.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<StoreRequest>,
    /// The newest committed seq; the uplink waits on it for new data.
    pub committed: watch::Receiver<i64>,
    /// The last disk error while one persists (disk full, read-only), for status.
    pub health: Arc<Mutex<Option<String>>>,
    /// The newest committed rows: live fetches are answered here, without the store thread.
    tail: Arc<Mutex<super::tail::Tail>>,
    /// The events, audit records, results and replies committed since the start, newest last (at
    /// most [`RECENT`]): the web view's "recent events", whether or not the cloud has them yet.
    pub(crate) recent: Arc<Mutex<VecDeque<NewRecord>>>,
}

/// How many recent non-telemetry records the store keeps in memory for display.
pub(crate) const RECENT: usize = 200;

impl StoreHandle {
    /// Queues records for the next group commit. Waits only if the store is far behind.
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<(), StoreError> {
        self.tx
            .send(StoreRequest::Append(records))
            .await
            .map_err(|_| StoreError::Stopped)
    }

    /// Sends the command `make` builds around a reply channel and waits for the reply.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> StoreRequest,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)
    }

    /// Records with `after < seq <= upto`, oldest first.
    pub async fn fetch(
        &self,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        if let Some(rows) = self
            .tail
            .lock()
            .ok()
            .and_then(|t| t.fetch(after, upto, limit))
        {
            return Ok(rows);
        }
        self.request(|reply| StoreRequest::Fetch {
            after,
            upto,
            limit,
            reply,
        })
        .await?
    }

    /// Deletes acknowledged records.
    pub(crate) async fn ack(&self, ranges: Vec<(i64, i64)>) {
        let _ = self.tx.send(StoreRequest::Ack(ranges)).await;
    }

    /// Records a status value shown by `meterd buffer`.
    pub(crate) async fn set_meta(&self, key: &str, value: String) {
        let _ = self
            .tx
            .send(StoreRequest::Meta(key.to_string(), value))
            .await;
    }

    /// Current depth and errors.
    pub async fn stats(&self) -> Stats {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(StoreRequest::Stats(tx)).await.is_err() {
            return Stats::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Records waiting, from the store's counter (no scan): for the birth message and live displays.
    pub(crate) async fn depth(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(StoreRequest::Depth(tx)).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    #[cfg(test)]
    /// Sets a hard ceiling on the outbox file in pages (see [`Store::set_max_page_count`]); writes past
    /// it fail like a full disk.
    pub(crate) async fn set_max_page_count(&self, pages: u64) {
        let _ = self.tx.send(StoreRequest::MaxPages(pages)).await;
    }

    #[cfg(test)]
    /// Fills the outbox file (`path`) up to a page limit, tiny telemetry record by record, until
    /// the disk refuses one: every later write that needs room fails like on a full disk, until
    /// [`StoreHandle::set_max_page_count`] lifts the limit.
    pub(crate) async fn fill_up(&self, path: &std::path::Path) {
        let pages: i64 = super::open_read_only(path)
            .unwrap()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        self.set_max_page_count(pages as u64).await;
        for n in 0..5000 {
            let tiny = NewRecord {
                kind: Kind::Telemetry,
                topic: "telemetry".into(),
                ts: chrono::DateTime::from_timestamp_millis(1_800_000_000_000).unwrap(),
                payload: format!("{n}").into_bytes(),
            };
            let _ = self.append(vec![tiny]).await;
            self.flush().await;
            if self.health.lock().unwrap().is_some() {
                return;
            }
        }
        panic!("the outbox never filled up");
    }

    /// Adds counter samples to the history (billing boundaries).
    pub async fn record_history(&self, samples: Vec<Sample>) {
        let _ = self.tx.send(StoreRequest::History(samples)).await;
    }

    /// The replies already given to these command ids.
    pub(crate) async fn replies_of(&self, ids: Vec<String>) -> HashMap<String, Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(StoreRequest::Replies { ids, reply })
            .await
            .is_err()
        {
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
            .send(StoreRequest::Reply {
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
    /// someone). Nothing is written, the records neither, if any write fails; the error says why
    /// and the caller undoes the change.
    pub(crate) async fn transact(
        &self,
        records: Vec<NewRecord>,
        writes: Vec<Write>,
        durable: bool,
    ) -> Result<(), StoreError> {
        self.request(|done| StoreRequest::Transact {
            records,
            writes,
            durable,
            done,
        })
        .await?
    }

    /// Saves a billing run with its outbox records (built from the version); returns the version.
    pub(crate) async fn save_run(
        &self,
        run: NewRun,
        records: RunRecords,
    ) -> Result<i64, StoreError> {
        self.request(|reply| StoreRequest::SaveRun {
            run,
            records,
            reply,
        })
        .await?
    }

    /// Waits until everything queued before this call is committed (or held in memory if the disk
    /// refuses it).
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(StoreRequest::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Runs the store on its own thread (`SQLite` calls block) and returns its handle. The thread ends
/// when every handle is dropped.
pub fn spawn(store: Store) -> Result<StoreHandle, StoreError> {
    let (tx, rx) = mpsc::channel(1024);
    let (committed_tx, committed) = watch::channel(store.last_seq()?);
    let health = Arc::new(Mutex::new(None));
    let h = health.clone();
    let tail = store.tail();
    let recent = Arc::new(Mutex::new(VecDeque::new()));
    let r = recent.clone();
    std::thread::Builder::new()
        .name("meterd-store".into())
        .spawn(move || store_loop(store, rx, committed_tx, h, r))
        .map_err(|_| StoreError::Stopped)?;
    Ok(StoreHandle {
        tx,
        committed,
        health,
        tail,
        recent,
    })
}

/// The store thread's state: the outbox, plus what it holds in memory while the disk refuses writes.
pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) spill: VecDeque<NewRecord>,
    pub(super) spill_dropped: u64,
    pub(super) last_error_log: Option<crate::clock::Pace>,
    pub(super) committed: watch::Sender<i64>,
    pub(super) health: Arc<Mutex<Option<String>>>,
    pub(super) recent: Arc<Mutex<VecDeque<NewRecord>>>,
}

impl Writer {
    /// Keeps the non-telemetry records of a commit for display.
    fn remember_recent(&self, records: &[NewRecord]) {
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        for r in records.iter().filter(|r| r.kind != Kind::Telemetry) {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(r.clone());
        }
    }

    /// Commits `batch` and deletes acknowledged records in one transaction.
    fn commit_acking(&mut self, batch: Vec<NewRecord>, acks: &[(i64, i64)]) {
        if batch.is_empty() && self.spill.is_empty() {
            if !acks.is_empty() {
                if let Err(e) = self.store.ack(acks) {
                    tracing::error!(error = %e, "outbox: could not delete acknowledged records; they will be sent again");
                }
            }
            return;
        }
        self.commit_with(batch, &[], acks);
    }

    /// Commits `batch` (after anything held in memory) in one transaction; on failure holds it.
    pub(super) fn commit(&mut self, batch: Vec<NewRecord>, remember: &[Remembered]) {
        self.commit_with(batch, remember, &[]);
    }

    /// [`Writer::commit`], also deleting `acks` (lost on failure: those records are sent again).
    fn commit_with(&mut self, batch: Vec<NewRecord>, remember: &[Remembered], acks: &[(i64, i64)]) {
        if batch.is_empty() && self.spill.is_empty() {
            return;
        }
        let mut all: Vec<NewRecord> = self.spill.drain(..).collect();
        all.extend(batch);
        let result = if acks.is_empty() {
            self.store.append_remembering(&all, remember)
        } else {
            self.store.append_acking(&all, acks)
        };
        match result {
            Ok(last) => {
                self.committed.send_replace(last);
                self.remember_recent(&all);
                if self.health.lock().is_ok_and(|mut h| h.take().is_some()) {
                    tracing::info!("outbox writable again; stored the records held in memory");
                    let _ = self.store.set_meta("store_error", "");
                }
                if self.spill_dropped > 0 {
                    let event = serde_json::json!({"event": "outbox_spill_overflow", "dropped": self.spill_dropped});
                    let rec = NewRecord {
                        kind: Kind::Event,
                        topic: "events".into(),
                        ts: self.store.clock.now(),
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
                    self.last_error_log = Some(crate::clock::Pace::now());
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

    fn handle(&mut self, cmd: StoreRequest) {
        let store = &mut self.store;
        match cmd {
            StoreRequest::Append(r) => self.commit(r, &[]),
            StoreRequest::Replies { ids, reply } => {
                let r = store.replies_of(&ids).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "command replies could not be read; commands are handled afresh");
                    HashMap::new()
                });
                let _ = reply.send(r);
            }
            StoreRequest::Reply {
                records,
                remember,
                done,
            } => {
                self.commit(records, &remember);
                let _ = done.send(());
            }
            StoreRequest::Transact {
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
                        self.remember_recent(&records);
                        let _ = done.send(Ok(()));
                    }
                    Err(e) => {
                        // Nothing happened, its records included: the caller undoes the change
                        // (an audit record of a change that is not there must never be published).
                        tracing::error!(error = %e, "state change not written; nothing of it kept");
                        let _ = done.send(Err(e));
                    }
                }
            }
            StoreRequest::Fetch {
                after,
                upto,
                limit,
                reply,
            } => {
                let _ = reply.send(store.fetch(after, upto, limit));
            }
            StoreRequest::Ack(ranges) => {
                if let Err(e) = store.ack(&ranges) {
                    tracing::error!(error = %e, "outbox: could not delete acknowledged records; they will be sent again");
                }
            }
            StoreRequest::Meta(k, v) => {
                let _ = store.set_meta(&k, &v);
            }
            StoreRequest::Stats(reply) => {
                let mut s = store.stats().unwrap_or_default();
                s.store_error = self.health.lock().ok().and_then(|h| h.clone());
                s.rows += self.spill.len() as u64;
                let _ = reply.send(s);
            }
            StoreRequest::Depth(reply) => {
                let _ = reply.send(store.rows + self.spill.len() as u64);
            }
            StoreRequest::Flush(reply) => {
                let _ = reply.send(());
            }
            #[cfg(test)]
            StoreRequest::MaxPages(pages) => {
                if let Err(e) = store.set_max_page_count(pages) {
                    tracing::error!(error = %e, "outbox: cannot set the page limit");
                }
            }
            StoreRequest::History(samples) => {
                if let Err(e) = store.record_history(&samples) {
                    tracing::error!(error = %e, "history: samples not stored; billing boundaries will be interpolated");
                }
            }
            StoreRequest::SaveRun {
                run,
                records,
                reply,
            } => {
                let r = store.save_run(&run, records);
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

pub(super) fn store_loop(
    store: Store,
    mut rx: mpsc::Receiver<StoreRequest>,
    committed: watch::Sender<i64>,
    health: Arc<Mutex<Option<String>>>,
    recent: Arc<Mutex<VecDeque<NewRecord>>>,
) {
    let mut w = Writer {
        store,
        spill: VecDeque::new(),
        spill_dropped: 0,
        last_error_log: None,
        committed,
        health,
        recent,
    };
    // A timer for waiting on the queue with a deadline (tokio's channel has no blocking timeout).
    let Ok(acks_wait) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        tracing::error!("store thread: cannot start its timer; the outbox is not written");
        return;
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
        // Group commit: appends arriving within COMMIT_LINGER of the first (and less than
        // COMMIT_IDLE apart) go into one transaction, with the acks that came meanwhile; acks alone
        // wait up to ACK_LINGER for an append to ride with. Any other command first commits what
        // came before it, so every command sees the effect of earlier ones.
        let mut batch: Vec<NewRecord> = Vec::with_capacity(64);
        let mut acks: Vec<(i64, i64)> = Vec::new();
        let mut linger_until: Option<crate::clock::Pace> = None;
        let mut next = first;
        loop {
            while let Some(cmd) = next {
                let now = crate::clock::Pace::now();
                match cmd {
                    StoreRequest::Append(mut r) => {
                        batch.append(&mut r);
                        let t = now.after(COMMIT_LINGER);
                        linger_until = Some(linger_until.map_or(t, |u| u.min(t)));
                    }
                    StoreRequest::Ack(mut r) => {
                        acks.append(&mut r);
                        linger_until.get_or_insert(now.after(ACK_LINGER));
                    }
                    other => {
                        w.commit_acking(std::mem::take(&mut batch), &std::mem::take(&mut acks));
                        linger_until = None;
                        w.handle(other);
                    }
                }
                if batch.len() >= 50_000 {
                    break;
                }
                next = rx.try_recv().ok();
            }
            let Some(rest) = linger_until
                .and_then(crate::clock::Pace::remaining)
                .filter(|r| !r.is_zero() && batch.len() < 50_000)
            else {
                break;
            };
            if batch.is_empty() {
                // Only acks wait: until a request comes or their linger ends.
                match acks_wait.block_on(async { tokio::time::timeout(rest, rx.recv()).await }) {
                    Ok(Some(c)) => next = Some(c),
                    Ok(None) | Err(_) => break,
                }
            } else {
                // Appends wait asleep, what the recorder sends meanwhile queuing up without waking
                // this thread: to the end of the linger, or until none came for COMMIT_IDLE.
                std::thread::sleep(rest.min(COMMIT_IDLE));
                next = rx.try_recv().ok();
                if next.is_none() {
                    break;
                }
            }
        }
        w.commit_acking(batch, &acks);
    }
}
