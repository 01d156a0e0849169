//! The daemon's answers to the control socket: each [`Request`] becomes a
//! call on [`Daemon`] (lists, mode, reload) or a read of its state.

use std::{
    net::IpAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;

use super::{
    snapshot::Snapshot,
    state::{Daemon, DaemonError, KernelWrite, Persist},
};
use crate::{
    control::{
        proto::{
            Admission, CheckView, Checked, ClientView, EntryView, Exported, ImportResult,
            InterfaceView, Kicked, LineIssue, ListChanged, ListEntries, ListName, ListSize,
            ModeSet, OverriddenEntry, Request, Response, SessionView, SessionsView, SourceView,
            StatsView, StatusView, TopEntry,
        },
        ClientWaiting, ControlHandler, PeerInfo,
    },
    front_door::Live,
    policy::{
        parse_entry, parse_list, EntryError, EntryOptions, ImportError, ImportMode, ImportOptions,
        ListEntry, ListKind, Policy, Reason, SourceError, SourceName, Verdict,
    },
};

/// The longest `--for`: ten years, in seconds.
const MAX_EXPIRY_SECS: u64 = 10 * 365 * 24 * 3600;
/// The longest list-entry comment, in bytes (it goes on the entry's line).
const MAX_COMMENT_BYTES: usize = 1024;
/// At most this many bad lines of an import are listed in the reply (the
/// count is always exact).
const MAX_LISTED_ISSUES: usize = 1000;
/// At most this many related entries are named per entry (and protected
/// entries per import) in a reply's warnings.
const MAX_RELATED: usize = 10;

/// Why a control request was refused; nothing was changed. The control
/// socket sends the message with its causes, one line.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// `--for 0`.
    #[error("an entry cannot expire after 0 seconds")]
    ZeroExpiry,
    /// `--for` beyond ten years.
    #[error("an entry can be temporary for at most 10 years; leave out --for for a permanent one")]
    ExpiryTooLong,
    /// A comment longer than 1024 bytes.
    #[error("a comment can be at most {MAX_COMMENT_BYTES} bytes; nothing was changed")]
    CommentTooLong,
    /// An entry the entry parser refuses.
    #[error("entry {entry:?} refused; nothing was changed")]
    Entry {
        /// The entry as given.
        entry: String,
        #[source]
        source: EntryError,
    },
    /// An add or remove without entries.
    #[error("no entries given")]
    NoEntries,
    /// `check` with something that is not an address.
    #[error("{text:?} is not an IPv4 or IPv6 address")]
    Address {
        /// The text as given.
        text: String,
    },
    /// An import the list parser refuses as a whole.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// `import --replace` of a text without entries, without
    /// `--allow-empty`.
    #[error(
        "{source_name}: no entries in {lines} line(s); refusing to empty the {list} with \
         --replace (wrong or truncated file?); nothing was changed. Use --allow-empty to empty it"
    )]
    EmptyReplace {
        /// The file, as named by the operator.
        source_name: String,
        /// Lines read.
        lines: usize,
        /// The list that would be emptied.
        list: ListKind,
    },
    /// `kick` of something that is not a session id, address or prefix.
    #[error("{target:?} is not a session id, an IP address or a prefix")]
    KickTarget {
        /// The target as given.
        target: String,
    },
    /// `kick` of a session id that is not open.
    #[error("no open session has id {id} (see `smtpguard sessions`)")]
    NoSuchSession {
        /// The id as given (upper case).
        id: String,
    },
    /// A source name that is not valid (or reserved, for a change).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A source that does not exist, for a command that reads or removes.
    #[error("there is no source {name:?} (sources: {known})")]
    NoSuchSource {
        /// The name given.
        name: String,
        /// The sources there are.
        known: String,
    },
    /// `deny add` of entries covering protected ranges, without `--force`.
    #[error(
        "not added, nothing was changed: {overlaps}; protected addresses are never denied \
         (use --force to store the entry anyway; the protected addresses stay permitted)"
    )]
    Protected {
        /// Each entry and the protected range it touches.
        overlaps: String,
    },
    /// The daemon refused the change or the reload.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A change of the `fleet` source failed.
    #[error(transparent)]
    Fleet(#[from] super::fleet::FleetChangeError),
}

type Result<T, E = RequestError> = std::result::Result<T, E>;

/// Serves control requests against the daemon's state.
pub struct Handler {
    /// The daemon.
    pub daemon: Arc<Daemon>,
}

impl ControlHandler for Handler {
    async fn handle(&self, request: Request, peer: PeerInfo, client: ClientWaiting) -> Response {
        let op = request.op();
        let daemon = Arc::clone(&self.daemon);
        // Every line logged for the request (list changes, kicks) names the
        // caller, from SO_PEERCRED.
        let caller = tracing::info_span!("control", uid = peer.uid, pid = peer.pid.unwrap_or(0));
        // List work can take a while (imports of 100k+ entries): keep it off
        // the async threads. A change whose client has gone by the time its
        // turn comes is not made (see `Daemon::change_policy_for`).
        let result = tokio::task::spawn_blocking(move || {
            caller.in_scope(|| answer(&daemon, request, &|| !client.has_left()))
        })
        .await;
        match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                // The message and its causes, on one line.
                let message = crate::logging::one_line(&e);
                tracing::warn!(op, uid = peer.uid, error = %message, "control request failed");
                Response::error(message)
            }
            Err(e) => Response::error(format!("internal error: {e}")),
        }
    }
}

fn kind(list: ListName) -> ListKind {
    match list {
        ListName::Deny => ListKind::Deny,
        ListName::Permit => ListKind::Permit,
    }
}

fn list_name(kind: ListKind) -> ListName {
    match kind {
        ListKind::Deny => ListName::Deny,
        ListKind::Permit => ListName::Permit,
    }
}

/// Carries out `request`. Changes are made only if `still_wanted` says
/// yes once their turn has come.
fn answer(daemon: &Daemon, request: Request, still_wanted: &dyn Fn() -> bool) -> Result<Response> {
    Ok(match request {
        Request::ListAdd {
            list,
            entries,
            expires_in_secs,
            comment,
            allow_all,
            source,
            force,
            wait_fleet,
        } => {
            let fleet = is_fleet(source.as_deref());
            let source = match fleet {
                true => crate::fleet::source_name(),
                false => writable_source(source.as_deref())?,
            };
            let (prefixes, mut warnings) = parse_entries(&entries, allow_all)?;
            let expires = match expires_in_secs {
                None => None,
                Some(0) => return Err(RequestError::ZeroExpiry),
                Some(s) if s > MAX_EXPIRY_SECS => return Err(RequestError::ExpiryTooLong),
                Some(s) => Some(SystemTime::now() + Duration::from_secs(s)),
            };
            if comment
                .as_ref()
                .is_some_and(|c| c.len() > MAX_COMMENT_BYTES)
            {
                return Err(RequestError::CommentTooLong);
            }
            let k = kind(list);
            if k == ListKind::Deny {
                // The protected ranges change only with the configuration.
                let protected = protected_overlaps(&daemon.policy(), &prefixes);
                if !protected.is_empty() && !force {
                    return Err(RequestError::Protected {
                        overlaps: protected.join("; "),
                    });
                }
                warnings.extend(protected.iter().map(|o| {
                    format!("{o}: stored (--force), but the protected addresses stay permitted")
                }));
            }
            if fleet {
                let value = crate::fleet::EntryValue {
                    comment,
                    expires_at: expires,
                    added_by: Some(daemon.config().server.hostname.clone()),
                    added_at: Some(SystemTime::now()),
                };
                return fleet_change(daemon, list, prefixes, Some(value), wait_fleet, warnings);
            }
            let touched = [Persist::List(source.clone(), k)];
            let outcome = daemon.change_policy_for(still_wanted, &touched, |p| {
                warnings.extend(relation_warnings(p, &source, k, &prefixes));
                let outcome = p.source_mut(&source).list_mut(k).add(
                    prefixes.clone(),
                    comment.as_deref(),
                    expires,
                )?;
                Ok((outcome, KernelWrite::Prefixes(prefixes.clone())))
            })?;
            warnings.extend(outcome.updated.iter().map(|p| {
                format!("{p} was already on the {k} of source {source}; its comment and expiry were merged")
            }));
            tracing::info!(source = %source, list = %k, entries = %entries.join(" "), added = outcome.added.len(),
                expires_in_secs, force, "list entries added");
            if k == ListKind::Deny {
                daemon.close_denied_sessions();
            }
            Response::ListChanged(ListChanged {
                list,
                source: source.to_string(),
                added: outcome.added.len() as u64,
                removed: 0,
                unchanged: outcome.updated.len() as u64,
                warnings,
                list_size: source_size(daemon, &source, k),
            })
        }
        Request::ListRemove {
            list,
            entries,
            source,
            wait_fleet,
        } => {
            if is_fleet(source.as_deref()) {
                let (prefixes, warnings) = parse_entries(&entries, true)?;
                return fleet_change(daemon, list, prefixes, None, wait_fleet, warnings);
            }
            // `auto` too: an operator may lift an automatic ban.
            let source = match source.as_deref() {
                Some(name) => SourceName::removable(name)?,
                None => SourceName::local(),
            };
            let (prefixes, mut warnings) = parse_entries(&entries, true)?;
            let k = kind(list);
            existing_source(daemon, &source)?;
            let touched = [Persist::List(source.clone(), k)];
            let outcome = daemon.change_policy_for(still_wanted, &touched, |p| {
                let outcome = p.source_mut(&source).list_mut(k).remove(prefixes.clone());
                Ok((outcome, KernelWrite::Prefixes(prefixes.clone())))
            })?;
            // A typo should not pass for success: say what was not there.
            let policy = daemon.policy();
            warnings.extend(outcome.not_found.iter().map(|p| {
                let elsewhere: Vec<String> = policy
                    .sources()
                    .filter(|(_, s)| s.list(k).get(*p).is_some())
                    .map(|(name, _)| name.to_string())
                    .collect();
                if elsewhere.is_empty() {
                    format!("{p} is not on the {k} of source {source}; nothing removed for it")
                } else {
                    format!(
                        "{p} is not on the {k} of source {source}; nothing removed for it \
                         (it is on source {}: use --source)",
                        elsewhere.join(", ")
                    )
                }
            }));
            tracing::info!(source = %source, list = %k, entries = %entries.join(" "), removed = outcome.removed.len(),
                "list entries removed");
            if k == ListKind::Permit {
                daemon.close_denied_sessions();
            }
            Response::ListChanged(ListChanged {
                list,
                source: source.to_string(),
                added: 0,
                removed: outcome.removed.len() as u64,
                unchanged: outcome.not_found.len() as u64,
                warnings,
                list_size: source_size(daemon, &source, k),
            })
        }
        Request::ListShow { list, source } => {
            let policy = daemon.policy();
            let only = source.as_deref().map(SourceName::new).transpose()?;
            if let Some(name) = &only {
                existing_source(daemon, name)?;
            }
            let hits = daemon.hits_by_prefix();
            let mut entries: Vec<EntryView> = Vec::new();
            for (name, lists) in policy.sources() {
                if only.as_ref().is_some_and(|o| o != name) {
                    continue;
                }
                entries.extend(lists.list(kind(list)).entries().iter().map(|e| {
                    let mut view = entry_view(e, hits.get(&e.prefix).copied());
                    view.source = Some(name.to_string());
                    view
                }));
            }
            // By prefix; sources in their order for the same prefix.
            entries.sort_by_key(|e| e.prefix.parse::<IpNet>().ok());
            Response::ListEntries(ListEntries { list, entries })
        }
        Request::Import {
            list,
            source_name,
            text,
            replace,
            dry_run,
            skip_invalid,
            allow_all,
            allow_empty,
            source,
        } => import(
            daemon,
            list,
            &writable_source(source.as_deref())?,
            &source_name,
            &text,
            ImportFlags {
                replace,
                dry_run,
                skip_invalid,
                allow_all,
                allow_empty,
            },
            still_wanted,
        )?,
        Request::Export { list, source } => {
            let source = match source {
                Some(name) => SourceName::new(&name)?,
                None => SourceName::local(),
            };
            existing_source(daemon, &source)?;
            let policy = daemon.policy();
            let text = policy
                .source(&source)
                .map(|s| s.list(kind(list)).to_text())
                .unwrap_or_default();
            Response::Exported(Exported { list, text })
        }
        Request::SetMode { mode, enforcement } => {
            let touched = [Persist::Mode];
            let (mode, enforcement) = daemon.change_policy_for(still_wanted, &touched, |p| {
                if let Some(m) = mode {
                    p.set_mode(m);
                }
                if let Some(e) = enforcement {
                    p.set_enforcement(e);
                }
                Ok((
                    (p.mode(), p.enforcement()),
                    KernelWrite::Prefixes(Vec::new()),
                ))
            })?;
            tracing::info!(%mode, %enforcement, "mode changed (kept in the state file across reloads and restarts)");
            daemon.close_denied_sessions();
            Response::ModeSet(ModeSet { mode, enforcement })
        }
        Request::Check { addresses } => {
            let policy = daemon.policy();
            // Hits are counted by the XDP program: 0 for an entry without
            // any, `None` (not counted) without XDP.
            let counted = daemon.kernel.lock().expect("kernel lock").is_some();
            let hits = daemon.hits_by_prefix();
            let hits_of =
                |e: &ListEntry| counted.then(|| hits.get(&e.prefix).copied().unwrap_or(0));
            let mut results = Vec::new();
            for text in &addresses {
                let addr: IpAddr = text
                    .trim()
                    .parse()
                    .map_err(|_| RequestError::Address { text: text.clone() })?;
                let e = policy.explain(addr);
                let view = |m: &ListEntry, source: &Option<SourceName>| {
                    let mut v = entry_view(m, hits_of(m));
                    v.source = source.as_ref().map(SourceName::to_string);
                    v
                };
                let named = |list: ListKind, m: &Option<ListEntry>, source: &Option<SourceName>| {
                    format!(
                        "{list} {} (source {})",
                        m.as_ref().map(|m| m.prefix.to_string()).unwrap_or_default(),
                        source.as_ref().map(SourceName::as_str).unwrap_or("?")
                    )
                };
                let mut reason = match e.reason {
                    Reason::DenyList => named(ListKind::Deny, &e.deny_match, &e.deny_source),
                    Reason::Permitted => named(ListKind::Permit, &e.permit_match, &e.permit_source),
                    Reason::NotPermitted => "not on the permit list".into(),
                    Reason::DefaultAccept => "on no list".into(),
                    Reason::Protected => format!(
                        "protected range {}",
                        e.protected.map(|r| r.to_string()).unwrap_or_default()
                    ),
                };
                if !e.overridden.is_empty() {
                    let over: Vec<String> = e
                        .overridden
                        .iter()
                        .map(|o| format!("{} {} (source {})", o.list, o.entry.prefix, o.source))
                        .collect();
                    reason.push_str(&format!(", over {}", over.join(", ")));
                }
                results.push(CheckView {
                    address: e.address.to_string(),
                    mode: e.mode,
                    enforcement: e.enforcement,
                    deny_match: e.deny_match.as_ref().map(|m| view(m, &e.deny_source)),
                    permit_match: e.permit_match.as_ref().map(|m| view(m, &e.permit_source)),
                    protected: e.protected.map(|r| r.to_string()),
                    overridden: e
                        .overridden
                        .iter()
                        .map(|o| OverriddenEntry {
                            list: list_name(o.list),
                            entry: view(&o.entry, &Some(o.source.clone())),
                        })
                        .collect(),
                    verdict: match e.verdict {
                        Verdict::Deny => Admission::Refuse,
                        Verdict::Permit => Admission::Accept,
                    },
                    reason,
                });
            }
            Response::Checked(Checked { results })
        }
        Request::Stats { top } => Response::Stats(stats(&Snapshot::collect(daemon), top)),
        Request::Status => Response::Status(status(daemon)),
        Request::Reload => Response::Reloaded(crate::control::proto::Reloaded {
            summary: daemon.reload_for(still_wanted)?,
        }),
        Request::Sessions => Response::Sessions(SessionsView {
            sessions: daemon
                .server()
                .map(|s| s.sessions())
                .unwrap_or_default()
                .iter()
                .map(|l| session_view(l))
                .collect(),
        }),
        Request::Kick { target } => kick(daemon, target)?,
    })
}

/// What `smtpguard kick` may name.
enum KickTarget {
    Id(String),
    Prefixes(Vec<IpNet>),
}

/// `kick`: by session id, client address or prefix. An id that names no
/// open session is an error (a typo must not pass for success); an address
/// or prefix with no session is not.
fn kick(daemon: &Daemon, target: String) -> Result<Response> {
    let text = target.trim();
    let parsed = if let Ok(ip) = text.parse::<IpAddr>() {
        KickTarget::Prefixes(vec![IpNet::from(ip.to_canonical())])
    } else if text.contains('/') {
        let net = parse_entry(text, EntryOptions { allow_all: true })
            .map_err(|source| RequestError::Entry {
                entry: text.to_owned(),
                source,
            })?
            .prefixes;
        KickTarget::Prefixes(net)
    } else if !text.is_empty() && text.chars().all(|c| c.is_ascii_hexdigit()) {
        KickTarget::Id(text.to_ascii_uppercase())
    } else {
        return Err(RequestError::KickTarget {
            target: text.to_owned(),
        });
    };
    let kicked = daemon
        .server()
        .map(|server| {
            server.kick_by_operator(|live| match &parsed {
                KickTarget::Id(id) => live.session_id == *id,
                KickTarget::Prefixes(nets) => nets.iter().any(|n| n.contains(&live.peer.ip())),
            })
        })
        .unwrap_or_default();
    if let (KickTarget::Id(id), true) = (&parsed, kicked.is_empty()) {
        return Err(RequestError::NoSuchSession { id: id.clone() });
    }
    let prefix = match &parsed {
        KickTarget::Prefixes(nets) => nets
            .iter()
            .map(IpNet::to_string)
            .collect::<Vec<_>>()
            .join(","),
        KickTarget::Id(_) => "-".to_owned(),
    };
    for live in &kicked {
        tracing::info!(session = %live.session_id, client = %live.peer.ip(), %prefix,
            "session kicked by the operator: 421 4.7.0");
    }
    Ok(Response::Kicked(Kicked {
        target,
        sessions: kicked.iter().map(|l| session_view(l)).collect(),
    }))
}

/// One open session as the control protocol shows it.
fn session_view(live: &Live) -> SessionView {
    let d = live.detail();
    SessionView {
        id: live.session_id.clone(),
        client: live.peer.ip().to_string(),
        port: live.peer.port(),
        local: live.local.to_string(),
        since_unix: live
            .since
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        state: d.state.as_str().to_owned(),
        tls_version: d.tls.as_ref().map(|t| t.version.clone()),
        tls_cipher: d.tls.as_ref().map(|t| t.cipher.clone()),
        helo: d.helo,
        bytes_in: live.bytes_in.load(Ordering::Relaxed),
        bytes_out: live.bytes_out.load(Ordering::Relaxed),
        upstream: d.upstream,
    }
}

/// Parses CLI entries with the one entry parser; errors name the entry.
fn parse_entries(entries: &[String], allow_all: bool) -> Result<(Vec<IpNet>, Vec<String>)> {
    let mut prefixes = Vec::new();
    let mut warnings = Vec::new();
    for text in entries {
        let parsed = parse_entry(text, EntryOptions { allow_all }).map_err(|source| {
            RequestError::Entry {
                entry: text.clone(),
                source,
            }
        })?;
        warnings.extend(
            parsed
                .warnings
                .iter()
                .map(|w| format!("entry {text:?}, {w}")),
        );
        prefixes.extend(parsed.prefixes);
    }
    if prefixes.is_empty() {
        return Err(RequestError::NoEntries);
    }
    Ok((prefixes, warnings))
}

fn entry_view(e: &ListEntry, hits: Option<u64>) -> EntryView {
    EntryView {
        prefix: e.prefix.to_string(),
        comment: e.comment.clone(),
        expires_at_unix: e
            .expires
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        hits,
        source: None,
    }
}

fn line_issue(e: &ImportError) -> LineIssue {
    let text = e.to_string();
    let (source, line, column) = match e {
        ImportError::Entry {
            source_name,
            line,
            reason,
        } => (source_name.clone(), *line, reason.column()),
        ImportError::BadExpiry {
            source_name,
            line,
            column,
            ..
        }
        | ImportError::MissingAction {
            source_name,
            line,
            column,
        }
        | ImportError::UnknownAction {
            source_name,
            line,
            column,
            ..
        } => (source_name.clone(), *line, *column),
        _ => (String::new(), e.line().unwrap_or(0), 0),
    };
    // The wire carries the location in its own fields; keep only the reason.
    let prefix = format!("{source} line {line}, ");
    let reason = text.strip_prefix(&prefix).unwrap_or(&text);
    let reason = reason
        .strip_prefix(&format!("column {column}: "))
        .unwrap_or(reason)
        .to_string();
    LineIssue {
        source,
        line: line as u64,
        column: column as u64,
        reason,
    }
}

/// The switches of [`Request::Import`].
#[derive(Clone, Copy, Debug)]
struct ImportFlags {
    replace: bool,
    dry_run: bool,
    skip_invalid: bool,
    allow_all: bool,
    allow_empty: bool,
}

/// An import, or its dry run: both take the same path up to the change
/// itself, so a dry run answers (and fails) exactly as the import would.
fn import(
    daemon: &Daemon,
    list: ListName,
    into: &SourceName,
    source_name: &str,
    text: &str,
    flags: ImportFlags,
    still_wanted: &dyn Fn() -> bool,
) -> Result<Response> {
    let ImportFlags {
        replace,
        dry_run,
        skip_invalid,
        allow_all,
        allow_empty,
    } = flags;
    let target = kind(list);
    let mut options = ImportOptions::new(target);
    options.allow_all = allow_all;
    options.skip_invalid = skip_invalid;
    // Decided below: a merge of nothing is fine, a replace by nothing not.
    options.allow_empty = true;
    let size_of = |policy: &Policy, kind: ListKind| {
        policy
            .source(into)
            .map_or(0, |s| s.list(kind).len().total())
    };
    let mut report = match parse_list(text, source_name, &options) {
        Ok(report) => report,
        Err(ImportError::Rejected { errors, .. }) => {
            let mut skipped: Vec<LineIssue> = errors
                .iter()
                .take(MAX_LISTED_ISSUES)
                .map(line_issue)
                .collect();
            if errors.len() > MAX_LISTED_ISSUES {
                skipped.push(LineIssue {
                    source: source_name.to_string(),
                    reason: format!(
                        "... and {} more invalid lines not listed",
                        errors.len() - MAX_LISTED_ISSUES
                    ),
                    ..Default::default()
                });
            }
            return Ok(Response::ImportResult(ImportResult {
                list,
                source: into.to_string(),
                skipped,
                applied: false,
                rejected: true,
                list_size: size_of(&daemon.policy(), target) as u64,
                ..Default::default()
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let mode = if replace {
        ImportMode::Replace
    } else {
        ImportMode::Merge
    };
    let mut warnings: Vec<String> = report.warnings.iter().map(|w| w.to_string()).collect();
    let protected = leave_out_protected(&daemon.policy(), &mut report, &mut warnings);
    if report.entries.is_empty() {
        // E.g. Spamhaus EDROP, comments only since 2024: a scheduled
        // refresh must not fail, nor may it empty the list unasked.
        if replace && !allow_empty {
            return Err(RequestError::EmptyReplace {
                source_name: source_name.to_string(),
                lines: report.lines,
                list: target,
            });
        }
        if !replace {
            let warning = format!(
                "{source_name}: no entries in {} line(s); the {target} is unchanged",
                report.lines
            );
            tracing::warn!(list = %target, source = source_name, lines = report.lines,
                "import of a file without entries: nothing changed");
            warnings.push(warning);
        }
    }
    let mut skipped: Vec<LineIssue> = report
        .skipped
        .iter()
        .take(MAX_LISTED_ISSUES)
        .map(line_issue)
        .collect();
    if report.skipped.len() > MAX_LISTED_ISSUES {
        skipped.push(LineIssue {
            source: source_name.to_string(),
            reason: format!(
                "... and {} more skipped lines not listed",
                report.skipped.len() - MAX_LISTED_ISSUES
            ),
            ..Default::default()
        });
    }
    // Postfix tables can name the other list too (OK lines): merge those.
    let other = match target {
        ListKind::Deny => ListKind::Permit,
        ListKind::Permit => ListKind::Deny,
    };
    let touches_other = report.count(other) > 0;
    if touches_other {
        warnings.push(format!(
            "{} entries of this Postfix table go to the {other} (their action says so)",
            report.count(other)
        ));
    }
    let size_before = size_of(&daemon.policy(), target);
    // A merge of no entries leaves the lists, the kernel and the files.
    let changes = replace || !report.entries.is_empty();
    let mut ipv6_table = None;
    let diff = if dry_run || !changes {
        let empty = crate::policy::AccessList::new(target);
        let policy = daemon.policy();
        let current = policy.source(into).map_or(&empty, |s| s.list(target));
        let diff = current.diff(&report, mode);
        let touches_ipv6 = diff
            .added
            .iter()
            .chain(&diff.removed)
            .any(|net| matches!(net, IpNet::V6(_)))
            || report
                .entries_for(other)
                .any(|e| matches!(e.prefix, IpNet::V6(_)));
        if dry_run && changes && daemon.config().xdp.enabled() {
            // What the real run would hand the kernel, checked in
            // userspace: the IPv6 table's room is nodes, not prefixes.
            // Without XDP the lists never reach the table.
            let fits = || -> std::result::Result<_, DaemonError> {
                let mut after = (*policy).clone();
                let lists = after.source_mut(into);
                lists.list_mut(target).import(&report, mode)?;
                if touches_other {
                    lists.list_mut(other).import(&report, ImportMode::Merge)?;
                }
                let rules = super::startup::kernel_rules(&after)?;
                crate::kernel::ipv6_table::check_fits(&rules).map_err(|source| {
                    DaemonError::WouldNotFit {
                        file: source_name.to_string(),
                        source: Box::new(source),
                    }
                })
            };
            let usage = fits()?;
            ipv6_table = touches_ipv6.then_some(crate::control::proto::Ipv6TableFill {
                prefixes: usage.prefixes as u64,
                nodes: usage.nodes as u64,
                nodes_max: usage.nodes_max as u64,
                leaves: usage.leaves as u64,
                leaves_max: usage.leaves_max as u64,
            });
        }
        diff
    } else {
        let mut touched = vec![Persist::List(into.clone(), target)];
        if touches_other {
            touched.push(Persist::List(into.clone(), other));
        }
        let started = std::time::Instant::now();
        let diff = daemon.change_policy_for(still_wanted, &touched, |p| {
            let lists = p.source_mut(into);
            let diff = lists.list_mut(target).import(&report, mode)?;
            if touches_other {
                lists.list_mut(other).import(&report, ImportMode::Merge)?;
            }
            Ok((diff, KernelWrite::Everything))
        })?;
        tracing::info!(source = %into, list = %target, file = source_name, added = diff.added.len(), removed = diff.removed.len(),
            replace, seconds = started.elapsed().as_secs_f64(), "list imported");
        daemon.close_denied_sessions();
        diff
    };
    let size_after = (size_before + diff.added.len()).saturating_sub(diff.removed.len());
    if size_after * 2 < size_before {
        let would = if dry_run { "would shrink" } else { "shrank" };
        let warning = format!(
            "the {target} {would} from {size_before} to {size_after} entries, by more than half; \
             check that {source_name} is complete"
        );
        tracing::warn!(list = %target, source = source_name, before = size_before,
            after = size_after, dry_run, "import shrinks the list by more than half");
        warnings.push(warning);
    }
    Ok(Response::ImportResult(ImportResult {
        list,
        source: into.to_string(),
        protected,
        added: diff.added.len() as u64,
        removed: diff.removed.len() as u64,
        unchanged: diff.unchanged.len() as u64,
        duplicates: diff.duplicates.len() as u64,
        covered: diff.covered.len() as u64,
        skipped,
        warnings,
        applied: !dry_run && changes,
        rejected: false,
        // For a dry run: the size the list would have.
        list_size: if dry_run {
            size_after as u64
        } else {
            size_of(&daemon.policy(), target) as u64
        },
        ipv6_table,
    }))
}

fn fleet_view(s: &crate::fleet::FleetStatus) -> crate::control::proto::FleetView {
    crate::control::proto::FleetView {
        endpoints: s.endpoints.join(", "),
        prefix: s.prefix.clone(),
        connected: s.connected,
        applied_revision: s.applied_revision,
        lag_revisions: (s.store_revision - s.applied_revision).max(0),
        last_heard_secs_ago: s.last_heard_secs_ago,
        last_error: s.last_error.clone(),
        entries: s.entries as u64,
        full_reads: s.full_reads,
        last_full_read_ms: s.last_full_read_ms,
    }
}

/// Whether a change names the `fleet` source (written to etcd, #19).
fn is_fleet(source: Option<&str>) -> bool {
    source == Some(crate::fleet::SOURCE)
}

/// A change of the `fleet` source: written to etcd, answered once this
/// gateway's watch has applied it (`value`: add; `None`: remove).
fn fleet_change(
    daemon: &Daemon,
    list: ListName,
    prefixes: Vec<IpNet>,
    value: Option<crate::fleet::EntryValue>,
    wait_fleet: bool,
    mut warnings: Vec<String>,
) -> Result<Response> {
    let k = kind(list);
    let adding = value.is_some();
    let n = prefixes.len() as u64;
    let done = super::fleet::change(
        daemon,
        &tokio::runtime::Handle::current(),
        super::fleet::FleetChange {
            kind: k,
            prefixes,
            value,
            wait_fleet,
        },
    )?;
    warnings.extend(done.warnings);
    let existed = done.written.existed as u64;
    tracing::info!(list = %k, revision = done.written.revision, adding, entries = n,
        "fleet entries written and applied on this gateway");
    Ok(Response::ListChanged(ListChanged {
        list,
        source: crate::fleet::SOURCE.to_owned(),
        added: if adding { n - existed.min(n) } else { 0 },
        removed: if adding { 0 } else { existed },
        unchanged: if adding { existed } else { n - existed.min(n) },
        warnings,
        list_size: source_size(daemon, &crate::fleet::source_name(), k),
    }))
}

/// The source a change names, `local` when none; reserved names refused.
fn writable_source(name: Option<&str>) -> Result<SourceName> {
    Ok(match name {
        Some(name) => SourceName::writable(name)?,
        None => SourceName::local(),
    })
}

/// Refuses a source that does not exist (for reads and removals). The
/// `auto` source (the automatic bans) always exists: before its first ban
/// it is empty, not unknown.
fn existing_source(daemon: &Daemon, name: &SourceName) -> Result<()> {
    let policy = daemon.policy();
    if policy.source(name).is_some() || *name == SourceName::auto() {
        return Ok(());
    }
    let known: Vec<String> = policy.sources().map(|(n, _)| n.to_string()).collect();
    Err(RequestError::NoSuchSource {
        name: name.to_string(),
        known: known.join(", "),
    })
}

/// Entries of one list of one source.
fn source_size(daemon: &Daemon, source: &SourceName, kind: ListKind) -> u64 {
    daemon
        .policy()
        .source(source)
        .map_or(0, |s| s.list(kind).len().total()) as u64
}

/// `"PREFIX covers protected range R"` for each deny prefix that shares
/// addresses with a protected range.
fn protected_overlaps(policy: &Policy, prefixes: &[IpNet]) -> Vec<String> {
    prefixes
        .iter()
        .flat_map(|p| {
            policy
                .protected()
                .overlapping(*p)
                .into_iter()
                .map(move |r| {
                    if r.prefix.contains(p) && r.prefix != *p {
                        format!("{p} is inside protected range {r}")
                    } else {
                        format!("{p} covers protected range {r}")
                    }
                })
        })
        .collect()
}

/// What the entries about to be added to `source`'s `kind` list have to
/// do with entries already there (in any source): duplicates in other
/// sources, broader entries covering them, and entries of the other list
/// that win over them or that they leave in force. At most
/// [`MAX_RELATED`] per entry.
fn relation_warnings(
    policy: &Policy,
    source: &SourceName,
    kind: ListKind,
    prefixes: &[IpNet],
) -> Vec<String> {
    let mut warnings = Vec::new();
    for &prefix in prefixes {
        for e in policy.related(kind, prefix, MAX_RELATED) {
            let (p, s) = (e.entry.prefix, &e.source);
            if p == prefix && s != source {
                warnings.push(format!(
                    "{prefix} is also on the {kind} of source {s} (duplicate)"
                ));
            } else if p.contains(&prefix) && p != prefix {
                warnings.push(format!(
                    "{prefix} is covered by the broader {kind} entry {p} of source {s}"
                ));
            }
        }
        match kind {
            ListKind::Permit => {
                for e in policy.related(ListKind::Deny, prefix, MAX_RELATED) {
                    let (p, s) = (e.entry.prefix, &e.source);
                    if p == prefix {
                        warnings.push(format!(
                            "permit {prefix} is shadowed by deny {p} of source {s}: the same \
                             prefix on both lists is denied"
                        ));
                    } else if prefix.contains(&p) {
                        warnings.push(format!(
                            "permit {prefix} is shadowed by the longer deny {p} of source {s}: \
                             addresses in {p} stay denied"
                        ));
                    }
                }
            }
            ListKind::Deny => {
                for e in policy.related(ListKind::Permit, prefix, MAX_RELATED) {
                    let (p, s) = (e.entry.prefix, &e.source);
                    if prefix.contains(&p) && p != prefix {
                        warnings.push(format!(
                            "the longer permit {p} of source {s} overrides deny {prefix}: \
                             addresses in {p} still pass"
                        ));
                    } else if p == prefix {
                        warnings.push(format!(
                            "deny {prefix} overrides permit {p} of source {s} (the same prefix \
                             on both lists is denied)"
                        ));
                    }
                }
            }
        }
    }
    warnings
}

/// Takes deny entries wholly inside protected ranges out of an import,
/// and warns about them and about deny entries around protected ranges
/// (imported; their protected addresses stay permitted). Returns how many
/// entries touched protected ranges.
fn leave_out_protected(
    policy: &Policy,
    report: &mut crate::policy::ImportReport,
    warnings: &mut Vec<String>,
) -> u64 {
    let protected = policy.protected();
    let mut left_out = Vec::new();
    let mut around = Vec::new();
    report.entries.retain(|e| {
        if e.list != ListKind::Deny {
            return true;
        }
        if protected.contains(e.prefix) {
            left_out.push(e.clone());
            return false;
        }
        for r in protected.overlapping(e.prefix) {
            around.push(format!("{} (line {}) covers {r}", e.prefix, e.line));
        }
        true
    });
    let name = |e: &crate::policy::ImportedEntry| {
        let range = protected
            .covering(e.prefix.network())
            .map(|r| r.to_string())
            .unwrap_or_default();
        format!("{} (line {}) in {range}", e.prefix, e.line)
    };
    if !left_out.is_empty() {
        let shown: Vec<String> = left_out.iter().take(MAX_RELATED).map(name).collect();
        let more = left_out.len().saturating_sub(MAX_RELATED);
        warnings.push(format!(
            "{} inside protected ranges left out: {}{}",
            crate::policy::entries(left_out.len()),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    let touched = left_out.len() + around.len();
    if !around.is_empty() {
        let more = around.len().saturating_sub(MAX_RELATED);
        around.truncate(MAX_RELATED);
        warnings.push(format!(
            "entries around protected ranges imported, their protected addresses stay \
             permitted: {}{}",
            around.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    touched as u64
}

/// The `stats` reply: a view of one [`Snapshot`], its `top` entries by
/// hits.
fn stats(snapshot: &Snapshot, top: usize) -> StatsView {
    let mut view = StatsView::default();
    if let Some(counters) = &snapshot.xdp {
        view.xdp = Some(counters.named().map(|(n, v)| (n.to_string(), v)).collect());
    }
    if let Some(m) = &snapshot.front_door {
        let fd = &mut view.front_door;
        fd.insert("accepted_at_socket".into(), m.accepted_at_socket);
        fd.insert("greeted".into(), m.greeted);
        for (name, n) in &m.rejected {
            fd.insert((*name).into(), *n);
        }
        fd.insert("would_deny".into(), m.would_deny);
        fd.insert("tls_handshakes_ok".into(), m.tls_handshakes_ok);
        fd.insert("tls_handshakes_failed".into(), m.tls_handshakes_failed);
        fd.insert("messages_accepted".into(), m.messages_accepted);
        fd.insert("handoff_failures".into(), m.handoff_failures);
        fd.insert("clients_untracked".into(), m.clients_untracked);
        view.gauges
            .insert("open_connections".into(), m.open_connections as u64);
        view.clients = m
            .clients
            .iter()
            .map(|(ip, c)| {
                let counts = ClientView {
                    accepted: c.accepted,
                    rejected: c.rejected,
                };
                (ip.to_string(), counts)
            })
            .collect();
    }
    if let Some(d) = &snapshot.defence {
        view.front_door.extend(d.counters());
        view.gauges
            .extend(d.gauges().iter().map(|(n, v)| (n.to_string(), *v)));
    }
    if let Some(d) = &snapshot.dnsbl {
        let map = &mut view.dnsbl;
        for (name, n) in [
            ("listed", d.listed),
            ("allow_listed", d.allow_listed),
            ("dropped", d.dropped),
            ("enforced", d.enforced),
            ("skipped", d.skipped),
        ] {
            map.insert(name.into(), n);
        }
        for s in &d.sites {
            for (what, n) in [
                ("lookups", s.lookups),
                ("hits", s.hits),
                ("cache_hits", s.cache_hits),
                ("timeouts", s.timeouts),
                ("errors", s.errors),
                ("nxdomain", s.nxdomain),
                ("latency_ms_sum", (s.latency_seconds_sum * 1000.0) as u64),
            ] {
                map.insert(format!("{}.{what}", s.name), n);
            }
        }
        view.gauges
            .insert("dnsbl_cache_entries".into(), d.cache_entries);
    }
    if let Some(u) = &snapshot.ipv6_table {
        for (name, value) in [
            ("kernel_ipv6_nodes", u.nodes),
            ("kernel_ipv6_nodes_max", u.nodes_max),
            ("kernel_ipv6_leaves", u.leaves),
            ("kernel_ipv6_leaves_max", u.leaves_max),
        ] {
            view.gauges.insert(name.into(), value as u64);
        }
    }
    view.top_entries = snapshot
        .entry_hits
        .iter()
        .take(top)
        .map(|e| TopEntry {
            list: list_name(e.list),
            prefix: e.prefix.to_string(),
            hits: e.hits,
        })
        .collect();
    view
}

fn status(daemon: &Daemon) -> StatusView {
    let config = daemon.config();
    let policy = daemon.policy();
    let size = |k: ListKind| {
        let n = policy.total_len(k);
        ListSize {
            ipv4: n.v4 as u64,
            ipv6: n.v6 as u64,
        }
    };
    StatusView {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: daemon.started.elapsed().as_secs(),
        interfaces: daemon
            .attachments
            .iter()
            .map(|a| InterfaceView {
                name: a.interface.clone(),
                xdp_mode: a.mode.to_string(),
                pinned: a.pin.to_string(),
            })
            .collect(),
        ports: config.server.ports(),
        deny_list_size: size(ListKind::Deny),
        permit_list_size: size(ListKind::Permit),
        sources: policy
            .sources()
            .map(|(name, s)| {
                let size = |k: ListKind| {
                    let n = s.list(k).len();
                    ListSize {
                        ipv4: n.v4 as u64,
                        ipv6: n.v6 as u64,
                    }
                };
                SourceView {
                    name: name.to_string(),
                    deny: size(ListKind::Deny),
                    permit: size(ListKind::Permit),
                    loaded_at_unix: s
                        .loaded_at
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                }
            })
            .collect(),
        protected: policy
            .protected()
            .ranges()
            .iter()
            .map(|r| r.to_string())
            .collect(),
        mode: policy.mode(),
        enforcement: policy.enforcement(),
        open_connections: daemon
            .server()
            .map(|s| s.metrics().open_connections() as u64)
            .unwrap_or(0),
        max_connections: config.server.max_connections.map(|n| n.get() as u64),
        tls_mode: format!("{:?}", config.tls.mode).to_lowercase(),
        certificate_not_after_unix: daemon.certificate_not_after(),
        delivery: super::report::delivery_line(&config),
        control_socket: config.control.socket.display().to_string(),
        fleet: daemon.fleet().map(|f| Box::new(fleet_view(&f.status()))),
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixStream, sync::mpsc, thread};

    use super::*;
    use crate::{config::Config, testing::TempDir};

    const BOUND: Duration = Duration::from_secs(30);

    /// An import dry run of `text` into the deny list.
    fn dry_import(daemon: &Daemon, text: String) -> Result<Response> {
        let request = Request::Import {
            list: ListName::Deny,
            source_name: "deep.txt".to_owned(),
            text,
            replace: false,
            dry_run: true,
            skip_invalid: false,
            allow_all: false,
            allow_empty: false,
            source: None,
        };
        answer(daemon, request, &|| true)
    }

    #[test]
    fn a_dry_run_checks_the_kernel_ipv6_table_only_with_xdp() {
        // 30,000 /128s in distinct /48s: ten nodes each, more than a
        // generation holds.
        let text: String = (0..30_000u32)
            .map(|i| format!("2001:db8:{i:x}::1\n"))
            .collect();
        let dir = TempDir::new("dry-run-xdp");
        let with_xdp = daemon_in(&dir, "[xdp]\ninterfaces = [\"lo\"]\n");
        let e = dry_import(&with_xdp, text.clone()).unwrap_err();
        let e = format!("{:#}", anyhow::Error::new(e));
        assert!(
            e.starts_with("a dry run of importing deep.txt: the import would be refused")
                && e.contains("kernel IPv6 table too small"),
            "{e}"
        );
        let dir = TempDir::new("dry-run-no-xdp");
        let without = daemon_in(&dir, "");
        match dry_import(&without, text).unwrap() {
            Response::ImportResult(r) => {
                assert_eq!((r.added, r.ipv6_table), (30_000, None), "{r:?}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A daemon without XDP whose files are under `dir`; `extra` is
    /// appended to its configuration file.
    fn daemon_in(dir: &TempDir, extra: &str) -> Arc<Daemon> {
        let d = dir.path().display();
        let path = dir.write(
            "smtpguard.toml",
            format!(
                "[policy]\ndeny_list = \"{d}/deny.list\"\npermit_list = \"{d}/permit.list\"\n\
                 [delivery]\nspool_dir = \"{d}/spool\"\n[control]\nsocket = \"{d}/control.sock\"\n\
                 {extra}"
            ),
        );
        let config = Config::load(&path).unwrap();
        let policy = crate::daemon::startup::load_policy(&config).unwrap();
        Arc::new(Daemon::new(config, Some(path), policy, None, Vec::new()))
    }

    /// Holds the change lock (as a slow reload or import would) until the
    /// returned sender is dropped or sent to.
    fn hold_change_lock(daemon: &Arc<Daemon>) -> (mpsc::Sender<()>, thread::JoinHandle<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let daemon = Arc::clone(daemon);
        let holder = thread::spawn(move || {
            daemon
                .change_policy(&[], |_| {
                    entered_tx.send(()).unwrap();
                    let _ = released.recv_timeout(BOUND);
                    Ok(((), KernelWrite::Prefixes(Vec::new())))
                })
                .unwrap();
        });
        entered.recv_timeout(BOUND).unwrap();
        (release, holder)
    }

    fn deny_add(entry: &str) -> Request {
        Request::ListAdd {
            list: ListName::Deny,
            entries: vec![entry.into()],
            expires_in_secs: None,
            comment: None,
            allow_all: false,
            source: None,
            force: false,
            wait_fleet: false,
        }
    }

    /// The issue's timed-out `deny add`s that were applied later anyway:
    /// a request waiting for its turn whose client goes away is dropped.
    #[test]
    fn a_change_whose_client_left_while_it_waited_is_not_made() {
        let dir = TempDir::new("abandoned");
        let daemon = daemon_in(&dir, "");
        let (release, holder) = hold_change_lock(&daemon);

        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = ClientWaiting::of(&ours);
        let adder = {
            let daemon = Arc::clone(&daemon);
            thread::spawn(move || {
                answer(&daemon, deny_add("203.0.113.0/24"), &|| !client.has_left())
            })
        };
        // The CLI gives up (timeout(1), Ctrl-C, kill) while the add waits.
        drop(theirs);
        release.send(()).unwrap();
        holder.join().unwrap();
        let result = adder.join().unwrap();
        assert!(
            matches!(result, Err(RequestError::Daemon(DaemonError::Abandoned))),
            "{result:?}"
        );
        assert!(daemon.policy().list(ListKind::Deny).is_empty());
        let file = std::fs::read_to_string(dir.join("deny.list")).unwrap_or_default();
        assert!(!file.contains("203.0.113.0/24"), "{file}");

        // A client that is still there gets its change.
        drop(ours);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let waiting = ClientWaiting::of(&ours);
        assert!(!waiting.has_left());
        let reply = answer(&daemon, deny_add("198.51.100.7"), &|| !waiting.has_left()).unwrap();
        assert!(matches!(reply, Response::ListChanged(_)), "{reply:?}");
        assert_eq!(daemon.policy().list(ListKind::Deny).len().total(), 1);
    }

    /// Sources: an add into a named source writes its own file, expiry
    /// removes it from that file only, a mode change survives a reload,
    /// and a broken source file fails the reload with nothing changed.
    #[test]
    fn sources_expire_and_reload_on_their_own() {
        let dir = TempDir::new("sources");
        let daemon = daemon_in(&dir, "");
        let always = || true;
        let add = |source: &str, entry: &str, secs: Option<u64>| Request::ListAdd {
            list: ListName::Deny,
            entries: vec![entry.into()],
            expires_in_secs: secs,
            comment: None,
            allow_all: false,
            source: Some(source.into()),
            force: false,
            wait_fleet: false,
        };
        answer(&daemon, add("local", "192.0.2.0/24", None), &always).unwrap();
        answer(&daemon, add("fail2ban", "198.51.100.7", Some(60)), &always).unwrap();
        let f2b = dir.join("sources/fail2ban.deny.list");
        assert!(std::fs::read_to_string(&f2b)
            .unwrap()
            .contains("198.51.100.7/32"));
        assert_eq!(
            daemon
                .expire_entries(SystemTime::now() + Duration::from_secs(120))
                .unwrap(),
            1
        );
        assert!(!std::fs::read_to_string(&f2b)
            .unwrap()
            .contains("198.51.100.7"));
        assert!(std::fs::read_to_string(dir.join("deny.list"))
            .unwrap()
            .contains("192.0.2.0/24"));

        let monitor = Request::SetMode {
            mode: None,
            enforcement: Some(crate::policy::Enforcement::Monitor),
        };
        answer(&daemon, monitor, &always).unwrap();
        daemon.reload().unwrap();
        assert_eq!(
            daemon.policy().enforcement(),
            crate::policy::Enforcement::Monitor
        );

        std::fs::write(
            dir.join("sources/bad.deny.list"),
            "192.0.2.1\n192.0.2.300\n",
        )
        .unwrap();
        let e = format!("{:#}", anyhow::Error::new(daemon.reload().unwrap_err()));
        assert!(e.contains("bad.deny.list") && e.contains("line 2"), "{e}");
        assert!(daemon
            .policy()
            .source(&SourceName::new("bad").unwrap())
            .is_none());
        std::fs::write(dir.join("sources/Bad.deny.list"), "").unwrap();
        std::fs::remove_file(dir.join("sources/bad.deny.list")).unwrap();
        let e = format!("{:#}", anyhow::Error::new(daemon.reload().unwrap_err()));
        assert!(
            e.contains("Bad.deny.list") && e.contains("position 1"),
            "{e}"
        );
    }

    /// A client that only shut down its writing side still waits for the
    /// reply (`echo ... | socat`): it has not left.
    #[test]
    fn a_half_closed_client_is_still_waiting() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let waiting = ClientWaiting::of(&ours);
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(!waiting.has_left());
        drop(theirs);
        assert!(waiting.has_left());
        assert!(!ClientWaiting::always().has_left());
    }

    /// Reload reads the certificates before it takes the change lock: a
    /// bad (or slow) certificate file never holds up list changes, and the
    /// reload fails without waiting for them.
    #[test]
    fn reload_reads_certificates_outside_the_change_lock() {
        let dir = TempDir::new("reload-tls");
        let daemon = daemon_in(&dir, "");
        let d = dir.path().display();
        dir.write(
            "smtpguard.toml",
            format!(
                "[policy]\ndeny_list = \"{d}/deny.list\"\npermit_list = \"{d}/permit.list\"\n\
                 [delivery]\nspool_dir = \"{d}/spool\"\n[control]\nsocket = \"{d}/control.sock\"\n\
                 [tls]\nmode = \"off\"\ncertificate = \"{d}/missing.crt\"\n\
                 private_key = \"/dev/zero\"\n"
            ),
        );
        // TLS off in the running config keeps the files unread: turn it on
        // in the running config as a restart would have.
        let mut running = (*daemon.config()).clone();
        running.tls.mode = crate::config::TlsMode::Optional;
        daemon.set_config(running);

        let (release, holder) = hold_change_lock(&daemon);
        let (done_tx, done) = mpsc::channel();
        let reloader = {
            let daemon = Arc::clone(&daemon);
            thread::spawn(move || done_tx.send(daemon.reload()).unwrap())
        };
        // Answered while the lock is still held; before, this waited for it.
        let result = done.recv_timeout(BOUND);
        release.send(()).unwrap();
        holder.join().unwrap();
        reloader.join().unwrap();
        let e = result
            .expect("reload waited for the change lock")
            .unwrap_err();
        assert!(
            matches!(&e, DaemonError::ReloadRefused(inner) if matches!(**inner, DaemonError::Tls(_))),
            "{e:?}"
        );
    }
}
