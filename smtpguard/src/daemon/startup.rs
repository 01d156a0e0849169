//! Starting the parts that need no runtime: configuration, lists, the XDP
//! program. Each step fails with an error that names what and where.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use smtpguard_common::Action;

use crate::{
    config::{Config, ConfigError, XdpMode},
    kernel::{
        loader::DEFAULT_PIN_DIR, ApplyHow, AttachMode, Attachment, Kernel, KernelError, KernelLog,
        PinState, RateLimiter, SyncError,
    },
    policy::{
        AccessList, ListError, ListKind, Policy, PolicyError, Protected, ProtectedKind,
        ProtectedRange, SourceError, SourceName,
    },
};

use super::{mode_state, paths};

/// A part of the daemon could not be started (or, on reload, read again).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A list file (the cause names it, with the line where it is one).
    #[error("loading the {list}")]
    List {
        /// Which list.
        list: ListKind,
        /// Its file.
        path: PathBuf,
        #[source]
        source: ListError,
    },
    /// The sources directory could not be read.
    #[error("reading the sources directory {}", path.display())]
    SourcesDir {
        /// The directory.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A list file of the sources directory whose name is no source name.
    #[error("list file {} of the sources directory", path.display())]
    SourceFileName {
        /// The file.
        path: PathBuf,
        #[source]
        source: SourceError,
    },
    /// `local.*.list` in the sources directory: `local` is the configured
    /// list files.
    #[error(
        "list file {} of the sources directory: the local source is policy.deny_list and \
         policy.permit_list; move its entries there",
        path.display()
    )]
    LocalInSourcesDir {
        /// The file.
        path: PathBuf,
    },
    /// The state file (mode and enforcement).
    #[error(transparent)]
    ModeState(#[from] mode_state::ModeStateError),
    /// The lists together: wrong kinds, or too many for the kernel.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Loading the XDP program.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Writing mode, ports and log rate into the XDP program.
    #[error("writing the XDP runtime configuration")]
    Runtime(#[source] Box<SyncError>),
    /// Writing the lists into the XDP program.
    #[error("loading the lists into the kernel")]
    Lists(#[source] Box<SyncError>),
    /// The merged lists need more of the kernel IPv6 table than it has;
    /// found before anything is written (see
    /// [`crate::kernel::ipv6_table::check_fits`]).
    #[error("checking the lists before loading them into the kernel")]
    Ipv6Table(#[source] crate::kernel::ipv6_table::Ipv6TableError),
    /// Attaching the XDP program.
    #[error("attaching the XDP program to {interface}")]
    Attach {
        /// The interface.
        interface: String,
        #[source]
        source: Box<KernelError>,
    },
}

type Result<T, E = StartupError> = std::result::Result<T, E>;

/// Where `smtpguard run` looks for its configuration without `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/smtpguard/smtpguard.toml";

/// Reads the configuration file, [`DEFAULT_CONFIG_PATH`] when `None`. A
/// missing default file is [`ConfigError::Read`] naming it (the installed
/// binary never falls back to the development configuration).
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    Config::load(path.unwrap_or(Path::new(DEFAULT_CONFIG_PATH)))
}

/// Removes what a killed daemon left half-written beside the list files
/// and the state file (see [`crate::policy::sweep_stale_temps`]), logging
/// each file. For `smtpguard run` only: `config check` changes nothing.
pub fn sweep_list_temps(config: &Config) {
    let mut dirs = vec![paths::sources_dir(config)];
    for list in [&config.policy.deny_list, &config.policy.permit_list] {
        let dir = crate::policy::parent_dir(list).to_path_buf();
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for dir in dirs {
        for file in crate::policy::sweep_stale_temps(&dir) {
            tracing::info!(file = %file.display(),
                "removed a temporary file a killed smtpguard left; the list it was to replace is as it was");
        }
    }
}

/// Loads every source (the `local` list files and the files of the
/// sources directory) into a policy, with the protected ranges of the
/// configuration and the mode of the state file (the configured mode
/// when there is none). A missing list file is an empty list; a file with
/// any bad line, or a file of the sources directory whose name is not a
/// valid source name, stops the start (and fails a reload whole).
pub fn load_policy(config: &Config) -> Result<Policy> {
    let load = |kind: ListKind, path: &PathBuf| -> Result<AccessList> {
        let loaded = AccessList::load(path, kind).map_err(|source| StartupError::List {
            list: kind,
            path: path.clone(),
            source,
        })?;
        for warning in &loaded.warnings {
            tracing::warn!(list = %kind, "{warning}");
        }
        for entry in loaded
            .list
            .entries()
            .iter()
            .filter(|e| e.prefix.prefix_len() == 0)
        {
            tracing::warn!(list = %kind, path = %path.display(), prefix = %entry.prefix,
                "the list file holds a whole-family entry: it covers every address of that family");
        }
        if !loaded.existed && !path.starts_with(paths::sources_dir(config)) {
            tracing::info!(list = %kind, path = %path.display(), "no list file yet: the list starts empty");
        }
        Ok(loaded.list)
    };
    let mut policy = Policy::new(config.policy.mode, config.policy.enforcement);
    for source in std::iter::once(SourceName::local()).chain(source_names(config)?) {
        let deny = load(
            ListKind::Deny,
            &paths::list_path(config, &source, ListKind::Deny),
        )?;
        let permit = load(
            ListKind::Permit,
            &paths::list_path(config, &source, ListKind::Permit),
        )?;
        policy.insert_source(source, deny, permit)?;
    }
    policy.set_protected(protected_ranges(config));
    if let Some(state) = mode_state::load(&paths::state_path(config))? {
        policy.set_mode(state.mode);
        policy.set_enforcement(state.enforcement);
    }
    // The IPv6 table's room is nodes, not prefixes: only compiling says
    // whether a list fits, and a start or reload should say so before it
    // writes anything. Without XDP the lists never reach the table.
    if config.xdp.enabled() {
        crate::kernel::ipv6_table::check_fits(&kernel_rules(&policy)?)
            .map_err(StartupError::Ipv6Table)?;
    }
    if policy.mode() == crate::policy::PolicyMode::DenyAllExceptPermit
        && policy.total_len(ListKind::Permit).total() == 0
    {
        tracing::warn!(
            "mode deny-all-except-permit with an empty permit list: every client is refused \
             (add entries with `smtpguard permit add`)"
        );
    }
    Ok(policy)
}

/// The merged lists as the kernel takes them: one action per prefix.
pub fn kernel_rules(policy: &Policy) -> std::result::Result<Vec<(IpNet, Action)>, PolicyError> {
    Ok(policy
        .compile()?
        .into_iter()
        .map(|r| (r.prefix, r.action))
        .collect())
}

/// The names of the sources with files in the sources directory, sorted;
/// none when the directory does not exist.
fn source_names(config: &Config) -> Result<BTreeSet<SourceName>> {
    let dir = paths::sources_dir(config);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => return Err(StartupError::SourcesDir { path: dir, source }),
    };
    let mut names = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| StartupError::SourcesDir {
            path: dir.clone(),
            source,
        })?;
        let file_name = entry.file_name();
        let Some((name, _)) = file_name.to_str().and_then(paths::parse_source_file_name) else {
            continue;
        };
        let bad_name = |source| StartupError::SourceFileName {
            path: entry.path(),
            source,
        };
        let name = SourceName::new(name).map_err(bad_name)?;
        if name.is_local() {
            return Err(StartupError::LocalInSourcesDir { path: entry.path() });
        }
        names.insert(name);
    }
    Ok(names)
}

/// The ranges the lists may never refuse: loopback, the explicit listen
/// addresses (a wildcard listener protects nothing more: list the host's
/// addresses in `policy.protected`), `delivery.relay_networks` and
/// `policy.protected`.
pub fn protected_ranges(config: &Config) -> Protected {
    let listen = config
        .server
        .listen
        .iter()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| ProtectedRange {
            prefix: IpNet::from(ip),
            kind: ProtectedKind::ListenAddress,
        });
    let relay = match &config.delivery {
        crate::config::Delivery::Spool(spool) => spool.relay_networks.clone(),
        _ => Vec::new(),
    }
    .into_iter()
    .map(|prefix| ProtectedRange {
        prefix,
        kind: ProtectedKind::RelayNetwork,
    });
    let configured = config
        .policy
        .protected
        .iter()
        .map(|&prefix| ProtectedRange {
            prefix,
            kind: ProtectedKind::Configured,
        });
    Protected::new(
        Protected::loopback()
            .into_iter()
            .chain(listen)
            .chain(relay)
            .chain(configured),
    )
}

/// Warns about configurations that are valid but accept no mail.
pub fn warn_about_delivery(config: &Config) {
    if let crate::config::Delivery::Spool(spool) = &config.delivery {
        if spool.accept_domains.is_empty() && spool.relay_networks.is_empty() {
            tracing::warn!(
                "spool mode with no delivery.accept_domains and no delivery.relay_networks: \
                 every recipient gets 550 5.7.1 Relay access denied"
            );
        }
    }
}

/// The kernel side once started: the program with its lists loaded and
/// attached, and its log reader.
pub struct StartedKernel {
    /// Program and maps.
    pub kernel: Kernel,
    /// Where it is attached and how.
    pub attachments: Vec<Attachment>,
    /// The program's drop-event log.
    pub log: Option<KernelLog>,
    /// The SYN rate limiter's bucket table and events.
    pub rate_limiter: Option<RateLimiter>,
    /// How long loading the lists into the kernel took.
    pub list_load: std::time::Duration,
}

/// Loads the XDP program, fills its lists and runtime configuration, and
/// only then attaches it (so it never runs with empty lists). `None` when
/// XDP is off in the configuration.
pub fn start_kernel(config: &Config, policy: &Policy) -> Result<Option<StartedKernel>> {
    if !config.xdp.enabled() {
        return Ok(None);
    }
    let mut kernel = Kernel::load_with_rate_table(config.rate_limit.table_size)?;
    let log = kernel.filter.take_log();
    let rate_limiter = kernel.filter.take_rate_limiter();
    kernel
        .sync
        .set_rate_limit(&super::settings::rate_limit(&config.rate_limit))
        .map_err(|e| StartupError::Runtime(Box::new(e)))?;
    kernel
        .sync
        .set_runtime(
            policy.mode().into(),
            policy.enforcement().into(),
            &config.server.ports(),
            config.xdp.log_rate_per_second,
        )
        .map_err(|e| StartupError::Runtime(Box::new(e)))?;
    let load_started = std::time::Instant::now();
    let rules = kernel_rules(policy)?;
    let report = kernel
        .sync
        .apply(&rules, ApplyHow::Atomic)
        .map_err(|e| StartupError::Lists(Box::new(e)))?;
    let list_load = load_started.elapsed();
    tracing::debug!(prefixes = report.total, "lists loaded into the XDP maps");
    let mode = match config.xdp.mode {
        XdpMode::Native => AttachMode::Native,
        XdpMode::Skb => AttachMode::Skb,
        XdpMode::Auto | XdpMode::Off => AttachMode::Auto,
    };
    let pin_dir = Path::new(DEFAULT_PIN_DIR);
    let pinning = prepare_pin_dir(pin_dir);
    if let Err(why) = &pinning {
        tracing::warn!(
            "XDP links are not pinned ({why}): a crash or kill -9 removes the filter \
             until the next start"
        );
    }
    let mut attachments = Vec::new();
    for interface in &config.xdp.interfaces {
        let attached = match &pinning {
            Ok(()) => kernel.filter.attach_pinned(interface, mode, pin_dir),
            Err(why) => kernel.filter.attach(interface, mode).map(|mut a| {
                a.pin = PinState::NotPinned(why.clone());
                a
            }),
        }
        .map_err(|source| StartupError::Attach {
            interface: interface.clone(),
            source: Box::new(source),
        })?;
        if attached.replaced_pinned {
            tracing::info!(interface, mode = %attached.mode,
                "replaced the XDP program left attached by the previous run, without a gap");
        }
        attachments.push(attached);
    }
    Ok(Some(StartedKernel {
        kernel,
        attachments,
        log,
        rate_limiter,
        list_load,
    }))
}

/// Makes `pin_dir` usable for pinned links, or says why it is not. Where
/// nothing is mounted on its parent (`/sys/fs/bpf`), bpffs is mounted there,
/// as libxdp does (needs CAP_SYS_ADMIN; under `ip netns exec` the mount
/// stays in that command's mount namespace). The reason names the real
/// cause: no bpffs and no right to mount one, or a root-only bpffs.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), String> {
    let root = pin_dir.parent().unwrap_or(pin_dir);
    if !is_bpffs(root) {
        use nix::mount::{mount, MsFlags};
        match mount(
            Some("bpf"),
            root,
            Some("bpf"),
            MsFlags::empty(),
            Some("mode=0700"),
        ) {
            Ok(()) => {
                tracing::info!(path = %root.display(), "mounted bpffs (nothing was mounted there)")
            }
            Err(e) => {
                return Err(format!(
                    "no bpffs on {} and mounting one failed: {}; mount it before the start \
                     (the packaged unit's ExecStartPre=+ does)",
                    root.display(),
                    e.desc()
                ))
            }
        }
    }
    let uid = nix::unistd::geteuid();
    if let Err(e) = std::fs::create_dir_all(pin_dir) {
        return Err(format!(
            "cannot create {} as uid {uid}: {e}; bpffs is usually root-only: create the \
             directory owned by this user before the start (the packaged unit's \
             ExecStartPre=+ does)",
            pin_dir.display()
        ));
    }
    use nix::unistd::{access, AccessFlags};
    if let Err(e) = access(pin_dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return Err(format!(
            "{} is not writable as uid {uid}: {}; give it to this user before the start \
             (the packaged unit's ExecStartPre=+ does)",
            pin_dir.display(),
            e.desc()
        ));
    }
    Ok(())
}

/// Whether `path` is a mounted bpffs (magic 0xcafe4a11).
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as u64 == 0xcafe_4a11)
        .unwrap_or(false)
}
