//! The MQTT uplink: publishes the outbox oldest-first, deletes records only on PUBACK, and answers
//! commands from the cloud.
//!
//! rumqttc's own queue is volatile and, with a clean session, forgets unacknowledged publishes on
//! reconnect; its event loop also reconnects without back-off. So each connection gets a fresh client,
//! the outbox in `SQLite` is the only source of truth, packet ids are tracked here
//! (`Outgoing::Publish(pkid)` → `PubAck(pkid)`), and reconnects back off exponentially with jitter.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde::Serialize;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::store::{Kind, NewRecord, Remembered, StoreHandle, Stored};

/// Why a connection ended.
#[derive(Debug, Error)]
pub(crate) enum UplinkError {
    #[error("broker {host}:{port}: {detail}")]
    Connection {
        host: String,
        port: u16,
        detail: String,
    },
    #[error("TLS file {path}: {detail}; give PEM files readable by meterd")]
    Tls { path: String, detail: String },
    #[error("outbox: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// TLS material for the broker connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

/// The MQTT uplink's settings (`[mqtt]`), built by the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Mqtt {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// First topic level: `{prefix}/{gateway id}/...`.
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub credentials: Option<(String, String)>,
    pub tls: Option<Tls>,
    /// Most records in one telemetry message.
    pub batch_max_records: usize,
    /// Most payload bytes in one message.
    pub batch_max_bytes: usize,
    /// Unacknowledged `QoS` 1 messages allowed at once.
    pub inflight: u16,
    /// Share of messages given to the backlog while live data is also waiting (0.05..=0.95).
    pub backlog_share: f64,
    /// Commands larger than this are refused with an error reply.
    pub max_command_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// Live state of the uplink, for `status` and tests.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkStatus {
    pub connected: bool,
    pub connected_since: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub messages_acked: u64,
    pub records_acked: u64,
    pub reconnects: u64,
}

/// A command's outcome as the cloud reads it: the reply's `result`, or the reason it was refused
/// (a sentence for the operator, sent as the reply's `error`). Errors inside the gateway are typed;
/// this is where they become text on the wire.
pub type Reply = Result<Value, String>;

/// A handler's answer: the reply's `result` (or the reason for an error reply) now, or later from
/// the task that applies the command (the enforcer answers once the change is applied and durable).
#[derive(Debug)]
pub enum Answer {
    Now(Reply),
    Later(oneshot::Receiver<Reply>),
}

impl From<Reply> for Answer {
    fn from(r: Reply) -> Answer {
        Answer::Now(r)
    }
}

/// Handles cloud commands beyond the uplink's own (`ping`, `status`). Later modules (tariffs, relay
/// rules) register theirs here; a handler must answer quickly and never panic on bad arguments.
pub trait CommandHandler: Send + Sync + 'static {
    /// Returns the answer; `None` if the command is not this handler's. `id` is the command's id
    /// (signatures and idempotency use it).
    fn handle(&self, id: &str, name: &str, args: &Value) -> Option<Answer>;
}

/// Several handlers, asked in order.
pub(crate) struct Chain(pub Vec<Arc<dyn CommandHandler>>);

impl CommandHandler for Chain {
    fn handle(&self, id: &str, name: &str, args: &Value) -> Option<Answer> {
        self.0.iter().find_map(|h| h.handle(id, name, args))
    }
}

/// No extra commands.
pub struct NoCommands;

impl CommandHandler for NoCommands {
    fn handle(&self, _: &str, _: &str, _: &Value) -> Option<Answer> {
        None
    }
}

/// Topic names for one gateway.
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    pub base: String,
}

impl Topics {
    /// `{prefix}/{gateway}`.
    pub(crate) fn new(prefix: &str, gateway: &str) -> Topics {
        Topics {
            base: format!("{prefix}/{gateway}"),
        }
    }
    /// Where a record with topic suffix `suffix` is published.
    pub(crate) fn record(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base)
    }
    /// Retained birth / last-will topic.
    pub(crate) fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    /// The retained site model.
    pub(crate) fn config(&self) -> String {
        format!("{}/config", self.base)
    }
    /// Commands arrive on `cmd/{name}`.
    pub(crate) fn commands(&self) -> String {
        format!("{}/cmd/+", self.base)
    }
}

// ---- pure message building ---------------------------------------------------------------------

/// How many of `rows` (a prefix) go into the next message: consecutive rows of one topic, at most
/// `max_records` records and `max_bytes` payload bytes (at least one row, however large).
pub(crate) fn next_batch(rows: &[Stored], max_records: usize, max_bytes: usize) -> usize {
    let Some(first) = rows.first() else { return 0 };
    let mut bytes = 0;
    let mut n = 0;
    for r in rows {
        if r.topic != first.topic
            || n >= max_records
            || (n > 0 && bytes + r.payload.len() + 16 > max_bytes)
        {
            break;
        }
        bytes += r.payload.len() + 16;
        n += 1;
    }
    n
}

/// The JSON message for a batch: every record gets its `seq`, so the backend deduplicates redeliveries.
///
/// `{"gateway": "...", "seq_first": 10, "seq_last": 12, "records": [{"seq": 10, ...}, ...]}`
#[must_use]
pub fn message(gateway: &str, rows: &[Stored]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + rows.iter().map(|r| r.payload.len() + 16).sum::<usize>());
    out.extend_from_slice(b"{\"gateway\":");
    out.extend_from_slice(json!(gateway).to_string().as_bytes());
    let first = rows.first().map_or(0, |r| r.seq);
    let last = rows.last().map_or(0, |r| r.seq);
    out.extend_from_slice(
        format!(",\"seq_first\":{first},\"seq_last\":{last},\"records\":[").as_bytes(),
    );
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        splice_seq(&mut out, r);
    }
    out.extend_from_slice(b"]}");
    out
}

/// A command as received, validated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParsedCommand {
    pub id: String,
    pub name: String,
    pub args: Value,
}

/// A refused command: the id if one could be read, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejected {
    pub id: Option<String>,
    pub reason: String,
}

/// Validates a command publish on `cmd/{name}`: size, JSON object, an `id` string, a sane name.
pub(crate) fn parse_command(
    name: &str,
    payload: &[u8],
    max_bytes: usize,
) -> Result<ParsedCommand, Rejected> {
    let reject = |id: Option<String>, reason: String| Err(Rejected { id, reason });
    if payload.len() > max_bytes {
        return reject(
            None,
            format!(
                "payload of {} bytes exceeds the {max_bytes}-byte limit",
                payload.len()
            ),
        );
    }
    let value: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return reject(None, format!("not valid JSON: {e}")),
    };
    let Value::Object(mut obj) = value else {
        return reject(None, "expected a JSON object with an \"id\"".into());
    };
    let id = match obj.remove("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s,
        Some(Value::String(_)) => return reject(None, "\"id\" must be 1 to 128 characters".into()),
        Some(other) => return reject(None, format!("\"id\" must be a string, got {other}")),
        None => return reject(None, "missing \"id\"".into()),
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return reject(
            Some(id),
            format!("command name {name:?} must be 1-64 characters of a-z, 0-9 and _"),
        );
    }
    Ok(ParsedCommand {
        id,
        name: name.to_string(),
        args: Value::Object(obj),
    })
}

/// The reply to a command, answered at `ts`.
#[must_use]
pub fn reply(id: Option<&str>, name: &str, result: Reply, ts: DateTime<Utc>) -> Vec<u8> {
    let mut v = json!({"id": id, "command": name, "ts": ts.to_rfc3339()});
    match result {
        Ok(r) => {
            v["ok"] = json!(true);
            v["result"] = r;
        }
        Err(e) => {
            v["ok"] = json!(false);
            v["error"] = json!(e);
        }
    }
    v.to_string().into_bytes()
}

/// Exponential reconnect delay with ±25 % jitter, so a fleet does not reconnect in lockstep.
#[must_use]
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let base = min
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(max);
    let jitter = 0.75 + fastrand::f64() * 0.5;
    base.mul_f64(jitter).min(max)
}

/// Which queue the next message comes from: backlog (recorded before this connection) or live.
/// Gives the backlog `share` of the records while both have data, so neither starves.
pub(crate) fn pick_backlog(
    backlog_ready: bool,
    live_ready: bool,
    backlog_sent: u64,
    live_sent: u64,
    share: f64,
) -> Option<bool> {
    match (backlog_ready, live_ready) {
        (false, false) => None,
        (true, false) => Some(true),
        (false, true) => Some(false),
        (true, true) => Some(backlog_sent as f64 * (1.0 - share) <= live_sent as f64 * share),
    }
}

/// Which outbox records to fetch next, from which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fetch {
    pub backlog: bool,
    /// Records with `after < seq <= upto`.
    pub after: i64,
    pub upto: i64,
}

/// A publish of outbox records, waiting for its packet id and then its PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    pub first: i64,
    pub last: i64,
    pub records: u64,
}

/// The uplink's bookkeeping for one connection, as a pure state machine: which records to fetch
/// next (backlog recorded before the connection, or live), the publishes handed to rumqttc in order
/// (`handed`), their packet ids once rumqttc reports them (`outgoing`), and which seq range a PUBACK
/// acknowledges (`acked`). Untracked publishes (status) take a place in the order but ack nothing.
/// The window bounds what is handed and not yet acknowledged.
#[derive(Debug)]
pub(crate) struct OutboxSync {
    window: usize,
    share: f64,
    backlog_upto: i64,
    backlog_cursor: i64,
    live_cursor: i64,
    backlog_sent: u64,
    live_sent: u64,
    /// Handed to the client, packet id not known yet, in hand-over order.
    awaiting: VecDeque<Option<Sent>>,
    inflight: HashMap<u16, Option<Sent>>,
}

impl OutboxSync {
    /// A connection that starts with everything up to `backlog_upto` committed (the backlog).
    pub(crate) fn new(backlog_upto: i64, window: usize, share: f64) -> OutboxSync {
        OutboxSync {
            window: window.max(1),
            share,
            backlog_upto,
            backlog_cursor: 0,
            live_cursor: backlog_upto,
            backlog_sent: 0,
            live_sent: 0,
            awaiting: VecDeque::new(),
            inflight: HashMap::new(),
        }
    }

    /// True while another publish may be handed over.
    pub(crate) fn has_room(&self) -> bool {
        self.awaiting.len() + self.inflight.len() < self.window
    }

    /// The next records to fetch with `latest` the newest committed seq, or `None` (window full, or
    /// nothing new).
    pub(crate) fn next_fetch(&self, latest: i64) -> Option<Fetch> {
        if !self.has_room() {
            return None;
        }
        let backlog = pick_backlog(
            self.backlog_cursor < self.backlog_upto,
            self.live_cursor < latest,
            self.backlog_sent,
            self.live_sent,
            self.share,
        )?;
        Some(if backlog {
            Fetch {
                backlog,
                after: self.backlog_cursor,
                upto: self.backlog_upto,
            }
        } else {
            Fetch {
                backlog,
                after: self.live_cursor,
                upto: latest,
            }
        })
    }

    /// The fetch found nothing: everything up to its end was acknowledged or dropped meanwhile.
    pub(crate) fn fetched_nothing(&mut self, f: Fetch) {
        if f.backlog {
            self.backlog_cursor = f.upto;
        } else {
            self.live_cursor = self.live_cursor.max(f.upto);
        }
    }

    /// Records `sent` of fetch `f` were handed to the client.
    pub(crate) fn handed(&mut self, f: Fetch, sent: Sent) {
        if f.backlog {
            self.backlog_cursor = sent.last;
            self.backlog_sent += sent.records;
        } else {
            self.live_cursor = sent.last;
            self.live_sent += sent.records;
        }
        self.awaiting.push_back(Some(sent));
    }

    /// A publish that acknowledges no records (status) was handed to the client.
    pub(crate) fn handed_untracked(&mut self) {
        self.awaiting.push_back(None);
    }

    /// rumqttc wrote the oldest handed publish under packet id `pkid`.
    pub(crate) fn outgoing(&mut self, pkid: u16) {
        let sent = self.awaiting.pop_front().flatten();
        self.inflight.insert(pkid, sent);
    }

    /// The broker acknowledged `pkid`: the records to delete, if it carried any.
    pub(crate) fn acked(&mut self, pkid: u16) -> Option<Sent> {
        self.inflight.remove(&pkid).flatten()
    }

    /// Nothing handed is still waiting for its packet id or PUBACK, except untracked publishes.
    pub(crate) fn settled(&self) -> bool {
        self.awaiting.is_empty() && self.inflight.values().all(Option::is_none)
    }
}

/// The site model as a publish, unless it is larger than any publish the session allows (a site of
/// tens of thousands of rooms): a publish over the packet limit would fail the session on every
/// reconnect, so it is left out and said so in the log; the cloud still has the last one it got.
fn site_model_payload(model: &[u8]) -> Option<Vec<u8>> {
    if model.len() > crate::store::MAX_RECORD_BYTES {
        tracing::error!(
            bytes = model.len(),
            limit = crate::store::MAX_RECORD_BYTES,
            "site model too large to publish on config; the cloud keeps the last one it got"
        );
        return None;
    }
    Some(model.to_vec())
}

// ---- the task ----------------------------------------------------------------------------------

/// Identity reported in the birth message.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Identity {
    pub gateway: String,
    pub site: String,
    pub version: String,
    pub config_hash: String,
    pub started_at: DateTime<Utc>,
}

/// Everything the uplink task needs.
pub(crate) struct Uplink {
    pub config: Mqtt,
    pub identity: Identity,
    pub store: StoreHandle,
    pub status: Arc<Mutex<UplinkStatus>>,
    pub commands: Arc<dyn CommandHandler>,
    /// The site model (JSON), published retained on `config` at every connect and every change.
    pub model: watch::Receiver<Arc<Vec<u8>>>,
    pub clock: Clock,
}

fn options(cfg: &Mqtt, topics: &Topics, identity: &Identity) -> Result<MqttOptions, UplinkError> {
    let mut o = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    o.set_keep_alive(cfg.keep_alive.max(Duration::from_secs(5)));
    o.set_clean_session(true);
    o.set_inflight(cfg.inflight);
    // Outgoing: a batch, or the largest record the outbox hands out (a record above it is set aside
    // by the store), so no record can make a publish fail and the session loop on it. Incoming up
    // to 4 MiB so an oversized command is read and refused with a reply instead of breaking the
    // connection.
    let outgoing = (cfg.batch_max_bytes * 2).max(crate::store::MAX_RECORD_BYTES) + 64 * 1024;
    o.set_max_packet_size(4 * 1024 * 1024, outgoing);
    o.set_request_channel_capacity(usize::from(cfg.inflight) * 2 + 16);
    if let Some((u, p)) = &cfg.credentials {
        o.set_credentials(u, p);
    }
    let will =
        json!({"state": "offline", "gateway": identity.gateway, "reason": "connection lost"});
    o.set_last_will(LastWill::new(
        topics.status(),
        will.to_string(),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(tls) = &cfg.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| UplinkError::Tls {
                path: p.display().to_string(),
                detail: e.to_string(),
            })
        };
        let client_auth = match &tls.client_auth {
            Some((c, k)) => Some((read(c)?, read(k)?)),
            None => None,
        };
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: read(&tls.ca_file)?,
            alpn: None,
            client_auth,
        }));
    }
    Ok(o)
}

/// Aborts a task when dropped, so a session's event-loop pump never outlives it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Uplink {
    /// Runs until `shutdown` turns true; then publishes the offline status and disconnects.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let topics = Topics::new(&self.config.topic_prefix, &self.identity.gateway);
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let worker = CommandWorker {
            max_command_bytes: self.config.max_command_bytes,
            store: self.store.clone(),
            status: self.status.clone(),
            commands: self.commands.clone(),
            clock: self.clock.clone(),
        };
        // The worker outlives sessions: a command taken off one connection is answered even if the
        // connection drops meanwhile (the reply waits in the outbox).
        let _worker = AbortOnDrop(tokio::spawn(worker.run(rx)));
        let mut attempt = 0u32;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result = self
                .session(&topics, &mut shutdown, &mut attempt, &commands)
                .await;
            if let Ok(mut s) = self.status.lock() {
                s.connected = false;
                s.connected_since = None;
            }
            match result {
                Ok(()) => return,
                Err(e) => {
                    let msg = e.to_string();
                    tracing::warn!(error = %msg, "mqtt uplink down; outbox keeps buffering");
                    if let Ok(mut s) = self.status.lock() {
                        s.last_error = Some(msg.clone());
                        s.reconnects += 1;
                    }
                    self.store
                        .set_meta(
                            "last_publish_error",
                            format!("{} {msg}", self.clock.now().to_rfc3339()),
                        )
                        .await;
                }
            }
            let delay = backoff(
                attempt,
                self.config.reconnect_min,
                self.config.reconnect_max,
            );
            attempt = attempt.saturating_add(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn session(
        &self,
        topics: &Topics,
        shutdown: &mut watch::Receiver<bool>,
        attempt: &mut u32,
        commands: &mpsc::Sender<Incoming>,
    ) -> Result<(), UplinkError> {
        let cfg = &self.config;
        let conn_err = |detail: String| UplinkError::Connection {
            host: cfg.host.clone(),
            port: cfg.port,
            detail,
        };
        let opts = options(cfg, topics, &self.identity)?;
        let (client, mut eventloop) = AsyncClient::new(opts, usize::from(cfg.inflight) * 2 + 16);
        // rumqttc's poll() is driven by its own task and never cancelled mid-way (its cancel safety is
        // not documented); this loop selects on the channel instead.
        let (ev_tx, mut events) = mpsc::channel::<Result<Event, ConnectionError>>(256);
        let pump = AbortOnDrop(tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let stop = ev.is_err();
                if ev_tx.send(ev).await.is_err() || stop {
                    return;
                }
            }
        }));
        let closed = || "event loop ended".to_string();
        // Wait for CONNACK.
        let connack = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await.ok_or_else(closed)? {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| conn_err("no CONNACK within 10s".into()))?;
        connack.map_err(conn_err)?;
        *attempt = 0;
        tracing::info!(broker = %format!("{}:{}", cfg.host, cfg.port), client_id = %cfg.client_id, "mqtt connected");
        if let Ok(mut s) = self.status.lock() {
            s.connected = true;
            s.connected_since = Some(self.clock.now());
            s.last_error = None;
        }

        let try_publish = |topic: String, retain: bool, payload: Vec<u8>| {
            client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .map_err(|e| conn_err(format!("publish queue: {e}")))
        };
        client
            .try_subscribe(topics.commands(), QoS::AtLeastOnce)
            .map_err(|e| conn_err(format!("subscribe: {e}")))?;
        let depth = self.store.depth().await;
        let birth = json!({
            "state": "online",
            "gateway": self.identity.gateway,
            "site": self.identity.site,
            "version": self.identity.version,
            "config_hash": self.identity.config_hash,
            "started_at": self.identity.started_at.to_rfc3339(),
            "uptime_s": (self.clock.now() - self.identity.started_at).num_seconds(),
            "outbox_depth": depth,
            "ts": self.clock.now().to_rfc3339(),
        });
        let mut committed = self.store.committed.clone();
        let mut sync = OutboxSync::new(
            *committed.borrow_and_update(),
            usize::from(cfg.inflight),
            cfg.backlog_share,
        );
        try_publish(topics.status(), true, birth.to_string().into_bytes())?;
        sync.handed_untracked();
        let mut model = self.model.clone();
        if let Some(m) = site_model_payload(&model.borrow_and_update()) {
            try_publish(topics.config(), true, m)?;
            sync.handed_untracked();
        }
        let mut last_ok_meta: Option<tokio::time::Instant> = None;
        loop {
            // Fill the in-flight window from the outbox.
            loop {
                let latest = *committed.borrow();
                let Some(f) = sync.next_fetch(latest) else {
                    break;
                };
                let rows = self
                    .store
                    .fetch(f.after, f.upto, cfg.batch_max_records)
                    .await
                    .map_err(UplinkError::Store)?;
                if rows.is_empty() {
                    sync.fetched_nothing(f);
                    continue;
                }
                // A reply goes alone, as the reply object itself; other records in batches.
                let (n, payload) = if rows[0].kind == Kind::Reply {
                    (1, reply_message(&rows[0]))
                } else {
                    let n = next_batch(&rows, cfg.batch_max_records, cfg.batch_max_bytes);
                    (n, message(&self.identity.gateway, &rows[..n]))
                };
                try_publish(topics.record(&rows[0].topic), false, payload)?;
                sync.handed(
                    f,
                    Sent {
                        first: rows[0].seq,
                        last: rows[n - 1].seq,
                        records: n as u64,
                    },
                );
            }
            let room = sync.has_room();
            tokio::select! {
                ev = events.recv() => match ev.ok_or_else(|| conn_err(closed()))? {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => sync.outgoing(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(sent) = sync.acked(ack.pkid) {
                            self.store.ack(vec![(sent.first, sent.last)]).await;
                            if let Ok(mut s) = self.status.lock() {
                                s.messages_acked += 1;
                                s.records_acked += sent.records;
                            }
                            if last_ok_meta.is_none_or(|t| self.clock.since(t) >= Duration::from_secs(5)) {
                                self.store.set_meta("last_publish_ok", self.clock.now().to_rfc3339()).await;
                                last_ok_meta = Some(self.clock.instant());
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // Waits while the worker is behind: the connection is not read meanwhile,
                        // so the broker holds the rest. The reply comes through the outbox.
                        let name = p.topic.rsplit('/').next().unwrap_or("").to_string();
                        commands
                            .send(Incoming { name, payload: p.payload.to_vec() })
                            .await
                            .map_err(|_| conn_err("command worker stopped".into()))?;
                    }
                    Ok(_) => {}
                    Err(e) => return Err(conn_err(e.to_string())),
                },
                r = committed.changed(), if room => {
                    if r.is_err() {
                        return Err(UplinkError::Store(crate::store::StoreError::Stopped));
                    }
                }
                Ok(()) = model.changed() => {
                    // A tariff the cloud set (or a reload) changed the site model.
                    if let Some(m) = site_model_payload(&model.borrow_and_update()) {
                        try_publish(topics.config(), true, m)?;
                        sync.handed_untracked();
                    }
                }
                _ = shutdown.changed() => {
                    let bye = json!({"state": "offline", "gateway": self.identity.gateway, "reason": "shutdown", "ts": self.clock.now().to_rfc3339()});
                    if client.try_publish(topics.status(), QoS::AtLeastOnce, true, bye.to_string().into_bytes()).is_ok() {
                        sync.handed_untracked();
                    }
                    // Give the goodbye (and any acks in flight) a moment, then disconnect.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(ev) = events.recv().await {
                            match ev {
                                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => sync.outgoing(pkid),
                                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                                    if let Some(sent) = sync.acked(ack.pkid) {
                                        self.store.ack(vec![(sent.first, sent.last)]).await;
                                    }
                                    if sync.settled() {
                                        break;
                                    }
                                }
                                Ok(_) => {}
                                Err(_) => break,
                            }
                        }
                    }).await;
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(500), events.recv()).await;
                    drop(pump);
                    return Ok(());
                }
            }
        }
    }
}

/// Commands waiting for the worker; when it is full the uplink stops reading the connection, so
/// the broker holds further commands (back-pressure) instead of the session being dropped.
const COMMAND_QUEUE: usize = 64;

/// How long an answer from another task (the enforcer) may take before the command is answered as
/// not applied (the enforcer refuses it after its own deadline, a little earlier).
const LATER_WITHIN: Duration = Duration::from_secs(35);

/// A command publish as received.
#[derive(Debug)]
struct Incoming {
    name: String,
    payload: Vec<u8>,
}

/// Answers commands one batch at a time: every command gets exactly one reply, written durably to
/// the outbox (kind `reply`) and remembered by id, so a command resent with the same id gets its
/// original reply again instead of being applied twice.
struct CommandWorker {
    max_command_bytes: usize,
    store: StoreHandle,
    status: Arc<Mutex<UplinkStatus>>,
    commands: Arc<dyn CommandHandler>,
    clock: Clock,
}

impl CommandWorker {
    async fn run(self, mut rx: mpsc::Receiver<Incoming>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < COMMAND_QUEUE {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.answer_batch(batch).await;
        }
    }

    async fn answer_batch(&self, batch: Vec<Incoming>) {
        let parsed: Vec<(String, Result<ParsedCommand, Rejected>)> = batch
            .into_iter()
            .map(|c| {
                let r = parse_command(&c.name, &c.payload, self.max_command_bytes);
                (c.name, r)
            })
            .collect();
        let ids: Vec<String> = parsed
            .iter()
            .filter_map(|(_, r)| match r {
                Ok(c) => Some(c.id.clone()),
                Err(r) => r.id.clone(),
            })
            .collect();
        let mut known = self.store.replies_of(ids).await;
        let mut records = Vec::with_capacity(parsed.len());
        let mut remember = Vec::new();
        for (name, parsed) in parsed {
            let now = self.clock.now();
            let id = match &parsed {
                Ok(c) => Some(c.id.clone()),
                Err(r) => r.id.clone(),
            };
            if let Some(original) = id.as_ref().and_then(|i| known.get(i)) {
                tracing::info!(command = %name, id = ?id, "command resent: answering with its original reply");
                records.push(reply_record(now, original.clone()));
                continue;
            }
            let payload = match parsed {
                Err(r) => {
                    tracing::warn!(command = %name, reason = %r.reason, "refused malformed command");
                    reply(r.id.as_deref(), &name, Err(r.reason), now)
                }
                Ok(cmd) => {
                    let result = self.execute(&cmd).await;
                    if let Err(e) = &result {
                        tracing::warn!(command = %cmd.name, id = %cmd.id, error = %e, "command failed");
                    }
                    bounded_reply(&cmd.id, &cmd.name, result, self.clock.now())
                }
            };
            if let Some(id) = id {
                known.insert(id.clone(), payload.clone());
                remember.push(Remembered {
                    id,
                    command: name,
                    ts_ms: now.timestamp_millis(),
                    reply: payload.clone(),
                });
            }
            records.push(reply_record(now, payload));
        }
        self.store.reply(records, remember).await;
    }

    async fn execute(&self, cmd: &ParsedCommand) -> Reply {
        match cmd.name.as_str() {
            "ping" => Ok(json!({"pong": self.clock.now().to_rfc3339()})),
            "status" => {
                let stats = self.store.stats().await;
                let uplink = self.status.lock().map(|s| s.clone()).unwrap_or_default();
                Ok(json!({"outbox": stats, "uplink": uplink}))
            }
            other => match self.commands.handle(&cmd.id, other, &cmd.args) {
                Some(Answer::Now(r)) => r,
                Some(Answer::Later(rx)) => match tokio::time::timeout(LATER_WITHIN, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(
                        "not applied: the task that handles it stopped; resend with a new id"
                            .into(),
                    ),
                    Err(_) => Err("not applied within its deadline; resend with a new id".into()),
                },
                None => Err(format!("unknown command {other:?}")),
            },
        }
    }
}

/// A reply as an outbox record.
fn reply_record(ts: DateTime<Utc>, payload: Vec<u8>) -> NewRecord {
    NewRecord {
        kind: Kind::Reply,
        topic: "reply".into(),
        ts,
        payload,
    }
}

/// The reply, or an error reply saying how to ask for less when the result would not fit in one
/// publish (a `get_bill` of every room of a large site).
fn bounded_reply(id: &str, name: &str, result: Reply, ts: DateTime<Utc>) -> Vec<u8> {
    let payload = reply(Some(id), name, result, ts);
    if payload.len() <= crate::store::MAX_RECORD_BYTES {
        return payload;
    }
    reply(
        Some(id),
        name,
        Err(format!(
            "the result is {} bytes, more than one reply may carry ({}); ask for less (one room, or page with \"after\")",
            payload.len(),
            crate::store::MAX_RECORD_BYTES
        )),
        ts,
    )
}

/// A reply record as published: one reply per message, the outbox seq spliced in as its first key
/// (`{"seq": 41, "id": "c-1", "command": "ping", "ok": true, ...}`).
pub(crate) fn reply_message(row: &Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.payload.len() + 24);
    splice_seq(&mut out, row);
    out
}

/// Appends a stored record (a JSON object written by meterd) with its seq spliced in as the first key.
fn splice_seq(out: &mut Vec<u8>, row: &Stored) {
    out.extend_from_slice(format!("{{\"seq\":{}", row.seq).as_bytes());
    let body = row.payload.strip_prefix(b"{").unwrap_or(b"}");
    if body.first() != Some(&b'}') {
        out.push(b',');
    }
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_model_above_the_packet_limit_is_not_published_so_it_cannot_wedge_the_session() {
        // 20,000 rooms at ~150 bytes each: 3 MB.
        let big = vec![b' '; 3_000_000];
        assert!(site_model_payload(&big).is_none());
        let small = br#"{"gateway":"gw"}"#;
        assert_eq!(site_model_payload(small).as_deref(), Some(&small[..]));
    }
    use crate::store::Kind;

    fn row(seq: i64, topic: &str, payload: &str) -> Stored {
        Stored {
            seq,
            kind: Kind::Telemetry,
            topic: topic.into(),
            ts_ms: 0,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_message_carries_every_seq_and_is_valid_json() {
        let rows = [
            row(7, "telemetry", r#"{"device":"m1","value":1.5}"#),
            row(8, "telemetry", "{}"),
        ];
        let m: Value = serde_json::from_slice(&message("gw\"1", &rows)).unwrap();
        assert_eq!(m["gateway"], "gw\"1");
        assert_eq!(m["seq_first"], 7);
        assert_eq!(m["seq_last"], 8);
        assert_eq!(
            m["records"][0],
            json!({"seq": 7, "device": "m1", "value": 1.5})
        );
        assert_eq!(m["records"][1], json!({"seq": 8}));
    }

    #[test]
    fn batches_stop_at_a_topic_change_and_at_the_limits() {
        let rows: Vec<Stored> = (1..=10)
            .map(|i| row(i, if i == 6 { "events" } else { "telemetry" }, "{\"x\":1}"))
            .collect();
        assert_eq!(next_batch(&rows, 100, 1 << 20), 5);
        assert_eq!(next_batch(&rows, 3, 1 << 20), 3);
        assert_eq!(next_batch(&rows, 100, 50), 2);
        assert_eq!(next_batch(&rows[5..], 100, 1 << 20), 1);
        // One record larger than the byte limit still goes, alone.
        let big = [row(
            1,
            "telemetry",
            &format!("{{\"x\":\"{}\"}}", "a".repeat(500)),
        )];
        assert_eq!(next_batch(&big, 100, 100), 1);
    }

    #[test]
    fn malformed_commands_are_refused_with_a_reason() {
        let max = 1024;
        let cases: &[(&str, &[u8], &str)] = &[
            ("ping", b"not json", "not valid JSON"),
            ("ping", b"[1,2]", "expected a JSON object"),
            ("ping", b"{\"id\": 5}", "\"id\" must be a string"),
            ("ping", b"{}", "missing \"id\""),
            ("ping", b"{\"id\": \"\"}", "1 to 128 characters"),
            ("Ping!", b"{\"id\": \"a\"}", "must be 1-64 characters"),
            ("ping", &[b'x'; 2000], "exceeds the 1024-byte limit"),
        ];
        for (name, payload, why) in cases {
            let r = parse_command(name, payload, max).unwrap_err();
            assert!(
                r.reason.contains(why),
                "{name} {:?}: {}",
                String::from_utf8_lossy(payload),
                r.reason
            );
        }
        let ok = parse_command("relay_set", br#"{"id": "c-1", "room": "101"}"#, max).unwrap();
        assert_eq!(ok.id, "c-1");
        assert_eq!(ok.args, json!({"room": "101"}));
        let v: Value = serde_json::from_slice(&reply(
            Some("c-1"),
            "x",
            Err("nope".into()),
            crate::clock::Clock::system().now(),
        ))
        .unwrap();
        assert_eq!(
            (v["ok"].clone(), v["error"].clone(), v["id"].clone()),
            (json!(false), json!("nope"), json!("c-1"))
        );
    }

    /// Runs the fetch → hand → packet id bookkeeping against an outbox of seqs `1..=latest`, one
    /// record per publish, and returns what was handed.
    fn hand_all(sync: &mut OutboxSync, latest: i64, acked_upto: i64) -> Vec<Sent> {
        let mut out = Vec::new();
        while let Some(f) = sync.next_fetch(latest) {
            let next = f.after.max(acked_upto) + 1;
            if next > f.upto {
                sync.fetched_nothing(f);
                continue;
            }
            let sent = Sent {
                first: next,
                last: next,
                records: 1,
            };
            sync.handed(f, sent);
            out.push(sent);
        }
        out
    }

    #[test]
    fn the_window_bounds_what_is_handed_and_each_puback_frees_its_own_records() {
        // 5 records before the connection, window 3.
        let mut sync = OutboxSync::new(5, 3, 0.5);
        sync.handed_untracked(); // the birth message
        let handed = hand_all(&mut sync, 8, 0);
        assert_eq!(handed.len(), 2, "birth + 2 fill the window of 3");
        assert!(!sync.has_room());
        // Packet ids in hand-over order: 1 = birth, 2 and 3 the records.
        for pkid in 1..=3 {
            sync.outgoing(pkid);
        }
        // Acks out of order still map to their own records.
        assert_eq!(sync.acked(3), Some(handed[1]));
        assert_eq!(sync.acked(1), None, "the birth acknowledges no record");
        assert_eq!(sync.acked(2), Some(handed[0]));
        assert_eq!(sync.acked(2), None, "a duplicate ack frees nothing twice");
        assert!(sync.settled());
        // Backlog and live alternate by the share: 5 backlog and 3 live records in all.
        let mut all: Vec<i64> = handed.iter().map(|s| s.first).collect();
        for pkid in 4..20 {
            let more = hand_all(&mut sync, 8, 0);
            for (i, s) in more.iter().enumerate() {
                all.push(s.first);
                sync.outgoing(pkid * 10 + i as u16);
                sync.acked(pkid * 10 + i as u16);
            }
        }
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=8).collect::<Vec<_>>(),
            "every record handed exactly once"
        );
    }

    proptest::proptest! {
        /// Against a model: whatever the interleaving of commits, packet ids and acks, no record is
        /// handed twice in a connection, the window is never exceeded, and every PUBACK names
        /// exactly the records of the publish that got that packet id.
        #[test]
        fn outbox_sync_matches_a_model(
            backlog in 0i64..20,
            window in 1usize..6,
            ops in proptest::collection::vec(0u8..4, 1..200),
        ) {
            let mut sync = OutboxSync::new(backlog, window, 0.3);
            let mut latest = backlog;
            let mut handed: Vec<Sent> = Vec::new();
            let mut waiting_id: std::collections::VecDeque<Sent> = VecDeque::default();
            let mut by_pkid: HashMap<u16, Sent> = HashMap::new();
            let mut next_pkid = 1u16;
            for op in ops {
                match op {
                    0 => latest += 1,
                    1 => {
                        for s in hand_all(&mut sync, latest, 0) {
                            handed.push(s);
                            waiting_id.push_back(s);
                        }
                    }
                    2 => {
                        if let Some(s) = waiting_id.pop_front() {
                            sync.outgoing(next_pkid);
                            by_pkid.insert(next_pkid, s);
                            next_pkid += 1;
                        }
                    }
                    _ => {
                        if let Some(&k) = by_pkid.keys().min() {
                            let s = by_pkid.remove(&k).unwrap();
                            proptest::prop_assert_eq!(sync.acked(k), Some(s));
                        }
                    }
                }
                proptest::prop_assert!(waiting_id.len() + by_pkid.len() <= window);
            }
            let mut seqs: Vec<i64> = handed.iter().map(|s| s.first).collect();
            let n = seqs.len();
            seqs.sort_unstable();
            seqs.dedup();
            proptest::prop_assert_eq!(seqs.len(), n, "a record handed twice");
        }
    }

    #[test]
    fn backoff_grows_exponentially_within_the_cap_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 0..20 {
            let d = backoff(attempt, min, max);
            let base = (min * 2u32.pow(attempt.min(16))).min(max);
            assert!(
                d >= base.mul_f64(0.75) && d <= max,
                "attempt {attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn backlog_and_live_share_the_link_by_the_configured_ratio() {
        let (mut b, mut l) = (0u64, 0u64);
        for _ in 0..1000 {
            match pick_backlog(true, true, b, l, 0.25) {
                Some(true) => b += 100,
                Some(false) => l += 100,
                None => unreachable!(),
            }
        }
        let share = b as f64 / (b + l) as f64;
        assert!((share - 0.25).abs() < 0.01, "{share}");
        assert_eq!(
            pick_backlog(true, false, 0, 1_000_000, 0.1),
            Some(true),
            "backlog drains when live is idle"
        );
        assert_eq!(
            pick_backlog(false, true, 1_000_000, 0, 0.9),
            Some(false),
            "live never waits for an empty backlog"
        );
        assert_eq!(pick_backlog(false, false, 0, 0, 0.5), None);
    }
}
