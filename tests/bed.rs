//! The multi-host test bed (`tests/bed/bed`, docs/bed.md): three libvirt hosts on this machine,
//! a guest started on each through its own URI, each host isolated from the others and from the
//! machine's own libvirtd, each host's pool-helper answering on its socket, a live migration
//! between two hosts over their private sshd, and `down` leaving no namespace, process or mount
//! behind.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use vcc_tests::*;

/// The namespace (inode) of kind `kind` ("net", "mnt") of process `pid`, if it still runs.
fn ns_of(pid: u32, kind: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}")).ok().map(|m| m.ino())
}

/// Whether `pid` is gone (or a zombie waiting for its parent: holding no namespace, file or mount).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn pid_file(path: std::path::PathBuf) -> u32 {
    let s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.trim().parse().unwrap_or_else(|e| panic!("{}: {s:?}: {e}", path.display()))
}

fn machine_libvirtd() -> u32 {
    pid_file("/run/libvirtd.pid".into())
}

#[test]
fn three_hosts_each_run_a_guest_in_isolation_and_down_leaves_nothing() {
    ensure_libvirtd();
    let machine_pid = machine_libvirtd();
    let machine_domains = all_domain_names();

    let t = Instant::now();
    let mut bed = Bed::up(3);
    let up = t.elapsed();
    assert_eq!(bed.hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["h0", "h1", "h2"]);

    // The same guest name on every host (hosts are separate libvirts), plus one only on h0.
    let mut starts = Vec::new();
    for i in 0..3 {
        bed.define_small_guest(i, "bed-guest", "bed-guest.qcow2");
        let t = Instant::now();
        bed.virsh_ok(i, &["start", "bed-guest"]);
        starts.push(t.elapsed());
        assert_eq!(bed.virsh_ok(i, &["domstate", "bed-guest"]).trim(), "running", "on h{i}");
    }
    bed.define_small_guest(0, "bed-only-h0", "only.qcow2");
    // A file put into h0's pool is a volume there, and only there.
    let src = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(src.path(), b"bed").expect("write");
    assert_eq!(bed.put_in_pool(0, src.path(), "put.raw"), "/var/lib/libvirt/images/put.raw");
    assert_eq!(std::fs::read(bed.pool_dir(0).join("put.raw")).expect("read put.raw"), b"bed");
    bed.virsh_ok(0, &["vol-info", "--pool", "default", "put.raw"]);
    assert!(!bed.virsh(1, &["vol-info", "--pool", "default", "put.raw"]).status.success());
    // Every host has an isolated network `default` (its own bridge), active.
    for i in 0..3 {
        let nets = bed.virsh_ok(i, &["net-list", "--name"]);
        assert!(nets.lines().any(|l| l.trim() == "default"), "h{i} networks: {nets}");
        bed.exec_ok(i, &["ip", "link", "show", "virbr0"]);
    }

    let mut pids = Vec::new();
    for i in 0..3 {
        let dir = bed.host_dir(i);
        // The guest's QEMU runs in host i's network namespace.
        let qemu = pid_file(dir.join("run/libvirt/qemu/bed-guest.pid"));
        let netns = std::fs::metadata(format!("/run/netns/{}", bed.netns(i))).expect("host netns").ino();
        assert_eq!(ns_of(qemu, "net"), Some(netns), "h{i}'s guest is not in h{i}'s network namespace");
        // Its libvirtd is not the machine's and lives in a mount namespace of its own.
        let libvirtd = pid_file(dir.join("run/libvirt/libvirtd.pid"));
        assert_ne!(libvirtd, machine_pid);
        assert_ne!(ns_of(libvirtd, "mnt"), ns_of(std::process::id(), "mnt"), "h{i}'s libvirtd");
        let virtlogd = pid_file(dir.join("run/libvirt/virtlogd.pid"));
        let pool_helper = pid_file(dir.join("log/pool-helper.pid"));
        pids.extend([qemu, libvirtd, virtlogd, pool_helper]);

        // Isolation: h0's own domain is seen on h0 only, and no bed domain on the machine.
        let names = bed.virsh_ok(i, &["list", "--all", "--name"]);
        assert_eq!(names.lines().any(|l| l.trim() == "bed-only-h0"), i == 0, "h{i} lists:\n{names}");
        assert!(!bed.virsh(i, &["dominfo", "bed-only-h0"]).status.success() || i == 0);
        // Inside, the host's own files: its pool, its hook, its pool-helper config.
        let pool = bed.exec_ok(i, &["ls", "/var/lib/libvirt/images"]);
        assert!(pool.lines().any(|l| l == "bed-guest.qcow2"), "h{i}: {pool}");
        assert_eq!(pool.lines().any(|l| l == "only.qcow2"), i == 0, "h{i}: {pool}");
        bed.exec_ok(i, &["test", "-x", "/etc/libvirt/hooks/qemu.d/50-virt-clone-cow"]);
        let config = bed.exec_ok(i, &["cat", "/etc/pool-helper/config.toml"]);
        for (j, other) in bed.hosts.iter().enumerate() {
            assert_eq!(config.contains(&format!("\"{}:6881\"", other.address)), j != i, "h{i}'s peers: {config}");
        }

        // Its pool-helper answers `status` on its socket, inside and from the root namespace.
        let bin = pool_helper_bin();
        bed.exec_ok(i, &[bin.as_os_str(), OsStr::new("status"), OsStr::new("--json")]);
        let o = std::process::Command::new(pool_helper_bin())
            .arg("--control-socket")
            .arg(bed.control_socket(i))
            .args(["status", "--json"])
            .output()
            .expect("run pool-helper status");
        assert!(o.status.success(), "h{i}: status: {}", String::from_utf8_lossy(&o.stderr));
        // Reachable from the next host at its address, on the port peers use.
        let next = &bed.hosts[(i + 1) % 3].address;
        let probe = format!("import socket; socket.create_connection(('{next}', 6881), 5).close()");
        bed.exec_ok(i, &["python3", "-c", &probe]);
    }
    // Hosts reach each other's libvirt over ssh by host name: a live migration with its storage.
    assert_eq!(bed.exec_ok(1, &["hostname"]).trim(), bed.hostname(1));
    assert_eq!(bed.exec_ok(0, &["virsh", "-c", &bed.ssh_uri(2), "hostname"]).trim(), bed.hostname(2));
    bed.virsh_ok(0, &["start", "bed-only-h0"]);
    let t = Instant::now();
    let dest = bed.ssh_uri(1);
    let migrate = ["virsh", "migrate", "--live", "--persistent", "--undefinesource", "--copy-storage-all"];
    bed.exec_ok(0, &[&migrate[..], &["bed-only-h0", &dest]].concat());
    let migration = t.elapsed();
    assert_eq!(bed.virsh_ok(1, &["domstate", "bed-only-h0"]).trim(), "running");
    assert!(!bed.virsh(0, &["dominfo", "bed-only-h0"]).status.success(), "bed-only-h0 still defined on h0");
    pids.push(pid_file(bed.host_dir(1).join("run/libvirt/qemu/bed-only-h0.pid")));

    let after: Vec<String> = all_domain_names().into_iter().filter(|d| d.starts_with("bed-")).collect();
    let before: Vec<&String> = machine_domains.iter().filter(|d| d.starts_with("bed-")).collect();
    assert_eq!(after.len(), before.len(), "a bed domain appeared on the machine's libvirtd: {after:?}");

    let t = Instant::now();
    let o = bed.down();
    let down = t.elapsed();
    assert!(o.status.success(), "bed down: {}", String::from_utf8_lossy(&o.stderr));
    eprintln!(
        "bed timings: up (3 hosts) {up:.1?}; first guest start {:.1?}; next {:.1?}, {:.1?}; \
         live migration h0 -> h1 with 64 MiB storage {migration:.1?}; down {down:.1?}",
        starts[0], starts[1], starts[2]
    );

    // Nothing left: processes, namespaces, mounts, files.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&p| gone(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in &pids {
        assert!(gone(*p), "process {p} of the bed still runs after down");
    }
    let netns = run_ok("ip", &["netns", "list"]);
    assert!(!netns.contains(&bed.prefix), "namespaces left: {netns}");
    let root = format!("{BED_ROOT}/{}", bed.prefix);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&root), "mounts left:\n{mounts}");
    assert!(!std::path::Path::new(&root).exists(), "{root} left");
    // The machine's own libvirtd still runs and answers.
    assert_eq!(machine_libvirtd(), machine_pid);
    assert!(!gone(machine_pid));
    virsh_ok(&["version"]);
    // A second down finds nothing and succeeds.
    assert!(bed.down().status.success());
}

#[test]
fn a_master_published_on_one_host_is_in_the_others_catalogs_and_fetched_by_them_through_their_daemons() {
    let bed = Bed::up_with(3, 100.0);
    let bin = pool_helper_bin();
    let ph = bin.to_str().expect("utf-8 path");
    let master = "/var/lib/libvirt/images/bed-master.qcow2";
    bed.exec_ok(0, &["qemu-img", "create", "-q", "-f", "qcow2", master, "64M"]);
    bed.exec_ok(0, &["qemu-io", "-c", "write -P 0x5a 0 16M", master]);
    bed.virsh_ok(0, &["pool-refresh", "default"]);
    let manifest = bed.exec_ok(0, &[ph, "publish", "--pool", "default", "bed-master.qcow2"]).trim().to_string();
    // Signed by h0's key, it joins h1's and h2's LAN catalogs, signer h0, within seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 1..3 {
        loop {
            let cat = bed.catalog(i);
            let e = cat.iter().find(|e| e["name"] == "bed-master.qcow2");
            if let Some(e) = e {
                assert_eq!(e["signer"], bed.hostname(0).as_str(), "h{i}: {e}");
                break;
            }
            assert!(Instant::now() < deadline, "h{i}'s catalog has no bed-master.qcow2: {cat:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The manifest, as an administrator would copy it to the other hosts.
    let inside = manifest.strip_prefix("/var/lib/").expect("manifest under /var/lib");
    let copy = bed.host_dir(0).parent().expect("bed dir").join("bed-master.json");
    std::fs::copy(bed.host_dir(0).join("varlib/upper").join(inside), &copy).expect("copy manifest");
    let copy = copy.to_str().expect("utf-8 path");

    let t = Instant::now();
    let fetches: Vec<_> = (1..3)
        .map(|i| {
            let mut c = std::process::Command::new(bed_script());
            c.args(["exec", "--prefix", &bed.prefix, &bed.hosts[i].name, "--", ph, "fetch", "--pool", "default", copy]);
            c.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn fetch")
        })
        .collect();
    for (i, child) in (1..3).zip(fetches) {
        let o = wait_output(child, Duration::from_secs(180));
        assert!(o.status.success(), "fetch on h{i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    eprintln!("bed timings: 16 MiB of data in a qcow2 master fetched by 2 hosts at 100 Mbit/s: {:.1?}", t.elapsed());
    let sums: Vec<String> = (0..3)
        .map(|i| bed.exec_ok(i, &["sha256sum", master]).split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    assert!(!sums[0].is_empty());
    assert_eq!(sums, [sums[0].clone(), sums[0].clone(), sums[0].clone()], "copies differ");
    // Each host's copy is a volume of its own pool.
    for i in 1..3 {
        bed.virsh_ok(i, &["vol-info", "--pool", "default", "bed-master.qcow2"]);
    }

    // The whole chain on a host: plain XML on h2 naming only the path of a master h0 published
    // (docs/many-hosts.md section 4); its start has the hook ask h2's daemon, which finds it in
    // the catalog, fetches it from h0 and lets the overlay be made.
    let base = "/var/lib/libvirt/images/bed-base.qcow2";
    bed.exec_ok(0, &["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"]);
    bed.virsh_ok(0, &["pool-refresh", "default"]);
    bed.exec_ok(0, &[ph, "publish", "--pool", "default", "bed-base.qcow2"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !bed.catalog(2).iter().any(|e| e["name"] == "bed-base.qcow2") {
        assert!(Instant::now() < deadline, "h2's catalog has no bed-base.qcow2");
        std::thread::sleep(Duration::from_millis(200));
    }
    let xml = small_guest_xml("bed-plain", "/var/lib/libvirt/images/bed-plain.qcow2").replace(
        "</disk>",
        &format!("<backingStore type='file'><format type='qcow2'/><source file='{base}'/></backingStore></disk>"),
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), xml).expect("write xml");
    bed.virsh_ok(2, &[OsStr::new("define"), file.path().as_os_str()]);
    assert!(!bed.exec(2, &["test", "-e", base]).status.success(), "h2 has the master before the start");
    let t = Instant::now();
    bed.virsh_ok(2, &["start", "bed-plain"]);
    eprintln!("bed timings: start of a plain-XML guest on h2 whose master is fetched from h0: {:.1?}", t.elapsed());
    assert_eq!(bed.virsh_ok(2, &["domstate", "bed-plain"]).trim(), "running");
    let sum = |i| bed.exec_ok(i, &["sha256sum", base]).split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(sum(2), sum(0));
}
