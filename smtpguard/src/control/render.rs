//! Human-readable rendering of replies for the CLI: terse, aligned, one
//! record a line, in the manner of `ip`, `nft` and `postconf`.
//!
//! Every function returns the text to print, ending in a newline unless it
//! is empty. Free text from the daemon (comments, reasons, warnings) is
//! flattened to one line without control characters, so it cannot upset the
//! layout or the terminal.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use super::proto::{
    one_line, CheckView, Checked, Enforcement, EntryView, ImportResult, Kicked, LineIssue,
    ListChanged, ListEntries, ModeSet, SessionView, SessionsView, StatsView, StatusView,
};

/// A Unix time (seconds, UTC) as RFC 3339, e.g. `2026-11-29T12:00:00Z`.
pub fn time(unix_secs: u64) -> String {
    crate::time::rfc3339_unix(unix_secs)
}

/// A system time as RFC 3339 seconds, for `stats --watch` headers.
pub fn now() -> String {
    crate::time::rfc3339(SystemTime::now())
}

/// Lays out rows in columns separated by two spaces; columns listed in
/// `right` are right-aligned; columns empty in every row are left out;
/// trailing blanks are trimmed.
fn table(rows: &[Vec<String>], right: &[usize]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, &width) in widths.iter().enumerate() {
            if width == 0 {
                continue;
            }
            if !line.is_empty() {
                line.push_str("  ");
            }
            let cell = row.get(i).map_or("", String::as_str);
            if right.contains(&i) {
                let _ = write!(line, "{cell:>width$}");
            } else {
                let _ = write!(line, "{cell:<width$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `deny list`: one entry a line,
/// `203.0.113.0/24  ipsum  expires 2026-11-29T12:00:00Z  hits 42  # comment`
/// (the source column only when some entry is not `local`).
/// An empty list prints nothing.
pub fn list_entries(list: &ListEntries) -> String {
    let rows: Vec<Vec<String>> = list.entries.iter().map(entry_row).collect();
    table(&rows, &[])
}

fn entry_row(e: &EntryView) -> Vec<String> {
    vec![
        e.prefix.clone(),
        e.source
            .as_deref()
            .filter(|s| *s != "local")
            .map(one_line)
            .unwrap_or_default(),
        e.expires_at_unix
            .map(|t| format!("expires {}", time(t)))
            .unwrap_or_default(),
        e.hits.map(|h| format!("hits {h}")).unwrap_or_default(),
        e.comment
            .as_deref()
            .map(|c| format!("# {}", one_line(c)))
            .unwrap_or_default(),
    ]
}

/// "N added, N removed, ..." of the non-zero counts, or "nothing changed".
fn counts(parts: &[(u64, &str)]) -> String {
    let said: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if said.is_empty() {
        "nothing changed".to_owned()
    } else {
        said.join(", ")
    }
}

/// `part` of `whole` in percent, one decimal, rounded down: a table one
/// node short of full reads 99.9%, not 100.0%.
fn percent(part: u64, whole: u64) -> String {
    let tenths = u128::from(part) * 1000 / u128::from(whole.max(1));
    format!("{}.{}%", tenths / 10, tenths % 10)
}

fn entries(n: u64) -> String {
    crate::policy::entries(n as usize)
}

/// `deny add`/`remove`: `deny list: 2 added, 1 unchanged; 15 entries`.
/// The warnings are not included (the CLI prints them on stderr).
pub fn list_changed(c: &ListChanged) -> String {
    format!(
        "{} list{}: {}; {}\n",
        c.list,
        of_source(&c.source),
        counts(&[
            (c.added, "added"),
            (c.removed, "removed"),
            (c.unchanged, "unchanged"),
        ]),
        entries(c.list_size)
    )
}

/// `import`: `deny list: 1000 added, 2 duplicates, 1 skipped; 1000
/// entries`, with `(dry run)` after the list name when nothing was changed,
/// or `nothing imported` (`nothing would be imported` in a dry run) for an
/// import refused for its invalid lines. A dry run that leaves IPv6 entries
/// adds a line with how full the kernel IPv6 table would be. The skipped
/// lines and warnings are not included.
pub fn import_result(r: &ImportResult, dry_run: bool) -> String {
    if r.rejected {
        let (note, what) = if dry_run {
            (" (dry run)", "nothing would be imported")
        } else {
            ("", "nothing imported")
        };
        return format!(
            "{} list{}{note}: {what}, {} invalid line(s); {}\n",
            r.list,
            of_source(&r.source),
            r.skipped.len(),
            entries(r.list_size)
        );
    }
    let note = if dry_run { " (dry run)" } else { "" };
    let fill = r
        .ipv6_table
        .map(|f| {
            format!(
                "kernel IPv6 table afterwards: {} of {} nodes ({}), {} of {} leaves ({})\n",
                f.nodes,
                f.nodes_max,
                percent(f.nodes, f.nodes_max),
                f.leaves,
                f.leaves_max,
                percent(f.leaves, f.leaves_max)
            )
        })
        .unwrap_or_default();
    format!(
        "{} list{}{note}: {}; {}\n{fill}",
        r.list,
        of_source(&r.source),
        counts(&[
            (r.added, "added"),
            (r.removed, "removed"),
            (r.unchanged, "unchanged"),
            (r.duplicates, "duplicates"),
            (r.covered, "covered"),
            (r.protected, "protected"),
            (r.skipped.len() as u64, "skipped"),
        ]),
        entries(r.list_size)
    )
}

/// ` of source NAME` for a source other than `local` (whose replies read
/// as before sources existed).
fn of_source(source: &str) -> String {
    if source.is_empty() || source == "local" {
        String::new()
    } else {
        format!(" of source {}", one_line(source))
    }
}

/// A line of an imported file that was not used, as compilers write it:
/// `ipsum.txt:12:5: not an IP address` (no newline).
pub fn line_issue(i: &LineIssue) -> String {
    format!(
        "{}:{}:{}: {}",
        one_line(&i.source),
        i.line,
        i.column,
        one_line(&i.reason)
    )
}

/// `mode`: `mode accept-all-except-deny, enforcement enforce`.
pub fn mode_set(m: &ModeSet) -> String {
    format!(
        "mode {}, enforcement {} (kept across reloads and restarts in the state file)\n",
        m.mode, m.enforcement
    )
}

/// `check`: one line per address,
/// `203.0.113.9: refuse (deny list 203.0.113.0/24; mode accept-all-except-deny)`,
/// with `; enforcement monitor` (or `off`) added when verdicts are not
/// carried out.
pub fn checked(c: &Checked) -> String {
    let mut out = String::new();
    for r in &c.results {
        out.push_str(&check_line(r));
        out.push('\n');
    }
    out
}

fn check_line(r: &CheckView) -> String {
    let mut line = format!(
        "{}: {} ({}; mode {}",
        r.address,
        r.verdict,
        one_line(&r.reason),
        r.mode
    );
    if r.enforcement != Enforcement::Enforce {
        let _ = write!(line, "; enforcement {}", r.enforcement);
    }
    line.push(')');
    line
}

/// The counter names of a [`StatsView`] as shown: `xdp.NAME`,
/// `front_door.NAME`, and gauges by their own name; with values and
/// whether each is a gauge.
fn stat_rows(s: &StatsView) -> Vec<(String, u64, bool)> {
    let mut rows = Vec::new();
    for (name, v) in s.xdp.iter().flatten() {
        rows.push((format!("xdp.{name}"), *v, false));
    }
    for (name, v) in &s.front_door {
        rows.push((format!("front_door.{name}"), *v, false));
    }
    for (name, v) in &s.dnsbl {
        rows.push((format!("dnsbl.{name}"), *v, false));
    }
    for (name, v) in &s.gauges {
        rows.push((name.clone(), *v, true));
    }
    rows
}

/// `stats`: the counters, one a line with the value right-aligned, then
/// (after a blank line) the top entries, `deny  203.0.113.0/24  56 hits`.
/// Without XDP the first line says `xdp: not attached`.
pub fn stats(s: &StatsView) -> String {
    let mut out = String::new();
    if s.xdp.is_none() {
        out.push_str("xdp: not attached\n");
    }
    let rows: Vec<Vec<String>> = stat_rows(s)
        .into_iter()
        .map(|(name, v, _)| vec![name, v.to_string()])
        .collect();
    out.push_str(&table(&rows, &[1]));
    if !s.top_entries.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = s
            .top_entries
            .iter()
            .map(|t| {
                vec![
                    t.list.to_string(),
                    t.prefix.clone(),
                    format!("{} hits", t.hits),
                ]
            })
            .collect();
        out.push_str(&table(&rows, &[2]));
    }
    out
}

/// The rate of a counter from `before` to `after` over `secs`, or
/// `"reset"` if it went down (the daemon restarted).
fn rate(before: Option<u64>, after: u64, secs: f64) -> String {
    match before {
        None => String::new(),
        Some(b) if after < b => "reset".to_owned(),
        Some(b) => format!("{:.1}", (after - b) as f64 / secs),
    }
}

/// `stats --watch`: like [`stats`], with a header row and a per-second
/// column computed from `before`, taken `elapsed` earlier. Gauges have no
/// rate; a counter that went down shows `reset`.
pub fn stats_rates(before: &StatsView, after: &StatsView, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let old: std::collections::HashMap<String, u64> = stat_rows(before)
        .into_iter()
        .map(|(name, v, _)| (name, v))
        .collect();
    let mut out = String::new();
    if after.xdp.is_none() {
        out.push_str("xdp: not attached\n");
    }
    let mut rows = vec![vec![
        "counter".to_owned(),
        "total".to_owned(),
        "per second".to_owned(),
    ]];
    for (name, v, gauge) in stat_rows(after) {
        let r = if gauge {
            String::new()
        } else {
            rate(old.get(&name).copied(), v, secs)
        };
        rows.push(vec![name, v.to_string(), r]);
    }
    out.push_str(&table(&rows, &[1, 2]));
    if !after.top_entries.is_empty() {
        out.push('\n');
        let mut rows = vec![vec![
            "list".to_owned(),
            "prefix".to_owned(),
            "hits".to_owned(),
            "per second".to_owned(),
        ]];
        for t in &after.top_entries {
            let b = before
                .top_entries
                .iter()
                .find(|o| o.list == t.list && o.prefix == t.prefix)
                .map(|o| o.hits);
            rows.push(vec![
                t.list.to_string(),
                t.prefix.clone(),
                t.hits.to_string(),
                rate(b, t.hits, secs),
            ]);
        }
        out.push_str(&table(&rows, &[2, 3]));
    }
    out
}

/// `status`: `key: value` lines, values aligned.
pub fn status(s: &StatusView) -> String {
    let join = |v: Vec<String>, none: &str| {
        if v.is_empty() {
            none.to_owned()
        } else {
            v.join(", ")
        }
    };
    let size = |l: &super::proto::ListSize| {
        format!(
            "{} ({} IPv4, {} IPv6)",
            entries(l.ipv4 + l.ipv6),
            l.ipv4,
            l.ipv6
        )
    };
    let xdp = join(
        s.interfaces
            .iter()
            .map(|i| match i.pinned.as_str() {
                "" => format!("{} ({})", i.name, i.xdp_mode),
                pinned => format!("{} ({}, pinned: {pinned})", i.name, i.xdp_mode),
            })
            .collect(),
        "not attached",
    );
    let connections = match s.max_connections {
        Some(max) => format!("{} open, max {max}", s.open_connections),
        None => format!("{} open, no maximum", s.open_connections),
    };
    let tls = match s.certificate_not_after_unix {
        Some(t) => format!("{}, certificate expires {}", s.tls_mode, time(t)),
        None => s.tls_mode.clone(),
    };
    let rows = [
        ("version", s.version.clone()),
        (
            "uptime",
            humantime::format_duration(Duration::from_secs(s.uptime_secs)).to_string(),
        ),
        ("xdp", xdp),
        (
            "ports",
            join(s.ports.iter().map(u16::to_string).collect(), "none"),
        ),
        ("mode", s.mode.to_string()),
        ("enforcement", s.enforcement.to_string()),
        ("deny list", size(&s.deny_list_size)),
        ("permit list", size(&s.permit_list_size)),
        ("protected", join(s.protected.clone(), "none")),
        ("connections", connections),
        ("tls", tls),
        ("delivery", one_line(&s.delivery)),
        ("control socket", s.control_socket.clone()),
    ];
    let mut rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, v)| vec![format!("{k}:"), v])
        .collect();
    // One line per source after the lists.
    let at = rows.len() - 5;
    for (i, source) in s.sources.iter().enumerate() {
        rows.insert(
            at + i,
            vec![
                format!("source {}:", one_line(&source.name)),
                format!(
                    "deny {}, permit {}, loaded {}",
                    source.deny.ipv4 + source.deny.ipv6,
                    source.permit.ipv4 + source.permit.ipv6,
                    time(source.loaded_at_unix)
                ),
            ],
        );
    }
    if let Some(f) = &s.fleet {
        let state = match (&f.last_error, f.connected) {
            (_, true) => "connected".to_owned(),
            (Some(e), false) => format!("DISCONNECTED ({}; the lists in force stay)", one_line(e)),
            (None, false) => "connecting".to_owned(),
        };
        let heard = f
            .last_heard_secs_ago
            .map_or("never".to_owned(), |s| format!("{s}s ago"));
        rows.push(vec![
            "fleet:".to_owned(),
            format!(
                "{state}, {} {}, revision {} applied, lag {} revisions, last heard {heard}, {} entries, {} full reads",
                one_line(&f.endpoints),
                one_line(&f.prefix),
                f.applied_revision,
                f.lag_revisions,
                f.entries,
                f.full_reads
            ),
        ]);
    }
    table(&rows, &[])
}

/// `sessions`: a header and one session a line (id, client and port,
/// since, state, TLS, HELO, bytes in/out, upstream); `-` for what a
/// session does not have. No sessions: `no open sessions`.
pub fn sessions(v: &SessionsView) -> String {
    if v.sessions.is_empty() {
        return "no open sessions\n".to_owned();
    }
    let mut rows = vec![[
        "ID", "CLIENT", "SINCE", "STATE", "TLS", "HELO", "IN", "OUT", "UPSTREAM",
    ]
    .map(str::to_owned)
    .to_vec()];
    rows.extend(v.sessions.iter().map(session_row));
    table(&rows, &[6, 7])
}

fn session_row(s: &SessionView) -> Vec<String> {
    let dash = |o: &Option<String>| o.as_deref().map_or("-".to_owned(), one_line);
    let client = match s.client.contains(':') {
        true => format!("[{}]:{}", s.client, s.port),
        false => format!("{}:{}", s.client, s.port),
    };
    let tls = match (&s.tls_version, &s.tls_cipher) {
        (Some(v), Some(c)) => format!("{v} {c}"),
        (Some(v), None) => v.clone(),
        _ => "-".to_owned(),
    };
    vec![
        s.id.clone(),
        client,
        time(s.since_unix),
        s.state.clone(),
        tls,
        dash(&s.helo),
        s.bytes_in.to_string(),
        s.bytes_out.to_string(),
        dash(&s.upstream),
    ]
}

/// `kick`: `kicked N session(s): ID CLIENT, ...` (they get `421 4.7.0`).
pub fn kicked(k: &Kicked) -> String {
    if k.sessions.is_empty() {
        return format!("no open session matches {}\n", one_line(&k.target));
    }
    let list: Vec<String> = k
        .sessions
        .iter()
        .map(|s| format!("{} {}", s.id, s.client))
        .collect();
    format!(
        "kicked {} session(s) with 421 4.7.0: {}\n",
        k.sessions.len(),
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::Ipv6TableFill;

    #[test]
    fn table_aligns_and_drops_empty_columns() {
        let rows = vec![
            vec![
                "a".to_owned(),
                String::new(),
                "1".to_owned(),
                "x".to_owned(),
            ],
            vec![
                "bbb".to_owned(),
                String::new(),
                "100".to_owned(),
                String::new(),
            ],
        ];
        assert_eq!(table(&rows, &[2]), "a      1  x\nbbb  100\n");
        assert_eq!(table(&[], &[]), "");
    }

    #[test]
    fn a_dry_run_import_says_how_full_the_ipv6_table_would_be() {
        let mut r = ImportResult {
            added: 1000,
            list_size: 1000,
            ..Default::default()
        };
        let first = "deny list (dry run): 1000 added; 1000 entries\n";
        assert_eq!(import_result(&r, true), first);
        r.ipv6_table = Some(Ipv6TableFill {
            prefixes: 1000,
            nodes: 10_007,
            nodes_max: 262_144,
            leaves: 11_000,
            leaves_max: 1_048_576,
        });
        assert_eq!(
            import_result(&r, true),
            format!(
                "{first}kernel IPv6 table afterwards: 10007 of 262144 nodes (3.8%), \
                 11000 of 1048576 leaves (1.0%)\n"
            )
        );
    }

    #[test]
    fn percentages_round_down() {
        assert_eq!(percent(262_139, 262_144), "99.9%");
        assert_eq!(percent(262_144, 262_144), "100.0%");
        assert_eq!(percent(10_007, 262_144), "3.8%");
        assert_eq!(percent(0, 0), "0.0%");
    }

    #[test]
    fn times() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_795_953_600), "2026-11-29T12:00:00Z");
        assert_eq!(time(u64::MAX), format!("@{}", u64::MAX));
    }

    #[test]
    fn counts_and_rates() {
        assert_eq!(counts(&[(0, "added"), (0, "removed")]), "nothing changed");
        assert_eq!(
            counts(&[(1, "added"), (0, "removed"), (2, "unchanged")]),
            "1 added, 2 unchanged"
        );
        assert_eq!(entries(1), "1 entry");
        assert_eq!(entries(0), "0 entries");
        assert_eq!(rate(None, 5, 1.0), "");
        assert_eq!(rate(Some(10), 5, 1.0), "reset");
        assert_eq!(rate(Some(10), 25, 2.0), "7.5");
    }

    #[test]
    fn free_text_stays_on_one_line() {
        let list = ListEntries {
            entries: vec![EntryView {
                prefix: "192.0.2.0/24".into(),
                comment: Some("two\nlines\x1b[31m".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(list_entries(&list), "192.0.2.0/24  # two lines [31m\n");
    }
}
