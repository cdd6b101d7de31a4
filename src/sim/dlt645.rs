//! DL/T 645-2007 meters on a simulated line: they answer reads of their profile's items (values
//! from the same load model as the Modbus meters), the read of the address, and relay control with
//! a password, in their own time, with the same faults (dead, error answer, corrupt checksum).

use std::sync::Mutex;

use tokio::time::Instant;

use super::{Fault, UnitSpec};
use crate::dlt645::data::{Credentials, Di};
use crate::dlt645::frame::{function, Address, Control, Frame, Receiver};
use crate::dlt645::profile::Profile;
use crate::framing::{PREAMBLE, START};
use crate::modbus::profile::Quantity;

/// Wake-up bytes a simulated meter puts before its answers (meters send 0–4, §A2).
const ANSWER_PREAMBLE: usize = 2;

/// What the bytes at the start of a line buffer are to a DL/T 645 meter.
pub(super) enum Scan {
    /// A whole, valid frame of this many bytes (preamble included).
    Frame(usize, Frame),
    /// The start of one; wait for more bytes.
    Wait,
    /// Not a DL/T 645 frame (a Modbus request, noise).
    NotOurs,
}

/// Looks for a DL/T 645 request at the start of `bytes` (after its wake-up `FE`s). A Modbus
/// request for unit 0x68 whose 8th byte is 0x68 would be taken for one: the simulator's buildings
/// do not use unit 104.
pub(super) fn scan(bytes: &[u8]) -> Scan {
    let p = bytes.iter().take_while(|b| **b == PREAMBLE).count();
    let rest = &bytes[p..];
    match rest {
        [] if p > 0 => return Scan::Wait,
        [] => return Scan::NotOurs,
        [first, ..] if *first != START => return Scan::NotOurs,
        _ => {}
    }
    if rest.len() < 10 {
        return if rest.len() >= 8 && rest[7] != START {
            Scan::NotOurs
        } else {
            Scan::Wait
        };
    }
    if rest[7] != START {
        return Scan::NotOurs;
    }
    let total = 12 + usize::from(rest[9]);
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
    energy_kwh: f64,
    load_w: f64,
    last: Instant,
    relay_open: bool,
    answers: u64,
}

impl State {
    /// A quantity's value now (the same load model as the Modbus meters'; nothing flows while the
    /// relay is open).
    fn value(&self, q: Quantity) -> f64 {
        let load = if self.relay_open { 0.0 } else { self.load_w };
        match q {
            Quantity::EnergyKwh => self.energy_kwh,
            Quantity::VoltageV => 230.0,
            Quantity::CurrentA => load / 230.0,
            Quantity::PowerW | Quantity::ApparentPowerVa => load,
            Quantity::FrequencyHz => 50.0,
            Quantity::PowerFactor => 1.0,
            Quantity::PrepaidRemaining => 100.0,
            Quantity::RelayState => f64::from(u8::from(!self.relay_open)),
            _ => 0.0,
        }
    }
}

/// The DL/T 645 meters of endpoint `endpoint` in `building`.
pub(super) fn meters(
    building: &super::Building,
    endpoint: &str,
    profiles: &std::collections::BTreeMap<String, Profile>,
) -> Result<Vec<std::sync::Arc<Meter>>, super::SimError> {
    let invalid = |message: String| super::SimError::Invalid {
        file: "building".into(),
        message,
    };
    let mut out = Vec::new();
    for u in building
        .unit
        .iter()
        .filter(|u| u.endpoint == endpoint && u.protocol == super::UnitProtocol::Dlt645)
    {
        let address = Address::parse(u.address.as_deref().unwrap_or_default())
            .map_err(|e| invalid(e.to_string()))?;
        let profile = profiles.get(&u.profile).cloned().ok_or_else(|| {
            invalid(format!(
                "DL/T 645 unit {address} on {endpoint}: unknown profile {:?} (built-in: {})",
                u.profile,
                profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let credentials = match (&u.password, &u.operator) {
            (Some(p), Some(o)) => {
                Some(Credentials::new(u.password_level, p, o).map_err(|e| invalid(e.to_string()))?)
            }
            _ => None,
        };
        out.push(std::sync::Arc::new(Meter::new(
            u.clone(),
            address,
            profile,
            credentials,
        )));
    }
    Ok(out)
}

/// One simulated DL/T 645 meter.
pub(super) struct Meter {
    pub(super) spec: UnitSpec,
    pub(super) address: Address,
    profile: Profile,
    credentials: Option<Credentials>,
    state: Mutex<State>,
}

impl Meter {
    pub(super) fn new(
        spec: UnitSpec,
        address: Address,
        profile: Profile,
        credentials: Option<Credentials>,
    ) -> Meter {
        let state = State {
            energy_kwh: spec.start_kwh,
            load_w: spec.load_w,
            last: super::line_now(),
            relay_open: false,
            answers: 0,
        };
        Meter {
            spec,
            address,
            profile,
            credentials,
            state: Mutex::new(state),
        }
    }

    /// The meter's extra turnaround.
    pub(super) fn delay(&self) -> std::time::Duration {
        self.spec.delay.unwrap_or_default()
    }

    /// Whether this meter is the one `req` is for (wildcard bytes match; broadcast is never
    /// answered).
    pub(super) fn addressed(&self, req: &Frame) -> bool {
        req.address != Address::BROADCAST && req.address.matches(&self.address)
    }

    /// The bytes this meter answers `req` with, if it answers.
    pub(super) fn answer(&self, req: &Frame) -> Option<Vec<u8>> {
        if self.spec.fault == Fault::Dead || req.control.is_answer() {
            return None;
        }
        let mut s = self.state.lock().ok()?;
        let now = super::line_now();
        if !s.relay_open {
            s.energy_kwh += s.load_w * (now - s.last).as_secs_f64() / 3_600_000.0;
        }
        s.last = now;
        let f = req.control.function();
        let reply = |c: u8, data: Vec<u8>| Frame {
            address: self.address,
            control: Control(c),
            data,
        };
        let frame = if self.spec.fault == Fault::Exception {
            reply(f | 0xC0, vec![0x01])
        } else {
            match f {
                function::READ => self.read(&s, req),
                function::READ_ADDRESS => reply(0x93, self.address.0.to_vec()),
                function::CONTROL => self.control(&mut s, req),
                _ => reply(f | 0xC0, vec![0x01]),
            }
        };
        s.answers += 1;
        let mut bytes = frame.encode(ANSWER_PREAMBLE).ok()?;
        if self.spec.fault == Fault::Corrupt
            && s.answers % u64::from(self.spec.corrupt_every.max(1)) == 0
        {
            let cs = bytes.len() - 2;
            bytes[cs] ^= 0xFF;
        }
        Some(bytes)
    }

    fn read(&self, s: &State, req: &Frame) -> Frame {
        let refuse = |err: u8| Frame {
            address: self.address,
            control: Control(0xD1),
            data: vec![err],
        };
        let Some(di) = req
            .data
            .get(..4)
            .map(|d| Di(u32::from_le_bytes([d[0], d[1], d[2], d[3]])))
        else {
            return refuse(0x01);
        };
        let value = if di == Di::STATUS_WORD_3 {
            // Bit 4 contact open, bit 6 last command a trip (§A11).
            let w: u16 = if s.relay_open { 0x0050 } else { 0x0000 };
            Some(w.to_le_bytes().to_vec())
        } else {
            self.profile
                .items
                .iter()
                .find(|i| i.di == di)
                .and_then(|i| i.encode(s.value(i.quantity)))
        };
        match value {
            Some(v) => {
                let mut data = di.wire().to_vec();
                data.extend(v);
                Frame {
                    address: self.address,
                    control: Control(0x91),
                    data,
                }
            }
            // Bit 1: no such data.
            None => refuse(0x02),
        }
    }

    fn control(&self, s: &mut State, req: &Frame) -> Frame {
        let refuse = |word: u16| Frame {
            address: self.address,
            control: Control(0xDC),
            data: word.to_le_bytes().to_vec(),
        };
        let d = &req.data;
        if d.len() < 16 {
            return refuse(0x0001);
        }
        let authorised = self
            .credentials
            .as_ref()
            .is_some_and(|c| d[0] == c.level && d[1..4] == c.password && d[4..8] == c.operator[..]);
        if !authorised {
            // Bit 2: wrong password or not authorised.
            return refuse(0x0004);
        }
        match d[8] {
            0x1A => s.relay_open = true,
            0x1B | 0x1C => s.relay_open = false,
            _ => return refuse(0x0001),
        }
        Frame {
            address: self.address,
            control: Control(0x9C),
            data: Vec::new(),
        }
    }
}
