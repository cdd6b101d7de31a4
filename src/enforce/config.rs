//! The `[enforcement]`, `[[relay]]` and `[[prepaid]]` sections, validated with the rest of the config.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{NaiveDate, NaiveTime};
use ed25519_dalek::VerifyingKey;
use serde::Deserialize;

use super::rules::{Calendar, Policy, RelayKind, RelaySpec};
use crate::modbus::spec::Device;
use crate::topology::{Site, Utility};

/// What enforcement needs from the daemon's configuration and nothing more: its own sections, the
/// site's rooms, the site's timezone (quiet hours, holidays, daily prepaid samples), the history
/// period and the store. Built by `config::Config::enforcer_setup`, so enforcement does not depend
/// on the whole configuration (which depends on this module for the sections' types).
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub enforcement: Enforcement,
    pub site: Site,
    pub timezone: chrono_tz::Tz,
    /// One counter sample per device per this period (prepaid sampling aligns with it).
    pub history_every: Duration,
    pub store_path: PathBuf,
}

impl Setup {
    /// The site with the tariffs now in force (a `set_tariff` from the cloud, the ones stored at
    /// an earlier run): every prepaid account deducts at its room's tariff as the bill resolves it.
    pub(crate) fn reprice(&mut self, site: Site) {
        for acc in &mut self.enforcement.prepaid {
            if let Some(prices) = site.price_schedule(&acc.room, acc.utility) {
                acc.prices = prices;
            }
        }
        self.site = site;
    }
}

/// `[enforcement]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnforcement {
    /// Ed25519 public key (base64 or hex) that signs relay-affecting cloud commands.
    pub public_key: Option<String>,
    pub allowed_from: Option<String>,
    pub allowed_to: Option<String>,
    #[serde(default)]
    pub weekends: bool,
    #[serde(default)]
    pub holidays: Vec<NaiveDate>,
    #[serde(default, with = "humantime_serde")]
    pub grace: Option<Duration>,
    pub lease_notice_days: Option<i64>,
    pub low_balance: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub recheck_every: Option<Duration>,
    pub fire_alarm: Option<RawFireAlarm>,
}

/// The fire-alarm input.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFireAlarm {
    pub device: String,
    pub register: String,
    #[serde(default = "one")]
    pub active: f64,
}

fn one() -> f64 {
    1.0
}

/// `[[relay]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRelay {
    pub name: String,
    pub room: String,
    pub kind: RelayKind,
    pub utility: Option<Utility>,
    pub device: String,
    pub output: String,
    #[serde(default)]
    pub fail_open: bool,
}

/// `[[prepaid]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrepaid {
    pub room: String,
    pub utility: Utility,
    /// The device whose counter is deducted.
    pub meter: String,
    /// Optional: the `[[tariff]]` that bills the room, named as a check. Prepaid deducts at the
    /// room's own tariff (its versions and bands, and any the cloud sets), the one its bill uses.
    pub tariff: Option<String>,
    /// No longer taken (refused with the reason): bands belong on the room's `[[tariff]]`.
    #[serde(default)]
    pub bands: Vec<RawBand>,
    /// The most the counter can advance in an hour (rated power in kW, rated flow in m³/h); a
    /// reading beyond it is held as suspect. Default: 60 kW (a 3×100 A feeder), 10 m³/h.
    pub max_rate: Option<f64>,
}

pub(crate) use crate::tou::RawBand;

/// A relay with the device output that drives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relay {
    pub spec: RelaySpec,
    pub device: String,
    pub output: String,
}

/// A prepaid account: which counter is deducted at which price.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepaidAccount {
    pub room: String,
    pub utility: Utility,
    pub device: String,
    /// The room's tariff over time (what its bill prices its own consumption with).
    pub prices: crate::tou::Schedule,
    /// Physical limit of the counter, for the plausibility check.
    pub limits: super::prepaid::Limits,
}

/// Where the fire alarm is read.
#[derive(Debug, Clone, PartialEq)]
pub struct FireAlarm {
    pub device: String,
    pub register: String,
    pub active: f64,
}

/// Validated enforcement settings.
#[derive(Debug, Clone)]
pub struct Enforcement {
    pub policy: Policy,
    pub public_key: Option<VerifyingKey>,
    pub low_balance: i64,
    pub recheck_every: Duration,
    pub fire_alarm: Option<FireAlarm>,
    pub relays: Vec<Relay>,
    pub prepaid: Vec<PrepaidAccount>,
}

impl Enforcement {
    /// True when there is nothing to enforce.
    pub fn is_empty(&self) -> bool {
        self.relays.is_empty() && self.prepaid.is_empty()
    }
}

fn time(s: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(s, "%H:%M").map_err(|_| format!("{s:?}: expected HH:MM"))
}

/// Validates the sections against the devices and the rooms.
pub(crate) fn build(
    raw: RawEnforcement,
    relays: Vec<(String, RawRelay)>,
    prepaid: Vec<(String, RawPrepaid)>,
    timezone: chrono_tz::Tz,
    devices: &[Device],
    site: &Site,
    _base: &std::path::Path,
) -> (Enforcement, Vec<(String, String)>) {
    let mut issues = Vec::new();
    let mut t = |key: &str, v: Option<&String>, default: &str| match time(
        v.map_or(default, std::string::String::as_str),
    ) {
        Ok(t) => t,
        Err(e) => {
            issues.push((format!("enforcement.{key}"), e));
            NaiveTime::MIN
        }
    };
    let allowed_from = t("allowed_from", raw.allowed_from.as_ref(), "09:00");
    let allowed_to = t("allowed_to", raw.allowed_to.as_ref(), "18:00");
    if allowed_from >= allowed_to {
        issues.push((
            "enforcement.allowed_to".into(),
            format!(
                "the cut-off window {}–{} is empty: allowed_from must be before allowed_to (a window over midnight is not supported: cut-offs at night are what the window prevents)",
                allowed_from.format("%H:%M"),
                allowed_to.format("%H:%M")
            ),
        ));
    }
    let public_key = raw
        .public_key
        .as_ref()
        .and_then(|k| match super::auth::parse_key(k) {
            Ok(k) => Some(k),
            Err(e) => {
                issues.push(("enforcement.public_key".into(), e));
                None
            }
        });
    let device = |name: &str| devices.iter().find(|d| &*d.name == name);
    let fire_alarm = raw.fire_alarm.as_ref().map(|f| {
        match device(&f.device) {
            None => issues.push((
                "enforcement.fire_alarm.device".into(),
                format!("unknown device {:?}", f.device),
            )),
            Some(d)
                if !d
                    .profile
                    .registers
                    .iter()
                    .any(|r| &*r.name == f.register.as_str()) =>
            {
                issues.push((
                    "enforcement.fire_alarm.register".into(),
                    format!(
                        "device {:?} (profile {}) has no register {:?}",
                        f.device, d.profile.name, f.register
                    ),
                ));
            }
            Some(_) => {}
        }
        FireAlarm {
            device: f.device.clone(),
            register: f.register.clone(),
            active: f.active,
        }
    });
    let out_relays = build_relays(relays, devices, site, &mut issues);
    let out_prepaid = build_prepaid(prepaid, devices, site, &mut issues);
    let grace = raw.grace.unwrap_or(Duration::from_secs(48 * 3600));
    let recheck_every = raw.recheck_every.unwrap_or(Duration::from_secs(60));
    if recheck_every < Duration::from_millis(100) {
        issues.push((
            "enforcement.recheck_every".into(),
            "must be at least 100ms".into(),
        ));
    }
    let enforcement = Enforcement {
        policy: Policy {
            calendar: Calendar {
                timezone,
                allowed_from,
                allowed_to,
                weekends_allowed: raw.weekends,
                holidays: raw.holidays,
            },
            grace: chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::hours(48)),
            lease_notice_days: raw.lease_notice_days.unwrap_or(7),
        },
        public_key,
        low_balance: raw.low_balance.unwrap_or(2000),
        recheck_every,
        fire_alarm,
        relays: out_relays,
        prepaid: out_prepaid,
    };
    (enforcement, issues)
}

/// `[[relay]]` entries: one rule per contact, a known room, an output with read-back.
fn build_relays(
    relays: Vec<(String, RawRelay)>,
    devices: &[Device],
    site: &Site,
    issues: &mut Vec<(String, String)>,
) -> Vec<Relay> {
    let mut out_relays = Vec::new();
    let device = |name: &str| devices.iter().find(|d| &*d.name == name);
    let mut names = std::collections::HashSet::new();
    let mut outputs: BTreeMap<(String, String), String> = BTreeMap::new();
    for (key, r) in relays {
        if let Some(other) = outputs.insert((r.device.clone(), r.output.clone()), r.name.clone()) {
            issues.push((
                format!("{key}.output"),
                format!(
                    "output {:?} of device {:?} already drives relay {other:?}: two rules would fight over one contact",
                    r.output, r.device
                ),
            ));
        }
        if !names.insert(r.name.clone()) {
            issues.push((
                format!("{key}.name"),
                format!("duplicate relay name {:?}", r.name),
            ));
        }
        if !site.rooms.contains_key(&r.room) {
            issues.push((
                format!("{key}.room"),
                format!("unknown room {:?}; declare it in [[room]]", r.room),
            ));
        }
        match device(&r.device) {
            None => issues.push((
                format!("{key}.device"),
                format!("unknown device {:?}", r.device),
            )),
            Some(d) => match d.profile.outputs.iter().find(|o| o.name == r.output) {
                None => issues.push((
                    format!("{key}.output"),
                    format!(
                        "device {:?} (profile {}) has no output {:?}; outputs: {}",
                        r.device,
                        d.profile.name,
                        r.output,
                        d.profile
                            .outputs
                            .iter()
                            .map(|o| o.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
                Some(o) if o.readback.is_none() => issues.push((
                    format!("{key}.output"),
                    "the output has no read-back register: its state could not be verified".into(),
                )),
                Some(_)
                    if matches!(
                        d.protocol,
                        crate::modbus::spec::Protocol::Dlt645(crate::modbus::spec::Dlt645Meter {
                            credentials: None,
                            ..
                        })
                    ) =>
                {
                    issues.push((
                        format!("{key}.device"),
                        format!("device {:?} is a DL/T 645 meter: its relay switches only with the password_level, password and operator set in its [[device]]", r.device),
                    ));
                }
                Some(_) => {}
            },
        }
        if r.kind == RelayKind::Supply && r.utility.is_none() {
            issues.push((
                format!("{key}.utility"),
                "a supply relay needs the utility it cuts (electricity or water)".into(),
            ));
        }
        if r.kind == RelayKind::Supply && r.fail_open {
            issues.push((format!("{key}.fail_open"), "only doors fail open".into()));
        }
        out_relays.push(Relay {
            spec: RelaySpec {
                name: r.name,
                room: r.room,
                kind: r.kind,
                utility: r.utility,
                fail_open: r.fail_open,
            },
            device: r.device,
            output: r.output,
        });
    }
    out_relays
}

/// `[[prepaid]]` accounts: one per room and utility, a meter with the counter, a tariff of the
/// same utility.
fn build_prepaid(
    prepaid: Vec<(String, RawPrepaid)>,
    devices: &[Device],
    site: &Site,
    issues: &mut Vec<(String, String)>,
) -> Vec<PrepaidAccount> {
    let mut out_prepaid = Vec::new();
    let device = |name: &str| devices.iter().find(|d| &*d.name == name);
    let mut seen: BTreeMap<(String, Utility), String> = BTreeMap::new();
    for (key, p) in prepaid {
        if !site.rooms.contains_key(&p.room) {
            issues.push((format!("{key}.room"), format!("unknown room {:?}", p.room)));
        }
        if let Some(other) = seen.insert((p.room.clone(), p.utility), key.clone()) {
            issues.push((
                key.clone(),
                format!(
                    "room {:?} already has a {:?} account at {other}",
                    p.room, p.utility
                ),
            ));
        }
        match device(&p.meter) {
            None => issues.push((
                format!("{key}.meter"),
                format!("unknown device {:?}", p.meter),
            )),
            Some(d)
                if !d
                    .profile
                    .registers
                    .iter()
                    .any(|r| r.quantity == p.utility.quantity()) =>
            {
                issues.push((
                    format!("{key}.meter"),
                    format!(
                        "device {:?} has no {} register",
                        p.meter,
                        p.utility.quantity()
                    ),
                ));
            }
            Some(_) => {}
        }
        if !p.bands.is_empty() {
            issues.push((
                format!("{key}.bands"),
                "prepaid deducts at the room's [[tariff]] (the price its bill uses): move these bands to that tariff and remove them here".into(),
            ));
        }
        let prices = site.price_schedule(&p.room, p.utility);
        let billing = prices.as_ref().map(|s| s.versions()[0].tariff.clone());
        match (&billing, &p.tariff) {
            (None, _) if site.rooms.contains_key(&p.room) => issues.push((
                key.clone(),
                format!(
                    "no [[tariff]] bills room {:?}'s {:?}: add the room to a {:?} tariff's rooms (prepaid deducts at that price)",
                    p.room, p.utility, p.utility
                ),
            )),
            (Some(b), Some(named)) if b != named => issues.push((
                format!("{key}.tariff"),
                format!(
                    "room {:?} is billed by tariff {b:?}, not {named:?}; prepaid deducts at the room's tariff: name {b:?} or leave tariff out",
                    p.room
                ),
            )),
            _ => {}
        }
        // The bill's own consumption and the deductions come from the same counter.
        let meters = site.room_meters(&p.room, p.utility);
        if !meters.is_empty()
            && !meters
                .iter()
                .any(|m| m.source == crate::topology::Source::Device(p.meter.clone()))
        {
            issues.push((
                format!("{key}.meter"),
                format!(
                    "room {:?} is billed from meter(s) {}, none of them device {:?}: prepaid must deduct the counter the bill reads (give the room's [[meter]] device {:?}, or deduct that meter's device)",
                    p.room,
                    meters.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
                    p.meter,
                    p.meter
                ),
            ));
        }
        let max_rate = p.max_rate.unwrap_or(match p.utility {
            Utility::Electricity => 60.0,
            Utility::Water => 10.0,
        });
        if !(max_rate.is_finite() && max_rate > 0.0) {
            issues.push((
                format!("{key}.max_rate"),
                format!("{max_rate}: expected the meter's rated kW or m³/h, > 0"),
            ));
        }
        if let Some(prices) = prices {
            out_prepaid.push(PrepaidAccount {
                room: p.room,
                utility: p.utility,
                device: p.meter,
                prices,
                limits: super::prepaid::Limits {
                    max_milli_per_hour: (max_rate * 1000.0).round() as i64,
                    // Two steps of a 0.01-resolution counter plus rounding: 50 thousandths.
                    slack_milli: 50,
                },
            });
        }
    }
    out_prepaid
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    const BASE: &str = r#"
[gateway]
id = "gw"
site = "t"
timezone = "Asia/Shanghai"
[[bus]]
name = "lan"
kind = "tcp"
host = "127.0.0.1"
[[device]]
name = "doors"
bus = "lan"
unit = 1
profile = "relay_waveshare_8ch"
[[room]]
id = "101"
[[room]]
id = "102"
"#;

    fn issues(extra: &str) -> Vec<String> {
        match Config::from_str_at(
            &format!("{BASE}{extra}"),
            "t.toml",
            std::path::Path::new("/"),
        ) {
            Err(ConfigError::Invalid(i)) => {
                i.iter().map(std::string::ToString::to_string).collect()
            }
            Ok(_) => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn an_empty_cut_off_window_is_refused() {
        let i = issues("[enforcement]\nallowed_from = \"18:00\"\nallowed_to = \"09:00\"\n");
        assert!(
            i.iter().any(|m| m.contains("enforcement.allowed_to") && m.contains("18:00–09:00 is empty")),
            "{i:?}"
        );
        assert_eq!(
            issues("[enforcement]\nallowed_from = \"09:00\"\nallowed_to = \"09:00\"\n").len(),
            1
        );
        assert!(
            issues("[enforcement]\nallowed_from = \"08:30\"\nallowed_to = \"17:30\"\n").is_empty()
        );
    }

    #[test]
    fn two_relays_on_one_output_are_refused() {
        let relay = |name: &str, room: &str, output: &str| {
            format!("[[relay]]\nname = \"{name}\"\nroom = \"{room}\"\nkind = \"door\"\ndevice = \"doors\"\noutput = \"{output}\"\n")
        };
        let i = issues(&(relay("101-door", "101", "relay1") + &relay("102-door", "102", "relay1")));
        assert!(
            i.iter()
                .any(|m| m.contains("relay[1]") && m.contains("already drives relay \"101-door\"")),
            "{i:?}"
        );
        assert!(issues(
            &(relay("101-door", "101", "relay1") + &relay("102-door", "102", "relay2"))
        )
        .is_empty());
    }

    /// Room 102 on a DDS238 with its own meter node, billed by `elec` (0.8523, peak/valley).
    const PREPAID_SITE: &str = r#"
[[device]]
name = "m102"
bus = "lan"
unit = 2
profile = "hiking_dds238_zn"
[[device]]
name = "m101"
bus = "lan"
unit = 3
profile = "hiking_dds238_zn"
[[meter]]
name = "m102"
utility = "electricity"
room = "102"
[[meter]]
name = "m101"
utility = "electricity"
room = "101"
[[tariff]]
name = "elec"
utility = "electricity"
price = "0.8523"
rooms = ["102"]
bands = [{ name = "valley", from = "22:00", to = "08:00", price = "0.3583" }]
[[tariff]]
name = "other"
utility = "electricity"
price = "1.00"
"#;

    #[test]
    fn a_prepaid_account_priced_apart_from_its_rooms_bill_is_refused_with_what_to_do() {
        // Its own bands: before, deducted at them while the bill used the tariff's.
        let i = issues(&format!("{PREPAID_SITE}[[prepaid]]\nroom = \"102\"\nutility = \"electricity\"\nmeter = \"m102\"\nbands = [{{ from = \"22:00\", to = \"07:00\", price = \"0.35\" }}]\n"));
        assert!(
            i.iter()
                .any(|m| m.contains("prepaid[0].bands") && m.contains("move these bands")),
            "{i:?}"
        );
        // Another tariff than the room's: before, deducted at 1.00 while the bill said 0.8523.
        let i = issues(&format!("{PREPAID_SITE}[[prepaid]]\nroom = \"102\"\nutility = \"electricity\"\nmeter = \"m102\"\ntariff = \"other\"\n"));
        assert!(i.iter().any(|m| m.contains("prepaid[0].tariff") && m.contains("billed by tariff \"elec\"")), "{i:?}");
        // A room no tariff bills, and a counter the bill does not read.
        let i = issues(&format!("{PREPAID_SITE}[[prepaid]]\nroom = \"101\"\nutility = \"electricity\"\nmeter = \"m101\"\n"));
        assert!(
            i.iter()
                .any(|m| m.contains("no [[tariff]] bills room \"101\"")),
            "{i:?}"
        );
        let i = issues(&format!("{PREPAID_SITE}[[prepaid]]\nroom = \"102\"\nutility = \"electricity\"\nmeter = \"m101\"\n"));
        assert!(
            i.iter()
                .any(|m| m.contains("prepaid[0].meter") && m.contains("billed from meter(s) m102")),
            "{i:?}"
        );
        // The room's tariff, named or not: accepted, deducting at the tariff's bands.
        for named in ["", "tariff = \"elec\"\n"] {
            let text = format!("{BASE}{PREPAID_SITE}[[prepaid]]\nroom = \"102\"\nutility = \"electricity\"\nmeter = \"m102\"\n{named}");
            let c = Config::from_str_at(&text, "t.toml", std::path::Path::new("/")).unwrap();
            let acc = &c.enforcement.prepaid[0];
            assert_eq!(acc.prices.versions().len(), 1);
            assert_eq!(acc.prices.versions()[0].tariff, "elec");
            assert_eq!(
                acc.prices.versions()[0].price.bands[0].price.micros,
                358_300
            );
        }
    }
}
