//! vcc-core: what virt-clone-cow, its libvirt hook and pool-helper share. No libvirt and no tokio
//! in here: the hook links this crate and nothing that could call libvirt (a test reads
//! `cargo tree` to keep it so), and everything here is plain data, files and child processes.
//!
//! * [`xml`]: facts out of domain and volume XML, and the streaming rewrite that makes a clone's XML.
//! * [`metadata`]: the `urn:virt-clone-cow:1` metadata recorded on templates and clones.
//! * [`managed`]: which disks of a domain are overlays over which masters.
//! * [`overlay`]: creating qcow2 overlays (as files, or the volume XML for the storage API).
//! * [`control`]: the protocol between the hook, the CLI and the pool-helper daemon.
//! * [`qemu_img`]: the one place that runs qemu-img (info, create, check; force-share, timeout, limits).
//! * [`qcow2`]: the one qcow2 header reader (fields, backing file name; bounded, no panic).
//! * [`staging`]: files written outside a pool's directory and renamed in whole (nothing partial in a pool).
//! * [`protect`]: the immutable attribute that keeps a master while clones depend on it.
//! * [`process`]: running external programs from argument vectors, pipes drained while they run.
//! * [`error`], [`units`]: reporting errors on one line; human-readable sizes.
//! * [`log`]: logging set up once per program, filtered by `VIRT_CLONE_COW_LOG`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod control;
pub mod error;
pub mod layout;
pub mod log;
pub mod managed;
pub mod metadata;
pub mod overlay;
pub mod process;
pub mod protect;
pub mod qcow2;
pub mod qemu_img;
pub mod selinux;
pub mod staging;
pub mod units;
pub mod xml;
