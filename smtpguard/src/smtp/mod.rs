//! The SMTP front door: a sans-IO server session and typed replies.

pub mod command;
pub mod data;
pub mod reply;

pub use command::{BodyType, ForwardPath, MailParams, Mailbox, ReversePath};
pub use data::{BareLfPolicy, COMMAND_LINE_MAX, DATA_LINE_MAX};
pub use reply::{EnhancedCode, Reply, ReplyParseError};
