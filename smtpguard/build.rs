//! Embeds the XDP object so the operator deploys one file.
//!
//! `cargo xtask build` compiles `smtpguard-ebpf` for `bpfel-unknown-none`
//! into `target/bpf` and records which sources it built from
//! (`<object>.sources`); this script embeds that object, for xtask's builds
//! and a plain `cargo build`/`cargo test` alike (the same environment, so
//! switching between them rebuilds nothing). `SMTPGUARD_EBPF_OBJECT` names
//! another object, which must then exist. From `target/bpf`:
//!
//! - none there: it embeds an empty object with a warning, so the library
//!   still builds and unit-tests without the eBPF toolchain (loading the
//!   program then fails with a message that says how to build it);
//! - one built from other sources than the tree's (the XDP program or
//!   smtpguard-common edited since): the build fails and says to run
//!   `cargo xtask build`, rather than test the old program in silence.

#[path = "../smtpguard-ebpf/fingerprint.rs"]
mod fingerprint;

use std::{env, fs, path::PathBuf, process};

fn main() {
    println!("cargo:rerun-if-env-changed=SMTPGUARD_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest
        .parent()
        .expect("smtpguard lives in the workspace")
        .to_path_buf();
    let fallback = root.join("target/bpf/bpfel-unknown-none/release/smtpguard");
    let explicit = env::var_os("SMTPGUARD_EBPF_OBJECT").is_some();
    let source = env::var_os("SMTPGUARD_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(fallback);
    println!("cargo:rerun-if-changed={}", source.display());
    let recorded = fingerprint::fingerprint_path(&source);
    println!("cargo:rerun-if-changed={}", recorded.display());
    for path in fingerprint::SOURCES {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("smtpguard.bpf.o");
    match fs::read(&source) {
        Ok(bytes) => {
            check_current(&root, &source, &recorded);
            fs::write(&out, bytes).expect("write OUT_DIR/smtpguard.bpf.o");
        }
        Err(e) => {
            if explicit {
                fail(&format!("SMTPGUARD_EBPF_OBJECT={}: {e}", source.display()));
            }
            println!(
                "cargo:warning=no eBPF object at {} ({e}); embedding none: run `cargo xtask build`",
                source.display()
            );
            fs::write(&out, b"").expect("write OUT_DIR/smtpguard.bpf.o");
        }
    }
}

/// Fails the build when `object` was built from other sources than the
/// tree's; warns when it carries no record (built by an older xtask).
fn check_current(root: &std::path::Path, object: &std::path::Path, recorded: &std::path::Path) {
    let current = fingerprint::fingerprint(root)
        .unwrap_or_else(|e| fail(&format!("reading the smtpguard-ebpf sources: {e}")));
    match fs::read_to_string(recorded) {
        Ok(built_from) if built_from.trim() == current => {}
        Ok(_) => fail(&format!(
            "the XDP object {} was built from other sources than smtpguard-ebpf and \
             smtpguard-common hold now (edited since it was built): run `cargo xtask build` \
             (or `cargo xtask test`), which rebuilds it",
            object.display()
        )),
        Err(_) => println!(
            "cargo:warning=the XDP object {} has no record of its sources ({} is missing), so \
             it may be older than smtpguard-ebpf: run `cargo xtask build`",
            object.display(),
            recorded.display()
        ),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    process::exit(1);
}
