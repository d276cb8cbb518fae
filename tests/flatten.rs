//! `virt-clone-cow flatten` (issue 15, item 3) against the real libvirtd, QEMU, qemu-img and
//! qemu-io: a clone's overlays become standalone disks, offline (qemu-img convert in the staging
//! directory, swapped in) and live (libvirt's block pull); data written into the master before
//! cloning and into the overlay after reads back the same; a pool refreshed meanwhile lists no
//! partial copy; failures leave the clone as it was and nothing staged.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use vcc_core::xml::BackingDecl;
use vcc_tests::*;

/// Writes `pattern` at `offset` (1 MiB) into an image with qemu-io.
fn write_pattern(path: &str, format: &str, pattern: u8, offset_mib: u64) {
    let cmd = format!("write -P {pattern:#04x} {offset_mib}M 1M");
    run_ok("qemu-io", &["-f", format, "-c", &cmd, path]);
}

/// Whether the image (its chain, if any) reads `pattern` in the MiB at `offset_mib`.
fn reads_pattern(path: &str, pattern: u8, offset_mib: u64) -> bool {
    let cmd = format!("read -P {pattern:#04x} {offset_mib}M 1M");
    run("qemu-io", &["-r", "-U", "-f", "qcow2", "-c", &cmd, path]).status.success()
}

/// A template with two disks: vda over a qcow2 master in the env's pool (its overlay a pool
/// volume), vdb over a raw master outside any pool (its overlay
/// a file, copied by qemu-img). Each master holds a pattern in its first MiB. Cloned (not
/// started), and a pattern written into each overlay's second MiB. Returns (clone, overlays,
/// masters).
fn linked_clone(env: &TestEnv) -> (String, [String; 2], [String; 2]) {
    let tmpl = env.name("-tmpl");
    let qcow = env.in_pool("base.qcow2");
    let raw = env.in_work("data.raw");
    make_qcow2(&qcow, 16);
    write_pattern(&qcow, "qcow2", 0xa1, 0);
    make_raw(&raw, 8);
    write_pattern(&raw, "raw", 0xb1, 0);
    env.refresh_pool();
    let spec = DomainSpec::new(&tmpl, false)
        .disk(DiskSpec::File { path: qcow.clone(), format: "qcow2".into(), target: "vda".into() })
        .disk(DiskSpec::File { path: raw.clone(), format: "raw".into(), target: "vdb".into() });
    define_xml(&spec.xml());
    let clone = env.name("-c");
    cli(&["--original", &tmpl, "--name", &clone]).assert_ok();
    let overlays = [env.in_pool(&format!("{clone}-vda.qcow2")), env.in_work(&format!("{clone}-vdb.qcow2"))];
    write_pattern(&overlays[0], "qcow2", 0xa2, 1);
    write_pattern(&overlays[1], "qcow2", 0xb2, 1);
    (clone, overlays, [qcow, raw])
}

/// A template `<prefix>-tmpl` over the raw `master` (vda) and its linked clone `<prefix>-c`, not
/// started; returns both names.
fn clone_of_raw(env: &TestEnv, master: &str) -> (String, String) {
    let tmpl = env.name("-tmpl");
    define_xml(
        &DomainSpec::new(&tmpl, false)
            .disk(DiskSpec::File { path: master.to_string(), format: "raw".into(), target: "vda".into() })
            .xml(),
    );
    let clone = env.name("-c");
    cli(&["--original", &tmpl, "--name", &clone]).assert_ok();
    (tmpl, clone)
}

/// Whether a file has the immutable attribute (None: its filesystem has none).
fn immutable(path: &str) -> Option<bool> {
    vcc_core::protect::is_immutable(Path::new(path)).unwrap()
}

fn assert_standalone_with_both_patterns(overlays: &[String; 2]) {
    for (o, (m, w)) in overlays.iter().zip([(0xa1, 0xa2), (0xb1, 0xb2)]) {
        let info = qemu_img_info(o, "qcow2");
        assert!(info.get("backing-filename").is_none(), "{o} has no backing file:\n{info:#}");
        assert!(reads_pattern(o, m, 0), "{o}: the master's data is in the flattened disk");
        assert!(reads_pattern(o, w, 1), "{o}: the overlay's own data is kept");
    }
}

fn assert_no_backing_in_xml(xml: &str, what: &str) {
    let f = vcc_core::xml::DomainFacts::parse(xml).unwrap();
    for t in ["vda", "vdb"] {
        let d = f.disks.iter().find(|d| d.target.as_deref() == Some(t)).unwrap();
        assert_eq!(d.backing, BackingDecl::None, "{what} XML: {t} ends its chain with <backingStore/>\n{xml}");
    }
}

#[test]
fn an_offline_flatten_makes_standalone_disks_with_the_same_data_and_the_clone_starts() {
    let env = TestEnv::new("flatoff");
    let (clone, overlays, masters) = linked_clone(&env);
    let master_sums: Vec<String> = masters.iter().map(sha256).collect();
    assert!(reads_pattern(&overlays[0], 0xa1, 0), "before: the master's data reads through the overlay");

    let run = cli(&["flatten", &clone, "--json"]);
    run.assert_ok();
    let report = run.json();
    assert_eq!(report["live"].as_bool(), Some(false));
    let flat: Vec<&str> = report["disks"].as_array().unwrap().iter().map(|d| d["target"].as_str().unwrap()).collect();
    assert_eq!(flat, ["vda", "vdb"]);
    assert_eq!(report["still_linked"].as_array().unwrap().len(), 0);
    // Nothing else needs the masters: their protection (the immutable flag) is released.
    let mut released: Vec<&str> = report["released"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    released.sort();
    let mut want = [masters[0].as_str(), masters[1].as_str()];
    want.sort();
    assert_eq!(released, want, "{report:#}");
    for m in &masters {
        assert_eq!(immutable(m), Some(false), "{m} is no longer immutable");
    }

    assert_standalone_with_both_patterns(&overlays);
    assert_no_backing_in_xml(&inactive_xml(&clone), "persistent");
    assert!(cow_metadata(&clone).is_none_or(|m| m.clone.is_none()), "the clone depends on no master");
    let vol = virsh_ok(&["vol-dumpxml", &overlays[0]]);
    assert!(!vol.contains("<backingStore>"), "the pool sees the volume without its backing store:\n{vol}");
    // Nothing of ours is left beside the overlays; the masters are untouched.
    assert_eq!(list_dir(&env.pool_dir), ["base.qcow2", format!("{clone}-vda.qcow2").as_str()]);
    assert_eq!(list_dir(&env.work_dir), ["data.raw", format!("{clone}-vdb.qcow2").as_str()]);
    assert_eq!(masters.iter().map(sha256).collect::<Vec<_>>(), master_sums);

    // It runs on its own disks, the masters out of reach.
    std::fs::rename(&masters[1], env.in_work("moved.raw")).unwrap();
    virsh_ok(&["start", &clone]);
    assert_eq!(wait_for_state(&clone, "running", std::time::Duration::from_secs(10)), "running");
    // tree no longer counts it under the masters.
    let tree = cli(&["tree", "--json"]).json();
    let lists_it = tree["masters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["clones"].as_array().unwrap().iter())
        .any(|c| c["domain"].as_str() == Some(clone.as_str()));
    assert!(!lists_it, "tree shows no master for the flattened clone:\n{tree:#}");
}

#[test]
fn a_running_clone_is_flattened_live_by_block_pull() {
    let env = TestEnv::new("flatlive");
    let (clone, overlays, _masters) = linked_clone(&env);
    virsh_ok(&["start", &clone]);
    assert_eq!(wait_for_state(&clone, "running", std::time::Duration::from_secs(10)), "running");
    let live_before = virsh_ok(&["dumpxml", &clone]);
    assert!(live_before.contains("data.raw"), "the running clone's chain names its master:\n{live_before}");

    let run = cli(&["flatten", &clone, "--json"]);
    run.assert_ok();
    assert_eq!(run.json()["live"].as_bool(), Some(true));
    assert_eq!(domstate(&clone), "running", "the guest ran on through the pull");
    assert_no_backing_in_xml(&virsh_ok(&["dumpxml", &clone]), "live");
    assert_no_backing_in_xml(&inactive_xml(&clone), "persistent");
    assert!(cow_metadata(&clone).is_none_or(|m| m.clone.is_none()));

    virsh_ok(&["destroy", &clone]);
    assert_standalone_with_both_patterns(&overlays);
}

#[test]
fn one_disk_can_be_flattened_and_the_other_stays_linked() {
    let env = TestEnv::new("flatone");
    let (clone, overlays, masters) = linked_clone(&env);
    assert_eq!(immutable(&masters[0]), Some(true), "a master with a clone is immutable (ext4)");
    let run = cli(&["flatten", &clone, "--disk", "vdb", "--json"]);
    run.assert_ok();
    assert_eq!(run.json()["still_linked"], serde_json::json!(["vda"]));
    assert_eq!(run.json()["released"], serde_json::json!([masters[1]]), "only vdb's master is free");
    assert_eq!(immutable(&masters[0]), Some(true), "vda's master still has its clone");
    assert_eq!(immutable(&masters[1]), Some(false));
    assert!(qemu_img_info(&overlays[1], "qcow2").get("backing-filename").is_none());
    assert_eq!(qemu_img_info(&overlays[0], "qcow2")["backing-filename"].as_str(), Some(masters[0].as_str()));
    let md = cow_metadata(&clone).unwrap().clone.unwrap();
    assert_eq!(md.disks.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(), ["vda"]);
}

#[test]
fn a_flatten_that_runs_out_of_space_or_is_refused_leaves_the_clone_as_it_was() {
    let mut env = TestEnv::new("flatfail");
    // Master and overlay on a small tmpfs: the standalone copy does not fit.
    let small = env.mount_tmpfs("small", "8M");
    let master = small.join("m.raw").to_string_lossy().into_owned();
    std::fs::write(&master, random_bytes(6 << 20, 15)).unwrap();
    let (tmpl, clone) = clone_of_raw(&env, &master);
    let overlay = small.join(format!("{clone}-vda.qcow2")).to_string_lossy().into_owned();
    write_pattern(&overlay, "qcow2", 0xc2, 1);

    let xml = inactive_xml(&clone);
    let md = cow_metadata(&clone);
    let files = list_dir(&small);
    let sums = [sha256(&overlay), sha256(&master)];
    let unchanged = || {
        assert_eq!(inactive_xml(&clone), xml, "the clone's XML is as it was");
        assert_eq!(cow_metadata(&clone), md, "its metadata is as it was");
        // `small` is a mount point: the staging directory is in it (no place outside it on its
        // filesystem), and empty.
        let mut now = list_dir(&small);
        now.retain(|f| f != vcc_core::staging::VCC_FALLBACK);
        assert_eq!(now, files, "no copy left behind");
        assert_eq!(staged_files(&small, "files", &clone), Vec::<String>::new(), "nothing left staged");
        assert_eq!([sha256(&overlay), sha256(&master)], sums, "overlay and master unchanged");
    };

    let run = cli(&["flatten", &clone]);
    run.assert_error(1, &["standalone copy of disk vda", "No space left"]);
    unchanged();

    cli(&["flatten", &clone, "--disk", "vdz"]).assert_error(1, &["vdz", "linked: vda"]);
    cli(&["flatten", &tmpl]).assert_error(1, &["not a linked clone"]);
    unchanged();
    assert!(Path::new(&overlay).is_file());
    // Still a working linked clone.
    assert!(reads_pattern(&overlay, 0xc2, 1));
}

#[test]
fn a_disk_that_cannot_be_replaced_puts_every_disk_back() {
    let env = TestEnv::new("flatswap");
    let (clone, overlays, masters) = linked_clone(&env);
    let xml = inactive_xml(&clone);
    let md = cow_metadata(&clone);
    let sums: Vec<String> = overlays.iter().map(sha256).collect();
    let (pool_files, work_files) = (list_dir(&env.pool_dir), list_dir(&env.work_dir));
    // vda's copy goes in place first; vdb's overlay is immutable (ext4's attribute), so its copy
    // cannot replace it, and vda must be put back.
    run_ok("chattr", &["+i", &overlays[1]]);
    let run = cli(&["flatten", &clone]);
    run_ok("chattr", &["-i", &overlays[1]]);
    run.assert_error(1, &["putting the flattened disk vdb"]);

    assert_eq!(overlays.iter().map(sha256).collect::<Vec<_>>(), sums, "both overlays are the old ones");
    assert_eq!(qemu_img_info(&overlays[0], "qcow2")["backing-filename"].as_str(), Some(masters[0].as_str()));
    assert_eq!(inactive_xml(&clone), xml);
    assert_eq!(cow_metadata(&clone), md);
    assert_eq!((list_dir(&env.pool_dir), list_dir(&env.work_dir)), (pool_files, work_files), "no copy left");
    env.refresh_pool();
    let vols = virsh_ok(&["vol-list", &env.pool]);
    assert!(!vols.contains("vcc-flatten"), "the pool lists no copy:\n{vols}");
    assert_eq!(staged_files(&env.pool_dir, &env.pool, &clone), Vec::<String>::new(), "nothing left staged");
    assert_eq!(staged_files(&env.work_dir, "files", &clone), Vec::<String>::new(), "nothing left staged");
}

#[test]
fn a_pool_refreshed_while_an_overlay_is_flattened_never_lists_a_partial_copy() {
    let env = TestEnv::new("flatref");
    // A 1 GiB raw master in the pool (every 64 KiB the same bytes): its overlay's standalone copy
    // keeps qemu-img and the fsync busy a while.
    let master = env.in_pool("big.raw");
    write_repeated(&master, &random_bytes(64 << 10, 5), 16384);
    env.refresh_pool();
    let (_, clone) = clone_of_raw(&env, &master);
    let overlay = env.in_pool(&format!("{clone}-vda.qcow2"));
    write_pattern(&overlay, "qcow2", 0xd2, 1);

    let staged = || staged_files(&env.pool_dir, &env.pool, &clone).len();
    let (run, watch) = cli_watching_pool(&["flatten", &clone], &env.pool, &[], staged);
    eprintln!("{watch:?}");
    run.assert_ok();
    assert!(watch.staged_seen > 0, "the pool was refreshed while the copy was written: {watch:?}");
    assert!(watch.before.iter().any(|v| v == "big.raw"), "the listing reads the volumes: {watch:?}");
    assert!(watch.errors.is_empty(), "the pool could not be refreshed or listed while flattening: {watch:?}");
    assert!(watch.extra.is_empty(), "the pool listed a partial copy while flattening: {watch:?}");
    assert_eq!(staged(), 0, "the old overlay is gone from the staging directory");
    assert_eq!(list_dir(&env.pool_dir), ["big.raw".to_string(), format!("{clone}-vda.qcow2")]);
    let info = qemu_img_info(&overlay, "qcow2");
    assert!(info.get("backing-filename").is_none(), "{overlay} is standalone:\n{info:#}");
    assert!(reads_pattern(&overlay, 0xd2, 1), "the overlay's own data is kept");
}

#[test]
fn a_live_pull_that_outlasts_timeout_is_stopped_and_the_disk_keeps_its_master() {
    let mut env = TestEnv::new("flattime");
    // The master on a filesystem of its own, whose device the clone may read at 1 MiB/s only
    // (libvirt's <blkiotune>, the blkio cgroup): pulling its 32 MiB takes about 32 s.
    let (fs, device) = env.mount_image("slow", "128M", &["mkfs.ext4", "-q", "-F"]);
    let master = fs.join("m.raw").to_string_lossy().into_owned();
    run_ok("truncate", &["-s", "32M", &master]);
    // Written past the page cache (O_DIRECT), so the pull reads it from the device.
    run_ok("qemu-io", &["-n", "-f", "raw", "-c", "write -P 0xd1 0 32M", &master]);
    let tmpl = env.name("-tmpl");
    let spec = DomainSpec::new(&tmpl, false).disk(DiskSpec::File {
        path: master.clone(),
        format: "raw".into(),
        target: "vda".into(),
    });
    let throttle = format!(
        "<blkiotune><device><path>{device}</path><read_bytes_sec>1048576</read_bytes_sec></device></blkiotune>"
    );
    define_xml(&spec.xml().replacen("<devices>", &format!("{throttle}<devices>"), 1));
    let clone = env.name("-c");
    cli(&["--original", &tmpl, "--name", &clone]).assert_ok();
    let overlay = fs.join(format!("{clone}-vda.qcow2")).to_string_lossy().into_owned();
    virsh_ok(&["start", &clone]);
    assert_eq!(wait_for_state(&clone, "running", std::time::Duration::from_secs(10)), "running");
    let xml = inactive_xml(&clone);
    let md = cow_metadata(&clone);

    let t0 = std::time::Instant::now();
    let run = cli(&["flatten", &clone, "--timeout", "1"]);
    let took = t0.elapsed();
    run.assert_error(1, &["block pull of disk vda", "did not end within 1 s", "--timeout"]);
    assert!(took < std::time::Duration::from_secs(15), "stopped soon after its timeout: {took:?}");
    // Stopped: no job left, the guest runs on over its master, nothing recorded changed.
    // (virsh -q prints `Block Pull: [ n %]` for a job, nothing when there is none.)
    let job = virsh_ok(&["blockjob", &clone, "vda", "--info"]);
    assert!(job.trim().is_empty(), "a block job is left: {job}");
    assert_eq!(domstate(&clone), "running");
    let live = vcc_core::xml::DomainFacts::parse(&virsh_ok(&["dumpxml", &clone])).unwrap();
    let vda = live.disks.iter().find(|d| d.target.as_deref() == Some("vda")).unwrap();
    assert!(
        matches!(&vda.backing, BackingDecl::Store { path: Some(p), .. } if *p == master),
        "the running disk still has its master: {:?}",
        vda.backing
    );
    assert_eq!(inactive_xml(&clone), xml);
    assert_eq!(cow_metadata(&clone), md);
    assert_eq!(immutable(&master), Some(true), "the master is still held");
    virsh_ok(&["destroy", &clone]);
    assert_eq!(qemu_img_info(&overlay, "qcow2")["backing-filename"].as_str(), Some(master.as_str()));
    assert!(reads_pattern(&overlay, 0xd1, 31), "the overlay reads the master through its chain");
}
