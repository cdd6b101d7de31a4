//! The raw serde form of the config file: every section as written, unknown keys refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Parity;
use crate::modbus::profile::Quantity;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTopology {
    pub(super) loss_threshold_pct: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) history_every: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) balance_every: Option<Duration>,
    pub(super) apportion_day: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(super) boundary_wait: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) id: String,
    pub(super) site: String,
    pub(super) timezone: String,
    pub(super) control_socket: Option<PathBuf>,
    pub(super) log_level: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPoll {
    #[serde(default, with = "humantime_serde")]
    pub(super) interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    pub(super) retries: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(super) backoff: Option<Duration>,
    pub(super) offline_after: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(super) probe_interval: Option<Duration>,
    /// Unused registers the planner may read through to merge two requests.
    pub(super) max_gap: Option<u16>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfiles {
    /// Directory of user profile files (`*.toml`), relative to the config file.
    pub(super) dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum BusKind {
    Rtu,
    Tcp,
    RtuOverTcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBus {
    pub(super) name: String,
    pub(super) kind: BusKind,
    // rtu
    pub(super) device: Option<String>,
    pub(super) baud: Option<u32>,
    pub(super) parity: Option<Parity>,
    pub(super) data_bits: Option<u8>,
    pub(super) stop_bits: Option<u8>,
    // tcp, rtu_over_tcp
    pub(super) host: Option<String>,
    pub(super) port: Option<u32>,
    pub(super) max_concurrent: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    pub(super) connect_timeout: Option<Duration>,
    // all
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) gap: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) connect_delay: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    pub(super) name: String,
    pub(super) bus: String,
    /// Modbus unit id (not used by DL/T 645 / CJ/T 188 meters, which have an `address`).
    pub(super) unit: Option<u32>,
    #[serde(default)]
    pub(super) protocol: RawDeviceProtocol,
    /// DL/T 645 / CJ/T 188: the number on the meter's nameplate.
    pub(super) address: Option<String>,
    /// DL/T 645 relay control (0x1C): password level (2 or 4 plaintext), password (6 hex digits)
    /// and operator code (8 hex digits), as the meter's vendor sets them. Never logged.
    pub(super) password_level: Option<u8>,
    pub(super) password: Option<String>,
    pub(super) operator: Option<String>,
    /// DL/T 645 / CJ/T 188: wake-up `FE` bytes before each request (0–4; default 4).
    pub(super) preamble: Option<u8>,
    /// CJ/T 188: the meter type byte (16 = 0x10 cold water, 17 = 0x11 hot water).
    pub(super) meter_type: Option<u8>,
    /// CJ/T 188: how the meter writes its data identifiers.
    pub(super) di_order: Option<crate::cjt188::DiOrder>,
    /// The profile (Modbus or DL/T 645); CJ/T 188 water meters need none.
    #[serde(default)]
    pub(super) profile: String,
    #[serde(default, with = "humantime_serde")]
    pub(super) interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    pub(super) retries: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(super) pause: Option<Duration>,
    /// This device's counters go to the cloud at least this often (`[report] publish_every`).
    #[serde(default, with = "humantime_serde")]
    pub(super) publish_every: Option<Duration>,
}

/// The protocol of a `[[device]]` as written.
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawDeviceProtocol {
    #[default]
    Modbus,
    Dlt645,
    Cjt188,
}

/// `[report]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReport {
    #[serde(default, with = "humantime_serde")]
    pub(super) publish_every: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) max_silence: Option<Duration>,
    /// Per quantity (`power_w = { rel = 0.05, abs = 20.0 }`); replaces that quantity's default.
    #[serde(default)]
    pub(super) deadband: BTreeMap<Quantity, RawDeadband>,
    #[serde(default)]
    pub(super) every_poll: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeadband {
    #[serde(default)]
    pub(super) abs: f64,
    #[serde(default)]
    pub(super) rel: f64,
}

/// Top-level keys this version understands; anything else is a typo or a newer config.
pub(super) const SECTIONS: &[&str] = &[
    "gateway",
    "poll",
    "profiles",
    "store",
    "mqtt",
    "bus",
    "device",
    "report",
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
    "web",
];

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeb {
    pub(super) listen: Option<String>,
    pub(super) token: Option<String>,
    pub(super) socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) path: Option<PathBuf>,
    pub(super) max_rows: Option<u64>,
    pub(super) max_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) max_age: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: PathBuf,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqtt {
    pub(super) host: String,
    pub(super) port: Option<u32>,
    pub(super) client_id: Option<String>,
    pub(super) topic_prefix: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) keep_alive: Option<Duration>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) batch_max_records: Option<usize>,
    pub(super) batch_max_bytes: Option<usize>,
    pub(super) inflight: Option<u16>,
    pub(super) backlog_share: Option<f64>,
    pub(super) max_command_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) reconnect_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) reconnect_max: Option<Duration>,
}
