//! Screening before the greeting (#16) on the real binary, on loopback:
//! the greet wait with its `220-` line, PREGREET per `greet_action`
//! (ignore, enforce; drop and the bans are in the privileged netns test
//! `daemon_cli`), the `max_waiting` cap, permitted clients skipping the
//! wait, and the pass cache across a restart. Loopback is a protected
//! range: the violations here are logged as exempt, never banned.

use std::io::Write;
use std::time::{Duration, Instant};

use smtpguard::testing::client::{assert_code, connect_from, reply, say};
use smtpguard::testing::TestDaemon;

const BIN: &str = env!("CARGO_BIN_EXE_smtpguard");
const HOST: &str = "gw.example.com";

fn start(screening: &str) -> TestDaemon {
    TestDaemon::start(std::path::Path::new(BIN), &[("screening", screening)])
}

/// Waits (at most 10 s) until the log has a line containing `needle`.
fn wait_for_log(daemon: &TestDaemon, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.log();
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stats(daemon: &TestDaemon) -> serde_json::Value {
    let out = daemon.cli(&["--json", "stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn ignore_logs_an_early_talker_and_serves_it() {
    let daemon = start("greet_wait = \"1s\"\ngreet_action = \"ignore\"\n");
    let mut s = connect_from("127.0.0.21", daemon.smtp);
    s.write_all(b"EHLO early.example\r\n").unwrap();
    let greeting = reply(&mut s);
    assert_eq!(
        greeting,
        format!("220-{HOST} ESMTP\r\n220 {HOST} ESMTP smtpguard\r\n"),
        "the banner line, then the session's greeting ends the reply"
    );
    // The early EHLO was kept for the session.
    assert_code(&reply(&mut s), "250");
    assert_code(&say(&mut s, "QUIT"), "221");
    let line = wait_for_log(&daemon, "PREGREET 20 after ");
    assert!(
        line.contains("from [127.0.0.21]:") && line.ends_with(": EHLO early.example\\r\\n"),
        "{line}"
    );
    wait_for_log(&daemon, "never banned");
    let s = stats(&daemon);
    assert_eq!(s["front_door"]["screening_pregreet"], 1, "{s}");
    assert_eq!(s["front_door"]["violations_pregreet"], 1, "{s}");
    assert_eq!(s["front_door"]["violations_exempt"], 1, "{s}");
    assert_eq!(s["front_door"]["bans_added"], 0, "{s}");
}

#[test]
fn enforce_answers_554_to_every_command_and_logs_the_envelope() {
    let daemon = start("greet_wait = \"1s\"\ngreet_action = \"enforce\"\ngreet_banner = \"\"\n");
    let mut s = connect_from("127.0.0.22", daemon.smtp);
    s.write_all(b"EHLO early.example\r\n").unwrap();
    assert_eq!(reply(&mut s), format!("220 {HOST} ESMTP smtpguard\r\n"));
    assert_eq!(reply(&mut s), "554 5.5.1 Protocol error\r\n", "the EHLO");
    assert_eq!(
        say(&mut s, "MAIL FROM:<a@example.net> SIZE=10"),
        "554 5.5.1 Protocol error\r\n"
    );
    assert_eq!(
        say(&mut s, "RCPT TO:<b@example.com>"),
        "554 5.5.1 Protocol error\r\n"
    );
    assert_eq!(say(&mut s, "QUIT"), "221 2.0.0 Bye\r\n");
    let line = wait_for_log(&daemon, "NOQUEUE: reject: RCPT from [127.0.0.22]:");
    assert!(
        line.ends_with("554 5.5.1 Protocol error; from=<a@example.net>, to=<b@example.com>"),
        "{line}"
    );
    wait_for_log(&daemon, "result=quit");
    let s = stats(&daemon);
    assert_eq!(s["front_door"]["screening_pregreet_enforced"], 1, "{s}");
    assert_eq!(s["front_door"]["messages_accepted"], 0, "{s}");
}

#[test]
fn over_max_waiting_a_client_gets_421_and_permitted_clients_skip_the_wait() {
    let daemon = start("greet_wait = \"3s\"\nmax_waiting = 1\n");
    let mut first = connect_from("127.0.0.23", daemon.smtp);
    // Its 220- line says it is waiting.
    let mut line = [0u8; 64];
    let n = std::io::Read::read(&mut first, &mut line).unwrap();
    assert!(line[..n].starts_with(b"220-"), "{:?}", &line[..n]);
    let mut second = connect_from("127.0.0.24", daemon.smtp);
    assert_eq!(
        reply(&mut second),
        format!("421 4.3.2 {HOST} All screening slots are busy, try again later\r\n")
    );
    // A permit entry skips the wait (and needs no place in it).
    let out = daemon.cli(&["permit", "add", "127.0.0.25"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut permitted = connect_from("127.0.0.25", daemon.smtp);
    assert_eq!(
        reply(&mut permitted),
        format!("220 {HOST} ESMTP smtpguard\r\n")
    );
    assert_code(&reply(&mut first), "220 ");
    let s = stats(&daemon);
    assert_eq!(s["front_door"]["screening_refused_waiting_cap"], 1, "{s}");
    assert_eq!(s["front_door"]["screening_skipped_permitted"], 1, "{s}");
}

#[test]
fn the_pass_cache_survives_a_restart_and_its_clients_skip_the_wait() {
    let mut daemon = start("greet_wait = \"1s\"\npass_cache_ttl = \"1h\"\n");
    let mut s = connect_from("127.0.0.26", daemon.smtp);
    assert_eq!(
        reply(&mut s),
        format!("220-{HOST} ESMTP\r\n220 {HOST} ESMTP smtpguard\r\n")
    );
    assert_code(&say(&mut s, "QUIT"), "221");
    wait_for_log(&daemon, "PASS NEW [127.0.0.26]:");
    daemon.restart();
    let file = std::fs::read_to_string(daemon.dir.join("pass-cache.txt")).unwrap();
    assert!(file.contains("\n127.0.0.26 "), "{file}");
    let mut s = connect_from("127.0.0.26", daemon.smtp);
    assert_eq!(
        reply(&mut s),
        format!("220 {HOST} ESMTP smtpguard\r\n"),
        "no wait, no 220- line"
    );
    assert_code(&say(&mut s, "QUIT"), "221");
    wait_for_log(&daemon, "PASS OLD [127.0.0.26]:");
    let s = stats(&daemon);
    assert_eq!(s["front_door"]["screening_pass_old"], 1, "{s}");
    assert_eq!(s["gauges"]["pass_cache_entries"], 1, "{s}");
    // `config check` reads it, and names a bad line without refusing.
    std::fs::write(daemon.dir.join("pass-cache.txt"), "127.0.0.26 soon\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", "-c"])
        .arg(daemon.config())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("pass-cache.txt line 1: \"soon\" is not a Unix time in seconds"),
        "{stderr}"
    );
}

#[test]
fn the_error_cap_and_relay_attempts_are_reported_as_violations() {
    let daemon = TestDaemon::start(std::path::Path::new(BIN), &[("server", "max_errors = 2\n")]);
    let mut s = connect_from("127.0.0.27", daemon.smtp);
    assert_code(&reply(&mut s), "220 ");
    assert_code(&say(&mut s, "HELO c.example"), "250");
    assert_code(&say(&mut s, "MAIL FROM:<a@example.net>"), "250");
    assert_code(&say(&mut s, "RCPT TO:<x@elsewhere.example>"), "550 5.7.1");
    assert_code(&say(&mut s, "QUIT"), "221");
    let mut s = connect_from("127.0.0.28", daemon.smtp);
    assert_code(&reply(&mut s), "220 ");
    assert_code(&say(&mut s, "BOGUS"), "500");
    assert_code(&say(&mut s, "BOGUS"), "500");
    wait_for_log(&daemon, "result=too_many_errors");
    wait_for_log(&daemon, "violation=protocol_errors");
    let s = stats(&daemon);
    assert_eq!(s["front_door"]["violations_relay_attempt"], 1, "{s}");
    assert_eq!(s["front_door"]["violations_protocol_errors"], 1, "{s}");
    assert_eq!(s["front_door"]["violations_exempt"], 2, "loopback: {s}");
}
