//! The SMTP front door: a sans-IO server session and typed replies.

pub mod reply;

pub use reply::{EnhancedCode, Reply, ReplyParseError};
