//! `meterd bench dlt645`: DL/T 645 transactions on a 2400-baud line against its theoretical maximum.

use std::time::Duration;

use anyhow::{bail, Result};
use tokio_serial::SerialPortBuilderExt;

use super::clock;
use super::verdict;
use crate::dlt645::client::Client;
use crate::dlt645::{Address, Di};
use crate::modbus::timing;
use crate::sim;

/// Meters on the line, read in turn.
const METERS: u64 = 4;

/// Four DL/T 645 meters on a pty at 2400 8E1 answering after the standard's shortest turnaround
/// (Td = 20 ms, §A12): forward energy read from each in turn for `window`.
pub(super) async fn line(window: Duration) -> Result<bool> {
    let baud = 2400;
    let turnaround = Duration::from_millis(20);
    let mut text = format!("[[endpoint]]\nname = \"line\"\nkind = \"rtu\"\nbaud = {baud}\nparity = \"even\"\nresponse_delay = \"{}ms\"\n", turnaround.as_millis());
    for m in 1..=METERS {
        text += &format!("[[unit]]\nendpoint = \"line\"\nprotocol = \"dlt645\"\naddress = \"2024111100{m:02}\"\nprofile = \"dlt645_2007_single_phase\"\nload_w = 900.0\nstart_kwh = 1000.0\n");
    }
    let b = sim::Building::from_str_named(&text, "dlt645 bench")?;
    let running = sim::start(&b, &std::collections::BTreeMap::new()).await?;
    let Some(sim::EndpointAddr::Pty(path)) = running.addr("line").cloned() else {
        bail!("the simulator gave no pty")
    };
    let mut port = tokio_serial::new(path.to_string_lossy(), baud)
        .parity(tokio_serial::Parity::Even)
        .data_bits(tokio_serial::DataBits::Eight)
        .open_native_async()?;
    let preamble = crate::dlt645::frame::DEFAULT_PREAMBLE;
    let mut client = Client::new(preamble);
    // Request: FE × 4 + 16 bytes; answer: FE × 2 (the simulator's meters) + 20 bytes.
    let (req, resp) = (preamble + 16, 2 + 20);
    let tx = timing::wire_time(req + resp, baud, 11) + turnaround;
    let theoretical = 1.0 / tx.as_secs_f64();
    println!("\n[dlt645] scope: the DL/T 645 master on the line (no recorder, store or uplink). {METERS} DL/T 645-2007 meters on RS485 at {baud} 8E1 emulated on a pty, forward energy (00010000) read from each in turn");
    println!(
        "    transaction = (request {req} B + answer {resp} B) x 11 / {baud} + turnaround {} ms = {:.1} ms",
        turnaround.as_millis(),
        tx.as_secs_f64() * 1000.0
    );
    let addresses: Vec<Address> = (1..=METERS)
        .map(|m| Address::parse(&format!("2024111100{m:02}")))
        .collect::<Result<_, _>>()?;
    // One warm-up round, then the window.
    for a in &addresses {
        client
            .read(
                &mut port,
                *a,
                Di::FORWARD_ACTIVE_KWH,
                Duration::from_secs(1),
            )
            .await?;
    }
    let start = clock().instant();
    let mut done = 0u64;
    while clock().since(start) < window {
        let a = addresses[(done % METERS) as usize];
        let v = client
            .read(&mut port, a, Di::FORWARD_ACTIVE_KWH, Duration::from_secs(1))
            .await?;
        if v.len() != 4 {
            bail!("meter {a} answered {} value bytes for 00010000", v.len());
        }
        done += 1;
    }
    let rate = done as f64 / clock().since(start).as_secs_f64();
    if done == 0 {
        bail!("no transaction completed");
    }
    let ratio = rate / theoretical;
    let ok = ratio >= 0.9;
    println!(
        "    theoretical {theoretical:.2} transactions/s; achieved {rate:.2} transactions/s ({done} in {:.1} s) = {:.1}% (target >= 90%: {})",
        clock().since(start).as_secs_f64(),
        ratio * 100.0,
        verdict(ok)
    );
    drop(running);
    Ok(ok)
}
