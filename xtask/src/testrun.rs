//! `cargo test --no-fail-fast` with its output passed through as it comes,
//! and one summary at the end: how many tests passed and failed in all,
//! and which test binaries failed.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Command, Stdio},
    thread,
};

use anyhow::{bail, Context, Result};

/// Totals over every `test result:` line, and the failing binaries.
#[derive(Default, Debug, PartialEq)]
struct Summary {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Cargo's own words for each failing binary, e.g. `-p smtpguard --test front_door`.
    failed_binaries: Vec<String>,
}

impl Summary {
    /// Reads one line of `cargo test` output (either stream).
    fn read_line(&mut self, line: &str) {
        if let Some(rest) = line.trim_start().strip_prefix("test result: ") {
            self.passed += count_before(rest, "passed");
            self.failed += count_before(rest, "failed");
            self.ignored += count_before(rest, "ignored");
        } else if let Some(rest) = line.split("to rerun pass `").nth(1) {
            // "error: test failed, to rerun pass `-p smtpguard --test front_door`"
            if let Some(binary) = rest.split('`').next() {
                self.failed_binaries.push(binary.to_owned());
            }
        }
    }
}

/// The number just before the word `label` in `"ok. 12 passed; 0 failed; ..."`.
fn count_before(text: &str, label: &str) -> u64 {
    let words: Vec<&str> = text
        .split(|c: char| c == ';' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .find(|pair| pair[1] == label)
        .and_then(|pair| pair[0].parse().ok())
        .unwrap_or(0)
}

/// Runs each `cargo test` command in turn with `--no-fail-fast`, so every
/// test binary runs even when one fails (and every command runs even when
/// an earlier one failed); `args` go to the first command only. Ends with
/// one summary over all of them naming the failing binaries. Fails when
/// any test or build step failed.
pub fn run(commands: Vec<Command>, args: &[String]) -> Result<()> {
    let mut total = Summary::default();
    let mut build_failed = false;
    for (i, cmd) in commands.into_iter().enumerate() {
        let (summary, ok) = run_one(cmd, if i == 0 { args } else { &[] })?;
        build_failed |= !ok && summary.failed_binaries.is_empty();
        total.passed += summary.passed;
        total.failed += summary.failed;
        total.ignored += summary.ignored;
        total.failed_binaries.extend(summary.failed_binaries);
    }
    if !total.failed_binaries.is_empty() {
        eprintln!(
            "xtask: {} test binaries failed: {}",
            total.failed_binaries.len(),
            total.failed_binaries.join(", ")
        );
    }
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    if build_failed {
        bail!("cargo test failed before running the tests (see its errors above)");
    }
    if !total.failed_binaries.is_empty() {
        bail!("tests failed");
    }
    Ok(())
}

/// One `cargo test`: its summary, and whether it exited successfully.
fn run_one(mut cmd: Command, args: &[String]) -> Result<(Summary, bool)> {
    // `cargo test` refuses the flag twice.
    if !args.iter().any(|a| a == "--no-fail-fast") {
        cmd.arg("--no-fail-fast");
    }
    cmd.args(with_ignored(args))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out_thread = thread::spawn(move || echo(stdout, std::io::stdout()));
    let err_summary = echo(stderr, std::io::stderr());
    let mut summary = out_thread.join().expect("stdout reader");
    let status = child.wait()?;
    summary.failed_binaries.extend(err_summary.failed_binaries);
    summary.passed += err_summary.passed;
    summary.failed += err_summary.failed;
    summary.ignored += err_summary.ignored;
    Ok((summary, status.success()))
}

/// `args` for `cargo test` with `--include-ignored` for the test binaries
/// (after the `--` that starts their arguments, added if missing).
fn with_ignored(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    if args
        .iter()
        .any(|a| a == "--include-ignored" || a == "--ignored")
    {
        return args;
    }
    match args.iter().position(|a| a == "--") {
        Some(i) => args.insert(i + 1, "--include-ignored".into()),
        None => args.extend(["--".into(), "--include-ignored".into()]),
    }
    args
}

/// Copies `from` to `to` line by line as it comes, and reads each line.
fn echo(from: impl Read, mut to: impl Write) -> Summary {
    let mut summary = Summary::default();
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        let _ = to.write_all(&line);
        let _ = to.flush();
        summary.read_line(&String::from_utf8_lossy(&line));
        line.clear();
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_tests_are_included() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(with_ignored(&[]), args(&["--", "--include-ignored"]));
        assert_eq!(
            with_ignored(&args(&["front_door"])),
            args(&["front_door", "--", "--include-ignored"])
        );
        assert_eq!(
            with_ignored(&args(&["-p", "smtpguard", "--", "--nocapture"])),
            args(&["-p", "smtpguard", "--", "--include-ignored", "--nocapture"])
        );
        assert_eq!(
            with_ignored(&args(&["--", "--ignored"])),
            args(&["--", "--ignored"])
        );
    }

    #[test]
    fn reads_results_and_failing_binaries() {
        let mut s = Summary::default();
        for line in [
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.5s",
            "error: test failed, to rerun pass `-p smtpguard --test front_door`",
            "test foo ... ok",
        ] {
            s.read_line(line);
        }
        assert_eq!(
            s,
            Summary {
                passed: 15,
                failed: 2,
                ignored: 1,
                failed_binaries: vec!["-p smtpguard --test front_door".into()],
            }
        );
    }
}
