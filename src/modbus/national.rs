//! Polling the DL/T 645 and CJ/T 188 meters of a bus: their exchanges run on the link's serial
//! line between the Modbus ones (one transaction at a time), and their values come out as the same
//! `Reading`s, so the scheduler, recorder, store, topology, bills and prepaid do not care which
//! protocol a meter speaks.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::bus::{ActuateError, PollResult, RelayState};
use super::link::{FailureKind, Link, LinkError};
use super::reading::{Quality, RawWords, Reading};
use super::spec::{Device, Dlt645Meter, WaterMeter};
use crate::exchange::ExchangeError;
use crate::{cjt188, dlt645};

/// A DL/T 645 client's failure as the engine counts it.
fn dlt645_error(address: dlt645::Address, e: &dlt645::client::ClientError) -> LinkError {
    use dlt645::client::ClientError as E;
    let kind = match e {
        E::Refused { word, .. } => FailureKind::Exception(word.0),
        E::ControlRefused { .. } => FailureKind::Exception(0),
        E::Line { source, .. } => line_kind(source),
        E::TooManyFollowUps { .. } => FailureKind::Garbled,
        E::Encode { .. } => FailureKind::Transport,
    };
    LinkError::Meter {
        meter: address.to_string(),
        kind,
        detail: detail(&e.to_string()),
    }
}

/// A CJ/T 188 client's failure as the engine counts it.
fn cjt188_error(address: cjt188::Address, e: &cjt188::client::ClientError) -> LinkError {
    use cjt188::client::ClientError as E;
    let kind = match e {
        E::Line { source, .. } => line_kind(source),
        E::Answer {
            source: cjt188::AnswerError::Refused { .. },
            ..
        } => FailureKind::Exception(0),
        E::Answer { .. } => FailureKind::Garbled,
    };
    LinkError::Meter {
        meter: address.to_string(),
        kind,
        detail: detail(&e.to_string()),
    }
}

fn line_kind(e: &ExchangeError) -> FailureKind {
    match e {
        ExchangeError::Timeout { garbled: true, .. } => FailureKind::Garbled,
        ExchangeError::Timeout { .. } => FailureKind::Timeout,
        _ => FailureKind::Transport,
    }
}

/// The client's message without its leading "meter N: " (the error names the meter itself).
fn detail(message: &str) -> String {
    message
        .split_once(": ")
        .map_or(message, |(_, rest)| rest)
        .to_string()
}

fn failed(failure: LinkError, latency: Duration) -> PollResult {
    PollResult {
        readings: Vec::new(),
        exceptions: Vec::new(),
        failure: Some(failure),
        latency,
    }
}

/// Reads every item of a DL/T 645 meter's profile. Stops at the first failure of the line (the
/// meter is probably gone); an item the meter refuses gives an error reading and the rest go on.
pub(crate) async fn poll_dlt645(
    link: &mut Link,
    device: &Device,
    meter: &Dlt645Meter,
) -> PollResult {
    let Dlt645Meter {
        address,
        profile,
        preamble,
        ..
    } = meter;
    let address = *address;
    let started = link.clock().instant();
    let mut client = dlt645::client::Client::new(*preamble);
    let mut readings = Vec::with_capacity(profile.items.len());
    let mut exceptions = Vec::new();
    for (item, reg) in profile.items.iter().zip(&device.profile.registers) {
        let r = link
            .raw(device.pause, async |line| {
                client.read(line, address, item.di, device.timeout).await
            })
            .await;
        let (value, error) = match r {
            Err(e) => return failed(e, link.clock().since(started)),
            Ok(Ok(bytes)) => match item.value(&bytes) {
                Ok(v) => (Some(v), None),
                Err(e) => (
                    None,
                    Some(format!("meter {address}: {} {}: {e}", item.name, item.di)),
                ),
            },
            Ok(Err(e)) if e.meter_answered() => {
                let failure = dlt645_error(address, &e);
                let text = failure.to_string();
                exceptions.push(failure);
                (None, Some(text))
            }
            Ok(Err(e)) => return failed(dlt645_error(address, &e), link.clock().since(started)),
        };
        readings.push(reading(device, reg, value, error, link.clock().now()));
    }
    PollResult {
        readings,
        exceptions,
        failure: None,
        latency: link.clock().since(started),
    }
}

/// Reads a CJ/T 188 water meter's current data: volume, valve (0 open, 1 closed, 3 fault) and
/// battery (1 low), in the order of the device's readings.
pub(crate) async fn poll_cjt188(link: &mut Link, device: &Device, meter: WaterMeter) -> PollResult {
    let WaterMeter {
        address,
        meter_type,
        order,
        preamble,
    } = meter;
    let started = link.clock().instant();
    let mut client = cjt188::client::Client::new(preamble);
    let r = link
        .raw(device.pause, async |line| {
            client
                .read(line, meter_type, address, order, device.timeout)
                .await
        })
        .await;
    let ts = link.clock().now();
    let data = match r {
        Err(e) => return failed(e, link.clock().since(started)),
        Ok(Err(e)) => return failed(cjt188_error(address, &e), link.clock().since(started)),
        Ok(Ok(d)) => d,
    };
    let valve = match data.status.valve {
        cjt188::Valve::Open => 0.0,
        cjt188::Valve::Closed => 1.0,
        cjt188::Valve::Abnormal => 3.0,
    };
    let values = [
        data.volume_m3,
        valve,
        f64::from(u8::from(data.status.battery_low)),
    ];
    PollResult {
        readings: device
            .profile
            .registers
            .iter()
            .zip(values)
            .map(|(reg, v)| reading(device, reg, Some(v), None, ts))
            .collect(),
        exceptions: Vec::new(),
        failure: None,
        latency: link.clock().since(started),
    }
}

fn reading(
    device: &Device,
    reg: &crate::modbus::profile::RegisterDef,
    value: Option<f64>,
    error: Option<String>,
    ts: DateTime<Utc>,
) -> Reading {
    Reading {
        device: device.name.clone(),
        register: reg.name.clone(),
        quantity: reg.quantity,
        value,
        unit: reg.unit.clone(),
        ts,
        quality: if value.is_some() {
            Quality::Good
        } else {
            Quality::Error
        },
        raw: RawWords::default(),
        error: error.map(|e| Arc::from(e.as_str())),
    }
}

/// How long a 0x1C command stays valid in the meter's own clock. The meter compares it with its
/// local time (China: UTC+8) while meterd keeps UTC, so a day covers any offset; the validity is a
/// guard against stale commands, not the only one (meterd reads the state back).
const CONTROL_VALIDITY: chrono::Duration = chrono::Duration::hours(24);

/// Reads a DL/T 645 meter's relay (status word 3, bit 4) and, when `set` differs, trips or closes
/// it with control code 0x1C and reads it back: `true` is supply on (contact closed).
pub(crate) async fn actuate_dlt645(
    link: &mut Link,
    device: &Device,
    output: &str,
    meter: &Dlt645Meter,
    set: Option<bool>,
) -> Result<RelayState, ActuateError> {
    let Dlt645Meter {
        address,
        credentials,
        preamble,
        ..
    } = meter;
    let address = *address;
    if output != "relay" || device.profile.outputs.is_empty() {
        return Err(ActuateError::UnknownOutput {
            device: device.name.to_string(),
            output: output.to_string(),
        });
    }
    let link_failed =
        |stage: &'static str, source: LinkError| ActuateError::link(device, output, stage, source);
    let failed = |stage: &'static str, e: &dlt645::client::ClientError| {
        link_failed(stage, dlt645_error(address, e))
    };
    let mut client = dlt645::client::Client::new(*preamble);
    let status = link
        .raw(device.pause, async |line| {
            client.relay_status(line, address, device.timeout).await
        })
        .await
        .map_err(|e| link_failed("read", e))?
        .map_err(|e| failed("read", &e))?;
    let before = !status.relay_open;
    let Some(want) = set.filter(|w| *w != before) else {
        return Ok(RelayState {
            before,
            after: before,
            wrote: false,
        });
    };
    let Some(credentials) = credentials.as_deref() else {
        return Err(ActuateError::NoCredentials(device.name.to_string()));
    };
    let action = if want {
        dlt645::data::RelayAction::Close
    } else {
        dlt645::data::RelayAction::Trip
    };
    let deadline = (link.clock().now() + CONTROL_VALIDITY).naive_utc();
    let status = link
        .raw(device.pause, async |line| {
            client
                .relay(line, address, action, credentials, deadline, device.timeout)
                .await
        })
        .await
        .map_err(|e| link_failed("write", e))?
        .map_err(|e| failed("write", &e))?;
    Ok(RelayState {
        before,
        after: !status.relay_open,
        wrote: true,
    })
}

/// Reads a CJ/T 188 meter's valve (ST, §B7) and, when `set` differs, opens (55) or closes (99) it
/// and reads the current data back: `true` is water on (valve open). A motor valve may still be
/// moving when the answer comes; a valve reported faulty reads as not open.
pub(crate) async fn actuate_cjt188(
    link: &mut Link,
    device: &Device,
    output: &str,
    meter: WaterMeter,
    set: Option<bool>,
) -> Result<RelayState, ActuateError> {
    if output != "valve" {
        return Err(ActuateError::UnknownOutput {
            device: device.name.to_string(),
            output: output.to_string(),
        });
    }
    let WaterMeter {
        address,
        meter_type,
        order,
        preamble,
    } = meter;
    let failed =
        |stage: &'static str, source: LinkError| ActuateError::link(device, output, stage, source);
    let mut client = cjt188::client::Client::new(preamble);
    let read = async |client: &mut cjt188::client::Client, link: &mut Link, stage| {
        link.raw(device.pause, async |line| {
            client
                .read(line, meter_type, address, order, device.timeout)
                .await
        })
        .await
        .map_err(|e| failed(stage, e))?
        .map(|d| d.status.valve == cjt188::Valve::Open)
        .map_err(|e| failed(stage, cjt188_error(address, &e)))
    };
    let before = read(&mut client, link, "read").await?;
    let Some(want) = set.filter(|w| *w != before) else {
        return Ok(RelayState {
            before,
            after: before,
            wrote: false,
        });
    };
    link.raw(device.pause, async |line| {
        client
            .valve(line, meter_type, address, order, want, device.timeout)
            .await
    })
    .await
    .map_err(|e| failed("write", e))?
    .map_err(|e| failed("write", cjt188_error(address, &e)))?;
    let after = read(&mut client, link, "read back").await?;
    Ok(RelayState {
        before,
        after,
        wrote: true,
    })
}
