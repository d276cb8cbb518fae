//! Lazy masters (docs/lazy.md) end to end: two real pool-helper daemons (a seeding origin whose
//! upload is capped, a lazy host), the hook built here run as libvirt runs it (`NAME prepare begin
//! -`, the domain XML on stdin, its own settings file), and the tiny guest booting under the real
//! libvirtd from an overlay over the master's NBD export while the master is still arriving.
//!
//! The domain started with `virsh create` names the overlay only (no metadata, no
//! `<backingStore>`): libvirt reads the overlay's backing file name, and any hook installed on
//! this machine leaves such a domain alone.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vcc_tests::*;

const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// The origin's upload cap, bytes/s: the tiny master (~250 MB) takes minutes to arrive, far
/// longer than the boot's few MiB.
const ORIGIN_UPLOAD: &str = "2000000";

struct Lazy {
    dir: PathBuf,
    name: String,
    hook_conf: PathBuf,
}

impl Lazy {
    fn new(test: &str, control_socket: &Path, pool_dir: &Path) -> Lazy {
        let name = format!("vcct-lazy-{test}-{}", std::process::id());
        let dir = PathBuf::from(BASE_DIR).join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hook_conf = dir.join("hook.toml");
        std::fs::write(
            &hook_conf,
            format!(
                "control_socket = \"{}\"\nfetch_timeout = 120\nconnect_timeout = 2\nlazy = true\nallowed_dirs = [\"{}\", \"{}\"]\n",
                control_socket.display(),
                dir.display(),
                pool_dir.display()
            ),
        )
        .unwrap();
        Lazy { dir, name, hook_conf }
    }

    /// The clone's XML as the hook sees it: the overlay, and the master in our metadata only.
    fn hook_xml(&self, overlay: &Path, master: &Path, pool: &str, m: &serde_json::Value) -> String {
        format!(
            "<domain type='qemu'><name>{name}</name><metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'>\
             <vcc:clone original='tiny'><vcc:disk target='vda' overlay='{ov}'><vcc:master path='{mp}' format='qcow2' \
             virtual-size='{vs}' pool='{pool}' volume='{vol}' sha256='{sha}' info-hash='{ih}'/></vcc:disk></vcc:clone>\
             </vcc:cow></metadata><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{ov}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            name = self.name,
            ov = overlay.display(),
            mp = master.display(),
            vs = m["virtual_size"],
            vol = m["name"].as_str().unwrap(),
            sha = m["sha256"].as_str().unwrap(),
            ih = m["info_hash"].as_str().unwrap(),
        )
    }

    /// Runs the hook built here as libvirt runs it for `prepare begin`; its stderr, or a panic.
    fn prepare(&self, xml: &str) -> String {
        self.hook("prepare", xml).1
    }

    /// Runs the hook built here as libvirt runs it for `OP begin`; (stdout, stderr), or a panic
    /// when it refuses.
    fn hook(&self, op: &str, xml: &str) -> (String, String) {
        let mut c = Command::new(target_bin("virt-clone-cow-hook"))
            .args([&self.name, op, "begin", "-"])
            .env("VIRT_CLONE_COW_HOOK_CONF", &self.hook_conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(xml.as_bytes()).unwrap();
        let o = wait_output(c, Duration::from_secs(180));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "the hook refused {op}: {err}");
        (String::from_utf8_lossy(&o.stdout).into_owned(), err)
    }

    /// Starts the guest on `overlay` (transient, plain XML) and waits for its "up" line.
    fn boot(&self, overlay: &Path, log: &Path) -> (String, Duration) {
        let _ = std::fs::remove_file(log);
        let xml = self.dir.join("domain.xml");
        std::fs::write(&xml, guest_xml(&self.name, guest_domain_type(), overlay, log)).unwrap();
        let t0 = Instant::now();
        virsh_ok(&[OsStr::new("create"), xml.as_os_str()]);
        let (line, _) = wait_for_up(log, BOOT_LIMIT);
        (line, t0.elapsed())
    }
}

use std::ffi::OsStr;

impl Drop for Lazy {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A directory QEMU (user libvirt-qemu) may pass through.
fn traversable(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711)).unwrap();
}

fn backing_of(overlay: &Path) -> String {
    qemu_img_info(overlay, "qcow2")["backing-filename"].as_str().unwrap_or_default().to_string()
}

/// An origin seeding the tiny master (upload capped at [`ORIGIN_UPLOAD`]), a lazy host that knows
/// it as a peer, and the clone's files. Fields drop in order: the domain first, the pools last.
struct Bed {
    env: Lazy,
    b: Instance,
    _a: Instance,
    m: serde_json::Value,
    overlay: PathBuf,
    master: PathBuf,
    log: PathBuf,
    pb: Pool,
    _pa: Pool,
    /// One bed at a time: the guests' boots and the origins' uploads of this file's tests would
    /// share the machine's CPUs and slow each other past what the tests time.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bed(test: &str) -> Bed {
    bed_with(test, ORIGIN_UPLOAD)
}

/// [`bed`] with the origin's upload capped at `upload` bytes/s.
fn bed_with(test: &str, upload: &str) -> Bed {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pa = Pool::new("lza");
    let pb = Pool::new("lzb");
    traversable(pb.dir.parent().unwrap());
    std::fs::copy(tiny_master(), pa.path("tiny.qcow2")).unwrap();
    pa.refresh();
    // Not super-seeding: a super-seed offers each peer only the pieces it picks, never the ones a
    // booting guest asks for (docs/lazy.md).
    let mut a = Instance::new(&["--upload-limit", upload, "--no-super-seed"]);
    a.serve();
    let man = a.publish(&pa, "tiny.qcow2");
    a.wait_seeding("tiny.qcow2");
    let m = manifest(&man);
    let mut b = Instance::new(&["--lazy", "--peer", &a.addr()]);
    traversable(b.state.path());
    b.serve();
    let env = Lazy::new(test, &b.socket(), &pb.dir);
    let (overlay, log) = (env.dir.join("clone.qcow2"), env.dir.join("serial.log"));
    let master = pb.path("tiny.qcow2");
    Bed { env, b, _a: a, m, overlay, master, log, pb, _pa: pa, _serial: serial }
}

#[test]
fn a_lazily_started_clone_boots_before_its_master_arrives_and_uses_the_master_once_it_is_here() {
    let Bed { env, b, m, overlay, master, log, pb, .. } = &mut bed("boot");
    let t0 = Instant::now();
    let said = env.prepare(&env.hook_xml(overlay, master, &pb.name, m));
    println!("the hook's prepare took {:.2} s", t0.elapsed().as_secs_f64());
    assert!(said.contains("over the export of"), "{said}");
    assert!(backing_of(overlay).starts_with("nbd+unix:///?socket="), "{}", backing_of(overlay));
    assert!(!master.exists(), "the master is not here yet");

    let (line, took) = env.boot(overlay, log);
    let read = disk_read_bytes(&env.name, "vda");
    let st = b.master_status("tiny.qcow2");
    println!(
        "lazy tiny guest up in {:.2} s from `virsh start`; boot read {read} bytes; master then {}/{} bytes",
        took.as_secs_f64(),
        st["done_bytes"],
        st["total_bytes"]
    );
    assert!(up_field(&line, "uuid").is_some(), "{line}");
    assert!(!master.exists(), "the guest was up before its master was complete: {st}");

    let t0 = Instant::now();
    while b.master_status("tiny.qcow2")["state"] != "seeding" {
        assert!(t0.elapsed() < Duration::from_secs(600), "the master never arrived: {}", b.daemon_log());
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(sha256(&master), m["sha256"].as_str().unwrap(), "the published master is the origin's");
    virsh_ok(&["destroy", &env.name]);
    // The next start: the overlay now reads the master file.
    let said = env.prepare(&env.hook_xml(overlay, master, &pb.name, m));
    assert!(said.contains("now reads master"), "{said}");
    assert_eq!(backing_of(overlay), master.display().to_string());
    let (line, _) = env.boot(overlay, log);
    assert!(up_field(&line, "uuid").is_some(), "{line}");
    virsh_ok(&["destroy", &env.name]);
    assert!(b.daemon_log().contains("lazy export of 'tiny.qcow2'"), "{}", b.daemon_log());
}

/// The guest the benchmark boots: `VCC_LAZY_GUEST=realistic` for the realistic one.
fn bench_master() -> (&'static Path, &'static str) {
    match std::env::var("VCC_LAZY_GUEST").as_deref() {
        Ok("realistic") => (realistic_master(), "realistic"),
        _ => (tiny_master(), "tiny"),
    }
}

/// docs/benchmarks/lazy.md: one host, master absent, one seed capped at 100 Mbit/s
/// (12.5 MB/s upload): time to the "up" line (a) master present, (b) fetch the whole master then
/// start, (c) lazy start; and the bytes boot read.
#[test]
#[ignore = "benchmark: cargo test -p vcc-tests --features integration --test lazy bench -- --ignored --nocapture"]
fn bench_lazy_start_against_present_and_fetch_whole() {
    let (src, kind) = bench_master();
    let pa = Pool::new("lzba");
    traversable(pa.dir.parent().unwrap());
    std::fs::copy(src, pa.path("m.qcow2")).unwrap();
    pa.refresh();
    let mut a = Instance::new(&["--upload-limit", "12500000", "--no-super-seed"]);
    a.serve();
    let man = a.publish(&pa, "m.qcow2");
    a.wait_seeding("m.qcow2");
    let m = manifest(&man);
    let size = m["size"].as_u64().unwrap();
    println!(
        "guest {kind}: master {size} bytes; seed upload 12.5 MB/s (100 Mbit/s); domain type {}",
        guest_domain_type()
    );

    // (a) present: an overlay over the master on this host.
    let env = Lazy::new("bench-a", &a.socket(), &pa.dir);
    let ov = env.dir.join("a.qcow2");
    make_overlay(&pa.path("m.qcow2"), &ov);
    let (_, up_a) = env.boot(&ov, &env.dir.join("a.log"));
    let read_a = disk_read_bytes(&env.name, "vda");
    virsh_ok(&["destroy", &env.name]);
    drop(env);

    // (b) fetch the whole master, then start.
    let pb = Pool::new("lzbb");
    traversable(pb.dir.parent().unwrap());
    let b = Instance::new(&["--peer", &a.addr()]);
    let env = Lazy::new("bench-b", &b.socket(), &pb.dir);
    let t0 = Instant::now();
    b.run_ok(&["fetch", "--pool", &pb.name, man.to_str().unwrap()]);
    let fetched = t0.elapsed();
    let ov = env.dir.join("b.qcow2");
    make_overlay(&pb.path("m.qcow2"), &ov);
    let (_, boot_b) = env.boot(&ov, &env.dir.join("b.log"));
    let up_b = t0.elapsed();
    virsh_ok(&["destroy", &env.name]);
    drop(env);
    drop(pb);

    // (c) lazy.
    let pc = Pool::new("lzbc");
    traversable(pc.dir.parent().unwrap());
    let mut c = Instance::new(&["--lazy", "--peer", &a.addr()]);
    traversable(c.state.path());
    c.serve();
    let env = Lazy::new("bench-c", &c.socket(), &pc.dir);
    let ov = env.dir.join("c.qcow2");
    let master = pc.path("m.qcow2");
    let t0 = Instant::now();
    env.prepare(&env.hook_xml(&ov, &master, &pc.name, &m));
    let prepared = t0.elapsed();
    let (_, boot_c) = env.boot(&ov, &env.dir.join("c.log"));
    let up_c = t0.elapsed();
    let read_c = disk_read_bytes(&env.name, "vda");
    let done = c.master_status("m.qcow2")["done_bytes"].as_u64().unwrap_or(0);
    virsh_ok(&["destroy", &env.name]);

    println!("| start | time to \"up\" (s) | of which |");
    println!("|---|---|---|");
    println!("| (a) master present | {:.1} | boot |", up_a.as_secs_f64());
    println!(
        "| (b) fetch whole, then start | {:.1} | fetch {:.1} + boot {:.1} |",
        up_b.as_secs_f64(),
        fetched.as_secs_f64(),
        boot_b.as_secs_f64()
    );
    println!(
        "| (c) lazy | {:.1} | hook prepare (export, head checks, overlay) {:.1} + boot {:.1} |",
        up_c.as_secs_f64(),
        prepared.as_secs_f64(),
        boot_c.as_secs_f64()
    );
    println!(
        "boot read {read_a} bytes (present), {read_c} bytes (lazy); the lazy host had {done} of {size} bytes at \"up\""
    );
}

#[test]
fn a_daemon_killed_mid_boot_pauses_the_guest_with_an_io_error_and_it_resumes_once_the_export_is_back() {
    let Bed { env, b, m, overlay, master, log, pb, .. } = &mut bed("kill");
    let xml = env.hook_xml(overlay, master, &pb.name, m);
    env.prepare(&xml);
    let dom = env.dir.join("domain.xml");
    std::fs::write(&dom, stop_on_error_xml(&env.name, overlay, log)).unwrap();
    virsh_ok(&[OsStr::new("create"), dom.as_os_str()]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(up_line(log).is_none(), "killed mid-boot, not after");
    b.kill_daemon();
    let t0 = Instant::now();
    let st = wait_state_reason(&env.name, "paused (I/O error)", Duration::from_secs(90));
    println!("{:.1} s after the kill the guest is {st}", t0.elapsed().as_secs_f64());
    assert_eq!(st, "paused (I/O error)", "a guest whose export is gone is told (I/O error), it does not hang");
    assert!(up_line(log).is_none());
    assert!(!master.exists(), "nothing partial in the pool");

    // The daemon is back and resumes the fetch: with `lazy` on it exports the master again by
    // itself (nobody asks). QEMU 7.2's NBD client (no reconnect-delay) retries the connection in
    // the background when a request fails: `virsh resume` retries the failed read, and once a
    // retry finds the export back the guest goes on. Bounded: at most 10 resumes.
    let sock = PathBuf::from(backing_of(overlay).trim_start_matches("nbd+unix:///?socket="));
    assert!(!sock.exists() || std::os::unix::net::UnixStream::connect(&sock).is_err(), "the export died");
    b.serve();
    let t1 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t1.elapsed() < Duration::from_secs(60), "not exported again: {}", b.daemon_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("exported again {:.1} s after the restart", t1.elapsed().as_secs_f64());
    let mut resumes = 0;
    while up_line(log).is_none() {
        let st = state_reason(&env.name);
        if st.starts_with("paused") {
            assert!(resumes < 10, "still {st} after {resumes} resumes");
            virsh_ok(&["resume", &env.name]);
            resumes += 1;
        }
        std::thread::sleep(Duration::from_secs(1));
        assert!(t0.elapsed() < BOOT_LIMIT, "not up: {}", state_reason(&env.name));
    }
    println!("{resumes} `virsh resume` after the restart");
    let (line, _) = wait_for_up(log, BOOT_LIMIT);
    assert!(up_field(&line, "uuid").is_some(), "{line}");
    println!("after the restart and `virsh resume` the guest came up: {}", state_reason(&env.name));
    virsh_ok(&["destroy", &env.name]);

    let check = run("qemu-img", &["check", "-f", "qcow2", overlay.to_str().unwrap()]);
    assert!(check.status.success(), "the overlay is sound: {}", String::from_utf8_lossy(&check.stdout));
    // The next start works too (the hook asks for the export, which is there).
    let said = env.prepare(&xml);
    assert!(said.contains("reads the export of") || said.contains("now reads master"), "{said}");
    let (line, _) = env.boot(overlay, log);
    assert!(up_field(&line, "uuid").is_some(), "{line}");
    virsh_ok(&["destroy", &env.name]);
}

/// The guest's disk with `error_policy='stop' rerror_policy='stop'` (docs/lazy.md): a read the
/// export fails pauses the guest (I/O error) instead of handing the error to its kernel.
fn stop_on_error_xml(name: &str, overlay: &Path, log: &Path) -> String {
    let plain = "<driver name='qemu' type='qcow2'/>";
    let xml = guest_xml(name, guest_domain_type(), overlay, log);
    assert!(xml.contains(plain), "{xml}");
    xml.replace(plain, "<driver name='qemu' type='qcow2' error_policy='stop' rerror_policy='stop'/>")
}

/// `virsh domstate --reason`: e.g. `paused (I/O error)`.
fn state_reason(name: &str) -> String {
    virsh_ok(&["domstate", "--reason", name]).trim().to_string()
}

/// Polls [`state_reason`] until it is `want` or `timeout` passes; returns the last one seen.
fn wait_state_reason(name: &str, want: &str, timeout: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let s = state_reason(name);
        if s == want || t0.elapsed() > timeout {
            return s;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The files left in the lazy host's staging directories (either place pool-helper uses).
fn staged_files(b: &Instance, pool: &Pool) -> Vec<PathBuf> {
    let bases = [b.state.path().join("staging"), pool.dir.parent().unwrap().join(".pool-helper-staging")];
    let mut out = Vec::new();
    let mut todo: Vec<PathBuf> = bases.to_vec();
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Starts `xml` (a file) paused: QEMU has opened the disk chain (its NBD connection to the
/// export is up) and the guest has run no instruction yet.
fn create_paused(xml: &Path) {
    virsh_ok(&[OsStr::new("create"), xml.as_os_str(), OsStr::new("--paused")]);
}

#[test]
fn a_master_failing_its_final_checks_is_never_published_and_its_guest_pauses_with_an_io_error() {
    // A fast origin: the whole master arrives (and fails its SHA-256) in seconds.
    let Bed { env, b, m, overlay, master, log, pb, .. } = &mut bed_with("fail", "8000000");
    // The domain's metadata records the right info-hash (every piece verifies) but a wrong
    // SHA-256 of the whole file: only the final check can tell.
    let mut wrong = m.clone();
    wrong["sha256"] = serde_json::Value::String("0".repeat(64));
    let said = env.prepare(&env.hook_xml(overlay, master, &pb.name, &wrong));
    assert!(said.contains("over the export of"), "{said}");
    let dom = env.dir.join("domain.xml");
    std::fs::write(&dom, stop_on_error_xml(&env.name, overlay, log)).unwrap();
    create_paused(&dom);
    assert_eq!(state_reason(&env.name), "paused (user)");

    let t0 = Instant::now();
    while b.master_status("tiny.qcow2")["state"] != "failed" {
        assert!(t0.elapsed() < Duration::from_secs(300), "the master never failed: {}", b.daemon_log());
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("the master failed its final checks {:.1} s after the guest was created", t0.elapsed().as_secs_f64());
    let dlog = b.daemon_log();
    let stopped = dlog.lines().find(|l| l.contains("lazy export of 'tiny.qcow2' stopped: ")).unwrap_or_default();
    assert!(stopped.contains("SHA-256"), "the daemon logs why the export stopped: {dlog}");
    println!("daemon: {stopped}");

    // The guest runs on: its first disk read (the boot sector, from the backing file) fails.
    virsh_ok(&["resume", &env.name]);
    let st = wait_state_reason(&env.name, "paused (I/O error)", Duration::from_secs(60));
    assert_eq!(st, "paused (I/O error)", "serial: {:?}", std::fs::read_to_string(&*log).unwrap_or_default());
    assert!(up_line(log).is_none(), "the guest never came up on unverified bytes");
    // Resuming does not help: the export is gone for good.
    let _ = virsh(&["resume", &env.name]);
    let st = wait_state_reason(&env.name, "paused (I/O error)", Duration::from_secs(30));
    assert_eq!(st, "paused (I/O error)");
    virsh_ok(&["destroy", &env.name]);

    assert!(!master.exists(), "the master is never published");
    assert_eq!(staged_files(b, pb), Vec::<PathBuf>::new(), "nothing is left in staging");
    let sock = backing_of(overlay).trim_start_matches("nbd+unix:///?socket=").to_string();
    assert!(!Path::new(&sock).exists(), "the export's socket is gone: {sock}");
}

/// `xml` (a domain XML) with the virt-clone-cow metadata of `ours` (a [`Lazy::hook_xml`]): what
/// libvirt hands the hook for our clone. The domains these tests run carry none, so that hooks
/// installed on this machine leave them alone.
fn with_metadata(xml: &str, ours: &str) -> String {
    let md = &ours[ours.find("<metadata>").unwrap()..ours.find("</metadata>").unwrap() + "</metadata>".len()];
    let at = xml.find("</name>").unwrap() + "</name>".len();
    format!("{}{md}{}", &xml[..at], &xml[at..])
}

/// `virsh save`, then the hook's `restore begin` on the saved XML as libvirt runs it (it must
/// print nothing: the XML goes through unchanged), then `virsh restore`. Returns the hook's
/// stderr and how long it took.
fn save_and_restore(env: &Lazy, ours: &str, image: &Path, between: impl FnOnce()) -> (String, Duration) {
    virsh_ok(&[OsStr::new("save"), OsStr::new(&env.name), image.as_os_str()]);
    between();
    let saved = virsh_ok(&[OsStr::new("save-image-dumpxml"), image.as_os_str()]);
    let t0 = Instant::now();
    let (out, err) = env.hook("restore", &with_metadata(&saved, ours));
    let took = t0.elapsed();
    assert_eq!(out, "", "the restore filter passes the XML through unchanged");
    virsh_ok(&[OsStr::new("restore"), image.as_os_str()]);
    let _ = std::fs::remove_file(image);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state_reason(&env.name), "running (restored)", "the restored guest runs on: {err}");
    (err, took)
}

#[test]
fn a_lazily_started_guest_saves_and_restores_while_its_master_arrives_and_after() {
    let Bed { env, b, m, overlay, master, log, pb, .. } = &mut bed("save");
    let ours = env.hook_xml(overlay, master, &pb.name, m);
    env.prepare(&ours);
    let (line, _) = env.boot(overlay, log);
    assert!(up_field(&line, "uuid").is_some(), "{line}");
    let image = env.dir.join("saved.img");

    // The master still arriving: the restore filter asks for the export (the overlay reads it),
    // it does not wait for the whole master (minutes at the origin's 2 MB/s).
    let (said, took) = save_and_restore(env, &ours, &image, || {});
    println!("restore begin took {:.2} s with the master arriving: {said}", took.as_secs_f64());
    assert!(said.contains("reads the export of"), "{said}");
    assert!(took < Duration::from_secs(30), "the hook waited for the whole master: {:.1} s", took.as_secs_f64());
    assert!(!master.exists(), "restored while the master was still arriving");
    assert!(backing_of(overlay).starts_with("nbd+unix:///?socket="), "{}", backing_of(overlay));

    let t0 = Instant::now();
    while b.master_status("tiny.qcow2")["state"] != "seeding" {
        assert!(t0.elapsed() < Duration::from_secs(600), "the master never arrived: {}", b.daemon_log());
        std::thread::sleep(Duration::from_secs(1));
    }
    // The master is here; the daemon restarts while the guest is saved (a host reboot under
    // libvirt-guests): its export is gone, so the restore filter points the overlay at the master
    // (no QEMU has it open during a restore).
    let (said, _) = save_and_restore(env, &ours, &image, || {
        b.kill_daemon();
        b.serve();
    });
    println!("restore begin with the master here: {said}");
    assert!(said.contains("now reads master"), "{said}");
    assert_eq!(backing_of(overlay), master.display().to_string());
    assert_eq!(sha256(master), m["sha256"].as_str().unwrap());
    virsh_ok(&["destroy", &env.name]);
    let check = run("qemu-img", &["check", "-f", "qcow2", overlay.to_str().unwrap()]);
    assert!(check.status.success(), "the overlay is sound: {}", String::from_utf8_lossy(&check.stdout));
}
