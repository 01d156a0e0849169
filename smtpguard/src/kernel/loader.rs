//! Loads the embedded XDP program and attaches it to interfaces.
//!
//! Attachment uses a bpf_link (the kernel refuses a second program on the
//! same hook and detaches it when the daemon exits, even on a crash).

use std::fmt;

use aya::{
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader, VerifierLogLevel,
};
use smtpguard_common::PROGRAM_NAME;

use super::{stats::Stats, sync::MapSync, EBPF_OBJECT};

/// Errors from loading or attaching the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// This binary was built without the eBPF object.
    #[error("this smtpguard binary was built without its XDP program; build it with `cargo xtask build`")]
    NoObject,
    /// The kernel or aya rejected the object (verifier, BTF, map creation).
    #[error(
        "loading the XDP program into the kernel failed (needs root or CAP_BPF+CAP_NET_ADMIN)"
    )]
    Load(#[source] aya::EbpfError),
    /// The verifier or the attach call failed.
    #[error("XDP program: {what}")]
    Program {
        /// What was being done, e.g. `attaching to eth0 in native mode`.
        what: String,
        #[source]
        source: ProgramError,
    },
    /// A map the program must have is missing or has the wrong type.
    #[error("XDP object has no usable map {0}")]
    Map(&'static str),
}

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
}

/// The loaded XDP program. Dropping it detaches it from every interface.
pub struct XdpFilter {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
}

/// Reader of the program's aya-log ring buffer; its records go to the `log`
/// crate (bridged into `tracing`). Poll it with [`pump_kernel_log`].
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

impl XdpFilter {
    /// Loads the embedded program into the kernel (not attached yet) and
    /// hands out the owners of its maps: [`MapSync`] for lists and config,
    /// [`Stats`] for counters. Fill the lists before [`XdpFilter::attach`].
    pub fn load() -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        Self::load_object(EBPF_OBJECT)
    }

    /// As [`XdpFilter::load`], from an object given in memory (tests, bench).
    pub fn load_object(object: &[u8]) -> Result<(XdpFilter, MapSync, Stats), KernelError> {
        if object.is_empty() {
            return Err(KernelError::NoObject);
        }
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .verifier_log_level(VerifierLogLevel::default())
            .load(object)
            .map_err(KernelError::Load)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(KernelError::Map("(program smtpguard)"))?
            .try_into()
            .map_err(|source| KernelError::Program {
                what: "wrong program type".into(),
                source,
            })?;
        program.load().map_err(|source| KernelError::Program {
            what: "verifier rejected it".into(),
            source,
        })?;
        let sync = MapSync::take_from(&mut ebpf)?;
        let stats = Stats::take_from(&mut ebpf)?;
        Ok((
            XdpFilter {
                ebpf,
                attachments: Vec::new(),
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
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<Attachment, KernelError> {
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
                Ok(_link) => {
                    let attachment = Attachment {
                        interface: interface.to_string(),
                        mode: attached,
                    };
                    self.attachments.push(attachment.clone());
                    return Ok(attachment);
                }
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

    /// Interfaces the program is attached to.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
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

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        let program = self.program();
        // Unloading drops every link the program owns.
        if let Err(e) = program.unload() {
            tracing::warn!(error = %e, "detaching XDP program");
        }
        self.attachments.clear();
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
