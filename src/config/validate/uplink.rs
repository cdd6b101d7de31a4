//! `[store]` and `[mqtt]`: the outbox and the broker connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Mqtt, RawMqtt, RawStore, StoreConfig, Tls, Validator, DEFAULT_STORE};

impl Validator {
    pub(in crate::config) fn store(&mut self, s: RawStore, base: &Path) -> StoreConfig {
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

    pub(in crate::config) fn mqtt(&mut self, m: RawMqtt, gateway_id: &str, base: &Path) -> Mqtt {
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
                if v.environment && std::fs::metadata(&full).is_err() {
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
}
