//! Where the daemon keeps its lists and state, all derived from the
//! configured list files: the `local` source is `policy.deny_list` and
//! `policy.permit_list` themselves (so existing files need no migration);
//! every other source lives in `sources/` beside the deny list, and the
//! persisted mode in `state.toml` beside it.

use std::path::{Path, PathBuf};

use crate::{
    config::Config,
    policy::{ListKind, SourceName},
};

/// The file name of the persisted mode and enforcement.
pub const STATE_FILE_NAME: &str = "state.toml";
/// The directory, beside the deny list, that holds the non-local sources.
pub const SOURCES_DIR_NAME: &str = "sources";

/// The directory the deny list is in.
fn list_dir(config: &Config) -> PathBuf {
    config
        .policy
        .deny_list
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The directory of the non-local sources: `sources/` beside the deny
/// list (`/etc/smtpguard/sources` by default).
pub fn sources_dir(config: &Config) -> PathBuf {
    list_dir(config).join(SOURCES_DIR_NAME)
}

/// The state file: `state.toml` beside the deny list.
pub fn state_path(config: &Config) -> PathBuf {
    list_dir(config).join(STATE_FILE_NAME)
}

/// The file one list of one source lives in: the configured list file for
/// `local`, `sources/NAME.deny.list` or `sources/NAME.permit.list` for
/// the others.
pub fn list_path(config: &Config, source: &SourceName, kind: ListKind) -> PathBuf {
    match (source.is_local(), kind) {
        (true, ListKind::Deny) => config.policy.deny_list.clone(),
        (true, ListKind::Permit) => config.policy.permit_list.clone(),
        (false, kind) => sources_dir(config).join(source_file_name(source, kind)),
    }
}

/// `NAME.deny.list` or `NAME.permit.list`.
pub fn source_file_name(source: &SourceName, kind: ListKind) -> String {
    format!("{source}.{}.list", kind.as_str())
}

/// The source and list a file name of the sources directory stands for:
/// `Some((name, kind))` for `NAME.deny.list` / `NAME.permit.list` (the
/// name still unchecked), `None` for anything else (temporary files
/// start with a dot).
pub fn parse_source_file_name(file_name: &str) -> Option<(&str, ListKind)> {
    if file_name.starts_with('.') {
        return None;
    }
    [ListKind::Deny, ListKind::Permit]
        .into_iter()
        .find_map(|kind| {
            file_name
                .strip_suffix(&format!(".{}.list", kind.as_str()))
                .map(|name| (name, kind))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_file_names_round_trip() {
        let ipsum = SourceName::new("ipsum").unwrap();
        let name = source_file_name(&ipsum, ListKind::Permit);
        assert_eq!(name, "ipsum.permit.list");
        assert_eq!(
            parse_source_file_name(&name),
            Some(("ipsum", ListKind::Permit))
        );
        assert_eq!(parse_source_file_name(".ipsum.deny.list.tmp.1.2"), None);
        assert_eq!(parse_source_file_name("README"), None);
        assert_eq!(
            parse_source_file_name("Bad Name.deny.list"),
            Some(("Bad Name", ListKind::Deny))
        );
    }
}
