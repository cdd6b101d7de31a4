//! The meter simulator: a virtual building served over real Modbus (tokio-modbus's server side), on TCP
//! loopback and on RTU over a pseudo-terminal. Tests, benchmarks and `meterd demo` run against it.
//!
//! Meters of any profile answer from a register image computed on demand: energy and volume counters
//! integrate the configured load and flow over time (and stop rising while the device's own cut-off
//! relay is open), relay coils and holding registers keep what was written. Faults are per unit: never
//! answer, always answer with an exception, or garble every Nth frame.
//!
//! RTU endpoints sit behind a line emulator: the server's pty is relayed to the pty the client opens,
//! delaying each frame by its wire time at the configured baud (and t3.5 for the end of a request), so
//! the bus timing of a real 9600 baud line can be measured on a machine without one.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::Service;
use tokio_serial::{SerialPort, SerialStream};

use crate::config::{self, Parity};
use crate::modbus::decode;
use crate::modbus::profile::{Function, Profile, Quantity, RegisterDef};
use crate::modbus::timing;

/// The simulated meters' own time. They stand for devices outside the gateway, so they run on the
/// system's (tokio's) clock, never on the daemon's `Clock`: a test that steps the daemon's wall
/// clock does not change how the bus behaves.
pub(crate) fn line_now() -> Instant {
    crate::clock::Clock::system().instant()
}

mod cjt188;
mod dlt645;
pub mod past;

/// Why a building could not be loaded or served.
#[derive(Debug, Error)]
pub enum SimError {
    #[error("cannot read building file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building file {file}: {message}")]
    Invalid { file: String, message: String },
    #[error("endpoint {endpoint}: cannot listen on {addr}: {source}; pick a free port or 0")]
    Listen {
        endpoint: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("endpoint {endpoint}: cannot create a pseudo-terminal pair: {detail}")]
    Pty { endpoint: String, detail: String },
}

/// A virtual building: endpoints (ports) and the units on them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Building {
    #[serde(default)]
    pub building: BuildingInfo,
    #[serde(default)]
    pub endpoint: Vec<EndpointSpec>,
    #[serde(default)]
    pub unit: Vec<UnitSpec>,
}

/// Descriptive header of a building file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildingInfo {
    #[serde(default)]
    pub name: String,
}

/// How an endpoint is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    /// Modbus TCP on a loopback port.
    Tcp,
    /// Raw RTU frames on a loopback TCP port (a serial gateway).
    RtuOverTcp,
    /// Modbus RTU on a pseudo-terminal; the path to open is reported when started.
    Rtu,
}

/// One port of the building.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    pub kind: EndpointKind,
    /// `host:port` for TCP kinds; port 0 picks a free one.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Turnaround: time a unit takes to start answering.
    #[serde(default, with = "humantime_serde")]
    pub response_delay: Option<Duration>,
    /// RTU only: emulate the wire time of every frame at this baud.
    pub baud: Option<u32>,
    #[serde(default)]
    pub parity: Option<Parity>,
    pub stop_bits: Option<u8>,
}

fn default_listen() -> String {
    "127.0.0.1:0".into()
}

/// Misbehaviour injected into one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    #[default]
    None,
    /// Never answers (a dead or unpowered meter).
    Dead,
    /// Answers every request with `exception_code`.
    Exception,
    /// Every `corrupt_every`-th answer is garbled (CRC error on RTU, short payload on TCP).
    Corrupt,
    /// Acknowledges writes but its outputs never move (a welded contact, a jammed valve).
    Stuck,
}

/// The protocol a simulated device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitProtocol {
    #[default]
    Modbus,
    /// DL/T 645-2007, addressed by `address` (the nameplate number); serial lines only.
    Dlt645,
    /// CJ/T 188-2004 water meter, addressed by `address` (14 digits) and `meter_type`; serial
    /// lines only.
    Cjt188,
}

fn cold_water() -> u8 {
    0x10
}

/// One simulated device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSpec {
    pub endpoint: String,
    /// Modbus unit id (1–247); unused by DL/T 645 meters.
    #[serde(default)]
    pub unit: u8,
    #[serde(default)]
    pub protocol: UnitProtocol,
    /// DL/T 645: the meter's 12-digit address.
    pub address: Option<String>,
    /// DL/T 645 relay control: password level (2 or 4 for plaintext), password (6 hex digits) and
    /// operator code (8 hex digits) the meter accepts; without them it refuses every command.
    #[serde(default = "plaintext_level")]
    pub password_level: u8,
    pub password: Option<String>,
    pub operator: Option<String>,
    /// CJ/T 188: the meter type byte (0x10 cold water, 0x11 hot water).
    #[serde(default = "cold_water")]
    pub meter_type: u8,
    /// CJ/T 188: how the meter writes its DIs (§B5 of the protocol reference).
    #[serde(default)]
    pub di_order: crate::cjt188::DiOrder,
    /// The profile (Modbus, DL/T 645); CJ/T 188 meters answer their fixed 901F record.
    #[serde(default)]
    pub profile: String,
    /// Active power drawn, W; energy rises by exactly this.
    #[serde(default)]
    pub load_w: f64,
    #[serde(default)]
    pub start_kwh: f64,
    /// Water flow, m³/h; volume rises by exactly this.
    #[serde(default)]
    pub flow_m3h: f64,
    #[serde(default)]
    pub start_m3: f64,
    #[serde(default)]
    pub fault: Fault,
    #[serde(default = "two")]
    pub exception_code: u8,
    #[serde(default = "five")]
    pub corrupt_every: u32,
    /// Extra turnaround of this unit on top of the endpoint's.
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// This meter measures what these units draw ("endpoint:unit") plus its own `load_w` (the loss):
    /// how master and floor meters are wired upstream of sub-meters.
    #[serde(default)]
    pub sum_of: Vec<String>,
}

fn two() -> u8 {
    2
}
fn plaintext_level() -> u8 {
    2
}
fn five() -> u32 {
    5
}

impl Building {
    /// Parses a building description (TOML).
    pub fn from_str_named(text: &str, file: &str) -> Result<Building, SimError> {
        let b: Building = toml::from_str(text).map_err(|e| SimError::Invalid {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        for u in &b.unit {
            let bad = |message: String| SimError::Invalid {
                file: file.to_string(),
                message,
            };
            match u.protocol {
                UnitProtocol::Modbus if !(1..=247).contains(&u.unit) => {
                    return Err(bad(format!(
                        "unit {} on {}: a Modbus unit id is 1 to 247",
                        u.unit, u.endpoint
                    )));
                }
                UnitProtocol::Dlt645 => {
                    let address = u.address.as_deref().unwrap_or_default();
                    crate::dlt645::Address::parse(address)
                        .map_err(|e| bad(format!("DL/T 645 unit on {}: {e}", u.endpoint)))?;
                    if let (Some(p), Some(o)) = (&u.password, &u.operator) {
                        crate::dlt645::data::Credentials::new(u.password_level, p, o)
                            .map_err(|e| bad(format!("DL/T 645 unit {address}: {e}")))?;
                    }
                    if b.endpoint
                        .iter()
                        .any(|e| e.name == u.endpoint && e.kind == EndpointKind::Tcp)
                    {
                        return Err(bad(format!("DL/T 645 unit {address}: endpoint {} is Modbus TCP; DL/T 645 meters sit on a serial line (kind = \"rtu\" or \"rtu_over_tcp\")", u.endpoint)));
                    }
                }
                UnitProtocol::Cjt188 => {
                    let address = u.address.as_deref().unwrap_or_default();
                    crate::cjt188::Address::parse(address)
                        .map_err(|e| bad(format!("CJ/T 188 unit on {}: {e}", u.endpoint)))?;
                    if b.endpoint
                        .iter()
                        .any(|e| e.name == u.endpoint && e.kind == EndpointKind::Tcp)
                    {
                        return Err(bad(format!("CJ/T 188 unit {address}: endpoint {} is Modbus TCP; CJ/T 188 meters sit on a serial line (kind = \"rtu\" or \"rtu_over_tcp\")", u.endpoint)));
                    }
                }
                UnitProtocol::Modbus => {}
            }
            if !b.endpoint.iter().any(|e| e.name == u.endpoint) {
                return Err(SimError::Invalid {
                    file: file.to_string(),
                    message: format!("unit {} names unknown endpoint {:?}", u.unit, u.endpoint),
                });
            }
        }
        Ok(b)
    }

    /// Reads a building file.
    pub fn from_path(path: &Path) -> Result<Building, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Building::from_str_named(&text, &path.display().to_string())
    }
}

/// Where a started endpoint can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddr {
    Tcp(SocketAddr),
    RtuOverTcp(SocketAddr),
    /// Open this path as a serial port.
    Pty(PathBuf),
}

impl std::fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointAddr::Tcp(a) => write!(f, "modbus tcp {a}"),
            EndpointAddr::RtuOverTcp(a) => write!(f, "rtu over tcp {a}"),
            EndpointAddr::Pty(p) => write!(f, "rtu pty {}", p.display()),
        }
    }
}

/// A running simulator; dropping it stops every endpoint.
pub struct RunningSim {
    pub endpoints: Vec<(String, EndpointAddr)>,
    units: HashMap<(String, u8), Arc<SimUnit>>,
    lines: HashMap<String, Arc<SharedLine>>,
    tasks: Vec<JoinHandle<()>>,
}

/// What an RTU line emulator saw: requests, and the silence the master left before each.
#[derive(Debug)]
pub struct LineLog {
    /// Request frames the master sent.
    pub requests: AtomicU64,
    /// Requests that started less than t3.5 after the previous frame on the line ended: on a real
    /// line the slaves would have merged them with that frame.
    pub gap_violations: AtomicU64,
    /// The shortest silence before a request, µs (`u64::MAX` until the second frame).
    pub shortest_gap_us: AtomicU64,
    /// Frames the units (and injected noise) put on the line.
    pub answers: AtomicU64,
}

impl Default for LineLog {
    fn default() -> LineLog {
        LineLog {
            requests: AtomicU64::new(0),
            gap_violations: AtomicU64::new(0),
            shortest_gap_us: AtomicU64::new(u64::MAX),
            answers: AtomicU64::new(0),
        }
    }
}

impl LineLog {
    /// Requests, gap violations, shortest gap (for test messages).
    pub fn summary(&self) -> (u64, u64, Option<Duration>) {
        let g = self.shortest_gap_us.load(Ordering::Relaxed);
        (
            self.requests.load(Ordering::Relaxed),
            self.gap_violations.load(Ordering::Relaxed),
            (g != u64::MAX).then(|| Duration::from_micros(g)),
        )
    }
}

/// Bytes to put on the line when their time comes.
type WireTx = mpsc::UnboundedSender<(Instant, Vec<u8>)>;

/// Per RTU endpoint: its log, and the noise inlets of the clients connected now.
#[derive(Default)]
struct SharedLine {
    log: LineLog,
    noise: Mutex<Vec<WireTx>>,
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RunningSim {
    /// The address of a named endpoint.
    #[must_use]
    pub fn addr(&self, endpoint: &str) -> Option<&EndpointAddr> {
        self.endpoints
            .iter()
            .find(|(n, _)| n == endpoint)
            .map(|(_, a)| a)
    }

    /// Requests a unit has answered (or ignored, when dead) so far.
    #[must_use]
    pub fn requests_seen(&self, endpoint: &str, unit: u8) -> u64 {
        self.units
            .get(&(endpoint.to_string(), unit))
            .map_or(0, |u| u.state.lock().map_or(0, |s| s.requests))
    }

    /// Writes a unit has received so far (coils and registers).
    #[must_use]
    pub fn writes_seen(&self, endpoint: &str, unit: u8) -> u64 {
        self.units
            .get(&(endpoint.to_string(), unit))
            .map_or(0, |u| u.state.lock().map_or(0, |s| s.writes))
    }

    /// Sets a coil as a technician in the cabinet would (tests, demo).
    pub fn set_coil(&self, endpoint: &str, unit: u8, address: u16, on: bool) {
        if let Some(u) = self.units.get(&(endpoint.to_string(), unit)) {
            if let Ok(mut s) = u.state.lock() {
                s.coils.insert(address, on);
            }
        }
    }

    /// Sets a discrete input (a door contact, a fire-alarm loop).
    pub fn set_input(&self, endpoint: &str, unit: u8, address: u16, on: bool) {
        if let Some(u) = self.units.get(&(endpoint.to_string(), unit)) {
            if let Ok(mut s) = u.state.lock() {
                s.inputs.insert(address, on);
            }
        }
    }

    /// Changes a unit's own answer delay at run time: a meter that starts (or stops) answering late.
    pub fn set_delay(&self, endpoint: &str, unit: u8, delay: Duration) {
        if let Some(u) = self.units.get(&(endpoint.to_string(), unit)) {
            if let Ok(mut s) = u.state.lock() {
                s.delay = delay;
            }
        }
    }

    /// Changes a unit's own load at run time (a tenant switching on a heater); energy up to now is
    /// counted at the old load.
    pub fn set_load(&self, endpoint: &str, unit: u8, load_w: f64) {
        if let Some(u) = self.units.get(&(endpoint.to_string(), unit)) {
            let downstream = u.downstream();
            if let Ok(mut s) = u.state.lock() {
                s.advance(&u.profile, downstream);
                s.load_w = load_w;
            }
        }
    }

    /// What the line emulator of an RTU endpoint has seen (`None` for Modbus TCP endpoints).
    #[must_use]
    pub fn line(&self, endpoint: &str) -> Option<&LineLog> {
        self.lines.get(endpoint).map(|l| &l.log)
    }

    /// Puts `bytes` of noise on an RTU endpoint's line, as a contactor switching next to the cable
    /// would: every client connected to it receives them.
    pub fn inject_noise(&self, endpoint: &str, bytes: &[u8]) {
        if let Some(l) = self.lines.get(endpoint) {
            if let Ok(mut txs) = l.noise.lock() {
                txs.retain(|tx| tx.send((line_now(), bytes.to_vec())).is_ok());
            }
        }
    }
}

/// One unit's live state.
struct SimUnit {
    spec: UnitSpec,
    profile: Arc<Profile>,
    /// Downstream units whose load this one also measures (resolved at start).
    feeds: std::sync::OnceLock<Vec<Arc<SimUnit>>>,
    /// Registers sorted by (function, address) for range lookups.
    sorted: Vec<RegisterDef>,
    state: Mutex<UnitState>,
}

struct UnitState {
    energy_kwh: f64,
    water_m3: f64,
    load_w: f64,
    flow_m3h: f64,
    last: Instant,
    coils: BTreeMap<u16, bool>,
    inputs: BTreeMap<u16, bool>,
    holding: BTreeMap<u16, u16>,
    requests: u64,
    answers: u64,
    /// Writes received (coils and registers).
    writes: u64,
    /// Extra turnaround on top of the endpoint's (from the spec; changed at run time by tests).
    delay: Duration,
    /// Load and flow of the fed units at the last advance.
    downstream_w: f64,
    downstream_flow: f64,
}

impl UnitState {
    /// Integrates load and flow up to now; consumption stops while the unit's cut-off output is off.
    /// `downstream_w` is what the units this meter feeds draw.
    fn advance(&mut self, profile: &Profile, (downstream_w, downstream_flow): (f64, f64)) {
        let now = line_now();
        let hours = (now - self.last).as_secs_f64() / 3600.0;
        self.last = now;
        self.downstream_w = downstream_w;
        self.downstream_flow = downstream_flow;
        if self.supply_on(profile) {
            self.energy_kwh += (self.load_w + downstream_w) * hours / 1000.0;
            self.water_m3 += (self.flow_m3h + downstream_flow) * hours;
        }
    }

    fn supply_on(&self, profile: &Profile) -> bool {
        profile
            .outputs
            .iter()
            .filter(|o| o.readback.is_some() && o.function == Function::Holding)
            .all(|o| {
                self.holding
                    .get(&o.address)
                    .is_none_or(|v| *v != o.off_value)
            })
    }

    fn value_of(&self, reg: &RegisterDef, profile: &Profile) -> f64 {
        let on = self.supply_on(profile);
        let load = if on {
            self.load_w + self.downstream_w
        } else {
            0.0
        };
        match reg.quantity {
            Quantity::EnergyKwh | Quantity::EnergyOtherKwh => self.energy_kwh,
            Quantity::EnergyExportKwh => 0.0,
            Quantity::WaterM3 => self.water_m3,
            Quantity::FlowM3h => {
                if on {
                    self.flow_m3h + self.downstream_flow
                } else {
                    0.0
                }
            }
            Quantity::PowerW | Quantity::ApparentPowerVa => load,
            Quantity::ReactivePowerVar => 0.0,
            Quantity::VoltageV => 230.0,
            Quantity::CurrentA => load / 230.0,
            Quantity::FrequencyHz => 50.0,
            Quantity::PowerFactor => 1.0,
            Quantity::PulseCount => self.water_m3 / 0.01,
            Quantity::PrepaidRemaining => 100.0,
            Quantity::RelayState
            | Quantity::DigitalInput
            | Quantity::ValveState
            | Quantity::Other => 0.0,
        }
    }
}

impl SimUnit {
    /// Power drawn through this meter now: its own load (when its supply is on) plus its feeds'.
    fn load_w(&self) -> f64 {
        self.through(|s| s.load_w)
    }

    /// Water flowing through this meter now, likewise.
    fn flow_m3h(&self) -> f64 {
        self.through(|s| s.flow_m3h)
    }

    fn through(&self, own: fn(&UnitState) -> f64) -> f64 {
        let mine = self.state.lock().map_or(0.0, |s| {
            if s.supply_on(&self.profile) {
                own(&s)
            } else {
                0.0
            }
        });
        mine + self
            .feeds
            .get()
            .map_or(0.0, |f| f.iter().map(|u| u.through(own)).sum::<f64>())
    }

    /// What the fed units draw: (power W, flow m³/h).
    fn downstream(&self) -> (f64, f64) {
        self.feeds.get().map_or((0.0, 0.0), |f| {
            (
                f.iter().map(|u| u.load_w()).sum(),
                f.iter().map(|u| u.flow_m3h()).sum(),
            )
        })
    }

    fn new(spec: UnitSpec, profile: Arc<Profile>) -> SimUnit {
        let mut sorted = profile.registers.clone();
        sorted.sort_by_key(|r| (r.function, r.address));
        let mut holding = BTreeMap::new();
        // Outputs start energised (supply on, valve open): a fresh install is not a cut-off.
        for o in &profile.outputs {
            if o.function == Function::Holding {
                holding.insert(o.address, o.on_value);
            }
        }
        let state = UnitState {
            energy_kwh: spec.start_kwh,
            water_m3: spec.start_m3,
            load_w: spec.load_w,
            flow_m3h: spec.flow_m3h,
            last: line_now(),
            coils: BTreeMap::new(),
            inputs: BTreeMap::new(),
            holding,
            requests: 0,
            answers: 0,
            writes: 0,
            delay: spec.delay.unwrap_or_default(),
            downstream_w: 0.0,
            downstream_flow: 0.0,
        };
        SimUnit {
            spec,
            profile,
            feeds: std::sync::OnceLock::new(),
            sorted,
            state: Mutex::new(state),
        }
    }

    fn max_for(&self, f: Function) -> u16 {
        self.profile.max_per_read(f)
    }

    /// Register words of `[address, address + count)` in table `f`, or exception 02 when the range
    /// touches nothing the profile defines (what meters answer for a read outside their map).
    fn read_words(
        &self,
        s: &UnitState,
        f: Function,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > self.max_for(f) {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let start = u32::from(address);
        let end = start + u32::from(count);
        let mut words = vec![0u16; usize::from(count)];
        let mut written = vec![false; usize::from(count)];
        let first = self
            .sorted
            .partition_point(|r| (r.function, u32::from(r.address) + 4) < (f, start));
        let mut any = false;
        for r in &self.sorted[first..] {
            if r.function != f || u32::from(r.address) >= end {
                break;
            }
            let r_end = u32::from(r.address) + u32::from(r.width());
            if r_end <= start {
                continue;
            }
            any = true;
            let value = (s.value_of(r, &self.profile) - r.offset) / r.scale;
            let ws = decode::encode(value, r.ty, r.word_order, r.byte_order)
                .unwrap_or_else(|_| vec![0; usize::from(r.width())]);
            for (i, w) in ws.iter().enumerate() {
                let a = u32::from(r.address) + i as u32;
                if a >= start && a < end && !written[(a - start) as usize] {
                    words[(a - start) as usize] = *w;
                    written[(a - start) as usize] = true;
                }
            }
        }
        if f == Function::Holding {
            for (a, v) in s.holding.range(address..) {
                if u32::from(*a) >= end {
                    break;
                }
                any = true;
                words[usize::from(*a - address)] = *v;
            }
        }
        if any {
            Ok(words)
        } else {
            Err(ExceptionCode::IllegalDataAddress)
        }
    }

    fn read_bits(
        &self,
        s: &UnitState,
        f: Function,
        address: u16,
        count: u16,
    ) -> Result<Vec<bool>, ExceptionCode> {
        if count == 0 || count > self.max_for(f) {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let end = u32::from(address) + u32::from(count);
        let defined = self.sorted.iter().any(|r| {
            r.function == f
                && u32::from(r.address) >= u32::from(address)
                && u32::from(r.address) < end
        });
        if !defined {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let table = if f == Function::Coil {
            &s.coils
        } else {
            &s.inputs
        };
        Ok((0..count)
            .map(|i| table.get(&(address + i)).copied().unwrap_or(false))
            .collect())
    }

    fn has(&self, f: Function, address: u16) -> bool {
        self.sorted
            .iter()
            .any(|r| r.function == f && r.address == address)
            || self
                .profile
                .outputs
                .iter()
                .any(|o| o.function == f && o.address == address)
    }

    /// Answers one request. `None` means stay silent.
    fn answer(&self, req: Request<'static>, tcp: bool) -> Option<Result<Response, ExceptionCode>> {
        // Fed units are locked one at a time, before this unit's own state (no lock cycles).
        let downstream = self.downstream();
        let mut s = self.state.lock().ok()?;
        s.requests += 1;
        match self.spec.fault {
            Fault::Dead => return None,
            Fault::Exception => return Some(Err(ExceptionCode::new(self.spec.exception_code))),
            _ => {}
        }
        s.advance(&self.profile, downstream);
        s.answers += 1;
        let garble = self.spec.fault == Fault::Corrupt
            && s.answers % u64::from(self.spec.corrupt_every.max(1)) == 0;
        // A stuck unit acknowledges writes but its outputs do not move.
        let stuck = self.spec.fault == Fault::Stuck;
        if matches!(
            req,
            Request::WriteSingleCoil(..)
                | Request::WriteMultipleCoils(..)
                | Request::WriteSingleRegister(..)
                | Request::WriteMultipleRegisters(..)
        ) {
            s.writes += 1;
        }
        let r =
            match req {
                Request::ReadCoils(a, n) => self
                    .read_bits(&s, Function::Coil, a, n)
                    .map(Response::ReadCoils),
                Request::ReadDiscreteInputs(a, n) => self
                    .read_bits(&s, Function::DiscreteInput, a, n)
                    .map(Response::ReadDiscreteInputs),
                Request::ReadHoldingRegisters(a, n) => {
                    self.read_words(&s, Function::Holding, a, n).map(|mut w| {
                        if garble && tcp {
                            w.pop();
                        }
                        Response::ReadHoldingRegisters(w)
                    })
                }
                Request::ReadInputRegisters(a, n) => {
                    self.read_words(&s, Function::Input, a, n).map(|mut w| {
                        if garble && tcp {
                            w.pop();
                        }
                        Response::ReadInputRegisters(w)
                    })
                }
                Request::WriteSingleCoil(a, v) => {
                    if self.has(Function::Coil, a) {
                        if !stuck {
                            s.coils.insert(a, v);
                        }
                        Ok(Response::WriteSingleCoil(a, v))
                    } else {
                        Err(ExceptionCode::IllegalDataAddress)
                    }
                }
                Request::WriteMultipleCoils(a, vs) => {
                    if (0..vs.len() as u16).all(|i| self.has(Function::Coil, a + i)) {
                        for (i, v) in vs.iter().enumerate() {
                            if !stuck {
                                s.coils.insert(a + i as u16, *v);
                            }
                        }
                        Ok(Response::WriteMultipleCoils(a, vs.len() as u16))
                    } else {
                        Err(ExceptionCode::IllegalDataAddress)
                    }
                }
                Request::WriteSingleRegister(a, v) => {
                    if self.profile.outputs.iter().any(|o| {
                        o.address == a && o.function == Function::Holding && o.write_multiple
                    }) {
                        // Like the DDS238, ignore FC06 where the device only takes FC16.
                        return None;
                    }
                    if self.has(Function::Holding, a) {
                        if !stuck {
                            s.holding.insert(a, v);
                        }
                        Ok(Response::WriteSingleRegister(a, v))
                    } else {
                        Err(ExceptionCode::IllegalDataAddress)
                    }
                }
                Request::WriteMultipleRegisters(a, vs) => {
                    if self.has(Function::Holding, a) {
                        for (i, v) in vs.iter().enumerate() {
                            if !stuck {
                                s.holding.insert(a + i as u16, *v);
                            }
                        }
                        Ok(Response::WriteMultipleRegisters(a, vs.len() as u16))
                    } else {
                        Err(ExceptionCode::IllegalDataAddress)
                    }
                }
                _ => Err(ExceptionCode::IllegalFunction),
            };
        Some(r)
    }

    fn garble_next(&self) -> bool {
        self.spec.fault == Fault::Corrupt
            && self.state.lock().is_ok_and(|s| {
                s.answers > 0 && s.answers % u64::from(self.spec.corrupt_every.max(1)) == 0
            })
    }
}

/// The tokio-modbus service of one endpoint.
#[derive(Clone)]
struct EndpointService {
    units: Arc<HashMap<u8, Arc<SimUnit>>>,
    delay: Duration,
    tcp: bool,
}

type BoxFut = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl Service for EndpointService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = BoxFut;

    fn call(&self, req: Self::Request) -> Self::Future {
        let unit = self.units.get(&req.slave).cloned();
        let delay = self.delay;
        let tcp = self.tcp;
        Box::pin(async move {
            let Some(unit) = unit else {
                // A TCP gateway reports an absent unit; on a serial line nobody answers.
                return if tcp {
                    Err(ExceptionCode::GatewayTargetDevice)
                } else {
                    Ok(None)
                };
            };
            let own = unit.state.lock().map(|s| s.delay).unwrap_or_default();
            let answer = unit.answer(req.request, tcp);
            // On RTU lines the line emulator delays each answer, so the server never blocks the
            // line behind a slow unit (a real bus does not wait for it either).
            let delay = if tcp { delay + own } else { Duration::ZERO };
            if !delay.is_zero() && answer.is_some() {
                crate::clock::sleep_until_precise(line_now() + delay).await;
            }
            match answer {
                None => Ok(None),
                Some(Ok(r)) => Ok(Some(r)),
                Some(Err(e)) => Err(e),
            }
        })
    }
}

/// Starts every endpoint of `building`, resolving profiles from `profiles`.
pub async fn start(
    building: &Building,
    profiles: &BTreeMap<String, Arc<Profile>>,
) -> Result<RunningSim, SimError> {
    let mut sim = RunningSim {
        endpoints: Vec::new(),
        units: HashMap::new(),
        lines: HashMap::new(),
        tasks: Vec::new(),
    };
    let dlt645_profiles = crate::dlt645::profile::builtin().map_err(|e| SimError::Invalid {
        file: "<builtin DL/T 645 profiles>".into(),
        message: format!("{e:?}"),
    })?;
    for ep in &building.endpoint {
        let mut units = HashMap::new();
        let meters645 = Arc::new(dlt645::meters(building, &ep.name, &dlt645_profiles)?);
        let meters188 = Arc::new(cjt188::meters(building, &ep.name)?);
        for u in building
            .unit
            .iter()
            .filter(|u| u.endpoint == ep.name && u.protocol == UnitProtocol::Modbus)
        {
            let profile = profiles
                .get(&u.profile)
                .cloned()
                .ok_or_else(|| SimError::Invalid {
                    file: "building".into(),
                    message: format!(
                        "unit {} on {}: unknown profile {:?}",
                        u.unit, ep.name, u.profile
                    ),
                })?;
            let unit = Arc::new(SimUnit::new(u.clone(), profile));
            sim.units.insert((ep.name.clone(), u.unit), unit.clone());
            if units.insert(u.unit, unit).is_some() {
                return Err(SimError::Invalid {
                    file: "building".into(),
                    message: format!("unit {} appears twice on endpoint {}", u.unit, ep.name),
                });
            }
        }
        let service = EndpointService {
            units: Arc::new(units),
            delay: ep.response_delay.unwrap_or_default(),
            tcp: ep.kind == EndpointKind::Tcp,
        };
        let addr = match ep.kind {
            EndpointKind::Tcp | EndpointKind::RtuOverTcp => {
                let listener =
                    TcpListener::bind(&ep.listen)
                        .await
                        .map_err(|source| SimError::Listen {
                            endpoint: ep.name.clone(),
                            addr: ep.listen.clone(),
                            source,
                        })?;
                let local = listener.local_addr().map_err(|source| SimError::Listen {
                    endpoint: ep.name.clone(),
                    addr: ep.listen.clone(),
                    source,
                })?;
                let kind = ep.kind;
                let name = ep.name.clone();
                let shared = Arc::new(SharedLine::default());
                if kind == EndpointKind::RtuOverTcp {
                    sim.lines.insert(ep.name.clone(), shared.clone());
                }
                let line = LineTiming::of(ep);
                let endpoint_delay = service.delay;
                sim.tasks.push(tokio::spawn(async move {
                    let on_error = |e| tracing::debug!(error = %e, "simulator connection ended");
                    let r = if kind == EndpointKind::Tcp {
                        let on_connected = |stream: tokio::net::TcpStream, _addr| {
                            let service = service.clone();
                            let _ = stream.set_nodelay(true);
                            async move { Ok(Some((service, stream))) }
                        };
                        tokio_modbus::server::tcp::Server::new(listener)
                            .serve(&on_connected, on_error)
                            .await
                    } else {
                        // The gateway's serial side: the client's socket goes through a line
                        // emulator to the server, which reads its end of an in-memory pipe.
                        let on_connected = |stream: tokio::net::TcpStream, _addr| {
                            let service = service.clone();
                            let _ = stream.set_nodelay(true);
                            let (server_end, line_end) = tokio::io::duplex(4096);
                            tokio::spawn(relay(
                                stream,
                                line_end,
                                LineSetup {
                                    timing: line,
                                    units: service.units.clone(),
                                    dlt645: meters645.clone(),
                                    cjt188: meters188.clone(),
                                    delay: endpoint_delay,
                                    shared: shared.clone(),
                                    reopens: false,
                                },
                            ));
                            async move { Ok(Some((service, server_end))) }
                        };
                        tokio_modbus::server::rtu_over_tcp::Server::new(listener)
                            .serve(&on_connected, on_error)
                            .await
                    };
                    if let Err(e) = r {
                        tracing::error!(endpoint = %name, error = %e, "simulator endpoint stopped");
                    }
                }));
                if kind == EndpointKind::Tcp {
                    EndpointAddr::Tcp(local)
                } else {
                    EndpointAddr::RtuOverTcp(local)
                }
            }
            EndpointKind::Rtu => {
                let pty_err = |e: tokio_serial::Error| SimError::Pty {
                    endpoint: ep.name.clone(),
                    detail: e.to_string(),
                };
                let (server_side, line_a) = SerialStream::pair().map_err(pty_err)?;
                let (line_b, client_side) = SerialStream::pair().map_err(pty_err)?;
                // The client opens its end by path (with an exclusive lock, like a real port), so ours
                // is closed; the relay waits while no client has it open.
                let path = client_side
                    .name()
                    .map(PathBuf::from)
                    .ok_or_else(|| SimError::Pty {
                        endpoint: ep.name.clone(),
                        detail: "the pty has no path".into(),
                    })?;
                drop(client_side);
                let shared = Arc::new(SharedLine::default());
                sim.lines.insert(ep.name.clone(), shared.clone());
                let setup = LineSetup {
                    timing: LineTiming::of(ep),
                    units: service.units.clone(),
                    dlt645: meters645.clone(),
                    cjt188: meters188.clone(),
                    delay: service.delay,
                    shared,
                    reopens: true,
                };
                sim.tasks.push(tokio::spawn(async move {
                    if let Err(e) = tokio_modbus::server::rtu::Server::new(server_side)
                        .serve_forever(service)
                        .await
                    {
                        tracing::error!(error = %e, "simulator rtu endpoint stopped");
                    }
                }));
                sim.tasks.push(tokio::spawn(relay(line_b, line_a, setup)));
                EndpointAddr::Pty(path)
            }
        };
        sim.endpoints.push((ep.name.clone(), addr));
    }
    for ((ep, unit), u) in &sim.units {
        let mut feeds = Vec::new();
        for r in &u.spec.sum_of {
            let target = r
                .split_once(':')
                .and_then(|(e, n)| n.parse::<u8>().ok().map(|n| (e.to_string(), n)))
                .and_then(|k| sim.units.get(&k).cloned())
                .ok_or_else(|| SimError::Invalid {
                    file: "building".into(),
                    message: format!("unit {unit} on {ep}: sum_of entry {r:?} is not \"endpoint:unit\" of a unit in the building"),
                })?;
            feeds.push(target);
        }
        let _ = u.feeds.set(feeds);
    }
    for ((ep, unit), u) in &sim.units {
        if reaches(u, u, 0) {
            return Err(SimError::Invalid {
                file: "building".into(),
                message: format!("unit {unit} on {ep}: sum_of forms a cycle"),
            });
        }
    }
    Ok(sim)
}

/// Whether `target` is among the units `from` sums, at any depth (a unit that sums itself would
/// recurse forever).
fn reaches(from: &Arc<SimUnit>, target: &Arc<SimUnit>, depth: usize) -> bool {
    depth > 64
        || from.feeds.get().is_some_and(|f| {
            f.iter()
                .any(|u| Arc::ptr_eq(u, target) || reaches(u, target, depth + 1))
        })
}

/// Wire timing of an emulated RS485 line.
#[derive(Debug, Clone, Copy)]
struct LineTiming {
    baud: Option<u32>,
    bits: u32,
}

impl LineTiming {
    fn of(ep: &EndpointSpec) -> LineTiming {
        let parity = !matches!(ep.parity.unwrap_or(Parity::Even), Parity::None);
        LineTiming {
            baud: ep.baud,
            bits: timing::bits_per_char(parity, ep.stop_bits.unwrap_or(1)),
        }
    }

    fn frame(&self, bytes: usize) -> Duration {
        self.baud
            .map(|b| timing::wire_time(bytes, b, self.bits))
            .unwrap_or_default()
    }

    fn t35(&self) -> Duration {
        self.baud.map(timing::t35).unwrap_or_default()
    }
}

/// A request in one of China's national protocols, seen on a simulated line.
enum National {
    Dlt645(crate::dlt645::Frame),
    Cjt188(crate::cjt188::Frame),
}

/// What a line emulator needs to know about its line.
struct LineSetup {
    timing: LineTiming,
    units: Arc<HashMap<u8, Arc<SimUnit>>>,
    /// DL/T 645 meters on the same line.
    dlt645: Arc<Vec<Arc<dlt645::Meter>>>,
    /// CJ/T 188 meters on the same line.
    cjt188: Arc<Vec<Arc<cjt188::Meter>>>,
    /// The endpoint's turnaround, added to every answer.
    delay: Duration,
    shared: Arc<SharedLine>,
    /// The client side is a pty that the next client reopens (rather than a socket that ends).
    reopens: bool,
}

/// The RS485 line between the master (`client`) and the server of the units (`server`), the way a
/// real bus behaves:
/// - a request reaches the units after its wire time and the t3.5 silence that ends it; the
///   silence the master left before it is measured against t3.5 and violations are counted;
/// - each answer goes out when its unit is ready (turnaround plus the unit's own delay), whatever
///   the master did meanwhile: a late unit answers in its own time while the master moves on, and
///   answers never overlap (each waits for the line to be free);
/// - a unit set to corrupt gets its CRC flipped; injected noise goes out like an answer.
async fn relay<C, S>(client: C, server: S, setup: LineSetup)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let LineSetup {
        timing,
        units,
        dlt645: meters645,
        cjt188: meters188,
        delay,
        shared,
        reopens,
    } = setup;
    let (mut cli_rx, mut cli_tx) = tokio::io::split(client);
    let (mut srv_rx, mut srv_tx) = tokio::io::split(server);
    // End of the last frame on the wire, either direction.
    let line_free = Arc::new(Mutex::new(line_now()));
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    if let Ok(mut n) = shared.noise.lock() {
        n.push(out_tx.clone());
    }
    let log = shared.clone();
    let free = line_free.clone();
    let national_tx = out_tx.clone();
    let requests = async move {
        let mut buf = vec![0u8; 512];
        let mut pending: Vec<u8> = Vec::new();
        let mut frame_start = line_now();
        loop {
            let n = match cli_rx.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ if reopens => {
                    // The client closed its end: wait for the next one.
                    pending.clear();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                _ => return,
            };
            let arrived = line_now();
            if pending.is_empty() {
                frame_start = arrived;
            }
            pending.extend_from_slice(&buf[..n]);
            // Forward whole frames; what cannot be a request goes through as it is. Each frame's
            // silence is measured from the end of the last frame on the wire to its first byte; a
            // frame that came in the same read as the one before it follows it without any.
            while !pending.is_empty() {
                // A DL/T 645 or CJ/T 188 request goes to those meters of the line, not the Modbus
                // server.
                let (len, national) = match (dlt645::scan(&pending), cjt188::scan(&pending)) {
                    (dlt645::Scan::Frame(len, frame), _) => {
                        (Some(len), Some(National::Dlt645(frame)))
                    }
                    (_, cjt188::Scan::Frame(len, frame)) => {
                        (Some(len), Some(National::Cjt188(frame)))
                    }
                    (dlt645::Scan::Wait, _) | (_, cjt188::Scan::Wait) => break,
                    (dlt645::Scan::NotOurs, cjt188::Scan::NotOurs) => (None, None),
                };
                let len = match len {
                    Some(len) => len,
                    None => match crate::modbus::frame::request_len(&pending) {
                        Some(len) if pending.len() >= len => len,
                        Some(_) => break,
                        None if pending.len() < 2 => break,
                        None => pending.len(),
                    },
                };
                let frame: Vec<u8> = pending.drain(..len).collect();
                let prev_end = free.lock().map_or(frame_start, |f| *f);
                let gap = frame_start.saturating_duration_since(prev_end);
                let l = &log.log;
                if l.requests.fetch_add(1, Ordering::Relaxed) > 0
                    || l.answers.load(Ordering::Relaxed) > 0
                {
                    l.shortest_gap_us
                        .fetch_min(gap.as_micros() as u64, Ordering::Relaxed);
                    if timing.baud.is_some() && gap < timing.t35() {
                        l.gap_violations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let end = frame_start.max(prev_end) + timing.frame(len);
                if let Ok(mut f) = free.lock() {
                    *f = (*f).max(end);
                }
                frame_start = end;
                if let Some(request) = national {
                    // Every meter the request addresses answers in its own time; several answering
                    // one wildcard read collide into noise, as on a real line.
                    let answers: Vec<(std::time::Duration, Vec<u8>)> = match &request {
                        National::Dlt645(r) => meters645
                            .iter()
                            .filter(|m| m.addressed(r))
                            .filter_map(|m| m.answer(r).map(|a| (m.delay(), a)))
                            .collect(),
                        National::Cjt188(r) => meters188
                            .iter()
                            .filter(|m| m.addressed(r))
                            .filter_map(|m| m.answer(r).map(|a| (m.delay(), a)))
                            .collect(),
                    };
                    let out = match answers.as_slice() {
                        [] => None,
                        [(own, a)] => Some((end + delay + *own, a.clone())),
                        many => Some((end + delay, vec![0xFF; many[0].1.len()])),
                    };
                    if let Some(out) = out {
                        if national_tx.send(out).is_err() {
                            return;
                        }
                    }
                    continue;
                }
                crate::clock::sleep_until_precise(end + timing.t35()).await;
                if srv_tx.write_all(&frame).await.is_err() {
                    return;
                }
            }
        }
    };
    let answers = async move {
        let mut buf = vec![0u8; 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match srv_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let arrived = line_now();
            pending.extend_from_slice(&buf[..n]);
            while let Some(len) = crate::modbus::frame::frame_at_start(&pending) {
                let mut frame: Vec<u8> = pending.drain(..len).collect();
                let unit = units.get(&frame[0]);
                let own = unit
                    .and_then(|u| u.state.lock().ok().map(|s| s.delay))
                    .unwrap_or_default();
                if unit.is_some_and(|u| u.garble_next()) {
                    if let Some(last) = frame.last_mut() {
                        *last ^= 0xFF;
                    }
                }
                if out_tx.send((arrived + delay + own, frame)).is_err() {
                    return;
                }
            }
            if pending.len() > 512 {
                pending.clear();
            }
        }
    };
    let log = shared.clone();
    let wire = async move {
        // Answers by the time their unit is ready, in order of readiness.
        let mut queue: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u64, Vec<u8>)>> =
            std::collections::BinaryHeap::default();
        let mut seq = 0u64;
        loop {
            let next = queue.peek().map(|std::cmp::Reverse((at, _, _))| *at);
            tokio::select! {
                m = out_rx.recv() => match m {
                    Some((at, bytes)) => {
                        seq += 1;
                        queue.push(std::cmp::Reverse((at, seq, bytes)));
                    }
                    None => return,
                },
                () = crate::clock::sleep_until_precise(next.unwrap_or_else(line_now)), if next.is_some() => {
                    let Some(std::cmp::Reverse((at, _, bytes))) = queue.pop() else { continue };
                    let start = line_free.lock().map_or(at, |f| (*f).max(at));
                    let end = start + timing.frame(bytes.len());
                    if let Ok(mut f) = line_free.lock() {
                        *f = end;
                    }
                    crate::clock::sleep_until_precise(end).await;
                    log.log.answers.fetch_add(1, Ordering::Relaxed);
                    if cli_tx.write_all(&bytes).await.is_err() && !reopens {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = answers => {}
        () = wire => {}
    }
}

/// Loads a building and the profiles next to it (`<building dir>/profiles`).
pub fn load(path: &Path) -> Result<(Building, BTreeMap<String, Arc<Profile>>), anyhow::Error> {
    let building = Building::from_path(path)?;
    let dir = path.parent().unwrap_or(Path::new(".")).join("profiles");
    let profiles = config::load_profiles(&dir).map_err(|issues| {
        anyhow::anyhow!(issues
            .iter()
            .map(std::string::ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"))
    })?;
    Ok((building, profiles))
}
