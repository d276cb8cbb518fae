#![allow(clippy::unwrap_used)]
//! The pool-helper daemon's look at libvirt (issue: the hook): a domain defined with a disk whose
//! master is missing on this host gets its master fetched before anyone starts it, and an overlay
//! made in a pool directory behind libvirt's back (as the hook does) gets its pool refreshed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vcc_tests::*;

fn pool_helper_bin() -> PathBuf {
    let p = cli_path().with_file_name("pool-helper");
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --all-targets` first", p.display());
    p
}

struct Daemon {
    state: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Daemon {
    fn start(state: &Path, watch_interval: &str) -> Daemon {
        std::fs::create_dir_all(state).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut d = Daemon { state: state.to_path_buf(), port, child: None };
        let log = std::fs::File::create(state.join("daemon.log")).unwrap();
        let child = d.cmd(watch_interval, &["-v", "serve"]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        d.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(state.join("control.sock")).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn cmd(&self, watch_interval: &str, args: &[&str]) -> Command {
        let mut c = Command::new(pool_helper_bin());
        c.arg("--state-dir").arg(&self.state);
        c.args(["--listen-port", &self.port.to_string(), "--advertise", "127.0.0.1", "--no-lsd"]);
        c.args(["--watch-interval", watch_interval]);
        c.args(args).stdin(Stdio::null());
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_daemon_prefetches_a_master_a_defined_domain_needs_and_refreshes_pools_with_hook_overlays() {
    let seed_env = TestEnv::new("pfseed");
    let local_env = TestEnv::new("pflocal");
    // Another host publishes the master.
    let seed_master = seed_env.in_pool("base.raw");
    make_raw(&seed_master, 8);
    seed_env.refresh_pool();
    let seeder = Daemon::start(&seed_env.work_dir.join("state"), "0");
    let o = seeder.cmd("0", &["publish", "--pool", &seed_env.pool, "base.raw"]).output().unwrap();
    assert!(o.status.success(), "publish: {}", String::from_utf8_lossy(&o.stderr));
    let manifest = String::from_utf8_lossy(&o.stdout).trim().to_string();

    // This host: its daemon watches libvirt every second.
    let local = Daemon::start(&local_env.work_dir.join("state"), "1");
    let master = local_env.in_pool("base.raw");
    let overlay = local_env.in_pool(&format!("{}-vda.qcow2", local_env.name("-vm")));
    let name = local_env.name("-vm");
    let md = format!(
        "<vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
         <vcc:disk target='vda' overlay='{overlay}'><vcc:master path='{master}' format='raw' pool='{}' manifest='{manifest}'/>\
         </vcc:disk></vcc:clone></vcc:cow>",
        local_env.pool
    );
    let xml = format!(
        "<domain type='{}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu><metadata>{md}</metadata>\
         <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='qemu' type='qcow2'/><source file='{overlay}'/><backingStore type='file'><format type='raw'/>\
         <source file='{master}'/></backingStore><target dev='vda' bus='virtio'/></disk></devices></domain>",
        bios_domain_type()
    );
    define_xml(&xml);

    // No start: the master arrives by itself, verified, and the pool lists it.
    wait_until("the prefetch", Duration::from_secs(60), || Path::new(&master).exists(), || local.log());
    assert_eq!(sha256(&master), sha256(&seed_master));
    let vols = virsh_ok(&["vol-list", &local_env.pool]);
    assert!(vols.contains("base.raw"), "{vols}");

    // An overlay made behind libvirt's back in the pool directory (as the hook makes them) is
    // listed after the daemon's next look.
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &master, &overlay]);
    let file = Path::new(&overlay).file_name().unwrap().to_string_lossy().into_owned();
    wait_until(
        "the pool refresh",
        Duration::from_secs(30),
        || virsh_ok(&["vol-list", &local_env.pool]).contains(&file),
        || local.log(),
    );
}
