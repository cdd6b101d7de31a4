//! Modbus: device profiles, register decoding, read planning, poll scheduling and the bus tasks
//! (which also poll the DL/T 645 and CJ/T 188 meters of a line, [`national`]).
//!
//! Everything but [`bus`] and [`link`] is pure: it takes data and returns data, so the protocol logic
//! is tested without a wire.

pub mod bus;
pub(crate) mod decode;
pub mod frame;
pub mod link;
mod national;
pub mod plan;
pub mod profile;
pub mod reading;
pub mod schedule;
pub(crate) mod spec;
pub mod timing;
