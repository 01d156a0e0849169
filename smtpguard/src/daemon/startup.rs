//! Starting the parts that need no runtime: configuration, lists, the XDP
//! program. Each step fails with an error that names what and where.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use smtpguard_common::Action;

use crate::{
    config::{Config, ConfigError, XdpMode},
    kernel::{
        loader::DEFAULT_PIN_DIR, ApplyHow, AttachMode, Attachment, Kernel, KernelError, KernelLog,
        SyncError,
    },
    policy::{AccessList, ListError, ListKind, Policy, PolicyError},
};

/// A part of the daemon could not be started (or, on reload, read again).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A list file.
    #[error("loading the {list} from {}", path.display())]
    List {
        /// Which list.
        list: ListKind,
        /// Its file.
        path: PathBuf,
        #[source]
        source: ListError,
    },
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

/// Loads both list files into a policy with the configured mode. A missing
/// file is an empty list; a file with any bad line stops the start.
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
        if !loaded.existed {
            tracing::info!(list = %kind, path = %path.display(), "no list file yet: the list starts empty");
        }
        Ok(loaded.list)
    };
    let deny = load(ListKind::Deny, &config.policy.deny_list)?;
    let permit = load(ListKind::Permit, &config.policy.permit_list)?;
    if config.policy.mode == crate::policy::PolicyMode::DenyAllExceptPermit && permit.is_empty() {
        tracing::warn!(
            "mode deny-all-except-permit with an empty permit list: every client is refused \
             (add entries with `smtpguard permit add`)"
        );
    }
    Ok(Policy::with_lists(
        config.policy.mode,
        config.policy.enforcement,
        deny,
        permit,
    )?)
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
}

/// Loads the XDP program, fills its lists and runtime configuration, and
/// only then attaches it (so it never runs with empty lists). `None` when
/// XDP is off in the configuration.
pub fn start_kernel(config: &Config, policy: &Policy) -> Result<Option<StartedKernel>> {
    if !config.xdp.enabled() {
        return Ok(None);
    }
    let mut kernel = Kernel::load()?;
    let log = kernel.filter.take_log();
    kernel
        .sync
        .set_runtime(
            policy.mode().into(),
            policy.enforcement().into(),
            &config.server.ports(),
            config.xdp.log_rate_per_second,
        )
        .map_err(|e| StartupError::Runtime(Box::new(e)))?;
    let rules: Vec<(IpNet, Action)> = policy
        .compile()?
        .into_iter()
        .map(|r| (r.prefix, r.action))
        .collect();
    let report = kernel
        .sync
        .apply(&rules, ApplyHow::Atomic)
        .map_err(|e| StartupError::Lists(Box::new(e)))?;
    tracing::debug!(prefixes = report.total, "lists loaded into the XDP maps");
    let mode = match config.xdp.mode {
        XdpMode::Native => AttachMode::Native,
        XdpMode::Skb => AttachMode::Skb,
        XdpMode::Auto | XdpMode::Off => AttachMode::Auto,
    };
    let pin_dir = Path::new(DEFAULT_PIN_DIR);
    let mut attachments = Vec::new();
    for interface in &config.xdp.interfaces {
        // Pinning needs bpffs; inside `ip netns exec` /sys/fs/bpf is hidden,
        // and then the link lives with the process, unpinned.
        let attached = if pin_dir.parent().is_some_and(is_bpffs) {
            kernel.filter.attach_pinned(interface, mode, pin_dir)
        } else {
            kernel.filter.attach(interface, mode)
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
    }))
}

/// Whether `path` is a mounted bpffs (magic 0xcafe4a11).
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 as u64 == 0xcafe_4a11)
        .unwrap_or(false)
}
