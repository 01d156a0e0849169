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
mod runs;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use lookup_v4::lookup_v4;
use maps::*;
use parse::OnSyn;
use runs::rule_of;
use smtpguard_common::{
    counter, rate::RateKey, slot, Action, CpuState, Enforcement, Mode, RuntimeConfig,
};

#[xdp]
pub fn smtpguard(ctx: XdpContext) -> u32 {
    // Zeroed (before the daemon writes it) means "drop nothing".
    let cfg = config();
    let log_on = (cfg.log_rate_per_sec != 0) as u32;
    let judge = Judge {
        ctx: &ctx,
        cfg,
        log_on,
    };
    match parse::classify(&ctx, cfg, &judge) {
        Ok(action) => action,
        Err(reason) => pass(reason, slot::FAMILY_V4, log_on),
    }
}

/// Judges the SYNs the parser hands over; the XDP action is the result.
struct Judge<'a> {
    ctx: &'a XdpContext,
    cfg: &'a RuntimeConfig,
    /// 1 when drop logging is on (see `smtpguard_common::slot`).
    log_on: u32,
}

impl OnSyn for Judge<'_> {
    type Out = u32;

    #[inline(always)]
    fn v4(&self, source: u32, dport_be: u16) -> u32 {
        self.verdict(lookup_v4(self.cfg, source), source, dport_be)
    }

    #[inline(always)]
    fn v6(&self, source: &[u32; 4], dport_be: u16) -> u32 {
        match ipv4_mapped(source) {
            // ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket.
            Some(v4) => self.v4(v4, dport_be),
            None => self.verdict(lookup_v6::lookup(source), *source, dport_be),
        }
    }
}

impl Judge<'_> {
    /// Applies the lists to a SYN from `client` whose longest-prefix entry
    /// is `entry` (a table entry; `NONE` when nothing covers it): no match
    /// falls back to the mode. Counts the outcome once, in its (reason,
    /// family) slot. Generic over the family, so that each family's path is
    /// straight-line code that keeps its address in registers.
    #[inline(always)]
    fn verdict<C: Client>(&self, entry: u32, client: C, dport_be: u16) -> u32 {
        // One lookup for the counter, the pending hit and the log window.
        let Some(cpu) = SG_CPU.get_ptr_mut(0) else {
            return xdp_action::XDP_PASS;
        };
        let rule = rule_of(entry);
        let cfg = self.cfg;
        if cfg.enforcement == Enforcement::Off as u32 {
            return pass_on(cpu, counter::PASS_FILTER_OFF, C::FAMILY, self.log_on);
        }
        let (deny, drop_reason, rule_id) = match rule {
            Some(r) => {
                hit(cpu, r.rule_id);
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
        let drop_reason = if deny {
            drop_reason
        } else {
            // Charged only after the verdict: a denied SYN never pays for
            // the limiter. A permit entry exempts unless configured otherwise.
            let exempt = cfg.rate_exempt_permitted != 0 && rule_id != 0;
            if cfg.rate_per_minute == 0
                || exempt
                || !rate_limit::over_limit(cfg, client.rate_key(cfg))
            {
                return pass_on(cpu, counter::PASS_PERMITTED, C::FAMILY, self.log_on);
            }
            counter::DROP_RATE_LIMIT
        };
        // Drops `drop_reason` (or, in monitor mode, passes it counted as
        // `WOULD_DROP`), through the rate-limited drop log.
        let monitor = cfg.enforcement == Enforcement::Monitor as u32;
        if self.log_on != 0 {
            self.log_drop(cpu, client, dport_be, drop_reason, rule_id, monitor);
        }
        if monitor {
            return pass_on(cpu, counter::WOULD_DROP, C::FAMILY, self.log_on);
        }
        count(cpu, slot::index(drop_reason, C::FAMILY, self.log_on));
        xdp_action::XDP_DROP
    }

    /// Logs a drop (or would-drop) through aya-log, at most
    /// `log_rate_per_sec` events per second on each CPU. A suppressed event
    /// writes nothing; its count is derived in userspace (see
    /// `smtpguard_common::slot`).
    #[inline(always)]
    fn log_drop<C: Client>(
        &self,
        cpu: *mut CpuState,
        client: C,
        dport_be: u16,
        reason: u32,
        rule_id: u32,
        monitor: bool,
    ) {
        // SAFETY: this CPU's record; XDP runs with preemption disabled.
        let window = unsafe { core::ptr::addr_of_mut!((*cpu).log) };
        let limit = self.cfg.log_rate_per_sec as u64;
        // The tick counter is a plain load (the verifier inlines
        // bpf_jiffies64), the clock a helper call: during a flood the clock
        // is read once per tick, and a full window suppresses with no write.
        let tick = unsafe { bpf_jiffies64() };
        // SAFETY: per-CPU value, XDP runs with preemption disabled.
        unsafe {
            if tick != (*window).tick {
                (*window).tick = tick;
                // The coarse clock (tick resolution) is plenty for a
                // one-second window and much cheaper than bpf_ktime_get_ns.
                let now = bpf_ktime_get_coarse_ns();
                if now.wrapping_sub((*window).start_ns) >= 1_000_000_000 {
                    (*window).start_ns = now;
                    (*window).logged = 0;
                }
            }
            if (*window).logged >= limit {
                return;
            }
            (*window).logged += 1;
        }
        count(cpu, slot::LOGGED);
        let what = if monitor { "would drop" } else { "dropped" };
        let why = if reason == counter::DROP_DENY_LIST {
            "deny_list"
        } else if reason == counter::DROP_RATE_LIMIT {
            "rate_limit"
        } else {
            "not_permitted"
        };
        client.log(self.ctx, what, u16::from_be(dport_be), why, rule_id);
    }
}

/// A SYN's source, one type per family: an IPv4 address as loaded (`u32`,
/// network byte order in memory) or an IPv6 address's four words.
trait Client: Copy {
    /// The `smtpguard_common::slot` family.
    const FAMILY: u32;
    /// The rate limiter's client key.
    fn rate_key(&self, cfg: &RuntimeConfig) -> RateKey;
    /// Writes one drop event to the log.
    fn log(&self, ctx: &XdpContext, what: &str, port: u16, why: &str, rule_id: u32);
}

impl Client for u32 {
    const FAMILY: u32 = slot::FAMILY_V4;

    #[inline(always)]
    fn rate_key(&self, _cfg: &RuntimeConfig) -> RateKey {
        rate_limit::v4_key(*self)
    }

    #[inline(always)]
    fn log(&self, ctx: &XdpContext, what: &str, port: u16, why: &str, rule_id: u32) {
        let addr = self.to_ne_bytes();
        warn!(
            ctx,
            "SYN {} src={:i} dport={} reason={} rule={}", what, addr, port, why, rule_id
        );
    }
}

impl Client for [u32; 4] {
    const FAMILY: u32 = slot::FAMILY_V6;

    #[inline(always)]
    fn rate_key(&self, cfg: &RuntimeConfig) -> RateKey {
        rate_limit::v6_key(cfg, self)
    }

    #[inline(always)]
    fn log(&self, ctx: &XdpContext, what: &str, port: u16, why: &str, rule_id: u32) {
        // SAFETY: same size, any bits are valid; the bytes are as loaded.
        let addr = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*self) };
        warn!(
            ctx,
            "SYN {} src={:i} dport={} reason={} rule={}", what, addr, port, why, rule_id
        );
    }
}

/// The IPv4 address of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
/// RFC 4291 §2.5.5.2), word for word as loaded.
#[inline(always)]
pub(crate) fn ipv4_mapped(addr: &[u32; 4]) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == 0x0000_ffff_u32.to_be() {
        Some(addr[3])
    } else {
        None
    }
}

/// Counts one packet in slot `index` of this CPU's record `cpu`.
#[inline(always)]
fn count(cpu: *mut CpuState, index: u32) {
    // SAFETY: this CPU's record; XDP runs with preemption disabled.
    if let Some(slot) = unsafe { (*cpu).counters.get_mut(index as usize) } {
        *slot += 1;
    }
}

/// Passes the packet, counted as `reason` (looks up this CPU's record).
#[inline(always)]
fn pass(reason: u32, family: u32, log_on: u32) -> u32 {
    match SG_CPU.get_ptr_mut(0) {
        Some(cpu) => pass_on(cpu, reason, family, log_on),
        None => xdp_action::XDP_PASS,
    }
}

/// Passes the packet, counted as `reason` in this CPU's record `cpu`.
#[inline(always)]
fn pass_on(cpu: *mut CpuState, reason: u32, family: u32, log_on: u32) -> u32 {
    count(cpu, slot::index(reason, family, log_on));
    xdp_action::XDP_PASS
}

/// Counts a hit of `rule_id` in this CPU's pending record; the shared
/// `SG_HITS` is written (one atomic add) only when the entry changes, so a
/// flood from one network costs no shared write per packet.
#[inline(always)]
fn hit(cpu: *mut CpuState, rule_id: u32) {
    // SAFETY: this CPU's record; XDP runs with preemption disabled.
    let pending = unsafe { core::ptr::addr_of_mut!((*cpu).pending) };
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
