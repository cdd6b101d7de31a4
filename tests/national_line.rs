//! China's national protocols on an RS485 line shared with a Modbus meter, at the field's 2400
//! 8E1, over the simulator's pty line emulator. DL/T 645-2007: reads with the standard's formats,
//! an unsupported item answered with the meter's error, relay trip and close with read-back of
//! status word 3, a wrong password refused, a dead meter timing out without taking the line's next
//! answer. CJ/T 188-2004: current data, valve close and open (a stuck valve says so), a meter that
//! writes its DIs reversed. The Modbus meter is still read on the same line.

mod common;

use std::time::Duration;

use meterd::cjt188::{self, DiOrder, MeterType, Valve};
use meterd::dlt645::client::{Client, ClientError};
use meterd::dlt645::data::{Credentials, Di, ErrorWord, Format, RelayAction};
use meterd::dlt645::{data, Address};
use meterd::sim::EndpointAddr;
use tokio_modbus::prelude::*;
use tokio_serial::SerialPortBuilderExt;

const BUILDING: &str = r#"
[[endpoint]]
name = "line"
kind = "rtu"
baud = 2400
parity = "even"
response_delay = "40ms"

[[unit]]
endpoint = "line"
unit = 3
profile = "chint_ddsu666"
load_w = 800.0
start_kwh = 3000.0

[[unit]]
endpoint = "line"
protocol = "dlt645"
address = "202411110002"
profile = "dlt645_2007_prepaid"
load_w = 1200.0
start_kwh = 4321.56
password = "123456"
operator = "00000001"

[[unit]]
endpoint = "line"
protocol = "dlt645"
address = "202411110003"
profile = "dlt645_2007_single_phase"
fault = "dead"

[[unit]]
endpoint = "line"
protocol = "cjt188"
address = "12345678901234"
flow_m3h = 0.9
start_m3 = 1234.56

[[unit]]
endpoint = "line"
protocol = "cjt188"
address = "12345678901299"
di_order = "reversed"
fault = "stuck"
start_m3 = 88.5
"#;

fn port(path: &std::path::Path) -> tokio_serial::SerialStream {
    tokio_serial::new(path.to_string_lossy(), 2400)
        .parity(tokio_serial::Parity::Even)
        .data_bits(tokio_serial::DataBits::Eight)
        .stop_bits(tokio_serial::StopBits::One)
        .open_native_async()
        .unwrap()
}

fn deadline() -> chrono::NaiveDateTime {
    (meterd::clock::Clock::system().now() + chrono::Duration::minutes(5)).naive_utc()
}

#[tokio::test]
async fn dlt645_meters_share_a_2400_baud_line_with_a_modbus_meter() {
    let sim = common::start(BUILDING).await;
    let Some(EndpointAddr::Pty(path)) = sim.addr("line").cloned() else {
        panic!("no pty")
    };
    let mut line = port(&path);
    let mut client = Client::new(4);
    let prepaid = Address::parse("202411110002").unwrap();
    let timeout = Duration::from_secs(1);

    // Energy: XXXXXX.XX kWh, from the simulator's counter (it rises at 1.2 kW meanwhile).
    let v = client
        .read(&mut line, prepaid, Di::FORWARD_ACTIVE_KWH, timeout)
        .await
        .unwrap();
    let kwh = data::decode(
        Format::Unsigned {
            bytes: 4,
            decimals: 2,
        },
        &v,
    )
    .unwrap();
    assert!((4321.56..4321.6).contains(&kwh), "{kwh}");
    // Power: XX.XXXX kW, signed.
    let v = client
        .read(&mut line, prepaid, Di(0x0203_0000), timeout)
        .await
        .unwrap();
    let kw = data::decode(
        Format::Signed {
            bytes: 3,
            decimals: 4,
        },
        &v,
    )
    .unwrap();
    assert!((kw - 1.2).abs() < 1e-9, "{kw}");

    // An item the meter does not have: its error answer, named.
    let e = client
        .read(&mut line, prepaid, Di(0x0004_0000), timeout)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                word: ErrorWord(0x02),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.meter_answered());

    // Wrong password: refused, relay untouched.
    let wrong = Credentials::new(2, "654321", "00000001").unwrap();
    let e = client
        .relay(
            &mut line,
            prepaid,
            RelayAction::Trip,
            &wrong,
            deadline(),
            timeout,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("wrong password"), "{e}");

    // Trip, read back open; close, read back closed; power follows.
    let creds = Credentials::new(2, "123456", "00000001").unwrap();
    let s = client
        .relay(
            &mut line,
            prepaid,
            RelayAction::Trip,
            &creds,
            deadline(),
            timeout,
        )
        .await
        .unwrap();
    assert!(s.relay_open && s.commanded_trip, "{s:?}");
    let v = client
        .read(&mut line, prepaid, Di(0x0203_0000), timeout)
        .await
        .unwrap();
    assert_eq!(
        data::decode(
            Format::Signed {
                bytes: 3,
                decimals: 4
            },
            &v
        ),
        Ok(0.0)
    );
    let s = client
        .relay(
            &mut line,
            prepaid,
            RelayAction::Close,
            &creds,
            deadline(),
            timeout,
        )
        .await
        .unwrap();
    assert!(!s.relay_open, "{s:?}");

    // A dead meter times out; the next read of the live one gets its own answer.
    let dead = Address::parse("202411110003").unwrap();
    let e = client
        .read(
            &mut line,
            dead,
            Di::FORWARD_ACTIVE_KWH,
            Duration::from_millis(400),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no answer"), "{e}");
    assert!(!e.meter_answered());
    let v = client
        .read(&mut line, prepaid, Di::FORWARD_ACTIVE_KWH, timeout)
        .await
        .unwrap();
    let again = data::decode(
        Format::Unsigned {
            bytes: 4,
            decimals: 2,
        },
        &v,
    )
    .unwrap();
    assert!(again >= kwh && again < kwh + 0.1, "{again}");
    assert_eq!(client.noise(), 0, "no stray bytes on a clean line");

    // The Modbus meter on the same line answers Modbus as before.
    drop(line);
    let mut ctx = tokio_modbus::client::rtu::attach_slave(port(&path), Slave(3));
    // DDSU666 voltage: holding 0x2000, float32.
    let words = tokio::time::timeout(timeout, ctx.read_holding_registers(0x2000, 2))
        .await
        .expect("the Modbus meter answers")
        .unwrap()
        .unwrap();
    let volts = f32::from_bits(u32::from(words[0]) << 16 | u32::from(words[1]));
    assert!((volts - 230.0).abs() < 0.01, "{volts}");
}

#[tokio::test]
async fn the_single_meter_on_a_line_tells_its_address_and_two_collide() {
    let one = r#"
[[endpoint]]
name = "line"
kind = "rtu"
baud = 2400
parity = "even"
response_delay = "30ms"
[[unit]]
endpoint = "line"
protocol = "dlt645"
address = "202411110002"
profile = "dlt645_2007_single_phase"
"#;
    let sim = common::start(one).await;
    let Some(EndpointAddr::Pty(path)) = sim.addr("line").cloned() else {
        panic!("no pty")
    };
    let mut line = port(&path);
    let mut client = Client::new(4);
    let a = client
        .read_address(&mut line, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(a.to_string(), "202411110002");
    drop(line);
    drop(sim);

    let two = format!(
        "{one}[[unit]]\nendpoint = \"line\"\nprotocol = \"dlt645\"\naddress = \"202411110009\"\nprofile = \"dlt645_2007_single_phase\"\n"
    );
    let sim = common::start(&two).await;
    let Some(EndpointAddr::Pty(path)) = sim.addr("line").cloned() else {
        panic!("no pty")
    };
    let mut line = port(&path);
    let e = client
        .read_address(&mut line, Duration::from_millis(600))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("no valid frame"),
        "two meters answering the wildcard garble each other: {e}"
    );
}

#[tokio::test]
async fn cjt188_water_meters_read_and_switch_their_valves_on_the_same_line() {
    let sim = common::start(BUILDING).await;
    let Some(EndpointAddr::Pty(path)) = sim.addr("line").cloned() else {
        panic!("no pty")
    };
    let mut line = port(&path);
    let mut client = cjt188::client::Client::new(4);
    let water = cjt188::Address::parse("12345678901234").unwrap();
    let timeout = Duration::from_secs(1);

    let d = read_water(&mut client, &mut line, water, DiOrder::AsDisplayed).await;
    assert!((1234.56..1234.6).contains(&d.volume_m3), "{d:?}");
    assert_eq!(d.status.valve, Valve::Open);

    // Close: the meter reports it closed, and the volume stops rising.
    let st = client
        .valve(
            &mut line,
            MeterType::COLD_WATER,
            water,
            DiOrder::AsDisplayed,
            false,
            timeout,
        )
        .await
        .unwrap();
    assert_eq!(st.valve, Valve::Closed);
    let closed = read_water(&mut client, &mut line, water, DiOrder::AsDisplayed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = read_water(&mut client, &mut line, water, DiOrder::AsDisplayed).await;
    assert_eq!(
        later.volume_m3, closed.volume_m3,
        "no flow through a closed valve"
    );
    assert_eq!(later.status.valve, Valve::Closed);
    let st = client
        .valve(
            &mut line,
            MeterType::COLD_WATER,
            water,
            DiOrder::AsDisplayed,
            true,
            timeout,
        )
        .await
        .unwrap();
    assert_eq!(st.valve, Valve::Open);

    // A meter writing its DIs reversed, with a stuck valve: it acknowledges and stays open.
    let stuck = cjt188::Address::parse("12345678901299").unwrap();
    let d = read_water(&mut client, &mut line, stuck, DiOrder::Reversed).await;
    assert!((d.volume_m3 - 88.5).abs() < 1e-9, "{d:?}");
    let st = client
        .valve(
            &mut line,
            MeterType::COLD_WATER,
            stuck,
            DiOrder::Reversed,
            false,
            timeout,
        )
        .await
        .unwrap();
    assert_eq!(st.valve, Valve::Open, "the valve did not move");
    assert_eq!(client.noise(), 0);

    // The DL/T 645 meter next to them still answers.
    let mut d645 = Client::new(4);
    let v = d645
        .read(
            &mut line,
            Address::parse("202411110002").unwrap(),
            Di::FORWARD_ACTIVE_KWH,
            timeout,
        )
        .await
        .unwrap();
    assert_eq!(v.len(), 4);
}

async fn read_water(
    c: &mut cjt188::client::Client,
    line: &mut tokio_serial::SerialStream,
    address: cjt188::Address,
    order: DiOrder,
) -> cjt188::CurrentData {
    c.read(
        line,
        MeterType::COLD_WATER,
        address,
        order,
        Duration::from_secs(1),
    )
    .await
    .unwrap()
}

/// The config's `[[device]]` of each protocol on the simulated line (2400 8E1).
fn engine_config(sim: &meterd::sim::RunningSim) -> meterd::config::Config {
    let Some(addr) = sim.addr("line").cloned() else {
        panic!("no line")
    };
    let text = format!(
        "[gateway]\nid = \"t\"\nsite = \"t\"\ntimezone = \"Asia/Shanghai\"\n[poll]\ninterval = \"2s\"\ntimeout = \"1s\"\n{}\n{}",
        common::bus_toml("line", &addr, "baud = 2400\nparity = \"even\"\n"),
        r#"
[[device]]
name = "room-301"
bus = "line"
unit = 3
profile = "chint_ddsu666"

[[device]]
name = "room-302-prepaid"
bus = "line"
protocol = "dlt645"
address = "202411110002"
profile = "dlt645_2007_prepaid"
password = "123456"
operator = "00000001"

[[device]]
name = "water-302"
bus = "line"
protocol = "cjt188"
address = "12345678901234"

[[device]]
name = "room-303"
bus = "line"
protocol = "dlt645"
address = "202411110003"
profile = "dlt645_2007_single_phase"
"#
    );
    common::parse(&text)
}

#[tokio::test]
async fn the_engine_polls_modbus_dlt645_and_cjt188_meters_of_one_line_into_the_same_readings() {
    use meterd::reading::Quality;
    let sim = common::start(BUILDING).await;
    let config = engine_config(&sim);
    let mut engine = meterd::daemon::Engine::start(&config, &meterd::clock::Clock::system());
    let mut seen: std::collections::BTreeMap<(String, String), (Option<f64>, Quality)> =
        std::collections::BTreeMap::new();
    let deadline = meterd::clock::Clock::system().instant() + Duration::from_secs(20);
    let want = |s: &std::collections::BTreeMap<(String, String), (Option<f64>, Quality)>| {
        ["room-301", "room-302-prepaid", "water-302", "room-303"]
            .iter()
            .all(|d| s.keys().any(|(dev, _)| dev == d))
    };
    while !want(&seen) {
        let batch = tokio::time::timeout_at(deadline, engine.readings.recv())
            .await
            .expect("every device reported within 20 s")
            .unwrap();
        for r in batch {
            seen.insert(
                (r.device.to_string(), r.register.to_string()),
                (r.value, r.quality),
            );
        }
    }
    engine.stop();
    let get = |d: &str, r: &str| seen[&(d.to_string(), r.to_string())];
    let (kwh, q) = get("room-302-prepaid", "import_kwh");
    assert_eq!(q, Quality::Good);
    assert!((4321.56..4322.0).contains(&kwh.unwrap()), "{seen:?}");
    assert_eq!(get("room-302-prepaid", "power").0, Some(1200.0));
    assert_eq!(get("room-302-prepaid", "relay").0, Some(1.0), "supply on");
    assert_eq!(get("room-302-prepaid", "remaining_money").0, Some(100.0));
    let (m3, q) = get("water-302", "volume");
    assert_eq!(q, Quality::Good);
    assert!((1234.56..1235.0).contains(&m3.unwrap()), "{seen:?}");
    assert_eq!(get("water-302", "valve").0, Some(0.0), "open");
    assert_eq!(
        get("room-301", "voltage").0.map(|v| (v * 10.0).round()),
        Some(2300.0)
    );
    // The dead DL/T 645 meter: a failed poll, error readings named by its address.
    let (v, q) = get("room-303", "import_kwh");
    assert_eq!((v, q), (None, Quality::Error), "{seen:?}");
}

#[test]
fn a_national_meter_on_a_modbus_tcp_bus_or_without_an_address_is_refused_with_the_reason() {
    let text = r#"
[gateway]
id = "t"
site = "t"
timezone = "Asia/Shanghai"
[[bus]]
name = "lan"
kind = "tcp"
host = "127.0.0.1"
port = 502
[[bus]]
name = "line"
kind = "rtu"
device = "/dev/ttyUSB0"
baud = 2400
parity = "even"
[[device]]
name = "a"
bus = "lan"
protocol = "dlt645"
address = "202411110002"
profile = "dlt645_2007_prepaid"
[[device]]
name = "b"
bus = "line"
protocol = "dlt645"
profile = "dlt645_2007_prepaid"
[[device]]
name = "c"
bus = "line"
protocol = "dlt645"
address = "2024-1111"
profile = "dlt645_2007_prepaid"
[[device]]
name = "d"
bus = "line"
protocol = "dlt645"
address = "202411110009"
profile = "eastron_sdm120"
[[device]]
name = "e"
bus = "line"
profile = "eastron_sdm120"
"#;
    let e =
        meterd::config::Config::from_str_at(text, "t.toml", std::path::Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
    for want in [
        "Modbus TCP: DL/T 645 meters hang on a serial line",
        "device[1] (b).address: required for a DL/T 645 meter",
        "expected the meter's number, 1 to 12 digits",
        "unknown DL/T 645 profile \"eastron_sdm120\"",
        "device[4] (e).unit: required for a Modbus device",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

/// A DL/T 645 meter's relay request through the engine, as enforcement sends it.
async fn actuate(
    engine: &meterd::daemon::Engine,
    device: &str,
    set: Option<bool>,
) -> Result<meterd::modbus::bus::RelayState, meterd::modbus::bus::ActuateError> {
    actuate_output(engine, device, "relay", set).await
}

/// One output request through the engine, as enforcement sends it.
async fn actuate_output(
    engine: &meterd::daemon::Engine,
    device: &str,
    output: &str,
    set: Option<bool>,
) -> Result<meterd::modbus::bus::RelayState, meterd::modbus::bus::ActuateError> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    engine.actuators[device]
        .send(meterd::modbus::bus::Actuation {
            device: device.into(),
            output: output.into(),
            set,
            reply,
        })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the bus task answers")
        .unwrap()
}

#[tokio::test]
async fn a_dlt645_prepaid_meters_relay_trips_and_closes_through_the_engine_with_read_back() {
    let sim = common::start(BUILDING).await;
    let config = engine_config(&sim);
    let mut engine = meterd::daemon::Engine::start(&config, &meterd::clock::Clock::system());
    let s = actuate(&engine, "room-302-prepaid", None).await.unwrap();
    assert!(s.before && s.after && !s.wrote, "read only: {s:?}");
    let s = actuate(&engine, "room-302-prepaid", Some(false))
        .await
        .unwrap();
    assert!(
        s.before && !s.after && s.wrote,
        "tripped and read back open: {s:?}"
    );
    // The poll after the trip sees no power and the relay open.
    let deadline = meterd::clock::Clock::system().instant() + Duration::from_secs(15);
    loop {
        let batch = tokio::time::timeout_at(deadline, engine.readings.recv())
            .await
            .expect("a poll of the tripped meter")
            .unwrap();
        let power = batch
            .iter()
            .find(|r| &*r.device == "room-302-prepaid" && &*r.register == "power");
        if let Some(p) = power {
            assert_eq!(p.value, Some(0.0));
            let relay = batch.iter().find(|r| &*r.register == "relay").unwrap();
            assert_eq!(relay.value, Some(0.0), "supply off");
            break;
        }
    }
    let s = actuate(&engine, "room-302-prepaid", Some(true))
        .await
        .unwrap();
    assert!(!s.before && s.after && s.wrote, "closed again: {s:?}");
    // A meter without a relay item has no output to switch.
    let e = actuate(&engine, "room-303", Some(false)).await.unwrap_err();
    assert_eq!(e.kind(), "config", "{e}");
    engine.stop();
}

#[tokio::test]
async fn a_wrong_dlt645_password_is_the_meters_refusal_and_the_relay_stays() {
    let sim = common::start(BUILDING).await;
    let text = format!(
        "[gateway]\nid = \"t\"\nsite = \"t\"\ntimezone = \"Asia/Shanghai\"\n{}\n[[device]]\nname = \"p\"\nbus = \"line\"\nprotocol = \"dlt645\"\naddress = \"202411110002\"\nprofile = \"dlt645_2007_prepaid\"\npassword = \"654321\"\noperator = \"00000001\"\ntimeout = \"1s\"\n",
        common::bus_toml("line", sim.addr("line").unwrap(), "baud = 2400\nparity = \"even\"\n"),
    );
    let config = common::parse(&text);
    assert!(
        !format!("{:?}", config.devices[0].protocol).contains("654321"),
        "the password never prints"
    );
    let engine = meterd::daemon::Engine::start(&config, &meterd::clock::Clock::system());
    let e = actuate(&engine, "p", Some(false)).await.unwrap_err();
    assert!(e.device_answered(), "{e}");
    assert!(e.to_string().contains("wrong password"), "{e}");
    let s = actuate(&engine, "p", None).await.unwrap();
    assert!(s.after, "still on");
}

#[tokio::test]
async fn a_dlt645_meter_answering_after_its_timeout_never_gives_its_answer_to_a_neighbour() {
    use meterd::reading::Quality;
    // Each meter's counter starts in its own thousand, so an answer attributed to the wrong meter
    // cannot go unseen; the late one answers 1.5 s after a 1 s timeout.
    let building = r#"
[[endpoint]]
name = "line"
kind = "rtu"
baud = 2400
parity = "even"
response_delay = "30ms"

[[unit]]
endpoint = "line"
unit = 3
profile = "chint_ddsu666"
load_w = 800.0
start_kwh = 3000.0

[[unit]]
endpoint = "line"
protocol = "dlt645"
address = "202411110001"
profile = "dlt645_2007_single_phase"
start_kwh = 1000.0
delay = "1500ms"

[[unit]]
endpoint = "line"
protocol = "dlt645"
address = "202411110002"
profile = "dlt645_2007_single_phase"
start_kwh = 2000.0
"#;
    let sim = common::start(building).await;
    let text = format!(
        "[gateway]\nid = \"t\"\nsite = \"t\"\ntimezone = \"Asia/Shanghai\"\n[poll]\ninterval = \"3s\"\ntimeout = \"1s\"\n{}\n{}",
        common::bus_toml("line", sim.addr("line").unwrap(), "baud = 2400\nparity = \"even\"\n"),
        "[[device]]\nname = \"late\"\nbus = \"line\"\nprotocol = \"dlt645\"\naddress = \"202411110001\"\nprofile = \"dlt645_2007_single_phase\"\n\
         [[device]]\nname = \"neighbour\"\nbus = \"line\"\nprotocol = \"dlt645\"\naddress = \"202411110002\"\nprofile = \"dlt645_2007_single_phase\"\n\
         [[device]]\nname = \"modbus\"\nbus = \"line\"\nunit = 3\nprofile = \"chint_ddsu666\"\n"
    );
    let config = common::parse(&text);
    let mut engine = meterd::daemon::Engine::start(&config, &meterd::clock::Clock::system());
    let end = meterd::clock::Clock::system().instant() + Duration::from_secs(14);
    let (mut neighbour_good, mut modbus_good) = (0, 0);
    while let Ok(Some(batch)) = tokio::time::timeout_at(end, engine.readings.recv()).await {
        for r in batch
            .iter()
            .filter(|r| r.quantity == meterd::modbus::profile::Quantity::EnergyKwh)
        {
            let Some(v) = r.value.filter(|_| r.quality == Quality::Good) else {
                assert_ne!(&*r.device, "neighbour", "the neighbour never fails: {r:?}");
                continue;
            };
            let own = match &*r.device {
                "late" => 1000.0..1001.0,
                "neighbour" => {
                    neighbour_good += 1;
                    2000.0..2001.0
                }
                _ => {
                    modbus_good += 1;
                    3000.0..3001.0
                }
            };
            assert!(
                own.contains(&v),
                "{} read {v}: another meter's answer",
                r.device
            );
        }
    }
    engine.stop();
    assert!(
        neighbour_good >= 3 && modbus_good >= 3,
        "{neighbour_good} {modbus_good}"
    );
}

#[tokio::test]
async fn a_cjt188_valve_closes_and_opens_through_the_engine_and_a_stuck_one_says_so() {
    let sim = common::start(BUILDING).await;
    let text = format!(
        "[gateway]\nid = \"t\"\nsite = \"t\"\ntimezone = \"Asia/Shanghai\"\n{}\n{}",
        common::bus_toml("line", sim.addr("line").unwrap(), "baud = 2400\nparity = \"even\"\n"),
        "[[device]]\nname = \"water\"\nbus = \"line\"\nprotocol = \"cjt188\"\naddress = \"12345678901234\"\n\
         [[device]]\nname = \"stuck\"\nbus = \"line\"\nprotocol = \"cjt188\"\naddress = \"12345678901299\"\ndi_order = \"reversed\"\n"
    );
    let config = common::parse(&text);
    let engine = meterd::daemon::Engine::start(&config, &meterd::clock::Clock::system());
    let s = actuate_output(&engine, "water", "valve", Some(false))
        .await
        .unwrap();
    assert!(
        s.before && !s.after && s.wrote,
        "closed, read back closed: {s:?}"
    );
    let s = actuate_output(&engine, "water", "valve", Some(true))
        .await
        .unwrap();
    assert!(!s.before && s.after && s.wrote, "open again: {s:?}");
    // A jammed valve acknowledges and stays open: the read-back says so, for a relay_mismatch.
    let s = actuate_output(&engine, "stuck", "valve", Some(false))
        .await
        .unwrap();
    assert!(s.before && s.after && s.wrote, "{s:?}");
}

#[tokio::test]
async fn dlt645_and_cjt188_meters_behind_a_serial_server_are_polled_over_tcp() {
    // A Moxa/USR serial server passing raw bytes (kind = "rtu_over_tcp"), as many sites wire their
    // RS485 lines to the gateway.
    let building = r#"
[[endpoint]]
name = "gw"
kind = "rtu_over_tcp"
baud = 2400
parity = "even"
response_delay = "30ms"

[[unit]]
endpoint = "gw"
protocol = "dlt645"
address = "202411110002"
profile = "dlt645_2007_single_phase"
load_w = 300.0
start_kwh = 77.77

[[unit]]
endpoint = "gw"
protocol = "cjt188"
address = "12345678901234"
start_m3 = 5.5
"#;
    let sim = common::start(building).await;
    let text = format!(
        "[gateway]\nid = \"t\"\nsite = \"t\"\ntimezone = \"Asia/Shanghai\"\n[poll]\ninterval = \"2s\"\ntimeout = \"1s\"\n{}\n{}",
        common::bus_toml("gw", sim.addr("gw").unwrap(), ""),
        "[[device]]\nname = \"e\"\nbus = \"gw\"\nprotocol = \"dlt645\"\naddress = \"202411110002\"\nprofile = \"dlt645_2007_single_phase\"\n\
         [[device]]\nname = \"w\"\nbus = \"gw\"\nprotocol = \"cjt188\"\naddress = \"12345678901234\"\n"
    );
    let config = common::parse(&text);
    let mut engine = meterd::daemon::Engine::start(&config, &meterd::clock::Clock::system());
    let (mut kwh, mut m3) = (None, None);
    let deadline = meterd::clock::Clock::system().instant() + Duration::from_secs(15);
    while kwh.is_none() || m3.is_none() {
        let batch = tokio::time::timeout_at(deadline, engine.readings.recv())
            .await
            .expect("both meters read over TCP within 15 s")
            .unwrap();
        for r in batch {
            match (&*r.device, &*r.register) {
                ("e", "import_kwh") => kwh = r.value,
                ("w", "volume") => m3 = r.value,
                _ => {}
            }
        }
    }
    engine.stop();
    assert!((77.77..77.8).contains(&kwh.unwrap()), "{kwh:?}");
    assert_eq!(m3, Some(5.5));
}
