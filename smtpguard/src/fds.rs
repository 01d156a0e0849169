//! File descriptors: the process's limit, the share of it sessions may
//! use, and the spare descriptor that lets an accept loop answer even when
//! the limit is reached.
//!
//! Each SMTP session holds [`FDS_PER_SESSION`] descriptors at most (its
//! client socket, plus the upstream socket in upstream mode or the message
//! file being written in spool mode). The daemon raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start ([`raise_limit`]) and keeps
//! [`RESERVE`] descriptors beyond those already open for everything else
//! (control socket connections, the metrics endpoint, list and certificate
//! files, the XDP program's maps): [`sessions_that_fit`] says how many
//! sessions the rest allows.

use std::{fs::File, io, num::NonZeroUsize, os::fd::OwnedFd};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors one SMTP session holds at most: its client socket and the
/// upstream connection (upstream mode) or the message file (spool mode).
pub const FDS_PER_SESSION: u64 = 2;

/// Descriptors kept free of sessions for the control socket (at most
/// [`crate::control::server::MAX_CONNECTIONS`]), the metrics endpoint (at
/// most [`crate::metrics::MAX_CONNECTIONS`]), list and certificate files,
/// the XDP program and its maps, and the spare descriptors of the accept
/// loops.
pub const RESERVE: u64 = 128;

/// The file-descriptor limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// getrlimit/setrlimit failed.
    #[error("cannot {action} the file-descriptor limit (RLIMIT_NOFILE)")]
    Limit {
        /// `"read"` or `"raise"`.
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// `server.max_connections` sessions do not fit under the limit.
    #[error(
        "server.max_connections = {max} needs up to {} file descriptors ({FDS_PER_SESSION} per \
         session) plus {RESERVE} in reserve beyond the {open} open, but the file-descriptor \
         limit (RLIMIT_NOFILE) is {limit}: raise it (LimitNOFILE= in the systemd unit) or lower \
         server.max_connections to at most {fit}",
        max * FDS_PER_SESSION
    )]
    TooManyConnections {
        /// `server.max_connections`.
        max: u64,
        /// Descriptors open at the check.
        open: u64,
        /// The soft limit (already raised to the hard one).
        limit: u64,
        /// The sessions that fit.
        fit: u64,
    },
}

/// The cap on sessions the descriptors impose, given `max_connections`
/// (`None`: unlimited) and `open` descriptors already open under `limit`:
/// `Ok(None)` when `max_connections` fits (it is the cap),
/// `Ok(Some(n))` when it is unlimited (the descriptors cap it at `n`).
///
/// # Errors
///
/// [`FdError::TooManyConnections`] when `max_connections` does not fit,
/// or (unlimited) not even one session does.
pub fn session_cap(
    max_connections: Option<NonZeroUsize>,
    limit: u64,
    open: u64,
) -> Result<Option<NonZeroUsize>, FdError> {
    let fit = sessions_that_fit(limit, open);
    let too_many = |max: u64| FdError::TooManyConnections {
        max,
        open,
        limit,
        fit,
    };
    match max_connections {
        Some(max) if max.get() as u64 > fit => Err(too_many(max.get() as u64)),
        Some(_) => Ok(None),
        None => match NonZeroUsize::new(usize::try_from(fit).unwrap_or(usize::MAX)) {
            Some(cap) => Ok(Some(cap)),
            None => Err(too_many(1)),
        },
    }
}

/// The soft and hard `RLIMIT_NOFILE`, before and after [`raise_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit the process was started with.
    pub soft_before: u64,
    /// The soft limit now (the hard limit, once raised).
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd starts
/// services with a soft limit of 1024, too few for a busy gateway).
///
/// # Errors
///
/// [`FdError::Limit`] when the limit cannot be read or set.
pub fn raise_limit() -> Result<Limit, FdError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| FdError::Limit {
        action: "read",
        source: e.into(),
    })?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| FdError::Limit {
            action: "raise",
            source: e.into(),
        })?;
    }
    Ok(Limit {
        soft_before: soft,
        soft: soft.max(hard),
        hard,
    })
}

/// Descriptors open in this process now (`/proc/self/fd`), or `None` if
/// that cannot be read.
pub fn open_now() -> Option<u64> {
    // The directory's own descriptor is listed too.
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1) as u64,
    )
}

/// How many sessions fit under a soft limit of `limit` descriptors when
/// `open` are already open: what is left after [`RESERVE`], divided by
/// [`FDS_PER_SESSION`].
pub fn sessions_that_fit(limit: u64, open: u64) -> u64 {
    limit.saturating_sub(open).saturating_sub(RESERVE) / FDS_PER_SESSION
}

/// One descriptor held open so that it can be given up when accept(2)
/// fails for want of descriptors (EMFILE, ENFILE): the loop closes it,
/// accepts the waiting client on the freed slot, answers it and takes the
/// spare back. Without it, a client that cannot be served would get
/// silence until a descriptor frees up.
#[derive(Debug)]
pub struct Spare(Option<OwnedFd>);

impl Spare {
    /// Opens the spare (`/dev/null`); empty if that fails now.
    pub fn new() -> Spare {
        let mut spare = Spare(None);
        spare.refill();
        spare
    }

    /// Whether the spare is held.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// Gives the spare up (closes it); `true` if one was held.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the spare back if it is not held (fails quietly while the
    /// process is still out of descriptors; call again later).
    pub fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok().map(OwnedFd::from);
        }
    }
}

impl Default for Spare {
    fn default() -> Spare {
        Spare::new()
    }
}

/// Whether an accept(2) error means the process or the system is out of
/// descriptors.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_fit_after_the_reserve() {
        assert_eq!(sessions_that_fit(1024, 20), (1024 - 20 - RESERVE) / 2);
        assert_eq!(sessions_that_fit(100, 20), 0);
        assert_eq!(sessions_that_fit(10, 20), 0);
    }

    #[test]
    fn max_connections_must_fit_and_unlimited_is_capped() {
        let open = 30;
        let fit = sessions_that_fit(1024, open);
        assert_eq!(
            session_cap(NonZeroUsize::new(100), 1024, open).unwrap(),
            None
        );
        assert_eq!(
            session_cap(None, 1024, open).unwrap(),
            NonZeroUsize::new(fit as usize)
        );
        // The systemd default: 1000 sessions in upstream mode
        // under a soft limit of 1024.
        let e = session_cap(NonZeroUsize::new(1000), 1024, open).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "server.max_connections = 1000 needs up to 2000 file descriptors (2 per session) \
                 plus 128 in reserve beyond the 30 open, but the file-descriptor limit \
                 (RLIMIT_NOFILE) is 1024: raise it (LimitNOFILE= in the systemd unit) or lower \
                 server.max_connections to at most {fit}"
            )
        );
        assert!(session_cap(None, 100, open).is_err());
    }

    #[test]
    fn the_spare_is_released_and_refilled() {
        let mut spare = Spare::new();
        assert!(spare.is_held());
        assert!(spare.release());
        assert!(!spare.release());
        spare.refill();
        assert!(spare.is_held());
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
