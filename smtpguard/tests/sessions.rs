//! `smtpguard sessions` and `kick` against the real daemon, with plaintext
//! and TLS sessions in different states, and the session summary line the
//! daemon writes (text and strict JSON logs). Clients come from distinct
//! loopback addresses (127.0.0.11 ...) so prefixes can pick them.

use std::{net::TcpStream, path::Path, sync::Arc, time::Duration};

use serde_json::Value;
use smtpguard::testing::{
    client::{assert_code, connect_from, reply, rest, say, READ_LIMIT},
    TestDaemon, TestPki,
};
use tokio_rustls::rustls::{self, pki_types::ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_smtpguard");

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// EHLO, STARTTLS, handshake, EHLO again.
fn starttls(mut s: TcpStream, pki: &TestPki, helo: &str) -> Tls {
    assert_code(&say(&mut s, &format!("EHLO {helo}")), "250");
    assert_code(&say(&mut s, "STARTTLS"), "220");
    let conn = rustls::ClientConnection::new(
        Arc::new(pki.ca.client_config()),
        ServerName::try_from("gw.example.com").unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    assert_code(&say(&mut tls, &format!("EHLO {helo}")), "250");
    tls
}

fn start(pki: &TestPki, logging: &str) -> TestDaemon {
    let tls = format!(
        "mode = \"optional\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
        pki.chain.display(),
        pki.private_key.display()
    );
    let mut tables = vec![("tls", tls.as_str())];
    if !logging.is_empty() {
        tables.push(("logging", logging));
    }
    TestDaemon::start(Path::new(BIN), &tables)
}

fn json(daemon: &TestDaemon, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = daemon.cli(&full);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The sessions by client address, once `ready` holds for them (the
/// driver records a state just after it sent the reply the client read).
fn sessions_when(daemon: &TestDaemon, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + READ_LIMIT;
    loop {
        let v = json(daemon, &["sessions"]);
        let list = v["sessions"].as_array().unwrap().clone();
        if ready(&list) {
            return list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions never got there: {list:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn by_client<'a>(list: &'a [Value], client: &str) -> &'a Value {
    list.iter()
        .find(|s| s["client"] == client)
        .unwrap_or_else(|| panic!("no session from {client}: {list:#?}"))
}

#[test]
fn sessions_in_every_state_and_kicks_by_id_address_and_prefix() {
    let pki = TestPki::new("sessions CA", &["gw.example.com"]);
    let daemon = start(&pki, "");
    let to = daemon.smtp;

    // .11 greeted only; .12 after EHLO; .13 in DATA; .14 TLS after
    // STARTTLS; .15 sent STARTTLS and never shakes hands.
    let mut greeted = connect_from("127.0.0.11", to);
    assert_code(&reply(&mut greeted), "220");
    let mut ehlo = connect_from("127.0.0.12", to);
    assert_code(&reply(&mut ehlo), "220");
    assert_code(&say(&mut ehlo, "EHLO b.example.net"), "250");
    let mut data = connect_from("127.0.0.13", to);
    assert_code(&reply(&mut data), "220");
    assert_code(&say(&mut data, "EHLO c.example.net"), "250");
    assert_code(&say(&mut data, "MAIL FROM:<a@example.org>"), "250");
    assert_code(&say(&mut data, "RCPT TO:<x@example.com>"), "250");
    assert_code(&say(&mut data, "DATA"), "354");
    let mut tls_plain = connect_from("127.0.0.14", to);
    assert_code(&reply(&mut tls_plain), "220");
    let mut tls = starttls(tls_plain, &pki, "d.example.net");
    let mut handshaking = connect_from("127.0.0.15", to);
    assert_code(&reply(&mut handshaking), "220");
    assert_code(&say(&mut handshaking, "EHLO e.example.net"), "250");
    assert_code(&say(&mut handshaking, "STARTTLS"), "220");

    let states = [
        ("127.0.0.11", "greeting"),
        ("127.0.0.12", "command"),
        ("127.0.0.13", "data"),
        ("127.0.0.14", "command"),
        ("127.0.0.15", "tls_handshake"),
    ];
    let list = sessions_when(&daemon, |list| {
        states.iter().all(|(client, state)| {
            list.iter()
                .any(|s| s["client"] == *client && s["state"] == *state)
        })
    });
    assert_eq!(list.len(), 5, "{list:#?}");
    let s = by_client(&list, "127.0.0.14");
    assert_eq!(s["tls_version"], "TLSv1.3");
    assert!(
        s["tls_cipher"].as_str().unwrap().starts_with("TLS13_"),
        "{s}"
    );
    assert_eq!(s["helo"], "d.example.net");
    assert_eq!(s["local"], to.to_string());
    assert!(s["port"].as_u64().unwrap() > 0);
    let s = by_client(&list, "127.0.0.13");
    assert_eq!(s["helo"], "c.example.net");
    assert_eq!(s["tls_version"], Value::Null);
    // EHLO, MAIL, RCPT, DATA with their CRLFs.
    let sent =
        "EHLO c.example.net\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n";
    assert_eq!(s["bytes_in"], sent.len() as u64);
    assert!(s["bytes_out"].as_u64().unwrap() > 0);
    assert_eq!(s["upstream"], Value::Null, "spool mode has no upstream");
    assert_eq!(by_client(&list, "127.0.0.11")["helo"], Value::Null);
    // The human view has a header and one line per session.
    let text = daemon.cli(&["sessions"]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(text.lines().next().unwrap().starts_with("ID  "), "{text}");

    // By id: the TLS session reads the 421 over TLS.
    let id = by_client(&list, "127.0.0.14")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let kicked = json(&daemon, &["kick", &id]);
    assert_eq!(kicked["sessions"].as_array().unwrap().len(), 1, "{kicked}");
    let got = rest(&mut tls);
    assert!(
        got.starts_with("421 4.7.0 gw.example.com Closing: session ended by the operator\r\n"),
        "{got:?}"
    );
    // By prefix: the EHLO'd one and the one in DATA.
    let kicked = json(&daemon, &["kick", "127.0.0.12/31"]);
    let ids: Vec<&str> = kicked["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["client"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["127.0.0.12", "127.0.0.13"], "{kicked}");
    for s in [&mut ehlo, &mut data] {
        let got = rest(s);
        assert!(got.starts_with("421 4.7.0 "), "{got:?}");
    }
    // By address, mid-handshake: nothing can be said in plaintext then,
    // so the connection just closes.
    let out = daemon.cli(&["kick", "127.0.0.15"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("kicked 1 session(s) with 421 4.7.0: "),
        "{out:?}"
    );
    assert_eq!(rest(&mut handshaking), "");
    // Only the greeted one is left; a kick of an id that is not open fails.
    let list = sessions_when(&daemon, |l| l.len() == 1);
    assert_eq!(list[0]["client"], "127.0.0.11");
    let out = daemon.cli(&["kick", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("no open session has id {id}")),
        "{out:?}"
    );
    assert_code(&say(&mut greeted, "QUIT"), "221");

    // The log names each kick with the caller's uid and pid and the prefix.
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let log = daemon.log();
    let kicks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session kicked by the operator"))
        .collect();
    assert_eq!(kicks.len(), 4, "{log}");
    for line in &kicks {
        assert!(line.contains(&format!("control{{uid={uid} pid=")), "{line}");
    }
    assert!(
        kicks[1].contains("client=127.0.0.12 prefix=127.0.0.12/31"),
        "{kicks:?}"
    );
    assert!(
        kicks[3].contains("client=127.0.0.15 prefix=127.0.0.15/32"),
        "{kicks:?}"
    );
    // A kicked session ends as `kicked`; the kick's 421 is no error of the
    // client's (fail2ban counts errors).
    let fields = summary_fields(&log, "127.0.0.12");
    assert!(
        fields.contains(&("result".into(), "kicked".into())),
        "{fields:?}"
    );
    assert!(
        fields.contains(&("errors".into(), "0".into())),
        "{fields:?}"
    );
}

/// The fields of the `session end` line for `client`, as key=value pairs.
fn summary_fields(log: &str, client: &str) -> Vec<(String, String)> {
    let needle = format!("session end client={client} ");
    let line = log
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no summary for {client}:\n{log}"));
    let tail = &line[line.find("session end ").unwrap() + "session end ".len()..];
    tail.split(' ')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("{kv} in {line}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Sends one message with two recipients over STARTTLS, and one plaintext
/// session with errors that ends in a QUIT.
fn traffic(daemon: &TestDaemon, pki: &TestPki) {
    let mut plain = connect_from("127.0.0.21", daemon.smtp);
    assert_code(&reply(&mut plain), "220");
    let mut tls = starttls(plain, pki, "mx.example.org");
    assert_code(&say(&mut tls, "MAIL FROM:<a@example.org>"), "250");
    assert_code(&say(&mut tls, "RCPT TO:<x@example.com>"), "250");
    assert_code(&say(&mut tls, "RCPT TO:<y@example.com>"), "250");
    assert_code(&say(&mut tls, "DATA"), "354");
    assert_code(&say(&mut tls, "Subject: t\r\n\r\nhello\r\n."), "250");
    assert_code(&say(&mut tls, "QUIT"), "221");
    let mut plain = connect_from("127.0.0.22", daemon.smtp);
    assert_code(&reply(&mut plain), "220");
    assert_code(&say(&mut plain, "HELO probe.example.net"), "250");
    assert_code(&say(&mut plain, "MAIL FROM:<spam@example.org>"), "250");
    assert_code(&say(&mut plain, "RCPT TO:<victim@example.net>"), "550");
    assert_code(&say(&mut plain, "BOGUS"), "500");
    assert_code(&say(&mut plain, "QUIT"), "221");
    assert_eq!(rest(&mut plain), "");
}

#[test]
fn one_summary_line_per_session_in_the_text_log() {
    let pki = TestPki::new("summary CA", &["gw.example.com"]);
    let mut daemon = start(&pki, "");
    traffic(&daemon, &pki);
    // A failed reload is one line, the TOML error's excerpt included.
    std::fs::write(
        daemon.config(),
        std::fs::read_to_string(daemon.config())
            .unwrap()
            .replace("[server]\n", "[server]\nmax_conections = 1\n"),
    )
    .unwrap();
    assert_eq!(daemon.cli(&["reload"]).status.code(), Some(1));
    daemon.stop();
    let log = daemon.log();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control request failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(
        failed[0].contains("TOML parse error at line 2, column 1: unknown field `max_conections`"),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.trim_start().starts_with('|')),
        "{log}"
    );
    let tls = summary_fields(&log, "127.0.0.21");
    let keys: Vec<&str> = tls.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "client",
            "port",
            "helo",
            "tls",
            "from",
            "rcpts",
            "msgs",
            "errors",
            "bytes_in",
            "bytes_out",
            "result",
            "duration"
        ]
    );
    let get = |fields: &[(String, String)], k: &str| {
        fields.iter().find(|(key, _)| key == k).unwrap().1.clone()
    };
    assert_eq!(get(&tls, "helo"), "mx.example.org");
    assert_eq!(get(&tls, "tls"), "TLSv1.3");
    assert_eq!(get(&tls, "from"), "<a@example.org>");
    assert_eq!(get(&tls, "rcpts"), "2");
    assert_eq!(get(&tls, "msgs"), "1");
    assert_eq!(get(&tls, "errors"), "0");
    assert_eq!(get(&tls, "result"), "quit");
    let duration = get(&tls, "duration");
    assert_eq!(duration.split_once('.').unwrap().1.len(), 3, "{duration}");
    let plain = summary_fields(&log, "127.0.0.22");
    assert_eq!(get(&plain, "helo"), "probe.example.net");
    assert_eq!(get(&plain, "tls"), "-");
    assert_eq!(get(&plain, "from"), "-", "no message was accepted");
    assert_eq!(get(&plain, "msgs"), "0");
    assert_eq!(get(&plain, "errors"), "2");
    let sent = "HELO probe.example.net\r\nMAIL FROM:<spam@example.org>\r\nRCPT TO:<victim@example.net>\r\nBOGUS\r\nQUIT\r\n";
    assert_eq!(get(&plain, "bytes_in"), sent.len().to_string());
    assert_eq!(
        log.matches("session end client=").count(),
        2,
        "one line per session:\n{log}"
    );
}
#[test]
fn every_line_of_the_json_log_is_json() {
    let pki = TestPki::new("json CA", &["gw.example.com"]);
    let mut daemon = start(&pki, "format = \"json\"\n");
    traffic(&daemon, &pki);
    // A failed reload is one line too.
    std::fs::write(
        daemon.config(),
        std::fs::read_to_string(daemon.config())
            .unwrap()
            .replace("[server]\n", "[server]\nmax_conections = 1\n"),
    )
    .unwrap();
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    // A list change names its caller.
    let out = daemon.cli(&["deny", "add", "192.0.2.77"]);
    assert!(out.status.success(), "{out:?}");
    daemon.stop();
    let log = daemon.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let summary = lines
        .iter()
        .find(|l| l["message"] == "session end" && l["client"] == "127.0.0.21")
        .unwrap_or_else(|| panic!("no JSON summary:\n{log}"));
    assert_eq!(summary["tls"], "TLSv1.3");
    assert_eq!(summary["rcpts"], 2);
    assert_eq!(summary["msgs"], 1);
    assert_eq!(summary["result"], "quit");
    let started = lines
        .iter()
        .find(|l| l["message"] == "smtpguard running")
        .unwrap_or_else(|| panic!("no JSON startup summary:\n{log}"));
    assert_eq!(started["listen"], daemon.smtp.to_string());
    assert!(
        started["tls"]
            .as_str()
            .unwrap()
            .contains("CN=gw.example.com"),
        "{started}"
    );
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let added = lines
        .iter()
        .find(|l| l["message"] == "list entries added")
        .unwrap_or_else(|| panic!("no list change:\n{log}"));
    assert_eq!(added["span"]["name"], "control", "{added}");
    assert_eq!(added["span"]["uid"], uid, "{added}");
    assert!(added["span"]["pid"].as_u64().unwrap() > 0, "{added}");
    let failed = lines
        .iter()
        .find(|l| l["message"] == "control request failed")
        .unwrap_or_else(|| panic!("no failed reload:\n{log}"));
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `max_conections`"),
        "{failed}"
    );
}
