//! The fleet's lists as this gateway knows them, without any I/O: every
//! key under the site prefix at one revision, and what the `fleet` source
//! must hold because of them.
//!
//! Events are applied a revision at a time ([`FleetState::apply`]); each
//! says which (list, prefix) pairs changed, or that a feed switched
//! generation, after which the whole source is switched at once. A bad
//! key or value is reported and skipped; it never stops the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use ipnet::IpNet;

use super::{
    keys::{
        entry_key, feed_entry_key, feed_pointer_key, parse_generation, parse_key, FleetKey,
        KeyError,
    },
    value::{EntryValue, ValueError},
};
use crate::policy::{AccessList, ListEntry, ListKind};

/// One change read from etcd.
#[derive(Clone, Debug)]
pub enum Change {
    /// A key was written.
    Put {
        /// The key.
        key: Vec<u8>,
        /// Its value.
        value: Vec<u8>,
    },
    /// A key was deleted.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// A change that was skipped, and why.
#[derive(Debug, thiserror::Error)]
pub enum BadChange {
    /// The key is not part of the layout.
    #[error("key {key:?} skipped")]
    Key {
        /// The key, lossily decoded.
        key: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The value is not an entry value.
    #[error("value of key {key:?} skipped")]
    Value {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: ValueError,
    },
}

/// What applying changes means for the `fleet` source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// (list, prefix) pairs whose entry may have changed.
    pub prefixes: BTreeSet<(ListKind, IpNet)>,
    /// A feed switched generation: switch the whole source at once.
    pub everything: bool,
}

impl Effect {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty() && !self.everything
    }

    /// Adds another effect to this one.
    pub fn merge(&mut self, other: Effect) {
        self.prefixes.extend(other.prefixes);
        self.everything |= other.everything;
    }
}

type Entries = BTreeMap<(ListKind, IpNet), EntryValue>;

#[derive(Clone, Debug, Default)]
struct Feed {
    /// The generation in force (`None`: no pointer yet, nothing applies).
    current: Option<u64>,
    /// Every generation's entries seen, in force or not: a new generation
    /// is written before its pointer flips.
    generations: BTreeMap<u64, Entries>,
}

/// Every fleet key at [`FleetState::revision`].
#[derive(Clone, Debug, Default)]
pub struct FleetState {
    /// The etcd revision this state reflects.
    pub revision: i64,
    direct: Entries,
    feeds: BTreeMap<String, Feed>,
    gateways: BTreeMap<String, Vec<u8>>,
}

impl FleetState {
    /// An empty state at revision 0.
    pub fn new() -> FleetState {
        FleetState::default()
    }

    /// Applies one change under the site prefix `site`.
    ///
    /// # Errors
    ///
    /// [`BadChange`] for a key or value that is not understood; the
    /// state is then unchanged.
    pub fn apply(&mut self, site: &str, change: &Change) -> Result<Effect, BadChange> {
        let (raw_key, value) = match change {
            Change::Put { key, value } => (key, Some(value)),
            Change::Delete { key } => (key, None),
        };
        let lossy = || String::from_utf8_lossy(raw_key).into_owned();
        let key = parse_key(site, raw_key).map_err(|source| BadChange::Key {
            key: lossy(),
            source,
        })?;
        let entry_value = |v: &Vec<u8>| {
            EntryValue::parse(v).map_err(|source| BadChange::Value {
                key: lossy(),
                source,
            })
        };
        let mut effect = Effect::default();
        match key {
            FleetKey::Entry(kind, prefix) => {
                match value {
                    Some(v) => {
                        let v = entry_value(v)?;
                        self.direct.insert((kind, prefix), v);
                    }
                    None => {
                        self.direct.remove(&(kind, prefix));
                    }
                }
                effect.prefixes.insert((kind, prefix));
            }
            FleetKey::FeedEntry {
                feed,
                generation,
                kind,
                prefix,
            } => {
                let in_force = self.feeds.get(&feed).and_then(|f| f.current) == Some(generation);
                match value {
                    Some(v) => {
                        let v = entry_value(v)?;
                        self.feeds
                            .entry(feed)
                            .or_default()
                            .generations
                            .entry(generation)
                            .or_default()
                            .insert((kind, prefix), v);
                    }
                    None => {
                        if let Some(f) = self.feeds.get_mut(&feed) {
                            if let Some(g) = f.generations.get_mut(&generation) {
                                g.remove(&(kind, prefix));
                                if g.is_empty() {
                                    f.generations.remove(&generation);
                                }
                            }
                        }
                    }
                }
                if in_force {
                    effect.prefixes.insert((kind, prefix));
                }
            }
            FleetKey::FeedPointer(feed) => {
                let generation = match value {
                    Some(v) => {
                        let text = String::from_utf8_lossy(v);
                        Some(
                            parse_generation(text.trim()).map_err(|source| BadChange::Key {
                                key: lossy(),
                                source,
                            })?,
                        )
                    }
                    None => None,
                };
                let f = self.feeds.entry(feed).or_default();
                if f.current != generation {
                    f.current = generation;
                    effect.everything = true;
                }
            }
            FleetKey::Gateway(host) => match value {
                Some(v) => {
                    self.gateways.insert(host, v.clone());
                }
                None => {
                    self.gateways.remove(&host);
                }
            },
        }
        Ok(effect)
    }

    /// The entry the `fleet` source holds for (list, prefix) at `now`:
    /// the fleet's own entry, else the first feed's (by name) in force;
    /// `None` when neither holds it or it has expired.
    pub fn effective(&self, kind: ListKind, prefix: IpNet, now: SystemTime) -> Option<ListEntry> {
        let key = (kind, prefix);
        let value = self.direct.get(&key).or_else(|| {
            self.feeds.values().find_map(|f| {
                f.current
                    .and_then(|g| f.generations.get(&g))
                    .and_then(|g| g.get(&key))
            })
        })?;
        (!value.expired(now)).then(|| list_entry(prefix, value))
    }

    /// Both lists of the `fleet` source at `now` (expired entries left out).
    pub fn lists(&self, now: SystemTime) -> (AccessList, AccessList) {
        let mut by_kind: BTreeMap<(ListKind, IpNet), ListEntry> = BTreeMap::new();
        let feeds = self
            .feeds
            .values()
            .filter_map(|f| f.current.and_then(|g| f.generations.get(&g)));
        // Later inserts lose: the fleet's own entries first, then feeds by name.
        for entries in std::iter::once(&self.direct).chain(feeds) {
            for (key, value) in entries {
                if !value.expired(now) {
                    by_kind
                        .entry(*key)
                        .or_insert_with(|| list_entry(key.1, value));
                }
            }
        }
        let mut deny = AccessList::new(ListKind::Deny);
        let mut permit = AccessList::new(ListKind::Permit);
        let split = |kind| {
            by_kind
                .iter()
                .filter(move |((k, _), _)| *k == kind)
                .map(|(_, e)| e.clone())
        };
        // Comments were checked when the values were parsed.
        let _ = deny.replace(split(ListKind::Deny));
        let _ = permit.replace(split(ListKind::Permit));
        (deny, permit)
    }

    /// Number of entries in the fleet's own lists and in feeds in force.
    pub fn counts(&self) -> (usize, usize) {
        let feeds = self
            .feeds
            .values()
            .filter_map(|f| f.current.and_then(|g| f.generations.get(&g)))
            .map(BTreeMap::len)
            .sum();
        (self.direct.len(), feeds)
    }

    /// Every key and value this state holds (gateway status left out), as
    /// written to etcd: what the cache file keeps.
    pub fn to_kvs(&self, site: &str) -> Vec<(String, String)> {
        let mut kvs: Vec<(String, String)> = self
            .direct
            .iter()
            .map(|((kind, prefix), v)| (entry_key(site, *kind, *prefix), v.to_json()))
            .collect();
        for (name, feed) in &self.feeds {
            if let Some(g) = feed.current {
                kvs.push((feed_pointer_key(site, name), g.to_string()));
            }
            for (g, entries) in &feed.generations {
                for ((kind, prefix), v) in entries {
                    kvs.push((feed_entry_key(site, name, *g, *kind, *prefix), v.to_json()));
                }
            }
        }
        kvs
    }

    /// The gateways' status values, by host.
    pub fn gateways(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.gateways
    }
}

fn list_entry(prefix: IpNet, value: &EntryValue) -> ListEntry {
    ListEntry {
        prefix,
        comment: value.comment.clone(),
        expires: value.expires_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    const SITE: &str = "/s/";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn put(key: String, value: &str) -> Change {
        Change::Put {
            key: key.into_bytes(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn entries_apply_one_by_one_and_bad_ones_are_skipped() {
        let mut s = FleetState::new();
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let e = s
            .apply(
                SITE,
                &put(
                    entry_key(SITE, ListKind::Deny, net("192.0.2.0/24")),
                    r#"{"comment":"x"}"#,
                ),
            )
            .unwrap();
        assert_eq!(
            e.prefixes.into_iter().collect::<Vec<_>>(),
            [(ListKind::Deny, net("192.0.2.0/24"))]
        );
        assert_eq!(
            s.effective(ListKind::Deny, net("192.0.2.0/24"), now)
                .unwrap()
                .comment
                .as_deref(),
            Some("x")
        );
        assert!(s
            .apply(SITE, &put("/s/lists/deny/192.0.2.1/24".into(), "{}"))
            .is_err());
        assert!(s
            .apply(
                SITE,
                &put(
                    entry_key(SITE, ListKind::Deny, net("198.51.100.0/24")),
                    "nope"
                )
            )
            .is_err());
        assert_eq!(s.counts(), (1, 0));
        // Expired by its value, even though the key is still there.
        s.apply(
            SITE,
            &put(
                entry_key(SITE, ListKind::Permit, net("203.0.113.0/24")),
                r#"{"expires_at":"2001-01-01T00:00:00Z"}"#,
            ),
        )
        .unwrap();
        assert_eq!(
            s.effective(ListKind::Permit, net("203.0.113.0/24"), now),
            None
        );
        let (deny, permit) = s.lists(now);
        assert_eq!(deny.len().total(), 1);
        assert_eq!(permit.len().total(), 0);
        s.apply(
            SITE,
            &Change::Delete {
                key: entry_key(SITE, ListKind::Deny, net("192.0.2.0/24")).into_bytes(),
            },
        )
        .unwrap();
        assert_eq!(s.lists(now).0.len().total(), 0);
    }

    #[test]
    fn a_feed_applies_only_when_its_pointer_flips() {
        let mut s = FleetState::new();
        let now = SystemTime::now();
        for i in 0..100u32 {
            let p = IpNet::new(std::net::Ipv4Addr::from(0xc633_6400 + i).into(), 32).unwrap();
            let e = s
                .apply(
                    SITE,
                    &put(feed_entry_key(SITE, "ipsum", 1, ListKind::Deny, p), "{}"),
                )
                .unwrap();
            assert!(e.is_empty(), "a generation not in force changes nothing");
        }
        assert_eq!(s.lists(now).0.len().total(), 0);
        let e = s
            .apply(SITE, &put(feed_pointer_key(SITE, "ipsum"), "1"))
            .unwrap();
        assert!(e.everything);
        assert_eq!(s.lists(now).0.len().total(), 100);
        assert_eq!(s.counts(), (0, 100));
        s.apply(
            SITE,
            &put(
                feed_entry_key(SITE, "ipsum", 2, ListKind::Deny, net("192.0.2.0/24")),
                "{}",
            ),
        )
        .unwrap();
        assert!(
            s.apply(SITE, &put(feed_pointer_key(SITE, "ipsum"), "2"))
                .unwrap()
                .everything
        );
        assert_eq!(s.lists(now).0.len().total(), 1);
        assert!(s
            .apply(SITE, &put(feed_pointer_key(SITE, "ipsum"), "x"))
            .is_err());
    }
}
