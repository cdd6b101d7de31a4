//! Freeze rules as a pure function: (rules, balances, fire alarm, calendar, now) → the state every
//! relay should be in, and why.
//!
//! Precedence, highest first (each relay takes the first rule that speaks to it):
//! 1. **Fire alarm**: doors configured `fail_open` are opened; nothing else is cut while it lasts.
//! 2. **Manual override** from the local CLI, until it expires.
//! 3. **Life-critical room**: its supply is never cut; freezes and empty balances only raise alarms.
//! 4. **Tenant freeze** from the cloud (access and/or utilities), from its effective time.
//! 5. **Lease quiet period**: a lease not renewed and with no activity recorded on it in the last
//!    `notice` days before it ends is in its quiet period; a `lease_quiet_period` event (the red
//!    alert) is raised when it begins, and door access is frozen `grace` later.
//! 6. **Prepaid**: a balance at or below zero for longer than the grace period cuts that utility.
//! 7. Otherwise: granted (door enabled, supply on).
//!
//! Cutting a supply (on → off) only happens inside the allowed window (default: weekdays 09:00–18:00
//! site time, not on listed holidays); outside it the cut is deferred and said so. Restoring is never
//! deferred. Door access freezes apply at once.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use serde::{Deserialize, Serialize};

use crate::topology::Utility;

/// What a relay switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayKind {
    /// Door access (strike enable / reader power): on = tenant can enter.
    Door,
    /// Utility supply (contactor, meter relay, valve): on = supplied.
    Supply,
}

/// A relay as the rules see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelaySpec {
    pub name: String,
    pub room: String,
    pub kind: RelayKind,
    /// For supply relays: which utility it cuts.
    pub utility: Option<Utility>,
    /// Door opened by a fire alarm.
    pub fail_open: bool,
}

/// A freeze decided by the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Freeze {
    pub reason: String,
    pub effective: DateTime<Utc>,
    /// Command id that set it.
    pub by: String,
}

/// A manual override from the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// true = grant (door open / supply on).
    pub on: bool,
    pub reason: String,
    pub until: Option<DateTime<Utc>>,
    pub by: String,
}

/// A prepaid account for one utility of one room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prepaid {
    /// Minor units; deducted locally from metered consumption.
    pub balance: i64,
    /// When the balance last reached zero or below.
    pub empty_since: Option<DateTime<Utc>>,
    /// A low-balance warning was already sent for this descent.
    pub warned: bool,
}

/// Everything the cloud and the CLI said about one room.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RoomRules {
    pub access_freeze: Option<Freeze>,
    pub utility_freeze: Option<Freeze>,
    pub lease_end: Option<NaiveDate>,
    pub lease_renewed: bool,
    /// The last action recorded on the lease (renewal talks, a visit), as the cloud reported it.
    #[serde(default)]
    pub lease_activity: Option<DateTime<Utc>>,
    /// This room's notice period in days (else the policy's `lease_notice_days`).
    #[serde(default)]
    pub lease_notice_days: Option<i64>,
    /// The start of the quiet period already alerted (so each quiet period is alerted once).
    #[serde(default)]
    pub quiet_alerted: Option<DateTime<Utc>>,
    pub life_critical: bool,
    pub prepaid: BTreeMap<Utility, Prepaid>,
    /// Per relay name.
    pub overrides: BTreeMap<String, Override>,
}

/// When cut-offs may happen.
#[derive(Debug, Clone, PartialEq)]
pub struct Calendar {
    pub timezone: chrono_tz::Tz,
    /// Cut-offs only from `allowed_from` to `allowed_to` local time.
    pub allowed_from: NaiveTime,
    pub allowed_to: NaiveTime,
    pub weekends_allowed: bool,
    pub holidays: Vec<NaiveDate>,
}

impl Calendar {
    /// Whether a supply may be cut at `now`.
    pub(crate) fn cut_allowed(&self, now: DateTime<Utc>) -> bool {
        let l = now.with_timezone(&self.timezone);
        let weekend = matches!(l.weekday(), Weekday::Sat | Weekday::Sun);
        if (weekend && !self.weekends_allowed) || self.holidays.contains(&l.date_naive()) {
            return false;
        }
        let t = l.time();
        t >= self.allowed_from && t < self.allowed_to
    }
}

/// Policy knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub calendar: Calendar,
    pub grace: chrono::Duration,
    pub lease_notice_days: i64,
}

/// A lease's quiet period: when it began and when the door freeze takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quiet {
    /// No activity on the lease for `notice_days`, within `notice_days` of its end.
    pub since: DateTime<Utc>,
    /// `since` plus the policy's grace: the alert comes first, the freeze after.
    pub freeze_at: DateTime<Utc>,
    pub notice_days: i64,
}

/// The quiet period of a room's lease, if it has one: not renewed, and `since` is the later of
/// `notice` days before the lease's last day starts (site time) and `notice` days after the last
/// activity recorded on it. `None` when the lease is renewed or has no end.
pub(crate) fn quiet_period(room: &RoomRules, policy: &Policy) -> Option<Quiet> {
    let end = room.lease_end.filter(|_| !room.lease_renewed)?;
    let notice_days = room.lease_notice_days.unwrap_or(policy.lease_notice_days);
    let notice = chrono::Duration::days(notice_days);
    let window = (end - notice).and_time(NaiveTime::MIN);
    let window = policy
        .calendar
        .timezone
        .from_local_datetime(&window)
        .earliest()?
        .with_timezone(&Utc);
    let since = match room.lease_activity {
        Some(a) => window.max(a + notice),
        None => window,
    };
    Some(Quiet {
        since,
        freeze_at: since + policy.grace,
        notice_days,
    })
}

/// A relay's target state with the rule that decided it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Desired {
    pub relay: String,
    pub on: bool,
    /// `fire_alarm`, `override`, `life_critical`, `freeze`, `lease`, `prepaid`, `grace` (prepaid empty, cut-off not due yet), `default`, `deferred`.
    pub rule: String,
    pub reason: String,
}

/// Decides every relay. `current` is each relay's present (read-back) state: a cut outside the
/// allowed window keeps it.
pub(crate) fn decide(
    relays: &[RelaySpec],
    rooms: &BTreeMap<String, RoomRules>,
    fire_alarm: Option<bool>,
    current: &BTreeMap<String, bool>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Vec<Desired> {
    let none = RoomRules::default();
    relays
        .iter()
        .map(|r| {
            let room = rooms.get(&r.room).unwrap_or(&none);
            let d = |on: bool, rule: &str, reason: String| Desired {
                relay: r.name.clone(),
                on,
                rule: rule.to_string(),
                reason,
            };
            // 0. fire alarm input not read yet (start-up, reload): a fail-open door keeps its state,
            // so a restart during an alarm never locks a door the alarm opened.
            if fire_alarm.is_none() && r.kind == RelayKind::Door && r.fail_open {
                return d(
                    current.get(&r.name).copied().unwrap_or(true),
                    "fire_unknown",
                    "fire alarm input not read yet: a fail-open door is left as it is".into(),
                );
            }
            // 1. fire alarm
            if fire_alarm == Some(true) {
                if r.kind == RelayKind::Door && r.fail_open {
                    return d(
                        true,
                        "fire_alarm",
                        "fire alarm: fail-open door released".into(),
                    );
                }
                if r.kind == RelayKind::Supply {
                    return d(
                        current.get(&r.name).copied().unwrap_or(true),
                        "fire_alarm",
                        "fire alarm: no supply changes while it lasts".into(),
                    );
                }
            }
            // 2. manual override
            if let Some(o) = room.overrides.get(&r.name) {
                if o.until.is_none_or(|u| now < u) {
                    return d(
                        o.on,
                        "override",
                        format!("manual override by {}: {}", o.by, o.reason),
                    );
                }
            }
            // What the tenant rules say.
            let wanted: Option<(&str, String)> = match r.kind {
                RelayKind::Door => {
                    if let Some(f) = room.access_freeze.as_ref().filter(|f| now >= f.effective) {
                        Some(("freeze", format!("access frozen: {}", f.reason)))
                    } else if let Some(q) = quiet_period(room, policy) {
                        (now >= q.freeze_at).then(|| {
                            let end = room.lease_end.unwrap_or_default();
                            (
                                "lease",
                                format!(
                                    "lease ends {end} without renewal and nothing was recorded on it for {} day(s) (quiet since {})",
                                    q.notice_days,
                                    q.since.with_timezone(&policy.calendar.timezone).format("%Y-%m-%d %H:%M")
                                ),
                            )
                        })
                    } else {
                        None
                    }
                }
                RelayKind::Supply => {
                    if let Some(f) = room.utility_freeze.as_ref().filter(|f| now >= f.effective) {
                        Some(("freeze", format!("utilities frozen: {}", f.reason)))
                    } else {
                        let empty = r
                            .utility
                            .and_then(|u| room.prepaid.get(&u).map(|p| (u, p)))
                            .and_then(|(u, p)| Some((u, p.balance, p.empty_since?)))
                            .filter(|(_, balance, _)| *balance <= 0);
                        match empty {
                            Some((u, balance, since)) if now - since < policy.grace => {
                                // Still on, and the operator sees why and until when.
                                let local = |t: DateTime<Utc>| {
                                    t.with_timezone(&policy.calendar.timezone)
                                        .format("%Y-%m-%d %H:%M")
                                };
                                return d(
                                    true,
                                    "grace",
                                    format!(
                                        "{} balance {balance} since {}: cut off after the grace, from {} in the allowed hours",
                                        format!("{u:?}").to_lowercase(),
                                        local(since),
                                        local(since + policy.grace)
                                    ),
                                );
                            }
                            Some((u, balance, since)) => Some((
                                "prepaid",
                                format!(
                                    "{u:?} balance {balance} since {} (grace over)",
                                    since.to_rfc3339()
                                )
                                .to_lowercase(),
                            )),
                            None => None,
                        }
                    }
                }
            };
            let Some((rule, reason)) = wanted else {
                return d(true, "default", "no rule restricts this relay".into());
            };
            // 3. life-critical rooms are never cut off
            if r.kind == RelayKind::Supply && room.life_critical {
                return d(
                    true,
                    "life_critical",
                    format!("life-critical room: not cut off ({reason}); alarm raised"),
                );
            }
            let is_on = current.get(&r.name).copied().unwrap_or(true);
            if r.kind == RelayKind::Supply && is_on && !policy.calendar.cut_allowed(now) {
                return d(
                    true,
                    "deferred",
                    format!("{reason}; cut-off deferred to the next allowed window"),
                );
            }
            d(false, rule, reason)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn policy() -> Policy {
        Policy {
            calendar: Calendar {
                timezone: chrono_tz::Europe::London,
                allowed_from: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
                allowed_to: NaiveTime::from_hms_opt(18, 0, 0).unwrap(),
                weekends_allowed: false,
                holidays: vec![NaiveDate::from_ymd_opt(2026, 12, 25).unwrap()],
            },
            grace: chrono::Duration::hours(48),
            lease_notice_days: 7,
        }
    }

    fn relays() -> Vec<RelaySpec> {
        vec![
            RelaySpec {
                name: "door".into(),
                room: "101".into(),
                kind: RelayKind::Door,
                utility: None,
                fail_open: true,
            },
            RelaySpec {
                name: "power".into(),
                room: "101".into(),
                kind: RelayKind::Supply,
                utility: Some(Utility::Electricity),
                fail_open: false,
            },
        ]
    }

    /// Tue 2026-11-24 at `h`:00 London.
    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, h, 0, 0).unwrap()
    }

    fn run(
        room: RoomRules,
        fire: bool,
        now: DateTime<Utc>,
        current_power: bool,
    ) -> (Desired, Desired) {
        let rooms = [("101".to_string(), room)].into();
        let current = [
            ("door".to_string(), true),
            ("power".to_string(), current_power),
        ]
        .into();
        let d = decide(&relays(), &rooms, Some(fire), &current, &policy(), now);
        (d[0].clone(), d[1].clone())
    }

    #[test]
    fn while_the_fire_input_is_unread_a_frozen_rooms_fail_open_door_keeps_its_state() {
        let now = at(10);
        let frozen = RoomRules {
            access_freeze: Some(Freeze {
                reason: "lease ended".into(),
                effective: now - chrono::Duration::days(1),
                by: "cloud".into(),
            }),
            ..Default::default()
        };
        let rooms = [("101".to_string(), frozen)].into();
        for door_open in [true, false] {
            let current = [("door".to_string(), door_open), ("power".to_string(), true)].into();
            let d = decide(&relays(), &rooms, None, &current, &policy(), now);
            assert_eq!((d[0].on, d[0].rule.as_str()), (door_open, "fire_unknown"));
            assert_eq!(d[1].rule, "default", "other relays are decided as usual");
        }
        // Once read: no alarm → the freeze locks it; alarm → released.
        let current = [("door".to_string(), true), ("power".to_string(), true)].into();
        assert_eq!(
            decide(&relays(), &rooms, Some(false), &current, &policy(), now)[0].rule,
            "freeze"
        );
        assert_eq!(
            decide(&relays(), &rooms, Some(true), &current, &policy(), now)[0].rule,
            "fire_alarm"
        );
    }

    fn empty_since(hours_ago: i64, now: DateTime<Utc>) -> RoomRules {
        RoomRules {
            prepaid: [(
                Utility::Electricity,
                Prepaid {
                    balance: -120,
                    empty_since: Some(now - chrono::Duration::hours(hours_ago)),
                    warned: true,
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    fn freeze() -> Freeze {
        Freeze {
            reason: "lease terminated".into(),
            effective: at(0),
            by: "c-1".into(),
        }
    }

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "a table of cases, one per rule interaction: splitting it would hide the table"
    )]
    fn scenario_table() {
        struct Case {
            name: &'static str,
            room: RoomRules,
            fire: bool,
            now: DateTime<Utc>,
            current_power: bool,
            door: (bool, &'static str),
            power: (bool, &'static str),
        }
        let cases = vec![
            Case {
                name: "nothing applies",
                room: RoomRules::default(),
                fire: false,
                now: at(10),
                current_power: true,
                door: (true, "default"),
                power: (true, "default"),
            },
            Case {
                name: "offline deduction reached zero, still in grace",
                room: empty_since(10, at(10)),
                fire: false,
                now: at(10),
                current_power: true,
                door: (true, "default"),
                power: (true, "grace"),
            },
            Case {
                name: "grace over in the allowed window: cut",
                room: empty_since(49, at(10)),
                fire: false,
                now: at(10),
                current_power: true,
                door: (true, "default"),
                power: (false, "prepaid"),
            },
            Case {
                name: "grace over at 20:00: deferred",
                room: empty_since(49, at(20)),
                fire: false,
                now: at(20),
                current_power: true,
                door: (true, "default"),
                power: (true, "deferred"),
            },
            Case {
                name: "holiday: deferred",
                room: empty_since(49, Utc.with_ymd_and_hms(2026, 12, 25, 11, 0, 0).unwrap()),
                fire: false,
                now: Utc.with_ymd_and_hms(2026, 12, 25, 11, 0, 0).unwrap(),
                current_power: true,
                door: (true, "default"),
                power: (true, "deferred"),
            },
            Case {
                name: "weekend: deferred",
                room: empty_since(49, Utc.with_ymd_and_hms(2026, 11, 28, 11, 0, 0).unwrap()),
                fire: false,
                now: Utc.with_ymd_and_hms(2026, 11, 28, 11, 0, 0).unwrap(),
                current_power: true,
                door: (true, "default"),
                power: (true, "deferred"),
            },
            Case {
                name: "already cut stays cut at night",
                room: empty_since(60, at(22)),
                fire: false,
                now: at(22),
                current_power: false,
                door: (true, "default"),
                power: (false, "prepaid"),
            },
            Case {
                name: "top-up restores at night",
                room: RoomRules {
                    prepaid: [(
                        Utility::Electricity,
                        Prepaid {
                            balance: 5000,
                            empty_since: None,
                            warned: false,
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
                fire: false,
                now: at(23),
                current_power: false,
                door: (true, "default"),
                power: (true, "default"),
            },
            Case {
                name: "life-critical room is never cut",
                room: RoomRules {
                    life_critical: true,
                    ..empty_since(72, at(10))
                },
                fire: false,
                now: at(10),
                current_power: true,
                door: (true, "default"),
                power: (true, "life_critical"),
            },
            Case {
                name: "tenant freeze: door at once, power in window",
                room: RoomRules {
                    access_freeze: Some(freeze()),
                    utility_freeze: Some(freeze()),
                    ..Default::default()
                },
                fire: false,
                now: at(10),
                current_power: true,
                door: (false, "freeze"),
                power: (false, "freeze"),
            },
            Case {
                name: "freeze not yet effective",
                room: RoomRules {
                    access_freeze: Some(Freeze {
                        effective: at(12),
                        ..freeze()
                    }),
                    ..Default::default()
                },
                fire: false,
                now: at(10),
                current_power: true,
                door: (true, "default"),
                power: (true, "default"),
            },
            Case {
                name: "lease ends in 5 days without renewal",
                room: RoomRules {
                    lease_end: NaiveDate::from_ymd_opt(2026, 11, 29),
                    ..Default::default()
                },
                fire: false,
                now: at(10),
                current_power: true,
                door: (false, "lease"),
                power: (true, "default"),
            },
            Case {
                name: "renewed lease: nothing",
                room: RoomRules {
                    lease_end: NaiveDate::from_ymd_opt(2026, 11, 29),
                    lease_renewed: true,
                    ..Default::default()
                },
                fire: false,
                now: at(10),
                current_power: true,
                door: (true, "default"),
                power: (true, "default"),
            },
            Case {
                name: "fire alarm beats a freeze and an override",
                room: RoomRules {
                    access_freeze: Some(freeze()),
                    overrides: [(
                        "door".to_string(),
                        Override {
                            on: false,
                            reason: "maintenance".into(),
                            until: None,
                            by: "tech".into(),
                        },
                    )]
                    .into(),
                    ..empty_since(72, at(10))
                },
                fire: true,
                now: at(10),
                current_power: true,
                door: (true, "fire_alarm"),
                power: (true, "fire_alarm"),
            },
            Case {
                name: "override beats the freeze until it expires",
                room: RoomRules {
                    access_freeze: Some(freeze()),
                    overrides: [(
                        "door".to_string(),
                        Override {
                            on: true,
                            reason: "move-out".into(),
                            until: Some(at(11)),
                            by: "tech".into(),
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
                fire: false,
                now: at(10),
                current_power: true,
                door: (true, "override"),
                power: (true, "default"),
            },
            Case {
                name: "expired override: the freeze applies again",
                room: RoomRules {
                    access_freeze: Some(freeze()),
                    overrides: [(
                        "door".to_string(),
                        Override {
                            on: true,
                            reason: "move-out".into(),
                            until: Some(at(9)),
                            by: "tech".into(),
                        },
                    )]
                    .into(),
                    ..Default::default()
                },
                fire: false,
                now: at(10),
                current_power: true,
                door: (false, "freeze"),
                power: (true, "default"),
            },
        ];
        for c in cases {
            let (door, power) = run(c.room, c.fire, c.now, c.current_power);
            assert_eq!(
                (door.on, door.rule.as_str()),
                c.door,
                "{}: door {door:?}",
                c.name
            );
            assert_eq!(
                (power.on, power.rule.as_str()),
                c.power,
                "{}: power {power:?}",
                c.name
            );
        }
    }
}
