//! virt-clone-cow over a remote URI (`qemu+ssh://`), where files cannot be touched directly and
//! everything must go through the libvirt storage API. The "remote" host is this machine, reached
//! through a private sshd on 127.0.0.1, so the code takes exactly the remote paths.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vcc_tests::{cli_path, run, run_ok};

const SSH_DIR: &str = "/var/lib/vcc-tests-sshd";
const SSH_PORT: u16 = 2222;

/// Starts (once) an sshd on 127.0.0.1 that lets root in with a key made for the tests, and
/// returns the remote URI.
fn remote_uri() -> &'static str {
    static URI: OnceLock<String> = OnceLock::new();
    URI.get_or_init(|| {
        let d = Path::new(SSH_DIR);
        std::fs::create_dir_all(d).expect("ssh dir");
        std::fs::create_dir_all("/run/sshd").expect("sshd privsep dir");
        for key in ["host_ed25519", "id"] {
            let k = d.join(key);
            if !k.exists() {
                run_ok("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", k.to_str().expect("utf-8")]);
            }
        }
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).expect("authorized_keys");
        let conf = d.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {SSH_DIR}/host_ed25519\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nAuthorizedKeysFile {SSH_DIR}/authorized_keys\n\
                 PidFile {SSH_DIR}/sshd.pid\nStrictModes no\nUsePAM no\n"
            ),
        )
        .expect("sshd_config");
        let uri = format!("qemu+ssh://root@127.0.0.1:{SSH_PORT}/system?keyfile={SSH_DIR}/id&no_verify=1&no_tty=1");
        // Reuse a running test sshd; otherwise start one (it daemonizes).
        if !run("virsh", &["-q", "-c", &uri, "version"]).status.success() {
            run_ok("/usr/sbin/sshd", &["-f", conf.to_str().expect("utf-8")]);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !run("virsh", &["-q", "-c", &uri, "version"]).status.success() {
            assert!(std::time::Instant::now() < deadline, "libvirt over ssh did not answer at {uri}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        uri
    })
}

struct Env {
    prefix: String,
    dir: PathBuf,
}

impl Env {
    fn new(test: &str) -> Env {
        let prefix = format!("vcct-remote-{test}-{}", std::process::id());
        let dir = PathBuf::from("/var/lib/vcc-tests").join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let env = Env { prefix, dir };
        run_ok("virsh", &["-q", "pool-define-as", &env.prefix, "dir", "--target", env.dir.to_str().expect("utf-8")]);
        run_ok("virsh", &["-q", "pool-start", &env.prefix]);
        env
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let list = run("virsh", &["-q", "list", "--all", "--name"]);
        for n in String::from_utf8_lossy(&list.stdout).lines().map(str::trim).filter(|n| n.starts_with(&self.prefix)) {
            let _ = run("virsh", &["-q", "destroy", n]);
            let _ = run("virsh", &["-q", "undefine", n]);
        }
        let _ = run("virsh", &["-q", "pool-destroy", &self.prefix]);
        let _ = run("virsh", &["-q", "pool-undefine", &self.prefix]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn template_xml(name: &str, disks: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os><devices>{disks}\
         <interface type='user'><model type='virtio'/></interface></devices></domain>"
    )
}

/// A template `<prefix>-tmpl` whose disk is the volume `base.qcow2` (32 MiB) of the env's pool;
/// returns (template, master path).
fn pool_template(env: &Env) -> (String, PathBuf) {
    let master = env.dir.join("base.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", master.to_str().expect("utf-8"), "32M"]);
    run_ok("virsh", &["-q", "pool-refresh", &env.prefix]);
    let tmpl = format!("{}-tmpl", env.prefix);
    let disk = format!(
        "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='{}' volume='base.qcow2'/><target dev='vda' bus='virtio'/></disk>",
        env.prefix
    );
    let xml = env.dir.join("t.xml");
    std::fs::write(&xml, template_xml(&tmpl, &disk)).expect("xml");
    run_ok("virsh", &["-q", "define", xml.to_str().expect("utf-8")]);
    (tmpl, master)
}

#[test]
fn over_qemu_ssh_pool_disks_are_cloned_through_the_storage_api() {
    let uri = remote_uri();
    let env = Env::new("pool");
    let (tmpl, master) = pool_template(&env);

    let clone = format!("{}-c1", env.prefix);
    let out =
        run_ok(cli_path().to_str().expect("utf-8"), &["-c", uri, "--original", &tmpl, "--name", &clone, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    let d = &report["clones"][0]["disks"][0];
    assert_eq!(d["pool"], env.prefix.as_str());
    assert_eq!(d["volume"], format!("{clone}-vda.qcow2").as_str());

    // The pool knows the overlay (it was made by libvirt), and it is backed by the master.
    let vols = run_ok("virsh", &["-q", "vol-list", &env.prefix]);
    assert!(vols.contains(&format!("{clone}-vda.qcow2")), "{vols}");
    let vol_xml = run_ok("virsh", &["-q", "vol-dumpxml", "--pool", &env.prefix, &format!("{clone}-vda.qcow2")]);
    assert!(vol_xml.contains(&format!("<path>{}</path>", master.display())), "{vol_xml}");
    assert!(vol_xml.contains("<compat>1.1</compat>"), "{vol_xml}");
    let clone_xml = run_ok("virsh", &["-q", "dumpxml", "--inactive", &clone]);
    assert!(clone_xml.contains(&format!("volume='{clone}-vda.qcow2'")), "{clone_xml}");
    // The template mark is set through the API.
    let md = run_ok("virsh", &["-q", "metadata", &tmpl, "urn:virt-clone-cow:1"]);
    assert!(md.contains("template"), "{md}");
}

#[test]
fn over_qemu_ssh_a_file_outside_any_pool_is_refused_with_what_to_do() {
    let uri = remote_uri();
    let env = Env::new("nopool");
    let outside = PathBuf::from("/var/lib/vcc-tests").join(format!("{}-outside.raw", env.prefix));
    run_ok("qemu-img", &["create", "-q", "-f", "raw", outside.to_str().expect("utf-8"), "8M"]);
    let tmpl = format!("{}-tmpl", env.prefix);
    let disk = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        outside.display()
    );
    let xml = env.dir.join("t.xml");
    std::fs::write(&xml, template_xml(&tmpl, &disk)).expect("xml");
    run_ok("virsh", &["-q", "define", xml.to_str().expect("utf-8")]);
    let mine = || -> Vec<String> {
        run_ok("virsh", &["-q", "list", "--all", "--name"])
            .lines()
            .filter(|n| n.starts_with(&env.prefix))
            .map(String::from)
            .collect()
    };
    let before = mine();
    let o = run(
        cli_path().to_str().expect("utf-8"),
        &["-c", uri, "--original", &tmpl, "--name", &format!("{}-c", env.prefix)],
    );
    let _ = std::fs::remove_file(&outside);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("is in no storage pool") && err.contains("define a pool"), "{err}");
    assert_eq!(mine(), before, "nothing was defined");
}

/// Runs a clone of the env's pool template over ssh with `extra` arguments, which must be
/// refused with one line holding every one of `needles`, before anything is made: no clone, no
/// file in the pool, the original not marked a template.
fn assert_refused_before_anything_is_made(env: &Env, extra: &[&str], needles: &[&str]) {
    let uri = remote_uri();
    let (tmpl, _) = pool_template(env);
    let files_before = std::fs::read_dir(&env.dir).expect("dir").count();
    let clone = format!("{}-c1", env.prefix);
    let mut args = vec!["-c", uri, "--original", &tmpl, "--name", &clone];
    args.extend_from_slice(extra);
    let o = run(cli_path().to_str().expect("utf-8"), &args);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "should say '{n}': {err}");
    }
    assert!(!run("virsh", &["-q", "dominfo", &clone]).status.success(), "no clone was defined");
    assert_eq!(std::fs::read_dir(&env.dir).expect("dir").count(), files_before, "no overlay was made");
    let md = run("virsh", &["-q", "metadata", &tmpl, "urn:virt-clone-cow:1"]);
    assert!(!String::from_utf8_lossy(&md.stdout).contains("template"), "the original was not made a template");
}

#[test]
fn over_qemu_ssh_sysprep_is_refused_before_anything_is_made() {
    let env = Env::new("sysprep");
    assert_refused_before_anything_is_made(
        &env,
        &["--sysprep"],
        &["--sysprep needs the clones' disks on this machine", "remote connection"],
    );
}

#[test]
fn over_qemu_ssh_reflink_of_a_qcow2_volume_is_refused_before_anything_is_made() {
    let env = Env::new("reflink");
    assert_refused_before_anything_is_made(
        &env,
        &["--reflink"],
        &["is a qcow2 image in a pool", "over a remote connection", "libvirt can reflink raw pool volumes only"],
    );
}
