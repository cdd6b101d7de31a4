//! Config validation tests: inline TOML, every problem listed with its file and key.

use super::*;
use crate::modbus::timing;

const GOOD: &str = r#"
    [gateway]
    id = "gw-1"
    site = "Tower A"
    timezone = "Asia/Shanghai"

    [[bus]]
    name = "rs485-1"
    kind = "rtu"
    device = "/dev/ttyUSB0"
    baud = 9600
    parity = "even"

    [[bus]]
    name = "lan"
    kind = "tcp"
    host = "127.0.0.1"
    port = 5020
    max_concurrent = 2

    [[device]]
    name = "m1"
    bus = "rs485-1"
    unit = 1
    profile = "eastron_sdm630"
    interval = "5s"

    [[device]]
    name = "relays"
    bus = "lan"
    unit = 255
    profile = "relay_waveshare_8ch"
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_at(text, "test.toml", Path::new("/nonexistent"))
}

fn issues(text: &str) -> Vec<String> {
    match load(text) {
        Err(ConfigError::Invalid(i)) => i.iter().map(std::string::ToString::to_string).collect(),
        other => panic!("expected invalid, got {other:?}"),
    }
}

#[test]
fn a_log_level_like_loud_is_refused_and_directives_are_accepted() {
    let with = |l: &str| {
        GOOD.replace(
            "timezone = \"Asia/Shanghai\"",
            &format!("timezone = \"Asia/Shanghai\"\nlog_level = \"{l}\""),
        )
    };
    let i = issues(&with("loud"));
    assert!(
        i.iter()
            .any(|m| m.contains("gateway.log_level") && m.contains("expected error, warn, info")),
        "{i:?}"
    );
    assert!(!issues(&with("info,meterd::uplink=verbose")).is_empty());
    for ok in ["info", "DEBUG", "warn,meterd::uplink=debug", "off"] {
        load(&with(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn two_buses_on_one_serial_device_or_one_rtu_over_tcp_endpoint_are_refused() {
    let twice = GOOD.to_string()
        + r#"
    [[bus]]
    name = "rs485-again"
    kind = "rtu"
    device = "/dev/ttyUSB0"
    baud = 2400
    parity = "even"
    [[bus]]
    name = "moxa-1"
    kind = "rtu_over_tcp"
    host = "192.168.1.50"
    port = 4001
    [[bus]]
    name = "moxa-1-again"
    kind = "rtu_over_tcp"
    host = "192.168.1.50"
    port = 4001
    [[bus]]
    name = "moxa-1-port-2"
    kind = "rtu_over_tcp"
    host = "192.168.1.50"
    port = 4002
    "#;
    let i = issues(&twice);
    assert!(
        i.iter().any(|m| m.contains("rs485-again")
            && m.contains("serial device /dev/ttyUSB0 of bus \"rs485-1\"")),
        "{i:?}"
    );
    assert!(
        i.iter()
            .any(|m| m.contains("moxa-1-again") && m.contains("192.168.1.50:4001")),
        "{i:?}"
    );
    assert_eq!(
        i.len(),
        2,
        "the second port of the same server is another line: {i:?}"
    );
}

#[test]
fn a_good_config_loads_with_defaults_and_plans() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.buses[0].gap, timing::t35(9600));
    assert_eq!(c.devices[0].policy.interval, Duration::from_secs(5));
    assert_eq!(
        c.devices[0].pause,
        Duration::from_millis(60),
        "Eastron quirk from the profile"
    );
    // Default max_gap 8: 0x0000-0x000B and 0x0034-0x004B; the 40-register hole is not read.
    let spans: Vec<(u16, u16)> = c.devices[0]
        .plan
        .requests
        .iter()
        .map(|r| (r.address, r.count))
        .collect();
    assert_eq!(spans, vec![(0x00, 12), (0x34, 24)]);
    assert_eq!(c.buses[1].concurrency(), 2);
    assert_eq!(c.gateway.timezone, chrono_tz::Asia::Shanghai);
}

#[test]
fn every_problem_is_listed_at_once_with_file_and_key() {
    let bad = r#"
        [gateway]
        id = "gw/1"
        site = "x"
        timezone = "Mars/Olympus"

        [[bus]]
        name = "a"
        kind = "rtu"
        device = "/dev/ttyS0"
        baud = 9601
        gap = "1ms"

        [[bus]]
        name = "a"
        kind = "tcp"
        host = "h"
        port = 70000

        [[device]]
        name = "m1"
        bus = "a"
        unit = 1
        profile = "nope"

        [[device]]
        name = "m1"
        bus = "zzz"
        unit = 1
        profile = "eastron_sdm120"

        [[device]]
        name = "m2"
        bus = "a"
        unit = "one"
        profile = "eastron_sdm120"

        [[device]]
        name = "m3"
        bus = "a"
        unit = 1
        profile = "eastron_sdm120"

        [modem]
    "#;
    let all = issues(bad).join("\n");
    for expected in [
        "test.toml: gateway.id: must be non-empty",
        "test.toml: gateway.timezone: \"Mars/Olympus\" is not an IANA timezone",
        "test.toml: bus[0] (a).baud: 9601 is not a serial speed",
        "test.toml: bus[0] (a).gap: ",
        "shorter than t3.5",
        "test.toml: bus[1] (a).name: duplicate bus name \"a\"",
        "test.toml: bus[1] (a).port: 70000 is not a TCP port",
        "test.toml: device[0] (m1).profile: unknown profile \"nope\"",
        "test.toml: device[1] (m1).name: duplicate device name \"m1\"",
        "test.toml: device[1] (m1).bus: unknown bus \"zzz\"",
        "test.toml: device[2] (m2): invalid type",
        "test.toml: device[3] (m3).unit: unit 1 is already used by device \"m1\"",
        "test.toml: modem: unknown section",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

#[test]
fn rtu_unit_ids_are_1_to_247_but_tcp_allows_255() {
    let bad = GOOD.replace("unit = 1\n", "unit = 248\n");
    let all = issues(&bad).join("\n");
    assert!(
        all.contains("device[0] (m1).unit: 248: an RS485 unit id is 1..=247"),
        "{all}"
    );
    assert!(load(GOOD).is_ok());
}

#[test]
fn syntax_errors_name_the_file() {
    let all = issues("[gateway\nid=").join("\n");
    assert!(all.starts_with("test.toml: not valid TOML"), "{all}");
}

#[test]
fn user_profiles_load_from_the_profiles_dir_and_their_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles/site_meter.toml"),
        "[profile]\nname = \"site_meter\"\nsource = \"test\"\n[[register]]\nname = \"e\"\nquantity = \"energy_kwh\"\nfunction = \"holding\"\naddress = 0\ntype = \"u32\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("profiles/broken.toml"),
        "[profile]\nname = \"broken\"\nsource = \"x\"\n[[register]]\nname = \"e\"\nquantity = \"energy_kwh\"\nfunction = \"holding\"\naddress = 65535\ntype = \"u32\"\n",
    )
    .unwrap();
    let text = GOOD.replace("profile = \"eastron_sdm630\"", "profile = \"site_meter\"");
    let err = Config::from_str_at(&text, "meterd.toml", dir.path()).unwrap_err();
    let ConfigError::Invalid(issues) = err else {
        panic!()
    };
    assert!(
        issues
            .iter()
            .all(|i| i.file.ends_with("profiles/broken.toml")),
        "{issues:?}"
    );
    assert!(
        issues
            .iter()
            .any(|i| i.message.contains("register range overflow")),
        "{issues:?}"
    );
    std::fs::remove_file(dir.path().join("profiles/broken.toml")).unwrap();
    let c = Config::from_str_at(&text, "meterd.toml", dir.path()).unwrap();
    assert_eq!(c.devices[0].profile.name, "site_meter");
}

#[test]
fn without_the_environment_nothing_outside_the_text_is_read() {
    // A TLS file that is not on this machine and a site profile in a directory next to the file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles/site_meter.toml"),
        "[profile]\nname = \"site_meter\"\nsource = \"test\"\n[[register]]\nname = \"e\"\nquantity = \"energy_kwh\"\nfunction = \"holding\"\naddress = 0\ntype = \"u32\"\n",
    )
    .unwrap();
    let tls = format!(
        "{GOOD}\n[mqtt]\nhost = \"broker\"\n[mqtt.tls]\nca_file = \"/etc/meterd/not-on-this-machine.pem\"\n"
    );
    let with_env = Config::from_str_at(&tls, "meterd.toml", dir.path()).unwrap_err();
    assert!(
        with_env
            .to_string()
            .contains("mqtt.tls.ca_file: cannot read"),
        "{with_env}"
    );
    let alone = Config::from_str_only(&tls, "meterd.toml", dir.path()).unwrap();
    assert_eq!(
        alone.mqtt.unwrap().tls.unwrap().ca_file,
        Path::new("/etc/meterd/not-on-this-machine.pem")
    );

    // The site profile is read with the environment; alone, the check says why it is unknown.
    let site = GOOD.replace("profile = \"eastron_sdm630\"", "profile = \"site_meter\"");
    assert!(Config::from_str_at(&site, "meterd.toml", dir.path()).is_ok());
    let err = Config::from_str_only(&site, "meterd.toml", dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("site profiles are not read without the environment"),
        "{err}"
    );
}

#[test]
fn the_report_policy_is_validated_and_a_device_may_report_its_counters_on_its_own_interval() {
    let text = GOOD.replace(
        "interval = \"5s\"",
        "interval = \"5s\"\npublish_every = \"5m\"",
    ) + "\n[report]\npublish_every = \"30m\"\nmax_silence = \"1h\"\ndeadband.power_w = { rel = 0.02, abs = 5.0 }\n";
    let c = load(&text).unwrap();
    assert_eq!(c.report.publish_every, Duration::from_secs(1800));
    assert_eq!(c.report.max_silence, Duration::from_secs(3600));
    assert_eq!(
        c.report.device_every.get("m1"),
        Some(&Duration::from_secs(300))
    );
    let band = c.report.deadbands[&crate::modbus::profile::Quantity::PowerW];
    assert_eq!((band.rel, band.abs), (0.02, 5.0));
    // Voltage keeps its default.
    assert!(c
        .report
        .deadbands
        .contains_key(&crate::modbus::profile::Quantity::VoltageV));

    let bad = format!(
        "{GOOD}\n[report]\npublish_every = \"0s\"\ndeadband.energy_kwh = {{ rel = 0.1 }}\ndeadband.voltage_v = {{ rel = 1.5 }}\n"
    );
    let all = issues(&bad).join("\n");
    for expected in [
        "report.publish_every: 0s: expected 1s to 24h",
        "report.deadband.energy_kwh: counters go out every publish_every",
        "report.deadband.voltage_v: abs = 0, rel = 1.5: expected abs ≥ 0",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

#[test]
fn store_and_mqtt_sections_are_validated_with_the_rest() {
    let text = format!(
        "{GOOD}\n[store]\npath = \"state/outbox.db\"\nmax_rows = 10\n[mqtt]\nhost = \"broker\"\nusername = \"u\"\nbacklog_share = 2.0\ntopic_prefix = \"a/#\"\n[mqtt.tls]\nca_file = \"missing-ca.pem\"\n"
    );
    let all = issues(&text).join("\n");
    for expected in [
        "store.max_rows: 10: keep at least 1000 rows",
        "mqtt.password: username is set but password is missing",
        "mqtt.backlog_share: 2: expected 0.05..=0.95",
        "mqtt.topic_prefix: \"a/#\": must be non-empty, without wildcards",
        "mqtt.tls.ca_file: cannot read /nonexistent/missing-ca.pem",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    let ok = load(&format!(
        "{GOOD}\n[store]\npath = \"state/outbox.db\"\n[mqtt]\nhost = \"broker\"\n"
    ))
    .unwrap();
    let m = ok.mqtt.unwrap();
    assert_eq!(
        (m.port, m.client_id.as_str(), m.topic_prefix.as_str()),
        (1883, "meterd-gw-1", "meterd")
    );
    assert_eq!(
        ok.store.path,
        Path::new("/nonexistent/state/outbox.db"),
        "relative to the config file"
    );
    assert_eq!(ok.hash.len(), 16);
}

#[test]
fn topology_errors_name_the_node_and_are_all_listed() {
    let devices = r#"
        [[device]]
        name = "main"
        bus = "lan"
        unit = 1
        profile = "chint_dtsu666"
        [[device]]
        name = "sub1"
        bus = "lan"
        unit = 2
        profile = "eastron_sdm120"
        [[device]]
        name = "sub2"
        bus = "lan"
        unit = 3
        profile = "eastron_sdm120"
        [[device]]
        name = "stray"
        bus = "lan"
        unit = 4
        profile = "eastron_sdm120"
        [[device]]
        name = "wm"
        bus = "lan"
        unit = 5
        profile = "water_xintai_valve"
    "#;
    let topo = r#"
        [[room]]
        id = "101"
        [[room]]
        id = "102"
        area_m2 = 20
        [[room]]
        id = "103"
        area_m2 = 30
        [[meter]]
        name = "main"
        utility = "electricity"
        parent = "sub2"
        [[meter]]
        name = "sub1"
        utility = "electricity"
        parent = "main"
        room = "101"
        [[meter]]
        name = "sub2"
        utility = "electricity"
        parent = "main"
        room = "102"
        [[meter]]
        name = "sub1-again"
        device = "sub1"
        utility = "electricity"
        parent = "sub2"
        [[meter]]
        name = "wm"
        utility = "water"
        parent = "main"
        [[meter]]
        name = "virt"
        utility = "electricity"
        virtual = "main - nope"
        [[pool]]
        name = "lifts"
        utility = "electricity"
        rooms = ["101", "102"]
        method = { area = 0.5, consumption = 0.6 }
    "#;
    let text = format!(
        "{}\n{devices}\n{topo}",
        GOOD.split("[[device]]").next().unwrap()
    );
    let all = issues(&text).join("\n");
    for expected in [
        "meter[0] (main).parent: cycle: main → sub2 → main",
        "meter[3] (sub1-again).device: device \"sub1\" is already meter \"sub1\" (parent main); a meter with two parents (sub2)",
        "meter[4] (wm).parent: a water meter \"wm\" under an electricity meter \"main\": a tree never mixes utilities",
        "meter[5] (virt).virtual: unknown meter \"nope\"",
        "device (stray): meters energy or water but is in no [[meter]] tree",
        "room (103): no meter bills this room",
        "pool[0] (lifts).method: weights must be ≥ 0 and sum to 1 (they sum to 1.1)",
        "pool[0] (lifts).method.area: room \"101\" has no area_m2, which this method needs",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

/// Before the fix a pool's `fixed` coefficients were taken as given: a negative one (room 102 at
/// −0.3) was taken as 0 without a word (the room paid nothing, the others its part), and one for a
/// room not in the pool (or not in the site) was silently ignored. An exchange of a virtual meter, one with a negative reading, and
/// two of one meter at one instant went through too.
#[test]
fn negative_or_stray_fixed_coefficients_and_impossible_exchanges_are_refused() {
    let text = format!(
        "{}\n{}",
        GOOD.split("[[device]]").next().unwrap(),
        r#"
        [[device]]
        name = "m101"
        bus = "lan"
        unit = 1
        profile = "eastron_sdm120"
        [[device]]
        name = "m102"
        bus = "lan"
        unit = 2
        profile = "eastron_sdm120"
        [[room]]
        id = "101"
        [[room]]
        id = "102"
        [[meter]]
        name = "m101"
        utility = "electricity"
        room = "101"
        [[meter]]
        name = "m102"
        utility = "electricity"
        room = "102"
        [[meter]]
        name = "both"
        utility = "electricity"
        virtual = "m101 + m102"
        [[pool]]
        name = "stairs"
        utility = "electricity"
        rooms = ["101", "102"]
        method = { fixed = 1.0 }
        fixed = { "101" = 1.3, "102" = -0.3, "999" = 0.5 }
        [[replacement]]
        meter = "both"
        at = "2026-10-15T02:30:00Z"
        final_reading = 10.0
        initial_reading = 0.0
        [[replacement]]
        meter = "m101"
        at = "2026-10-15T02:30:00Z"
        final_reading = -4.0
        initial_reading = 0.0
        [[replacement]]
        meter = "m101"
        at = "2026-10-15T02:30:00Z"
        final_reading = 4.0
        initial_reading = 0.0
    "#
    );
    let all = issues(&text).join("\n");
    for expected in [
        "pool[0] (stairs).fixed.102: -0.3: expected a coefficient ≥ 0",
        "pool[0] (stairs).fixed.999: room \"999\" is not in this pool's rooms",
        "replacement[0].meter: \"both\" is virtual",
        "replacement[1].final_reading: -4: expected the counter",
        "replacement[2].at: meter \"m101\" already has an exchange at 2026-10-15 02:30:00 UTC",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    let zero = text.replace(
        r#"fixed = { "101" = 1.3, "102" = -0.3, "999" = 0.5 }"#,
        r#"fixed = { "101" = 0, "102" = 0 }"#,
    );
    assert!(
        issues(&zero)
            .join("\n")
            .contains("pool[0] (stairs).fixed: the fixed coefficients are all 0"),
        "{:?}",
        issues(&zero)
    );
}

/// Before the fix a second `[[tariff]]` of one name silently replaced the first (the file's order
/// decided the price). Versions are dated; what cannot be a version is refused, each with its key.
#[test]
fn tariff_versions_are_dated_once_a_day_keep_their_utility_and_bill_each_room_once() {
    let site = r#"
        [[device]]
        name = "m101"
        bus = "lan"
        unit = 1
        profile = "eastron_sdm120"
        [[room]]
        id = "101"
        [[meter]]
        name = "m101"
        utility = "electricity"
        room = "101"
        [[tariff]]
        name = "home"
        utility = "electricity"
        price = "0.5583"
        rooms = ["*"]
        [[tariff]]
        name = "shop"
        utility = "electricity"
        price = "1.0"
    "#;
    let text = |versions: &str| {
        format!(
            "{}\n{site}\n{versions}",
            GOOD.split("[[device]]").next().unwrap()
        )
    };
    let good = load(&text(
        "[[tariff]]\nname = \"home\"\nutility = \"electricity\"\nprice = \"0.6170\"\neffective_from = \"2026-07-01\"\n",
    ))
    .unwrap();
    let c = &good.site.tariff_changes;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].at.to_rfc3339(), "2026-06-30T16:00:00+00:00");
    assert_eq!(
        c[0].tariff.rooms,
        ["*"],
        "a version naming no rooms keeps the first one's"
    );
    let all = issues(&text(
        r#"
        [[tariff]]
        name = "home"
        utility = "electricity"
        price = "0.9"
        [[tariff]]
        name = "shop"
        utility = "water"
        price = "3.1"
        effective_from = "2026-07-01"
        [[tariff]]
        name = "shop"
        utility = "electricity"
        price = "1.1"
        effective_from = "2026-08-01"
        rooms = ["101"]
        [[tariff]]
        name = "shop"
        utility = "electricity"
        price = "1.2"
        effective_from = "2026-08-01"
        [[tariff]]
        name = "shop"
        utility = "electricity"
        price = "1.3"
        effective_from = "1 Sept"
    "#,
    ))
    .join("\n");
    for expected in [
        "tariff (home): 2 [[tariff]] named \"home\" without effective_from",
        "tariff[3] (shop).utility: tariff \"shop\" prices electricity; a version keeps its tariff's utility",
        "tariff[4] (shop): from 2026-08-01: room \"101\" would be billed for electricity by 2 tariffs (home, shop)",
        "tariff[5] (shop).effective_from: tariff \"shop\" already has a version from 2026-08-01",
        "tariff[6] (shop).effective_from: \"1 Sept\": expected the first day this version bills, YYYY-MM-DD",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
}

/// The site model is written without a tree of its devices; it must be the very text a JSON tree
/// writes (keys sorted at every level), and its hash the hash of that text without `model_hash`.
#[test]
fn the_site_model_written_without_a_tree_is_the_trees_text_and_hash() {
    let cfg = Config::from_str_only(
        include_str!("../../config/meterd.toml"),
        "config/meterd.toml",
        std::path::Path::new("/etc/meterd"),
    )
    .unwrap();
    let bytes = cfg.site_model_bytes();
    let tree: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(tree.to_string().into_bytes(), bytes);
    assert!(tree["devices"]
        .as_array()
        .is_some_and(|d| d.len() == cfg.devices.len()));
    let mut without = tree.clone();
    let hash = without
        .as_object_mut()
        .unwrap()
        .remove("model_hash")
        .unwrap();
    assert_eq!(
        hash,
        serde_json::json!(super::validate::fnv1a(&without.to_string()))
    );
    assert!(!String::from_utf8(bytes).unwrap().contains('\u{1}'));
}

#[test]
fn the_web_view_is_off_by_default_and_on_the_network_only_with_a_real_token() {
    assert!(!load(GOOD).unwrap().web.enabled());
    let with = |web: &str| format!("{GOOD}\n[web]\n{web}\n");
    let c = load(&with(
        "listen = \"0.0.0.0:8080\"\ntoken = \"9f2c41d0a7b35e6c8d1f\"",
    ))
    .unwrap();
    assert_eq!(c.web.listen, Some("0.0.0.0:8080".parse().unwrap()));
    assert!(c.web.enabled());
    let i = issues(&with("listen = \"0.0.0.0:8080\""));
    assert!(
        i.iter()
            .any(|i| i.contains("web.token") && i.contains("missing")),
        "{i:?}"
    );
    let i = issues(&with("listen = \"0.0.0.0:8080\"\ntoken = \"secret\""));
    assert!(
        i.iter()
            .any(|i| i.contains("web.token") && i.contains("at least 16")),
        "{i:?}"
    );
    let i = issues(&with(
        "listen = \"gateway:80\"\ntoken = \"9f2c41d0a7b35e6c8d1f\"",
    ));
    assert!(
        i.iter()
            .any(|i| i.contains("web.listen") && i.contains("0.0.0.0:8080")),
        "{i:?}"
    );
    // A reverse proxy's socket needs no token: its group is the access control.
    let c = load(&with("socket = \"/run/meterd/web.sock\"")).unwrap();
    assert!(c.web.enabled() && c.web.token.is_none());
}
