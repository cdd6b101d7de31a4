//! `meterd simulate`: serves a virtual building over Modbus TCP and RTU.

use super::{out, sim, Args, PathBuf, Result};

/// `meterd simulate --building F`
#[derive(Debug, Args)]
pub struct SimulateCmd {
    /// Building description (TOML); profiles are also read from `profiles/` next to it.
    #[arg(long)]
    pub building: PathBuf,
}

impl SimulateCmd {
    /// Serves the building until interrupted; prints where each endpoint listens.
    pub async fn execute(self) -> Result<()> {
        let (building, profiles) = sim::load(&self.building)?;
        let running = sim::start(&building, &profiles).await?;
        for (name, addr) in &running.endpoints {
            out(&format!("endpoint {name} {addr}\n"));
        }
        out(&format!(
            "serving {} unit(s); Ctrl-C to stop\n",
            building.unit.len()
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    }
}
