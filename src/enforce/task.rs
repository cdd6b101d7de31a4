//! The enforcement task: keeps the rules' inputs (persisted in `SQLite`), deducts prepaid consumption
//! from the readings, and reconciles every relay's desired state with its read-back state through the
//! bus tasks. Every action is an audit record.
//!
//! Start-up order is the safety property: persisted rules and balances are loaded and every relay's
//! actual state is read before anything is written, so a restart or power cycle never flickers a door
//! or a tenant's supply.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use super::command;
use super::config::Setup;
use super::prepaid::CounterState;
use super::rules::RoomRules;
use super::state::{Action, EnforcerState, Event, History, Snapshot};
use crate::clock::Clock;
use crate::modbus::bus::{ActuateError, Actuation, Batch, RelayState};
use crate::store::{StoreError, StoreHandle};
use crate::uplink::{Answer, CommandHandler};

/// What reaches the enforcement task.
#[derive(Debug)]
pub(crate) enum Input {
    /// A cloud command that passed authentication and validation. It is applied only before
    /// `deadline` (after it the uplink has answered that it was not applied), and answered on
    /// `reply` once applied and durable.
    Cloud {
        name: String,
        id: String,
        args: Value,
        deadline: DateTime<Utc>,
        reply: Option<oneshot::Sender<crate::uplink::Reply>>,
    },
    /// A request from the local control socket.
    Control {
        req: ControlRequest,
        reply: oneshot::Sender<Value>,
    },
    /// Readings: prepaid deduction and the fire-alarm input.
    Readings(Batch),
    /// The site with a tariff version the cloud set (durable already): prepaid deducts at it from
    /// its first instant (never before now: see `accounting`'s check).
    Prices(Arc<crate::topology::Site>),
}

/// Requests on the local control socket (one JSON object per line).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ControlRequest {
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
    /// Every room's rules, lease, freezes, balances and overrides with its relays' desired and
    /// actual state (or one room's): the cloud's `get_state`.
    State { room: Option<String> },
}

/// Cloud commands that affect relays; each must be signed (see [`super::auth`]).
pub(crate) const RELAY_COMMANDS: &[&str] = &[
    "freeze",
    "unfreeze",
    "set_lease",
    "lease_activity",
    "set_balance",
    "top_up",
    "set_life_critical",
];

/// Authenticates relay commands and hands them to the task. Ids are remembered (in memory and, by
/// the task, in `SQLite`) so a redelivered or replayed command never acts twice.
pub(crate) struct EnforcementCommands {
    pub key: Option<VerifyingKey>,
    /// For validating a command before it is answered.
    pub config: Arc<Setup>,
    pub seen: Arc<Mutex<HashSet<String>>>,
    pub tx: mpsc::Sender<Input>,
    /// Checks a command's expiry and gives it its deadline.
    pub clock: Clock,
}

/// How long a relay command may wait for the enforcer before it is answered as not applied.
pub(crate) const APPLY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

impl CommandHandler for EnforcementCommands {
    fn handle(&self, id: &str, name: &str, args: &Value) -> Option<Answer> {
        if name == "get_state" {
            return Some(self.get_state(args));
        }
        if !RELAY_COMMANDS.contains(&name) {
            return None;
        }
        Some(if let Err(e) = self.check(id, name, args) {
            Answer::Now(Err(e))
        } else {
            let (reply, rx) = oneshot::channel();
            let input = Input::Cloud {
                name: name.to_string(),
                id: id.to_string(),
                args: args.clone(),
                deadline: self.clock.now()
                    + chrono::Duration::from_std(APPLY_WITHIN).unwrap_or_default(),
                reply: Some(reply),
            };
            match self.tx.try_send(input) {
                Ok(()) => Answer::Later(rx),
                Err(_) => Answer::Now(Err(
                    "not applied: enforcement is busy; resend with a new id".into(),
                )),
            }
        })
    }
}

impl EnforcementCommands {
    /// `get_state {"room"?}`: read-only, so unsigned; answered by the enforcer from its state.
    fn get_state(&self, args: &Value) -> Answer {
        let room = match args.get("room") {
            None | Some(Value::Null) => None,
            Some(Value::String(r)) if self.config.site.rooms.contains_key(r) => Some(r.clone()),
            Some(other) => {
                return Answer::Now(Err(format!(
                    "get_state: \"room\" must be a room of this gateway ({}), got {other}",
                    self.config
                        .site
                        .rooms
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .try_send(Input::Control {
                req: ControlRequest::State { room },
                reply: tx,
            })
            .is_err()
        {
            return Answer::Now(Err("enforcement is busy; ask again shortly".into()));
        }
        let (reply, answer) = oneshot::channel();
        tokio::spawn(async move {
            let r = match rx.await {
                Ok(v) if v["ok"] == true => Ok(v),
                Ok(v) => Err(v["error"].as_str().unwrap_or("refused").to_string()),
                Err(_) => Err("enforcement stopped".to_string()),
            };
            let _ = reply.send(r);
        });
        Answer::Later(answer)
    }

    /// Authenticates and validates a relay command against the config; remembers its id.
    fn check(&self, id: &str, name: &str, args: &Value) -> Result<(), String> {
        let Some(key) = &self.key else {
            return Err(
                "relay commands are disabled: set [enforcement] public_key on the gateway".into(),
            );
        };
        let seen = |i: &str| self.seen.lock().map_or(true, |s| s.contains(i));
        let now = self.clock.now();
        super::auth::verify(key, name, id, args, now, seen)?;
        // Everything the config can tell is checked before the command goes to the enforcer.
        command::parse(
            name,
            id,
            args,
            &self.config.enforcement,
            &self.config.site,
            now,
        )?;
        if let Ok(mut s) = self.seen.lock() {
            s.insert(id.to_string());
        }
        Ok(())
    }
}

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

/// A read-only connection: the store thread created the file and every table (the daemon opens
/// the store first), and every write goes through it.
fn open(path: &std::path::Path) -> Result<Connection, StoreError> {
    crate::store::open_read_only(path)
}

/// The enforcement task: the I/O around [`EnforcerState`].
pub(crate) struct Enforcer {
    /// Own read-only connection to the outbox database (the persisted rules and counters at start,
    /// the history around a band change). Every write goes through the store's one writer
    /// ([`StoreHandle::transact`]). Behind a mutex only so the task is `Send`; never held across an
    /// await.
    conn: Mutex<Connection>,
    pub(crate) state: EnforcerState,
    actuators: HashMap<String, mpsc::Sender<Actuation>>,
    store: StoreHandle,
    /// Every decision's `now` and the re-check timer.
    clock: Clock,
}

impl Enforcer {
    /// Loads the persisted rules, balances and counters.
    pub(crate) fn open(
        config: Arc<Setup>,
        actuators: HashMap<String, mpsc::Sender<Actuation>>,
        store: StoreHandle,
        clock: Clock,
    ) -> Result<Enforcer, StoreError> {
        let path = config.store_path.clone();
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
            .is_ok_and(|v| v == "on");
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
                        tracing::error!(device = %d, error = %e, "prepaid counter state unreadable; the next reading is the new baseline");
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
                        billed_at: clock.now(),
                        carry: 0,
                        suspect: None,
                    });
            }
        }
        Ok(Enforcer {
            conn: Mutex::new(conn),
            state: EnforcerState::new(config, rooms, counters, fire),
            actuators,
            store,
            clock,
        })
    }

    /// Executes a step's actions in order, feeding relay outcomes back into the state. A durable
    /// write that fails undoes the step in memory (`undo`) and turns its answer into "not applied".
    /// Returns the answers of the step (cloud command, control request).
    async fn execute(
        &mut self,
        actions: Vec<Action>,
        mut undo: Option<Snapshot>,
    ) -> (Option<crate::uplink::Reply>, Option<Value>) {
        let mut queue: VecDeque<Action> = actions.into();
        let (mut answer, mut control) = (None, None);
        let mut failed: Option<String> = None;
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Persist {
                    records,
                    writes,
                    durable,
                } => {
                    // Without an undo the change has happened (a relay switched): its records
                    // are kept even when its state cannot be written.
                    let happened = undo.is_none().then(|| records.clone());
                    if let Err(e) = self.store.transact(records, writes, durable).await {
                        if let Some(s) = undo.take() {
                            // Nothing of the step was written: undo it in memory too, so a
                            // deduction is billed again from the stored counter by the next
                            // reading and the ledger has no gap.
                            tracing::error!(error = %e, "enforcement: state not written; the step is undone");
                            self.state.restore(s);
                            failed = Some(format!("not applied: state cannot be written: {e}"));
                            // Decide again from the restored state.
                            queue = self
                                .state
                                .step(
                                    self.clock.now(),
                                    Event::Reconcile {
                                        retry_failed: false,
                                    },
                                )
                                .into();
                        } else {
                            tracing::error!(error = %e, "enforcement: state not written (its records are held in memory)");
                            if let Some(records) = happened.filter(|r| !r.is_empty()) {
                                let _ = self.store.append(records).await;
                            }
                        }
                    }
                }
                Action::Publish(records) => {
                    if !records.is_empty() {
                        let _ = self.store.append(records).await;
                    }
                }
                Action::Read { relay } => {
                    let result = self.actuate(&relay, None).await;
                    let more = self
                        .state
                        .step(self.clock.now(), Event::Read { relay, result });
                    for a in more.into_iter().rev() {
                        queue.push_front(a);
                    }
                }
                Action::Switch {
                    relay,
                    want,
                    attempt,
                    of,
                    after,
                } => {
                    if !after.is_zero() {
                        tokio::time::sleep(after).await;
                    }
                    let result = self.actuate(&relay, Some(want)).await;
                    let more = self.state.step(
                        self.clock.now(),
                        Event::Switched {
                            relay,
                            want,
                            attempt,
                            of,
                            result,
                        },
                    );
                    // The same relay's next attempt goes before the other relays.
                    for a in more.into_iter().rev() {
                        queue.push_front(a);
                    }
                }
                Action::Answer(a) => answer = Some(a),
                Action::ControlAnswer(v) => control = Some(v),
            }
        }
        if let Some(e) = failed {
            answer = answer.map(|_| Err(e.clone()));
            control = control.map(|_| json!({"ok": false, "error": e}));
        }
        (answer, control)
    }

    async fn actuate(&self, relay: &str, set: Option<bool>) -> Result<RelayState, ActuateError> {
        let Some(relay) = self.state.relay(relay).cloned() else {
            return Err(ActuateError::Unsupported);
        };
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

    /// Reads the history the state needs to bill `batch` (this task's own reading connection).
    fn history_for(&self, batch: &Batch) -> History {
        let mut out = History::new();
        let queries = self.state.history_needed(batch);
        if queries.is_empty() {
            return out;
        }
        let Ok(conn) = self.conn.lock() else {
            return out;
        };
        for q in queries {
            let samples =
                crate::store::history_window(&conn, &q.device, q.quantity, q.from_ms, q.to_ms)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(t, v)| {
                        Some((
                            DateTime::from_timestamp_millis(t)?,
                            crate::money::to_milli(v),
                        ))
                    })
                    .collect();
            out.insert(q.key, samples);
        }
        out
    }

    /// A cloud command: applied, written durably with its records, then answered (undone and
    /// answered "not applied" if it cannot be written).
    async fn cloud(
        &mut self,
        name: &str,
        id: &str,
        args: Value,
        now: DateTime<Utc>,
    ) -> crate::uplink::Reply {
        let undo = self.state.snapshot();
        let event = Event::Cloud {
            name: name.to_string(),
            id: id.to_string(),
            args,
        };
        let actions = self.state.step(now, event);
        self.execute(actions, Some(undo))
            .await
            .0
            .unwrap_or_else(|| Err("no answer".into()))
    }

    /// A batch of readings: prepaid deduction, the fire alarm, and what they change.
    async fn readings(&mut self, batch: Batch, now: DateTime<Utc>) {
        let history = self.history_for(&batch);
        let undo = self.state.snapshot();
        let actions = self.state.step(now, Event::Readings { batch, history });
        self.execute(actions, Some(undo)).await;
    }

    /// Reads every relay's state (a read-back round).
    async fn read_round(&mut self, relays: Vec<String>) {
        let reads = relays
            .into_iter()
            .map(|relay| Action::Read { relay })
            .collect();
        self.execute(reads, None).await;
    }

    /// Runs until shutdown: read every relay first, then follow inputs and the re-check timer.
    pub(crate) async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Never write before the actual states are known (no flicker on restart).
        for _ in 0..3 {
            let unknown = self.state.unknown_relays();
            if unknown.is_empty() {
                break;
            }
            self.read_round(unknown).await;
        }
        let first = self
            .state
            .step(self.clock.now(), Event::Reconcile { retry_failed: true });
        self.execute(first, None).await;
        let every = self.state.config.enforcement.recheck_every;
        let mut next_check = self.clock.instant() + every;
        loop {
            tokio::select! {
                // Inputs first: a command or a reading must not wait behind a slow re-check.
                biased;
                input = inputs.recv() => {
                    let Some(input) = input else { return };
                    let now = self.clock.now();
                    match input {
                        Input::Cloud { name, id, args, deadline, reply } => {
                            let answer = if now >= deadline {
                                Err(format!("not applied: enforcement was busy until after {}; resend with a new id", deadline.to_rfc3339()))
                            } else {
                                self.cloud(&name, &id, args, now).await
                            };
                            match &answer {
                                Ok(_) => tracing::info!(command = %name, id = %id, "relay command applied"),
                                Err(e) => tracing::warn!(command = %name, id = %id, error = %e, "relay command rejected"),
                            }
                            if let Some(reply) = reply {
                                let _ = reply.send(answer);
                            }
                        }
                        Input::Control { req, reply } => {
                            let undo = self.state.snapshot();
                            let actions = self.state.step(now, Event::Control(req));
                            let v = self.execute(actions, Some(undo)).await.1;
                            let _ = reply.send(v.unwrap_or(json!({"ok": false, "error": "no answer"})));
                        }
                        Input::Readings(batch) => self.readings(batch, now).await,
                        Input::Prices(site) => {
                            let mut setup = (*self.state.config).clone();
                            setup.reprice((*site).clone());
                            self.state.config = Arc::new(setup);
                            tracing::info!("prepaid prices follow the tariffs now in force");
                        }
                    }
                }
                () = tokio::time::sleep_until(next_check) => {
                    // Notice hand-switched relays, retry stuck ones, apply time-based rules.
                    self.read_round(self.state.all_relays()).await;
                    let actions = self.state.step(self.clock.now(), Event::Reconcile { retry_failed: true });
                    self.execute(actions, None).await;
                    next_check = self.clock.instant() + every;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The numeric id of a group from /etc/group (for the control socket's owner).
pub(crate) fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|g| g.parse().ok())
}

#[cfg(test)]
/// An enforcer on a fresh store in `dir` with room 104's prepaid balance set (in fen) at `t0` by a
/// cloud command, as a fresh gateway gets its first top-up.
async fn with_balance(
    dir: &std::path::Path,
    balance: i64,
    t0: chrono::DateTime<Utc>,
) -> (Arc<crate::config::Config>, StoreHandle, Enforcer) {
    use super::test_support::{config, setup, store};
    let cfg = config(&dir.join("outbox.db"));
    let store = store(&cfg);
    let mut enf = Enforcer::open(
        setup(&cfg),
        HashMap::new(),
        store.clone(),
        crate::clock::Clock::system(),
    )
    .unwrap();
    enf.cloud(
        "set_balance",
        "b-1",
        json!({"room": "104", "utility": "electricity", "balance": balance}),
        t0,
    )
    .await
    .unwrap();
    (cfg, store, enf)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::topology::Utility;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prepaid_deductions_reach_the_ledger_while_the_store_thread_writes_telemetry() {
        // Before the fix the enforcer's transaction read first and then could not upgrade to a
        // write while the store thread committed: "database is locked", and the ledger lost rows.
        let dir = tempfile::tempdir().unwrap();
        let t0 = crate::clock::Clock::system().now();
        let (cfg, store, mut enf) = with_balance(dir.path(), 100_000, t0).await;
        // Telemetry committed continuously by the store thread, as in the daemon.
        let writer = store.clone();
        let hammer = tokio::spawn(async move {
            for i in 0..4000 {
                let r = reading(t0 + chrono::Duration::milliseconds(i), 1.0);
                let _ = writer
                    .append(vec![crate::report::poll_record(&[r]).unwrap()])
                    .await;
            }
        });
        // 2 kW polled every 10 s for 1,000 readings (about 2.8 h): 5.56 kWh.
        let mut wh = 1_234_560.0f64;
        for k in 0..1000 {
            wh += 2000.0 * 10.0 / 3600.0;
            let t = t0 + chrono::Duration::seconds(10 * (k + 1));
            enf.readings(vec![reading(t, (wh / 10.0).floor() / 100.0)], t)
                .await;
            tokio::task::yield_now().await;
        }
        hammer.await.unwrap();
        let balance = enf.state.rooms["104"].prepaid[&Utility::Electricity].balance;
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
mod disk_full {
    use super::super::test_support::*;
    use super::*;
    use crate::topology::Utility;

    /// Limits the store to the pages it has and fills the ledger's last page with rows of another
    /// room from a second connection: the next deduction needs a page the disk does not have.
    async fn fill_the_ledger(store: &StoreHandle, path: &std::path::Path) {
        let conn = rusqlite::Connection::open(path).unwrap();
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        store.set_max_page_count(pages as u64).await;
        store.flush().await;
        conn.pragma_update(None, "max_page_count", pages).unwrap();
        for _ in 0..100_000 {
            let r = conn.execute(
                "INSERT INTO prepaid_ledger (room, utility, kind, interval_ms, start_ms, end_ms, amount, balance_after) VALUES ('filler', 'electricity', 'usage', 0, 0, 0, 0, 0)",
                [],
            );
            if r.is_err() {
                return;
            }
        }
        panic!("the disk never filled up");
    }

    /// Regression: a reading whose deduction could not be written (a full disk) had deducted the
    /// balance and moved the billed counter in memory, its ledger rows lost: the balance and the
    /// ledger disagreed by what was deducted meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readings_billed_while_the_disk_is_full_are_billed_again_when_it_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = crate::clock::Clock::system().now();
        let (cfg, store, mut enf) = with_balance(dir.path(), 100_000, t0).await;
        // 2.4 kW polled every 10 s on a 0.01 kWh counter, 300 readings (50 min); the disk is full
        // for readings 100 to 199.
        let kwh =
            |k: i64| ((1_234_560.0 + 2400.0 * 10.0 / 3600.0 * k as f64) / 10.0).floor() / 100.0;
        let rows = || -> i64 {
            crate::store::open_read_only(&cfg.store.path)
                .unwrap()
                .query_row(
                    "SELECT count(*) FROM prepaid_ledger WHERE room = '104'",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        let mut full_at = 0;
        for k in 0..300 {
            if k == 100 {
                full_at = rows();
                fill_the_ledger(&store, &cfg.store.path).await;
            }
            if k == 200 {
                assert_eq!(
                    rows(),
                    full_at,
                    "no deduction was written while the disk was full"
                );
                store.set_max_page_count(1 << 30).await;
            }
            let t = t0 + chrono::Duration::seconds(10 * (k + 1));
            enf.readings(vec![reading(t, kwh(k))], t).await;
        }
        let balance = enf.state.rooms["104"].prepaid[&Utility::Electricity].balance;
        let conn = crate::store::open_read_only(&cfg.store.path).unwrap();
        let (usage, milli): (i64, i64) = conn
            .query_row(
                "SELECT coalesce(sum(amount), 0), coalesce(sum(consumption), 0) FROM prepaid_ledger WHERE kind = 'usage' AND room = '104'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            100_000 + usage,
            balance,
            "the balance is what the ledger says"
        );
        // Everything from the first reading to the last is billed: 299 intervals of 10 s.
        let consumed = crate::money::to_milli(kwh(299)) - crate::money::to_milli(kwh(0));
        assert_eq!(milli, consumed);
        // 1.99 kWh × 0.8523 = 1.696 CNY: 169 fen deducted, the rest carried.
        assert_eq!(-usage, consumed * 8523 / 100_000, "{consumed}");
    }
}

#[cfg(test)]
mod balance_bounds {
    use super::super::prepaid;
    use super::*;
    use crate::topology::Utility;

    /// Regression: top-ups were added unchecked, so repeated large ones could overflow the balance
    /// (i64) and a debug build panicked, a release one wrapped to a negative balance.
    #[tokio::test]
    async fn a_top_up_that_would_take_the_balance_past_its_bound_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = crate::clock::Clock::system().now();
        let (_, _, mut enf) = with_balance(dir.path(), prepaid::MAX_BALANCE - 50_000, t0).await;
        let top_up =
            |amount: i64| json!({"room": "104", "utility": "electricity", "amount": amount});
        let e = enf
            .cloud("top_up", "t-1", top_up(50_001), t0)
            .await
            .unwrap_err();
        assert!(
            e.contains("above the most an account holds") && e.contains("nothing changed"),
            "{e}"
        );
        let held = |enf: &Enforcer| enf.state.rooms["104"].prepaid[&Utility::Electricity].balance;
        assert_eq!(held(&enf), prepaid::MAX_BALANCE - 50_000);
        enf.cloud("top_up", "t-2", top_up(50_000), t0)
            .await
            .unwrap();
        assert_eq!(held(&enf), prepaid::MAX_BALANCE);
    }
}

#[cfg(test)]
mod counter_events {
    use super::super::test_support::*;
    use super::*;
    use crate::topology::Utility;

    #[tokio::test]
    async fn a_zero_reading_after_a_meter_reboot_is_reported_once_and_not_billed() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = crate::clock::Clock::system().now();
        let (_, _, mut enf) = with_balance(dir.path(), 10_000, t0).await;
        let mut events = Vec::new();
        for (k, kwh) in [(0, 5123.30), (1, 5123.31), (2, 0.0), (3, 0.0), (4, 5123.32)] {
            let t = t0 + chrono::Duration::seconds(10 * k);
            let batch = vec![reading(t, kwh)];
            let history = enf.history_for(&batch);
            let actions = enf.state.step(t, Event::Readings { batch, history });
            for a in &actions {
                if let Action::Persist { records, .. } = a {
                    events.extend(records.iter().cloned());
                }
            }
            enf.execute(actions, None).await;
        }
        // 0.02 kWh × 0.8523 = 1.7 fen: 1 fen deducted, 0.7 carried; the zeros billed nothing.
        assert_eq!(
            enf.state.rooms["104"].prepaid[&Utility::Electricity].balance,
            9_999
        );
        // As they go on the wire (the outbox gives every record its time).
        let payloads: Vec<Value> = events
            .iter()
            .map(|r| serde_json::from_slice(&crate::store::with_ts(r)).unwrap())
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
        super::super::test_support::validate_record("events.schema.json", payloads[0].clone());
    }
}

#[cfg(test)]
mod command_replies {
    use super::super::test_support::{config, setup, store};
    use super::*;
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
    }

    fn signed(name: &str, id: &str, mut args: Value) -> Value {
        args["expires_at"] = json!((crate::clock::Clock::system().now()
            + chrono::Duration::minutes(5))
        .to_rfc3339());
        let sig = key().sign(&super::super::auth::signed_content(name, id, &args));
        args["sig"] = json!(base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()));
        args
    }

    fn now(a: Option<Answer>) -> crate::uplink::Reply {
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
            config: setup(&config(&dir.path().join("outbox.db"))),
            seen: Arc::default(),
            tx,
            clock: Clock::system(),
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
            &signed(
                "freeze",
                "f-2",
                json!({"room": "104", "scope": "utilities"}),
            ),
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
        let store = store(&cfg);
        let mut enf = Enforcer::open(
            setup(&cfg),
            HashMap::new(),
            store.clone(),
            crate::clock::Clock::system(),
        )
        .unwrap();
        let now = crate::clock::Clock::system().now();
        let freeze = signed(
            "freeze",
            "f-1",
            json!({"room": "104", "scope": "utilities"}),
        );
        enf.cloud("freeze", "f-1", freeze, now).await.unwrap();
        assert!(enf.state.rooms["104"].utility_freeze.is_some());
        let unfreeze = signed(
            "unfreeze",
            "u-1",
            json!({"room": "104", "scope": "utilities"}),
        );
        enf.cloud("unfreeze", "u-1", unfreeze, now).await.unwrap();
        // No shutdown, no flush: what was answered must already be there.
        let reopened = Enforcer::open(
            setup(&cfg),
            HashMap::new(),
            store.clone(),
            crate::clock::Clock::system(),
        )
        .unwrap();
        assert!(reopened.state.rooms["104"].utility_freeze.is_none());
        let seen = load_seen(&cfg.store.path).unwrap();
        assert!(seen.contains("f-1") && seen.contains("u-1"));
    }

    /// Before the fix a top-up in the lease's quiet period was answered `accepted` and only an audit
    /// record said it was refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_top_up_in_the_lease_quiet_period_is_answered_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&dir.path().join("outbox.db"));
        let store = store(&cfg);
        let enf = Enforcer::open(
            setup(&cfg),
            HashMap::new(),
            store,
            crate::clock::Clock::system(),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(8);
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(enf.run(rx, shutdown));
        let handler = EnforcementCommands {
            key: Some(key().verifying_key()),
            config: setup(&cfg),
            seen: Arc::default(),
            tx,
            clock: Clock::system(),
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
        let end = (crate::clock::Clock::system()
            .now()
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

/// Time-driven rules through the real task on a paused clock: days of re-checks pass in
/// milliseconds, and every date is computed from the test's clock, so they pass on any date.
#[cfg(test)]
mod simulated_time {
    use super::super::test_support::{config_with, relay_board, setup};
    use super::*;
    use crate::clock::SimClock;
    use chrono::{Datelike, NaiveDate, TimeZone, Weekday};

    const TZ: chrono_tz::Tz = chrono_tz::Asia::Shanghai;
    const MINUTE: chrono::Duration = chrono::Duration::minutes(1);

    /// The first `weekday` after today (site time, by the system's clock) at `h:m` site time.
    fn next(weekday: Weekday, h: u32, m: u32) -> DateTime<Utc> {
        let today = crate::clock::Clock::system()
            .now()
            .with_timezone(&TZ)
            .date_naive();
        let day = (1..=7)
            .map(|n| today + chrono::Duration::days(n))
            .find(|d| d.weekday() == weekday)
            .unwrap();
        local(day, h, m)
    }

    fn local(day: NaiveDate, h: u32, m: u32) -> DateTime<Utc> {
        TZ.from_local_datetime(&day.and_hms_opt(h, m, 0).unwrap())
            .unwrap()
            .with_timezone(&Utc)
    }

    /// What a simulated run of the enforcer did.
    struct Simulated {
        /// Every relay switch: when, which device, on or off.
        switches: Vec<(DateTime<Utc>, String, bool)>,
        /// Every event it published, as stored.
        events: Vec<Value>,
    }

    /// Runs the enforcer task from `start` on a paused clock: `commands` (checked cloud commands)
    /// applied at `start`, then `minutes` of time in steps of a minute, re-checking every minute as
    /// in the field. The test's steps are the re-check interval, so the paused clock never jumps
    /// past one.
    async fn simulate(
        start: DateTime<Utc>,
        more_config: &str,
        commands: &[(&str, Value)],
        minutes: i64,
    ) -> Simulated {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_with(&dir.path().join("outbox.db"), more_config);
        let sim = SimClock::starting_at(start);
        let store = crate::store::spawn(
            crate::store::Store::open(&cfg.store.path, cfg.store.caps, sim.clock()).unwrap(),
        )
        .unwrap();
        let (actuators, log) = relay_board(&sim.clock(), &["meter104", "doors"]);
        let enf = Enforcer::open(setup(&cfg), actuators, store.clone(), sim.clock()).unwrap();
        let (tx, rx) = mpsc::channel(8);
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(enf.run(rx, shutdown));
        for (i, (name, args)) in commands.iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            tx.send(Input::Cloud {
                name: (*name).into(),
                id: format!("c-{i}"),
                args: args.clone(),
                deadline: start + MINUTE,
                reply: Some(reply),
            })
            .await
            .unwrap();
            let answer = answer.await.unwrap();
            assert!(answer.is_ok(), "{name}: {answer:?}");
        }
        for _ in 0..minutes {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        task.abort();
        store.flush().await;
        let conn = crate::store::open_read_only(&cfg.store.path).unwrap();
        let mut stmt = conn
            .prepare("SELECT payload FROM outbox WHERE topic = 'events' ORDER BY seq")
            .unwrap();
        let events = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|p| serde_json::from_slice(&p.unwrap()).unwrap())
            .collect();
        let switches = log.lock().unwrap().clone();
        Simulated { switches, events }
    }

    /// Room 104's prepaid balance is set to zero at `start`; returns every switch of its supply
    /// relay over the `days` after.
    async fn switches_after_running_out(
        start: DateTime<Utc>,
        enforcement: &str,
        days: i64,
    ) -> Vec<(DateTime<Utc>, bool)> {
        let empty = json!({"room": "104", "utility": "electricity", "balance": 0});
        let run = simulate(
            start,
            enforcement,
            &[("set_balance", empty)],
            days * 24 * 60,
        )
        .await;
        run.switches
            .into_iter()
            .filter(|(_, device, _)| device == "meter104")
            .map(|(t, _, on)| (t, on))
            .collect()
    }

    /// One cut, within the minute after `at`.
    fn cut_once_at(switches: &[(DateTime<Utc>, bool)], at: DateTime<Utc>) {
        assert_eq!(switches.len(), 1, "{switches:?}");
        let (t, on) = switches[0];
        assert!(!on, "cut, not restored: {switches:?}");
        assert!(
            t >= at && t <= at + MINUTE,
            "cut at {} site time, expected {}",
            t.with_timezone(&TZ),
            at.with_timezone(&TZ)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_prepaid_grace_ending_inside_the_allowed_hours_cuts_the_supply_when_it_ends() {
        // Empty on a Monday at 10:15: the 48 h grace ends on Wednesday at 10:15, inside 09:00–18:00.
        let empty = next(Weekday::Mon, 10, 15);
        let switches = switches_after_running_out(empty, "", 3).await;
        cut_once_at(&switches, empty + chrono::Duration::hours(48));
    }

    #[tokio::test(start_paused = true)]
    async fn a_prepaid_grace_ending_after_hours_cuts_the_supply_at_nine_the_next_morning() {
        // Empty on a Monday at 19:40: the grace ends on Wednesday evening, outside the window.
        let empty = next(Weekday::Mon, 19, 40);
        let switches = switches_after_running_out(empty, "", 3).await;
        let thursday = (empty + chrono::Duration::days(3)).with_timezone(&TZ);
        cut_once_at(&switches, local(thursday.date_naive(), 9, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_prepaid_grace_ending_on_a_saturday_cuts_the_supply_at_nine_on_monday() {
        // Empty on a Thursday at 11:00: the grace ends on Saturday at 11:00, inside the hours but on
        // a weekend, which the default calendar keeps free of cut-offs.
        let empty = next(Weekday::Thu, 11, 0);
        let switches = switches_after_running_out(empty, "", 5).await;
        let monday = (empty + chrono::Duration::days(4)).with_timezone(&TZ);
        assert_eq!(monday.weekday(), Weekday::Mon);
        cut_once_at(&switches, local(monday.date_naive(), 9, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_prepaid_grace_ending_before_a_holiday_waits_for_the_next_working_morning() {
        // Empty on a Monday at 20:00: the grace ends on Wednesday at 20:00, after hours; Thursday
        // is a configured holiday, so the supply is cut on Friday at 09:00.
        let empty = next(Weekday::Mon, 20, 0);
        let day = |n| {
            (empty + chrono::Duration::days(n))
                .with_timezone(&TZ)
                .date_naive()
        };
        let enforcement = format!("[enforcement]\nholidays = [{}]\n", day(3));
        let switches = switches_after_running_out(empty, &enforcement, 5).await;
        cut_once_at(&switches, local(day(4), 9, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_notice_running_over_a_month_end_alerts_then_freezes_the_door_on_time() {
        // The lease's last day is the 2nd of next month (of the test's clock), not renewed. Its 7
        // notice days start at 00:00 site time 7 days before that, in this month: the red alert
        // then, and the door frozen the grace (7 days) later, at 00:00 on the 2nd.
        let today = crate::clock::Clock::system()
            .now()
            .with_timezone(&TZ)
            .date_naive();
        let next_first = today
            .with_day(1)
            .unwrap()
            .checked_add_months(chrono::Months::new(1))
            .unwrap();
        let last_day = next_first + chrono::Duration::days(1);
        let quiet = local(last_day - chrono::Duration::days(7), 0, 0);
        let freeze = quiet + chrono::Duration::days(7);
        assert!(quiet < local(next_first, 0, 0) && freeze > local(next_first, 0, 0));
        let door = "[[device]]\nname = \"doors\"\nbus = \"lan\"\nunit = 10\nprofile = \"relay_waveshare_8ch\"\n[[relay]]\nname = \"104-door\"\nroom = \"104\"\nkind = \"door\"\ndevice = \"doors\"\noutput = \"relay1\"\n[enforcement]\ngrace = \"7d\"\nlease_notice_days = 7\n";
        let lease = json!({"room": "104", "lease_end": last_day.to_string()});
        let start = quiet - chrono::Duration::hours(2);
        let run = simulate(start, door, &[("set_lease", lease)], 7 * 24 * 60 + 4 * 60).await;
        let alerts: Vec<&Value> = run
            .events
            .iter()
            .filter(|e| e["event"] == "lease_quiet_period")
            .collect();
        assert_eq!(alerts.len(), 1, "one red alert: {:?}", run.events);
        let since =
            DateTime::parse_from_rfc3339(alerts[0]["quiet_since"].as_str().unwrap()).unwrap();
        assert_eq!(since, quiet);
        assert_eq!(run.switches.len(), 1, "{:?}", run.switches);
        let (t, device, on) = &run.switches[0];
        assert_eq!((device.as_str(), *on), ("doors", false));
        assert!(
            *t >= freeze && *t <= freeze + MINUTE,
            "door frozen at {} site time, expected {}",
            t.with_timezone(&TZ),
            freeze.with_timezone(&TZ)
        );
    }
}
