//! The `smtpguard` command line: `smtpguard run` starts the daemon; every
//! other command is a client of its control socket ([`crate::control`]).
//!
//! Output is terse text for operators by default and the daemon's reply as
//! JSON with `--json`. Errors are one line on stderr,
//! `smtpguard: error: ...`, with exit status 1; usage errors are clap's,
//! with exit status 2.

use std::{
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::control::{
    client::io_text,
    proto::{Enforcement, ListName, PolicyMode, Request, Response, StatsView},
    render, Client, DEFAULT_SOCKET,
};
use crate::policy::MAX_LIST_FILE_BYTES;

/// How many skipped lines of an import are listed before "... and N more".
const MAX_ISSUES_SHOWN: usize = 20;

/// SMTP port guard for Linux mail gateways.
#[derive(Debug, Parser)]
#[command(
    name = "smtpguard",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Control socket of the daemon [default: control.socket of --config,
    /// else /run/smtpguard/control.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Configuration file. For `run` and `config check`: the daemon's
    /// configuration [default: /etc/smtpguard/smtpguard.toml]. For the
    /// other commands: where to find control.socket (only that key is read).
    #[arg(short = 'c', long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the daemon's reply as JSON, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (in the foreground).
    Run,
    /// Add to, remove from or show the deny list.
    #[command(subcommand)]
    Deny(ListCommand),
    /// Add to, remove from or show the permit list.
    #[command(subcommand)]
    Permit(ListCommand),
    /// Import a list file (the client reads FILE and sends its text).
    Import(ImportArgs),
    /// Print a list in the list file format, or write it to FILE.
    Export(ExportArgs),
    /// Change the policy mode or the enforcement.
    Mode {
        /// accept-all-except-deny or deny-all-except-permit (the mode);
        /// enforce, monitor or off (the enforcement).
        #[arg(value_enum)]
        setting: ModeSetting,
    },
    /// Show what the policy says about addresses.
    Check {
        /// IPv4 or IPv6 addresses.
        #[arg(required = true, value_name = "ADDR")]
        addresses: Vec<String>,
    },
    /// Show counters.
    Stats {
        /// How many of the list entries with the most hits to show.
        #[arg(long, value_name = "N", default_value_t = 10)]
        top: usize,
        /// Repeat every SECONDS seconds, with rates per second, until
        /// interrupted.
        #[arg(long, value_name = "SECONDS", value_parser = parse_watch)]
        watch: Option<Duration>,
    },
    /// Show what the daemon is doing.
    Status,
    /// Re-read the list files and the configuration (like SIGHUP).
    Reload,
    /// List the open SMTP sessions: id, client, since, state, TLS, HELO,
    /// bytes in and out, upstream connection.
    Sessions,
    /// Close open SMTP sessions with `421 4.7.0` (logged with your uid).
    Kick {
        /// A session id (from `sessions`), a client address, or a prefix
        /// such as 203.0.113.0/24.
        #[arg(value_name = "ID|ADDR|PREFIX")]
        target: String,
    },
    /// Work on the configuration file, without the daemon.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check the configuration, the list files and the TLS files offline,
    /// as a start would, without root or a running daemon: one line per
    /// problem on stderr, exit status 1 if there is any.
    Check,
}

/// `deny ...` and `permit ...`.
#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// Add entries (addresses or prefixes such as 203.0.113.0/24).
    Add {
        /// The entries.
        #[arg(required = true, value_name = "ENTRY")]
        entries: Vec<String>,
        /// Remove the entries again after DURATION (30m, 1h, 7d, ...).
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_for)]
        expires_in: Option<Duration>,
        /// Comment stored with the entries.
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
        /// Accept entries that cover every address (0.0.0.0/0, ::/0).
        #[arg(long)]
        allow_all: bool,
        /// The source: `local` (the default, your own entries), or a
        /// name such as `ipsum` (a-z, 0-9, '-', '_'; `auto` is reserved;
        /// `fleet` writes to the fleet's etcd through the daemon).
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Deny even entries that cover protected ranges (loopback, the
        /// listen addresses, relay networks, policy.protected); the
        /// protected addresses stay permitted all the same.
        #[arg(long)]
        force: bool,
        /// With --source fleet: also wait until every gateway of the
        /// fleet has applied the change (otherwise only this one).
        #[arg(long)]
        wait_fleet: bool,
    },
    /// Remove entries.
    #[command(visible_alias = "del")]
    Remove {
        /// The entries, written as when they were added.
        #[arg(required = true, value_name = "ENTRY")]
        entries: Vec<String>,
        /// The source: `local` (the default, your own entries), or a
        /// name such as `ipsum` (a-z, 0-9, '-', '_'); `auto` lifts an
        /// automatic ban; `fleet` writes to the fleet's etcd through the
        /// daemon.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// With --source fleet: also wait until every gateway of the
        /// fleet has applied the change (otherwise only this one).
        #[arg(long)]
        wait_fleet: bool,
    },
    /// Show the entries (of every source, each named, unless --source).
    #[command(visible_alias = "show")]
    List {
        /// Show only this source.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
    },
}

/// `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The list to import into.
    #[arg(value_enum)]
    pub list: ListArg,
    /// The file to import, `-` for standard input.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Make the list exactly the file's entries (others are removed).
    #[arg(long)]
    pub replace: bool,
    /// Show what would change without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Import the valid lines and list the invalid ones, rather than
    /// refusing the file.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Accept entries that cover every address (0.0.0.0/0, ::/0).
    #[arg(long)]
    pub allow_all: bool,
    /// With --replace: accept a file without a single entry, which empties
    /// the list (refused otherwise: a wrong or truncated download looks the
    /// same). A merge import of no entries changes nothing and warns.
    #[arg(long)]
    pub allow_empty: bool,
    /// The source to import into (default `local`): `--replace` replaces
    /// only this source, e.g. `--source ipsum` for a daily ipsum refresh.
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
}

/// `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The list to export.
    #[arg(value_enum)]
    pub list: ListArg,
    /// Write the list to FILE (replaced atomically) rather than to
    /// standard output.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The source to export (default `local`).
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
}

/// A list name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListArg {
    /// The deny list.
    Deny,
    /// The permit list.
    Permit,
}

impl From<ListArg> for ListName {
    fn from(l: ListArg) -> ListName {
        match l {
            ListArg::Deny => ListName::Deny,
            ListArg::Permit => ListName::Permit,
        }
    }
}

/// The argument of `mode`: a policy mode or an enforcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeSetting {
    /// Accept sources on neither list.
    AcceptAllExceptDeny,
    /// Refuse sources on neither list.
    DenyAllExceptPermit,
    /// Refuse what the policy refuses.
    Enforce,
    /// Count and log what would be refused; refuse nothing.
    Monitor,
    /// Judge nothing.
    Off,
}

impl ModeSetting {
    /// The [`Request::SetMode`] it stands for.
    pub fn request(self) -> Request {
        let (mode, enforcement) = match self {
            ModeSetting::AcceptAllExceptDeny => (Some(PolicyMode::AcceptAllExceptDeny), None),
            ModeSetting::DenyAllExceptPermit => (Some(PolicyMode::DenyAllExceptPermit), None),
            ModeSetting::Enforce => (None, Some(Enforcement::Enforce)),
            ModeSetting::Monitor => (None, Some(Enforcement::Monitor)),
            ModeSetting::Off => (None, Some(Enforcement::Off)),
        };
        Request::SetMode { mode, enforcement }
    }
}

fn parse_for(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 30m, 1h, 7d)"))?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".to_owned());
    }
    Ok(d)
}

fn parse_watch(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|_| "expected a number of seconds (e.g. 5)".to_owned())?,
    };
    if d < Duration::from_secs(1) {
        return Err("must be at least 1 second".to_owned());
    }
    Ok(d)
}

/// Parses the command line, runs the command, prints any error and
/// returns the exit status: the whole of `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line, like every other error; `--help` has the usage.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("smtpguard: error: {first} (see `smtpguard --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Output cut short by `| head` is not an error worth a message.
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            let e: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("smtpguard: error: {}", crate::logging::one_line(e));
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
///
/// # Errors
///
/// Any failure, as one message (print it with `{:#}`).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Run = cli.command {
        if cli.socket.is_some() || cli.json {
            bail!("--socket and --json are for the client commands; the daemon takes its socket from control.socket in --config");
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        return runtime.block_on(crate::daemon::run(cli.config));
    }
    if let Command::Config(ConfigCommand::Check) = cli.command {
        return config_check(cli.config.as_deref());
    }
    let socket = socket_path(&cli)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(client_command(cli.command, Client::new(socket), cli.json))
}

/// `--socket`, else `control.socket` of `--config`, else the default.
fn socket_path(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(socket) = &cli.socket {
        return Ok(socket.clone());
    }
    if let Some(config) = &cli.config {
        return socket_of_config(config);
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

/// `control.socket` of a configuration file, read leniently: the rest of
/// the file may be broken (the operator may be about to fix it with the
/// daemon's help) and is not looked at. The default when the key is absent.
fn socket_of_config(path: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow!(
            "cannot read configuration file {}: {}",
            path.display(),
            io_text(&e)
        )
    })?;
    let value = |table: &toml::Table| -> Option<PathBuf> {
        let socket = table.get("control")?.as_table()?.get("socket")?;
        socket.as_str().map(PathBuf::from)
    };
    if let Ok(table) = text.parse::<toml::Table>() {
        return Ok(value(&table).unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)));
    }
    // Not even TOML: parse the [control] table alone.
    let control = control_table_text(&text);
    match control.parse::<toml::Table>() {
        Ok(table) => Ok(value(&table).unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))),
        Err(_) => bail!(
            "cannot find control.socket in {}: it is not valid TOML (give --socket PATH, or run `smtpguard config check -c {}`)",
            path.display(),
            path.display()
        ),
    }
}

/// The `[control]` table of a TOML text, header included, cut out by its
/// header lines; empty when there is none.
fn control_table_text(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            inside = trimmed
                .split('#')
                .next()
                .is_some_and(|h| h.trim() == "[control]");
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `config check`: prints each problem and warning on its own line, and a
/// success line naming what was checked.
fn config_check(path: Option<&Path>) -> anyhow::Result<()> {
    let path = path.unwrap_or(Path::new(crate::daemon::startup::DEFAULT_CONFIG_PATH));
    let report = crate::daemon::check::check(path);
    for w in &report.warnings {
        warn(w);
    }
    for p in &report.problems {
        eprintln!("{p}");
    }
    if !report.ok() {
        bail!(
            "{}: {} problem(s); a start would refuse this configuration",
            path.display(),
            report.problems.len()
        );
    }
    let mut line = format!("{}: configuration OK", path.display());
    if !report.checked.is_empty() {
        line.push_str(&format!(" ({})", report.checked.join(", ")));
    }
    line.push('\n');
    out(&line)?;
    Ok(())
}

fn out(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

fn json(value: &impl Serialize) -> io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("replies serialize");
    text.push('\n');
    out(&text)
}

fn warn(message: &str) {
    eprintln!("smtpguard: warning: {message}");
}

fn unexpected(request: &Request, reply: &Response) -> anyhow::Error {
    crate::control::ClientError::Unexpected {
        op: request.op(),
        got: reply.kind(),
    }
    .into()
}

async fn client_command(command: Command, client: Client, as_json: bool) -> anyhow::Result<()> {
    let request = match command {
        Command::Run | Command::Config(_) => unreachable!("handled by run"),
        Command::Deny(c) => list_request(ListName::Deny, c),
        Command::Permit(c) => list_request(ListName::Permit, c),
        Command::Import(args) => import_request(&args)?,
        Command::Export(ExportArgs { list, file, source }) => {
            return export(&client, list.into(), source, file.as_deref(), as_json).await;
        }
        Command::Mode { setting } => setting.request(),
        Command::Check { addresses } => Request::Check { addresses },
        Command::Stats {
            top,
            watch: Some(every),
        } => {
            return watch_stats(&client, top, every, as_json).await;
        }
        Command::Stats { top, watch: None } => Request::Stats { top },
        Command::Status => Request::Status,
        Command::Reload => Request::Reload,
        Command::Sessions => Request::Sessions,
        Command::Kick { target } => Request::Kick { target },
    };
    let reply = client.call(&request).await?;
    match (&request, &reply) {
        (Request::ListAdd { .. } | Request::ListRemove { .. }, Response::ListChanged(c)) => {
            for w in &c.warnings {
                warn(w);
            }
            if as_json {
                json(c)?;
            } else {
                out(&render::list_changed(c))?;
            }
        }
        (Request::ListShow { .. }, Response::ListEntries(l)) => {
            if as_json {
                json(l)?;
            } else {
                out(&render::list_entries(l))?;
            }
        }
        (Request::Import { dry_run, list, .. }, Response::ImportResult(r)) => {
            if as_json {
                json(r)?;
            } else {
                for w in &r.warnings {
                    warn(w);
                }
                for issue in r.skipped.iter().take(MAX_ISSUES_SHOWN) {
                    eprintln!("{}", render::line_issue(issue));
                }
                if r.skipped.len() > MAX_ISSUES_SHOWN {
                    eprintln!(
                        "... and {} more invalid lines",
                        r.skipped.len() - MAX_ISSUES_SHOWN
                    );
                }
                out(&render::import_result(r, *dry_run))?;
            }
            // A dry run fails exactly when the real import would.
            if r.rejected {
                let what = if *dry_run {
                    "would not be applied"
                } else {
                    "not applied"
                };
                bail!(
                    "import into the {list} list {what}: {} invalid line(s) (fix them, or import the rest with --skip-invalid)",
                    r.skipped.len()
                );
            }
        }
        (Request::SetMode { .. }, Response::ModeSet(m)) => {
            if as_json {
                json(m)?;
            } else {
                out(&render::mode_set(m))?;
            }
        }
        (Request::Check { .. }, Response::Checked(c)) => {
            if as_json {
                json(c)?;
            } else {
                out(&render::checked(c))?;
            }
        }
        (Request::Stats { .. }, Response::Stats(s)) => {
            if as_json {
                json(s)?;
            } else {
                out(&render::stats(s))?;
            }
        }
        (Request::Status, Response::Status(s)) => {
            if as_json {
                json(s)?;
            } else {
                out(&render::status(s))?;
            }
        }
        (Request::Reload, Response::Reloaded(r)) => {
            if as_json {
                json(r)?;
            } else {
                let mut text = r.summary.trim_end().to_owned();
                text.push('\n');
                out(&text)?;
            }
        }
        (Request::Sessions, Response::Sessions(s)) => {
            if as_json {
                json(s)?;
            } else {
                out(&render::sessions(s))?;
            }
        }
        (Request::Kick { .. }, Response::Kicked(k)) => {
            if as_json {
                json(k)?;
            } else {
                out(&render::kicked(k))?;
            }
        }
        _ => return Err(unexpected(&request, &reply)),
    }
    Ok(())
}

fn list_request(list: ListName, command: ListCommand) -> Request {
    match command {
        ListCommand::Add {
            entries,
            expires_in,
            comment,
            allow_all,
            source,
            force,
            wait_fleet,
        } => Request::ListAdd {
            list,
            entries,
            // Rounded up: `--for 1500ms` never lifts the entry early.
            expires_in_secs: expires_in.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
            comment,
            allow_all,
            source,
            force,
            wait_fleet,
        },
        ListCommand::Remove {
            entries,
            source,
            wait_fleet,
        } => Request::ListRemove {
            list,
            entries,
            source,
            wait_fleet,
        },
        ListCommand::List { source } => Request::ListShow { list, source },
    }
}

fn import_request(args: &ImportArgs) -> anyhow::Result<Request> {
    let (source_name, bytes) = if args.file.as_os_str() == "-" {
        let bytes = crate::files::read_bounded(io::stdin(), MAX_LIST_FILE_BYTES)
            .map_err(|e| anyhow!("cannot read standard input: {}", io_text(&e)))?;
        ("<stdin>".to_owned(), bytes)
    } else {
        let name = args.file.display().to_string();
        let bytes = crate::files::read_regular(&args.file, MAX_LIST_FILE_BYTES)
            .map_err(|e| anyhow!("cannot read {name}: {}", io_text(&e)))?;
        (name, bytes)
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{source_name} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(Request::Import {
        list: args.list.into(),
        source_name,
        text,
        replace: args.replace,
        dry_run: args.dry_run,
        skip_invalid: args.skip_invalid,
        allow_all: args.allow_all,
        allow_empty: args.allow_empty,
        source: args.source.clone(),
    })
}

async fn export(
    client: &Client,
    list: ListName,
    source: Option<String>,
    file: Option<&Path>,
    as_json: bool,
) -> anyhow::Result<()> {
    let request = Request::Export { list, source };
    let reply = client.call(&request).await?;
    let Response::Exported(exported) = &reply else {
        return Err(unexpected(&request, &reply));
    };
    match file {
        Some(path) => write_atomically(path, exported.text.as_bytes())
            .map_err(|e| anyhow!("cannot write {}: {}", path.display(), io_text(&e)))?,
        None if as_json => json(exported)?,
        None => out(&exported.text)?,
    }
    Ok(())
}

/// Replaces `path` with `bytes` so that readers see the old file or the
/// new one, never a part: a temporary file in the same directory, synced,
/// renamed over it. An existing file's permission bits are kept; a new
/// file gets 0644 less the umask.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let existing_mode = std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777);
    let tmp = dir.join(format!(
        ".{}.smtpguard-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(existing_mode.unwrap_or(0o644))
            .open(&tmp)?;
        f.write_all(bytes)?;
        if let Some(mode) = existing_mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // The rename is durable once the directory is synced; a failure here
    // changes nothing the operator can act on.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `stats --watch`: asks for the counters every `every` until Ctrl-C,
/// printing totals first and then rates per second since the previous
/// sample. With `--json`, one compact JSON object (the totals) a line.
async fn watch_stats(
    client: &Client,
    top: usize,
    every: Duration,
    as_json: bool,
) -> anyhow::Result<()> {
    let request = Request::Stats { top };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut previous: Option<(StatsView, Instant)> = None;
    loop {
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            _ = ticks.tick() => {}
        }
        let reply = tokio::select! {
            _ = &mut interrupted => return Ok(()),
            reply = client.call(&request) => reply?,
        };
        let taken = Instant::now();
        let Response::Stats(stats) = reply else {
            return Err(unexpected(&request, &reply));
        };
        if as_json {
            let mut line = serde_json::to_string(&stats).expect("replies serialize");
            line.push('\n');
            out(&line)?;
        } else {
            let body = match &previous {
                None => render::stats(&stats),
                Some((before, at)) => render::stats_rates(before, &stats, taken - *at),
            };
            let separator = if previous.is_some() { "\n" } else { "" };
            out(&format!("{separator}# {}\n{body}", render::now()))?;
        }
        previous = Some((stats, taken));
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("smtpguard").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn options_go_anywhere() {
        let cli = parse(&[
            "deny",
            "add",
            "192.0.2.1",
            "--json",
            "--socket",
            "/s",
            "--for",
            "1h",
        ]);
        assert!(cli.json);
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/s")));
        match cli.command {
            Command::Deny(ListCommand::Add { expires_in, .. }) => {
                assert_eq!(expires_in, Some(Duration::from_secs(3600)));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&["--config", "/etc/smtpguard/smtpguard.toml", "run"]);
        assert!(matches!(cli.command, Command::Run));
        assert_eq!(
            cli.config.as_deref(),
            Some(Path::new("/etc/smtpguard/smtpguard.toml"))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_for("30m"), Ok(Duration::from_secs(1800)));
        assert!(parse_for("0s").is_err());
        assert!(parse_for("3600").is_err(), "a unit is required");
        assert_eq!(parse_watch("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_watch("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_watch("0").is_err());
    }

    #[test]
    fn a_fraction_of_a_second_in_for_is_rounded_up() {
        let request = |arg: &str| match parse(&["deny", "add", "192.0.2.1", "--for", arg]).command {
            Command::Deny(c) => list_request(ListName::Deny, c),
            other => panic!("{other:?}"),
        };
        for (arg, secs) in [("1500ms", 2), ("2s", 2), ("2s 1ns", 3)] {
            match request(arg) {
                Request::ListAdd {
                    expires_in_secs, ..
                } => assert_eq!(expires_in_secs, Some(secs), "--for {arg}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn mode_settings() {
        assert_eq!(
            ModeSetting::Off.request(),
            Request::SetMode {
                mode: None,
                enforcement: Some(Enforcement::Off)
            }
        );
        assert_eq!(
            ModeSetting::AcceptAllExceptDeny.request(),
            Request::SetMode {
                mode: Some(PolicyMode::AcceptAllExceptDeny),
                enforcement: None
            }
        );
    }
}
