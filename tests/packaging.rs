//! The packaging (packaging/, docs/packaging.md): the systemd unit verifies with
//! `systemd-analyze verify` against this build's binary and man pages, and the daemon started with
//! the unit's exact ExecStart line tells systemd it is ready (READY=1 on $NOTIFY_SOCKET) once
//! `pool-helper status` answers.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vcc_tests::*;

fn unit_path() -> PathBuf {
    repo_root().join("packaging/systemd/pool-helper.service")
}

/// The unit's ExecStart= line, split into its words (it has no quoting).
fn exec_start() -> Vec<String> {
    let unit = std::fs::read_to_string(unit_path()).unwrap();
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart= line");
    line.split_whitespace().map(str::to_string).collect()
}

/// The generated man pages plus the hook's, under `dir/usr/share/man`.
fn man_pages(dir: &Path) -> PathBuf {
    run_ok(target_bin("vcc-gen").to_str().unwrap(), &[dir]);
    let man8 = dir.join("usr/share/man/man8");
    std::fs::create_dir_all(&man8).unwrap();
    std::fs::copy(repo_root().join("packaging/man/virt-clone-cow-hook.8"), man8.join("virt-clone-cow-hook.8")).unwrap();
    dir.join("usr/share/man")
}

#[test]
fn the_unit_verifies_clean_with_its_binary_and_man_pages() {
    let t = tempfile::tempdir().unwrap();
    // A root holding the system's units, ours, and this build's pool-helper at the unit's path.
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("lib/systemd")).unwrap();
    run_ok("cp", &["-a", "/lib/systemd/system", root.join("lib/systemd/").to_str().unwrap()]);
    std::fs::copy(unit_path(), root.join("lib/systemd/system/pool-helper.service")).unwrap();
    let bin = exec_start()[0].clone();
    assert_eq!(bin, "/usr/bin/pool-helper", "the path packaging/build-deb installs it at");
    let at = root.join(bin.trim_start_matches('/'));
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::copy(target_bin("pool-helper"), &at).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--root"])
        .arg(&root)
        .arg("pool-helper.service")
        .env("MANPATH", man_pages(&t.path().join("man")))
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn the_units_exec_start_serves_and_notifies_ready() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let config = t.path().join("config.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nlisten_port = {port}\nadvertise = \"127.0.0.1\"\nlsd = false\nwatch_interval = 0\n",
            state.display()
        ),
    )
    .unwrap();
    let notify_path = t.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();

    // The unit's command line, with this build's binary for /usr/bin/pool-helper, the temporary
    // config named the way a drop-in would (Environment=POOL_HELPER_CONFIG=...).
    let argv = exec_start();
    let mut daemon = Command::new(target_bin("pool-helper"))
        .args(&argv[1..])
        .env("POOL_HELPER_CONFIG", &config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let got = notify.recv(&mut buf);
    let ready = got.as_ref().map(|n| String::from_utf8_lossy(&buf[..*n]).into_owned());
    let status = Command::new(target_bin("pool-helper"))
        .args(["--config", config.to_str().unwrap(), "--json", "status"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = daemon.kill();
    let out = daemon.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(ready.ok().as_deref(), Some("READY=1"), "after {:?}; daemon: {log}", started.elapsed());
    assert!(
        status.status.success() && String::from_utf8_lossy(&status.stdout).contains("\"masters\""),
        "status right after READY=1: {} {log}",
        String::from_utf8_lossy(&status.stderr)
    );
}
