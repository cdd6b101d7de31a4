//! Outbox, history, runs and writer tests.

use super::writer::*;
use super::*;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

fn rec(kind: Kind, n: usize) -> NewRecord {
    NewRecord {
        kind,
        topic: if kind == Kind::Telemetry {
            "telemetry".into()
        } else {
            "audit".into()
        },
        ts: crate::clock::Clock::system().now(),
        payload: format!("{{\"n\":{n}}}").into_bytes(),
    }
}

/// Before the fix the age cap dropped the oldest telemetry by seq as soon as any of it looked
/// old: readings stamped 1970 by a gateway without RTC went at once (and with them, by seq,
/// young ones), and a clock in the future would have aged out everything.
#[test]
fn the_age_cap_drops_by_timestamp_and_never_on_a_wrong_clock() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Caps {
        max_age: Duration::from_secs(30 * 86_400),
        ..Caps::default()
    };
    let mut s = Store::open(
        &dir.path().join("outbox.db"),
        caps,
        crate::clock::Clock::system(),
    )
    .unwrap();
    // The append's own cap pass must not look at the age: this test sets "now" itself.
    s.last_age_check = Some(s.clock.instant());
    let at = |t: &str, n: usize| NewRecord {
        kind: Kind::Telemetry,
        topic: "telemetry".into(),
        ts: DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc),
        payload: format!("{{\"n\":{n}}}").into_bytes(),
    };
    // Boot without RTC: 1970 stamps; then NTP: real ones, a young one among old ones.
    s.append(&[
        at("1970-01-01T00:00:05Z", 1),
        at("1970-01-01T00:00:15Z", 2),
        at("2026-10-01T08:00:00Z", 3),
        at("2026-11-29T23:59:50Z", 4),
        at("2026-10-02T08:00:00Z", 5),
    ])
    .unwrap();
    let now = DateTime::parse_from_rfc3339("2026-11-30T00:05:00Z")
        .unwrap()
        .with_timezone(&Utc);
    // A wrong clock (2099): the age cap is not applied at all.
    s.last_age_check = None;
    s.enforce_caps(now + chrono::Duration::days(26_000))
        .unwrap();
    assert_eq!(s.fetch(0, i64::MAX, 100).unwrap().len(), 5);
    // The right clock: exactly the two plausible records older than 30 days go.
    s.last_age_check = None;
    s.enforce_caps(now).unwrap();
    let left: Vec<String> = s
        .fetch(0, i64::MAX, 100)
        .unwrap()
        .iter()
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect();
    assert_eq!(left[..3], [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":4}"#]);
    let ev: Value = serde_json::from_slice(&s.fetch(0, i64::MAX, 100).unwrap()[3].payload).unwrap();
    assert_eq!(
        (ev["reason"].clone(), ev["dropped"].clone()),
        (json!("max_age"), json!(2))
    );
    assert_eq!(
        (ev["seq_first"].clone(), ev["seq_last"].clone()),
        (json!(3), json!(5))
    );
}

#[test]
fn a_reply_is_remembered_with_its_record_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let reply = br#"{"id":"c-1","command":"top_up","ok":false,"error":"top-up suspended"}"#;
    {
        let mut s = Store::open(&path, Caps::default(), crate::clock::Clock::system()).unwrap();
        let rec = NewRecord {
            kind: Kind::Reply,
            topic: "reply".into(),
            ts: crate::clock::Clock::system().now(),
            payload: reply.to_vec(),
        };
        let remember = Remembered {
            id: "c-1".into(),
            command: "top_up".into(),
            ts_ms: crate::clock::Clock::system().now().timestamp_millis(),
            reply: reply.to_vec(),
        };
        s.append_remembering(&[rec], &[remember]).unwrap();
    }
    let s = Store::open(&path, Caps::default(), crate::clock::Clock::system()).unwrap();
    let known = s.replies_of(&["c-1".into(), "c-2".into()]).unwrap();
    assert_eq!(known.len(), 1);
    assert_eq!(known["c-1"], reply.to_vec());
    let st = s.stats().unwrap();
    assert_eq!(st.by_kind[Kind::Reply as usize], 1);
    assert_eq!(s.fetch(0, i64::MAX, 10).unwrap()[0].kind, Kind::Reply);
}

#[test]
fn a_cap_pass_failing_on_a_full_disk_after_the_insert_does_not_store_the_batch_twice() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Caps {
        max_rows: 50,
        ..Caps::default()
    };
    let store = Store::open(
        &dir.path().join("o.db"),
        caps,
        crate::clock::Clock::system(),
    )
    .unwrap();
    let mut w = Writer {
        store,
        spill: VecDeque::new(),
        spill_dropped: 0,
        last_error_log: None,
        committed: watch::channel(0).0,
        health: Arc::new(Mutex::new(None)),
        recent: Arc::default(),
    };
    w.commit((0..40).map(|i| rec(Kind::Telemetry, i)).collect(), &[]);
    // The next batch crosses the cap; its cap pass fails after the batch was committed.
    w.store.fail_next_cap_pass = true;
    w.commit((40..60).map(|i| rec(Kind::Telemetry, i)).collect(), &[]);
    w.commit((60..70).map(|i| rec(Kind::Telemetry, i)).collect(), &[]);
    let all = w.store.fetch(0, i64::MAX, 1000).unwrap();
    let mut seen = std::collections::HashSet::new();
    for r in all.iter().filter(|r| r.kind == Kind::Telemetry) {
        assert!(
            seen.insert(r.payload.clone()),
            "stored twice: {}",
            String::from_utf8_lossy(&r.payload)
        );
    }
    assert!(w.spill.is_empty(), "nothing held for a second insert");
    assert!(
        all.len() <= 51,
        "the cap applied on the next write: {}",
        all.len()
    );
    assert_eq!(
        *w.committed.borrow(),
        70,
        "the batches took seqs 1..=70, once"
    );
    assert!(
        w.store.last_seq().unwrap() <= 71,
        "only the overflow event after them"
    );
}

#[test]
fn seq_is_monotonic_across_restarts_even_when_everything_was_acked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.db");
    let mut s = Store::open(&p, Caps::default(), crate::clock::Clock::system()).unwrap();
    let last = s
        .append(&(0..10).map(|i| rec(Kind::Telemetry, i)).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(last, 10);
    s.ack(&[(1, 10)]).unwrap();
    assert_eq!(s.stats().unwrap().rows, 0);
    drop(s);
    let mut s = Store::open(&p, Caps::default(), crate::clock::Clock::system()).unwrap();
    assert_eq!(s.append(&[rec(Kind::Telemetry, 0)]).unwrap(), 11);
}

#[test]
fn the_row_cap_drops_oldest_telemetry_never_audit_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let caps = Caps {
        max_rows: 100,
        ..Caps::default()
    };
    let mut s = Store::open(
        &dir.path().join("o.db"),
        caps,
        crate::clock::Clock::system(),
    )
    .unwrap();
    let mut batch: Vec<NewRecord> = (0..80).map(|i| rec(Kind::Telemetry, i)).collect();
    batch.push(rec(Kind::Audit, 999));
    s.append(&batch).unwrap();
    s.append(&(0..50).map(|i| rec(Kind::Telemetry, i)).collect::<Vec<_>>())
        .unwrap();
    let all = s.fetch(0, i64::MAX, 1000).unwrap();
    assert!(all.len() <= 101, "{}", all.len());
    assert!(all.iter().any(|r| r.kind == Kind::Audit), "audit survives");
    let ev = all
        .iter()
        .find(|r| r.topic == "events")
        .expect("overflow event");
    let v: serde_json::Value = serde_json::from_slice(&ev.payload).unwrap();
    assert_eq!(v["event"], "outbox_overflow");
    assert_eq!(v["seq_first"], 1);
    let dropped = v["dropped"].as_i64().unwrap();
    assert_eq!(v["seq_last"], dropped);
    // The oldest surviving telemetry follows the dropped range.
    let first_tel = all.iter().find(|r| r.kind == Kind::Telemetry).unwrap();
    assert_eq!(first_tel.seq, dropped + 1);
}

#[test]
fn a_full_disk_is_an_error_and_nothing_committed_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(
        &dir.path().join("o.db"),
        Caps::default(),
        crate::clock::Clock::system(),
    )
    .unwrap();
    s.append(&[rec(Kind::Audit, 1)]).unwrap();
    let pages: i64 = s
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    s.set_max_page_count(pages as u64).unwrap();
    let big: Vec<NewRecord> = (0..5000).map(|i| rec(Kind::Telemetry, i)).collect();
    let e = s.append(&big).unwrap_err();
    assert!(e.to_string().contains("full"), "{e}");
    assert_eq!(
        s.fetch(0, i64::MAX, 10).unwrap().len(),
        1,
        "the audit record is still there"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Kind>),
    /// Ack the k-th..(k+len)-th stored records (as the uplink does after a PUBACK).
    Ack(usize, usize),
    /// A publish that failed: nothing is acked, nothing changes.
    FailedPublish,
    Restart,
    Fetch(usize, usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let kind =
        prop_oneof![4 => Just(Kind::Telemetry), 1 => Just(Kind::Event), 1 => Just(Kind::Audit)];
    prop_oneof![
        4 => proptest::collection::vec(kind, 1..20).prop_map(Op::Append),
        3 => (0usize..40, 1usize..10).prop_map(|(k, n)| Op::Ack(k, n)),
        1 => Just(Op::FailedPublish),
        1 => Just(Op::Restart),
        2 => (0usize..40, 1usize..30).prop_map(|(k, n)| Op::Fetch(k, n)),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// The outbox against a plain in-memory queue: same records, same order, seqs never reused.
    #[test]
    fn outbox_behaves_like_an_ordered_queue(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let mut store = Some(Store::open(&path, Caps::default(), crate::clock::Clock::system()).unwrap());
        let mut model: std::collections::BTreeMap<i64, (Kind, Vec<u8>)> = std::collections::BTreeMap::default();
        let mut next_seq = 1i64;
        for (i, op) in ops.into_iter().enumerate() {
            let s = store.as_mut().unwrap();
            match op {
                Op::Append(kinds) => {
                    let recs: Vec<NewRecord> = kinds.iter().enumerate().map(|(j, k)| rec(*k, i * 100 + j)).collect();
                    let last = s.append(&recs).unwrap();
                    for r in recs {
                        model.insert(next_seq, (r.kind, with_ts(&r).into_owned()));
                        next_seq += 1;
                    }
                    proptest::prop_assert_eq!(last, next_seq - 1);
                }
                Op::Ack(k, n) => {
                    let seqs: Vec<i64> = model.keys().copied().skip(k).take(n).collect();
                    if let (Some(a), Some(z)) = (seqs.first(), seqs.last()) {
                        s.ack(&[(*a, *z)]).unwrap();
                        model.retain(|q, _| q < a || q > z);
                    }
                }
                Op::FailedPublish => {}
                Op::Restart => {
                    // Close before reopening, as a restarted process would.
                    drop(store.take());
                    store = Some(Store::open(&path, Caps::default(), crate::clock::Clock::system()).unwrap());
                }
                Op::Fetch(k, n) => {
                    let after = model.keys().copied().nth(k).map_or(0, |q| q - 1);
                    let got: Vec<(i64, Kind, Vec<u8>)> = s.fetch(after, i64::MAX, n).unwrap().into_iter().map(|r| (r.seq, r.kind, r.payload)).collect();
                    let want: Vec<(i64, Kind, Vec<u8>)> = model.range(after + 1..).take(n).map(|(q, (k, p))| (*q, *k, p.clone())).collect();
                    proptest::prop_assert_eq!(got, want);
                }
            }
            let s = store.as_ref().unwrap();
            let st = s.stats().unwrap();
            proptest::prop_assert_eq!(st.rows, model.len() as u64);
            proptest::prop_assert_eq!(s.rows, model.len() as u64, "in-memory row counter tracks the table");
            proptest::prop_assert_eq!(st.last_seq, next_seq - 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_records_in_memory_and_stores_them_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("o.db"),
        Caps::default(),
        crate::clock::Clock::system(),
    )
    .unwrap();
    let pages: i64 = store
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let h = spawn(store).unwrap();
    h.set_max_page_count(pages as u64).await;
    h.append((0..3000).map(|i| rec(Kind::Telemetry, i)).collect())
        .await
        .unwrap();
    h.append(vec![rec(Kind::Audit, 1)]).await.unwrap();
    h.flush().await;
    let health = h.health.lock().unwrap().clone();
    assert!(
        health.as_deref().is_some_and(|e| e.contains("full")),
        "{health:?}"
    );
    assert_eq!(h.depth().await, 3001, "held in memory, counted as waiting");
    // Space comes back: the next write stores everything that was held.
    h.set_max_page_count(1 << 30).await;
    h.append(vec![rec(Kind::Telemetry, 9)]).await.unwrap();
    h.flush().await;
    let deadline = crate::clock::Clock::system().instant() + Duration::from_secs(10);
    while h.health.lock().unwrap().is_some() {
        assert!(
            crate::clock::Clock::system().instant() < deadline,
            "store never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = h.stats().await;
    assert_eq!((s.rows, s.by_kind[Kind::Audit as usize]), (3002, 1));
    let all = h.fetch(0, i64::MAX, 10_000).await.unwrap();
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[test]
fn a_month_of_counter_history_pages_out_in_order_without_gaps_or_repeats() {
    // 30 days of 15-minute samples of a 1.2 kW room: 2,880 samples, three pages of 1,000.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut s = Store::open(&path, Caps::default(), crate::clock::Clock::system()).unwrap();
    let t0 = 1_790_000_000_000i64;
    let samples: Vec<Sample> = (0..2880)
        .map(|k| Sample {
            device: "room-101".into(),
            quantity: "energy_kwh".into(),
            ts_ms: t0 + k * 900_000,
            value: 1034.25 + (k as f64 * 0.3 * 100.0).floor() / 100.0,
        })
        .collect();
    s.record_history(&samples).unwrap();
    let conn = open_read_only(&path).unwrap();
    let window = (t0 + 900_000, t0 + 2879 * 900_000);
    let mut got = Vec::new();
    let mut after = i64::MIN;
    for _ in 0..10 {
        let page = history_page(&conn, "room-101", "energy_kwh", window, after, 1000).unwrap();
        let Some(last) = page.last() else { break };
        after = last.0;
        got.extend(page);
    }
    assert_eq!(
        got.len(),
        2879,
        "everything in the window, the first sample outside it"
    );
    assert!(got.windows(2).all(|w| w[1].0 - w[0].0 == 900_000));
    assert_eq!(got[0].0, window.0);
    assert_eq!(got.last().unwrap().0, window.1);
    // Another counter's samples stay out.
    assert!(
        history_page(&conn, "room-102", "energy_kwh", window, i64::MIN, 1000)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_write_rate_is_the_last_full_hour_or_the_current_one_extrapolated() {
    let h = |hour: i64, min: i64| hour * 3_600_000 + min * 60_000;
    // 10:00-10:59: 74,855 bytes a day per device × 5 devices ≈ 15,600 bytes an hour.
    let mut r = AppendRate::default();
    for m in 0..60 {
        r = r.add(h(490_000, m), 260);
    }
    assert_eq!(r.per_hour(h(490_000, 2)), None, "too early in the hour");
    assert_eq!(r.per_hour(h(490_000, 59)), Some(15_600 * 60 / 59));
    r = r.add(h(490_001, 0), 260);
    assert_eq!(
        r.per_hour(h(490_001, 1)),
        Some(15_600),
        "the last full hour"
    );
    // A gateway that wrote nothing for hours starts again.
    let r = r.add(h(490_010, 30), 1000);
    assert_eq!(r.per_hour(h(490_010, 30)), Some(2000));
    // A clock stepped back does not count into a future hour.
    let back = r.add(h(489_000, 0), 5);
    assert_eq!(back.per_hour(h(489_000, 10)), Some(30));
}

#[test]
fn a_commit_of_many_records_keeps_their_order_across_insert_chunks_and_an_oversized_one() {
    // 41 records in one commit (two full chunks of 16 and the rest one by one), an oversized one
    // at position 20 breaking the second chunk: every record in its place, seqs consecutive, the
    // oversized one replaced in line by its event.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(
        &dir.path().join("outbox.db"),
        Caps::default(),
        crate::clock::Clock::system(),
    )
    .unwrap();
    let mut records: Vec<NewRecord> = (0..41).map(|n| rec(Kind::Telemetry, n)).collect();
    records[20].payload = vec![b'x'; MAX_RECORD_BYTES + 1];
    let last = s.append(&records).unwrap();
    assert_eq!(last, 41);
    let got = s.fetch(0, last, 100).unwrap();
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=41).collect::<Vec<_>>()
    );
    for (n, r) in got.iter().enumerate() {
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        if n == 20 {
            assert_eq!(v["event"], "record_too_large", "{v}");
            assert_eq!(r.kind, Kind::Event);
        } else {
            assert_eq!(v["n"], n, "record {n}");
            assert_eq!(r.kind, Kind::Telemetry);
        }
    }
    assert_eq!(s.stats().unwrap().oversized, 1);
}

/// The age cap through the store thread, on a paused clock that boots in 1970 (a gateway without
/// RTC) and is set by NTP two minutes later: a week on, exactly the readings stamped at real times
/// more than `max_age` ago are dropped, never the ones stamped before the clock was set, and the
/// event says how many.
#[tokio::test(start_paused = true)]
async fn the_age_cap_on_a_clock_wrong_at_boot_drops_only_real_stamps_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let boot = DateTime::parse_from_rfc3339("1970-01-01T00:00:05Z")
        .unwrap()
        .with_timezone(&Utc);
    let sim = crate::clock::SimClock::starting_at(boot);
    let caps = Caps {
        max_age: Duration::from_secs(7 * 86_400),
        ..Caps::default()
    };
    let store =
        spawn(Store::open(&dir.path().join("outbox.db"), caps, sim.clock()).unwrap()).unwrap();
    let poll = |n: usize| NewRecord {
        kind: Kind::Telemetry,
        topic: "telemetry".into(),
        ts: sim.now(),
        payload: format!("{{\"n\":{n}}}").into_bytes(),
    };
    // A poll every 10 s: 12 before NTP (1970), 12 after it, then one an hour for 8 days.
    let mut n = 0;
    for _ in 0..12 {
        store.append(vec![poll(n)]).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let synced = crate::clock::Clock::system().now();
    sim.set(synced);
    for _ in 0..12 {
        store.append(vec![poll(n)]).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    for _ in 0..8 * 24 {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        store.append(vec![poll(n)]).await.unwrap();
        n += 1;
    }
    store.flush().await;
    let rows = store.fetch(0, i64::MAX, 10_000).await.unwrap();
    let kept: Vec<usize> = rows
        .iter()
        .filter(|r| r.kind == Kind::Telemetry)
        .map(|r| {
            serde_json::from_slice::<Value>(&r.payload).unwrap()["n"]
                .as_u64()
                .unwrap() as usize
        })
        .collect();
    let limit = sim.now() - chrono::Duration::days(7);
    // 0..12 are stamped 1970, 12..24 at NTP + 0..110 s, then one an hour.
    let stamp = |i: usize| match i {
        0..12 => None,
        12..24 => Some(synced + chrono::Duration::seconds(10 * (i as i64 - 12))),
        _ => Some(synced + chrono::Duration::seconds(120 + 3600 * (i as i64 - 23))),
    };
    // Every append runs the cap (they are more than a minute apart), the last one at the time
    // read here: what is left is exactly what is stamped before the clock was set or within 7 days.
    let expected: Vec<usize> = (0..n)
        .filter(|&i| stamp(i).is_none_or(|t| t >= limit))
        .collect();
    assert_eq!(kept, expected);
    assert!(
        kept.starts_with(&(0..12).collect::<Vec<_>>()),
        "1970 stamps kept"
    );
    assert!(!kept.contains(&12), "real stamps past the limit dropped");
    let dropped: u64 = rows
        .iter()
        .filter(|r| r.kind == Kind::Event)
        .map(|r| serde_json::from_slice::<Value>(&r.payload).unwrap())
        .filter(|e| e["reason"] == "max_age")
        .map(|e| e["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(
        dropped as usize,
        n - kept.len(),
        "every drop is in an event"
    );
}
