//! Wiring: one function that starts the tasks and reads like the architecture diagram.
//!
//! bus tasks (one per bus) ──Batch──▶ readings channel ──▶ consumer (log/`demo` table today; the
//! store and uplink of later issues).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::modbus::bus::{self, Batch, BusStatus};

/// Capacity of the readings channel, in poll batches. Large enough to absorb a slow consumer for a
/// few seconds; past that the bus tasks wait (backpressure) rather than drop readings.
pub const READINGS_CAPACITY: usize = 4096;

/// The running polling engine.
pub struct Engine {
    /// Every poll's readings, in completion order.
    pub readings: mpsc::Receiver<Batch>,
    /// Live counters per bus.
    pub status: Vec<Arc<BusStatus>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts one task per bus that has devices.
    pub fn start(config: &Config) -> Engine {
        let (tx, rx) = mpsc::channel(READINGS_CAPACITY);
        let mut status = Vec::new();
        let mut tasks = Vec::new();
        for (i, b) in config.buses.iter().enumerate() {
            let devices: Vec<_> = config
                .devices
                .iter()
                .filter(|d| d.bus == i)
                .cloned()
                .collect();
            let s = bus::new_status(b, &devices);
            status.push(s.clone());
            tasks.push(tokio::spawn(bus::run(b.clone(), devices, tx.clone(), s)));
        }
        Engine {
            readings: rx,
            status,
            tasks,
        }
    }

    /// Stops every bus task.
    pub fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}
