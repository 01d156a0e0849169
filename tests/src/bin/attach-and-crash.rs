//! Test helper: loads the XDP program with one deny entry, attaches it
//! pinned, then dies without running any destructor, the way a crashed or
//! SIGKILLed daemon would. Usage:
//! `attach-and-crash PIN_DIR INTERFACE PORT DENY_PREFIX [native|skb|auto]`
//! (run it inside the namespace that has INTERFACE; the mode defaults to
//! native). Prints `attached MODE` (`replaced` too when it took over a
//! pinned link) once the program is attached.

use std::path::Path;

use smtpguard::kernel::{ApplyHow, AttachMode, XdpFilter};
use smtpguard_common::{Action, Enforcement, Mode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (pin_dir, interface, port, deny, mode) = match &args[..] {
        [_, pin_dir, interface, port, deny] => (pin_dir, interface, port, deny, "native"),
        [_, pin_dir, interface, port, deny, mode] => {
            (pin_dir, interface, port, deny, mode.as_str())
        }
        _ => {
            eprintln!(
                "usage: attach-and-crash PIN_DIR INTERFACE PORT DENY_PREFIX [native|skb|auto]"
            );
            std::process::exit(2);
        }
    };
    let mode = match mode {
        "native" => AttachMode::Native,
        "skb" => AttachMode::Skb,
        "auto" => AttachMode::Auto,
        other => {
            eprintln!("attach-and-crash: unknown mode {other:?}");
            std::process::exit(2);
        }
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
    let attachment = filter
        .attach_pinned(interface, mode, Path::new(pin_dir))
        .expect("attach");
    let replaced = if attachment.replaced_pinned {
        " replaced"
    } else {
        ""
    };
    println!("attached {}{replaced}", attachment.mode);
    std::process::abort();
}
