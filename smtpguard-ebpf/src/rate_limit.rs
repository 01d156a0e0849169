//! The per-client SYN rate limit: a GCRA token bucket per client (see
//! `smtpguard_common::rate` for the arithmetic and the table's design).
//!
//! Only SYNs the lists let through reach this module, so a denied SYN
//! costs nothing here, and the shared bucket lines are written only by
//! SYNs that are charged.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use smtpguard_common::{
    rate::{RateBucket, RateEvent, RateKey, FAMILY_V4, FAMILY_V6, MINUTE_NS},
    RuntimeConfig,
};

use crate::maps::{SG_RATE, SG_RATE_EV, SG_RATE_OVF};

/// How often a compare-and-swap is retried before the SYN counts as over
/// the limit: a failed swap means another CPU just took a token from the
/// same bucket, so under contention failing closed is the honest answer.
const CAS_TRIES: u32 = 4;

/// `-EEXIST`: another CPU created the bucket between lookup and insert.
const EEXIST: i32 = 17;

/// Charges one SYN to the bucket of client `key` (see [`v4_key`],
/// [`v6_key`]). `true`: over the limit (drop it).
#[inline(always)]
pub fn over_limit(cfg: &RuntimeConfig, key: RateKey) -> bool {
    // The coarse clock (one tick, 1-4 ms) is cheaper than
    // bpf_ktime_get_ns; GCRA stays exact over time with a clock that
    // jumps, since `tat_ns` advances by whole intervals.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (bucket, overflow) = match SG_RATE.get_ptr_mut(&key) {
        Some(b) => (b, false),
        None => {
            // A new client: its bucket starts full, minus this SYN.
            let fresh = RateBucket {
                tat_ns: now + cfg.rate_interval_ns,
                event_ns: 0,
            };
            match SG_RATE.insert(&key, &fresh, BPF_NOEXIST as u64) {
                Ok(()) => return false,
                Err(e) if e == -EEXIST => match SG_RATE.get_ptr_mut(&key) {
                    Some(b) => (b, false),
                    None => return false,
                },
                // Full (E2BIG) or out of memory: charge the shared bucket,
                // never a free pass and never someone else's bucket.
                Err(_) => match SG_RATE_OVF.get_ptr_mut(0) {
                    Some(b) => (b, true),
                    None => return false,
                },
            }
        }
    };
    if take(cfg, bucket, now) {
        return false;
    }
    if claim_event(bucket, now) {
        let event = RateEvent {
            key,
            overflow: overflow as u32,
            limit: cfg.rate_per_minute,
            prefix_len: if key.family == FAMILY_V4 {
                32
            } else {
                cfg.rate_v6_prefix
            },
            at_ns: now,
        };
        // A full ring loses the event; the drop itself is still counted.
        let _ = SG_RATE_EV.output::<RateEvent>(&event, 0);
    }
    true
}

/// The client of an IPv4 source (as loaded, network byte order in memory):
/// the /32. IPv4-mapped IPv6 sources come here as IPv4.
#[inline(always)]
pub fn v4_key(addr: u32) -> RateKey {
    RateKey {
        family: FAMILY_V4,
        addr: [addr, 0, 0, 0],
    }
}

/// The client of an IPv6 source (its four words as loaded): the address
/// masked by `rate_v6_mask`.
#[inline(always)]
pub fn v6_key(cfg: &RuntimeConfig, w: &[u32; 4]) -> RateKey {
    let m = &cfg.rate_v6_mask;
    RateKey {
        family: FAMILY_V6,
        addr: [w[0] & m[0], w[1] & m[1], w[2] & m[2], w[3] & m[3]],
    }
}

/// Takes a token from `bucket` if it has one (GCRA); `true` if taken.
#[inline(always)]
fn take(cfg: &RuntimeConfig, bucket: *mut RateBucket, now: u64) -> bool {
    // SAFETY: a valid map value pointer; the field is 8-byte aligned.
    let tat_ptr = unsafe { core::ptr::addr_of_mut!((*bucket).tat_ns) };
    for _ in 0..CAS_TRIES {
        // SAFETY: as above; other CPUs write it only by compare-and-swap.
        let tat = unsafe { core::ptr::read_volatile(tat_ptr) };
        let start = if tat > now { tat } else { now };
        if start - now > cfg.rate_tolerance_ns {
            return false;
        }
        if cmpxchg(tat_ptr, tat, start + cfg.rate_interval_ns) == tat {
            return true;
        }
    }
    false
}

/// `true` for the first drop of `bucket` in a minute: the caller sends the
/// event. Several CPUs may see the window expire; the swap picks one.
#[inline(always)]
fn claim_event(bucket: *mut RateBucket, now: u64) -> bool {
    // SAFETY: as in `take`.
    let ev_ptr = unsafe { core::ptr::addr_of_mut!((*bucket).event_ns) };
    let last = unsafe { core::ptr::read_volatile(ev_ptr) };
    if last != 0 && now.wrapping_sub(last) < MINUTE_NS {
        return false;
    }
    cmpxchg(ev_ptr, last, now) == last
}

/// Atomic compare-and-swap (BPF_ATOMIC | BPF_CMPXCHG, kernel 5.12+):
/// stores `new` at `ptr` if it holds `expected`; returns what it held.
#[inline(always)]
fn cmpxchg(ptr: *mut u64, expected: u64, new: u64) -> u64 {
    let old: u64;
    // SAFETY: `ptr` is a valid, 8-byte aligned map value field.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {n})",
            p = in(reg) ptr,
            n = in(reg) new,
            inout("r0") expected => old,
        );
    }
    old
}
