//! Loads the embedded XDP program and attaches it to interfaces.
//!
//! Attachment uses a bpf_link (the kernel refuses a second program on the
//! same hook and detaches it when the daemon exits, even on a crash).
//!
//! Pinned links are never unpinned while they hold the filter: a restart
//! swaps its program into the link the previous run pinned, in place
//! (`BPF_LINK_UPDATE`, atomic), so a crash at any step leaves the old or
//! the new program attached, and the pin holding it.

use std::fmt;
use std::path::{Path, PathBuf};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader, VerifierLogLevel,
};
use smtpguard_common::PROGRAM_NAME;

use super::{rate_limit::RateLimiter, stats::Stats, sync::MapSync, KernelError, EBPF_OBJECT};

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// Native (driver) mode when the driver supports it, else skb mode.
    Auto,
    /// Native (driver) XDP only; fail if the driver lacks it.
    Native,
    /// Generic (skb) XDP: works on any interface, after the skb is built.
    Skb,
}

/// The mode an interface actually got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachedMode {
    /// Native (driver) XDP.
    Native,
    /// Generic (skb) XDP.
    Skb,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Skb => "skb",
        })
    }
}

/// One interface the program is attached to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    /// Interface name, e.g. `eth0`.
    pub interface: String,
    /// Native or skb.
    pub mode: AttachedMode,
    /// The program replaced one left attached (pinned) by an earlier run.
    pub replaced_pinned: bool,
    /// Whether the link is pinned, so that it outlives a crash.
    pub pin: PinState,
}

/// Whether an attachment's bpf_link is pinned in bpffs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinState {
    /// Pinned at this path: a crash or `kill -9` leaves the filter in force.
    Pinned(PathBuf),
    /// Not pinned, and why: the link lives with the process, so a crash
    /// removes the filter.
    NotPinned(String),
}

impl fmt::Display for PinState {
    /// `yes (PATH)` or `no (WHY), a crash removes the filter`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinState::Pinned(path) => write!(f, "yes ({})", path.display()),
            PinState::NotPinned(why) => write!(f, "no ({why}), a crash removes the filter"),
        }
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        if !self.pinned.is_empty() {
            self.detach_all();
        }
    }
}

/// `PIN_DIR/<netns inode>-<interface>-<mode>`: unique per network
/// namespace, so daemons in different namespaces never share a pin.
fn pin_path(pin_dir: &Path, interface: &str, mode: AttachedMode) -> PathBuf {
    let netns = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap_or(0);
    pin_dir.join(format!("{netns}-{interface}-{mode}"))
}

/// Where the daemon pins its XDP links by default (bpffs).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/smtpguard";

/// A bpf_link pinned in bpffs, and this process's own reference to it.
/// The pin keeps the program attached whatever becomes of the process.
struct Pinned {
    link: FdLink,
    path: PathBuf,
}

/// The loaded XDP program. Dropping it detaches it from every interface
/// (and removes its pins); only a crash leaves a pinned link behind, which
/// keeps the last filter in force until the next start replaces it.
pub struct XdpFilter {
    ebpf: Ebpf,
    /// Links pinned in bpffs by [`XdpFilter::attach_pinned`].
    pinned: Vec<Pinned>,
    /// The directory they are pinned in, removed when empty at detach.
    pin_dir: Option<PathBuf>,
    /// The SYN rate limiter's maps until [`XdpFilter::take_rate_limiter`].
    rate_limiter: Option<RateLimiter>,
}

/// Reader of the program's aya-log ring buffer; its records go to the `log`
/// crate (bridged into `tracing`). Poll it with [`pump_kernel_log`].
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

impl XdpFilter {
    /// Loads the embedded program into the kernel (not attached yet) and
    /// hands out the owners of its maps: [`MapSync`] for lists and config,
    /// [`Stats`] for counters. Fill the lists before [`XdpFilter::attach`].
    pub fn load() -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        Self::load_with(
            EBPF_OBJECT,
            None,
            smtpguard_common::rate::DEFAULT_TABLE_SIZE,
        )
    }

    /// As [`XdpFilter::load`], with room for `table_size` clients in the
    /// SYN rate limiter's bucket table (`rate_limit.table_size`; a size
    /// fixed at load, so changing it needs a restart).
    pub fn load_with_rate_table(
        table_size: u32,
    ) -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        Self::load_with(EBPF_OBJECT, None, table_size)
    }

    /// As [`XdpFilter::load`], with each family's table taking at most
    /// `prefixes_per_family` prefixes instead of
    /// `MAX_PREFIXES_PER_FAMILY`: for tests of what happens when a list
    /// does not fit.
    pub fn load_with_capacity(
        prefixes_per_family: u32,
    ) -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        Self::load_with(
            EBPF_OBJECT,
            Some(prefixes_per_family),
            smtpguard_common::rate::DEFAULT_TABLE_SIZE,
        )
    }

    fn load_with(
        object: &[u8],
        capacity: Option<u32>,
        rate_table: u32,
    ) -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        if object.is_empty() {
            return Err(KernelError::NoObject);
        }
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::default());
        loader.map_max_entries(smtpguard_common::map_names::RATE_BUCKETS, rate_table.max(1));
        let mut ebpf = loader.load(object).map_err(KernelError::Load)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(KernelError::MissingProgram(PROGRAM_NAME))?
            .try_into()
            .map_err(|source| KernelError::Program {
                what: "wrong program type".into(),
                source,
            })?;
        program.load().map_err(|source| KernelError::Program {
            what: "verifier rejected it".into(),
            source,
        })?;
        let cpus = std::sync::Arc::new(super::cpu_state::CpuStates::take_from(&mut ebpf)?);
        let hits = std::sync::Arc::new(super::hits::HitsMapping::take_from(
            &mut ebpf,
            std::sync::Arc::clone(&cpus),
        )?);
        // Both tables are preallocated; the writers enforce the capacity.
        let capacity = capacity.unwrap_or(smtpguard_common::MAX_PREFIXES_PER_FAMILY);
        let sync = MapSync::take_from(&mut ebpf, std::sync::Arc::clone(&hits), capacity)?;
        let stats = Stats::new(cpus, hits);
        let rate_limiter = RateLimiter::take_from(&mut ebpf, rate_table.max(1))?;
        Ok((
            XdpFilter {
                ebpf,
                pinned: Vec::new(),
                pin_dir: None,
                rate_limiter: Some(rate_limiter),
            },
            sync,
            stats,
        ))
    }

    fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("program checked at load")
    }

    /// Attaches to `interface`. `Auto` tries native mode, then skb mode.
    /// The link lives as long as this `XdpFilter`.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attachment, KernelError> {
        let (_link, attached) = self.attach_link(interface, mode)?;
        let pin = PinState::NotPinned("attached without a pin directory".into());
        Ok(attachment(interface, attached, false, pin))
    }

    /// Attaches like [`XdpFilter::attach`], and pins the bpf_link under
    /// `pin_dir` (a bpffs directory, created if missing) so that a restart
    /// can swap the program atomically instead of detaching and attaching:
    /// if a link for this interface (in this network namespace) is already
    /// pinned there, by a daemon that crashed or was killed, this program
    /// replaces the one behind it in place (`bpf_link_update`), and the pin
    /// is left as it is. The filter is then never missing and never
    /// attached twice: a crash at any step leaves the old or the new
    /// program attached and pinned.
    ///
    /// A pinned link keeps its mode: when it was attached in another mode
    /// than `mode` asks for, the program goes into it all the same, with a
    /// warning (changing the mode needs a detach; a clean stop does that).
    ///
    /// # Errors
    ///
    /// [`KernelError::Pin`] when `pin_dir` cannot be made;
    /// [`KernelError::PinnedLink`] when a pinned link cannot take this
    /// program (the program behind it then stays attached, unchanged);
    /// else as [`XdpFilter::attach`].
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: AttachMode,
        pin_dir: &Path,
    ) -> Result<Attachment, KernelError> {
        std::fs::create_dir_all(pin_dir).map_err(|source| KernelError::Pin {
            path: pin_dir.to_path_buf(),
            source,
        })?;
        self.pin_dir = Some(pin_dir.to_path_buf());
        let candidates = match mode {
            AttachMode::Skb => [AttachedMode::Skb, AttachedMode::Native],
            AttachMode::Native | AttachMode::Auto => [AttachedMode::Native, AttachedMode::Skb],
        };
        for candidate in candidates {
            let path = pin_path(pin_dir, interface, candidate);
            if std::fs::symlink_metadata(&path).is_err() {
                continue;
            }
            match self.replace_pinned(&path) {
                Ok(link) => {
                    let wanted = match mode {
                        AttachMode::Auto => true,
                        AttachMode::Native => candidate == AttachedMode::Native,
                        AttachMode::Skb => candidate == AttachedMode::Skb,
                    };
                    if !wanted {
                        tracing::warn!(interface, pinned = %candidate, requested = ?mode,
                            "the XDP link left pinned by the previous run is in {candidate} mode and keeps it: \
                             changing the mode means detaching; stop smtpguard cleanly and start it again to change it");
                    }
                    let pin = PinState::Pinned(path.clone());
                    self.pinned.push(Pinned { link, path });
                    return Ok(attachment(interface, candidate, true, pin));
                }
                Err(Replace::Dead(e)) => {
                    // It holds no program on the interface: removing it
                    // detaches nothing.
                    let cause = std::error::Error::source(&e).map(|c| c.to_string());
                    tracing::warn!(pin = %path.display(), error = %e, cause,
                        "removing a pinned XDP link that holds no program on the interface");
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(KernelError::PinnedLink {
                                step: "remove",
                                path,
                                source: source.into(),
                            })
                        }
                    }
                }
                Err(Replace::Failed(e)) => return Err(e),
            }
        }
        // Nothing attached through a pin: a crash before the pin below
        // leaves nothing attached, as before this start.
        let (link_id, attached) = self.attach_link(interface, mode)?;
        let path = pin_path(pin_dir, interface, attached);
        let pinned = self
            .program()
            .take_link(link_id)
            .ok()
            .and_then(|link| FdLink::try_from(link).ok())
            .map(|fd_link| fd_link.pin(&path));
        let pin = match pinned {
            Some(Ok(pinned)) => {
                self.pinned.push(Pinned {
                    link: pinned.into(),
                    path: path.clone(),
                });
                PinState::Pinned(path)
            }
            // Kernels without bpf_link for XDP (< 5.9), or a failed pin:
            // attach again, unpinned; the link then lives with this process.
            other => {
                let why = match other {
                    Some(Err(e)) => format!("pinning {} failed: {e}", path.display()),
                    _ => "this kernel has no bpf_link for XDP".to_string(),
                };
                tracing::warn!(interface, pin = %path.display(), "cannot pin the XDP link; a restart will briefly detach the filter");
                self.attach_link(interface, mode)?;
                PinState::NotPinned(why)
            }
        };
        Ok(attachment(interface, attached, false, pin))
    }

    /// Moves the link pinned at `path` (by an earlier run) to this program,
    /// without touching the pin: `BPF_OBJ_GET`, `BPF_OBJ_GET_INFO_BY_FD`
    /// (is it an XDP link?), `BPF_LINK_UPDATE`. Until the update the old
    /// program runs, after it this one; the pin holds the link throughout,
    /// and a failed update leaves the old program in place.
    fn replace_pinned(&mut self, path: &Path) -> Result<FdLink, Replace> {
        let failed = |step: &'static str| {
            move |source: Box<dyn std::error::Error + Send + Sync>| KernelError::PinnedLink {
                step,
                path: path.to_path_buf(),
                source,
            }
        };
        let opened = PinnedLink::from_pin(path).map_err(|e| {
            let vanished = matches!(&e, LinkError::SyscallError(SyscallError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::NotFound);
            let e = failed("open")(e.into());
            if vanished {
                Replace::Dead(e)
            } else {
                Replace::Failed(e)
            }
        })?;
        let link = XdpLink::try_from(FdLink::from(opened)).map_err(|e| match e {
            LinkError::SyscallError(_) => Replace::Failed(failed("read")(e.into())),
            // Not an XDP link: it holds no XDP program.
            _ => Replace::Dead(failed("use")(e.into())),
        })?;
        let link_id = self.program().attach_to_link(link).map_err(|e| {
            // ENOLINK: the link's interface is gone; it holds nothing.
            let detached = matches!(&e, ProgramError::SyscallError(SyscallError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::ENOLINK));
            let e = failed("swap this program into")(e.into());
            if detached {
                Replace::Dead(e)
            } else {
                Replace::Failed(e)
            }
        })?;
        // The swap is done; what follows only moves this process's own
        // reference out of the program's link list.
        let link = self
            .program()
            .take_link(link_id)
            .map_err(|e| Replace::Failed(failed("keep")(e.into())))?;
        FdLink::try_from(link).map_err(|e| Replace::Failed(failed("keep")(e.into())))
    }

    fn attach_link(
        &mut self,
        interface: &str,
        mode: AttachMode,
    ) -> Result<(aya::programs::xdp::XdpLinkId, AttachedMode), KernelError> {
        let tries: &[(XdpMode, AttachedMode)] = match mode {
            AttachMode::Auto => &[
                (XdpMode::Driver, AttachedMode::Native),
                (XdpMode::Skb, AttachedMode::Skb),
            ],
            AttachMode::Native => &[(XdpMode::Driver, AttachedMode::Native)],
            AttachMode::Skb => &[(XdpMode::Skb, AttachedMode::Skb)],
        };
        let mut last_error = None;
        for &(xdp_mode, attached) in tries {
            match self.program().attach(interface, xdp_mode) {
                Ok(link_id) => return Ok((link_id, attached)),
                Err(e) => {
                    if matches!(e, ProgramError::UnknownInterface { .. }) {
                        return Err(KernelError::Program {
                            what: format!("no interface named {interface}"),
                            source: e,
                        });
                    }
                    tracing::debug!(interface, mode = %attached, error = %e, "XDP attach failed");
                    last_error = Some((attached, e));
                }
            }
        }
        let (attached, source) = last_error.expect("at least one attempt");
        // Busy: name the program in the way, not just the errno.
        let holder = nix::net::if_::if_nametoindex(interface)
            .ok()
            .and_then(super::xdp_holder::xdp_holder);
        if let Some(holder) = holder {
            return Err(KernelError::Occupied {
                interface: interface.to_string(),
                holder: Box::new(holder),
                source,
            });
        }
        Err(KernelError::Program {
            what: format!("attaching to {interface} in {attached} mode"),
            source,
        })
    }

    /// Starts reading the program's log events (drop events). Install the
    /// log subscriber first: records go to the logger in place at this call.
    /// `None` if already taken.
    pub fn take_log(&mut self) -> Option<KernelLog> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// The SYN rate limiter's bucket table and event stream. `None` if
    /// already taken.
    pub fn take_rate_limiter(&mut self) -> Option<RateLimiter> {
        self.rate_limiter.take()
    }

    /// Runs the program once on `frame` with `BPF_PROG_TEST_RUN` and
    /// returns the XDP action (`1` drop, `2` pass). For tests and the bench.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<u32, KernelError> {
        Ok(self.test_run_repeat(frame, 1)?.0)
    }

    /// As [`XdpFilter::test_run`], `repeat` times; also returns the
    /// kernel's mean run time per packet in nanoseconds.
    pub fn test_run_repeat(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, u64), KernelError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let result = self
            .program()
            .test_run(opts)
            .map_err(|source| KernelError::Program {
                what: "BPF_PROG_TEST_RUN".into(),
                source,
            })?;
        Ok((result.return_value, result.duration.as_nanos() as u64))
    }

    /// Runs the program `repeat` times on `frame` in live-frames mode
    /// (`BPF_F_TEST_XDP_LIVE_FRAMES`, `batch_size` frames per batch): the
    /// kernel carries out each verdict as for a received frame (a dropped
    /// frame is recycled, a passed one enters the stack of the loopback
    /// device). Returns the kernel's mean time per frame in nanoseconds.
    /// For the bench.
    pub fn test_run_live(
        &mut self,
        frame: &[u8],
        repeat: u32,
        batch_size: u32,
    ) -> Result<u64, KernelError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        opts.attrs = aya::programs::TestRunAttrs::new().xdp_live_frames(batch_size);
        let result = self
            .program()
            .test_run(opts)
            .map_err(|source| KernelError::Program {
                what: "BPF_PROG_TEST_RUN (live frames)".into(),
                source,
            })?;
        Ok(result.duration.as_nanos() as u64)
    }

    /// Detaches from every interface and removes the pins (also done on drop).
    pub fn detach_all(&mut self) {
        for Pinned { link, path } in self.pinned.drain(..) {
            // Unpinned and dropped, the link's last reference goes: detached.
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(pin = %path.display(), error = %e, "removing pinned XDP link");
            }
            drop(link);
        }
        if let Some(dir) = self.pin_dir.take() {
            // Only succeeds when empty: another daemon's pins stay.
            let _ = std::fs::remove_dir(dir);
        }
        let program = self.program();
        // Unloading drops every link the program owns.
        if let Err(e) = program.unload() {
            tracing::warn!(error = %e, "detaching XDP program");
        }
    }
}

/// Why a pinned link could not take the new program.
enum Replace {
    /// It holds no program on the interface (gone, detached, not an XDP
    /// link): remove the pin and attach afresh.
    Dead(KernelError),
    /// It may still hold the old program, which stays: report the error.
    Failed(KernelError),
}

/// What an attach reports; the caller keeps the list (the daemon's status
/// shows it), so there is one record of where the program is attached.
fn attachment(
    interface: &str,
    mode: AttachedMode,
    replaced_pinned: bool,
    pin: PinState,
) -> Attachment {
    Attachment {
        interface: interface.to_string(),
        mode,
        replaced_pinned,
        pin,
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large
/// lists load there too. Newer kernels use memory cgroups and ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

/// Forwards kernel log records until the task is dropped.
pub async fn pump_kernel_log(log: KernelLog) {
    // SAFETY: the logger owns its ring buffer fd for its whole life and
    // always reports the same one; the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(log, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        tracing::warn!("cannot poll the XDP program's log buffer; drop events will not be logged");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
