//! Relay-affecting cloud commands, parsed and validated completely against the gateway's config
//! before anything is answered: an unknown room, a bad scope or a non-integer amount is refused
//! with the reason, never "accepted" first. Pure.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::config::Enforcement;
use super::rules::Freeze;
use crate::topology::{Site, Utility};

/// Which relays of a room a freeze speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Access,
    Utilities,
    All,
}

impl Scope {
    /// Whether the freeze applies to door access.
    pub(crate) fn access(self) -> bool {
        self != Scope::Utilities
    }
    /// Whether the freeze applies to utility supplies.
    pub(crate) fn utilities(self) -> bool {
        self != Scope::Access
    }
}

/// A validated relay command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CloudCommand {
    /// `freeze` (with the freeze) or `unfreeze` (`None`).
    Freeze {
        room: String,
        scope: Scope,
        set: Option<Freeze>,
    },
    SetLease {
        room: String,
        end: Option<NaiveDate>,
        renewed: bool,
        /// This room's notice period (else the policy's).
        notice_days: Option<i64>,
    },
    /// Something was done on the lease at `at` (renewal talks logged): holds off the quiet period.
    LeaseActivity {
        room: String,
        at: DateTime<Utc>,
    },
    SetLifeCritical {
        room: String,
        on: bool,
    },
    /// The cloud's balance (a reconciliation).
    SetBalance {
        room: String,
        utility: Utility,
        balance: i64,
    },
    TopUp {
        room: String,
        utility: Utility,
        amount: i64,
    },
}

impl CloudCommand {
    /// The room it acts on.
    pub(crate) fn room(&self) -> &str {
        match self {
            CloudCommand::Freeze { room, .. }
            | CloudCommand::SetLease { room, .. }
            | CloudCommand::LeaseActivity { room, .. }
            | CloudCommand::SetLifeCritical { room, .. }
            | CloudCommand::SetBalance { room, .. }
            | CloudCommand::TopUp { room, .. } => room,
        }
    }
}

/// Parses and validates command `name` (id `id`) against the config; the reason when refused.
pub(crate) fn parse(
    name: &str,
    id: &str,
    args: &Value,
    enforcement: &Enforcement,
    site: &Site,
    now: DateTime<Utc>,
) -> Result<CloudCommand, String> {
    let s = |k: &str| args.get(k).and_then(Value::as_str).map(str::to_string);
    let room = s("room").ok_or("missing \"room\"")?;
    if !site.rooms.contains_key(&room) {
        return Err(format!(
            "unknown room {room:?}: this gateway's rooms are in its [[room]] config"
        ));
    }
    let utility = || -> Result<Utility, String> {
        match s("utility").as_deref() {
            Some("electricity") => Ok(Utility::Electricity),
            Some("water") => Ok(Utility::Water),
            other => Err(format!(
                "\"utility\" must be electricity or water, got {other:?}"
            )),
        }
    };
    Ok(match name {
        "freeze" | "unfreeze" => {
            let scope = match s("scope").as_deref().unwrap_or("all") {
                "access" => Scope::Access,
                "utilities" => Scope::Utilities,
                "all" => Scope::All,
                other => {
                    return Err(format!(
                        "\"scope\" must be access, utilities or all, got {other:?}"
                    ))
                }
            };
            let effective = match s("effective_at") {
                Some(t) => DateTime::parse_from_rfc3339(&t)
                    .map_err(|e| format!("\"effective_at\": {e}; expected RFC 3339"))?
                    .with_timezone(&Utc),
                None => now,
            };
            // A freeze that no relay carries out would be accepted and change nothing.
            let kinds: Vec<super::rules::RelayKind> = enforcement
                .relays
                .iter()
                .filter(|r| r.spec.room == room)
                .map(|r| r.spec.kind)
                .collect();
            let door = kinds.contains(&super::rules::RelayKind::Door);
            let supply = kinds.contains(&super::rules::RelayKind::Supply);
            let carried = match scope {
                Scope::Access => door,
                Scope::Utilities => supply,
                Scope::All => door || supply,
            };
            if name == "freeze" && !carried {
                return Err(format!(
                    "room {room:?} has no {} relay on this gateway: the freeze would change nothing; add a [[relay]] for it or freeze it where its relays are",
                    match scope {
                        Scope::Access => "door",
                        Scope::Utilities => "supply",
                        Scope::All => "door or supply",
                    }
                ));
            }
            let set = (name == "freeze").then(|| Freeze {
                reason: s("reason").unwrap_or_default(),
                effective,
                by: id.to_string(),
            });
            CloudCommand::Freeze { room, scope, set }
        }
        "set_lease" => {
            let end = match s("lease_end") {
                Some(d) => Some(
                    NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                        .map_err(|e| format!("\"lease_end\": {e}; expected YYYY-MM-DD"))?,
                ),
                None => None,
            };
            let renewed = match args.get("renewed") {
                None => false,
                Some(v) => v.as_bool().ok_or("\"renewed\" must be true or false")?,
            };
            let notice_days = match args.get("notice_days") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_i64()
                        .filter(|d| (0..=365).contains(d))
                        .ok_or("\"notice_days\" must be a whole number of days, 0 to 365")?,
                ),
            };
            CloudCommand::SetLease {
                room,
                end,
                renewed,
                notice_days,
            }
        }
        "lease_activity" => {
            let at = match s("at") {
                Some(t) => DateTime::parse_from_rfc3339(&t)
                    .map_err(|e| format!("\"at\": {e}; expected RFC 3339"))?
                    .with_timezone(&Utc),
                None => now,
            };
            if at > now + chrono::Duration::minutes(5) {
                return Err(format!(
                    "\"at\" {at} is in the future: lease activity is what already happened"
                ));
            }
            CloudCommand::LeaseActivity { room, at }
        }
        "set_life_critical" => CloudCommand::SetLifeCritical {
            on: args
                .get("life_critical")
                .and_then(Value::as_bool)
                .ok_or("missing \"life_critical\": true|false")?,
            room,
        },
        "set_balance" | "top_up" => {
            let u = utility()?;
            if !enforcement
                .prepaid
                .iter()
                .any(|p| p.room == room && p.utility == u)
            {
                return Err(format!(
                    "room {room:?} has no prepaid {u:?} account in the gateway config"
                ));
            }
            let key = if name == "top_up" {
                "amount"
            } else {
                "balance"
            };
            let amount = args.get(key).and_then(Value::as_i64).ok_or(format!(
                "\"{key}\" must be an integer in minor units (fen), e.g. 5000 for 50.00"
            ))?;
            if name == "top_up" {
                if amount <= 0 {
                    return Err("a top-up must be positive".into());
                }
                if amount > super::prepaid::MAX_TOP_UP {
                    return Err(format!(
                        "a top-up of {amount} fen is above the most one top-up adds ({} fen): split it, or send set_balance",
                        super::prepaid::MAX_TOP_UP
                    ));
                }
                CloudCommand::TopUp {
                    room,
                    utility: u,
                    amount,
                }
            } else {
                if amount.abs() > super::prepaid::MAX_BALANCE {
                    return Err(format!(
                        "a balance of {amount} fen is beyond what an account holds (±{} fen)",
                        super::prepaid::MAX_BALANCE
                    ));
                }
                CloudCommand::SetBalance {
                    room,
                    utility: u,
                    balance: amount,
                }
            }
        }
        other => return Err(format!("unknown relay command {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_command_the_config_cannot_carry_out_is_refused_with_the_reason() {
        let c =
            crate::enforce::test_support::config(std::path::Path::new("/nonexistent/outbox.db"));
        let now = crate::clock::Clock::system().now();
        let p = |name: &str, args: Value| parse(name, "c-1", &args, &c.enforcement, &c.site, now);
        let refused = [
            ("freeze", json!({"room": "999"}), "unknown room \"999\""),
            (
                "freeze",
                json!({"room": "104", "scope": "doors"}),
                "\"scope\" must be",
            ),
            (
                "freeze",
                json!({"room": "104", "effective_at": "tomorrow"}),
                "RFC 3339",
            ),
            (
                "top_up",
                json!({"room": "104", "utility": "electricity", "amount": 12.5}),
                "integer in minor units",
            ),
            (
                "top_up",
                json!({"room": "104", "utility": "electricity", "amount": "5000"}),
                "integer in minor units",
            ),
            (
                "top_up",
                json!({"room": "104", "utility": "electricity", "amount": -5}),
                "positive",
            ),
            (
                "top_up",
                json!({"room": "104", "utility": "electricity", "amount": 100_000_001}),
                "above the most one top-up adds (100000000 fen)",
            ),
            (
                "top_up",
                json!({"room": "104", "utility": "electricity", "amount": i64::MAX}),
                "above the most one top-up adds",
            ),
            (
                "set_balance",
                json!({"room": "104", "utility": "electricity", "balance": -10_000_000_001i64}),
                "beyond what an account holds",
            ),
            (
                "top_up",
                json!({"room": "104", "utility": "water", "amount": 100}),
                "no prepaid Water account",
            ),
            (
                "set_lease",
                json!({"room": "104", "lease_end": "31/12/2026"}),
                "YYYY-MM-DD",
            ),
            ("set_life_critical", json!({"room": "104"}), "life_critical"),
            // Room 104 has a supply relay and no door: an access freeze would change nothing.
            (
                "freeze",
                json!({"room": "104", "scope": "access"}),
                "has no door relay on this gateway: the freeze would change nothing",
            ),
            (
                "lease_activity",
                json!({"room": "104", "at": "2099-01-01T00:00:00Z"}),
                "in the future",
            ),
            (
                "set_lease",
                json!({"room": "104", "lease_end": "2026-12-31", "notice_days": -3}),
                "notice_days",
            ),
        ];
        for (name, args, why) in refused {
            let e = p(name, args.clone()).unwrap_err();
            assert!(e.contains(why), "{name} {args}: {e}");
        }
        assert_eq!(
            p(
                "top_up",
                json!({"room": "104", "utility": "electricity", "amount": 5000})
            )
            .unwrap(),
            CloudCommand::TopUp {
                room: "104".into(),
                utility: Utility::Electricity,
                amount: 5000
            }
        );
        let Ok(CloudCommand::Freeze {
            scope,
            set: Some(f),
            ..
        }) = p(
            "freeze",
            json!({"room": "104", "scope": "utilities", "reason": "lease ended"}),
        )
        else {
            panic!()
        };
        assert_eq!(
            (scope, f.reason.as_str(), f.by.as_str(), f.effective),
            (Scope::Utilities, "lease ended", "c-1", now)
        );
    }
}
