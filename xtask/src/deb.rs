//! `cargo xtask deb`: the Debian package, built by cargo-deb from the
//! `[package.metadata.deb]` table of smtpguard/Cargo.toml.
//!
//! Steps: the release binary (with its XDP object), the man pages and
//! completions from `smtpguard-docs` into `target/packaging/` (man pages
//! gzipped with `gzip -9n`, reproducible, as Debian policy 12.1 wants),
//! then `cargo deb --no-build`. cargo-deb itself is installed once into
//! the user's cache, pinned, like bpf-linker.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The cargo-deb release the metadata is written for.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Builds the package; returns the `.deb`'s path.
pub fn build(root: &Path) -> Result<PathBuf> {
    let cargo_deb = cargo_deb()?;
    crate::build(root, true)?;
    docs(root)?;
    eprintln!("xtask: packaging with cargo-deb {CARGO_DEB_VERSION}");
    let out = Command::new(&cargo_deb)
        .current_dir(root)
        .args(["deb", "--package", "smtpguard", "--no-build"])
        .output()
        .context("running cargo-deb")?;
    if !out.status.success() {
        bail!(
            "cargo-deb failed:\n{}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    // cargo-deb prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo-deb did not say where the package is")?;
    eprintln!("xtask: built {}", deb.display());
    Ok(deb)
}

/// Man pages and completions into `target/packaging/`.
fn docs(root: &Path) -> Result<()> {
    let out = root.join("target/packaging");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    eprintln!("xtask: generating man pages and completions (smtpguard-docs)");
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["run", "--quiet", "--release", "--package", "smtpguard"])
        .args(["--bin", "smtpguard-docs", "--"])
        .arg(&out)
        .status()
        .context("running smtpguard-docs")?;
    if !status.success() {
        bail!("smtpguard-docs failed");
    }
    let man = out.join("man");
    for entry in fs::read_dir(&man)? {
        let path = entry?.path();
        let status = Command::new("gzip")
            .args(["-9", "-n", "--force"])
            .arg(&path)
            .status()
            .context("running gzip")?;
        if !status.success() {
            bail!("gzip {} failed", path.display());
        }
    }
    Ok(())
}

fn cache_dir() -> PathBuf {
    env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("smtpguard")
        .join(format!("cargo-deb-{CARGO_DEB_VERSION}"))
}

/// The path of a cargo-deb of [`CARGO_DEB_VERSION`], installing it once.
pub fn cargo_deb() -> Result<PathBuf> {
    let binary = cache_dir().join("bin/cargo-deb");
    if binary.exists() {
        return Ok(binary);
    }
    eprintln!(
        "xtask: installing cargo-deb {CARGO_DEB_VERSION} into {} (a few minutes, once)",
        cache_dir().display()
    );
    let status = Command::new(env!("CARGO"))
        .args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ])
        .arg("--root")
        .arg(cache_dir())
        .status()
        .context("running cargo install cargo-deb")?;
    if !status.success() || !binary.exists() {
        bail!("cargo install cargo-deb {CARGO_DEB_VERSION} failed");
    }
    Ok(binary)
}

/// Whether cargo-deb is installed (for `provision --check`).
pub fn cargo_deb_present() -> bool {
    cache_dir().join("bin/cargo-deb").exists()
}
