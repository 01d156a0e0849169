//! `cargo xtask bench`: runs the bench crate (`bench/`, release) with the
//! freshly built XDP objects and daemon. Figures come with baselines from
//! the same run; see `bench/src/lib.rs`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

/// Runs the bench against `binary` (the release daemon) and writes
/// `bench/RESULTS.md`.
pub fn run(root: &Path, binary: &Path, quick: bool) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root)
        .args([
            "run",
            "--release",
            "--package",
            "smtpguard-bench",
            "--bin",
            "bench",
            "--",
        ])
        .args(["--out", "bench/RESULTS.md"])
        .env(
            "SMTPGUARD_BENCH_OBJECT",
            crate::provision::bench_object(root),
        )
        .env("SMTPGUARD_BIN", binary);
    if let Some(data) = shared_data(root) {
        cmd.env("SMTPGUARD_SHARED_DATA", data);
    }
    if quick {
        cmd.arg("--quick");
    }
    if !cmd.status()?.success() {
        bail!("bench failed");
    }
    Ok(())
}

/// `shared/data` beside the repository, or beside the directory holding
/// it (a git worktree under `wt/`).
fn shared_data(root: &Path) -> Option<PathBuf> {
    ["../shared/data", "../../shared/data"]
        .iter()
        .map(|d| root.join(d))
        .find(|p| p.is_dir())
}
