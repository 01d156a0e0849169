//! Recipient policy: what the session asks, synchronously, before it
//! accepts a MAIL or RCPT. The spool's relay rules (`DomainPolicy`) live
//! with the hand-off that uses them.

use super::command::{ForwardPath, MailParams, ReversePath};
use super::reply::Reply;
use super::vocabulary::Envelope;

/// What a [`RcptPolicy`] decides about one MAIL or RCPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptDecision {
    /// Accept (`250 2.1.0` for MAIL, `250 2.1.5` for RCPT).
    Accept,
    /// Reject with this reply (4xx/5xx; normalised like a decision).
    Reject(Reply),
    /// Let the driver decide: the session emits
    /// [`Event::NeedDecision`](super::Event::NeedDecision).
    Ask,
}

/// Recipient (and sender) policy consulted synchronously by the session.
///
/// Spool mode uses [`DomainPolicy`](super::handoff::DomainPolicy); upstream
/// mode uses [`AskDriver`] so every MAIL and RCPT is relayed to the
/// upstream MTA and its reply decides.
/// The driver builds one per session and can capture per-connection facts
/// (e.g. whether the client address is in `relay_networks`).
pub trait RcptPolicy: Send {
    /// MAIL FROM; accepted by default.
    fn mail(&mut self, reverse_path: &ReversePath, params: &MailParams) -> RcptDecision {
        let _ = (reverse_path, params);
        RcptDecision::Accept
    }
    /// RCPT TO, with the envelope so far.
    fn rcpt(&mut self, forward_path: &ForwardPath, envelope: &Envelope) -> RcptDecision;
}

/// Accepts everything (tests, or a trusted submission port).
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl RcptPolicy for AcceptAll {
    fn rcpt(&mut self, _: &ForwardPath, _: &Envelope) -> RcptDecision {
        RcptDecision::Accept
    }
}

/// Defers every MAIL and RCPT to the driver (upstream mode).
#[derive(Debug, Clone, Copy, Default)]
pub struct AskDriver;

impl RcptPolicy for AskDriver {
    fn mail(&mut self, _: &ReversePath, _: &MailParams) -> RcptDecision {
        RcptDecision::Ask
    }
    fn rcpt(&mut self, _: &ForwardPath, _: &Envelope) -> RcptDecision {
        RcptDecision::Ask
    }
}
