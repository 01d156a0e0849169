//! The pass cache (postscreen's cache of clients that passed): who waited
//! out the greet delay quietly, and when, so that it skips the wait for
//! `pass_cache_ttl`.
//!
//! Bounded: at most `max_entries` clients; the one that passed longest ago
//! goes first. Persisted by the daemon in a text file beside `state.toml`,
//! one client a line, `ADDRESS UNIX-SECONDS` (when it passed), `#`
//! comments, written atomically. Entries older than the TTL are left out
//! when the file is read and when it is written.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The largest pass-cache file read, in bytes (far above 10 million
/// entries of the longest form).
const MAX_FILE_BYTES: u64 = 1 << 30;

/// Why the pass-cache file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PassCacheError {
    /// The file could not be read.
    #[error("reading the pass cache {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `ADDRESS UNIX-SECONDS`.
    #[error("pass cache {} line {line}: {problem}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The file could not be written; the old one is intact.
    #[error("writing the pass cache")]
    Write(#[source] crate::policy::ListError),
}

#[derive(Debug, Default)]
struct Entries {
    /// When each client passed.
    passed: HashMap<IpAddr, SystemTime>,
    /// The same, ordered by time, for eviction.
    by_time: BTreeSet<(SystemTime, IpAddr)>,
}

/// The clients that passed, bounded; shared by every waiting client.
#[derive(Debug)]
pub struct PassCache {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<Entries>,
    /// Changed since the last save.
    dirty: AtomicBool,
}

impl PassCache {
    /// An empty cache: entries count for `ttl`, at most `max_entries`.
    pub fn new(ttl: Duration, max_entries: usize) -> PassCache {
        PassCache {
            ttl,
            max_entries: max_entries.max(1),
            entries: Mutex::new(Entries::default()),
            dirty: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When `client` passed, if that is less than the TTL before `now`.
    pub fn fresh(&self, client: IpAddr, now: SystemTime) -> Option<SystemTime> {
        let at = *self.lock().passed.get(&client.to_canonical())?;
        let age = now.duration_since(at).unwrap_or_default();
        (age < self.ttl).then_some(at)
    }

    /// Records that `client` passed at `now`, evicting the oldest entry
    /// when full.
    pub fn record(&self, client: IpAddr, now: SystemTime) {
        let client = client.to_canonical();
        let mut e = self.lock();
        if let Some(old) = e.passed.insert(client, now) {
            e.by_time.remove(&(old, client));
        }
        e.by_time.insert((now, client));
        while e.passed.len() > self.max_entries {
            let Some(oldest) = e.by_time.pop_first() else {
                break;
            };
            e.passed.remove(&oldest.1);
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Clients in the cache (fresh or not yet written out).
    pub fn len(&self) -> usize {
        self.lock().passed.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `path` into a new cache; a missing file is an empty cache.
    /// Entries older than `ttl` at `now` are left out; of the rest, the
    /// newest `max_entries`.
    ///
    /// # Errors
    ///
    /// [`PassCacheError::Read`], or [`PassCacheError::Line`] naming the
    /// first bad line.
    pub fn load(
        path: &Path,
        ttl: Duration,
        max_entries: usize,
        now: SystemTime,
    ) -> Result<PassCache, PassCacheError> {
        let cache = PassCache::new(ttl, max_entries);
        let bytes = match crate::files::read_regular(path, MAX_FILE_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cache),
            Err(source) => {
                return Err(PassCacheError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let bad = |line: usize, problem: String| PassCacheError::Line {
            path: path.to_owned(),
            line,
            problem,
        };
        let text = String::from_utf8(bytes).map_err(|e| {
            let line = e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            bad(line, "is not UTF-8".into())
        })?;
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(addr), Some(secs), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(
                    line_no,
                    format!("{line:?} is not \"ADDRESS UNIX-SECONDS\""),
                ));
            };
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| bad(line_no, format!("{addr:?} is not an IP address")))?;
            let secs: u64 = secs
                .parse()
                .map_err(|_| bad(line_no, format!("{secs:?} is not a Unix time in seconds")))?;
            let at = UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))
                .ok_or_else(|| bad(line_no, format!("{secs} is out of range")))?;
            if now.duration_since(at).unwrap_or_default() < ttl {
                cache.record(addr, at);
            }
        }
        cache.dirty.store(false, Ordering::Relaxed);
        Ok(cache)
    }

    /// Writes the fresh entries to `path` atomically when anything
    /// changed since the last save (or `force`); returns whether it wrote.
    ///
    /// # Errors
    ///
    /// [`PassCacheError::Write`]; the old file is then intact.
    pub fn save(&self, path: &Path, now: SystemTime, force: bool) -> Result<bool, PassCacheError> {
        if !self.dirty.swap(false, Ordering::Relaxed) && !force {
            return Ok(false);
        }
        let mut text = String::from(
            "# smtpguard pass cache: clients that waited out screening.greet_wait quietly,\n\
             # and when (Unix seconds). Written by the daemon; safe to delete.\n",
        );
        {
            let e = self.lock();
            for (at, ip) in &e.by_time {
                if now.duration_since(*at).unwrap_or_default() >= self.ttl {
                    continue;
                }
                let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                text.push_str(&format!("{ip} {secs}\n"));
            }
        }
        let result = crate::policy::write_temp(path, text.as_bytes()).and_then(|temp| {
            crate::policy::install_temp(&temp, path).inspect_err(|_| {
                let _ = std::fs::remove_file(&temp);
            })
        });
        result.map_err(|e| {
            self.dirty.store(true, Ordering::Relaxed);
            PassCacheError::Write(e)
        })?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = PassCache::new(Duration::from_secs(100), 10);
        cache.record(ip("198.51.100.7"), at(1000));
        assert_eq!(cache.fresh(ip("198.51.100.7"), at(1099)), Some(at(1000)));
        assert_eq!(cache.fresh(ip("198.51.100.7"), at(1100)), None);
        assert_eq!(cache.fresh(ip("198.51.100.8"), at(1000)), None);
        // IPv4-mapped is the IPv4 client.
        assert!(cache.fresh(ip("::ffff:198.51.100.7"), at(1001)).is_some());
    }

    #[test]
    fn the_oldest_pass_is_evicted_when_full() {
        let cache = PassCache::new(Duration::from_secs(1000), 2);
        cache.record(ip("198.51.100.1"), at(10));
        cache.record(ip("198.51.100.2"), at(20));
        cache.record(ip("198.51.100.1"), at(30)); // passed again: now newest
        cache.record(ip("198.51.100.3"), at(40));
        assert_eq!(cache.len(), 2);
        assert!(cache.fresh(ip("198.51.100.2"), at(41)).is_none());
        assert!(cache.fresh(ip("198.51.100.1"), at(41)).is_some());
        assert!(cache.fresh(ip("198.51.100.3"), at(41)).is_some());
    }

    #[test]
    fn save_and_load_round_trip_without_stale_entries() {
        let dir = TempDir::new("pass-cache");
        let path = dir.join("pass-cache.txt");
        let ttl = Duration::from_secs(100);
        let cache = PassCache::new(ttl, 10);
        cache.record(ip("198.51.100.7"), at(1000));
        cache.record(ip("2001:db8::7"), at(1050));
        assert!(cache.save(&path, at(1060), false).unwrap());
        assert!(!cache.save(&path, at(1060), false).unwrap(), "nothing new");
        let loaded = PassCache::load(&path, ttl, 10, at(1120)).unwrap();
        assert_eq!(loaded.len(), 1, "198.51.100.7 is stale by then");
        assert_eq!(loaded.fresh(ip("2001:db8::7"), at(1120)), Some(at(1050)));
        // No file: empty.
        let none = PassCache::load(&dir.join("absent"), ttl, 10, at(0)).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn a_corrupt_file_names_the_file_and_line() {
        let dir = TempDir::new("pass-cache");
        let path = dir.join("pass-cache.txt");
        std::fs::write(&path, "# c\n198.51.100.7 1000\n198.51.100.300 1000\n").unwrap();
        let e = PassCache::load(&path, Duration::from_secs(10), 10, at(0)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("pass-cache.txt line 3"), "{text}");
        assert!(
            text.contains("\"198.51.100.300\" is not an IP address"),
            "{text}"
        );
        std::fs::write(&path, "198.51.100.7\n").unwrap();
        let e = PassCache::load(&path, Duration::from_secs(10), 10, at(0)).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
