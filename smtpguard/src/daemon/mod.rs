//! The daemon: starts every part from the configuration, runs until
//! SIGINT/SIGTERM, reloads on SIGHUP. See [`run`].

pub mod report;
pub mod startup;
pub mod state;

pub use state::{Daemon, Kernel, KernelWrite};

/// Runs the daemon in the foreground with the configuration at `config`
/// (the embedded development default when `None`).
pub async fn run(config: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let _ = config;
    anyhow::bail!("the daemon is not wired yet")
}
