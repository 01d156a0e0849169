//! Unique temporary directories, removed with everything in them on drop.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// A fresh directory under the system temp dir,
/// `sg-<tag>-<pid>-<n>-<nanos>`, removed with everything in it when
/// dropped (also when the test fails).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates the directory, mode 0755 (Postfix's unprivileged daemons
    /// must be able to reach files under it).
    ///
    /// # Panics
    ///
    /// When the directory cannot be made (see [`TempDir::try_new`]).
    pub fn new(tag: &str) -> TempDir {
        TempDir::try_new(tag).unwrap_or_else(|e| panic!("temporary directory {tag}: {e}"))
    }

    /// [`TempDir::new`] that returns the error instead of panicking.
    ///
    /// # Errors
    ///
    /// Creating the directory or setting its mode failed.
    pub fn try_new(tag: &str) -> io::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "sg-{tag}-{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)?;
        let dir = TempDir(path);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` under the directory (not created).
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    ///
    /// # Panics
    ///
    /// When the file cannot be written.
    pub fn write(&self, name: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_writable_and_removed_on_drop() {
        let a = TempDir::new("t");
        let b = TempDir::new("t");
        assert_ne!(a.path(), b.path());
        let file = a.write("f.txt", "hello");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "hello");
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }
}
