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
    (chrono::Utc::now() + chrono::Duration::minutes(5)).naive_utc()
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
