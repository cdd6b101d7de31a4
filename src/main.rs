//! The `meterd` binary: parses the command line, sets up logging, runs one subcommand.

use clap::Parser;
use meterd::cli::{Cli, Command, DeviceException, InvalidConfig, EXIT_CONFIG, EXIT_EXCEPTION};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

fn main() {
    let cli = Cli::parse();
    // --log-level, else RUST_LOG, else the config's [gateway] log_level (for `run`), else info.
    let from_config = || match &cli.command {
        Command::Run(r) => meterd::config::Config::from_path(&r.config.config)
            .ok()
            .and_then(|c| c.gateway.log_level),
        _ => None,
    };
    // Directives are a level or `target=level` pairs (what `check` accepts for log_level), which
    // `Targets` parses without a regex engine in the binary.
    let parse = meterd::config::log_filter;
    let filter = match &cli.log_level {
        Some(l) => parse(l).unwrap_or_else(|| {
            eprintln!("meterd: --log-level {l:?}: expected a level (off, error, warn, info, debug, trace) or directives like info,meterd::uplink=debug");
            std::process::exit(2);
        }),
        None => std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| parse(&v))
            .or_else(|| from_config().and_then(|l| parse(&l)))
            .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO)),
    };
    // The demo's embedded broker logs every connection; its table and the web view say what matters.
    let filter = match cli.command {
        Command::Demo(_) => filter.with_target("rumqttd", tracing::level_filters::LevelFilter::OFF),
        _ => filter,
    };
    // Colour only on a terminal: journald and log files get plain text.
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    // The daemon runs its tasks on one thread: it waits on the bus and the broker far more than it
    // computes, and a single-threaded scheduler wakes no second worker per event (measured with
    // `meterd bench daemon`: 13.4 -> 10.2 us of CPU per reading); SQLite has its own thread and
    // heavy billing work goes to the blocking pool. Commands that host the simulator next to what
    // they measure (bench, demo, simulate) keep a worker per core.
    let mut builder = match cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meterd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // The one clock of the process: every command that needs the time is handed it.
    let clock = meterd::clock::Clock::system();
    let result = runtime.block_on(async move {
        let clock = &clock;
        match cli.command {
            Command::Run(c) => c.execute(clock).await,
            Command::Check(c) => c.execute(),
            Command::Read(c) => c.execute(clock).await,
            Command::Scan(c) => c.execute(clock).await,
            Command::Raw(c) => c.execute(clock).await,
            Command::Profiles(c) => c.execute(),
            Command::Buffer(c) => c.execute(clock),
            Command::Topology(c) => c.execute(clock),
            Command::Apportion(c) => c.execute(),
            Command::Bill(c) => c.execute(),
            Command::Recompute(c) => c.execute(clock).await,
            Command::Relay(c) => c.execute().await,
            Command::Status(c) => c.execute().await,
            Command::Acceptance(c) => c.execute(clock).await,
            Command::Simulate(c) => c.execute().await,
            Command::Demo(c) => c.execute(clock).await,
            Command::Bench(c) => c.execute().await,
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    if let Err(e) = result {
        eprintln!("meterd: {e:#}");
        let code = if e.downcast_ref::<InvalidConfig>().is_some() {
            EXIT_CONFIG
        } else if e.downcast_ref::<DeviceException>().is_some() {
            EXIT_EXCEPTION
        } else {
            1
        };
        std::process::exit(code);
    }
}
