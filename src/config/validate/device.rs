//! `[poll]` defaults and `[[device]]`: unit ids, profiles, read plans, poll policies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::modbus::plan::{self, Limits, Need};
use crate::modbus::profile::Profile;
use crate::modbus::schedule::PollPolicy;

use super::{Bus, Defaults, Device, RawDevice, RawPoll, Transport, Validator};

impl Validator {
    pub(in crate::config) fn poll_defaults(&mut self, p: &RawPoll) -> Defaults {
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

    pub(in crate::config) fn devices(
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
                let hint = if self.environment {
                    "or add a file under profiles/"
                } else {
                    "site profiles are not read without the environment: check without --no-environment"
                };
                self.push(
                    format!("{key}.profile"),
                    format!(
                        "unknown profile {:?}; available: {} ({hint})",
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
