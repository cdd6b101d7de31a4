//! One RS485 line with a meter that answers late, or with noise on it: the neighbours keep their
//! polls, no reading is ever attributed to the wrong unit, the line is back in step within a cycle
//! of the fault clearing, and the master leaves t3.5 of silence on the wire. Against the simulator's
//! line emulator (pty for RTU, a TCP gateway for RTU over TCP), at the field's 2400 and 9600 baud.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::ConfigText;
use meterd::config::Config;
use meterd::modbus::bus::{self, Batch};
use meterd::modbus::link::{LineStats, Link};
use meterd::modbus::timing;
use meterd::reading::Quality;
use meterd::sim::{EndpointAddr, RunningSim};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Rtu,
    RtuOverTcp,
}

/// Units 4, 5 and 6 on one line; each counter starts in its own thousand so a reading attributed
/// to the wrong unit cannot go unseen.
fn building(kind: Kind, baud: u32, late: Option<Duration>) -> String {
    let kind = match kind {
        Kind::Rtu => "rtu",
        Kind::RtuOverTcp => "rtu_over_tcp",
    };
    let mut b = format!(
        "[[endpoint]]\nname = \"line\"\nkind = \"{kind}\"\nbaud = {baud}\nparity = \"none\"\nstop_bits = 1\nresponse_delay = \"15ms\"\n"
    );
    for (unit, load, start) in [(4, 1800.0, 4000.0), (5, 300.0, 5000.0), (6, 2900.0, 6000.0)] {
        b += &format!(
            "[[unit]]\nendpoint = \"line\"\nunit = {unit}\nprofile = \"chint_ddsu666\"\nload_w = {load}\nstart_kwh = {start}\n"
        );
        if let (5, Some(d)) = (unit, late) {
            b += &format!("delay = \"{}ms\"\n", d.as_millis());
        }
    }
    b
}

/// Poll interval: a second at 9600 baud; at 2400 three meters' two blocks take 1.3 s of wire
/// time, so two seconds, as a site at that speed is set up.
fn interval(baud: u32) -> Duration {
    if baud >= 9600 {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(2)
    }
}

fn config(sim: &RunningSim, baud: u32, timeout: Duration) -> Config {
    let addr = sim.addr("line").unwrap();
    let parity = if matches!(addr, EndpointAddr::Pty(_)) {
        "parity = \"none\"\n"
    } else {
        ""
    };
    // The late meter is never taken offline here: it stays on the poll grid, so its late answers
    // hit the line every cycle (the worst case for its neighbours).
    ConfigText::gateway("gw-1", "Asia/Shanghai")
        .with(&common::bus_toml(
            "line",
            addr,
            &format!("{parity}baud = {baud}\n"),
        ))
        .with(&format!(
            r#"[poll]
interval = "{interval}ms"
timeout = "{timeout}ms"
retries = 1
backoff = "20ms"
offline_after = 1000
probe_interval = "2s"

[[device]]
name = "room-401"
bus = "line"
unit = 4
profile = "chint_ddsu666"

[[device]]
name = "room-402"
bus = "line"
unit = 5
profile = "chint_ddsu666"

[[device]]
name = "room-403"
bus = "line"
unit = 6
profile = "chint_ddsu666"
"#,
            timeout = timeout.as_millis(),
            interval = interval(baud).as_millis()
        ))
        .build()
}

/// One good or failed poll of a device, with when it completed.
#[derive(Debug)]
struct Poll {
    at: Instant,
    device: String,
    good: bool,
}

struct Run {
    /// When polling started (and the fault clock with it).
    start: Instant,
    polls: Vec<Poll>,
    stats: Arc<LineStats>,
    /// Every good energy reading by device.
    kwh: BTreeMap<String, Vec<f64>>,
}

/// Polls the line with the real bus task for `run`; at `clear_at` the late meter is fixed.
async fn poll_line(
    sim: &RunningSim,
    config: &Config,
    run: Duration,
    clear_at: Option<Duration>,
    noise_every: Option<Duration>,
) -> Run {
    let link = Link::new(&config.buses[0], meterd::clock::Clock::system());
    let stats = link.line_stats();
    let status = bus::new_status(&config.buses[0], &config.devices);
    let (tx, mut rx) = mpsc::channel::<Batch>(64);
    let (_act_tx, act_rx) = mpsc::channel(1);
    let task = tokio::spawn(bus::run_with(
        config.devices.clone(),
        vec![link],
        tx,
        status,
        act_rx,
        meterd::clock::Clock::system(),
    ));
    let start = meterd::clock::Clock::system().instant();
    let end = start + run;
    let mut polls = Vec::new();
    let mut kwh: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut cleared = clear_at.is_none();
    let mut next_noise = noise_every.map(|n| start + n);
    let mut rng = 0x9E37_79B9_u32;
    loop {
        let wake = next_noise.unwrap_or(end).min(end);
        match tokio::time::timeout_at(wake, rx.recv()).await {
            Ok(Some(batch)) => {
                let good = batch.iter().all(|r| r.quality == Quality::Good);
                for r in &batch {
                    if &*r.register == "import_kwh" && r.quality == Quality::Good {
                        kwh.entry(r.device.to_string())
                            .or_default()
                            .push(r.value.unwrap());
                    }
                }
                polls.push(Poll {
                    at: meterd::clock::Clock::system().instant(),
                    device: batch[0].device.to_string(),
                    good,
                });
            }
            Ok(None) => panic!("bus task ended"),
            Err(_) if meterd::clock::Clock::system().instant() >= end => break,
            Err(_) => {
                // A burst of 24 bytes of noise, as a contactor next to the cable makes.
                let burst: Vec<u8> = (0..24)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 17;
                        rng ^= rng << 5;
                        rng as u8
                    })
                    .collect();
                sim.inject_noise("line", &burst);
                next_noise = next_noise.map(|t| t + noise_every.unwrap());
            }
        }
        if !cleared && meterd::clock::Clock::system().since(start) >= clear_at.unwrap() {
            sim.set_delay("line", 5, Duration::ZERO);
            cleared = true;
        }
    }
    task.abort();
    Run {
        start,
        polls,
        stats,
        kwh,
    }
}

fn good_share(polls: &[Poll], device: &str) -> (usize, usize) {
    let mine: Vec<_> = polls.iter().filter(|p| p.device == device).collect();
    (mine.iter().filter(|p| p.good).count(), mine.len())
}

/// The energy readings of each room stay in its own thousand and never go backwards.
fn assert_attributed_to_the_right_unit(run: &Run) {
    for (device, start) in [
        ("room-401", 4000.0),
        ("room-402", 5000.0),
        ("room-403", 6000.0),
    ] {
        for w in run
            .kwh
            .get(device)
            .map_or(&[][..], Vec::as_slice)
            .windows(2)
        {
            assert!(w[1] >= w[0], "{device}: counter went back {w:?}");
        }
        for v in run.kwh.get(device).into_iter().flatten() {
            assert!(
                (start..start + 1.0).contains(v),
                "{device}: {v} kWh belongs to another unit"
            );
        }
    }
}

async fn late_meter_scenario(kind: Kind, baud: u32, timeout: Duration) {
    let late = timeout * 3 / 2;
    let sim = common::start(&building(kind, baud, Some(late))).await;
    let config = config(&sim, baud, timeout);
    let clear = interval(baud) * 14;
    let run = poll_line(&sim, &config, clear + interval(baud) * 5, Some(clear), None).await;
    let start = run.start;
    let faulty: Vec<Poll> = run
        .polls
        .iter()
        .filter(|p| p.at < start + clear)
        .map(|p| Poll {
            at: p.at,
            device: p.device.clone(),
            good: p.good,
        })
        .collect();
    for n in ["room-401", "room-403"] {
        let (good, all) = good_share(&faulty, n);
        // The late meter's timeouts and resync waits take bus time: the neighbours may miss a
        // deadline, but every poll they get is good.
        assert!(all >= 10, "{n}: only {all} polls in 14 cycles");
        assert!(
            good * 100 >= all * 99,
            "{kind:?} {baud}: {n} had {good} good polls of {all} while its neighbour answered late"
        );
        println!("{kind:?} at {baud} baud, meter 5 answering {late:?} late (timeout {timeout:?}): {n} {good}/{all} good polls");
    }
    let (late_good, late_all) = good_share(&faulty, "room-402");
    println!(
        "late meter itself: {late_good}/{late_all} good; line guard dropped {} foreign frames, {} mismatched, {} stale bytes, {} noise bytes",
        run.stats.foreign_frames.load(Ordering::Relaxed),
        run.stats.mismatched_frames.load(Ordering::Relaxed),
        run.stats.stale_bytes.load(Ordering::Relaxed),
        run.stats.noise_bytes.load(Ordering::Relaxed),
    );
    // The fault really happened: late answers reached the master and were dropped.
    let dropped = run.stats.foreign_frames.load(Ordering::Relaxed)
        + run.stats.mismatched_frames.load(Ordering::Relaxed)
        + run.stats.stale_bytes.load(Ordering::Relaxed);
    assert!(dropped > 0, "no late answer ever reached the master");
    assert_eq!(late_good, 0, "an answer after the timeout is never taken");
    assert_attributed_to_the_right_unit(&run);
    // Within one poll cycle of the fault clearing, every poll of every meter is good.
    let back = start + clear + interval(baud);
    let after: Vec<&Poll> = run.polls.iter().filter(|p| p.at >= back).collect();
    for n in ["room-401", "room-402", "room-403"] {
        let mine: Vec<_> = after.iter().filter(|p| p.device == n).collect();
        assert!(
            mine.len() >= 2,
            "{n}: {} polls after the fault cleared",
            mine.len()
        );
        assert!(
            mine.iter().all(|p| p.good),
            "{n} still failing after the late meter was fixed: {mine:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_answering_late_on_rtu_at_9600_keeps_its_neighbours_polled() {
    late_meter_scenario(Kind::Rtu, 9600, Duration::from_millis(250)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_answering_late_on_rtu_at_2400_keeps_its_neighbours_polled() {
    late_meter_scenario(Kind::Rtu, 2400, Duration::from_millis(400)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_answering_late_behind_an_rtu_over_tcp_gateway_keeps_its_neighbours_polled() {
    late_meter_scenario(Kind::RtuOverTcp, 9600, Duration::from_millis(250)).await;
}

async fn noise_scenario(kind: Kind, baud: u32) {
    let sim = common::start(&building(kind, baud, None)).await;
    let config = config(&sim, baud, Duration::from_millis(400));
    let run = poll_line(
        &sim,
        &config,
        interval(baud) * 12,
        None,
        Some(Duration::from_millis(230)),
    )
    .await;
    let noise = run.stats.noise_bytes.load(Ordering::Relaxed)
        + run.stats.stale_bytes.load(Ordering::Relaxed);
    assert!(noise > 0, "the noise never reached the master");
    for n in ["room-401", "room-402", "room-403"] {
        let (good, all) = good_share(&run.polls, n);
        assert!(all >= 8, "{n}: only {all} polls");
        assert!(
            good * 100 >= all * 99,
            "{kind:?} {baud}: {n} had {good} good polls of {all} under line noise"
        );
        println!("{kind:?} at {baud} baud with a noise burst every 230 ms: {n} {good}/{all} good polls ({noise} bytes of noise dropped)");
    }
    assert_attributed_to_the_right_unit(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_line_noise_on_rtu_at_2400_cost_no_poll() {
    noise_scenario(Kind::Rtu, 2400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_line_noise_behind_an_rtu_over_tcp_gateway_cost_no_poll() {
    noise_scenario(Kind::RtuOverTcp, 9600).await;
}

async fn gap_scenario(kind: Kind, baud: u32) {
    let sim = common::start(&building(kind, baud, None)).await;
    let config = config(&sim, baud, Duration::from_millis(400));
    let cycles = 5;
    let run = poll_line(&sim, &config, interval(baud) * cycles, None, None).await;
    assert!(run.polls.iter().all(|p| p.good), "{:?}", run.polls);
    let (requests, violations, shortest) = sim.line("line").unwrap().summary();
    println!(
        "{kind:?} at {baud} baud: {requests} requests, {violations} started within t3.5 = {:?}, shortest silence {shortest:?}",
        timing::t35(baud)
    );
    // Two requests per meter and cycle, three meters (the first cycle may be cut short).
    assert!(
        requests >= 2 * 3 * (u64::from(cycles) - 1),
        "{requests} requests"
    );
    assert_eq!(violations, 0, "shortest gap {shortest:?}");
    assert!(shortest.unwrap() >= timing::t35(baud));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_leaves_t35_of_silence_before_every_request_at_2400_baud() {
    gap_scenario(Kind::Rtu, 2400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_leaves_t35_of_silence_before_every_request_at_9600_baud_over_a_gateway() {
    gap_scenario(Kind::RtuOverTcp, 9600).await;
}

/// The check on the wire can fail: a request that follows another without silence is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_emulator_counts_a_master_that_leaves_no_silence() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = common::start(&building(Kind::RtuOverTcp, 9600, None)).await;
    let EndpointAddr::RtuOverTcp(addr) = sim.addr("line").unwrap() else {
        unreachable!()
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Read 2 registers at 0x2000 from unit 4, then at once from unit 6 (CRC low byte first).
    let mut a = vec![0x04, 0x03, 0x20, 0x00, 0x00, 0x02];
    meterd::modbus::frame::push_crc(&mut a);
    let mut b = vec![0x06, 0x03, 0x20, 0x00, 0x00, 0x02];
    meterd::modbus::frame::push_crc(&mut b);
    // Both requests in one write: the second starts the moment the first ends on the wire.
    s.write_all(&[a, b].concat()).await.unwrap();
    let mut buf = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let (requests, violations, _) = sim.line("line").unwrap().summary();
    assert_eq!((requests, violations), (2, 1));
}
