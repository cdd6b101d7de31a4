//! The field engineer's command line. Each subcommand is one type with one `execute`.
//!
//! Exit codes (stable, documented in the README): 0 success; 1 a runtime failure (bus, device, I/O);
//! 2 bad usage (clap); 3 the configuration is invalid or unreadable; 4 a device answered with a Modbus
//! exception.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::{self, Config, ConfigError, Transport};
use crate::modbus::bus::{self, DeviceStatus};
use crate::modbus::decode::{self, ByteOrder, DataType, WordOrder};
use crate::modbus::link::{Data, Link, LinkError};
use crate::modbus::plan::ReadRequest;
use crate::modbus::profile::Function;
use crate::reading::{Quality, Reading};
use crate::{daemon, sim};

/// Exit code: the configuration is invalid or cannot be read.
pub const EXIT_CONFIG: i32 = 3;
/// Exit code: the device answered with a Modbus exception.
pub const EXIT_EXCEPTION: i32 = 4;

/// meterd: Modbus meter polling at the edge of a building.
#[derive(Debug, Parser)]
#[command(name = "meterd", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace or a tracing directive). Default: `RUST_LOG`, then
    /// `[gateway] log_level` for `run`, then info.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: poll every configured device.
    Run(RunCmd),
    /// Validate a configuration and list every problem.
    Check(CheckCmd),
    /// Read one device now and print its decoded values.
    Read(ReadCmd),
    /// Find which unit ids answer on a bus.
    Scan(ScanCmd),
    /// Read or write registers and coils by address (like mbpoll).
    Raw(RawCmd),
    /// List the device profiles, or show one.
    Profiles(ProfilesCmd),
    /// Show the outbox: depth, oldest record, last publish error.
    Buffer(BufferCmd),
    /// Draw the meter trees with the latest readings and each node's loss.
    Topology(TopologyCmd),
    /// Compute the apportionment of common consumption for a month.
    Apportion(ApportionCmd),
    /// Per-room bills of a month: readings, consumption by band, pool shares, total.
    #[command(disable_version_flag = true)]
    Bill(BillCmd),
    /// Recompute a month's bills as a new version (after a correction), with per-room adjustments.
    Recompute(RecomputeCmd),
    /// Override a room's relays by hand, or list desired vs actual relay states.
    Relay(RelayCmd),
    /// Ask the running daemon how it is doing: buses, devices, outbox, MQTT, relays.
    Status(StatusCmd),
    /// Run the installation acceptance pass (hil/bench.toml), on hardware or the simulator.
    Acceptance(acceptance::AcceptanceCmd),
    /// Serve a virtual building over Modbus TCP and RTU (pty).
    Simulate(SimulateCmd),
    /// Run the simulator and the daemon together on the built-in sample building.
    Demo(DemoCmd),
    /// Measure throughput, CPU and memory against the targets.
    Bench(bench::BenchCmd),
}

/// `--config` shared by the commands that need one.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
}

impl ConfigArg {
    fn load(&self) -> Result<Config> {
        Config::from_path(&self.config).map_err(config_failure)
    }

    /// The file validated alone (`check --no-environment`).
    fn load_text_only(&self) -> Result<Config> {
        let text = std::fs::read_to_string(&self.config).map_err(|source| {
            config_failure(ConfigError::Read {
                path: self.config.clone(),
                source,
            })
        })?;
        let base = self.config.parent().unwrap_or(std::path::Path::new("."));
        Config::from_str_only(&text, &self.config.display().to_string(), base)
            .map_err(config_failure)
    }
}

/// Marks a config error so `main` exits with [`EXIT_CONFIG`].
#[derive(Debug)]
pub struct InvalidConfig(pub ConfigError);

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for InvalidConfig {}

fn config_failure(e: ConfigError) -> anyhow::Error {
    anyhow::Error::new(InvalidConfig(e))
}

/// Marks a Modbus exception so `main` exits with [`EXIT_EXCEPTION`].
#[derive(Debug)]
pub struct DeviceException(pub LinkError);
impl std::fmt::Display for DeviceException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for DeviceException {}

fn link_failure(e: LinkError) -> anyhow::Error {
    if e.device_answered() {
        anyhow::Error::new(DeviceException(e))
    } else {
        anyhow::Error::new(e)
    }
}

pub(crate) mod acceptance;
mod apportion;
pub(crate) mod bench;
mod bill;
mod buffer;
mod check;
mod demo;
mod output;
mod profiles;
mod raw;
mod read;
mod relay;
mod run;
mod scan;
mod simulate;
mod status;
mod topology;

pub use apportion::*;
pub use bill::*;
pub use buffer::*;
pub use check::*;
pub use demo::*;
pub use output::*;
pub use profiles::*;
pub use raw::*;
pub use read::*;
pub use relay::*;
pub use run::*;
pub use scan::*;
pub use simulate::*;
pub use status::*;
pub use topology::*;
