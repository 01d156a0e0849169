//! The persisted mode and enforcement: `smtpguard mode` writes them to a
//! small TOML file beside the lists (atomically, like the lists), so they
//! survive `reload` and restarts. The configuration's `policy.mode` and
//! `policy.enforcement` apply only while no state file exists; delete it
//! to go back to them.

use std::{io, path::Path, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::{Enforcement, ListError, PolicyMode};

/// The largest state file read, in bytes.
const MAX_STATE_FILE_BYTES: u64 = 64 * 1024;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ModeStateError {
    /// Reading the file failed.
    #[error("reading the state file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a valid state file.
    #[error("the state file {} is not valid (delete it to use policy.mode/enforcement of the configuration)", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// Writing the file failed; the old one is intact.
    #[error("writing the state file")]
    Write(#[source] ListError),
    /// Removing the file (to undo a first write) failed.
    #[error("removing the state file {}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The contents of the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeState {
    /// `mode`: the policy mode set by `smtpguard mode`.
    pub mode: PolicyMode,
    /// `enforcement`: the enforcement set by `smtpguard mode`.
    pub enforcement: Enforcement,
}

/// Reads the state file; `None` when there is none.
///
/// # Errors
///
/// [`ModeStateError::Read`] or [`ModeStateError::Parse`], naming the file.
pub fn load(path: &Path) -> Result<Option<ModeState>, ModeStateError> {
    let bytes = match crate::files::read_regular(path, MAX_STATE_FILE_BYTES) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ModeStateError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    toml::from_str(&text)
        .map(Some)
        .map_err(|source| ModeStateError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes `state` (`None`: removes the file), atomically: temporary file,
/// fsync, rename, fsync of the directory.
///
/// # Errors
///
/// [`ModeStateError::Write`] or [`ModeStateError::Remove`]; the old file
/// is then intact.
pub fn save(path: &Path, state: Option<ModeState>) -> Result<(), ModeStateError> {
    let Some(state) = state else {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ModeStateError::Remove {
                path: path.to_path_buf(),
                source: e,
            }),
            _ => Ok(()),
        };
    };
    let text = format!(
        "# Written by `smtpguard mode`; overrides policy.mode and policy.enforcement \
         of the configuration.\n{}",
        toml::to_string(&state).expect("two enums serialize")
    );
    let temp = crate::policy::write_temp(path, text.as_bytes()).map_err(ModeStateError::Write)?;
    crate::policy::install_temp(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        ModeStateError::Write(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn state_round_trips_and_bad_files_are_named() {
        let dir = TempDir::new("mode-state");
        let path = dir.join("state.toml");
        assert_eq!(load(&path).unwrap(), None);
        let state = ModeState {
            mode: PolicyMode::DenyAllExceptPermit,
            enforcement: Enforcement::Monitor,
        };
        save(&path, Some(state)).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state));
        save(&path, None).unwrap();
        assert_eq!(load(&path).unwrap(), None);
        std::fs::write(&path, "mode = \"block\"\n").unwrap();
        let e = load(&path).unwrap_err();
        assert!(
            format!("{:#}", anyhow::Error::new(e)).contains("state.toml is not valid"),
            "named"
        );
    }
}
