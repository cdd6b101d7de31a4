//! Prepaid balances deducted locally from metered consumption, so thresholds are reached while the
//! gateway is offline. Pure: the task feeds counter deltas and the time.

use chrono::{DateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use super::rules::Prepaid;
use crate::money::Price;

/// A time-of-use band: `price` from `from` to `to` local time (wrapping midnight when `to < from`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Band {
    pub from: NaiveTime,
    pub to: NaiveTime,
    pub price: Price,
}

/// A prepaid tariff: a base price and optional time-of-use bands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepaidTariff {
    pub base: Price,
    pub bands: Vec<Band>,
}

impl PrepaidTariff {
    /// The price in force at local time `t`.
    pub fn price_at(&self, t: NaiveTime) -> Price {
        self.bands
            .iter()
            .find(|b| {
                if b.from <= b.to {
                    t >= b.from && t < b.to
                } else {
                    t >= b.from || t < b.to
                }
            })
            .map(|b| b.price)
            .unwrap_or(self.base)
    }
}

/// What a deduction or top-up changed that the cloud should hear about.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PrepaidEvent {
    LowBalance {
        balance: i64,
        threshold: i64,
    },
    BalanceEmpty {
        balance: i64,
    },
    Restored {
        balance: i64,
    },
    Reconciled {
        local: i64,
        cloud: i64,
        difference: i64,
    },
}

/// Deducts `milli` thousandths of a unit used at `price`; reports crossing the low threshold and zero.
pub fn deduct(
    p: &mut Prepaid,
    milli: i64,
    price: Price,
    low: i64,
    now: DateTime<Utc>,
) -> Vec<PrepaidEvent> {
    let mut ev = Vec::new();
    if milli <= 0 {
        return ev;
    }
    let before = p.balance;
    p.balance -= price.amount(milli);
    if p.balance <= low && !p.warned && p.balance > 0 {
        p.warned = true;
        ev.push(PrepaidEvent::LowBalance {
            balance: p.balance,
            threshold: low,
        });
    }
    if p.balance <= 0 && before > 0 {
        p.empty_since = Some(now);
        p.warned = true;
        ev.push(PrepaidEvent::BalanceEmpty { balance: p.balance });
    }
    ev
}

/// Adds a top-up; a balance back above zero restores at once.
pub fn top_up(p: &mut Prepaid, amount: i64) -> Vec<PrepaidEvent> {
    p.balance += amount;
    settle(p)
}

/// The cloud's figure wins; the difference to the local one is reported.
pub fn reconcile(p: &mut Prepaid, cloud: i64, now: DateTime<Utc>) -> Vec<PrepaidEvent> {
    let local = p.balance;
    p.balance = cloud;
    let mut ev = vec![PrepaidEvent::Reconciled {
        local,
        cloud,
        difference: local - cloud,
    }];
    if cloud <= 0 && p.empty_since.is_none() {
        p.empty_since = Some(now);
    }
    ev.extend(settle(p));
    ev
}

fn settle(p: &mut Prepaid) -> Vec<PrepaidEvent> {
    if p.balance > 0 && p.empty_since.is_some() {
        p.empty_since = None;
        p.warned = false;
        return vec![PrepaidEvent::Restored { balance: p.balance }];
    }
    if p.balance > 0 {
        p.warned = false;
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(h: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, 0, 0).unwrap()
    }

    #[test]
    fn time_of_use_bands_wrap_midnight() {
        let tariff = PrepaidTariff {
            base: Price::parse("1.00", 2).unwrap(),
            bands: vec![Band {
                from: t(22),
                to: t(7),
                price: Price::parse("0.40", 2).unwrap(),
            }],
        };
        assert_eq!(tariff.price_at(t(23)).micros, 400_000);
        assert_eq!(tariff.price_at(t(3)).micros, 400_000);
        assert_eq!(tariff.price_at(t(12)).micros, 1_000_000);
    }

    #[test]
    fn deduction_warns_then_empties_then_top_up_restores() {
        let now = Utc::now();
        let price = Price::parse("1.00", 2).unwrap();
        let mut p = Prepaid {
            balance: 1500,
            empty_since: None,
            warned: false,
        };
        assert!(
            deduct(&mut p, 4_000, price, 1000, now).is_empty(),
            "15.00 → 11.00"
        );
        assert_eq!(
            deduct(&mut p, 2_000, price, 1000, now),
            vec![PrepaidEvent::LowBalance {
                balance: 900,
                threshold: 1000
            }]
        );
        assert!(
            deduct(&mut p, 1_000, price, 1000, now).is_empty(),
            "warned once per descent"
        );
        assert_eq!(
            deduct(&mut p, 9_000, price, 1000, now),
            vec![PrepaidEvent::BalanceEmpty { balance: -100 }]
        );
        assert_eq!(p.empty_since, Some(now));
        assert_eq!(
            top_up(&mut p, 5000),
            vec![PrepaidEvent::Restored { balance: 4900 }]
        );
        assert_eq!(p.empty_since, None);
        let ev = reconcile(&mut p, 4700, now);
        assert_eq!(
            ev,
            vec![PrepaidEvent::Reconciled {
                local: 4900,
                cloud: 4700,
                difference: 200
            }]
        );
        assert_eq!(p.balance, 4700);
    }
}
