//! Shared helpers: start the project's simulator and build configs that point at it.
#![allow(dead_code)]

pub mod broker;
pub mod link;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use meterd::config::Config;
use meterd::modbus::profile::{self, Profile};
use meterd::sim::{self, Building, EndpointAddr, RunningSim};

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

/// Config text with `[[bus]]` entries generated from the simulator's endpoints (same names).
pub fn config_for(sim: &RunningSim, extra_bus: &str, devices: &str) -> Config {
    let mut text =
        String::from("[gateway]\nid = \"test\"\nsite = \"test\"\ntimezone = \"Europe/London\"\n");
    for (name, addr) in &sim.endpoints {
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
            EndpointAddr::Pty(p) => format!(
                "kind = \"rtu\"\ndevice = \"{}\"\nbaud = 9600\nparity = \"even\"\n",
                p.display()
            ),
        };
        text += &format!("[[bus]]\nname = \"{name}\"\n{bus}{extra_bus}\n");
    }
    text += devices;
    match Config::from_str_at(&text, "test.toml", Path::new("/nonexistent")) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n---\n{text}"),
    }
}
