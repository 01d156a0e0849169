//! contrib/fail2ban: Debian's `fail2ban-regex` runs the shipped filter
//! over the log a real daemon wrote for known traffic, and matches exactly
//! the failures in it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use smtpguard::testing::{
    client::{assert_code, connect_from, reply, rest, say},
    TestDaemon,
};
use smtpguard_tests::run_bounded;

fn binary() -> PathBuf {
    std::env::var_os("SMTPGUARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/smtpguard"))
}

fn filter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/fail2ban/filter.d/smtpguard.conf")
}

/// A session that delivers nothing and draws an error: a relay probe.
fn relay_probe(src: &str, daemon: &TestDaemon) {
    let mut s = connect_from(src, daemon.smtp);
    assert_code(&reply(&mut s), "220");
    assert_code(&say(&mut s, "EHLO probe.example.net"), "250");
    assert_code(&say(&mut s, "MAIL FROM:<spam@example.org>"), "250");
    assert_code(&say(&mut s, "RCPT TO:<victim@example.net>"), "550");
    assert_code(&say(&mut s, "QUIT"), "221");
}

#[test]
fn the_shipped_filter_matches_the_failures_the_daemon_logged() {
    let mut daemon = TestDaemon::start(
        &binary(),
        &[("server", "max_errors = 3\nmax_connections_per_client = 1\n")],
    );
    // 3 failures: relay probes.
    for _ in 0..3 {
        relay_probe("127.0.0.31", &daemon);
    }
    // 1 failure: closed after too many errors.
    let mut s = connect_from("127.0.0.32", daemon.smtp);
    assert_code(&reply(&mut s), "220");
    for _ in 0..3 {
        assert_code(&say(&mut s, "BOGUS"), "500");
    }
    let last = rest(&mut s);
    assert!(last.starts_with("421 4.7.0 "), "{last:?}");
    // 1 failure: HTTP on the SMTP port.
    let mut s = connect_from("127.0.0.33", daemon.smtp);
    assert_code(&reply(&mut s), "220");
    assert_code(&say(&mut s, "GET / HTTP/1.1"), "421");
    // Not a failure: a message delivered.
    let mut s = connect_from("127.0.0.34", daemon.smtp);
    assert_code(&reply(&mut s), "220");
    assert_code(&say(&mut s, "EHLO mx.example.org"), "250");
    assert_code(&say(&mut s, "MAIL FROM:<a@example.org>"), "250");
    assert_code(&say(&mut s, "RCPT TO:<x@example.com>"), "250");
    assert_code(&say(&mut s, "DATA"), "354");
    assert_code(&say(&mut s, "Subject: t\r\n\r\nhi\r\n."), "250");
    assert_code(&say(&mut s, "QUIT"), "221");
    // 1 failure: a second connection over the per-client cap; the first,
    // a clean session, is not one.
    let mut first = connect_from("127.0.0.35", daemon.smtp);
    assert_code(&reply(&mut first), "220");
    let mut second = connect_from("127.0.0.35", daemon.smtp);
    assert_code(&reply(&mut second), "421");
    assert_code(&say(&mut first, "QUIT"), "221");
    daemon.stop();

    let log = daemon.log();
    let written = daemon.dir.write("smtpguard.log", &log);
    let mut cmd = Command::new("fail2ban-regex");
    cmd.arg(&written)
        .arg(filter())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_bounded(cmd, Duration::from_secs(60)).expect("fail2ban-regex");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = stdout
        .lines()
        .find(|l| l.starts_with("Lines: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(lines.contains(" 6 matched,"), "{lines}\n{stdout}\n{log}");
    // Per host, with the addresses the filter took: the relay prober three
    // times, the others once.
    let mut cmd = Command::new("fail2ban-regex");
    cmd.args(["--print-all-matched", "--print-no-missed"])
        .arg(&written)
        .arg(filter())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_bounded(cmd, Duration::from_secs(60)).expect("fail2ban-regex");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let matched: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("session end client=") || l.contains("connection refused client="))
        .collect();
    let count = |ip: &str| {
        matched
            .iter()
            .filter(|l| l.contains(&format!("client={ip} ")))
            .count()
    };
    assert_eq!(
        [".31", ".32", ".33", ".34", ".35"].map(|h| count(&format!("127.0.0{h}"))),
        [3, 1, 1, 0, 1],
        "{stdout}"
    );
}
