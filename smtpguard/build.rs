//! Embeds the XDP object so the operator deploys one file.
//!
//! `cargo xtask build` compiles `smtpguard-ebpf` for `bpfel-unknown-none` and
//! passes its path in `SMTPGUARD_EBPF_OBJECT`. A plain `cargo build`/`cargo
//! test` falls back to the object xtask left in `target/bpf`, and if there is
//! none it embeds an empty object: the library still builds and unit-tests,
//! and loading the program fails with a message that says how to build it.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SMTPGUARD_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let fallback = manifest.join("../target/bpf/bpfel-unknown-none/release/smtpguard");
    let source = env::var_os("SMTPGUARD_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(fallback);
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("smtpguard.bpf.o");
    match fs::read(&source) {
        Ok(bytes) => fs::write(&out, bytes).expect("write OUT_DIR/smtpguard.bpf.o"),
        Err(e) => {
            if env::var_os("SMTPGUARD_EBPF_OBJECT").is_some() {
                panic!("SMTPGUARD_EBPF_OBJECT={}: {e}", source.display());
            }
            println!(
                "cargo:warning=no eBPF object at {} ({e}); embedding none: run `cargo xtask build`",
                source.display()
            );
            fs::write(&out, b"").expect("write OUT_DIR/smtpguard.bpf.o");
        }
    }
}
