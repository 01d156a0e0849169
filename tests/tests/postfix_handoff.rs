//! The hand-off against a real Postfix: smtpguard's public
//! `smtp::handoff` API ([`Delivery`], [`DeliverySession`], [`ClientInfo`])
//! relays to a private Postfix (see `smtpguard_tests::postfix`) in a test
//! network namespace, once with a PROXY v2 header and once with XCLIENT,
//! each claiming a documentation address as the client (and once with the
//! PROXY v2 TLS TLVs of a STARTTLS client). Postfix must log those
//! addresses and, believing them, refuse to relay elsewhere; once it is
//! stopped, the hand-off answers `451 4.4.1`.
//!
//! Needs root and the Debian `postfix` package; fails (never skips)
//! without them.
//!
//! [`DeliverySession`]: smtpguard::smtp::handoff::DeliverySession

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use smtpguard::smtp::{
    handoff::{
        ClientInfo, Delivery, DeliverySettings, SpoolSettings, UpstreamProtocol, UpstreamSettings,
    },
    AskDriver, Envelope, Event, ForwardPath, MailParams, Reply, ReversePath, Session,
    SessionParams, Step, TlsInfo,
};
use smtpguard_tests::{
    netns::{unique_tag, Netns},
    postfix::{self, Postfix},
    require_root, run_bounded, wait_for,
};

/// The PROXY-protocol smtpd, inside the test namespace.
const PROXY_PORT: u16 = 10025;
/// The XCLIENT smtpd, inside the test namespace.
const XCLIENT_PORT: u16 = 10026;
/// Our host name (`Received:`, EHLO to Postfix).
const HOST: &str = "mx.test.example";
/// The client address the hand-off sessions are made for.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

fn client(peer: &str) -> ClientInfo {
    ClientInfo {
        peer: peer.parse().unwrap(),
        local: "198.51.100.1:25".parse().unwrap(),
        helo: Some("client.example.org".into()),
        esmtp: true,
        tls: None,
        session_id: "test-session".into(),
    }
}

fn upstream(address: SocketAddr, protocol: UpstreamProtocol) -> Delivery {
    let cfg = DeliverySettings::Upstream(UpstreamSettings {
        address,
        protocol,
        timeout: Duration::from_secs(10),
    });
    Delivery::new(&cfg, HOST).unwrap()
}

/// `from` and `to` (bracketed paths) parsed the way the connection driver
/// gets them: from an SMTP [`Session`]'s MAIL and RCPT decisions.
fn paths(from: &str, to: &[&str]) -> (ReversePath, Vec<ForwardPath>) {
    let mut s = Session::new(SessionParams::new(HOST), Box::new(AskDriver));
    assert_eq!(say(&mut s, "EHLO client.example.org"), None);
    let Some(Step::Mail { reverse_path, .. }) = say(&mut s, &format!("MAIL FROM:{from}")) else {
        panic!("MAIL FROM:{from}");
    };
    s.decide(Reply::sender_ok()).unwrap();
    let mut forward = Vec::new();
    for t in to {
        let Some(Step::Rcpt { forward_path }) = say(&mut s, &format!("RCPT TO:{t}")) else {
            panic!("RCPT TO:{t}");
        };
        s.decide(Reply::recipient_ok()).unwrap();
        forward.push(forward_path);
    }
    (reverse_path, forward)
}

/// Feeds one command line to `s`; the decision it asks for, if any.
fn say(s: &mut Session, line: &str) -> Option<Step> {
    let line = format!("{line}\r\n");
    assert_eq!(s.feed(line.as_bytes()), line.len(), "{line}");
    while let Some(event) = s.next_event() {
        match event {
            Event::Reply(r) => assert!(r.is_positive(), "{line}: {r}"),
            Event::NeedDecision(step) => return Some(step),
            other => panic!("{line}: {other:?}"),
        }
    }
    None
}

/// The queue id in Postfix's `250 2.0.0 Ok: queued as QUEUEID`.
fn queue_id(r: &Reply) -> String {
    r.lines[0]
        .strip_prefix("Ok: queued as ")
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

#[test]
fn real_postfix_accepts_with_proxy_v2_and_xclient_then_451_when_stopped() {
    require_root();
    let started = Instant::now();
    let ns = Netns::new("pfx", &unique_tag());
    let mut pf = Postfix::start(postfix::Options {
        xclient_port: Some(XCLIENT_PORT),
        ..postfix::Options::proxy(&ns, PROXY_PORT)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // A current-thread runtime: every socket is made on this thread, inside
    // the namespace.
    let result = ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(25), drive(&mut pf)).await })
    });
    drop(pf);
    result.expect("real Postfix test took longer than 25 s");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

async fn drive(pf: &mut Postfix) {
    let (from, rcpts) = paths(
        "<alice@example.org>",
        &["<bob@example.com>", "<carol@elsewhere.example>"],
    );
    let (bob, elsewhere) = (&rcpts[0], &rcpts[1]);
    let env = Envelope {
        reverse_path: from.clone(),
        forward_paths: vec![bob.clone()],
        body: None,
        declared_size: None,
    };
    let data = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: smtpguard hand-off test\r\n\r\nHello.\r\n";

    // PROXY v2, claiming a documentation address as the client.
    let c = client("192.0.2.10:40000");
    let d = upstream(
        ([127, 0, 0, 1], PROXY_PORT).into(),
        UpstreamProtocol::ProxyV2,
    );
    let mut s = d.session(CLIENT);
    let r = s.mail(&c, &from, &MailParams::default()).await;
    assert_eq!(r.code, 250, "MAIL: {r}\n{}", pf.log());
    // Postfix believes the PROXY header: 192.0.2.10 is not in mynetworks,
    // so relaying is refused (from 127.0.0.1 it would be allowed). Postfix
    // ≥ 3.0 defaults to defer_unauth_destination (454 4.7.1) in
    // smtpd_relay_restrictions, older ones 554 5.7.1.
    let r = s.rcpt(&c, elsewhere).await;
    assert!(matches!(r.code, 454 | 554), "{r}");
    assert_eq!(r.enhanced.map(|e| (e.1, e.2)), Some((7, 1)), "{r}");
    assert!(r.lines[0].contains("Relay access denied"), "{r}");
    let r = s.rcpt(&c, bob).await;
    assert_eq!(r, Reply::recipient_ok(), "{r}");
    let r = s.message(&c, &env, data).await;
    assert_eq!(r.code, 250, "{r}\n{}", pf.log());
    let qid = queue_id(&r);
    s.close().await;
    let needle = format!("{qid}: client=unknown[192.0.2.10]");
    assert!(
        pf.wait_for_log(Duration::from_secs(5), |log| log.contains(&needle)),
        "no client=unknown[192.0.2.10] for {qid} in the Postfix log:\n{}",
        pf.log()
    );
    assert!(pf.log().contains("connect from unknown[192.0.2.10]"));
    assert_eq!(
        pf.messages()[&qid].client.as_deref(),
        Some("192.0.2.10"),
        "{}",
        pf.log()
    );

    // PROXY v2 for a client that used STARTTLS: the header carries the
    // PP2_TYPE_SSL TLV (version and cipher). Postfix 3.7 skips TLVs
    // (haproxy_srvr.c: "For now, skip and ignore TLVs"), so its log cannot
    // show them; what it does show is that the longer header is read whole
    // (no "haproxy read:" warning, the session goes on) and the client
    // address from it.
    let mut tls_client = client("192.0.2.12:40002");
    tls_client.tls = Some(TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
    });
    let mut s = d.session(CLIENT);
    let r = s.mail(&tls_client, &from, &MailParams::default()).await;
    assert_eq!(r.code, 250, "MAIL: {r}\n{}", pf.log());
    let r = s.rcpt(&tls_client, bob).await;
    assert_eq!(r.code, 250, "{r}");
    let r = s.message(&tls_client, &env, data).await;
    assert_eq!(r.code, 250, "{r}\n{}", pf.log());
    let qid_tls = queue_id(&r);
    s.close().await;
    let needle = format!("{qid_tls}: client=unknown[192.0.2.12]");
    assert!(
        pf.wait_for_log(Duration::from_secs(5), |log| log.contains(&needle)),
        "no client=unknown[192.0.2.12] for {qid_tls} in the Postfix log:\n{}",
        pf.log()
    );
    assert!(pf.log().contains("connect from unknown[192.0.2.12]"));
    assert!(!pf.log().contains("haproxy read:"), "{}", pf.log());

    // XCLIENT on the other port, for another documentation address.
    let c2 = client("192.0.2.11:40001");
    let d2 = upstream(
        ([127, 0, 0, 1], XCLIENT_PORT).into(),
        UpstreamProtocol::Xclient,
    );
    let mut s2 = d2.session(CLIENT);
    let r = s2.mail(&c2, &from, &MailParams::default()).await;
    assert_eq!(r.code, 250, "MAIL: {r}\n{}", pf.log());
    let r = s2.rcpt(&c2, elsewhere).await;
    assert!(r.lines[0].contains("Relay access denied"), "{r}");
    let r = s2.rcpt(&c2, bob).await;
    assert_eq!(r.code, 250, "{r}");
    let r = s2.message(&c2, &env, data).await;
    assert_eq!(r.code, 250, "{r}\n{}", pf.log());
    let qid2 = queue_id(&r);
    s2.close().await;
    let needle = format!("{qid2}: client=unknown[192.0.2.11]");
    assert!(
        pf.wait_for_log(Duration::from_secs(5), |log| log.contains(&needle)),
        "no client=unknown[192.0.2.11] for {qid2} in the Postfix log:\n{}",
        pf.log()
    );

    // Postfix stopped: temporary failure, nothing lost.
    pf.stop().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || !pf.listening(PROXY_PORT)),
        "postfix still listening after stop"
    );
    let mut s3 = d.session(CLIENT);
    let r = s3.mail(&c, &from, &MailParams::default()).await;
    assert_eq!(
        r.to_string(),
        "451 4.4.1 Error: upstream not responding\r\n"
    );
}

/// The spool's re-injection recipe (`smtp::handoff` docs, README): strip
/// the envelope lines smtpguard wrote above its `Received:`, then
/// `sendmail -i -f <Return-Path> <each X-Smtpguard-Rcpt> < file`. The
/// spool stores the message un-stuffed, so a client's `..` line is stored
/// as `.`; without `-i`, sendmail stops reading there and the rest of the
/// message is lost. The message Postfix queued must equal the spooled one.
#[test]
fn spooled_message_with_a_lone_dot_line_reinjects_whole_into_postfix() {
    require_root();
    let ns = Netns::new("pfr", &unique_tag());
    let pf =
        Postfix::start(postfix::Options::proxy(&ns, PROXY_PORT)).unwrap_or_else(|e| panic!("{e}"));
    let spool = smtpguard::testing::TempDir::new("reinject");
    let d = Delivery::new(
        &DeliverySettings::Spool(SpoolSettings {
            dir: spool.path().to_path_buf(),
            accept_domains: vec!["example.com".into()],
            relay_networks: vec![],
        }),
        HOST,
    )
    .unwrap();
    let (from, rcpts) = paths("<alice@example.org>", &["<bob@example.com>"]);
    let env = Envelope {
        reverse_path: from,
        forward_paths: rcpts,
        body: None,
        declared_size: None,
    };
    // As the client sent it: "..", "...x" (dot-stuffed); as stored: ".", "..x".
    let data = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: dots\r\n\r\nbefore\r\n.\r\n..x\r\nafter the dot\r\n";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(async {
        let mut s = d.session(CLIENT);
        s.message(&client("192.0.2.10:40000"), &env, data).await
    });
    assert_eq!(r.code, 250, "{r}");
    let new: Vec<_> = std::fs::read_dir(spool.path().join("new"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let spooled = std::fs::read_to_string(&new[0]).unwrap();

    // The recipe: envelope from the lines above Received:, which go.
    let mut sender = String::new();
    let mut recipients = Vec::new();
    let mut message = String::new();
    let mut in_envelope = true;
    for line in spooled.split_inclusive("\r\n") {
        if in_envelope {
            if let Some(p) = line.strip_prefix("Return-Path: ") {
                sender = p.trim_end().trim_matches(['<', '>']).to_string();
                continue;
            }
            if let Some(p) = line.strip_prefix("X-Smtpguard-Rcpt: ") {
                recipients.push(p.trim_end().trim_matches(['<', '>']).to_string());
                continue;
            }
            in_envelope = false;
        }
        message.push_str(line);
    }
    assert_eq!(sender, "alice@example.org");
    assert_eq!(recipients, ["bob@example.com"]);
    assert!(message.starts_with("Received: "), "{message}");
    assert!(message.contains("\r\n.\r\n"), "{message}");
    let file = spool.path().join("message.eml");
    std::fs::write(&file, &message).unwrap();

    let queued = |flags: &[&str]| -> String {
        let before = pf.maildrop();
        let mut cmd = std::process::Command::new("/usr/sbin/sendmail");
        cmd.arg("-C")
            .arg(pf.config_dir())
            .args(flags)
            .arg("-f")
            .arg(&sender)
            .args(&recipients)
            .env_remove("MAIL_CONFIG")
            .stdin(std::fs::File::open(&file).unwrap())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = run_bounded(cmd, Duration::from_secs(20)).unwrap();
        assert!(out.status.success(), "sendmail {flags:?}: {out:?}");
        let after = pf.maildrop();
        let added: Vec<_> = after.iter().filter(|f| !before.contains(f)).collect();
        assert_eq!(added.len(), 1, "maildrop: {after:?}");
        let mut cmd = std::process::Command::new("/usr/sbin/postcat");
        cmd.arg("-c")
            .arg(pf.config_dir())
            .args(["-b", "-h"])
            .arg(added[0])
            .env_remove("MAIL_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = run_bounded(cmd, Duration::from_secs(20)).unwrap();
        assert!(out.status.success(), "postcat: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let want = message.replace("\r\n", "\n");
    // The recipe as documented: the whole message.
    let got = queued(&["-i"]);
    assert_eq!(got, want);
    // Without -i (the recipe before the fix) the message ends at the dot.
    let cut = queued(&[]);
    assert!(cut.ends_with("before\n"), "{cut}");
    assert_ne!(cut, want);
    drop(pf);
}
