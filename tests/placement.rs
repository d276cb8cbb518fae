//! `--disk-size` and `--overlay-pool` (issue 15, item 4) against the real libvirtd and qemu-img:
//! overlays larger than their masters, and overlays in another pool than their masters.

#![allow(clippy::unwrap_used)]

use vcc_core::xml::DiskSource;
use vcc_tests::*;

const MIB: u64 = 1 << 20;

/// A BIOS template with a qcow2 file disk (vda, 32 MiB) and a raw volume disk (vdb, 16 MiB),
/// both in the env's pool. Returns (name, vda master, vdb master).
fn template(env: &TestEnv) -> (String, String, String) {
    let name = env.name("-tmpl");
    let qcow = env.in_pool("base.qcow2");
    let raw = env.in_pool("data.raw");
    make_qcow2(&qcow, 32);
    make_raw(&raw, 16);
    env.refresh_pool();
    let spec = DomainSpec::new(&name, false)
        .disk(DiskSpec::File { path: qcow.clone(), format: "qcow2".into(), target: "vda".into() })
        .disk(DiskSpec::Volume {
            pool: env.pool.clone(),
            volume: "data.raw".into(),
            format: "raw".into(),
            target: "vdb".into(),
        });
    define_xml(&spec.xml());
    (name, qcow, raw)
}

/// The capacity of a running domain's disk as QEMU presents it to the guest (`virsh domblkinfo`).
fn guest_capacity(domain: &str, target: &str) -> u64 {
    let out = virsh_ok(&["domblkinfo", domain, target]);
    out.lines()
        .find_map(|l| l.strip_prefix("Capacity:").map(|v| v.trim().parse::<u64>().unwrap()))
        .unwrap_or_else(|| panic!("no capacity in domblkinfo:\n{out}"))
}

#[test]
fn disk_size_makes_each_overlay_as_large_as_asked_and_the_running_guest_sees_it() {
    let env = TestEnv::new("dsize");
    let (tmpl, qcow, raw) = template(&env);
    let clone = env.name("-big");
    let run = cli(&[
        "--original",
        &tmpl,
        "--name",
        &clone,
        "--disk-size",
        "64M",
        "--disk-size",
        "vdb=48M",
        "--start",
        "--json",
    ]);
    run.assert_ok();
    let report = run.json();
    let disks = report["clones"][0]["disks"].as_array().unwrap();
    let reported: Vec<(&str, u64)> =
        disks.iter().map(|d| (d["target"].as_str().unwrap(), d["virtual_size"].as_u64().unwrap())).collect();
    assert_eq!(reported, [("vda", 64 * MIB), ("vdb", 48 * MIB)]);

    for (target, master, master_format, want) in [("vda", &qcow, "qcow2", 64 * MIB), ("vdb", &raw, "raw", 48 * MIB)] {
        let overlay = env.in_pool(&format!("{clone}-{target}.qcow2"));
        let info = qemu_img_info(&overlay, "qcow2");
        assert_eq!(info["virtual-size"].as_u64(), Some(want), "{overlay}\n{info:#}");
        assert_eq!(info["backing-filename"].as_str(), Some(master.as_str()), "{overlay}: still over its master");
        assert_eq!(info["backing-filename-format"].as_str(), Some(master_format));
        assert_eq!(domstate(&clone), "running");
        assert_eq!(guest_capacity(&clone, target), want, "{clone} {target}: the guest's disk is as large as asked");
    }
    // The masters keep their size.
    assert_eq!(qemu_img_info(&qcow, "qcow2")["virtual-size"].as_u64(), Some(32 * MIB));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 16 * MIB);
}

#[test]
fn overlays_go_to_the_overlay_pool_as_volumes_over_masters_in_the_other_pool() {
    let env = TestEnv::new("opool");
    let (tmpl, qcow, raw) = template(&env);
    let local = Pool::new("opool-local");
    let clones = [env.name("-a"), env.name("-b")];
    let run = cli(&[
        "--original",
        &tmpl,
        "--name",
        &clones[0],
        "--name",
        &clones[1],
        "--overlay-pool",
        &local.name,
        "--start",
        "--json",
    ]);
    run.assert_ok();
    let mut want: Vec<String> =
        clones.iter().flat_map(|c| [format!("{c}-vda.qcow2"), format!("{c}-vdb.qcow2")]).collect();
    want.sort();
    let mut vols = local.volumes();
    vols.sort();
    assert_eq!(vols, want, "every overlay is a volume of the overlay pool");
    let mut in_master_pool = list_dir(&env.pool_dir);
    in_master_pool.sort();
    assert_eq!(in_master_pool, ["base.qcow2", "data.raw"], "nothing new beside the masters");

    for c in &clones {
        assert_eq!(domstate(c), "running", "{c} starts from overlays in the other pool");
        let vda = local.path(&format!("{c}-vda.qcow2")).to_string_lossy().into_owned();
        let vdb_vol = format!("{c}-vdb.qcow2");
        let vol_xml = virsh_ok(&["vol-dumpxml", "--pool", &local.name, &format!("{c}-vda.qcow2")]);
        assert!(vol_xml.contains(&format!("<path>{}</path>", esc(&qcow))), "backing store is the master:\n{vol_xml}");
        assert_eq!(qemu_img_info(&vda, "qcow2")["backing-filename"].as_str(), Some(qcow.as_str()));
        assert_eq!(qemu_img_info(local.path(&vdb_vol), "qcow2")["backing-filename"].as_str(), Some(raw.as_str()));
        let f = facts(c);
        let disk = |t: &str| f.disks.iter().find(|d| d.target.as_deref() == Some(t)).unwrap().clone();
        assert_eq!(disk("vda").source, DiskSource::File(vda.clone()), "a file disk stays a file disk");
        assert_eq!(
            disk("vdb").source,
            DiskSource::Volume { pool: local.name.clone(), volume: vdb_vol.clone() },
            "a volume disk names the overlay pool"
        );
        let md = cow_metadata(c).unwrap().clone.unwrap();
        assert_eq!(md.disks.iter().find(|d| d.target == "vda").unwrap().overlay, vda, "metadata records the overlay");
    }

    // tree finds the clones under their masters.
    let tree = cli(&["tree", "--json"]);
    tree.assert_ok();
    let tree = tree.json();
    let node = tree["masters"].as_array().unwrap().iter().find(|m| m["path"].as_str() == Some(qcow.as_str())).unwrap();
    let mut doms: Vec<&str> = node["clones"].as_array().unwrap().iter().filter_map(|c| c["domain"].as_str()).collect();
    doms.sort();
    assert_eq!(doms, [clones[0].as_str(), clones[1].as_str()], "{node:#}");
    for c in &clones {
        virsh_ok(&["destroy", c]);
        virsh_ok(&["undefine", c]);
    }
}

#[test]
fn a_smaller_size_an_unknown_or_unfit_pool_and_bad_sizes_are_refused_and_change_nothing() {
    let env = TestEnv::new("prefuse");
    let (tmpl, qcow, raw) = template(&env);
    let before = Snapshot::take(&env, &tmpl, &[&qcow, &raw]);
    let clone = env.name("-x");
    let base = ["--original", tmpl.as_str(), "--name", clone.as_str()];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        cli(&v)
    };

    with(&["--disk-size", "20M"]).assert_error(1, &["smaller than the master of disk vda", "32.0 MiB"]);
    with(&["--disk-size", "vdb=8M"]).assert_error(1, &["disk vdb", "16.0 MiB"]);
    with(&["--disk-size", "vdc=1G"]).assert_error(1, &["vdc", "vda, vdb"]);
    with(&["--disk-size", "1G", "--disposable"]).assert_error(1, &["--disposable"]);
    with(&["--overlay-pool", "vcct-no-such-pool"]).assert_error(1, &["'vcct-no-such-pool'", "pool-start"]);
    with(&["--disk-size", "lots"]).assert_error(2, &["not a size"]);
    with(&["--disk-size", "1000"]).assert_error(2, &["512-byte"]);

    // An inactive pool is refused as well.
    let idle = Pool::new("prefuse-idle");
    virsh_ok(&["pool-destroy", &idle.name]);
    with(&["--overlay-pool", &idle.name]).assert_error(1, &[&idle.name, "not active"]);

    before.assert_unchanged(&env, &tmpl, &[&qcow, &raw]);
    assert!(!domain_exists(&clone));
    assert!(cow_metadata(&tmpl).is_none(), "the original did not become a template");
}
