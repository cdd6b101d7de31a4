//! The validator: walks the raw form, collects every problem with its key path, builds the typed
//! model. One file per section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{
    Bus, BusKind, Config, Device, Gateway, Issue, Mqtt, Parity, RawBus, RawDevice,
    RawDeviceProtocol, RawGateway, RawMqtt, RawPoll, RawProfiles, RawReport, RawStore, RawTopology,
    RawWeb, ReplacementRecord, Serial, StoreConfig, Tls, TopologyConfig, Transport, DEFAULT_SOCKET,
    DEFAULT_STORE, SECTIONS,
};

mod bus;
mod device;
mod gateway;
mod profiles;
mod report;
mod uplink;
mod web;

/// A log level as an operator writes it: `info`, or directives like `info,meterd::uplink=debug`.
/// (tracing's own parser takes any word as a target name, so `"loud"` would pass it.)
pub(super) fn log_level_ok(l: &str) -> bool {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let level = |s: &str| LEVELS.contains(&s.trim().to_ascii_lowercase().as_str());
    !l.trim().is_empty()
        && l.split(',').all(|d| match d.split_once('=') {
            Some((target, lv)) => !target.trim().is_empty() && level(lv),
            None => level(d),
        })
}

/// FNV-1a 64 of the config text: stable across builds, enough to tell two configs apart.
pub(in crate::config) fn fnv1a(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub(super) struct Validator {
    pub(super) file: String,
    /// Directory relative paths are resolved against.
    pub(super) base: PathBuf,
    pub(super) issues: Vec<Issue>,
    /// Whether validation may look outside the text: read the site profile directory, check that
    /// TLS files exist. Off for `meterd check --no-environment` (CI, a laptop without the files).
    pub(super) environment: bool,
}

pub(super) struct Defaults {
    pub(super) interval: Duration,
    pub(super) timeout: Option<Duration>,
    pub(super) retries: u32,
    pub(super) backoff: Duration,
    pub(super) offline_after: u32,
    pub(super) probe_interval: Duration,
    pub(super) max_gap: u16,
}

/// Entries that parsed, with their keys (the others already produced an issue).
pub(super) fn flat<T>(v: Vec<(String, Option<T>)>) -> Vec<(String, T)> {
    v.into_iter()
        .filter_map(|(k, x)| x.map(|x| (k, x)))
        .collect()
}

/// ` (name)` for error keys, when the table has a readable name.
pub(super) fn name_hint(v: &toml::Value) -> String {
    v.get("name")
        .and_then(|n| n.as_str())
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

impl Validator {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Deserializes one value, recording a typed error at `key` instead of stopping.
    pub(super) fn typed<T: DeserializeOwned>(
        &mut self,
        key: &str,
        value: toml::Value,
    ) -> Option<T> {
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
    pub(super) fn entries<T: DeserializeOwned>(
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

    /// Exchanges: of a polled meter, with readings a display can show, one per meter and instant.
    fn replacements(&mut self, replacements: &[ReplacementRecord], site: &crate::topology::Site) {
        for (i, r) in replacements.iter().enumerate() {
            match site.meters.get(&r.meter).map(|m| &m.source) {
                None => self.push(
                    format!("replacement[{i}].meter"),
                    format!("unknown meter {:?}", r.meter),
                ),
                Some(crate::topology::Source::Virtual(_)) => self.push(
                    format!("replacement[{i}].meter"),
                    format!(
                        "{:?} is virtual: exchange the polled meters it is computed from",
                        r.meter
                    ),
                ),
                Some(crate::topology::Source::Device(_)) => {}
            }
            for (k, v) in [
                ("final_reading", r.final_reading),
                ("initial_reading", r.initial_reading),
            ] {
                if !v.is_finite() || v < 0.0 {
                    self.push(
                        format!("replacement[{i}].{k}"),
                        format!("{v}: expected the counter as the meter's display shows it (≥ 0)"),
                    );
                }
            }
            if replacements[..i]
                .iter()
                .any(|o| o.meter == r.meter && o.at == r.at)
            {
                self.push(
                format!("replacement[{i}].at"),
                format!(
                    "meter {:?} already has an exchange at {}: one meter is exchanged once at a time",
                    r.meter, r.at
                ),
            );
            }
        }
    }

    pub(super) fn build(&mut self, text: &str, base: &Path) -> Option<Config> {
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
        let raw_report: RawReport = table
            .remove("report")
            .and_then(|v| self.typed("report", v))
            .unwrap_or_default();
        let raw_web: RawWeb = table
            .remove("web")
            .and_then(|v| self.typed("web", v))
            .unwrap_or_default();
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
        let report = self.report(raw_report, &raw_devices);
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
        let mut version_issues = Vec::new();
        let (first_tariffs, later_tariffs) =
            crate::topology::split_tariff_versions(flat(tariffs), &mut version_issues);
        let (mut site, topo_issues) = crate::topology::build(
            flat(rooms),
            flat(meters),
            flat(pools),
            first_tariffs,
            threshold,
            &quantities,
        );
        for (k, m) in topo_issues {
            self.push(k, m);
        }
        let replacements: Vec<ReplacementRecord> =
            flat(replacements).into_iter().map(|(_, r)| r).collect();
        self.replacements(&replacements, &site);
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
        let tz = gateway.as_ref().map_or(chrono_tz::UTC, |g| g.timezone);
        let mut assign_issues = Vec::new();
        site.assignments =
            crate::topology::assignments(&site, flat(assignments), tz, &mut assign_issues);
        site.tariff_changes =
            crate::topology::tariff_changes(&site, later_tariffs, tz, &mut version_issues);
        assign_issues.extend(version_issues);
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
        let web = self.web(raw_web, base);
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
            report,
            web,
            replacements,
            enforcement,
            gateway,
            buses: buses.into_iter().map(|(_, b)| b).collect(),
            devices,
            profiles,
        })
    }
}
