//! What DL/T 645-2007 frames carry: data identifiers and their BCD formats, read answers and error
//! words, the relay control of State Grid cost-control meters (0x1C) and status word 3
//! (`shared/reference/dlt645-cjt188.md` §A5–A11). Pure.

use std::fmt;

use chrono::{Datelike, NaiveDateTime, Timelike};
use thiserror::Error;

use super::frame::{function, Address, Control, Frame};
use crate::bcd;

/// A data identifier, written DI3 DI2 DI1 DI0 as the standard's tables print it (`00010000` is
/// forward active energy, total); it travels DI0 first.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Di(pub u32);

impl Di {
    /// Forward active energy, total (XXXXXX.XX kWh).
    pub const FORWARD_ACTIVE_KWH: Di = Di(0x0001_0000);
    /// Running status word 3: relay state for read-back (§A11).
    pub const STATUS_WORD_3: Di = Di(0x0400_0503);

    /// The four bytes as sent (DI0 first, before +0x33).
    #[must_use]
    pub fn wire(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    /// `00010000` (8 hex digits, DI3 first; dashes or dots between bytes allowed).
    pub fn parse(s: &str) -> Option<Di> {
        let digits: String = s
            .chars()
            .filter(|c| !matches!(c, '-' | '.' | ' '))
            .collect();
        (digits.len() == 8)
            .then(|| u32::from_str_radix(&digits, 16).ok())
            .flatten()
            .map(Di)
    }
}

impl fmt::Display for Di {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

impl fmt::Debug for Di {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Di({self})")
    }
}

/// How a value is written (§A10): `bytes` of BCD with `decimals` implied decimals, signed ones with
/// the sign in bit 7 of the last byte; a `Word` is a 2-byte bit field read as an integer. Reading
/// takes the length from the frame; `bytes` is what a meter (the simulator) writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Unsigned { bytes: u8, decimals: u8 },
    Signed { bytes: u8, decimals: u8 },
    Word,
}

/// A value that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    #[error("{0}")]
    Bcd(#[from] bcd::BcdError),
    #[error("no value bytes")]
    Empty,
    #[error("a status word has 2 bytes, got {0}")]
    WordLength(usize),
}

/// The value in `bytes` (as the answer carries it, the DI already split off). Its length comes from
/// the frame's L, never from a table: meters send 2- and 3-byte voltages alike (§A14).
pub fn decode(format: Format, bytes: &[u8]) -> Result<f64, ValueError> {
    if bytes.is_empty() {
        return Err(ValueError::Empty);
    }
    let scale = |d: u8| 10f64.powi(i32::from(d));
    Ok(match format {
        Format::Unsigned { decimals, .. } => bcd::to_u64(bytes)? as f64 / scale(decimals),
        Format::Signed { decimals, .. } => bcd::to_i64_signed(bytes)? as f64 / scale(decimals),
        Format::Word => match bytes {
            [lo, hi] => f64::from(u16::from_le_bytes([*lo, *hi])),
            _ => return Err(ValueError::WordLength(bytes.len())),
        },
    })
}

/// `value` written in `format` (as a meter sends it); `None` when it does not fit.
#[must_use]
pub fn encode(format: Format, value: f64) -> Option<Vec<u8>> {
    let scaled = |d: u8| (value * 10f64.powi(i32::from(d))).round();
    match format {
        Format::Unsigned { bytes, decimals } => {
            let v = scaled(decimals);
            (0.0..1e18)
                .contains(&v)
                .then(|| bcd::from_u64(v as u64, usize::from(bytes)))?
        }
        Format::Signed { bytes, decimals } => {
            let v = scaled(decimals);
            (v.abs() < 1e18).then(|| bcd::from_i64_signed(v as i64, usize::from(bytes)))?
        }
        Format::Word => {
            let v = value.round();
            (0.0..=65535.0)
                .contains(&v)
                .then(|| (v as u16).to_le_bytes().to_vec())
        }
    }
}

/// The request that reads `di` from the meter at `address`.
#[must_use]
pub fn read_request(address: Address, di: Di) -> Frame {
    Frame {
        address,
        control: Control::request(function::READ),
        data: di.wire().to_vec(),
    }
}

/// The follow-up request for frame `seq` (1, 2, …) of a long answer to `di` (§A5).
#[must_use]
pub fn follow_up_request(address: Address, di: Di, seq: u8) -> Frame {
    let mut data = di.wire().to_vec();
    data.push(seq);
    Frame {
        address,
        control: Control::request(function::READ_FOLLOW_UP),
        data,
    }
}

/// The read-address request: only the single meter on a line may answer it (§A3).
#[must_use]
pub fn read_address_request() -> Frame {
    Frame {
        address: Address::WILDCARD,
        control: Control::request(function::READ_ADDRESS),
        data: Vec::new(),
    }
}

/// The error byte of an abnormal answer (§A7; bit flags, as LIB and PY600 read it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorWord(pub u8);

impl fmt::Display for ErrorWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BITS: [&str; 7] = [
            "other error",
            "no such data (the meter does not have this DI)",
            "wrong password or not authorised",
            "baud rate cannot be changed",
            "too many year time zones",
            "too many daily time slots",
            "too many tariffs",
        ];
        let named = set_bits(&BITS, u16::from(self.0));
        if named.is_empty() {
            write!(f, "error byte {:#04x}", self.0)
        } else {
            write!(f, "{} (error byte {:#04x})", named.join(", "), self.0)
        }
    }
}

/// The names of the bits set in `word` (bit 0 first).
fn set_bits<'a>(names: &[&'a str], word: u16) -> Vec<&'a str> {
    names
        .iter()
        .enumerate()
        .filter(|(i, _)| word & (1 << i) != 0)
        .map(|(_, s)| *s)
        .collect()
}

/// What a meter's answer to a read says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer {
    /// The value bytes of `di`; `more` when follow-up frames hold the rest (0xB1).
    Data { value: Vec<u8>, more: bool },
    /// An abnormal answer (0xD1) with its error byte.
    Refused(ErrorWord),
}

/// A frame that is not the answer to the request on the line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Mismatch {
    #[error("answer from meter {got}, not from {want}")]
    Address { want: Address, got: Address },
    #[error("frame with control {0:#04x} is not an answer to this request")]
    Control(u8),
    #[error("answer for DI {got}, not for the requested {want}")]
    Di { want: Di, got: Di },
    #[error("answer too short: {0} data bytes")]
    Short(usize),
}

/// Checks that `frame` answers a read of `di` sent to `to` and says what it holds. An echo of our
/// own request (D7 clear) or another meter's answer is a [`Mismatch`]: the caller keeps listening.
pub fn read_answer(to: Address, di: Di, frame: &Frame) -> Result<ReadAnswer, Mismatch> {
    let c = frame.control;
    if !c.is_answer() || !matches!(c.function(), function::READ | function::READ_FOLLOW_UP) {
        return Err(Mismatch::Control(c.0));
    }
    if !to.matches(&frame.address) {
        return Err(Mismatch::Address {
            want: to,
            got: frame.address,
        });
    }
    if c.is_error() {
        return Ok(ReadAnswer::Refused(ErrorWord(
            frame.data.first().copied().unwrap_or(0),
        )));
    }
    if frame.data.len() < 4 {
        return Err(Mismatch::Short(frame.data.len()));
    }
    let got = Di(u32::from_le_bytes([
        frame.data[0],
        frame.data[1],
        frame.data[2],
        frame.data[3],
    ]));
    if got != di {
        return Err(Mismatch::Di { want: di, got });
    }
    let mut value = frame.data[4..].to_vec();
    // A follow-up answer ends with its SEQ byte (§A5).
    if c.function() == function::READ_FOLLOW_UP && !value.is_empty() {
        value.pop();
    }
    Ok(ReadAnswer::Data {
        value,
        more: c.more_follows(),
    })
}

/// The relay actions of control code 0x1C (§A9, N1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayAction {
    /// Open the relay (拉闸, N1 = 0x1A).
    Trip,
    /// Allow the tenant to close it by hand (合闸允许, 0x1B).
    AllowClose,
    /// Close it directly (直接合闸, 0x1C).
    Close,
}

impl RelayAction {
    fn code(self) -> u8 {
        match self {
            RelayAction::Trip => 0x1A,
            RelayAction::AllowClose => 0x1B,
            RelayAction::Close => 0x1C,
        }
    }
}

/// The credentials a 0x1C command carries: password level PA (02 or 04 plaintext), the 3-byte
/// password and the 4-byte operator code the meter writes into its event record. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub level: u8,
    /// As sent, low byte first ("123456" → 56 34 12).
    pub password: [u8; 3],
    /// As sent, low byte first.
    pub operator: [u8; 4],
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials(level {:02}, password and operator redacted)",
            self.level
        )
    }
}

/// A password or operator code that is not the expected number of hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("DL/T 645 {what}: expected {digits} hex digits as the meter's documentation writes it (e.g. {example}); the value is not repeated here")]
pub struct CredentialError {
    pub what: &'static str,
    pub digits: usize,
    pub example: &'static str,
}

impl Credentials {
    /// From the config's text: `level` (2 or 4 for plaintext), a 6-digit password and an 8-digit
    /// operator code, each written most significant digit first.
    pub fn new(level: u8, password: &str, operator: &str) -> Result<Credentials, CredentialError> {
        fn bytes<const N: usize>(
            s: &str,
            what: &'static str,
            example: &'static str,
        ) -> Result<[u8; N], CredentialError> {
            let err = || CredentialError {
                what,
                digits: 2 * N,
                example,
            };
            if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            let mut out = [0u8; N];
            for (i, pair) in s.as_bytes().chunks(2).rev().enumerate() {
                let pair = std::str::from_utf8(pair).map_err(|_| err())?;
                out[i] = u8::from_str_radix(pair, 16).map_err(|_| err())?;
            }
            Ok(out)
        }
        Ok(Credentials {
            level,
            password: bytes::<3>(password, "password", "123456")?,
            operator: bytes::<4>(operator, "operator code", "00000000")?,
        })
    }
}

/// The 0x1C request for `action`, valid until `deadline` in the meter's own clock (its local time;
/// the meter refuses it after that, §A9 N3..N8).
#[must_use]
pub fn relay_request(
    address: Address,
    action: RelayAction,
    credentials: &Credentials,
    deadline: NaiveDateTime,
) -> Frame {
    let mut data = Vec::with_capacity(16);
    data.push(credentials.level);
    data.extend_from_slice(&credentials.password);
    data.extend_from_slice(&credentials.operator);
    data.push(action.code());
    data.push(0x00);
    // ss mm hh DD MM YY, one BCD byte each.
    for v in [
        deadline.second(),
        deadline.minute(),
        deadline.hour(),
        deadline.day(),
        deadline.month(),
        deadline.year().rem_euclid(100).unsigned_abs(),
    ] {
        data.extend(bcd::from_u64(u64::from(v % 100), 1).unwrap_or_default());
    }
    Frame {
        address,
        control: Control::request(function::CONTROL),
        data,
    }
}

/// The control error word of a refused 0x1C (0xDC with L = 2, §A7; one source) or its error byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlError(pub u16);

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BITS: [&str; 6] = [
            "meter suspended",
            "MAC error (the meter wants an encrypted command, password level 98)",
            "wrong password or not authorised",
            "identity authentication timed out",
            "the command's validity time has passed (check the gateway's clock)",
            "trip refused: the meter is in keep-power (保电)",
        ];
        let named = set_bits(&BITS, self.0);
        if named.is_empty() {
            write!(f, "control refused, error word {:#06x}", self.0)
        } else {
            write!(f, "{} (error word {:#06x})", named.join(", "), self.0)
        }
    }
}

/// Checks that `frame` answers a 0x1C sent to `to`: `Ok` (0x9C, with or without a status word) or
/// the meter's refusal (0xDC).
pub fn relay_answer(to: Address, frame: &Frame) -> Result<Result<(), ControlError>, Mismatch> {
    let c = frame.control;
    if !c.is_answer() || c.function() != function::CONTROL {
        return Err(Mismatch::Control(c.0));
    }
    if !to.matches(&frame.address) {
        return Err(Mismatch::Address {
            want: to,
            got: frame.address,
        });
    }
    if !c.is_error() {
        return Ok(Ok(()));
    }
    let word = match frame.data.as_slice() {
        [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
        [b] => u16::from(*b),
        [] => 0,
    };
    Ok(Err(ControlError(word)))
}

/// What status word 3 says of the relay (§A11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // the bits of the meter's word, named
pub struct Status3 {
    /// Bit 4: the contact as the meter senses it is open (断).
    pub relay_open: bool,
    /// Bit 6: the last command was a trip.
    pub commanded_trip: bool,
    /// Bit 7: pre-trip alarm.
    pub pre_trip_alarm: bool,
    /// Bit 12: keep-power (保电): the meter refuses to trip.
    pub keep_power: bool,
}

impl Status3 {
    #[must_use]
    pub fn from_word(word: u16) -> Status3 {
        Status3 {
            relay_open: word & 0x0010 != 0,
            commanded_trip: word & 0x0040 != 0,
            pre_trip_alarm: word & 0x0080 != 0,
            keep_power: word & 0x1000 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlt645::frame::Receiver;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn frame(s: &str) -> Frame {
        let mut r = Receiver::default();
        r.push(&hex(s));
        r.next_frame().unwrap()
    }

    fn meter() -> Address {
        Address::parse("12345678").unwrap()
    }

    #[test]
    fn the_energy_answer_reads_12345_67_kwh() {
        let f = frame("68 78 56 34 12 00 00 68 91 08 33 33 34 33 9A 78 56 34 E6 16");
        let ReadAnswer::Data { value, more } =
            read_answer(meter(), Di::FORWARD_ACTIVE_KWH, &f).unwrap()
        else {
            panic!()
        };
        assert!(!more);
        let kwh = decode(
            Format::Unsigned {
                bytes: 4,
                decimals: 2,
            },
            &value,
        )
        .unwrap();
        assert!((kwh - 12_345.67).abs() < 1e-9, "{kwh}");
        // LIB tests/test_frame.c: 123456.78 kWh from meter 123456789012.
        let lib = frame("68 12 90 78 56 34 12 68 91 08 33 33 34 33 AB 89 67 45 CC 16");
        let Ok(ReadAnswer::Data { value, .. }) = read_answer(
            Address::parse("123456789012").unwrap(),
            Di::FORWARD_ACTIVE_KWH,
            &lib,
        ) else {
            panic!()
        };
        assert!(
            (decode(
                Format::Unsigned {
                    bytes: 4,
                    decimals: 2
                },
                &value
            )
            .unwrap()
                - 123_456.78)
                .abs()
                < 1e-9
        );
    }

    #[test]
    fn a_voltage_block_and_a_negative_current_decode_by_their_formats() {
        // §A13: 0201FF00 A 220.1 V, B 221.0 V, C 219.9 V.
        let f = frame("68 78 56 34 12 00 00 68 91 0A 33 32 34 35 34 55 43 55 CC 54 8E 16");
        let Ok(ReadAnswer::Data { value, .. }) = read_answer(meter(), Di(0x0201_FF00), &f) else {
            panic!()
        };
        let volts: Vec<f64> = value
            .chunks(2)
            .map(|c| {
                decode(
                    Format::Unsigned {
                        bytes: 2,
                        decimals: 1,
                    },
                    c,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(volts, vec![220.1, 221.0, 219.9]);
        // §A13: current A = -1.234 A (XXX.XXX, sign bit).
        let f = frame("68 78 56 34 12 00 00 68 91 07 33 34 35 35 67 45 B3 AC 16");
        let Ok(ReadAnswer::Data { value, .. }) = read_answer(meter(), Di(0x0202_0100), &f) else {
            panic!()
        };
        assert_eq!(
            decode(
                Format::Signed {
                    bytes: 3,
                    decimals: 3
                },
                &value
            ),
            Ok(-1.234)
        );
    }

    #[test]
    fn an_error_answer_names_its_bits() {
        let f = frame("68 78 56 34 12 00 00 68 D1 01 35 EB 16");
        let a = read_answer(meter(), Di::FORWARD_ACTIVE_KWH, &f).unwrap();
        assert_eq!(a, ReadAnswer::Refused(ErrorWord(0x02)));
        assert_eq!(
            ErrorWord(0x02).to_string(),
            "no such data (the meter does not have this DI) (error byte 0x02)"
        );
        assert_eq!(
            ErrorWord(0x05).to_string(),
            "other error, wrong password or not authorised (error byte 0x05)"
        );
    }

    #[test]
    fn an_echo_another_meter_or_another_di_is_not_the_answer() {
        let request = read_request(meter(), Di::FORWARD_ACTIVE_KWH);
        assert_eq!(
            read_answer(meter(), Di::FORWARD_ACTIVE_KWH, &request),
            Err(Mismatch::Control(0x11)),
            "an adapter echoing our request"
        );
        let other = frame("68 12 90 78 56 34 12 68 91 08 33 33 34 33 AB 89 67 45 CC 16");
        assert!(matches!(
            read_answer(meter(), Di::FORWARD_ACTIVE_KWH, &other),
            Err(Mismatch::Address { .. })
        ));
        let f = frame("68 78 56 34 12 00 00 68 91 08 33 33 34 33 9A 78 56 34 E6 16");
        assert_eq!(
            read_answer(meter(), Di(0x0002_0000), &f),
            Err(Mismatch::Di {
                want: Di(0x0002_0000),
                got: Di::FORWARD_ACTIVE_KWH
            })
        );
    }

    #[test]
    fn status_word_3_read_back_says_the_relay_is_open() {
        // §A13: request and the answer 0x0050 (relay open, last command a trip).
        assert_eq!(
            read_request(meter(), Di::STATUS_WORD_3).encode(0).unwrap(),
            hex("68 78 56 34 12 00 00 68 11 04 36 38 33 37 D1 16")
        );
        let f = frame("68 78 56 34 12 00 00 68 91 06 36 38 33 37 83 33 09 16");
        let Ok(ReadAnswer::Data { value, .. }) = read_answer(meter(), Di::STATUS_WORD_3, &f) else {
            panic!()
        };
        let word = decode(Format::Word, &value).unwrap() as u16;
        assert_eq!(word, 0x0050);
        let s = Status3::from_word(word);
        assert!(s.relay_open && s.commanded_trip && !s.keep_power);
    }

    #[test]
    fn trip_and_close_encode_as_the_reference_frames() {
        let creds = Credentials::new(2, "123456", "00000000").unwrap();
        let deadline = chrono::NaiveDate::from_ymd_opt(2026, 12, 31)
            .unwrap()
            .and_hms_opt(23, 59, 59)
            .unwrap();
        assert_eq!(
            relay_request(meter(), RelayAction::Trip, &creds, deadline)
                .encode(0)
                .unwrap(),
            hex("68 78 56 34 12 00 00 68 1C 10 35 89 67 45 33 33 33 33 4D 33 8C 8C 56 64 45 59 36 16")
        );
        assert_eq!(
            relay_request(meter(), RelayAction::Close, &creds, deadline)
                .encode(0)
                .unwrap(),
            hex("68 78 56 34 12 00 00 68 1C 10 35 89 67 45 33 33 33 33 4F 33 8C 8C 56 64 45 59 38 16")
        );
        assert_eq!(
            relay_answer(meter(), &frame("68 78 56 34 12 00 00 68 9C 00 80 16")),
            Ok(Ok(()))
        );
    }

    #[test]
    fn a_refused_control_says_why_and_credentials_never_print() {
        // 0xDC with L = 2, error word 0x0010 (validity time passed), built and checksummed here.
        let refused = Frame {
            address: meter(),
            control: Control(0xDC),
            data: vec![0x10, 0x00],
        };
        let r = relay_answer(meter(), &refused).unwrap().unwrap_err();
        assert!(r.to_string().contains("validity time has passed"), "{r}");
        let creds = Credentials::new(2, "654321", "12345678").unwrap();
        let shown = format!("{creds:?}");
        assert!(!shown.contains("65") && !shown.contains("4321"), "{shown}");
        let e = Credentials::new(2, "98765", "00000000").unwrap_err();
        assert!(e.to_string().contains("6 hex digits"), "{e}");
        assert!(
            !e.to_string().contains("98765"),
            "the secret is not echoed: {e}"
        );
    }

    #[test]
    fn what_a_meter_writes_reads_back() {
        let kwh = Format::Unsigned {
            bytes: 4,
            decimals: 2,
        };
        assert_eq!(encode(kwh, 12_345.67), Some(vec![0x67, 0x45, 0x23, 0x01]));
        assert_eq!(encode(kwh, 1_000_000.0), None, "eight digits only");
        let amps = Format::Signed {
            bytes: 3,
            decimals: 3,
        };
        assert_eq!(encode(amps, -1.234), Some(vec![0x34, 0x12, 0x80]));
        assert_eq!(encode(Format::Word, 80.0), Some(vec![0x50, 0x00]));
    }

    #[test]
    fn a_di_parses_as_printed() {
        assert_eq!(Di::parse("00010000"), Some(Di::FORWARD_ACTIVE_KWH));
        assert_eq!(Di::parse("02-01-FF-00"), Some(Di(0x0201_FF00)));
        assert_eq!(Di::parse("0001000"), None);
        assert_eq!(Di::FORWARD_ACTIVE_KWH.to_string(), "00010000");
    }
}
