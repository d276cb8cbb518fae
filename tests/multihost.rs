//! `virt-clone-cow --host URI ...` against real libvirt hosts: host A is this machine's libvirtd
//! (qemu:///system, which holds the template), hosts B and C are libvirtds of their own, each in
//! its own mount namespace (own /etc/libvirt, /var/lib/libvirt, /run, no hook), reached by
//! `qemu+unix:///system?socket=...` URIs: remote hosts as far as virt-clone-cow can tell.
//!
//! Most tests start B and C here ([`NsHost`]: libvirtd only, quick); the last one runs on the
//! multi-host test bed (`tests/support/bed.rs`, docs/bed.md), where every host has its hook and
//! pool-helper daemon, so the master swarms to the hosts that lack it at the first start.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use vcc_core::metadata::{CowMetadata, MasterRef, TemplateInfo, NAMESPACE};
use vcc_tests::*;

/// A libvirtd (with its virtlogd) in its own mount namespace, its state under `base`.
struct NsHost {
    base: PathBuf,
    uri: String,
}

impl NsHost {
    /// Starts the host; with `hook`, this build's hook is installed in its /etc/libvirt/hooks,
    /// with a hook.toml of its own (no pool-helper daemon: a missing master cannot be fetched).
    fn start(base: PathBuf, hook: bool) -> NsHost {
        let _ = std::fs::remove_dir_all(&base);
        for d in [
            "etc/qemu/networks",
            "etc/storage",
            "etc/hooks/qemu.d",
            "lib",
            "run/libvirt",
            "log",
            "cache",
            "pool",
            "vcc",
        ] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        if hook {
            std::fs::copy(target_bin("virt-clone-cow-hook"), base.join("etc/hooks/qemu.d/50-virt-clone-cow")).unwrap();
            std::fs::write(
                base.join("vcc/hook.toml"),
                format!(
                    "control_socket = \"{}/no-daemon.sock\"\nfetch_timeout = 2\nconnect_timeout = 1\n\
                     allowed_dirs = [\"{BASE_DIR}\"]\n",
                    base.display()
                ),
            )
            .unwrap();
        }
        // The daemon settings only: no domains, networks, pools or hooks of this host's.
        for e in std::fs::read_dir("/etc/libvirt").unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "conf") {
                std::fs::copy(&p, base.join("etc").join(p.file_name().unwrap())).unwrap();
            }
        }
        let b = base.to_str().unwrap();
        // The hook's settings are the host's own too (/etc/virt-clone-cow).
        std::fs::create_dir_all("/etc/virt-clone-cow").unwrap();
        let script = format!(
            "set -e; mount --bind {b}/etc /etc/libvirt; mount --bind {b}/vcc /etc/virt-clone-cow; mount --bind {b}/lib /var/lib/libvirt; \
             mount --bind {b}/run /run; mount --bind {b}/log /var/log/libvirt; \
             mount --bind {b}/cache /var/cache/libvirt; /usr/sbin/virtlogd -d; /usr/sbin/libvirtd -d"
        );
        run_ok("unshare", &["-m", "--propagation", "private", "sh", "-c", &script]);
        let uri = format!("qemu+unix:///system?socket={b}/run/libvirt/libvirt-sock");
        let host = NsHost { base, uri };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !host.virsh(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "the libvirtd at {} did not answer", host.uri);
            std::thread::sleep(Duration::from_millis(100));
        }
        host
    }

    fn virsh(&self, args: &[&str]) -> Output {
        let mut v = vec!["-q", "-c", &self.uri];
        v.extend_from_slice(args);
        run("virsh", &v)
    }

    fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(out.status.success(), "virsh -c {} {args:?}: {}", self.uri, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pool_dir(&self) -> PathBuf {
        self.base.join("pool")
    }
}

impl Drop for NsHost {
    fn drop(&mut self) {
        // Guests first (QEMU outlives libvirtd), then the daemons by their pid files.
        for d in names_on(&self.uri) {
            let _ = self.virsh(&["destroy", &d]);
        }
        for daemon in ["libvirtd", "virtlogd"] {
            if let Ok(pid) = std::fs::read_to_string(self.base.join(format!("run/{daemon}.pid"))) {
                let _ = run("kill", &[pid.trim()]);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.base.join("run/libvirtd.pid").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Every domain name on the host at `uri`.
fn names_on(uri: &str) -> Vec<String> {
    let out = run("virsh", &["-q", "-c", uri, "list", "--all", "--name"]);
    String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
}

/// Hosts A (this machine's libvirtd, with the env's pool), B and C, each B and C with a dir pool
/// of the env's pool name.
struct NsBed {
    env: TestEnv,
    b: NsHost,
    c: NsHost,
}

impl NsBed {
    fn new(test: &str) -> NsBed {
        NsBed::with_hook_on_b(test, false)
    }

    fn with_hook_on_b(test: &str, hook: bool) -> NsBed {
        ensure_libvirtd();
        let env = TestEnv::new(&format!("mh-{test}"));
        let [b, c] = ["b", "c"]
            .map(|h| NsHost::start(PathBuf::from(BASE_DIR).join(format!("{}.host-{h}", env.prefix)), hook && h == "b"));
        for h in [&b, &c] {
            h.virsh_ok(&["pool-define-as", &env.pool, "dir", "--target", h.pool_dir().to_str().unwrap()]);
            h.virsh_ok(&["pool-start", &env.pool]);
        }
        NsBed { env, b, c }
    }

    /// The URIs in the order `--host B --host C --host A`.
    fn uris(&self) -> [&str; 3] {
        [&self.b.uri, &self.c.uri, URI]
    }

    /// A BIOS template on A with a qcow2 master `base.qcow2` (vda) in the env's pool and
    /// `nics` NICs; `interfaces` replaces the NICs' `type='user'` (e.g. a network source).
    /// Its metadata records the master's identity, as `virt-clone-cow publish` would.
    fn template(&self, nics: usize, interface: Option<&str>) -> (String, String) {
        let name = self.env.name("-tmpl");
        let master = self.env.in_pool("base.qcow2");
        make_qcow2(&master, 16);
        self.env.refresh_pool();
        let mut spec = DomainSpec::new(&name, false).disk(DiskSpec::File {
            path: master.clone(),
            format: "qcow2".into(),
            target: "vda".into(),
        });
        spec.nics = nics;
        // No VNC: the hosts share this machine's ports, and each libvirtd would pick 5900.
        let mut xml = spec.xml().replace("<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>", "");
        if let Some(i) = interface {
            xml = xml.replace("<interface type='user'>", i);
        }
        define_xml(&xml);
        let md = CowMetadata {
            template: Some(TemplateInfo {
                masters: vec![MasterRef {
                    target: Some("vda".into()),
                    path: master.clone(),
                    format: "qcow2".into(),
                    pool: Some(self.env.pool.clone()),
                    volume: Some("base.qcow2".into()),
                    sha256: Some(SHA.into()),
                    info_hash: Some(INFO_HASH.into()),
                    ..Default::default()
                }],
            }),
            clone: None,
        };
        virsh_ok(&["metadata", &name, NAMESPACE, "--key", "vcc", "--set", &md.to_bare_xml()]);
        (name, master)
    }

    /// Runs `virt-clone-cow --json --host B --host C --host A ARGS...`.
    fn clone(&self, args: &[&str]) -> CliRun {
        let mut v: Vec<&str> = vec!["--json"];
        for u in self.uris() {
            v.extend(["--host", u]);
        }
        v.extend_from_slice(args);
        cli(&v)
    }

    /// The names of this env's domains on every host, host by host.
    fn env_domains(&self) -> [Vec<String>; 3] {
        self.uris().map(|u| names_on(u).into_iter().filter(|n| n.starts_with(&self.env.prefix)).collect())
    }

    /// The files in the pool directory of B and C.
    fn remote_pool_files(&self) -> [Vec<String>; 2] {
        [&self.b, &self.c].map(|h| {
            let mut v: Vec<String> = std::fs::read_dir(h.pool_dir())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        })
    }
}

const SHA: &str = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";
const INFO_HASH: &str = "0123456789abcdef0123456789abcdef01234567";

fn macs_of(uri: &str, name: &str) -> Vec<String> {
    let xml = run_ok("virsh", &["-q", "-c", uri, "dumpxml", "--inactive", name]);
    vcc_core::xml::DomainFacts::parse(&xml).unwrap().macs.into_iter().flatten().collect()
}

#[test]
fn six_clones_over_three_hosts_are_two_per_host_with_every_mac_unique_and_the_master_named_by_identity() {
    let bed = NsBed::new("six");
    let (tmpl, master) = bed.template(2, None);
    let web = bed.env.name("-web");
    let run = bed.clone(&["--original", &tmpl, "--name", &web, "--count", "6"]);
    run.assert_ok();
    let report = run.json();
    let hosts = report["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 3, "{report:#}");

    // Round-robin in the order of --host: web-1, web-4 on B; web-2, web-5 on C; web-3, web-6 on A.
    let want: [Vec<String>; 3] = [[1, 4], [2, 5], [3, 6]].map(|ns| ns.iter().map(|i| format!("{web}-{i}")).collect());
    let mut on_hosts = bed.env_domains();
    for d in &mut on_hosts {
        d.retain(|n| *n != tmpl);
        d.sort();
    }
    assert_eq!(on_hosts, want, "each host has its two clones and only those");
    for (h, uri) in bed.uris().iter().enumerate() {
        assert_eq!(hosts[h]["uri"], *uri);
        let names: Vec<&str> =
            hosts[h]["clones"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, want[h].iter().map(String::as_str).collect::<Vec<_>>());
    }

    // Every MAC unique across the hosts (2 NICs each), as the hosts themselves have them.
    let mut macs = Vec::new();
    for (h, uri) in bed.uris().iter().enumerate() {
        for n in &want[h] {
            let m = macs_of(uri, n);
            assert_eq!(m.len(), 2, "{n} on {uri}");
            macs.extend(m);
        }
    }
    macs.extend(macs_of(URI, &tmpl));
    let unique: HashSet<&String> = macs.iter().collect();
    assert_eq!(unique.len(), 14, "MACs repeat across hosts: {macs:?}");

    // B and C lack the master: no overlay is made there now (the hook makes it at the first
    // start); the clone names the master by B's path and by identity.
    for (h, host) in [&bed.b, &bed.c].iter().enumerate() {
        assert_eq!(hosts[h]["masters"][0]["present"], false, "{report:#}");
        let pool_master = host.pool_dir().join("base.qcow2");
        for n in &want[h] {
            let xml = host.virsh_ok(&["dumpxml", "--inactive", n]);
            let facts = vcc_core::xml::DomainFacts::parse(&xml).unwrap();
            let overlay = host.pool_dir().join(format!("{n}-vda.qcow2"));
            assert!(
                matches!(&facts.disks[0].source, vcc_core::xml::DiskSource::File(p) if Path::new(p) == overlay),
                "{xml}"
            );
            assert!(xml.contains(&format!("<source file='{}'", pool_master.display())), "backing store: {xml}");
            let md = CowMetadata::parse(facts.vcc_metadata.as_deref().unwrap()).unwrap();
            let m = &md.clone.unwrap().disks[0].master;
            assert_eq!(m.path, pool_master.to_str().unwrap());
            assert_eq!((m.sha256.as_deref(), m.info_hash.as_deref()), (Some(SHA), Some(INFO_HASH)));
            assert_eq!(m.pool.as_deref(), Some(bed.env.pool.as_str()));
        }
    }
    assert_eq!(bed.remote_pool_files(), [Vec::<String>::new(), Vec::new()], "nothing made in B's and C's pools yet");

    // A has the master: its overlays are made now, over A's master.
    assert_eq!(hosts[2]["masters"][0]["present"], true);
    for n in &want[2] {
        let overlay = bed.env.in_pool(&format!("{n}-vda.qcow2"));
        let info = run_ok("qemu-img", &["info", "--output=json", "-U", &overlay]);
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["backing-filename"], master.as_str(), "{info:#}");
    }
    // The original is a template now, its identity kept.
    let md = cow_metadata(&tmpl).unwrap();
    assert_eq!(md.template.unwrap().masters[0].sha256.as_deref(), Some(SHA));
}

#[test]
fn a_network_missing_on_one_host_is_refused_before_anything_is_defined_naming_the_host() {
    let bed = NsBed::new("nonet");
    let net = format!("{}-net", bed.env.prefix);
    let bridge = format!("vcb{}", std::process::id() % 100_000);
    let (tmpl, master) = bed.template(1, Some(&format!("<interface type='network'><source network='{net}'/>")));
    let net_xml = bed.env.in_work("net.xml");
    std::fs::write(&net_xml, format!("<network><name>{net}</name><bridge name='{bridge}'/></network>")).unwrap();
    // Defined (not started) on A and B only.
    virsh_ok(&["net-define", &net_xml]);
    bed.b.virsh_ok(&["net-define", &net_xml]);
    let before = Snapshot::take(&bed.env, &tmpl, &[&master]);

    let run = bed.clone(&["--original", &tmpl, "--name", &bed.env.name("-web"), "--count", "3"]);
    let _ = virsh(&["net-undefine", &net]);
    run.assert_error(1, &[&format!("host '{}'", bed.c.uri), &format!("network '{net}' is not defined")]);
    assert_eq!(bed.env_domains(), [vec![], vec![], vec![tmpl.clone()]], "nothing defined anywhere");
    assert_eq!(bed.remote_pool_files(), [Vec::<String>::new(), Vec::new()]);
    before.assert_unchanged(&bed.env, &tmpl, &[&master]);
    assert!(cow_metadata(&tmpl).unwrap().clone.is_none());
}

#[test]
fn a_name_taken_on_one_host_is_refused_and_nothing_is_left_anywhere() {
    let bed = NsBed::new("taken");
    let (tmpl, master) = bed.template(1, None);
    let web = bed.env.name("-web");
    // web-2 goes to C, which has a domain of that name already.
    let taken = format!("{web}-2");
    let xml = bed.env.in_work("taken.xml");
    std::fs::write(&xml, DomainSpec::new(&taken, false).xml()).unwrap();
    bed.c.virsh_ok(&["define", &xml]);
    let before = Snapshot::take(&bed.env, &tmpl, &[&master]);
    let md_before = cow_metadata(&tmpl);

    let run = bed.clone(&["--original", &tmpl, "--name", &web, "--count", "3"]);
    run.assert_error(1, &[&format!("host '{}'", bed.c.uri), &format!("a domain named '{taken}' exists already")]);
    assert_eq!(bed.env_domains(), [vec![], vec![taken.clone()], vec![tmpl.clone()]], "only what was there before");
    assert_eq!(bed.remote_pool_files(), [Vec::<String>::new(), Vec::new()]);
    before.assert_unchanged(&bed.env, &tmpl, &[&master]);
    assert_eq!(cow_metadata(&tmpl), md_before, "the template's metadata is as it was");
}

#[test]
fn a_start_failing_on_one_host_undoes_every_host_running_clones_included() {
    let bed = NsBed::new("startfail");
    let (tmpl, master) = bed.template(1, None);
    // B has the master (so its clones start); C has not and runs no hook or pool-helper, so
    // QEMU finds no overlay there and the start fails.
    std::fs::copy(&master, bed.b.pool_dir().join("base.qcow2")).unwrap();
    let before = Snapshot::take(&bed.env, &tmpl, &[&master]);
    let md_before = cow_metadata(&tmpl);
    let web = bed.env.name("-web");

    let run = bed.clone(&["--original", &tmpl, "--name", &web, "--count", "3", "--start"]);
    run.assert_error(1, &[&format!("host '{}'", bed.c.uri), &format!("starting '{web}-2'")]);
    assert_eq!(bed.env_domains(), [vec![], vec![], vec![tmpl.clone()]], "nothing left on any host");
    assert_eq!(bed.remote_pool_files(), [vec!["base.qcow2".to_string()], vec![]], "B's overlay was removed");
    before.assert_unchanged(&bed.env, &tmpl, &[&master]);
    assert_eq!(cow_metadata(&tmpl), md_before, "the template mark was removed again");
}

#[test]
fn start_runs_every_hosts_clones_and_reports_each_start_time() {
    let bed = NsBed::new("start");
    let (tmpl, master) = bed.template(1, None);
    for h in [&bed.b, &bed.c] {
        std::fs::copy(&master, h.pool_dir().join("base.qcow2")).unwrap();
    }
    let web = bed.env.name("-web");
    let run = bed.clone(&["--original", &tmpl, "--name", &web, "--count", "3", "--start"]);
    run.assert_ok();
    let report = run.json();
    for (h, uri) in bed.uris().iter().enumerate() {
        let host = &report["hosts"][h];
        assert_eq!(host["masters"][0]["present"], true, "{report:#}");
        let c = &host["clones"][0];
        let name = c["name"].as_str().unwrap();
        assert_eq!(name, format!("{web}-{}", h + 1));
        assert_eq!(c["started"], true);
        assert!(c["start_ms"].as_f64().unwrap() > 0.0, "{report:#}");
        let state = run_ok("virsh", &["-q", "-c", uri, "domstate", name]);
        assert_eq!(state.trim(), "running", "{name} on {uri}");
    }
}

#[test]
fn on_a_host_without_the_master_the_hook_makes_the_overlay_at_the_first_start() {
    let bed = NsBed::with_hook_on_b("hookdisk", true);
    let (tmpl, master) = bed.template(1, None);
    let web = bed.env.name("-web");
    let run = cli(&["--json", "--original", &tmpl, "--name", &web, "--host", &bed.b.uri]);
    run.assert_ok();
    let report = run.json();
    assert_eq!(report["hosts"][0]["masters"][0]["present"], false, "{report:#}");
    let overlay = bed.b.pool_dir().join(format!("{web}-vda.qcow2"));
    assert!(!overlay.exists(), "nothing is made on B before the start");

    // Without the master (and no pool-helper to fetch it) the start fails and makes nothing.
    let out = bed.b.virsh(&["start", &web]);
    assert!(!out.status.success(), "started without its master");
    assert!(!overlay.exists());

    // The master arrives (as pool-helper would put it); the next start makes the overlay over it.
    let b_master = bed.b.pool_dir().join("base.qcow2");
    std::fs::copy(&master, &b_master).unwrap();
    bed.b.virsh_ok(&["start", &web]);
    assert_eq!(bed.b.virsh_ok(&["domstate", &web]).trim(), "running");
    let info = run_ok("qemu-img", &["info", "--output=json", "-U", overlay.to_str().unwrap()]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], b_master.to_str().unwrap(), "{info:#}");
    assert_eq!(info["format"], "qcow2");
}

#[test]
fn dry_run_prints_each_hosts_share_and_changes_nothing() {
    let bed = NsBed::new("dry");
    let (tmpl, master) = bed.template(1, None);
    std::fs::copy(&master, bed.c.pool_dir().join("base.qcow2")).unwrap();
    let before = Snapshot::take(&bed.env, &tmpl, &[&master]);
    let md_before = cow_metadata(&tmpl);
    let web = bed.env.name("-web");
    let mut args: Vec<&str> = vec!["--original", &tmpl, "--name", &web, "--count", "5", "--dry-run"];
    for u in bed.uris() {
        args.extend(["--host", u]);
    }
    let run = cli(&args);
    run.assert_ok();
    let out = &run.stdout;
    assert!(out.starts_with(&format!("Dry run: would make 5 linked clone(s) of '{tmpl}' on 3 host(s)")), "{out}");
    for (uri, n, present) in [(bed.b.uri.as_str(), 2, false), (bed.c.uri.as_str(), 2, true), (URI, 1, true)] {
        assert!(out.contains(&format!("host {uri}: {n} clone(s)\n")), "{out}");
        let section = out.split(&format!("host {uri}:")).nth(1).unwrap();
        let says =
            if present { "(there: overlays through the storage API)" } else { "(missing: the host's pool-helper" };
        assert!(section.lines().nth(1).unwrap().contains(says), "{uri}: {out}");
    }
    assert_eq!(bed.env_domains(), [vec![], vec![], vec![tmpl.clone()]]);
    assert_eq!(bed.remote_pool_files(), [vec![], vec!["base.qcow2".to_string()]]);
    before.assert_unchanged(&bed.env, &tmpl, &[&master]);
    assert_eq!(cow_metadata(&tmpl), md_before);
}

/// The whole story on the test bed: a template on h0 with a published master; 6 clones over h1,
/// h2, h0 made from h0 and started; h1 and h2 fetch the master through their pool-helpers at the
/// first start (named by identity in the clones' metadata), the hook makes the overlays.
#[test]
fn on_the_bed_six_started_clones_over_three_hosts_with_the_master_fetched_by_the_others() {
    let bed = Bed::up_with(3, 100.0);
    let bin = pool_helper_bin();
    let ph = bin.to_str().unwrap();
    let master = "/var/lib/libvirt/images/base.qcow2";
    bed.exec_ok(0, &["qemu-img", "create", "-q", "-f", "qcow2", master, "64M"]);
    bed.exec_ok(0, &["qemu-io", "-c", "write -P 0x5a 0 16M", master]);
    bed.virsh_ok(0, &["pool-refresh", "default"]);
    let manifest = bed.exec_ok(0, &[ph, "publish", "--pool", "default", "base.qcow2"]).trim().to_string();
    let inside = manifest.strip_prefix("/var/lib/").unwrap();
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(bed.host_dir(0).join("varlib/upper").join(inside)).unwrap())
            .unwrap();
    let (sha, info_hash) = (m["sha256"].as_str().unwrap().to_string(), m["info_hash"].as_str().unwrap().to_string());

    // The template: one disk on the master, one NIC on the host's network `default`.
    let tmpl = "tmpl";
    let xml = small_guest_xml(tmpl, master)
        .replace("</devices>", "<interface type='network'><source network='default'/></interface></devices>");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), xml).unwrap();
    bed.virsh_ok(0, &[std::ffi::OsStr::new("define"), file.path().as_os_str()]);
    let md = CowMetadata {
        template: Some(TemplateInfo {
            masters: vec![MasterRef {
                target: Some("vda".into()),
                path: master.into(),
                format: "qcow2".into(),
                pool: Some("default".into()),
                volume: Some("base.qcow2".into()),
                sha256: Some(sha.clone()),
                info_hash: Some(info_hash.clone()),
                manifest: Some(manifest.clone()),
                ..Default::default()
            }],
        }),
        clone: None,
    };
    bed.virsh_ok(0, &["metadata", tmpl, NAMESPACE, "--key", "vcc", "--set", &md.to_bare_xml()]);

    let uris: Vec<&str> = [1, 2, 0].iter().map(|&i| bed.hosts[i].uri.as_str()).collect();
    let mut args = vec!["--connect", bed.hosts[0].uri.as_str(), "--json", "--original", tmpl, "--name", "web"];
    args.extend(["--count", "6", "--start"]);
    for u in &uris {
        args.extend(["--host", u]);
    }
    let t = Instant::now();
    let out = run(cli_path().to_str().unwrap(), &args);
    let took = t.elapsed();
    assert!(out.status.success(), "virt-clone-cow failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut macs = HashSet::new();
    for (h, &i) in [1usize, 2, 0].iter().enumerate() {
        let host = &report["hosts"][h];
        assert_eq!(host["uri"], bed.hosts[i].uri.as_str());
        assert_eq!(host["masters"][0]["present"], i == 0, "{report:#}");
        let running = bed.virsh_ok(i, &["list", "--name", "--state-running"]);
        let mut running: Vec<&str> = running.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        running.sort();
        let want = [format!("web-{}", h + 1), format!("web-{}", h + 4)];
        assert_eq!(running, want, "h{i} runs its two clones");
        for n in &want {
            for mac in macs_of(&bed.hosts[i].uri, n) {
                assert!(macs.insert(mac.clone()), "MAC {mac} twice");
            }
        }
        // h1 and h2 got the master from the swarm, identical, a volume of their pool.
        let sum = bed.exec_ok(i, &["sha256sum", master]);
        assert_eq!(sum.split_whitespace().next(), Some(sha.as_str()), "h{i}");
        bed.virsh_ok(i, &["vol-info", "--pool", "default", "base.qcow2"]);
    }
    assert_eq!(macs.len(), 6);
    let starts: Vec<Vec<f64>> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["clones"].as_array().unwrap().iter().map(|c| c["start_ms"].as_f64().unwrap()).collect())
        .collect();
    eprintln!(
        "multihost bed timings: 6 clones over h1, h2, h0 (16 MiB of data in a 64 MiB qcow2 master, 100 Mbit/s), \
         command {took:.1?}; starts (ms) per host, first one including the master's arrival on h1 and h2: {starts:?}"
    );
}
