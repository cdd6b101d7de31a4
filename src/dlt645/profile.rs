//! DL/T 645 meter profiles as data, like the Modbus register tables: which data identifiers a
//! meter model answers, in which format, as which quantity. Built-ins are embedded from
//! `src/dlt645/profiles/*.toml`, each citing its sources.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use super::data::{decode, Di, Format, ValueError};
use crate::catalog::{ProfileIssue, Quantity};

/// One data item a meter is read for.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub name: Arc<str>,
    pub di: Di,
    pub format: Format,
    pub quantity: Quantity,
    pub unit: Arc<str>,
    /// Multiplier from the wire's unit to meterd's (kW → W: 1000).
    pub scale: f64,
    /// For a status word: the bit that is the value (0 or 1), inverted when `invert`.
    pub bit: Option<(u8, bool)>,
}

impl Item {
    /// The bytes a meter answers for `value` (the simulator's side of [`Item::value`]).
    #[must_use]
    pub fn encode(&self, value: f64) -> Option<Vec<u8>> {
        match self.bit {
            Some((bit, invert)) => {
                let set = (value >= 0.5) != invert;
                super::data::encode(self.format, f64::from(u16::from(set) << bit))
            }
            None => super::data::encode(self.format, value / self.scale),
        }
    }

    /// The item's value from the bytes a read answer carried.
    pub fn value(&self, bytes: &[u8]) -> Result<f64, ValueError> {
        let v = decode(self.format, bytes)?;
        Ok(match self.bit {
            Some((bit, invert)) => {
                let set = (v as u32 >> bit) & 1 == 1;
                f64::from(u8::from(set != invert))
            }
            None => v * self.scale,
        })
    }
}

/// A DL/T 645 meter model.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub source: String,
    pub commissioning: Option<String>,
    pub items: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    profile: RawHeader,
    #[serde(default)]
    item: Vec<RawItem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    #[serde(default)]
    description: String,
    source: String,
    commissioning: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    name: String,
    di: String,
    format: String,
    #[serde(default)]
    signed: bool,
    quantity: Quantity,
    unit: Option<String>,
    scale: Option<f64>,
    bit: Option<u8>,
    #[serde(default)]
    invert: bool,
}

/// `XXXXXX.XX` (digits, the point where the standard's tables put it) or `word` (a 2-byte status
/// word).
fn parse_format(s: &str, signed: bool) -> Option<Format> {
    if s.eq_ignore_ascii_case("word") {
        return (!signed).then_some(Format::Word);
    }
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let all_x = |p: &str| p.chars().all(|c| c.eq_ignore_ascii_case(&'x'));
    if !all_x(int) || !all_x(frac) || (int.len() + frac.len()) % 2 != 0 || int.is_empty() {
        return None;
    }
    let decimals = u8::try_from(frac.len()).ok()?;
    let digits = int.len() + frac.len();
    let bytes = u8::try_from(digits / 2).ok()?;
    Some(if signed {
        Format::Signed { bytes, decimals }
    } else {
        Format::Unsigned { bytes, decimals }
    })
}

impl Profile {
    /// Parses and checks a profile file; every problem is named by its key.
    pub fn from_toml(text: &str) -> Result<Profile, Vec<ProfileIssue>> {
        let issue = |key: String, message: String| ProfileIssue { key, message };
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| vec![issue(String::new(), e.message().to_string())])?;
        let mut issues = Vec::new();
        let mut items = Vec::new();
        for (i, it) in raw.item.iter().enumerate() {
            let key = |k: &str| format!("item[{i}] ({}).{k}", it.name);
            let Some(di) = Di::parse(&it.di) else {
                issues.push(issue(key("di"), format!("{:?}: expected 8 hex digits as the standard's tables print it, DI3 first (e.g. 00010000)", it.di)));
                continue;
            };
            let Some(format) = parse_format(&it.format, it.signed) else {
                issues.push(issue(key("format"), format!("{:?}: expected the standard's notation with an even number of digits (e.g. XXXXXX.XX, XXX.XXX) or \"word\" (not signed)", it.format)));
                continue;
            };
            if it.bit.is_some() && format != Format::Word {
                issues.push(issue(
                    key("bit"),
                    "a bit is taken from a status word: set format = \"word\"".into(),
                ));
                continue;
            }
            if it.bit.is_some_and(|b| b > 15) {
                issues.push(issue(key("bit"), "a status word has bits 0 to 15".into()));
                continue;
            }
            if items.iter().any(|x: &Item| *x.name == *it.name) {
                issues.push(issue(key("name"), "two items have this name".into()));
                continue;
            }
            items.push(Item {
                name: Arc::from(it.name.as_str()),
                di,
                format,
                quantity: it.quantity,
                unit: Arc::from(
                    it.unit
                        .as_deref()
                        .unwrap_or_else(|| it.quantity.default_unit()),
                ),
                scale: it.scale.unwrap_or(1.0),
                bit: it.bit.map(|b| (b, it.invert)),
            });
        }
        if items.is_empty() && issues.is_empty() {
            issues.push(issue(
                "item".into(),
                "a profile needs at least one [[item]]".into(),
            ));
        }
        if raw.profile.source.trim().is_empty() {
            issues.push(issue(
                "profile.source".into(),
                "say where the data identifiers come from".into(),
            ));
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Profile {
            name: raw.profile.name,
            description: raw.profile.description,
            source: raw.profile.source,
            commissioning: raw.profile.commissioning,
            items,
        })
    }
}

/// The profile files compiled into the binary, by file name.
pub(crate) const BUILTIN_SOURCES: &[(&str, &str)] = &[
    (
        "dlt645_2007_single_phase.toml",
        include_str!("profiles/dlt645_2007_single_phase.toml"),
    ),
    (
        "dlt645_2007_prepaid.toml",
        include_str!("profiles/dlt645_2007_prepaid.toml"),
    ),
];

/// Parses the built-in DL/T 645 profiles (a failure is a bug in meterd, named by file).
pub fn builtin() -> Result<BTreeMap<String, Profile>, Vec<(String, ProfileIssue)>> {
    crate::catalog::parse_builtin(BUILTIN_SOURCES, Profile::from_toml, |p| &p.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_profile_parses_and_cites_its_source() {
        let lib = builtin().expect("builtin profiles are valid");
        assert_eq!(lib.len(), BUILTIN_SOURCES.len());
        for p in lib.values() {
            assert!(p.source.contains("dlt645-cjt188.md"), "{}", p.name);
            assert!(
                p.items.iter().any(|i| i.quantity == Quantity::EnergyKwh),
                "{}",
                p.name
            );
        }
    }

    #[test]
    fn power_in_kw_reads_as_watts_and_the_relay_bit_as_supply_on() {
        let lib = builtin().unwrap();
        let p = &lib["dlt645_2007_prepaid"];
        let power = p
            .items
            .iter()
            .find(|i| i.quantity == Quantity::PowerW)
            .unwrap();
        // 1.2345 kW (XX.XXXX) = 45 23 01.
        assert!((power.value(&[0x45, 0x23, 0x01]).unwrap() - 1234.5).abs() < 1e-9);
        let relay = p
            .items
            .iter()
            .find(|i| i.quantity == Quantity::RelayState)
            .unwrap();
        assert_eq!(
            relay.value(&[0x50, 0x00]),
            Ok(0.0),
            "bit 4 set: contact open"
        );
        assert_eq!(
            relay.value(&[0x40, 0x00]),
            Ok(1.0),
            "bit 4 clear: supply on"
        );
        let money = p
            .items
            .iter()
            .find(|i| i.quantity == Quantity::PrepaidRemaining)
            .unwrap();
        assert_eq!(&*money.unit, "CNY");
    }

    #[test]
    fn a_bad_item_is_named_with_what_was_expected() {
        let text = r#"
            [profile]
            name = "x"
            source = "test"
            [[item]]
            name = "e"
            di = "0001000"
            format = "XXXXXX.XX"
            quantity = "energy_kwh"
            [[item]]
            name = "v"
            di = "02010100"
            format = "XXX.XX"
            quantity = "voltage_v"
        "#;
        let issues = Profile::from_toml(text).unwrap_err();
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert_eq!(issues[0].key, "item[0] (e).di");
        assert!(issues[0].message.contains("8 hex digits"));
        assert_eq!(issues[1].key, "item[1] (v).format");
        assert!(issues[1].message.contains("even number of digits"));
    }
}
