//! Bounded reads of files named by the operator (certificates, list
//! files, imports): a path that is a device, a FIFO or a huge file must
//! fail at once with a clear error, never block or eat memory.

use std::{
    fs,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Reads the regular file at `path`, of at most `max_bytes` bytes.
///
/// It is opened non-blocking (opening a FIFO would otherwise wait for a
/// writer) and checked with fstat before anything is read, and the read
/// stops after the limit (a file that grows meanwhile cannot make it read
/// on). Symbolic links are followed.
///
/// # Errors
///
/// The open or read error as it is (`NotFound` included); `IsADirectory`
/// for a directory; `InvalidInput` ("not a regular file") for a FIFO,
/// socket or device; `FileTooLarge` ("larger than N bytes") past the limit.
pub fn read_regular(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = opened.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::from(io::ErrorKind::IsADirectory));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("larger than {max_bytes} bytes"),
        )
    };
    if meta.len() > max_bytes {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    opened.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Reads all of `reader`, at most `max_bytes` bytes (standard input given
/// as a file name `-`).
///
/// # Errors
///
/// The read error, or `FileTooLarge` past the limit.
pub fn read_bounded(reader: impl io::Read, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("larger than {max_bytes} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn devices_fifos_and_large_files_fail_at_once() {
        let err = read_regular(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(err.to_string(), "not a regular file");
        let dir = TempDir::new("files");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(
            read_regular(&fifo, 1024).unwrap_err().to_string(),
            "not a regular file"
        );
        let big = dir.path().join("big");
        fs::write(&big, vec![b'1'; 1025]).unwrap();
        assert_eq!(
            read_regular(&big, 1024).unwrap_err().to_string(),
            "larger than 1024 bytes"
        );
        assert_eq!(read_regular(&big, 1025).unwrap().len(), 1025);
        assert_eq!(
            read_regular(&dir.path().join("none"), 1)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            read_bounded(io::repeat(0), 10).unwrap_err().to_string(),
            "larger than 10 bytes"
        );
    }
}
