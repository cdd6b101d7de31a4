//! Poll scheduling as a pure state machine: the bus task asks what is due, does the I/O and reports
//! the outcome; the scheduler answers when to poll next.
//!
//! Deadlines are computed from a fixed anchor (`anchor + k × interval`), never from "now", so a 10 s
//! device's 10,000th poll is due at exactly 100,000 s. A device that falls behind skips the deadlines it
//! missed (and counts them) instead of bunching catch-up polls into a burst on the bus.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// How one device is polled, retried and given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPolicy {
    pub interval: Duration,
    /// Extra attempts of a failed poll, each after a backoff, before the poll is given up.
    pub retries: u32,
    /// First retry waits this long, each further one twice as long (capped at the interval).
    pub backoff: Duration,
    /// Consecutive failed attempts after which the device is declared offline.
    pub offline_after: u32,
    /// While offline, one attempt (no retries) per this period, so a dead meter costs its bus at most
    /// one timeout per probe.
    pub probe_interval: Duration,
    /// After a failed attempt the device is not asked again for at least this long. On an RS485 line
    /// this is its timeout: an answer later than the timeout may still arrive, and the next request
    /// to the same unit must not take it for its own (see `frame::Resync`); the neighbours use the
    /// time instead. Zero on Modbus TCP.
    pub settle: Duration,
}

/// What a finished attempt means for the device, for the bus task to act on (emit readings, log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Success; the device is online.
    Polled,
    /// Success after being offline.
    BackOnline,
    /// Failed; another attempt is scheduled shortly.
    Retrying,
    /// Failed and out of retries; the device stays online and is polled at its next deadline.
    Failed,
    /// Failed attempts reached the threshold: the device is now offline and only probed.
    WentOffline,
    /// A probe of an offline device failed.
    StillOffline,
}

#[derive(Debug, Clone)]
struct DeviceState {
    policy: PollPolicy,
    anchor: Duration,
    /// Index of the next regular deadline.
    k: u64,
    attempt: u32,
    consecutive_failures: u32,
    offline: bool,
    in_flight: bool,
    missed: u64,
    /// When its queued attempt is due; older queue entries are stale.
    due: Duration,
    /// The attempt in flight is an extra one (a billing boundary read), off the deadline grid.
    extra: bool,
}

impl DeviceState {
    fn deadline(&self, k: u64) -> Duration {
        self.anchor + mul(self.policy.interval, k)
    }

    /// First regular deadline strictly after `now`, and no earlier than `k`.
    fn next_k_after(&self, now: Duration) -> u64 {
        let first_after = if now < self.anchor {
            0
        } else {
            let since = now.checked_sub(self.anchor).unwrap().as_nanos();
            let iv = self.policy.interval.as_nanos().max(1);
            (since / iv) as u64 + 1
        };
        first_after.max(self.k)
    }
}

fn mul(d: Duration, k: u64) -> Duration {
    Duration::from_nanos((d.as_nanos() * u128::from(k)).min(u128::from(u64::MAX)) as u64)
}

/// Deadline scheduler for the devices of one bus. Times are offsets from the bus task's start.
#[derive(Debug, Clone)]
pub struct Scheduler {
    devices: Vec<DeviceState>,
    queue: BinaryHeap<Reverse<(Duration, usize)>>,
}

impl Scheduler {
    /// Devices are staggered across their interval (device i of n starts at i/n of it), so a bus of
    /// identical meters polls evenly instead of all at t = 0.
    #[must_use]
    pub fn new(policies: &[PollPolicy]) -> Scheduler {
        let n = policies.len().max(1) as u32;
        let devices: Vec<DeviceState> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| DeviceState {
                policy: *p,
                anchor: p.interval * (i as u32) / n,
                k: 0,
                attempt: 0,
                consecutive_failures: 0,
                offline: false,
                in_flight: false,
                missed: 0,
                due: p.interval * (i as u32) / n,
                extra: false,
            })
            .collect();
        let queue = devices
            .iter()
            .enumerate()
            .map(|(i, d)| Reverse((d.anchor, i)))
            .collect();
        Scheduler { devices, queue }
    }

    /// When the earliest waiting device is due, if any is waiting.
    pub fn next_due(&mut self) -> Option<Duration> {
        self.prune();
        self.queue.peek().map(|Reverse((t, _))| *t)
    }

    /// Drops queue entries that an extra poll made stale.
    fn prune(&mut self) {
        while let Some(Reverse((t, i))) = self.queue.peek() {
            let d = &self.devices[*i];
            if d.in_flight || d.due != *t {
                self.queue.pop();
            } else {
                break;
            }
        }
    }

    /// Polls `device` as soon as a poller is free (a billing boundary) without moving its deadline
    /// grid: the regular deadline it was waiting for stays where it was. A device in flight already
    /// reads now; an offline one keeps its probe schedule.
    pub fn poll_now(&mut self, device: usize, now: Duration) {
        let d = &mut self.devices[device];
        if d.in_flight || d.offline || d.attempt > 0 || d.due <= now {
            return;
        }
        d.extra = true;
        d.due = now;
        self.queue.push(Reverse((now, device)));
    }

    /// Takes a device that is due at `now`, marking it in flight until [`Scheduler::complete`].
    pub fn pop_due(&mut self, now: Duration) -> Option<usize> {
        self.prune();
        match self.queue.peek() {
            Some(Reverse((t, _))) if *t <= now => {
                let Reverse((_, i)) = self.queue.pop()?;
                self.devices[i].in_flight = true;
                Some(i)
            }
            _ => None,
        }
    }

    /// Records the outcome of an attempt on `device` finished at `now` and queues its next attempt.
    pub fn complete(&mut self, device: usize, ok: bool, now: Duration) -> Verdict {
        let d = &mut self.devices[device];
        d.in_flight = false;
        let extra = std::mem::take(&mut d.extra);
        let regular = d.deadline(d.k);
        let (verdict, due) = if ok && extra && regular > now && !d.offline {
            // The extra read served no deadline: the one it was waiting for still stands.
            d.consecutive_failures = 0;
            (Verdict::Polled, regular)
        } else if ok {
            let verdict = if d.offline {
                Verdict::BackOnline
            } else {
                Verdict::Polled
            };
            d.offline = false;
            d.consecutive_failures = 0;
            d.attempt = 0;
            (verdict, self::next_regular(d, now))
        } else {
            d.consecutive_failures += 1;
            if d.offline {
                (Verdict::StillOffline, now + d.policy.probe_interval)
            } else if d.consecutive_failures >= d.policy.offline_after {
                d.offline = true;
                d.attempt = 0;
                (Verdict::WentOffline, now + d.policy.probe_interval)
            } else if d.attempt < d.policy.retries {
                d.attempt += 1;
                let backoff =
                    (d.policy.backoff * 2u32.saturating_pow(d.attempt - 1)).min(d.policy.interval);
                let retry_at = now + backoff;
                if retry_at < d.deadline(d.next_k_after(now)) {
                    (Verdict::Retrying, retry_at)
                } else {
                    d.attempt = 0;
                    (Verdict::Failed, self::next_regular(d, now))
                }
            } else {
                d.attempt = 0;
                (Verdict::Failed, self::next_regular(d, now))
            }
        };
        let due = if ok {
            due
        } else {
            due.max(now + d.policy.settle)
        };
        d.due = due;
        self.queue.push(Reverse((due, device)));
        verdict
    }

    /// Regular deadlines skipped because the device (or the bus) was late.
    #[must_use]
    pub fn missed(&self, device: usize) -> u64 {
        self.devices[device].missed
    }

    /// Whether the device is currently declared offline.
    #[cfg(test)]
    pub(crate) fn is_offline(&self, device: usize) -> bool {
        self.devices[device].offline
    }

    /// Number of devices.
    #[must_use]
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// True when the bus has no devices.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

/// Moves `d` past the deadline it just served and any it missed; returns the new due time.
fn next_regular(d: &mut DeviceState, now: Duration) -> Duration {
    let served = d.k;
    let next = d.next_k_after(now).max(served + 1);
    d.missed += next - served - 1;
    d.k = next;
    d.deadline(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy(interval: Duration) -> PollPolicy {
        PollPolicy {
            interval,
            retries: 1,
            backoff: Duration::from_millis(200),
            offline_after: 3,
            probe_interval: Duration::from_secs(60),
            settle: Duration::ZERO,
        }
    }

    #[test]
    fn a_failed_meter_on_a_serial_line_is_not_asked_again_before_its_late_answer_window() {
        let ms = Duration::from_millis;
        let mut p = policy(S);
        p.settle = ms(400);
        let mut s = Scheduler::new(&[p]);
        assert_eq!(s.pop_due(ms(0)), Some(0));
        // Timed out at 400 ms: the retry (backoff 200 ms) waits for the window to pass instead.
        assert_eq!(s.complete(0, false, ms(400)), Verdict::Retrying);
        assert_eq!(s.pop_due(ms(799)), None);
        assert_eq!(s.pop_due(ms(800)), Some(0));
        // A success is not held back.
        assert_eq!(s.complete(0, true, ms(900)), Verdict::Polled);
        assert_eq!(s.next_due(), Some(ms(1000)));
    }

    /// Runs the scheduler with polls that take `cost` each and succeed per `ok`.
    fn drive(
        s: &mut Scheduler,
        until: Duration,
        cost: Duration,
        ok: impl FnMut(usize, Duration) -> bool,
    ) -> Vec<(usize, Duration)> {
        drive_from(s, Duration::ZERO, until, cost, ok)
    }

    /// [`drive`] from `now`.
    fn drive_from(
        s: &mut Scheduler,
        mut now: Duration,
        until: Duration,
        cost: Duration,
        mut ok: impl FnMut(usize, Duration) -> bool,
    ) -> Vec<(usize, Duration)> {
        let mut log = Vec::new();
        while let Some(due) = s.next_due() {
            if due > until {
                break;
            }
            now = now.max(due);
            let dev = s.pop_due(now).unwrap();
            log.push((dev, now));
            now += cost;
            let result = ok(dev, now);
            s.complete(dev, result, now);
        }
        log
    }

    #[test]
    fn a_boundary_read_polls_at_once_and_leaves_the_deadline_grid_where_it_was() {
        // A water meter every 15 min (anchor 0) and an energy meter every 10 s; a billing boundary
        // at 7 min 30.2 s: both are read then, and both keep their grids (next water poll at 15 min).
        let mut s = Scheduler::new(&[policy(900 * S), policy(10 * S)]);
        let b = Duration::from_millis(450_200);
        let mut log = drive(
            &mut s,
            b.checked_sub(Duration::from_millis(1)).unwrap(),
            Duration::from_millis(40),
            |_, _| true,
        );
        s.poll_now(0, b);
        s.poll_now(1, b);
        log.extend(drive_from(
            &mut s,
            b,
            1000 * S,
            Duration::from_millis(40),
            |_, _| true,
        ));
        let water: Vec<Duration> = log
            .iter()
            .filter(|(d, _)| *d == 0)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(water, vec![Duration::ZERO, b, 900 * S]);
        let energy: Vec<Duration> = log
            .iter()
            .filter(|(d, _)| *d == 1)
            .map(|(_, t)| *t)
            .collect();
        assert!(
            energy.contains(&(b + Duration::from_millis(40))),
            "read right after the water meter"
        );
        assert!(
            energy.contains(&(450 * S + 5 * S)) && energy.contains(&(460 * S + 5 * S)),
            "grid kept"
        );
        assert_eq!((s.missed(0), s.missed(1)), (0, 0));
        // Nothing is read twice at the boundary: one extra read each.
        assert_eq!(log.iter().filter(|(_, t)| *t >= b && *t < b + S).count(), 2);
    }

    #[test]
    fn ten_thousandth_poll_of_a_10s_device_is_due_at_100000s() {
        let mut s = Scheduler::new(&[policy(10 * S)]);
        let log = drive(&mut s, 100_000 * S, Duration::from_millis(37), |_, _| true);
        assert_eq!(log.len(), 10_001);
        assert_eq!(log[10_000].1, 100_000 * S);
        assert_eq!(s.missed(0), 0);
    }

    #[test]
    fn a_late_device_skips_missed_deadlines_instead_of_bursting() {
        let mut s = Scheduler::new(&[policy(S)]);
        // Each poll takes 3.5 s: deadlines at 1, 2, 3 s are missed, the next starts at 4 s, not at once.
        let log = drive(&mut s, 20 * S, Duration::from_millis(3500), |_, _| true);
        for w in log.windows(2) {
            assert!(
                w[1].1.checked_sub(w[0].1).unwrap() >= Duration::from_millis(3500),
                "bunched: {w:?}"
            );
            assert_eq!(w[1].1.subsec_nanos(), 0, "still on the 1 s grid");
        }
        assert!(s.missed(0) >= 3 * (log.len() as u64 - 1));
    }

    #[test]
    fn devices_are_staggered_across_the_interval() {
        let p = policy(10 * S);
        let s = Scheduler::new(&[p, p, p, p]);
        let mut firsts: Vec<Duration> = s.queue.iter().map(|Reverse((t, _))| *t).collect();
        firsts.sort();
        assert_eq!(
            firsts,
            vec![
                Duration::ZERO,
                2500 * Duration::from_millis(1),
                5 * S,
                7500 * Duration::from_millis(1)
            ]
        );
    }

    #[test]
    fn failures_retry_then_go_offline_then_probe_slowly_then_recover() {
        let mut s = Scheduler::new(&[policy(10 * S)]);
        let t0 = Duration::ZERO;
        assert_eq!(s.pop_due(t0), Some(0));
        assert_eq!(s.complete(0, false, S), Verdict::Retrying);
        assert_eq!(s.next_due(), Some(S + Duration::from_millis(200)));
        let t = s.next_due().unwrap();
        s.pop_due(t);
        assert_eq!(s.complete(0, false, t + S), Verdict::Failed);
        assert_eq!(s.next_due(), Some(10 * S));
        s.pop_due(10 * S);
        assert_eq!(s.complete(0, false, 11 * S), Verdict::WentOffline);
        assert!(s.is_offline(0));
        assert_eq!(s.next_due(), Some(71 * S));
        s.pop_due(71 * S);
        assert_eq!(s.complete(0, false, 72 * S), Verdict::StillOffline);
        assert_eq!(s.next_due(), Some(132 * S));
        s.pop_due(132 * S);
        assert_eq!(
            s.complete(0, true, 132 * S + Duration::from_millis(20)),
            Verdict::BackOnline
        );
        // Back on the original grid.
        assert_eq!(s.next_due(), Some(140 * S));
    }

    #[test]
    fn an_in_flight_device_is_not_handed_out_twice() {
        let mut s = Scheduler::new(&[policy(S)]);
        assert_eq!(s.pop_due(Duration::ZERO), Some(0));
        assert_eq!(s.pop_due(10 * S), None);
    }
}
