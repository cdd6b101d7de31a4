//! Shared helpers: start the project's simulator, build configs that point at it, wait for a
//! condition with a deadline.
#![allow(dead_code)]

pub mod broker;
pub mod link;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use meterd::clock::SimClock;
use meterd::config::Config;
use meterd::modbus::profile::{self, Profile};
use meterd::sim::{self, Building, EndpointAddr, RunningSim};

/// A billing test's clock: noon UTC on the 10th of the month the system clock is in, running on in
/// real time. "Last month" is then the same for the test's whole run on any date (a run started a
/// second before a month ends does not see the month turn under it), and it is last month of the
/// day the suite runs, never a month written into the test.
pub fn mid_month_clock() -> SimClock {
    let now = meterd::clock::Clock::system().now();
    let noon = Utc
        .with_ymd_and_hms(now.year(), now.month(), 10, 12, 0, 0)
        .unwrap();
    SimClock::starting_at(noon)
}

/// The month before the one `t` is in, as UTC bounds `[start, end)` and its `YYYY-MM` name.
pub fn month_before(t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>, String) {
    let first = |t: DateTime<Utc>| {
        Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
            .unwrap()
    };
    let end = first(t);
    let start = first(end - chrono::Duration::days(1));
    (start, end, start.format("%Y-%m").to_string())
}

pub fn builtin() -> BTreeMap<String, Arc<Profile>> {
    profile::builtin()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, Arc::new(v)))
        .collect()
}

pub async fn start(building: &str) -> RunningSim {
    let b = Building::from_str_named(building, "test building").unwrap();
    sim::start(&b, &builtin()).await.unwrap()
}

/// Validates config text as the daemon does (no site profile directory), failing the test with
/// every problem and the text.
pub fn parse(text: &str) -> Config {
    match Config::from_str_at(text, "test.toml", Path::new("/nonexistent")) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n---\n{text}"),
    }
}

/// The `[[bus]]` lines that reach a simulator endpoint (RTU lines at 9600 baud, even parity, unless
/// `extra` says otherwise).
pub fn bus_toml(name: &str, addr: &EndpointAddr, extra: &str) -> String {
    let bus = match addr {
        EndpointAddr::Tcp(a) => format!(
            "kind = \"tcp\"\nhost = \"{}\"\nport = {}\n",
            a.ip(),
            a.port()
        ),
        EndpointAddr::RtuOverTcp(a) => format!(
            "kind = \"rtu_over_tcp\"\nhost = \"{}\"\nport = {}\n",
            a.ip(),
            a.port()
        ),
        EndpointAddr::Pty(p) => {
            let mut line = format!("kind = \"rtu\"\ndevice = \"{}\"\n", p.display());
            if !extra.contains("baud") {
                line += "baud = 9600\n";
            }
            if !extra.contains("parity") {
                line += "parity = \"even\"\n";
            }
            line
        }
    };
    format!("[[bus]]\nname = \"{name}\"\n{bus}{extra}\n")
}

/// A test's configuration, section by section: `[gateway]` first, then what the test needs.
#[derive(Debug, Clone)]
pub struct ConfigText(String);

impl ConfigText {
    /// `[gateway]` with this id and timezone (billing boundaries follow the timezone).
    pub fn gateway(id: &str, timezone: &str) -> ConfigText {
        ConfigText(format!(
            "[gateway]\nid = \"{id}\"\nsite = \"test site\"\ntimezone = \"{timezone}\"\n"
        ))
    }

    /// A fragment without `[gateway]`, to be added to a whole config with [`ConfigText::with`].
    pub fn sections() -> ConfigText {
        ConfigText(String::new())
    }

    /// A `[gateway]` key beyond id, site and timezone (control socket, log level).
    pub fn gateway_key(mut self, line: &str) -> ConfigText {
        let end = self.0.find("\n[").map_or(self.0.len(), |i| i + 1);
        self.0.insert_str(end, &format!("{line}\n"));
        self
    }

    /// One `[[bus]]` per simulator endpoint, named as the simulator names it.
    pub fn buses_of(mut self, sim: &RunningSim, extra: &str) -> ConfigText {
        for (name, addr) in &sim.endpoints {
            self.0 += &bus_toml(name, addr, extra);
        }
        self
    }

    /// `[store]` in `dir` (a scratch directory), with `extra` lines.
    pub fn store(mut self, dir: &Path, extra: &str) -> ConfigText {
        self.0 += &format!(
            "[store]\npath = \"{}\"\n{extra}\n",
            dir.join("outbox.db").display()
        );
        self
    }

    /// `[mqtt]` to a broker on loopback with the tests' topic prefix and quick reconnects.
    pub fn mqtt(mut self, port: u16, extra: &str) -> ConfigText {
        self.0 += &format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ntopic_prefix = \"test\"\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n{extra}\n"
        );
        self
    }

    /// Any further sections, as written.
    pub fn with(mut self, toml: &str) -> ConfigText {
        self.0 += toml;
        self.0 += "\n";
        self
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    /// Validated as the daemon validates it.
    pub fn build(&self) -> Config {
        parse(&self.0)
    }
}

/// Config text with `[[bus]]` entries generated from the simulator's endpoints (same names).
pub fn config_for(sim: &RunningSim, extra_bus: &str, devices: &str) -> Config {
    ConfigText::gateway("test", "Europe/London")
        .buses_of(sim, extra_bus)
        .with(devices)
        .build()
}

/// Asks `probe` every 50 ms until it answers `Ok`, and returns that. After `timeout` the test
/// fails, naming `what` and the last state the probe described in its `Err`.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    wait_until_every(what, timeout, Duration::from_millis(50), probe).await
}

/// [`wait_until`], asking every `every` (a test that must act the moment something starts).
pub async fn wait_until_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = meterd::clock::Clock::system().instant() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(state) => assert!(
                meterd::clock::Clock::system().instant() < deadline,
                "timed out after {timeout:?} waiting for {what}: {state}"
            ),
        }
        tokio::time::sleep(every).await;
    }
}
