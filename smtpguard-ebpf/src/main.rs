//! The smtpguard XDP program: drops new-connection SYNs to the guarded SMTP
//! ports from sources the permit/deny lists deny, passes everything else,
//! and counts every verdict. See `parse` for what counts as a SYN.
#![no_std]
#![no_main]
// BPF has an atomic add instruction, but core's atomics need compare-and-swap,
// which the bpfel target lacks; inline asm reaches the instruction directly.
#![feature(asm_experimental_arch)]

mod lookup_v4;
mod maps;
mod parse;

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use aya_log_ebpf::warn;
use lookup_v4::lookup_v4;
use maps::*;
use parse::{Source, Syn};
use smtpguard_common::{counter, Action, Enforcement, Mode, Rule, RuntimeConfig};

#[xdp]
pub fn smtpguard(ctx: XdpContext) -> u32 {
    count(counter::PACKETS);
    // Element 0 always exists in an array map; zeroed means "drop nothing".
    let Some(cfg) = SG_CONFIG.get(0) else {
        return pass(counter::PASS_MALFORMED);
    };
    match parse::classify(&ctx, cfg) {
        Ok(syn) => judge(&ctx, cfg, &syn),
        Err(reason) => pass(reason),
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
