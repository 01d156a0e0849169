//! The sans-IO SMTP server session. See the [module docs](super) for the
//! protocol the driver follows.

use std::collections::VecDeque;
use std::fmt;

use super::command::{self, ArgError, ForwardPath, MailParams, ReversePath, Verb};
use super::data::{
    self, BareLfPolicy, DataOutcome, DataReader, Framed, LineBuffer, COMMAND_LINE_MAX,
    DATA_LINE_MAX,
};
use super::rcpt_policy::{RcptDecision, RcptPolicy};
use super::reply::{EnhancedCode, Reply};
use super::vocabulary::{
    CloseReason, Envelope, Event, Helo, Phase, SessionParams, Step, TlsInfo, TlsMode,
};

/// NOOP/RSET/VRFY/HELP and repeated EHLO/HELO allowed per message before each further one also
/// counts as an error (Postfix's `smtpd_junk_command_limit`): bounds how
/// long a client can keep a session busy without sending mail.
pub const JUNK_COMMAND_LIMIT: u32 = 100;
/// [`Session::feed`] stops consuming input while this many events are
/// queued and undrained, so the event queue stays bounded too.
pub const MAX_QUEUED_EVENTS: usize = 64;

/// Misuse of the session API by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// `decide` called with no decision pending.
    #[error("no decision is pending")]
    NotAwaitingDecision,
    /// `tls_established` called without a preceding `Event::StartTls`.
    #[error("no STARTTLS is pending")]
    NotAwaitingTls,
}

enum Pending {
    Mail {
        reverse_path: ReversePath,
        params: MailParams,
    },
    Rcpt(ForwardPath),
    Message,
}

enum State {
    Command,
    Data(Box<DataReader>),
    Awaiting(Pending),
    AwaitingTls,
    Closed,
}

/// One SMTP server session. See the [module docs](super).
pub struct Session {
    params: SessionParams,
    policy: Box<dyn RcptPolicy>,
    state: State,
    line: LineBuffer,
    events: VecDeque<Event>,
    helo: Option<Helo>,
    tls: Option<TlsInfo>,
    txn: Option<Envelope>,
    errors: u32,
    junk: u32,
    messages: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("params", &self.params)
            .field("phase", &self.phase())
            .field("helo", &self.helo)
            .field("tls", &self.tls)
            .field("envelope", &self.txn)
            .field("errors", &self.errors)
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Start a session; the greeting `220 <host> ESMTP smtpguard` is the
    /// first queued event.
    pub fn new(params: SessionParams, policy: Box<dyn RcptPolicy>) -> Session {
        let mut s = Session {
            policy,
            state: State::Command,
            line: LineBuffer::new(),
            events: VecDeque::new(),
            helo: None,
            tls: None,
            txn: None,
            errors: 0,
            junk: 0,
            messages: 0,
            params,
        };
        s.reply(Reply::greeting(&s.params.hostname));
        s
    }

    // ----- input -----------------------------------------------------------

    /// Feed bytes read from the client. Returns how many were consumed; the
    /// driver keeps the rest and feeds them again after draining the events
    /// (and answering any [`Event::NeedDecision`] / [`Event::Message`]).
    ///
    /// Consumption stops right after a line that needs a decision, and
    /// whenever [`MAX_QUEUED_EVENTS`] events are waiting. After STARTTLS and
    /// after close, everything given is consumed and thrown away.
    pub fn feed(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                State::AwaitingTls => {
                    tracing::warn!(
                        bytes = input.len() - pos,
                        "discarding plaintext pipelined after STARTTLS"
                    );
                    return input.len();
                }
                State::Closed => return input.len(),
                State::Awaiting(_) => return pos,
                State::Command | State::Data(_) => {}
            }
            if self.events.len() >= MAX_QUEUED_EVENTS {
                return pos;
            }
            let limit = match self.state {
                State::Data(_) => DATA_LINE_MAX,
                _ => COMMAND_LINE_MAX,
            };
            let (n, framed) = self.line.push(&input[pos..], limit);
            pos += n;
            match framed {
                None => {}
                Some(Framed::Line) => {
                    let line = self.line.take();
                    self.on_line(&line);
                    self.line.restore(line);
                }
                Some(Framed::Overlong { crlf }) => self.on_overlong(crlf),
            }
        }
        pos
    }

    /// The next thing for the driver to do, in order.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether events are waiting to be drained.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Answer the pending [`Event::NeedDecision`] or [`Event::Message`].
    ///
    /// A 2xx accepts (starts the transaction / adds the recipient / counts
    /// the message delivered), a 4xx/5xx rejects; the reply is relayed to
    /// the client either way. It is normalised first (see
    /// [`Reply::normalized`]): a missing or wrong-class enhanced code is
    /// filled in (2.1.0 MAIL, 2.1.5 RCPT, 2.0.0 message; X.0.0 for
    /// failures), a nonsense code becomes `451 4.3.0`. A `421` closes the
    /// session after it. Rejections count toward the error cap.
    pub fn decide(&mut self, reply: Reply) -> Result<(), SessionError> {
        let pending = match std::mem::replace(&mut self.state, State::Command) {
            State::Awaiting(p) => p,
            other => {
                self.state = other;
                return Err(SessionError::NotAwaitingDecision);
            }
        };
        let success = match pending {
            Pending::Mail { .. } => EnhancedCode(2, 1, 0),
            Pending::Rcpt(_) => EnhancedCode(2, 1, 5),
            Pending::Message => EnhancedCode(2, 0, 0),
        };
        let reply = reply.normalized(success);
        if reply.is_positive() {
            match pending {
                Pending::Mail {
                    reverse_path,
                    params,
                } => self.start_transaction(reverse_path, params),
                Pending::Rcpt(fp) => {
                    if let Some(txn) = &mut self.txn {
                        txn.forward_paths.push(fp);
                    }
                }
                Pending::Message => {
                    self.messages += 1;
                    self.junk = 0;
                }
            }
        }
        self.finish_reply(reply);
        Ok(())
    }

    /// The TLS handshake after [`Event::StartTls`] succeeded. The session is
    /// reset to its state before EHLO (RFC 3207 §4.2): the client must
    /// EHLO again; the error count is kept.
    pub fn tls_established(&mut self, info: TlsInfo) -> Result<(), SessionError> {
        if !matches!(self.state, State::AwaitingTls) {
            return Err(SessionError::NotAwaitingTls);
        }
        self.tls = Some(info);
        self.helo = None;
        self.txn = None;
        self.line.reset();
        self.state = State::Command;
        Ok(())
    }

    /// The driver's inactivity timer fired: queues
    /// `421 4.4.2 <host> Error: timeout exceeded` and [`Event::Close`].
    /// No-op once closed.
    pub fn timeout(&mut self) {
        let r = Reply::timeout(&self.params.hostname);
        self.close_with(r, CloseReason::Timeout);
    }

    /// The daemon is shutting down: `421 4.3.2 <host> Service shutting down`
    /// and [`Event::Close`]. Any pending transaction is dropped (if a
    /// message is being handed off, the driver should let that finish and
    /// call `decide` first). No-op once closed.
    pub fn shutdown(&mut self) {
        let r = Reply::shutting_down(&self.params.hostname);
        self.close_with(r, CloseReason::Shutdown);
    }

    /// The operator denied the client's address: `421 4.7.1 <host> Closing:
    /// your address was denied` and [`Event::Close`]. No-op once closed.
    pub fn kicked(&mut self) {
        let r = Reply::kicked(&self.params.hostname);
        self.close_with(r, CloseReason::Kicked);
    }

    /// The operator ended the session (`smtpguard kick`): `421 4.7.0 <host>
    /// Closing: session ended by the operator` and [`Event::Close`]. No-op
    /// once closed.
    pub fn kicked_by_operator(&mut self) {
        let r = Reply::kicked_by_operator(&self.params.hostname);
        self.close_with(r, CloseReason::Kicked);
    }

    // ----- introspection ----------------------------------------------------

    /// Current phase.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Command => Phase::Command,
            State::Data(_) => Phase::Data,
            State::Awaiting(_) => Phase::AwaitingDecision,
            State::AwaitingTls => Phase::AwaitingTls,
            State::Closed => Phase::Closed,
        }
    }
    /// Whether [`Event::Close`] has been queued.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }
    /// The parameters the session was built with.
    pub fn params(&self) -> &SessionParams {
        &self.params
    }
    /// HELO/EHLO of the client (cleared by STARTTLS).
    pub fn helo(&self) -> Option<&Helo> {
        self.helo.as_ref()
    }
    /// TLS details once STARTTLS completed.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }
    /// The current transaction's envelope (None outside a transaction, and
    /// while a message is out for hand-off: it travels in [`Event::Message`]).
    pub fn envelope(&self) -> Option<&Envelope> {
        self.txn.as_ref()
    }
    /// Error replies sent so far.
    pub fn errors(&self) -> u32 {
        self.errors
    }
    /// Messages accepted (decided 2xx) so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    // ----- internals --------------------------------------------------------

    fn reply(&mut self, r: Reply) {
        self.events.push_back(Event::Reply(r));
    }

    /// Queue a reply that answers a client command: negative replies count
    /// as errors, and a 421 closes.
    fn finish_reply(&mut self, r: Reply) {
        if r.is_closing() {
            self.close_with(r, CloseReason::ClosingReply);
        } else if r.is_negative() {
            self.error(r);
        } else {
            self.reply(r);
        }
    }

    /// Queue an error reply, and close if the cap is reached.
    fn error(&mut self, r: Reply) {
        self.reply(r);
        self.count_error();
    }

    fn count_error(&mut self) {
        self.errors = self.errors.saturating_add(1);
        if self.params.max_errors > 0 && self.errors >= self.params.max_errors {
            tracing::debug!(errors = self.errors, "SMTP error cap reached");
            let r = Reply::too_many_errors(&self.params.hostname);
            self.close_with(r, CloseReason::TooManyErrors);
        }
    }

    fn close_with(&mut self, r: Reply, reason: CloseReason) {
        if self.is_closed() {
            return;
        }
        self.reply(r);
        self.events.push_back(Event::Close(reason));
        self.state = State::Closed;
        self.txn = None;
        self.line.reset();
    }

    fn start_transaction(&mut self, reverse_path: ReversePath, params: MailParams) {
        self.txn = Some(Envelope {
            reverse_path,
            forward_paths: Vec::new(),
            body: params.body,
            declared_size: params.size,
        });
    }

    fn on_overlong(&mut self, crlf: bool) {
        match &mut self.state {
            State::Data(reader) => reader.overlong(crlf),
            _ => self.error(Reply::line_too_long()),
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        if let State::Data(reader) = &mut self.state {
            if let Some(outcome) = reader.line(line) {
                self.end_of_data(outcome);
            }
            return;
        }
        let (content, crlf) = data::split_terminator(line);
        if !crlf && self.params.bare_lf == BareLfPolicy::Reject {
            return self.error(Reply::bare_lf_command());
        }
        let Some((verb, args)) = command::split_line(content) else {
            return self.error(Reply::bad_command_line());
        };
        self.command(verb, args);
    }

    fn end_of_data(&mut self, outcome: DataOutcome) {
        self.state = State::Command;
        let envelope = self.txn.take();
        match (outcome, envelope) {
            (DataOutcome::Message(data), Some(envelope)) => {
                self.state = State::Awaiting(Pending::Message);
                self.events.push_back(Event::Message { envelope, data });
            }
            (DataOutcome::Message(_), None) => unreachable!("DATA without a transaction"),
            (DataOutcome::BareLineEnding, _) => {
                tracing::info!("message with bare LF/CR rejected (SMTP smuggling defence)");
                self.error(Reply::bare_line_ending())
            }
            (DataOutcome::LineTooLong, _) => self.error(Reply::line_too_long()),
            (DataOutcome::TooBig, _) => self.error(Reply::message_too_big()),
        }
    }

    fn tls_active(&self) -> bool {
        self.tls.is_some()
    }

    fn junk_command(&mut self) {
        self.junk = self.junk.saturating_add(1);
        if self.junk > JUNK_COMMAND_LIMIT {
            self.count_error();
        }
    }

    fn command(&mut self, verb: Verb, args: &str) {
        match verb {
            Verb::Unknown => return self.error(Reply::unknown_command()),
            Verb::Http => {
                tracing::debug!("HTTP request on the SMTP port");
                let r = Reply::http_request(&self.params.hostname);
                return self.close_with(r, CloseReason::HttpRequest);
            }
            _ => {}
        }
        if self.params.tls_mode == TlsMode::Required
            && !self.tls_active()
            && !verb.allowed_before_tls()
        {
            return self.error(Reply::tls_required());
        }
        match verb {
            Verb::Ehlo | Verb::Helo => self.cmd_helo(verb == Verb::Ehlo, args),
            Verb::StartTls => self.cmd_starttls(args),
            Verb::Mail => self.cmd_mail(args),
            Verb::Rcpt => self.cmd_rcpt(args),
            Verb::Data => self.cmd_data(args),
            Verb::Rset => {
                if !args.is_empty() {
                    return self.error(Reply::syntax("Syntax: RSET"));
                }
                self.txn = None;
                self.reply(Reply::ok());
                self.junk_command();
            }
            Verb::Noop => {
                // RFC 5321 §4.1.1.9: a parameter is allowed and ignored.
                self.reply(Reply::ok());
                self.junk_command();
            }
            Verb::Quit => {
                if !args.is_empty() {
                    return self.error(Reply::syntax("Syntax: QUIT"));
                }
                self.close_with(Reply::bye(), CloseReason::Quit);
            }
            Verb::Help => {
                self.reply(Reply::help());
                self.junk_command();
            }
            Verb::Vrfy => {
                if args.is_empty() {
                    return self.error(Reply::syntax("Syntax: VRFY address"));
                }
                self.reply(Reply::cannot_vrfy());
                self.junk_command();
            }
            Verb::NotImplemented => self.error(Reply::not_implemented()),
            Verb::Unknown | Verb::Http => unreachable!(),
        }
    }

    fn cmd_helo(&mut self, extended: bool, args: &str) {
        let Some(name) = args.split([' ', '\t']).next().filter(|n| !n.is_empty()) else {
            let r = if extended {
                Reply::syntax("Syntax: EHLO hostname")
            } else {
                Reply::syntax("Syntax: HELO hostname")
            };
            return self.error(r);
        };
        // RFC 5321 §4.1.4: a (new) EHLO/HELO resets any transaction.
        self.txn = None;
        // A repeat (not the first, nor the one after STARTTLS) is junk: it
        // must not keep a slot busy forever.
        let repeated = self.helo.is_some();
        self.helo = Some(Helo {
            name: name.to_string(),
            extended,
        });
        let host = &self.params.hostname;
        let r = if extended {
            let mut ext = vec![
                "PIPELINING".to_string(),
                format!("SIZE {}", self.params.max_message_size),
            ];
            if self.params.tls_mode != TlsMode::Off
                && self.params.tls_available
                && !self.tls_active()
            {
                ext.push("STARTTLS".to_string());
            }
            ext.push("ENHANCEDSTATUSCODES".to_string());
            ext.push("8BITMIME".to_string());
            Reply::ehlo(host, &ext)
        } else {
            Reply::helo(host)
        };
        self.reply(r);
        if repeated {
            self.junk_command();
        }
    }

    fn cmd_starttls(&mut self, args: &str) {
        if !args.is_empty() {
            return self.error(Reply::syntax("Syntax: STARTTLS"));
        }
        if self.params.tls_mode == TlsMode::Off {
            return self.error(Reply::not_implemented());
        }
        if self.tls_active() {
            return self.error(Reply::bad_sequence("TLS already active"));
        }
        if !self.params.tls_available {
            return self.error(Reply::tls_unavailable());
        }
        if self.txn.is_some() {
            return self.error(Reply::bad_sequence("MAIL transaction in progress"));
        }
        self.reply(Reply::ready_to_start_tls());
        self.events.push_back(Event::StartTls);
        self.state = State::AwaitingTls;
        self.line.reset();
    }

    fn cmd_mail(&mut self, args: &str) {
        if self.helo.is_none() {
            return self.error(Reply::bad_sequence("send HELO/EHLO first"));
        }
        if self.txn.is_some() {
            return self.error(Reply::bad_sequence("nested MAIL command"));
        }
        let (reverse_path, params) = match command::parse_mail(args) {
            Ok(v) => v,
            Err(e) => {
                let r = match e {
                    ArgError::Syntax => Reply::syntax("Syntax: MAIL FROM:<address>"),
                    ArgError::BadPath => Reply::bad_sender_syntax(),
                    ArgError::BadParam => Reply::syntax("Bad MAIL parameter"),
                    ArgError::UnknownParam(k) => Reply::unsupported_parameter(&k),
                };
                return self.error(r);
            }
        };
        if params
            .size
            .is_some_and(|s| s > self.params.max_message_size as u64)
        {
            return self.error(Reply::message_too_big());
        }
        match self.policy.mail(&reverse_path, &params) {
            RcptDecision::Accept => {
                self.start_transaction(reverse_path, params);
                self.reply(Reply::sender_ok());
            }
            RcptDecision::Reject(r) => self.finish_reply(reject(r)),
            RcptDecision::Ask => {
                self.events.push_back(Event::NeedDecision(Step::Mail {
                    reverse_path: reverse_path.clone(),
                    params,
                }));
                self.state = State::Awaiting(Pending::Mail {
                    reverse_path,
                    params,
                });
            }
        }
    }

    fn cmd_rcpt(&mut self, args: &str) {
        if self.txn.is_none() {
            return self.error(Reply::bad_sequence("need MAIL command"));
        }
        let forward_path = match command::parse_rcpt(args) {
            Ok(v) => v,
            Err(e) => {
                let r = match e {
                    ArgError::Syntax => Reply::syntax("Syntax: RCPT TO:<address>"),
                    ArgError::BadPath => Reply::bad_recipient_syntax(),
                    ArgError::BadParam => Reply::syntax("Bad RCPT parameter"),
                    ArgError::UnknownParam(k) => Reply::unsupported_parameter(&k),
                };
                return self.error(r);
            }
        };
        let Some(txn) = &self.txn else { unreachable!() };
        if txn.forward_paths.len() >= self.params.max_recipients {
            // Flow control, not misbehaviour (RFC 5321 §4.5.3.1.10: the
            // client sends the rest in another transaction): not an error.
            return self.reply(Reply::too_many_recipients());
        }
        match self.policy.rcpt(&forward_path, txn) {
            RcptDecision::Accept => {
                if let Some(txn) = &mut self.txn {
                    txn.forward_paths.push(forward_path);
                }
                self.reply(Reply::recipient_ok());
            }
            RcptDecision::Reject(r) => self.finish_reply(reject(r)),
            RcptDecision::Ask => {
                self.events.push_back(Event::NeedDecision(Step::Rcpt {
                    forward_path: forward_path.clone(),
                }));
                self.state = State::Awaiting(Pending::Rcpt(forward_path));
            }
        }
    }

    fn cmd_data(&mut self, args: &str) {
        if !args.is_empty() {
            return self.error(Reply::syntax("Syntax: DATA"));
        }
        match &self.txn {
            None => self.error(Reply::bad_sequence("need MAIL command")),
            Some(t) if t.forward_paths.is_empty() => self.error(Reply::no_valid_recipients()),
            Some(_) => {
                self.reply(Reply::start_data());
                self.state = State::Data(Box::new(DataReader::new(
                    self.params.max_message_size,
                    self.params.bare_lf,
                )));
            }
        }
    }
}

/// A policy rejection: must be negative; normalised like a decision.
fn reject(r: Reply) -> Reply {
    if r.is_negative() {
        r.normalized(EnhancedCode(2, 0, 0))
    } else {
        Reply::local_error()
    }
}

#[cfg(test)]
mod tests;
