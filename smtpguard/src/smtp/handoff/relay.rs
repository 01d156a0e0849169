//! Spool-mode relay rules: which recipients a client may send to.

use std::collections::HashSet;

use crate::smtp::{Envelope, ForwardPath, RcptDecision, RcptPolicy, Reply};

/// Spool-mode relay check: a recipient is accepted when its domain is one
/// of `accept_domains` (exact, case-insensitive, no subdomains), when it is
/// the bare `<postmaster>`, or when the client may relay (its address is in
/// `relay_networks`, decided by the driver). Otherwise `550 5.7.1 Relay
/// access denied`. A local part that routes on by itself (`%`, `!`, or an
/// `@` inside quotes: `user%other.example@local`, `other!user@local`) is
/// refused too unless the client may relay: an MTA that re-injects the
/// spooled mail may honour that routing and relay for anyone (Postfix's
/// `reject_unauth_destination` refuses it the same way).
#[derive(Debug, Clone, Default)]
pub struct DomainPolicy {
    domains: HashSet<String>,
    relay_allowed: bool,
}

impl DomainPolicy {
    /// `accept_domains` as configured; `relay_allowed` when the client's
    /// address is in `relay_networks`.
    pub fn new<I, S>(accept_domains: I, relay_allowed: bool) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        DomainPolicy {
            domains: accept_domains
                .into_iter()
                .map(|d| d.as_ref().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            relay_allowed,
        }
    }
}

impl RcptPolicy for DomainPolicy {
    fn rcpt(&mut self, forward_path: &ForwardPath, _: &Envelope) -> RcptDecision {
        if self.relay_allowed {
            return RcptDecision::Accept;
        }
        match forward_path {
            ForwardPath::Postmaster => RcptDecision::Accept,
            ForwardPath::Mailbox(m) if m.local_part().contains(['%', '!', '@']) => {
                RcptDecision::Reject(Reply::relay_denied())
            }
            ForwardPath::Mailbox(m) if self.domains.contains(&m.domain().to_ascii_lowercase()) => {
                RcptDecision::Accept
            }
            ForwardPath::Mailbox(_) => RcptDecision::Reject(Reply::relay_denied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::ReversePath;

    #[test]
    fn source_routed_local_parts_do_not_relay_through_an_accepted_domain() {
        let mut policy = DomainPolicy::new(["example.com"], false);
        let envelope = Envelope {
            reverse_path: ReversePath::Null,
            forward_paths: Vec::new(),
            body: None,
            declared_size: None,
        };
        for (path, accepted) in [
            ("<user@example.com>", true),
            ("<user%other.example@example.com>", false),
            ("<other.example!user@example.com>", false),
            ("<user!other.example@example.com>", false),
            ("<\"user@other.example\"@example.com>", false),
            ("<user@other.example>", false),
        ] {
            let forward = crate::smtp::command::parse_rcpt(&format!("TO:{path}")).unwrap();
            let decision = policy.rcpt(&forward, &envelope);
            assert_eq!(matches!(decision, RcptDecision::Accept), accepted, "{path}");
        }
        // A client in relay_networks may route as it likes.
        let mut relay = DomainPolicy::new(["example.com"], true);
        let forward =
            crate::smtp::command::parse_rcpt("TO:<user%other.example@example.com>").unwrap();
        assert!(matches!(
            relay.rcpt(&forward, &envelope),
            RcptDecision::Accept
        ));
    }
}
