//! Packed BCD as China's meter protocols carry it: two decimal digits a byte, least significant
//! byte first, the decimal point implied by the data format (DL/T 645-2007 §A6 and CJ/T 188-2004
//! §B6 of `shared/reference/dlt645-cjt188.md`). Signed DL/T 645 values keep the sign in bit 7 of
//! the most significant (last) byte.

use thiserror::Error;

/// A byte that is not two decimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("byte {index} is {byte:#04x}, not two BCD digits (each nibble 0-9)")]
pub struct BcdError {
    /// Position in the field, 0 = first on the wire.
    pub index: usize,
    pub byte: u8,
}

/// The unsigned integer in `bytes` (least significant pair first).
pub fn to_u64(bytes: &[u8]) -> Result<u64, BcdError> {
    let mut v = 0u64;
    for (index, &byte) in bytes.iter().enumerate().rev() {
        v = v * 100 + u64::from(digits(byte).ok_or(BcdError { index, byte })?);
    }
    Ok(v)
}

/// The signed integer in `bytes`: bit 7 of the last byte is the sign, the rest is the magnitude.
pub fn to_i64_signed(bytes: &[u8]) -> Result<i64, BcdError> {
    let Some((&last, rest)) = bytes.split_last() else {
        return Ok(0);
    };
    let negative = last & 0x80 != 0;
    let mut magnitude = rest.to_vec();
    magnitude.push(last & 0x7F);
    let v = to_u64(&magnitude)? as i64;
    Ok(if negative { -v } else { v })
}

/// `value` as `len` BCD bytes, least significant pair first; `None` when it does not fit.
#[must_use]
pub fn from_u64(mut value: u64, len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        let pair = (value % 100) as u8;
        value /= 100;
        out.push(((pair / 10) << 4) | (pair % 10));
    }
    (value == 0).then_some(out)
}

/// `value` as `len` signed BCD bytes (sign in bit 7 of the last byte); `None` when it does not fit.
#[must_use]
pub fn from_i64_signed(value: i64, len: usize) -> Option<Vec<u8>> {
    let mut out = from_u64(value.unsigned_abs(), len)?;
    let last = out.last_mut()?;
    if *last & 0x80 != 0 {
        return None;
    }
    if value < 0 {
        *last |= 0x80;
    }
    Some(out)
}

/// A meter number printed most significant digit first (1 to `2 × N` digits, zero-padded) as `N`
/// BCD bytes in wire order; `None` when it is not such a number.
#[must_use]
pub fn number<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.is_empty() || s.len() > 2 * N || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bytes = from_u64(s.parse().ok()?, N)?;
    bytes.try_into().ok()
}

/// Whether an address in a request (`want`, where `AA` bytes are wildcards) covers `got`.
#[must_use]
pub fn covers(want: &[u8], got: &[u8]) -> bool {
    want.len() == got.len() && want.iter().zip(got).all(|(a, b)| *a == 0xAA || a == b)
}

/// Writes BCD bytes in wire order as the number is printed (most significant first).
pub fn write_number(bytes: &[u8], f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    bytes.iter().rev().try_for_each(|b| write!(f, "{b:02X}"))
}

/// The two digits of one byte as 0-99.
fn digits(b: u8) -> Option<u8> {
    let (hi, lo) = (b >> 4, b & 0x0F);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn low_pair_first_as_the_standards_write_it() {
        // DL/T 645 §A6: 67 45 23 01 is 012345.67 with two decimals.
        assert_eq!(to_u64(&[0x67, 0x45, 0x23, 0x01]), Ok(1_234_567));
        assert_eq!(from_u64(1_234_567, 4), Some(vec![0x67, 0x45, 0x23, 0x01]));
        assert_eq!(
            from_u64(1_000_000, 3),
            None,
            "seven digits do not fit in 3 bytes"
        );
    }

    #[test]
    fn the_sign_is_bit_7_of_the_last_byte() {
        // DL/T 645 §A6: -12.5 in three bytes is 25 01 80 (digits 000125, one implied decimal).
        assert_eq!(to_i64_signed(&[0x25, 0x01, 0x80]), Ok(-125));
        assert_eq!(from_i64_signed(-125, 3), Some(vec![0x25, 0x01, 0x80]));
        // Current A = -1.234 A in §A13: 34 12 80.
        assert_eq!(to_i64_signed(&[0x34, 0x12, 0x80]), Ok(-1234));
        assert_eq!(
            from_i64_signed(800_000, 3),
            None,
            "bit 7 of the top byte is the sign"
        );
    }

    #[test]
    fn a_nibble_above_nine_is_named() {
        assert_eq!(
            to_u64(&[0x12, 0x3A]),
            Err(BcdError {
                index: 1,
                byte: 0x3A
            })
        );
        assert_eq!(
            BcdError {
                index: 1,
                byte: 0x3A
            }
            .to_string(),
            "byte 1 is 0x3a, not two BCD digits (each nibble 0-9)"
        );
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back(v in 0u64..100_000_000, neg in any::<bool>()) {
            prop_assert_eq!(to_u64(&from_u64(v, 4).unwrap()), Ok(v));
            let s = if neg { -(v as i64 % 80_000_000) } else { v as i64 % 80_000_000 };
            prop_assert_eq!(to_i64_signed(&from_i64_signed(s, 4).unwrap()), Ok(s));
        }
    }
}
