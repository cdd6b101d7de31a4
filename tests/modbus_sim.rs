//! The polling engine against the simulator over real Modbus: TCP on loopback, RTU on a pty pair,
//! and RTU over TCP.

mod common;

use std::time::Duration;

use meterd::daemon::Engine;
use meterd::modbus::bus;
use meterd::modbus::link::{Link, LinkError};
use meterd::modbus::profile::Quantity;
use meterd::reading::{Quality, Reading};
use tokio::time::Instant;

/// The tests of this file run one at a time: the dead-meter test measures scheduling gaps of tens
/// of milliseconds, which seven other simulators on two cores would add to (it failed only when run
/// beside them).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BUILDING: &str = r#"
[[endpoint]]
name = "lan"
kind = "tcp"

[[endpoint]]
name = "line"
kind = "rtu"

[[endpoint]]
name = "gw"
kind = "rtu_over_tcp"

[[unit]]
endpoint = "lan"
unit = 1
profile = "eastron_sdm630"
load_w = 4200.0
start_kwh = 40211.5

[[unit]]
endpoint = "lan"
unit = 2
profile = "chint_dtsu666"
load_w = 9300.0
start_kwh = 182340.5

[[unit]]
endpoint = "lan"
unit = 3
profile = "water_xintai_valve"
flow_m3h = 0.545
start_m3 = 88.125

[[unit]]
endpoint = "lan"
unit = 4
profile = "eastron_sdm120"
fault = "exception"
exception_code = 2

[[unit]]
endpoint = "lan"
unit = 5
profile = "hiking_dds238_zn"
load_w = 600.0
start_kwh = 1200.0

[[unit]]
endpoint = "line"
unit = 1
profile = "chint_ddsu666"
load_w = 2500.0
start_kwh = 9980.75

[[unit]]
endpoint = "line"
unit = 2
profile = "water_pulse_wb_mcm8"
flow_m3h = 0.9
start_m3 = 1520.37

[[unit]]
endpoint = "gw"
unit = 7
profile = "chint_dtsu666_h"
load_w = 1000.0
start_kwh = 77.0
"#;

const DEVICES: &str = r#"
[poll]
interval = "500ms"

[[device]]
name = "sdm630"
bus = "lan"
unit = 1
profile = "eastron_sdm630"

[[device]]
name = "dtsu666"
bus = "lan"
unit = 2
profile = "chint_dtsu666"

[[device]]
name = "water"
bus = "lan"
unit = 3
profile = "water_xintai_valve"

[[device]]
name = "broken"
bus = "lan"
unit = 4
profile = "eastron_sdm120"

[[device]]
name = "prepaid"
bus = "lan"
unit = 5
profile = "hiking_dds238_zn"

[[device]]
name = "ddsu666"
bus = "line"
unit = 1
profile = "chint_ddsu666"

[[device]]
name = "pulses"
bus = "line"
unit = 2
profile = "water_pulse_wb_mcm8"

[[device]]
name = "behind-gateway"
bus = "gw"
unit = 7
profile = "chint_dtsu666_h"
"#;

fn value(readings: &[Reading], register: &str) -> f64 {
    let r = readings
        .iter()
        .find(|r| &*r.register == register)
        .unwrap_or_else(|| panic!("no {register} in {readings:?}"));
    assert_eq!(r.quality, Quality::Good, "{r:?}");
    r.value.unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

async fn poll(config: &meterd::config::Config, device: &str) -> bus::PollResult {
    let dev = config.device(device).unwrap();
    let mut link = Link::new(&config.buses[dev.bus], meterd::clock::Clock::system());
    bus::poll_device(&mut link, dev).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_decode_correctly_over_tcp_rtu_and_rtu_over_tcp() {
    let _serial = SERIAL.lock().await;
    let sim = common::start(BUILDING).await;
    let config = common::config_for(&sim, "timeout = \"1s\"\n", DEVICES);

    let r = poll(&config, "sdm630").await;
    assert!(r.failure.is_none(), "{:?}", r.failure);
    assert!(close(value(&r.readings, "voltage_l1"), 230.0, 1e-3));
    assert!(close(value(&r.readings, "power_total"), 4200.0, 1e-2));
    assert!(close(value(&r.readings, "frequency"), 50.0, 1e-3));
    // f32 keeps ~7 digits: 40211.5 kWh is exact to about 4 Wh.
    assert!(close(value(&r.readings, "import_kwh"), 40211.5, 0.01));
    let e = r
        .readings
        .iter()
        .find(|x| &*x.register == "import_kwh")
        .unwrap();
    assert_eq!(e.quantity, Quantity::EnergyKwh);
    assert_eq!(&*e.unit, "kWh");
    assert_eq!(e.raw.as_slice().len(), 2, "raw registers are kept");

    // Scaled floats: 230 V travels as 2300.0, 9300 W as 93000.0.
    let r = poll(&config, "dtsu666").await;
    assert!(close(value(&r.readings, "voltage_a"), 230.0, 1e-3));
    assert!(close(value(&r.readings, "power_total"), 9300.0, 1e-2));
    assert!(close(value(&r.readings, "import_kwh"), 182_340.5, 0.05));

    // Little-endian (DCBA) floats of the Xintai water meter.
    let r = poll(&config, "water").await;
    assert!(close(value(&r.readings, "flow"), 0.545, 1e-6));
    assert!(close(value(&r.readings, "forward_m3"), 88.125, 1e-3));
    assert_eq!(value(&r.readings, "valve"), 1.0, "valve open after install");

    // Integer registers with ×0.01 / ×0.1 scaling.
    let r = poll(&config, "prepaid").await;
    assert!(close(value(&r.readings, "total_kwh"), 1200.0, 0.011));
    assert!(close(value(&r.readings, "voltage"), 230.0, 0.05));
    assert_eq!(value(&r.readings, "power"), 600.0);
    assert_eq!(value(&r.readings, "relay"), 1.0);

    // RTU on a pseudo-terminal pair.
    let r = poll(&config, "ddsu666").await;
    assert!(r.failure.is_none(), "{:?}", r.failure);
    assert!(
        close(value(&r.readings, "power"), 2500.0, 0.01),
        "kW on the wire, W after scaling"
    );
    assert!(close(value(&r.readings, "import_kwh"), 9980.75, 0.01));
    let r = poll(&config, "pulses").await;
    assert!(close(value(&r.readings, "volume_m3"), 1520.37, 0.011));
    assert!(close(value(&r.readings, "pulses"), 152_037.0, 1.0));

    // RTU frames through a TCP serial gateway.
    let r = poll(&config, "behind-gateway").await;
    assert!(r.failure.is_none(), "{:?}", r.failure);
    assert!(close(value(&r.readings, "voltage_a"), 230.0, 1e-3));
    assert!(close(value(&r.readings, "import_kwh"), 77.0, 1e-3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn energy_counters_rise_consistently_with_power() {
    let _serial = SERIAL.lock().await;
    let sim = common::start(BUILDING).await;
    let config = common::config_for(&sim, "", DEVICES);
    let first = poll(&config, "ddsu666").await;
    let t0 = meterd::clock::Clock::system().instant();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = poll(&config, "ddsu666").await;
    let hours = meterd::clock::Clock::system().since(t0).as_secs_f64() / 3600.0;
    let rise = value(&second.readings, "import_kwh") - value(&first.readings, "import_kwh");
    let expected = 2500.0 * hours / 1000.0; // ≈ 1.04 Wh
                                            // f32 at ~10,000 kWh resolves ~1 Wh: check the rise is of the right size and not negative.
    assert!(
        rise >= 0.0 && rise <= expected + 0.002,
        "rise {rise} kWh, expected ≈ {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_response_is_reported_as_such() {
    let _serial = SERIAL.lock().await;
    let sim = common::start(BUILDING).await;
    let config = common::config_for(&sim, "", DEVICES);
    let r = poll(&config, "broken").await;
    // The device answered: not a communication failure, but every reading says why it is missing.
    assert!(r.failure.is_none());
    assert!(matches!(
        r.exceptions[0],
        LinkError::Exception { unit: 4, code: 2 }
    ));
    let msg = r.exceptions[0].to_string();
    assert!(
        msg.contains("exception 0x02") && msg.contains("illegal data address"),
        "{msg}"
    );
    assert!(r
        .readings
        .iter()
        .all(|x| x.quality == Quality::Error && x.value.is_none()));
    assert!(r.readings[0]
        .error
        .as_deref()
        .unwrap()
        .contains("illegal data address"));

    // The engine counts it per device, by code.
    let mut engine = Engine::start(&config, &meterd::clock::Clock::system());
    let deadline = meterd::clock::Clock::system().instant() + Duration::from_secs(5);
    loop {
        let batch = tokio::time::timeout_at(deadline, engine.readings.recv())
            .await
            .expect("readings")
            .unwrap();
        if &*batch[0].device == "broken" {
            break;
        }
    }
    let status = engine.status[0].snapshot();
    let broken = status.iter().find(|d| d.name == "broken").unwrap();
    // One exception per request of the device's plan, counted under its code.
    let requests = config.device("broken").unwrap().plan.requests.len() as u64;
    assert_eq!(broken.exceptions.get(&2), Some(&requests));
    assert_eq!(broken.timeouts, 0);
    assert!(
        broken.offline_since.is_none(),
        "a device that answers is not offline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_rtu_frame_is_counted_as_garbled_not_as_silence() {
    let _serial = SERIAL.lock().await;
    let building = r#"
        [[endpoint]]
        name = "line"
        kind = "rtu"
        [[unit]]
        endpoint = "line"
        unit = 3
        profile = "water_pulse_wb_mcm8"
        fault = "corrupt"
        corrupt_every = 2
        flow_m3h = 1.0
    "#;
    let sim = common::start(building).await;
    let config = common::config_for(&sim, "", "[[device]]\nname = \"noisy\"\nbus = \"line\"\nunit = 3\nprofile = \"water_pulse_wb_mcm8\"\ntimeout = \"300ms\"\n");
    let dev = config.device("noisy").unwrap();
    let mut link = Link::new(&config.buses[0], meterd::clock::Clock::system());
    let mut garbled = 0;
    let mut good = 0;
    for _ in 0..6 {
        let r = bus::poll_device(&mut link, dev).await;
        match r.failure {
            None => good += 1,
            Some(LinkError::Garbled { unit: 3 }) => garbled += 1,
            Some(other) => panic!("unexpected {other}"),
        }
    }
    // One request per poll (both registers share address 60): every second poll is corrupted.
    assert_eq!(dev.plan.requests.len(), 1);
    assert_eq!((good, garbled), (3, 3), "every second answer is corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_meter_does_not_delay_its_neighbours_beyond_one_timeout_per_probe() {
    let _serial = SERIAL.lock().await;
    let building = r#"
        [[endpoint]]
        name = "line"
        kind = "rtu"
        [[unit]]
        endpoint = "line"
        unit = 1
        profile = "chint_ddsu666"
        load_w = 100.0
        [[unit]]
        endpoint = "line"
        unit = 2
        profile = "eastron_sdm120"
        fault = "dead"
        [[unit]]
        endpoint = "line"
        unit = 3
        profile = "chint_ddsu666"
        load_w = 100.0
    "#;
    // The neighbours are meters without an inter-request pause: an Eastron's 60 ms per request
    // (four requests) would fill most of the 300 ms interval by itself, and the test would measure
    // that instead of the dead meter's cost.
    let sim = common::start(building).await;
    let timeout = Duration::from_millis(250);
    let devices = r#"
        [poll]
        interval = "300ms"
        timeout = "250ms"
        retries = 1
        backoff = "50ms"
        offline_after = 2
        probe_interval = "1500ms"
        [[device]]
        name = "left"
        bus = "line"
        unit = 1
        profile = "chint_ddsu666"
        [[device]]
        name = "dead"
        bus = "line"
        unit = 2
        profile = "eastron_sdm120"
        [[device]]
        name = "right"
        bus = "line"
        unit = 3
        profile = "chint_ddsu666"
    "#;
    let config = common::config_for(&sim, "", devices);
    let mut engine = Engine::start(&config, &meterd::clock::Clock::system());
    let run = Duration::from_secs(5);
    let end = meterd::clock::Clock::system().instant() + run;
    let mut seen: std::collections::HashMap<String, Vec<Instant>> =
        std::collections::HashMap::default();
    while let Ok(Some(batch)) = tokio::time::timeout_at(end, engine.readings.recv()).await {
        if batch[0].quality == Quality::Good {
            seen.entry(batch[0].device.to_string())
                .or_default()
                .push(meterd::clock::Clock::system().instant());
        }
    }
    let status = engine.status[0].snapshot();
    engine.stop();
    for name in ["left", "right"] {
        let times = &seen[name];
        // Without the dead meter: one poll per 300 ms → ~16 in 5 s.
        assert!(
            times.len() >= 13,
            "{name} polled only {} times",
            times.len()
        );
        let worst = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        // At most one timeout (plus frame time and scheduling slack) on top of the interval.
        assert!(
            worst <= Duration::from_millis(300) + timeout + Duration::from_millis(120),
            "{name}: worst gap {worst:?}"
        );
    }
    let dead = status.iter().find(|d| d.name == "dead").unwrap();
    assert!(dead.offline_since.is_some(), "{dead:?}");
    assert_eq!(dead.polls_ok, 0);
    // 2 attempts to go offline, then one probe per 1.5 s: ≤ 2 + 3 (+1 for timing) in 5 s.
    assert!(
        dead.timeouts <= 6,
        "dead meter tried {} times",
        dead.timeouts
    );
    assert!(sim.requests_seen("line", 2) as u64 == dead.timeouts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_board_coils_can_be_written_and_read_back() {
    let _serial = SERIAL.lock().await;
    let building = r#"
        [[endpoint]]
        name = "lan"
        kind = "tcp"
        [[unit]]
        endpoint = "lan"
        unit = 10
        profile = "relay_waveshare_8ch"
    "#;
    let sim = common::start(building).await;
    let config = common::config_for(&sim, "", "[[device]]\nname = \"doors\"\nbus = \"lan\"\nunit = 10\nprofile = \"relay_waveshare_8ch\"\n");
    let dev = config.device("doors").unwrap();
    let mut link = Link::new(&config.buses[0], meterd::clock::Clock::system());
    let t = Duration::from_secs(1);
    link.write_coil(10, 2, true, t).await.unwrap();
    link.write_coil(10, 7, true, t).await.unwrap();
    link.write_coil(10, 7, false, t).await.unwrap();
    let r = bus::poll_device(&mut link, dev).await;
    let states: Vec<f64> = r
        .readings
        .iter()
        .filter(|x| x.quantity == Quantity::RelayState)
        .map(|x| x.value.unwrap())
        .collect();
    assert_eq!(states, vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    // A coil the board does not have is refused with an exception, not silently accepted.
    let e = link.write_coil(10, 40, true, t).await.unwrap_err();
    assert!(matches!(e, LinkError::Exception { code: 2, .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_only_takes_fc16_switches_its_relay_and_stops_counting() {
    let _serial = SERIAL.lock().await;
    let sim = common::start(BUILDING).await;
    let config = common::config_for(&sim, "timeout = \"300ms\"\n", DEVICES);
    let mut link = Link::new(&config.buses[0], meterd::clock::Clock::system());
    let t = Duration::from_millis(300);
    // FC06 is ignored by the DDS238 (no answer); FC16 works.
    let e = link
        .write_registers(5, 0x1A, &[0], false, t)
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Timeout { .. }), "{e}");
    link.write_registers(5, 0x1A, &[0], true, t).await.unwrap();
    let r = poll(&config, "prepaid").await;
    assert_eq!(value(&r.readings, "relay"), 0.0);
    assert_eq!(value(&r.readings, "power"), 0.0, "no load once cut off");
}

/// Before `ActuateError` every failure was a string: the enforcer retried a relay board that
/// answered "illegal address" three times like a silent one, and the audit could not say which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_board_that_refuses_is_told_from_one_that_is_silent() {
    let _serial = SERIAL.lock().await;
    let building = r#"
        [[endpoint]]
        name = "lan"
        kind = "tcp"
        [[unit]]
        endpoint = "lan"
        unit = 10
        profile = "relay_waveshare_8ch"
        fault = "exception"
        exception_code = 2
        [[unit]]
        endpoint = "lan"
        unit = 11
        profile = "relay_waveshare_8ch"
        fault = "dead"
    "#;
    let sim = common::start(building).await;
    let config = common::config_for(
        &sim,
        "timeout = \"300ms\"\n",
        "[[device]]\nname = \"refuses\"\nbus = \"lan\"\nunit = 10\nprofile = \"relay_waveshare_8ch\"\n[[device]]\nname = \"silent\"\nbus = \"lan\"\nunit = 11\nprofile = \"relay_waveshare_8ch\"\n",
    );
    let mut link = Link::new(&config.buses[0], meterd::clock::Clock::system());
    let e = bus::actuate(
        &mut link,
        config.device("refuses").unwrap(),
        "relay1",
        Some(true),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), "exception", "{e}");
    assert!(e.device_answered());
    assert!(e.to_string().contains("read of refuses relay1"), "{e}");
    let e = bus::actuate(
        &mut link,
        config.device("silent").unwrap(),
        "relay1",
        Some(true),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), "timeout", "{e}");
    assert!(!e.device_answered());
    let e = bus::actuate(&mut link, config.device("silent").unwrap(), "relay9", None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "config", "{e}");
}
