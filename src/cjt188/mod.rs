//! CJ/T 188-2004, the national protocol of China's water (and heat and gas) meters: frames
//! `FE… 68 T A0..A6 C L DATA CS 16`, the current-data read (901F) and valve control
//! (`shared/reference/dlt645-cjt188.md` Part B; section numbers below refer to it). Pure; unlike
//! DL/T 645 the data travels as is (no +0x33) and there is no second `68`.

use std::fmt;

use chrono::NaiveDateTime;
use thiserror::Error;

use crate::bcd;
use crate::framing::{self, Layout, END, PREAMBLE, START};

pub mod client;

/// Where CJ/T 188 keeps its length byte (§B2); reads answer at most 0x64 data bytes.
pub(crate) const LAYOUT: Layout = Layout {
    header: 11,
    second_start: None,
    max_len: 0x64,
};

/// Wake-up bytes before a request (§B1: 2–4 × `FE`; battery meters need them).
pub const DEFAULT_PREAMBLE: usize = 4;

/// The meter type byte T (§B3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MeterType(pub u8);

impl MeterType {
    pub const COLD_WATER: MeterType = MeterType(0x10);
    pub const HOT_WATER: MeterType = MeterType(0x11);
    /// With the broadcast address: any meter type.
    pub const WILDCARD: MeterType = MeterType(0xAA);

    /// The water family (0x10–0x19), whose current data is a volume in m³.
    #[must_use]
    pub fn is_water(self) -> bool {
        (0x10..=0x19).contains(&self.0)
    }
}

/// Function codes (§B4; D5..D0 of C).
pub mod function {
    pub const READ: u8 = 0x01;
    pub const READ_ADDRESS: u8 = 0x03;
    pub const WRITE: u8 = 0x04;
}

/// A meter's 14-digit address, in wire order (low byte first); A5/A6 are the manufacturer's code.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address(pub [u8; 7]);

/// An address that is not 1–14 digits (or the all-`A` broadcast).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("CJ/T 188 address {given:?}: expected the meter's number, 1 to 14 digits as printed on it (e.g. 12345678901234), or AAAAAAAAAAAAAA for the single meter on a line")]
pub struct AddressError {
    pub given: String,
}

impl Address {
    /// Broadcast: only valid with one meter on the line (§B4).
    pub const BROADCAST: Address = Address([0xAA; 7]);

    /// The address of the number printed on the meter (most significant digit first).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        let err = || AddressError {
            given: s.to_string(),
        };
        let s = s.trim();
        if s.eq_ignore_ascii_case("AAAAAAAAAAAAAA") {
            return Ok(Address::BROADCAST);
        }
        crate::bcd::number(s).map(Address).ok_or_else(err)
    }

    /// Whether an answer from `other` can be this request's (broadcast bytes match any).
    #[must_use]
    pub fn matches(&self, other: &Address) -> bool {
        crate::bcd::covers(&self.0, &other.0)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::bcd::write_number(&self.0, f)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

/// How a meter writes the two DI bytes (§B5, a conflict between sources: configure it per device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiOrder {
    /// `90 1F`, as the DI is displayed (the 2004 standard as most sources read it).
    #[default]
    AsDisplayed,
    /// `1F 90` (some meters, collectors, and CJ/T 188-2018).
    Reversed,
}

/// A data identifier, written as displayed (`0x901F` current data, `0xA017` valve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Di(pub u16);

impl Di {
    /// Current data: cumulative flow, settlement-day flow, meter time, status.
    pub const CURRENT: Di = Di(0x901F);
    /// Valve control (write).
    pub const VALVE: Di = Di(0xA017);
    /// Read address.
    pub const ADDRESS: Di = Di(0x810A);

    fn wire(self, order: DiOrder) -> [u8; 2] {
        match order {
            DiOrder::AsDisplayed => self.0.to_be_bytes(),
            DiOrder::Reversed => self.0.to_le_bytes(),
        }
    }

    /// Whether two wire bytes are this DI in either order (§B5: accept both on receive).
    fn is(self, bytes: [u8; 2]) -> bool {
        u16::from_be_bytes(bytes) == self.0 || u16::from_le_bytes(bytes) == self.0
    }
}

/// One frame (data as it travels: CJ/T 188 has no offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub meter_type: MeterType,
    pub address: Address,
    pub control: u8,
    pub data: Vec<u8>,
}

impl Frame {
    /// The bytes on the wire after `preamble` wake-up `FE`s (data of at most 0x64 bytes).
    #[must_use]
    pub fn encode(&self, preamble: usize) -> Vec<u8> {
        let mut out = vec![PREAMBLE; preamble];
        let start = out.len();
        out.push(START);
        out.push(self.meter_type.0);
        out.extend_from_slice(&self.address.0);
        out.push(self.control);
        out.push(u8::try_from(self.data.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&self.data);
        out.push(framing::checksum(&out[start..]));
        out.push(END);
        out
    }

    fn from_wire(bytes: &[u8]) -> Frame {
        let mut address = [0u8; 7];
        address.copy_from_slice(&bytes[2..9]);
        Frame {
            meter_type: MeterType(bytes[1]),
            address: Address(address),
            control: bytes[9],
            data: bytes[11..bytes.len() - 2].to_vec(),
        }
    }
}

/// CJ/T 188 frames found in the bytes of a line.
pub type Receiver = crate::framing::Frames<Frame>;

impl crate::framing::Protocol for Frame {
    const LAYOUT: Layout = LAYOUT;

    fn from_wire(bytes: &[u8]) -> Frame {
        Frame::from_wire(bytes)
    }
}

/// The read of current data (C = 01, DI 901F, SER).
#[must_use]
pub fn read_request(meter_type: MeterType, address: Address, order: DiOrder, ser: u8) -> Frame {
    let mut data = Di::CURRENT.wire(order).to_vec();
    data.push(ser);
    Frame {
        meter_type,
        address,
        control: function::READ,
        data,
    }
}

/// The read-address request (only the single meter on a line may answer it).
#[must_use]
pub fn read_address_request(order: DiOrder, ser: u8) -> Frame {
    let mut data = Di::ADDRESS.wire(order).to_vec();
    data.push(ser);
    Frame {
        meter_type: MeterType::WILDCARD,
        address: Address::BROADCAST,
        control: function::READ_ADDRESS,
        data,
    }
}

/// Opening (0x55) or closing (0x99) the valve (C = 04, DI A017, §B9).
#[must_use]
pub fn valve_request(
    meter_type: MeterType,
    address: Address,
    order: DiOrder,
    ser: u8,
    open: bool,
) -> Frame {
    let mut data = Di::VALVE.wire(order).to_vec();
    data.push(ser);
    data.push(if open { 0x55 } else { 0x99 });
    Frame {
        meter_type,
        address,
        control: function::WRITE,
        data,
    }
}

/// The valve bits of ST (§B7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Valve {
    Open,
    Closed,
    /// 11: the meter reports a valve fault (stuck, motor failure).
    Abnormal,
}

/// The status word ST (§B7: the first byte sent holds D0–D7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub valve: Valve,
    pub battery_low: bool,
    /// Both bytes as sent (vendor bits included), low byte first.
    pub raw: u16,
}

impl Status {
    #[must_use]
    pub fn from_bytes(lo: u8, hi: u8) -> Status {
        Status {
            valve: match lo & 0x03 {
                0b00 => Valve::Open,
                0b01 => Valve::Closed,
                _ => Valve::Abnormal,
            },
            battery_low: lo & 0x04 != 0,
            raw: u16::from_le_bytes([lo, hi]),
        }
    }
}

/// What a water meter's 901F answer holds (§B6).
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentData {
    /// Cumulative volume, m³ (scaled by its unit code).
    pub volume_m3: f64,
    /// Cumulative volume at the last settlement day, m³.
    pub settlement_m3: f64,
    /// The meter's own clock (its local time), when it is a valid date.
    pub meter_time: Option<NaiveDateTime>,
    pub status: Status,
}

/// An answer that is not the one asked for, or cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnswerError {
    #[error("frame with control {0:#04x} is not an answer to this request")]
    Control(u8),
    #[error("answer from meter {got}, not from {want}")]
    Address { want: Address, got: Address },
    #[error("answer for DI {got:02X?}, not for the requested {want:04X}")]
    Di { want: u16, got: [u8; 2] },
    #[error("answer of {0} data bytes is too short for its DI")]
    Short(usize),
    #[error("unit code {0:#04x} is not a volume (expected m³ 0x2C-0x2E or litres 0x29-0x2B)")]
    Unit(u8),
    #[error("flow value: {0}")]
    Bcd(#[from] bcd::BcdError),
    #[error("the meter refused (status {status:#06x})")]
    Refused { status: u16 },
}

/// Checks the frame's direction, function and sender; returns the data after DI and SER.
fn answer_body(to: Address, di: Di, function: u8, frame: &Frame) -> Result<&[u8], AnswerError> {
    if frame.control & 0x80 == 0 || frame.control & 0x3F != function {
        return Err(AnswerError::Control(frame.control));
    }
    if !to.matches(&frame.address) {
        return Err(AnswerError::Address {
            want: to,
            got: frame.address,
        });
    }
    if frame.control & 0x40 != 0 {
        // Error answer: SER + ST (§B4).
        let status = match frame.data.as_slice() {
            [_, lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            _ => 0,
        };
        return Err(AnswerError::Refused { status });
    }
    if frame.data.len() < 3 {
        return Err(AnswerError::Short(frame.data.len()));
    }
    let got = [frame.data[0], frame.data[1]];
    if !di.is(got) {
        return Err(AnswerError::Di { want: di.0, got });
    }
    Ok(&frame.data[3..])
}

/// A volume value (4 BCD bytes, XXXXXX.XX) followed by its unit code, in m³.
fn volume(bytes: &[u8]) -> Result<f64, AnswerError> {
    let value = bcd::to_u64(&bytes[..4])? as f64 / 100.0;
    let scale = match bytes[4] {
        0x2C => 1.0,
        0x2D => 10.0,
        0x2E => 100.0,
        0x29 => 0.001,
        0x2A => 0.01,
        0x2B => 0.1,
        other => return Err(AnswerError::Unit(other)),
    };
    Ok(value * scale)
}

/// The meter's clock: `ss mm hh DD MM YY(lo) YY(hi)` in BCD (§B6).
fn meter_time(b: &[u8]) -> Option<NaiveDateTime> {
    let d = |i: usize| {
        bcd::to_u64(&b[i..=i])
            .ok()
            .and_then(|v| u32::try_from(v).ok())
    };
    let year = i32::try_from(bcd::to_u64(&b[5..7]).ok()?).ok()?;
    chrono::NaiveDate::from_ymd_opt(year, d(4)?, d(3)?)?.and_hms_opt(d(2)?, d(1)?, d(0)?)
}

/// Reads a water meter's answer to [`read_request`] sent to `to`.
pub fn current_data(to: Address, frame: &Frame) -> Result<CurrentData, AnswerError> {
    let body = answer_body(to, Di::CURRENT, function::READ, frame)?;
    if body.len() < 19 {
        return Err(AnswerError::Short(frame.data.len()));
    }
    Ok(CurrentData {
        volume_m3: volume(&body[0..5])?,
        settlement_m3: volume(&body[5..10])?,
        meter_time: meter_time(&body[10..17]),
        status: Status::from_bytes(body[17], body[18]),
    })
}

/// Reads the answer to [`valve_request`]: ST as the meter reports it right after (the valve motor
/// may still be moving: re-read 901F until it settles, §B9). ST has 2 bytes, or 1 in some meters.
pub fn valve_answer(to: Address, frame: &Frame) -> Result<Status, AnswerError> {
    let body = answer_body(to, Di::VALVE, function::WRITE, frame)?;
    match body {
        [lo, hi, ..] => Ok(Status::from_bytes(*lo, *hi)),
        [lo] => Ok(Status::from_bytes(*lo, 0)),
        [] => Err(AnswerError::Short(frame.data.len())),
    }
}

/// The SER byte of an answer, to compare with the request's (a mismatch is logged, not fatal: many
/// meters answer 00, §B5).
#[must_use]
pub fn ser(frame: &Frame) -> Option<u8> {
    frame.data.get(2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        Address::parse("12345678901234").unwrap()
    }

    #[test]
    fn the_reference_read_encodes_byte_for_byte_with_its_checksum_of_0x16() {
        // §B11: meter 12345678901234 → 34 12 90 78 56 34 12, T = 10, SER 01.
        assert_eq!(meter().0, [0x34, 0x12, 0x90, 0x78, 0x56, 0x34, 0x12]);
        let mut want = hex("FE FE FE FE");
        want.extend(hex("68 10 34 12 90 78 56 34 12 01 03 90 1F 01 16 16"));
        assert_eq!(
            read_request(MeterType::COLD_WATER, meter(), DiOrder::AsDisplayed, 1).encode(4),
            want
        );
        // Published: CJ94b (meter 00002020120218, SER 00) and AXW.
        assert_eq!(
            read_request(
                MeterType::COLD_WATER,
                Address::parse("00002020120218").unwrap(),
                DiOrder::AsDisplayed,
                0
            )
            .encode(0),
            hex("68 10 18 02 12 20 20 00 00 01 03 90 1F 00 97 16")
        );
        assert_eq!(
            read_request(
                MeterType::COLD_WATER,
                Address::parse("12").unwrap(),
                DiOrder::AsDisplayed,
                0
            )
            .encode(0),
            hex("68 10 12 00 00 00 00 00 00 01 03 90 1F 00 3D 16")
        );
    }

    #[test]
    fn the_current_data_answer_reads_1234_56_m3_with_time_and_open_valve() {
        let f = frame("FE FE 68 10 34 12 90 78 56 34 12 81 16 90 1F 01 56 34 12 00 2C 00 00 12 00 2C 30 45 13 15 03 26 20 00 00 95 16");
        assert_eq!(ser(&f), Some(1));
        let d = current_data(meter(), &f).unwrap();
        assert!((d.volume_m3 - 1234.56).abs() < 1e-9, "{}", d.volume_m3);
        assert!((d.settlement_m3 - 1200.0).abs() < 1e-9);
        assert_eq!(
            d.meter_time,
            chrono::NaiveDate::from_ymd_opt(2026, 3, 15).and_then(|d| d.and_hms_opt(13, 45, 30))
        );
        assert_eq!(d.status.valve, Valve::Open);
        assert!(!d.status.battery_low);
    }

    #[test]
    fn a_meter_writing_the_di_reversed_is_understood_and_asked_its_way() {
        // SC1/SC2 meters send 1F 90.
        let req = read_request(MeterType::COLD_WATER, meter(), DiOrder::Reversed, 0);
        assert_eq!(&req.data[..2], &[0x1F, 0x90]);
        let answer = Frame {
            meter_type: MeterType::COLD_WATER,
            address: meter(),
            control: 0x81,
            data: hex("1F 90 00 00 01 00 00 2D 00 00 00 00 2C 00 00 00 00 00 00 00 04 00"),
        };
        let d = current_data(meter(), &answer).unwrap();
        assert!(
            (d.volume_m3 - 10.0).abs() < 1e-9,
            "1.00 × 10 m³: {}",
            d.volume_m3
        );
        assert_eq!(d.meter_time, None, "an all-zero clock is no date");
        assert!(d.status.battery_low);
    }

    #[test]
    fn valve_close_and_open_encode_as_the_reference_and_the_answer_reads_closed() {
        assert_eq!(
            valve_request(
                MeterType::COLD_WATER,
                meter(),
                DiOrder::AsDisplayed,
                2,
                false
            )
            .encode(0),
            hex("68 10 34 12 90 78 56 34 12 04 04 A0 17 02 99 BC 16")
        );
        assert_eq!(
            valve_request(
                MeterType::COLD_WATER,
                meter(),
                DiOrder::AsDisplayed,
                3,
                true
            )
            .encode(0),
            hex("68 10 34 12 90 78 56 34 12 04 04 A0 17 03 55 79 16")
        );
        let st = valve_answer(
            meter(),
            &frame("68 10 34 12 90 78 56 34 12 84 05 A0 17 02 01 00 A5 16"),
        )
        .unwrap();
        assert_eq!(st.valve, Valve::Closed);
    }

    #[test]
    fn read_address_and_error_answers() {
        assert_eq!(
            read_address_request(DiOrder::AsDisplayed, 0).encode(0),
            hex("68 AA AA AA AA AA AA AA AA 03 03 81 0A 00 49 16")
        );
        let a = frame("68 10 34 12 90 78 56 34 12 83 03 81 0A 00 73 16");
        assert_eq!(a.address, meter());
        assert_eq!(a.address.to_string(), "12345678901234");
        let err = frame("68 10 34 12 90 78 56 34 12 C1 03 01 00 00 27 16");
        assert_eq!(
            current_data(meter(), &err),
            Err(AnswerError::Refused { status: 0 })
        );
    }

    #[test]
    fn another_meters_answer_or_an_unknown_unit_is_an_error_not_a_value() {
        let f = frame("68 10 34 12 90 78 56 34 12 81 16 90 1F 01 56 34 12 00 2C 00 00 12 00 2C 30 45 13 15 03 26 20 00 00 95 16");
        let other = Address::parse("12345678901235").unwrap();
        assert!(matches!(
            current_data(other, &f),
            Err(AnswerError::Address { .. })
        ));
        let mut odd = f.clone();
        odd.data[7] = 0x05; // kWh: a heat meter's unit
        assert_eq!(current_data(meter(), &odd), Err(AnswerError::Unit(0x05)));
        let request = read_request(MeterType::COLD_WATER, meter(), DiOrder::AsDisplayed, 1);
        assert_eq!(
            current_data(meter(), &request),
            Err(AnswerError::Control(0x01)),
            "our own request echoed"
        );
    }
}
