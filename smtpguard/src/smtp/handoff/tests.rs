//! [`DeliverySession`] end to end: against a fake upstream MTA written
//! here with tokio (loopback only), and into a temporary Maildir.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::upstream::dot_stuff;
use super::*;
use crate::smtp::command::{parse_mail, parse_rcpt};
use crate::testing::{bounded, TempDir};

const HOST: &str = "mx.test.example";
/// A client outside the spool's `relay_networks`.
const OUTSIDER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
/// A client inside them.
const INSIDER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));

/// Every test body runs under this bound, so a bug cannot hang the suite.
const LIMIT: Duration = Duration::from_secs(15);

fn client() -> ClientInfo {
    ClientInfo {
        peer: "192.0.2.10:40000".parse().unwrap(),
        local: "198.51.100.1:25".parse().unwrap(),
        helo: Some("client.example.org".into()),
        esmtp: true,
        tls: None,
        session_id: "test-session".into(),
    }
}

fn envelope(from: &str, to: &[&str]) -> Envelope {
    let (reverse_path, params) = parse_mail(&format!("FROM:{from}")).unwrap();
    Envelope {
        reverse_path,
        forward_paths: to
            .iter()
            .map(|t| parse_rcpt(&format!("TO:{t}")).unwrap())
            .collect(),
        body: params.body,
        declared_size: params.size,
    }
}

fn upstream(addr: SocketAddr, protocol: UpstreamProtocol, timeout: Duration) -> Delivery {
    let cfg = DeliverySettings::Upstream(UpstreamSettings {
        address: addr,
        protocol,
        timeout,
    });
    Delivery::new(&cfg, HOST).unwrap()
}

fn assert_451_441(r: &Reply) {
    assert_eq!(
        r.to_string(),
        "451 4.4.1 Error: upstream not responding\r\n"
    );
}

// ----- the fake upstream ---------------------------------------------------

/// How the fake behaves.
#[derive(Clone)]
struct Script {
    /// The PROXY v2 header expected before anything else (the connection
    /// is dropped if it differs).
    expect_proxy: Option<Vec<u8>>,
    /// EHLO keywords offered after the host name line.
    extensions: Vec<&'static str>,
    /// Answer EHLO with 502 (so HELO must follow).
    refuse_ehlo: bool,
    /// Instead of the greeting, send this.
    greeting: &'static str,
    /// Reply to MAIL.
    mail_reply: &'static str,
    /// RCPT for this address gets `550 5.1.1`.
    reject_rcpt: Option<&'static str>,
    /// Drop the connection, unanswered, when this verb arrives.
    close_on: Option<&'static str>,
    /// Accept the connection and never say anything.
    silent: bool,
    /// Close the connection right after acknowledging a message (as an
    /// MTA does when it times out an idle client).
    close_after_message: bool,
    /// After the reply to MAIL, also send this (unasked-for) line.
    extra_after_mail: &'static str,
    /// The reply to DATA (several replies in one write, if wanted).
    data_reply: &'static str,
    /// The reply to the final dot; `None`: `250 2.0.0 Ok: queued as FAKE<n>`.
    end_of_data_reply: Option<&'static str>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            expect_proxy: None,
            extensions: vec![
                "PIPELINING",
                "SIZE 10240000",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
            ],
            refuse_ehlo: false,
            greeting: "220 fake.example ESMTP fake\r\n",
            mail_reply: "250 2.1.0 Ok\r\n",
            reject_rcpt: None,
            close_on: None,
            silent: false,
            close_after_message: false,
            extra_after_mail: "",
            data_reply: "354 End data with <CR><LF>.<CR><LF>\r\n",
            end_of_data_reply: None,
        }
    }
}

/// What the fake saw, over all connections.
#[derive(Debug, Default)]
struct Transcript {
    connections: usize,
    /// The peer address of each connection (our upstream side).
    peers: Vec<SocketAddr>,
    /// The PROXY header bytes, per connection (when one was expected).
    proxy_headers: Vec<Vec<u8>>,
    /// Command lines, without CRLF, in order.
    commands: Vec<String>,
    /// Message data as it arrived (still dot-stuffed), without the final
    /// `.` CRLF.
    messages: Vec<Vec<u8>>,
}

struct Fake {
    addr: SocketAddr,
    transcript: Arc<Mutex<Transcript>>,
}

impl Fake {
    async fn start(script: Script) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let transcript = Arc::new(Mutex::new(Transcript::default()));
        let t = Arc::clone(&transcript);
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                {
                    let mut t = t.lock().unwrap();
                    t.connections += 1;
                    t.peers.push(peer);
                }
                tokio::spawn(serve(stream, script.clone(), Arc::clone(&t)));
            }
        });
        Fake { addr, transcript }
    }

    fn commands(&self) -> Vec<String> {
        self.transcript.lock().unwrap().commands.clone()
    }
}

async fn serve(stream: TcpStream, s: Script, t: Arc<Mutex<Transcript>>) {
    let mut io = BufReader::new(stream);
    if s.silent {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return;
    }
    if let Some(want) = &s.expect_proxy {
        let mut got = vec![0u8; want.len()];
        if io.read_exact(&mut got).await.is_err() {
            return;
        }
        t.lock().unwrap().proxy_headers.push(got.clone());
        if &got != want {
            return;
        }
    }
    macro_rules! send {
        ($s:expr) => {
            if io.get_mut().write_all($s.as_bytes()).await.is_err() {
                return;
            }
        };
    }
    send!(s.greeting);
    let mut line = Vec::new();
    loop {
        line.clear();
        match io.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let cmd = String::from_utf8_lossy(&line)
            .trim_end_matches("\r\n")
            .to_string();
        t.lock().unwrap().commands.push(cmd.clone());
        let verb = cmd.split(' ').next().unwrap_or("").to_ascii_uppercase();
        if s.close_on == Some(verb.as_str()) {
            return;
        }
        match verb.as_str() {
            "EHLO" if s.refuse_ehlo => send!("502 5.5.1 Error: command not implemented\r\n"),
            "EHLO" => {
                let mut r = String::from("250");
                r.push(if s.extensions.is_empty() { ' ' } else { '-' });
                r.push_str("fake.example\r\n");
                for (i, e) in s.extensions.iter().enumerate() {
                    let sep = if i + 1 == s.extensions.len() {
                        ' '
                    } else {
                        '-'
                    };
                    r.push_str(&format!("250{sep}{e}\r\n"));
                }
                send!(r);
            }
            "HELO" => send!("250 fake.example\r\n"),
            "XCLIENT" => send!("220 fake.example ESMTP fake\r\n"),
            "MAIL" => {
                send!(s.mail_reply);
                send!(s.extra_after_mail);
            }
            "RCPT" => match s.reject_rcpt {
                Some(bad) if cmd.contains(bad) => {
                    send!(format!(
                        "550 5.1.1 <{bad}>: Recipient address rejected: User unknown\r\n"
                    ))
                }
                _ => send!("250 2.1.5 Ok\r\n"),
            },
            "RSET" => send!("250 2.0.0 Ok\r\n"),
            "DATA" => {
                send!(s.data_reply);
                let mut msg = Vec::new();
                loop {
                    line.clear();
                    match io.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    msg.extend_from_slice(&line);
                }
                let n = {
                    let mut t = t.lock().unwrap();
                    t.messages.push(msg);
                    t.messages.len()
                };
                match s.end_of_data_reply {
                    Some(r) => send!(r),
                    None => send!(format!("250 2.0.0 Ok: queued as FAKE{n}\r\n")),
                }
                if s.close_after_message {
                    return;
                }
            }
            "QUIT" => {
                send!("221 2.0.0 Bye\r\n");
                return;
            }
            _ => send!("502 5.5.2 Error: command not recognized\r\n"),
        }
    }
}

/// A loopback port nobody listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

// ----- upstream mode -------------------------------------------------------

#[tokio::test]
async fn full_transaction_with_proxy_v2() {
    bounded(LIMIT, async {
        let c = client();
        let fake = Fake::start(Script {
            expect_proxy: Some(proxy::header(c.peer, c.local, c.tls.as_ref())),
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::ProxyV2, Duration::from_secs(5));
        assert!(d.is_upstream());
        let mut s = d.session(OUTSIDER);
        // Upstream mode: the session must ask about every MAIL and RCPT.
        let mut policy = s.rcpt_policy();
        let env = envelope(
            "<alice@example.org> SIZE=123 BODY=8BITMIME",
            &["<bob@example.com>", "<carol@example.com>"],
        );
        assert_eq!(
            policy.mail(&env.reverse_path, &MailParams::default()),
            RcptDecision::Ask
        );
        assert_eq!(policy.rcpt(&env.forward_paths[0], &env), RcptDecision::Ask);

        let params = MailParams {
            size: Some(123),
            body: Some(crate::smtp::BodyType::EightBitMime),
        };
        assert_eq!(
            s.mail(&c, &env.reverse_path, &params).await,
            Reply::sender_ok()
        );
        for rcpt in &env.forward_paths {
            assert_eq!(s.rcpt(&c, rcpt).await, Reply::recipient_ok());
        }
        let data = b"Subject: test\r\n\r\nline one\r\n.\r\n..two dots\r\n.leading dot\r\nlast";
        let r = s.message(&c, &env, data).await;
        assert_eq!(r.to_string(), "250 2.0.0 Ok: queued as FAKE1\r\n");

        // Second transaction on the same connection: none open, no RSET.
        let null = envelope("<>", &[]).reverse_path;
        assert!(s
            .mail(&c, &null, &MailParams::default())
            .await
            .is_positive());
        // A third MAIL while that one is open (the client sent RSET): RSET first.
        assert!(s
            .mail(&c, &null, &MailParams::default())
            .await
            .is_positive());
        s.close().await;

        let t = fake.transcript.lock().unwrap();
        assert_eq!(t.connections, 1);
        assert_eq!(
            t.proxy_headers,
            [proxy::header(c.peer, c.local, c.tls.as_ref())]
        );
        assert_eq!(
            t.commands,
            [
                "EHLO mx.test.example",
                "MAIL FROM:<alice@example.org> SIZE=123 BODY=8BITMIME",
                "RCPT TO:<bob@example.com>",
                "RCPT TO:<carol@example.com>",
                "DATA",
                "MAIL FROM:<>",
                "RSET",
                "MAIL FROM:<>",
                "QUIT",
            ]
        );
        // What arrived: our Received: header, then the body dot-stuffed
        // (the fake keeps it stuffed and drops only the final dot line).
        let msg = &t.messages[0];
        let text = String::from_utf8_lossy(msg);
        assert!(
            text.starts_with(
                "Received: from client.example.org ([192.0.2.10]) by mx.test.example\r\n\
                 \t(smtpguard) with ESMTP id M"
            ),
            "{text}"
        );
        let body_at = text.find("Subject: test").unwrap();
        let mut want = dot_stuff(data);
        want.truncate(want.len() - 3); // the final ".\r\n"
        assert_eq!(&msg[body_at..], &want[..]);
        assert!(text.contains("\r\n..\r\n...two dots\r\n..leading dot\r\nlast\r\n"));
        // Two recipients: no "for" clause.
        assert!(!text[..body_at].contains(" for "));
    })
    .await
}

#[tokio::test]
async fn rcpt_rejection_is_passed_through() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script {
            reject_rcpt: Some("nobody@example.com"),
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let c = client();
        let env = envelope(
            "<alice@example.org>",
            &["<nobody@example.com>", "<bob@example.com>"],
        );
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        let r = s.rcpt(&c, &env.forward_paths[0]).await;
        assert_eq!(
            r.to_string(),
            "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown\r\n"
        );
        // The connection is still good for the next recipient and the message.
        assert_eq!(
            s.rcpt(&c, &env.forward_paths[1]).await,
            Reply::recipient_ok()
        );
        let only_bob = envelope("<alice@example.org>", &["<bob@example.com>"]);
        let r = s.message(&c, &only_bob, b"Subject: x\r\n\r\nhi\r\n").await;
        assert!(r.is_positive(), "{r}");
        s.close().await;
        let t = fake.transcript.lock().unwrap();
        assert_eq!(t.connections, 1);
        assert!(t.proxy_headers.is_empty());
        // protocol "none": the first thing sent is EHLO.
        assert_eq!(t.commands[0], "EHLO mx.test.example");
        // One recipient: "for <bob@example.com>" in our Received:.
        let text = String::from_utf8_lossy(&t.messages[0]);
        assert!(text.contains("for <bob@example.com>;"), "{text}");
    })
    .await
}

#[tokio::test]
async fn upstream_closing_mid_transaction_gives_451_then_reconnects() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script {
            close_on: Some("DATA"),
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let c = client();
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        assert!(s.rcpt(&c, &env.forward_paths[0]).await.is_positive());
        assert_451_441(&s.message(&c, &env, b"hello\r\n").await);
        // Nothing to relay to any more: RCPT without a connection is 451 too.
        assert_451_441(&s.rcpt(&c, &env.forward_paths[0]).await);
        // The next MAIL connects afresh.
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        assert_eq!(fake.transcript.lock().unwrap().connections, 2);
        s.close().await;
    })
    .await
}

#[tokio::test]
async fn dead_reused_connection_is_replaced_once() {
    bounded(LIMIT, async {
        let c = client();
        let fake = Fake::start(Script {
            expect_proxy: Some(proxy::header(c.peer, c.local, c.tls.as_ref())),
            close_after_message: true,
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::ProxyV2, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        for n in 1..=2 {
            assert!(s
                .mail(&c, &env.reverse_path, &MailParams::default())
                .await
                .is_positive());
            assert!(s.rcpt(&c, &env.forward_paths[0]).await.is_positive());
            let r = s.message(&c, &env, b"x\r\n").await;
            assert_eq!(
                r.to_string(),
                format!("250 2.0.0 Ok: queued as FAKE{n}\r\n")
            );
        }
        let t = fake.transcript.lock().unwrap();
        assert_eq!(t.connections, 2);
        // The new connection got its own PROXY header.
        assert_eq!(t.proxy_headers.len(), 2);
    })
    .await
}

#[tokio::test]
async fn unsolicited_upstream_data_is_not_taken_as_a_reply() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script {
            extra_after_mail: "250 2.1.5 Ok (nobody asked)\r\n",
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let c = client();
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        // Give the extra line time to arrive, then RCPT must not take it
        // for its answer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_451_441(&s.rcpt(&c, &env.forward_paths[0]).await);
    })
    .await
}

/// An upstream that answers DATA with `354` and a `250` in the same write,
/// and then refuses the message at the final dot: the early 250 must not
/// reach the client as the answer to the message.
#[tokio::test]
async fn early_reply_after_354_is_not_taken_as_the_final_reply() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script {
            data_reply: "354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as EARLY\r\n",
            end_of_data_reply: Some("554 5.7.1 Message refused\r\n"),
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let c = client();
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        assert!(s.rcpt(&c, &env.forward_paths[0]).await.is_positive());
        let r = s.message(&c, &env, b"Subject: x\r\n\r\nbody\r\n").await;
        assert_eq!(r, Reply::local_error(), "got {r}");
        assert_eq!(
            r.to_string(),
            "451 4.3.0 Error: local error in processing\r\n"
        );
        // The connection is not reused: the next MAIL connects anew.
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        s.close().await;
        assert_eq!(fake.transcript.lock().unwrap().connections, 2);
    })
    .await
}

/// A session whose client is one of our own open upstream connections
/// (the upstream leads back to us) is a loop: 451 4.4.6 at MAIL, and no
/// further upstream connection; once that connection is closed its
/// address is no longer ours.
#[tokio::test]
async fn session_from_our_own_upstream_connection_is_a_loop() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script::default()).await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut outer = d.session(OUTSIDER);
        let c = client();
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        assert!(outer
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        let ours = fake.transcript.lock().unwrap().peers[0];
        // The same connection arriving back at our listener.
        let looped = ClientInfo {
            peer: ours,
            local: fake.addr,
            ..client()
        };
        let mut inner = d.session(ours.ip());
        let r = inner
            .mail(&looped, &env.reverse_path, &MailParams::default())
            .await;
        assert_eq!(r, Reply::mail_loop(), "got {r}");
        assert_eq!(r.to_string().get(..9), Some("451 4.4.6"));
        assert_eq!(fake.transcript.lock().unwrap().connections, 1);
        // Closed: that address is no longer one of ours.
        outer.close().await;
        let r = inner
            .mail(&looped, &env.reverse_path, &MailParams::default())
            .await;
        assert!(r.is_positive(), "{r}");
        inner.close().await;
    })
    .await
}

#[tokio::test]
async fn unreachable_upstream_gives_451() {
    bounded(LIMIT, async {
        let d = upstream(
            closed_port().await,
            UpstreamProtocol::ProxyV2,
            Duration::from_secs(5),
        );
        let mut s = d.session(OUTSIDER);
        let c = client();
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        assert_451_441(&s.mail(&c, &env.reverse_path, &MailParams::default()).await);
        assert_451_441(&s.rcpt(&c, &env.forward_paths[0]).await);
        assert_451_441(&s.message(&c, &env, b"x\r\n").await);
        s.close().await;
    })
    .await
}

#[tokio::test]
async fn silent_upstream_gives_451_after_the_timeout() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script {
            silent: true,
            ..Script::default()
        })
        .await;
        let timeout = Duration::from_millis(300);
        let d = upstream(fake.addr, UpstreamProtocol::ProxyV2, timeout);
        let mut s = d.session(OUTSIDER);
        let c = client();
        let start = Instant::now();
        let r = s
            .mail(
                &c,
                &envelope("<>", &[]).reverse_path,
                &MailParams::default(),
            )
            .await;
        let took = start.elapsed();
        assert_451_441(&r);
        assert!(took >= timeout, "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    })
    .await
}

#[tokio::test]
async fn upstream_421_or_garbage_gives_451() {
    bounded(LIMIT, async {
        let c = client();
        let from = envelope("<a@example.org>", &[]).reverse_path;
        for script in [
            Script {
                mail_reply: "421 4.3.2 Service shutting down\r\n",
                ..Script::default()
            },
            Script {
                greeting: "421 4.7.0 fake.example Error: too many connections\r\n",
                ..Script::default()
            },
            Script {
                greeting: "554 5.7.1 go away\r\n",
                ..Script::default()
            },
            Script {
                greeting: "HTTP/1.1 400 Bad Request\r\n\r\n",
                ..Script::default()
            },
            Script {
                mail_reply: "250-2.1.0 Ok\r\n251 mixed codes\r\n",
                ..Script::default()
            },
        ] {
            let what = format!("{:?}/{:?}", script.greeting, script.mail_reply);
            let fake = Fake::start(script).await;
            let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
            let mut s = d.session(OUTSIDER);
            let r = s.mail(&c, &from, &MailParams::default()).await;
            assert_eq!(r, Reply::upstream_unavailable(), "{what}");
        }
        // A reply that never ends within 64 KiB.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut st, _) = listener.accept().await.unwrap();
            let junk = vec![b'2'; 80 * 1024];
            let _ = st.write_all(&junk).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let d = upstream(addr, UpstreamProtocol::None, Duration::from_secs(5));
        let r = d
            .session(OUTSIDER)
            .mail(&c, &from, &MailParams::default())
            .await;
        assert_eq!(r, Reply::upstream_unavailable());
    })
    .await
}

#[tokio::test]
async fn temporary_and_permanent_mail_refusals_are_relayed() {
    bounded(LIMIT, async {
        let c = client();
        let from = envelope("<a@example.org>", &[]).reverse_path;
        let fake = Fake::start(Script {
            mail_reply: "450 4.1.8 <a@example.org>: Sender address rejected: Domain not found\r\n",
            extensions: vec![],
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let params = MailParams {
            size: Some(10),
            body: Some(crate::smtp::BodyType::SevenBit),
        };
        let r = s.mail(&c, &from, &params).await;
        assert_eq!(r.code, 450);
        assert_eq!(r.enhanced, Some(EnhancedCode(4, 1, 8)));
        // Not offered: no SIZE=/BODY=. The next MAIL resets first.
        let r = s.mail(&c, &from, &params).await;
        assert_eq!(r.code, 450);
        assert_eq!(
            fake.commands(),
            [
                "EHLO mx.test.example",
                "MAIL FROM:<a@example.org>",
                "RSET",
                "MAIL FROM:<a@example.org>"
            ]
        );
        // A reply without an enhanced code gets one.
        let fake = Fake::start(Script {
            mail_reply: "553 no thanks\r\n",
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let r = d
            .session(OUTSIDER)
            .mail(&c, &from, &MailParams::default())
            .await;
        assert_eq!(r.to_string(), "553 5.0.0 no thanks\r\n");
    })
    .await
}

#[tokio::test]
async fn helo_when_ehlo_is_refused() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script {
            refuse_ehlo: true,
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let c = client();
        let (from, params) = parse_mail("FROM:<a@example.org> SIZE=5").unwrap();
        assert!(s.mail(&c, &from, &params).await.is_positive());
        assert_eq!(
            fake.commands(),
            [
                "EHLO mx.test.example",
                "HELO mx.test.example",
                "MAIL FROM:<a@example.org>"
            ]
        );
    })
    .await
}

#[tokio::test]
async fn xclient_exchange() {
    bounded(LIMIT, async {
        let fake = Fake::start(Script {
            extensions: vec!["PIPELINING", "SIZE 1000", "XCLIENT NAME ADDR PROTO HELO PORT LOGIN"],
            ..Script::default()
        })
        .await;
        let d = upstream(fake.addr, UpstreamProtocol::Xclient, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let mut c = client();
        c.helo = Some("client.example.org".into());
        let env = envelope("<alice@example.org>", &["<bob@example.com>"]);
        assert!(s.mail(&c, &env.reverse_path, &MailParams::default()).await.is_positive());
        assert!(s.rcpt(&c, &env.forward_paths[0]).await.is_positive());
        assert!(s.message(&c, &env, b"hi\r\n").await.is_positive());
        s.close().await;
        assert_eq!(
            fake.commands(),
            [
                "EHLO mx.test.example",
                "XCLIENT ADDR=192.0.2.10 PORT=40000 NAME=[UNAVAILABLE] HELO=client.example.org PROTO=ESMTP",
                "EHLO client.example.org",
                "MAIL FROM:<alice@example.org>",
                "RCPT TO:<bob@example.com>",
                "DATA",
                "QUIT",
            ]
        );

        // An upstream that does not offer XCLIENT: fail closed (451), do
        // not relay with our own address as the client.
        let fake = Fake::start(Script::default()).await;
        let d = upstream(fake.addr, UpstreamProtocol::Xclient, Duration::from_secs(5));
        let r = d
            .session(OUTSIDER)
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await;
        assert_451_441(&r);
        assert_eq!(fake.commands(), ["EHLO mx.test.example"]);
    })
    .await
}

#[tokio::test]
async fn data_refused_by_upstream_is_relayed_and_reset_next_time() {
    bounded(LIMIT, async {
        // A fake that answers DATA with 554 and otherwise behaves.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            let (st, _) = listener.accept().await.unwrap();
            let mut io = BufReader::new(st);
            io.get_mut().write_all(b"220 x ESMTP\r\n").await.unwrap();
            let mut line = String::new();
            loop {
                line.clear();
                if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let cmd = line.trim_end().to_string();
                seen2.lock().unwrap().push(cmd.clone());
                let reply: &[u8] = match cmd.split(' ').next().unwrap() {
                    "DATA" => b"554 5.5.1 Error: no valid recipients\r\n",
                    "QUIT" => b"221 2.0.0 Bye\r\n",
                    _ => b"250 2.0.0 Ok\r\n",
                };
                io.get_mut().write_all(reply).await.unwrap();
            }
        });
        let d = upstream(addr, UpstreamProtocol::None, Duration::from_secs(5));
        let mut s = d.session(OUTSIDER);
        let c = client();
        let env = envelope("<a@example.org>", &["<b@example.com>"]);
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        let r = s.message(&c, &env, b"x\r\n").await;
        assert_eq!(r.to_string(), "554 5.5.1 Error: no valid recipients\r\n");
        assert!(s
            .mail(&c, &env.reverse_path, &MailParams::default())
            .await
            .is_positive());
        s.close().await;
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "EHLO mx.test.example",
                "MAIL FROM:<a@example.org>",
                "DATA",
                "RSET",
                "MAIL FROM:<a@example.org>",
                "QUIT"
            ]
        );
    })
    .await
}

/// The driver spawns one task per connection: the futures must be `Send`.
#[allow(dead_code)]
fn futures_are_send(
    s: &mut DeliverySession,
    c: &ClientInfo,
    e: &Envelope,
    f: &ReversePath,
    p: &MailParams,
    t: &ForwardPath,
) {
    fn is_send<T: Send>(_: T) {}
    is_send(s.mail(c, f, p));
    is_send(s.rcpt(c, t));
    is_send(s.message(c, e, b""));
    is_send(s.close());
    is_send(s.delivery.clone());
}

// ----- spool mode ----------------------------------------------------------

fn spool(dir: &std::path::Path) -> Delivery {
    let cfg = DeliverySettings::Spool(SpoolSettings {
        dir: dir.to_path_buf(),
        accept_domains: vec!["example.com".into()],
        relay_networks: vec![
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
    });
    Delivery::new(&cfg, HOST).unwrap()
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

async fn spool_one_message() {
    let tmp = TempDir::new("maildir");
    let dir = tmp.path().join("Maildir");
    let d = spool(&dir);
    assert!(!d.is_upstream());
    let mut s = d.session(OUTSIDER);
    let c = client();
    let env = envelope(
        "<alice@example.org>",
        &["<bob@example.com>", "<postmaster>"],
    );
    let data = b"Subject: spooled\r\n\r\n.a line that was dot-stuffed\r\n";
    let r = s.message(&c, &env, data).await;
    assert!(r.is_positive(), "{r}");
    let text = r.lines[0].clone();
    let id = text.strip_prefix("Ok: queued as ").unwrap();
    assert_eq!(r.to_string(), format!("250 2.0.0 Ok: queued as {id}\r\n"));

    assert!(files(&dir.join("tmp")).is_empty());
    let new = files(&dir.join("new"));
    assert_eq!(new.len(), 1);
    let name = new[0].file_name().unwrap().to_str().unwrap().to_string();
    let parts: Vec<&str> = name.splitn(3, '.').collect();
    assert!(parts[0].parse::<u64>().is_ok(), "{name}");
    assert_eq!(parts[1], id);
    assert_eq!(parts[2], HOST);
    let content = fs::read(&new[0]).unwrap();
    let text = String::from_utf8(content.clone()).unwrap();
    assert!(
        text.starts_with(
            "Return-Path: <alice@example.org>\r\n\
             X-Smtpguard-Rcpt: <bob@example.com>\r\n\
             X-Smtpguard-Rcpt: <postmaster>\r\n\
             Received: from client.example.org ([192.0.2.10]) by mx.test.example\r\n\
             \t(smtpguard) with ESMTP id "
        ),
        "{text}"
    );
    assert!(text.contains(&format!("with ESMTP id {id};")), "{text}");
    // The message follows unchanged (not stuffed, CRLF kept).
    assert!(content.ends_with(data));
    s.close().await;
}

#[tokio::test]
async fn spool_message_current_thread_runtime() {
    bounded(LIMIT, spool_one_message()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_message_multi_thread_runtime() {
    bounded(LIMIT, spool_one_message()).await
}

#[tokio::test]
async fn spool_failure_gives_451_430_and_leaves_nothing() {
    bounded(LIMIT, async {
        let tmp = TempDir::new("maildir-fail");
        let d = spool(tmp.path());
        fs::remove_dir(tmp.path().join("new")).unwrap();
        let mut s = d.session(INSIDER);
        let env = envelope("<a@example.org>", &["<b@example.com>"]);
        let r = s.message(&client(), &env, b"x\r\n").await;
        assert_eq!(r, Reply::local_error());
        assert_eq!(
            r.to_string(),
            "451 4.3.0 Error: local error in processing\r\n"
        );
        assert!(files(&tmp.path().join("tmp")).is_empty());
    })
    .await
}

#[tokio::test]
async fn spool_relay_rules() {
    let tmp = TempDir::new("maildir-relay");
    let d = spool(tmp.path());
    assert!(d.relay_allowed("192.0.2.99".parse().unwrap()));
    assert!(d.relay_allowed("::ffff:192.0.2.99".parse().unwrap()));
    assert!(d.relay_allowed("2001:db8::1".parse().unwrap()));
    assert!(!d.relay_allowed("203.0.113.5".parse().unwrap()));
    let env = envelope("<a@example.org>", &[]);
    let local = parse_rcpt("TO:<bob@Example.COM>").unwrap();
    let remote = parse_rcpt("TO:<bob@elsewhere.example>").unwrap();

    let mut outsider = d.session(OUTSIDER).rcpt_policy();
    assert_eq!(outsider.rcpt(&local, &env), RcptDecision::Accept);
    assert_eq!(
        outsider.rcpt(&ForwardPath::Postmaster, &env),
        RcptDecision::Accept
    );
    assert_eq!(
        outsider.rcpt(&remote, &env),
        RcptDecision::Reject(Reply::relay_denied())
    );
    assert_eq!(
        outsider.mail(&env.reverse_path, &MailParams::default()),
        RcptDecision::Accept
    );
    let mut insider = d.session(INSIDER).rcpt_policy();
    assert_eq!(insider.rcpt(&remote, &env), RcptDecision::Accept);
    // The factory the front door uses gives the same rights, also to an
    // IPv4-mapped address.
    let mapped = "::ffff:192.0.2.99".parse().unwrap();
    let mut via_factory = HandoffFactory::session(&d, mapped).rcpt_policy();
    assert_eq!(via_factory.rcpt(&remote, &env), RcptDecision::Accept);
    let mut outsider = HandoffFactory::session(&d, OUTSIDER).rcpt_policy();
    assert_eq!(
        outsider.rcpt(&remote, &env),
        RcptDecision::Reject(Reply::relay_denied())
    );

    // A driver that asks anyway gets the same answers.
    let c = client();
    let mut s = d.session(OUTSIDER);
    assert_eq!(
        s.mail(&c, &env.reverse_path, &MailParams::default()).await,
        Reply::sender_ok()
    );
    assert_eq!(s.rcpt(&c, &local).await, Reply::recipient_ok());
    assert_eq!(s.rcpt(&c, &remote).await, Reply::relay_denied());

    // Upstream mode: relay_networks do not apply.
    let u = upstream(
        closed_port().await,
        UpstreamProtocol::None,
        Duration::from_secs(1),
    );
    assert!(!u.relay_allowed("192.0.2.99".parse().unwrap()));
}

#[test]
fn spool_dir_error_names_the_directory() {
    let tmp = TempDir::new("maildir-err");
    let file = tmp.path().join("not-a-dir");
    fs::write(&file, b"").unwrap();
    let cfg = DeliverySettings::Spool(SpoolSettings {
        dir: file.join("Maildir"),
        accept_domains: vec![],
        relay_networks: vec![],
    });
    let e = Delivery::new(&cfg, HOST).unwrap_err();
    assert!(e.to_string().contains("not-a-dir"), "{e}");
}

/// An upstream error names its cause once: in the message only the step,
/// the cause in `source`; the log field prints the chain as before.
#[test]
fn upstream_errors_do_not_repeat_their_cause() {
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let cause = refused.to_string();
    let errors = [
        UpstreamError::Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        UpstreamError::Io {
            stage: "DATA",
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        },
    ];
    for e in &errors {
        let message = e.to_string();
        assert!(!message.contains(&cause), "{message}");
        let source = std::error::Error::source(e).unwrap().to_string();
        assert_eq!(source, cause);
        assert_eq!(Chain(e).to_string(), format!("{message}: {cause}"));
    }
    assert_eq!(
        Chain(&errors[0]).to_string(),
        format!("cannot connect: {cause}")
    );
    let garbage = UpstreamError::Garbage {
        stage: "greeting",
        source: crate::smtp::ReplyParseError::Syntax,
    };
    assert_eq!(garbage.to_string(), "bad reply (greeting)");
    assert_eq!(
        Chain(&garbage).to_string(),
        "bad reply (greeting): malformed SMTP reply"
    );
}
