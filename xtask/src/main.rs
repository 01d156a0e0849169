//! Project automation: `cargo xtask <command>`.
//!
//! - `provision [--peers] [--check]`: make sure the eBPF toolchain (and,
//!   with `--peers`, the test peers) are installed; idempotent, prints what
//!   it installs. `--check` only reports what is present, missing and would
//!   be installed.
//! - `build`: the XDP object, then the userspace binary that embeds it.
//! - `run [-- ARGS]`: build, then `smtpguard run ARGS` in the foreground.
//! - `test`: install and probe the test peers, build, then every test
//!   binary (unit, BPF_PROG_TEST_RUN, netns), even after one fails.
//! - `bench [--quick]`: measured figures beside their baselines.
//! - `deb`: the Debian package (`target/debian/smtpguard_*.deb`): the
//!   binary, the hardened unit, the config, man pages and completions.
//! - `fuzz --minutes N [--target NAME]`: every cargo-fuzz target in `fuzz/`
//!   for N minutes each; crashes land in `fuzz/artifacts/`.

mod bench;
mod deb;
#[path = "../../smtpguard-ebpf/fingerprint.rs"]
mod fingerprint;
mod fuzz;
mod peers;
mod provision;
mod testrun;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "smtpguard project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain (and test peers) if missing.
    Provision {
        /// Also install the programs the tests and bench talk to (postfix, swaks, ...).
        #[arg(long)]
        peers: bool,
        /// Install nothing: print what is present, what is missing (toolchain,
        /// test peers, the capabilities the tests probe) and what would be installed.
        #[arg(long)]
        check: bool,
    },
    /// Build the XDP object and the smtpguard binary that embeds it.
    Build {
        /// Build the userspace binary in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `smtpguard run` in the foreground (Ctrl-C stops it),
    /// with the development configuration smtpguard/src/default-config.toml
    /// unless the arguments name another.
    Run {
        /// Build the userspace binary in release mode.
        #[arg(long)]
        release: bool,
        /// Arguments for `smtpguard run`, after `--` (e.g. `-- --config smtpguard.toml`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then run every test. Needs root: the kernel tests are never skipped.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure smtpguard beside its baselines; writes bench/RESULTS.md.
    Bench {
        /// A quick look (under 2 minutes) instead of the full run.
        #[arg(long)]
        quick: bool,
    },
    /// Build the Debian package (installs cargo-deb once).
    Deb,
    /// Run every fuzz target in fuzz/ under libFuzzer (needs cargo-fuzz).
    Fuzz {
        /// Minutes per target.
        #[arg(long, default_value_t = 1)]
        minutes: u64,
        /// Only this target (session_feed, smtp_command, list_entry,
        /// control_request, upstream_reply).
        #[arg(long)]
        target: Option<String>,
        /// Targets fuzzed side by side (each takes one core).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// libFuzzer's sanitizer: `address`, or `none` where ASan is missing.
        #[arg(long, default_value = "address")]
        sanitizer: String,
    },
}

fn main() -> ExitCode {
    forget_package_env();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // One line, like every other xtask error; `--help` has the rest.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("xtask: {first} (see `cargo xtask --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    let root = workspace_root();
    match cmd {
        Cmd::Provision { check: true, .. } => {
            let toolchain = provision::toolchain_report();
            let packager = deb::cargo_deb_present();
            match packager {
                true => println!("present: cargo-deb (cargo xtask deb, cargo xtask test)"),
                false => println!("would install: cargo-deb (cargo install, on first use)"),
            }
            let peers = peers::report();
            if !(toolchain && peers && packager) {
                bail!(
                    "something is missing (see above); `cargo xtask provision --peers` installs it"
                );
            }
            Ok(())
        }
        Cmd::Provision {
            peers,
            check: false,
        } => {
            provision::toolchain()?;
            if peers {
                peers::ensure()?;
            }
            Ok(())
        }
        Cmd::Build { release } => {
            build(&root, release)?;
            Ok(())
        }
        Cmd::Run { release, args } => {
            // Cheap checks first: no point building for a path that isn't there.
            if let Some(config) = config_arg(&args) {
                std::fs::metadata(&config)
                    .with_context(|| format!("cannot read config file {}", config.display()))?;
            }
            require_root("`smtpguard run` attaches an XDP program")?;
            let binary = build(&root, release)?;
            // Without --config the daemon reads /etc/smtpguard/smtpguard.toml;
            // the development configuration is for this command only.
            let mut args = args;
            if config_arg(&args).is_none() {
                let dev = root.join("smtpguard/src/default-config.toml");
                args.splice(0..0, ["--config".to_owned(), dev.display().to_string()]);
            }
            eprintln!("xtask: running {} run {}", binary.display(), args.join(" "));
            // Become the daemon: Ctrl-C then reaches it alone, and it
            // detaches XDP before the shell prompt comes back.
            use std::os::unix::process::CommandExt;
            let error = Command::new(&binary).arg("run").args(&args).exec();
            Err(error).with_context(|| format!("starting {}", binary.display()))
        }
        Cmd::Test { args } => {
            require_root("the kernel tests load XDP programs and create network namespaces")?;
            // Every peer installed and probed before anything is built.
            peers::ensure()?;
            // The package test installs the very .deb CI builds.
            let package = deb::build(&root)?;
            let binary = build(&root, false)?;
            eprintln!(
                "xtask: running cargo test --workspace --no-fail-fast (all but the BPF-only crate)"
            );
            let mut cmd = Command::new(env!("CARGO"));
            cmd.current_dir(&root)
                .args(["test", "--workspace", "--exclude", "smtpguard-ebpf"])
                .env("SMTPGUARD_BIN", &binary)
                .env("SMTPGUARD_DEB", &package)
                .env("SMTPGUARD_SHARED_DATA", root.join("../shared/data"));
            // Then the fuzz targets' checks as bounded property tests, even
            // when a test failed; one summary over both.
            testrun::run(vec![cmd, fuzz::bounded_tests(&root)], &args)
        }
        Cmd::Bench { quick } => {
            require_root("the bench loads XDP programs and creates network namespaces")?;
            peers::ensure()?;
            let binary = build(&root, true)?;
            bench::run(&root, &binary, quick)
        }
        Cmd::Deb => deb::build(&root).map(|_| ()),
        Cmd::Fuzz {
            minutes,
            target,
            jobs,
            sanitizer,
        } => fuzz::run(
            &root,
            &fuzz::Options {
                minutes,
                target,
                jobs,
                sanitizer,
            },
        ),
    }
}

/// The `--config PATH` given to `run`, to check it before starting.
fn config_arg(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" || a == "-c" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// Builds the XDP object, then the userspace binary embedding it; returns
/// the binary's path.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let toolchain = provision::toolchain()?;
    // protoc, for the etcd client: without it a fresh machine's build fails.
    peers::ensure_build()?;
    // smtpguard/build.rs finds the object where this puts it
    // (`provision::ebpf_object`); naming it in SMTPGUARD_EBPF_OBJECT would
    // rebuild smtpguard at every switch between xtask and a plain cargo.
    provision::build_ebpf(root, &toolchain)?;
    eprintln!(
        "xtask: building smtpguard ({})",
        if release { "release" } else { "debug" }
    );
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root)
        .args(["build", "--package", "smtpguard", "--bin", "smtpguard"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status()?;
    if !status.success() {
        bail!("building smtpguard failed");
    }
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("smtpguard"))
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY-free: reading /proc avoids a libc dependency.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        bail!("this needs root: {why}; run it as root (e.g. `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

/// Drops the variables cargo sets for the package it runs (this one):
/// passed on to the inner cargo commands they reach build scripts that
/// track them (ring's tracks `CARGO_MANIFEST_DIR`), and every switch
/// between `cargo xtask` and a plain `cargo build` rebuilt half the tree.
fn forget_package_env() {
    let per_package = |name: &str| {
        name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
    };
    let names: Vec<_> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| per_package(name))
        .collect();
    for name in names {
        // Single-threaded still: nothing else reads the environment.
        std::env::remove_var(name);
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
