//! pool-helper: publishes libvirt master volumes as torrents, fetches missing masters into
//! storage pools from every host that has them (BitTorrent, librqbit), verifies them as untrusted
//! input, and seeds them on.
//!
//! Modules, one concern each: [`config`], [`manifest`], [`metainfo`] (bencode read/validate/write),
//! [`verify`] (qcow2 header, raw sniff, qemu-img), [`staging`] (atomic publication), [`selinux`]
//! (fetched masters get the pool's label), [`nbd`] (a read-only NBD server), [`lazy`] (lazy
//! masters served through it), [`torrent`]
//! (the only user of librqbit), [`pools`] (where pools are: libvirt, or plain directories),
//! [`fetch`] (the pipeline), [`catalog`] (the trusted LAN catalog), [`announce`] (its
//! announcements), [`resolve`] (which master a request names), [`publish`], [`sign`] (manifest
//! signatures), [`records`], [`notify`] (systemd readiness), [`daemon`]
//! (the control socket's server; the protocol is `vcc_core::control`), [`cli`].
pub mod announce;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod fetch;
pub mod lazy;
pub mod manifest;
pub mod metainfo;
pub mod nbd;
pub mod notify;
pub mod pools;
pub mod publish;
pub mod records;
pub mod resolve;
pub use vcc_core::selinux;
pub mod sign;
pub use vcc_core::staging;
pub mod torrent;
pub mod verify;
pub mod waits;
pub mod watcher;
