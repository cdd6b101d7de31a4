//! `meterd topology`: the meter trees with the latest readings and each node's loss.

use super::{bail, json, out, Args, BTreeMap, ConfigArg, Duration, IsTerminal, Result, Serialize};

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

/// One node as `topology --json` prints it.
#[derive(Debug, Serialize)]
pub(super) struct NodeView {
    name: String,
    utility: crate::topology::Utility,
    parent: Option<String>,
    device: Option<String>,
    room: Option<String>,
    pool: Option<String>,
    latest: Option<f64>,
    latest_ts: Option<String>,
    consumption: Option<f64>,
    balance: Option<crate::topology::Balance>,
}

impl TopologyCmd {
    /// Draws the trees from the config and the daemon's counter history.
    pub fn execute(self) -> Result<()> {
        use crate::topology::Source;
        let c = self.config.load()?;
        if c.site.is_empty() {
            bail!("{}: no [[meter]] nodes configured; see config/meterd.toml for the [[room]], [[meter]] and [[pool]] sections", c.source);
        }
        let (from, to) = crate::accounting::live_window(&c, self.window);
        let conn = crate::store::open_read_only(&c.store.path);
        let (cons, balances, latest) = match &conn {
            Ok(conn) => {
                let cons = crate::accounting::consumption(conn, &c, from, to)?;
                let balances = crate::topology::balances(&c.site, &cons);
                let mut latest = BTreeMap::new();
                for m in c.site.meters.values() {
                    if let Source::Device(d) = &m.source {
                        let now = chrono::Utc::now().timestamp_millis();
                        let w = crate::store::history_window(
                            conn,
                            d,
                            m.utility.quantity().as_str(),
                            now,
                            now,
                        )?;
                        if let Some((ts, v)) = w.last() {
                            latest.insert(
                                m.name.clone(),
                                (
                                    *v,
                                    chrono::DateTime::from_timestamp_millis(*ts)
                                        .map(|t| t.to_rfc3339())
                                        .unwrap_or_default(),
                                ),
                            );
                        }
                    }
                }
                (cons, balances, latest)
            }
            Err(e) => {
                eprintln!("meterd: no readings to show ({e}); showing the configured trees only");
                (BTreeMap::new(), Vec::new(), BTreeMap::new())
            }
        };
        let views: Vec<NodeView> = c
            .site
            .meters
            .values()
            .map(|m| NodeView {
                name: m.name.clone(),
                utility: m.utility,
                parent: m.parent.clone(),
                device: match &m.source {
                    Source::Device(d) => Some(d.clone()),
                    Source::Virtual(_) => None,
                },
                room: m.room.clone(),
                pool: m.pool.clone(),
                latest: latest.get(&m.name).map(|x| x.0),
                latest_ts: latest.get(&m.name).map(|x| x.1.clone()),
                consumption: cons.get(&m.name).map(|x| x.value),
                balance: balances.iter().find(|b| b.node == m.name).cloned(),
            })
            .collect();
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
    if !pct.is_finite() || pct.abs() > threshold {
        ("\x1b[31m", "red")
    } else if pct.abs() > threshold / 2.0 {
        ("\x1b[33m", "orange")
    } else {
        ("\x1b[32m", "darkgreen")
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
