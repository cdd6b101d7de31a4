//! Sleeping to sub-millisecond precision.
//!
//! tokio's timer wheel has 1 ms granularity and rounds up, which on an RS485 line at 9600 baud adds up
//! to ~25 % to a 4 ms t3.5 gap. The bus task (and the simulator's line emulation) sleep on the timer
//! for the bulk and finish the last stretch on a blocking thread, whose `nanosleep` is accurate to tens
//! of microseconds.

use std::time::Duration;

use tokio::time::Instant;

/// Below this, the remainder is slept on a blocking thread instead of the timer wheel.
const FINE: Duration = Duration::from_micros(1500);

/// Sleeps until `deadline` with sub-millisecond accuracy.
pub async fn sleep_until_precise(deadline: Instant) {
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
    // A current-thread runtime (tests, often on a paused clock) cannot spare a blocking thread's real
    // sleep; the daemon and the simulator run on the multi-thread runtime.
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
    {
        tokio::time::sleep(rest).await;
        return;
    }
    let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
}
