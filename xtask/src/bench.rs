//! `cargo xtask bench`: runs the bench binary (tests crate, release) with
//! the freshly built XDP object. Figures come with baselines from the same
//! run; see `tests/src/bin/bench.rs`.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

/// Runs the bench and writes `bench/RESULTS.md`.
pub fn run(root: &Path, _binary: &Path, quick: bool) -> Result<()> {
    let object = crate::provision::ebpf_object(root);
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root)
        .args([
            "run",
            "--release",
            "--package",
            "smtpguard-tests",
            "--bin",
            "bench",
            "--",
        ])
        .args(["--out", "bench/RESULTS.md"])
        .env("SMTPGUARD_EBPF_OBJECT", object);
    if quick {
        cmd.arg("--quick");
    }
    if !cmd.status()?.success() {
        bail!("bench failed");
    }
    Ok(())
}
