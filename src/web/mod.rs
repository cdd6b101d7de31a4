//! The local read-only web view: the meter trees with live values and losses, each node's history
//! curve, device health, relays, the outbox and uplink, recent events; the same as JSON under
//! `/api/`. Served by the daemon on its own runtime when `[web]` says where; every request on the
//! network carries the token (header, cookie, or `?token=` which sets the cookie), the Unix socket
//! for a local reverse proxy is guarded by its group. Nothing here changes state: GET only.

mod layout;
mod pages;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::accounting::{LossLevel, NodeView};
use crate::config::{BoundListener, Config};
use crate::control::ControlState;
use crate::modbus::profile::Quantity;
use crate::modbus::reading::{Quality, Reading};
use crate::topology::Utility;

/// The newest reading of every register, kept by the recorder while the view is on.
pub(crate) type Live = HashMap<(Arc<str>, Arc<str>), Reading>;

/// A value and when it was read.
type Timed = (Option<f64>, DateTime<Utc>);

/// Notes each reading of a poll as its register's newest.
pub(crate) fn note(live: &Mutex<Live>, batch: &[Reading]) {
    if let Ok(mut l) = live.lock() {
        for r in batch {
            l.insert((r.device.clone(), r.register.clone()), r.clone());
        }
    }
}

/// What the view reads: the config, the daemon's live state and the newest readings.
#[derive(Clone)]
pub(crate) struct WebState {
    pub(crate) config: Arc<Config>,
    pub(crate) control: ControlState,
    pub(crate) live: Arc<Mutex<Live>>,
}

/// Why the view could not start.
#[derive(Debug, Error)]
pub enum WebError {
    #[error("web view: cannot listen on {addr}: {source}; check [web] listen (is the port in use, is the address this gateway's?)")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("web view: cannot create the socket {path}: {source}; check [web] socket and that its directory is writable")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cookie a browser keeps the token in after opening a `?token=` link.
const COOKIE: &str = "meterd_token";

/// The routes; `token` None serves without one (the Unix socket).
fn router(state: WebState, token: Option<Arc<str>>) -> Router {
    Router::new()
        .route("/", get(pages::index))
        .route("/topology/{utility}", get(pages::topology))
        .route("/node/{name}", get(pages::node))
        .route("/devices", get(pages::devices))
        .route("/relays", get(pages::relays))
        .route("/outbox", get(pages::outbox))
        .route("/events", get(pages::events))
        .route("/api/topology/{utility}", get(api_topology))
        .route("/api/node/{name}", get(api_node))
        .route("/api/status", get(api_status))
        .route("/api/events", get(api_events))
        .route("/style.css", get(style))
        .route("/favicon.ico", get(favicon))
        .layer(axum::middleware::from_fn_with_state(token, auth))
        .with_state(state)
}

/// Serves the view where `[web]` says until the task is aborted.
pub(crate) async fn serve(state: WebState) -> Result<(), WebError> {
    let web = state.config.web.clone();
    let mut servers = Vec::new();
    if let (Some(addr), Some(token)) = (web.listen, web.token.clone()) {
        let listen_err = |source| WebError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = match web.bound.as_ref().and_then(BoundListener::take) {
            Some(l) => l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l))
                .map_err(listen_err)?,
            None => tokio::net::TcpListener::bind(addr)
                .await
                .map_err(listen_err)?,
        };
        tracing::info!(%addr, "web view listening");
        let app = router(state.clone(), Some(token.into()));
        servers.push(tokio::spawn(
            async move { axum::serve(listener, app).await },
        ));
    }
    if let Some(path) = web.socket.clone() {
        let listener = bind_socket(&path).map_err(|source| WebError::Socket {
            path: path.clone(),
            source,
        })?;
        let app = router(state.clone(), None);
        servers.push(tokio::spawn(
            async move { axum::serve(listener, app).await },
        ));
    }
    for s in servers {
        if let Ok(Err(e)) = s.await {
            tracing::error!(error = %e, "web view stopped");
        }
    }
    Ok(())
}

fn bind_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = crate::enforce::task::group_id("meterd") {
        let _ = std::os::unix::fs::chown(path, None, Some(gid));
    }
    Ok(listener)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Lets a request through when it carries the token; a valid `?token=` also sets the cookie so the
/// page's links work. Compared in constant time.
async fn auth(
    State(token): State<Option<Arc<str>>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    let matches = |t: &str| {
        use subtle::ConstantTimeEq;
        t.len() == token.len() && bool::from(t.as_bytes().ct_eq(token.as_bytes()))
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(matches);
    if bearer.is_some_and(matches) || cookie {
        return next.run(req).await;
    }
    if q.token.as_deref().is_some_and(matches) {
        let mut res = next.run(req).await;
        if let Ok(v) = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict").parse() {
            res.headers_mut().insert(header::SET_COOKIE, v);
        }
        return res;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "401: this view needs the token from [web] token in /etc/meterd/meterd.toml: open /?token=… once, or send Authorization: Bearer …\n",
    )
        .into_response()
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("style.css"),
    )
}

async fn favicon() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#1f6feb\"/></svg>",
    )
}

/// An error page or JSON error: what was asked for that does not exist.
#[derive(Debug)]
pub(crate) struct NotFound(String);

impl IntoResponse for NotFound {
    fn into_response(self) -> Response {
        (StatusCode::NOT_FOUND, self.0).into_response()
    }
}

/// One node of a tree as drawn: the operator's view of it plus the live values.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Node {
    #[serde(flatten)]
    pub(crate) view: NodeView,
    /// The counter now (live when the device was polled since the start, else the history).
    pub(crate) value: Option<f64>,
    pub(crate) value_ts: Option<DateTime<Utc>>,
    /// Instantaneous power (W) where the device reports it.
    pub(crate) power_w: Option<f64>,
    /// The node's device is not answering (it has no live value).
    pub(crate) offline: bool,
    pub(crate) level: Option<LossLevel>,
    /// Named as the suspect of its parent's balance.
    pub(crate) suspect: bool,
    /// Where the suspect would balance.
    pub(crate) belongs_under: Option<String>,
}

/// One utility's trees.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Topology {
    pub(crate) utility: Utility,
    pub(crate) unit: &'static str,
    pub(crate) threshold_pct: f64,
    pub(crate) window_from: DateTime<Utc>,
    pub(crate) window_to: DateTime<Utc>,
    pub(crate) nodes: Vec<Node>,
}

fn parse_utility(s: &str) -> Result<Utility, NotFound> {
    match s {
        "electricity" => Ok(Utility::Electricity),
        "water" => Ok(Utility::Water),
        _ => Err(NotFound(format!(
            "no utility {s:?}: expected electricity or water\n"
        ))),
    }
}

/// Reads the history (off the runtime: `SQLite` blocks) and joins the live values.
/// Balances are over the last `[topology] balance_every`, the interval the daemon checks.
pub(crate) async fn topology(s: &WebState, utility: Utility) -> Topology {
    let window = s.config.topology.balance_every;
    let config = s.config.clone();
    let now = s.control.clock.now();
    let views = tokio::task::spawn_blocking(move || {
        let conn = crate::store::open_read_only(&config.store.path).ok();
        crate::accounting::node_views(conn.as_ref(), &config, window, now)
    })
    .await;
    let (from, to, views) = match views {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "web view: history unreadable; showing live values only");
            let (from, to) = crate::accounting::live_window_at(&s.config, window, now);
            (from, to, Vec::new())
        }
        Err(_) => {
            let (from, to) = crate::accounting::live_window_at(&s.config, window, now);
            (from, to, Vec::new())
        }
    };
    let views = if views.is_empty() {
        crate::accounting::node_views(None, &s.config, window, now)
            .map(|v| v.2)
            .unwrap_or_default()
    } else {
        views
    };
    let threshold = s.config.site.loss_threshold_pct;
    // The newest good value of each device's quantity, found in one pass under the lock (a page of a
    // 1,000-meter site would otherwise scan every register for every node).
    let mut newest: HashMap<(Arc<str>, Quantity), Timed> = HashMap::new();
    if let Ok(live) = s.live.lock() {
        for r in live.values().filter(|r| r.quality == Quality::Good) {
            let slot = newest
                .entry((r.device.clone(), r.quantity))
                .or_insert((r.value, r.ts));
            if r.ts > slot.1 {
                *slot = (r.value, r.ts);
            }
        }
    }
    let offline: std::collections::HashSet<String> = s
        .control
        .buses
        .iter()
        .flat_map(|b| b.snapshot())
        .filter(|d| d.offline_since.is_some())
        .map(|d| d.name)
        .collect();
    let nodes: Vec<Node> = views
        .into_iter()
        .filter(|v| v.utility == utility)
        .map(|v| {
            let newest = |q: Quantity| {
                v.device
                    .as_deref()
                    .and_then(|d| newest.get(&(Arc::from(d), q)).copied())
            };
            let (value, value_ts) = match newest(utility.quantity()) {
                Some((value, ts)) => (value, Some(ts)),
                None => (
                    v.latest,
                    v.latest_ts
                        .as_deref()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| t.with_timezone(&Utc)),
                ),
            };
            let power_w = newest(Quantity::PowerW).and_then(|(value, _)| value);
            Node {
                level: v
                    .balance
                    .as_ref()
                    .map(|b| LossLevel::of(b.loss_pct, threshold)),
                suspect: false,
                belongs_under: None,
                offline: v.device.as_ref().is_some_and(|d| offline.contains(d)),
                value,
                value_ts,
                power_w,
                view: v,
            }
        })
        .collect();
    let mut nodes = nodes;
    let suspects: Vec<(String, Option<String>)> = nodes
        .iter()
        .filter_map(|n| n.view.balance.as_ref()?.suspect.clone())
        .map(|s| (s.meter, s.belongs_under))
        .collect();
    for (meter, under) in suspects {
        if let Some(n) = nodes.iter_mut().find(|n| n.view.name == meter) {
            n.suspect = true;
            n.belongs_under = under;
        }
    }
    Topology {
        utility,
        unit: utility.unit(),
        threshold_pct: threshold,
        window_from: from,
        window_to: to,
        nodes,
    }
}

/// A node's history over a range.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct History {
    pub(crate) node: String,
    pub(crate) device: Option<String>,
    pub(crate) unit: &'static str,
    pub(crate) range: Range,
    pub(crate) from: DateTime<Utc>,
    pub(crate) to: DateTime<Utc>,
    /// Counter samples `(ms, value)`.
    pub(crate) counter: Vec<(i64, f64)>,
    /// Average rate between samples `(ms, per hour)`: kW for electricity, m³/h for water.
    pub(crate) rate: Vec<(i64, f64)>,
}

/// The ranges a node's page offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Range {
    #[default]
    Day,
    Week,
    Month,
}

impl Range {
    fn length(self) -> chrono::Duration {
        match self {
            Range::Day => chrono::Duration::days(1),
            Range::Week => chrono::Duration::days(7),
            Range::Month => chrono::Duration::days(31),
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct RangeQuery {
    #[serde(default)]
    pub(crate) range: Range,
}

/// Power points a node's chart has room for: rates are taken over a range's 1/300th at least.
const CHART_POINTS: i64 = 300;

/// The node's counter history from the local store.
pub(crate) async fn history(s: &WebState, name: &str, range: Range) -> Result<History, NotFound> {
    let Some(meter) = s.config.site.meters.get(name) else {
        return Err(NotFound(format!(
            "no meter node {name:?} in the topology\n"
        )));
    };
    let device = match &meter.source {
        crate::topology::Source::Device(d) => Some(d.clone()),
        crate::topology::Source::Virtual(_) => None,
    };
    let to = s.control.clock.now();
    let from = to - range.length();
    let counter = match device.clone() {
        Some(d) => {
            let path = s.config.store.path.clone();
            let quantity = meter.utility.quantity().as_str();
            tokio::task::spawn_blocking(move || {
                let conn = crate::store::open_read_only(&path).ok()?;
                crate::store::history_window(
                    &conn,
                    &d,
                    quantity,
                    from.timestamp_millis(),
                    to.timestamp_millis(),
                )
                .ok()
            })
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let counter: Vec<(i64, f64)> = counter
        .into_iter()
        .filter(|(t, _)| *t >= from.timestamp_millis())
        .collect();
    Ok(History {
        node: name.to_string(),
        device,
        unit: meter.utility.unit(),
        range,
        from,
        to,
        rate: layout::rate_per_hour(&counter, range.length().num_milliseconds() / CHART_POINTS),
        counter,
    })
}

/// Recent events and audit records, newest first, with their JSON bodies.
pub(crate) fn recent(s: &WebState) -> Vec<Value> {
    let recent = s
        .control
        .store
        .recent
        .lock()
        .map(|r| r.iter().rev().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    recent
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "kind": r.kind,
                "topic": r.topic,
                "ts": r.ts.to_rfc3339(),
                "body": serde_json::from_slice::<Value>(&r.payload).unwrap_or(Value::Null),
            })
        })
        .collect()
}

async fn api_topology(
    State(s): State<WebState>,
    Path(utility): Path<String>,
) -> Result<Json<Topology>, NotFound> {
    Ok(Json(topology(&s, parse_utility(&utility)?).await))
}

async fn api_node(
    State(s): State<WebState>,
    Path(name): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Json<History>, NotFound> {
    Ok(Json(history(&s, &name, q.range).await?))
}

async fn api_status(State(s): State<WebState>) -> Json<Value> {
    Json(s.control.status().await)
}

async fn api_events(State(s): State<WebState>) -> Json<Vec<Value>> {
    Json(recent(&s))
}

/// A page as HTML.
pub(crate) fn html(m: maud::Markup) -> Html<String> {
    Html(m.into_string())
}
