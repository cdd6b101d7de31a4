//! The view's HTML pages (maud: markup checked and escaped at compile time). Each page reloads
//! itself every 10 s; there is no script.

use axum::extract::{Path, Query, State};
use axum::response::Html;
use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use super::layout::{self, BOX_H, BOX_W};
use super::{html, parse_utility, NotFound, RangeQuery, WebState};
use crate::accounting::LossLevel;
use crate::topology::Utility;

/// The frame every page shares: title, navigation, a 10 s refresh.
fn page(s: &WebState, title: &str, body: &Markup) -> Html<String> {
    let tz = s.config.gateway.timezone;
    html(html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="10";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · meterd " (s.config.gateway.id) }
                link rel="icon" href="/favicon.ico";
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    strong { "meterd" } " " (s.config.gateway.id) " · " (s.config.gateway.site)
                    nav {
                        a href="/topology/electricity" { "Electricity" }
                        a href="/topology/water" { "Water" }
                        a href="/devices" { "Devices" }
                        a href="/relays" { "Relays" }
                        a href="/outbox" { "Outbox & uplink" }
                        a href="/events" { "Events" }
                    }
                    span.time { (s.control.clock.now().with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z")) }
                }
                main { h1 { (title) } (body) }
            }
        }
    })
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.decimals$}"))
}

pub(super) async fn index(State(s): State<WebState>) -> Html<String> {
    let status = s.control.status().await;
    let body = html! {
        p { "The metering topology with live values and losses, per utility, and the daemon's state." }
        ul.cards {
            li { a href="/topology/electricity" { "Electricity topology" } }
            li { a href="/topology/water" { "Water topology" } }
            li { a href="/devices" { "Devices: " (device_count(&status)) } }
            li { a href="/outbox" { "Outbox: " (status["outbox"]["rows"]) " record(s) waiting" } }
        }
    };
    page(&s, "Overview", &body)
}

/// A JSON value as a table cell: strings without quotes, nothing for null.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn device_count(status: &Value) -> usize {
    status["buses"].as_array().map_or(0, |b| {
        b.iter()
            .filter_map(|b| b["devices"].as_array())
            .map(Vec::len)
            .sum()
    })
}

pub(super) async fn topology(
    State(s): State<WebState>,
    Path(utility): Path<String>,
) -> Result<Html<String>, NotFound> {
    let utility = parse_utility(&utility)?;
    let t = super::topology(&s, utility).await;
    let index: std::collections::HashMap<&str, usize> = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.view.name.as_str(), i))
        .collect();
    let parents: Vec<Option<usize>> = t
        .nodes
        .iter()
        .map(|n| n.view.parent.as_deref().and_then(|p| index.get(p).copied()))
        .collect();
    let l = layout::tree(&parents);
    let decimals = if utility == Utility::Water { 3 } else { 2 };
    let tz = s.config.gateway.timezone;
    let body = html! {
        p.legend {
            "Balance over " (t.window_from.with_timezone(&tz).format("%H:%M")) "–" (t.window_to.with_timezone(&tz).format("%H:%M %Z"))
            ", threshold " (t.threshold_pct) " %. "
            span.ok { "■ within half" } " " span.warn { "■ within" } " " span.alarm { "■ beyond" }
            " · dashed: a meter that does not fit where the topology puts it · click a meter for its history"
        }
        @if t.nodes.is_empty() {
            p { "No " (format!("{utility:?}").to_lowercase()) " meters in the topology ([[meter]] in the config)." }
        } @else {
            svg #topology xmlns="http://www.w3.org/2000/svg" width=(l.width) height=(l.height) viewBox=(format!("0 0 {} {}", l.width, l.height)) {
                @for e in &l.edges {
                    line.edge x1=(e[0]) y1=(e[1]) x2=(e[2]) y2=(e[3]) {}
                }
                @for b in &l.boxes {
                    @let n = &t.nodes[b.index];
                    @let level = n.level.map_or("none", |l| match l { LossLevel::Ok => "ok", LossLevel::Warn => "warn", LossLevel::Alarm => "alarm" });
                    a href=(format!("/node/{}", n.view.name)) {
                        g class=(format!("node {level}{}{}", if n.suspect { " suspect" } else { "" }, if n.offline { " offline" } else { "" })) data-node=(n.view.name) {
                            rect x=(b.x) y=(b.y) width=(BOX_W) height=(BOX_H) rx="6" {}
                            text.name x=(b.x + 8.0) y=(b.y + 16.0) {
                                (n.view.name)
                                @if let Some(r) = &n.view.room { " · " (r) }
                            }
                            text.value x=(b.x + 8.0) y=(b.y + 33.0) data-value=(fmt(n.value, decimals)) {
                                @if n.offline && n.value.is_none() { "OFFLINE: no reading" } @else {
                                    (fmt(n.value, decimals)) " " (t.unit)
                                    @if n.offline { " · OFFLINE" }
                                    @else if let Some(p) = n.power_w { " · " (format!("{p:.0}")) " W" }
                                }
                            }
                            text.loss x=(b.x + 8.0) y=(b.y + 50.0) {
                                @if let Some(bal) = &n.view.balance {
                                    "loss " (format!("{:.1}", bal.loss_pct)) " %"
                                    @if bal.suspect.is_some() { " · see dashed" }
                                } @else if n.suspect {
                                    @if let Some(u) = &n.belongs_under { "wired under " (u) "?" } @else { "suspect: not from here" }
                                } @else if let Some(p) = &n.view.pool {
                                    "pool " (p)
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(page(&s, &format!("{utility:?} topology"), &body))
}

pub(super) async fn node(
    State(s): State<WebState>,
    Path(name): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Html<String>, NotFound> {
    let h = super::history(&s, &name, q.range).await?;
    // The time axis starts at the first sample when the history is younger than the range.
    let to = h.to.timestamp_millis();
    let from = h.counter.first().map_or(h.from.timestamp_millis(), |p| {
        p.0.max(h.from.timestamp_millis())
    });
    let shown_from = chrono::DateTime::from_timestamp_millis(from).unwrap_or(h.from);
    let (w, ht) = (720.0, 200.0);
    let counter = layout::curve(&h.counter, (from, to), (w, ht), false);
    let rate = layout::curve(&h.rate, (from, to), (w, ht), true);
    let rate_unit = if h.unit == "kWh" { "kW" } else { "m³/h" };
    let tz = s.config.gateway.timezone;
    let chart = |id: &str, c: &layout::Curve, unit: &str| {
        html! {
            figure {
                figcaption { (id) " (" (unit) "), " (c.count) " point(s), " (format!("{:.3}", c.min)) " to " (format!("{:.3}", c.max)) }
                svg.chart id=(id) xmlns="http://www.w3.org/2000/svg" width=(w) height=(ht) viewBox=(format!("0 0 {w} {ht}")) {
                    rect.frame x="0" y="0" width=(w) height=(ht) {}
                    polyline.curve points=(c.points) data-points=(c.count) {}
                }
                div.axis {
                    span { (shown_from.with_timezone(&tz).format("%m-%d %H:%M:%S")) }
                    span { (h.to.with_timezone(&tz).format("%m-%d %H:%M:%S %Z")) }
                }
            }
        }
    };
    let body = html! {
        p {
            @if let Some(d) = &h.device { "Device " (d) ". " } @else { "Virtual meter (computed). " }
            "Range: "
            @for r in ["day", "week", "month"] {
                a.range href=(format!("/node/{name}?range={r}")) { (r) } " "
            }
        }
        (chart("counter", &counter, h.unit))
        (chart("power", &rate, rate_unit))
        @if h.counter.is_empty() {
            p.note { "No history yet: counters are sampled every [topology] history_every." }
        }
    };
    Ok(page(&s, &format!("Meter {name}"), &body))
}

pub(super) async fn devices(State(s): State<WebState>) -> Html<String> {
    let status = s.control.status().await;
    let body = html! {
        table {
            tr { th { "bus" } th { "device" } th { "unit" } th { "ok" } th { "failed" } th { "timeouts" } th { "latency ms" } th { "last success" } th { "state" } th { "last error" } }
            @for b in status["buses"].as_array().into_iter().flatten() {
                @for d in b["devices"].as_array().into_iter().flatten() {
                    tr class=(if d["offline_since"].is_null() { "" } else { "alarm" }) {
                        td { (text(&b["name"])) }
                        td { (text(&d["name"])) }
                        td { (d["unit"]) }
                        td { (d["polls_ok"]) }
                        td { (d["polls_failed"]) }
                        td { (d["timeouts"]) }
                        td { (d["last_latency_ms"].as_f64().map_or_else(String::new, |v| format!("{v:.1}"))) }
                        td { (text(&d["last_success"])) }
                        td { @if d["offline_since"].is_null() { "online" } @else { "OFFLINE" } }
                        td { (text(&d["last_error"])) }
                    }
                }
            }
        }
    };
    page(&s, "Devices", &body)
}

pub(super) async fn relays(State(s): State<WebState>) -> Html<String> {
    let status = s.control.status().await;
    let body = html! {
        p { "Fire alarm: " @if status["fire_alarm"] == true { strong.alarm { "ACTIVE: every door is released" } } @else { (text(&status["fire_alarm"])) } }
        @if let Some(relays) = status["relays"].as_array() {
            table {
                tr { th { "relay" } th { "room" } th { "kind" } th { "device / output" } th { "desired" } th { "actual (read back)" } th { "rule" } th { "reason" } }
                @for r in relays {
                    tr class=(if r["desired"] == r["actual"] { "" } else { "warn" }) {
                        td { (text(&r["relay"])) }
                        td { (text(&r["room"])) }
                        td { (text(&r["kind"])) }
                        td { (text(&r["device"])) " / " (text(&r["output"])) }
                        td { (text(&r["desired"])) }
                        td { (text(&r["actual"])) }
                        td { (text(&r["rule"])) }
                        td { (text(&r["reason"])) }
                    }
                }
            }
        } @else {
            p { "No relays are configured on this gateway." }
        }
    };
    page(&s, "Relays", &body)
}

pub(super) async fn outbox(State(s): State<WebState>) -> Html<String> {
    let status = s.control.status().await;
    let body = html! {
        h2 { "Outbox" }
        pre { (serde_json::to_string_pretty(&status["outbox"]).unwrap_or_default()) }
        @if let Some(e) = status["store_error"].as_str() { p.alarm { "Store error: " (e) } }
        h2 { "Uplink (MQTT)" }
        @if status["mqtt"].is_null() {
            p { "No [mqtt] section: readings stay in the outbox." }
        } @else {
            pre { (serde_json::to_string_pretty(&status["mqtt"]).unwrap_or_default()) }
        }
    };
    page(&s, "Outbox & uplink", &body)
}

pub(super) async fn events(State(s): State<WebState>) -> Html<String> {
    let events = super::recent(&s);
    let body = html! {
        p { "Events, relay audit, billing results and command replies since the daemon started, newest first." }
        table {
            tr { th { "time" } th { "kind" } th { "topic" } th { "record" } }
            @for e in &events {
                tr {
                    td { (text(&e["ts"])) }
                    td { (text(&e["kind"])) }
                    td { (text(&e["topic"])) }
                    td { code { (e["body"].to_string()) } }
                }
            }
        }
    };
    page(&s, "Recent events", &body)
}
