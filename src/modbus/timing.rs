//! RS485 wire timing (Modbus over Serial Line V1.02 §2.5.1.1), pure arithmetic.
//!
//! Used to set the default inter-frame gap per bus, to reject a configured gap below t3.5, by the
//! simulator to emulate a real line on a pseudo-terminal, and by the RTU benchmark's theoretical figure.

use std::time::Duration;

/// Bits per character on the wire: start + 8 data + parity + stop, or 2 stop bits without parity.
/// The spec's 11-bit character; an 8N1 line (10 bits) is what many Chinese meters ship with.
pub(crate) fn bits_per_char(parity: bool, stop_bits: u8) -> u32 {
    1 + 8 + u32::from(parity) + u32::from(stop_bits)
}

/// Time to send `bytes` characters.
pub(crate) fn wire_time(bytes: usize, baud: u32, bits_per_char: u32) -> Duration {
    Duration::from_nanos(
        bytes as u64 * u64::from(bits_per_char) * 1_000_000_000 / u64::from(baud.max(1)),
    )
}

/// Silent interval that separates frames: 3.5 character times, fixed at 1.75 ms above 19200 baud.
#[must_use]
pub fn t35(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        // The spec defines t3.5 with the 11-bit character whatever the framing.
        Duration::from_nanos(35 * 11 * 1_000_000_000 / (10 * u64::from(baud.max(1))))
    }
}

/// Serial speeds a UART and an RS485 meter can actually be set to.
pub(crate) const STANDARD_BAUDS: &[u32] = &[
    300, 600, 1200, 2400, 4800, 9600, 14_400, 19_200, 38_400, 57_600, 115_200, 230_400,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t35_matches_the_table_in_the_reference() {
        // Reference table: 1200 → 32.08 ms, 9600 → 4.010 ms, 19200 → 2.005 ms, above → 1.750 ms.
        assert_eq!(t35(1200).as_micros(), 32_083);
        assert_eq!(t35(9600).as_micros(), 4_010);
        assert_eq!(t35(19_200).as_micros(), 2_005);
        assert_eq!(t35(115_200), Duration::from_micros(1750));
    }

    #[test]
    fn an_8e1_character_is_11_bits() {
        assert_eq!(bits_per_char(true, 1), 11);
        assert_eq!(bits_per_char(false, 2), 11);
        assert_eq!(bits_per_char(false, 1), 10);
        // 8 request bytes at 9600 8E1: 8 × 11 / 9600 s = 9.1667 ms.
        assert_eq!(wire_time(8, 9600, 11).as_micros(), 9_166);
    }
}
