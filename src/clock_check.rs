//! Calls of the system's clocks planted outside `clock`, compiled only for CI's proof that the rule
//! "the clock is an input" is enforced: `.ci/run` runs `cargo clippy --lib -- --cfg
//! meterd_planted_clock_calls` and requires clippy to refuse every call below ([`PLANTED`] of
//! them). Never part of a build.
#![allow(dead_code, unused_imports)]

use chrono::Utc as Wall;

/// How many disallowed calls this file plants (`.ci/run` counts clippy's refusals against it).
pub(crate) const PLANTED: usize = 9;

fn planted(given: Option<chrono::DateTime<chrono::Utc>>) {
    let _ = chrono::Utc::now(); // the full path
    let _ = Wall::now(); // under another name
    let _ = chrono::Local::now(); // local time
    let _ = std::time::SystemTime::now();
    let _ = std::time::Instant::now(); // a monotonic instant taken as "now"
    let _ = tokio::time::Instant::now();
    let _ = given.unwrap_or_else(chrono::Utc::now); // passed as a function
    let since = tokio::time::Instant::from_std(std::time::Instant::now());
    let _ = since.elapsed(); // now() hidden inside elapsed()
}
