//! Modbus: device profiles, register decoding, read planning, poll scheduling and the bus tasks.
//!
//! Everything but [`bus`] and [`link`] is pure: it takes data and returns data, so the protocol logic
//! is tested without a wire.

pub mod bus;
pub(crate) mod decode;
pub mod frame;
pub mod link;
pub mod plan;
pub mod profile;
pub mod reading;
pub mod schedule;
pub(crate) mod spec;
pub mod timing;
