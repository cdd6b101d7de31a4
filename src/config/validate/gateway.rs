//! `[gateway]`: identity, timezone, log level, control socket.

use std::path::PathBuf;
use std::str::FromStr;

use super::{Gateway, RawGateway, Validator, DEFAULT_SOCKET};

impl Validator {
    pub(in crate::config) fn gateway(&mut self, g: RawGateway) -> Option<Gateway> {
        if g.id.trim().is_empty() || g.id.contains(['/', '+', '#']) {
            self.push(
                "gateway.id",
                "must be non-empty and contain no '/', '+' or '#' (it becomes an MQTT topic level)",
            );
        }
        let tz = if let Ok(tz) = chrono_tz::Tz::from_str(&g.timezone) {
            Some(tz)
        } else {
            self.push(
                "gateway.timezone",
                format!(
                    "{:?} is not an IANA timezone name (e.g. \"Asia/Shanghai\", \"Europe/London\")",
                    g.timezone
                ),
            );
            None
        };
        if let Some(l) = &g.log_level {
            if crate::config::log_filter(l).is_none() {
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
                .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), |p| self.base.join(p)),
            log_level: g.log_level,
        })
    }
}
