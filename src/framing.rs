//! Finding `68 … L DATA CS 16` frames in a byte stream, as DL/T 645-2007 and CJ/T 188-2004 send
//! them (`shared/reference/dlt645-cjt188.md` §A2, §B2): wake-up `FE`s before a frame, noise from a
//! line that just switched direction, a frame split across reads, and a checksum that may itself be
//! `0x16`, so a frame ends where its length byte says, never at the first `0x16` (§A14).

/// First byte of every frame.
pub(crate) const START: u8 = 0x68;
/// Last byte of every frame.
pub(crate) const END: u8 = 0x16;
/// Wake-up byte sent (0–4 times) before a frame.
pub(crate) const PREAMBLE: u8 = 0xFE;

/// Where a protocol keeps its length byte and how far its header goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes from the first `68` up to and including the length byte `L`.
    pub header: usize,
    /// Offset of a second `68` in the header (DL/T 645 has one after the address).
    pub second_start: Option<usize>,
    /// Largest `L` the protocol allows: a larger one is noise, not a frame to wait for.
    pub max_len: u8,
}

/// The sum of `bytes` modulo 256: both protocols' checksum, from the first `68` through the data.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// What the bytes from a `68` on are.
enum Candidate {
    /// A whole frame of this many bytes.
    Frame(usize),
    /// Possibly a frame, not all here yet.
    Incomplete,
    /// Not a frame.
    Not,
}

fn candidate(bytes: &[u8], layout: Layout) -> Candidate {
    if bytes.len() < layout.header {
        return match layout.second_start {
            Some(at) if bytes.len() > at && bytes[at] != START => Candidate::Not,
            _ => Candidate::Incomplete,
        };
    }
    let len = bytes[layout.header - 1];
    if layout.second_start.is_some_and(|at| bytes[at] != START) || len > layout.max_len {
        return Candidate::Not;
    }
    let total = layout.header + usize::from(len) + 2;
    if bytes.len() < total {
        return Candidate::Incomplete;
    }
    if checksum(&bytes[..total - 2]) == bytes[total - 2] && bytes[total - 1] == END {
        Candidate::Frame(total)
    } else {
        Candidate::Not
    }
}

/// Bytes received so far, and the whole, checksummed frames found in them.
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    buf: Vec<u8>,
    noise: u64,
}

impl Scanner {
    /// Appends bytes as they came off the line.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame (from its `68` through its `16`, checksum verified), dropping what comes
    /// before it; `None` until one is complete. Every `68` is a candidate start: one that cannot be
    /// a frame (no second `68` where the layout has one, a length over the limit, a bad checksum or
    /// end byte) is passed over, and a candidate still waiting for bytes does not hide a complete
    /// frame behind it (noise that happens to look like a header would otherwise swallow the answer).
    pub(crate) fn next(&mut self, layout: Layout) -> Option<Vec<u8>> {
        let mut keep_from = self.buf.len();
        for i in 0..self.buf.len() {
            if self.buf[i] != START {
                continue;
            }
            match candidate(&self.buf[i..], layout) {
                Candidate::Frame(total) => {
                    self.drop_front(i);
                    return Some(self.buf.drain(..total).collect());
                }
                Candidate::Incomplete => keep_from = keep_from.min(i),
                Candidate::Not => {}
            }
        }
        self.drop_front(keep_from);
        None
    }

    /// Bytes dropped that were neither a wake-up preamble nor part of a frame.
    pub(crate) fn noise(&self) -> u64 {
        self.noise
    }

    /// Bytes held that are not (yet) a frame.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Forgets what is held (after a timeout: the rest of that answer is stale).
    pub(crate) fn clear(&mut self) {
        self.noise += self.buf.iter().filter(|b| **b != PREAMBLE).count() as u64;
        self.buf.clear();
    }

    fn drop_front(&mut self, n: usize) {
        self.noise += self.buf[..n].iter().filter(|b| **b != PREAMBLE).count() as u64;
        self.buf.drain(..n);
    }
}

/// A protocol whose frames the scanner finds: its layout and how a whole frame is read.
pub trait Protocol: Sized {
    const LAYOUT: Layout;
    /// A whole frame, checksum verified, from its `68` through its `16`.
    fn from_wire(bytes: &[u8]) -> Self;
}

/// One protocol's frames found in the bytes of a line.
#[derive(Debug)]
pub struct Frames<P> {
    scanner: Scanner,
    _protocol: std::marker::PhantomData<P>,
}

impl<P> Default for Frames<P> {
    fn default() -> Frames<P> {
        Frames {
            scanner: Scanner::default(),
            _protocol: std::marker::PhantomData,
        }
    }
}

impl<P: Protocol> Frames<P> {
    /// Appends bytes as read from the line.
    pub fn push(&mut self, bytes: &[u8]) {
        self.scanner.push(bytes);
    }

    /// The next whole frame; `None` until one is complete.
    pub fn next_frame(&mut self) -> Option<P> {
        self.scanner.next(P::LAYOUT).map(|b| P::from_wire(&b))
    }

    /// Bytes dropped as noise so far.
    #[must_use]
    pub fn noise(&self) -> u64 {
        self.scanner.noise()
    }

    /// Forgets what is held (after a timeout: the rest of that answer is stale).
    pub fn clear(&mut self) {
        self.scanner.clear();
    }
}

impl<P: Protocol> crate::exchange::Receive for Frames<P> {
    type Frame = P;

    fn push(&mut self, bytes: &[u8]) {
        Frames::push(self, bytes);
    }

    fn next_frame(&mut self) -> Option<P> {
        Frames::next_frame(self)
    }

    fn noise(&self) -> u64 {
        Frames::noise(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DLT645: Layout = Layout {
        header: 10,
        second_start: Some(7),
        max_len: 200,
    };

    /// §A13: the answer 12345.67 kWh from meter 000012345678.
    const ANSWER: [u8; 20] = [
        0x68, 0x78, 0x56, 0x34, 0x12, 0x00, 0x00, 0x68, 0x91, 0x08, 0x33, 0x33, 0x34, 0x33, 0x9A,
        0x78, 0x56, 0x34, 0xE6, 0x16,
    ];

    #[test]
    fn preamble_and_garbage_before_a_frame_are_dropped_and_only_garbage_counts_as_noise() {
        let mut s = Scanner::default();
        s.push(&[0x00, 0x42, PREAMBLE, PREAMBLE, PREAMBLE, PREAMBLE]);
        s.push(&ANSWER);
        assert_eq!(s.next(DLT645).as_deref(), Some(&ANSWER[..]));
        assert_eq!(s.noise(), 2);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn a_frame_split_across_reads_comes_out_once_whole() {
        let mut s = Scanner::default();
        for chunk in ANSWER.chunks(3) {
            assert_eq!(s.next(DLT645), None, "not before its last byte");
            s.push(chunk);
        }
        assert_eq!(s.next(DLT645).as_deref(), Some(&ANSWER[..]));
    }

    #[test]
    fn a_checksum_of_0x16_does_not_end_the_frame_early() {
        // §B11: CJ/T 188 read of meter 12345678901234; its checksum is 0x16.
        let read = [
            0x68, 0x10, 0x34, 0x12, 0x90, 0x78, 0x56, 0x34, 0x12, 0x01, 0x03, 0x90, 0x1F, 0x01,
            0x16, 0x16,
        ];
        let cjt188 = Layout {
            header: 11,
            second_start: None,
            max_len: 0x64,
        };
        let mut s = Scanner::default();
        s.push(&read[..15]);
        assert_eq!(s.next(cjt188), None, "the checksum byte is not the end");
        s.push(&read[15..]);
        assert_eq!(s.next(cjt188).as_deref(), Some(&read[..]));
    }

    #[test]
    fn a_corrupted_frame_is_skipped_and_the_next_one_found() {
        let mut bad = ANSWER;
        bad[12] ^= 0x01;
        let mut s = Scanner::default();
        s.push(&bad);
        s.push(&ANSWER);
        assert_eq!(s.next(DLT645).as_deref(), Some(&ANSWER[..]));
        assert_eq!(s.noise(), ANSWER.len() as u64);
    }

    #[test]
    fn noise_shaped_like_a_header_does_not_swallow_the_answer_behind_it() {
        // A header promising 200 data bytes, then the real answer.
        let mut s = Scanner::default();
        s.push(&[0x68, 0, 0, 0, 0, 0, 0, 0x68, 0x91, 200]);
        s.push(&ANSWER);
        assert_eq!(s.next(DLT645).as_deref(), Some(&ANSWER[..]));
        assert_eq!(s.noise(), 10);
    }

    proptest! {
        /// Whatever noise comes before, and however the line cuts the bytes, the frame comes out.
        #[test]
        fn the_frame_survives_noise_and_any_chunking(
            noise in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in proptest::collection::vec(1usize..8, 1..30),
        ) {
            let mut stream = noise.clone();
            stream.extend_from_slice(&ANSWER);
            let mut s = Scanner::default();
            let mut found = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= stream.len() { break; }
                let end = (at + c).min(stream.len());
                s.push(&stream[at..end]);
                at = end;
                while let Some(f) = s.next(DLT645) { found.push(f); }
            }
            // Noise can hold a frame of its own only by a checksum-and-end-byte accident; a
            // header-like start in it never hides the real frame, which is the last one found.
            prop_assert_eq!(found.last().map(Vec::as_slice), Some(&ANSWER[..]));
        }
    }
}
