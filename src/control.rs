//! The local control socket: `meterd status` and `meterd relay` talk to the running daemon here.
//!
//! One JSON request per line, one JSON reply per line. The socket is created mode 0660, owner root,
//! group `meterd` when that group exists: only root and the service's group can reach it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::enforce::task::{ControlRequest, Input};
use crate::modbus::bus::BusStatus;
use crate::store::StoreHandle;
use crate::uplink::UplinkStatus;

/// What the status answer is made of.
#[derive(Clone)]
pub(crate) struct ControlState {
    pub gateway: String,
    pub config_source: String,
    pub config_hash: String,
    pub started_at: DateTime<Utc>,
    pub clock: crate::clock::Clock,
    pub buses: Vec<Arc<BusStatus>>,
    pub store: StoreHandle,
    pub uplink: Option<Arc<Mutex<UplinkStatus>>>,
    /// Relay requests go to the enforcement task, when there is one.
    pub enforcement: Option<mpsc::Sender<Input>>,
    /// Recomputations go to the accounting task.
    pub accounting: Option<mpsc::Sender<crate::accounting::Request>>,
}

impl ControlState {
    async fn relay(&self, req: ControlRequest) -> Value {
        let Some(tx) = &self.enforcement else {
            return json!({"ok": false, "error": "no relays are configured on this gateway"});
        };
        let (reply, rx) = oneshot::channel();
        if tx.send(Input::Control { req, reply }).await.is_err() {
            return json!({"ok": false, "error": "enforcement stopped"});
        }
        rx.await
            .unwrap_or_else(|_| json!({"ok": false, "error": "no reply"}))
    }

    /// `{"op": "recompute", "period", "reason", "by"}`: a new version of a period's bills.
    async fn recompute(&self, v: &Value) -> Value {
        let Some(tx) = &self.accounting else {
            return json!({"ok": false, "error": "no topology is configured on this gateway: nothing to bill"});
        };
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let (period, reason, by) = (s("period"), s("reason"), s("by"));
        if reason.is_empty() {
            return json!({"ok": false, "error": "a reason is required (it goes into the trail)"});
        }
        let (reply, rx) = oneshot::channel();
        let req = crate::accounting::RunRequest {
            period,
            reason: format!("{reason} (by {by}, local)"),
            command_id: None,
        };
        if tx
            .send(crate::accounting::Request::Run(req, Some(reply)))
            .await
            .is_err()
        {
            return json!({"ok": false, "error": "accounting stopped"});
        }
        match rx.await {
            Ok(Ok(summary)) => json!({"ok": true, "run": summary}),
            Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
            Err(_) => json!({"ok": false, "error": "no reply"}),
        }
    }

    /// Everything `meterd status` shows.
    pub(crate) async fn status(&self) -> Value {
        let buses: Vec<Value> = self
            .buses
            .iter()
            .map(|b| json!({"name": b.name, "devices": b.snapshot(), "line": &*b.line}))
            .collect();
        let outbox = self.store.stats().await;
        let health = self.store.health.lock().ok().and_then(|h| h.clone());
        let relays = if self.enforcement.is_some() {
            self.relay(ControlRequest::List).await
        } else {
            Value::Null
        };
        json!({
            "ok": true,
            "gateway": self.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "config": {"source": self.config_source, "hash": self.config_hash},
            "started_at": self.started_at.to_rfc3339(),
            "uptime_s": (self.clock.now() - self.started_at).num_seconds(),
            "buses": buses,
            "outbox": outbox,
            "store_error": health,
            "mqtt": self.uplink.as_ref().map(|u| u.lock().map_or(Value::Null, |s| json!(*s))),
            "relays": relays.get("relays").cloned().unwrap_or(Value::Null),
            "fire_alarm": relays.get("fire_alarm").cloned().unwrap_or(Value::Null),
        })
    }

    async fn answer(&self, line: &str) -> Value {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        match v.get("op").and_then(Value::as_str) {
            Some("status") => return self.status().await,
            Some("recompute") => return self.recompute(&v).await,
            _ => {}
        }
        match serde_json::from_value::<ControlRequest>(v) {
            Ok(req) => self.relay(req).await,
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        }
    }
}

/// Serves the socket until the task is aborted.
pub(crate) async fn serve(path: PathBuf, state: ControlState) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = crate::enforce::task::group_id("meterd") {
        let _ = std::os::unix::fs::chown(&path, None, Some(gid));
    }
    let state = Arc::new(state);
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = state.answer(&line).await;
                if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Sends one request to a running daemon and returns its reply (CLI side).
pub(crate) async fn request(path: &std::path::Path, req: &Value) -> anyhow::Result<Value> {
    use anyhow::Context as _;
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| format!("cannot reach the daemon at {}: is meterd running, and are you root or in its group?", path.display()))?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(format!("{req}\n").as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        BufReader::new(rd).read_line(&mut line),
    )
    .await
    .context("the daemon did not answer within 30s")??;
    serde_json::from_str(&line).context("unreadable answer from the daemon")
}
