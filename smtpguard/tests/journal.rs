//! Under systemd, stderr is the journal: the daemon sees `JOURNAL_STREAM`
//! naming its stderr and writes each line with the syslog priority prefix
//! and without a timestamp of its own (journald adds both). Checked on the
//! real binary's output, with a file standing in for the journal stream.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smtpguard::testing::{free_port, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_smtpguard");

#[test]
fn journal_lines_carry_priorities_and_no_timestamps() {
    let dir = TempDir::new("journal");
    let d = dir.path().display();
    let config = dir.write(
        "smtpguard.toml",
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [policy]\ndeny_list = \"{d}/deny.list\"\npermit_list = \"{d}/permit.list\"\n\
             [delivery]\nspool_dir = \"{d}/spool\"\n\
             [control]\nsocket = \"{d}/control.sock\"\n\
             [screening]\ngreet_wait = \"0s\"\n",
            port = free_port()
        ),
    );
    let log_path = dir.join("journal");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while Instant::now() < deadline && !text.contains("control socket ready") {
        std::thread::sleep(Duration::from_millis(50));
        text = std::fs::read_to_string(&log_path).unwrap();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("control socket ready"), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for line in lines {
        let rest = line
            .strip_prefix("<6>")
            .or_else(|| line.strip_prefix("<4>"))
            .or_else(|| line.strip_prefix("<3>"))
            .unwrap_or_else(|| panic!("no priority prefix: {line:?}"));
        // No timestamp of our own, such as 2026-12-02T01:02:03.456Z.
        assert!(
            !rest.trim_start().starts_with("20"),
            "a timestamp under journald: {line:?}"
        );
    }
}
