//! Finds or installs what building the XDP program needs, and the peers the
//! tests talk to. Every step says what it does; a second run installs
//! nothing and takes seconds.
//!
//! Two routes to a Rust compiler that can build `core` for
//! `bpfel-unknown-none`:
//! - **rustup nightly with `rust-src`** (the usual aya route), used when present;
//! - **Debian's `rustc-web` 1.96** with `rust-web-src`, built with
//!   `RUSTC_BOOTSTRAP=1`; installed with apt as root on Debian/Ubuntu.
//!
//! Both link with bpf-linker 0.13.0 built against LLVM 22 (`llvm-22-dev`),
//! installed into a cache directory outside the repository.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const DEBIAN_TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

/// How the XDP object gets compiled.
pub enum Toolchain {
    /// `cargo +nightly` from rustup, with rust-src.
    RustupNightly { linker_dir: PathBuf },
    /// Debian's rustc-web with `RUSTC_BOOTSTRAP=1`.
    Debian { linker_dir: PathBuf },
}

impl Toolchain {
    fn linker_dir(&self) -> &Path {
        match self {
            Toolchain::RustupNightly { linker_dir } | Toolchain::Debian { linker_dir } => {
                linker_dir
            }
        }
    }
}

/// Finds a toolchain that can build the XDP program, installing the Debian
/// route when it can.
pub fn toolchain() -> Result<Toolchain> {
    if rustup_nightly_has_rust_src() {
        let linker_dir = bpf_linker()?;
        eprintln!(
            "xtask: eBPF toolchain: rustup nightly with rust-src, bpf-linker in {}",
            linker_dir.display()
        );
        return Ok(Toolchain::RustupNightly { linker_dir });
    }
    if !debian_toolchain_present() {
        install_debian_toolchain()?;
    }
    let linker_dir = bpf_linker()?;
    eprintln!(
        "xtask: eBPF toolchain: Debian rustc-web ({}), bpf-linker {BPF_LINKER_VERSION} in {}",
        command_output("/usr/bin/rustc", &["--version"])
            .unwrap_or_default()
            .trim(),
        linker_dir.display()
    );
    Ok(Toolchain::Debian { linker_dir })
}

fn rustup_nightly_has_rust_src() -> bool {
    command_output("rustup", &["+nightly", "component", "list", "--installed"])
        .map(|out| out.lines().any(|l| l.starts_with("rust-src")))
        .unwrap_or(false)
}

fn debian_toolchain_present() -> bool {
    Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/bin/cargo").exists()
        && Path::new("/usr/lib/rustlib/src/rust/library/core/Cargo.toml").exists()
        && Path::new(LLVM_PREFIX).join("bin/llvm-config").exists()
}

fn manual_steps() -> String {
    format!(
        "install the eBPF toolchain by hand, then run this again:\n\
         \x20 either: rustup toolchain install nightly --component rust-src\n\
         \x20         cargo install bpf-linker\n\
         \x20 or (Debian/Ubuntu, as root):\n\
         \x20         apt-get install {}\n\
         \x20         LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} \
         --no-default-features --features llvm-22 --root {}",
        DEBIAN_TOOLCHAIN_PACKAGES.join(" "),
        linker_cache().display()
    )
}

pub fn is_root() -> bool {
    command_output("id", &["-u"])
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

pub fn is_debian_like() -> bool {
    std::fs::read_to_string("/etc/os-release")
        .map(|s| {
            s.lines().any(|l| {
                let l = l.to_ascii_lowercase();
                (l.starts_with("id=") || l.starts_with("id_like="))
                    && (l.contains("debian") || l.contains("ubuntu"))
            })
        })
        .unwrap_or(false)
}

fn install_debian_toolchain() -> Result<()> {
    if !is_root() || !is_debian_like() {
        bail!(
            "no eBPF toolchain found (rustup nightly has no rust-src, Debian's rustc-web is not installed), \
             and xtask can only install one as root on Debian/Ubuntu.\n{}",
            manual_steps()
        );
    }
    apt_install(DEBIAN_TOOLCHAIN_PACKAGES).with_context(manual_steps)
}

/// `apt-get update` then `apt-get install` of `packages`, non-interactively.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("xtask: installing with apt-get: {}", packages.join(" "));
    run_quiet(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run_quiet(&mut cmd, "apt-get install")
}

/// Whether dpkg has `package` installed (not merely configured-files).
pub fn dpkg_installed(package: &str) -> bool {
    command_output("dpkg-query", &["-W", "-f=${db:Status-Status}", package])
        .is_some_and(|status| status.trim() == "installed")
}

/// Prints what the eBPF toolchain has and lacks, and what `toolchain()`
/// would install or build; installs nothing. Returns whether it is complete.
pub fn toolchain_report() -> bool {
    println!("eBPF toolchain:");
    if rustup_nightly_has_rust_src() {
        println!("  ok        rustup nightly with rust-src");
    } else {
        println!(
            "  absent    rustup nightly with rust-src (optional: the Debian route is used instead)"
        );
        for package in DEBIAN_TOOLCHAIN_PACKAGES {
            let state = if dpkg_installed(package) {
                "installed"
            } else {
                "MISSING"
            };
            println!("  {state:<9} {package}");
        }
    }
    let linker = linker_cache().join("bin/bpf-linker");
    let linker_present = linker.exists() || on_path("bpf-linker").is_some();
    if linker_present {
        println!("  ok        bpf-linker");
    } else {
        println!(
            "  MISSING   bpf-linker {BPF_LINKER_VERSION} (would be built into {})",
            linker.display()
        );
    }
    let packages: Vec<&str> = if rustup_nightly_has_rust_src() {
        Vec::new()
    } else {
        DEBIAN_TOOLCHAIN_PACKAGES
            .iter()
            .copied()
            .filter(|p| !dpkg_installed(p))
            .collect()
    };
    match (packages.is_empty(), linker_present) {
        (true, true) => println!("would install: nothing"),
        (false, true) => println!("would install: {}", packages.join(" ")),
        (true, false) => println!("would install: bpf-linker {BPF_LINKER_VERSION} (cargo install)"),
        (false, false) => println!(
            "would install: {}, then bpf-linker {BPF_LINKER_VERSION} (cargo install)",
            packages.join(" ")
        ),
    }
    packages.is_empty() && linker_present
}

fn linker_cache() -> PathBuf {
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("smtpguard")
        .join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm22"))
}

/// The directory holding a usable `bpf-linker`, building it if needed.
fn bpf_linker() -> Result<PathBuf> {
    let cached = linker_cache().join("bin");
    if cached.join("bpf-linker").exists() {
        return Ok(cached);
    }
    if let Some(dir) = on_path("bpf-linker") {
        return Ok(dir);
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        if is_root() && is_debian_like() {
            apt_install(&[
                "llvm-22-dev",
                "libpolly-22-dev",
                "zlib1g-dev",
                "libzstd-dev",
            ])?;
        } else {
            bail!(
                "bpf-linker is not installed and LLVM 22 is missing.\n{}",
                manual_steps()
            );
        }
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 into {} (about 2 minutes, once)",
        linker_cache().display()
    );
    let status = Command::new(env!("CARGO"))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--root"])
        .arg(linker_cache())
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed.\n{}", manual_steps());
    }
    Ok(cached)
}

fn on_path(binary: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).find(|dir| dir.join(binary).is_file())
}

/// Where the XDP object ends up.
pub fn ebpf_object(root: &Path) -> PathBuf {
    root.join("target/bpf/bpfel-unknown-none/release/smtpguard")
}

/// Where the bench's XDP_DROP baseline object ends up (built beside the
/// production object, never embedded).
pub fn bench_object(root: &Path) -> PathBuf {
    root.join("target/bpf/bpfel-unknown-none/release/bench-drop-all")
}

/// Compiles `smtpguard-ebpf` for `bpfel-unknown-none` (the production
/// object and the bench's baseline); returns the production object's path.
pub fn build_ebpf(root: &Path, toolchain: &Toolchain) -> Result<PathBuf> {
    eprintln!("xtask: building the XDP program (smtpguard-ebpf)");
    let path = format!(
        "{}:{}",
        toolchain.linker_dir().display(),
        env::var("PATH").unwrap_or_default()
    );
    let mut cmd = match toolchain {
        Toolchain::RustupNightly { .. } => {
            let mut c = Command::new("cargo");
            c.arg("+nightly");
            c
        }
        Toolchain::Debian { .. } => {
            let mut c = Command::new("/usr/bin/cargo");
            c.env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1");
            c
        }
    };
    cmd.current_dir(root)
        .args(["build", "--release", "--package", "smtpguard-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .env("CARGO_TARGET_DIR", root.join("target/bpf"))
        .env("PATH", path)
        // The outer `cargo xtask` exports these for its own toolchain; the
        // inner build must pick its own.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS");
    let status = cmd.status().context("running cargo for the XDP program")?;
    if !status.success() {
        bail!("building the XDP program failed");
    }
    // smtpguard/build.rs refuses an object whose sources changed since.
    // It looks for the object at this very path (its fallback, with no
    // SMTPGUARD_EBPF_OBJECT) and embeds none, with a warning, when there is
    // none: make sure there is.
    let object = ebpf_object(root);
    if !object.is_file() {
        bail!(
            "the XDP program built, but {} is not there (smtpguard/build.rs embeds it from there)",
            object.display()
        );
    }
    let fingerprint =
        crate::fingerprint::fingerprint(root).context("reading the smtpguard-ebpf sources")?;
    let record = crate::fingerprint::fingerprint_path(&object);
    // Written only when it changes: smtpguard/build.rs reruns on its
    // mtime, and a rewrite of the same record would rebuild smtpguard on
    // every `cargo xtask build` or `run`.
    if std::fs::read_to_string(&record).ok().as_deref() != Some(fingerprint.as_str()) {
        std::fs::write(&record, fingerprint)
            .with_context(|| format!("writing {}", record.display()))?;
    }
    Ok(object)
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_quiet(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    Ok(())
}
