//! Test helper: loads the XDP program with one deny entry, attaches it
//! pinned, then dies without running any destructor, the way a crashed or
//! SIGKILLed daemon would. Usage: `attach-and-crash PIN_DIR INTERFACE PORT DENY_PREFIX`
//! (run it inside the namespace that has INTERFACE).

use std::path::Path;

use smtpguard::kernel::{ApplyHow, AttachMode, XdpFilter};
use smtpguard_common::{Action, Enforcement, Mode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, pin_dir, interface, port, deny] = &args[..] else {
        eprintln!("usage: attach-and-crash PIN_DIR INTERFACE PORT DENY_PREFIX");
        std::process::exit(2);
    };
    let (mut filter, mut sync, _stats) = XdpFilter::load().expect("load");
    sync.apply(
        &[(deny.parse().expect("prefix"), Action::Deny)],
        ApplyHow::Atomic,
    )
    .expect("list");
    sync.set_runtime(
        Mode::AcceptAllExceptDeny,
        Enforcement::Enforce,
        &[port.parse().unwrap()],
        0,
    )
    .expect("config");
    filter
        .attach_pinned(interface, AttachMode::Native, Path::new(pin_dir))
        .expect("attach");
    println!("attached");
    std::process::abort();
}
