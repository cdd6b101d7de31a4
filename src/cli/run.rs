//! `meterd run`: the daemon in the foreground (systemd's `ExecStart`).

use super::{daemon, totals, Args, Clock, Config, ConfigArg, Duration, Result};

/// `meterd run`
#[derive(Debug, Args)]
pub struct RunCmd {
    #[command(flatten)]
    pub config: ConfigArg,
}

impl RunCmd {
    /// Loads the config (refusing an invalid one) and runs until SIGINT/SIGTERM; SIGHUP reloads.
    pub async fn execute(self, clock: &Clock) -> Result<()> {
        use sd_notify::NotifyState;
        use tokio::signal::unix::{signal, SignalKind};
        let mut config = self.config.load()?;
        let mut daemon = start_daemon(&config, clock)?;
        let _ = sd_notify::notify(
            false,
            &[
                NotifyState::Ready,
                NotifyState::Status(&status_line(&config)),
            ],
        );
        let mut wd_usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut wd_usec);
        let period = if watchdog {
            Duration::from_micros(wd_usec / 2)
        } else {
            Duration::from_secs(60)
        };
        let mut wd = tokio::time::interval(period);
        wd.tick().await;
        let mut summary = tokio::time::interval(Duration::from_secs(60));
        summary.tick().await;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = wd.tick(), if watchdog => {
                    // Ping only when the bus tasks and the store are alive: a wedged task gets us restarted.
                    match daemon.healthy(period / 2).await {
                        Ok(()) => { let _ = sd_notify::notify(false, &[NotifyState::Watchdog]); }
                        Err(e) => tracing::error!(error = %e, "watchdog: not pinging systemd"),
                    }
                }
                _ = summary.tick() => {
                    let (ok, failed, offline) = totals(&daemon.bus_status.iter().flat_map(|s| s.snapshot()).collect::<Vec<_>>());
                    let outbox_rows = daemon.store.depth().await;
                    tracing::info!(polls_ok = ok, polls_failed = failed, offline, outbox_rows, "polling summary");
                }
                _ = hup.recv() => {
                    let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
                    match self.config.load() {
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused: the new configuration is invalid; still running the old one"),
                        Ok(new) => {
                            tracing::info!(config = %new.source, hash = %new.hash, "reloading");
                            // The outbox and the enforcement state live in SQLite; the new daemon
                            // reads every relay before switching anything, so nothing flickers.
                            daemon.stop().await;
                            daemon = start_daemon(&new, clock)?;
                            config = new;
                        }
                    }
                    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(&status_line(&config))]);
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
        tracing::info!("meterd stopping");
        daemon.stop().await;
        Ok(())
    }
}

pub(super) fn start_daemon(config: &Config, clock: &Clock) -> Result<daemon::Daemon> {
    tracing::info!(config = %config.source, hash = %config.hash, buses = config.buses.len(), devices = config.devices.len(), gateway = %config.gateway.id, outbox = %config.store.path.display(), mqtt = config.mqtt.is_some(), relays = config.enforcement.relays.len(), "meterd starting");
    Ok(daemon::Daemon::start(
        config,
        clock,
        std::sync::Arc::new(crate::uplink::NoCommands),
        None,
    )?)
}

pub(super) fn status_line(c: &Config) -> String {
    format!(
        "polling {} device(s) on {} bus(es); config {}",
        c.devices.len(),
        c.buses.len(),
        c.hash
    )
}
