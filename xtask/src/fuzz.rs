//! `cargo xtask fuzz`: every cargo-fuzz target in `fuzz/` under libFuzzer
//! for a fixed time, then one line per target (executions, corpus, coverage,
//! crashes); and the bounded property tests of the same checks, for
//! `cargo xtask test`.
//!
//! libFuzzer needs a nightly compiler (`-Zsanitizer=address`, sancov
//! passes): rustup's `nightly` when installed, otherwise the default
//! toolchain with `RUSTC_BOOTSTRAP=1`. `--sanitizer none` drops the
//! AddressSanitizer (faster, and works where the ASan runtime is missing);
//! the checks themselves do not depend on it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{bail, Context, Result};

/// The targets, in `fuzz/Cargo.toml` order.
pub const TARGETS: &[&str] = &[
    "session_feed",
    "smtp_command",
    "list_entry",
    "control_request",
    "upstream_reply",
];

/// How to run the fuzzers.
pub struct Options {
    /// Minutes per target.
    pub minutes: u64,
    /// Only this target.
    pub target: Option<String>,
    /// Targets fuzzed side by side.
    pub jobs: usize,
    /// `address` (default) or `none`.
    pub sanitizer: String,
}

/// What one target's run found.
#[derive(Debug, Default)]
struct Stats {
    executions: Option<u64>,
    per_second: Option<u64>,
    coverage: Option<u64>,
    features: Option<u64>,
    corpus: usize,
    crashes: Vec<PathBuf>,
    /// libFuzzer's exit status was not success.
    failed: bool,
}

/// Builds every target, fuzzes each for `minutes`, prints a summary, and
/// fails when a target crashed or could not run.
pub fn run(root: &Path, options: &Options) -> Result<()> {
    let dir = root.join("fuzz");
    let targets: Vec<&str> = match &options.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!(
            "no fuzz target {t:?}; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    let toolchain = toolchain()?;
    eprintln!(
        "xtask: building the fuzz targets ({toolchain}, sanitizer {})",
        options.sanitizer
    );
    let status = cargo_fuzz(&dir, &toolchain)
        .args(["build", "--sanitizer", &options.sanitizer])
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!(
            "building the fuzz targets failed (see above); `--sanitizer none` avoids the \
             AddressSanitizer runtime if that is what is missing"
        );
    }
    let logs = dir.join("target").join("xtask-fuzz");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut results = Vec::new();
    let toolchain = toolchain.as_str();
    for batch in targets.chunks(options.jobs.max(1)) {
        let stats: Vec<Result<Stats>> = thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&target| {
                    let log = logs.join(format!("{target}.log"));
                    eprintln!(
                        "xtask: fuzzing {target} for {} min (log: {})",
                        options.minutes,
                        log.display()
                    );
                    let dir = &dir;
                    scope.spawn(move || fuzz_one(dir, toolchain, options, target, &log))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("fuzz thread"))
                .collect()
        });
        for (&target, stats) in batch.iter().zip(stats) {
            results.push((target, stats?));
        }
    }
    print_summary(&dir, &results);
    let bad: Vec<&str> = results
        .iter()
        .filter(|(_, s)| s.failed || !s.crashes.is_empty())
        .map(|(t, _)| *t)
        .collect();
    if !bad.is_empty() {
        bail!(
            "fuzzing found crashes in {} (reproduce: `cargo {toolchain_arg}fuzz run TARGET ARTIFACT` in fuzz/)",
            bad.join(", "),
            toolchain_arg = if toolchain == "nightly" { "+nightly " } else { "" },
        );
    }
    Ok(())
}

/// Runs the bounded property tests (`fuzz/tests/bounded.rs`): the fuzz
/// targets' checks on a fixed number of generated inputs, on stable.
pub fn bounded_tests(root: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    // The main target directory and the same embedded object as the main
    // tests (`cargo xtask test` built it): the smtpguard build is shared.
    cmd.current_dir(root)
        .args(["test", "--manifest-path", "fuzz/Cargo.toml"])
        .args(["--target-dir", "target"]);
    cmd
}

/// `nightly` when rustup has it, else the default toolchain with
/// `RUSTC_BOOTSTRAP=1` (`bootstrap`); fails when cargo-fuzz is missing.
fn toolchain() -> Result<String> {
    let fuzz = Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !fuzz.is_ok_and(|s| s.success()) {
        bail!(
            "cargo-fuzz is not installed: run `cargo install cargo-fuzz` (crates.io), then again"
        );
    }
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    Ok(if nightly { "nightly" } else { "bootstrap" }.to_string())
}

fn cargo_fuzz(dir: &Path, toolchain: &str) -> Command {
    let mut cmd = if toolchain == "nightly" {
        let mut c = Command::new("rustup");
        c.args(["run", "nightly", "cargo", "fuzz"]);
        c
    } else {
        let mut c = Command::new("cargo");
        c.arg("fuzz").env("RUSTC_BOOTSTRAP", "1");
        c
    };
    // xtask runs under `cargo run`, whose variables (the stable tools,
    // xtask's own CARGO_PKG_* and LD_LIBRARY_PATH) would pin the toolchain
    // and make this build differ from one started in a shell, so that each
    // rebuilds the other's dependencies (seen: ring, rustls).
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if (name.starts_with("CARGO") && name != "CARGO_HOME")
            || name.starts_with("RUSTUP_TOOLCHAIN")
            || [
                "RUSTC",
                "RUSTDOC",
                "LD_LIBRARY_PATH",
                "RUST_RECURSION_COUNT",
            ]
            .contains(&&*name)
        {
            cmd.env_remove(&var);
        }
    }
    cmd.current_dir(dir);
    cmd
}

fn fuzz_one(
    dir: &Path,
    toolchain: &str,
    options: &Options,
    target: &str,
    log: &Path,
) -> Result<Stats> {
    // cargo-fuzz's own places for them.
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    for d in [&corpus, &artifacts] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let before: Vec<PathBuf> = artifact_files(&artifacts);
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = cargo_fuzz(dir, toolchain);
    cmd.args(["run", "--sanitizer", &options.sanitizer, target]);
    // libFuzzer adds what it finds to the first directory; committed seeds
    // (fuzz/seeds/<target>) are read only.
    let seeds = dir.join("seeds").join(target);
    if seeds.is_dir() {
        cmd.arg(&corpus).arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={}", options.minutes * 60))
        .arg("-print_final_stats=1")
        .arg("-timeout=10");
    let dict = dir.join("dict").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    let status = cmd
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut stats = read_stats(&text);
    stats.corpus = fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
    stats.crashes = artifact_files(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    stats.failed = !status.success();
    Ok(stats)
}

fn artifact_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// libFuzzer's final stats (`stat::number_of_executed_units: N`, ...) and
/// its last status line (`#N DONE cov: C ft: F corp: ...`).
fn read_stats(log: &str) -> Stats {
    let mut stats = Stats::default();
    for line in log.lines() {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.executions = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            stats.per_second = v.trim().parse().ok();
        } else if line.starts_with('#') && line.contains(" cov: ") {
            stats.coverage = number_after(line, "cov:").or(stats.coverage);
            stats.features = number_after(line, "ft:").or(stats.features);
        }
    }
    stats
}

fn number_after(line: &str, label: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == label)?;
    words.next()?.parse().ok()
}

fn print_summary(dir: &Path, results: &[(&str, Stats)]) {
    let show = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    println!(
        "xtask: {:<16} {:>12} {:>8} {:>7} {:>6} {:>7}  crashes",
        "target", "executions", "exec/s", "corpus", "cov", "ft"
    );
    for (target, s) in results {
        let crashes = if s.crashes.is_empty() {
            if s.failed {
                "fuzzer failed (see its log)".to_string()
            } else {
                "0".to_string()
            }
        } else {
            s.crashes
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "xtask: {:<16} {:>12} {:>8} {:>7} {:>6} {:>7}  {crashes}",
            target,
            show(s.executions),
            show(s.per_second),
            s.corpus,
            show(s.coverage),
            show(s.features),
        );
    }
    println!(
        "xtask: corpus in {}, crashes saved in {}, logs in {}",
        dir.join("corpus").display(),
        dir.join("artifacts").display(),
        dir.join("target/xtask-fuzz").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_stats() {
        let log = "#1024\tpulse  cov: 10 ft: 12 corp: 3/9b exec/s: 512 rss: 40Mb\n\
                   #99999\tDONE   cov: 321 ft: 654 corp: 45/1234b lim: 4096 exec/s: 1666 rss: 61Mb\n\
                   stat::number_of_executed_units: 99999\n\
                   stat::average_exec_per_sec:     1666\n\
                   stat::new_units_added:          44\n";
        let s = read_stats(log);
        assert_eq!(s.executions, Some(99999));
        assert_eq!(s.per_second, Some(1666));
        assert_eq!(s.coverage, Some(321));
        assert_eq!(s.features, Some(654));
    }
}
