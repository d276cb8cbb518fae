//! pool-helper: publishes libvirt master volumes as torrents, fetches missing masters from every
//! host that has them, verifies them as untrusted input, and seeds them on.
pub mod config;
pub mod manifest;
pub mod metainfo;
pub mod staging;
pub mod torrent;
pub mod verify;
