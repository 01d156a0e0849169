//! `smtpguard config check`: one test per kind of problem a start would
//! refuse (each named on one line with its file), a clean pass, a run as
//! an unprivileged user that makes no bpf() call and opens no socket, and
//! `status -c BROKEN.toml` still reaching a running daemon.

use std::{
    path::Path,
    process::{Command, Output},
};

use smtpguard::testing::{TempDir, TestDaemon, TestPki};

const BIN: &str = env!("CARGO_BIN_EXE_smtpguard");

/// A valid configuration in `dir`, with `extra` appended (whole tables).
fn config(dir: &TempDir, server_extra: &str, extra: &str) -> std::path::PathBuf {
    let d = dir.path().display();
    dir.write(
        "smtpguard.toml",
        format!(
            "[server]\nhostname = \"gw.example.com\"\nlisten = [\"127.0.0.1:2525\"]\n{server_extra}\n\
             [policy]\ndeny_list = \"{d}/deny.list\"\npermit_list = \"{d}/permit.list\"\n\
             [delivery]\nspool_dir = \"{d}/spool\"\naccept_domains = [\"example.com\"]\n\
             [control]\nsocket = \"{d}/control.sock\"\n{extra}"
        ),
    )
}

fn tls_table(certificate: &Path, key: &Path) -> String {
    format!(
        "[tls]\nmode = \"optional\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
        certificate.display(),
        key.display()
    )
}

fn check(config: &Path) -> Output {
    Command::new(BIN)
        .args(["config", "check", "-c"])
        .arg(config)
        .output()
        .unwrap()
}

/// The problem lines (stderr less the final `smtpguard: error:` line),
/// after asserting exit status 1 and nothing on stdout.
fn problems(out: &Output) -> Vec<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    let (last, problems) = lines.split_last().expect("a final error line");
    assert!(
        last.starts_with("smtpguard: error: ") && last.contains("problem(s)"),
        "{stderr}"
    );
    problems.to_vec()
}

#[test]
fn a_valid_configuration_passes_with_one_quiet_line() {
    let dir = TempDir::new("check-ok");
    let pki = TestPki::new("check CA", &["gw.example.com"]);
    dir.write("deny.list", "203.0.113.0/24\n2001:db8:bad::/48 # spam\n");
    let config = config(&dir, "", &tls_table(&pki.chain, &pki.private_key));
    let out = check(&config);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!("{}: configuration OK (deny list 2 entries, permit list 0 entries (no file yet), certificate CN=gw.example.com valid until ", config.display())),
        "{stdout}"
    );
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let dir = TempDir::new("check-key");
    let config = config(&dir, "max_conections = 5", "");
    let p = problems(&check(&config));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(&format!(
            "{} line 4, column 1: unknown field `max_conections`",
            config.display()
        )),
        "{p:?}"
    );
}

#[test]
fn a_bad_value_is_named_with_its_key() {
    let dir = TempDir::new("check-value");
    let config = config(&dir, "idle_timeout = \"5 parsecs\"", "");
    let p = problems(&check(&config));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(&format!("{}: server.idle_timeout ", config.display())),
        "{p:?}"
    );
}

/// `[dnsbl]`: a bad site is named by its index and zone; a good table passes.
#[test]
fn a_bad_dnsbl_site_is_named_with_its_key_and_zone() {
    let dir = TempDir::new("check-dnsbl");
    let config = config(
        &dir,
        "",
        "[dnsbl]\nsites = [\"zen.example*3\", \"list.example=127.0.[0..255]*-5\"]\n",
    );
    let p = problems(&check(&config));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(&format!(
            "{}: dnsbl.sites[1] (list.example) filter",
            config.display()
        )),
        "{p:?}"
    );
    let good = config_with_dnsbl(&dir);
    assert_eq!(check(&good).status.code(), Some(0));
}

fn config_with_dnsbl(dir: &TempDir) -> std::path::PathBuf {
    config(
        dir,
        "",
        "[dnsbl]\nsites = [\"zen.example*3\", { zone = \"wl.example\", filter = \"127.0.[0..255].[1..3]\", weight = -5 }]\n\
         threshold = 3\naction = \"drop\"\ntimeout = \"2s\"\nresolver = \"127.0.0.1:53\"\n",
    )
}

#[test]
fn every_bad_list_line_is_named() {
    let dir = TempDir::new("check-list");
    let config = config(&dir, "", "");
    dir.write("deny.list", "203.0.113.0/24\n010.0.0.1\n198.51.100.0/33\n");
    dir.write("permit.list", "192.0.2.1 # fine\nmx.example.com\n");
    let p = problems(&check(&config));
    let deny = dir.join("deny.list");
    let permit = dir.join("permit.list");
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(
        p[0].starts_with(&format!("{} line 2, column 1: ", deny.display())),
        "{p:?}"
    );
    assert!(
        p[1].starts_with(&format!("{} line 3, ", deny.display())),
        "{p:?}"
    );
    assert!(
        p[2].starts_with(&format!("{} line 2, column 1: ", permit.display())),
        "{p:?}"
    );
}

#[test]
fn a_bad_certificate_is_named() {
    let dir = TempDir::new("check-cert");
    let pki = TestPki::new("check CA", &["gw.example.com"]);
    let garbage = dir.write(
        "server.crt",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let config = config(&dir, "", &tls_table(&garbage, &pki.private_key));
    let p = problems(&check(&config));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains(&garbage.display().to_string()), "{p:?}");
    assert!(p[0].contains("not a valid X.509 certificate"), "{p:?}");
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_named() {
    let dir = TempDir::new("check-mismatch");
    let pki = TestPki::new("check CA", &["gw.example.com"]);
    let other = TestPki::new("other CA", &["gw.example.com"]);
    let config = config(&dir, "", &tls_table(&pki.chain, &other.private_key));
    let p = problems(&check(&config));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].contains(&other.private_key.display().to_string()),
        "{p:?}"
    );
    assert!(p[0].contains(&pki.chain.display().to_string()), "{p:?}");
}

#[test]
fn a_missing_file_is_one_problem() {
    let dir = TempDir::new("check-missing");
    let p = problems(&check(&dir.join("nowhere.toml")));
    assert_eq!(
        p,
        [format!(
            "cannot read configuration file {}: No such file or directory (os error 2)",
            dir.join("nowhere.toml").display()
        )]
    );
}

/// Run as uid 1001 (`sgtest`, else nobody) under strace when the test runs
/// as root; as the calling user otherwise. Either way it passes without
/// root, and (under strace) makes no bpf() or bind() call and opens no
/// IP socket.
#[test]
fn runs_without_root_and_without_kernel_or_network() {
    let dir = TempDir::new("check-user");
    let pki = TestPki::new("check CA", &["gw.example.com"]);
    dir.write("deny.list", "203.0.113.0/24\n");
    let config = config(&dir, "", &tls_table(&pki.chain, &pki.private_key));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let trace = dir.join("strace.out");
    let mut command = if root {
        let user = nix::unistd::User::from_name("sgtest")
            .ok()
            .flatten()
            .map_or(65534, |u| u.uid.as_raw());
        let mut c = Command::new("strace");
        c.args(["-f", "-qq", "-e", "trace=bpf,socket,bind", "-o"])
            .arg(&trace)
            .args([
                "setpriv",
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--clear-groups",
            ])
            .arg(BIN);
        c
    } else {
        Command::new(BIN)
    };
    let out = command
        .args(["config", "check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if root {
        let calls = std::fs::read_to_string(&trace).unwrap();
        let offending: Vec<&str> = calls
            .lines()
            // setpriv's user lookup may try nscd over AF_UNIX: no bind.
            .filter(|l| l.contains("bpf(") || l.contains("bind(") || l.contains("socket(AF_INET"))
            .collect();
        assert!(offending.is_empty(), "{offending:?}");
    }
}

#[test]
fn status_with_a_broken_configuration_still_reaches_the_daemon() {
    let daemon = TestDaemon::start(Path::new(BIN), &[]);
    let good = std::fs::read_to_string(daemon.config()).unwrap();
    // A misspelt key and a value of the wrong type: config check refuses
    // it, but the CLI only needs control.socket.
    let broken = daemon.dir.write(
        "broken.toml",
        good.replace(
            "[server]\n",
            "[server]\nmax_conections = 5\nidle_timeout = 300\n",
        ),
    );
    assert_eq!(check(&broken).status.code(), Some(1));
    let out = Command::new(BIN)
        .args(["status", "-c"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("control socket:"));
    // Not even TOML: the [control] table alone is read.
    let garbled = daemon.dir.write(
        "garbled.toml",
        good.replace("[server]\n", "[server\n = = =\n"),
    );
    let out = Command::new(BIN)
        .args(["status", "-c"])
        .arg(&garbled)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Without `-c`, `config check` (like `run`) reads the installed file and
/// names it, whether it is there or not.
#[test]
fn without_c_the_installed_configuration_is_checked() {
    let out = Command::new(BIN)
        .args(["config", "check"])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("/etc/smtpguard/smtpguard.toml"), "{all}");
    if !Path::new("/etc/smtpguard/smtpguard.toml").exists() {
        assert_eq!(out.status.code(), Some(1));
        assert!(
            all.starts_with("cannot read configuration file /etc/smtpguard/smtpguard.toml: "),
            "{all}"
        );
    }
}
