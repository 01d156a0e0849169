//! Open sessions: session ids, the per-client counts behind
//! `max_connections_per_client` (per IPv4 address, per IPv6 prefix), kick
//! tokens, and the [`Slot`] guard that
//! gives all of it back (and the global permit) on every way out of a
//! session task.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use ipnet::IpNet;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::counters::Metrics;

/// Open sessions: who they are (for kicks and the per-client cap).
pub(super) struct Sessions {
    /// Makes session ids unique across restarts: the start time in hex.
    id_prefix: String,
    /// Next session number.
    next_id: AtomicU64,
    /// The open sessions and per-client counts, changed together.
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Session number → client address and its kick token.
    open: HashMap<u64, (IpAddr, CancellationToken)>,
    /// Open sessions per client group ([`client_group`]; entries never
    /// hold 0).
    per_client: HashMap<IpNet, usize>,
}

/// What `max_connections_per_client` counts as one client: an IPv4 address
/// (a /32), or the IPv6 prefix of `ipv6_prefix` bits (1–128) holding the
/// address, since one IPv6 host usually holds a whole /64.
pub(super) fn client_group(client: IpAddr, ipv6_prefix: u8) -> IpNet {
    let bits = match client {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => ipv6_prefix.clamp(1, 128),
    };
    IpNet::new(client, bits)
        .expect("prefix length within the family")
        .trunc()
}

/// A client group as replies and logs show it: the address for a single
/// address, the prefix otherwise.
pub(super) fn display_group(group: IpNet) -> String {
    if group.prefix_len() == group.max_prefix_len() {
        group.addr().to_string()
    } else {
        group.to_string()
    }
}

impl Sessions {
    pub(super) fn new() -> Sessions {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Sessions {
            id_prefix: format!("{started:X}"),
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Registry::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session from `client` unless that would exceed `cap`
    /// sessions for its `group` ([`client_group`]).
    pub(super) fn register(
        self: &Arc<Self>,
        client: IpAddr,
        group: IpNet,
        cap: Option<NonZeroUsize>,
        permit: Option<OwnedSemaphorePermit>,
        metrics: &Arc<Metrics>,
    ) -> Option<Slot> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        {
            let mut reg = self.lock();
            let n = reg.per_client.entry(group).or_insert(0);
            if cap.is_some_and(|cap| *n >= cap.get()) {
                if *n == 0 {
                    reg.per_client.remove(&group);
                }
                return None;
            }
            *n += 1;
            reg.open.insert(id, (client, kick.clone()));
        }
        metrics.session_opened();
        Some(Slot {
            sessions: Arc::clone(self),
            metrics: Arc::clone(metrics),
            id,
            session_id: format!("{}{id:06X}", self.id_prefix),
            group,
            kick,
            _permit: permit,
        })
    }

    /// Cancels the kick token of every open session whose client matches
    /// `pred`; returns how many were not kicked before.
    pub(super) fn kick(&self, pred: impl Fn(IpAddr) -> bool) -> usize {
        let reg = self.lock();
        let mut n = 0;
        for (client, kick) in reg.open.values() {
            if pred(*client) && !kick.is_cancelled() {
                kick.cancel();
                n += 1;
            }
        }
        n
    }

    /// Open sessions per client address.
    pub(super) fn open_by_client(&self) -> BTreeMap<IpAddr, usize> {
        let reg = self.lock();
        let mut by_client = BTreeMap::new();
        for (client, _) in reg.open.values() {
            *by_client.entry(*client).or_insert(0) += 1;
        }
        by_client
    }

    fn unregister(&self, id: u64, group: IpNet) {
        let mut reg = self.lock();
        reg.open.remove(&id);
        if let Some(n) = reg.per_client.get_mut(&group) {
            *n -= 1;
            if *n == 0 {
                reg.per_client.remove(&group);
            }
        }
    }
}

/// A session's hold on the server: the global permit, its registry entry
/// (per-client count, kick token) and the open-connections gauge. All are
/// released when it is dropped, however the session task ends.
pub(super) struct Slot {
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    id: u64,
    /// The id in logs, queue ids and `Received:` headers.
    pub(super) session_id: String,
    /// The [`client_group`] whose count this slot holds.
    group: IpNet,
    /// Cancelled by [`Sessions::kick`].
    pub(super) kick: CancellationToken,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.sessions.unregister(self.id, self.group);
        self.metrics.session_closed();
    }
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::front_door::ServerHandle;

    /// IPv6 clients count per prefix: two addresses of one /64 share the
    /// cap, another /64 has its own; IPv4 counts per address.
    #[test]
    fn ipv6_clients_share_the_cap_per_prefix() {
        let sessions = Arc::new(Sessions::new());
        let metrics = Arc::new(Metrics::default());
        let cap = NonZeroUsize::new(2);
        let take = |ip: &str, bits| {
            let ip: IpAddr = ip.parse().unwrap();
            sessions.register(ip, client_group(ip, bits), cap, None, &metrics)
        };
        let _a = take("2001:db8:1:1::1", 64).unwrap();
        let b = take("2001:db8:1:1::2", 64).unwrap();
        assert!(
            take("2001:db8:1:1:ffff::3", 64).is_none(),
            "third in the /64"
        );
        let _c = take("2001:db8:1:2::1", 64).expect("another /64");
        drop(b);
        let _d = take("2001:db8:1:1::4", 64).expect("a slot of the /64 freed");
        assert!(take("2001:db8:1:1::5", 64).is_none());
        let _f = take("192.0.2.1", 64).unwrap();
        let _g = take("192.0.2.2", 64).expect("IPv4 counts per address");
        assert_eq!(
            display_group(client_group("2001:db8:1:1::9".parse().unwrap(), 64)),
            "2001:db8:1:1::/64"
        );
        assert_eq!(
            display_group(client_group("192.0.2.9".parse().unwrap(), 64)),
            "192.0.2.9"
        );
    }

    /// The registry: per-address cap, kicks, and release of everything
    /// (permit, count, gauge) when a slot is dropped, also by a panic.
    #[test]
    fn slots_are_released_on_every_exit() {
        let sessions = Arc::new(Sessions::new());
        let metrics = Arc::new(Metrics::default());
        let slots = Arc::new(Semaphore::new(2));
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        let cap = NonZeroUsize::new(1);
        let take = |ip| {
            let permit = Arc::clone(&slots).try_acquire_owned().ok()?;
            sessions.register(ip, client_group(ip, 64), cap, Some(permit), &metrics)
        };
        let first = take(a).unwrap();
        assert!(take(a).is_none(), "per-address cap");
        assert_eq!(
            slots.available_permits(),
            1,
            "the refused one took no permit"
        );
        let second = take(b).unwrap();
        assert!(take(b).is_none() && take(a).is_none());
        assert_ne!(first.session_id, second.session_id);
        assert_eq!(metrics.open_connections(), 2);

        let handle = ServerHandle {
            sessions: Arc::clone(&sessions),
            metrics: Arc::clone(&metrics),
            tls: Arc::default(),
        };
        assert_eq!(handle.kick(|ip| ip == a), 1);
        assert!(first.kick.is_cancelled() && !second.kick.is_cancelled());
        assert_eq!(handle.kick(|ip| ip == a), 0, "already kicked");

        let panicked = std::panic::catch_unwind(AssertUnwindSafe(move || {
            let _held = second;
            panic!("session bug");
        }));
        assert!(panicked.is_err());
        drop(first);
        assert_eq!(metrics.open_connections(), 0);
        assert_eq!(slots.available_permits(), 2);
        assert!(handle.open_by_client().is_empty());
        assert!(sessions.lock().open.is_empty());
    }
}
