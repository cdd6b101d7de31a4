//! The vocabulary every protocol's meter profiles share (Modbus register tables, DL/T 645 item
//! tables): what a value measures, a problem in a profile file, and the loader of the profiles
//! embedded in the binary. Kept apart so the protocols depend on it and not on each other.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What a value measures. Downstream code (topology, billing, enforcement) selects by quantity,
/// never by register name, so every profile maps its registers onto this vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantity {
    /// Cumulative imported active energy, the billing counter.
    EnergyKwh,
    /// Cumulative exported active energy.
    EnergyExportKwh,
    /// A cumulative energy register whose meaning differs between firmware variants; kept apart so
    /// it is never billed by mistake (see the profile's commissioning note).
    EnergyOtherKwh,
    /// Cumulative water volume, the billing counter.
    WaterM3,
    FlowM3h,
    PowerW,
    ReactivePowerVar,
    ApparentPowerVa,
    VoltageV,
    CurrentA,
    FrequencyHz,
    PowerFactor,
    /// A relay output's state as read back from the device (1 = energised).
    RelayState,
    /// A digital input such as a door contact or a fire-alarm loop.
    DigitalInput,
    /// A free-running pulse counter (wraps at its type's width; never clear-on-read).
    PulseCount,
    /// A water valve's state bits.
    ValveState,
    /// Prepaid volume or energy left, as the meter itself reports it.
    PrepaidRemaining,
    /// Anything else a profile wants to show (temperature, pressure, battery, …).
    Other,
}

impl Quantity {
    /// SI/billing unit the value is expressed in after scaling.
    pub(crate) fn default_unit(self) -> &'static str {
        match self {
            Quantity::EnergyKwh | Quantity::EnergyExportKwh | Quantity::EnergyOtherKwh => "kWh",
            Quantity::WaterM3 | Quantity::PrepaidRemaining => "m3",
            Quantity::FlowM3h => "m3/h",
            Quantity::PowerW => "W",
            Quantity::ReactivePowerVar => "var",
            Quantity::ApparentPowerVa => "VA",
            Quantity::VoltageV => "V",
            Quantity::CurrentA => "A",
            Quantity::FrequencyHz => "Hz",
            Quantity::PowerFactor => "",
            Quantity::RelayState | Quantity::DigitalInput | Quantity::ValveState => "",
            Quantity::PulseCount => "pulses",
            Quantity::Other => "",
        }
    }

    /// Snake-case name used in config, JSON and MQTT.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Quantity::EnergyKwh => "energy_kwh",
            Quantity::EnergyExportKwh => "energy_export_kwh",
            Quantity::EnergyOtherKwh => "energy_other_kwh",
            Quantity::WaterM3 => "water_m3",
            Quantity::FlowM3h => "flow_m3h",
            Quantity::PowerW => "power_w",
            Quantity::ReactivePowerVar => "reactive_power_var",
            Quantity::ApparentPowerVa => "apparent_power_va",
            Quantity::VoltageV => "voltage_v",
            Quantity::CurrentA => "current_a",
            Quantity::FrequencyHz => "frequency_hz",
            Quantity::PowerFactor => "power_factor",
            Quantity::RelayState => "relay_state",
            Quantity::DigitalInput => "digital_input",
            Quantity::PulseCount => "pulse_count",
            Quantity::ValveState => "valve_state",
            Quantity::PrepaidRemaining => "prepaid_remaining",
            Quantity::Other => "other",
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem in a profile file, with the key path inside it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileIssue {
    pub key: String,
    pub message: String,
}

/// Parses embedded profile files (`(file name, text)`) by their name, every problem named by file.
pub(crate) fn parse_builtin<P>(
    sources: &[(&str, &str)],
    parse: fn(&str) -> Result<P, Vec<ProfileIssue>>,
    name: fn(&P) -> &str,
) -> Result<BTreeMap<String, P>, Vec<(String, ProfileIssue)>> {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for (file, text) in sources {
        match parse(text) {
            Ok(p) => {
                out.insert(name(&p).to_string(), p);
            }
            Err(issues) => {
                errors.extend(issues.into_iter().map(|i| (format!("<builtin>/{file}"), i)));
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}
