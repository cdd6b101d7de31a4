//! The cloud's side of `meterd demo`, on the embedded broker: it sends what an operator's backend
//! sends (signed with the key the demo gave the gateway) and prints what arrives from the gateway, so
//! each step shows in the demo's output, on MQTT and in the web view.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::Signer as _;
use serde_json::{json, Value};

use super::out;
use crate::config::Config;
use crate::sim::RunningSim;

/// Room 104's prepaid balance the cloud sets (fen): 0.01 kWh steps of its heater's use cost
/// 0.85 fen by day and 0.35 fen at night, so it runs out within the demo's first minute either way.
const DEMO_BALANCE_FEN: i64 = 1;
/// Room 104's load once the tenant switches on a 3 kW heater (W).
const HEATER_LOAD_W: f64 = 3600.0;
/// The room whose bill the demo explains.
const EXPLAINED_ROOM: &str = "101";

/// Plays the scenario: freeze room 101's door access, set room 104's prepaid balance low while its
/// tenant heats, and ask for last month's bills; prints the gateway's records as the cloud gets them.
pub(super) async fn run(
    config: Config,
    key: ed25519_dalek::SigningKey,
    sim: Arc<RunningSim>,
    last_month: String,
    clock: crate::clock::Clock,
) {
    let Some(mqtt) = config.mqtt.clone() else {
        return;
    };
    let prefix = format!("{}/{}", mqtt.topic_prefix, config.gateway.id);
    let mut opts = rumqttc::MqttOptions::new("meterd-demo-cloud", mqtt.host.clone(), mqtt.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
    for t in ["events", "audit", "reply", "results/bill"] {
        let _ = client
            .subscribe(format!("{prefix}/{t}"), rumqttc::QoS::AtLeastOnce)
            .await;
    }
    let watch_config = config.clone();
    let watch_prefix = prefix.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let topic = p
                        .topic
                        .strip_prefix(&format!("{watch_prefix}/"))
                        .unwrap_or(&p.topic);
                    if let Ok(body) = serde_json::from_slice::<Value>(&p.payload) {
                        for line in noticed(topic, &body, &watch_config) {
                            out(&format!("\ncloud <- {watch_prefix}/{topic}: {line}\n"));
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    });
    let send = |command: &'static str, mut args: Value| {
        let id = format!("demo-{command}-{:08x}", fastrand::u32(..));
        args["id"] = id.clone().into();
        args["expires_at"] = (clock.now() + chrono::Duration::minutes(10))
            .to_rfc3339()
            .into();
        let content = crate::enforce::auth::signed_content(command, &id, &args);
        let sig = key.sign(&content).to_bytes();
        args["sig"] =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sig).into();
        let client = client.clone();
        let topic = format!("{prefix}/cmd/{command}");
        async move {
            let _ = client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, args.to_string())
                .await;
        }
    };
    tokio::time::sleep(Duration::from_secs(8)).await;
    send(
        "freeze",
        json!({"room": "101", "scope": "access", "reason": "demo: lease terminated"}),
    )
    .await;
    out(&format!("\nscenario: the cloud freezes room 101's door access with a signed command ({prefix}/cmd/freeze); the daemon switches 101-door off and reads it back (relays column, /relays, {prefix}/audit)\n"));
    tokio::time::sleep(Duration::from_secs(6)).await;
    send(
        "set_balance",
        json!({"room": "104", "utility": "electricity", "balance": DEMO_BALANCE_FEN}),
    )
    .await;
    sim.set_load("rs485-1", 4, HEATER_LOAD_W);
    out(&format!("\nscenario: room 104's prepaid balance is set to {}.{:02} CNY ({prefix}/cmd/set_balance) and its tenant switches on a 3 kW heater ({HEATER_LOAD_W} W in all): the gateway deducts each 0.01 kWh at the time-of-use price until the balance runs out\n", DEMO_BALANCE_FEN / 100, DEMO_BALANCE_FEN % 100));
    tokio::time::sleep(Duration::from_secs(6)).await;
    send("apportion", json!({"period": last_month})).await;
    out(&format!(
        "\nscenario: the cloud asks for {last_month}'s bills ({prefix}/cmd/apportion)\n"
    ));
}

/// What the demo prints for a record the cloud received (nothing for the routine ones).
fn noticed(topic: &str, body: &Value, config: &Config) -> Vec<String> {
    let records: Vec<&Value> = body["records"]
        .as_array()
        .map_or_else(|| vec![body], |r| r.iter().collect());
    let mut lines = Vec::new();
    for r in records {
        let s = |k: &str| r[k].as_str().unwrap_or("?").to_string();
        // A record's time in the site's timezone.
        let local = |k: &str| {
            chrono::DateTime::parse_from_rfc3339(&s(k)).map_or_else(
                |_| s(k),
                |t| {
                    t.with_timezone(&config.gateway.timezone)
                        .format("%H:%M:%S")
                        .to_string()
                },
            )
        };
        match (topic, r["event"].as_str()) {
            ("events", Some("balance_alarm")) => lines.push(format!(
                "balance check of {}: {:.3} {unit} in, {:.3} {unit} on its sub-meters ({:+.1} % loss over {} to {}){}",
                s("node"),
                r["consumption"].as_f64().unwrap_or(f64::NAN),
                r["children"].as_f64().unwrap_or(f64::NAN),
                r["loss_pct"].as_f64().unwrap_or(f64::NAN),
                local("from"),
                local("to"),
                match (r["suspect"].as_str(), r["belongs_under"].as_str()) {
                    (Some(m), Some(u)) => format!("; {m} does not fit there: it is wired under {u} (dashed on the topology page)"),
                    (Some(m), None) => format!("; {m} does not fit there (dashed on the topology page)"),
                    _ => String::new(),
                },
                unit = config
                    .site
                    .meters
                    .get(&s("node"))
                    .map_or("", |m| m.utility.unit())
            )),
            ("events", Some("prepaid_reconciled")) => lines.push(format!(
                "room {}'s prepaid balance set by the cloud: {} fen (the gateway's own figure was {} fen)",
                s("room"),
                r["cloud"],
                r["local"]
            )),
            ("events", Some(e)) if e.starts_with("prepaid_") => lines.push(format!(
                "{e} room {}: balance {} fen{}",
                s("room"),
                r["balance"],
                if e == "prepaid_balance_empty" {
                    "; the supply stays on through the grace and is cut in the allowed hours (see /relays)"
                } else {
                    ""
                }
            )),
            ("audit", Some("relay_switched")) => lines.push(format!(
                "{} switched {} by rule {}, read back {} (confirmed: {})",
                s("relay"),
                s("to"),
                s("rule"),
                s("readback"),
                r["confirmed"]
            )),
            ("reply", _) => {
                let mut rest = r.clone();
                if let Some(m) = rest.as_object_mut() {
                    for k in ["seq", "id", "command", "ok"] {
                        m.remove(k);
                    }
                }
                lines.push(format!(
                    "reply to {}: {} {rest}",
                    s("command"),
                    if r["ok"] == json!(true) { "ok" } else { "refused" },
                ));
            }
            // Once per run: the room's electricity bill brings its whole statement.
            ("results/bill", _)
                if r["room"] == json!(EXPLAINED_ROOM) && r["utility"] == json!("electricity") =>
            {
                lines.push(format!(
                    "room {EXPLAINED_ROOM}'s bill for {}; explained line by line (as `meterd bill --period {} --room {EXPLAINED_ROOM}` shows it):\n{}",
                    s("period"),
                    s("period"),
                    explanation(config, &s("period")).unwrap_or_else(|e| format!("(cannot read it back: {e})"))
                ));
            }
            _ => {}
        }
    }
    lines
}

/// The stored run's statement of the explained room, as `meterd bill --room` prints it.
fn explanation(config: &Config, period: &str) -> Result<String, String> {
    let conn = crate::store::open_read_only(&config.store.path).map_err(|e| e.to_string())?;
    let run = crate::store::load_run(&conn, period, None)
        .map_err(|e| e.to_string())?
        .ok_or("no run kept")?;
    let st: crate::bill::Statement = serde_json::from_str(&run.body).map_err(|e| e.to_string())?;
    Ok(st
        .bills
        .iter()
        .filter(|b| b.room == EXPLAINED_ROOM)
        .map(|b| crate::bill::explain(b, config.gateway.timezone))
        .collect::<Vec<_>>()
        .join("\n"))
}
