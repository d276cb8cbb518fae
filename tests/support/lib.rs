//! The one test support crate (package `vcc-tests`) of the integration tier (docs/testing.md):
//! used by this package's test binaries (`tests/*.rs`: libvirtd, QEMU guests, the hook, the lab)
//! and, as a dev-dependency, by pool-helper's (`pool-helper/tests/*.rs`: swarms, peers, faults).
//!
//! One module per concern, everything re-exported at the top so a test imports what it uses:
//! - [`process`]: running programs from argument vectors, bounded waits, this build's binaries;
//! - [`files`]: hashes, modes, images made with qemu-img, pseudo-random data, manifests;
//! - [`guest`]: real bootable guests built from Debian's packages, booted and timed;
//! - [`libvirt`]: virsh, test domains, [`TestEnv`] (a pool and work directory removed on drop),
//!   [`Pool`] (a temporary dir pool);
//! - [`cli`]: the `virt-clone-cow` binary;
//! - [`pool_helpers`]: pool-helper instances ([`PoolHelper`], [`Instance`]) and their control socket;
//! - [`peers`]: third-party BitTorrent clients (aria2c, python3-libtorrent through `lt.py`);
//! - [`hostile_peer`]: a BitTorrent peer that speaks the wire protocol wrongly on purpose;
//! - [`netns`]: hosts as network namespaces ([`Lan`]), made by `tests/lab/netlab.py`, the
//!   harness the lab and swarm-bench use too;
//! - [`bed`]: several libvirt hosts on this machine ([`Bed`]), made by `tests/bed/bed`.
//!
//! External programs always run from argument vectors.

#![allow(clippy::unwrap_used)]

pub mod bed;
pub mod cli;
pub mod files;
pub mod guest;
pub mod hostile_peer;
pub mod libvirt;
pub mod netns;
pub mod peers;
pub mod pool_helpers;
pub mod process;

pub use bed::*;
pub use cli::*;
pub use files::*;
pub use guest::*;
pub use hostile_peer::{attack, misbehaviours, rounds, Act, HostilePeer};
pub use libvirt::*;
pub use netns::*;
pub use peers::*;
pub use pool_helpers::*;
pub use process::*;
