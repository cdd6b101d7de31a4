//! `meterd relay`: overrides and the desired vs actual state of every relay.

use super::*;

/// What to do with a room's relays: `open` grants (door unlocked / supply on), `close` denies (door
/// locked / supply cut), `clear` removes manual overrides.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RelayAction {
    Open,
    Close,
    Clear,
}

/// `meterd relay list` or `meterd relay ROOM open|close|clear --reason TEXT [--for DURATION]`
#[derive(Debug, Args)]
pub struct RelayCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// `list`, or a room id.
    pub target: String,
    pub action: Option<RelayAction>,
    /// Only this relay of the room.
    #[arg(long)]
    pub relay: Option<String>,
    /// Why (recorded in the audit trail); required for open/close.
    #[arg(long)]
    pub reason: Option<String>,
    /// How long the override lasts (default: until cleared).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long)]
    pub json: bool,
}

impl RelayCmd {
    /// Talks to the running daemon over its local control socket.
    pub async fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        let req = match (self.target.as_str(), self.action) {
            ("list", None) => serde_json::json!({"op": "list"}),
            (_, None) => bail!(
                "say what to do: meterd relay {} open|close|clear --reason TEXT",
                self.target
            ),
            (room, Some(RelayAction::Clear)) => {
                serde_json::json!({"op": "clear_override", "room": room, "relay": self.relay})
            }
            (room, Some(a)) => {
                let reason = self
                    .reason
                    .clone()
                    .filter(|r| !r.trim().is_empty())
                    .context("--reason TEXT is required: it goes into the audit trail")?;
                let by = std::env::var("SUDO_USER")
                    .or_else(|_| std::env::var("USER"))
                    .unwrap_or_else(|_| "cli".into());
                serde_json::json!({"op": "override", "room": room, "relay": self.relay, "on": matches!(a, RelayAction::Open), "reason": reason, "for_s": self.duration.map(|d| d.as_secs()), "by": format!("cli:{by}")})
            }
        };
        let reply = crate::control::request(&c.gateway.control_socket, &req).await?;
        if reply["ok"] != true {
            bail!("{}", reply["error"].as_str().unwrap_or("refused"));
        }
        if self.json {
            out(&json(&reply)?);
        } else if let Some(relays) = reply["relays"].as_array().filter(|_| self.target == "list") {
            if reply["fire_alarm"] == true {
                out("FIRE ALARM ACTIVE: fail-open doors released\n");
            }
            out(&json_table(
                relays,
                &[
                    ("relay", "relay"),
                    ("room", "room"),
                    ("kind", "kind"),
                    ("desired", "desired"),
                    ("actual", "actual"),
                    ("rule", "rule"),
                    ("why", "reason"),
                ],
            ));
        } else {
            out(&format!("{reply}\n"));
        }
        Ok(())
    }
}
