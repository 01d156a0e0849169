//! Automatic bans, sans IO: which violations turn a client into a
//! temporary deny entry of the `auto` source, and for how long.
//!
//! A client is banned when it commits `ban_after` violations within
//! `window` (fail2ban's maxretry/findtime). Its first ban lasts `ban_for`;
//! each later one `growth` times the one before, up to `max_ban_for`
//! (fail2ban's bantime.increment). A client's earlier bans are remembered
//! for `max_ban_for` plus a day after its last one. The caller applies a
//! ban (the daemon writes the deny entry); this module only decides, from
//! the clock it is given, and holds at most [`MAX_TRACKED`] clients.
//!
//! At the cap on bans in force (`max_entries`) a new ban is refused:
//! evicting an older ban would let a flood of distinct sources free the
//! worst offenders.
//!
//! The caller reports every [`BanDecision::Ban`] back, with
//! [`BanBook::ban_written`] or [`BanBook::ban_failed`]; until then the
//! client's violations make no second ban ([`BanDecision::Pending`]). A
//! decision never reported stops holding back after a minute and counts as
//! failed.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    time::{Duration, Instant},
};

use ipnet::IpNet;

/// Clients whose violations (and earlier bans) are remembered at once; a
/// flood of distinct sources forgets the oldest first.
pub const MAX_TRACKED: usize = 65_536;

/// How long a client's earlier bans count for growth after the
/// `max_ban_for` of its last one.
const REPEAT_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// After a ban whose write failed, the client's next ban is not tried
/// before this: a cause that stays (a full kernel table, a list file edited
/// by hand) must not cost a whole list write on every violation.
pub const BAN_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A ban decided but never reported written or failed (its writer died)
/// stops holding back the client's next ban after this.
const PENDING_AT_MOST: Duration = Duration::from_secs(60);

/// Something a client did that counts towards a ban.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Violation {
    /// It talked before the greeting (postscreen's PREGREET).
    Pregreet,
    /// Its session reached `server.max_errors` and was closed.
    ProtocolErrors,
    /// It asked to relay: RCPT to a domain that is not accepted, from an
    /// address outside `relay_networks`.
    RelayAttempt,
    /// Its SYNs went over the XDP rate limit (`[rate_limit]`).
    RateLimit,
    /// Its DNSBL score reached the threshold.
    Dnsbl,
}

impl Violation {
    /// The name in logs (`reason=`), entry comments and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::Pregreet => "pregreet",
            Violation::ProtocolErrors => "protocol_errors",
            Violation::RelayAttempt => "relay_attempt",
            Violation::RateLimit => "rate_limit",
            Violation::Dnsbl => "dnsbl",
        }
    }
}

/// The ban rules, from `[bans]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanPolicy {
    /// Violations within `window` that ban a client.
    pub ban_after: NonZeroU32,
    /// How far back violations count.
    pub window: Duration,
    /// The first ban's length.
    pub ban_for: Duration,
    /// Factor from one ban of a client to its next (1: no growth).
    pub growth: u32,
    /// The longest ban.
    pub max_ban_for: Duration,
    /// Bans in force at once.
    pub max_entries: usize,
}

/// What one violation leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BanDecision {
    /// Counted; not (yet) a ban.
    Counted {
        /// Violations of the client within the window, this one included.
        strikes: u32,
    },
    /// Ban `prefix` for `duration`.
    Ban {
        /// The client: its address as a host prefix (/32 or /128), or the
        /// prefix it was counted as.
        prefix: IpNet,
        /// How long.
        duration: Duration,
        /// Earlier bans of the client still remembered (0 for a first).
        repeats: u32,
    },
    /// A ban was due, but `max_entries` bans are in force.
    RefusedFull,
    /// A ban of the client is being written (decided, not yet reported
    /// with [`BanBook::ban_written`] or [`BanBook::ban_failed`]): the
    /// violation is counted by the caller, not towards another ban, so
    /// that violations arriving together make one ban, not a longer second.
    Pending,
}

#[derive(Debug, Default)]
struct Record {
    /// Times of the violations within the window, oldest first, at most
    /// `ban_after`.
    strikes: Vec<Instant>,
    /// Bans so far and when the last one was decided.
    bans: u32,
    last_ban: Option<Instant>,
    /// `last_ban` before the latest ban decision, for [`BanBook::ban_failed`].
    previous_ban: Option<Instant>,
    /// No ban is decided before this (a ban write failed).
    retry_at: Option<Instant>,
    /// When a ban was decided whose write has not reported yet.
    pending: Option<Instant>,
    last_seen: Option<Instant>,
}

/// The violation counts per client; one per daemon.
#[derive(Debug)]
pub struct BanBook {
    policy: BanPolicy,
    clients: HashMap<IpNet, Record>,
}

impl BanBook {
    /// An empty book under `policy`.
    pub fn new(policy: BanPolicy) -> BanBook {
        BanBook {
            policy,
            clients: HashMap::new(),
        }
    }

    /// The rules in force.
    pub fn policy(&self) -> &BanPolicy {
        &self.policy
    }

    /// Replaces the rules (a reload); counts so far stay.
    pub fn set_policy(&mut self, policy: BanPolicy) {
        self.policy = policy;
    }

    /// Counts one violation of `client` at `now`; `bans_in_force` is the
    /// number of bans (entries of the `auto` deny list) in force now.
    /// The caller checks protected and permitted addresses first: this
    /// bans whoever it is told about.
    pub fn record(&mut self, client: IpAddr, now: Instant, bans_in_force: usize) -> BanDecision {
        self.record_prefix(IpNet::from(client.to_canonical()), now, bans_in_force)
    }

    /// [`BanBook::record`] for a client that is a prefix: the IPv6 group
    /// the XDP rate limit counts as one client (`rate_limit.ipv6_prefix`).
    /// The ban then covers the whole prefix.
    pub fn record_prefix(
        &mut self,
        client: IpNet,
        now: Instant,
        bans_in_force: usize,
    ) -> BanDecision {
        let client = client.trunc();
        if !self.clients.contains_key(&client) && self.clients.len() >= MAX_TRACKED {
            self.forget_oldest(now);
        }
        let policy = &self.policy;
        let record = self.clients.entry(client).or_default();
        record.last_seen = Some(now);
        if record.pending_at(now) {
            return BanDecision::Pending;
        }
        if record.pending.is_some() {
            // Its writer died: the ban most likely never took effect.
            record.take_back();
        }
        if record
            .last_ban
            .is_some_and(|t| now.saturating_duration_since(t) > policy.max_ban_for + REPEAT_MEMORY)
        {
            record.bans = 0;
            record.last_ban = None;
        }
        record
            .strikes
            .retain(|t| now.saturating_duration_since(*t) < policy.window);
        record.strikes.push(now);
        let strikes = record.strikes.len() as u32;
        if strikes < policy.ban_after.get() {
            return BanDecision::Counted { strikes };
        }
        if record.retry_at.is_some_and(|t| now < t) {
            // A ban failed a moment ago: count, and keep one short.
            record.strikes.remove(0);
            return BanDecision::Counted {
                strikes: strikes - 1,
            };
        }
        // Bans decided and not yet written count against the cap too, so
        // that violations of many clients at once cannot pass it. Counted
        // only when a ban is due, which is rare.
        let in_flight = self.bans_in_flight(now);
        let policy = &self.policy;
        let record = self.clients.get_mut(&client).expect("recorded above");
        if bans_in_force + in_flight >= policy.max_entries {
            // Keep the strikes: the next violation tries again.
            record.strikes.remove(0);
            return BanDecision::RefusedFull;
        }
        record.strikes.clear();
        let repeats = record.bans;
        record.bans = record.bans.saturating_add(1);
        record.previous_ban = record.last_ban;
        record.last_ban = Some(now);
        record.retry_at = None;
        record.pending = Some(now);
        BanDecision::Ban {
            prefix: client,
            duration: ban_length(policy, repeats),
            repeats,
        }
    }

    /// Takes back the [`BanDecision::Ban`] for `prefix` decided at
    /// `decided` (the `now` it was recorded with) whose write failed (a
    /// full kernel table, a disk error): the ban does not count as one for
    /// the next ban's length, and the strikes stay one short of a ban, so
    /// the client's first violation after [`BAN_RETRY_AFTER`] (within the
    /// window) tries again, rather than after `ban_after` more. A report
    /// for an older decision than the client's latest changes nothing.
    pub fn ban_failed(&mut self, prefix: IpNet, decided: Instant, now: Instant) {
        let Some(record) = self.clients.get_mut(&prefix.trunc()) else {
            return;
        };
        if record.pending != Some(decided) {
            return;
        }
        record.take_back();
        let short = self.policy.ban_after.get() as usize - 1;
        record.strikes = vec![now; short];
        record.retry_at = Some(now + BAN_RETRY_AFTER);
    }

    /// Reports the [`BanDecision::Ban`] for `prefix` decided at `decided`
    /// written: the client's violations count towards its next ban again.
    /// A report for an older decision than the client's latest changes
    /// nothing.
    pub fn ban_written(&mut self, prefix: IpNet, decided: Instant) {
        if let Some(record) = self.clients.get_mut(&prefix.trunc()) {
            if record.pending == Some(decided) {
                record.pending = None;
            }
        }
    }

    /// Ban decisions not yet reported written or failed (and not older
    /// than [`PENDING_AT_MOST`]).
    fn bans_in_flight(&self, now: Instant) -> usize {
        self.clients.values().filter(|r| r.pending_at(now)).count()
    }

    /// Remembers that `prefix` was banned `bans` times, the last ban in
    /// force at `now`: a start reads this from the `auto` list's comments
    /// (`ban=N`), so that a restart does not reset a repeat offender's ban
    /// growth.
    pub fn remember_ban(&mut self, prefix: IpNet, bans: u32, now: Instant) {
        let record = self.clients.entry(prefix.trunc()).or_default();
        record.bans = record.bans.max(bans);
        record.last_ban = Some(now);
        record.last_seen = Some(now);
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.clients.len()
    }

    /// Drops clients with nothing left to remember, then, if still full,
    /// the one seen longest ago.
    fn forget_oldest(&mut self, now: Instant) {
        let policy = &self.policy;
        self.clients.retain(|_, r| {
            let strikes = r
                .strikes
                .last()
                .is_some_and(|t| now.saturating_duration_since(*t) < policy.window);
            let bans = r.last_ban.is_some_and(|t| {
                now.saturating_duration_since(t) <= policy.max_ban_for + REPEAT_MEMORY
            });
            strikes || bans || r.pending_at(now)
        });
        if self.clients.len() >= MAX_TRACKED {
            if let Some(oldest) = self
                .clients
                .iter()
                .min_by_key(|(_, r)| r.last_seen)
                .map(|(ip, _)| *ip)
            {
                self.clients.remove(&oldest);
            }
        }
    }
}

impl Record {
    /// Whether a ban decision of this client awaits its report at `now`.
    fn pending_at(&self, now: Instant) -> bool {
        self.pending
            .is_some_and(|t| now.saturating_duration_since(t) < PENDING_AT_MOST)
    }

    /// Undoes the latest ban decision (its write failed or never reported).
    fn take_back(&mut self) {
        self.pending = None;
        self.bans = self.bans.saturating_sub(1);
        self.last_ban = self.previous_ban.take();
    }
}

/// The ban count a ban's comment records (`reason=pregreet ban=2`: 2).
pub fn bans_in_comment(comment: &str) -> Option<u32> {
    comment
        .split_whitespace()
        .find_map(|word| word.strip_prefix("ban="))
        .and_then(|n| n.parse().ok())
}

/// `ban_for × growth^repeats`, at most `max_ban_for`.
fn ban_length(policy: &BanPolicy, repeats: u32) -> Duration {
    let mut length = policy.ban_for;
    for _ in 0..repeats {
        length = length.saturating_mul(policy.growth);
        if length >= policy.max_ban_for {
            return policy.max_ban_for;
        }
    }
    length.min(policy.max_ban_for)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BanPolicy {
        BanPolicy {
            ban_after: NonZeroU32::new(3).unwrap(),
            window: Duration::from_secs(600),
            ban_for: Duration::from_secs(3600),
            growth: 2,
            max_ban_for: Duration::from_secs(3 * 3600),
            max_entries: 2,
        }
    }

    const A: &str = "203.0.113.9";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_remembered_ban_makes_the_next_one_a_repeat() {
        assert_eq!(bans_in_comment("reason=pregreet ban=2"), Some(2));
        assert_eq!(bans_in_comment("reason=pregreet"), None);
        assert_eq!(bans_in_comment("ban=x"), None);
        let mut book = BanBook::new(BanPolicy {
            ban_after: NonZeroU32::new(1).unwrap(),
            ..policy()
        });
        let t0 = Instant::now();
        book.remember_ban(IpNet::from(ip(A)), 2, t0);
        assert!(matches!(
            book.record(ip(A), t0 + Duration::from_secs(60), 0),
            BanDecision::Ban { repeats: 2, .. }
        ));
    }

    #[test]
    fn violations_while_a_ban_is_written_make_no_second_ban() {
        let mut book = BanBook::new(BanPolicy {
            ban_after: NonZeroU32::new(1).unwrap(),
            ..policy()
        });
        let t0 = Instant::now();
        let first = book.record(ip(A), t0, 0);
        assert!(
            matches!(first, BanDecision::Ban { repeats: 0, .. }),
            "{first:?}"
        );
        // Two more sessions of the client misbehave before the ban is in
        // force: neither bans again (a second, longer ban).
        assert_eq!(book.record(ip(A), t0, 0), BanDecision::Pending);
        assert_eq!(book.record(ip(A), t0, 0), BanDecision::Pending);
        // A write that never reports (its writer died) holds back no more
        // than PENDING_AT_MOST, and counts as failed: the next ban is a
        // first one again; a late report of the old decision is ignored.
        let mut other = BanBook::new(book.policy().clone());
        other.record(ip(A), t0, 0);
        let retaken = t0 + PENDING_AT_MOST;
        assert!(matches!(
            other.record(ip(A), retaken, 0),
            BanDecision::Ban { repeats: 0, .. }
        ));
        other.ban_written(IpNet::from(ip(A)), t0);
        assert_eq!(other.record(ip(A), retaken, 0), BanDecision::Pending);
        // Written: the next violation (after the ban) is a repeat.
        book.ban_written(IpNet::from(ip(A)), t0);
        let later = t0 + Duration::from_secs(7200);
        let second = book.record(ip(A), later, 0);
        assert!(
            matches!(second, BanDecision::Ban { repeats: 1, .. }),
            "{second:?}"
        );
        // A failed write ends the pending state too; a report of another
        // decision does not.
        book.ban_failed(IpNet::from(ip(A)), t0, later);
        assert_eq!(book.record(ip(A), later, 0), BanDecision::Pending);
        book.ban_failed(IpNet::from(ip(A)), later, later);
        let retry = later + BAN_RETRY_AFTER;
        assert!(matches!(
            book.record(ip(A), retry, 0),
            BanDecision::Ban { repeats: 1, .. }
        ));
    }

    #[test]
    fn a_failed_ban_is_retried_at_the_next_violation_as_the_same_ban() {
        let mut book = BanBook::new(policy());
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        for s in 0..2 {
            book.record(ip(A), at(s), 0);
        }
        let first = book.record(ip(A), at(2), 0);
        assert!(
            matches!(first, BanDecision::Ban { repeats: 0, .. }),
            "{first:?}"
        );
        book.ban_failed(IpNet::from(ip(A)), at(2), at(2));
        // Not at once: a cause that stays must not cost a list write on
        // every violation. Counted, and kept one short.
        assert_eq!(
            book.record(ip(A), at(3), 0),
            BanDecision::Counted { strikes: 2 }
        );
        // Then not two more strikes first: the next violation bans, and as
        // a first ban (the failed one never took effect).
        let retry = 2 + BAN_RETRY_AFTER.as_secs();
        assert_eq!(book.record(ip(A), at(retry), 0), first);
    }

    #[test]
    fn a_failed_repeat_ban_leaves_the_earlier_ban_as_the_last_one() {
        let mut policy = policy();
        policy.ban_after = NonZeroU32::new(1).unwrap();
        let mut book = BanBook::new(policy.clone());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(matches!(
            book.record(ip(A), at(0), 0),
            BanDecision::Ban { repeats: 0, .. }
        ));
        book.ban_written(IpNet::from(ip(A)), at(0));
        // A repeat ban 20 hours later fails.
        let later = 20 * 3600;
        assert!(matches!(
            book.record(ip(A), at(later), 0),
            BanDecision::Ban { repeats: 1, .. }
        ));
        book.ban_failed(IpNet::from(ip(A)), at(later), at(later));
        // The memory of repeats runs from the ban that took effect: past
        // it, the next ban is a first one again.
        let forgotten = (policy.max_ban_for + REPEAT_MEMORY).as_secs() + 1;
        assert!(matches!(
            book.record(ip(A), at(forgotten), 0),
            BanDecision::Ban { repeats: 0, .. }
        ));
    }

    #[test]
    fn bans_after_n_violations_within_the_window_only() {
        let mut book = BanBook::new(policy());
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(
            book.record(ip(A), at(0), 0),
            BanDecision::Counted { strikes: 1 }
        );
        assert_eq!(
            book.record(ip(A), at(300), 0),
            BanDecision::Counted { strikes: 2 }
        );
        // The first one is out of the window by now.
        assert_eq!(
            book.record(ip(A), at(601), 0),
            BanDecision::Counted { strikes: 2 }
        );
        assert_eq!(
            book.record(ip(A), at(602), 0),
            BanDecision::Ban {
                prefix: "203.0.113.9/32".parse().unwrap(),
                duration: Duration::from_secs(3600),
                repeats: 0,
            }
        );
        // Counting starts again after a ban; another client is apart.
        book.ban_written(IpNet::from(ip(A)), at(602));
        assert_eq!(
            book.record(ip(A), at(603), 1),
            BanDecision::Counted { strikes: 1 }
        );
        assert_eq!(
            book.record(ip("2001:db8::7"), at(603), 1),
            BanDecision::Counted { strikes: 1 }
        );
    }

    #[test]
    fn repeat_bans_grow_up_to_the_cap_and_are_forgotten() {
        let mut book = BanBook::new(policy());
        let t0 = Instant::now();
        let mut lengths = Vec::new();
        let mut t = 0;
        for _ in 0..4 {
            for _ in 0..3 {
                t += 1;
                let now = t0 + Duration::from_secs(t);
                if let BanDecision::Ban { duration, .. } = book.record(ip(A), now, 0) {
                    lengths.push(duration.as_secs() / 3600);
                    book.ban_written(IpNet::from(ip(A)), now);
                }
            }
        }
        assert_eq!(lengths, [1, 2, 3, 3], "doubling, capped at max_ban_for");
        // Long after the last ban, a ban is a first ban again.
        let later = t0 + Duration::from_secs(t) + Duration::from_secs(3 * 3600) + REPEAT_MEMORY;
        book.record(ip(A), later + Duration::from_secs(1), 0);
        book.record(ip(A), later + Duration::from_secs(2), 0);
        assert!(matches!(
            book.record(ip(A), later + Duration::from_secs(3), 0),
            BanDecision::Ban { repeats: 0, .. }
        ));
    }

    #[test]
    fn at_the_cap_a_ban_is_refused_and_tried_again() {
        let mut book = BanBook::new(policy());
        let t0 = Instant::now();
        for s in 0..2 {
            book.record(ip(A), t0 + Duration::from_secs(s), 2);
        }
        assert_eq!(
            book.record(ip(A), t0 + Duration::from_secs(2), 2),
            BanDecision::RefusedFull
        );
        // Once there is room, the next violation bans.
        assert!(matches!(
            book.record(ip(A), t0 + Duration::from_secs(3), 1),
            BanDecision::Ban { .. }
        ));
        // A ban being written takes room too: with one ban in force and
        // A's in flight, B is refused; once A's is reported, only the bans
        // in force (the caller's count) take room.
        const B: &str = "198.51.100.7";
        for s in 4..6 {
            book.record(ip(B), t0 + Duration::from_secs(s), 1);
        }
        assert_eq!(
            book.record(ip(B), t0 + Duration::from_secs(6), 1),
            BanDecision::RefusedFull
        );
        book.ban_written(IpNet::from(ip(A)), t0 + Duration::from_secs(3));
        assert!(matches!(
            book.record(ip(B), t0 + Duration::from_secs(7), 1),
            BanDecision::Ban { .. }
        ));
    }

    #[test]
    fn the_book_is_bounded() {
        let mut book = BanBook::new(BanPolicy {
            ban_after: NonZeroU32::new(100).unwrap(),
            ..policy()
        });
        let t0 = Instant::now();
        for n in 0..(MAX_TRACKED as u32 + 10) {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0xC000_0000 + n));
            book.record(client, t0, 0);
        }
        assert!(book.tracked() <= MAX_TRACKED);
        // IPv4-mapped IPv6 is the IPv4 client.
        let mut book = BanBook::new(policy());
        book.record(ip("::ffff:203.0.113.9"), t0, 0);
        assert_eq!(
            book.record(ip(A), t0, 0),
            BanDecision::Counted { strikes: 2 }
        );
    }

    #[test]
    fn a_prefix_client_is_counted_and_banned_as_one() {
        let mut book = BanBook::new(policy());
        let t0 = Instant::now();
        let group: IpNet = "2001:db8:1:1::/64".parse().unwrap();
        // The host bits of the rate limit's group are ignored.
        let same: IpNet = "2001:db8:1:1::9/64".parse().unwrap();
        book.record_prefix(group, t0, 0);
        assert_eq!(
            book.record_prefix(same, t0, 0),
            BanDecision::Counted { strikes: 2 }
        );
        // An address inside the group is another client.
        assert_eq!(
            book.record(ip("2001:db8:1:1::9"), t0, 0),
            BanDecision::Counted { strikes: 1 }
        );
        assert!(matches!(
            book.record_prefix(group, t0, 0),
            BanDecision::Ban { prefix, .. } if prefix == group
        ));
    }
}
