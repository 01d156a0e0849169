//! `cargo xtask bench`: figures beside baselines from the same run.

use std::path::Path;

use anyhow::{bail, Result};

/// Runs the bench; see the module docs.
pub fn run(_root: &Path, _binary: &Path, _quick: bool) -> Result<()> {
    bail!("the bench is not written yet")
}
