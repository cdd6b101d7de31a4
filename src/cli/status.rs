//! `meterd status`: asks the running daemon over its control socket.

use super::{cell, json, json_table, out, table, Args, ConfigArg, DeviceStatus, Result};

/// `meterd status`
#[derive(Debug, Args)]
pub struct StatusCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    #[arg(long)]
    pub json: bool,
}

impl StatusCmd {
    /// Asks the running daemon over its control socket.
    pub async fn execute(self) -> Result<()> {
        let c = self.config.load()?;
        let v = crate::control::request(
            &c.gateway.control_socket,
            &serde_json::json!({"op": "status"}),
        )
        .await?;
        if self.json {
            out(&json(&v)?);
            return Ok(());
        }
        let s = cell;
        out(&format!(
            "meterd {} on {}: up {} s, config {} ({})\n",
            s(&v["version"]),
            s(&v["gateway"]),
            s(&v["uptime_s"]),
            s(&v["config"]["hash"]),
            s(&v["config"]["source"])
        ));
        let mut rows = Vec::new();
        let mut lines = String::new();
        for b in v["buses"].as_array().into_iter().flatten() {
            let l = &b["line"];
            let n = |k: &str| l[k].as_u64().unwrap_or(0);
            if n("foreign_frames") + n("mismatched_frames") + n("noise_bytes") + n("stale_bytes")
                > 0
            {
                lines += &format!(
                    "bus {}: dropped {} frames of other units, {} late or mismatched answers, {} bytes of noise, {} stale bytes\n",
                    s(&b["name"]),
                    n("foreign_frames"),
                    n("mismatched_frames"),
                    n("noise_bytes"),
                    n("stale_bytes")
                );
            }
            for d in b["devices"].as_array().into_iter().flatten() {
                let ok = d["polls_ok"].as_u64().unwrap_or(0);
                let failed = d["polls_failed"].as_u64().unwrap_or(0);
                let rate = if ok + failed > 0 {
                    format!("{:.1} %", ok as f64 * 100.0 / (ok + failed) as f64)
                } else {
                    "-".into()
                };
                rows.push(vec![
                    s(&b["name"]),
                    s(&d["name"]),
                    s(&d["unit"]),
                    rate,
                    format!("{ok}/{failed}"),
                    d["last_latency_ms"]
                        .as_f64()
                        .map_or_else(|| "-".into(), |l| format!("{l:.1}")),
                    s(&d["offline_since"]),
                    s(&d["last_error"]).chars().take(60).collect(),
                ]);
            }
        }
        out(&table(
            &[
                "bus",
                "device",
                "unit",
                "success",
                "ok/failed",
                "latency_ms",
                "offline since",
                "last error",
            ],
            &rows,
        ));
        out(&lines);
        let o = &v["outbox"];
        out(&format!(
            "\noutbox: {} record(s) waiting, oldest {}, last publish error {}, store error {}\n",
            s(&o["rows"]),
            s(&o["oldest_ts"]),
            s(&o["last_publish_error"]),
            s(&v["store_error"])
        ));
        let m = &v["mqtt"];
        if m.is_null() {
            out("mqtt: not configured\n");
        } else {
            out(&format!(
                "mqtt: {} since {}, {} record(s) acknowledged, {} reconnect(s), last error {}\n",
                if m["connected"] == true {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                s(&m["connected_since"]),
                s(&m["records_acked"]),
                s(&m["reconnects"]),
                s(&m["last_error"])
            ));
        }
        if let Some(relays) = v["relays"].as_array() {
            out("\n");
            out(&json_table(
                relays,
                &[
                    ("relay", "relay"),
                    ("room", "room"),
                    ("desired", "desired"),
                    ("actual", "actual"),
                    ("rule", "rule"),
                ],
            ));
        }
        Ok(())
    }
}

pub(super) fn totals(devices: &[DeviceStatus]) -> (u64, u64, usize) {
    (
        devices.iter().map(|d| d.polls_ok).sum(),
        devices.iter().map(|d| d.polls_failed).sum(),
        devices.iter().filter(|d| d.offline_since.is_some()).count(),
    )
}
