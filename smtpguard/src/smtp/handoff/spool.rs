//! The Maildir spool and queue ids.
//!
//! A message is written to `tmp/<name>`, fsync'd, renamed to `new/<name>`,
//! and `new/` is fsync'd; only then is it safe (and acknowledged). Names
//! follow the Maildir convention `<unix seconds>.<unique>.<host>`, with
//! `<unique>` = `M<microseconds>P<pid>Q<counter>R<64 random bits, hex>`,
//! which is also the queue id in `250 2.0.0 Ok: queued as <id>`, in the
//! `Received:` header and in the logs. Opening the spool removes files
//! left in `tmp/` for more than 36 hours (a crash before the rename).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::HandoffError;

/// Files in `tmp/` older than this are leftovers of a crash and are
/// removed when the spool is opened (the Maildir convention: 36 hours).
pub(crate) const STALE_TMP_AGE: Duration = Duration::from_secs(36 * 3600);

/// Process-wide message counter, part of every queue id.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A queue id and the time it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueId {
    /// Unix seconds (the first part of a Maildir name).
    pub secs: u64,
    /// `M<usec>P<pid>Q<counter>R<hex>`: unique on this host.
    pub unique: String,
}

impl QueueId {
    /// A new id: unique by the clock, the process id, a process-wide
    /// counter and 64 random bits (any one of which would usually do).
    pub(crate) fn new() -> QueueId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        QueueId {
            secs: now.as_secs(),
            unique: format!(
                "M{:06}P{}Q{}R{:016x}",
                now.subsec_micros(),
                std::process::id(),
                n,
                random_u64(n)
            ),
        }
    }
}

/// 64 bits from getrandom(2); if that fails (it should not on Linux ≥ 3.17),
/// std's per-process random hash keys mixed with the counter.
fn random_u64(n: u64) -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: buf is valid for 8 writable bytes for the duration of the call.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got == 8 {
        return u64::from_ne_bytes(buf);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish()
}

/// An opened Maildir.
#[derive(Debug)]
pub(crate) struct Maildir {
    dir: PathBuf,
    /// Our host name with `/` and `:` escaped as the Maildir convention
    /// wants (`\057`, `\072`).
    host: String,
}

impl Maildir {
    /// Creates `dir`, `dir/tmp`, `dir/new`, `dir/cur` (mode 0700) as
    /// needed, and checks that a file can be created in `tmp/`.
    pub(crate) fn open(dir: &Path, hostname: &str) -> Result<Maildir, HandoffError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HandoffError::Spool { path, source }
        };
        let mut b = DirBuilder::new();
        b.recursive(true).mode(0o700);
        for sub in ["", "tmp", "new", "cur"] {
            let p = dir.join(sub);
            b.create(&p).map_err(err(&p))?;
        }
        let md = Maildir {
            dir: dir.to_path_buf(),
            host: hostname.replace('/', "\\057").replace(':', "\\072"),
        };
        // Writable? (A read-only file system or a wrong owner shows now,
        // not at the first message.)
        let probe = md
            .dir
            .join("tmp")
            .join(format!(".probe.{}", QueueId::new().unique));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .map_err(err(&md.dir.join("tmp")))?;
        let _ = fs::remove_file(&probe);
        md.sweep_tmp();
        Ok(md)
    }

    /// Removes regular files in `tmp/` not modified for
    /// [`STALE_TMP_AGE`] (36 hours, the Maildir convention): leftovers of
    /// a crash between create and rename, never acknowledged. Errors are
    /// logged, not fatal: a leftover costs only disk space.
    fn sweep_tmp(&self) {
        let tmp = self.dir.join("tmp");
        let entries = match fs::read_dir(&tmp) {
            Ok(e) => e,
            Err(error) => {
                tracing::warn!(dir = %tmp.display(), %error, "cannot list the spool's tmp/ to sweep it");
                return;
            }
        };
        let now = SystemTime::now();
        let mut removed = 0u64;
        for entry in entries.flatten() {
            let path = entry.path();
            // symlink_metadata: a symlink is not followed, and not removed.
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let stale = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > STALE_TMP_AGE);
            if !meta.file_type().is_file() || !stale {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(error) => tracing::warn!(
                    file = %path.display(),
                    %error,
                    "cannot remove a stale file from the spool's tmp/"
                ),
            }
        }
        if removed > 0 {
            tracing::info!(
                dir = %tmp.display(),
                removed,
                "removed files older than 36 hours from the spool's tmp/ (left by a crash, never acknowledged)"
            );
        }
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `parts` (concatenated) as one message named after `id`, with
    /// the tmp → fsync → rename → fsync(new/) sequence. Blocking. On error
    /// nothing is left behind (the tmp file, or the new/ file if its
    /// directory could not be synced, is removed) and the message must be
    /// reported as not accepted. Returns the final path.
    pub(crate) fn deliver(&self, id: &QueueId, parts: &[&[u8]]) -> io::Result<PathBuf> {
        let name = format!("{}.{}.{}", id.secs, id.unique, self.host);
        let tmp = self.dir.join("tmp").join(&name);
        let new_dir = self.dir.join("new");
        let new = new_dir.join(&name);
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            for p in parts {
                f.write_all(p)?;
            }
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, &new) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = File::open(&new_dir).and_then(|d| d.sync_all()) {
            // Not known to be durable: we answer 451, so the client keeps
            // the message; do not leave a duplicate behind.
            let _ = fs::remove_file(&new);
            return Err(e);
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_and_name_safe() {
        let ids: HashSet<String> = (0..1000).map(|_| QueueId::new().unique).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(5) {
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        }
    }

    #[test]
    fn open_creates_maildir_and_delivers() {
        let t = TempDir::new("spool");
        let dir = t.path().join("a/b/Maildir");
        let md = Maildir::open(&dir, "mx.example.com:25/x").unwrap();
        for sub in ["tmp", "new", "cur"] {
            assert!(dir.join(sub).is_dir());
        }
        let id = QueueId::new();
        let path = md
            .deliver(&id, &[b"Received: x\r\n", b"\r\nbody\r\n"])
            .unwrap();
        assert_eq!(path.parent().unwrap(), dir.join("new"));
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(
            name,
            format!("{}.{}.mx.example.com\\07225\\057x", id.secs, id.unique)
        );
        assert_eq!(fs::read(&path).unwrap(), b"Received: x\r\n\r\nbody\r\n");
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        // Opening again is fine.
        Maildir::open(&dir, "h").unwrap();
    }

    /// Leftovers of a crash in `tmp/` older than 36 hours go at start;
    /// younger files (a delivery in progress by another process), and
    /// anything that is not a regular file, stay.
    #[test]
    fn open_sweeps_stale_tmp_files() {
        let t = TempDir::new("spoolsweep");
        let tmp = t.path().join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let old = SystemTime::now() - Duration::from_secs(37 * 3600);
        let nearly = SystemTime::now() - Duration::from_secs(35 * 3600);
        for (name, when) in [("stale", old), ("young", nearly)] {
            let f = File::create(tmp.join(name)).unwrap();
            f.set_modified(when).unwrap();
        }
        fs::create_dir(tmp.join("old-dir")).unwrap();
        File::open(tmp.join("old-dir"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        Maildir::open(t.path(), "h").unwrap();
        let mut left: Vec<String> = fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["old-dir", "young"]);
    }

    #[test]
    fn failure_leaves_nothing() {
        let t = TempDir::new("spoolfail");
        let md = Maildir::open(t.path(), "h").unwrap();
        fs::remove_dir(t.path().join("new")).unwrap();
        assert!(md.deliver(&QueueId::new(), &[b"x"]).is_err());
        assert_eq!(fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn open_error_names_the_directory() {
        let t = TempDir::new("spoolerr");
        let file = t.path().join("plainfile");
        fs::write(&file, b"").unwrap();
        let e = Maildir::open(&file.join("Maildir"), "h").unwrap_err();
        let HandoffError::Spool { path, .. } = &e;
        assert!(path.starts_with(&file), "{e}: {path:?}");
        assert!(e.to_string().contains("plainfile"), "{e}");
    }
}
