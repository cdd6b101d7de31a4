//! Time on a gateway: the one clock every task reads, whether the wall clock can be believed, and
//! sleeping to sub-millisecond precision.
//!
//! **The clock is an input.** Nothing outside this module reads the system's time: every task and
//! function that needs the time takes a [`Clock`] (or a `now` argument), so a test can start at
//! 23:59:50 on the last day of a month, or go through a 48 h grace period, in simulated time
//! ([`SimClock`]). CI enforces it: `clippy.toml` disallows `Utc::now`, `Local::now`,
//! `SystemTime::now` and `Instant::now` (std and tokio) everywhere but here.
//!
//! A gateway without a battery-backed RTC boots in 1970 (or the RTC's default year) and jumps to
//! the real time when NTP syncs. [`ClockWatch`] tells readings taken before that apart (they are
//! marked, and kept out of billing history and the age cap) and reports each jump.
//!
//! tokio's timer wheel has 1 ms granularity and rounds up, which on an RS485 line at 9600 baud adds up
//! to ~25 % to a 4 ms t3.5 gap. The bus task (and the simulator's line emulation) sleep on the timer
//! for the bulk and finish the last stretch on a blocking thread, whose `nanosleep` is accurate to tens
//! of microseconds.
#![allow(clippy::disallowed_methods)] // the one module that reads the system's clocks

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use tokio::time::Instant;

/// Wall time and monotonic time together: the system's in production, a [`SimClock`]'s in tests.
///
/// Cheap to clone; every task holds one. The monotonic side is tokio's clock, so timers, timeouts
/// and [`Clock::instant`] agree, and a test on a paused runtime (`start_paused`, `advance`) moves
/// both the wall time and every timer of the daemon at once.
#[derive(Clone, Default)]
pub struct Clock {
    sim: Option<Arc<Sim>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sim {
            None => f.write_str("Clock::system"),
            Some(_) => write!(f, "Clock::simulated({})", self.now()),
        }
    }
}

impl Clock {
    /// The system's clocks: what `meterd run` uses.
    #[must_use]
    pub fn system() -> Clock {
        Clock { sim: None }
    }

    /// The wall time, UTC.
    #[must_use]
    pub fn now(&self) -> DateTime<Utc> {
        match &self.sim {
            None => Utc::now(),
            Some(s) => s.now(),
        }
    }

    /// The wall time as Unix milliseconds.
    #[must_use]
    pub fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }

    /// The monotonic time (tokio's clock): for deadlines, intervals and elapsed times. Never a wall
    /// time: it does not move when the wall clock is stepped.
    #[must_use]
    pub fn instant(&self) -> Instant {
        match &self.sim {
            None => Instant::now(),
            Some(s) => s.instant(),
        }
    }

    /// How long since `earlier` on the monotonic clock (zero if `earlier` is later).
    #[must_use]
    pub fn since(&self, earlier: Instant) -> Duration {
        self.instant().saturating_duration_since(earlier)
    }

    /// Sleeps until the wall clock reads `t` or at most `cap`, whichever is sooner (callers that wait
    /// for a wall time re-read the clock after each nap, so a clock stepped meanwhile moves their
    /// target with it).
    pub async fn nap_until(&self, t: DateTime<Utc>, cap: Duration) {
        let wait = (t - self.now()).to_std().unwrap_or(Duration::ZERO).min(cap);
        tokio::time::sleep(wait).await;
    }
}

/// A controlled clock for tests: starts at a chosen wall time and runs with tokio's clock of the
/// runtime it was made on (real time, or paused time under `start_paused` / `advance`), and can be
/// stepped as NTP or an operator steps a real one.
#[derive(Clone)]
pub struct SimClock(Arc<Sim>);

struct Sim {
    start_ms: i64,
    origin: Instant,
    /// The runtime whose (possibly paused) clock this follows, so threads outside it (the store
    /// thread) read the same time.
    runtime: Option<tokio::runtime::Handle>,
    /// Sum of the steps of the wall clock, ms.
    stepped_ms: AtomicI64,
}

impl Sim {
    fn instant(&self) -> Instant {
        let _in = self.runtime.as_ref().map(tokio::runtime::Handle::enter);
        Instant::now()
    }

    fn now(&self) -> DateTime<Utc> {
        let run = self
            .instant()
            .saturating_duration_since(self.origin)
            .as_millis() as i64;
        let ms = self.start_ms + run + self.stepped_ms.load(Ordering::Relaxed);
        DateTime::from_timestamp_millis(ms).unwrap_or_default()
    }
}

impl SimClock {
    /// A clock that reads `wall` now and runs on from there with the current runtime's clock.
    #[must_use]
    pub fn starting_at(wall: DateTime<Utc>) -> SimClock {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let origin = {
            let _in = runtime.as_ref().map(tokio::runtime::Handle::enter);
            Instant::now()
        };
        SimClock(Arc::new(Sim {
            start_ms: wall.timestamp_millis(),
            origin,
            runtime,
            stepped_ms: AtomicI64::new(0),
        }))
    }

    /// The clock to hand to the daemon and its tasks.
    #[must_use]
    pub fn clock(&self) -> Clock {
        Clock {
            sim: Some(self.0.clone()),
        }
    }

    /// The wall time now.
    #[must_use]
    pub fn now(&self) -> DateTime<Utc> {
        self.0.now()
    }

    /// Steps the wall clock by `by` (negative: back); the monotonic clock does not move.
    pub fn step(&self, by: TimeDelta) {
        self.0
            .stepped_ms
            .fetch_add(by.num_milliseconds(), Ordering::Relaxed);
    }

    /// Sets the wall clock to `wall` (a step of whatever it takes).
    pub fn set(&self, wall: DateTime<Utc>) {
        self.step(wall - self.now());
    }
}

/// Real elapsed time for pacing that follows hardware, not the site's clock: the store thread's
/// group-commit linger and a benchmark's measurement window. Never used for a time-driven rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pace(std::time::Instant);

impl Pace {
    /// Now, on the real monotonic clock.
    pub(crate) fn now() -> Pace {
        Pace(std::time::Instant::now())
    }

    /// `d` later.
    #[must_use]
    pub(crate) fn after(self, d: Duration) -> Pace {
        Pace(self.0 + d)
    }

    /// Time since this instant.
    pub(crate) fn elapsed(self) -> Duration {
        self.0.elapsed()
    }

    /// Time left until this instant (None once past).
    pub(crate) fn remaining(self) -> Option<Duration> {
        self.0.checked_duration_since(std::time::Instant::now())
    }
}

/// Earliest wall-clock time meterd believes: 2026-01-01T00:00:00Z, before this release was built.
/// A clock earlier than this has not been set since boot.
pub(crate) const PLAUSIBLE_FROM_MS: i64 = 1_767_225_600_000;

/// Latest wall-clock time meterd believes: 2056-01-01T00:00:00Z (an RTC set to garbage, far ahead).
pub(crate) const PLAUSIBLE_UNTIL_MS: i64 = 2_713_910_400_000;

/// True when `t` can be the real time.
pub(crate) fn plausible(t: DateTime<Utc>) -> bool {
    (PLAUSIBLE_FROM_MS..PLAUSIBLE_UNTIL_MS).contains(&t.timestamp_millis())
}

/// A step of the wall clock against the monotonic one: NTP setting a clock that booted wrong, or an
/// operator changing it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ClockJump {
    /// The wall clock just before the step (as it would read now without the step).
    pub from: DateTime<Utc>,
    /// The wall clock after it.
    pub to: DateTime<Utc>,
    /// `to - from`, seconds (negative: set back).
    pub by_s: f64,
    /// Whether the clock is plausible after the step.
    pub plausible: bool,
}

/// What one look at the clocks says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Observation {
    pub plausible: bool,
    pub jump: Option<ClockJump>,
}

/// Follows the wall clock against the monotonic clock (pure: both are passed in).
#[derive(Debug, Default)]
pub(crate) struct ClockWatch {
    /// wall − monotonic at the last observation, ms.
    offset_ms: Option<i64>,
}

/// A change of wall − monotonic below this is drift or NTP slewing, not a step.
const JUMP_MS: i64 = 5_000;

impl ClockWatch {
    /// Looks at the clocks: `wall` now, and `mono_ms` a monotonic time in ms (any origin).
    pub(crate) fn observe(&mut self, wall: DateTime<Utc>, mono_ms: i64) -> Observation {
        let offset = wall.timestamp_millis() - mono_ms;
        let jump = match self.offset_ms {
            Some(prev) if (offset - prev).abs() >= JUMP_MS => Some(ClockJump {
                from: DateTime::from_timestamp_millis(prev + mono_ms).unwrap_or(wall),
                to: wall,
                by_s: (offset - prev) as f64 / 1000.0,
                plausible: plausible(wall),
            }),
            _ => None,
        };
        self.offset_ms = Some(offset);
        Observation {
            plausible: plausible(wall),
            jump,
        }
    }
}

/// Below this, the remainder is slept on a blocking thread instead of the timer wheel.
const FINE: Duration = Duration::from_micros(1500);

/// Sleeps until `deadline` with sub-millisecond accuracy.
pub(crate) async fn sleep_until_precise(deadline: Instant) {
    let now = Instant::now();
    if deadline <= now {
        return;
    }
    if deadline - now > FINE {
        tokio::time::sleep_until(deadline - FINE).await;
    }
    let rest = deadline.saturating_duration_since(Instant::now());
    if rest.is_zero() {
        return;
    }
    // On every runtime flavour: `meterd run` is single-threaded (main.rs) and its RS485 gaps need the
    // precision as much as the simulator's. (No test reaches this on a paused clock.)
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_plausible_range_is_the_release_year_to_thirty_years_on() {
        assert_eq!(
            DateTime::from_timestamp_millis(PLAUSIBLE_FROM_MS).unwrap(),
            t("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            DateTime::from_timestamp_millis(PLAUSIBLE_UNTIL_MS).unwrap(),
            t("2056-01-01T00:00:00Z")
        );
        assert!(!plausible(t("1970-01-01T00:00:12Z")));
        assert!(!plausible(t("2000-01-01T00:05:00Z")));
        assert!(plausible(t("2026-11-30T00:05:00Z")));
        assert!(!plausible(t("2099-03-01T00:00:00Z")));
    }

    #[test]
    fn a_gateway_booting_in_1970_sees_the_ntp_step_as_one_jump() {
        let mut w = ClockWatch::default();
        // Boot: 1970 + uptime, monotonic in ms since boot.
        let boot = t("1970-01-01T00:00:00Z");
        for s in 0..30 {
            let o = w.observe(boot + chrono::Duration::seconds(s), s * 1000);
            assert_eq!(
                o,
                Observation {
                    plausible: false,
                    jump: None
                }
            );
        }
        // NTP syncs at 30 s of uptime: 2026-11-30 00:05:30 +08:00.
        let synced = t("2026-11-29T16:05:30Z");
        let o = w.observe(synced, 30_000);
        let j = o.jump.expect("a jump");
        assert!(o.plausible && j.plausible);
        assert_eq!(j.from, t("1970-01-01T00:00:30Z"));
        assert_eq!(j.to, synced);
        assert!(j.by_s > 1.7e9);
        // Afterwards, seconds tick with the monotonic clock: no more jumps, small slews ignored.
        let o = w.observe(synced + chrono::Duration::milliseconds(10_200), 40_000);
        assert_eq!(
            o,
            Observation {
                plausible: true,
                jump: None
            }
        );
        // An operator sets it back an hour.
        let o = w.observe(synced + chrono::Duration::seconds(20 - 3600), 50_000);
        assert!((o.jump.unwrap().by_s + 3600.0).abs() < 1.0);
    }
}
