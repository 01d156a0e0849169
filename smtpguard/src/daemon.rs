//! TODO
pub async fn run(_config: Option<std::path::PathBuf>) -> anyhow::Result<()> { anyhow::bail!("the daemon is not wired yet") }
