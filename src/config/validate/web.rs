//! `[web]`: the local read-only view's address, token and reverse-proxy socket.

use std::path::Path;

use super::{RawWeb, Validator};
use crate::config::WebConfig;

/// A token shorter than this is guessable on a LAN.
const MIN_TOKEN: usize = 16;

impl Validator {
    pub(in crate::config) fn web(&mut self, w: RawWeb, base: &Path) -> WebConfig {
        let listen = w.listen.as_deref().and_then(|l| {
            let parsed = l.parse().ok();
            if parsed.is_none() {
                self.push(
                    "web.listen",
                    format!("{l:?}: expected an address and port such as \"0.0.0.0:8080\" or \"192.168.1.10:8080\""),
                );
            }
            parsed
        });
        let given = w.token.is_some();
        let token = w.token.filter(|t| {
            let ok = t.len() >= MIN_TOKEN && t.chars().all(|c| c.is_ascii_graphic());
            if !ok {
                self.push(
                    "web.token",
                    format!("expected at least {MIN_TOKEN} printable characters without spaces (e.g. from `openssl rand -hex 16`)"),
                );
            }
            ok
        });
        if w.listen.is_some() && !given {
            self.push(
                "web.token",
                "missing: a web view on the network needs a token (every request must carry it); add token = \"…\" (e.g. from `openssl rand -hex 16`)",
            );
        }
        WebConfig {
            listen,
            token,
            socket: w.socket.map(|s| base.join(s)),
            bound: None,
        }
    }
}
