//! The hand-off as the connection driver sees it: [`HandoffFactory`] makes
//! one [`Handoff`] per session. [`Delivery`] and [`DeliverySession`] are
//! the production pair; tests plug in their own.

use std::future::Future;
use std::net::IpAddr;

use super::{ClientInfo, Delivery, DeliverySession};
use crate::smtp::{Envelope, ForwardPath, MailParams, RcptPolicy, Reply, ReversePath};

/// The hand-off of one session, as the driver uses it. Implemented for
/// [`DeliverySession`]; tests plug in their own.
///
/// Every method returns the [`Reply`] for the client (passed to
/// [`Session::decide`](crate::smtp::Session::decide), which normalises it).
pub trait Handoff: Send {
    /// The RCPT policy the session consults synchronously.
    fn rcpt_policy(&self) -> Box<dyn RcptPolicy>;
    /// `Event::NeedDecision(Step::Mail)`.
    fn mail(
        &mut self,
        client: &ClientInfo,
        from: &ReversePath,
        params: &MailParams,
    ) -> impl Future<Output = Reply> + Send;
    /// `Event::NeedDecision(Step::Rcpt)`.
    fn rcpt(&mut self, client: &ClientInfo, to: &ForwardPath)
        -> impl Future<Output = Reply> + Send;
    /// `Event::Message`: a 2xx only once the message is safe.
    fn message(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
        data: &[u8],
    ) -> impl Future<Output = Reply> + Send;
    /// The session is over (called after the client connection is closed).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// The open upstream connection, `local -> remote`, for `smtpguard
    /// sessions`; `None` without one (spool mode, or not connected).
    fn upstream(&self) -> Option<String> {
        None
    }
}

/// Makes one [`Handoff`] per session; the server holds one for its life.
pub trait HandoffFactory: Send + Sync + 'static {
    /// The per-session hand-off.
    type Session: Handoff + 'static;
    /// A hand-off for a session from `client` (normalised address).
    fn session(&self, client: IpAddr) -> Self::Session;
}

/// The production factory: a session's relay rights come from
/// `relay_networks` (spool mode), see [`Delivery::session`].
impl HandoffFactory for Delivery {
    type Session = DeliverySession;
    fn session(&self, client: IpAddr) -> DeliverySession {
        Delivery::session(self, client)
    }
}

impl Handoff for DeliverySession {
    fn rcpt_policy(&self) -> Box<dyn RcptPolicy> {
        DeliverySession::rcpt_policy(self)
    }
    fn mail(
        &mut self,
        client: &ClientInfo,
        from: &ReversePath,
        params: &MailParams,
    ) -> impl Future<Output = Reply> + Send {
        DeliverySession::mail(self, client, from, params)
    }
    fn rcpt(
        &mut self,
        client: &ClientInfo,
        to: &ForwardPath,
    ) -> impl Future<Output = Reply> + Send {
        DeliverySession::rcpt(self, client, to)
    }
    fn message(
        &mut self,
        client: &ClientInfo,
        envelope: &Envelope,
        data: &[u8],
    ) -> impl Future<Output = Reply> + Send {
        DeliverySession::message(self, client, envelope, data)
    }
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        DeliverySession::close(self)
    }
    fn upstream(&self) -> Option<String> {
        DeliverySession::upstream(self)
    }
}
