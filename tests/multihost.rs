//! `virt-clone-cow --host URI ...` on the multi-host test bed (`tests/support/bed.rs`,
//! docs/bed.md): three real libvirt hosts on this machine, each with its own libvirtd, `default`
//! pool and network, our hook and a pool-helper daemon. The template lives on h0; the clones are
//! made from h0 with `--host h1 --host h2 --host h0` (B, C, A). The hosts' URIs name their
//! sockets by path (`qemu+unix:///system?socket=...`): remote hosts as far as virt-clone-cow can
//! tell, so everything goes through libvirt.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::ffi::OsStr;
use std::time::Instant;

use serde_json::Value;
use vcc_core::metadata::{CowMetadata, MasterRef, TemplateInfo, NAMESPACE};
use vcc_core::xml::{DiskSource, DomainFacts};
use vcc_tests::*;

/// The template's master, in h0's `default` pool.
const MASTER: &str = "/var/lib/libvirt/images/base.qcow2";
const TMPL: &str = "tmpl";
/// The hosts in the order of `--host`: B, C, A.
const ORDER: [usize; 3] = [1, 2, 0];
/// An identity no host can fetch (no daemon has or finds it).
const SHA: &str = "5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";
const INFO_HASH: &str = "0123456789abcdef0123456789abcdef01234567";
const MANIFEST: &str = "/var/lib/pool-helper/manifests/base.json";

/// The master's identity as `virt-clone-cow publish` records it in a template.
fn identity(sha: &str, info_hash: &str, manifest: &str) -> CowMetadata {
    CowMetadata {
        template: Some(TemplateInfo {
            masters: vec![MasterRef {
                target: Some("vda".into()),
                path: MASTER.into(),
                format: "qcow2".into(),
                pool: Some("default".into()),
                volume: Some("base.qcow2".into()),
                sha256: Some(sha.into()),
                info_hash: Some(info_hash.into()),
                manifest: Some(manifest.into()),
                ..Default::default()
            }],
        }),
        clone: None,
    }
}

/// A qcow2 master with 16 MiB of data in h0's pool.
fn make_master(bed: &Bed) {
    bed.exec_ok(0, &["qemu-img", "create", "-q", "-f", "qcow2", MASTER, "64M"]);
    bed.exec_ok(0, &["qemu-io", "-c", "write -P 0x5a 0 16M", MASTER]);
    bed.virsh_ok(0, &["pool-refresh", "default"]);
}

/// Publishes the master on h0 (its pool-helper seeds it); returns its SHA-256, info-hash and
/// manifest path.
fn publish_on_h0(bed: &Bed) -> (String, String, String) {
    let bin = pool_helper_bin();
    let manifest = bed.exec_ok(0, &[bin.to_str().unwrap(), "publish", "--pool", "default", "base.qcow2"]);
    let manifest = manifest.trim().to_string();
    let inside = manifest.strip_prefix("/var/lib/").unwrap();
    let m = std::fs::read_to_string(bed.host_dir(0).join("varlib/upper").join(inside)).unwrap();
    let m: Value = serde_json::from_str(&m).unwrap();
    (m["sha256"].as_str().unwrap().to_string(), m["info_hash"].as_str().unwrap().to_string(), manifest)
}

/// The template `tmpl` on h0: one disk on the master, `nics` NICs on the network `default`, and
/// the master's identity in its metadata when given.
fn define_template(bed: &Bed, nics: usize, md: Option<&CowMetadata>) {
    let nic = "<interface type='network'><source network='default'/></interface>";
    let xml = small_guest_xml(TMPL, MASTER).replace("</devices>", &format!("{}</devices>", nic.repeat(nics)));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), xml).unwrap();
    bed.virsh_ok(0, &[OsStr::new("define"), file.path().as_os_str()]);
    if let Some(md) = md {
        bed.virsh_ok(0, &["metadata", TMPL, NAMESPACE, "--key", "vcc", "--set", &md.to_bare_xml()]);
    }
}

/// Runs `virt-clone-cow --connect h0 --host h1 --host h2 --host h0 ARGS...`.
fn clone_from_h0(bed: &Bed, args: &[&str]) -> CliRun {
    let mut v: Vec<&str> = vec!["--connect", &bed.hosts[0].uri];
    for i in ORDER {
        v.extend(["--host", &bed.hosts[i].uri]);
    }
    v.extend_from_slice(args);
    let out = run(cli_path().to_str().unwrap(), &v);
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every domain on host `i`, sorted.
fn domains(bed: &Bed, i: usize) -> Vec<String> {
    let out = bed.virsh_ok(i, &["list", "--all", "--name"]);
    let mut v: Vec<String> = out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    v.sort();
    v
}

/// The files in host `i`'s `default` pool, sorted.
fn pool_files(bed: &Bed, i: usize) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(bed.pool_dir(i))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn facts_on(bed: &Bed, i: usize, name: &str) -> DomainFacts {
    DomainFacts::parse(&bed.virsh_ok(i, &["dumpxml", "--inactive", name])).unwrap()
}

fn metadata_on(bed: &Bed, i: usize, name: &str) -> Option<CowMetadata> {
    facts_on(bed, i, name).vcc_metadata.map(|x| CowMetadata::parse(&x).unwrap())
}

/// What a refused or undone run must leave: every host as it was.
#[derive(Debug, PartialEq)]
struct State {
    domains: Vec<Vec<String>>,
    pools: Vec<Vec<String>>,
    template: Option<CowMetadata>,
}

fn state(bed: &Bed) -> State {
    State {
        domains: (0..3).map(|i| domains(bed, i)).collect(),
        pools: (0..3).map(|i| pool_files(bed, i)).collect(),
        template: metadata_on(bed, 0, TMPL),
    }
}

#[test]
fn six_clones_over_three_hosts_are_two_per_host_with_every_mac_unique_and_the_master_named_by_identity() {
    let bed = Bed::up(3);
    make_master(&bed);
    define_template(&bed, 2, Some(&identity(SHA, INFO_HASH, MANIFEST)));
    let run = clone_from_h0(&bed, &["--json", "--original", TMPL, "--name", "web", "--count", "6"]);
    run.assert_ok();
    let report = run.json();

    let mut macs: Vec<String> = facts_on(&bed, 0, TMPL).macs.into_iter().flatten().collect();
    for (h, i) in ORDER.into_iter().enumerate() {
        // Round-robin in the order of --host: web-1, web-4 on h1; web-2, web-5 on h2; web-3, web-6 on h0.
        let want = [format!("web-{}", h + 1), format!("web-{}", h + 4)];
        let mut have = domains(&bed, i);
        have.retain(|d| d != TMPL);
        assert_eq!(have, want, "h{i} has its two clones and only those");
        let host = &report["hosts"][h];
        assert_eq!(host["uri"], bed.hosts[i].uri.as_str());
        assert_eq!(host["masters"][0]["present"], i == 0, "{report:#}");
        for n in &want {
            let facts = facts_on(&bed, i, n);
            assert_eq!(facts.macs.iter().flatten().count(), 2, "{n}");
            macs.extend(facts.macs.iter().flatten().cloned());
            let overlay = format!("/var/lib/libvirt/images/{n}-vda.qcow2");
            assert!(matches!(&facts.disks[0].source, DiskSource::File(p) if *p == overlay), "{n} on h{i}");
            let md = metadata_on(&bed, i, n).unwrap();
            let m = &md.clone.unwrap().disks[0].master;
            assert_eq!((m.path.as_str(), m.pool.as_deref()), (MASTER, Some("default")));
            assert_eq!((m.sha256.as_deref(), m.info_hash.as_deref()), (Some(SHA), Some(INFO_HASH)));
            // The publishing host's manifest path only where the master is.
            assert_eq!(m.manifest.is_some(), i == 0, "{n} on h{i}: {m:?}");
        }
    }
    let unique: HashSet<&String> = macs.iter().collect();
    assert_eq!((macs.len(), unique.len()), (14, 14), "MACs repeat across hosts: {macs:?}");

    // h1 and h2 lack the master: nothing is made in their pools before the first start (the
    // hook makes the overlays then). h0 has it: its overlays are made now, over it.
    assert_eq!([pool_files(&bed, 1), pool_files(&bed, 2)], [Vec::<String>::new(), Vec::new()]);
    assert_eq!(pool_files(&bed, 0), ["base.qcow2", "web-3-vda.qcow2", "web-6-vda.qcow2"]);
    let info = bed.exec_ok(0, &["qemu-img", "info", "-U", "--output=json", "/var/lib/libvirt/images/web-3-vda.qcow2"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], MASTER, "{info:#}");
    // The original is a template now, its identity kept.
    let t = metadata_on(&bed, 0, TMPL).unwrap().template.unwrap();
    assert_eq!(t.masters[0].sha256.as_deref(), Some(SHA));
}

#[test]
fn a_network_missing_on_one_host_is_refused_before_anything_is_defined_naming_the_host() {
    let bed = Bed::up(3);
    make_master(&bed);
    define_template(&bed, 1, None);
    bed.virsh_ok(2, &["net-destroy", "default"]);
    bed.virsh_ok(2, &["net-undefine", "default"]);
    let before = state(&bed);
    let run = clone_from_h0(&bed, &["--original", TMPL, "--name", "web", "--count", "3"]);
    run.assert_error(1, &[&format!("host '{}'", bed.hosts[2].uri), "network 'default' is not defined"]);
    assert_eq!(state(&bed), before, "nothing defined or made on any host");
}

#[test]
fn a_name_taken_on_one_host_is_refused_and_nothing_is_left_anywhere() {
    let bed = Bed::up(3);
    make_master(&bed);
    define_template(&bed, 1, None);
    // web-2 goes to h2, which has a domain of that name already.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), small_guest_xml("web-2", "/var/lib/libvirt/images/other.qcow2")).unwrap();
    bed.virsh_ok(2, &[OsStr::new("define"), file.path().as_os_str()]);
    let before = state(&bed);
    let run = clone_from_h0(&bed, &["--original", TMPL, "--name", "web", "--count", "3"]);
    run.assert_error(1, &[&format!("host '{}'", bed.hosts[2].uri), "a domain named 'web-2' exists already"]);
    assert_eq!(state(&bed), before, "nothing defined or made on any host");
}

#[test]
fn a_start_failing_on_one_host_undoes_every_host_running_clones_and_hook_made_overlays_included() {
    let bed = Bed::up(3);
    make_master(&bed);
    let (sha, info_hash, manifest) = publish_on_h0(&bed);
    define_template(&bed, 1, Some(&identity(&sha, &info_hash, &manifest)));
    // h1 lacks the master: its pool-helper fetches it at the first start and the hook makes the
    // overlay, and the start succeeds. h2's hook reaches no daemon, so the start there fails.
    bed.exec_ok(
        2,
        &["sh", "-c", "printf 'control_socket = \"/run/no-such-daemon.sock\"\n' > /etc/virt-clone-cow/hook.toml"],
    );
    let before = state(&bed);
    let run = clone_from_h0(&bed, &["--original", TMPL, "--name", "web", "--count", "3", "--start"]);
    run.assert_error(1, &[&format!("host '{}'", bed.hosts[2].uri), "starting 'web-2'"]);
    // Every host as it was: clones stopped and undefined, overlays removed, the hook's on h1
    // included. A master the pool-helpers fetched stays (verified, shared by any clone): h1's
    // for its start, and h2's daemon may have prefetched it when web-2 was defined.
    let mut after = state(&bed);
    assert_eq!(after.pools[1], ["base.qcow2"], "the hook's overlay on h1 was removed");
    for i in [1, 2] {
        after.pools[i].retain(|f| f != "base.qcow2");
    }
    assert_eq!(after, before);
}

#[test]
fn dry_run_prints_each_hosts_share_and_changes_nothing() {
    let bed = Bed::up(3);
    make_master(&bed);
    define_template(&bed, 1, None);
    bed.put_in_pool(2, &bed.pool_dir(0).join("base.qcow2"), "base.qcow2");
    let before = state(&bed);
    let run = clone_from_h0(&bed, &["--original", TMPL, "--name", "web", "--count", "5", "--dry-run"]);
    run.assert_ok();
    let out = &run.stdout;
    assert!(out.starts_with(&format!("Dry run: would make 5 linked clone(s) of '{TMPL}' on 3 host(s)")), "{out}");
    for (i, n, present) in [(1, 2, false), (2, 2, true), (0, 1, true)] {
        let uri = &bed.hosts[i].uri;
        assert!(out.contains(&format!("host {uri}: {n} clone(s)\n")), "{out}");
        let section = out.split(&format!("host {uri}:")).nth(1).unwrap();
        let says =
            if present { "(there: overlays through the storage API)" } else { "(missing: the host's pool-helper" };
        assert!(section.lines().nth(1).unwrap().contains(says), "h{i}: {out}");
    }
    assert_eq!(state(&bed), before);
}

/// The whole story: a template with a published master on h0; 6 clones over h1, h2, h0 made from
/// h0 and started; h1 and h2 fetch the master through their pool-helpers at the first start
/// (named by identity in the clones' metadata), and the hook makes the overlays.
#[test]
fn started_clones_over_three_hosts_run_with_the_master_fetched_by_the_hosts_that_lacked_it() {
    let bed = Bed::up_with(3, 100.0);
    make_master(&bed);
    let (sha, info_hash, manifest) = publish_on_h0(&bed);
    let sha = sha.as_str();
    define_template(&bed, 1, Some(&identity(sha, &info_hash, &manifest)));

    let t = Instant::now();
    let run = clone_from_h0(&bed, &["--json", "--original", TMPL, "--name", "web", "--count", "6", "--start"]);
    let took = t.elapsed();
    run.assert_ok();
    let report = run.json();

    let mut macs = HashSet::new();
    for (h, i) in ORDER.into_iter().enumerate() {
        let host = &report["hosts"][h];
        assert_eq!(host["masters"][0]["present"], i == 0, "{report:#}");
        let running = bed.virsh_ok(i, &["list", "--name", "--state-running"]);
        let mut running: Vec<&str> = running.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        running.sort();
        let want = [format!("web-{}", h + 1), format!("web-{}", h + 4)];
        assert_eq!(running, want, "h{i} runs its two clones");
        for c in host["clones"].as_array().unwrap() {
            assert_eq!(c["started"], true);
            assert!(c["start_ms"].as_f64().unwrap() > 0.0, "{report:#}");
        }
        for n in &want {
            for mac in facts_on(&bed, i, n).macs.into_iter().flatten() {
                assert!(macs.insert(mac.clone()), "MAC {mac} twice");
            }
        }
        // h1 and h2 got the master from the swarm, identical, a volume of their pool.
        let sum = bed.exec_ok(i, &["sha256sum", MASTER]);
        assert_eq!(sum.split_whitespace().next(), Some(sha), "h{i}");
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
        "multihost timings: 6 clones over h1, h2, h0 (16 MiB of data in a 64 MiB qcow2 master, 100 Mbit/s): \
         command {took:.1?}; start_ms per host (h1, h2, h0; the first on h1 and h2 includes the master's arrival): \
         {starts:?}"
    );
}

#[test]
fn pool_map_puts_the_overlays_and_the_master_in_the_mapped_pool_of_each_host() {
    let bed = Bed::up(3);
    make_master(&bed);
    define_template(&bed, 1, None);
    for i in [1, 2] {
        bed.exec_ok(i, &["mkdir", "-p", "/var/lib/libvirt/imgs"]);
        bed.virsh_ok(i, &["pool-define-as", "imgs", "dir", "--target", "/var/lib/libvirt/imgs"]);
        bed.virsh_ok(i, &["pool-start", "imgs"]);
    }
    let (h1, h2) = (&bed.hosts[1].uri, &bed.hosts[2].uri);
    let args = ["--connect", &bed.hosts[0].uri, "--json", "--original", TMPL, "--name", "web", "--count", "2"];
    let run = |extra: &[&str]| {
        let mut v = args.to_vec();
        v.extend_from_slice(extra);
        run(cli_path().to_str().unwrap(), &v)
    };
    let out = run(&["--host", h1, "--host", h2, "--pool-map", "default=imgs"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (i, n) in [(1, "web-1"), (2, "web-2")] {
        let facts = facts_on(&bed, i, n);
        let overlay = format!("/var/lib/libvirt/imgs/{n}-vda.qcow2");
        assert!(matches!(&facts.disks[0].source, DiskSource::File(p) if *p == overlay), "{n} on h{i}");
        let md = metadata_on(&bed, i, n).unwrap();
        let m = &md.clone.unwrap().disks[0].master;
        assert_eq!((m.path.as_str(), m.pool.as_deref()), ("/var/lib/libvirt/imgs/base.qcow2", Some("imgs")));
    }
    // h0 has no pool `imgs`: refused naming h0 and the pool, before anything is defined.
    let before = state(&bed);
    let out = run(&["--host", &bed.hosts[0].uri, "--pool-map", "default=imgs"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("host '{}': no active storage pool 'imgs'", bed.hosts[0].uri))
            && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(state(&bed), before);
}

#[test]
fn an_unreachable_host_is_refused_naming_it_before_anything_is_read() {
    let uri = "qemu+unix:///system?socket=/run/vcc-tests-no-libvirtd.sock";
    let run = cli(&["--original", "vcct-no-such-template", "--name", "x", "--host", uri]);
    run.assert_error(1, &[&format!("host '{uri}'"), "cannot connect to libvirt"]);
}

#[test]
fn uefi_clones_on_other_hosts_get_fresh_vars_from_the_templates_nvram_template() {
    let bed = Bed::up(2);
    make_master(&bed);
    let mut spec = DomainSpec::new(TMPL, true).disk(DiskSpec::File {
        path: MASTER.into(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    spec.nics = 0;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), spec.xml()).unwrap();
    bed.virsh_ok(0, &[OsStr::new("define"), file.path().as_os_str()]);
    bed.put_in_pool(1, &bed.pool_dir(0).join("base.qcow2"), "base.qcow2");
    let (h0, h1) = (&bed.hosts[0].uri, &bed.hosts[1].uri);
    let v = ["--connect", h0, "--json", "--original", TMPL, "--name", "web", "--count", "2", "--start"];
    let mut v = v.to_vec();
    v.extend(["--host", h1, "--host", h0]);
    let out = run(cli_path().to_str().unwrap(), &v);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (h, i) in [(0, 1), (1, 0)] {
        let c = &report["hosts"][h]["clones"][0];
        let name = format!("web-{}", h + 1);
        assert_eq!((c["name"].as_str(), c["started"].as_bool()), (Some(name.as_str()), Some(true)), "{report:#}");
        assert_eq!(c["fresh_uefi_vars"], true);
        let vars = c["nvram"].as_str().unwrap();
        assert!(vars.ends_with(&format!("/{name}_VARS.fd")), "{vars}");
        // libvirt made them at the start, from the template's nvram template.
        let facts = facts_on(&bed, i, &name);
        assert_eq!(facts.nvram.as_ref().and_then(|n| n.path.as_deref()), Some(vars));
        assert_eq!(facts.nvram.and_then(|n| n.template).as_deref(), Some(OVMF_VARS));
        let size = bed.exec_ok(i, &["stat", "-c", "%s", vars]);
        let want = std::fs::metadata(OVMF_VARS).unwrap().len().to_string();
        assert_eq!(size.trim(), want, "{vars} on h{i}");
    }
}

#[test]
fn from_inside_a_host_clones_go_to_the_others_over_qemu_ssh() {
    let bed = Bed::up(3);
    make_master(&bed);
    define_template(&bed, 1, Some(&identity(SHA, INFO_HASH, MANIFEST)));
    let cli = cli_path();
    let (b, c) = (bed.ssh_uri(1), bed.ssh_uri(2));
    // On h0, as an administrator there would: --connect is h0's own libvirt (qemu:///system).
    let argv = [
        cli.to_str().unwrap(),
        "--json",
        "--original",
        TMPL,
        "--name",
        "ssh",
        "--count",
        "4",
        "--host",
        &b,
        "--host",
        &c,
    ];
    let out = bed.exec(0, &argv);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["hosts"][0]["uri"].as_str(), report["hosts"][1]["uri"].as_str()), (Some(&*b), Some(&*c)));
    assert_eq!(domains(&bed, 1), ["ssh-1", "ssh-3"]);
    assert_eq!(domains(&bed, 2), ["ssh-2", "ssh-4"]);
    assert_eq!(domains(&bed, 0), [TMPL]);
    let md = metadata_on(&bed, 1, "ssh-1").unwrap();
    assert_eq!(md.clone.unwrap().disks[0].master.sha256.as_deref(), Some(SHA));
}
