//! The enforcer's decisions as a state machine: [`EnforcerState::step`] takes `now` and an event
//! (a cloud command, readings, a local request, the outcome of a relay read or switch, the
//! re-check timer) and returns actions (persist these writes with these records, read or switch
//! this relay, answer). It does no I/O; the task in [`super::task`] executes the actions and feeds
//! their outcomes back, so every decision is testable without a bus, a store or a clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use serde_json::{json, Value};

use super::command::{self, CloudCommand};
use super::config::{Relay, Setup};
use super::ledger;
use super::prepaid::{self, CounterState, PrepaidEvent, Step};
use super::rules::{self, Desired, Override, Prepaid, RoomRules};
use super::task::ControlRequest;
use crate::modbus::bus::{ActuateError, Batch, RelayState};
use crate::reading::Quality;
use crate::store::{Kind, NewRecord, Write};
use crate::topology::Utility;

/// Counter samples inside a prepaid interval, by `device/quantity` (see
/// [`EnforcerState::history_needed`]).
pub(crate) type History = HashMap<String, Vec<(DateTime<Utc>, i64)>>;

/// History the state needs to bill a batch: samples of `device`/`quantity` in `(from, to)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HistoryQuery {
    pub key: String,
    pub device: String,
    pub quantity: &'static str,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// What happened.
#[derive(Debug)]
pub(crate) enum Event {
    /// A cloud command that passed authentication and validation.
    Cloud {
        name: String,
        id: String,
        args: Value,
    },
    /// Readings, with the history [`EnforcerState::history_needed`] asked for.
    Readings { batch: Batch, history: History },
    /// A request from the local control socket.
    Control(ControlRequest),
    /// A relay's state was read (or could not be).
    Read {
        relay: String,
        result: Result<RelayState, ActuateError>,
    },
    /// Attempt `attempt` of `of` to switch `relay` to `want` ended.
    Switched {
        relay: String,
        want: bool,
        attempt: u32,
        of: u32,
        result: Result<RelayState, ActuateError>,
    },
    /// Bring the relays to their desired state; `retry_failed` on the re-check timer.
    Reconcile { retry_failed: bool },
}

/// What to do, in order.
pub(crate) enum Action {
    /// Write `writes` and append `records` in one transaction (`durable`: synchronous=FULL, and
    /// the change must be undone if the write fails).
    Persist {
        records: Vec<NewRecord>,
        writes: Vec<Write>,
        durable: bool,
    },
    /// Append records (audit trail) to the outbox.
    Publish(Vec<NewRecord>),
    /// Read `relay` and report [`Event::Read`].
    Read { relay: String },
    /// After `after`, switch `relay` to `want` (attempt `attempt` of `of`) and report
    /// [`Event::Switched`].
    Switch {
        relay: String,
        want: bool,
        attempt: u32,
        of: u32,
        after: Duration,
    },
    /// The answer to the cloud command of this step.
    Answer(crate::uplink::Reply),
    /// The answer to the control request of this step.
    ControlAnswer(Value),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Persist {
                records,
                writes,
                durable,
            } => write!(
                f,
                "Persist({} records, {} writes, durable {durable})",
                records.len(),
                writes.len()
            ),
            Action::Publish(r) => write!(f, "Publish({} records)", r.len()),
            Action::Read { relay } => write!(f, "Read({relay})"),
            Action::Switch {
                relay,
                want,
                attempt,
                of,
                after,
            } => write!(
                f,
                "Switch({relay} → {want}, {attempt}/{of}, after {after:?})"
            ),
            Action::Answer(a) => write!(f, "Answer({a:?})"),
            Action::ControlAnswer(v) => write!(f, "ControlAnswer({v})"),
        }
    }
}

/// A switch that did not move: three attempts for a fresh decision, one per re-check for a relay
/// already known to be stuck, 300 ms apart.
const FRESH_ATTEMPTS: u32 = 3;
const RETRY_SPACING: Duration = Duration::from_millis(300);

/// Everything the enforcer knows: rules, balances, counters, relay states.
pub(crate) struct EnforcerState {
    pub(crate) config: Arc<Setup>,
    pub(crate) rooms: BTreeMap<String, RoomRules>,
    /// Prepaid counters: billed value, carried fraction, suspect reading (by `device/quantity`).
    pub(crate) counters: HashMap<String, CounterState>,
    /// Read-back state per relay; absent until read.
    pub(crate) actual: BTreeMap<String, bool>,
    decided: BTreeMap<String, Desired>,
    /// The fire alarm input: `None` until read (fail-open doors are then left as they are);
    /// starts as active when it was active at the last stop (persisted).
    pub(crate) fire: Option<bool>,
    /// (relay, rule) pairs already reported as deferred or life-critical alarms.
    notified: HashSet<(String, String)>,
    /// Relays whose last switch failed, with the state they were asked for: retried on the re-check
    /// timer only, so one jammed relay does not slow every other decision.
    failed: HashMap<String, bool>,
}

/// The part of the state a failed durable write rolls back.
pub(crate) struct Snapshot {
    rooms: BTreeMap<String, RoomRules>,
    counters: HashMap<String, CounterState>,
}

impl EnforcerState {
    /// The state loaded at start.
    pub(crate) fn new(
        config: Arc<Setup>,
        rooms: BTreeMap<String, RoomRules>,
        counters: HashMap<String, CounterState>,
        fire: Option<bool>,
    ) -> EnforcerState {
        EnforcerState {
            config,
            rooms,
            counters,
            actual: BTreeMap::new(),
            decided: BTreeMap::new(),
            fire,
            notified: HashSet::new(),
            failed: HashMap::new(),
        }
    }

    /// What a failed durable write restores.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            rooms: self.rooms.clone(),
            counters: self.counters.clone(),
        }
    }

    /// Undoes what happened since `s` was taken.
    pub(crate) fn restore(&mut self, s: Snapshot) {
        self.rooms = s.rooms;
        self.counters = s.counters;
    }

    /// Relays whose state is not known yet.
    pub(crate) fn unknown_relays(&self) -> Vec<String> {
        self.relays()
            .iter()
            .filter(|r| !self.actual.contains_key(&r.spec.name))
            .map(|r| r.spec.name.clone())
            .collect()
    }

    /// Every relay, for a read-back round.
    pub(crate) fn all_relays(&self) -> Vec<String> {
        self.relays().iter().map(|r| r.spec.name.clone()).collect()
    }

    /// The relay named `name`.
    pub(crate) fn relay(&self, name: &str) -> Option<&Relay> {
        self.relays().iter().find(|r| r.spec.name == name)
    }

    /// One step: applies `event` at `now` and returns what to do, in order.
    pub(crate) fn step(&mut self, now: DateTime<Utc>, event: Event) -> Vec<Action> {
        match event {
            Event::Cloud { name, id, args } => {
                let (result, writes) = self.apply_cloud(&name, &id, &args, now);
                let records = match &result {
                    Ok(events) => events.clone(),
                    Err(e) => vec![NewRecord {
                        kind: Kind::Audit,
                        topic: "audit".into(),
                        ts: now,
                        payload: json!({"event": "command_rejected", "command": name, "id": id, "error": e})
                            .to_string()
                            .into_bytes(),
                    }],
                };
                let mut out = vec![
                    Action::Persist {
                        records,
                        writes,
                        durable: true,
                    },
                    Action::Answer(result.map(|_| json!({"applied": name}))),
                ];
                out.extend(self.reconcile(now, false));
                out
            }
            Event::Readings { batch, history } => {
                let (records, writes) = self.apply_readings(&batch, &history, now);
                let mut out = vec![Action::Persist {
                    records,
                    writes,
                    durable: false,
                }];
                out.extend(self.reconcile(now, false));
                out
            }
            Event::Control(req) => {
                let (v, writes) = self.control(req, now);
                let mut out = vec![Action::Persist {
                    records: Vec::new(),
                    writes,
                    durable: true,
                }];
                // An override applies at once; the answer comes after the switches.
                out.extend(self.reconcile(now, false));
                out.push(Action::ControlAnswer(v));
                out
            }
            Event::Read { relay, result } => self.read(&relay, result, now),
            Event::Switched {
                relay,
                want,
                attempt,
                of,
                result,
            } => self.switched(&relay, want, attempt, of, result, now),
            Event::Reconcile { retry_failed } => self.reconcile(now, retry_failed),
        }
    }

    /// The history samples needed to bill `batch` exactly: for a prepaid counter with time-of-use
    /// bands, the samples between its last billed reading and this one, when they are over a minute
    /// apart (a band change may lie between).
    pub(crate) fn history_needed(&self, batch: &Batch) -> Vec<HistoryQuery> {
        let mut out = Vec::new();
        for acc in &self.config.enforcement.prepaid {
            if !acc.prices.has_bands() {
                continue;
            }
            let quantity = acc.utility.quantity();
            let Some(r) = batch.iter().find(|r| {
                *r.device == *acc.device && r.quantity == quantity && r.quality == Quality::Good
            }) else {
                continue;
            };
            let key = format!("{}/{}", acc.device, quantity);
            if let Some(st) = self.counters.get(&key) {
                if r.ts - st.billed_at > chrono::Duration::minutes(1) {
                    out.push(HistoryQuery {
                        key,
                        device: acc.device.clone(),
                        quantity: quantity.as_str(),
                        from_ms: st.billed_at.timestamp_millis() + 1,
                        to_ms: r.ts.timestamp_millis() - 1,
                    });
                }
            }
        }
        out
    }

    /// A relay's state was read: remember it, and report a change made behind meterd's back.
    fn read(
        &mut self,
        relay: &str,
        result: Result<RelayState, ActuateError>,
        now: DateTime<Utc>,
    ) -> Vec<Action> {
        let Some(r) = self.relay(relay).cloned() else {
            return Vec::new();
        };
        match result {
            Ok(s) => {
                if let Some(prev) = self.actual.insert(relay.to_string(), s.after) {
                    if prev != s.after {
                        tracing::warn!(
                            relay,
                            from = prev,
                            to = s.after,
                            "relay changed outside meterd"
                        );
                        return vec![Action::Publish(vec![audit(
                            "relay_changed_externally",
                            &r,
                            now,
                            json!({"from": onoff(prev), "to": onoff(s.after)}),
                        )])];
                    }
                }
            }
            Err(e) => tracing::warn!(relay, error = %e, "cannot read relay state"),
        }
        Vec::new()
    }

    /// Decides every relay's desired state; relays whose known state differs get a switch. A relay
    /// that failed to switch to the same state before is retried only when `retry_failed` (the
    /// re-check timer).
    fn reconcile(&mut self, now: DateTime<Utc>, retry_failed: bool) -> Vec<Action> {
        // A lease entering its quiet period: the red alert, durable, before anything is switched.
        let mut alerts = Vec::new();
        let policy = self.config.enforcement.policy.clone();
        let quiet: Vec<(String, rules::Quiet)> = self
            .rooms
            .iter()
            .filter_map(|(id, r)| {
                rules::quiet_period(r, &policy)
                    .filter(|q| now >= q.since && r.quiet_alerted != Some(q.since))
                    .map(|q| (id.clone(), q))
            })
            .collect();
        for (room, q) in quiet {
            let Ok(r) = self.room_mut(&room) else {
                continue;
            };
            r.quiet_alerted = Some(q.since);
            let payload = json!({
                "event": "lease_quiet_period",
                "room": room,
                "lease_end": r.lease_end,
                "last_activity": r.lease_activity,
                "notice_days": q.notice_days,
                "quiet_since": q.since.to_rfc3339(),
                "freeze_at": q.freeze_at.to_rfc3339(),
                "ts": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            });
            tracing::warn!(room = %room, freeze_at = %q.freeze_at, "lease quiet period: door access will be frozen");
            alerts.push(Action::Persist {
                records: vec![NewRecord {
                    kind: Kind::Event,
                    topic: "events".into(),
                    ts: now,
                    payload: payload.to_string().into_bytes(),
                }],
                writes: self.room_write(&room).into_iter().collect(),
                durable: true,
            });
        }
        let specs: Vec<_> = self.relays().iter().map(|r| r.spec.clone()).collect();
        let desired = rules::decide(
            &specs,
            &self.rooms,
            self.fire,
            &self.actual,
            &self.config.enforcement.policy,
            now,
        );
        let mut audits = Vec::new();
        let mut switches = Vec::new();
        for d in desired {
            let Some(relay) = self.relay(&d.relay).cloned() else {
                continue;
            };
            if matches!(d.rule.as_str(), "deferred" | "life_critical")
                && self.notified.insert((d.relay.clone(), d.rule.clone()))
            {
                let event = if d.rule == "deferred" {
                    "cutoff_deferred"
                } else {
                    "life_critical_alarm"
                };
                audits.push(audit(event, &relay, now, json!({"reason": d.reason})));
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
            switches.push(Action::Switch {
                relay: d.relay.clone(),
                want: d.on,
                attempt: 1,
                of: if known_bad { 1 } else { FRESH_ATTEMPTS },
                after: Duration::ZERO,
            });
        }
        let mut out = alerts;
        if !audits.is_empty() {
            out.push(Action::Publish(audits));
        }
        out.extend(switches);
        out
    }

    /// An attempt to switch a relay ended: confirmed, another attempt, or given up (audited).
    fn switched(
        &mut self,
        relay: &str,
        want: bool,
        attempt: u32,
        of: u32,
        result: Result<RelayState, ActuateError>,
        now: DateTime<Utc>,
    ) -> Vec<Action> {
        let Some(r) = self.relay(relay).cloned() else {
            return Vec::new();
        };
        let from = self.actual.get(relay).copied().unwrap_or(!want);
        let (rule, reason) = self
            .decided
            .get(relay)
            .map(|d| (d.rule.clone(), d.reason.clone()))
            .unwrap_or_default();
        match result {
            Ok(s) if s.after == want => {
                self.actual.insert(relay.to_string(), s.after);
                self.failed.remove(relay);
                vec![Action::Publish(vec![audit(
                    "relay_switched",
                    &r,
                    now,
                    json!({"from": onoff(from), "to": onoff(want), "rule": rule, "reason": reason, "readback": onoff(s.after), "confirmed": true, "attempts": attempt}),
                )])]
            }
            // A device that refused with an exception says the same again: no more attempts.
            Err(e) if attempt < of && !e.device_answered() => vec![Action::Switch {
                relay: relay.to_string(),
                want,
                attempt: attempt + 1,
                of,
                after: RETRY_SPACING,
            }],
            Ok(_) if attempt < of => vec![Action::Switch {
                relay: relay.to_string(),
                want,
                attempt: attempt + 1,
                of,
                after: RETRY_SPACING,
            }],
            Ok(s) => {
                self.failed.insert(relay.to_string(), want);
                tracing::error!(
                    relay,
                    wanted = want,
                    readback = s.after,
                    "relay did not switch"
                );
                self.actual.insert(relay.to_string(), s.after);
                vec![Action::Publish(vec![audit(
                    "relay_mismatch",
                    &r,
                    now,
                    json!({"from": onoff(from), "to": onoff(want), "rule": rule, "reason": reason, "readback": onoff(s.after), "confirmed": false, "attempts": attempt}),
                )])]
            }
            Err(e) => {
                self.failed.insert(relay.to_string(), want);
                tracing::error!(relay, error = %e, "relay write failed");
                vec![Action::Publish(vec![audit(
                    "relay_error",
                    &r,
                    now,
                    json!({"from": onoff(from), "to": onoff(want), "rule": rule, "reason": reason, "error": e.to_string(), "error_kind": e.kind(), "attempts": attempt}),
                )])]
            }
        }
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

    fn room_mut(&mut self, room: &str) -> Result<&mut RoomRules, String> {
        if !self.config.site.rooms.contains_key(room) {
            return Err(format!("unknown room {room:?}"));
        }
        Ok(self.rooms.entry(room.to_string()).or_default())
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
            .map_or(0, |e| e.timestamp_millis());
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
                    r.access_freeze.clone_from(&set);
                }
                if scope.utilities() {
                    r.utility_freeze = set;
                }
            }
            CloudCommand::SetLease {
                end,
                renewed,
                notice_days,
                ..
            } => {
                let r = self.room_mut(&room)?;
                r.lease_end = end;
                r.lease_renewed = renewed;
                r.lease_notice_days = notice_days;
            }
            CloudCommand::LeaseActivity { at, .. } => {
                let r = self.room_mut(&room)?;
                r.lease_activity = Some(r.lease_activity.map_or(at, |a| a.max(at)));
            }
            CloudCommand::SetLifeCritical { on, .. } => {
                self.room_mut(&room)?.life_critical = on;
            }
            CloudCommand::SetBalance { utility: u, .. }
            | CloudCommand::TopUp { utility: u, .. } => {
                let top_up = matches!(cmd, CloudCommand::TopUp { .. });
                let policy = &self.config.enforcement.policy;
                if let Some(r) = self.rooms.get(&room).filter(|_| top_up) {
                    if let Some(q) = rules::quiet_period(r, policy).filter(|q| now >= q.since) {
                        let end = r.lease_end.unwrap_or_default();
                        return Err(format!("top-up suspended: the lease of room {room} ends {end} without renewal and is in its quiet period since {}", q.since.to_rfc3339()));
                    }
                }
                if let CloudCommand::TopUp { amount, .. } = cmd {
                    let now_held = self
                        .rooms
                        .get(&room)
                        .and_then(|r| r.prepaid.get(&u))
                        .map_or(0, |p| p.balance);
                    if now_held + amount > prepaid::MAX_BALANCE {
                        return Err(format!("top-up refused, nothing changed: {amount} fen on a balance of {now_held} would be above the most an account holds ({} fen)", prepaid::MAX_BALANCE));
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
                events.extend(ev.into_iter().map(|e| prepaid_event(&room, u, &e, now)));
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
    /// writes that persist the new state, for one transaction. `history` holds the counter samples
    /// asked for by [`EnforcerState::history_needed`].
    fn apply_readings(
        &mut self,
        batch: &Batch,
        history: &History,
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
        let tz = self.config.timezone;
        let interval_ms = (self.config.history_every.as_millis() as i64).max(1);
        // Counter, balance and ledger move together in one transaction (with the events), run by
        // the store's writer, so a restart or a power cut neither loses nor repeats consumption.
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
                    if acc.prices.has_bands()
                        && r.ts - st.billed_at > chrono::Duration::minutes(1) =>
                {
                    history.get(&key).cloned().unwrap_or_default()
                }
                _ => Vec::new(),
            };
            let step = prepaid::meter(
                &mut state,
                r.ts,
                milli,
                &acc.prices,
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
                            // Never before the piece's month start: a row belongs to one
                            // month's statement (pieces are cut there).
                            let interval = (c
                                .piece
                                .from
                                .timestamp_millis()
                                .div_euclid(interval_ms)
                                * interval_ms)
                                .max(crate::tou::month_start(c.piece.from, tz).timestamp_millis());
                            let (room, utility, after) = (acc.room.clone(), acc.utility, balance);
                            writes.push(Box::new(move |tx: &Connection| {
                                ledger::add_usage(tx, &room, utility, interval, &c, after)
                            }));
                        }
                        let ev = prepaid::deduct(p, total, low, now);
                        out.extend(
                            ev.into_iter()
                                .map(|e| prepaid_event(&acc.room, acc.utility, &e, now)),
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
                    acc.device.clone(),
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
            ControlRequest::State { room } => {
                let rooms: serde_json::Map<String, Value> = self
                    .config
                    .site
                    .rooms
                    .keys()
                    .filter(|r| room.as_ref().is_none_or(|want| want == *r))
                    .map(|r| {
                        let rules = self.rooms.get(r).cloned().unwrap_or_default();
                        let relays: Vec<Value> = self
                            .relays()
                            .iter()
                            .filter(|x| &x.spec.room == r)
                            .map(|x| {
                                let d = self.decided.get(&x.spec.name);
                                json!({
                                    "relay": x.spec.name, "kind": x.spec.kind,
                                    "desired": d.map(|d| onoff(d.on)),
                                    "actual": self.actual.get(&x.spec.name).map(|a| onoff(*a)),
                                    "rule": d.map(|d| d.rule.clone()), "reason": d.map(|d| d.reason.clone()),
                                })
                            })
                            .collect();
                        let mut v = serde_json::to_value(&rules).unwrap_or(Value::Null);
                        v["relays"] = json!(relays);
                        (r.clone(), v)
                    })
                    .collect();
                json!({"ok": true, "ts": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "fire_alarm": self.fire, "rooms": rooms})
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
}

fn onoff(v: bool) -> &'static str {
    if v {
        "on"
    } else {
        "off"
    }
}

/// An audit record about one relay: never dropped from the outbox.
fn audit(event: &str, relay: &Relay, now: DateTime<Utc>, fields: Value) -> NewRecord {
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
        ts: now,
        payload: v.to_string().into_bytes(),
    }
}

fn prepaid_event(room: &str, utility: Utility, e: &PrepaidEvent, now: DateTime<Utc>) -> NewRecord {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Value::String(name) = &v["event"] {
        v["event"] = json!(format!("prepaid_{name}"));
    }
    v["room"] = json!(room);
    v["utility"] = json!(utility);
    NewRecord {
        kind: Kind::Event,
        topic: "events".into(),
        ts: now,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::profile::Quantity;
    use crate::reading::RawWords;

    /// Room 101 with a fail-open door, room 104 with a prepaid supply; the fire alarm on input 8.
    fn config() -> Arc<Setup> {
        let text = r#"
[gateway]
id = "gw"
site = "t"
timezone = "Asia/Shanghai"
[enforcement]
allowed_from = "00:00"
allowed_to = "23:59"
weekends = true
grace = "0s"
fire_alarm = { device = "doors", register = "input8", active = 1 }
[[bus]]
name = "lan"
kind = "tcp"
host = "127.0.0.1"
[[device]]
name = "doors"
bus = "lan"
unit = 10
profile = "relay_waveshare_8ch"
[[device]]
name = "meter104"
bus = "lan"
unit = 4
profile = "hiking_dds238_zn"
[[room]]
id = "101"
[[room]]
id = "104"
[[tariff]]
name = "elec"
utility = "electricity"
price = "0.8523"
rooms = ["104"]
[[relay]]
name = "101-door"
room = "101"
kind = "door"
device = "doors"
output = "relay1"
fail_open = true
[[relay]]
name = "104-power"
room = "104"
kind = "supply"
utility = "electricity"
device = "meter104"
output = "relay"
[[prepaid]]
room = "104"
utility = "electricity"
meter = "meter104"
tariff = "elec"
"#;
        let config = crate::config::Config::from_str_at(text, "t.toml", std::path::Path::new("/"));
        Arc::new(config.unwrap().enforcer_setup())
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-30T02:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn state(fire: Option<bool>) -> EnforcerState {
        let mut st = EnforcerState::new(config(), BTreeMap::new(), HashMap::new(), fire);
        // Room 101 frozen (access) by the cloud.
        st.rooms.entry("101".into()).or_default().access_freeze = Some(rules::Freeze {
            reason: "arrears".into(),
            effective: now() - chrono::Duration::hours(1),
            by: "f-0".into(),
        });
        st
    }

    fn read(st: &mut EnforcerState, relay: &str, on: bool) {
        let ok = RelayState {
            before: on,
            after: on,
            wrote: false,
        };
        st.step(
            now(),
            Event::Read {
                relay: relay.into(),
                result: Ok(ok),
            },
        );
    }

    fn switches(actions: &[Action]) -> Vec<(String, bool, u32, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Switch {
                    relay,
                    want,
                    attempt,
                    of,
                    ..
                } => Some((relay.clone(), *want, *attempt, *of)),
                _ => None,
            })
            .collect()
    }

    fn audits(actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish(r) => Some(r.clone()),
                _ => None,
            })
            .flatten()
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect()
    }

    fn fire_input(on: bool) -> Batch {
        vec![crate::reading::Reading {
            device: "doors".into(),
            register: "input8".into(),
            quantity: Quantity::DigitalInput,
            value: Some(if on { 1.0 } else { 0.0 }),
            unit: "".into(),
            ts: now(),
            quality: Quality::Good,
            raw: RawWords::new(&[u16::from(on)]),
            error: None,
        }]
    }

    #[test]
    fn after_a_restart_during_a_fire_alarm_a_frozen_rooms_fail_open_door_is_not_locked() {
        // Restarted: the alarm state is unknown, the door was found open (the alarm opened it).
        let mut st = state(None);
        read(&mut st, "101-door", true);
        read(&mut st, "104-power", true);
        let a = st.step(now(), Event::Reconcile { retry_failed: true });
        assert!(
            !switches(&a).iter().any(|s| s.0 == "101-door"),
            "no door write while the alarm is unknown: {a:?}"
        );
        // The input reads active: still open. It clears: the freeze locks the door.
        let a = st.step(
            now(),
            Event::Readings {
                batch: fire_input(true),
                history: History::new(),
            },
        );
        assert!(switches(&a).is_empty(), "{a:?}");
        let a = st.step(
            now(),
            Event::Readings {
                batch: fire_input(false),
                history: History::new(),
            },
        );
        assert_eq!(switches(&a), vec![("101-door".into(), false, 1, 3)]);
    }

    #[test]
    fn a_silent_relay_is_tried_three_times_a_refusing_one_once_and_each_outcome_is_audited() {
        let mut st = state(Some(false));
        read(&mut st, "101-door", true);
        read(&mut st, "104-power", true);
        let a = st.step(
            now(),
            Event::Reconcile {
                retry_failed: false,
            },
        );
        assert_eq!(switches(&a), vec![("101-door".into(), false, 1, 3)]);
        let timeout = || ActuateError::Link {
            device: "doors".into(),
            output: "relay1".into(),
            stage: "write",
            source: crate::modbus::link::LinkError::Timeout {
                unit: 10,
                timeout: Duration::from_millis(500),
            },
        };
        let switched = |st: &mut EnforcerState, attempt, result| {
            st.step(
                now(),
                Event::Switched {
                    relay: "101-door".into(),
                    want: false,
                    attempt,
                    of: 3,
                    result,
                },
            )
        };
        let a = switched(&mut st, 1, Err(timeout()));
        assert!(
            matches!(&a[..], [Action::Switch { attempt: 2, after, .. }] if *after == RETRY_SPACING)
        );
        let a = switched(&mut st, 2, Err(timeout()));
        assert_eq!(switches(&a), vec![("101-door".into(), false, 3, 3)]);
        let a = switched(&mut st, 3, Err(timeout()));
        let audit = &audits(&a)[0];
        assert_eq!(
            (
                audit["event"].clone(),
                audit["error_kind"].clone(),
                audit["attempts"].clone()
            ),
            (json!("relay_error"), json!("timeout"), json!(3))
        );
        // Known stuck: not retried on the next input, once on the re-check.
        assert!(switches(&st.step(
            now(),
            Event::Reconcile {
                retry_failed: false
            }
        ))
        .is_empty());
        let a = st.step(now(), Event::Reconcile { retry_failed: true });
        assert_eq!(switches(&a), vec![("101-door".into(), false, 1, 1)]);
        // A board that answers "illegal address" is not asked again.
        let refused = Err(ActuateError::Link {
            device: "doors".into(),
            output: "relay1".into(),
            stage: "write",
            source: crate::modbus::link::LinkError::Exception { unit: 10, code: 2 },
        });
        let mut st = state(Some(false));
        read(&mut st, "101-door", true);
        st.step(
            now(),
            Event::Reconcile {
                retry_failed: false,
            },
        );
        let a = switched(&mut st, 1, refused);
        assert_eq!(audits(&a)[0]["error_kind"], "exception");
        assert!(switches(&a).is_empty());
        // Confirmed by read-back.
        let mut st = state(Some(false));
        read(&mut st, "101-door", true);
        st.step(
            now(),
            Event::Reconcile {
                retry_failed: false,
            },
        );
        let ok = Ok(RelayState {
            before: true,
            after: false,
            wrote: true,
        });
        let a = switched(&mut st, 1, ok);
        let audit = &audits(&a)[0];
        assert_eq!(
            (audit["event"].clone(), audit["confirmed"].clone()),
            (json!("relay_switched"), json!(true))
        );
        assert!(!st.actual["101-door"]);
    }

    #[test]
    fn an_unfreeze_is_persisted_durably_before_it_is_answered_and_then_switches() {
        let mut st = state(Some(false));
        read(&mut st, "101-door", false);
        let a = st.step(
            now(),
            Event::Cloud {
                name: "unfreeze".into(),
                id: "u-1".into(),
                args: json!({"room": "101", "scope": "access"}),
            },
        );
        assert!(
            matches!(&a[0], Action::Persist { durable: true, writes, .. } if writes.len() == 2)
        );
        assert!(matches!(&a[1], Action::Answer(Ok(v)) if v == &json!({"applied": "unfreeze"})));
        assert_eq!(switches(&a[2..]), vec![("101-door".into(), true, 1, 3)]);
        // Refused by the room's state: answered so, only the command id is written.
        let a = st.step(
            now(),
            Event::Cloud {
                name: "freeze".into(),
                id: "f-9".into(),
                args: json!({"room": "999", "scope": "access"}),
            },
        );
        assert!(
            matches!(&a[0], Action::Persist { durable: true, writes, .. } if writes.len() == 1)
        );
        assert!(matches!(&a[1], Action::Answer(Err(e)) if e.contains("999")));
    }

    #[test]
    fn a_lease_quiet_period_is_alerted_durably_before_the_door_freezes_a_grace_later_and_activity_holds_it_off(
    ) {
        let mut setup = (*config()).clone();
        setup.enforcement.policy.grace = chrono::Duration::hours(48);
        setup.enforcement.policy.lease_notice_days = 7;
        let mut st = EnforcerState::new(
            Arc::new(setup),
            BTreeMap::new(),
            HashMap::new(),
            Some(false),
        );
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        // Room 101's lease ends on 31 December (Shanghai), not renewed; its door is on.
        st.rooms.entry("101".into()).or_default().lease_end =
            chrono::NaiveDate::from_ymd_opt(2026, 12, 31);
        read(&mut st, "101-door", true);
        let reconcile = |st: &mut EnforcerState, at: &str| {
            st.step(
                t(at),
                Event::Reconcile {
                    retry_failed: false,
                },
            )
        };
        let alerts = |a: &[Action]| -> Vec<Value> {
            a.iter()
                .filter_map(|a| match a {
                    Action::Persist {
                        records,
                        durable: true,
                        ..
                    } => Some(records.clone()),
                    _ => None,
                })
                .flatten()
                .map(|r| serde_json::from_slice::<Value>(&r.payload).unwrap())
                .filter(|v| v["event"] == "lease_quiet_period")
                .collect()
        };
        // 7 days before the last day starts, 24 December 00:00 Shanghai = 23 December 16:00 UTC.
        let a = reconcile(&mut st, "2026-12-23T15:59:00Z");
        assert!(alerts(&a).is_empty() && switches(&a).is_empty());
        let a = reconcile(&mut st, "2026-12-23T16:00:00Z");
        let alert = alerts(&a);
        assert_eq!(alert.len(), 1, "the red alert");
        assert!(
            matches!(&a[0], Action::Persist { durable: true, .. }),
            "first, and durable"
        );
        assert_eq!(alert[0]["room"], "101");
        assert_eq!(alert[0]["quiet_since"], "2026-12-23T16:00:00+00:00");
        assert_eq!(
            alert[0]["freeze_at"], "2026-12-25T16:00:00+00:00",
            "the grace later"
        );
        crate::enforce::test_support::validate_record("events.schema.json", alert[0].clone());
        assert!(
            switches(&a).is_empty(),
            "nothing is switched with the alert"
        );
        assert!(
            st.rooms["101"].quiet_alerted.is_some(),
            "kept with the room's rules"
        );
        // Once per quiet period.
        let a = reconcile(&mut st, "2026-12-24T09:00:00Z");
        assert!(alerts(&a).is_empty() && switches(&a).is_empty());
        // The freeze takes effect at the announced time.
        let a = reconcile(&mut st, "2026-12-25T16:00:00Z");
        assert_eq!(switches(&a), vec![("101-door".into(), false, 1, 3)]);
        assert_eq!(st.decided["101-door"].rule, "lease");
        st.step(
            t("2026-12-25T16:00:01Z"),
            Event::Switched {
                relay: "101-door".into(),
                want: false,
                attempt: 1,
                of: 3,
                result: Ok(RelayState {
                    before: true,
                    after: false,
                    wrote: true,
                }),
            },
        );
        // Renewal talks logged by the cloud: the quiet period starts again 7 days after them.
        let a = st.step(
            t("2026-12-25T17:00:00Z"),
            Event::Cloud {
                name: "lease_activity".into(),
                id: "la-1".into(),
                args: json!({"room": "101", "at": "2026-12-25T17:00:00Z"}),
            },
        );
        assert_eq!(switches(&a), vec![("101-door".into(), true, 1, 3)], "{a:?}");
        let a = reconcile(&mut st, "2027-01-01T16:59:00Z");
        assert!(alerts(&a).is_empty());
        let a = reconcile(&mut st, "2027-01-01T17:00:00Z");
        assert_eq!(alerts(&a)[0]["freeze_at"], "2027-01-03T17:00:00+00:00");
        assert_eq!(alerts(&a)[0]["last_activity"], "2026-12-25T17:00:00Z");
    }
}
