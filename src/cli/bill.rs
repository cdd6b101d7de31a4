//! `meterd bill` and `meterd recompute`: per-room bills of a month, and corrections.

use super::*;

/// `meterd bill --period 2026-10 [--room R] [--version N] [--json]`
#[derive(Debug, Args)]
pub struct BillCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Month in the site's timezone, `YYYY-MM`.
    #[arg(long)]
    pub period: String,
    /// One room's statement, line by line.
    #[arg(long)]
    pub room: Option<String>,
    /// A past version (default: the latest).
    #[arg(long)]
    pub version: Option<i64>,
    #[arg(long)]
    pub json: bool,
}

impl BillCmd {
    /// Reads the kept run of the period (read-only, safe beside the daemon); a period not run yet is
    /// computed now from the history and said so.
    pub fn execute(self) -> Result<()> {
        let mut c = self.config.load()?;
        let conn = crate::store::open_read_only(&c.store.path)?;
        let tz = c.gateway.timezone;
        crate::accounting::period_bounds(&self.period, tz)?;
        let run = crate::store::load_run(&conn, &self.period, self.version)?;
        let versions = crate::store::run_versions(&conn, &self.period)?;
        let (st, header) = match (run, self.version) {
            (Some(r), _) => {
                let st: crate::bill::Statement =
                    serde_json::from_str(&r.body).with_context(|| {
                        format!("stored version {} of {} is unreadable", r.version, r.period)
                    })?;
                let head = serde_json::json!({
                    "period": r.period, "version": r.version, "computed_at": r.computed_at,
                    "supersedes": r.supersedes, "reason": r.reason, "config_hash": r.config_hash,
                    "provisional": r.provisional, "published": true,
                });
                (st, head)
            }
            (None, Some(v)) => bail!(
                "no version {v} of {}; versions kept: {}",
                self.period,
                if versions.is_empty() {
                    "none".to_string()
                } else {
                    versions
                        .iter()
                        .map(|v| v.0.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            (None, None) => {
                crate::accounting::apply_tariff_overrides(&conn, &mut c.site, c.gateway.timezone)?;
                let st = crate::accounting::compute(&conn, &c, &self.period)?;
                let head = serde_json::json!({
                    "period": self.period, "version": null, "config_hash": c.hash,
                    "provisional": st.bills.iter().any(|b| b.provisional), "published": false,
                });
                (st, head)
            }
        };
        let bills: Vec<&crate::bill::RoomBill> = st
            .bills
            .iter()
            .filter(|b| self.room.as_ref().is_none_or(|r| *r == b.room))
            .collect();
        if let Some(room) = &self.room {
            if bills.is_empty() {
                bail!(
                    "room {room:?} has no bill for {} (no meter and no pool share)",
                    self.period
                );
            }
        }
        if self.json {
            let mut v = header;
            v["bills"] = serde_json::to_value(&bills)?;
            out(&json(&v)?);
            return Ok(());
        }
        match header["version"].as_i64() {
            Some(v) => out(&format!(
                "{} — version {v} of {} ({}), computed {}, reason: {}{}\n",
                self.period,
                versions.len(),
                versions
                    .iter()
                    .map(|v| v.0.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                header["computed_at"].as_str().unwrap_or(""),
                header["reason"].as_str().unwrap_or(""),
                header["supersedes"]
                    .as_i64()
                    .map(|s| format!(", supersedes version {s}"))
                    .unwrap_or_default()
            )),
            None => out(&format!(
                "{} — not run yet: computed now from the history (the monthly run publishes it)\n",
                self.period
            )),
        }
        if self.room.is_some() {
            for b in bills {
                out("\n");
                out(&crate::bill::explain(b, tz));
            }
            return Ok(());
        }
        out(&format!(
            "{:<12} {:<12} {:>14} {:>14} {:>14}  {}\n",
            "room", "utility", "own", "shared", "total", "status"
        ));
        for b in bills {
            let dec = b.own.first().map_or(2, |l| l.price.decimals);
            let shared: i64 = b.shares.iter().map(|s| s.share_milli).sum();
            out(&format!(
                "{:<12} {:<12} {:>14} {:>14} {:>14}  {}\n",
                b.room,
                format!("{:?}", b.utility).to_lowercase(),
                format!("{:.3} {}", b.own_milli as f64 / 1000.0, b.unit),
                format!("{:.3} {}", shared as f64 / 1000.0, b.unit),
                b.total.map_or_else(
                    || "not priced".into(),
                    |t| format!(
                        "{} {}",
                        crate::bill::money(t, dec),
                        b.currency.clone().unwrap_or_default()
                    )
                ),
                if b.provisional {
                    format!("PROVISIONAL: {}", b.notes.join("; "))
                } else {
                    "final".into()
                }
            ));
        }
        Ok(())
    }
}

/// `meterd recompute --period 2026-10 --reason TEXT`
#[derive(Debug, Args)]
pub struct RecomputeCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Month in the site's timezone, `YYYY-MM`.
    #[arg(long)]
    pub period: String,
    /// Why (kept with the new version and sent with the adjustments).
    #[arg(long)]
    pub reason: String,
    #[arg(long)]
    pub json: bool,
}

impl RecomputeCmd {
    /// Through the running daemon (its one writer) when it runs; otherwise on the outbox directly.
    pub async fn execute(self, clock: &crate::clock::Clock) -> Result<()> {
        let c = self.config.load()?;
        crate::accounting::period_bounds(&self.period, c.gateway.timezone)?;
        if self.reason.trim().is_empty() {
            bail!("--reason must say why (it goes into the trail)");
        }
        let by = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "unknown".into());
        let summary: crate::accounting::RunSummary = if c.gateway.control_socket.exists() {
            let req = serde_json::json!({"op": "recompute", "period": self.period, "reason": self.reason, "by": format!("cli:{by}")});
            let v = crate::control::request(&c.gateway.control_socket, &req).await?;
            if v["ok"] != serde_json::json!(true) {
                bail!(
                    "the daemon refused: {}",
                    v["error"].as_str().unwrap_or("no reason given")
                );
            }
            serde_json::from_value(v["run"].clone()).context("unreadable answer from the daemon")?
        } else {
            let store = crate::store::spawn(crate::store::Store::open(
                &c.store.path,
                c.store.caps,
                clock.clone(),
            )?)?;
            let req = crate::accounting::RunRequest {
                period: self.period.clone(),
                reason: format!("{} (by cli:{by}, daemon not running)", self.reason),
                command_id: None,
            };
            let mut cfg = c.clone();
            if let Ok(conn) = crate::store::open_read_only(&c.store.path) {
                crate::accounting::apply_tariff_overrides(
                    &conn,
                    &mut cfg.site,
                    cfg.gateway.timezone,
                )?;
            }
            let s = crate::accounting::run_period(&std::sync::Arc::new(cfg), &store, req, clock)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            store.flush().await;
            s
        };
        if self.json {
            out(&json(&summary)?);
            return Ok(());
        }
        out(&format!(
            "{}: version {}{}{}; {} room bills; {} adjustment(s) queued on results/adjustment\n",
            summary.period,
            summary.version,
            summary
                .supersedes
                .map(|s| format!(" supersedes version {s}"))
                .unwrap_or_default(),
            if summary.provisional {
                " (provisional)"
            } else {
                ""
            },
            summary.bills,
            summary.adjustments.len()
        ));
        for a in &summary.adjustments {
            let m = |x: Option<i64>| x.map_or_else(|| "-".into(), |v| crate::bill::money(v, 2));
            out(&format!(
                "  {:<12} {:<12} old {:>12} new {:>12} difference {:>12} {}\n",
                a.room,
                format!("{:?}", a.utility).to_lowercase(),
                m(a.old_total),
                m(a.new_total),
                m(a.difference),
                a.currency.clone().unwrap_or_default()
            ));
        }
        Ok(())
    }
}
