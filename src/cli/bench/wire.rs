//! Bytes per device per day on the cellular link, before and after the report policy.
//!
//! Scope: the real encoders, the real report policy and the uplink's real message envelope, fed a
//! simulated day (8,640 polls at 10 s) of the sample building's devices with field-like values;
//! MQTT framing counted exactly (`PUBLISH` at `QoS` 1 and its `PUBACK`). TCP/IP and TLS framing are not
//! counted (about 100–150 bytes a message both ways, so the message count is printed too). In live
//! operation each poll's records leave in one message: the recorder commits a poll at a time and
//! the uplink publishes what is committed.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use chrono::{DateTime, TimeZone, Utc};

use super::verdict;
use crate::config::Config;
use crate::modbus::profile::{Quantity, RegisterDef};
use crate::reading::{Quality, RawWords, Reading};
use crate::report::Reporter;
use crate::store::{Kind, NewRecord, Stored};

/// The sample configuration shipped with meterd (its devices and topic prefix).
const SAMPLE: &str = include_str!("../../../config/meterd.toml");

/// Polls per device per day at 10 s.
const POLLS: i64 = 8_640;

/// Field-like values of one device: a load that sits at a level with ±1 % noise and switches to a
/// new level (0.3–3 kW) about every ten minutes, mains voltage drifting a few volts over the day,
/// counters integrating the load at their 0.01 resolution, relays switched twice a day.
pub(super) struct Meter {
    rng: fastrand::Rng,
    /// Seconds between polls.
    step_s: f64,
    level_w: f64,
    kwh: f64,
    relays: HashMap<String, bool>,
}

impl Meter {
    pub(super) fn new(seed: u64, step_s: f64) -> Meter {
        let mut rng = fastrand::Rng::with_seed(seed);
        let level_w = 300.0 + rng.f64() * 2700.0;
        Meter {
            rng,
            step_s,
            level_w,
            kwh: 1000.0 + f64::from(u32::try_from(seed % 5000).unwrap_or(0)),
            relays: HashMap::new(),
        }
    }

    pub(super) fn poll(
        &mut self,
        device: &str,
        registers: &[RegisterDef],
        k: i64,
        ts: DateTime<Utc>,
    ) -> Vec<Reading> {
        if self.rng.f64() < self.step_s / 600.0 {
            self.level_w = 300.0 + self.rng.f64() * 2700.0;
        }
        let w = self.level_w * (1.0 + (self.rng.f64() - 0.5) * 0.02);
        self.kwh += w * self.step_s / 3.6e6;
        let hour = (k as f64) * self.step_s / 3600.0;
        let volts =
            226.0 + 4.0 * (hour / 24.0 * std::f64::consts::TAU).sin() + (self.rng.f64() - 0.5);
        let switch = self.rng.f64() < 2.0 * self.step_s / 86_400.0;
        registers
            .iter()
            .map(|r| {
                let noise = 1.0 + (self.rng.f64() - 0.5) * 0.02;
                let value = match r.quantity {
                    Quantity::EnergyKwh | Quantity::EnergyOtherKwh => {
                        (self.kwh * 100.0).floor() / 100.0
                    }
                    Quantity::EnergyExportKwh => 0.0,
                    Quantity::WaterM3 | Quantity::PulseCount => {
                        (self.kwh / 100.0 * 100.0).floor() / 100.0
                    }
                    Quantity::PowerW | Quantity::ApparentPowerVa => w * noise,
                    Quantity::ReactivePowerVar => 0.2 * w * noise,
                    Quantity::VoltageV => volts + (self.rng.f64() - 0.5) * 0.4,
                    Quantity::CurrentA => w / volts * noise,
                    Quantity::FrequencyHz => 50.0 + (self.rng.f64() - 0.5) * 0.04,
                    Quantity::PowerFactor => 0.95 + (self.rng.f64() - 0.5) * 0.02,
                    Quantity::FlowM3h => 0.5 * noise,
                    Quantity::RelayState | Quantity::DigitalInput | Quantity::ValveState => {
                        let on = self.relays.entry(r.name.to_string()).or_insert(true);
                        if switch {
                            *on = !*on;
                        }
                        f64::from(u8::from(*on))
                    }
                    Quantity::PrepaidRemaining | Quantity::Other => 20.0 * noise,
                };
                Reading {
                    device: device.into(),
                    register: r.name.clone(),
                    quantity: r.quantity,
                    value: Some(value),
                    unit: r.unit.clone(),
                    ts,
                    quality: Quality::Good,
                    raw: RawWords::new(&[0x4512, 0x3400]),
                    error: None,
                }
            })
            .collect()
    }
}

/// The telemetry record of one reading as meterd published it before the report policy (one
/// record per register, the whole `Reading`).
fn per_register_record(r: &Reading) -> NewRecord {
    NewRecord {
        kind: Kind::Telemetry,
        topic: "telemetry".into(),
        ts: r.ts,
        payload: serde_json::to_vec(r).unwrap_or_default(),
    }
}

/// Bytes of one `QoS` 1 `PUBLISH` of `payload` on `topic` and its `PUBACK`.
fn mqtt_bytes(topic: &str, payload: usize) -> usize {
    let remaining = 2 + topic.len() + 2 + payload;
    let varint = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + varint + remaining + 4
}

/// What one day costs on the link: (bytes, messages).
#[derive(Default)]
struct Day {
    bytes: usize,
    messages: usize,
}

impl Day {
    /// One poll's records as one message (nothing when the policy let nothing out).
    fn publish(&mut self, gateway: &str, topic: &str, seq: &mut i64, records: &[NewRecord]) {
        if records.is_empty() {
            return;
        }
        let rows: Vec<Stored> = records
            .iter()
            .map(|r| {
                *seq += 1;
                Stored {
                    seq: *seq,
                    kind: r.kind,
                    topic: r.topic.clone(),
                    ts_ms: r.ts.timestamp_millis(),
                    payload: r.payload.clone(),
                }
            })
            .collect();
        let message = crate::uplink::message(gateway, &rows);
        self.bytes += mqtt_bytes(topic, message.len());
        self.messages += 1;
    }
}

pub(super) fn wire() -> Result<bool> {
    let config = Config::from_str_only(
        SAMPLE,
        "config/meterd.toml",
        std::path::Path::new("/etc/meterd"),
    )
    .context("the sample config")?;
    let gateway = config.gateway.id.clone();
    let prefix = config
        .mqtt
        .as_ref()
        .map_or("meterd", |m| m.topic_prefix.as_str());
    let topic = format!("{prefix}/{gateway}/telemetry");
    println!(
        "\n[wire] bytes on the link per device per day: the sample building ({} devices of config/meterd.toml), 10 s polling, a simulated day; before = one record per register, after = one record per poll under the default report policy (scope: encoders, policy and MQTT framing; TCP/IP/TLS not counted)",
        config.devices.len()
    );
    // A month end inside the day: 2026-11-30 12:00 to 2026-12-01 12:00 in the site's timezone.
    let start = config
        .gateway
        .timezone
        .with_ymd_and_hms(2026, 11, 30, 12, 0, 0)
        .single()
        .context("start time")?
        .with_timezone(&Utc);
    let mut reporter = Reporter::new(config.report.clone(), crate::daemon::calendar(&config));
    let (mut seq_before, mut seq_after) = (0i64, 0i64);
    let mut rows = Vec::new();
    let (mut total_before, mut total_after) = (Day::default(), Day::default());
    for (i, d) in config.devices.iter().enumerate() {
        let mut meter = Meter::new(0x5EED + i as u64, 10.0);
        let (mut before, mut after) = (Day::default(), Day::default());
        let mut counters_after = 0usize;
        for k in 0..POLLS {
            let ts = start
                + chrono::Duration::seconds(10 * k)
                + chrono::Duration::milliseconds(37 * i as i64);
            let poll = meter.poll(&d.name, &d.profile.registers, k, ts);
            let old: Vec<NewRecord> = poll.iter().map(per_register_record).collect();
            before.publish(&gateway, &topic, &mut seq_before, &old);
            let new: Vec<NewRecord> = reporter.poll(&poll).into_iter().collect();
            if let Some(r) = new.first() {
                let v: serde_json::Value = serde_json::from_slice(&r.payload)?;
                counters_after += usize::from(d.profile.registers.iter().any(|reg| {
                    matches!(reg.quantity, Quantity::EnergyKwh | Quantity::WaterM3)
                        && v["values"].get(reg.name.as_ref()).is_some()
                }));
            }
            after.publish(&gateway, &topic, &mut seq_after, &new);
        }
        rows.push(format!(
            "  {:<16} {:>2} registers  before {:>10} B/day ({:>5} msgs)  after {:>9} B/day ({:>5} msgs, counters in {:>3})  {:>6.1}x",
            d.name,
            d.profile.registers.len(),
            before.bytes,
            before.messages,
            after.bytes,
            after.messages,
            counters_after,
            before.bytes as f64 / after.bytes.max(1) as f64
        ));
        total_before.bytes += before.bytes;
        total_before.messages += before.messages;
        total_after.bytes += after.bytes;
        total_after.messages += after.messages;
    }
    for r in &rows {
        println!("{r}");
    }
    let n = config.devices.len().max(1);
    let ratio = total_before.bytes as f64 / total_after.bytes.max(1) as f64;
    let alive = total_before.bytes > 0 && total_after.bytes > 0 && total_after.messages >= n;
    let ok = alive && ratio >= 10.0;
    println!(
        "  per device per day: before {} B ({:.1} MiB), after {} B ({:.2} MiB); {:.1}x less (target >= 10x) {}",
        total_before.bytes / n,
        total_before.bytes as f64 / n as f64 / 1_048_576.0,
        total_after.bytes / n,
        total_after.bytes as f64 / n as f64 / 1_048_576.0,
        ratio,
        verdict(ok)
    );
    if !alive {
        println!("  nothing was measured: the simulated day produced no telemetry");
    }
    Ok(ok)
}
