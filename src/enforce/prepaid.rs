//! Prepaid balances deducted locally from metered consumption, so thresholds are reached while the
//! gateway is offline. Pure: the task feeds counter deltas and the time.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::rules::Prepaid;
#[cfg(test)]
use crate::tou::TouPrice as PrepaidTariff;
use crate::tou::{self, Piece};

/// What a deduction or top-up changed that the cloud should hear about.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum PrepaidEvent {
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

/// The most one top-up adds: 1,000,000.00 in minor units. A payment above it is a typing error or
/// a forged command more likely than a tenant's payment; split it, or set the balance.
pub(crate) const MAX_TOP_UP: i64 = 100_000_000;

/// The most an account holds either way (±100,000,000.00): far inside `i64`, so deductions and
/// top-ups never overflow and every sum of ledger amounts is exact.
pub(crate) const MAX_BALANCE: i64 = 10_000_000_000;

/// Deducts `amount` minor units; reports crossing the low threshold and zero.
pub(crate) fn deduct(
    p: &mut Prepaid,
    amount: i64,
    low: i64,
    now: DateTime<Utc>,
) -> Vec<PrepaidEvent> {
    let mut ev = Vec::new();
    if amount <= 0 {
        return ev;
    }
    let before = p.balance;
    p.balance -= amount;
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

// ---- exact metering -----------------------------------------------------------------------------

/// Where a prepaid counter has been billed up to. Consumption is always billed from the last
/// *billed* counter value, never from the last reading, and the part of a minor unit that a charge
/// did not deduct is carried to the next one: over any run of readings the total deducted is the
/// exact price × consumption rounded down, within one minor unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CounterState {
    /// Counter value billed up to, thousandths of a unit (Wh, litres).
    pub billed_milli: i64,
    pub billed_at: DateTime<Utc>,
    /// Money owed but not yet deducted, in units of 10^-(9 − decimals) minor units (less than one
    /// minor unit: `0 ≤ carry < 10^(9 − decimals)`).
    pub carry: i64,
    /// A reading that did not fit, waiting for later readings to explain it.
    pub suspect: Option<SuspectReading>,
}

/// A reading held as suspect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SuspectReading {
    pub milli: i64,
    pub at: DateTime<Utc>,
    /// How many readings in a row agree with it (itself included).
    pub seen: u32,
}

/// Why a reading was not billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SuspectReason {
    /// Below the billed value: a meter reboot, a wrong decode, or an unrecorded exchange.
    BelowBilled,
    /// More than the meter's rated flow could have delivered since the billed reading.
    AboveRated,
}

/// The physical limit of a counter: what it can advance in an hour (rated power in kW, rated flow
/// in m³/h), plus a fixed slack for the counter's resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_milli_per_hour: i64,
    pub slack_milli: i64,
}

impl Limits {
    /// Most the counter can advance in `elapsed`.
    fn allowed(&self, elapsed: chrono::Duration) -> i64 {
        let ms = i128::from(elapsed.num_milliseconds().max(0));
        (i128::from(self.max_milli_per_hour) * ms / 3_600_000) as i64 + self.slack_milli
    }
}

/// Readings in a row that must agree with a suspect value before the counter is re-based on it.
pub(crate) const CONFIRM_READINGS: u32 = 3;

/// What one reading did to a prepaid counter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// First sight of the counter: the baseline.
    Baseline,
    /// Consumption billed, one charge per band (empty when the counter did not move).
    Billed(Vec<Charge>),
    /// Held, not billed. `first` on the reading that started the episode (report it once).
    Suspect {
        reason: SuspectReason,
        first: bool,
        billed_milli: i64,
        reading_milli: i64,
    },
    /// Later readings confirmed the suspect value: billing goes on from it, the jump is not billed
    /// (it is no consumption the meter could have measured; an exchange goes through
    /// `[[replacement]]` or a reconciliation).
    Rebased { from_milli: i64, to_milli: i64 },
}

/// Consumption of one band, priced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Charge {
    #[serde(flatten)]
    pub piece: Piece,
    /// Minor units deducted for it (the carry included).
    pub amount: i64,
}

/// Feeds one Good counter reading (`milli` thousandths at `at`). `inside` are any readings known
/// between the billed one and this one (history samples), used to split a long interval across
/// band changes. Pure: returns what to deduct and report.
pub(crate) fn meter(
    state: &mut Option<CounterState>,
    at: DateTime<Utc>,
    milli: i64,
    tariff: &impl tou::Prices,
    tz: chrono_tz::Tz,
    limits: Limits,
    inside: &[(DateTime<Utc>, i64)],
) -> Step {
    let Some(s) = state else {
        *state = Some(CounterState {
            billed_milli: milli,
            billed_at: at,
            carry: 0,
            suspect: None,
        });
        return Step::Baseline;
    };
    if at < s.billed_at {
        // An old reading (clock stepped back, reordered delivery): nothing to bill.
        return Step::Billed(Vec::new());
    }
    let used = milli - s.billed_milli;
    let plausible = used >= 0 && used <= limits.allowed(at - s.billed_at);
    if !plausible {
        let reason = if used < 0 {
            SuspectReason::BelowBilled
        } else {
            SuspectReason::AboveRated
        };
        let agrees = s
            .suspect
            .as_ref()
            .is_some_and(|x| milli >= x.milli && milli - x.milli <= limits.allowed(at - x.at));
        let first = !agrees;
        let seen = if agrees {
            s.suspect.as_ref().map_or(1, |x| x.seen + 1)
        } else {
            1
        };
        if seen >= CONFIRM_READINGS {
            let from = s.billed_milli;
            s.billed_milli = milli;
            s.billed_at = at;
            s.suspect = None;
            return Step::Rebased {
                from_milli: from,
                to_milli: milli,
            };
        }
        s.suspect = Some(SuspectReading { milli, at, seen });
        return Step::Suspect {
            reason,
            first,
            billed_milli: s.billed_milli,
            reading_milli: milli,
        };
    }
    s.suspect = None;
    if used == 0 {
        s.billed_at = at;
        return Step::Billed(Vec::new());
    }
    let mut points = vec![(s.billed_at, s.billed_milli)];
    points.extend(
        inside
            .iter()
            .filter(|(t, m)| *t > s.billed_at && *t < at && *m >= s.billed_milli && *m <= milli)
            .copied(),
    );
    // A sample that went backwards inside the interval is not trusted: keep the counter monotone.
    let mut last = s.billed_milli;
    points.retain(|(_, m)| {
        let ok = *m >= last;
        if ok {
            last = *m;
        }
        ok
    });
    points.push((at, milli));
    let charges = tou::split(tariff, tz, &points)
        .into_iter()
        .map(|piece| {
            let den = 10i128.pow(9 - piece.price.decimals.min(9));
            let num =
                i128::from(s.carry) + i128::from(piece.milli()) * i128::from(piece.price.micros);
            s.carry = num.rem_euclid(den) as i64;
            Charge {
                amount: num.div_euclid(den) as i64,
                piece,
            }
        })
        .collect();
    s.billed_milli = milli;
    s.billed_at = at;
    Step::Billed(charges)
}

/// Adds a top-up; a balance back above zero restores at once.
pub(crate) fn top_up(p: &mut Prepaid, amount: i64) -> Vec<PrepaidEvent> {
    p.balance += amount;
    settle(p)
}

/// The cloud's figure wins; the difference to the local one is reported.
pub(crate) fn reconcile(p: &mut Prepaid, cloud: i64, now: DateTime<Utc>) -> Vec<PrepaidEvent> {
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
    use crate::money::Price;
    use crate::tou::{Band, BASE_BAND};
    use chrono::{Duration, NaiveTime, TimeZone};
    use proptest::prelude::*;

    const TZ: chrono_tz::Tz = chrono_tz::Asia::Shanghai;

    fn flat(price: &str) -> PrepaidTariff {
        PrepaidTariff::flat(Price::parse(price, 2).unwrap())
    }

    fn hm(h: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, 0, 0).unwrap()
    }

    /// A 10(60) A single-phase meter: 13.8 kW rated, 0.05 kWh slack.
    const METER: Limits = Limits {
        max_milli_per_hour: 13_800_000,
        slack_milli: 50,
    };

    fn local(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        TZ.with_ymd_and_hms(2026, 10, d, h, m, 0)
            .unwrap()
            .with_timezone(&Utc)
    }

    /// The counter a real meter shows: true energy in Wh truncated to its resolution.
    fn shown(true_wh: f64, resolution_milli: i64) -> i64 {
        (true_wh as i64 / resolution_milli) * resolution_milli
    }

    /// Feeds readings; returns (minor units deducted, billed consumption in thousandths).
    fn run(tariff: &PrepaidTariff, readings: &[(DateTime<Utc>, i64)]) -> (i64, i64, Vec<Charge>) {
        let mut st = None;
        let mut all = Vec::new();
        for (t, m) in readings {
            if let Step::Billed(c) = meter(&mut st, *t, *m, tariff, TZ, METER, &[]) {
                all.extend(c);
            }
        }
        let amount = all.iter().map(|c| c.amount).sum();
        let milli = all.iter().map(|c| c.piece.milli()).sum();
        (amount, milli, all)
    }

    /// Exact money of the charges, in minor units × 10^(9 − decimals).
    fn exact_num(charges: &[Charge]) -> i128 {
        charges
            .iter()
            .map(|c| i128::from(c.piece.milli()) * i128::from(c.piece.price.micros))
            .sum()
    }

    #[test]
    fn one_kilowatt_polled_every_10s_for_a_day_is_deducted_to_the_fen() {
        // 1 kW for 24 h = 24 kWh × 0.8523 = 20.4552 CNY: 2045 fen deducted (2045.52 exact), with a
        // 0.001 kWh counter and with a 0.01 kWh counter. Before the fix each 10 s delta (2.8 Wh)
        // was rounded on its own: 0 fen for ever at 0.001 kWh, 1 fen per 0.01 kWh step at 0.01 kWh.
        for resolution in [1, 10] {
            let start = local(14, 0, 0);
            let readings: Vec<_> = (0..=8640)
                .map(|k| {
                    let true_wh = 5_123_400.0 + 1000.0 * (k as f64 * 10.0) / 3600.0;
                    (
                        start + Duration::seconds(10 * k),
                        shown(true_wh, resolution),
                    )
                })
                .collect();
            let (amount, milli, charges) = run(&flat("0.8523"), &readings);
            let total = readings.last().unwrap().1 - readings[0].1;
            assert_eq!(
                milli, total,
                "resolution {resolution} Wh: all consumption billed"
            );
            assert_eq!(total, 24_000);
            let exact = i128::from(Price::parse("0.8523", 2).unwrap().micros) * i128::from(total);
            assert_eq!(exact, 20_455_200_000, "2045.52 fen × 10^7");
            assert_eq!(amount, 2045, "resolution {resolution} Wh");
            assert_eq!(exact_num(&charges) / 10_000_000, 2045);
        }
    }

    #[test]
    fn a_reading_of_zero_between_two_normal_readings_bills_nothing_extra() {
        // 5123.30 kWh, then a reboot glitch reads 0.00, then 5123.31: 0.01 kWh is billed, not
        // 5123.31 kWh.
        let t = local(14, 12, 0);
        let tariff = flat("0.8523");
        let mut st = None;
        assert_eq!(
            meter(&mut st, t, 5_123_300, &tariff, TZ, METER, &[]),
            Step::Baseline
        );
        let glitch = meter(
            &mut st,
            t + Duration::seconds(10),
            0,
            &tariff,
            TZ,
            METER,
            &[],
        );
        assert_eq!(
            glitch,
            Step::Suspect {
                reason: SuspectReason::BelowBilled,
                first: true,
                billed_milli: 5_123_300,
                reading_milli: 0
            }
        );
        let Step::Billed(c) = meter(
            &mut st,
            t + Duration::seconds(20),
            5_123_310,
            &tariff,
            TZ,
            METER,
            &[],
        ) else {
            panic!("the next normal reading bills from the billed value");
        };
        assert_eq!(c.iter().map(|c| c.piece.milli()).sum::<i64>(), 10);
        assert_eq!(st.unwrap().suspect, None);
    }

    #[test]
    fn a_jump_beyond_rated_power_is_held_and_a_confirmed_one_rebases_without_billing() {
        // A wrong decode reads 65,535 kWh ten seconds after 120 kWh: held. Three readings in a row at
        // the new level (a meter exchange nobody recorded) re-base the counter; nothing is billed.
        let t = local(14, 12, 0);
        let tariff = flat("0.8523");
        let mut st = None;
        meter(&mut st, t, 120_000, &tariff, TZ, METER, &[]);
        let s1 = meter(
            &mut st,
            t + Duration::seconds(10),
            65_535_000,
            &tariff,
            TZ,
            METER,
            &[],
        );
        assert!(matches!(
            s1,
            Step::Suspect {
                reason: SuspectReason::AboveRated,
                first: true,
                ..
            }
        ));
        let s2 = meter(
            &mut st,
            t + Duration::seconds(20),
            65_535_001,
            &tariff,
            TZ,
            METER,
            &[],
        );
        assert!(matches!(s2, Step::Suspect { first: false, .. }), "{s2:?}");
        let s3 = meter(
            &mut st,
            t + Duration::seconds(30),
            65_535_003,
            &tariff,
            TZ,
            METER,
            &[],
        );
        assert_eq!(
            s3,
            Step::Rebased {
                from_milli: 120_000,
                to_milli: 65_535_003
            }
        );
        let Step::Billed(c) = meter(
            &mut st,
            t + Duration::seconds(40),
            65_535_006,
            &tariff,
            TZ,
            METER,
            &[],
        ) else {
            panic!("billing resumes from the new level");
        };
        assert_eq!(c[0].piece.milli(), 3);
        // 13.8 kW for 10 s is 38 Wh (+ 50 Wh slack): 80 Wh in 10 s is fine, a day's worth is not.
        let mut st = None;
        meter(&mut st, t, 0, &tariff, TZ, METER, &[]);
        assert!(matches!(
            meter(
                &mut st,
                t + Duration::seconds(10),
                80,
                &tariff,
                TZ,
                METER,
                &[]
            ),
            Step::Billed(_)
        ));
    }

    #[test]
    fn an_outage_across_a_band_boundary_is_priced_by_band() {
        // Peak 08:00–22:00 at 0.5583, valley 22:00–08:00 at 0.3583. The gateway is down from 21:00 to
        // 23:00; the meter went on at 2 kW: 2 kWh peak + 2 kWh valley, not 4 kWh at the 23:00 price.
        let tariff = crate::tou::tests::peak_valley();
        let mut st = None;
        meter(
            &mut st,
            local(14, 21, 0),
            1_000_000,
            &tariff,
            TZ,
            METER,
            &[],
        );
        let Step::Billed(c) = meter(
            &mut st,
            local(14, 23, 0),
            1_004_000,
            &tariff,
            TZ,
            METER,
            &[],
        ) else {
            panic!()
        };
        let bands: Vec<(&str, i64, i64)> = c
            .iter()
            .map(|c| (c.piece.band.as_str(), c.piece.milli(), c.amount))
            .collect();
        // 2 kWh × 0.5583 = 111.66 fen → 111 (0.66 carried); 2 kWh × 0.3583 = 71.66 + 0.66 → 72.
        assert_eq!(bands, vec![("peak", 2_000, 111), ("valley", 2_000, 72)]);
        assert_eq!(st.as_ref().unwrap().carry, 3_200_000, "0.32 fen carried");
        // With a history sample at 22:00 (the load stopped at 21:30), the split follows the sample.
        let mut st = None;
        meter(
            &mut st,
            local(15, 21, 0),
            2_000_000,
            &tariff,
            TZ,
            METER,
            &[],
        );
        let inside = [(local(15, 22, 0), 2_001_000)];
        let Step::Billed(c) = meter(
            &mut st,
            local(15, 23, 0),
            2_001_000,
            &tariff,
            TZ,
            METER,
            &inside,
        ) else {
            panic!()
        };
        let bands: Vec<(&str, i64)> = c
            .iter()
            .map(|c| (c.piece.band.as_str(), c.piece.milli()))
            .collect();
        assert_eq!(bands, vec![("peak", 1_000), ("valley", 0)]);
    }

    proptest! {
        #[test]
        fn the_total_deducted_is_the_exact_amount_rounded_down_within_one_fen(
            start_wh in 0i64..50_000_000,
            loads in proptest::collection::vec((300u32..3000, 1i64..120), 1..400),
            resolution in prop_oneof![Just(1i64), Just(10)],
            price_micros in 100_000i64..3_000_000,
            valley_micros in 100_000i64..3_000_000,
            band_from in 0u32..24,
            band_len in 1u32..23,
            banded in any::<bool>(),
        ) {
            let tariff = PrepaidTariff {
                base: Price { micros: price_micros, decimals: 2 },
                bands: if banded {
                    vec![Band { name: "valley".into(), from: hm(band_from), to: hm((band_from + band_len) % 24), price: Price { micros: valley_micros, decimals: 2 } }]
                } else {
                    Vec::new()
                },
            };
            // Loads of 0.3–3 kW, polled every 10 s … 20 min (outages), across midnight.
            let mut t = local(31, 22, 0);
            let mut wh = start_wh as f64;
            let mut readings = vec![(t, shown(wh, resolution))];
            for (watts, tens) in loads {
                let secs = 10 * tens;
                t += Duration::seconds(secs);
                wh += f64::from(watts) * secs as f64 / 3600.0;
                readings.push((t, shown(wh, resolution)));
            }
            let (amount, milli, charges) = run(&tariff, &readings);
            prop_assert_eq!(milli, readings.last().unwrap().1 - readings[0].1);
            let den = 10_000_000i128;
            let exact = exact_num(&charges);
            prop_assert!(i128::from(amount) * den <= exact && exact < (i128::from(amount) + 1) * den,
                "deducted {} fen, exact {}", amount, exact as f64 / den as f64);
            if !banded {
                prop_assert!(charges.iter().all(|c| c.piece.band == BASE_BAND));
                prop_assert_eq!(exact, i128::from(milli) * i128::from(price_micros));
            }
        }
    }

    #[test]
    fn deduction_warns_then_empties_then_top_up_restores() {
        let now = crate::clock::Clock::system().now();
        let mut p = Prepaid {
            balance: 1500,
            empty_since: None,
            warned: false,
        };
        assert!(deduct(&mut p, 400, 1000, now).is_empty(), "15.00 → 11.00");
        assert_eq!(
            deduct(&mut p, 200, 1000, now),
            vec![PrepaidEvent::LowBalance {
                balance: 900,
                threshold: 1000
            }]
        );
        assert!(
            deduct(&mut p, 100, 1000, now).is_empty(),
            "warned once per descent"
        );
        assert_eq!(
            deduct(&mut p, 900, 1000, now),
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
