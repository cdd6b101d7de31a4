//! The site model the gateway runs with, as the cloud reads it on the retained `config` topic.

use serde_json::{json, Map, Value};

use super::Config;
use crate::report::Fields;

impl Config {
    /// Rooms, meters with their parents, rooms and dated assignments, pools and their methods,
    /// tariffs with bands, devices with what each register measures, relays, prepaid accounts and
    /// the report policy; with the hash of the file (`config_hash`) and of this model
    /// (`model_hash`, which also changes when the cloud sets a tariff).
    #[must_use]
    pub fn site_model(&self) -> Value {
        serde_json::from_slice(&self.site_model_bytes()).unwrap_or(Value::Null)
    }

    /// [`Config::site_model`] as the bytes published. Written without building a JSON tree of the
    /// devices (15 MiB of small allocations for 1,000 devices, which would stay resident): the rest
    /// is a tree with a placeholder where the devices array is spliced in, keys sorted as a tree
    /// writes them, so the text and its hash are the tree's.
    #[must_use]
    pub fn site_model_bytes(&self) -> Vec<u8> {
        const DEVICES: &str = "\u{1}devices\u{1}";
        const HASH: &str = "\u{1}model_hash\u{1}";
        let devices: Vec<ModelDevice<'_>> = self
            .devices
            .iter()
            .map(|d| {
                let mut registers: Vec<(&str, ModelRegister<'_>)> = d
                    .profile
                    .registers
                    .iter()
                    .map(|r| {
                        (
                            r.name.as_ref(),
                            ModelRegister {
                                quantity: r.quantity.as_str(),
                                unit: r.unit.as_ref(),
                            },
                        )
                    })
                    .collect();
                registers.sort_by(|a, b| a.0.cmp(b.0));
                ModelDevice {
                    bus: self.buses.get(d.bus).map(|b| b.name.as_str()),
                    name: d.name.as_ref(),
                    profile: &d.profile.name,
                    publish_every_s: self
                        .report
                        .device_every
                        .get(d.name.as_ref())
                        .unwrap_or(&self.report.publish_every)
                        .as_secs(),
                    registers: Fields(registers),
                    unit: d.unit,
                }
            })
            .collect();
        let devices = serde_json::to_string(&devices).unwrap_or_else(|_| "[]".into());
        let mut model = self.model_without_devices();
        model["devices"] = json!(DEVICES);
        let splice = |model: &Value| {
            model
                .to_string()
                .replacen(&json!(DEVICES).to_string(), &devices, 1)
        };
        let hash = super::validate::fnv1a(&splice(&model));
        model["model_hash"] = json!(HASH);
        splice(&model)
            .replacen(&json!(HASH).to_string(), &json!(hash).to_string(), 1)
            .into_bytes()
    }

    /// Everything of the site model but its devices.
    fn model_without_devices(&self) -> Value {
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
                // The price as deducted: the room's tariff versions, with any the cloud set.
                let prices = self.site.price_schedule(&p.room, p.utility).unwrap_or_else(|| p.prices.clone());
                json!({"room": p.room, "utility": p.utility, "device": p.device, "tariff": prices.versions()[0].tariff, "prices": prices.versions()})
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
        model
    }
}

/// A device as the site model lists it (fields in sorted order, as a JSON tree writes them).
#[derive(serde::Serialize)]
struct ModelDevice<'a> {
    bus: Option<&'a str>,
    name: &'a str,
    profile: &'a str,
    publish_every_s: u64,
    registers: Fields<'a, ModelRegister<'a>>,
    unit: u8,
}

#[derive(serde::Serialize)]
struct ModelRegister<'a> {
    quantity: &'a str,
    unit: &'a str,
}
