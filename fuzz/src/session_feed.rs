//! The sans-IO SMTP session, fed what a client sends, cut into arbitrary
//! reads, by a driver that keeps the protocol of the `smtp` module docs.
//!
//! Checked, from the docs of `smtp` ("Memory bounds") and `smtp::session`:
//! - `feed` never reports more consumed than it was given, and never stalls
//!   (consumes nothing and queues nothing) while input is waiting;
//! - undrained events never exceed `MAX_QUEUED_EVENTS` plus what one line
//!   produces ([`EVENTS_PER_LINE`]);
//! - a message handed off is at most `max_message_size` octets, has CRLF
//!   line ends only, and goes with 1..=`max_recipients` recipients;
//! - every path is at most `MAX_PATH` octets; MAIL's `SIZE=` never exceeds
//!   the limit when the driver is asked about it;
//! - the envelope never holds more than `max_recipients` paths;
//! - every reply is well-formed on the wire (see [`crate::assert_wire_reply`])
//!   and carries an enhanced code of its own class, if any;
//! - the error count stays within the cap, and a closed session swallows
//!   input and says nothing more;
//! - up to the first STARTTLS (after which the driver drops what it had read,
//!   so the cut matters by design), the events do not depend on the cut.

use smtpguard::smtp::{
    command::MAX_PATH, handoff::DomainPolicy, AcceptAll, AskDriver, BareLfPolicy, Event, Phase,
    RcptPolicy, Reply, Session, SessionParams, Step, TlsInfo, TlsMode, MAX_QUEUED_EVENTS,
};

/// Most events one input line (or one `decide`) queues: an error reply, then
/// the `421` of the error cap and `Event::Close`.
pub const EVENTS_PER_LINE: usize = 3;

/// One client connection.
#[derive(Debug, Clone)]
pub struct Input {
    /// The session's parameters and recipient policy.
    pub settings: Settings,
    /// Sizes of the driver's successive reads, used in turn (0 reads 1 byte).
    pub reads: Vec<u16>,
    /// The driver's answers to `NeedDecision` and `Message`, used in turn
    /// (none: accept everything).
    pub decisions: Vec<Decision>,
    /// What the client sends.
    pub bytes: Vec<u8>,
}

/// The parts of `SessionParams` and the policy worth varying.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// STARTTLS off, optional or required.
    pub tls_mode: Tls,
    /// Whether a certificate is loaded.
    pub tls_available: bool,
    /// `max_message_size`, octets; small so the limit is reached.
    pub max_message_size: u16,
    /// `max_recipients`.
    pub max_recipients: u8,
    /// `max_errors`; 0 disables the cap.
    pub max_errors: u8,
    /// `BareLfPolicy::Normalize` instead of `Reject`.
    pub normalize_bare_lf: bool,
    /// Which recipient policy the driver gives the session.
    pub policy: Policy,
}

/// `TlsMode`, owned here so it can derive `Arbitrary`.
#[derive(Debug, Clone, Copy)]
pub enum Tls {
    /// `TlsMode::Off`.
    Off,
    /// `TlsMode::Optional`.
    Optional,
    /// `TlsMode::Required`.
    Required,
}

/// The recipient policy.
#[derive(Debug, Clone, Copy)]
pub enum Policy {
    /// `AcceptAll`.
    AcceptAll,
    /// `AskDriver` (upstream mode): every MAIL and RCPT is a decision.
    AskDriver,
    /// `DomainPolicy` for `example.com`, with or without relay rights.
    Domain {
        /// The client is in `relay_networks`.
        relay_allowed: bool,
    },
}

/// How the driver answers a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `250`, no enhanced code (the session fills it in).
    Accept,
    /// `451 4.3.0`.
    TempFail,
    /// `550 5.7.1`.
    Reject,
    /// `421`: the session closes after relaying it.
    Close,
    /// Whatever an upstream might say: any code, a wrong-class enhanced code.
    Odd {
        /// The basic code, possibly out of range.
        code: u16,
        /// A class for the enhanced code, possibly wrong.
        class: u8,
    },
}

/// Length of the header [`Input::from_bytes`] reads before the client's bytes.
pub const HEADER_LEN: usize = 12;

impl Input {
    /// The fuzzer's bytes as a connection: a [`HEADER_LEN`]-byte header,
    /// then exactly what the client sends, so that seeds are plain SMTP
    /// transcripts and dictionary words land in the client's bytes. `None`
    /// when shorter than the header.
    ///
    /// | byte | meaning |
    /// |---|---|
    /// | 0 | TLS mode: 0 off, 1 optional, 2 required (mod 3) |
    /// | 1 | bit 0 TLS available, bit 1 normalise bare LF, bits 2-3 policy: accept all, ask driver, domain, domain with relay |
    /// | 2-3 | `max_message_size`, little-endian |
    /// | 4 | `max_recipients` |
    /// | 5 | `max_errors` |
    /// | 6, 7 | two read sizes, used in turn (0 reads 1 byte) |
    /// | 8 | four decisions, two bits each: accept, 451, 550, 421 |
    /// | 9 | non-zero: a fifth decision, an odd reply of this enhanced class |
    /// | 10-11 | its basic code, little-endian |
    pub fn from_bytes(data: &[u8]) -> Option<Input> {
        let (h, bytes) = data.split_first_chunk::<HEADER_LEN>()?;
        let settings = Settings {
            tls_mode: [Tls::Off, Tls::Optional, Tls::Required][usize::from(h[0] % 3)],
            tls_available: h[1] & 1 != 0,
            normalize_bare_lf: h[1] & 2 != 0,
            policy: match (h[1] >> 2) & 3 {
                0 => Policy::AcceptAll,
                1 => Policy::AskDriver,
                n => Policy::Domain {
                    relay_allowed: n == 3,
                },
            },
            max_message_size: u16::from_le_bytes([h[2], h[3]]),
            max_recipients: h[4],
            max_errors: h[5],
        };
        let mut decisions: Vec<Decision> = (0..4)
            .map(|i| match (h[8] >> (2 * i)) & 3 {
                0 => Decision::Accept,
                1 => Decision::TempFail,
                2 => Decision::Reject,
                _ => Decision::Close,
            })
            .collect();
        if h[9] != 0 {
            decisions.push(Decision::Odd {
                code: u16::from_le_bytes([h[10], h[11]]),
                class: h[9],
            });
        }
        Some(Input {
            settings,
            reads: vec![u16::from(h[6]), u16::from(h[7])],
            decisions,
            bytes: bytes.to_vec(),
        })
    }
}

impl Decision {
    fn reply(self) -> Reply {
        use smtpguard::smtp::EnhancedCode;
        match self {
            Decision::Accept => Reply::new(250, None, "ok"),
            Decision::TempFail => Reply::local_error(),
            Decision::Reject => Reply::relay_denied(),
            Decision::Close => Reply::new(421, None, "upstream closing"),
            Decision::Odd { code, class } => {
                Reply::new(code, Some(EnhancedCode(class, 1, 1)), "odd\r\n250 injected")
            }
        }
    }
}

impl Settings {
    fn params(&self) -> SessionParams {
        let mut p = SessionParams::new("mx.example.net");
        p.tls_mode = match self.tls_mode {
            Tls::Off => TlsMode::Off,
            Tls::Optional => TlsMode::Optional,
            Tls::Required => TlsMode::Required,
        };
        p.tls_available = self.tls_available;
        p.max_message_size = usize::from(self.max_message_size);
        p.max_recipients = usize::from(self.max_recipients);
        p.max_errors = u32::from(self.max_errors);
        p.bare_lf = if self.normalize_bare_lf {
            BareLfPolicy::Normalize
        } else {
            BareLfPolicy::Reject
        };
        p
    }

    fn policy(&self) -> Box<dyn RcptPolicy> {
        match self.policy {
            Policy::AcceptAll => Box::new(AcceptAll),
            Policy::AskDriver => Box::new(AskDriver),
            Policy::Domain { relay_allowed } => {
                Box::new(DomainPolicy::new(["example.com"], relay_allowed))
            }
        }
    }
}

/// Runs the session twice, with the chosen reads and with one read of
/// everything, checking the bounds on every step and that both runs agree
/// up to the first STARTTLS.
pub fn check(input: &Input) {
    let cut = drive(input, &input.reads);
    let whole = drive(input, &[u16::MAX]);
    let until_tls = |events: &[Event]| -> usize {
        events
            .iter()
            .position(|e| matches!(e, Event::StartTls))
            .map_or(events.len(), |i| i + 1)
    };
    let (a, b) = (until_tls(&cut), until_tls(&whole));
    assert_eq!(
        cut[..a],
        whole[..b],
        "events depend on how reads cut the input"
    );
}

/// One connection, driven as the `smtp` module docs say. Returns every
/// event in order.
fn drive(input: &Input, reads: &[u16]) -> Vec<Event> {
    let settings = &input.settings;
    let params = settings.params();
    let mut session = Session::new(params.clone(), settings.policy());
    let mut unread = &input.bytes[..];
    let mut inbuf: Vec<u8> = Vec::new();
    let mut log = Vec::new();
    let mut next_read = 0;
    let mut next_decision = 0;
    let mut closed = false;
    loop {
        // 1. Act on every queued event, in order.
        let batch: Vec<Event> = std::iter::from_fn(|| session.next_event()).collect();
        assert!(
            batch.len() <= MAX_QUEUED_EVENTS + EVENTS_PER_LINE,
            "{} events queued at once",
            batch.len()
        );
        for event in batch {
            check_event(&event, &params);
            match &event {
                Event::Reply(_) => {}
                Event::NeedDecision(_) | Event::Message { .. } => {
                    assert_eq!(session.phase(), Phase::AwaitingDecision);
                    let decision = input
                        .decisions
                        .get(next_decision % input.decisions.len().max(1))
                        .copied()
                        .unwrap_or(Decision::Accept);
                    next_decision += 1;
                    session
                        .decide(decision.reply())
                        .expect("the session awaits this decision");
                }
                Event::StartTls => {
                    assert_eq!(session.phase(), Phase::AwaitingTls);
                    // CVE-2011-0411: nothing read in plaintext carries over.
                    inbuf.clear();
                    session
                        .tls_established(TlsInfo {
                            version: "TLSv1.3".into(),
                            cipher: "TLS13_AES_128_GCM_SHA256".into(),
                        })
                        .expect("the session awaits the handshake");
                }
                Event::Close(_) => closed = true,
            }
            log.push(event);
        }
        check_state(&session, &params);
        if closed {
            assert!(session.is_closed());
            // A closed session swallows input and says nothing more.
            assert_eq!(session.feed(b"NOOP\r\n"), 6);
            assert!(!session.has_events(), "events after Close");
            return log;
        }
        // 2. Feed what is buffered.
        if !inbuf.is_empty() {
            let n = session.feed(&inbuf);
            assert!(
                n <= inbuf.len(),
                "feed consumed {n} of {} bytes",
                inbuf.len()
            );
            inbuf.drain(..n);
            if n > 0 || session.has_events() {
                continue;
            }
            panic!(
                "feed stalled with {} bytes waiting in phase {:?}",
                inbuf.len(),
                session.phase()
            );
        }
        // 3. Read more; at the end of the input the client goes away.
        if unread.is_empty() {
            return log;
        }
        let size = reads.get(next_read % reads.len().max(1)).copied();
        next_read += 1;
        let size = usize::from(size.unwrap_or(u16::MAX).max(1)).min(unread.len());
        inbuf.extend_from_slice(&unread[..size]);
        unread = &unread[size..];
    }
}

fn check_event(event: &Event, params: &SessionParams) {
    match event {
        Event::Reply(reply) => {
            crate::assert_wire_reply(&reply.to_bytes());
            assert!(
                (200..=599).contains(&reply.code),
                "reply code {}",
                reply.code
            );
            if let Some(e) = reply.enhanced {
                assert!(e.is_valid(), "enhanced code {e} is not valid");
                assert_eq!(
                    u16::from(e.class()),
                    reply.code / 100,
                    "enhanced {e} on {}",
                    reply.code
                );
            }
        }
        Event::NeedDecision(Step::Mail {
            reverse_path,
            params: mail,
        }) => {
            assert!(reverse_path.to_string().len() <= MAX_PATH, "{reverse_path}");
            if let Some(size) = mail.size {
                assert!(
                    size <= params.max_message_size as u64,
                    "SIZE={size} asked about"
                );
            }
        }
        Event::NeedDecision(Step::Rcpt { forward_path }) => {
            assert!(forward_path.to_string().len() <= MAX_PATH, "{forward_path}");
        }
        Event::Message { envelope, data } => {
            assert!(
                data.len() <= params.max_message_size,
                "message of {} octets over {}",
                data.len(),
                params.max_message_size
            );
            assert_crlf_only(data);
            let n = envelope.forward_paths.len();
            assert!(
                (1..=params.max_recipients).contains(&n),
                "message with {n} recipients"
            );
            for path in &envelope.forward_paths {
                assert!(path.to_string().len() <= MAX_PATH, "{path}");
            }
            assert!(envelope.reverse_path.to_string().len() <= MAX_PATH);
        }
        Event::StartTls | Event::Close(_) => {}
    }
}

fn check_state(session: &Session, params: &SessionParams) {
    if let Some(envelope) = session.envelope() {
        assert!(envelope.forward_paths.len() <= params.max_recipients);
    }
    if params.max_errors > 0 {
        assert!(
            session.errors() <= params.max_errors,
            "{} errors with a cap of {}",
            session.errors(),
            params.max_errors
        );
    }
}

/// Every CR is followed by LF and every LF preceded by CR, and a non-empty
/// message ends with CRLF.
fn assert_crlf_only(data: &[u8]) {
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(data.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            b'\n' => assert!(i > 0 && data[i - 1] == b'\r', "bare LF at {i}"),
            _ => {}
        }
    }
    assert!(
        data.is_empty() || data.ends_with(b"\r\n"),
        "message does not end in CRLF"
    );
}
