//! `smtpguard config check`: the checks a start makes on files, made
//! offline: the configuration, the list files of every source, the mode
//! state file and the TLS files.
//!
//! It runs the daemon's own code paths ([`Config::load`],
//! [`AccessList::load`], [`super::startup::load_policy`], [`crate::tls::load`]) and
//! nothing else: no bpf(), no socket, no write, so any user who can read
//! the files can run it (`ExecStartPre`, Ansible's `validate:`).

use std::path::Path;

use crate::{
    config::{Config, ConfigError},
    logging::one_line,
    policy::{AccessList, ImportError, ListError, ListKind},
};

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// One line per problem, each naming the file (and line or key); any
    /// problem would stop a start.
    pub problems: Vec<String>,
    /// One line per warning (a start would log them and go on).
    pub warnings: Vec<String>,
    /// What was checked, for the success line (`deny list 3 entries`, ...).
    pub checked: Vec<String>,
}

impl CheckReport {
    /// Whether a start would accept these files.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the configuration file at `path`, then (if it is valid) the list
/// files and TLS files it names, collecting every problem found.
pub fn check(path: &Path) -> CheckReport {
    let mut report = CheckReport::default();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            report.problems.push(config_problem(&e, path));
            return report;
        }
    };
    // `source` names a list of a source other than `local` in the summary.
    let mut load =
        |source: Option<&str>, kind: ListKind, file: &Path| match AccessList::load(file, kind) {
            Ok(loaded) => {
                report.warnings.extend(
                    loaded
                        .warnings
                        .iter()
                        .map(|w| format!("{}: {w}", file.display())),
                );
                let state = if loaded.existed { "" } else { " (no file yet)" };
                let count = loaded.list.len().total();
                report.checked.push(format!(
                    "{}{kind} {}{state}",
                    source.map(|s| format!("{s} ")).unwrap_or_default(),
                    crate::policy::entries(count),
                ));
                Some(loaded.list)
            }
            Err(ListError::Import(ImportError::Rejected { errors, .. })) => {
                report.problems.extend(errors.iter().map(|e| one_line(e)));
                None
            }
            Err(e) => {
                report
                    .problems
                    .push(format!("{}: {}", file.display(), one_line(&e)));
                None
            }
        };
    load(None, ListKind::Deny, &config.policy.deny_list);
    load(None, ListKind::Permit, &config.policy.permit_list);
    // Every other source's files, as a start reads them.
    let dir = super::paths::sources_dir(&config);
    let mut sources: Vec<(String, String, ListKind)> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (source, kind) = super::paths::parse_source_file_name(&name)?;
                Some((name.clone(), source.to_owned(), kind))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    sources.sort();
    for (name, source, kind) in &sources {
        load(Some(source), *kind, &dir.join(name));
    }
    // Together, as at start: source names, the mode state file, and the
    // merge fitting the kernel.
    if report.problems.is_empty() {
        if let Err(e) = super::startup::load_policy(&config) {
            report.problems.push(one_line(&e));
        }
    }
    if let Some(files) = config.tls.active_files() {
        match crate::tls::load(
            &files.certificate,
            &files.private_key,
            files.ca_certificate.as_deref(),
        ) {
            Ok(loaded) => {
                report
                    .warnings
                    .extend(loaded.warnings.iter().map(|w| w.to_string()));
                report.checked.push(format!(
                    "certificate {} valid until {}",
                    loaded.certificate.subject,
                    crate::time::utc(loaded.certificate.not_after_unix)
                ));
            }
            Err(e) => report.problems.push(one_line(&e)),
        }
    }
    // A bad pass cache does not stop a start (it starts empty): a warning.
    if let (Some(ttl), Some(_)) = (config.screening.pass_cache_ttl, config.screening.greet_wait) {
        let path = super::defence::pass_cache_path(&config);
        let max = config.screening.pass_cache_max_entries;
        match crate::front_door::screening::PassCache::load(
            &path,
            ttl,
            max,
            std::time::SystemTime::now(),
        ) {
            Ok(cache) => report
                .checked
                .push(format!("pass cache {} clients", cache.len())),
            Err(e) => report.warnings.push(format!(
                "{}; a start would begin with an empty pass cache",
                one_line(&e)
            )),
        }
    }
    if let Some(fleet) = &config.fleet {
        let problems = super::fleet::check_files(fleet);
        if problems.is_empty() {
            report.checked.push(format!(
                "fleet {} at {}",
                fleet.prefix,
                fleet.endpoints.join(", ")
            ));
        }
        report.problems.extend(problems);
    }
    report
}

/// A configuration error as one line. TOML's own message spans several
/// lines (a source excerpt with a caret); this keeps its line, column and
/// last sentence.
fn config_problem(e: &ConfigError, path: &Path) -> String {
    match e {
        ConfigError::Parse { source, .. } => {
            let at = source
                .span()
                .and_then(|span| {
                    let text = std::fs::read_to_string(path).ok()?;
                    let before = text.get(..span.start)?;
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    Some(format!(" line {line}, column {column}"))
                })
                .unwrap_or_default();
            format!(
                "{}{at}: {}",
                path.display(),
                source.message().trim().replace('\n', " ")
            )
        }
        other => one_line(other),
    }
}
