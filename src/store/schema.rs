//! Every table of the gateway's database, in one place: the outbox and its companions, the
//! enforcement state and the prepaid ledger. Created (idempotently) when the store opens.

pub const SCHEMA: &str = "
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
-- Enforcement state (written only through the store's writer, see `StoreHandle::transact`).
CREATE TABLE IF NOT EXISTS enforcement_rooms (room TEXT PRIMARY KEY, rules TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enforcement_counters (device TEXT NOT NULL, quantity TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (device, quantity));
CREATE TABLE IF NOT EXISTS command_ids (id TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL);
-- Small persisted facts: the fire alarm's last known state ('on'/'off').
CREATE TABLE IF NOT EXISTS enforcement_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Where each prepaid counter is billed up to, with the carried fraction (JSON of CounterState).
CREATE TABLE IF NOT EXISTS prepaid_counters (device TEXT NOT NULL, quantity TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (device, quantity));
-- The prepaid ledger (enforce::ledger).
CREATE TABLE IF NOT EXISTS prepaid_ledger (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    room           TEXT    NOT NULL,
    utility        TEXT    NOT NULL,
    kind           TEXT    NOT NULL,            -- usage | top_up | reconcile
    interval_ms    INTEGER NOT NULL,            -- usage: start of the history interval; else the time
    band           TEXT    NOT NULL DEFAULT '',
    start_ms       INTEGER NOT NULL,
    end_ms         INTEGER NOT NULL,
    start_counter  INTEGER,                     -- thousandths (Wh, litres)
    end_counter    INTEGER,
    consumption    INTEGER NOT NULL DEFAULT 0,  -- thousandths
    price_micros   INTEGER,
    amount         INTEGER NOT NULL,            -- minor units; deductions negative
    balance_after  INTEGER NOT NULL,
    ref            TEXT,
    epoch          INTEGER NOT NULL DEFAULT 0   -- usage: id of the account's last top-up/reconciliation
);
CREATE UNIQUE INDEX IF NOT EXISTS prepaid_ledger_usage
    ON prepaid_ledger (room, utility, interval_ms, band, price_micros, epoch) WHERE kind = 'usage';
CREATE INDEX IF NOT EXISTS prepaid_ledger_room ON prepaid_ledger (room, utility, id);
CREATE INDEX IF NOT EXISTS prepaid_ledger_adjustments ON prepaid_ledger (room, utility, id) WHERE kind <> 'usage';
";
