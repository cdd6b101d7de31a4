//! Register words ⇄ typed values.
//!
//! Pure functions only: the bus task hands over the words it read and gets the engineering value back,
//! so every layout a meter uses can be checked against the byte vectors printed in its manual.
//!
//! Naming follows the field convention for a 32-bit value whose bytes are `A B C D` (A most significant):
//! `ABCD` = word order big (high word first) + byte order big; `CDAB` = words swapped (TUF-2000M);
//! `BADC` = bytes swapped inside each word; `DCBA` = fully little-endian (Xintai water meter).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// On-wire representation of a value: how many bits, signed or not, integer or IEEE 754.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// One coil or discrete input, or a register that is 0/non-zero.
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DataType {
    /// Registers (16-bit words) the value occupies; a bool occupies one bit or one register.
    pub(crate) fn words(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

impl std::str::FromStr for DataType {
    type Err = String;

    /// The names used in profiles and on the command line (`f32`, `u16`, …).
    fn from_str(s: &str) -> Result<DataType, String> {
        DataType::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s))
            .map_err(|_| {
                format!("{s:?}: expected one of bool, u16, i16, u32, i32, u64, i64, f32, f64")
            })
    }
}

/// Order of the 16-bit words of a multi-word value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word first (Modbus convention; Eastron, Chint, ABB, Schneider).
    #[default]
    Big,
    /// Low word first.
    Little,
}

/// Order of the two bytes inside each 16-bit word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ByteOrder {
    /// High byte first, as the Modbus spec transmits registers.
    #[default]
    Big,
    /// Bytes swapped inside each word.
    Little,
}

/// A decoded value before scaling, kept exact for integers so u64 Wh counters do not lose digits early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RawValue {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
}

impl RawValue {
    /// The value as f64, the engineering unit every reading carries.
    pub(crate) fn as_f64(self) -> f64 {
        match self {
            RawValue::Bool(b) => f64::from(u8::from(b)),
            RawValue::Int(i) => i as f64,
            RawValue::UInt(u) => u as f64,
            RawValue::Float(f) => f,
        }
    }
}

/// Why a word slice could not be turned into a value.
#[derive(Debug, Error, PartialEq)]
pub(crate) enum DecodeError {
    #[error("{ty:?} needs {need} register(s), got {got}")]
    WrongLength {
        ty: DataType,
        need: usize,
        got: usize,
    },
    #[error("value {value} does not fit in {ty:?} after scaling")]
    OutOfRange { ty: DataType, value: f64 },
}

/// Reorders register words into one big-endian byte string (A B C D …).
fn to_be_bytes(words: &[u16], word_order: WordOrder, byte_order: ByteOrder) -> [u8; 8] {
    let mut out = [0u8; 8];
    let n = words.len();
    for i in 0..n {
        let w = match word_order {
            WordOrder::Big => words[i],
            WordOrder::Little => words[n - 1 - i],
        };
        let [hi, lo] = w.to_be_bytes();
        let (a, b) = match byte_order {
            ByteOrder::Big => (hi, lo),
            ByteOrder::Little => (lo, hi),
        };
        out[2 * i] = a;
        out[2 * i + 1] = b;
    }
    out
}

/// Inverse of [`to_be_bytes`]: big-endian bytes back into register words in the device's order.
fn from_be_bytes(bytes: &[u8], word_order: WordOrder, byte_order: ByteOrder) -> Vec<u16> {
    let n = bytes.len() / 2;
    let mut words = vec![0u16; n];
    for i in 0..n {
        let (a, b) = (bytes[2 * i], bytes[2 * i + 1]);
        let w = match byte_order {
            ByteOrder::Big => u16::from_be_bytes([a, b]),
            ByteOrder::Little => u16::from_be_bytes([b, a]),
        };
        match word_order {
            WordOrder::Big => words[i] = w,
            WordOrder::Little => words[n - 1 - i] = w,
        }
    }
    words
}

/// Decodes the registers of one value. `words` must hold exactly `ty.words()` registers.
pub(crate) fn decode(
    words: &[u16],
    ty: DataType,
    word_order: WordOrder,
    byte_order: ByteOrder,
) -> Result<RawValue, DecodeError> {
    let need = usize::from(ty.words());
    if words.len() != need {
        return Err(DecodeError::WrongLength {
            ty,
            need,
            got: words.len(),
        });
    }
    let b = to_be_bytes(words, word_order, byte_order);
    Ok(match ty {
        DataType::Bool => RawValue::Bool(words[0] != 0),
        DataType::U16 => RawValue::UInt(u64::from(u16::from_be_bytes([b[0], b[1]]))),
        DataType::I16 => RawValue::Int(i64::from(i16::from_be_bytes([b[0], b[1]]))),
        DataType::U32 => RawValue::UInt(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::I32 => RawValue::Int(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::F32 => RawValue::Float(f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::U64 => RawValue::UInt(u64::from_be_bytes(b)),
        DataType::I64 => RawValue::Int(i64::from_be_bytes(b)),
        DataType::F64 => RawValue::Float(f64::from_be_bytes(b)),
    })
}

/// Encodes an unscaled value into registers in the device's order; the simulator and `meterd raw
/// write` use it, and round-trip tests hold [`decode`] to it.
pub(crate) fn encode(
    value: f64,
    ty: DataType,
    word_order: WordOrder,
    byte_order: ByteOrder,
) -> Result<Vec<u16>, DecodeError> {
    let range = |lo: f64, hi: f64| {
        let r = value.round();
        if value.is_finite() && r >= lo && r <= hi {
            Ok(r)
        } else {
            Err(DecodeError::OutOfRange { ty, value })
        }
    };
    let bytes: Vec<u8> = match ty {
        DataType::Bool => return Ok(vec![u16::from(value != 0.0)]),
        DataType::U16 => (range(0.0, f64::from(u16::MAX))? as u16)
            .to_be_bytes()
            .to_vec(),
        DataType::I16 => (range(f64::from(i16::MIN), f64::from(i16::MAX))? as i16)
            .to_be_bytes()
            .to_vec(),
        DataType::U32 => (range(0.0, f64::from(u32::MAX))? as u32)
            .to_be_bytes()
            .to_vec(),
        DataType::I32 => (range(f64::from(i32::MIN), f64::from(i32::MAX))? as i32)
            .to_be_bytes()
            .to_vec(),
        // 2^64 and 2^63 are exactly representable; the casts saturate at the type's bounds.
        DataType::U64 => (range(0.0, 18_446_744_073_709_551_615.0)? as u64)
            .to_be_bytes()
            .to_vec(),
        DataType::I64 => (range(-9_223_372_036_854_775_808.0, 9_223_372_036_854_775_807.0)? as i64)
            .to_be_bytes()
            .to_vec(),
        DataType::F32 => (value as f32).to_be_bytes().to_vec(),
        DataType::F64 => value.to_be_bytes().to_vec(),
    };
    Ok(from_be_bytes(&bytes, word_order, byte_order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ByteOrder as B;
    use DataType as T;
    use WordOrder as W;

    /// Registers as they come off the wire: pairs of bytes, high byte first.
    fn regs(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    fn f(words: &[u16], ty: T, w: W, b: B) -> f64 {
        decode(words, ty, w, b).unwrap().as_f64()
    }

    #[test]
    fn eastron_voltage_vector_from_tasmota_reads_230_2_volts() {
        // `01 04 04 43 66 33 34 1B 38`: FC04 reply, 4 data bytes 43 66 33 34, float ABCD (SDM120).
        let v = f(&regs(&[0x43, 0x66, 0x33, 0x34]), T::F32, W::Big, B::Big);
        assert!((v - 230.2).abs() < 1e-4, "{v}");
    }

    #[test]
    fn xintai_water_meter_flow_is_little_endian_dcba() {
        // Bytes on the wire `1E 85 0B 3F` = 0.545 m³/h (Kaifeng Xintai, little-endian float).
        let v = f(
            &regs(&[0x1E, 0x85, 0x0B, 0x3F]),
            T::F32,
            W::Little,
            B::Little,
        );
        assert!((v - 0.545).abs() < 1e-6, "{v}");
    }

    #[test]
    fn tuf2000m_totaliser_is_word_swapped_cdab() {
        // Bytes on the wire `80 6B 42 12` = 36.625 (TUF-2000M map, mislabelled "BADC" there).
        // (The document rounds: 0x4212806B is 36.62541.)
        let v = f(&regs(&[0x80, 0x6B, 0x42, 0x12]), T::F32, W::Little, B::Big);
        assert!((v - 36.625).abs() < 1e-3, "{v}");
        assert_eq!(v as f32, f32::from_bits(0x4212_806B));
    }

    #[test]
    fn badc_swaps_bytes_inside_each_word() {
        // 230.2 f32 = 43 66 33 34; BADC puts it on the wire as 66 43 34 33.
        let v = f(&regs(&[0x66, 0x43, 0x34, 0x33]), T::F32, W::Big, B::Little);
        assert!((v - 230.2).abs() < 1e-4, "{v}");
    }

    #[test]
    fn every_integer_type_in_every_order() {
        // 0x0102_0304 (16909060) laid out four ways.
        let cases = [
            ([0x0102u16, 0x0304], W::Big, B::Big),
            ([0x0304, 0x0102], W::Little, B::Big),
            ([0x0201, 0x0403], W::Big, B::Little),
            ([0x0403, 0x0201], W::Little, B::Little),
        ];
        for (words, w, b) in cases {
            assert_eq!(f(&words, T::U32, w, b), 16_909_060.0, "{w:?} {b:?}");
            assert_eq!(f(&words, T::I32, w, b), 16_909_060.0, "{w:?} {b:?}");
        }
        assert_eq!(f(&[0xFFFF], T::I16, W::Big, B::Big), -1.0);
        assert_eq!(f(&[0xFFFF], T::U16, W::Big, B::Big), 65535.0);
        assert_eq!(f(&[0xFFFE], T::I16, W::Big, B::Little), -257.0);
        assert_eq!(f(&[0xFFFF, 0xFFFE], T::I32, W::Big, B::Big), -2.0);
        assert_eq!(f(&[0xFFFE, 0xFFFF], T::I32, W::Little, B::Big), -2.0);
        assert_eq!(
            f(&[0, 0, 0x0001, 0x86A0], T::U64, W::Big, B::Big),
            100_000.0
        );
        assert_eq!(
            f(&[0x86A0, 0x0001, 0, 0], T::U64, W::Little, B::Big),
            100_000.0
        );
        assert_eq!(
            f(&[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], T::I64, W::Big, B::Big),
            -1.0
        );
        assert_eq!(
            decode(&[0], T::Bool, W::Big, B::Big),
            Ok(RawValue::Bool(false))
        );
        assert_eq!(
            decode(&[1], T::Bool, W::Big, B::Big),
            Ok(RawValue::Bool(true))
        );
    }

    #[test]
    fn iem3000_energy_int64_wh() {
        // Schneider iEM3xxx 0x0C83: INT64 Wh, high word first. 12,345,678 Wh = 0xBC614E.
        let v = f(&[0, 0, 0x00BC, 0x614E], T::I64, W::Big, B::Big);
        assert_eq!(v, 12_345_678.0);
    }

    #[test]
    fn f64_in_all_orders() {
        // 1234.5678 = 40 93 4A 45 6D 5C FA AD
        let be = [0x4093u16, 0x4A45, 0x6D5C, 0xFAAD];
        assert_eq!(f(&be, T::F64, W::Big, B::Big), 1234.5678);
        let le = [0xADFAu16, 0x5C6D, 0x454A, 0x9340];
        assert_eq!(f(&le, T::F64, W::Little, B::Little), 1234.5678);
    }

    #[test]
    fn wrong_word_count_is_an_error_not_junk() {
        // An SDM meter answers a single-register read of a float with junk: never decode half a float.
        assert_eq!(
            decode(&[0x4366], T::F32, W::Big, B::Big),
            Err(DecodeError::WrongLength {
                ty: T::F32,
                need: 2,
                got: 1
            })
        );
    }

    #[test]
    fn encode_rejects_values_that_do_not_fit() {
        assert!(encode(70_000.0, T::U16, W::Big, B::Big).is_err());
        assert!(encode(-1.0, T::U32, W::Big, B::Big).is_err());
        assert!(encode(f64::NAN, T::I16, W::Big, B::Big).is_err());
    }

    fn any_type() -> impl Strategy<Value = T> {
        prop_oneof![
            Just(T::U16),
            Just(T::I16),
            Just(T::U32),
            Just(T::I32),
            Just(T::U64),
            Just(T::I64),
            Just(T::F32),
            Just(T::F64),
        ]
    }

    fn any_orders() -> impl Strategy<Value = (W, B)> {
        (
            prop_oneof![Just(W::Big), Just(W::Little)],
            prop_oneof![Just(B::Big), Just(B::Little)],
        )
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(ty in any_type(), (w, b) in any_orders(), x in -30000i32..30000) {
            let value = match ty { T::U16 | T::U32 | T::U64 => f64::from(x.abs()), _ => f64::from(x) };
            let words = encode(value, ty, w, b).unwrap();
            prop_assert_eq!(words.len(), usize::from(ty.words()));
            prop_assert_eq!(decode(&words, ty, w, b).unwrap().as_f64(), value);
        }

        #[test]
        fn decode_then_encode_round_trips_words(words in proptest::collection::vec(any::<u16>(), 2), (w, b) in any_orders()) {
            let v = decode(&words, T::U32, w, b).unwrap().as_f64();
            prop_assert_eq!(encode(v, T::U32, w, b).unwrap(), words);
        }
    }
}
