//! The per-client SYN rate limit of the XDP program, from userspace (#16):
//! the settings as the program reads them ([`RateLimitSettings`]), the
//! sweeper that forgets buckets that are full again, and the stream of
//! "client over the limit" events ([`OverLimit`]).
//!
//! The arithmetic (GCRA, a token bucket kept as one timestamp) and the
//! table's design are documented in `smtpguard_common::rate`; [`Gcra`] is
//! the same arithmetic in plain Rust, the oracle the kernel is tested
//! against.
//!
//! Memory: `SG_RATE` is a preallocated hash of `table_size` buckets (20-byte
//! key, 16-byte value, 104 bytes per entry measured with the kernel's element
//! header and bucket array: 13 MiB at the default 131,072). Events come
//! through a 256 KiB ring buffer; the reader hands them out one at a time,
//! so a flood of distinct sources costs userspace no memory beyond it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use aya::{
    maps::{Array, HashMap, MapData, MapError, RingBuf},
    Ebpf,
};
use ipnet::IpNet;
use smtpguard_common::{
    map_names,
    rate::{RateBucket, RateEvent, RateKey, FAMILY_V4, MINUTE_NS},
    RuntimeConfig,
};
use tokio::io::{unix::AsyncFd, Interest};

use super::KernelError;

/// Errors of the rate limiter's maps.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// A map operation failed.
    #[error("rate-limit map {map}: {what}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        what: &'static str,
        #[source]
        source: MapError,
    },
    /// The event ring buffer cannot be polled.
    #[error("cannot poll the rate-limit event buffer")]
    Poll(#[source] std::io::Error),
}

/// `[rate_limit]` as the XDP program applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// SYNs per minute per client; 0 turns the limiter off.
    pub syns_per_minute: u32,
    /// IPv6 clients are grouped by this prefix length (1..=128).
    pub ipv6_prefix: u8,
    /// Sources whose deciding entry is a permit entry are not limited.
    pub exempt_permitted: bool,
}

impl RateLimitSettings {
    /// The limiter off.
    pub const OFF: RateLimitSettings = RateLimitSettings {
        syns_per_minute: 0,
        ipv6_prefix: 64,
        exempt_permitted: true,
    };

    /// Writes these settings into the program's runtime record.
    pub fn write_into(&self, runtime: &mut RuntimeConfig) {
        let gcra = Gcra::new(self.syns_per_minute);
        runtime.rate_per_minute = self.syns_per_minute;
        runtime.rate_exempt_permitted = self.exempt_permitted as u32;
        runtime.rate_interval_ns = gcra.interval_ns;
        runtime.rate_tolerance_ns = gcra.tolerance_ns;
        runtime.rate_v6_mask = v6_mask(self.ipv6_prefix);
        runtime.rate_v6_prefix = u32::from(self.ipv6_prefix.min(128));
    }
}

/// The IPv6 grouping mask for `prefix` bits, as the program applies it:
/// network byte order, four native-endian words.
pub fn v6_mask(prefix: u8) -> [u32; 4] {
    let bits = u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0);
    let bytes = bits.to_be_bytes();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    })
}

/// GCRA with the kernel's numbers: the oracle for the program's bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// 60 s / limit, in ns: one token comes back per interval.
    pub interval_ns: u64,
    /// `(limit - 1) * interval_ns`: a full bucket passes `limit` SYNs at once.
    pub tolerance_ns: u64,
}

impl Gcra {
    /// The bucket of `syns_per_minute` (0: all zero, unused).
    pub fn new(syns_per_minute: u32) -> Gcra {
        if syns_per_minute == 0 {
            return Gcra {
                interval_ns: 0,
                tolerance_ns: 0,
            };
        }
        let interval_ns = MINUTE_NS / u64::from(syns_per_minute);
        Gcra {
            interval_ns,
            tolerance_ns: (u64::from(syns_per_minute) - 1) * interval_ns,
        }
    }

    /// One SYN at `now` against a bucket whose theoretical arrival time is
    /// `tat` (`None`: no bucket yet). Returns whether it passes and the
    /// bucket's new `tat`.
    pub fn charge(&self, tat: Option<u64>, now: u64) -> (bool, u64) {
        let Some(tat) = tat else {
            return (true, now + self.interval_ns);
        };
        let start = tat.max(now);
        if start - now > self.tolerance_ns {
            (false, tat)
        } else {
            (true, start + self.interval_ns)
        }
    }
}

/// A client went over the limit: the first dropped SYN of its bucket in a
/// minute. `Display` is the log line, `RATE LIMIT [203.0.113.9] over 30
/// SYN/min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverLimit {
    /// The client: an IPv4 /32, or the IPv6 group (`ipv6_prefix`).
    pub client: IpNet,
    /// The limit in force, SYNs per minute.
    pub limit: u32,
    /// The table was full and the SYN was charged to the bucket new
    /// clients share; `client` is the first such client of the minute.
    pub overflow: bool,
    /// When the drop happened (to the kernel's coarse clock, 1-4 ms).
    pub at: SystemTime,
}

impl OverLimit {
    fn from_event(event: &RateEvent, mono_now: u64, wall_now: SystemTime) -> OverLimit {
        let client = match address_of(&event.key) {
            a @ IpAddr::V4(_) => IpNet::new(a, 32),
            a @ IpAddr::V6(_) => IpNet::new(a, event.prefix_len.min(128) as u8),
        }
        .expect("prefix length checked");
        let ago = Duration::from_nanos(mono_now.saturating_sub(event.at_ns));
        OverLimit {
            client,
            limit: event.limit,
            overflow: event.overflow != 0,
            at: wall_now.checked_sub(ago).unwrap_or(wall_now),
        }
    }
}

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.client {
            IpNet::V4(n) => write!(f, "RATE LIMIT [{}]", n.addr())?,
            IpNet::V6(n) if n.prefix_len() == 128 => write!(f, "RATE LIMIT [{}]", n.addr())?,
            IpNet::V6(n) => write!(f, "RATE LIMIT [{}]/{}", n.addr(), n.prefix_len())?,
        }
        write!(f, " over {} SYN/min", self.limit)?;
        if self.overflow {
            f.write_str(" (new client while the rate table is full: shared bucket)")?;
        }
        Ok(())
    }
}

/// The rate limiter's maps: the bucket table (for the sweeper and tests)
/// and the event ring buffer.
pub struct RateLimiter {
    buckets: HashMap<MapData, RateKey, RateBucket>,
    overflow: Array<MapData, RateBucket>,
    events: RingBuf<MapData>,
    table_size: u32,
}

impl RateLimiter {
    pub(crate) fn take_from(ebpf: &mut Ebpf, table_size: u32) -> Result<Self, KernelError> {
        fn take<T: TryFrom<aya::maps::Map>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, KernelError> {
            ebpf.take_map(name)
                .and_then(|m| T::try_from(m).ok())
                .ok_or(KernelError::MissingMap(name))
        }
        Ok(RateLimiter {
            buckets: take(ebpf, map_names::RATE_BUCKETS)?,
            overflow: take(ebpf, map_names::RATE_OVERFLOW)?,
            events: take(ebpf, map_names::RATE_EVENTS)?,
            table_size,
        })
    }

    /// Capacity of the bucket table, in clients.
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// Every bucket in the table, by client (see [`address_of`]), sorted.
    pub fn buckets(&self) -> Vec<(IpAddr, RateBucket)> {
        let mut all: Vec<_> = self
            .buckets
            .iter()
            .filter_map(Result::ok)
            .map(|(k, b)| (address_of(&k), b))
            .collect();
        all.sort_by_key(|(a, _)| *a);
        all
    }

    /// The shared bucket of new clients while the table is full.
    pub fn overflow_bucket(&self) -> RateBucket {
        self.overflow.get(&0, 0).unwrap_or_default()
    }

    /// Deletes every bucket that is full again (`tat_ns` at or before
    /// `now`, CLOCK_MONOTONIC ns): its client is as if never seen. A SYN
    /// charged between the read and the delete is forgotten with it, so a
    /// client gains at most one SYN per sweep. Returns how many went.
    pub fn sweep(&mut self, now: u64) -> Result<usize, RateLimitError> {
        sweep_map(&mut self.buckets, now)
    }

    /// The next event already in the ring buffer, if any (does not wait).
    pub fn try_next(&mut self) -> Option<OverLimit> {
        let item = self.events.next()?;
        let event = parse_event(&item);
        drop(item);
        event.map(|e| OverLimit::from_event(&e, monotonic_ns(), SystemTime::now()))
    }

    /// Splits into the event reader (for an async task) and the sweeper.
    pub fn into_parts(self) -> Result<(RateEvents, RateSweeper), RateLimitError> {
        // SAFETY: the ring buffer owns its map fd for its whole life and
        // always reports the same one; the AsyncFd owns the ring buffer.
        let events = unsafe { AsyncFd::register_with_interest(self.events, Interest::READABLE) }
            .map_err(|e| RateLimitError::Poll(e.into()))?;
        Ok((
            RateEvents { events },
            RateSweeper {
                buckets: self.buckets,
            },
        ))
    }
}

/// The address a bucket key holds: the IPv4 client, or the network
/// address of the IPv6 group.
pub fn address_of(key: &RateKey) -> IpAddr {
    let w = key.addr;
    if key.family == FAMILY_V4 {
        return IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()));
    }
    let mut octets = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(octets))
}

fn parse_event(bytes: &[u8]) -> Option<RateEvent> {
    if bytes.len() < size_of::<RateEvent>() {
        return None;
    }
    // SAFETY: RateEvent is plain data valid for any bits; the length is
    // checked and read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RateEvent>()) })
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall with a valid pointer; CLOCK_MONOTONIC exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The async reader of "client over the limit" events.
pub struct RateEvents {
    events: AsyncFd<RingBuf<MapData>>,
}

impl RateEvents {
    /// Waits for the next event. Bounded: the ring buffer holds at most
    /// 4096 events (a full ring loses new ones; the drops are still
    /// counted), and each is handed out as it is read.
    pub async fn next(&mut self) -> Result<OverLimit, RateLimitError> {
        loop {
            let mut guard = self
                .events
                .readable_mut()
                .await
                .map_err(RateLimitError::Poll)?;
            let next = guard.get_inner_mut().next().and_then(|item| {
                let event = parse_event(&item);
                drop(item);
                event
            });
            match next {
                Some(event) => {
                    return Ok(OverLimit::from_event(
                        &event,
                        monotonic_ns(),
                        SystemTime::now(),
                    ))
                }
                None => guard.clear_ready(),
            }
        }
    }
}

/// Forgets buckets that are full again; see [`RateLimiter::sweep`].
pub struct RateSweeper {
    buckets: HashMap<MapData, RateKey, RateBucket>,
}

/// How often the daemon sweeps: a bucket is full at most 60 s after its
/// last SYN, so an idle client's entry lives at most 70 s.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

impl RateSweeper {
    /// As [`RateLimiter::sweep`], at the current time.
    pub fn sweep(&mut self) -> Result<usize, RateLimitError> {
        let now = monotonic_ns();
        sweep_map(&mut self.buckets, now)
    }
}

/// Deletes the buckets of `buckets` whose `tat_ns` is at or before `now`.
fn sweep_map(
    buckets: &mut HashMap<MapData, RateKey, RateBucket>,
    now: u64,
) -> Result<usize, RateLimitError> {
    let full: Vec<RateKey> = buckets
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, b)| b.tat_ns <= now)
        .map(|(k, _)| k)
        .collect();
    let mut removed = 0;
    for key in &full {
        match buckets.remove(key) {
            Ok(()) => removed += 1,
            Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(RateLimitError::Map {
                    map: map_names::RATE_BUCKETS,
                    what: "deleting a full bucket",
                    source,
                })
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_passes_exactly_the_limit_in_a_burst() {
        for limit in [1u32, 2, 5, 30, 600, 60_000] {
            let g = Gcra::new(limit);
            let mut tat = None;
            let mut passed = 0;
            for _ in 0..limit + 50 {
                let (ok, t) = g.charge(tat, 1_000);
                tat = Some(t);
                passed += ok as u32;
            }
            assert_eq!(passed, limit, "limit {limit}");
        }
    }

    #[test]
    fn tokens_come_back_one_per_interval_and_the_bucket_fills_in_a_minute() {
        let g = Gcra::new(30);
        assert_eq!(g.interval_ns, 2_000_000_000);
        let mut tat = None;
        for _ in 0..30 {
            tat = Some(g.charge(tat, 0).1);
        }
        assert!(!g.charge(tat, 0).0);
        // Just before one interval: still empty; at it: one token.
        assert!(!g.charge(tat, g.interval_ns - 1).0);
        let (ok, t) = g.charge(tat, g.interval_ns);
        assert!(ok);
        assert!(!g.charge(Some(t), g.interval_ns).0);
        // Full again a minute after the burst: tat <= now.
        assert!(tat.unwrap() <= MINUTE_NS);
    }

    #[test]
    fn a_steady_client_at_the_limit_is_never_dropped() {
        let g = Gcra::new(60);
        let mut tat = None;
        for i in 0..1_000u64 {
            let (ok, t) = g.charge(tat, i * 1_000_000_000);
            assert!(ok, "SYN {i}");
            tat = Some(t);
        }
    }

    #[test]
    fn masks_group_ipv6_by_prefix() {
        let word = |b: [u8; 4]| u32::from_ne_bytes(b);
        assert_eq!(v6_mask(64), [u32::MAX, u32::MAX, 0, 0]);
        assert_eq!(v6_mask(128), [u32::MAX; 4]);
        assert_eq!(v6_mask(1), [word([0x80, 0, 0, 0]), 0, 0, 0]);
        assert_eq!(v6_mask(56), [u32::MAX, word([0xff, 0xff, 0xff, 0]), 0, 0]);
    }

    #[test]
    fn events_render_as_postscreen_style_lines() {
        let key = |family, addr| RateKey { family, addr };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let v4 = RateEvent {
            key: key(FAMILY_V4, [u32::from_ne_bytes([203, 0, 113, 9]), 0, 0, 0]),
            overflow: 0,
            limit: 30,
            prefix_len: 32,
            at_ns: 5_000,
        };
        let e = OverLimit::from_event(&v4, 7_000, at);
        assert_eq!(e.to_string(), "RATE LIMIT [203.0.113.9] over 30 SYN/min");
        assert_eq!(e.at, at - Duration::from_nanos(2_000));
        let v6 = RateEvent {
            key: key(
                smtpguard_common::rate::FAMILY_V6,
                [
                    u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]),
                    0x0100_0000,
                    0,
                    0,
                ],
            ),
            prefix_len: 64,
            ..v4
        };
        assert_eq!(
            OverLimit::from_event(&v6, 7_000, at).to_string(),
            "RATE LIMIT [2001:db8:0:1::]/64 over 30 SYN/min"
        );
    }

    #[test]
    fn settings_fill_the_runtime_record() {
        let mut rc = RuntimeConfig::zeroed();
        RateLimitSettings {
            syns_per_minute: 30,
            ipv6_prefix: 48,
            exempt_permitted: true,
        }
        .write_into(&mut rc);
        assert_eq!(
            (
                rc.rate_per_minute,
                rc.rate_exempt_permitted,
                rc.rate_v6_prefix
            ),
            (30, 1, 48)
        );
        assert_eq!(rc.rate_interval_ns, 2_000_000_000);
        assert_eq!(rc.rate_tolerance_ns, 58_000_000_000);
        RateLimitSettings::OFF.write_into(&mut rc);
        assert_eq!((rc.rate_per_minute, rc.rate_interval_ns), (0, 0));
    }
}
