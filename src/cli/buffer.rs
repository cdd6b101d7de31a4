//! `meterd buffer`: the outbox, read without disturbing the daemon.

use super::{json, out, table, Args, ConfigArg, Result};

/// `meterd buffer`
#[derive(Debug, Args)]
pub struct BufferCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long)]
    pub json: bool,
}

impl BufferCmd {
    /// Reads the outbox the daemon writes (read-only; safe while it runs).
    pub fn execute(self, clock: &crate::clock::Clock) -> Result<()> {
        let c = self.config.load()?;
        let s = crate::store::read_stats(&c.store.path, clock.now_ms())?;
        if self.json {
            out(&json(&s)?);
            return Ok(());
        }
        let age = s.oldest_ts.map_or_else(
            || "-".into(),
            |t| {
                let secs = (clock.now() - t).num_seconds().max(0);
                format!(
                    "{} ({}h{:02}m{:02}s ago)",
                    t.to_rfc3339(),
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60
                )
            },
        );
        let rows = vec![
            vec!["outbox".into(), c.store.path.display().to_string()],
            vec!["records waiting".into(), s.rows.to_string()],
            vec![
                "  telemetry / events / results / audit / replies".into(),
                format!(
                    "{} / {} / {} / {} / {}",
                    s.by_kind[0], s.by_kind[1], s.by_kind[2], s.by_kind[3], s.by_kind[4]
                ),
            ],
            vec![
                "set aside (too large to publish)".into(),
                s.oversized.to_string(),
            ],
            vec!["payload bytes".into(), s.payload_bytes.to_string()],
            vec!["oldest record".into(), age],
            vec!["last seq assigned".into(), s.last_seq.to_string()],
            vec![
                "dropped by the cap (total)".into(),
                s.dropped_total.to_string(),
            ],
            vec![
                "last publish ok".into(),
                s.last_publish_ok.clone().unwrap_or_else(|| "-".into()),
            ],
            vec![
                "last publish error".into(),
                s.last_publish_error
                    .clone()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ],
            vec![
                "store error".into(),
                s.store_error
                    .clone()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "-".into()),
            ],
            vec![
                "written per hour".into(),
                s.bytes_per_hour.map_or_else(
                    || "- (no figure yet: less than 5 minutes of writing)".into(),
                    |b| format!("{b} bytes"),
                ),
            ],
            vec![
                "an outage the cap holds".into(),
                outage_held(&c.store.caps, &s),
            ],
        ];
        out(&table(&["", ""], &rows));
        Ok(())
    }
}

/// How long an outage can last before the cap drops telemetry, at the current write rate: the
/// room left under `max_bytes`, and `max_age`, whichever comes first.
fn outage_held(caps: &crate::store::Caps, s: &crate::store::Stats) -> String {
    let age_h = caps.max_age.as_secs_f64() / 3600.0;
    match s.bytes_per_hour.filter(|b| *b > 0) {
        None => format!("up to {age_h:.0} h (max_age); no write rate measured yet"),
        Some(rate) => {
            let room = caps.max_bytes.saturating_sub(s.payload_bytes) as f64;
            let by_bytes = room / rate as f64;
            let (h, by) = if by_bytes < age_h {
                (by_bytes, "max_bytes")
            } else {
                (age_h, "max_age")
            };
            format!(
                "about {h:.0} h ({:.1} days) at {rate} bytes/h, then {by} drops the oldest telemetry",
                h / 24.0
            )
        }
    }
}
