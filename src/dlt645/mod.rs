//! DL/T 645-2007, the national protocol of China's electricity meters (most installed sub-meters
//! and nearly all prepaid meters): frames ([`frame`]) and what they carry ([`data`]). Pure codecs
//! in the style of tokio-modbus; the facts, with their sources and the points where sources
//! disagree, are in `shared/reference/dlt645-cjt188.md` (section numbers below refer to it).

pub mod client;
pub mod data;
pub mod frame;
pub mod profile;

pub use data::{Di, Format};
pub use frame::{Address, Frame, Receiver};
