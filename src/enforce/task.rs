//! The enforcement task: keeps the rules' inputs (persisted in SQLite), deducts prepaid consumption
//! from the readings, and reconciles every relay's desired state with its read-back state through the
//! bus tasks. Every action is an audit record.
//!
//! Start-up order is the safety property: persisted rules and balances are loaded and every relay's
//! actual state is read before anything is written, so a restart or power cycle never flickers a door
//! or a tenant's supply.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use rusqlite::{params, Connection};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use super::command::{self, CloudCommand};
use super::config::Relay;
use super::ledger;
use super::prepaid::{self, CounterState, PrepaidEvent, Step};
use super::rules::{self, Desired, Override, Prepaid, RoomRules};
use crate::config::Config;
use crate::modbus::bus::{ActuateError, Actuation, Batch, RelayState};
use crate::reading::Quality;
use crate::store::{Kind, NewRecord, StoreError, StoreHandle, Write};
use crate::topology::Utility;
use crate::uplink::{Answer, CommandHandler};

/// What reaches the enforcement task.
#[derive(Debug)]
pub enum Input {
    /// A cloud command that passed authentication and validation. It is applied only before
    /// `deadline` (after it the uplink has answered that it was not applied), and answered on
    /// `reply` once applied and durable.
    Cloud {
        name: String,
        id: String,
        args: Value,
        deadline: DateTime<Utc>,
        reply: Option<oneshot::Sender<Result<Value, String>>>,
    },
    /// A request from the local control socket.
    Control {
        req: ControlRequest,
        reply: oneshot::Sender<Value>,
    },
    /// Readings: prepaid deduction and the fire-alarm input.
    Readings(Batch),
}

/// Requests on the local control socket (one JSON object per line).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Desired vs actual state of every relay, and why.
    List,
    /// Force a room's relays (or one of them) on or off, optionally for a while.
    Override {
        room: String,
        relay: Option<String>,
        on: bool,
        reason: String,
        for_s: Option<u64>,
        by: String,
    },
    /// Remove a room's overrides (or one).
    ClearOverride { room: String, relay: Option<String> },
}

/// Cloud commands that affect relays; each must be signed (see [`super::auth`]).
pub const RELAY_COMMANDS: &[&str] = &[
    "freeze",
    "unfreeze",
    "set_lease",
    "set_balance",
    "top_up",
    "set_life_critical",
];

/// Authenticates relay commands and hands them to the task. Ids are remembered (in memory and, by
/// the task, in SQLite) so a redelivered or replayed command never acts twice.
pub struct EnforcementCommands {
    pub key: Option<VerifyingKey>,
    /// For validating a command before it is answered.
    pub config: Arc<Config>,
    pub seen: Arc<Mutex<HashSet<String>>>,
    pub tx: mpsc::Sender<Input>,
}

/// How long a relay command may wait for the enforcer before it is answered as not applied.
pub const APPLY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

impl CommandHandler for EnforcementCommands {
    fn handle(&self, id: &str, name: &str, args: &Value) -> Option<Answer> {
        if !RELAY_COMMANDS.contains(&name) {
            return None;
        }
        Some(match self.check(id, name, args) {
            Err(e) => Answer::Now(Err(e)),
            Ok(()) => {
                let (reply, rx) = oneshot::channel();
                let input = Input::Cloud {
                    name: name.to_string(),
                    id: id.to_string(),
                    args: args.clone(),
                    deadline: Utc::now()
                        + chrono::Duration::from_std(APPLY_WITHIN).unwrap_or_default(),
                    reply: Some(reply),
                };
                match self.tx.try_send(input) {
                    Ok(()) => Answer::Later(rx),
                    Err(_) => Answer::Now(Err(
                        "not applied: enforcement is busy; resend with a new id".into(),
                    )),
                }
            }
        })
    }
}

impl EnforcementCommands {
    /// Authenticates and validates a relay command against the config; remembers its id.
    fn check(&self, id: &str, name: &str, args: &Value) -> Result<(), String> {
        let Some(key) = &self.key else {
            return Err(
                "relay commands are disabled: set [enforcement] public_key on the gateway".into(),
            );
        };
        let seen = |i: &str| self.seen.lock().map(|s| s.contains(i)).unwrap_or(true);
        super::auth::verify(key, name, id, args, Utc::now(), seen)?;
        // Everything the config can tell is checked before the command goes to the enforcer.
        command::parse(
            name,
            id,
            args,
            &self.config.enforcement,
            &self.config.site,
            Utc::now(),
        )?;
        if let Ok(mut s) = self.seen.lock() {
            s.insert(id.to_string());
        }
        Ok(())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS enforcement_rooms (room TEXT PRIMARY KEY, rules TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enforcement_counters (device TEXT NOT NULL, quantity TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (device, quantity));
CREATE TABLE IF NOT EXISTS command_ids (id TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL);
-- Small persisted facts: the fire alarm's last known state ('on'/'off').
CREATE TABLE IF NOT EXISTS enforcement_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Where each prepaid counter is billed up to, with the carried fraction (JSON of CounterState).
CREATE TABLE IF NOT EXISTS prepaid_counters (device TEXT NOT NULL, quantity TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (device, quantity));
";

/// Loads the command ids already used (for the handler's replay check).
pub fn load_seen(path: &std::path::Path) -> Result<HashSet<String>, StoreError> {
    let conn = open(path)?;
    let mut stmt = conn
        .prepare("SELECT id FROM command_ids")
        .map_err(|e| sql(path, e))?;
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| sql(path, e))?
        .filter_map(Result::ok)
        .collect();
    Ok(ids)
}

fn sql(path: &std::path::Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

fn open(path: &std::path::Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|e| sql(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| sql(path, e))?;
    conn.execute_batch(SCHEMA).map_err(|e| sql(path, e))?;
    conn.execute_batch(ledger::SCHEMA)
        .map_err(|e| sql(path, e))?;
    Ok(conn)
}

/// The task's state.
pub struct Enforcer {
    config: Arc<Config>,
    /// Own connection to the outbox database, for reading (the history around a band change) and
    /// creating the schema at start. Every write goes through the store's one writer
    /// ([`StoreHandle::transact`]). Behind a mutex only so the task is `Send`; never held across an
    /// await.
    conn: Mutex<Connection>,
    rooms: BTreeMap<String, RoomRules>,
    /// Prepaid counters: billed value, carried fraction, suspect reading (by `device/quantity`).
    counters: HashMap<String, CounterState>,
    /// Read-back state per relay; absent until read.
    actual: BTreeMap<String, bool>,
    decided: BTreeMap<String, Desired>,
    /// The fire alarm input: `None` until read (fail-open doors are then left as they are);
    /// starts as active when it was active at the last stop (persisted).
    fire: Option<bool>,
    actuators: HashMap<String, mpsc::Sender<Actuation>>,
    store: StoreHandle,
    /// (relay, rule) pairs already reported as deferred or life-critical alarms.
    notified: HashSet<(String, String)>,
    /// Relays whose last switch failed, with the state they were asked for: retried on the re-check
    /// timer only, so one jammed relay does not slow every other decision.
    failed: HashMap<String, bool>,
}

impl Enforcer {
    /// Loads the persisted rules, balances and counters.
    pub fn open(
        config: Arc<Config>,
        actuators: HashMap<String, mpsc::Sender<Actuation>>,
        store: StoreHandle,
    ) -> Result<Enforcer, StoreError> {
        let path = config.store.path.clone();
        let conn = open(&path)?;
        let mut rooms: BTreeMap<String, RoomRules> = BTreeMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT room, rules FROM enforcement_rooms")
                .map_err(|e| sql(&path, e))?;
            for row in stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(|e| sql(&path, e))?
            {
                let (room, rules) = row.map_err(|e| sql(&path, e))?;
                if let Ok(r) = serde_json::from_str(&rules) {
                    rooms.insert(room, r);
                }
            }
        }
        for (id, r) in &config.site.rooms {
            rooms.entry(id.clone()).or_default().life_critical |= r.life_critical;
        }
        let fire_was_active = conn
            .query_row(
                "SELECT value FROM enforcement_state WHERE key = 'fire_alarm'",
                [],
                |r| r.get::<_, String>(0),
            )
            .map(|v| v == "on")
            .unwrap_or(false);
        let fire = if config.enforcement.fire_alarm.is_none() {
            Some(false)
        } else {
            fire_was_active.then_some(true)
        };
        let mut counters = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT device, quantity, state FROM prepaid_counters")
                .map_err(|e| sql(&path, e))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(|e| sql(&path, e))?;
            for row in rows {
                let (d, q, state) = row.map_err(|e| sql(&path, e))?;
                match serde_json::from_str::<CounterState>(&state) {
                    Ok(st) => {
                        counters.insert(format!("{d}/{q}"), st);
                    }
                    Err(e) => {
                        tracing::error!(device = %d, error = %e, "prepaid counter state unreadable; the next reading is the new baseline")
                    }
                }
            }
            // Databases from before the exact ledger kept only the last reading: billed from there.
            let mut old = conn
                .prepare("SELECT device, quantity, value FROM enforcement_counters")
                .map_err(|e| sql(&path, e))?;
            let rows = old
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, f64>(2)?,
                    ))
                })
                .map_err(|e| sql(&path, e))?;
            for row in rows {
                let (d, q, v) = row.map_err(|e| sql(&path, e))?;
                counters
                    .entry(format!("{d}/{q}"))
                    .or_insert_with(|| CounterState {
                        billed_milli: crate::money::to_milli(v),
                        billed_at: Utc::now(),
                        carry: 0,
                        suspect: None,
                    });
            }
        }
        Ok(Enforcer {
            config,
            conn: Mutex::new(conn),
            rooms,
            counters,
            actual: BTreeMap::new(),
            decided: BTreeMap::new(),
            fire,
            actuators,
            store,
            notified: HashSet::new(),
            failed: HashMap::new(),
        })
    }

    fn relays(&self) -> &[Relay] {
        &self.config.enforcement.relays
    }

    /// The write that persists a room's rules, balances and overrides as they are now.
    fn room_write(&self, room: &str) -> Option<Write> {
        let r = self.rooms.get(room)?;
        let (room, json) = (
            room.to_string(),
            serde_json::to_string(r).unwrap_or_default(),
        );
        Some(Box::new(move |c: &Connection| {
            c.execute(
                "INSERT INTO enforcement_rooms (room, rules) VALUES (?1, ?2) ON CONFLICT(room) DO UPDATE SET rules = excluded.rules",
                params![room, json],
            )
            .map(drop)
        }))
    }

    async fn actuate(&self, relay: &Relay, set: Option<bool>) -> Result<RelayState, ActuateError> {
        let stopped = || ActuateError::BusStopped(relay.device.clone());
        let tx = self.actuators.get(&relay.device).ok_or_else(stopped)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Actuation {
            device: relay.device.clone(),
            output: relay.output.clone(),
            set,
            reply,
        })
        .await
        .map_err(|_| stopped())?;
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| stopped())?
            .map_err(|_| stopped())?
    }

    /// Reads every relay's state; reports relays switched behind the gateway's back.
    async fn read_all(&mut self) -> Vec<NewRecord> {
        let mut out = Vec::new();
        for relay in self.relays().to_vec() {
            match self.actuate(&relay, None).await {
                Ok(s) => {
                    if let Some(prev) = self.actual.insert(relay.spec.name.clone(), s.after) {
                        if prev != s.after {
                            tracing::warn!(relay = %relay.spec.name, from = prev, to = s.after, "relay changed outside meterd");
                            out.push(audit(
                                "relay_changed_externally",
                                &relay,
                                json!({"from": onoff(prev), "to": onoff(s.after)}),
                            ));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(relay = %relay.spec.name, error = %e, "cannot read relay state")
                }
            }
        }
        out
    }

    /// Brings every relay whose state is known to its desired state. A relay that failed to switch to
    /// the same state before is retried only when `retry_failed` (the re-check timer).
    async fn reconcile(&mut self, now: DateTime<Utc>, retry_failed: bool) -> Vec<NewRecord> {
        let specs: Vec<_> = self.relays().iter().map(|r| r.spec.clone()).collect();
        let desired = rules::decide(
            &specs,
            &self.rooms,
            self.fire,
            &self.actual,
            &self.config.enforcement.policy,
            now,
        );
        let mut out = Vec::new();
        for d in desired {
            let relay = self
                .relays()
                .iter()
                .find(|r| r.spec.name == d.relay)
                .cloned()
                .expect("decided relays come from the config");
            if matches!(d.rule.as_str(), "deferred" | "life_critical")
                && self.notified.insert((d.relay.clone(), d.rule.clone()))
            {
                let event = if d.rule == "deferred" {
                    "cutoff_deferred"
                } else {
                    "life_critical_alarm"
                };
                out.push(audit(event, &relay, json!({"reason": d.reason})));
            }
            self.decided.insert(d.relay.clone(), d.clone());
            let Some(actual) = self.actual.get(&d.relay).copied() else {
                continue;
            };
            if actual == d.on {
                self.failed.remove(&d.relay);
                continue;
            }
            let known_bad = self.failed.get(&d.relay) == Some(&d.on);
            if !retry_failed && known_bad {
                continue;
            }
            // A fresh decision gets three attempts; a relay already known to be stuck one per re-check.
            let attempts = if known_bad { 1 } else { 3 };
            let mut last = Err(ActuateError::Unsupported);
            for attempt in 1..=attempts {
                last = self.actuate(&relay, Some(d.on)).await;
                // A device that refused with an exception says the same again: no more attempts.
                if last.as_ref().is_err_and(ActuateError::device_answered) {
                    break;
                }
                match &last {
                    Ok(s) if s.after == d.on => {
                        out.push(audit(
                            "relay_switched",
                            &relay,
                            json!({"from": onoff(actual), "to": onoff(d.on), "rule": d.rule, "reason": d.reason, "readback": onoff(s.after), "confirmed": true, "attempts": attempt}),
                        ));
                        self.actual.insert(d.relay.clone(), s.after);
                        self.failed.remove(&d.relay);
                        break;
                    }
                    _ if attempt < attempts => tokio::time::sleep(Duration::from_millis(300)).await,
                    _ => {}
                }
            }
            match last {
                Ok(s) if s.after == d.on => {}
                Ok(s) => {
                    self.failed.insert(d.relay.clone(), d.on);
                    tracing::error!(relay = %d.relay, wanted = d.on, readback = s.after, "relay did not switch");
                    self.actual.insert(d.relay.clone(), s.after);
                    out.push(audit(
                        "relay_mismatch",
                        &relay,
                        json!({"from": onoff(actual), "to": onoff(d.on), "rule": d.rule, "reason": d.reason, "readback": onoff(s.after), "confirmed": false, "attempts": attempts}),
                    ));
                }
                Err(e) => {
                    self.failed.insert(d.relay.clone(), d.on);
                    tracing::error!(relay = %d.relay, error = %e, "relay write failed");
                    out.push(audit("relay_error", &relay, json!({"from": onoff(actual), "to": onoff(d.on), "rule": d.rule, "reason": d.reason, "error": e.to_string(), "error_kind": e.kind(), "attempts": attempts})));
                }
            }
        }
        out
    }

    fn room_mut(&mut self, room: &str) -> Result<&mut RoomRules, String> {
        if !self.config.site.rooms.contains_key(room) {
            return Err(format!("unknown room {room:?}"));
        }
        Ok(self.rooms.entry(room.to_string()).or_default())
    }

    /// Applies a cloud command and writes it, with the records that report it, through the store
    /// in one transaction with `synchronous=FULL`: once it is answered, a power cut cannot take it
    /// back. If the write fails the command is undone in memory too and answered as not applied.
    async fn apply_cloud_durably(
        &mut self,
        name: &str,
        id: &str,
        args: &Value,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let before = (self.rooms.clone(), self.counters.clone());
        let (result, writes) = self.apply_cloud(name, id, args, now);
        let records = match &result {
            Ok(events) => events.clone(),
            Err(e) => vec![NewRecord {
                kind: Kind::Audit,
                topic: "audit".into(),
                ts: now,
                payload:
                    json!({"event": "command_rejected", "command": name, "id": id, "error": e})
                        .to_string()
                        .into_bytes(),
            }],
        };
        if let Err(e) = self.store.transact(records, writes, true).await {
            (self.rooms, self.counters) = before;
            return Err(format!(
                "not applied: enforcement state cannot be written: {e}"
            ));
        }
        result.map(drop)
    }

    /// Applies an authenticated cloud command to the state in memory: the events it raises (or why
    /// it was refused), and the writes that persist it (the command id always).
    fn apply_cloud(
        &mut self,
        name: &str,
        id: &str,
        args: &Value,
        now: DateTime<Utc>,
    ) -> (Result<Vec<NewRecord>, String>, Vec<Write>) {
        let expires = args
            .get("expires_at")
            .and_then(Value::as_str)
            .and_then(|e| DateTime::parse_from_rfc3339(e).ok())
            .map(|e| e.timestamp_millis())
            .unwrap_or(0);
        let (cmd_id, prune_before) = (id.to_string(), now.timestamp_millis() - 86_400_000);
        let mut writes: Vec<Write> = vec![Box::new(move |c: &Connection| {
            c.execute(
                "INSERT OR IGNORE INTO command_ids (id, expires_ms) VALUES (?1, ?2)",
                params![cmd_id, expires],
            )?;
            c.execute(
                "DELETE FROM command_ids WHERE expires_ms < ?1",
                [prune_before],
            )
            .map(drop)
        })];
        let r = self.apply_cloud_state(name, id, args, now, &mut writes);
        (r, writes)
    }

    fn apply_cloud_state(
        &mut self,
        name: &str,
        id: &str,
        args: &Value,
        now: DateTime<Utc>,
        writes: &mut Vec<Write>,
    ) -> Result<Vec<NewRecord>, String> {
        let cmd = command::parse(
            name,
            id,
            args,
            &self.config.enforcement,
            &self.config.site,
            now,
        )?;
        let room = cmd.room().to_string();
        let mut events = Vec::new();
        match cmd {
            CloudCommand::Freeze { scope, set, .. } => {
                let r = self.room_mut(&room)?;
                if scope.access() {
                    r.access_freeze = set.clone();
                }
                if scope.utilities() {
                    r.utility_freeze = set;
                }
            }
            CloudCommand::SetLease { end, renewed, .. } => {
                let r = self.room_mut(&room)?;
                r.lease_end = end;
                r.lease_renewed = renewed;
            }
            CloudCommand::SetLifeCritical { on, .. } => {
                self.room_mut(&room)?.life_critical = on;
            }
            CloudCommand::SetBalance { utility: u, .. }
            | CloudCommand::TopUp { utility: u, .. } => {
                let top_up = matches!(cmd, CloudCommand::TopUp { .. });
                let policy = &self.config.enforcement.policy;
                if let Some(r) = self.rooms.get(&room) {
                    if let Some(end) = r.lease_end.filter(|_| !r.lease_renewed && top_up) {
                        let today = now.with_timezone(&policy.calendar.timezone).date_naive();
                        if (end - today).num_days() <= policy.lease_notice_days {
                            return Err(format!("top-up suspended: the lease of room {room} ends {end} without renewal"));
                        }
                    }
                }
                let r = self.room_mut(&room)?;
                let p = r.prepaid.entry(u).or_insert(Prepaid {
                    balance: 0,
                    empty_since: None,
                    warned: false,
                });
                let before = p.balance;
                let ev = match cmd {
                    CloudCommand::TopUp { amount, .. } => prepaid::top_up(p, amount),
                    CloudCommand::SetBalance { balance, .. } => prepaid::reconcile(p, balance, now),
                    _ => Vec::new(),
                };
                let after = p.balance;
                events.extend(ev.into_iter().map(|e| prepaid_event(&room, u, &e)));
                let kind = if top_up { "top_up" } else { "reconcile" };
                let (r, reference) = (room.clone(), id.to_string());
                writes.push(Box::new(move |c: &Connection| {
                    ledger::add_adjustment(c, (&r, u), kind, now, after - before, after, &reference)
                }));
            }
        }
        writes.extend(self.room_write(&room));
        Ok(events)
    }

    /// Deducts prepaid consumption and follows the fire alarm: the records to publish and the
    /// writes that persist the new state, for one transaction.
    fn apply_readings(
        &mut self,
        batch: &Batch,
        now: DateTime<Utc>,
    ) -> (Vec<NewRecord>, Vec<Write>) {
        let mut out = Vec::new();
        let mut writes: Vec<Write> = Vec::new();
        if let Some(f) = &self.config.enforcement.fire_alarm {
            if let Some(r) = batch.iter().find(|r| {
                *r.device == *f.device && *r.register == *f.register && r.quality == Quality::Good
            }) {
                let on = r.value == Some(f.active);
                let was = self.fire.replace(on);
                if was != Some(on) {
                    writes.push(Box::new(move |c: &Connection| {
                        c.execute(
                            "INSERT INTO enforcement_state (key, value) VALUES ('fire_alarm', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            [if on { "on" } else { "off" }],
                        )
                        .map(drop)
                    }));
                }
                // Reported when it changes; the first read after a start reports an active alarm.
                if was.map_or(on, |w| w != on) {
                    tracing::warn!(fire_alarm = on, "fire alarm input changed");
                    out.push(NewRecord {
                        kind: Kind::Audit,
                        topic: "audit".into(),
                        ts: now,
                        payload: json!({"event": if on { "fire_alarm_on" } else { "fire_alarm_off" }, "device": f.device, "register": f.register}).to_string().into_bytes(),
                    });
                }
            }
        }
        let accounts = self.config.enforcement.prepaid.clone();
        let low = self.config.enforcement.low_balance;
        let tz = self.config.gateway.timezone;
        let interval_ms = (self.config.topology.history_every.as_millis() as i64).max(1);
        // Counter, balance and ledger move together in one transaction (with the events), run by
        // the store's writer, so a restart or a power cut neither loses nor repeats consumption.
        // The history is read here, on this task's own (reading) connection.
        let Ok(conn) = self.conn.lock() else {
            return (out, writes);
        };
        for acc in &accounts {
            let Some(r) = batch.iter().find(|r| {
                *r.device == *acc.device
                    && r.quantity == acc.utility.quantity()
                    && r.quality == Quality::Good
            }) else {
                continue;
            };
            let Some(value) = r.value else { continue };
            let quantity = acc.utility.quantity();
            let key = format!("{}/{}", acc.device, quantity);
            let milli = crate::money::to_milli(value);
            let mut state = self.counters.remove(&key);
            // A long interval that crosses a band change is split with the history samples inside it.
            let inside: Vec<(DateTime<Utc>, i64)> = match &state {
                Some(st)
                    if !acc.tariff.bands.is_empty()
                        && r.ts - st.billed_at > chrono::Duration::minutes(1) =>
                {
                    crate::store::history_window(
                        &conn,
                        &acc.device,
                        quantity.as_str(),
                        st.billed_at.timestamp_millis() + 1,
                        r.ts.timestamp_millis() - 1,
                    )
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(t, v)| {
                        Some((
                            DateTime::from_timestamp_millis(t)?,
                            crate::money::to_milli(v),
                        ))
                    })
                    .collect()
                }
                _ => Vec::new(),
            };
            let step = prepaid::meter(
                &mut state,
                r.ts,
                milli,
                &acc.tariff,
                tz,
                acc.limits,
                &inside,
            );
            let rules = self.rooms.entry(acc.room.clone()).or_default();
            match step {
                Step::Baseline => {}
                Step::Billed(charges) => match rules.prepaid.get_mut(&acc.utility) {
                    Some(p) => {
                        let total: i64 = charges.iter().map(|c| c.amount).sum();
                        let mut balance = p.balance;
                        for c in charges.iter().cloned() {
                            balance -= c.amount;
                            let interval = c.piece.from.timestamp_millis().div_euclid(interval_ms)
                                * interval_ms;
                            let (room, utility, after) = (acc.room.clone(), acc.utility, balance);
                            writes.push(Box::new(move |tx: &Connection| {
                                ledger::add_usage(tx, &room, utility, interval, &c, after)
                            }));
                        }
                        let ev = prepaid::deduct(p, total, low, now);
                        out.extend(
                            ev.into_iter()
                                .map(|e| prepaid_event(&acc.room, acc.utility, &e)),
                        );
                    }
                    // No balance yet (the cloud sets it): nothing to deduct, no fraction to carry.
                    None => {
                        if let Some(st) = state.as_mut() {
                            st.carry = 0;
                        }
                    }
                },
                Step::Suspect {
                    reason,
                    first,
                    billed_milli,
                    reading_milli,
                } => {
                    if first {
                        tracing::warn!(device = %acc.device, room = %acc.room, ?reason, billed_milli, reading_milli, "prepaid counter reading held as suspect");
                        out.push(counter_event("counter_suspect", acc, r.ts, json!({"reason": reason, "billed": billed_milli as f64 / 1000.0, "reading": reading_milli as f64 / 1000.0})));
                    }
                }
                Step::Rebased {
                    from_milli,
                    to_milli,
                } => {
                    tracing::warn!(device = %acc.device, room = %acc.room, from_milli, to_milli, "prepaid counter re-based on a confirmed new level; the jump was not billed");
                    out.push(counter_event("counter_rebased", acc, r.ts, json!({"from": from_milli as f64 / 1000.0, "to": to_milli as f64 / 1000.0, "unbilled": (to_milli - from_milli) as f64 / 1000.0})));
                }
            }
            if let Some(st) = state {
                let (device, json) = (
                    acc.device.to_string(),
                    serde_json::to_string(&st).unwrap_or_default(),
                );
                writes.push(Box::new(move |tx: &Connection| {
                    tx.execute(
                        "INSERT INTO prepaid_counters (device, quantity, state) VALUES (?1, ?2, ?3) ON CONFLICT(device, quantity) DO UPDATE SET state = excluded.state",
                        params![device, quantity.as_str(), json],
                    )
                    .map(drop)
                }));
                self.counters.insert(key, st);
            }
            writes.extend(self.room_write(&acc.room));
        }
        (out, writes)
    }

    /// Answers a local control request; the writes persist what it changed.
    fn control(&mut self, req: ControlRequest, now: DateTime<Utc>) -> (Value, Vec<Write>) {
        let mut writes: Vec<Write> = Vec::new();
        let v = match req {
            ControlRequest::List => {
                let relays: Vec<Value> = self
                    .relays()
                    .iter()
                    .map(|r| {
                        let d = self.decided.get(&r.spec.name);
                        json!({
                            "relay": r.spec.name, "room": r.spec.room, "kind": r.spec.kind, "device": r.device, "output": r.output,
                            "desired": d.map(|d| onoff(d.on)), "actual": self.actual.get(&r.spec.name).map(|a| onoff(*a)),
                            "rule": d.map(|d| d.rule.clone()), "reason": d.map(|d| d.reason.clone()),
                        })
                    })
                    .collect();
                json!({"ok": true, "fire_alarm": self.fire, "relays": relays})
            }
            ControlRequest::Override {
                room,
                relay,
                on,
                reason,
                for_s,
                by,
            } => {
                let names: Vec<String> = self
                    .relays()
                    .iter()
                    .filter(|r| {
                        r.spec.room == room && relay.as_ref().is_none_or(|n| *n == r.spec.name)
                    })
                    .map(|r| r.spec.name.clone())
                    .collect();
                if names.is_empty() {
                    return (
                        json!({"ok": false, "error": format!("no relay {} in room {room:?}", relay.unwrap_or_default())}),
                        Vec::new(),
                    );
                }
                if reason.trim().is_empty() {
                    return (
                        json!({"ok": false, "error": "a reason is required (it goes into the audit trail)"}),
                        Vec::new(),
                    );
                }
                let until = for_s.map(|s| now + chrono::Duration::seconds(s as i64));
                let rules = self.rooms.entry(room.clone()).or_default();
                for n in &names {
                    rules.overrides.insert(
                        n.clone(),
                        Override {
                            on,
                            reason: reason.clone(),
                            until,
                            by: by.clone(),
                        },
                    );
                }
                writes.extend(self.room_write(&room));
                json!({"ok": true, "relays": names, "on": on, "until": until.map(|u| u.to_rfc3339())})
            }
            ControlRequest::ClearOverride { room, relay } => {
                let rules = self.rooms.entry(room.clone()).or_default();
                let before = rules.overrides.len();
                rules
                    .overrides
                    .retain(|k, _| relay.as_ref().is_some_and(|n| n != k));
                let n = before - rules.overrides.len();
                writes.extend(self.room_write(&room));
                json!({"ok": true, "cleared": n})
            }
        };
        (v, writes)
    }

    /// Runs until shutdown: read every relay first, then follow inputs and the re-check timer.
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Never write before the actual states are known (no flicker on restart).
        let mut tries = 0;
        while self.actual.len() < self.relays().len() && tries < 3 {
            let _ = self.read_all().await;
            tries += 1;
        }
        let first = self.reconcile(Utc::now(), true).await;
        self.publish(first).await;
        let every = self.config.enforcement.recheck_every;
        let mut next_check = tokio::time::Instant::now() + every;
        loop {
            let records = tokio::select! {
                // Inputs first: a command or a reading must not wait behind a slow re-check.
                biased;
                input = inputs.recv() => {
                    let Some(input) = input else { return };
                    let now = Utc::now();
                    let mut r = match input {
                        Input::Cloud { name, id, args, deadline, reply } => {
                            let result = if now >= deadline {
                                Err(format!("not applied: enforcement was busy until after {}; resend with a new id", deadline.to_rfc3339()))
                            } else {
                                self.apply_cloud_durably(&name, &id, &args, now).await
                            };
                            let answer = match result {
                                Ok(()) => {
                                    tracing::info!(command = %name, id = %id, "relay command applied");
                                    Ok(json!({"applied": name}))
                                }
                                Err(e) => {
                                    tracing::warn!(command = %name, id = %id, error = %e, "relay command rejected");
                                    Err(e)
                                }
                            };
                            if let Some(reply) = reply {
                                let _ = reply.send(answer);
                            }
                            Vec::new()
                        }
                        Input::Control { req, reply } => {
                            let before = self.rooms.clone();
                            let (mut v, writes) = self.control(req, now);
                            // Durable before it is answered; undone if it cannot be written.
                            if let Err(e) = self.store.transact(Vec::new(), writes, true).await {
                                self.rooms = before;
                                v = json!({"ok": false, "error": format!("not applied: cannot write the override: {e}")});
                            }
                            // Apply an override at once, then answer with the resulting state.
                            let r = self.reconcile(now, false).await;
                            let _ = reply.send(v);
                            self.publish(r).await;
                            Vec::new()
                        }
                        Input::Readings(batch) => {
                            let (records, writes) = self.apply_readings(&batch, now);
                            if let Err(e) = self.store.transact(records, writes, false).await {
                                tracing::error!(error = %e, "prepaid: this batch's state not written (kept in memory, written with the next one; its ledger rows are lost)");
                            }
                            Vec::new()
                        }
                    };
                    r.extend(self.reconcile(now, false).await);
                    r
                }
                _ = tokio::time::sleep_until(next_check) => {
                    // Notice hand-switched relays, retry stuck ones, apply time-based rules.
                    let mut r = self.read_all().await;
                    r.extend(self.reconcile(Utc::now(), true).await);
                    next_check = tokio::time::Instant::now() + every;
                    r
                }
                _ = shutdown.changed() => return,
            };
            self.publish(records).await;
        }
    }

    async fn publish(&self, records: Vec<NewRecord>) {
        if !records.is_empty() {
            let _ = self.store.append(records).await;
        }
    }
}

fn onoff(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

/// An audit record about one relay: never dropped from the outbox.
fn audit(event: &str, relay: &Relay, fields: Value) -> NewRecord {
    let mut v = json!({
        "event": event,
        "relay": relay.spec.name,
        "room": relay.spec.room,
        "kind": relay.spec.kind,
        "device": relay.device,
        "output": relay.output,
    });
    if let (Value::Object(m), Value::Object(f)) = (&mut v, fields) {
        m.extend(f);
    }
    NewRecord {
        kind: Kind::Audit,
        topic: "audit".into(),
        ts: Utc::now(),
        payload: v.to_string().into_bytes(),
    }
}

fn prepaid_event(room: &str, utility: Utility, e: &PrepaidEvent) -> NewRecord {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Value::String(name) = &v["event"] {
        v["event"] = json!(format!("prepaid_{name}"));
    }
    v["room"] = json!(room);
    v["utility"] = json!(utility);
    NewRecord {
        kind: Kind::Event,
        topic: "events".into(),
        ts: Utc::now(),
        payload: v.to_string().into_bytes(),
    }
}

/// An event about a prepaid account's counter (`counter_suspect`, `counter_rebased`).
fn counter_event(
    event: &str,
    acc: &super::config::PrepaidAccount,
    at: DateTime<Utc>,
    fields: Value,
) -> NewRecord {
    let mut v = json!({"event": event, "room": acc.room, "utility": acc.utility, "device": acc.device, "at": at.to_rfc3339()});
    if let (Value::Object(m), Value::Object(f)) = (&mut v, fields) {
        m.extend(f);
    }
    NewRecord {
        kind: Kind::Event,
        topic: "events".into(),
        ts: at,
        payload: v.to_string().into_bytes(),
    }
}

/// The numeric id of a group from /etc/group (for the control socket's owner).
pub fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|g| g.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prepaid_deductions_reach_the_ledger_while_the_store_thread_writes_telemetry() {
        // Before the fix the enforcer's transaction read first and then could not upgrade to a
        // write while the store thread committed: "database is locked", and the ledger lost rows.
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("outbox.db"));
        let store = crate::store::spawn(
            crate::store::Store::open(&cfg.store.path, cfg.store.caps).unwrap(),
        )
        .unwrap();
        let mut enf = Enforcer::open(cfg.clone(), HashMap::new(), store.clone()).unwrap();
        let t0 = Utc::now();
        enf.apply_cloud_durably(
            "set_balance",
            "b-1",
            &json!({"room": "104", "utility": "electricity", "balance": 100_000}),
            t0,
        )
        .await
        .unwrap();
        // Telemetry committed continuously by the store thread, as in the daemon.
        let writer = store.clone();
        let hammer = tokio::spawn(async move {
            for i in 0..4000 {
                let r = reading(t0 + chrono::Duration::milliseconds(i), 1.0);
                let _ = writer
                    .append(vec![crate::daemon::telemetry_record(&r)])
                    .await;
            }
        });
        // 2 kW polled every 10 s for 1,000 readings (about 2.8 h): 5.56 kWh.
        let mut wh = 1_234_560.0f64;
        for k in 0..1000 {
            wh += 2000.0 * 10.0 / 3600.0;
            let t = t0 + chrono::Duration::seconds(10 * (k + 1));
            let (records, writes) =
                enf.apply_readings(&vec![reading(t, (wh / 10.0).floor() / 100.0)], t);
            store.transact(records, writes, false).await.unwrap();
            tokio::task::yield_now().await;
        }
        hammer.await.unwrap();
        let balance = enf.rooms["104"].prepaid[&Utility::Electricity].balance;
        let conn = crate::store::open_read_only(&cfg.store.path).unwrap();
        let (usage, rows): (i64, i64) = conn
            .query_row(
                "SELECT coalesce(sum(amount), 0), count(*) FROM prepaid_ledger WHERE kind = 'usage'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(balance < 100_000, "something was deducted");
        assert_eq!(
            100_000 + usage,
            balance,
            "every deduction is in the ledger ({rows} rows)"
        );
        let billed: String = conn
            .query_row("SELECT state FROM prepaid_counters", [], |r| r.get(0))
            .unwrap();
        let st: CounterState = serde_json::from_str(&billed).unwrap();
        assert_eq!(
            st.billed_milli,
            crate::money::to_milli((wh / 10.0).floor() / 100.0)
        );
    }
}

#[cfg(test)]
mod counter_events {
    use super::super::test_support::*;
    use super::*;

    #[tokio::test]
    async fn a_zero_reading_after_a_meter_reboot_is_reported_once_and_not_billed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("outbox.db"));
        let store = crate::store::spawn(
            crate::store::Store::open(&cfg.store.path, cfg.store.caps).unwrap(),
        )
        .unwrap();
        let mut enf = Enforcer::open(cfg.clone(), HashMap::new(), store.clone()).unwrap();
        let t0 = Utc::now();
        enf.apply_cloud_durably(
            "set_balance",
            "b-1",
            &json!({"room": "104", "utility": "electricity", "balance": 10_000}),
            t0,
        )
        .await
        .unwrap();
        let mut events = Vec::new();
        for (k, kwh) in [(0, 5123.30), (1, 5123.31), (2, 0.0), (3, 0.0), (4, 5123.32)] {
            let t = t0 + chrono::Duration::seconds(10 * k);
            let (records, writes) = enf.apply_readings(&vec![reading(t, kwh)], t);
            store
                .transact(records.clone(), writes, false)
                .await
                .unwrap();
            events.extend(records);
        }
        // 0.02 kWh × 0.8523 = 1.7 fen: 1 fen deducted, 0.7 carried; the zeros billed nothing.
        assert_eq!(
            enf.rooms["104"].prepaid[&Utility::Electricity].balance,
            9_999
        );
        let payloads: Vec<Value> = events
            .iter()
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect();
        assert_eq!(payloads.len(), 1, "one event for the episode: {payloads:?}");
        assert_eq!(payloads[0]["event"], "counter_suspect");
        assert_eq!(
            (
                payloads[0]["billed"].as_f64(),
                payloads[0]["reading"].as_f64()
            ),
            (Some(5123.31), Some(0.0))
        );
        let mut rec = payloads[0].clone();
        rec["seq"] = json!(1);
        let schema_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/schemas/events.schema.json");
        let schema: Value =
            serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        compiler.enable_format_assertions();
        compiler.add_resource("events.schema.json", schema).unwrap();
        let idx = compiler
            .compile("events.schema.json", &mut schemas)
            .unwrap();
        let batch = json!({"gateway": "gw", "seq_first": 1, "seq_last": 1, "records": [rec]});
        if let Err(e) = schemas.validate(&batch, idx) {
            panic!("{e:#}");
        }
    }
}

#[cfg(test)]
mod command_replies {
    use super::super::test_support::config;
    use super::*;
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
    }

    fn signed(name: &str, id: &str, mut args: Value) -> Value {
        args["expires_at"] = json!((Utc::now() + chrono::Duration::minutes(5)).to_rfc3339());
        let sig = key().sign(&super::super::auth::signed_content(name, id, &args));
        args["sig"] = json!(base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()));
        args
    }

    fn now(a: Option<Answer>) -> Result<Value, String> {
        match a {
            Some(Answer::Now(r)) => r,
            other => panic!("expected an immediate answer, got {other:?}"),
        }
    }

    #[test]
    fn a_signed_freeze_for_an_unknown_room_is_answered_refused_not_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let handler = EnforcementCommands {
            key: Some(key().verifying_key()),
            config: config(&dir.path().join("outbox.db")),
            seen: Arc::default(),
            tx,
        };
        let r = now(handler.handle(
            "f-1",
            "freeze",
            &signed("freeze", "f-1", json!({"room": "999", "scope": "access"})),
        ));
        assert!(r.unwrap_err().contains("unknown room \"999\""));
        let r = now(handler.handle(
            "t-1",
            "top_up",
            &signed(
                "top_up",
                "t-1",
                json!({"room": "104", "utility": "electricity", "amount": 12.5}),
            ),
        ));
        assert!(r.unwrap_err().contains("integer in minor units"));
        assert!(
            rx.try_recv().is_err(),
            "nothing refused reaches the enforcer"
        );
        let r = handler.handle(
            "f-2",
            "freeze",
            &signed("freeze", "f-2", json!({"room": "104", "scope": "access"})),
        );
        assert!(matches!(r, Some(Answer::Later(_))), "{r:?}");
        assert!(matches!(rx.try_recv(), Ok(Input::Cloud { .. })));
    }

    /// An acknowledged unfreeze is on disk before its answer: a crash right after the answer (the
    /// process gone without a shutdown) finds it on restart. Written by the store's one writer, in
    /// one transaction with its audit trail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answered_unfreeze_is_on_disk_when_the_gateway_dies_right_after() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("outbox.db"));
        let store = crate::store::spawn(
            crate::store::Store::open(&cfg.store.path, cfg.store.caps).unwrap(),
        )
        .unwrap();
        let mut enf = Enforcer::open(cfg.clone(), HashMap::new(), store.clone()).unwrap();
        let now = Utc::now();
        let freeze = signed("freeze", "f-1", json!({"room": "104", "scope": "access"}));
        enf.apply_cloud_durably("freeze", "f-1", &freeze, now)
            .await
            .unwrap();
        assert!(enf.rooms["104"].access_freeze.is_some());
        let unfreeze = signed("unfreeze", "u-1", json!({"room": "104", "scope": "access"}));
        enf.apply_cloud_durably("unfreeze", "u-1", &unfreeze, now)
            .await
            .unwrap();
        // No shutdown, no flush: what was answered must already be there.
        let reopened = Enforcer::open(cfg.clone(), HashMap::new(), store.clone()).unwrap();
        assert!(reopened.rooms["104"].access_freeze.is_none());
        let seen = load_seen(&cfg.store.path).unwrap();
        assert!(seen.contains("f-1") && seen.contains("u-1"));
    }

    /// Before the fix a top-up in the lease's quiet period was answered `accepted` and only an audit
    /// record said it was refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_top_up_in_the_lease_quiet_period_is_answered_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("outbox.db"));
        let store = crate::store::spawn(
            crate::store::Store::open(&cfg.store.path, cfg.store.caps).unwrap(),
        )
        .unwrap();
        let enf = Enforcer::open(cfg.clone(), HashMap::new(), store).unwrap();
        let (tx, rx) = mpsc::channel(8);
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(enf.run(rx, shutdown));
        let handler = EnforcementCommands {
            key: Some(key().verifying_key()),
            config: cfg.clone(),
            seen: Arc::default(),
            tx,
        };
        let later = |a: Option<Answer>| async move {
            match a {
                Some(Answer::Later(rx)) => tokio::time::timeout(Duration::from_secs(10), rx)
                    .await
                    .expect("answered")
                    .expect("enforcer alive"),
                other => panic!("expected a deferred answer, got {other:?}"),
            }
        };
        // The lease ends in 3 days, not renewed: inside the 7-day notice.
        let end = (Utc::now()
            .with_timezone(&chrono_tz::Asia::Shanghai)
            .date_naive()
            + chrono::Duration::days(3))
        .to_string();
        let r = later(handler.handle(
            "l-1",
            "set_lease",
            &signed("set_lease", "l-1", json!({"room": "104", "lease_end": end})),
        ))
        .await;
        assert_eq!(r, Ok(json!({"applied": "set_lease"})));
        let r = later(handler.handle(
            "t-1",
            "top_up",
            &signed(
                "top_up",
                "t-1",
                json!({"room": "104", "utility": "electricity", "amount": 5000}),
            ),
        ))
        .await;
        let e = r.unwrap_err();
        assert!(e.contains("top-up suspended"), "{e}");
        task.abort();
    }
}
