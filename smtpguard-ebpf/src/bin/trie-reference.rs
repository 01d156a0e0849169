//! Bench baseline and test oracle only, built as an object of its own (never
//! embedded, never loaded by the daemon): `smtpguard_trie` is the XDP program
//! as it was before the compiled lookup (issue #13), frozen. It judges SYNs
//! with one kernel LPM trie per family and generation, counts every verdict
//! in several per-CPU counters, adds each hit atomically to one shared array,
//! and rate-limits drop logs with a shared window. `cargo xtask bench` runs it
//! beside the production program so the gain is measured, not remembered, and
//! the lookup oracle test uses its tries as the reference for longest-prefix
//! matching. It shares `parse.rs` and the `smtpguard-common` types with the
//! production program; its maps keep their old names and layouts.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

#[path = "../parse.rs"]
mod parse;

/// Every map of the frozen program (old names and layouts).
mod maps {
    use aya_ebpf::{
        bindings::BPF_F_MMAPABLE,
        macros::map,
        maps::{Array, LpmTrie, PerCpuArray},
    };
    use smtpguard_common::{
        LogWindow, Rule, RuntimeConfig, COUNTER_COUNT, MAX_PREFIXES_PER_FAMILY, MAX_RULE_IDS,
    };

    /// Runtime configuration (mode, ports, active generation); one element.
    #[map]
    pub static SG_CONFIG: Array<RuntimeConfig> = Array::with_max_entries(1, 0);

    /// IPv4 permit/deny entries, generation A.
    #[map]
    pub static SG_RULES4_A: LpmTrie<[u8; 4], Rule> =
        LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

    /// IPv4 permit/deny entries, generation B.
    #[map]
    pub static SG_RULES4_B: LpmTrie<[u8; 4], Rule> =
        LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

    /// IPv6 permit/deny entries, generation A.
    #[map]
    pub static SG_RULES6_A: LpmTrie<[u8; 16], Rule> =
        LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

    /// IPv6 permit/deny entries, generation B.
    #[map]
    pub static SG_RULES6_B: LpmTrie<[u8; 16], Rule> =
        LpmTrie::with_max_entries(MAX_PREFIXES_PER_FAMILY, 0);

    /// Verdict counters, per CPU so that counting never contends.
    #[map]
    pub static SG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

    /// Hits per list entry, indexed by rule id. Shared (not per CPU): a per-CPU
    /// array of 2M counters would cost 16 MiB per CPU. Mmapable, so userspace
    /// reads all of it without a syscall per entry.
    #[map]
    pub static SG_HITS: Array<u64> = Array::with_max_entries(MAX_RULE_IDS, BPF_F_MMAPABLE);

    /// Drop-event rate limiter state; one element.
    #[map]
    pub static SG_LOG_WINDOW: Array<LogWindow> = Array::with_max_entries(1, 0);
}

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use aya_log_ebpf::warn;
use maps::*;
use parse::OnSyn;
use smtpguard_common::{counter, Action, Enforcement, Mode, Rule, RuntimeConfig};

#[xdp]
pub fn smtpguard_trie(ctx: XdpContext) -> u32 {
    count(counter::PACKETS);
    // Element 0 always exists in an array map; zeroed means "drop nothing".
    let Some(cfg) = SG_CONFIG.get(0) else {
        return pass(counter::PASS_MALFORMED);
    };
    match parse::classify(&ctx, cfg, &Collect) {
        Ok(syn) => judge(&ctx, cfg, &syn),
        Err(reason) => pass(reason),
    }
}

/// Where a SYN came from, in network byte order (the frozen program's
/// shape: the parser's source as bytes).
enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// A new-connection SYN to a guarded port.
struct Syn {
    source: Source,
    /// Destination port in network byte order.
    dport_be: u16,
}

/// Turns the parser's SYN into the frozen program's [`Syn`].
struct Collect;

impl OnSyn for Collect {
    type Out = Syn;

    #[inline(always)]
    fn v4(&self, source: u32, dport_be: u16) -> Syn {
        Syn {
            source: Source::V4(source.to_ne_bytes()),
            dport_be,
        }
    }

    #[inline(always)]
    fn v6(&self, source: &[u32; 4], dport_be: u16) -> Syn {
        Syn {
            // SAFETY: same size, any bits are valid; the bytes are as loaded.
            source: Source::V6(unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*source) }),
            dport_be,
        }
    }
}

/// Applies the lists to a SYN: longest prefix wins; no match falls back to the mode.
#[inline(always)]
fn judge(ctx: &XdpContext, cfg: &RuntimeConfig, syn: &Syn) -> u32 {
    count(counter::SYN);
    let (rule, is_v4) = match &syn.source {
        Source::V4(addr) => (lookup_v4(cfg, *addr), true),
        Source::V6(addr) => match ipv4_mapped(addr) {
            // ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket.
            Some(v4) => (lookup_v4(cfg, v4), true),
            None => (lookup_v6(cfg, addr), false),
        },
    };
    count(if is_v4 {
        counter::SYN_V4
    } else {
        counter::SYN_V6
    });
    if cfg.enforcement == Enforcement::Off as u32 {
        return pass(counter::PASS_FILTER_OFF);
    }
    let (deny, drop_reason, rule_id) = match rule {
        Some(r) => {
            hit(r.rule_id);
            (
                r.action == Action::Deny as u32,
                counter::DROP_DENY_LIST,
                r.rule_id,
            )
        }
        None => (
            cfg.mode == Mode::DenyAllExceptPermit as u32,
            counter::DROP_NOT_PERMITTED,
            0,
        ),
    };
    if !deny {
        return pass(counter::PASS_PERMITTED);
    }
    let monitor = cfg.enforcement == Enforcement::Monitor as u32;
    log_drop(ctx, cfg, syn, drop_reason, rule_id, monitor);
    if monitor {
        return pass(counter::WOULD_DROP);
    }
    count(drop_reason);
    count(if is_v4 {
        counter::DROP_V4
    } else {
        counter::DROP_V6
    });
    xdp_action::XDP_DROP
}

#[inline(always)]
fn ipv4_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if addr[..12] == prefix {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[inline(always)]
fn lookup_v4(cfg: &RuntimeConfig, addr: [u8; 4]) -> Option<Rule> {
    let key = Key::new(32, addr);
    let trie = if cfg.active_generation == 0 {
        &SG_RULES4_A
    } else {
        &SG_RULES4_B
    };
    trie.get(&key).copied()
}

#[inline(always)]
fn lookup_v6(cfg: &RuntimeConfig, addr: &[u8; 16]) -> Option<Rule> {
    let key = Key::new(128, *addr);
    let trie = if cfg.active_generation == 0 {
        &SG_RULES6_A
    } else {
        &SG_RULES6_B
    };
    trie.get(&key).copied()
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = SG_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, XDP runs with preemption disabled.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn pass(reason: u32) -> u32 {
    count(counter::PASSED);
    count(reason);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn hit(rule_id: u32) {
    if let Some(slot) = SG_HITS.get_ptr_mut(rule_id) {
        // SAFETY: valid, 8-byte aligned map value; shared between CPUs, so
        // the add must be atomic (BPF_ATOMIC | BPF_ADD, no fetch).
        unsafe {
            core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) slot, in(reg) 1u64);
        }
    }
}

/// Logs a drop (or would-drop) through aya-log, at most
/// `log_rate_per_sec` events per second; the rest are counted as suppressed.
#[inline(always)]
fn log_drop(
    ctx: &XdpContext,
    cfg: &RuntimeConfig,
    syn: &Syn,
    reason: u32,
    rule_id: u32,
    monitor: bool,
) {
    // Logging off: no clock read and no write to the shared window on
    // the drop path, which is the flood path.
    if cfg.log_rate_per_sec == 0 {
        return;
    }
    let Some(window) = SG_LOG_WINDOW.get_ptr_mut(0) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: valid map value. Races between CPUs only blur the limit a little.
    let allowed = unsafe {
        if now.wrapping_sub((*window).start_ns) >= 1_000_000_000 {
            (*window).start_ns = now;
            (*window).logged = 0;
        }
        (*window).logged += 1;
        (*window).logged <= cfg.log_rate_per_sec as u64
    };
    if !allowed {
        count(counter::LOG_SUPPRESSED);
        return;
    }
    let port = u16::from_be(syn.dport_be);
    let what = if monitor { "would drop" } else { "dropped" };
    let why = if reason == counter::DROP_DENY_LIST {
        "deny_list"
    } else {
        "not_permitted"
    };
    match &syn.source {
        Source::V4(a) => warn!(
            ctx,
            "SYN {} src={:i} dport={} reason={} rule={}", what, *a, port, why, rule_id
        ),
        Source::V6(a) => warn!(
            ctx,
            "SYN {} src={:i} dport={} reason={} rule={}", what, *a, port, why, rule_id
        ),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
