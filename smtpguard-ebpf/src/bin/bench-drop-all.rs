//! Bench baseline only, built as an object of its own so the production
//! object holds nothing but the filter: `smtpguard_drop_all` drops every
//! packet and does nothing else, so `cargo xtask bench` can put the
//! filter's per-packet cost beside the cheapest possible XDP program,
//! measured the same way. The daemon never loads it.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn smtpguard_drop_all(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
