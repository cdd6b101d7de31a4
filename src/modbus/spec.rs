//! What the Modbus layer needs to know about a bus and a device, resolved: built by `config` from
//! the site file (and by tests directly), so the dependency points one way, config → modbus.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::plan::Plan;
use super::profile::Profile;
use super::schedule::PollPolicy;

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// Physical line settings of an RS485 port.
#[derive(Debug, Clone, PartialEq)]
pub struct Serial {
    pub device: String,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

/// How a bus reaches its devices.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// RS485 through a local serial port: one transaction at a time.
    Rtu(Serial),
    /// Modbus TCP: `max_concurrent` connections to the endpoint, one transaction in flight on each.
    Tcp {
        host: String,
        port: u16,
        max_concurrent: u16,
        connect_timeout: Duration,
    },
    /// A serial gateway (Moxa, USR) passing raw RTU frames over TCP: one transaction at a time.
    RtuOverTcp {
        host: String,
        port: u16,
        connect_timeout: Duration,
    },
}

/// One bus: a transport plus the timing every device on it shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    pub name: String,
    pub transport: Transport,
    /// Response timeout unless a device overrides it.
    pub timeout: Duration,
    /// Silence between the end of one transaction and the next request (≥ t3.5 on serial lines).
    pub gap: Duration,
    /// Wait after opening the connection before the first request (some gateways drop early ones).
    pub connect_delay: Duration,
}

impl Bus {
    /// Transactions that may be in flight at once: 1 on any RS485 line.
    pub(crate) fn concurrency(&self) -> usize {
        match &self.transport {
            Transport::Tcp { max_concurrent, .. } => usize::from(*max_concurrent),
            _ => 1,
        }
    }
}

/// How a device is read: Modbus by unit id, or one of China's national protocols by the address
/// on its nameplate (on a serial line, next to Modbus meters).
#[derive(Debug, Clone)]
pub enum Protocol {
    Modbus,
    /// DL/T 645-2007: the items of its DL/T 645 profile, one read each.
    Dlt645(Dlt645Meter),
    /// CJ/T 188-2004 water meter: its current data (901F).
    Cjt188(WaterMeter),
}

impl Protocol {
    /// The meter's address (its nameplate number), for a DL/T 645 or CJ/T 188 meter.
    #[must_use]
    pub fn address(&self) -> Option<String> {
        match self {
            Protocol::Modbus => None,
            Protocol::Dlt645(m) => Some(m.address.to_string()),
            Protocol::Cjt188(m) => Some(m.address.to_string()),
        }
    }
}

/// A DL/T 645 meter as the engine reads and switches it.
#[derive(Debug, Clone)]
pub struct Dlt645Meter {
    pub address: crate::dlt645::Address,
    pub profile: Arc<crate::dlt645::profile::Profile>,
    /// Password level, password and operator code for relay control (0x1C); never printed.
    pub credentials: Option<Arc<crate::dlt645::data::Credentials>>,
    /// Wake-up `FE`s before each request.
    pub preamble: usize,
}

/// A CJ/T 188 water meter as the engine reads it and switches its valve.
#[derive(Debug, Clone, Copy)]
pub struct WaterMeter {
    pub address: crate::cjt188::Address,
    pub meter_type: crate::cjt188::MeterType,
    pub order: crate::cjt188::DiOrder,
    /// Wake-up `FE`s before each request (battery meters need them).
    pub preamble: usize,
}

/// One polled device with everything resolved: its profile, read plan and poll policy.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: Arc<str>,
    /// Index into the config's bus list.
    pub bus: usize,
    pub unit: u8,
    pub profile: Arc<Profile>,
    /// Computed once at load; reused for every poll.
    pub plan: Plan,
    pub policy: PollPolicy,
    pub timeout: Duration,
    /// Extra silence this device needs before each request (profile quirk or config).
    pub pause: Duration,
    /// Modbus, or the national protocol it is read with (its `profile` then lists the readings it
    /// gives, and `plan` is empty).
    pub protocol: Protocol,
}
