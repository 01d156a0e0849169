//! The control protocol: one [`Request`] enum, one [`Response`] enum, plain
//! data only (strings, numbers, small enums of names), JSON on the wire.
//!
//! The types here deliberately do not reuse the policy, kernel or config
//! types: the daemon translates between them and these, so the wire format
//! stays stable when the internals change, and `smtpguard --json` output is
//! exactly these structs.
//!
//! # Wire shape
//!
//! A request is an object tagged by `"op"`:
//!
//! ```json
//! {"op":"list_add","list":"deny","entries":["203.0.113.0/24"],"expires_in_secs":3600}
//! {"op":"status"}
//! ```
//!
//! A reply is an object with exactly one key naming its kind:
//!
//! ```json
//! {"list_changed":{"list":"deny","added":1,"removed":0,"unchanged":0,"warnings":[],"list_size":12}}
//! {"error":"203.0.113.0/33: prefix length 33 is longer than 32"}
//! ```
//!
//! Optional fields and flags may be left out of a request (they default to
//! `null`/`false`), so a hand-written request through `socat` stays short.
//! Times are Unix seconds (UTC), durations whole seconds, sizes counts of
//! entries unless a field says otherwise.

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// One of the two access lists. (The `Default`, deny, only serves
/// `..Default::default()` when building replies.)
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ListName {
    /// `"deny"`: the deny list.
    #[default]
    Deny,
    /// `"permit"`: the permit list.
    Permit,
}

impl ListName {
    /// The name as written on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ListName::Deny => "deny",
            ListName::Permit => "permit",
        }
    }
}

/// The policy mode and enforcement: the policy module's own types, whose
/// serde names (`accept-all-except-deny`, `enforce`, ...) are the wire names.
pub use crate::policy::{Enforcement, PolicyMode};

/// Whether the policy admits connections from an address, as the wire
/// says it (the policy's own `Verdict` is `permit`/`deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    /// `"accept"`: the connection is let through.
    Accept,
    /// `"refuse"`: the SYN is dropped (XDP) or the session gets `554` (front
    /// door), when enforcement is `enforce`.
    Refuse,
}

impl Admission {
    /// `"accept"` or `"refuse"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Admission::Accept => "accept",
            Admission::Refuse => "refuse",
        }
    }
}

macro_rules! display_from_str {
    ($($ty:ident: $($variant:ident),+;)+) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $(if s == $ty::$variant.as_str() {
                    return Ok($ty::$variant);
                })+
                let all: &[&str] = &[$($ty::$variant.as_str()),+];
                Err(format!("{s:?} is not one of {}", all.join(", ")))
            }
        }
    )+};
}

display_from_str! {
    ListName: Deny, Permit;
    Admission: Accept, Refuse;
}

/// A request from the CLI to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Add entries to a list (`smtpguard deny add ...`). Answered with
    /// [`Response::ListChanged`].
    ListAdd {
        /// The list to change.
        list: ListName,
        /// The entries as the operator typed them (`"203.0.113.0/24"`,
        /// `"2001:db8::1"`, ...). The daemon parses them with the same
        /// parser as the list files; one bad entry fails the whole request.
        entries: Vec<String>,
        /// Remove the entries again after this many seconds; `None`: never.
        #[serde(default)]
        expires_in_secs: Option<u64>,
        /// A comment stored with each entry (written to the list file after
        /// `#`). One line.
        #[serde(default)]
        comment: Option<String>,
        /// Accept entries covering every address (`0.0.0.0/0`, `::/0`),
        /// which are refused otherwise so that a slip cannot deny (or
        /// permit) the whole Internet.
        #[serde(default)]
        allow_all: bool,
        /// The source to change (a name of `a-z`, `0-9`, `-`, `_`);
        /// `None`: `local`, the operator's own entries. `auto` and
        /// `fleet` are reserved and refused.
        #[serde(default)]
        source: Option<String>,
        /// Store a deny entry even though it covers a protected range
        /// (refused otherwise); the protected addresses stay permitted.
        #[serde(default)]
        force: bool,
        /// With source `fleet`: also wait until every gateway's status
        /// shows the change (#19).
        #[serde(default)]
        wait_fleet: bool,
    },
    /// Remove entries from a list (`smtpguard deny remove ...`). Answered
    /// with [`Response::ListChanged`].
    ListRemove {
        /// The list to change.
        list: ListName,
        /// The entries to remove, written as for [`Request::ListAdd`]; an
        /// entry is removed when it is the same prefix (not when it merely
        /// covers or is covered).
        entries: Vec<String>,
        /// The source to change (a name of `a-z`, `0-9`, `-`, `_`);
        /// `None`: `local`, the operator's own entries. `auto` and
        /// `fleet` are reserved and refused.
        #[serde(default)]
        source: Option<String>,
        /// With source `fleet`: also wait until every gateway's status
        /// shows the change (#19).
        #[serde(default)]
        wait_fleet: bool,
    },
    /// Show a list's entries (`smtpguard deny list`). Answered with
    /// [`Response::ListEntries`].
    ListShow {
        /// The list to show.
        list: ListName,
        /// Show only this source; `None`: every source, each entry
        /// naming its source.
        #[serde(default)]
        source: Option<String>,
    },
    /// Import a list file (`smtpguard import deny FILE`). The client sends
    /// the file's whole text; the daemon parses it. Answered with
    /// [`Response::ImportResult`].
    Import {
        /// The list to change.
        list: ListName,
        /// The file the text came from, as the operator named it
        /// (`"<stdin>"` for standard input); used only in messages.
        source_name: String,
        /// The file's text, UTF-8.
        text: String,
        /// Make the list exactly the imported entries (entries not in the
        /// text are removed); otherwise the entries are added.
        #[serde(default)]
        replace: bool,
        /// Parse and compute the result without changing anything.
        #[serde(default)]
        dry_run: bool,
        /// Skip lines that cannot be parsed (listing them in the reply)
        /// instead of refusing the whole import.
        #[serde(default)]
        skip_invalid: bool,
        /// As for [`Request::ListAdd`].
        #[serde(default)]
        allow_all: bool,
        /// With `replace`: accept a text without a single entry (which
        /// empties the list); refused otherwise, as a wrong or truncated
        /// download would look the same. A merge of no entries is always
        /// accepted: it changes nothing and warns.
        #[serde(default)]
        allow_empty: bool,
        /// The source to import into: `--replace` replaces only this
        /// source. `None`: `local`. `auto` and `fleet` are refused.
        #[serde(default)]
        source: Option<String>,
    },
    /// Export a list in the list file format (`smtpguard export deny`).
    /// Answered with [`Response::Exported`].
    Export {
        /// The list to export.
        list: ListName,
        /// The source to export; `None`: `local`.
        #[serde(default)]
        source: Option<String>,
    },
    /// Change the mode, the enforcement, or both (`smtpguard mode ...`).
    /// `None` leaves that setting as it is. Answered with [`Response::ModeSet`].
    SetMode {
        /// The new policy mode.
        #[serde(default)]
        mode: Option<PolicyMode>,
        /// The new enforcement.
        #[serde(default)]
        enforcement: Option<Enforcement>,
    },
    /// Ask what the policy says about addresses (`smtpguard check ...`).
    /// Answered with [`Response::Checked`].
    Check {
        /// IPv4 or IPv6 addresses, as typed.
        addresses: Vec<String>,
    },
    /// Counters (`smtpguard stats`). Answered with [`Response::Stats`].
    Stats {
        /// How many list entries to report in
        /// [`StatsView::top_entries`] (most hits first); 0 for none.
        #[serde(default)]
        top: usize,
    },
    /// What the daemon is doing (`smtpguard status`). Answered with
    /// [`Response::Status`].
    Status,
    /// Re-read the list files and the reloadable parts of the
    /// configuration, like SIGHUP (`smtpguard reload`). Answered with
    /// [`Response::Reloaded`].
    Reload,
    /// List the open SMTP sessions (`smtpguard sessions`). Answered with
    /// [`Response::Sessions`].
    Sessions,
    /// End open SMTP sessions with `421 4.7.0` (`smtpguard kick`).
    /// Answered with [`Response::Kicked`].
    Kick {
        /// A session id (as `sessions` shows it), a client address, or a
        /// prefix (`203.0.113.0/24`) covering client addresses.
        target: String,
    },
}

impl Request {
    /// The request's `"op"` tag, for logs and messages.
    pub fn op(&self) -> &'static str {
        match self {
            Request::ListAdd { .. } => "list_add",
            Request::ListRemove { .. } => "list_remove",
            Request::ListShow { .. } => "list_show",
            Request::Import { .. } => "import",
            Request::Export { .. } => "export",
            Request::SetMode { .. } => "set_mode",
            Request::Check { .. } => "check",
            Request::Stats { .. } => "stats",
            Request::Status => "status",
            Request::Reload => "reload",
            Request::Sessions => "sessions",
            Request::Kick { .. } => "kick",
        }
    }

    /// Whether the request changes the daemon's state (lists, mode,
    /// configuration), as opposed to only reading it. A dry-run import
    /// reads only.
    pub fn is_change(&self) -> bool {
        match self {
            Request::ListAdd { .. }
            | Request::ListRemove { .. }
            | Request::SetMode { .. }
            | Request::Reload
            | Request::Kick { .. } => true,
            Request::Import { dry_run, .. } => !dry_run,
            Request::ListShow { .. }
            | Request::Export { .. }
            | Request::Check { .. }
            | Request::Stats { .. }
            | Request::Status
            | Request::Sessions => false,
        }
    }
}

/// The daemon's answer to one [`Request`] (a response of the control
/// protocol, not an SMTP reply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The request failed; nothing was changed. One line, starting in lower
    /// case, no trailing period; the CLI prints it after
    /// `smtpguard: error: `. On the wire: `{"error":"..."}`.
    Error(String),
    /// Answer to [`Request::ListAdd`] and [`Request::ListRemove`].
    ListChanged(ListChanged),
    /// Answer to [`Request::ListShow`].
    ListEntries(ListEntries),
    /// Answer to [`Request::Import`].
    ImportResult(ImportResult),
    /// Answer to [`Request::Export`].
    Exported(Exported),
    /// Answer to [`Request::SetMode`].
    ModeSet(ModeSet),
    /// Answer to [`Request::Check`].
    Checked(Checked),
    /// Answer to [`Request::Stats`].
    Stats(StatsView),
    /// Answer to [`Request::Status`].
    Status(StatusView),
    /// Answer to [`Request::Reload`].
    Reloaded(Reloaded),
    /// The open sessions.
    Sessions(SessionsView),
    /// The sessions a kick ended.
    Kicked(Kicked),
}

impl Response {
    /// Builds a [`Response::Error`] from anything printable, flattened to
    /// one line.
    pub fn error(message: impl fmt::Display) -> Response {
        Response::Error(one_line(&message.to_string()))
    }

    /// The reply's tag, for logs and messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Error(_) => "error",
            Response::ListChanged(_) => "list_changed",
            Response::ListEntries(_) => "list_entries",
            Response::ImportResult(_) => "import_result",
            Response::Exported(_) => "exported",
            Response::ModeSet(_) => "mode_set",
            Response::Checked(_) => "checked",
            Response::Stats(_) => "stats",
            Response::Status(_) => "status",
            Response::Reloaded(_) => "reloaded",
            Response::Sessions(_) => "sessions",
            Response::Kicked(_) => "kicked",
        }
    }
}

/// Replaces line breaks and other control characters with spaces, so a
/// message stays one line.
pub(crate) fn one_line(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// How a list changed ([`Response::ListChanged`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListChanged {
    /// The list that was changed.
    pub list: ListName,
    /// The source that was changed.
    #[serde(default)]
    pub source: String,
    /// Entries added (count).
    pub added: u64,
    /// Entries removed (count).
    pub removed: u64,
    /// Entries left as they were: already present when adding, absent
    /// when removing (count).
    pub unchanged: u64,
    /// Things the operator should know that did not stop the change (an
    /// entry covered by a broader one, an address both permitted and
    /// denied, ...), one line each.
    pub warnings: Vec<String>,
    /// Entries in the source's list after the change (count).
    pub list_size: u64,
}

/// One list entry as shown to the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    /// The prefix in canonical form: `"203.0.113.0/24"`, `"2001:db8::/32"`;
    /// a single address has its full length (`"192.0.2.7/32"`).
    pub prefix: String,
    /// The comment stored with the entry, if any (without the `#`).
    #[serde(default)]
    pub comment: Option<String>,
    /// When the entry expires, Unix seconds (UTC); `None`: never.
    #[serde(default)]
    pub expires_at_unix: Option<u64>,
    /// SYNs and sessions this entry decided since the daemon started
    /// (count); `None` when not counted (no XDP, or not known).
    #[serde(default)]
    pub hits: Option<u64>,
    /// The source holding the entry (`"local"`, `"ipsum"`, ...).
    #[serde(default)]
    pub source: Option<String>,
}

/// An entry a verdict overrode, for [`CheckView::overridden`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverriddenEntry {
    /// The entry's list.
    pub list: ListName,
    /// The entry, with its source.
    #[serde(flatten)]
    pub entry: EntryView,
}

/// One source's entries and load time, for [`StatusView::sources`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceView {
    /// The source's name.
    pub name: String,
    /// Entries of its deny list.
    pub deny: ListSize,
    /// Entries of its permit list.
    pub permit: ListSize,
    /// When its entries were last read from its files or changed, Unix
    /// seconds (UTC).
    pub loaded_at_unix: u64,
}

/// A list's entries ([`Response::ListEntries`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntries {
    /// The list shown.
    pub list: ListName,
    /// Its entries, IPv4 first, then in address order.
    pub entries: Vec<EntryView>,
}

/// A line of an imported file that could not be used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineIssue {
    /// The file, as in [`Request::Import::source_name`].
    pub source: String,
    /// Line number, from 1.
    pub line: u64,
    /// Column of the problem, from 1, in characters.
    pub column: u64,
    /// What is wrong, one line.
    pub reason: String,
}

/// The outcome of an import ([`Response::ImportResult`]).
///
/// The daemon may refuse an import with [`Response::Error`], or answer with
/// `applied: false` and the offending lines in `skipped` (when invalid lines
/// were found without `skip_invalid`), so that the operator sees every bad
/// line at once; the CLI treats the latter as a failure unless it asked for
/// a dry run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportResult {
    /// The list imported into.
    pub list: ListName,
    /// The source imported into.
    #[serde(default)]
    pub source: String,
    /// Entries added (count; would be added, in a dry run).
    pub added: u64,
    /// Entries removed, with `replace` (count).
    pub removed: u64,
    /// Entries already present (count).
    pub unchanged: u64,
    /// Lines repeating an earlier line of the same text (count).
    pub duplicates: u64,
    /// Entries inside a broader entry of the same list, dropped (count).
    pub covered: u64,
    /// Deny entries that touch protected ranges (count): those wholly
    /// inside one are left out, those around one are imported and the
    /// protected addresses stay permitted; the warnings name them.
    #[serde(default)]
    pub protected: u64,
    /// Lines that could not be parsed.
    pub skipped: Vec<LineIssue>,
    /// Things the operator should know, one line each.
    pub warnings: Vec<String>,
    /// Whether the list was changed: false for a dry run or a refused
    /// import.
    pub applied: bool,
    /// Whether the import is refused (invalid lines, listed in `skipped`,
    /// without `skip_invalid`); in a dry run: whether the real import would
    /// be. The CLI then exits with status 1, dry run or not.
    #[serde(default)]
    pub rejected: bool,
    /// Entries in the source's list afterwards (count; would be, in a
    /// dry run).
    pub list_size: u64,
    /// A dry run that changes IPv6 entries: how full the kernel IPv6 table
    /// would be afterwards (the IPv6 entries of all sources, merged, and
    /// the protected ranges); `None` otherwise.
    #[serde(default)]
    pub ipv6_table: Option<Ipv6TableFill>,
}

/// How full the kernel IPv6 table is or would be: its room is nodes and
/// leaves, not prefixes (see `kernel::ipv6_table`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6TableFill {
    /// IPv6 prefixes the kernel holds: the entries of all sources, merged,
    /// and the protected IPv6 ranges (`::1` at least) (count).
    pub prefixes: u64,
    /// Nodes used (count).
    pub nodes: u64,
    /// Nodes a generation holds (count).
    pub nodes_max: u64,
    /// Leaves used (count).
    pub leaves: u64,
    /// Leaves a generation holds (count).
    pub leaves_max: u64,
}

/// An exported list ([`Response::Exported`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exported {
    /// The list exported.
    pub list: ListName,
    /// The list in the list file format, one entry a line, ending in a
    /// newline (empty for an empty list).
    pub text: String,
}

/// The settings after [`Request::SetMode`] ([`Response::ModeSet`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeSet {
    /// The policy mode now in force.
    pub mode: PolicyMode,
    /// The enforcement now in force.
    pub enforcement: Enforcement,
}

/// The policy's answers for a few addresses ([`Response::Checked`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    /// One result per requested address, in request order.
    pub results: Vec<CheckView>,
}

/// What the policy says about one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    /// The address, canonical form (`"203.0.113.9"`, `"2001:db8::1"`).
    pub address: String,
    /// The policy mode the verdict was made in.
    pub mode: PolicyMode,
    /// The enforcement in force: with `monitor` or `off` a `refuse`
    /// verdict is not carried out.
    pub enforcement: Enforcement,
    /// The longest deny list entry covering the address, if any.
    #[serde(default)]
    pub deny_match: Option<EntryView>,
    /// The longest permit list entry covering the address, if any.
    #[serde(default)]
    pub permit_match: Option<EntryView>,
    /// The protected range holding the address, which decides before any
    /// entry: `"127.0.0.0/8 (loopback)"`.
    #[serde(default)]
    pub protected: Option<String>,
    /// The longest entry of every other source and list covering the
    /// address: what the deciding entry (or protected range) overrode.
    #[serde(default)]
    pub overridden: Vec<OverriddenEntry>,
    /// What the policy decides (before enforcement is applied).
    pub verdict: Admission,
    /// Why, in a few words naming the deciding entry, e.g.
    /// `"deny list 203.0.113.0/24"`, `"permit list 203.0.113.77/32, longer
    /// than deny 203.0.113.0/24"`, `"on neither list"`. One line.
    pub reason: String,
}

/// Counters ([`Response::Stats`]). Counters count since the daemon started
/// (or the XDP program was loaded); gauges are current values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// The XDP program's counters by name (`"syn_dropped_deny"`,
    /// `"syn_passed"`, ...; packets); `None` when XDP is not attached.
    #[serde(default)]
    pub xdp: Option<BTreeMap<String, u64>>,
    /// The SMTP front door's counters by name (`"accepted"`,
    /// `"rejected_policy"`, `"rejected_max_connections"`,
    /// `"tls_handshakes"`, ...; events).
    pub front_door: BTreeMap<String, u64>,
    /// Current values by name (`"open_connections"`, ...), which go down as
    /// well as up: not turned into rates by `stats --watch`.
    #[serde(default)]
    pub gauges: BTreeMap<String, u64>,
    /// The list entries with the most hits, most first, at most the
    /// requested `top`.
    #[serde(default)]
    pub top_entries: Vec<TopEntry>,
    /// The front door's counters by client address, canonical form
    /// (`"198.51.100.7"`, `"2001:db8::7"`; IPv4-mapped IPv6 is IPv4), for
    /// the first 4096 (the front door's `MAX_TRACKED_CLIENTS`) addresses
    /// seen since the daemon started; accepts from further addresses are
    /// counted in `front_door.clients_untracked`.
    /// Shown by `--json` only: the text output would be one line a client.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientView>,
    /// DNSBL counters by name (`"listed"`, `"dropped"`,
    /// `"<site>.lookups"`, `"<site>.hits"`, `"<site>.timeouts"`,
    /// `"<site>.errors"`, `"<site>.cache_hits"`, ...; events); empty without
    /// `[dnsbl]`.
    #[serde(default)]
    pub dnsbl: BTreeMap<String, u64>,
}

/// One client address's front-door counters, for [`StatsView::clients`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientView {
    /// TCP connections accepted from the address (count), whatever
    /// happened next.
    pub accepted: u64,
    /// Of those, refused on accept: access lists or connection caps (count).
    pub rejected: u64,
}

/// A list entry and its hit count, for [`StatsView::top_entries`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopEntry {
    /// The entry's list.
    pub list: ListName,
    /// The entry, canonical form.
    pub prefix: String,
    /// SYNs and sessions it decided since the daemon started (count).
    pub hits: u64,
}

/// An interface the XDP program is attached to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    /// The interface name (`"eth0"`).
    pub name: String,
    /// How the program is attached: `"native"` or `"skb"`.
    pub xdp_mode: String,
    /// Whether the link is pinned: `"yes (/sys/fs/bpf/smtpguard/...)"` or
    /// `"no (why), a crash removes the filter"`. Empty from older daemons.
    #[serde(default)]
    pub pinned: String,
}

/// A list's size by address family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListSize {
    /// IPv4 entries (count).
    pub ipv4: u64,
    /// IPv6 entries (count).
    pub ipv6: u64,
}

/// What the daemon is doing ([`Response::Status`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// The daemon's version (`"0.1.0"`).
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Interfaces with the XDP program attached; empty when XDP is off.
    pub interfaces: Vec<InterfaceView>,
    /// The TCP ports guarded and served, ascending.
    pub ports: Vec<u16>,
    /// Entries in the deny lists of all sources.
    pub deny_list_size: ListSize,
    /// Entries in the permit lists of all sources.
    pub permit_list_size: ListSize,
    /// Every source, `local` first, then by name.
    #[serde(default)]
    pub sources: Vec<SourceView>,
    /// The protected ranges: `"127.0.0.0/8 (loopback)"`, ...
    #[serde(default)]
    pub protected: Vec<String>,
    /// The policy mode.
    pub mode: PolicyMode,
    /// The enforcement.
    pub enforcement: Enforcement,
    /// SMTP sessions open now (count).
    pub open_connections: u64,
    /// The cap on simultaneous sessions; `None`: unlimited.
    #[serde(default)]
    pub max_connections: Option<u64>,
    /// STARTTLS: `"off"`, `"optional"` or `"required"`.
    pub tls_mode: String,
    /// When the server certificate expires, Unix seconds (UTC); `None`
    /// when TLS is off.
    #[serde(default)]
    pub certificate_not_after_unix: Option<u64>,
    /// Where accepted mail goes, one line: `"upstream 127.0.0.1:10025
    /// (proxy-v2)"` or `"spool /var/spool/smtpguard"`.
    pub delivery: String,
    /// The control socket's path.
    pub control_socket: String,
    /// The fleet connection (#19); `None` without `[fleet]`.
    #[serde(default)]
    pub fleet: Option<Box<FleetView>>,
}

/// The fleet connection, for [`StatusView::fleet`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    /// etcd's endpoints, comma-separated.
    pub endpoints: String,
    /// The key prefix.
    pub prefix: String,
    /// Whether the watch is running.
    pub connected: bool,
    /// The last etcd revision applied to this gateway's lists.
    pub applied_revision: i64,
    /// Revisions etcd is ahead of this gateway (as last heard).
    pub lag_revisions: i64,
    /// Seconds since etcd was last heard from; `None`: never.
    pub last_heard_secs_ago: Option<u64>,
    /// Why the connection is down, while it is.
    pub last_error: Option<String>,
    /// Entries in force from the fleet (own lists and feeds).
    pub entries: u64,
    /// Full reads since the start.
    pub full_reads: u64,
    /// How long the last full read took (read plus switch), milliseconds.
    #[serde(default)]
    pub last_full_read_ms: Option<u64>,
}

/// The outcome of [`Request::Reload`] ([`Response::Reloaded`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// What changed, for the operator: one or more lines (`"deny list: 3
    /// added, 1 removed"`, `"nothing changed"`).
    pub summary: String,
}

/// The open SMTP sessions, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsView {
    /// One per session.
    pub sessions: Vec<SessionView>,
}

/// One open SMTP session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// The session id (as in the logs and `Received:` headers).
    pub id: String,
    /// The client's address.
    pub client: String,
    /// The client's TCP port.
    pub port: u16,
    /// The address and port the client connected to.
    pub local: String,
    /// When the connection was accepted, Unix seconds.
    pub since_unix: u64,
    /// `greeting` (no HELO/EHLO yet), `command`, `data`, `tls_handshake`,
    /// `handoff` (waiting for the MTA or the spool) or `closing`.
    pub state: String,
    /// `TLSv1.3`, `TLSv1.2`; `None` in plaintext.
    #[serde(default)]
    pub tls_version: Option<String>,
    /// The cipher suite (`TLS13_AES_256_GCM_SHA384`); `None` in plaintext.
    #[serde(default)]
    pub tls_cipher: Option<String>,
    /// The HELO/EHLO name, once given.
    #[serde(default)]
    pub helo: Option<String>,
    /// Bytes read from the client (SMTP, after TLS decryption).
    pub bytes_in: u64,
    /// Bytes written to the client (SMTP, before TLS encryption).
    pub bytes_out: u64,
    /// The upstream connection, `local -> remote`, while one is open.
    #[serde(default)]
    pub upstream: Option<String>,
}

/// What a kick did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kicked {
    /// The target as given.
    pub target: String,
    /// The sessions told to close (each gets `421 4.7.0` as soon as it is
    /// not in the middle of a hand-off).
    pub sessions: Vec<SessionView>,
}

#[cfg(test)]
mod unknown_field_tests {
    use super::Request;

    #[test]
    fn a_misspelt_field_is_an_error_not_a_default() {
        let typo = r#"{"op":"list_add","list":"deny","entries":["192.0.2.1"],"expires_in_sec":60}"#;
        let err = serde_json::from_str::<Request>(typo).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `expires_in_sec`"),
            "{err}"
        );
    }
}
