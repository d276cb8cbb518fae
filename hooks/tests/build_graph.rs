//! The hook's rule "never calls libvirt" as a fact of the build: its normal and build
//! dependencies (what `cargo tree -e normal,build` prints for it) contain neither the libvirt
//! bindings nor the libvirt adapter nor tokio. Hermetic: it runs only cargo, offline.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

/// The package names in the hook's build graph, itself included.
fn hook_build_graph() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // The cargo running this test; else the one that built it.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--offline", "-p", "virt-clone-cow-hook", "-e", "normal,build"])
        .args(["--prefix", "none", "--format", "{p}"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    // Lines are "name vX.Y.Z [(path)] [(*)]".
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_hook_builds_without_libvirt_or_tokio() {
    let graph = hook_build_graph();
    // The graph was read: the hook and the shared core are in it.
    assert!(graph.contains("virt-clone-cow-hook"), "{graph:?}");
    assert!(graph.contains("vcc-core"), "{graph:?}");
    for forbidden in ["virt", "virt-sys", "vcc-libvirt", "tokio"] {
        assert!(!graph.contains(forbidden), "the hook's build graph contains {forbidden}: {graph:?}");
    }
}
