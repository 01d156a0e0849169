//! The cache file (`fleet.cache_file`): the fleet keys as last applied,
//! with their revision, so that a gateway filters with the fleet lists
//! before etcd answers, and resumes watching from the next revision.
//!
//! JSON `{"format": 1, "site": PREFIX, "revision": R, "keys": [[KEY, VALUE], ...]}`,
//! written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old file or the new one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::{Change, FleetState};
use crate::policy::{install_temp, write_temp, ListError};

const FORMAT: u32 = 1;

/// Why the cache file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Reading it failed.
    #[error("reading the fleet cache file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a cache file of this format.
    #[error("the fleet cache file {path} is not a cache file of format {FORMAT}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// It was written for another `fleet.prefix`.
    #[error("the fleet cache file {path} holds prefix {found:?}, not the configured {wanted:?}")]
    OtherSite {
        /// The file.
        path: PathBuf,
        /// Its prefix.
        found: String,
        /// The configured prefix.
        wanted: String,
    },
    /// Writing it failed.
    #[error("writing the fleet cache file")]
    Write(#[source] ListError),
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    site: String,
    revision: i64,
    keys: Vec<(String, String)>,
}

/// Writes `state` to `path` atomically.
///
/// # Errors
///
/// [`CacheError::Write`]; the old file is then untouched.
pub fn save(path: &Path, site: &str, state: &FleetState) -> Result<(), CacheError> {
    let file = CacheFile {
        format: FORMAT,
        site: site.to_owned(),
        revision: state.revision,
        keys: state.to_kvs(site),
    };
    let bytes = serde_json::to_vec(&file).expect("a cache file always serialises");
    let temp = write_temp(path, &bytes).map_err(CacheError::Write)?;
    install_temp(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        CacheError::Write(e)
    })
}

/// Reads the cache file; `None` when there is none. Keys that no longer
/// parse are skipped with a warning, as from etcd.
///
/// # Errors
///
/// [`CacheError`] when it cannot be read, is not a cache file, or was
/// written for another prefix.
pub fn load(path: &Path, site: &str) -> Result<Option<FleetState>, CacheError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file: CacheFile = serde_json::from_slice(&bytes).map_err(|source| CacheError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if file.format != FORMAT {
        return Err(CacheError::Parse {
            path: path.to_owned(),
            source: serde::de::Error::custom(format!("format {} is unknown", file.format)),
        });
    }
    if file.site != site {
        return Err(CacheError::OtherSite {
            path: path.to_owned(),
            found: file.site,
            wanted: site.to_owned(),
        });
    }
    let mut state = FleetState::new();
    for (key, value) in file.keys {
        let change = Change::Put {
            key: key.into_bytes(),
            value: value.into_bytes(),
        };
        if let Err(e) = state.apply(site, &change) {
            tracing::warn!(error = %crate::logging::one_line(&e), path = %path.display(), "fleet cache: entry skipped");
        }
    }
    state.revision = file.revision;
    Ok(Some(state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::keys::{entry_key, feed_entry_key, feed_pointer_key};
    use crate::policy::ListKind;

    #[test]
    fn the_cache_round_trips_and_refuses_another_site() {
        let dir = std::env::temp_dir().join(format!("sg-fleet-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fleet.cache");
        assert!(load(&path, "/s/").unwrap().is_none());
        let mut s = FleetState::new();
        let put = |k: String, v: &str| Change::Put {
            key: k.into_bytes(),
            value: v.as_bytes().to_vec(),
        };
        s.apply(
            "/s/",
            &put(
                entry_key("/s/", ListKind::Deny, "192.0.2.0/24".parse().unwrap()),
                r#"{"comment":"c"}"#,
            ),
        )
        .unwrap();
        s.apply(
            "/s/",
            &put(
                feed_entry_key(
                    "/s/",
                    "f",
                    3,
                    ListKind::Permit,
                    "198.51.100.0/24".parse().unwrap(),
                ),
                "{}",
            ),
        )
        .unwrap();
        s.apply("/s/", &put(feed_pointer_key("/s/", "f"), "3"))
            .unwrap();
        s.revision = 42;
        save(&path, "/s/", &s).unwrap();
        let back = load(&path, "/s/").unwrap().unwrap();
        assert_eq!(back.revision, 42);
        assert_eq!(back.to_kvs("/s/"), s.to_kvs("/s/"));
        assert!(matches!(
            load(&path, "/t/"),
            Err(CacheError::OtherSite { .. })
        ));
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(load(&path, "/s/"), Err(CacheError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
