//! The libvirt hook through real virsh and a real libvirtd: the hook is installed in
//! /etc/libvirt/hooks/qemu.d with packaging/hook-install, and every test drives it by defining and
//! starting domains, as any libvirt client would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use vcc_tests::{
    bios_domain_type, clear_immutable, cli_path, domstate, install_built_hook, qemu_img_info, run, sha256, target_bin,
    virsh, virsh_ok, PoolHelper, URI,
};

const HOOK_CONF: &str = "/etc/virt-clone-cow/hook.toml";
/// The installed hook asks the pool-helper daemon the tests start here (state dir of that daemon).
const HOOK_DAEMON_STATE: &str = "/run/vcc-tests-hookd";
/// How long the hook waits for a missing master in these tests.
const FETCH_TIMEOUT_S: u64 = 10;
/// No daemon listens here: fetches fail at once with a reason.
const NO_DAEMON_SOCKET: &str = "/run/vcc-tests-no-daemon.sock";

/// Where every test here keeps its masters and overlays: not a storage pool, so the hook's settings
/// allow it (`allowed_dirs`).
const TEST_DIR: &str = "/var/lib/vcc-tests";

/// Installs the freshly built hook once per test run, with a config pointing at the tests' daemon,
/// a short fetch bound, and the tests' directory allowed.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::fs::create_dir_all("/etc/virt-clone-cow").expect("config dir");
        std::fs::write(
            HOOK_CONF,
            format!("control_socket = \"{HOOK_DAEMON_STATE}/control.sock\"\nfetch_timeout = {FETCH_TIMEOUT_S}\nconnect_timeout = 1\nprogress_interval = 2\nallowed_dirs = [\"{TEST_DIR}\"]\n"),
        )
        .expect("hook config");
        install_built_hook();
    });
}

/// A directory of masters and overlays plus every domain named with this prefix; all removed on drop.
struct Env {
    prefix: String,
    dir: PathBuf,
}

impl Env {
    fn new(test: &str) -> Env {
        install_hook();
        let prefix = format!("vcct-hook-{test}-{}", std::process::id());
        let dir = PathBuf::from(TEST_DIR).join(&prefix);
        clear_immutable(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        Env { prefix, dir }
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    fn master(&self, file: &str, format: &str) -> String {
        let p = self.path(file);
        let o = run("qemu-img", &["create", "-q", "-f", format, &p, "64M"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        p
    }

    fn define(&self, xml: &str) {
        let f = self.dir.join(format!(
            "def-{}.xml",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ));
        std::fs::write(&f, xml).expect("write xml");
        virsh_ok(&["define", f.to_str().expect("utf-8")]);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let list = virsh(&["list", "--all", "--name"]);
        for n in String::from_utf8_lossy(&list.stdout).lines().map(str::trim).filter(|n| n.starts_with(&self.prefix)) {
            let _ = virsh(&["destroy", n]);
            let _ = virsh(&["undefine", "--nvram", n]);
            let _ = virsh(&["undefine", n]);
        }
        // Pools named after this test (virt-install makes one for the directory of a disk).
        let pools = virsh(&["pool-list", "--all", "--name"]);
        for p in String::from_utf8_lossy(&pools.stdout).lines().map(str::trim).filter(|p| p.starts_with(&self.prefix)) {
            let _ = virsh(&["pool-destroy", p]);
            let _ = virsh(&["pool-undefine", p]);
        }
        clear_immutable(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A BIOS guest with one disk: `disk` is the inside of `<disk>`; `metadata` goes in `<metadata>`.
fn domain_xml(name: &str, disk: &str, metadata: &str) -> String {
    let esc = name.replace('&', "&amp;").replace('<', "&lt;");
    format!(
        "<domain type='{}'><name>{esc}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <metadata>{metadata}</metadata>\
         <os><type arch='x86_64'>hvm</type></os><devices>\
         <disk type='file' device='disk'>{disk}<target dev='vda' bus='virtio'/></disk>\
         <graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices></domain>",
        bios_domain_type()
    )
}

fn backed_disk(overlay: &str, master: &str, master_format: &str) -> String {
    format!(
        "<driver name='qemu' type='qcow2'/><source file='{overlay}'/>\
         <backingStore type='file'><format type='{master_format}'/><source file='{master}'/></backingStore>"
    )
}

fn qemu_img_info_qcow2(path: &str) -> serde_json::Value {
    qemu_img_info(path, "qcow2")
}

fn inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").ino()
}

#[test]
fn start_creates_the_overlay_named_by_a_user_written_backing_store() {
    let env = Env::new("create");
    let master = env.master("base.raw", "raw");
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    env.define(&domain_xml(&name, &backed_disk(&overlay, &master, "raw"), ""));
    assert!(!Path::new(&overlay).exists());

    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    let info = qemu_img_info_qcow2(&overlay);
    assert_eq!(info["full-backing-filename"].as_str(), Some(master.as_str()));
    assert_eq!(info["backing-filename-format"].as_str(), Some("raw"));
    assert_eq!(info["format-specific"]["data"]["compat"].as_str(), Some("1.1"));
    assert_eq!(info["virtual-size"].as_u64(), Some(64 << 20));

    // A second start (the overlay now holds the guest's data) must not recreate it.
    let ino = inode(&overlay);
    virsh_ok(&["destroy", &name]);
    virsh_ok(&["start", &name]);
    assert_eq!(inode(&overlay), ino, "the existing overlay was replaced");
}

#[test]
fn the_hook_makes_overlays_in_the_layout_its_settings_name() {
    let env = Env::new("layout");
    let master = env.master("base.raw", "raw");
    let name = env.name("vm");
    let conf = env.path("hook.toml");
    std::fs::write(&conf, format!("allowed_dirs = [\"{TEST_DIR}\"]\noverlay_layout = \"2m-l2\"\n")).expect("conf");
    let default = vcc_core::layout::OverlayLayout::DEFAULT;
    let cases = [
        ("set.qcow2", Some(conf.as_str()), (2 << 20, true)),
        // The tests' installed hook.toml sets no overlay_layout.
        ("unset.qcow2", None, (default.cluster_size as u64, default.extended_l2)),
    ];
    for (file, conf, want) in cases {
        let overlay = env.path(file);
        let o = hook_direct_with(
            &name,
            "prepare",
            "begin",
            &domain_xml(&name, &backed_disk(&overlay, &master, "raw"), ""),
            conf,
        );
        assert!(o.status.success(), "{file}: {}", String::from_utf8_lossy(&o.stderr));
        let info = qemu_img_info_qcow2(&overlay);
        let got = (
            info["cluster-size"].as_u64().unwrap_or(0),
            info["format-specific"]["data"]["extended-l2"].as_bool().unwrap_or(false),
        );
        assert_eq!(got, want, "{file}: (cluster size, extended L2)\n{info:#}");
        assert_eq!(info["full-backing-filename"].as_str(), Some(master.as_str()));
    }
}

#[test]
fn a_backing_store_naming_a_host_file_or_an_overlay_in_etc_fails_the_start_and_nothing_is_made() {
    let env = Env::new("etc");
    // The master is a host file; the overlay would go where the tests' settings allow.
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    env.define(&domain_xml(&name, &backed_disk(&overlay, "/etc/passwd", "raw"), ""));
    let o = virsh(&["start", &name]);
    assert!(!o.status.success(), "a domain over /etc/passwd started");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refusing to make the overlay of disk vda: master '/etc/passwd' is in /etc"),
        "says what is wrong: {err}"
    );
    assert!(
        err.contains("add \"/etc\" to `allowed_dirs` in /etc/virt-clone-cow/hook.toml"),
        "names the setting: {err}"
    );
    assert!(!Path::new(&overlay).exists(), "no overlay was made");
    assert_eq!(domstate(&name), "shut off");

    // A good master, but the overlay in /etc.
    let master = env.master("base.raw", "raw");
    let in_etc = format!("/etc/{}.qcow2", env.name("ov"));
    let name2 = env.name("vm2");
    env.define(&domain_xml(&name2, &backed_disk(&in_etc, &master, "raw"), ""));
    let o = virsh(&["start", &name2]);
    let made = Path::new(&in_etc).exists();
    let _ = std::fs::remove_file(&in_etc);
    assert!(!o.status.success(), "a domain with its overlay in /etc started");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("overlay '{in_etc}' is in /etc")), "says what is wrong: {err}");
    assert!(err.contains("add \"/etc\" to `allowed_dirs` in "), "names the setting: {err}");
    assert!(!made, "an overlay was made in /etc");
    assert_eq!(domstate(&name2), "shut off");
}

#[test]
fn a_template_refuses_to_start_with_a_clear_message() {
    let env = Env::new("template");
    let master = env.master("t.qcow2", "qcow2");
    let name = env.name("tmpl");
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:template><vcc:master target='vda' path='{master}' format='qcow2'/></vcc:template></vcc:cow>"
    );
    env.define(&domain_xml(&name, &format!("<driver name='qemu' type='qcow2'/><source file='{master}'/>"), &md));
    let o = virsh(&["start", &name]);
    assert!(!o.status.success(), "a template started");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is a virt-clone-cow template"), "{err}");
    assert!(err.contains("virt-clone-cow --original"), "the message says what to do: {err}");
    assert_eq!(domstate(&name), "shut off");
}

#[test]
fn a_missing_master_without_a_daemon_fails_within_the_bound_and_names_the_master() {
    let env = Env::new("nodaemon");
    let master = env.path("absent.qcow2");
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{overlay}'><vcc:master path='{master}' format='qcow2' sha256='{}'/></vcc:disk></vcc:clone></vcc:cow>",
        "ab".repeat(32)
    );
    let conf = env.path("hook.toml");
    std::fs::write(&conf, format!("control_socket = \"{NO_DAEMON_SOCKET}\"\nfetch_timeout = 5\nconnect_timeout = 1\n"))
        .expect("conf");
    let t0 = Instant::now();
    let o = hook_direct_with(
        &name,
        "prepare",
        "begin",
        &domain_xml(&name, &backed_disk(&overlay, &master, "qcow2"), &md),
        Some(&conf),
    );
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&master), "the error names the master: {err}");
    assert!(err.contains("pool-helper serve"), "the error gives the reason and what to do: {err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!Path::new(&overlay).exists(), "no overlay is made without its master");
}

#[test]
fn a_missing_master_with_no_manifest_says_so() {
    let env = Env::new("nomanifest");
    let master = env.path("absent.raw");
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    env.define(&domain_xml(&name, &backed_disk(&overlay, &master, "raw"), ""));
    let o = virsh(&["start", &name]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&master) && err.contains("names no manifest or identity"), "{err}");
    assert!(!Path::new(&overlay).exists());
}

/// Writes a recognisable 64 KiB at `offset` of a qcow2 image nobody has open.
fn write_pattern(path: &str, offset: &str) {
    let o = run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P 0xab {offset} 64k"), path]);
    assert!(
        o.status.success(),
        "qemu-io write {path}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Whether the pattern of [`write_pattern`] is there (read even while a QEMU has the image open).
fn has_pattern(path: &str, offset: &str) -> bool {
    run("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", &format!("read -P 0xab {offset} 64k"), path]).status.success()
}

/// A template over `base.qcow2` and a disposable clone of it made by virt-clone-cow (not started).
fn disposable_clone(env: &Env) -> (String, String, String) {
    let master = env.master("base.qcow2", "qcow2");
    let name = env.name("vm");
    let tmpl = env.name("tmpl");
    env.define(&domain_xml(&tmpl, &format!("<driver name='qemu' type='qcow2'/><source file='{master}'/>"), ""));
    let o =
        run(cli_path().to_str().expect("utf-8"), &["-c", URI, "--original", &tmpl, "--name", &name, "--disposable"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let overlay = env.path(&format!("{name}-vda.qcow2"));
    (name, overlay, master)
}

#[test]
fn a_disposable_clone_starts_fresh_each_time() {
    let env = Env::new("disposable");
    let (name, overlay, master) = disposable_clone(&env);
    // What the guest "wrote" before its first start (as after a host crash: libvirt never ran
    // release) is gone when it starts.
    write_pattern(&overlay, "0");
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    assert!(!has_pattern(&overlay, "0"), "prepare must discard a disposable clone's overlay");
    virsh_ok(&["destroy", &name]);
    write_pattern(&overlay, "0");
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    assert!(!has_pattern(&overlay, "0"), "the second start is fresh too");
    let info = qemu_img_info_qcow2(&overlay);
    assert_eq!(info["full-backing-filename"].as_str(), Some(master.as_str()));
}

#[test]
fn a_managedsaved_disposable_clone_resumes_onto_its_overlay() {
    let env = Env::new("dispmsave");
    let (name, overlay, _master) = disposable_clone(&env);
    virsh_ok(&["start", &name]);
    let ino = inode(&overlay);
    virsh_ok(&["managedsave", &name]);
    assert_eq!(domstate(&name), "shut off");
    assert!(Path::new(&overlay).exists(), "release end discarded the overlay of a saved guest");
    assert_eq!(inode(&overlay), ino);
    // The saved guest's disk state, which the resumed RAM relies on.
    write_pattern(&overlay, "32M");
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    assert_eq!(inode(&overlay), ino);
    assert!(has_pattern(&overlay, "32M"), "the start that resumed the managed save got a blank disk");
    // The next plain start is fresh again.
    virsh_ok(&["destroy", &name]);
    virsh_ok(&["start", &name]);
    assert!(!has_pattern(&overlay, "32M"));
}

#[test]
fn a_saved_disposable_clone_restores_onto_its_overlay() {
    let env = Env::new("dispsave");
    let (name, overlay, _master) = disposable_clone(&env);
    virsh_ok(&["start", &name]);
    let ino = inode(&overlay);
    let image = env.path("vm.save");
    virsh_ok(&["save", &name, &image]);
    assert!(Path::new(&overlay).exists(), "release end discarded the overlay of a saved guest");
    write_pattern(&overlay, "32M");
    virsh_ok(&["restore", &image]);
    assert_eq!(domstate(&name), "running");
    assert_eq!(inode(&overlay), ino);
    assert!(has_pattern(&overlay, "32M"), "the restore got a blank disk");
}

#[test]
fn an_unmanaged_domain_is_left_alone() {
    let env = Env::new("unmanaged");
    let disk = env.master("plain.qcow2", "qcow2");
    let name = env.name("vm");
    env.define(&domain_xml(&name, &format!("<driver name='qemu' type='qcow2'/><source file='{disk}'/>"), ""));
    let before = virsh_ok(&["dumpxml", "--inactive", &name]);
    let files_before: Vec<_> = std::fs::read_dir(&env.dir).expect("dir").flatten().map(|e| e.file_name()).collect();
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    virsh_ok(&["destroy", &name]);
    assert_eq!(virsh_ok(&["dumpxml", "--inactive", &name]), before);
    let files_after: Vec<_> = std::fs::read_dir(&env.dir).expect("dir").flatten().map(|e| e.file_name()).collect();
    assert_eq!(files_before.len(), files_after.len());
    assert!(Path::new(&disk).exists());
}

/// Runs the hook binary the way libvirt does, for the filter operations whose stdout libvirt parses.
fn hook_direct(domain: &str, op: &str, sub: &str, xml: &str) -> Output {
    hook_direct_with(domain, op, sub, xml, None)
}

fn hook_direct_with(domain: &str, op: &str, sub: &str, xml: &str, conf: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(target_bin("virt-clone-cow-hook"));
    if let Some(c) = conf {
        cmd.env("VIRT_CLONE_COW_HOOK_CONF", c);
    }
    let mut child = cmd
        .args([domain, op, sub, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook");
    // The hook does not read stdin for operations it has nothing to do in (like libvirt, which
    // ignores EPIPE there): a write error is fine.
    let _ = child.stdin.take().expect("stdin").write_all(xml.as_bytes());
    child.wait_with_output().expect("hook output")
}

#[test]
fn migrate_and_restore_pass_the_xml_through_and_check_masters() {
    let env = Env::new("filters");
    let master = env.master("m.qcow2", "qcow2");
    let name = env.name("vm");
    let ok_xml = domain_xml(&name, &backed_disk(&env.path("o.qcow2"), &master, "qcow2"), "");
    for op in ["migrate", "restore"] {
        let o = hook_direct(&name, op, "begin", &ok_xml);
        assert!(o.status.success(), "{op}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout.is_empty(), "{op} must print nothing on stdout (libvirt parses it as XML)");
        assert!(!Path::new(&env.path("o.qcow2")).exists(), "{op} makes no overlay");
    }
    // No metadata of ours: a live XML shows the chain libvirt detected for ordinary snapshots,
    // and that is none of our business, even when the backing file is not here.
    let missing = domain_xml(&name, &backed_disk(&env.path("o.qcow2"), &env.path("gone.qcow2"), "qcow2"), "");
    for op in ["migrate", "restore"] {
        let o = hook_direct(&name, op, "begin", &missing);
        assert!(o.status.success(), "{op} of a domain without our metadata: {}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout.is_empty() && o.stderr.is_empty());
    }
    // One of our clones whose master is missing and cannot be fetched: refused, with the reason.
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{}'><vcc:master path='{}' format='qcow2' sha256='{}'/></vcc:disk></vcc:clone></vcc:cow>",
        env.path("o.qcow2"),
        env.path("gone.qcow2"),
        "ab".repeat(32)
    );
    let ours = domain_xml(&name, &backed_disk(&env.path("o.qcow2"), &env.path("gone.qcow2"), "qcow2"), &md);
    let conf = env.path("hook.toml");
    std::fs::write(&conf, format!("control_socket = \"{NO_DAEMON_SOCKET}\"\nfetch_timeout = 5\nconnect_timeout = 1\n"))
        .expect("conf");
    for op in ["migrate", "restore"] {
        let o = hook_direct_with(&name, op, "begin", &ours, Some(&conf));
        assert!(!o.status.success(), "{op}: a clone whose master is missing here must be refused");
        assert!(o.stdout.is_empty());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("gone.qcow2") && err.contains("pool-helper serve"), "{op}: {err}");
    }
    // A typo in the settings is one warning naming the file and the key, never the end of the hook;
    // a file not named *.toml is read in the old `key = value` syntax.
    let typo = env.path("typo.toml");
    std::fs::write(&typo, format!("control_socket = \"{NO_DAEMON_SOCKET}\"\nfetch_timout = 5\nconnect_timeout = 1\n"))
        .expect("conf");
    let old = env.path("hook.conf");
    std::fs::write(&old, format!("control_socket = {NO_DAEMON_SOCKET}\nbogus = 1\nconnect_timeout = 1\n"))
        .expect("conf");
    for (conf, warning) in [
        (&typo, format!("{typo}: ignoring unknown key fetch_timout")),
        (&old, format!("{old}:2: ignoring 'bogus = 1'")),
    ] {
        let o = hook_direct_with(&name, "migrate", "begin", &ours, Some(conf));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(&warning), "{conf}: {err}");
        assert!(
            err.contains("gone.qcow2") && err.contains("pool-helper serve"),
            "{conf}: the settings were used: {err}"
        );
    }
    // reconnect never fails, whatever the XML.
    let o = hook_direct(&name, "reconnect", "begin", "<not xml");
    assert!(o.status.success());
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
}

#[test]
fn the_binary_never_fails_operations_that_cannot_be_refused() {
    use std::io::Write;
    let cases: [(&[&str], &[u8]); 6] = [
        (&["vm", "reconnect"], b""),
        (&["vm", "reconnect", "begin"], b"<not xml"),
        (&["vm", "reconnect", "begin", "-", "surplus"], b"\xff\xfe"),
        (&["vm", "release", "end"], b"\xff<domain><metadata xmlns='urn:virt-clone-cow:1'>"),
        (&["vm", "stopped", "end", "-"], b""),
        (&[], b""),
    ];
    for (args, stdin) in cases {
        let mut child = Command::new(target_bin("virt-clone-cow-hook"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hook");
        let _ = child.stdin.take().expect("stdin").write_all(stdin);
        let o = child.wait_with_output().expect("hook output");
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn virt_install_with_backing_store_still_works() {
    let env = Env::new("virtinstall");
    let master = env.master("m.qcow2", "qcow2");
    let disk = env.path("vi.qcow2");
    let name = env.name("vi");
    let disk_arg = format!("path={disk},backing_store={master},backing_format=qcow2,size=1,format=qcow2,bus=virtio");
    let o = run(
        "virt-install",
        &[
            "--connect",
            URI,
            "--name",
            &name,
            "--memory",
            "64",
            "--vcpus",
            "1",
            // virt-install's default is host-passthrough, which aborts QEMU on some hosts of this
            // kind ("failed to set MSR 0x10a"): the CPU every other test guest gets (no <cpu>).
            "--cpu",
            "qemu64,check=none",
            "--import",
            "--disk",
            &disk_arg,
            "--network",
            "none",
            "--graphics",
            "none",
            "--osinfo",
            "detect=off,name=generic",
            "--noautoconsole",
            "--noreboot",
        ],
    );
    assert!(o.status.success(), "virt-install: {}", String::from_utf8_lossy(&o.stderr));
    virsh_ok(&["start", &name]);
    assert_eq!(domstate(&name), "running");
    assert_eq!(qemu_img_info_qcow2(&disk)["full-backing-filename"].as_str(), Some(master.as_str()));
}

#[test]
fn a_volume_made_with_vol_create_as_backing_vol_shows_in_the_tree() {
    let env = Env::new("volcreate");
    let pool = env.name("pool");
    virsh_ok(&["pool-define-as", &pool, "dir", "--target", env.dir.to_str().expect("utf-8")]);
    virsh_ok(&["pool-start", &pool]);
    let master = env.master("m.qcow2", "qcow2");
    virsh_ok(&["pool-refresh", &pool]);
    virsh_ok(&[
        "vol-create-as",
        &pool,
        "child.qcow2",
        "64M",
        "--format",
        "qcow2",
        "--backing-vol",
        &master,
        "--backing-vol-format",
        "qcow2",
    ]);
    let o = run(cli_path().to_str().expect("utf-8"), &["-c", URI, "tree", "--json"]);
    let _ = virsh(&["pool-destroy", &pool]);
    let _ = virsh(&["pool-undefine", &pool]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tree: serde_json::Value = serde_json::from_slice(&o.stdout).expect("tree json");
    let node = tree["masters"]
        .as_array()
        .expect("masters")
        .iter()
        .find(|m| m["path"] == master.as_str())
        .expect("the master is listed");
    let clones = node["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 1);
    assert_eq!(clones[0]["volume"], "child.qcow2");
    assert_eq!(clones[0]["pool"], pool.as_str());
    assert!(clones[0]["domain"].is_null());
}

#[test]
fn the_daemon_scan_finds_missing_masters_and_overlays_their_pool_does_not_list() {
    let env = Env::new("scan");
    let pool = env.name("pool");
    virsh_ok(&["pool-define-as", &pool, "dir", "--target", env.dir.to_str().expect("utf-8")]);
    virsh_ok(&["pool-start", &pool]);
    let absent = env.path("absent.qcow2");
    let name = env.name("needs");
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{}'><vcc:master path='{absent}' format='qcow2' sha256='{}'/></vcc:disk></vcc:clone></vcc:cow>",
        env.path("needs.qcow2"),
        "cd".repeat(32)
    );
    env.define(&domain_xml(&name, &backed_disk(&env.path("needs.qcow2"), &absent, "qcow2"), &md));
    // A domain whose overlay exists in the pool's directory but was made behind libvirt's back
    // (as the hook does).
    let master = env.master("m.qcow2", "qcow2");
    virsh_ok(&["pool-refresh", &pool]);
    let made = env.path("made-by-hook.qcow2");
    let o = run("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &master, &made]);
    assert!(o.status.success());
    env.define(&domain_xml(&env.name("hooked"), &backed_disk(&made, &master, "qcow2"), ""));

    let lv = vcc_libvirt::Libvirt::open(Some(URI)).expect("connect");
    let scan = vcc_libvirt::watch::scan(&lv).expect("scan");
    let _ = virsh(&["pool-destroy", &pool]);
    let _ = virsh(&["pool-undefine", &pool]);
    let m = scan.missing.iter().find(|m| m.master.path == absent).expect("the missing master is found");
    assert_eq!(m.domains, vec![name.clone()]);
    assert_eq!(m.master.sha256.as_deref(), Some("cd".repeat(32).as_str()));
    assert!(scan.missing.iter().all(|m| m.master.path != master), "a present master is not missing");
    assert!(scan.pools_to_refresh.contains(&pool), "{:?}", scan.pools_to_refresh);
}

/// Tests that use the daemon the installed hook talks to take turns.
static HOOK_DAEMON: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn dir_pool(env: &Env, tag: &str) -> (String, PathBuf) {
    let name = env.name(tag);
    let dir = env.dir.join(tag);
    std::fs::create_dir_all(&dir).expect("pool dir");
    virsh_ok(&["pool-define-as", &name, "dir", "--target", dir.to_str().expect("utf-8")]);
    virsh_ok(&["pool-start", &name]);
    (name, dir)
}

fn drop_pool(name: &str) {
    let _ = virsh(&["pool-destroy", name]);
    let _ = virsh(&["pool-undefine", name]);
}

/// A domain on "this host" whose master is published by another pool-helper instance: its
/// metadata names the manifest and the pool the master belongs in.
fn fetching_domain_xml(name: &str, overlay: &str, master: &str, pool: &str, manifest: &str) -> String {
    fetching_domain_xml_with(name, overlay, master, pool, &format!("manifest='{manifest}'"))
}

/// [`fetching_domain_xml`] with the master element's attributes that say how to get it given whole.
fn fetching_domain_xml_with(name: &str, overlay: &str, master: &str, pool: &str, how: &str) -> String {
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{overlay}'><vcc:master path='{master}' format='raw' pool='{pool}' {how}/>\
         </vcc:disk></vcc:clone></vcc:cow>"
    );
    domain_xml(name, &backed_disk(overlay, master, "raw"), &md)
}

/// The other host: a pool `seedpool` with `base.raw` (`len` random bytes), published and seeded by
/// its own daemon. Returns the pool, the daemon, the manifest's path and the manifest.
fn seeding_host(env: &Env, len: usize) -> (String, PoolHelper, String, serde_json::Value) {
    let (seed_pool, seed_dir) = dir_pool(env, "seedpool");
    write_random(&seed_dir.join("base.raw"), len);
    virsh_ok(&["pool-refresh", &seed_pool]);
    let mut seeder = PoolHelper::new(&env.dir.join("seeder-state"));
    seeder.serve();
    let manifest = seeder.publish(&seed_pool, "base.raw");
    let published: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("json");
    (seed_pool, seeder, manifest, published)
}

fn write_random(path: &Path, len: usize) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    std::fs::write(path, v).expect("write master");
}

/// Starts `name` (its master missing: the hook has the daemon fetch it), then stops the daemons
/// (the first is the one the hook asked: its log is shown) and drops the pools; the domain must
/// run over `master`, whose SHA-256 is `want`.
fn start_over_fetched_master(
    name: &str,
    overlay: &str,
    master: &str,
    want: &str,
    daemons: Vec<PoolHelper>,
    pools: &[&str],
) {
    let o = virsh(&["start", name]);
    let log = daemons.first().map(PoolHelper::log).unwrap_or_default();
    drop(daemons);
    for p in pools {
        drop_pool(p);
    }
    assert!(o.status.success(), "virsh start: {}\n{log}", String::from_utf8_lossy(&o.stderr));
    // The wait was told where an administrator looks: the daemon's log names the domain.
    assert!(log.contains(&format!("into pool '{}' in ", pools[0])), "{log}");
    assert!(log.contains(&format!("for the start of domain '{name}'")), "the daemon's log names the domain: {log}");
    assert_eq!(domstate(name), "running");
    assert_eq!(sha256(master), want, "the master is the published one");
    let info = qemu_img_info_qcow2(overlay);
    assert_eq!(info["full-backing-filename"].as_str(), Some(master));
    assert_eq!(info["backing-filename-format"].as_str(), Some("raw"));
}

#[test]
fn a_start_fetches_the_missing_master_from_a_peer_then_makes_the_overlay() {
    let _turn = HOOK_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("fetch");
    // The other host: publishes and seeds the master.
    let (seed_pool, seeder, manifest, published) = seeding_host(&env, 24 << 20);
    // This host: a daemon (the one the installed hook asks) and a pool without the master.
    let mut local = PoolHelper::new(Path::new(HOOK_DAEMON_STATE));
    local.serve();
    let (pool, pool_dir) = dir_pool(&env, "localpool");
    let master = pool_dir.join("base.raw").to_string_lossy().into_owned();
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    env.define(&fetching_domain_xml(&name, &overlay, &master, &pool, &manifest));
    assert!(!Path::new(&master).exists());

    let want = published["sha256"].as_str().expect("sha256");
    start_over_fetched_master(&name, &overlay, &master, want, vec![local, seeder], &[&pool, &seed_pool]);
}

#[test]
fn a_start_fetches_a_master_named_by_identity_only_then_makes_the_overlay() {
    let _turn = HOOK_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("fetchid");
    // The other host publishes and seeds the master; this host has no manifest file for it.
    let (seed_pool, seed_dir) = dir_pool(&env, "seedpool");
    write_random(&seed_dir.join("ident.raw"), 12 << 20);
    virsh_ok(&["pool-refresh", &seed_pool]);
    let mut seeder = PoolHelper::new(&env.dir.join("seeder-state"));
    seeder.serve();
    let manifest = seeder.publish(&seed_pool, "ident.raw");
    let published: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("json");
    std::fs::remove_file(&manifest).expect("no manifest file anywhere the daemon could read");
    // This host's daemon knows the other host only as a peer address.
    let mut local = PoolHelper::new(Path::new(HOOK_DAEMON_STATE));
    local.peers = vec![format!("127.0.0.1:{}", seeder.port)];
    local.serve();
    let (pool, pool_dir) = dir_pool(&env, "localpool");
    let master = pool_dir.join("ident.raw").to_string_lossy().into_owned();
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{overlay}'><vcc:master path='{master}' format='raw' pool='{pool}' \
         sha256='{}' info-hash='{}'/></vcc:disk></vcc:clone></vcc:cow>",
        published["sha256"].as_str().expect("sha256"),
        published["info_hash"].as_str().expect("info_hash"),
    );
    env.define(&domain_xml(&name, &backed_disk(&overlay, &master, "raw"), &md));
    assert!(!Path::new(&master).exists());

    let want = published["sha256"].as_str().expect("sha256");
    start_over_fetched_master(&name, &overlay, &master, want, vec![local, seeder], &[&pool, &seed_pool]);
}

#[test]
fn a_plain_backing_store_of_a_missing_master_is_asked_for_by_name_in_the_pool_holding_it() {
    let _turn = HOOK_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("plainname");
    let mut local = PoolHelper::new(Path::new(HOOK_DAEMON_STATE));
    local.serve();
    // A pool defined the usual way (its definition in /etc/libvirt/storage), the master absent,
    // no metadata of ours: the hook finds the pool from its definition and asks for the name.
    let (pool, pool_dir) = dir_pool(&env, "plainpool");
    let master = pool_dir.join("plain.raw").to_string_lossy().into_owned();
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    env.define(&domain_xml(&name, &backed_disk(&overlay, &master, "raw"), ""));
    let o = virsh(&["start", &name]);
    drop(local);
    drop_pool(&pool);
    assert!(!o.status.success(), "nothing names the master: the start must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    // The daemon got the pool and the name: its catalog (nobody announced anything) has none.
    let said = format!("no trusted master named 'plain.raw' in the LAN catalog (for pool '{pool}')");
    assert!(err.contains(&master) && err.contains(&said), "{err}");
    assert!(!Path::new(&overlay).exists());
    assert_eq!(domstate(&name), "shut off");
}

#[test]
fn a_plain_backing_store_of_a_master_another_host_published_signed_starts_after_the_fetch() {
    let _turn = HOOK_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("plaincat");
    let (key, allowed) = vcc_tests::signer(&env.dir, "alice@example.com");
    // Both daemons announce and listen on a catalog port of their own (not the default's).
    let conf = env.dir.join("pool-helper.toml");
    std::fs::write(&conf, format!("catalog_port = {}\n", vcc_tests::free_port())).expect("config");
    let flag = |f: &str, p: &Path| vec![f.to_string(), p.to_string_lossy().into_owned()];
    // This host's daemon trusts alice and knows nothing else.
    let mut local = PoolHelper::new(Path::new(HOOK_DAEMON_STATE));
    local.extra = [flag("--config", &conf), flag("--allowed-signers", &allowed)].concat();
    local.serve();
    // The other host signs what it publishes and announces it (to this host too).
    let mut seeder = PoolHelper::new(&env.dir.join("seeder-state"));
    seeder.extra = [flag("--config", &conf), flag("--signing-key", &key)].concat();
    seeder.peers = vec![format!("127.0.0.1:{}", local.port)];
    seeder.serve();
    let (seed_pool, seed_dir) = dir_pool(&env, "seedpool");
    write_random(&seed_dir.join("plain-cat.raw"), 8 << 20);
    virsh_ok(&["pool-refresh", &seed_pool]);
    seeder.publish(&seed_pool, "plain-cat.raw");
    local.wait_listed("plain-cat.raw");
    // A plain XML: the backing store's path in a pool of this host, no metadata of ours.
    let (pool, pool_dir) = dir_pool(&env, "localpool");
    let master = pool_dir.join("plain-cat.raw").to_string_lossy().into_owned();
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    env.define(&domain_xml(&name, &backed_disk(&overlay, &master, "raw"), ""));

    let want = sha256(seed_dir.join("plain-cat.raw"));
    start_over_fetched_master(&name, &overlay, &master, &want, vec![local, seeder], &[&pool, &seed_pool]);
}

#[test]
fn with_no_peer_holding_the_master_the_start_fails_within_the_bound_naming_it() {
    let _turn = HOOK_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("nopeer");
    // Published on another host whose daemon is not running: nobody seeds it.
    let (seed_pool, seed_dir) = dir_pool(&env, "seedpool");
    write_random(&seed_dir.join("lonely.raw"), 4 << 20);
    virsh_ok(&["pool-refresh", &seed_pool]);
    let seeder = PoolHelper::new(&env.dir.join("seeder-state"));
    let manifest = seeder.publish(&seed_pool, "lonely.raw");
    let mut local = PoolHelper::new(Path::new(HOOK_DAEMON_STATE));
    local.serve();
    let (pool, pool_dir) = dir_pool(&env, "localpool");
    let master = pool_dir.join("lonely.raw").to_string_lossy().into_owned();
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    env.define(&fetching_domain_xml(&name, &overlay, &master, &pool, &manifest));

    let t0 = Instant::now();
    let o = virsh(&["start", &name]);
    let took = t0.elapsed();
    drop(local);
    drop_pool(&pool);
    drop_pool(&seed_pool);
    assert!(!o.status.success(), "the start must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&master), "names the master: {err}");
    assert!(err.contains("still not here after"), "says why: {err}");
    assert!(err.contains("later start will succeed"), "says what happens next: {err}");
    assert!(
        took >= Duration::from_secs(FETCH_TIMEOUT_S - 1) && took < Duration::from_secs(FETCH_TIMEOUT_S + 15),
        "took {took:?}"
    );
    assert!(!Path::new(&overlay).exists());
    assert!(!Path::new(&master).exists(), "nothing partial in the pool");
    assert_eq!(domstate(&name), "shut off");
}

#[test]
fn a_clone_from_the_publishing_host_starts_here_with_its_master_fetched_by_identity() {
    // The metadata `virt-clone-cow publish` then a clone give: the manifest named is on the
    // publishing host only, so the hook asks by the SHA-256 and info-hash recorded beside it.
    let _turn = HOOK_DAEMON.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("fetchid");
    let (seed_pool, seeder, _, published) = seeding_host(&env, 8 << 20);
    let sha = published["sha256"].as_str().expect("sha256").to_string();
    let ih = published["info_hash"].as_str().expect("info_hash").to_string();
    let mut local = PoolHelper::new(Path::new(HOOK_DAEMON_STATE));
    local.peers = vec![format!("127.0.0.1:{}", seeder.port)];
    local.serve();
    let (pool, pool_dir) = dir_pool(&env, "localpool");
    let master = pool_dir.join("base.raw").to_string_lossy().into_owned();
    let overlay = env.path("vm.qcow2");
    let name = env.name("vm");
    let how = format!(
        "virtual-size='{}' sha256='{sha}' info-hash='{ih}' manifest='/var/lib/elsewhere/.pool-helper/base.raw.json'",
        8 << 20
    );
    env.define(&fetching_domain_xml_with(&name, &overlay, &master, &pool, &how));

    let o = virsh(&["start", &name]);
    let log = local.log();
    drop(local);
    drop(seeder);
    drop_pool(&pool);
    drop_pool(&seed_pool);
    assert!(o.status.success(), "virsh start: {}\n{log}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(domstate(&name), "running");
    assert_eq!(sha256(&master), sha, "the master matches its identity");
    assert_eq!(qemu_img_info_qcow2(&overlay)["full-backing-filename"].as_str(), Some(master.as_str()));
}
