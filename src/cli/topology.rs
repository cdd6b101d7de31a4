//! `meterd topology`: the meter trees with the latest readings and each node's loss.

use super::{bail, json, out, Args, ConfigArg, Duration, IsTerminal, Result};
use crate::accounting::NodeView;

/// `meterd topology`
#[derive(Debug, Args)]
pub struct TopologyCmd {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Balance window ending now.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Emit Graphviz instead of the tree.
    #[arg(long, conflicts_with = "json")]
    pub dot: bool,
    #[arg(long)]
    pub json: bool,
}

impl TopologyCmd {
    /// Draws the trees from the config and the daemon's counter history.
    pub fn execute(self, clock: &crate::clock::Clock) -> Result<()> {
        let c = self.config.load()?;
        if c.site.is_empty() {
            bail!("{}: no [[meter]] nodes configured; see config/meterd.toml for the [[room]], [[meter]] and [[pool]] sections", c.source);
        }
        let conn = crate::store::open_read_only(&c.store.path);
        if let Err(e) = &conn {
            eprintln!("meterd: no readings to show ({e}); showing the configured trees only");
        }
        let (from, to, views) =
            crate::accounting::node_views(conn.ok().as_ref(), &c, self.window, clock.now())?;
        let threshold = c.site.loss_threshold_pct;
        if self.json {
            out(&json(&views)?);
        } else if self.dot {
            let mut s = String::from(
                "digraph meterd {\n  rankdir=TB;\n  node [shape=box, fontname=\"Helvetica\"];\n",
            );
            for v in &views {
                let (label, color) = match &v.balance {
                    Some(b) => (
                        format!("{}\\nloss {:.1} %", v.name, b.loss_pct),
                        loss_color(b.loss_pct, threshold).1,
                    ),
                    None => (v.name.clone(), "black"),
                };
                let room = v
                    .room
                    .as_ref()
                    .map(|r| format!("\\nroom {r}"))
                    .unwrap_or_default();
                let pool = v
                    .pool
                    .as_ref()
                    .map(|p| format!("\\npool {p}"))
                    .unwrap_or_default();
                s += &format!(
                    "  \"{}\" [label=\"{label}{room}{pool}\", color={color}];\n",
                    v.name
                );
                if let Some(p) = &v.parent {
                    s += &format!("  \"{p}\" -> \"{}\";\n", v.name);
                }
            }
            s += "}\n";
            out(&s);
        } else {
            let colour = std::io::stdout().is_terminal();
            let mut text = format!(
                "balance window: {} to {} (threshold {threshold} %)\n",
                from.with_timezone(&c.gateway.timezone)
                    .format("%Y-%m-%d %H:%M:%S"),
                to.with_timezone(&c.gateway.timezone).format("%H:%M:%S %Z")
            );
            let mut roots: Vec<&NodeView> = views.iter().filter(|v| v.parent.is_none()).collect();
            roots.sort_by_key(|v| (v.utility, v.name.clone()));
            for r in roots {
                draw(
                    &mut text,
                    &views,
                    r,
                    "",
                    true,
                    true,
                    threshold,
                    c.site.meters[&r.name].utility.unit(),
                    colour,
                );
            }
            out(&text);
        }
        Ok(())
    }
}

pub(super) fn loss_color(pct: f64, threshold: f64) -> (&'static str, &'static str) {
    match crate::accounting::LossLevel::of(pct, threshold) {
        crate::accounting::LossLevel::Alarm => ("\x1b[31m", "red"),
        crate::accounting::LossLevel::Warn => ("\x1b[33m", "orange"),
        crate::accounting::LossLevel::Ok => ("\x1b[32m", "darkgreen"),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn draw(
    text: &mut String,
    all: &[NodeView],
    v: &NodeView,
    prefix: &str,
    last: bool,
    root: bool,
    threshold: f64,
    unit: &str,
    colour: bool,
) {
    let branch = if root {
        ""
    } else if last {
        "└─ "
    } else {
        "├─ "
    };
    let mut line = format!("{prefix}{branch}{}", v.name);
    if let Some(d) = &v.device {
        if d != &v.name {
            line += &format!(" [{d}]");
        }
    } else {
        line += " [virtual]";
    }
    if let Some(r) = &v.room {
        line += &format!(" → room {r}");
    }
    if let Some(p) = &v.pool {
        line += &format!(" → pool {p}");
    }
    if let Some(l) = v.latest {
        line += &format!("  {l:.3} {unit}");
    }
    if let Some(c) = v.consumption {
        line += &format!("  +{c:.3} {unit}");
    }
    if let Some(b) = &v.balance {
        let (ansi, _) = loss_color(b.loss_pct, threshold);
        let mut l = format!("loss {:.1} %", b.loss_pct);
        if let Some(s) = &b.suspect {
            l += &format!(" — suspect {}", s.meter);
            if let Some(u) = &s.belongs_under {
                l += &format!(" (balances under {u})");
            }
        }
        if colour {
            line += &format!("  {ansi}{l}\x1b[0m");
        } else {
            line += &format!("  {l}");
        }
    }
    text.push_str(&line);
    text.push('\n');
    let mut kids: Vec<&NodeView> = all
        .iter()
        .filter(|k| k.parent.as_deref() == Some(v.name.as_str()))
        .collect();
    kids.sort_by_key(|k| k.name.clone());
    let child_prefix = if root {
        prefix.to_string()
    } else {
        format!("{prefix}{}", if last { "   " } else { "│  " })
    };
    let n = kids.len();
    for (i, k) in kids.into_iter().enumerate() {
        draw(
            text,
            all,
            k,
            &child_prefix,
            i + 1 == n,
            false,
            threshold,
            unit,
            colour,
        );
    }
}
