//! Issue 11 end to end on three libvirt hosts of the test bed (tests/bed/bed, docs/bed.md): a
//! template published on host A; the LAN catalogs of B and C list it; one command on A clones it
//! onto B, C and A, the master swarming to B and C; a plain XML on B resolves through the catalog.
//! Run as root with the integration feature (docs/testing.md).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::time::{Duration, Instant};

use vcc_tests::*;

const POOL_DIR: &str = "/var/lib/libvirt/images";

/// A template `name` on host `i`: a qcow2 master of `mib` MiB (half of it data) in the pool
/// `default`, and a small guest whose disk is that volume (`volume_disk`: as `<disk
/// type='volume'>`, else as a file disk).
fn make_template(bed: &Bed, i: usize, name: &str, mib: u64, volume_disk: bool) -> String {
    let vol = format!("{name}.qcow2");
    let master = format!("{POOL_DIR}/{vol}");
    bed.exec_ok(i, &["qemu-img", "create", "-q", "-f", "qcow2", &master, &format!("{mib}M")]);
    bed.exec_ok(i, &["qemu-io", "-f", "qcow2", "-c", &format!("write -P 0x5a 0 {}M", mib / 2), &master]);
    bed.virsh_ok(i, &["pool-refresh", "default"]);
    let mut xml = small_guest_xml(name, &master);
    if volume_disk {
        xml = xml
            .replace("<disk type='file'", "<disk type='volume'")
            .replace(&format!("<source file='{master}'/>"), &format!("<source pool='default' volume='{vol}'/>"));
        assert!(xml.contains("volume='"), "{xml}");
    }
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), xml).expect("write xml");
    bed.virsh_ok(i, &[OsStr::new("define"), file.path().as_os_str()]);
    master
}

fn sha256_on(bed: &Bed, i: usize, path: &str) -> String {
    bed.exec_ok(i, &["sha256sum", path]).split_whitespace().next().unwrap_or_default().to_string()
}

/// Polls host `i`'s catalog until it lists `name`; the entry.
fn wait_in_catalog(bed: &Bed, i: usize, name: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let cat = bed.catalog(i);
        if let Some(e) = cat.iter().find(|e| e["name"] == name) {
            return e.clone();
        }
        assert!(Instant::now() < deadline, "h{i}'s catalog lists no {name} after {limit:?}: {cat:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every MAC address in host `i`'s definition of `domain`.
fn macs(bed: &Bed, i: usize, domain: &str) -> Vec<String> {
    let xml = bed.virsh_ok(i, &["dumpxml", domain]);
    xml.split("<mac address='").skip(1).filter_map(|s| s.split('\'').next()).map(str::to_string).collect()
}

fn running(bed: &Bed, i: usize, prefix: &str) -> Vec<String> {
    bed.virsh_ok(i, &["list", "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Bytes host `i`'s daemon uploaded for `name` (its `status`).
fn uploaded(bed: &Bed, i: usize, name: &str) -> u64 {
    let bin = target_bin("pool-helper");
    let out = bed.exec_ok(i, &[bin.as_os_str(), OsStr::new("status"), OsStr::new("--json")]);
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status on h{i}: {e}: {out}"));
    v["masters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"] == name)
        .filter_map(|m| m["uploaded_bytes"].as_u64())
        .sum()
}

#[test]
fn a_template_published_on_a_is_in_every_catalog_and_cloned_onto_b_c_and_a_with_its_master_swarming() {
    let bed = Bed::up_with(3, 100.0);
    let vcc = target_bin("virt-clone-cow");
    let vcc = vcc.to_str().expect("utf-8 path");
    let master = make_template(&bed, 0, "tpl", 64, true);
    let vol = "tpl.qcow2";

    // Publish on A: the template's metadata records the master's identity.
    let t = Instant::now();
    bed.exec_ok(0, &[vcc, "publish", "tpl"]);
    let published = t.elapsed();
    let sha = sha256_on(&bed, 0, &master);
    let xml = bed.virsh_ok(0, &["dumpxml", "tpl"]);
    assert!(xml.contains(&sha), "the template's metadata does not record the master's sha256 {sha}:\n{xml}");

    // B's and C's catalogs list it within seconds, signed by A.
    let t = Instant::now();
    for i in 1..3 {
        let e = wait_in_catalog(&bed, i, vol, Duration::from_secs(10));
        assert_eq!(e["sha256"], sha.as_str(), "h{i}: {e}");
        assert_eq!(e["signer"], bed.hostname(0).as_str(), "h{i}: {e}");
    }
    let listed = t.elapsed();

    // One command on A: 6 clones, 2 per host, started; B and C fetch the master through the swarm.
    let hosts = [bed.ssh_uri(1), bed.ssh_uri(2), bed.ssh_uri(0)];
    let t = Instant::now();
    let out = bed.exec_ok(
        0,
        &[
            vcc,
            "--original",
            "tpl",
            "--name",
            "web",
            "--count",
            "6",
            "--host",
            &hosts[0],
            "--host",
            &hosts[1],
            "--host",
            &hosts[2],
            "--start",
            "--json",
        ],
    );
    let cloned = t.elapsed();
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("--json: {e}: {out}"));
    let per_host: Vec<usize> =
        report["hosts"].as_array().expect("hosts").iter().map(|h| h["clones"].as_array().map_or(0, Vec::len)).collect();
    assert_eq!(per_host, [2, 2, 2], "{report}");

    let mut all_macs = BTreeSet::new();
    let mut n_macs = 0;
    for i in 0..3 {
        let names = running(&bed, i, "web");
        assert_eq!(names.len(), 2, "h{i} runs {names:?}");
        for d in &names {
            let m = macs(&bed, i, d);
            n_macs += m.len();
            all_macs.extend(m);
        }
    }
    assert_eq!(all_macs.len(), n_macs, "MACs repeat across hosts: {all_macs:?}");
    // The template's disk is a volume disk: clones stay volume disks where the master was (A), and
    // are file disks over the pool's directory where the hook made the overlay (B, C).
    for (i, kind) in [(0, "volume"), (1, "file"), (2, "file")] {
        let xml = bed.virsh_ok(i, &["dumpxml", &running(&bed, i, "web")[0]]);
        assert!(xml.contains(&format!("<disk type='{kind}' device='disk'>")), "h{i}: {xml}");
    }
    for i in 1..3 {
        assert_eq!(sha256_on(&bed, i, &master), sha, "h{i}'s fetched master");
    }
    // A uploaded about one copy: B and C shared the rest between them (the swarm, not a file server).
    let size = std::fs::metadata(bed.host_dir(0).join("varlib/upper/libvirt/images").join(vol)).expect("master").len();
    let up = uploaded(&bed, 0, vol);
    eprintln!(
        "many hosts: publish {published:.1?}; listed on B and C {listed:.1?} later; 6 clones on 3 hosts running \
         {cloned:.1?} after the command ({size} B master, 100 Mbit/s); A uploaded {up} B = {:.2} copies",
        up as f64 / size as f64
    );
    assert!(up > 0, "A uploaded nothing: the master came from elsewhere?");
    assert!((up as f64) < 1.6 * size as f64, "A uploaded {up} B of a {size} B master: B and C did not share");
}

#[test]
fn a_plain_xml_naming_only_the_master_path_starts_on_another_host() {
    let bed = Bed::up_with(3, 100.0);
    let vcc = target_bin("virt-clone-cow");
    let master = make_template(&bed, 0, "plain-tpl", 32, false);
    bed.exec_ok(0, &[vcc.to_str().expect("utf-8 path"), "publish", "plain-tpl"]);
    wait_in_catalog(&bed, 1, "plain-tpl.qcow2", Duration::from_secs(10));

    // On B: an ordinary domain XML whose disk is an overlay (not there yet) over the master's path.
    let overlay = format!("{POOL_DIR}/plain-b.qcow2");
    let xml = format!(
        "<domain type='{}'><name>plain-b</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{overlay}'/>\
         <backingStore type='file'><format type='qcow2'/><source file='{master}'/></backingStore>\
         <target dev='vda' bus='virtio'/></disk></devices></domain>",
        bios_domain_type()
    );
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), xml).expect("write xml");
    bed.virsh_ok(1, &[OsStr::new("define"), file.path().as_os_str()]);
    let t = Instant::now();
    bed.virsh_ok(1, &["start", "plain-b"]);
    eprintln!("many hosts: plain XML on B started {:.1?} after virsh start (master fetched from A)", t.elapsed());
    assert_eq!(bed.virsh_ok(1, &["domstate", "plain-b"]).trim(), "running");
    assert_eq!(sha256_on(&bed, 1, &master), sha256_on(&bed, 0, &master), "B's master");
    let info = bed.exec_ok(1, &["qemu-img", "info", "-U", "--output=json", &overlay]);
    assert!(info.contains(&master), "the overlay's backing file is not the master: {info}");
}
