//! `[gateway]`: identity, timezone, log level, control socket.

use std::path::PathBuf;
use std::str::FromStr;

use super::*;

impl Validator {
    pub(in crate::config) fn gateway(&mut self, g: RawGateway) -> Option<Gateway> {
        if g.id.trim().is_empty() || g.id.contains(['/', '+', '#']) {
            self.push(
                "gateway.id",
                "must be non-empty and contain no '/', '+' or '#' (it becomes an MQTT topic level)",
            );
        }
        let tz = match chrono_tz::Tz::from_str(&g.timezone) {
            Ok(tz) => Some(tz),
            Err(_) => {
                self.push(
                    "gateway.timezone",
                    format!("{:?} is not an IANA timezone name (e.g. \"Asia/Shanghai\", \"Europe/London\")", g.timezone),
                );
                None
            }
        };
        if let Some(l) = &g.log_level {
            if !log_level_ok(l) || tracing_subscriber::EnvFilter::try_new(l).is_err() {
                self.push(
                    "gateway.log_level",
                    format!(
                        "{l:?}: expected error, warn, info, debug, trace or a tracing directive"
                    ),
                );
            }
        }
        Some(Gateway {
            id: g.id,
            site: g.site,
            timezone: tz?,
            control_socket: g
                .control_socket
                .map(|p| self.base.join(p))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            log_level: g.log_level,
        })
    }
}
