//! The site configuration: one TOML file, parsed into a raw form, validated as a whole (every problem
//! collected, each naming the file, the key path and what is expected), then built into typed values.
//!
//! A broken config is rejected before anything starts: the daemon never runs half a config.
//!
//! Layout: this file is the typed model; [`raw`] the serde layer (`deny_unknown_fields`);
//! [`validate`] the validator with one file per section (gateway, bus, device, store and mqtt,
//! profiles), all collecting into one `Issue` list. The site (`topology`) and `[enforcement]`
//! sections are validated by their own modules into the same list.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::modbus::profile::Profile;

/// The bus and device specs live with the Modbus layer that uses them; config builds them.
pub use crate::modbus::spec::{Bus, Device, Parity, Serial, Transport};
/// The `[mqtt]` section's types belong to the uplink that uses them.
pub use crate::uplink::{Mqtt, Tls};

mod model;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use raw::{
    BusKind, RawBus, RawDevice, RawDeviceProtocol, RawGateway, RawMqtt, RawPoll, RawProfiles,
    RawReport, RawStore, RawTopology, RawWeb, SECTIONS,
};
use validate::Validator;

/// A log level as operators write it (`info`, or `info,meterd::uplink=debug`) as a filter; None when
/// it is not one (a bare word like `loud` would otherwise pass as a target name).
#[must_use]
pub fn log_filter(l: &str) -> Option<tracing_subscriber::filter::Targets> {
    if validate::log_level_ok(l) {
        l.parse().ok()
    } else {
        None
    }
}

/// Where the daemon looks when `--config` is not given.
pub(crate) const DEFAULT_PATH: &str = "/etc/meterd/meterd.toml";

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
    /// Log filter for `meterd run` (`RUST_LOG` and --log-level override it).
    pub log_level: Option<String>,
}

/// Default local control socket (systemd's `RuntimeDirectory`).
pub(crate) const DEFAULT_SOCKET: &str = "/run/meterd/control.sock";

/// Where the outbox lives and how large it may grow.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub caps: crate::store::Caps,
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
    /// What of each poll goes to the cloud.
    pub report: crate::report::ReportPolicy,
    /// The local read-only web view (off unless `[web]` says where to listen).
    pub web: WebConfig,
}

/// `[web]`: where the read-only web view listens. Off when neither is set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WebConfig {
    /// A TCP address on the LAN; every request must carry `token`.
    pub listen: Option<std::net::SocketAddr>,
    /// The shared secret for `listen` (at least 16 characters).
    pub token: Option<String>,
    /// A Unix socket for a local reverse proxy: mode 0660, group `meterd`, no token (the
    /// socket's group is the access control, as for the control socket).
    pub socket: Option<PathBuf>,
    /// A listener already bound to `listen`, served instead of binding it again: `meterd demo`
    /// binds its port before printing the address, so another process cannot take it in between.
    /// Never from the config file.
    pub bound: Option<BoundListener>,
}

/// A bound TCP listener handed to the web view once; equal to any other (it is not configuration).
#[derive(Debug, Clone, Default)]
pub struct BoundListener(Arc<std::sync::Mutex<Option<std::net::TcpListener>>>);

impl BoundListener {
    /// Wraps a listener bound by the caller.
    #[must_use]
    pub fn new(l: std::net::TcpListener) -> BoundListener {
        BoundListener(Arc::new(std::sync::Mutex::new(Some(l))))
    }

    /// The listener, the first time only.
    pub(crate) fn take(&self) -> Option<std::net::TcpListener> {
        self.0.lock().ok()?.take()
    }
}

impl PartialEq for BoundListener {
    fn eq(&self, _: &BoundListener) -> bool {
        true
    }
}

impl WebConfig {
    /// True when the view is served anywhere.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || self.socket.is_some()
    }
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

impl ReplacementRecord {
    /// The exchange as consumption and bills use it.
    pub(crate) fn exchange(&self) -> crate::topology::Replacement {
        crate::topology::Replacement {
            at: self.at,
            final_reading: self.final_reading,
            initial_reading: self.initial_reading,
        }
    }
}

impl Config {
    /// The part of the configuration the enforcer works from.
    pub(crate) fn enforcer_setup(&self) -> crate::enforce::config::Setup {
        crate::enforce::config::Setup {
            enforcement: self.enforcement.clone(),
            site: self.site.clone(),
            timezone: self.gateway.timezone,
            history_every: self.topology.history_every,
            store_path: self.store.path.clone(),
        }
    }

    /// Reads and validates a config file; profile files are looked up next to it.
    pub fn from_path(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_str_at(&text, &path.display().to_string(), base)
    }

    /// Validates config text; `file` names it in errors, `base` resolves relative paths and holds
    /// the site profile directory. TLS files must exist.
    pub fn from_str_at(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::validate(text, file, base, true)
    }

    /// Validates config text alone, touching nothing outside it (like Vector's
    /// `validate --no-environment`): built-in profiles only, TLS paths not checked, relative paths
    /// resolved against `base` without looking there.
    pub fn from_str_only(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::validate(text, file, base, false)
    }

    fn validate(
        text: &str,
        file: &str,
        base: &Path,
        environment: bool,
    ) -> Result<Config, ConfigError> {
        let mut v = Validator {
            file: file.to_string(),
            base: base.to_path_buf(),
            issues: Vec::new(),
            environment,
        };
        let config = v.build(text, base);
        match config {
            Some(c) if v.issues.is_empty() => Ok(c),
            _ => Err(ConfigError::Invalid(v.issues)),
        }
    }

    /// Looks a device up by name.
    #[must_use]
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| &*d.name == name)
    }

    /// Looks a bus up by name.
    pub(crate) fn bus_index(&self, name: &str) -> Option<usize> {
        self.buses.iter().position(|b| b.name == name)
    }
}

// ---- raw form ---------------------------------------------------------------------------------

/// Default outbox location (systemd's `StateDirectory`).
pub(crate) const DEFAULT_STORE: &str = "/var/lib/meterd/outbox.db";

/// Loads the built-in profiles plus the `*.toml` files of `dir` (if it exists): the library both the
/// daemon and the simulator use. Problems name the profile file.
pub(crate) fn load_profiles(dir: &Path) -> Result<BTreeMap<String, Arc<Profile>>, Vec<Issue>> {
    let mut v = Validator {
        file: dir.display().to_string(),
        base: dir.to_path_buf(),
        issues: Vec::new(),
        environment: true,
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
