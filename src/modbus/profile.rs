//! Device profiles: a meter model's register table as data.
//!
//! There is no common layout across meter vendors (function code, address, type, word order and scale
//! all differ), so each model is a TOML file. The built-in ones are embedded from
//! `src/modbus/profiles/*.toml`, each citing the register map it was taken from; a site adds its own in
//! the same format (`config/profiles/*.toml`).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::decode::{ByteOrder, DataType, WordOrder};

/// Modbus object table a value lives in; decides the function code used to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// FC01 read / FC05, FC15 write.
    Coil,
    /// FC02 read only.
    DiscreteInput,
    /// FC03 read / FC06, FC16 write.
    Holding,
    /// FC04 read only.
    Input,
}

impl Function {
    /// True for the 1-bit tables, whose reads count bits instead of registers.
    pub(crate) fn is_bit(self) -> bool {
        matches!(self, Function::Coil | Function::DiscreteInput)
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Function::Coil => "coil",
            Function::DiscreteInput => "discrete_input",
            Function::Holding => "holding",
            Function::Input => "input",
        })
    }
}

pub use crate::catalog::Quantity;

/// One value of a device: where it is, how it is encoded and what it means.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisterDef {
    /// Shared with every reading of this register, so a poll allocates no names.
    pub name: Arc<str>,
    pub quantity: Quantity,
    pub function: Function,
    pub address: u16,
    pub ty: DataType,
    pub word_order: WordOrder,
    pub byte_order: ByteOrder,
    /// engineering value = raw × scale + offset
    pub scale: f64,
    pub offset: f64,
    pub unit: Arc<str>,
}

impl RegisterDef {
    /// The smallest change of the engineering value this register can show near `value`: the
    /// scale for an integer register (0.01 kWh), the float32 spacing × scale for a float one (it
    /// doubles at every power of two: 0.000977 kWh from 8,192 kWh, 0.0078 kWh from 65,536 kWh).
    #[must_use]
    pub fn step_at(&self, value: f64) -> f64 {
        let step = match self.ty {
            super::decode::DataType::F32 => {
                let raw = ((value - self.offset) / self.scale).abs() as f32;
                f64::from(f32::from_bits(raw.to_bits() + 1) - raw)
            }
            super::decode::DataType::F64 => {
                let raw = ((value - self.offset) / self.scale).abs();
                f64::from_bits(raw.to_bits() + 1) - raw
            }
            _ => 1.0,
        };
        step * self.scale.abs()
    }

    /// Width in the object table: bits for coils/inputs, registers otherwise.
    pub(crate) fn width(&self) -> u16 {
        if self.function.is_bit() {
            1
        } else {
            self.ty.words()
        }
    }
}

/// A switchable output (relay channel, meter cut-off relay, valve).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputDef {
    pub name: String,
    /// Coil (FC05) or holding register (FC06/FC16).
    pub function: Function,
    pub address: u16,
    /// Register value meaning "energised/closed"; coils always use 0xFF00 on the wire.
    pub on_value: u16,
    pub off_value: u16,
    /// Some meters ignore FC06 and accept only FC16 (Hiking DDS238).
    pub write_multiple: bool,
    /// Name of the register that reads the actual state back.
    pub readback: Option<String>,
    /// Device-timed pulse (Waveshare "flash on" 0x0200+ch): writing n here energises for n × unit.
    pub pulse_address: Option<u16>,
    pub pulse_unit_ms: u32,
}

/// A meter model's complete description.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Where the register map came from (manual, public driver and commit).
    pub source: String,
    /// How to tell this variant from its siblings at commissioning, where sources disagree.
    pub commissioning: Option<String>,
    /// The device's own ceiling for one register read (SDM630: 80).
    pub max_registers_per_read: u16,
    /// Ceiling for one coil/discrete-input read.
    pub max_bits_per_read: u16,
    /// Silence the device needs between requests (some Eastron models: 60 ms).
    pub min_gap_ms: u32,
    pub registers: Vec<RegisterDef>,
    pub outputs: Vec<OutputDef>,
}

impl Profile {
    /// The largest read allowed for a table on this device.
    pub(crate) fn max_per_read(&self, function: Function) -> u16 {
        if function.is_bit() {
            self.max_bits_per_read
        } else {
            self.max_registers_per_read
        }
    }

    /// The register a reading of this quantity comes from, first match.
    pub(crate) fn register_for(&self, quantity: Quantity) -> Option<&RegisterDef> {
        self.registers.iter().find(|r| r.quantity == quantity)
    }
}

pub use crate::catalog::ProfileIssue;

// ---- on-disk format ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    profile: RawHeader,
    #[serde(default)]
    register: Vec<RawRegister>,
    #[serde(default)]
    output: Vec<RawOutput>,
    relays: Option<RawRelayBank>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    #[serde(default)]
    description: String,
    source: String,
    commissioning: Option<String>,
    #[serde(default = "default_max_regs")]
    max_registers_per_read: u16,
    #[serde(default = "default_max_bits")]
    max_bits_per_read: u16,
    #[serde(default)]
    min_gap_ms: u32,
    /// Defaults for every register of the profile.
    #[serde(default)]
    word_order: WordOrder,
    #[serde(default)]
    byte_order: ByteOrder,
    function: Option<Function>,
    #[serde(rename = "type")]
    ty: Option<DataType>,
}

fn default_max_regs() -> u16 {
    125
}
fn default_max_bits() -> u16 {
    2000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegister {
    name: String,
    quantity: Quantity,
    function: Option<Function>,
    address: u32,
    #[serde(rename = "type")]
    ty: Option<DataType>,
    word_order: Option<WordOrder>,
    byte_order: Option<ByteOrder>,
    #[serde(default = "one")]
    scale: f64,
    #[serde(default)]
    offset: f64,
    unit: Option<String>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    function: Function,
    address: u32,
    #[serde(default = "one_u16")]
    on_value: u16,
    #[serde(default)]
    off_value: u16,
    #[serde(default)]
    write_multiple: bool,
    readback: Option<String>,
    pulse_address: Option<u32>,
    #[serde(default = "hundred")]
    pulse_unit_ms: u32,
}

fn one_u16() -> u16 {
    1
}
fn hundred() -> u32 {
    100
}

/// A bank of N identical relay channels, expanded into registers and outputs (`relay1..N`, `input1..M`)
/// so an 8-, 16- or 30-channel board is one line of config, not 30 copied tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelayBank {
    channels: u16,
    #[serde(default)]
    coil_base: u16,
    pulse_base: Option<u16>,
    #[serde(default = "hundred")]
    pulse_unit_ms: u32,
    #[serde(default)]
    inputs: u16,
    #[serde(default)]
    input_base: u16,
}

impl Profile {
    /// Parses and validates one profile file; every problem is returned, not just the first.
    pub(crate) fn from_toml(text: &str) -> Result<Profile, Vec<ProfileIssue>> {
        let raw: RawProfile = toml::from_str(text).map_err(|e| {
            vec![ProfileIssue {
                key: String::new(),
                message: e.to_string().trim_end().to_string(),
            }]
        })?;
        let mut issues = Vec::new();
        let h = &raw.profile;
        let mut registers = Vec::new();
        for (i, r) in raw.register.iter().enumerate() {
            let key = format!("register[{i}] ({})", r.name);
            let Some(function) = r.function.or(h.function) else {
                issues.push(issue(&key, "function is missing: set coil, discrete_input, holding or input here or in [profile]"));
                continue;
            };
            let ty = r.ty.or(h.ty).unwrap_or(if function.is_bit() {
                DataType::Bool
            } else {
                DataType::U16
            });
            if function.is_bit() && ty != DataType::Bool {
                issues.push(issue(
                    &key,
                    format!("{function} values are single bits: type must be bool, not {ty:?}"),
                ));
            }
            let def = RegisterDef {
                name: Arc::from(r.name.as_str()),
                quantity: r.quantity,
                function,
                address: 0,
                ty,
                word_order: r.word_order.unwrap_or(h.word_order),
                byte_order: r.byte_order.unwrap_or(h.byte_order),
                scale: r.scale,
                offset: r.offset,
                unit: Arc::from(r.unit.as_deref().unwrap_or(r.quantity.default_unit())),
            };
            let width = u32::from(def.width());
            if r.address + width > 0x1_0000 {
                issues.push(issue(
                    &key,
                    format!(
                        "register range overflow: address {:#06x} + {width} word(s) passes 0xFFFF",
                        r.address
                    ),
                ));
                continue;
            }
            if !r.scale.is_finite() || r.scale == 0.0 || !r.offset.is_finite() {
                issues.push(issue(
                    &key,
                    "scale must be a non-zero finite number and offset finite",
                ));
            }
            registers.push(RegisterDef {
                address: r.address as u16,
                ..def
            });
        }
        let mut outputs = Vec::new();
        for (i, o) in raw.output.iter().enumerate() {
            let key = format!("output[{i}] ({})", o.name);
            if !matches!(o.function, Function::Coil | Function::Holding) {
                issues.push(issue(
                    &key,
                    "an output must be a coil or a holding register",
                ));
            }
            let mut addr_ok = |a: u32, what: &str| {
                if a > 0xFFFF {
                    issues.push(issue(&key, format!("{what} {a:#x} is beyond 0xFFFF")));
                    0
                } else {
                    a as u16
                }
            };
            let address = addr_ok(o.address, "address");
            let pulse_address = o.pulse_address.map(|a| addr_ok(a, "pulse_address"));
            outputs.push(OutputDef {
                name: o.name.clone(),
                function: o.function,
                address,
                on_value: o.on_value,
                off_value: o.off_value,
                write_multiple: o.write_multiple,
                readback: o.readback.clone(),
                pulse_address,
                pulse_unit_ms: o.pulse_unit_ms,
            });
        }
        if let Some(bank) = &raw.relays {
            expand_relay_bank(bank, &mut registers, &mut outputs);
        }
        let max_regs = h.max_registers_per_read;
        if max_regs == 0 || max_regs > 125 {
            issues.push(issue(
                "profile.max_registers_per_read",
                format!("{max_regs} is outside 1..=125 (Modbus FC03/FC04 limit)"),
            ));
        }
        if h.max_bits_per_read == 0 || h.max_bits_per_read > 2000 {
            issues.push(issue(
                "profile.max_bits_per_read",
                format!(
                    "{} is outside 1..=2000 (Modbus FC01/FC02 limit)",
                    h.max_bits_per_read
                ),
            ));
        }
        let mut seen = HashSet::new();
        for r in &registers {
            if !seen.insert(r.name.clone()) {
                issues.push(issue(
                    &format!("register ({})", r.name),
                    "duplicate register name: names identify readings, make it unique",
                ));
            }
            if !r.function.is_bit() && r.ty.words() > max_regs {
                issues.push(issue(
                    &format!("register ({})", r.name),
                    format!(
                        "{:?} needs {} registers but max_registers_per_read is {max_regs}",
                        r.ty,
                        r.ty.words()
                    ),
                ));
            }
        }
        for o in &outputs {
            if let Some(rb) = &o.readback {
                if !registers.iter().any(|r| &*r.name == rb.as_str()) {
                    issues.push(issue(
                        &format!("output ({})", o.name),
                        format!(
                            "readback names register {rb:?}, which the profile does not define"
                        ),
                    ));
                }
            }
        }
        if h.name.trim().is_empty() {
            issues.push(issue("profile.name", "must not be empty"));
        }
        if registers.is_empty() {
            issues.push(issue(
                "register",
                "a profile needs at least one register to poll",
            ));
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Profile {
            name: h.name.clone(),
            description: h.description.clone(),
            source: h.source.clone(),
            commissioning: h.commissioning.clone(),
            max_registers_per_read: max_regs,
            max_bits_per_read: h.max_bits_per_read,
            min_gap_ms: h.min_gap_ms,
            registers,
            outputs,
        })
    }
}

fn expand_relay_bank(
    bank: &RawRelayBank,
    registers: &mut Vec<RegisterDef>,
    outputs: &mut Vec<OutputDef>,
) {
    let bit = |name: String, quantity, function, address| RegisterDef {
        name: Arc::from(name),
        quantity,
        function,
        address,
        ty: DataType::Bool,
        word_order: WordOrder::Big,
        byte_order: ByteOrder::Big,
        scale: 1.0,
        offset: 0.0,
        unit: Arc::from(""),
    };
    for ch in 0..bank.channels {
        let name = format!("relay{}", ch + 1);
        registers.push(bit(
            name.clone(),
            Quantity::RelayState,
            Function::Coil,
            bank.coil_base + ch,
        ));
        outputs.push(OutputDef {
            name: name.clone(),
            function: Function::Coil,
            address: bank.coil_base + ch,
            on_value: 1,
            off_value: 0,
            write_multiple: false,
            readback: Some(name),
            pulse_address: bank.pulse_base.map(|b| b + ch),
            pulse_unit_ms: bank.pulse_unit_ms,
        });
    }
    for i in 0..bank.inputs {
        registers.push(bit(
            format!("input{}", i + 1),
            Quantity::DigitalInput,
            Function::DiscreteInput,
            bank.input_base + i,
        ));
    }
}

fn issue(key: &str, message: impl Into<String>) -> ProfileIssue {
    ProfileIssue {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The profile files compiled into the binary, by file name.
pub(crate) const BUILTIN_SOURCES: &[(&str, &str)] = &[
    (
        "eastron_sdm120.toml",
        include_str!("profiles/eastron_sdm120.toml"),
    ),
    (
        "eastron_sdm630.toml",
        include_str!("profiles/eastron_sdm630.toml"),
    ),
    (
        "chint_ddsu666.toml",
        include_str!("profiles/chint_ddsu666.toml"),
    ),
    (
        "chint_ddsu666_h.toml",
        include_str!("profiles/chint_ddsu666_h.toml"),
    ),
    (
        "chint_dtsu666.toml",
        include_str!("profiles/chint_dtsu666.toml"),
    ),
    (
        "chint_dtsu666_h.toml",
        include_str!("profiles/chint_dtsu666_h.toml"),
    ),
    (
        "chint_dtsu666_4000.toml",
        include_str!("profiles/chint_dtsu666_4000.toml"),
    ),
    (
        "water_xintai_valve.toml",
        include_str!("profiles/water_xintai_valve.toml"),
    ),
    (
        "water_pulse_wb_mcm8.toml",
        include_str!("profiles/water_pulse_wb_mcm8.toml"),
    ),
    (
        "hiking_dds238_zn.toml",
        include_str!("profiles/hiking_dds238_zn.toml"),
    ),
    (
        "relay_waveshare_8ch.toml",
        include_str!("profiles/relay_waveshare_8ch.toml"),
    ),
    (
        "relay_waveshare_30ch.toml",
        include_str!("profiles/relay_waveshare_30ch.toml"),
    ),
];

/// Parses the built-in library. The files are part of the build and a unit test parses each, so a
/// failure here is a bug in meterd, reported with the file name rather than a panic.
pub fn builtin() -> Result<BTreeMap<String, Profile>, Vec<(String, ProfileIssue)>> {
    crate::catalog::parse_builtin(BUILTIN_SOURCES, Profile::from_toml, |p| &p.name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_registers_step_is_its_scale_or_the_float32_spacing_at_the_value() {
        let lib = builtin().unwrap();
        let energy = |name: &str| lib[name].register_for(Quantity::EnergyKwh).unwrap().clone();
        let float = energy("chint_ddsu666");
        for (kwh, step) in [
            (5_123.31, 0.000_488_281_25),
            (8_192.37, 0.000_976_562_5),
            (16_384.5, 0.001_953_125),
            (100_000.2, 0.007_812_5),
        ] {
            assert_eq!(float.step_at(kwh), step, "{kwh}");
        }
        let integer = energy("hiking_dds238_zn");
        assert!((integer.step_at(100_000.2) - 0.01).abs() < 1e-12);
    }
    use super::*;

    #[test]
    fn every_builtin_profile_parses_and_cites_a_source() {
        let lib = builtin().expect("builtin profiles are valid");
        assert_eq!(lib.len(), BUILTIN_SOURCES.len(), "profile names are unique");
        for p in lib.values() {
            assert!(!p.source.trim().is_empty(), "{} cites no source", p.name);
        }
    }

    #[test]
    fn sdm630_matches_the_eastron_map() {
        let lib = builtin().unwrap();
        let p = &lib["eastron_sdm630"];
        assert_eq!(p.max_registers_per_read, 80);
        let e = p.register_for(Quantity::EnergyKwh).unwrap();
        assert_eq!(
            (e.function, e.address, e.ty),
            (Function::Input, 0x0048, DataType::F32)
        );
        let total = p
            .registers
            .iter()
            .find(|r| &*r.name == "power_total")
            .unwrap();
        assert_eq!(total.address, 0x0034);
    }

    #[test]
    fn relay_bank_expands_into_channels_with_pulse_addresses() {
        let lib = builtin().unwrap();
        let p = &lib["relay_waveshare_8ch"];
        assert_eq!(p.outputs.len(), 8);
        assert_eq!(p.outputs[2].address, 2);
        assert_eq!(p.outputs[2].pulse_address, Some(0x0202));
        assert_eq!(
            p.registers
                .iter()
                .filter(|r| r.quantity == Quantity::DigitalInput)
                .count(),
            8
        );
    }

    #[test]
    fn bad_profile_lists_every_problem() {
        let text = r#"
            [profile]
            name = "bad"
            source = "test"
            max_registers_per_read = 200
            [[register]]
            name = "a"
            quantity = "power_w"
            function = "coil"
            address = 0
            type = "f32"
            [[register]]
            name = "a"
            quantity = "energy_kwh"
            function = "holding"
            address = 0xFFFF
            type = "u32"
            [[register]]
            name = "b"
            quantity = "energy_kwh"
            address = 1
        "#;
        let issues = Profile::from_toml(text).unwrap_err();
        let all: Vec<String> = issues
            .iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect();
        let joined = all.join("\n");
        assert!(joined.contains("type must be bool"), "{joined}");
        assert!(joined.contains("register range overflow"), "{joined}");
        assert!(joined.contains("function is missing"), "{joined}");
        assert!(joined.contains("outside 1..=125"), "{joined}");
    }
}
