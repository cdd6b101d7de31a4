//! `[poll]` defaults and `[[device]]`: unit ids, profiles, read plans, poll policies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::modbus::plan::{self, Limits, Need};
use crate::modbus::profile::Profile;
use crate::modbus::schedule::PollPolicy;

use super::{Bus, Defaults, Device, RawDevice, RawDeviceProtocol, RawPoll, Transport, Validator};
use crate::catalog::Quantity;
use crate::modbus::decode::{ByteOrder, DataType, WordOrder};
use crate::modbus::profile::{Function, OutputDef, RegisterDef};
use crate::modbus::spec::{Dlt645Meter, Protocol, WaterMeter};

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
        let mut addresses: HashMap<(usize, String), String> = HashMap::new();
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
            let national = self.national(key, d, bus.map(|b| &buses[b].1));
            let profile = match &national {
                Some((_, p)) => Some(p.clone()),
                None if d.protocol != RawDeviceProtocol::Modbus => None,
                None => profiles.get(&d.profile).cloned(),
            };
            if profile.is_none() && d.protocol == RawDeviceProtocol::Modbus {
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
            if let (Some(b), RawDeviceProtocol::Modbus) = (bus, d.protocol) {
                let Some(unit) = d.unit else {
                    self.push(
                        format!("{key}.unit"),
                        "required for a Modbus device: its unit id (1..=247 on RS485); a DL/T 645 or CJ/T 188 meter says protocol = \"dlt645\" / \"cjt188\" and its address",
                    );
                    continue;
                };
                let is_tcp = matches!(buses[b].1.transport, Transport::Tcp { .. });
                let range = if is_tcp { 0..=255 } else { 1..=247 };
                if !range.contains(&unit) {
                    let why = if is_tcp {
                        "a Modbus TCP unit id is 0..=255"
                    } else {
                        "an RS485 unit id is 1..=247 (0 is broadcast, 248-255 reserved)"
                    };
                    self.push(format!("{key}.unit"), format!("{unit}: {why}"));
                } else if let Some(other) = units.insert((b, unit), d.name.clone()) {
                    self.push(
                        format!("{key}.unit"),
                        format!("unit {unit} is already used by device {other:?} on bus {:?}: two meters cannot share an address", d.bus),
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
            if let (Some(b), Some((protocol, _))) = (bus, &national) {
                let address = protocol.address().unwrap_or_default();
                if let Some(other) = addresses.insert((b, address.clone()), d.name.clone()) {
                    self.push(
                        format!("{key}.address"),
                        format!("meter {address} is already device {other:?} on bus {:?}: two devices cannot read one meter", d.bus),
                    );
                }
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
            let (protocol, needs) = match national {
                Some((p, _)) => (p, Vec::new()),
                None => (Protocol::Modbus, needs),
            };
            out.push(Device {
                name: Arc::from(d.name.as_str()),
                bus,
                unit: d.unit.unwrap_or(0) as u8,
                protocol,
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

impl Validator {
    /// A DL/T 645 / CJ/T 188 device's protocol and the profile of the readings it gives; `None`
    /// for a Modbus device or after reporting why it cannot be read.
    fn national(
        &mut self,
        key: &str,
        d: &RawDevice,
        bus: Option<&Bus>,
    ) -> Option<(Protocol, Arc<Profile>)> {
        let what = match d.protocol {
            RawDeviceProtocol::Modbus => return None,
            RawDeviceProtocol::Dlt645 => "DL/T 645",
            RawDeviceProtocol::Cjt188 => "CJ/T 188",
        };
        if bus.is_some_and(|b| matches!(b.transport, Transport::Tcp { .. })) {
            self.push(format!("{key}.bus"), format!("{:?} is Modbus TCP: {what} meters hang on a serial line (kind = \"rtu\") or a serial server passing raw bytes (kind = \"rtu_over_tcp\")", d.bus));
            return None;
        }
        if d.unit.is_some() {
            self.push(
                format!("{key}.unit"),
                format!("a {what} meter has no unit id: give its address"),
            );
        }
        let preamble = d
            .preamble
            .map_or(crate::dlt645::frame::DEFAULT_PREAMBLE, usize::from);
        if preamble > 4 {
            self.push(
                format!("{key}.preamble"),
                format!("{preamble}: the standards send 0 to 4 wake-up FE bytes"),
            );
        }
        let Some(address) = d.address.as_deref() else {
            self.push(
                format!("{key}.address"),
                format!("required for a {what} meter: the number on its nameplate"),
            );
            return None;
        };
        let register = |name: &str, quantity: Quantity, unit: &str, i: usize| RegisterDef {
            name: Arc::from(name),
            quantity,
            function: Function::Holding,
            address: u16::try_from(i).unwrap_or(u16::MAX),
            ty: DataType::U16,
            word_order: WordOrder::Big,
            byte_order: ByteOrder::Big,
            scale: 1.0,
            offset: 0.0,
            unit: Arc::from(unit),
        };
        let readings =
            |name: &str, description: String, source: String, registers, outputs| Profile {
                name: name.to_string(),
                description,
                source,
                commissioning: None,
                max_registers_per_read: 1,
                max_bits_per_read: 1,
                min_gap_ms: 0,
                registers,
                outputs,
            };
        if d.protocol == RawDeviceProtocol::Dlt645 {
            let address = crate::dlt645::Address::parse(address)
                .map_err(|e| self.push(format!("{key}.address"), e.to_string()))
                .ok()?;
            let library = crate::dlt645::profile::builtin().ok()?;
            let Some(p) = library.get(&d.profile) else {
                self.push(
                    format!("{key}.profile"),
                    format!(
                        "unknown DL/T 645 profile {:?}; available: {}",
                        d.profile,
                        library.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
                return None;
            };
            let registers = p
                .items
                .iter()
                .enumerate()
                .map(|(i, it)| register(&it.name, it.quantity, &it.unit, i))
                .collect();
            // A meter with a relay item has one output, "relay", switched by 0x1C and read back
            // through that item (status word 3).
            let outputs = p
                .items
                .iter()
                .find(|i| i.quantity == Quantity::RelayState)
                .map(|i| OutputDef {
                    name: "relay".into(),
                    function: Function::Holding,
                    address: 0,
                    on_value: 1,
                    off_value: 0,
                    write_multiple: false,
                    readback: Some(i.name.to_string()),
                    pulse_address: None,
                    pulse_unit_ms: 0,
                })
                .into_iter()
                .collect();
            let credentials = match (d.password_level, &d.password, &d.operator) {
                (None, None, None) => None,
                (level, Some(password), Some(operator)) => {
                    crate::dlt645::data::Credentials::new(level.unwrap_or(2), password, operator)
                        .map_err(|e| self.push(format!("{key}.password"), e.to_string()))
                        .ok()
                        .map(Arc::new)
                }
                _ => {
                    self.push(format!("{key}.password"), "relay control needs both password and operator (and password_level, 2 unless the vendor says otherwise)");
                    None
                }
            };
            let profile = readings(
                &p.name,
                p.description.clone(),
                p.source.clone(),
                registers,
                outputs,
            );
            Some((
                Protocol::Dlt645(Dlt645Meter {
                    address,
                    profile: Arc::new(p.clone()),
                    credentials,
                    preamble,
                }),
                Arc::new(profile),
            ))
        } else {
            let address = crate::cjt188::Address::parse(address)
                .map_err(|e| self.push(format!("{key}.address"), e.to_string()))
                .ok()?;
            let registers = vec![
                register("volume", Quantity::WaterM3, "m3", 0),
                register("valve", Quantity::ValveState, "", 1),
                register("battery_low", Quantity::Other, "", 2),
            ];
            let profile = readings(
                    "cjt188_water",
                    "CJ/T 188-2004 water meter: cumulative volume, valve state (1 = closed, 3 = fault), battery".into(),
                    "CJ/T 188-2004 901F current data (shared/reference/dlt645-cjt188.md §B6-B8)".into(),
                    registers,
                vec![OutputDef {
                    name: "valve".into(),
                    function: Function::Holding,
                    address: 0,
                    on_value: 1,
                    off_value: 0,
                    write_multiple: false,
                    readback: Some("valve".into()),
                    pulse_address: None,
                    pulse_unit_ms: 0,
                }],
                );
            Some((
                Protocol::Cjt188(WaterMeter {
                    address,
                    meter_type: crate::cjt188::MeterType(d.meter_type.unwrap_or(0x10)),
                    order: d.di_order.unwrap_or_default(),
                    preamble,
                }),
                Arc::new(profile),
            ))
        }
    }
}
