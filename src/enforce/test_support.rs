//! Fixtures shared by the enforcement tests.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::modbus::profile::Quantity;
use crate::reading::{Quality, RawWords, Reading};

/// The enforcer's part of a test config.
pub(crate) fn setup(cfg: &Config) -> Arc<super::config::Setup> {
    Arc::new(cfg.enforcer_setup())
}

/// A gateway with one prepaid DDS238 (room 104) at 0.8523 CNY/kWh.
pub(crate) fn config(db: &std::path::Path) -> Arc<Config> {
    config_with(db, "")
}

/// [`config`] with more TOML after it (an `[enforcement]` section).
pub(crate) fn config_with(db: &std::path::Path, more: &str) -> Arc<Config> {
    let text = format!(
        r#"
[gateway]
id = "gw"
site = "t"
timezone = "Asia/Shanghai"
[store]
path = "{}"
[[bus]]
name = "lan"
kind = "tcp"
host = "127.0.0.1"
[[device]]
name = "meter104"
bus = "lan"
unit = 1
profile = "hiking_dds238_zn"
[[room]]
id = "104"
[[meter]]
name = "meter104"
utility = "electricity"
room = "104"
[[tariff]]
name = "elec"
utility = "electricity"
price = "0.8523"
rooms = ["104"]
[[prepaid]]
room = "104"
utility = "electricity"
meter = "meter104"
tariff = "elec"
[[relay]]
name = "104-power"
room = "104"
kind = "supply"
utility = "electricity"
device = "meter104"
output = "relay"
{more}
"#,
        db.display()
    );
    Arc::new(Config::from_str_at(&text, "t.toml", std::path::Path::new("/")).unwrap())
}

/// The store thread on the config's outbox, as the daemon starts it.
pub(crate) fn store(cfg: &Config) -> crate::store::StoreHandle {
    crate::store::spawn(
        crate::store::Store::open(
            &cfg.store.path,
            cfg.store.caps,
            crate::clock::Clock::system(),
        )
        .unwrap(),
    )
    .unwrap()
}

/// A Good energy reading of the prepaid meter.
pub(crate) fn reading(ts: DateTime<Utc>, kwh: f64) -> Reading {
    Reading {
        device: "meter104".into(),
        register: "energy_total".into(),
        quantity: Quantity::EnergyKwh,
        value: Some(kwh),
        unit: "kWh".into(),
        ts,
        quality: Quality::Good,
        raw: RawWords::new(&[]),
        error: None,
    }
}

/// Validates one record as it goes on the wire (with a `seq`) against a schema in docs/schemas.
pub(crate) fn validate_record(schema: &str, mut record: serde_json::Value) {
    record["seq"] = serde_json::json!(1);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/schemas")
        .join(schema);
    let schema_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.enable_format_assertions();
    compiler.add_resource(schema, schema_json).unwrap();
    let idx = compiler.compile(schema, &mut schemas).unwrap();
    let batch =
        serde_json::json!({"gateway": "gw", "seq_first": 1, "seq_last": 1, "records": [record]});
    if let Err(e) = schemas.validate(&batch, idx) {
        panic!("{schema}: {e:#}\n{batch}");
    }
}

/// Every switch a [`relay_board`] made: when (by the board's clock), which device, on or off.
pub(crate) type Switches = Arc<std::sync::Mutex<Vec<(DateTime<Utc>, String, bool)>>>;

/// A relay board that answers the enforcer at once, as a healthy meter's relay does: every output
/// starts on, a read tells its state, a switch changes it and is logged with `clock`'s time.
pub(crate) fn relay_board(
    clock: &crate::clock::Clock,
    devices: &[&str],
) -> (
    std::collections::HashMap<String, tokio::sync::mpsc::Sender<crate::modbus::bus::Actuation>>,
    Switches,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::modbus::bus::Actuation>(16);
    let log = Switches::default();
    let (clock, switches) = (clock.clone(), log.clone());
    tokio::spawn(async move {
        let mut on: std::collections::HashMap<(String, String), bool> =
            std::collections::HashMap::default();
        while let Some(a) = rx.recv().await {
            let state = on
                .entry((a.device.clone(), a.output.clone()))
                .or_insert(true);
            let before = *state;
            if let Some(want) = a.set {
                *state = want;
                if want != before {
                    switches
                        .lock()
                        .unwrap()
                        .push((clock.now(), a.device.clone(), want));
                }
            }
            let _ = a.reply.send(Ok(crate::modbus::bus::RelayState {
                before,
                after: *state,
                wrote: a.set.is_some_and(|w| w != before),
            }));
        }
    });
    let actuators = devices
        .iter()
        .map(|d| ((*d).to_string(), tx.clone()))
        .collect();
    (actuators, log)
}
