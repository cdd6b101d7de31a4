//! DL/T 645-2007 frames: `FE…(0–4) 68 A0..A5 68 C L DATA CS 16` (`shared/reference/dlt645-cjt188.md`
//! §A2–A4). Pure: bytes in, typed frames out, and back.

use std::fmt;

use thiserror::Error;

use crate::framing::{self, Layout, END, PREAMBLE, START};

/// Every data byte travels +0x33 (mod 256), the DI included (§A2).
pub const DATA_OFFSET: u8 = 0x33;

/// Wake-up bytes the master sends before a request (§A2: four `FE`).
pub const DEFAULT_PREAMBLE: usize = 4;

/// Largest `L` of any frame (reads answer at most 200 data bytes, §A2).
const MAX_LEN: u8 = 200;

/// Where DL/T 645 keeps its length byte.
pub(crate) const LAYOUT: Layout = Layout {
    header: 10,
    second_start: Some(7),
    max_len: MAX_LEN,
};

/// Function codes (the low 5 bits of C, §A5).
pub mod function {
    /// Broadcast time sync (to 99…99, never answered).
    pub const BROADCAST_TIME: u8 = 0x08;
    /// Read data by DI.
    pub const READ: u8 = 0x11;
    /// Read the follow-up frames of a long answer.
    pub const READ_FOLLOW_UP: u8 = 0x12;
    /// Read the communication address (to AA…AA, one meter on the line).
    pub const READ_ADDRESS: u8 = 0x13;
    /// Remote control: relay, alarm, keep-power (State Grid cost-control extension).
    pub const CONTROL: u8 = 0x1C;
}

/// A meter's communication address: 12 BCD digits, kept in wire order (least significant pair
/// first). `AA` bytes are wildcards (§A3).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address(pub [u8; 6]);

/// An address that is not 1–12 digits (or the all-`A` wildcard).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("DL/T 645 address {given:?}: expected the meter's number, 1 to 12 digits as printed on its nameplate (e.g. 202411110002), or AAAAAAAAAAAA for the single meter on a line")]
pub struct AddressError {
    pub given: String,
}

impl Address {
    /// The wildcard: any meter answers with its own address (read/write address, one meter only).
    pub const WILDCARD: Address = Address([0xAA; 6]);
    /// Broadcast: every meter acts, none answers (time sync, freeze).
    pub const BROADCAST: Address = Address([0x99; 6]);

    /// The address of the meter number printed on the nameplate (most significant digit first);
    /// fewer than 12 digits are padded with leading zeros.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        let err = || AddressError {
            given: s.to_string(),
        };
        let s = s.trim();
        if s.eq_ignore_ascii_case("AAAAAAAAAAAA") {
            return Ok(Address::WILDCARD);
        }
        crate::bcd::number(s).map(Address).ok_or_else(err)
    }

    /// Whether an answer from `other` can be this request's (wildcard bytes match any).
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

/// The control byte C (§A4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control(pub u8);

impl Control {
    /// A request with function code `f`.
    #[must_use]
    pub fn request(f: u8) -> Control {
        Control(f & 0x1F)
    }

    /// The function code (D4..D0).
    #[must_use]
    pub fn function(self) -> u8 {
        self.0 & 0x1F
    }

    /// D7: sent by a meter.
    #[must_use]
    pub fn is_answer(self) -> bool {
        self.0 & 0x80 != 0
    }

    /// D6: an abnormal (error) answer.
    #[must_use]
    pub fn is_error(self) -> bool {
        self.0 & 0x40 != 0
    }

    /// D5: more frames follow (read with 0x12).
    #[must_use]
    pub fn more_follows(self) -> bool {
        self.0 & 0x20 != 0
    }
}

/// One frame, its data as meant (the +0x33 removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub address: Address,
    pub control: Control,
    pub data: Vec<u8>,
}

/// Data longer than a frame may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("DL/T 645 frame data of {0} bytes; at most 200 fit in one frame")]
pub struct TooLong(pub usize);

impl Frame {
    /// The bytes on the wire, after `preamble` wake-up `FE`s.
    pub fn encode(&self, preamble: usize) -> Result<Vec<u8>, TooLong> {
        let len = u8::try_from(self.data.len())
            .ok()
            .filter(|l| *l <= MAX_LEN)
            .ok_or(TooLong(self.data.len()))?;
        let mut out = vec![PREAMBLE; preamble];
        let start = out.len();
        out.push(START);
        out.extend_from_slice(&self.address.0);
        out.push(START);
        out.push(self.control.0);
        out.push(len);
        out.extend(self.data.iter().map(|b| b.wrapping_add(DATA_OFFSET)));
        out.push(framing::checksum(&out[start..]));
        out.push(END);
        Ok(out)
    }

    /// A whole frame as [`Scanner::next`] hands it over (checksum already verified).
    fn from_wire(bytes: &[u8]) -> Frame {
        let mut address = [0u8; 6];
        address.copy_from_slice(&bytes[1..7]);
        Frame {
            address: Address(address),
            control: Control(bytes[8]),
            data: bytes[10..bytes.len() - 2]
                .iter()
                .map(|b| b.wrapping_sub(DATA_OFFSET))
                .collect(),
        }
    }
}

/// DL/T 645 frames found in the bytes of a line.
pub type Receiver = crate::framing::Frames<Frame>;

impl crate::framing::Protocol for Frame {
    const LAYOUT: Layout = LAYOUT;

    fn from_wire(bytes: &[u8]) -> Frame {
        Frame::from_wire(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hex bytes written with spaces, as the reference prints them.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn the_nameplate_number_goes_low_pair_first() {
        // §A3: "123456789012" → 12 90 78 56 34 12.
        let a = Address::parse("123456789012").unwrap();
        assert_eq!(a.0, [0x12, 0x90, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!(a.to_string(), "123456789012");
        // Short numbers are zero-padded: 12345678 → 78 56 34 12 00 00 (§A13).
        assert_eq!(
            Address::parse("12345678").unwrap().0,
            [0x78, 0x56, 0x34, 0x12, 0, 0]
        );
        assert_eq!(Address::parse("aaaaaaaaaaaa").unwrap(), Address::WILDCARD);
        let e = Address::parse("2024-1111-0002").unwrap_err();
        assert!(e.to_string().contains("1 to 12 digits"), "{e}");
        assert!(Address::parse("1234567890123").is_err());
        assert!(Address::parse("").is_err());
    }

    #[test]
    fn a_wildcard_matches_any_answer_and_a_real_address_only_itself() {
        let m = Address::parse("12345678").unwrap();
        assert!(Address::WILDCARD.matches(&m));
        assert!(m.matches(&m));
        assert!(!m.matches(&Address::parse("12345679").unwrap()));
    }

    #[test]
    fn the_reference_read_request_encodes_byte_for_byte() {
        // §A13: read 00010000 from 000012345678, after 4 × FE.
        let f = Frame {
            address: Address::parse("12345678").unwrap(),
            control: Control::request(function::READ),
            data: vec![0x00, 0x00, 0x01, 0x00],
        };
        let mut want = hex("FE FE FE FE");
        want.extend(hex("68 78 56 34 12 00 00 68 11 04 33 33 34 33 C6 16"));
        assert_eq!(f.encode(4).unwrap(), want);
        // Published vectors: LIB tests/test_frame.c and zcx1218029121/go645 protocol_test.go.
        let lib = Frame {
            address: Address::parse("123456789012").unwrap(),
            ..f.clone()
        };
        assert_eq!(
            lib.encode(0).unwrap(),
            hex("68 12 90 78 56 34 12 68 11 04 33 33 34 33 68 16")
        );
        let go = Frame {
            address: Address::parse("161").unwrap(),
            ..f
        };
        assert_eq!(
            go.encode(0).unwrap(),
            hex("68 61 01 00 00 00 00 68 11 04 33 33 34 33 14 16")
        );
    }

    #[test]
    fn an_answer_decodes_with_the_offset_removed() {
        let mut r = Receiver::default();
        r.push(&hex(
            "FE FE 68 78 56 34 12 00 00 68 91 08 33 33 34 33 9A 78 56 34 E6 16",
        ));
        let f = r.next_frame().unwrap();
        assert_eq!(f.address, Address::parse("12345678").unwrap());
        assert!(f.control.is_answer() && !f.control.is_error() && !f.control.more_follows());
        assert_eq!(f.control.function(), function::READ);
        assert_eq!(f.data, vec![0x00, 0x00, 0x01, 0x00, 0x67, 0x45, 0x23, 0x01]);
        assert_eq!(r.noise(), 0, "FE is preamble, not noise");
    }

    #[test]
    fn read_address_and_control_answers_round_trip() {
        // §A13: read address to the wildcard (same bytes in CSDN645, FDX, GO645); control OK L=0.
        let req = Frame {
            address: Address::WILDCARD,
            control: Control::request(function::READ_ADDRESS),
            data: vec![],
        };
        assert_eq!(
            req.encode(0).unwrap(),
            hex("68 AA AA AA AA AA AA 68 13 00 DF 16")
        );
        for wire in [
            "68 78 56 34 12 00 00 68 93 06 AB 89 67 45 33 33 C3 16",
            "68 78 56 34 12 00 00 68 9C 00 80 16",
            "68 78 56 34 12 00 00 68 D1 01 35 EB 16",
        ] {
            let mut r = Receiver::default();
            r.push(&hex(wire));
            let f = r.next_frame().unwrap();
            assert_eq!(f.encode(0).unwrap(), hex(wire), "{wire}");
        }
    }

    #[test]
    fn data_over_200_bytes_is_refused() {
        let f = Frame {
            address: Address::WILDCARD,
            control: Control::request(function::READ),
            data: vec![0; 201],
        };
        assert_eq!(f.encode(0), Err(TooLong(201)));
    }
}
