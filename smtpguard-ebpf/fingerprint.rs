//! Which sources an XDP object was built from: shared by xtask, which
//! writes `<object>.sources` after building, and `smtpguard/build.rs`,
//! which refuses to embed an object whose sources have changed since.
//!
//! Contents, not modification times: a checkout or a merge touches every
//! file without changing what the object would be.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The files that make the XDP objects, relative to the workspace root:
/// these directories' files, recursively, and these single files.
pub const SOURCES: &[&str] = &[
    "smtpguard-ebpf/src",
    "smtpguard-ebpf/Cargo.toml",
    "smtpguard-common/src",
    "smtpguard-common/Cargo.toml",
];

/// Where the fingerprint of `object`'s sources is kept.
pub fn fingerprint_path(object: &Path) -> PathBuf {
    let mut name = object.as_os_str().to_owned();
    name.push(".sources");
    PathBuf::from(name)
}

/// A 64-bit FNV-1a hash, in hex, of every file under [`SOURCES`] (path and
/// contents, in path order). Not for security: it tells an edit apart.
pub fn fingerprint(root: &Path) -> io::Result<String> {
    let mut files = Vec::new();
    for source in SOURCES {
        collect(root, &root.join(source), &mut files)?;
    }
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for relative in files {
        eat(relative.as_bytes());
        eat(&[0]);
        eat(&fs::read(root.join(&relative))?);
        eat(&[0]);
    }
    Ok(format!("{hash:016x}"))
}

/// Adds `path` (a file, or every file below a directory) to `files`, as
/// `/`-separated paths relative to `root`.
fn collect(root: &Path, path: &Path, files: &mut Vec<String>) -> io::Result<()> {
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            collect(root, &entry?.path(), files)?;
        }
    } else {
        let relative = path.strip_prefix(root).unwrap_or(path);
        files.push(relative.to_string_lossy().replace('\\', "/"));
    }
    Ok(())
}
