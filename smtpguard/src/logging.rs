//! Log output: human-readable lines by default, JSON lines on request.
//!
//! Everything goes through `tracing`, one line per event. Records of the
//! `log` crate (aya, and the XDP program's drop events read by aya-log)
//! are bridged into the same stream; a drop event becomes an event with
//! fields (`src`, `dport`, `reason`, `prefix`, `source`) rather than one
//! string, and names the list entry's prefix and source instead of the
//! kernel's rule id.

use std::{
    error::Error,
    sync::{Arc, RwLock},
};

use tracing::level_filters::LevelFilter;

pub use crate::config::LogFormat;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Turns a kernel rule id into the prefix it stands for and the list source
/// that holds it (set by the daemon once the XDP program is loaded).
type RulePrefix = Arc<dyn Fn(u32) -> Option<(String, String)> + Send + Sync>;

static RULE_PREFIX: RwLock<Option<RulePrefix>> = RwLock::new(None);

/// Installs the global subscriber (stderr) and the `log` bridge. `RUST_LOG`
/// overrides `level` when set. Calling it twice is harmless (the second
/// call changes nothing).
///
/// Under systemd, when stderr is the journal (`JOURNAL_STREAM` names its
/// device and inode, systemd.exec(5)), each line starts with its syslog
/// priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace;
/// sd-daemon(3)) and text lines carry no timestamp: journald adds both.
pub fn init(format: LogFormat, level: LevelFilter) {
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy();
    let journal = stderr_is_journal();
    let writer = StderrWriter { journal };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match (format, journal) {
        (LogFormat::Text, false) => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .with_target(false)
                    // Colour only for a person at a terminal, never into
                    // journald or a log file.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init_without_log(),
        (LogFormat::Text, true) => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .with_target(false)
                    .with_ansi(false)
                    .without_time(),
            )
            .try_init_without_log(),
        (LogFormat::Json, _) => registry
            .with(fmt::layer().json().flatten_event(true).with_writer(writer))
            .try_init_without_log(),
    };
    if installed {
        let max = tracing_log::AsLog::as_log(&LevelFilter::current());
        if log::set_boxed_logger(Box::new(Bridge(tracing_log::LogTracer::new()))).is_ok() {
            log::set_max_level(max);
        }
    }
}

/// Whether stderr is the stream `JOURNAL_STREAM` (`"DEV:INODE"`) names.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_is(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

/// Whether a `JOURNAL_STREAM` value names the file with `dev` and `ino`.
fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        .is_some_and(|(d, i)| d == dev && i == ino)
}

/// The syslog priority prefix journald reads for a level (sd-daemon(3)).
fn priority_prefix(level: &tracing::Level) -> &'static [u8] {
    match *level {
        tracing::Level::ERROR => b"<3>",
        tracing::Level::WARN => b"<4>",
        tracing::Level::INFO => b"<6>",
        tracing::Level::DEBUG | tracing::Level::TRACE => b"<7>",
    }
}

/// stderr, with each event's priority prefix when it is the journal.
#[derive(Clone, Copy)]
struct StderrWriter {
    journal: bool,
}

impl<'a> fmt::MakeWriter<'a> for StderrWriter {
    type Writer = Prefixed<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        Prefixed::new(std::io::stderr(), None)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let prefix = self.journal.then(|| priority_prefix(meta.level()));
        Prefixed::new(std::io::stderr(), prefix)
    }
}

/// A writer for one event that writes `prefix` before its first byte.
struct Prefixed<W> {
    inner: W,
    prefix: Option<&'static [u8]>,
}

impl<W: std::io::Write> Prefixed<W> {
    fn new(inner: W, prefix: Option<&'static [u8]>) -> Self {
        Prefixed { inner, prefix }
    }
}

impl<W: std::io::Write> std::io::Write for Prefixed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(prefix) = self.prefix.take() {
            // One write for prefix and line, so lines never interleave.
            let mut line = Vec::with_capacity(prefix.len() + buf.len());
            line.extend_from_slice(prefix);
            line.extend_from_slice(buf);
            self.inner.write_all(&line)?;
            return Ok(buf.len());
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `try_init` without tracing-subscriber's own `log` bridge (ours wraps it).
trait TryInitWithoutLog {
    fn try_init_without_log(self) -> bool;
}

impl<S> TryInitWithoutLog for S
where
    S: tracing::Subscriber + Send + Sync + 'static,
{
    fn try_init_without_log(self) -> bool {
        tracing::subscriber::set_global_default(self).is_ok()
    }
}

/// Lets drop events name the prefix and the source of the rule that
/// decided: `f` maps a kernel rule id to `(prefix, source)` (`None`:
/// unknown, e.g. just removed).
pub fn set_rule_origin(f: impl Fn(u32) -> Option<(String, String)> + Send + Sync + 'static) {
    *RULE_PREFIX.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(f));
}

/// The `log` crate's records into tracing: the XDP program's drop events as
/// structured events, everything else as tracing-log forwards it.
struct Bridge(tracing_log::LogTracer);

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = record.args().to_string();
        match DropEvent::parse(&text) {
            Some(event) => event.emit(),
            None => self.0.log(record),
        }
    }

    fn flush(&self) {
        self.0.flush()
    }
}

/// `SYN dropped src=203.0.113.9 dport=25 reason=deny_list rule=7` (or
/// `SYN would drop ...` in monitor mode), as the XDP program logs it.
#[derive(Debug, PartialEq, Eq)]
struct DropEvent<'a> {
    monitor: bool,
    src: &'a str,
    dport: &'a str,
    reason: &'a str,
    rule: Option<u32>,
}

impl<'a> DropEvent<'a> {
    fn parse(text: &'a str) -> Option<DropEvent<'a>> {
        let (monitor, rest) = if let Some(rest) = text.strip_prefix("SYN dropped ") {
            (false, rest)
        } else {
            (true, text.strip_prefix("SYN would drop ")?)
        };
        let mut event = DropEvent {
            monitor,
            src: "",
            dport: "",
            reason: "",
            rule: None,
        };
        for pair in rest.split_whitespace() {
            let (key, value) = pair.split_once('=')?;
            match key {
                "src" => event.src = value,
                "dport" => event.dport = value,
                "reason" => event.reason = value,
                "rule" => event.rule = value.parse().ok(),
                _ => {}
            }
        }
        (!event.src.is_empty()).then_some(event)
    }

    fn emit(&self) {
        let resolve = RULE_PREFIX
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (prefix, source) = self
            .rule
            .and_then(|id| resolve.and_then(|f| f(id)))
            .unwrap_or_else(|| ("-".to_owned(), "-".to_owned()));
        let message = if self.monitor {
            "SYN would drop"
        } else {
            "SYN dropped"
        };
        tracing::warn!(
            src = %self.src,
            dport = %self.dport,
            reason = %self.reason,
            %prefix,
            %source,
            "{message}"
        );
    }
}

/// An error and its causes on one line, joined by `": "` (as anyhow's
/// `{:#}`), with no line breaks: a log or a terminal gets one line per
/// problem. TOML's several-line excerpt with a caret becomes its first
/// line (where) and its message (what).
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let part = match c.downcast_ref::<toml::de::Error>() {
            Some(t) => {
                let shown = t.to_string();
                let first = shown.lines().next().unwrap_or_default().to_owned();
                format!("{first}: {}", t.message().trim())
            }
            None => c.to_string(),
        };
        // Some errors repeat their source's text in their own message.
        if !parts.last().is_some_and(|p| p.ends_with(&part)) {
            parts.push(part);
        }
        cause = c.source();
    }
    parts
        .join(": ")
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_names_device_and_inode() {
        assert!(journal_stream_is("8:12345", 8, 12345));
        assert!(!journal_stream_is("8:12345", 8, 12346));
        assert!(!journal_stream_is("8", 8, 12345));
        assert!(!journal_stream_is("x:y", 8, 12345));
    }

    #[test]
    fn journal_lines_start_with_their_priority() {
        use std::io::Write as _;
        let mut out = Vec::new();
        let mut w = Prefixed::new(&mut out, Some(priority_prefix(&tracing::Level::WARN)));
        w.write_all(b"reload refused\n").unwrap();
        assert_eq!(out, b"<4>reload refused\n");
        let mut plain = Vec::new();
        Prefixed::new(&mut plain, None).write_all(b"x\n").unwrap();
        assert_eq!(plain, b"x\n");
        assert_eq!(priority_prefix(&tracing::Level::ERROR), b"<3>");
        assert_eq!(priority_prefix(&tracing::Level::INFO), b"<6>");
        assert_eq!(priority_prefix(&tracing::Level::TRACE), b"<7>");
    }

    #[test]
    fn drop_events_parse() {
        assert_eq!(
            DropEvent::parse("SYN dropped src=203.0.113.9 dport=25 reason=deny_list rule=7"),
            Some(DropEvent {
                monitor: false,
                src: "203.0.113.9",
                dport: "25",
                reason: "deny_list",
                rule: Some(7)
            })
        );
        let monitor = DropEvent::parse(
            "SYN would drop src=2001:db8::1 dport=2525 reason=not_permitted rule=1",
        )
        .unwrap();
        assert!(monitor.monitor);
        assert_eq!(monitor.src, "2001:db8::1");
        assert_eq!(DropEvent::parse("loading program"), None);
        assert_eq!(DropEvent::parse("SYN dropped because"), None);
    }

    #[test]
    fn errors_on_one_line() {
        let toml_error = toml::from_str::<toml::Table>("a = 1\nb = = 2\n").unwrap_err();
        #[derive(Debug, thiserror::Error)]
        #[error("cannot parse configuration file x.toml")]
        struct Outer(#[source] toml::de::Error);
        let line = one_line(&Outer(toml_error));
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with(
                "cannot parse configuration file x.toml: TOML parse error at line 2, column"
            ),
            "{line}"
        );
    }
}
