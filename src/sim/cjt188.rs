//! CJ/T 188-2004 water meters on a simulated line: current data (901F) from the same flow model as
//! the Modbus water meters, the read of the address, and valve control (a stuck valve acknowledges
//! and stays), with the same faults (dead, error answer, corrupt checksum).

use std::sync::Mutex;

use tokio::time::Instant;

use super::{Fault, UnitSpec};
use crate::cjt188::{function, Address, DiOrder, Frame, MeterType, Receiver};
use crate::framing::{PREAMBLE, START};

/// Wake-up bytes a simulated meter puts before its answers (KD's firmware sends 2, §B1).
const ANSWER_PREAMBLE: usize = 2;

/// What the bytes at the start of a line buffer are to a CJ/T 188 meter.
pub(super) enum Scan {
    Frame(usize, Frame),
    Wait,
    NotOurs,
}

/// Looks for a CJ/T 188 request at the start of `bytes` (after its wake-up `FE`s).
pub(super) fn scan(bytes: &[u8]) -> Scan {
    let p = bytes.iter().take_while(|b| **b == PREAMBLE).count();
    let rest = &bytes[p..];
    match rest.first() {
        None if p > 0 => return Scan::Wait,
        Some(b) if *b == START => {}
        _ => return Scan::NotOurs,
    }
    if rest.len() < 11 {
        return Scan::Wait;
    }
    let len = rest[10];
    if len > 0x64 {
        return Scan::NotOurs;
    }
    let total = 13 + usize::from(len);
    if rest.len() < total {
        return Scan::Wait;
    }
    let mut rx = Receiver::default();
    rx.push(&rest[..total]);
    match rx.next_frame() {
        Some(f) => Scan::Frame(p + total, f),
        None => Scan::NotOurs,
    }
}

struct State {
    volume_m3: f64,
    flow_m3h: f64,
    last: Instant,
    valve_open: bool,
    answers: u64,
}

/// One simulated CJ/T 188 water meter.
pub(super) struct Meter {
    spec: UnitSpec,
    kind: MeterType,
    address: Address,
    order: DiOrder,
    state: Mutex<State>,
}

/// BCD of `v` in `n` bytes (0 when it does not fit: the simulator's values always do).
fn bcd(v: u64, n: usize) -> Vec<u8> {
    crate::bcd::from_u64(v, n).unwrap_or_else(|| vec![0; n])
}

impl Meter {
    pub(super) fn new(spec: UnitSpec, kind: MeterType, address: Address) -> Meter {
        let state = State {
            volume_m3: spec.start_m3,
            flow_m3h: spec.flow_m3h,
            last: super::line_now(),
            valve_open: true,
            answers: 0,
        };
        let order = spec.di_order;
        Meter {
            spec,
            kind,
            address,
            order,
            state: Mutex::new(state),
        }
    }

    pub(super) fn delay(&self) -> std::time::Duration {
        self.spec.delay.unwrap_or_default()
    }

    /// Whether `req` is for this meter (broadcast `AA` bytes match; the type too).
    pub(super) fn addressed(&self, req: &Frame) -> bool {
        (req.meter_type == MeterType::WILDCARD || req.meter_type == self.kind)
            && req.address.matches(&self.address)
    }

    fn di(&self, di: u16) -> [u8; 2] {
        match self.order {
            DiOrder::AsDisplayed => di.to_be_bytes(),
            DiOrder::Reversed => di.to_le_bytes(),
        }
    }

    /// The bytes this meter answers `req` with, if it answers.
    pub(super) fn answer(&self, req: &Frame) -> Option<Vec<u8>> {
        if self.spec.fault == Fault::Dead || req.control & 0x80 != 0 || req.data.len() < 3 {
            return None;
        }
        let mut s = self.state.lock().ok()?;
        let now = super::line_now();
        if s.valve_open {
            s.volume_m3 += s.flow_m3h * (now - s.last).as_secs_f64() / 3600.0;
        }
        s.last = now;
        let f = req.control & 0x3F;
        let seq = req.data[2];
        let reply = |control: u8, mut body: Vec<u8>, di: Option<u16>| {
            let mut data = di.map_or_else(Vec::new, |d| self.di(d).to_vec());
            data.push(seq);
            data.append(&mut body);
            Frame {
                meter_type: self.kind,
                address: self.address,
                control,
                data,
            }
        };
        let status = |s: &State| [u8::from(!s.valve_open), 0x00];
        let frame = if self.spec.fault == Fault::Exception {
            // SER + ST (§B4).
            reply(f | 0xC0, vec![0x00, 0x00], None)
        } else {
            match f {
                function::READ => {
                    let v = (s.volume_m3 * 100.0).round() as u64;
                    let mut body = bcd(v, 4);
                    body.push(0x2C);
                    // The settlement-day value: the whole m³ below the current one.
                    body.extend(bcd(v / 100 * 100, 4));
                    body.push(0x2C);
                    // The meter's clock: a fixed date is enough for the master (ss mm hh DD MM YYYY).
                    body.extend([0x30, 0x45, 0x13, 0x15, 0x03, 0x26, 0x20]);
                    body.extend(status(&s));
                    reply(0x81, body, Some(0x901F))
                }
                function::READ_ADDRESS => reply(0x83, Vec::new(), Some(0x810A)),
                function::WRITE if req.data.len() >= 4 => {
                    let open = match req.data[3] {
                        0x55 => true,
                        0x99 => false,
                        _ => return Some(self.finish(&mut s, &reply(0xC4, vec![0, 0], None))),
                    };
                    if self.spec.fault != Fault::Stuck {
                        s.valve_open = open;
                    }
                    reply(0x84, status(&s).to_vec(), Some(0xA017))
                }
                _ => reply(f | 0xC0, vec![0x00, 0x00], None),
            }
        };
        Some(self.finish(&mut s, &frame))
    }

    fn finish(&self, s: &mut State, frame: &Frame) -> Vec<u8> {
        s.answers += 1;
        let mut bytes = frame.encode(ANSWER_PREAMBLE);
        if self.spec.fault == Fault::Corrupt
            && s.answers % u64::from(self.spec.corrupt_every.max(1)) == 0
        {
            let cs = bytes.len() - 2;
            bytes[cs] ^= 0xFF;
        }
        bytes
    }
}

/// The CJ/T 188 meters of endpoint `endpoint` in `building`.
pub(super) fn meters(
    building: &super::Building,
    endpoint: &str,
) -> Result<Vec<std::sync::Arc<Meter>>, super::SimError> {
    let mut out = Vec::new();
    for u in building
        .unit
        .iter()
        .filter(|u| u.endpoint == endpoint && u.protocol == super::UnitProtocol::Cjt188)
    {
        let address = Address::parse(u.address.as_deref().unwrap_or_default()).map_err(|e| {
            super::SimError::Invalid {
                file: "building".into(),
                message: e.to_string(),
            }
        })?;
        out.push(std::sync::Arc::new(Meter::new(
            u.clone(),
            MeterType(u.meter_type),
            address,
        )));
    }
    Ok(out)
}
