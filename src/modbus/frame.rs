//! Modbus RTU frames as they arrive on a shared line, pure (Modbus over Serial Line V1.02 §2.5.1).
//!
//! tokio-modbus encodes and decodes a frame, but on an RS485 line it trusts whatever arrives next: the
//! late answer of a meter that already timed out, a neighbour's answer, noise from a switching
//! contactor. [`Receiver`] splits the received bytes into frames by their header and CRC and only lets
//! through the frame that answers the request on the line ([`Expect`]: unit, function and, for reads,
//! the byte count); everything else is counted and dropped. [`Resync`] decides how long the line must
//! be quiet before the next request after a failed one.
//!
//! Used by the link's line guard (client side) and by the simulator's line emulator (to find frame
//! boundaries in what a server wrote).

use std::time::Duration;

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

/// True when the last two bytes of `frame` are the CRC of the rest, low byte first.
pub(crate) fn crc_ok(frame: &[u8]) -> bool {
    let Some(split) = frame.len().checked_sub(2) else {
        return false;
    };
    let (body, crc) = frame.split_at(split);
    CRC.checksum(body).to_le_bytes() == [crc[0], crc[1]]
}

/// Appends the CRC of `frame` (low byte first).
pub fn push_crc(frame: &mut Vec<u8>) {
    let crc = CRC.checksum(frame);
    frame.extend_from_slice(&crc.to_le_bytes());
}

/// What answers a request: its unit and function, and the exact length of a normal answer (an
/// exception answer is always 5 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub unit: u8,
    pub function: u8,
    pub len: usize,
}

impl Expect {
    /// The answer a request ADU (as written to the line) calls for; `None` for a broadcast, a
    /// function meterd does not send, or fewer bytes than the header.
    pub(crate) fn of_request(adu: &[u8]) -> Option<Expect> {
        let (&unit, &function) = (adu.first()?, adu.get(1)?);
        if unit == 0 {
            return None;
        }
        let count = || {
            adu.get(4..6)
                .map(|c| usize::from(u16::from_be_bytes([c[0], c[1]])))
        };
        let len = match function {
            // unit, fc, byte count, data, CRC.
            0x01 | 0x02 => 5 + count()?.div_ceil(8),
            0x03 | 0x04 => 5 + 2 * count()?,
            // The echo: unit, fc, address, value or quantity, CRC.
            0x05 | 0x06 | 0x0F | 0x10 => 8,
            _ => return None,
        };
        Some(Expect {
            unit,
            function,
            len,
        })
    }
}

/// Length of a response frame as far as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Too few bytes to tell.
    NeedMore,
    Len(usize),
    /// Not the start of any response frame.
    Invalid,
}

fn head(buf: &[u8]) -> Head {
    let (Some(&unit), Some(&function)) = (buf.first(), buf.get(1)) else {
        return Head::NeedMore;
    };
    if unit == 0 || unit > 247 {
        return Head::Invalid;
    }
    match function {
        f if f & 0x80 != 0 && matches!(f & 0x7F, 0x01..=0x06 | 0x0F | 0x10) => Head::Len(5),
        0x01..=0x04 => match buf.get(2) {
            Some(&n) => Head::Len(5 + usize::from(n)),
            None => Head::NeedMore,
        },
        0x05 | 0x06 | 0x0F | 0x10 => Head::Len(8),
        _ => Head::Invalid,
    }
}

/// Length of the complete, CRC-valid response frame at the start of `buf`, if there is one. The
/// simulator's line emulator uses it to cut what a server wrote into frames.
pub(crate) fn frame_at_start(buf: &[u8]) -> Option<usize> {
    match head(buf) {
        Head::Len(n) if buf.len() >= n && crc_ok(&buf[..n]) => Some(n),
        _ => None,
    }
}

/// Length of the request frame at the start of `buf` (what a server on the line reads), if its
/// header tells: `None` for too few bytes or a function meterd does not send.
pub(crate) fn request_len(buf: &[u8]) -> Option<usize> {
    match buf.get(1)? {
        0x01..=0x06 => Some(8),
        // unit, fc, address, quantity, byte count, values, CRC.
        0x0F | 0x10 => buf.get(6).map(|&n| 9 + usize::from(n)),
        _ => None,
    }
}

/// A frame the receiver took off the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The answer to the request on the line (a normal or an exception answer).
    Answer(Vec<u8>),
    /// A valid frame from another unit: a late answer to an earlier request, or two meters set to
    /// the same address... never given to the caller.
    Foreign { unit: u8, function: u8 },
    /// A valid frame from the right unit that does not answer this request (another function or
    /// byte count: the late answer to an earlier request of the same unit).
    Mismatch { function: u8, len: usize },
}

/// Splits received bytes into frames and picks the one that answers the current request.
#[derive(Debug, Default)]
pub struct Receiver {
    buf: Vec<u8>,
    expect: Option<Expect>,
    /// Bytes dropped because they were part of no valid frame (noise, a garbled or cut frame).
    pub noise: u64,
}

impl Receiver {
    /// Starts waiting for the answer to a new request; what is still buffered belongs to the last
    /// one and is discarded (the count is returned). With `None` (a request whose answer meterd
    /// cannot predict) bytes pass through unfiltered.
    pub fn expect(&mut self, expect: Option<Expect>) -> usize {
        let stale = self.buf.len();
        self.buf.clear();
        self.expect = expect;
        stale
    }

    /// Adds bytes read from the line.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next frame found in what was fed, or `None` until more bytes arrive. Noise before a frame
    /// is dropped (and counted) on the way.
    pub(crate) fn next_event(&mut self) -> Option<Event> {
        let Some(expect) = self.expect else {
            if self.buf.is_empty() {
                return None;
            }
            return Some(Event::Answer(std::mem::take(&mut self.buf)));
        };
        loop {
            match head(&self.buf) {
                Head::NeedMore => return None,
                Head::Invalid => self.drop_noise(1),
                Head::Len(n) if self.buf.len() >= n => {
                    if !crc_ok(&self.buf[..n]) {
                        // Not a frame starting here: slide by one byte and look again.
                        self.drop_noise(1);
                        continue;
                    }
                    let frame: Vec<u8> = self.buf.drain(..n).collect();
                    return Some(classify(expect, frame));
                }
                Head::Len(_) => {
                    // The head may be a frame still arriving, or noise that claims a long length:
                    // if the answer is already complete further on, what precedes it is noise.
                    let at = self.find_answer(expect)?;
                    self.drop_noise(at);
                }
            }
        }
    }

    fn drop_noise(&mut self, n: usize) {
        self.buf.drain(..n);
        self.noise += n as u64;
    }

    /// Offset (> 0) of a complete, valid answer to `expect` inside the buffer.
    fn find_answer(&self, expect: Expect) -> Option<usize> {
        (1..self.buf.len()).find(|&i| {
            let rest = &self.buf[i..];
            let len = match rest.get(1) {
                Some(&f) if f == expect.function => expect.len,
                Some(&f) if f == expect.function | 0x80 => 5,
                _ => return false,
            };
            rest[0] == expect.unit && rest.len() >= len && crc_ok(&rest[..len])
        })
    }
}

fn classify(expect: Expect, frame: Vec<u8>) -> Event {
    let (unit, function) = (frame[0], frame[1]);
    if unit != expect.unit {
        return Event::Foreign { unit, function };
    }
    let answers = (function == expect.function && frame.len() == expect.len)
        || (function == expect.function | 0x80 && frame.len() == 5);
    if answers {
        Event::Answer(frame)
    } else {
        Event::Mismatch {
            function,
            len: frame.len(),
        }
    }
}

/// How long the line must stay quiet before the next request, after a request that got no answer.
///
/// Two rules. Whatever is still arriving (a late answer, noise) is waited out until the line has
/// been silent for `silence`. And a request to the unit that just failed waits until its late-answer
/// window has passed (the failed request plus twice its timeout): an answer that late is the answer
/// to the old request, and it would otherwise be taken for the answer to the retry. Late answers from
/// another unit need no wait: the [`Receiver`] drops them by their unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resync {
    /// Earliest moment the next request may go out (relative to the caller's clock origin).
    pub until: Duration,
    /// Hard limit: continuous noise cannot hold the line for longer than this.
    pub limit: Duration,
    pub silence: Duration,
}

impl Resync {
    /// Plans the wait after the request sent at `sent` to `failed_unit` got no answer by `now`.
    pub(crate) fn after_failure(
        now: Duration,
        sent: Duration,
        timeout: Duration,
        failed_unit: u8,
        next_unit: u8,
        silence: Duration,
    ) -> Resync {
        let late_window = if next_unit == failed_unit {
            sent + 2 * timeout
        } else {
            now
        };
        Resync {
            until: late_window.max(now + silence),
            limit: late_window.max(now + timeout),
            silence,
        }
    }

    /// Bytes arrived at `now`: the line is not quiet yet.
    pub(crate) fn bytes_arrived(&mut self, now: Duration) {
        self.until = self.until.max(now + self.silence).min(self.limit);
    }

    /// True once the next request may be sent.
    pub(crate) fn done(&self, now: Duration) -> bool {
        now >= self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut f = body.to_vec();
        push_crc(&mut f);
        f
    }

    /// Unit 5 asked for 2 holding registers at 0x0000.
    fn read_2() -> Expect {
        Expect::of_request(&framed(&[0x05, 0x03, 0x00, 0x00, 0x00, 0x02])).unwrap()
    }

    #[test]
    fn crc_matches_the_reference_vectors() {
        // meters.md §4: 01 03 00 64 00 01 → C5 D5; 01 04 00 00 00 02 → 71 CB.
        assert_eq!(
            framed(&[0x01, 0x03, 0x00, 0x64, 0x00, 0x01])[6..],
            [0xC5, 0xD5]
        );
        assert_eq!(
            framed(&[0x01, 0x04, 0x00, 0x00, 0x00, 0x02])[6..],
            [0x71, 0xCB]
        );
        assert!(crc_ok(&[0x01, 0x04, 0x00, 0x00, 0x00, 0x02, 0x71, 0xCB]));
        assert!(!crc_ok(&[0x01, 0x04, 0x00, 0x00, 0x00, 0x02, 0xCB, 0x71]));
    }

    #[test]
    fn the_expected_answer_length_follows_the_request() {
        assert_eq!(
            read_2(),
            Expect {
                unit: 5,
                function: 3,
                len: 9
            }
        );
        // 10 coils: 2 data bytes.
        let coils = Expect::of_request(&framed(&[1, 0x01, 0, 0, 0, 10])).unwrap();
        assert_eq!(coils.len, 7);
        let write = Expect::of_request(&framed(&[1, 0x05, 0, 3, 0xFF, 0])).unwrap();
        assert_eq!(write.len, 8);
        assert_eq!(Expect::of_request(&framed(&[0, 0x05, 0, 3, 0xFF, 0])), None);
    }

    #[test]
    fn only_the_answer_to_the_request_is_taken_off_the_line() {
        let mut rx = Receiver::default();
        rx.expect(Some(read_2()));
        // Unit 4's late answer, then unit 5's answer to an earlier one-register read, then ours.
        let foreign = framed(&[0x04, 0x03, 0x04, 0, 1, 0, 2]);
        let stale = framed(&[0x05, 0x03, 0x02, 0x12, 0x34]);
        let ours = framed(&[0x05, 0x03, 0x04, 0xAA, 0xBB, 0xCC, 0xDD]);
        for f in [&foreign, &stale, &ours] {
            rx.feed(f);
        }
        assert_eq!(
            rx.next_event(),
            Some(Event::Foreign {
                unit: 4,
                function: 3
            })
        );
        assert_eq!(
            rx.next_event(),
            Some(Event::Mismatch {
                function: 3,
                len: 7
            })
        );
        assert_eq!(rx.next_event(), Some(Event::Answer(ours)));
        assert_eq!(rx.next_event(), None);
        assert_eq!(rx.noise, 0);
    }

    #[test]
    fn an_exception_from_the_unit_answers_the_request() {
        let mut rx = Receiver::default();
        rx.expect(Some(read_2()));
        let exc = framed(&[0x05, 0x83, 0x02]);
        rx.feed(&exc);
        assert_eq!(rx.next_event(), Some(Event::Answer(exc)));
    }

    #[test]
    fn noise_that_claims_a_long_frame_does_not_hide_the_answer_behind_it() {
        let mut rx = Receiver::default();
        rx.expect(Some(read_2()));
        // 0x07 0x03 0xF0: "unit 7 answers 240 bytes", never completed.
        rx.feed(&[0x07, 0x03, 0xF0, 0x55]);
        assert_eq!(rx.next_event(), None);
        let ours = framed(&[0x05, 0x03, 0x04, 1, 2, 3, 4]);
        rx.feed(&ours);
        assert_eq!(rx.next_event(), Some(Event::Answer(ours)));
        assert_eq!(rx.noise, 4);
    }

    #[test]
    fn a_frame_arriving_in_pieces_is_assembled() {
        let mut rx = Receiver::default();
        rx.expect(Some(read_2()));
        let ours = framed(&[0x05, 0x03, 0x04, 1, 2, 3, 4]);
        for b in &ours[..ours.len() - 1] {
            rx.feed(&[*b]);
            assert_eq!(rx.next_event(), None);
        }
        rx.feed(&ours[ours.len() - 1..]);
        assert_eq!(rx.next_event(), Some(Event::Answer(ours)));
        assert_eq!(rx.noise, 0);
    }

    #[test]
    fn a_garbled_answer_is_noise_not_an_answer() {
        let mut rx = Receiver::default();
        rx.expect(Some(read_2()));
        let mut bad = framed(&[0x05, 0x03, 0x04, 1, 2, 3, 4]);
        *bad.last_mut().unwrap() ^= 0xFF;
        rx.feed(&bad);
        assert_eq!(rx.next_event(), None);
        assert!(rx.noise > 0, "a CRC failure is seen as noise at once");
        // What is left cannot complete into a valid answer; the next request discards it.
        let stale = rx.expect(Some(read_2()));
        assert_eq!(rx.noise + stale as u64, bad.len() as u64);
    }

    #[test]
    fn the_masters_own_echo_on_a_two_wire_adapter_is_skipped() {
        let mut rx = Receiver::default();
        let request = framed(&[0x05, 0x03, 0x00, 0x00, 0x00, 0x02]);
        rx.expect(Expect::of_request(&request));
        rx.feed(&request);
        let ours = framed(&[0x05, 0x03, 0x04, 1, 2, 3, 4]);
        rx.feed(&ours);
        assert_eq!(rx.next_event(), Some(Event::Answer(ours)));
    }

    #[test]
    fn frames_are_cut_at_their_length_for_the_line_emulator() {
        let a = framed(&[0x05, 0x03, 0x04, 1, 2, 3, 4]);
        let b = framed(&[0x06, 0x05, 0, 1, 0xFF, 0]);
        let both = [a.clone(), b.clone()].concat();
        assert_eq!(frame_at_start(&both), Some(a.len()));
        assert_eq!(frame_at_start(&both[a.len()..]), Some(b.len()));
        assert_eq!(frame_at_start(&both[1..]), None);
    }

    #[test]
    fn a_retry_to_the_failed_unit_waits_out_its_late_answer_window() {
        let ms = Duration::from_millis;
        // Sent at 0, timed out at 300 ms.
        let same = Resync::after_failure(ms(300), ms(0), ms(300), 5, 5, ms(20));
        assert_eq!(same.until, ms(600));
        assert!(!same.done(ms(599)));
        assert!(same.done(ms(600)));
        // Another unit: only the line's silence.
        let mut other = Resync::after_failure(ms(300), ms(0), ms(300), 5, 4, ms(20));
        assert_eq!(other.until, ms(320));
        other.bytes_arrived(ms(310));
        assert_eq!(other.until, ms(330));
        // Noise that never stops cannot hold the line past the limit.
        for t in (330..2000).step_by(5) {
            other.bytes_arrived(ms(t));
        }
        assert_eq!(other.until, ms(600));
    }

    proptest! {
        /// Whatever noise and foreign frames surround it, the answer is found exactly once, is
        /// byte-identical, and nothing else is ever given out as an answer.
        #[test]
        fn the_answer_survives_any_noise_and_foreign_frames(
            noise_before in proptest::collection::vec(any::<u8>(), 0..40),
            foreign_unit in 1u8..=247,
            noise_after in proptest::collection::vec(any::<u8>(), 0..40),
            chunk in 1usize..16,
            data in proptest::collection::vec(any::<u8>(), 4),
        ) {
            prop_assume!(foreign_unit != 5);
            let mut rx = Receiver::default();
            rx.expect(Some(read_2()));
            let foreign = framed(&[foreign_unit, 0x03, 0x04, 9, 9, 9, 9]);
            let ours = framed(&[0x05, 0x03, 0x04, data[0], data[1], data[2], data[3]]);
            let line = [noise_before.clone(), foreign, ours.clone(), noise_after].concat();
            let mut answers = Vec::new();
            for piece in line.chunks(chunk) {
                rx.feed(piece);
                while let Some(e) = rx.next_event() {
                    if let Event::Answer(f) = e {
                        answers.push(f);
                    }
                }
            }
            // Noise can, with odds of 2^-16 per position, contain a valid answer of its own; the
            // real one must be among what was given out, and only valid frames of unit 5 ever are.
            prop_assert!(answers.contains(&ours));
            for a in &answers {
                prop_assert_eq!(a[0], 5);
                prop_assert!(crc_ok(a));
            }
        }
    }
}
