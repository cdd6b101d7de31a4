//! The `meterd` binary as a field engineer uses it, against `meterd simulate` in its own process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_meterd");

fn meterd(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run meterd")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `meterd simulate` on the sample building; killed on drop.
struct Sim {
    child: Child,
    endpoints: HashMap<String, String>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn simulate() -> Sim {
    let mut child = Command::new(BIN)
        .args(["--log-level", "warn", "simulate", "--building"])
        .arg(repo("config/building.toml"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut endpoints = HashMap::new();
    for line in BufReader::new(out).lines().take(20) {
        let line = line.unwrap();
        if line.starts_with("serving") {
            break;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.first() == Some(&"endpoint") {
            endpoints.insert(parts[1].to_string(), parts.last().unwrap().to_string());
        }
    }
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    Sim { child, endpoints }
}

/// A config for the sample building's endpoints, in a temp dir.
fn site_config(sim: &Sim, dir: &Path) -> PathBuf {
    let (host, port) = sim.endpoints["lan"].rsplit_once(':').unwrap();
    let text = format!(
        r#"
[gateway]
id = "cli-test"
site = "test"
timezone = "Asia/Shanghai"

[[bus]]
name = "lan"
kind = "tcp"
host = "{host}"
port = {port}

[[bus]]
name = "rs485-1"
kind = "rtu"
device = "{pty}"
baud = 9600
parity = "even"

[[device]]
name = "main-incomer"
bus = "lan"
unit = 1
profile = "chint_dtsu666"

[[device]]
name = "room-101"
bus = "rs485-1"
unit = 1
profile = "eastron_sdm120"

[[bus]]
name = "rs485-2"
kind = "rtu"
device = "{water_pty}"
baud = 9600
parity = "even"

[[device]]
name = "water-room-101"
bus = "rs485-2"
unit = 2
profile = "water_xintai_valve"
"#,
        pty = sim.endpoints["rs485-1"],
        water_pty = sim.endpoints["rs485-2"]
    );
    let path = dir.join("meterd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_shipped_example_config() {
    let o = meterd(&[
        "check",
        "--config",
        repo("config/meterd.toml").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("OK: gateway gw-tower-a"),
        "{}",
        stdout(&o)
    );
}

/// Before the fix the example's own virtual meter (`main-incomer - common-hvac`), once
/// uncommented, failed `meterd check`: every `-` split a name ("unknown meter \"main\"").
#[test]
fn check_accepts_the_shipped_example_with_its_virtual_meter_tariff_version_and_exchange_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(repo("config/meterd.toml")).unwrap();
    let mut enabled = String::new();
    let mut block = false;
    for line in example.lines() {
        // The commented-out [[meter]] (virtual), [[tariff]] (a later version) and
        // [[replacement]] blocks, uncommented.
        if line == "# [[meter]]" || line == "# [[replacement]]" || line == "# [[tariff]]" {
            block = true;
        } else if !line.starts_with("# ") {
            block = false;
        }
        let line = if block {
            line.trim_start_matches("# ")
        } else {
            line
        };
        enabled.push_str(line);
        enabled.push('\n');
    }
    assert!(enabled.contains("\nvirtual = \"main-incomer - common-hvac\""));
    assert!(enabled.contains("\n[[replacement]]\nmeter = "));
    assert!(enabled.contains("\neffective_from = \"2027-01-01\""));
    let cfg = dir.path().join("meterd.toml");
    std::fs::write(&cfg, enabled).unwrap();
    let o = meterd(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn check_without_the_environment_passes_a_config_whose_tls_files_are_on_the_gateway_only() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(repo("config/meterd.toml")).unwrap();
    let cfg = dir.path().join("meterd.toml");
    std::fs::write(
        &cfg,
        format!("{example}\n[mqtt.tls]\nca_file = \"/etc/meterd/gateway-only-ca.pem\"\n"),
    )
    .unwrap();
    let with_env = meterd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(with_env.status.code(), Some(3), "{}", stderr(&with_env));
    assert!(
        stderr(&with_env).contains("mqtt.tls.ca_file"),
        "{}",
        stderr(&with_env)
    );
    let alone = meterd(&[
        "check",
        "--no-environment",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(alone.status.success(), "{}", stderr(&alone));
    assert!(stdout(&alone).contains("OK: gateway gw-tower-a"));
}

#[test]
fn check_lists_every_error_and_exits_3_and_run_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[gateway]
id = "x"
site = "x"
timezone = "Asia/Shanghia"

[[bus]]
name = "a"
kind = "rtu"
device = "/dev/ttyUSB0"
baud = 9601

[[device]]
name = "m"
bus = "b"
unit = 1
profile = "sdm999"
"#,
    )
    .unwrap();
    let path = bad.to_str().unwrap();
    let o = meterd(&["check", "--config", path]);
    assert_eq!(o.status.code(), Some(3));
    let err = stderr(&o);
    for needle in [
        "gateway.timezone",
        "bus[0] (a).baud",
        "device[0] (m).bus: unknown bus \"b\"",
        "device[0] (m).profile: unknown profile \"sdm999\"",
    ] {
        assert!(
            err.contains(&format!("{path}: {needle}")),
            "missing {needle}:\n{err}"
        );
    }
    let o = meterd(&["run", "--config", path]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = meterd(&["check", "--config", "/nonexistent/meterd.toml"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("cannot read config file /nonexistent/meterd.toml"));
}

#[test]
fn read_scan_and_raw_against_the_simulator() {
    let sim = simulate();
    let dir = tempfile::tempdir().unwrap();
    let cfg = site_config(&sim, dir.path());
    let cfg = cfg.to_str().unwrap();

    // read: a table, and JSON with decoded values.
    let o = meterd(&["read", "--config", cfg, "main-incomer"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(
        table.contains("register") && table.contains("import_kwh") && table.contains("182340"),
        "{table}"
    );
    let o = meterd(&["read", "--config", cfg, "room-101", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let voltage = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["register"] == "voltage")
        .unwrap();
    assert!((voltage["value"].as_f64().unwrap() - 230.0).abs() < 1e-3);
    assert_eq!(voltage["quality"], "good");
    assert_eq!(voltage["unit"], "V");

    // scan over TCP: units 1, 2 (the floor-2 board) and 10 exist; the gateway's "no such unit" is
    // not a hit.
    let o = meterd(&[
        "scan", "--config", cfg, "--bus", "lan", "--units", "1-12", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let hits: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let units: Vec<u64> = hits
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["unit"].as_u64().unwrap())
        .collect();
    assert_eq!(units, vec![1, 2, 10]);
    // scan over RTU: units 1-5 and 7 answer (4 with exception 02 at register 0 is still an answer),
    // 6 is dead.
    let o = meterd(&[
        "scan",
        "--config",
        cfg,
        "--bus",
        "rs485-1",
        "--units",
        "1-8",
        "--timeout",
        "150ms",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("6 of 8 unit id(s) answered"), "{text}");

    // raw: decode a float, write a coil with --yes, read it back.
    let o = meterd(&[
        "raw", "--config", cfg, "--bus", "rs485-1", "--unit", "1", "read", "input", "0x0000", "2",
        "--type", "f32", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        (rows[0]["value"].as_f64().unwrap() - 230.0).abs() < 1e-3,
        "{rows}"
    );
    let o = meterd(&[
        "raw", "--config", cfg, "--bus", "lan", "--unit", "10", "write", "coil", "3", "on",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a write without --yes and no terminal is refused"
    );
    assert!(stderr(&o).contains("pass --yes"));
    let read_coils = || {
        let o = meterd(&[
            "raw", "--config", cfg, "--bus", "lan", "--unit", "10", "read", "coil", "0", "8",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(read_coils()[3], 0.0, "nothing was written");
    let o = meterd(&[
        "raw", "--config", cfg, "--bus", "lan", "--unit", "10", "write", "coil", "3", "on", "--yes",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_coils(), vec![0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);

    // An exception answer exits 4 and says what it means.
    let o = meterd(&[
        "raw", "--config", cfg, "--bus", "lan", "--unit", "1", "read", "holding", "0x9000", "2",
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("illegal data address"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn read_of_an_unknown_device_names_it() {
    let o = meterd(&[
        "read",
        "--config",
        repo("config/meterd.toml").to_str().unwrap(),
        "room-999",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no device \"room-999\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn profiles_lists_the_library_and_shows_commissioning_notes() {
    let o = meterd(&["profiles"]);
    assert!(o.status.success());
    for p in [
        "eastron_sdm120",
        "eastron_sdm630",
        "chint_ddsu666",
        "chint_dtsu666",
        "relay_waveshare_8ch",
        "water_pulse_wb_mcm8",
        "dlt645_2007_single_phase",
        "dlt645_2007_prepaid",
    ] {
        assert!(stdout(&o).contains(p), "{p}");
    }
    let o = meterd(&["profiles", "chint_dtsu666"]);
    assert!(stdout(&o).contains("commissioning:"), "{}", stdout(&o));
    assert!(stdout(&o).contains("0x101e"), "{}", stdout(&o));
    let o = meterd(&["profiles", "dlt645_2007_prepaid"]);
    let text = stdout(&o);
    assert!(
        text.contains("DL/T 645-2007") && text.contains("00900200") && text.contains("CNY"),
        "{text}"
    );
    assert!(text.contains("commissioning:"), "{text}");
}

#[test]
fn demo_runs_the_sample_building_and_shows_live_readings() {
    let o = meterd(&[
        "--log-level",
        "warn",
        "demo",
        "--duration",
        "5s",
        "--every",
        "2s",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("simulator endpoint rs485-1: rtu pty /dev/"),
        "{text}"
    );
    // The last table: the room meters have energy values, the dead one is offline.
    let last = text.rsplit("device ").next().unwrap();
    assert!(
        last.contains("room-101") && last.contains("5123."),
        "{last}"
    );
    assert!(last.contains("OFFLINE"), "{last}");
}

#[test]
fn hil_acceptance_pass_runs_against_the_simulator_and_catches_a_wrong_display_value() {
    let run = |_bench: &Path| {
        Command::new(repo("hil/run"))
            .arg("--sim")
            .env("METERD", BIN)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&repo("hil/bench.toml"));
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("8 passed, 0 failed"), "{}", stdout(&o));
    // The same pass with a display value the meter does not show fails, and says which.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo("hil/bench.toml"))
        .unwrap()
        .replace("expect = 512.5", "expect = 600.0")
        .replace(
            "config = \"meterd.toml\"",
            &format!("config = \"{}\"", repo("hil/meterd.toml").display()),
        );
    let bench = dir.path().join("bench.toml");
    std::fs::write(&bench, text).unwrap();
    let o = Command::new(BIN)
        .args(["acceptance", "--bench"])
        .arg(&bench)
        .arg("--sim")
        .arg(repo("hil/sim-building.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("FAIL    read 512.500 kWh, expected 600 ± 0.05"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn logs_written_to_a_pipe_or_journald_carry_no_colour_codes() {
    // The demo's dead meter (room-105) logs a warning within a few seconds; stderr is a pipe here,
    // as it is under systemd (journald).
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args([
            "--log-level",
            "info",
            "demo",
            "--duration",
            "6s",
            "--every",
            "3s",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("INFO") || err.contains("WARN"),
        "the demo logged: {err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escape codes in a non-terminal log: {err:?}"
    );
}

#[test]
fn dlt645_and_cjt188_meters_by_raw_and_scan_against_the_simulator() {
    let sim = simulate();
    let dir = tempfile::tempdir().unwrap();
    let cfg = site_config(&sim, dir.path());
    let cfg = cfg.to_str().unwrap();

    // raw DL/T 645: the prepaid meter on the Modbus line, energy by its DI, decoded by the built-in
    // profile; a DI it lacks is the meter's own refusal; a wrong DI spelling says what is expected.
    let o = meterd(&[
        "raw",
        "--config",
        cfg,
        "--bus",
        "rs485-1",
        "--protocol",
        "dlt645",
        "--address",
        "202411110002",
        "read",
        "00010000",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let kwh = v[0]["value"].as_f64().unwrap();
    assert!((1520.37..1520.5).contains(&kwh), "{v}");
    assert_eq!(v[0]["item"], "import_kwh");
    assert_eq!(v[0]["unit"], "kWh");
    let o = meterd(&[
        "raw",
        "--config",
        cfg,
        "--bus",
        "rs485-1",
        "--protocol",
        "dlt645",
        "--address",
        "202411110002",
        "read",
        "00040000",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not have this DI"),
        "{}",
        stderr(&o)
    );
    let o = meterd(&[
        "raw",
        "--config",
        cfg,
        "--bus",
        "rs485-1",
        "--protocol",
        "dlt645",
        "--address",
        "202411110002",
        "read",
        "input",
    ]);
    assert!(stderr(&o).contains("8 hex digits"), "{}", stderr(&o));
    let o = meterd(&[
        "raw",
        "--config",
        cfg,
        "--bus",
        "lan",
        "--protocol",
        "dlt645",
        "--address",
        "202411110002",
        "read",
        "00010000",
    ]);
    assert!(stderr(&o).contains("serial line"), "{}", stderr(&o));

    // scan by meter number: the DL/T 645 meter among three numbers on the Modbus line, the CJ/T 188
    // one on the water line.
    for (bus, protocol, numbers, found) in [
        (
            "rs485-1",
            "dlt645",
            "202411110001-202411110003",
            "202411110002",
        ),
        (
            "rs485-2",
            "cjt188",
            "20241111000300-20241111000302",
            "20241111000301",
        ),
    ] {
        let o = meterd(&[
            "scan",
            "--config",
            cfg,
            "--bus",
            bus,
            "--protocol",
            protocol,
            "--addresses",
            numbers,
            "--timeout",
            "800ms",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let hits: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let got: Vec<&str> = hits
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["address"].as_str().unwrap())
            .collect();
        assert_eq!(got, vec![found], "{protocol}");
    }
    let o = meterd(&[
        "scan",
        "--config",
        cfg,
        "--bus",
        "rs485-1",
        "--protocol",
        "dlt645",
        "--addresses",
        "1-20000",
    ]);
    assert!(stderr(&o).contains("more than 10000"), "{}", stderr(&o));

    // raw CJ/T 188: the water meter on the water line.
    let o = meterd(&[
        "raw",
        "--config",
        cfg,
        "--bus",
        "rs485-2",
        "--protocol",
        "cjt188",
        "--address",
        "20241111000301",
        "read",
        "901F",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m3 = v[0]["volume_m3"].as_f64().unwrap();
    assert!((412.37..412.5).contains(&m3), "{v}");
    assert_eq!(v[0]["valve"], "open");
}

#[test]
fn a_relay_on_a_dlt645_meter_without_its_password_is_refused_at_check() {
    let dir = tempfile::tempdir().unwrap();
    let demo = std::fs::read_to_string(repo("config/demo.toml")).unwrap();
    let relay = "\n[[relay]]\nname = \"106-power\"\nroom = \"106\"\nkind = \"supply\"\nutility = \"electricity\"\ndevice = \"room-106-prepaid\"\noutput = \"relay\"\n";
    let cfg = dir.path().join("meterd.toml");
    std::fs::write(&cfg, format!("{demo}{relay}")).unwrap();
    let cfg = cfg.to_str().unwrap();
    let o = meterd(&["check", "--config", cfg, "--no-environment"]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("relay[3] (106-power).device: device \"room-106-prepaid\" is a DL/T 645 meter: its relay switches only with the password_level, password and operator"),
        "{}",
        stderr(&o)
    );
    let with_password = demo.replace(
        "profile = \"dlt645_2007_prepaid\"\n",
        "profile = \"dlt645_2007_prepaid\"\npassword = \"123456\"\noperator = \"00000001\"\n",
    );
    std::fs::write(cfg, format!("{with_password}{relay}")).unwrap();
    let o = meterd(&["check", "--config", cfg, "--no-environment"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("123456"), "the password never prints");
}

#[test]
fn a_log_level_typo_on_the_command_line_is_refused_and_directives_work_without_env_filter() {
    let o = meterd(&[
        "--log-level",
        "loud",
        "check",
        "--config",
        "config/meterd.toml",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("expected a level"), "{}", stderr(&o));
    let o = meterd(&[
        "--log-level",
        "warn,meterd::uplink=debug",
        "check",
        "--config",
        "config/meterd.toml",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}
