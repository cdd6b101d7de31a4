//! Money and exact splitting: integer minor units (fen, cents), with documented rounding.
//!
//! Rounding rules, used everywhere an amount is derived:
//! - a product (consumption × price) is rounded **half to even** to the minor unit, which is unbiased
//!   over many bills;
//! - a total split by coefficients uses the **largest remainder** method in exact rational
//!   arithmetic: every share is first rounded down, then the units left over go one each to the
//!   largest fractional remainders (equal remainders: lowest room id first). The shares therefore always sum exactly to the total, are never negative,
//!   and do not depend on the order the rooms are listed in.

use std::cmp::Ordering;

/// Rounds `num / den` half to even (`den > 0`).
pub(crate) fn div_round_half_even(num: i128, den: i128) -> i128 {
    let q = num.div_euclid(den);
    let r = num.rem_euclid(den);
    match (2 * r).cmp(&den) {
        Ordering::Less => q,
        Ordering::Greater => q + 1,
        Ordering::Equal => {
            if q % 2 == 0 {
                q
            } else {
                q + 1
            }
        }
    }
}

/// A price, exact: millionths of the major currency unit per kWh or m³ ("0.8523" CNY/kWh = 852300).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Price {
    pub micros: i64,
    /// Digits of the minor unit (2 for CNY, EUR, USD).
    pub decimals: u32,
}

impl Price {
    /// Parses a decimal string in major units, up to 6 decimals ("0.8523").
    pub fn parse(s: &str, decimals: u32) -> Result<Price, String> {
        let s = s.trim();
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty()
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
            || frac.len() > 6
        {
            return Err(format!(
                "{s:?}: expected a non-negative decimal with at most 6 decimals, e.g. \"0.8523\""
            ));
        }
        let int: i64 = int.parse().map_err(|_| format!("{s:?}: too large"))?;
        let frac: i64 = format!("{frac:0<6}").parse().unwrap_or(0);
        if decimals > 6 {
            return Err(format!(
                "currency with {decimals} decimals is not supported (at most 6)"
            ));
        }
        Ok(Price {
            micros: int.saturating_mul(1_000_000).saturating_add(frac),
            decimals,
        })
    }

    /// Amount in minor units for `milli` thousandths of a unit (Wh, litres), rounded half to even.
    #[must_use]
    pub fn amount(&self, milli: i64) -> i64 {
        // milli/1000 units × micros/1e6 major × 10^decimals minor/major
        let den = 10i128.pow(9 - self.decimals);
        div_round_half_even(i128::from(milli) * i128::from(self.micros), den) as i64
    }
}

/// Consumption in thousandths of a unit (Wh for kWh, litres for m³), rounded half to even: the exact
/// integer every split works on.
#[must_use]
pub fn to_milli(value: f64) -> i64 {
    let scaled = value * 1000.0;
    let r = scaled.round();
    // f64::round rounds half away from zero; make exact halves even.
    if (scaled - scaled.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        (r - scaled.signum()) as i64
    } else {
        r as i64
    }
}

/// An exact weight of a split (a room's coefficient, or coefficient × consumption): a rational, so
/// remainders are compared without floating-point noise and ties are real ties.
pub(crate) type Weight = num_rational::BigRational;

/// A configured decimal (m², persons, a fixed coefficient, a method's weight) as an exact weight,
/// counted to 6 decimals (what the bill prints and a person types).
#[must_use]
pub(crate) fn weight_of(value: f64) -> Weight {
    let micros = (value * 1_000_000.0).round();
    // Configured values are validated finite and far below 9.2e12; saturate rather than wrap.
    let micros = if micros.is_finite() {
        micros.clamp(-9.0e18, 9.0e18) as i64
    } else {
        0
    };
    Weight::new(micros.into(), 1_000_000.into())
}

/// Splits `total` (≥ 0) into shares proportional to `weights` (≥ 0, not all zero), summing exactly to
/// `total`, by the largest remainder method in exact arithmetic: every share is first
/// `⌊total × w / Σw⌋`, then the units left over (fewer than there are shares) go one each to the
/// largest remainders; equal remainders go to the lowest key first, so the result does not depend on
/// the order the rooms are listed in. Negative weights count as 0.
pub(crate) fn largest_remainder<K: Ord>(total: i64, weights: &[Weight], keys: &[K]) -> Vec<i64> {
    use num_traits::{Signed as _, ToPrimitive as _, Zero as _};
    assert_eq!(weights.len(), keys.len());
    let n = weights.len();
    let weights: Vec<Weight> = weights
        .iter()
        .map(|w| {
            if w.is_negative() {
                Weight::zero()
            } else {
                w.clone()
            }
        })
        .collect();
    let sum: Weight = weights.iter().sum();
    if n == 0 || sum.is_zero() || total <= 0 {
        return vec![0; n];
    }
    let total_r = Weight::from_integer(total.into());
    let mut shares = vec![0i64; n];
    let mut rema: Vec<(Weight, usize)> = Vec::with_capacity(n);
    let mut given = 0i64;
    for (i, w) in weights.iter().enumerate() {
        let quota = &total_r * w / &sum;
        let floor = quota.floor();
        // 0 ≤ floor ≤ total, so it fits.
        let f = floor.to_integer().to_i64().unwrap_or(0);
        shares[i] = f;
        given += f;
        rema.push((quota - floor, i));
    }
    rema.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| keys[a.1].cmp(&keys[b.1])));
    // Σ floors > total − n exactly, so every leftover unit goes to a different share.
    for &(_, i) in rema
        .iter()
        .take(usize::try_from(total - given).unwrap_or(0))
    {
        shares[i] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn half_to_even_rounding() {
        assert_eq!(div_round_half_even(5, 2), 2);
        assert_eq!(div_round_half_even(7, 2), 4);
        assert_eq!(div_round_half_even(-5, 2), -2);
        assert_eq!(div_round_half_even(10, 4), 2);
        assert_eq!(div_round_half_even(11, 4), 3);
        assert_eq!(to_milli(1.0005), 1000, "1000.5 Wh rounds to even");
        assert_eq!(to_milli(1.0015), 1002);
        assert_eq!(to_milli(2.25), 2250);
    }

    #[test]
    fn prices_parse_exactly_and_amounts_round_half_to_even_on_the_fen() {
        let p = Price::parse("0.8523", 2).unwrap();
        assert_eq!(p.micros, 852_300);
        // 1234.567 kWh × 0.8523 = 1052.2214... CNY = 105222 fen.
        assert_eq!(p.amount(1_234_567), 105_222);
        assert_eq!(Price::parse("3", 2).unwrap().amount(1000), 300);
        assert!(Price::parse("-1", 2).is_err());
        assert!(Price::parse("0.1234567", 2).is_err());
        // Half to even on the minor unit: 0.5 fen → 0, 1.5 fen → 2.
        let half = Price::parse("0.005", 2).unwrap();
        assert_eq!(half.amount(1000), 0);
        assert_eq!(half.amount(3000), 2);
    }

    fn w(v: &[f64]) -> Vec<Weight> {
        v.iter().map(|x| weight_of(*x)).collect()
    }

    #[test]
    fn largest_remainder_hand_computed() {
        // 100 split 1:1:1 → 33.33 each; the extra unit goes to the lowest key.
        assert_eq!(
            largest_remainder(100, &w(&[1.0, 1.0, 1.0]), &["a", "b", "c"]),
            vec![34, 33, 33]
        );
        // Same rooms listed in another order get the same shares.
        assert_eq!(
            largest_remainder(100, &w(&[1.0, 1.0, 1.0]), &["c", "a", "b"]),
            vec![33, 34, 33]
        );
        assert_eq!(
            largest_remainder(10, &w(&[0.15, 0.85]), &[1, 2]),
            vec![2, 8]
        );
        assert_eq!(largest_remainder(0, &w(&[1.0]), &[1]), vec![0]);
    }

    #[test]
    fn equal_shares_that_floating_point_makes_unequal_are_a_tie_decided_by_room_id() {
        // 150 rooms whose coefficients are equal, each 1/300 + 1/300 but reached by two routes
        // (2/600 and 1/600 + 3/600, say): in f64 the quotas differ in the last bits and the
        // leftover fen went to whichever room the noise favoured. 10,003 fen over 150 rooms:
        // 66.686… each, 103 leftover fen to the 103 lowest room ids.
        let third = Weight::new(1.into(), 300.into());
        let weights: Vec<Weight> = (0..150)
            .map(|i| {
                if i % 2 == 0 {
                    &third + &third
                } else {
                    Weight::new(1.into(), 600.into()) + Weight::new(3.into(), 600.into())
                }
            })
            .collect();
        let keys: Vec<String> = (0..150).map(|i| format!("{:03}", 149 - i)).collect();
        let shares = largest_remainder(10_003, &weights, &keys);
        for (k, s) in keys.iter().zip(&shares) {
            let id: usize = k.parse().unwrap();
            assert_eq!(*s, if id < 103 { 67 } else { 66 }, "room {k}");
        }
        assert_eq!(shares.iter().sum::<i64>(), 10_003);
    }

    proptest! {
        #[test]
        fn shares_sum_exactly_are_never_negative_and_ignore_order(
            total in 0i64..10_000_000_000,
            weights in proptest::collection::vec(0.0f64..1000.0, 1..60),
            rotate in 0usize..60,
        ) {
            prop_assume!(weights.iter().sum::<f64>() > 0.001);
            let keys: Vec<usize> = (0..weights.len()).collect();
            let weights = w(&weights);
            let shares = largest_remainder(total, &weights, &keys);
            prop_assert_eq!(shares.iter().sum::<i64>(), total);
            prop_assert!(shares.iter().all(|s| *s >= 0));
            // Each share is its exact quota rounded down or up, and a unit left over never goes
            // to a smaller remainder, nor to a higher key among equal remainders.
            let sum: Weight = weights.iter().sum();
            let quota: Vec<Weight> = weights.iter().map(|x| Weight::from_integer(total.into()) * x / &sum).collect();
            let rem: Vec<Weight> = quota.iter().map(|q| q - q.floor()).collect();
            for i in 0..shares.len() {
                let floor = quota[i].floor().to_integer();
                let up = num_bigint::BigInt::from(shares[i]) != floor;
                prop_assert!(!up || num_bigint::BigInt::from(shares[i]) == &floor + 1);
                for j in 0..shares.len() {
                    let j_up = num_bigint::BigInt::from(shares[j]) != quota[j].floor().to_integer();
                    if up && !j_up {
                        prop_assert!(rem[i] > rem[j] || (rem[i] == rem[j] && keys[i] < keys[j]));
                    }
                }
            }
            let r = rotate % weights.len();
            let mut w2 = weights.clone();
            let mut k2 = keys.clone();
            w2.rotate_left(r);
            k2.rotate_left(r);
            let mut s2 = largest_remainder(total, &w2, &k2);
            s2.rotate_right(r);
            prop_assert_eq!(shares, s2);
        }
    }
}
