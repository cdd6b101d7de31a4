//! Freeze rules and relay enforcement: door access and prepaid utilities, safe while offline.
//!
//! [`rules`] decides (pure), [`prepaid`] meters consumption exactly and deducts it (pure), [`ledger`]
//! keeps every deduction and top-up, [`auth`] checks signed
//! commands (pure), [`state`] is the enforcer as a state machine (`step(now, event) -> actions`),
//! and the task in [`task`] executes its actions and drives the relays through the bus tasks.

pub mod auth;
pub(crate) mod command;
pub(crate) mod config;
pub(crate) mod ledger;
pub(crate) mod prepaid;
pub mod rules;
pub(crate) mod state;
pub mod task;
#[cfg(test)]
pub(crate) mod test_support;
