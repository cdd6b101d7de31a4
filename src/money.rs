//! Money and exact splitting: integer minor units (fen, cents), with documented rounding.
//!
//! Rounding rules, used everywhere an amount is derived:
//! - a product (consumption × price) is rounded **half to even** to the minor unit, which is unbiased
//!   over many bills;
//! - a total split by coefficients uses the **largest remainder** method: every share is first
//!   rounded down, then the units left over go one each to the largest fractional remainders (ties:
//!   lowest room id first). The shares therefore always sum exactly to the total, are never negative,
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

/// Splits `total` (≥ 0) into shares proportional to `weights` (≥ 0, not all zero), summing exactly to
/// `total`. `keys` order the tie-break (lowest key first) and make the result order-independent.
pub(crate) fn largest_remainder<K: Ord>(total: i64, weights: &[f64], keys: &[K]) -> Vec<i64> {
    assert_eq!(weights.len(), keys.len());
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let sum: f64 = weights.iter().map(|w| w.max(0.0)).sum();
    if sum <= 0.0 || total <= 0 {
        return vec![0; n];
    }
    let mut shares = vec![0i64; n];
    let mut rema: Vec<(f64, usize)> = Vec::with_capacity(n);
    let mut given = 0i64;
    for i in 0..n {
        let quota = total as f64 * weights[i].max(0.0) / sum;
        let floor = quota.floor().max(0.0) as i64;
        shares[i] = floor;
        given += floor;
        rema.push((quota - floor as f64, i));
    }
    let mut left = total - given;
    // Floating error can make the floors overshoot by a unit on huge totals: take back from the smallest remainders.
    if left < 0 {
        rema.sort_by(|a, b| {
            a.0.partial_cmp(&b.0)
                .unwrap_or(Ordering::Equal)
                .then_with(|| keys[b.1].cmp(&keys[a.1]))
        });
        for &(_, i) in &rema {
            if left == 0 {
                break;
            }
            if shares[i] > 0 {
                shares[i] -= 1;
                left += 1;
            }
        }
        return shares;
    }
    rema.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(Ordering::Equal)
            .then_with(|| keys[a.1].cmp(&keys[b.1]))
    });
    let mut k = 0;
    while left > 0 {
        let i = rema[k % n].1;
        shares[i] += 1;
        left -= 1;
        k += 1;
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

    #[test]
    fn largest_remainder_hand_computed() {
        // 100 split 1:1:1 → 33.33 each; the extra unit goes to the lowest key.
        assert_eq!(
            largest_remainder(100, &[1.0, 1.0, 1.0], &["a", "b", "c"]),
            vec![34, 33, 33]
        );
        // Same rooms listed in another order get the same shares.
        assert_eq!(
            largest_remainder(100, &[1.0, 1.0, 1.0], &["c", "a", "b"]),
            vec![33, 34, 33]
        );
        assert_eq!(largest_remainder(10, &[0.15, 0.85], &[1, 2]), vec![2, 8]);
        assert_eq!(largest_remainder(0, &[1.0], &[1]), vec![0]);
    }

    proptest! {
        #[test]
        fn shares_sum_exactly_are_never_negative_and_ignore_order(
            total in 0i64..10_000_000_000,
            weights in proptest::collection::vec(0.0f64..1000.0, 1..60),
            rotate in 0usize..60,
        ) {
            prop_assume!(weights.iter().sum::<f64>() > 0.0);
            let keys: Vec<usize> = (0..weights.len()).collect();
            let shares = largest_remainder(total, &weights, &keys);
            prop_assert_eq!(shares.iter().sum::<i64>(), total);
            prop_assert!(shares.iter().all(|s| *s >= 0));
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
