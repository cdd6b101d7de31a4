//! `[report]` and `[[device]] publish_every`: what of each poll goes to the cloud.

use std::time::Duration;

use crate::modbus::profile::Quantity;
use crate::report::{Deadband, ReportPolicy};

use super::{RawDevice, RawReport, Validator};

impl Validator {
    pub(in crate::config) fn report(
        &mut self,
        raw: RawReport,
        devices: &[(String, Option<RawDevice>)],
    ) -> ReportPolicy {
        let mut policy = ReportPolicy {
            every_poll: raw.every_poll,
            ..ReportPolicy::default()
        };
        if let Some(every) = raw.publish_every {
            policy.publish_every = every;
        }
        if let Some(silence) = raw.max_silence {
            policy.max_silence = silence;
        }
        let ceiling = Duration::from_secs(24 * 3600);
        for (key, d) in [
            ("report.publish_every", policy.publish_every),
            ("report.max_silence", policy.max_silence),
        ] {
            if d < Duration::from_secs(1) || d > ceiling {
                self.push(
                    key,
                    format!("{}: expected 1s to 24h", humantime::format_duration(d)),
                );
            }
        }
        for (q, d) in raw.deadband {
            let key = format!("report.deadband.{}", q.as_str());
            if matches!(
                q,
                Quantity::EnergyKwh
                    | Quantity::EnergyExportKwh
                    | Quantity::EnergyOtherKwh
                    | Quantity::WaterM3
                    | Quantity::PulseCount
                    | Quantity::RelayState
                    | Quantity::DigitalInput
                    | Quantity::ValveState
            ) {
                self.push(
                    key,
                    "counters go out every publish_every and states on every change: a deadband applies to instantaneous values only",
                );
                continue;
            }
            if !(d.abs.is_finite()
                && d.abs >= 0.0
                && d.rel.is_finite()
                && (0.0..1.0).contains(&d.rel))
            {
                self.push(
                    key,
                    format!(
                        "abs = {}, rel = {}: expected abs ≥ 0 (in the value's unit) and 0 ≤ rel < 1 (0.05 = 5 %)",
                        d.abs, d.rel
                    ),
                );
                continue;
            }
            policy.deadbands.insert(
                q,
                Deadband {
                    abs: d.abs,
                    rel: d.rel,
                },
            );
        }
        for (key, d) in devices {
            let Some(d) = d else { continue };
            if let Some(every) = d.publish_every {
                if every < Duration::from_secs(1) || every > ceiling {
                    self.push(
                        format!("{key}.publish_every"),
                        format!("{}: expected 1s to 24h", humantime::format_duration(every)),
                    );
                }
                policy.device_every.insert(d.name.clone(), every);
            }
        }
        policy
    }
}
