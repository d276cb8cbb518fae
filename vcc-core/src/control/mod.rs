//! The control socket between the hook, the pool-helper CLI and the pool-helper daemon
//! (`docs/control-protocol.md`): the wire types ([`proto`]) and the blocking client ([`client`]).
//! The server lives in pool-helper's daemon.
pub mod client;
pub mod proto;
