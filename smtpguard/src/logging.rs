//! Log output: human-readable lines by default, JSON lines on request.
//!
//! Everything goes through `tracing`. Records from the XDP program (aya-log
//! through the `log` crate) are bridged into the same stream, so drop
//! events and daemon messages interleave in one log.

use tracing::level_filters::LevelFilter;

pub use crate::config::LogFormat;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Installs the global subscriber (stderr) and the `log` bridge. `RUST_LOG`
/// overrides `level` when set. Calling it twice is harmless (the second
/// call changes nothing).
pub fn init(format: LogFormat, level: LevelFilter) {
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy();
    let registry = tracing_subscriber::registry().with(filter);
    // try_init also installs the `log` bridge (tracing-subscriber's
    // default `tracing-log` feature); it fails only if already installed.
    let _ = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    // Colour only for a person at a terminal, never into
                    // journald or a log file.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}
