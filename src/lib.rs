//! meterd: the edge daemon of a building's sub-metering.
//!
//! Polls electricity and water meters over Modbus RTU/TCP, and (in later modules) checks the meter
//! topology, apportions common costs, enforces freeze rules on relays and forwards everything to the
//! cloud through a durable outbox. See `docs/architecture.md` for how the pieces fit.
#![forbid(unsafe_code)]
#![warn(unreachable_pub)]

pub mod accounting;
pub mod apportion;
pub mod bcd;
pub mod bill;
pub mod catalog;
pub mod cjt188;
pub mod cli;
pub mod clock;
#[cfg(meterd_planted_clock_calls)]
mod clock_check;
pub mod config;
pub(crate) mod control;
pub mod daemon;
pub mod dlt645;
pub mod enforce;
pub mod exchange;
pub mod framing;
pub mod modbus;
pub mod money;
pub mod report;
pub mod sim;
pub mod store;
pub mod topology;
pub(crate) mod tou;
pub mod uplink;
pub mod web;

/// Readings are produced by the Modbus layer; the crate root keeps the short path.
pub use modbus::reading;
