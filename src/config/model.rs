//! The site model the gateway runs with, as the cloud reads it on the retained `config` topic.

use serde_json::{json, Map, Value};

use super::Config;

impl Config {
    /// Rooms, meters with their parents, rooms and dated assignments, pools and their methods,
    /// tariffs with bands, devices with what each register measures, relays, prepaid accounts and
    /// the report policy; with the hash of the file (`config_hash`) and of this model
    /// (`model_hash`, which also changes when the cloud sets a tariff).
    #[must_use]
    pub fn site_model(&self) -> Value {
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                let registers: Map<String, Value> = d
                    .profile
                    .registers
                    .iter()
                    .map(|r| {
                        (
                            r.name.to_string(),
                            json!({"quantity": r.quantity.as_str(), "unit": r.unit.as_ref()}),
                        )
                    })
                    .collect();
                json!({
                    "name": d.name.as_ref(),
                    "bus": self.buses.get(d.bus).map(|b| b.name.as_str()),
                    "unit": d.unit,
                    "profile": d.profile.name,
                    "registers": registers,
                    "publish_every_s": self
                        .report
                        .device_every
                        .get(d.name.as_ref())
                        .unwrap_or(&self.report.publish_every)
                        .as_secs(),
                })
            })
            .collect();
        let relays: Vec<Value> = self
            .enforcement
            .relays
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(&r.spec).unwrap_or(Value::Null);
                v["device"] = json!(r.device);
                v["output"] = json!(r.output);
                v
            })
            .collect();
        let prepaid: Vec<Value> = self
            .enforcement
            .prepaid
            .iter()
            .map(|p| {
                json!({"room": p.room, "utility": p.utility, "device": p.device, "tariff": p.tariff})
            })
            .collect();
        let deadbands: Map<String, Value> = self
            .report
            .deadbands
            .iter()
            .map(|(q, d)| (q.as_str().to_string(), json!({"abs": d.abs, "rel": d.rel})))
            .collect();
        let mut model = json!({
            "gateway": self.gateway.id,
            "site": self.gateway.site,
            "timezone": self.gateway.timezone.name(),
            "config_hash": self.hash,
            "devices": devices,
            "relays": relays,
            "prepaid": prepaid,
            "report": {
                "publish_every_s": self.report.publish_every.as_secs(),
                "max_silence_s": self.report.max_silence.as_secs(),
                "deadbands": deadbands,
                "every_poll": self.report.every_poll,
            },
        });
        // Rooms, meters, pools, tariffs, assignments and the loss threshold, as the site holds them.
        if let (Value::Object(m), Ok(Value::Object(site))) =
            (&mut model, serde_json::to_value(&self.site))
        {
            m.extend(site);
        }
        let hash = super::validate::fnv1a(&model.to_string());
        model["model_hash"] = json!(hash);
        model
    }
}
