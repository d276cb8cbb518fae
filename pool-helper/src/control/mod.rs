//! The control socket: protocol types ([`proto`]), the client used by the CLI, and the server
//! lives in [`crate::daemon`].
pub mod client;
pub mod proto;
