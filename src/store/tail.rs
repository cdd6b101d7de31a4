//! The newest committed outbox rows, kept in memory so the uplink's live fetches need neither the
//! store thread nor a read transaction (two thread hand-offs and a file lock per message).
//!
//! The invariant: for every seq above `base` and up to `top`, the tail holds exactly the rows the
//! outbox table holds. Every write path keeps it: appends of plain telemetry are pushed, acks remove
//! their ranges, and anything else that adds or removes rows (state transactions, billing runs, the
//! caps, oversized records) resets `base` to the newest seq, so older seqs are read from `SQLite`.

use std::collections::BTreeMap;

use super::Stored;

/// Most payload bytes held; the oldest rows leave first (and `base` moves up past them).
pub(crate) const TAIL_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Tail {
    /// Rows with a seq at or below this are not in the tail (read them from the table).
    base: i64,
    /// The newest committed seq.
    top: i64,
    rows: BTreeMap<i64, Stored>,
    bytes: usize,
    cap_bytes: usize,
}

impl Tail {
    /// An empty tail over an outbox whose newest seq is `last`.
    pub(crate) fn new(last: i64, cap_bytes: usize) -> Tail {
        Tail {
            base: last,
            top: last,
            rows: BTreeMap::new(),
            bytes: 0,
            cap_bytes,
        }
    }

    /// Rows just committed with consecutive seqs. A gap before them (rows committed another way)
    /// moves `base` up to just before them.
    pub(crate) fn push(&mut self, rows: Vec<Stored>) {
        let Some(first) = rows.first().map(|r| r.seq) else {
            return;
        };
        if first != self.top + 1 {
            self.reset(first - 1);
        }
        for r in rows {
            self.top = r.seq;
            self.bytes += r.payload.len();
            self.rows.insert(r.seq, r);
        }
        while self.bytes > self.cap_bytes {
            let Some((seq, r)) = self.rows.pop_first() else {
                break;
            };
            self.bytes -= r.payload.len();
            self.base = seq;
        }
    }

    /// Rows were added or removed another way; the newest seq is now `last`.
    pub(crate) fn reset(&mut self, last: i64) {
        self.rows.clear();
        self.bytes = 0;
        self.base = last.max(self.top);
        self.top = self.base;
    }

    /// Acknowledged (deleted) inclusive seq ranges.
    pub(crate) fn ack(&mut self, ranges: &[(i64, i64)]) {
        for &(a, z) in ranges.iter().filter(|(a, z)| a <= z) {
            let gone: Vec<i64> = self.rows.range(a..=z).map(|(s, _)| *s).collect();
            for s in gone {
                if let Some(r) = self.rows.remove(&s) {
                    self.bytes -= r.payload.len();
                }
            }
        }
    }

    /// The rows and payload bytes the table holds in the inclusive `ranges`, when the tail covers
    /// them all (an ack of live records then needs no counting query before its delete).
    pub(crate) fn counted(&self, ranges: &[(i64, i64)]) -> Option<(u64, u64)> {
        let (mut rows, mut bytes) = (0u64, 0u64);
        for &(a, z) in ranges.iter().filter(|(a, z)| a <= z) {
            if a <= self.base || z > self.top {
                return None;
            }
            for r in self.rows.range(a..=z).map(|(_, r)| r) {
                rows += 1;
                bytes += r.payload.len() as u64;
            }
        }
        Some((rows, bytes))
    }

    /// What `Store::fetch(after, upto, limit)` would return, when the tail can answer it.
    pub(crate) fn fetch(&self, after: i64, upto: i64, limit: usize) -> Option<Vec<Stored>> {
        if after < self.base || upto > self.top {
            return None;
        }
        if after >= upto {
            return Some(Vec::new());
        }
        Some(
            self.rows
                .range(after + 1..=upto)
                .take(limit)
                .map(|(_, r)| r.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Kind;
    use proptest::prelude::*;

    fn row(seq: i64, bytes: usize) -> Stored {
        Stored {
            seq,
            kind: Kind::Telemetry,
            topic: "telemetry".into(),
            ts_ms: 1_764_000_000_000 + seq * 10_000,
            payload: vec![b'x'; bytes],
        }
    }

    #[test]
    fn a_live_fetch_is_answered_from_memory_and_older_seqs_are_not() {
        let mut t = Tail::new(100, TAIL_BYTES);
        t.push((101..=110).map(|s| row(s, 150)).collect());
        let got = t.fetch(100, 110, 500).unwrap();
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (101..=110).collect::<Vec<_>>()
        );
        assert!(
            t.fetch(99, 110, 500).is_none(),
            "seq 100 is only in the table"
        );
        assert!(
            t.fetch(105, 111, 500).is_none(),
            "seq 111 is not committed yet"
        );
        t.ack(&[(101, 105)]);
        assert_eq!(
            t.fetch(100, 110, 2)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![106, 107]
        );
    }

    #[test]
    fn rows_committed_another_way_send_the_reader_to_the_table() {
        let mut t = Tail::new(0, TAIL_BYTES);
        t.push((1..=3).map(|s| row(s, 10)).collect());
        // A billing run's records (seqs 4..=6) were committed by another path.
        t.reset(6);
        assert!(t.fetch(3, 6, 10).is_none());
        t.push(vec![row(7, 10)]);
        assert_eq!(t.fetch(6, 7, 10).unwrap().len(), 1);
        // A gap the tail did not see: seq 8 came from elsewhere, 9 is pushed.
        t.push(vec![row(9, 10)]);
        assert!(t.fetch(7, 9, 10).is_none());
        assert_eq!(t.fetch(8, 9, 10).unwrap().len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8),
        Other(u8),
        Ack(u8, u8),
        Drop(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..20).prop_map(Op::Push),
            1 => (1u8..5).prop_map(Op::Other),
            3 => (0u8..40, 0u8..10).prop_map(|(a, n)| Op::Ack(a, n)),
            1 => (1u8..10).prop_map(Op::Drop),
        ]
    }

    proptest! {
        /// Against a model of the table: whatever the tail answers is what the table holds.
        #[test]
        fn the_tail_answers_exactly_what_the_table_would(ops in proptest::collection::vec(op(), 1..60), cap in 200usize..3000) {
            let mut table: BTreeMap<i64, usize> = (1..=5).map(|s| (s, 50)).collect();
            let mut last = 5i64;
            let mut t = Tail::new(last, cap);
            for op in ops {
                match op {
                    Op::Push(n) => {
                        let rows: Vec<Stored> = (1..=i64::from(n)).map(|i| row(last + i, 40 + (i as usize % 7) * 10)).collect();
                        for r in &rows { table.insert(r.seq, r.payload.len()); }
                        last += i64::from(n);
                        t.push(rows);
                    }
                    Op::Other(n) => {
                        for i in 1..=i64::from(n) { table.insert(last + i, 30); }
                        last += i64::from(n);
                        t.reset(last);
                    }
                    Op::Ack(a, n) => {
                        let a = last - i64::from(a);
                        let z = a + i64::from(n);
                        if let Some(counted) = t.counted(&[(a, z)]) {
                            let held = table.range(a..=z).map(|(_, b)| *b as u64);
                            prop_assert_eq!(counted, (held.clone().count() as u64, held.sum::<u64>()));
                        }
                        table.retain(|s, _| !(a..=z).contains(s));
                        t.ack(&[(a, z)]);
                    }
                    Op::Drop(n) => {
                        // The caps drop the oldest rows and add an event.
                        let gone: Vec<i64> = table.keys().take(usize::from(n)).copied().collect();
                        for s in gone { table.remove(&s); }
                        last += 1;
                        table.insert(last, 60);
                        t.reset(last);
                    }
                }
                for after in (last - 30).max(0)..last {
                    for limit in [1usize, 3, 500] {
                        if let Some(got) = t.fetch(after, last, limit) {
                            let want: Vec<i64> = table.range(after + 1..=last).take(limit).map(|(s, _)| *s).collect();
                            prop_assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), want);
                        }
                    }
                }
                prop_assert!(t.bytes <= cap.max(t.rows.values().map(|r| r.payload.len()).max().unwrap_or(0)));
                prop_assert!(t.fetch(last - 1, last, 10).is_some() || t.base >= last - 1);
            }
        }
    }
}
