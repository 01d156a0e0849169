//! The smtpguard XDP program: drops new-connection SYNs to the guarded SMTP
//! ports from sources the permit/deny lists deny, passes everything else,
//! and counts every verdict. See `parse` for what counts as a SYN.
#![no_std]
#![no_main]
// BPF has an atomic add instruction, but core's atomics need compare-and-swap,
// which the bpfel target lacks; inline asm reaches the instruction directly.
#![feature(asm_experimental_arch)]

mod lookup_v4;
mod lookup_v6;
mod maps;
mod parse;
mod rate_limit;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext,
};
use aya_log_ebpf::warn;
use lookup_v4::lookup_v4;
use maps::*;
use parse::{Source, Syn};
use smtpguard_common::{counter, slot, Action, Enforcement, Mode, Rule, RuntimeConfig};

#[xdp]
pub fn smtpguard(ctx: XdpContext) -> u32 {
    // Element 0 always exists in an array map; zeroed means "drop nothing".
    let Some(cfg) = SG_CONFIG.get(0) else {
        return pass(counter::PASS_MALFORMED, slot::FAMILY_V4, 0);
    };
    let log_on = (cfg.log_rate_per_sec != 0) as u32;
    match parse::classify(&ctx, cfg) {
        Ok(syn) => judge(&ctx, cfg, &syn, log_on),
        Err(reason) => pass(reason, slot::FAMILY_V4, log_on),
    }
}

/// Applies the lists to a SYN: longest prefix wins; no match falls back to
/// the mode. Counts the outcome once, in its (reason, family) slot.
#[inline(always)]
fn judge(ctx: &XdpContext, cfg: &RuntimeConfig, syn: &Syn, log_on: u32) -> u32 {
    let (rule, family) = match &syn.source {
        Source::V4(addr) => (lookup_v4(cfg, *addr), slot::FAMILY_V4),
        Source::V6(addr) => match ipv4_mapped(addr) {
            // ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket.
            Some(v4) => (lookup_v4(cfg, v4), slot::FAMILY_V4),
            None => (lookup_v6(addr), slot::FAMILY_V6),
        },
    };
    if cfg.enforcement == Enforcement::Off as u32 {
        return pass(counter::PASS_FILTER_OFF, family, log_on);
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
        // Charged only after the verdict: a denied SYN never pays for the
        // limiter. A permit entry exempts unless configured otherwise.
        let exempt = cfg.rate_exempt_permitted != 0 && rule_id != 0;
        if cfg.rate_per_minute == 0 || exempt || !rate_limit::over_limit(cfg, &syn.source) {
            return pass(counter::PASS_PERMITTED, family, log_on);
        }
        return refuse(ctx, cfg, syn, counter::DROP_RATE_LIMIT, 0, family, log_on);
    }
    refuse(ctx, cfg, syn, drop_reason, rule_id, family, log_on)
}

/// Drops a SYN for `drop_reason` (or, in monitor mode, passes it counted as
/// `WOULD_DROP`), logging it through the rate-limited drop log.
#[inline(always)]
fn refuse(
    ctx: &XdpContext,
    cfg: &RuntimeConfig,
    syn: &Syn,
    drop_reason: u32,
    rule_id: u32,
    family: u32,
    log_on: u32,
) -> u32 {
    let monitor = cfg.enforcement == Enforcement::Monitor as u32;
    if log_on != 0 {
        log_drop(ctx, cfg, syn, drop_reason, rule_id, monitor);
    }
    if monitor {
        return pass(counter::WOULD_DROP, family, log_on);
    }
    count(slot::index(drop_reason, family, log_on));
    xdp_action::XDP_DROP
}

#[inline(always)]
pub(crate) fn ipv4_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if addr[..12] == prefix {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[inline(always)]
fn lookup_v6(addr: &[u8; 16]) -> Option<Rule> {
    // SAFETY: same size, any bits are valid; the words are as loaded.
    lookup_v6::lookup(&unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) })
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = SG_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, XDP runs with preemption disabled.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn pass(reason: u32, family: u32, log_on: u32) -> u32 {
    count(slot::index(reason, family, log_on));
    xdp_action::XDP_PASS
}

/// Counts a hit of `rule_id` in this CPU's pending record; the shared
/// `SG_HITS` is written (one atomic add) only when the entry changes, so a
/// flood from one network costs no shared write per packet.
#[inline(always)]
fn hit(rule_id: u32) {
    let Some(pending) = SG_HIT_PENDING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, XDP runs with preemption disabled.
    let (previous, count) = unsafe {
        if (*pending).rule_id == rule_id {
            (*pending).count += 1;
            return;
        }
        let flushed = ((*pending).rule_id, (*pending).count);
        // Replace before adding to SG_HITS: a reader that adds SG_HITS and
        // then the pending records may miss a flush for a moment, but never
        // counts one twice.
        (*pending).rule_id = rule_id;
        (*pending).count = 1;
        flushed
    };
    if count == 0 {
        return;
    }
    if let Some(total) = SG_HITS.get_ptr_mut(previous) {
        // SAFETY: valid, 8-byte aligned map value; shared between CPUs, so
        // the add must be atomic (BPF_ATOMIC | BPF_ADD, no fetch).
        unsafe {
            core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) total, in(reg) count);
        }
    }
}

/// Logs a drop (or would-drop) through aya-log, at most `log_rate_per_sec`
/// events per second on each CPU. A suppressed event writes nothing; its
/// count is derived in userspace (see `smtpguard_common::slot`).
#[inline(always)]
fn log_drop(
    ctx: &XdpContext,
    cfg: &RuntimeConfig,
    syn: &Syn,
    reason: u32,
    rule_id: u32,
    monitor: bool,
) {
    let Some(window) = SG_LOG_WINDOW.get_ptr_mut(0) else {
        return;
    };
    // The coarse clock (tick resolution) is plenty for a one-second window
    // and much cheaper than bpf_ktime_get_ns.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: per-CPU value, XDP runs with preemption disabled.
    unsafe {
        if now.wrapping_sub((*window).start_ns) >= 1_000_000_000 {
            (*window).start_ns = now;
            (*window).logged = 0;
        } else if (*window).logged >= cfg.log_rate_per_sec as u64 {
            return;
        }
        (*window).logged += 1;
    }
    count(slot::LOGGED);
    let port = u16::from_be(syn.dport_be);
    let what = if monitor { "would drop" } else { "dropped" };
    let why = if reason == counter::DROP_DENY_LIST {
        "deny_list"
    } else if reason == counter::DROP_RATE_LIMIT {
        "rate_limit"
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
