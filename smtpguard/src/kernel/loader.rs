//! Loads the embedded XDP program and attaches it to interfaces.
//!
//! Attachment uses a bpf_link (the kernel refuses a second program on the
//! same hook and detaches it when the daemon exits, even on a crash).

use std::fmt;
use std::path::{Path, PathBuf};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader, VerifierLogLevel,
};
use smtpguard_common::PROGRAM_NAME;

use super::{stats::Stats, sync::MapSync, KernelError, EBPF_OBJECT};

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

/// The loaded XDP program. Dropping it detaches it from every interface
/// (and removes its pins); only a crash leaves a pinned link behind, which
/// keeps the last filter in force until the next start replaces it.
pub struct XdpFilter {
    ebpf: Ebpf,
    /// Links pinned in bpffs by [`XdpFilter::attach_pinned`].
    pinned: Vec<PinnedLink>,
    /// The directory they are pinned in, removed when empty at detach.
    pin_dir: Option<PathBuf>,
}

/// Reader of the program's aya-log ring buffer; its records go to the `log`
/// crate (bridged into `tracing`). Poll it with [`pump_kernel_log`].
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

impl XdpFilter {
    /// Loads the embedded program into the kernel (not attached yet) and
    /// hands out the owners of its maps: [`MapSync`] for lists and config,
    /// [`Stats`] for counters. Fill the lists before [`XdpFilter::attach`].
    pub fn load() -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        Self::load_with(EBPF_OBJECT, None)
    }

    /// As [`XdpFilter::load`], with each LPM trie holding at most
    /// `prefixes_per_family` prefixes instead of
    /// `MAX_PREFIXES_PER_FAMILY`: for tests of what happens when a list
    /// does not fit.
    pub fn load_with_capacity(
        prefixes_per_family: u32,
    ) -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        Self::load_with(EBPF_OBJECT, Some(prefixes_per_family))
    }

    fn load_with(
        object: &[u8],
        capacity: Option<u32>,
    ) -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        if object.is_empty() {
            return Err(KernelError::NoObject);
        }
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::default());
        if let Some(capacity) = capacity {
            for name in smtpguard_common::map_names::RULES_V4
                .iter()
                .chain(&smtpguard_common::map_names::RULES_V6)
            {
                loader.map_max_entries(name, capacity);
            }
        }
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
        let hits = std::sync::Arc::new(super::hits::HitsMapping::take_from(&mut ebpf)?);
        let sync = MapSync::take_from(&mut ebpf, std::sync::Arc::clone(&hits))?;
        let stats = Stats::take_from(&mut ebpf, hits)?;
        Ok((
            XdpFilter {
                ebpf,
                pinned: Vec::new(),
                pin_dir: None,
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
        Ok(attachment(interface, attached, false))
    }

    /// Attaches like [`XdpFilter::attach`], and pins the bpf_link under
    /// `pin_dir` (a bpffs directory, created if missing) so that a restart
    /// can swap the program atomically instead of detaching and attaching:
    /// if a link for this interface (in this network namespace, same mode)
    /// is already pinned there, by a daemon that crashed or was killed, this
    /// program replaces the one behind it (`bpf_link_update`). The filter is
    /// then never missing and never attached twice.
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
        for candidate in [AttachedMode::Native, AttachedMode::Skb] {
            let path = pin_path(pin_dir, interface, candidate);
            if !path.exists() {
                continue;
            }
            let wanted = match mode {
                AttachMode::Auto => true,
                AttachMode::Native => candidate == AttachedMode::Native,
                AttachMode::Skb => candidate == AttachedMode::Skb,
            };
            if wanted {
                match self.replace_pinned(&path) {
                    Ok(pinned) => {
                        self.pinned.push(pinned);
                        return Ok(attachment(interface, candidate, true));
                    }
                    Err(e) => {
                        let cause = std::error::Error::source(&e).map(|c| c.to_string());
                        tracing::warn!(pin = %path.display(), error = %e, cause,
                            "stale pinned XDP link; attaching afresh");
                    }
                }
            }
            // A different mode was asked for, or the link is dead: drop it.
            if let Ok(old) = PinnedLink::from_pin(&path) {
                let _ = old.unpin();
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        let (link_id, attached) = self.attach_link(interface, mode)?;
        let path = pin_path(pin_dir, interface, attached);
        let pinned = self
            .program()
            .take_link(link_id)
            .ok()
            .and_then(|link| FdLink::try_from(link).ok())
            .map(|fd_link| fd_link.pin(&path));
        match pinned {
            Some(Ok(pinned)) => self.pinned.push(pinned),
            // Kernels without bpf_link for XDP (< 5.9), or a failed pin:
            // attach again, unpinned; the link then lives with this process.
            _ => {
                tracing::warn!(interface, pin = %path.display(), "cannot pin the XDP link; a restart will briefly detach the filter");
                self.attach_link(interface, mode)?;
            }
        }
        Ok(attachment(interface, attached, false))
    }

    /// Moves the link pinned at `path` (by an earlier run) to this program.
    fn replace_pinned(&mut self, path: &Path) -> Result<PinnedLink, KernelError> {
        let step = |step: &'static str| {
            move |source: Box<dyn std::error::Error + Send + Sync>| KernelError::PinnedLink {
                step,
                path: path.to_path_buf(),
                source,
            }
        };
        let pinned = PinnedLink::from_pin(path).map_err(|e| step("open")(e.into()))?;
        let fd_link: FdLink = pinned.unpin().map_err(|e| step("unpin")(e.into()))?;
        let link = XdpLink::try_from(fd_link).map_err(|e| step("take over")(e.into()))?;
        let link_id = self
            .program()
            .attach_to_link(link)
            .map_err(|e| step("attach the program to")(e.into()))?;
        let link = self
            .program()
            .take_link(link_id)
            .map_err(|e| step("keep")(e.into()))?;
        let fd_link = FdLink::try_from(link).map_err(|e| step("keep")(e.into()))?;
        fd_link.pin(path).map_err(|e| step("pin again")(e.into()))
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
        for pinned in self.pinned.drain(..) {
            // Unpinned and dropped, the link's last reference goes: detached.
            if let Err(e) = pinned.unpin() {
                tracing::warn!(error = %e, "removing pinned XDP link");
            }
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

/// What an attach reports; the caller keeps the list (the daemon's status
/// shows it), so there is one record of where the program is attached.
fn attachment(interface: &str, mode: AttachedMode, replaced_pinned: bool) -> Attachment {
    Attachment {
        interface: interface.to_string(),
        mode,
        replaced_pinned,
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
