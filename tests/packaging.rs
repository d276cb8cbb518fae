//! The packaging (packaging/, docs/packaging.md): the systemd unit verifies with
//! `systemd-analyze verify` against this build's binary and man pages, and the daemon started with
//! the unit's exact ExecStart line tells systemd it is ready (READY=1 on $NOTIFY_SOCKET) once
//! `pool-helper status` answers.

use std::os::unix::fs::PermissionsExt;
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

const HOOK: &str = "/etc/libvirt/hooks/qemu.d/50-virt-clone-cow";
/// The same hook for Xen through libvirt's libxl driver (docs/xen.md).
const LIBXL_HOOK: &str = "/etc/libvirt/hooks/libxl.d/50-virt-clone-cow";
const STATE: &str = "/var/lib/pool-helper";
/// The hook's settings, a conffile of the package; tests/hook.rs writes its own there.
const HOOK_CONF: &str = "/etc/virt-clone-cow/hook.toml";

fn apt_get(args: &[&str]) {
    // Never a conffile prompt (stdin is closed): a hook.toml another test wrote meanwhile is kept.
    let o = Command::new("apt-get")
        .args(["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "apt-get {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Puts the machine back as it was: the package purged, the hook that was there (the one
/// tests/hook.rs installs with packaging/hook-install) and its settings back in place, libvirt
/// reloaded.
struct Machine {
    hook: Option<Vec<u8>>,
    libxl_hook: Option<Vec<u8>>,
    hook_conf: Option<Vec<u8>>,
}

impl Machine {
    /// Takes the hook's settings out of the way, so that the package meets a host without them (a
    /// conffile already there, not the package's, makes dpkg ask).
    fn take() -> Machine {
        let hook_conf = std::fs::read(HOOK_CONF).ok();
        if hook_conf.is_some() {
            std::fs::remove_file(HOOK_CONF).expect("move the tests' hook.toml aside");
        }
        Machine { hook: std::fs::read(HOOK).ok(), libxl_hook: std::fs::read(LIBXL_HOOK).ok(), hook_conf }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if Command::new("dpkg").args(["-s", "virt-clone-cow"]).output().is_ok_and(|o| o.status.success()) {
            let _ = Command::new("apt-get").args(["purge", "-y", "virt-clone-cow"]).output();
        }
        for (path, bytes) in [(HOOK, self.hook.take()), (LIBXL_HOOK, self.libxl_hook.take())] {
            let Some(bytes) = bytes else { continue };
            let _ = std::fs::create_dir_all(Path::new(path).parent().unwrap_or(Path::new("/")));
            let _ = std::fs::write(path, bytes);
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
        }
        if let Some(bytes) = self.hook_conf.take() {
            let _ = std::fs::create_dir_all("/etc/virt-clone-cow");
            let _ = std::fs::write(HOOK_CONF, bytes);
        }
        let _ = Command::new(repo_root().join("packaging/reload-libvirt")).output();
    }
}

/// The Done-when sequence of issue 12: build the package, install it, find the man page, the
/// completion and the hook, purge it, and a plain domain still starts. It replaces the hook
/// tests/hook.rs installs (the test binaries run one at a time) and puts it back.
#[test]
fn the_package_installs_its_pieces_and_purges_to_a_clean_host() {
    ensure_libvirtd();
    let _machine = Machine::take();
    let out = run_ok(repo_root().join("packaging/build-deb").to_str().unwrap(), &[] as &[&str]);
    let deb = out.lines().last().unwrap().to_string();
    assert!(deb.ends_with(".deb") && deb.contains("/target/debian/"), "last line: {deb}");
    apt_get(&["install", "-y", &deb]);

    run_ok("man", &["-w", "virt-clone-cow"]);
    run_ok("man", &["-w", "virt-clone-cow-hook"]);
    let completion = "/usr/share/bash-completion/completions/virt-clone-cow";
    let words = run_ok(
        "bash",
        &[
            "-c",
            &format!(
                "source {completion}; f=$(complete -p virt-clone-cow | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p'); \
                 COMP_WORDS=(virt-clone-cow --ori); COMP_CWORD=1; COMP_LINE='virt-clone-cow --ori'; \
                 COMP_POINT=${{#COMP_LINE}}; \"$f\" virt-clone-cow --ori virt-clone-cow; echo \"${{COMPREPLY[@]}}\""
            ),
        ],
    );
    assert_eq!(words.trim(), "--original", "virt-clone-cow --ori<TAB>");
    // The hook is a copy (AppArmor: a link into /usr/libexec is not under /etc/libvirt/hooks/**),
    // and every configure, an upgrade's too, copies the packaged binary again.
    let packaged = "/usr/libexec/virt-clone-cow/virt-clone-cow-hook";
    // The same in libxl.d, for Xen through libvirt's libxl driver (docs/xen.md).
    let assert_hook_is_the_packaged_binary = || {
        for hook in [HOOK, LIBXL_HOOK] {
            let meta = std::fs::symlink_metadata(hook).unwrap_or_else(|e| panic!("{hook} is installed: {e}"));
            assert!(meta.file_type().is_file(), "{hook} is a regular file, not a link");
            assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
            assert_eq!(sha256(hook), sha256(packaged), "{hook} is the packaged binary");
        }
    };
    assert_hook_is_the_packaged_binary();
    std::fs::write(HOOK, b"#!/bin/sh\nexit 0\n").unwrap();
    apt_get(&["install", "--reinstall", "-y", &deb]);
    assert_hook_is_the_packaged_binary();
    run_ok("/usr/bin/virt-clone-cow", &["--version"]);
    run_ok("/usr/bin/pool-helper", &["--version"]);
    assert!(Path::new("/etc/pool-helper/config.toml").is_file());
    assert!(Path::new(HOOK_CONF).is_file(), "the hook's settings are installed");

    // The main job with the installed binaries: /usr/bin/virt-clone-cow clones a domain on the
    // local libvirt and starts the clone (libvirt runs the installed hook at that start), its disk
    // an overlay on the template's master.
    let env = TestEnv::new("pkg");
    let tmpl_master = env.in_pool("tmpl.raw");
    let tmpl = raw_domain(&env, "-tmpl", &tmpl_master);
    let clone = env.name("-c1");
    run_ok("/usr/bin/virt-clone-cow", &["--original", tmpl.as_str(), "--name", clone.as_str(), "--start"]);
    assert_eq!(domstate(&clone), "running", "the clone made by the installed virt-clone-cow runs");
    let disks = facts(&clone).disks;
    let vda = disks.iter().find(|d| d.target.as_deref() == Some("vda")).expect("the clone has a vda");
    let vcc_core::xml::DiskSource::File(overlay) = &vda.source else { panic!("a file overlay: {vda:?}") };
    let info = qemu_img_info(overlay, "qcow2");
    assert_eq!(info["backing-filename"].as_str(), Some(tmpl_master.as_str()), "{overlay}: an overlay on the master");
    virsh_ok(&["destroy", &clone]);

    // State as the daemon leaves it, and a master in a pool: purge removes the one, not the other.
    let master = env.in_pool("master.raw");
    std::fs::write(&master, b"master").unwrap();
    std::fs::create_dir_all(format!("{STATE}/masters")).unwrap();
    std::fs::write(format!("{STATE}/masters/x.json"), b"{}").unwrap();
    std::fs::create_dir_all(format!("{STATE}/librqbit")).unwrap();
    apt_get(&["purge", "-y", "virt-clone-cow"]);
    assert!(std::fs::symlink_metadata(HOOK).is_err(), "the hook is gone");
    assert!(std::fs::symlink_metadata(LIBXL_HOOK).is_err(), "the libxl hook is gone");
    assert!(!Path::new(STATE).exists() && !Path::new("/etc/pool-helper").exists(), "our state is gone");
    assert!(!Path::new(HOOK_CONF).exists(), "purge removes the hook's settings");
    assert_eq!(std::fs::read(&master).unwrap(), b"master", "a master is never removed");

    let name = env.name("-plain");
    define_xml(&DomainSpec::new(&name, false).xml());
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    virsh_ok(&["destroy", &name]);
}
