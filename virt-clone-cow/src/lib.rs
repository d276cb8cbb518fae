//! virt-clone-cow: linked clones of libvirt domains.
//!
//! A linked clone is a new domain whose writable disks are qcow2 overlays backed by the original
//! domain's disk images (the *masters*). Making one costs a `virsh define` and one small file per
//! disk, whatever the master's size. The original becomes a *template*: its masters are made
//! read-only and it is marked in its libvirt metadata so that it is never started again (a
//! started template would change every clone's disk under it).
//!
//! The crate is split so that the libvirt hook and pool-helper can reuse the pieces:
//!
//! * [`xml`]: reading facts out of domain XML and the streaming rewrite that makes a clone's XML.
//! * [`metadata`]: the `urn:virt-clone-cow:1` metadata recorded on templates and clones.
//! * [`plan`]: the pure clone plan (names, MACs, overlay paths, the clone XML).
//! * [`overlay`]: creating qcow2 overlays with qemu-img (argument vectors only) or as pool volumes.
//! * [`libvirt`]: the one adapter through which every libvirt call goes.
//! * [`apply`]: carrying out a plan so that a failure leaves nothing behind.
//! * [`managed`]: which disks of a domain are overlays over which masters (for the hook and the
//!   pool-helper daemon).
//! * [`cmd::tree`]: which masters have which clones, and what each clone costs.
//!
//! ```no_run
//! use virt_clone_cow::{libvirt::Libvirt, cmd::clone::{CloneRequest, NameRequest, clone_domain}};
//! let lv = Libvirt::open(Some("qemu:///system"))?;
//! let req = CloneRequest {
//!     original: "base".into(),
//!     names: NameRequest::Auto { count: 2 },
//!     start: false,
//!     dry_run: false,
//!     disposable: false,
//! };
//! let report = clone_domain(&lv, &req)?;
//! println!("{}", serde_json::to_string_pretty(&report)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod apply;
pub mod cmd;
pub mod error;
pub mod libvirt;
pub mod lock;
pub mod managed;
pub mod metadata;
pub mod overlay;
pub mod plan;
pub mod process;
pub mod units;
pub mod watch;
pub mod xml;
