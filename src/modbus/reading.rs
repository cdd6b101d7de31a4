//! The unit of data that leaves the polling engine: one value of one device at one instant.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::profile::Quantity;

/// How far a reading can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// Decoded from a response received at `ts`.
    Good,
    /// The poll failed (timeout, exception, garbled frame); `value` is absent and `error` says why.
    Error,
    /// The device is offline; `value` is the last good one and `ts` when it was read.
    Stale,
}

/// Up to four raw registers of one value, kept for audit ("what did the meter actually say").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawWords {
    words: [u16; 4],
    len: u8,
}

impl RawWords {
    /// Copies up to four words.
    #[must_use]
    pub fn new(src: &[u16]) -> RawWords {
        let mut words = [0u16; 4];
        let len = src.len().min(4);
        words[..len].copy_from_slice(&src[..len]);
        RawWords {
            words,
            len: len as u8,
        }
    }

    /// The words as read.
    #[must_use]
    pub fn as_slice(&self) -> &[u16] {
        &self.words[..usize::from(self.len)]
    }
}

impl Serialize for RawWords {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

/// One value of one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    pub device: Arc<str>,
    /// Register name from the profile (`import_kwh`, `relay3`).
    pub register: Arc<str>,
    pub quantity: Quantity,
    /// Decoded and scaled; absent when the poll failed.
    pub value: Option<f64>,
    pub unit: Arc<str>,
    /// UTC time the value was read off the bus.
    pub ts: DateTime<Utc>,
    pub quality: Quality,
    pub raw: RawWords,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Arc<str>>,
}
