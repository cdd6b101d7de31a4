//! `meterd apportion`: the apportionment of common consumption for a month.

use std::fmt::Write as _;

use super::{bail, json, out, table, Args, ConfigArg, Result};

/// `meterd apportion --period 2026-10`
#[derive(Debug, Args)]
pub struct ApportionCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Month in the site's timezone, `YYYY-MM`.
    #[arg(long)]
    pub period: String,
    /// Show the calculation for one room, step by step.
    #[arg(long)]
    pub explain: Option<String>,
    #[arg(long)]
    pub json: bool,
}

impl ApportionCmd {
    /// Computes from the counter history the daemon keeps (read-only).
    pub fn execute(self) -> Result<()> {
        let mut c = self.config.load()?;
        let conn = crate::store::open_read_only(&c.store.path)?;
        crate::accounting::apply_tariff_overrides(&conn, &mut c.site, c.gateway.timezone)?;
        let (results, bills) = crate::accounting::apportion_period(&conn, &c, &self.period)?;
        if results.is_empty() {
            bail!("{}: no [[pool]] configured: nothing to apportion", c.source);
        }
        if let Some(room) = &self.explain {
            let mut any = false;
            for r in &results {
                if let Some(t) = crate::apportion::explain(r, room) {
                    out(&t);
                    out("\n");
                    any = true;
                }
            }
            if !any {
                bail!("room {room:?} is in no pool");
            }
            return Ok(());
        }
        if self.json {
            out(&json(&results)?);
            return Ok(());
        }
        for r in &results {
            let money = |a: Option<i64>| match (a, r.price) {
                (Some(a), Some(p)) => {
                    let d = 10i64.pow(p.decimals);
                    format!("{}.{:0w$}", a / d, a % d, w = p.decimals as usize)
                }
                _ => "-".into(),
            };
            out(&format!(
                "\npool {} ({:?}), period {}: common {}.{:03} {}{}{}{}\n",
                r.pool,
                r.utility,
                r.period,
                r.common_milli / 1000,
                r.common_milli % 1000,
                r.unit,
                r.amount
                    .map(|_| format!(
                        ", cost {} {}",
                        money(r.amount),
                        r.currency.clone().unwrap_or_default()
                    ))
                    .unwrap_or_default(),
                if r.estimated {
                    ", ESTIMATED (readings missing)"
                } else {
                    ""
                },
                r.method
                    .iter()
                    .fold(String::new(), |mut s, (b, w)| {
                        let _ = write!(s, ", {b:?} {w}");
                        s
                    })
                    .to_lowercase()
            ));
            let rows: Vec<Vec<String>> = r
                .rooms
                .iter()
                .map(|x| {
                    // The room's own lines and total are its bill's: one pricing path.
                    let bill = bills
                        .iter()
                        .find(|b| b.room == x.room && b.utility == r.utility);
                    let own_amount = bill
                        .filter(|b| b.total.is_some() || !b.own.is_empty())
                        .map(|b| b.own.iter().map(|l| l.amount).sum::<i64>());
                    vec![
                        x.room.clone(),
                        format!("{:.3}", x.own),
                        format!("{:.6}", x.coefficient),
                        format!("{}.{:03}", x.share_milli / 1000, x.share_milli % 1000),
                        money(x.share_amount),
                        money(own_amount),
                        money(bill.and_then(|b| b.total)),
                    ]
                })
                .collect();
            out(&table(
                &[
                    "room",
                    "own",
                    "coefficient",
                    "share",
                    "share cost",
                    "own cost",
                    "bill total",
                ],
                &rows,
            ));
            for w in &r.warnings {
                out(&format!("warning: {w}\n"));
            }
        }
        Ok(())
    }
}
