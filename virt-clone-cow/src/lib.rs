//! virt-clone-cow: linked clones of libvirt domains.
//!
//! A linked clone is a new domain whose writable disks are qcow2 overlays backed by the original
//! domain's disk images (the *masters*). Making one costs a `virsh define` and one small file per
//! disk, whatever the master's size. The original becomes a *template*: its masters are made
//! read-only and it is marked in its libvirt metadata so that it is never started again (a
//! started template would change every clone's disk under it).
//!
//! The shared pieces (domain XML, metadata, overlays, processes) are in `vcc-core`, every libvirt
//! call in `vcc-libvirt`; this crate holds what only the CLI does:
//!
//! * [`plan`]: the pure clone plan (names, MACs, overlay paths, the clone XML).
//! * [`apply`]: carrying out a plan so that a failure leaves nothing behind.
//! * [`cmd::clone`], [`cmd::tree`]: the subcommands.
//! * [`lock`]: one run per original at a time.
//! * [`placement`]: overlays larger than their masters, or in another pool.
//! * [`holds`], [`protection`]: who needs which master; masters immutable while clones depend on them.
//! * [`pool_types`]: which storage pool types get overlays, and what the others are told.
//! * [`reflink`]: reflinked full copies (`--reflink`) on xfs and btrfs.
//! * [`sysprep`]: `--sysprep`, each clone's own guest identity (virt-sysprep on its overlays).
//!
//! ```no_run
//! use vcc_libvirt::Libvirt;
//! use virt_clone_cow::cmd::clone::{CloneRequest, NameRequest, clone_domain};
//! let lv = Libvirt::open(Some("qemu:///system"))?;
//! let req = CloneRequest {
//!     original: "base".into(),
//!     names: NameRequest::Auto { count: 2 },
//!     start: false,
//!     dry_run: false,
//!     disposable: false,
//!     overlay: Default::default(),
//!     reflink: false,
//!     sysprep: false,
//! };
//! let report = clone_domain(&lv, &req)?;
//! println!("{}", serde_json::to_string_pretty(&report)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod apply;
pub mod cmd;
pub mod holds;
pub mod lock;
pub mod multi;
pub mod placement;
pub mod plan;
pub mod pool_types;
pub mod protection;
pub mod reflink;
pub mod sysprep;
