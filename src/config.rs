//! The site configuration: one TOML file, parsed into a raw form, validated as a whole (every problem
//! collected, each naming the file, the key path and what is expected), then built into typed values.
//!
//! A broken config is rejected before anything starts: the daemon never runs half a config.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;

use crate::modbus::plan::{self, Limits, Need, Plan};
use crate::modbus::profile::{self, Profile};
use crate::modbus::schedule::PollPolicy;
use crate::modbus::timing;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/meterd/meterd.toml";

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// File the problem is in (the config or a profile file).
    pub file: String,
    /// Key path inside it, e.g. `device[3] (kitchen).unit`.
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (pass another file with --config PATH)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), .0.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Issue>),
}

/// Site identity and the timezone used for billing boundaries and display (UTC everywhere else).
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub id: String,
    pub site: String,
    pub timezone: chrono_tz::Tz,
    /// Local socket for `meterd status` and `meterd relay` (root and the service's group only).
    pub control_socket: PathBuf,
    /// Log filter for `meterd run` (RUST_LOG and --log-level override it).
    pub log_level: Option<String>,
}

/// Default local control socket (systemd's RuntimeDirectory).
pub const DEFAULT_SOCKET: &str = "/run/meterd/control.sock";

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// Physical line settings of an RS485 port.
#[derive(Debug, Clone, PartialEq)]
pub struct Serial {
    pub device: String,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

/// How a bus reaches its devices.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// RS485 through a local serial port: one transaction at a time.
    Rtu(Serial),
    /// Modbus TCP: `max_concurrent` connections to the endpoint, one transaction in flight on each.
    Tcp {
        host: String,
        port: u16,
        max_concurrent: u16,
        connect_timeout: Duration,
    },
    /// A serial gateway (Moxa, USR) passing raw RTU frames over TCP: one transaction at a time.
    RtuOverTcp {
        host: String,
        port: u16,
        connect_timeout: Duration,
    },
}

/// One bus: a transport plus the timing every device on it shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    pub name: String,
    pub transport: Transport,
    /// Response timeout unless a device overrides it.
    pub timeout: Duration,
    /// Silence between the end of one transaction and the next request (≥ t3.5 on serial lines).
    pub gap: Duration,
    /// Wait after opening the connection before the first request (some gateways drop early ones).
    pub connect_delay: Duration,
}

impl Bus {
    /// Transactions that may be in flight at once: 1 on any RS485 line.
    pub fn concurrency(&self) -> usize {
        match &self.transport {
            Transport::Tcp { max_concurrent, .. } => usize::from(*max_concurrent),
            _ => 1,
        }
    }
}

/// One polled device with everything resolved: its profile, read plan and poll policy.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: Arc<str>,
    /// Index into [`Config::buses`].
    pub bus: usize,
    pub unit: u8,
    pub profile: Arc<Profile>,
    /// Computed once at load; reused for every poll.
    pub plan: Plan,
    pub policy: PollPolicy,
    pub timeout: Duration,
    /// Extra silence this device needs before each request (profile quirk or config).
    pub pause: Duration,
}

/// Where the outbox lives and how large it may grow.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub caps: crate::store::Caps,
}

/// TLS material for the broker connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Tls {
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

/// The MQTT uplink.
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
    /// Unacknowledged QoS 1 messages allowed at once.
    pub inflight: u16,
    /// Share of messages given to the backlog while live data is also waiting (0.05..=0.95).
    pub backlog_share: f64,
    /// Commands larger than this are refused with an error reply.
    pub max_command_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`<inline>` for strings).
    pub source: String,
    /// Hash of the config text, reported in the MQTT birth message so the cloud sees which config runs.
    pub hash: String,
    pub gateway: Gateway,
    pub buses: Vec<Bus>,
    pub devices: Vec<Device>,
    pub profiles: BTreeMap<String, Arc<Profile>>,
    pub store: StoreConfig,
    pub mqtt: Option<Mqtt>,
    /// Meter trees, rooms, pools and tariffs (empty when not configured).
    pub site: crate::topology::Site,
    pub topology: TopologyConfig,
    /// Recorded meter exchanges.
    pub replacements: Vec<ReplacementRecord>,
    /// Relays, freeze rules and prepaid accounts.
    pub enforcement: crate::enforce::config::Enforcement,
}

/// When balances and apportionment run.
#[derive(Debug, Clone, PartialEq)]
pub struct TopologyConfig {
    /// Keep one counter sample per device per this period for billing boundaries.
    pub history_every: Duration,
    /// Check every node's balance over intervals of this length.
    pub balance_every: Duration,
    /// Day of the month (site time) on which last month is apportioned and published.
    pub apportion_day: u32,
    /// How long a due month waits for every billing meter to report after its end before it is run
    /// with the missing meters named.
    pub boundary_wait: Duration,
}

/// A meter exchanged at `at`: the old meter's final reading and the new one's first.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacementRecord {
    pub meter: String,
    pub at: chrono::DateTime<chrono::Utc>,
    pub final_reading: f64,
    pub initial_reading: f64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    loss_threshold_pct: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    history_every: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    balance_every: Option<Duration>,
    apportion_day: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    boundary_wait: Option<Duration>,
}

/// A log level as an operator writes it: `info`, or directives like `info,meterd::uplink=debug`.
/// (tracing's own parser takes any word as a target name, so `"loud"` would pass it.)
fn log_level_ok(l: &str) -> bool {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let level = |s: &str| LEVELS.contains(&s.trim().to_ascii_lowercase().as_str());
    !l.trim().is_empty()
        && l.split(',').all(|d| match d.split_once('=') {
            Some((target, lv)) => !target.trim().is_empty() && level(lv),
            None => level(d),
        })
}

impl Config {
    /// Reads and validates a config file; profile files are looked up next to it.
    pub fn from_path(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_str_at(&text, &path.display().to_string(), base)
    }

    /// Validates config text; `file` names it in errors, `base` resolves relative paths.
    pub fn from_str_at(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut v = Validator {
            file: file.to_string(),
            base: base.to_path_buf(),
            issues: Vec::new(),
        };
        let config = v.build(text, base);
        match config {
            Some(c) if v.issues.is_empty() => Ok(c),
            _ => Err(ConfigError::Invalid(v.issues)),
        }
    }

    /// Looks a device up by name.
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| &*d.name == name)
    }

    /// Looks a bus up by name.
    pub fn bus_index(&self, name: &str) -> Option<usize> {
        self.buses.iter().position(|b| b.name == name)
    }
}

// ---- raw form ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: String,
    site: String,
    timezone: String,
    control_socket: Option<PathBuf>,
    log_level: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPoll {
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    retries: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    backoff: Option<Duration>,
    offline_after: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    probe_interval: Option<Duration>,
    /// Unused registers the planner may read through to merge two requests.
    max_gap: Option<u16>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProfiles {
    /// Directory of user profile files (`*.toml`), relative to the config file.
    dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum BusKind {
    Rtu,
    Tcp,
    RtuOverTcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    name: String,
    kind: BusKind,
    // rtu
    device: Option<String>,
    baud: Option<u32>,
    parity: Option<Parity>,
    data_bits: Option<u8>,
    stop_bits: Option<u8>,
    // tcp, rtu_over_tcp
    host: Option<String>,
    port: Option<u32>,
    max_concurrent: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    // all
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    gap: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_delay: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: String,
    bus: String,
    unit: u32,
    profile: String,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    retries: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pause: Option<Duration>,
}

/// Top-level keys this version understands; anything else is a typo or a newer config.
const SECTIONS: &[&str] = &[
    "gateway",
    "poll",
    "profiles",
    "store",
    "mqtt",
    "bus",
    "device",
    "topology",
    "room",
    "meter",
    "pool",
    "tariff",
    "replacement",
    "assignment",
    "enforcement",
    "relay",
    "prepaid",
];

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<PathBuf>,
    max_rows: Option<u64>,
    max_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    max_age: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: PathBuf,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    host: String,
    port: Option<u32>,
    client_id: Option<String>,
    topic_prefix: Option<String>,
    #[serde(default, with = "humantime_serde")]
    keep_alive: Option<Duration>,
    username: Option<String>,
    password: Option<String>,
    tls: Option<RawTls>,
    batch_max_records: Option<usize>,
    batch_max_bytes: Option<usize>,
    inflight: Option<u16>,
    backlog_share: Option<f64>,
    max_command_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    reconnect_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reconnect_max: Option<Duration>,
}

/// Default outbox location (systemd's StateDirectory).
pub const DEFAULT_STORE: &str = "/var/lib/meterd/outbox.db";

/// FNV-1a 64 of the config text: stable across builds, enough to tell two configs apart.
fn fnv1a(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

struct Validator {
    file: String,
    /// Directory relative paths are resolved against.
    base: PathBuf,
    issues: Vec<Issue>,
}

impl Validator {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Deserializes one value, recording a typed error at `key` instead of stopping.
    fn typed<T: DeserializeOwned>(&mut self, key: &str, value: toml::Value) -> Option<T> {
        match T::deserialize(value) {
            Ok(t) => Some(t),
            Err(e) => {
                self.push(key, e.to_string().trim_end().to_string());
                None
            }
        }
    }

    /// Deserializes every entry of an array of tables on its own, so one bad `[[device]]` does not
    /// hide the problems of the others. Keys read `device[3] (name)`.
    fn entries<T: DeserializeOwned>(
        &mut self,
        table: &mut toml::Table,
        key: &str,
    ) -> Vec<(String, Option<T>)> {
        let values = match table.remove(key) {
            None => Vec::new(),
            Some(toml::Value::Array(a)) => a,
            Some(_) => {
                self.push(key, format!("expected an array of tables: write [[{key}]]"));
                Vec::new()
            }
        };
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let k = format!("{key}[{i}]{}", name_hint(&v));
                let t = self.typed(&k, v);
                (k, t)
            })
            .collect()
    }

    fn build(&mut self, text: &str, base: &Path) -> Option<Config> {
        let mut table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                self.push("", format!("not valid TOML: {}", e.to_string().trim_end()));
                return None;
            }
        };
        for key in table.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                let k = key.clone();
                self.push(
                    k,
                    format!("unknown section; expected one of: {}", SECTIONS.join(", ")),
                );
            }
        }
        let gateway = match table.remove("gateway") {
            None => {
                self.push(
                    "gateway",
                    "missing: add [gateway] with id, site and timezone",
                );
                None
            }
            Some(v) => self.typed::<RawGateway>("gateway", v),
        };
        let poll: RawPoll = table
            .remove("poll")
            .and_then(|v| self.typed("poll", v))
            .unwrap_or_default();
        let profiles_cfg: RawProfiles = table
            .remove("profiles")
            .and_then(|v| self.typed("profiles", v))
            .unwrap_or_default();
        let raw_store: RawStore = table
            .remove("store")
            .and_then(|v| self.typed("store", v))
            .unwrap_or_default();
        let raw_mqtt: Option<RawMqtt> = table.remove("mqtt").and_then(|v| self.typed("mqtt", v));
        let raw_buses: Vec<(String, Option<RawBus>)> = self.entries(&mut table, "bus");
        let raw_devices: Vec<(String, Option<RawDevice>)> = self.entries(&mut table, "device");
        let raw_topology: RawTopology = table
            .remove("topology")
            .and_then(|v| self.typed("topology", v))
            .unwrap_or_default();
        let rooms: Vec<(String, Option<crate::topology::Room>)> = self.entries(&mut table, "room");
        let meters: Vec<(String, Option<crate::topology::RawMeter>)> =
            self.entries(&mut table, "meter");
        let pools: Vec<(String, Option<crate::topology::RawPool>)> =
            self.entries(&mut table, "pool");
        let tariffs: Vec<(String, Option<crate::topology::RawTariff>)> =
            self.entries(&mut table, "tariff");
        let replacements: Vec<(String, Option<ReplacementRecord>)> =
            self.entries(&mut table, "replacement");
        let assignments: Vec<(String, Option<crate::topology::RawAssignment>)> =
            self.entries(&mut table, "assignment");
        let raw_enforcement: crate::enforce::config::RawEnforcement = table
            .remove("enforcement")
            .and_then(|v| self.typed("enforcement", v))
            .unwrap_or_default();
        let relays: Vec<(String, Option<crate::enforce::config::RawRelay>)> =
            self.entries(&mut table, "relay");
        let prepaid: Vec<(String, Option<crate::enforce::config::RawPrepaid>)> =
            self.entries(&mut table, "prepaid");

        let gateway = gateway.and_then(|g| self.gateway(g));
        let profiles = self.profiles(&profiles_cfg, base);
        let defaults = self.poll_defaults(&poll);
        let buses = self.buses(&raw_buses);
        let devices = self.devices(&raw_devices, &buses, &profiles, &defaults);
        let quantities: BTreeMap<
            String,
            std::collections::BTreeSet<crate::modbus::profile::Quantity>,
        > = devices
            .iter()
            .map(|d| {
                (
                    d.name.to_string(),
                    d.profile.registers.iter().map(|r| r.quantity).collect(),
                )
            })
            .collect();
        let threshold = raw_topology.loss_threshold_pct.unwrap_or(5.0);
        if !(threshold.is_finite() && threshold >= 0.0) {
            self.push("topology.loss_threshold_pct", "must be a percentage ≥ 0");
        }
        let (mut site, topo_issues) = crate::topology::build(
            flat(rooms),
            flat(meters),
            flat(pools),
            flat(tariffs),
            threshold,
            &quantities,
        );
        for (k, m) in topo_issues {
            self.push(k, m);
        }
        let replacements: Vec<ReplacementRecord> =
            flat(replacements).into_iter().map(|(_, r)| r).collect();
        for (i, r) in replacements.iter().enumerate() {
            if !site.meters.contains_key(&r.meter) {
                self.push(
                    format!("replacement[{i}].meter"),
                    format!("unknown meter {:?}", r.meter),
                );
            }
        }
        let apportion_day = raw_topology.apportion_day.unwrap_or(1);
        if !(1..=28).contains(&apportion_day) {
            self.push(
                "topology.apportion_day",
                format!("{apportion_day}: expected 1..=28 (a day every month has)"),
            );
        }
        let topology = TopologyConfig {
            history_every: raw_topology
                .history_every
                .unwrap_or(Duration::from_secs(900)),
            balance_every: raw_topology
                .balance_every
                .unwrap_or(Duration::from_secs(3600)),
            apportion_day,
            boundary_wait: raw_topology
                .boundary_wait
                .unwrap_or(Duration::from_secs(6 * 3600)),
        };
        if topology.boundary_wait > Duration::from_secs(20 * 86_400) {
            self.push(
                "topology.boundary_wait",
                "at most 20d: a month's bills cannot wait for the next month",
            );
        }
        if topology.history_every < Duration::from_secs(1)
            || topology.balance_every < topology.history_every
        {
            self.push(
                "topology.history_every",
                "history_every must be ≥ 1s and not longer than balance_every",
            );
        }
        let tz = gateway
            .as_ref()
            .map(|g| g.timezone)
            .unwrap_or(chrono_tz::UTC);
        let mut assign_issues = Vec::new();
        site.assignments =
            crate::topology::assignments(&site, flat(assignments), tz, &mut assign_issues);
        for (k, m) in assign_issues {
            self.push(k, m);
        }
        let (enforcement, enf_issues) = crate::enforce::config::build(
            raw_enforcement,
            flat(relays),
            flat(prepaid),
            tz,
            &devices,
            &site,
            base,
        );
        for (k, m) in enf_issues {
            self.push(k, m);
        }
        let store = self.store(raw_store, base);
        let gateway_id = gateway.as_ref().map(|g| g.id.clone()).unwrap_or_default();
        let mqtt = raw_mqtt.map(|m| self.mqtt(m, &gateway_id, base));
        let gateway = gateway?;
        Some(Config {
            source: self.file.clone(),
            hash: fnv1a(text),
            store,
            mqtt,
            site,
            topology,
            replacements,
            enforcement,
            gateway,
            buses: buses.into_iter().map(|(_, b)| b).collect(),
            devices,
            profiles,
        })
    }

    fn store(&mut self, s: RawStore, base: &Path) -> StoreConfig {
        let d = crate::store::Caps::default();
        let caps = crate::store::Caps {
            max_rows: s.max_rows.unwrap_or(d.max_rows),
            max_bytes: s.max_bytes.unwrap_or(d.max_bytes),
            max_age: s.max_age.unwrap_or(d.max_age),
        };
        if caps.max_rows < 1000 {
            self.push("store.max_rows", format!("{}: keep at least 1000 rows (a few minutes of readings) or the outbox drops data before an outage is over", caps.max_rows));
        }
        if caps.max_bytes < 1 << 20 {
            self.push(
                "store.max_bytes",
                format!("{}: keep at least 1 MiB (1048576)", caps.max_bytes),
            );
        }
        if caps.max_age < Duration::from_secs(3600) {
            self.push(
                "store.max_age",
                "keep at least 1h: an uplink outage longer than this would drop readings",
            );
        }
        StoreConfig {
            path: base.join(s.path.unwrap_or_else(|| PathBuf::from(DEFAULT_STORE))),
            caps,
        }
    }

    fn mqtt(&mut self, m: RawMqtt, gateway_id: &str, base: &Path) -> Mqtt {
        let port = match m.port {
            None => {
                if m.tls.is_some() {
                    8883
                } else {
                    1883
                }
            }
            Some(p @ 1..=65535) => p as u16,
            Some(p) => {
                self.push("mqtt.port", format!("{p} is not a TCP port (1..=65535)"));
                1883
            }
        };
        if m.host.trim().is_empty() {
            self.push(
                "mqtt.host",
                "must name the broker (IP address or host name)",
            );
        }
        let prefix = m.topic_prefix.unwrap_or_else(|| "meterd".into());
        if prefix.is_empty()
            || prefix.contains(['+', '#'])
            || prefix.starts_with('/')
            || prefix.ends_with('/')
        {
            self.push("mqtt.topic_prefix", format!("{prefix:?}: must be non-empty, without wildcards (+ #) or leading/trailing '/'"));
        }
        let credentials = match (m.username, m.password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(_), None) => {
                self.push("mqtt.password", "username is set but password is missing");
                None
            }
            (None, Some(_)) => {
                self.push("mqtt.username", "password is set but username is missing");
                None
            }
        };
        let tls = m.tls.map(|t| {
            let check = |v: &mut Self, key: &str, p: &Path| {
                let full = base.join(p);
                if std::fs::metadata(&full).is_err() {
                    v.push(
                        format!("mqtt.tls.{key}"),
                        format!(
                            "cannot read {}: give the path to a PEM file",
                            full.display()
                        ),
                    );
                }
                full
            };
            let ca_file = check(self, "ca_file", &t.ca_file);
            let client_auth = match (t.client_cert, t.client_key) {
                (Some(c), Some(k)) => Some((
                    check(self, "client_cert", &c),
                    check(self, "client_key", &k),
                )),
                (None, None) => None,
                _ => {
                    self.push(
                        "mqtt.tls",
                        "client_cert and client_key go together: set both or neither",
                    );
                    None
                }
            };
            Tls {
                ca_file,
                client_auth,
            }
        });
        let inflight = m.inflight.unwrap_or(16);
        if !(1..=100).contains(&inflight) {
            self.push(
                "mqtt.inflight",
                format!("{inflight}: expected 1..=100 unacknowledged messages"),
            );
        }
        let backlog_share = m.backlog_share.unwrap_or(0.5);
        if !(0.05..=0.95).contains(&backlog_share) {
            self.push("mqtt.backlog_share", format!("{backlog_share}: expected 0.05..=0.95 so neither the backlog nor live data starves"));
        }
        let batch_max_bytes = m.batch_max_bytes.unwrap_or(256 * 1024);
        if !(1024..=16 * 1024 * 1024).contains(&batch_max_bytes) {
            self.push(
                "mqtt.batch_max_bytes",
                format!("{batch_max_bytes}: expected 1024..=16777216"),
            );
        }
        let batch_max_records = m.batch_max_records.unwrap_or(500);
        if batch_max_records == 0 {
            self.push("mqtt.batch_max_records", "must be at least 1");
        }
        let reconnect_min = m.reconnect_min.unwrap_or(Duration::from_secs(1));
        let reconnect_max = m.reconnect_max.unwrap_or(Duration::from_secs(60));
        if reconnect_min.is_zero() || reconnect_max < reconnect_min {
            self.push(
                "mqtt.reconnect_min",
                "reconnect_min must be > 0 and not above reconnect_max",
            );
        }
        Mqtt {
            host: m.host,
            port,
            client_id: m
                .client_id
                .unwrap_or_else(|| format!("meterd-{gateway_id}")),
            topic_prefix: prefix,
            keep_alive: m.keep_alive.unwrap_or(Duration::from_secs(30)),
            credentials,
            tls,
            batch_max_records,
            batch_max_bytes,
            inflight,
            backlog_share,
            max_command_bytes: m.max_command_bytes.unwrap_or(64 * 1024),
            reconnect_min,
            reconnect_max,
        }
    }

    fn gateway(&mut self, g: RawGateway) -> Option<Gateway> {
        if g.id.trim().is_empty() || g.id.contains(['/', '+', '#']) {
            self.push(
                "gateway.id",
                "must be non-empty and contain no '/', '+' or '#' (it becomes an MQTT topic level)",
            );
        }
        let tz = match chrono_tz::Tz::from_str(&g.timezone) {
            Ok(tz) => Some(tz),
            Err(_) => {
                self.push(
                    "gateway.timezone",
                    format!("{:?} is not an IANA timezone name (e.g. \"Asia/Shanghai\", \"Europe/London\")", g.timezone),
                );
                None
            }
        };
        if let Some(l) = &g.log_level {
            if !log_level_ok(l) || tracing_subscriber::EnvFilter::try_new(l).is_err() {
                self.push(
                    "gateway.log_level",
                    format!(
                        "{l:?}: expected error, warn, info, debug, trace or a tracing directive"
                    ),
                );
            }
        }
        Some(Gateway {
            id: g.id,
            site: g.site,
            timezone: tz?,
            control_socket: g
                .control_socket
                .map(|p| self.base.join(p))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            log_level: g.log_level,
        })
    }

    fn profiles(&mut self, cfg: &RawProfiles, base: &Path) -> BTreeMap<String, Arc<Profile>> {
        self.profiles_opt(cfg, base, cfg.dir.is_some())
    }

    fn profiles_opt(
        &mut self,
        cfg: &RawProfiles,
        base: &Path,
        must_exist: bool,
    ) -> BTreeMap<String, Arc<Profile>> {
        let mut out: BTreeMap<String, Arc<Profile>> = BTreeMap::new();
        match profile::builtin() {
            Ok(lib) => out.extend(lib.into_iter().map(|(k, v)| (k, Arc::new(v)))),
            Err(errs) => {
                for (file, i) in errs {
                    self.issues.push(Issue {
                        file,
                        key: i.key,
                        message: i.message,
                    });
                }
            }
        }
        let dir = base.join(cfg.dir.as_deref().unwrap_or(Path::new("profiles")));
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                if must_exist {
                    self.push(
                        "profiles.dir",
                        format!("cannot read directory {}: {e}", dir.display()),
                    );
                }
                return out;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for path in files {
            let file = path.display().to_string();
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| {
                    vec![profile::ProfileIssue {
                        key: String::new(),
                        message: format!("cannot read: {e}"),
                    }]
                })
                .and_then(|t| Profile::from_toml(&t));
            match parsed {
                Ok(p) => {
                    if out.contains_key(&p.name) {
                        self.issues.push(Issue {
                            file,
                            key: "profile.name".into(),
                            message: format!("{:?} is already defined (built-in or another file): give the site profile its own name", p.name),
                        });
                    } else {
                        out.insert(p.name.clone(), Arc::new(p));
                    }
                }
                Err(issues) => self.issues.extend(issues.into_iter().map(|i| Issue {
                    file: file.clone(),
                    key: i.key,
                    message: i.message,
                })),
            }
        }
        out
    }

    fn poll_defaults(&mut self, p: &RawPoll) -> Defaults {
        let d = Defaults {
            interval: p.interval.unwrap_or(Duration::from_secs(10)),
            timeout: p.timeout,
            retries: p.retries.unwrap_or(1),
            backoff: p.backoff.unwrap_or(Duration::from_millis(200)),
            offline_after: p.offline_after.unwrap_or(3),
            probe_interval: p.probe_interval.unwrap_or(Duration::from_secs(60)),
            max_gap: p.max_gap.unwrap_or(8),
        };
        if d.interval < Duration::from_millis(10) {
            self.push("poll.interval", "must be at least 10ms");
        }
        if d.offline_after == 0 {
            self.push("poll.offline_after", "must be at least 1 failed attempt");
        }
        if d.probe_interval.is_zero() {
            self.push("poll.probe_interval", "must be greater than zero");
        }
        d
    }

    fn buses(&mut self, raw: &[(String, Option<RawBus>)]) -> Vec<(String, Bus)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (key, b) in raw {
            let Some(b) = b else { continue };
            if b.name.trim().is_empty() {
                self.push(format!("{key}.name"), "must not be empty");
            } else if !seen.insert(b.name.clone()) {
                self.push(
                    format!("{key}.name"),
                    format!("duplicate bus name {:?}: bus names must be unique", b.name),
                );
            }
            let timeout = b.timeout.unwrap_or(Duration::from_millis(1000));
            if timeout.is_zero() {
                self.push(format!("{key}.timeout"), "must be greater than zero");
            }
            let misplaced = |v: &mut Self, present: bool, field: &str, kind: &str| {
                if present {
                    v.push(
                        format!("{key}.{field}"),
                        format!("not used by a {kind} bus: remove it"),
                    );
                }
            };
            let (transport, floor) = match b.kind {
                BusKind::Rtu => {
                    misplaced(self, b.host.is_some(), "host", "rtu");
                    misplaced(self, b.port.is_some(), "port", "rtu");
                    misplaced(self, b.max_concurrent.is_some(), "max_concurrent", "rtu");
                    let device = match &b.device {
                        Some(d) if !d.trim().is_empty() => d.clone(),
                        _ => {
                            self.push(format!("{key}.device"), "missing: the serial port path, e.g. \"/dev/ttyUSB0\" or \"/dev/serial/by-id/...\"");
                            String::new()
                        }
                    };
                    let baud = b.baud.unwrap_or(9600);
                    if !timing::STANDARD_BAUDS.contains(&baud) {
                        self.push(
                            format!("{key}.baud"),
                            format!("{baud} is not a serial speed a meter supports; expected one of {:?}", timing::STANDARD_BAUDS),
                        );
                    }
                    let data_bits = b.data_bits.unwrap_or(8);
                    if data_bits != 8 {
                        self.push(format!("{key}.data_bits"), format!("{data_bits}: Modbus RTU needs 8 data bits (7 is Modbus ASCII, not supported)"));
                    }
                    let stop_bits = b.stop_bits.unwrap_or(1);
                    if !matches!(stop_bits, 1 | 2) {
                        self.push(
                            format!("{key}.stop_bits"),
                            format!("{stop_bits}: expected 1 or 2"),
                        );
                    }
                    let parity = b.parity.unwrap_or(Parity::None);
                    (
                        Transport::Rtu(Serial {
                            device,
                            baud,
                            parity,
                            data_bits,
                            stop_bits,
                        }),
                        timing::t35(baud),
                    )
                }
                BusKind::Tcp | BusKind::RtuOverTcp => {
                    let kind = if matches!(b.kind, BusKind::Tcp) {
                        "tcp"
                    } else {
                        "rtu_over_tcp"
                    };
                    misplaced(self, b.device.is_some(), "device", kind);
                    misplaced(self, b.parity.is_some(), "parity", kind);
                    misplaced(self, b.data_bits.is_some(), "data_bits", kind);
                    misplaced(self, b.stop_bits.is_some(), "stop_bits", kind);
                    let host = match &b.host {
                        Some(h) if !h.trim().is_empty() => h.clone(),
                        _ => {
                            self.push(
                                format!("{key}.host"),
                                "missing: the IP address or name of the Modbus TCP endpoint",
                            );
                            String::new()
                        }
                    };
                    let port = match b.port {
                        Some(p @ 1..=65535) => p as u16,
                        None => 502,
                        Some(p) => {
                            self.push(
                                format!("{key}.port"),
                                format!("{p} is not a TCP port (1..=65535)"),
                            );
                            502
                        }
                    };
                    let connect_timeout = b.connect_timeout.unwrap_or(Duration::from_secs(3));
                    if matches!(b.kind, BusKind::Tcp) {
                        misplaced(self, b.baud.is_some(), "baud", kind);
                        let max_concurrent = b.max_concurrent.unwrap_or(1);
                        if !(1..=32).contains(&max_concurrent) {
                            self.push(format!("{key}.max_concurrent"), format!("{max_concurrent}: expected 1..=32 (most meters and gateways serve 1-4 connections)"));
                        }
                        (
                            Transport::Tcp {
                                host,
                                port,
                                max_concurrent,
                                connect_timeout,
                            },
                            Duration::ZERO,
                        )
                    } else {
                        misplaced(self, b.max_concurrent.is_some(), "max_concurrent", kind);
                        // The serial side behind the gateway still needs its t3.5.
                        let baud = b.baud.unwrap_or(9600);
                        if !timing::STANDARD_BAUDS.contains(&baud) {
                            self.push(format!("{key}.baud"), format!("{baud} is not a serial speed; it is the gateway's serial-side speed, used for the t3.5 gap"));
                        }
                        (
                            Transport::RtuOverTcp {
                                host,
                                port,
                                connect_timeout,
                            },
                            timing::t35(baud),
                        )
                    }
                }
            };
            let gap = b.gap.unwrap_or(floor);
            if gap < floor {
                self.push(
                    format!("{key}.gap"),
                    format!("{gap:?} is shorter than t3.5 = {floor:?} at this baud rate: frames would merge on the line"),
                );
            }
            out.push((
                key.clone(),
                Bus {
                    name: b.name.clone(),
                    transport,
                    timeout,
                    gap,
                    connect_delay: b.connect_delay.unwrap_or_default(),
                },
            ));
        }
        // One line, one bus task: two tasks on one RS485 line would put two masters on it.
        let mut lines: HashMap<String, String> = HashMap::new();
        for (key, b) in &out {
            let line = match &b.transport {
                Transport::Rtu(s) => format!("serial device {}", s.device),
                Transport::RtuOverTcp { host, port, .. } => {
                    format!("RTU-over-TCP endpoint {host}:{port}")
                }
                Transport::Tcp { .. } => continue,
            };
            if let Some(first) = lines.insert(line.clone(), b.name.clone()) {
                self.push(
                    key.clone(),
                    format!("bus {:?} uses the {line} of bus {first:?}: one RS485 line is one [[bus]]; put both buses' devices on one", b.name),
                );
            }
        }
        out
    }

    fn devices(
        &mut self,
        raw: &[(String, Option<RawDevice>)],
        buses: &[(String, Bus)],
        profiles: &BTreeMap<String, Arc<Profile>>,
        defaults: &Defaults,
    ) -> Vec<Device> {
        let bus_index: HashMap<&str, usize> = buses
            .iter()
            .enumerate()
            .map(|(i, (_, b))| (b.name.as_str(), i))
            .collect();
        let mut names = HashSet::new();
        let mut units: HashMap<(usize, u32), String> = HashMap::new();
        let mut out = Vec::new();
        for (key, d) in raw {
            let Some(d) = d else { continue };
            if d.name.trim().is_empty() {
                self.push(format!("{key}.name"), "must not be empty");
            } else if !names.insert(d.name.clone()) {
                self.push(
                    format!("{key}.name"),
                    format!(
                        "duplicate device name {:?}: device names must be unique",
                        d.name
                    ),
                );
            }
            let bus = bus_index.get(d.bus.as_str()).copied();
            if bus.is_none() {
                let known: Vec<&str> = bus_index.keys().copied().collect();
                self.push(
                    format!("{key}.bus"),
                    format!("unknown bus {:?}; defined buses: {known:?}", d.bus),
                );
            }
            let profile = profiles.get(&d.profile).cloned();
            if profile.is_none() {
                self.push(
                    format!("{key}.profile"),
                    format!(
                        "unknown profile {:?}; available: {} (or add a file under profiles/)",
                        d.profile,
                        profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            if let Some(b) = bus {
                let is_tcp = matches!(buses[b].1.transport, Transport::Tcp { .. });
                let range = if is_tcp { 0..=255 } else { 1..=247 };
                if !range.contains(&d.unit) {
                    let why = if is_tcp {
                        "a Modbus TCP unit id is 0..=255"
                    } else {
                        "an RS485 unit id is 1..=247 (0 is broadcast, 248-255 reserved)"
                    };
                    self.push(format!("{key}.unit"), format!("{}: {why}", d.unit));
                } else if let Some(other) = units.insert((b, d.unit), d.name.clone()) {
                    self.push(
                        format!("{key}.unit"),
                        format!("unit {} is already used by device {other:?} on bus {:?}: two meters cannot share an address", d.unit, d.bus),
                    );
                }
            }
            let interval = d.interval.unwrap_or(defaults.interval);
            if interval < Duration::from_millis(10) {
                self.push(format!("{key}.interval"), "must be at least 10ms");
            }
            let timeout = d
                .timeout
                .or(defaults.timeout)
                .or(bus.map(|b| buses[b].1.timeout))
                .unwrap_or(Duration::from_secs(1));
            if timeout.is_zero() {
                self.push(format!("{key}.timeout"), "must be greater than zero");
            }
            let (Some(bus), Some(profile)) = (bus, profile) else {
                continue;
            };
            let limits = Limits {
                max_registers: profile.max_registers_per_read,
                max_bits: profile.max_bits_per_read,
                max_gap: defaults.max_gap,
            };
            let needs: Vec<Need> = profile.registers.iter().map(Need::from).collect();
            let pause = d
                .pause
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(u64::from(profile.min_gap_ms)));
            out.push(Device {
                name: Arc::from(d.name.as_str()),
                bus,
                unit: d.unit as u8,
                plan: plan::plan(&needs, limits),
                policy: PollPolicy {
                    interval,
                    retries: d.retries.unwrap_or(defaults.retries),
                    backoff: defaults.backoff,
                    offline_after: defaults.offline_after.max(1),
                    probe_interval: defaults.probe_interval,
                    settle: if matches!(buses[bus].1.transport, Transport::Tcp { .. }) {
                        Duration::ZERO
                    } else {
                        timeout
                    },
                },
                timeout,
                pause,
                profile,
            });
        }
        out
    }
}

struct Defaults {
    interval: Duration,
    timeout: Option<Duration>,
    retries: u32,
    backoff: Duration,
    offline_after: u32,
    probe_interval: Duration,
    max_gap: u16,
}

/// Loads the built-in profiles plus the `*.toml` files of `dir` (if it exists): the library both the
/// daemon and the simulator use. Problems name the profile file.
pub fn load_profiles(dir: &Path) -> Result<BTreeMap<String, Arc<Profile>>, Vec<Issue>> {
    let mut v = Validator {
        file: dir.display().to_string(),
        base: dir.to_path_buf(),
        issues: Vec::new(),
    };
    let base = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().map(PathBuf::from);
    let raw = RawProfiles { dir: name };
    let profiles = v.profiles_opt(&raw, base, false);
    if v.issues.is_empty() {
        Ok(profiles)
    } else {
        Err(v.issues)
    }
}

/// Entries that parsed, with their keys (the others already produced an issue).
fn flat<T>(v: Vec<(String, Option<T>)>) -> Vec<(String, T)> {
    v.into_iter()
        .filter_map(|(k, x)| x.map(|x| (k, x)))
        .collect()
}

/// ` (name)` for error keys, when the table has a readable name.
fn name_hint(v: &toml::Value) -> String {
    v.get("name")
        .and_then(|n| n.as_str())
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [gateway]
        id = "gw-1"
        site = "Tower A"
        timezone = "Asia/Shanghai"

        [[bus]]
        name = "rs485-1"
        kind = "rtu"
        device = "/dev/ttyUSB0"
        baud = 9600
        parity = "even"

        [[bus]]
        name = "lan"
        kind = "tcp"
        host = "127.0.0.1"
        port = 5020
        max_concurrent = 2

        [[device]]
        name = "m1"
        bus = "rs485-1"
        unit = 1
        profile = "eastron_sdm630"
        interval = "5s"

        [[device]]
        name = "relays"
        bus = "lan"
        unit = 255
        profile = "relay_waveshare_8ch"
    "#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(text, "test.toml", Path::new("/nonexistent"))
    }

    fn issues(text: &str) -> Vec<String> {
        match load(text) {
            Err(ConfigError::Invalid(i)) => i.iter().map(|i| i.to_string()).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_log_level_like_loud_is_refused_and_directives_are_accepted() {
        let with = |l: &str| {
            GOOD.replace(
                "timezone = \"Asia/Shanghai\"",
                &format!("timezone = \"Asia/Shanghai\"\nlog_level = \"{l}\""),
            )
        };
        let i = issues(&with("loud"));
        assert!(
            i.iter().any(
                |m| m.contains("gateway.log_level") && m.contains("expected error, warn, info")
            ),
            "{i:?}"
        );
        assert!(!issues(&with("info,meterd::uplink=verbose")).is_empty());
        for ok in ["info", "DEBUG", "warn,meterd::uplink=debug", "off"] {
            load(&with(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn two_buses_on_one_serial_device_or_one_rtu_over_tcp_endpoint_are_refused() {
        let twice = GOOD.to_string()
            + r#"
        [[bus]]
        name = "rs485-again"
        kind = "rtu"
        device = "/dev/ttyUSB0"
        baud = 2400
        parity = "even"
        [[bus]]
        name = "moxa-1"
        kind = "rtu_over_tcp"
        host = "192.168.1.50"
        port = 4001
        [[bus]]
        name = "moxa-1-again"
        kind = "rtu_over_tcp"
        host = "192.168.1.50"
        port = 4001
        [[bus]]
        name = "moxa-1-port-2"
        kind = "rtu_over_tcp"
        host = "192.168.1.50"
        port = 4002
        "#;
        let i = issues(&twice);
        assert!(
            i.iter().any(|m| m.contains("rs485-again")
                && m.contains("serial device /dev/ttyUSB0 of bus \"rs485-1\"")),
            "{i:?}"
        );
        assert!(
            i.iter()
                .any(|m| m.contains("moxa-1-again") && m.contains("192.168.1.50:4001")),
            "{i:?}"
        );
        assert_eq!(
            i.len(),
            2,
            "the second port of the same server is another line: {i:?}"
        );
    }

    #[test]
    fn a_good_config_loads_with_defaults_and_plans() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.buses[0].gap, timing::t35(9600));
        assert_eq!(c.devices[0].policy.interval, Duration::from_secs(5));
        assert_eq!(
            c.devices[0].pause,
            Duration::from_millis(60),
            "Eastron quirk from the profile"
        );
        // Default max_gap 8: 0x0000-0x000B and 0x0034-0x004B; the 40-register hole is not read.
        let spans: Vec<(u16, u16)> = c.devices[0]
            .plan
            .requests
            .iter()
            .map(|r| (r.address, r.count))
            .collect();
        assert_eq!(spans, vec![(0x00, 12), (0x34, 24)]);
        assert_eq!(c.buses[1].concurrency(), 2);
        assert_eq!(c.gateway.timezone, chrono_tz::Asia::Shanghai);
    }

    #[test]
    fn every_problem_is_listed_at_once_with_file_and_key() {
        let bad = r#"
            [gateway]
            id = "gw/1"
            site = "x"
            timezone = "Mars/Olympus"

            [[bus]]
            name = "a"
            kind = "rtu"
            device = "/dev/ttyS0"
            baud = 9601
            gap = "1ms"

            [[bus]]
            name = "a"
            kind = "tcp"
            host = "h"
            port = 70000

            [[device]]
            name = "m1"
            bus = "a"
            unit = 1
            profile = "nope"

            [[device]]
            name = "m1"
            bus = "zzz"
            unit = 1
            profile = "eastron_sdm120"

            [[device]]
            name = "m2"
            bus = "a"
            unit = "one"
            profile = "eastron_sdm120"

            [[device]]
            name = "m3"
            bus = "a"
            unit = 1
            profile = "eastron_sdm120"

            [modem]
        "#;
        let all = issues(bad).join("\n");
        for expected in [
            "test.toml: gateway.id: must be non-empty",
            "test.toml: gateway.timezone: \"Mars/Olympus\" is not an IANA timezone",
            "test.toml: bus[0] (a).baud: 9601 is not a serial speed",
            "test.toml: bus[0] (a).gap: ",
            "shorter than t3.5",
            "test.toml: bus[1] (a).name: duplicate bus name \"a\"",
            "test.toml: bus[1] (a).port: 70000 is not a TCP port",
            "test.toml: device[0] (m1).profile: unknown profile \"nope\"",
            "test.toml: device[1] (m1).name: duplicate device name \"m1\"",
            "test.toml: device[1] (m1).bus: unknown bus \"zzz\"",
            "test.toml: device[2] (m2): invalid type",
            "test.toml: device[3] (m3).unit: unit 1 is already used by device \"m1\"",
            "test.toml: modem: unknown section",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn rtu_unit_ids_are_1_to_247_but_tcp_allows_255() {
        let bad = GOOD.replace("unit = 1\n", "unit = 248\n");
        let all = issues(&bad).join("\n");
        assert!(
            all.contains("device[0] (m1).unit: 248: an RS485 unit id is 1..=247"),
            "{all}"
        );
        assert!(load(GOOD).is_ok());
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let all = issues("[gateway\nid=").join("\n");
        assert!(all.starts_with("test.toml: not valid TOML"), "{all}");
    }

    #[test]
    fn user_profiles_load_from_the_profiles_dir_and_their_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("profiles")).unwrap();
        std::fs::write(
            dir.path().join("profiles/site_meter.toml"),
            "[profile]\nname = \"site_meter\"\nsource = \"test\"\n[[register]]\nname = \"e\"\nquantity = \"energy_kwh\"\nfunction = \"holding\"\naddress = 0\ntype = \"u32\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("profiles/broken.toml"),
            "[profile]\nname = \"broken\"\nsource = \"x\"\n[[register]]\nname = \"e\"\nquantity = \"energy_kwh\"\nfunction = \"holding\"\naddress = 65535\ntype = \"u32\"\n",
        )
        .unwrap();
        let text = GOOD.replace("profile = \"eastron_sdm630\"", "profile = \"site_meter\"");
        let err = Config::from_str_at(&text, "meterd.toml", dir.path()).unwrap_err();
        let ConfigError::Invalid(issues) = err else {
            panic!()
        };
        assert!(
            issues
                .iter()
                .all(|i| i.file.ends_with("profiles/broken.toml")),
            "{issues:?}"
        );
        assert!(
            issues
                .iter()
                .any(|i| i.message.contains("register range overflow")),
            "{issues:?}"
        );
        std::fs::remove_file(dir.path().join("profiles/broken.toml")).unwrap();
        let c = Config::from_str_at(&text, "meterd.toml", dir.path()).unwrap();
        assert_eq!(c.devices[0].profile.name, "site_meter");
    }

    #[test]
    fn store_and_mqtt_sections_are_validated_with_the_rest() {
        let text = format!(
            "{GOOD}\n[store]\npath = \"state/outbox.db\"\nmax_rows = 10\n[mqtt]\nhost = \"broker\"\nusername = \"u\"\nbacklog_share = 2.0\ntopic_prefix = \"a/#\"\n[mqtt.tls]\nca_file = \"missing-ca.pem\"\n"
        );
        let all = issues(&text).join("\n");
        for expected in [
            "store.max_rows: 10: keep at least 1000 rows",
            "mqtt.password: username is set but password is missing",
            "mqtt.backlog_share: 2: expected 0.05..=0.95",
            "mqtt.topic_prefix: \"a/#\": must be non-empty, without wildcards",
            "mqtt.tls.ca_file: cannot read /nonexistent/missing-ca.pem",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        let ok = load(&format!(
            "{GOOD}\n[store]\npath = \"state/outbox.db\"\n[mqtt]\nhost = \"broker\"\n"
        ))
        .unwrap();
        let m = ok.mqtt.unwrap();
        assert_eq!(
            (m.port, m.client_id.as_str(), m.topic_prefix.as_str()),
            (1883, "meterd-gw-1", "meterd")
        );
        assert_eq!(
            ok.store.path,
            Path::new("/nonexistent/state/outbox.db"),
            "relative to the config file"
        );
        assert_eq!(ok.hash.len(), 16);
    }

    #[test]
    fn topology_errors_name_the_node_and_are_all_listed() {
        let devices = r#"
            [[device]]
            name = "main"
            bus = "lan"
            unit = 1
            profile = "chint_dtsu666"
            [[device]]
            name = "sub1"
            bus = "lan"
            unit = 2
            profile = "eastron_sdm120"
            [[device]]
            name = "sub2"
            bus = "lan"
            unit = 3
            profile = "eastron_sdm120"
            [[device]]
            name = "stray"
            bus = "lan"
            unit = 4
            profile = "eastron_sdm120"
            [[device]]
            name = "wm"
            bus = "lan"
            unit = 5
            profile = "water_xintai_valve"
        "#;
        let topo = r#"
            [[room]]
            id = "101"
            [[room]]
            id = "102"
            area_m2 = 20
            [[room]]
            id = "103"
            area_m2 = 30
            [[meter]]
            name = "main"
            utility = "electricity"
            parent = "sub2"
            [[meter]]
            name = "sub1"
            utility = "electricity"
            parent = "main"
            room = "101"
            [[meter]]
            name = "sub2"
            utility = "electricity"
            parent = "main"
            room = "102"
            [[meter]]
            name = "sub1-again"
            device = "sub1"
            utility = "electricity"
            parent = "sub2"
            [[meter]]
            name = "wm"
            utility = "water"
            parent = "main"
            [[meter]]
            name = "virt"
            utility = "electricity"
            virtual = "main - nope"
            [[pool]]
            name = "lifts"
            utility = "electricity"
            rooms = ["101", "102"]
            method = { area = 0.5, consumption = 0.6 }
        "#;
        let text = format!(
            "{}\n{devices}\n{topo}",
            GOOD.split("[[device]]").next().unwrap()
        );
        let all = issues(&text).join("\n");
        for expected in [
            "meter[0] (main).parent: cycle: main → sub2 → main",
            "meter[3] (sub1-again).device: device \"sub1\" is already meter \"sub1\" (parent main); a meter with two parents (sub2)",
            "meter[4] (wm).parent: a water meter \"wm\" under an electricity meter \"main\": a tree never mixes utilities",
            "meter[5] (virt).virtual: unknown meter \"nope\"",
            "device (stray): meters energy or water but is in no [[meter]] tree",
            "room (103): no meter bills this room",
            "pool[0] (lifts).method: weights must be ≥ 0 and sum to 1 (they sum to 1.1)",
            "pool[0] (lifts).method.area: room \"101\" has no area_m2, which this method needs",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }
}
