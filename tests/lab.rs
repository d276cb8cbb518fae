//! The distribution lab's small version (N = 4, 8 MiB, fast links): every method (BitTorrent
//! through pool-helper, an aria2c swarm, central HTTP, multicast) delivers an exact copy to every host, and the
//! BitTorrent fault scenarios (origin killed early and late, a host cut off and back, a peer serving
//! corrupted pieces) are survived with no partial or corrupt master ever in a pool. The lab itself is
//! `tests/lab/lab`; this runs its `ci` subcommand against the pool-helper this build made.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[test]
fn the_small_lab_delivers_exact_copies_by_every_method_and_survives_the_faults() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf();
    let exe = std::env::current_exe().expect("test binary path");
    let pool_helper = exe.parent().and_then(Path::parent).expect("target dir").join("pool-helper");
    assert!(
        pool_helper.exists(),
        "{} is missing: run `cargo build --workspace --all-targets` first",
        pool_helper.display()
    );
    let out = Command::new(repo.join("tests/lab/lab"))
        .arg("ci")
        .arg("--pool-helper")
        .arg(&pool_helper)
        .stdin(Stdio::null())
        .output()
        .expect("run tests/lab/lab ci");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the lab failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("ci: PASS"), "{stdout}");
    assert!(!stdout.lines().any(|l| l.starts_with("FAIL")), "{stdout}");
}
