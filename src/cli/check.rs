//! `meterd check`: validates a configuration and lists every problem.

use super::{out, Args, ConfigArg, Result};

/// `meterd check`
#[derive(Debug, Args)]
pub struct CheckCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Check the file alone: do not read the site profile directory or the TLS files (CI, or a
    /// laptop without the gateway's files). Built-in profiles only.
    #[arg(long)]
    pub no_environment: bool,
}

impl CheckCmd {
    /// Prints a summary of a valid config; an invalid one fails with every problem listed.
    pub fn execute(self) -> Result<()> {
        let c = if self.no_environment {
            self.config.load_text_only()?
        } else {
            self.config.load()?
        };
        let requests: usize = c.devices.iter().map(|d| d.plan.requests.len()).sum();
        out(&format!(
            "{}: OK: gateway {} ({}), {} bus(es), {} device(s), {} read request(s) per full poll cycle, {} profile(s); topology: {} meter node(s), {} room(s), {} pool(s); enforcement: {} relay(s), {} prepaid account(s); uplink: {}\n",
            c.source,
            c.gateway.id,
            c.gateway.timezone,
            c.buses.len(),
            c.devices.len(),
            requests,
            c.profiles.len(),
            c.site.meters.len(),
            c.site.rooms.len(),
            c.site.pools.len(),
            c.enforcement.relays.len(),
            c.enforcement.prepaid.len(),
            c.mqtt.as_ref().map_or_else(|| "none (outbox only)".into(), |m| format!("mqtt {}:{}", m.host, m.port))
        ));
        Ok(())
    }
}
