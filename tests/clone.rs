//! virt-clone-cow against the real libvirtd (qemu:///system), real QEMU guests and real qemu-img.
//!
//! Each test owns a [`TestEnv`] (its own dir pool, work directory and domain-name prefix) that
//! removes everything on drop. Failure tests take a [`Snapshot`] before the run and assert that
//! the failed run left exactly that.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use vcc_core::xml::DiskSource;
use vcc_tests::*;

/// A BIOS template `<prefix><suffix>` with one qcow2 master `base.qcow2` in the env's pool as vda.
fn bios_template(env: &TestEnv, suffix: &str) -> (String, String) {
    let name = env.name(suffix);
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 32);
    env.refresh_pool();
    let spec = DomainSpec::new(&name, false).disk(DiskSpec::File {
        path: master.clone(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    (name, master)
}

/// Starts and stops a domain once, so that libvirt writes its UEFI vars path into the inactive
/// XML; returns that path.
fn boot_once_for_nvram(name: &str) -> String {
    virsh_ok(&["start", name]);
    assert_eq!(wait_for_state(name, "running", Duration::from_secs(10)), "running", "'{name}' did not start");
    virsh_ok(&["destroy", name]);
    let nv = facts(name).nvram.and_then(|n| n.path).expect("the UEFI vars path is in the inactive XML after a start");
    assert!(std::path::Path::new(&nv).is_file(), "{nv} exists after the first start");
    nv
}

fn clone_names(report: &Value) -> Vec<String> {
    report["clones"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

/// Asserts the overlay is qcow2 1.1 in the default layout (vcc-core's `OverlayLayout::DEFAULT`), over `master` in
/// `master_format` stated explicitly, and as large as the master.
fn assert_overlay(overlay: &str, master: &str, master_format: &str) {
    assert!(std::path::Path::new(overlay).is_file(), "overlay {overlay} exists");
    let info = qemu_img_info(overlay, "qcow2");
    assert_eq!(info["backing-filename"].as_str(), Some(master), "{overlay}: backing file\n{info:#}");
    assert_eq!(
        info["backing-filename-format"].as_str(),
        Some(master_format),
        "{overlay}: backing format stated\n{info:#}"
    );
    assert_eq!(info["format-specific"]["data"]["compat"].as_str(), Some("1.1"), "{overlay}: compat\n{info:#}");
    let layout = vcc_core::layout::OverlayLayout::DEFAULT;
    assert_eq!(
        info["format-specific"]["data"]["extended-l2"].as_bool().unwrap_or(false),
        layout.extended_l2,
        "{overlay}: extended_l2\n{info:#}"
    );
    assert_eq!(info["cluster-size"].as_u64(), Some(layout.cluster_size as u64), "{overlay}: cluster size\n{info:#}");
    let master_size = qemu_img_info(master, master_format)["virtual-size"].as_u64();
    assert_eq!(info["virtual-size"].as_u64(), master_size, "{overlay}: virtual size equals the master's");
}

// ---------------------------------------------------------------------------------------------
// The contract, end to end

#[test]
fn three_started_clones_of_a_uefi_template_get_overlays_new_identities_and_own_vars() {
    let env = TestEnv::new("e2e");
    let tmpl = env.name(" tmpl & \"q\" 'x'");
    let qcow = env.in_pool("base & 'q' \"1\".qcow2");
    let raw = env.in_pool("data.raw");
    let iso = env.in_pool("install.iso");
    make_qcow2(&qcow, 64);
    make_raw(&raw, 16);
    std::fs::write(&iso, b"CD001 not really an ISO, but a medium the clones must share".repeat(1000)).unwrap();
    env.refresh_pool();
    let mut spec = DomainSpec::new(&tmpl, true)
        .disk(DiskSpec::File { path: qcow.clone(), format: "qcow2".into(), target: "vda".into() })
        .disk(DiskSpec::Volume {
            pool: env.pool.clone(),
            volume: "data.raw".into(),
            format: "raw".into(),
            target: "vdb".into(),
        })
        .disk(DiskSpec::Cdrom { path: Some(iso.clone()), target: "sda".into() });
    spec.nics = 2;
    // A serial log whose name does not hold the template's: each clone still gets its own.
    let tmpl_serial = env.work_dir.join("console.log").to_string_lossy().into_owned();
    spec.serial_file = Some(tmpl_serial.clone());
    define_xml(&spec.xml());
    let tmpl_nvram = boot_once_for_nvram(&tmpl);

    let tmpl_facts = facts(&tmpl);
    let tmpl_uuid = domuuid(&tmpl);
    let before: Vec<(String, u32, String)> =
        [&qcow, &raw, &iso, &tmpl_nvram].iter().map(|p| (p.to_string(), mode(p), sha256(p))).collect();
    assert!(before[0].1 & 0o200 != 0, "the master starts writable, so making it read-only is observable");

    let names = [env.name(" web 'one' & co"), env.name("-c2"), env.name("-c3")];
    let run =
        cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--name", &names[2], "--start", "--json"]);
    run.assert_ok();
    let report = run.json();
    assert_eq!(report["original"].as_str(), Some(tmpl.as_str()));
    assert_eq!(report["dry_run"].as_bool(), Some(false));
    assert_eq!(report["template"].as_bool(), Some(true));
    assert_eq!(clone_names(&report), names.to_vec());

    let mut uuids = HashSet::from([tmpl_uuid]);
    let mut macs: HashSet<String> = tmpl_facts.macs.iter().flatten().map(|m| m.to_ascii_lowercase()).collect();
    assert_eq!(macs.len(), 2, "the template has two NICs with MACs");
    let mut nvrams = HashSet::from([tmpl_nvram.clone()]);
    let mut serials = HashSet::from([tmpl_serial.clone()]);

    for (i, name) in names.iter().enumerate() {
        let entry = &report["clones"][i];
        assert_eq!(entry["started"].as_bool(), Some(true), "{name} reported started");
        assert_eq!(domstate(name), "running", "{name} runs");

        let uuid = domuuid(name);
        assert_eq!(entry["uuid"].as_str(), Some(uuid.as_str()), "{name}: reported UUID is libvirt's");
        assert!(uuids.insert(uuid), "{name}: UUID differs from the template's and the other clones'");

        let f = facts(name);
        assert_eq!(f.macs.len(), 2, "{name} keeps both NICs");
        for m in f.macs.iter() {
            let m = m.as_ref().expect("every NIC has a MAC").to_ascii_lowercase();
            assert!(macs.insert(m.clone()), "{name}: MAC {m} is unique");
        }

        // Private disks: overlays next to the masters, made as volumes of the same pool.
        let vda_overlay = env.in_pool(&format!("{name}-vda.qcow2"));
        let vdb_volume = format!("{name}-vdb.qcow2");
        let vdb_overlay = env.in_pool(&vdb_volume);
        assert_overlay(&vda_overlay, &qcow, "qcow2");
        assert_overlay(&vdb_overlay, &raw, "raw");
        let disk = |t: &str| f.disks.iter().find(|d| d.target.as_deref() == Some(t)).unwrap().clone();
        assert_eq!(disk("vda").source, DiskSource::File(vda_overlay.clone()));
        assert_eq!(disk("vda").format.as_deref(), Some("qcow2"));
        assert_eq!(disk("vdb").source, DiskSource::Volume { pool: env.pool.clone(), volume: vdb_volume.clone() });
        assert_eq!(disk("vdb").format.as_deref(), Some("qcow2"));
        let vol_path = virsh_ok(&["vol-path", "--pool", &env.pool, &vdb_volume]);
        assert_eq!(vol_path.trim(), vdb_overlay, "{name}: vdb overlay is a volume of the master's pool");
        assert!(virsh(&["vol-info", &vda_overlay]).status.success(), "{name}: vda overlay is a pool volume");

        // The cdrom stays shared.
        let cd = disk("sda");
        assert_eq!(cd.device, "cdrom");
        assert_eq!(cd.source, DiskSource::File(iso.clone()), "{name}: cdrom medium is the template's");
        assert!(cd.readonly);

        // Own UEFI vars.
        let nv = f.nvram.as_ref().and_then(|n| n.path.clone()).expect("clone has a vars path");
        assert!(std::path::Path::new(&nv).is_file(), "{name}: vars file {nv} exists");
        assert!(nvrams.insert(nv.clone()), "{name}: vars path {nv} is its own");
        assert_eq!(entry["nvram"].as_str(), Some(nv.as_str()));

        // Own serial log (serial and console name one file), which the running clone wrote.
        assert_eq!(f.char_paths.len(), 1, "{name}: {:?}", f.char_paths);
        let serial = &f.char_paths[0];
        assert!(serials.insert(serial.clone()), "{name}: serial log {serial} is its own");
        assert!(serial.contains(name.as_str()), "{name}: {serial} names the clone");
        assert!(std::path::Path::new(serial).is_file(), "{name}: QEMU opened {serial}");

        // Clone metadata.
        let md = cow_metadata(name).expect("clone carries our metadata");
        let c = md.clone.expect("<vcc:clone>");
        assert_eq!(c.original, tmpl);
        assert!(!c.disposable);
        let mut masters: Vec<(String, String, String)> =
            c.disks.iter().map(|d| (d.target.clone(), d.master.path.clone(), d.master.format.clone())).collect();
        masters.sort();
        assert_eq!(
            masters,
            vec![("vda".into(), qcow.clone(), "qcow2".into()), ("vdb".into(), raw.clone(), "raw".into())]
        );
        assert!(md.template.is_none(), "a fresh clone is no template");
    }

    // Masters unchanged and read-only; the cdrom and the template's vars untouched.
    for (path, mode_before, sha_before) in &before {
        assert_eq!(&sha256(path), sha_before, "{path} is byte-identical after cloning");
        if path == &qcow || path == &raw {
            assert_eq!(mode(path) & 0o222, 0, "master {path} is read-only");
        } else {
            assert_eq!(mode(path), *mode_before, "{path} is not a master: its mode is unchanged");
        }
    }
    let md = cow_metadata(&tmpl).expect("the template carries our metadata");
    let t = md.template.expect("<vcc:template>");
    let mut tm: Vec<(Option<String>, String)> = t.masters.iter().map(|m| (m.target.clone(), m.path.clone())).collect();
    tm.sort();
    assert_eq!(tm, vec![(Some("vda".into()), qcow.clone()), (Some("vdb".into()), raw.clone())]);

    // The tree lists the three clones under each master.
    let tree = cli(&["tree", "--json"]);
    tree.assert_ok();
    let tree = tree.json();
    for master in [&qcow, &raw] {
        let node = tree["masters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["path"].as_str() == Some(master.as_str()))
            .unwrap_or_else(|| panic!("tree lists master {master}:\n{tree:#}"));
        let mut doms: Vec<String> =
            node["clones"].as_array().unwrap().iter().filter_map(|c| c["domain"].as_str().map(String::from)).collect();
        doms.sort();
        let mut want = names.to_vec();
        want.sort();
        assert_eq!(doms, want, "clones of {master}");
        assert!(node["clones"].as_array().unwrap().iter().all(|c| c["running"].as_bool() == Some(true)));
        let templates: Vec<&str> = node["templates"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(templates, vec![tmpl.as_str()]);
        let sum: u64 = node["clones"].as_array().unwrap().iter().map(|c| c["allocation"].as_u64().unwrap()).sum();
        assert!(sum > 0);
        assert_eq!(node["clones_allocation"].as_u64(), Some(sum), "clones_allocation adds up the overlays");
    }
}

#[test]
fn clones_get_byte_identical_copies_of_the_template_uefi_vars() {
    let env = TestEnv::new("vars");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    let spec = DomainSpec::new(&tmpl, true).disk(DiskSpec::File {
        path: master.clone(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    let tmpl_nvram = boot_once_for_nvram(&tmpl);
    let tmpl_sha = sha256(&tmpl_nvram);
    // The template's vars differ from the pristine OVMF template only if OVMF wrote them; either
    // way the clones must have the template's, byte for byte.
    let names = [env.name("-a"), env.name("-b")];
    cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1]]).assert_ok();
    let mut seen = HashSet::new();
    for n in &names {
        let nv = facts(n).nvram.and_then(|v| v.path).expect("clone vars path");
        assert_ne!(nv, tmpl_nvram);
        assert!(seen.insert(nv.clone()), "each clone has its own vars file");
        assert_eq!(sha256(&nv), tmpl_sha, "{n}: vars are a copy of the template's");
        assert!(nv.starts_with(NVRAM_DIR), "{nv} beside the template's vars");
    }
    assert_eq!(sha256(&tmpl_nvram), tmpl_sha, "the template's vars are untouched");
    // The copy is usable: the clone boots from it.
    virsh_ok(&["start", &names[0]]);
    assert_eq!(wait_for_state(&names[0], "running", Duration::from_secs(10)), "running");
}

// ---------------------------------------------------------------------------------------------
// Other successful runs

#[test]
fn clone_of_a_file_outside_any_pool_gets_a_qemu_img_overlay_beside_it_and_boots() {
    let env = TestEnv::new("nopool");
    let tmpl = env.name("-tmpl");
    let master = env.in_work("disk.raw");
    make_raw(&master, 16);
    let sha = sha256(&master);
    let spec = DomainSpec::new(&tmpl, false).disk(DiskSpec::File {
        path: master.clone(),
        format: "raw".into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    let name = env.name("-c");
    let run = cli(&["--original", &tmpl, "--name", &name, "--json"]);
    run.assert_ok();
    let report = run.json();
    let overlay = env.in_work(&format!("{name}-vda.qcow2"));
    let disk = &report["clones"][0]["disks"][0];
    assert_eq!(disk["overlay"].as_str(), Some(overlay.as_str()));
    assert!(disk.get("pool").is_none(), "no pool for a file outside pools: {disk}");
    assert_overlay(&overlay, &master, "raw");
    assert!(!virsh(&["vol-info", &overlay]).status.success(), "the overlay is in no pool");
    assert_eq!(facts(&name).disks[0].source, DiskSource::File(overlay.clone()));
    assert_eq!(mode(&master) & 0o222, 0, "master read-only");
    virsh_ok(&["start", &name]);
    assert_eq!(wait_for_state(&name, "running", Duration::from_secs(10)), "running");
    assert_eq!(sha256(&master), sha, "the master is unchanged while the clone runs");
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let env = TestEnv::new("dry");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let (a, b) = (env.name("-a"), env.name("-b"));
    let run = cli(&["--original", &tmpl, "--name", &a, "--name", &b, "--dry-run", "--json"]);
    run.assert_ok();
    let report = run.json();
    assert_eq!(report["dry_run"].as_bool(), Some(true));
    assert_eq!(report["template"].as_bool(), Some(false));
    assert_eq!(clone_names(&report), vec![a.clone(), b.clone()]);
    for c in report["clones"].as_array().unwrap() {
        assert!(c["uuid"].is_null(), "no UUID without a define: {c}");
        assert_eq!(c["started"].as_bool(), Some(false));
        assert_eq!(c["disks"][0]["backing"].as_str(), Some(master.as_str()));
    }
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert!(cow_metadata(&tmpl).is_none(), "no template metadata after a dry run");
    // The text form too.
    let text = cli(&["--original", &tmpl, "--name", &a, "--dry-run"]);
    text.assert_ok();
    assert!(text.stdout.contains("Dry run"), "{}", text.stdout);
    before.assert_unchanged(&env, &tmpl, &[&master]);
}

#[test]
fn auto_clone_with_count_picks_free_original_clone_names() {
    let env = TestEnv::new("auto");
    let (tmpl, _) = bios_template(&env, "-tmpl");
    let run = cli(&["--original", &tmpl, "--auto-clone", "--count", "2", "--json"]);
    run.assert_ok();
    let want = vec![format!("{tmpl}-clone"), format!("{tmpl}-clone-1")];
    assert_eq!(clone_names(&run.json()), want);
    for n in &want {
        assert!(domain_exists(n), "{n} defined");
    }
    // Taken names are skipped on the next run.
    let run = cli(&["--original", &tmpl, "--auto-clone", "--json"]);
    run.assert_ok();
    assert_eq!(clone_names(&run.json()), vec![format!("{tmpl}-clone-2")]);
}

#[test]
fn clones_of_a_template_with_a_fixed_vnc_port_get_autoport_and_run_side_by_side() {
    let env = TestEnv::new("vnc");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    let port = 12000 + (std::process::id() % 2000) as u16;
    let mut spec = DomainSpec::new(&tmpl, false).disk(DiskSpec::File {
        path: master.clone(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    spec.vnc_port = Some(port);
    define_xml(&spec.xml());
    assert!(inactive_xml(&tmpl).contains(&format!("port='{port}' autoport='no'")), "the template has a fixed port");
    let names = [env.name("-a"), env.name("-b")];
    // Two clones keeping the fixed port could not both start.
    cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--start"]).assert_ok();
    let mut displays = HashSet::new();
    for n in &names {
        let xml = inactive_xml(n);
        let g = xml.lines().find(|l| l.contains("<graphics")).unwrap();
        assert!(g.contains("autoport='yes'"), "{n}: {g}");
        assert!(!g.contains(&format!("port='{port}'")), "{n}: {g}");
        assert_eq!(domstate(n), "running");
        assert!(displays.insert(virsh_ok(&["vncdisplay", n]).trim().to_string()), "distinct VNC displays");
    }
    assert!(inactive_xml(&tmpl).contains(&format!("port='{port}' autoport='no'")), "the template keeps its port");
}

// ---------------------------------------------------------------------------------------------
// Failures: one line on stderr, exit 1 (2 for usage), nothing left behind

#[test]
fn existing_clone_name_is_refused_and_nothing_is_made() {
    let env = TestEnv::new("taken");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let taken = env.name("-taken");
    define_xml(&DomainSpec::new(&taken, false).xml());
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let run = cli(&["--original", &tmpl, "--name", &env.name("-new"), "--name", &taken]);
    run.assert_error(1, &[&format!("a domain named '{taken}' exists already")]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
}

#[test]
fn missing_original_is_an_error_and_nothing_is_made() {
    let env = TestEnv::new("missing");
    let before = Snapshot::take(&env, "none", &[]);
    let ghost = env.name("-ghost");
    let run = cli(&["--original", &ghost, "--name", &env.name("-c")]);
    run.assert_error(1, &[&format!("domain '{ghost}' not found")]);
    before.assert_unchanged(&env, "none", &[]);
}

#[test]
fn running_original_is_refused_and_left_running_and_unchanged() {
    let env = TestEnv::new("running");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    virsh_ok(&["start", &tmpl]);
    assert_eq!(wait_for_state(&tmpl, "running", Duration::from_secs(10)), "running");
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let run = cli(&["--original", &tmpl, "--name", &env.name("-c")]);
    run.assert_error(1, &[&format!("domain '{tmpl}' is running")]);
    assert_eq!(domstate(&tmpl), "running");
    virsh_ok(&["destroy", &tmpl]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert!(cow_metadata(&tmpl).is_none());
}

#[test]
fn vmdk_disk_cannot_be_a_master_and_nothing_is_made() {
    let env = TestEnv::new("vmdk");
    let tmpl = env.name("-tmpl");
    let qcow = env.in_pool("base.qcow2");
    let vmdk = env.in_pool("legacy.vmdk");
    make_qcow2(&qcow, 16);
    make_image(&vmdk, "vmdk", 16);
    env.refresh_pool();
    let spec = DomainSpec::new(&tmpl, false)
        .disk(DiskSpec::File { path: qcow.clone(), format: "qcow2".into(), target: "vda".into() })
        .disk(DiskSpec::File { path: vmdk.clone(), format: "vmdk".into(), target: "vdb".into() });
    define_xml(&spec.xml());
    let before = Snapshot::take(&env, &tmpl, &[&qcow, &vmdk]);
    let run = cli(&["--original", &tmpl, "--name", &env.name("-c")]);
    run.assert_error(1, &["disk vdb", "format 'vmdk'", "qemu-img convert"]);
    before.assert_unchanged(&env, &tmpl, &[&qcow, &vmdk]);
}

#[test]
fn full_disk_fails_the_overlay_and_nothing_is_left() {
    let mut env = TestEnv::new("full");
    let fs = env.mount_tmpfs("small", "4M");
    let master = fs.join("disk.raw").to_string_lossy().into_owned();
    make_raw(&master, 1);
    // Fill the rest of the filesystem.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(fs.join("filler")).unwrap();
        let chunk = vec![0x5au8; 64 << 10];
        let full = loop {
            match f.write_all(&chunk) {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "the tmpfs fills up: {full}");
        let _ = f.flush();
    }
    let tmpl = env.name("-tmpl");
    define_xml(
        &DomainSpec::new(&tmpl, false)
            .disk(DiskSpec::File { path: master.clone(), format: "raw".into(), target: "vda".into() })
            .xml(),
    );
    let fs_files = list_dir(&fs);
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let name = env.name("-c");
    let run = cli(&["--original", &tmpl, "--name", &name]);
    run.assert_error(1, &[&format!("creating the overlay for disk vda of '{name}'"), "No space left on device"]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert_eq!(list_dir(&fs), fs_files, "no half-made overlay on the full filesystem");
}

#[test]
fn usage_errors_exit_2() {
    let run = cli(&["--original", "x"]);
    run.assert_error(2, &["--name", "--auto-clone"]);
    let run = cli(&["--original", "x", "--name", "a", "--name", "b", "--count", "3"]);
    run.assert_error(2, &["--count 3 does not match the 2 names"]);
    let run = cli(&["--original", "x", "tree"]);
    run.assert_error(2, &["cannot be used with a subcommand"]);
    // clap's own errors (several lines of help) exit 2 as well.
    assert_eq!(cli(&["--original", "x", "--name", "a", "--count", "0"]).code, 2);
    assert_eq!(cli(&["--no-such-flag"]).code, 2);
}

#[test]
fn existing_overlay_of_the_third_clone_is_caught_before_anything_is_made() {
    let env = TestEnv::new("preflight");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let names = [env.name("-a"), env.name("-b"), env.name("-c")];
    let squatter = env.in_pool(&format!("{}-vda.qcow2", names[2]));
    std::fs::write(&squatter, b"somebody else's file").unwrap();
    let before = Snapshot::take(&env, &tmpl, &[&master, &squatter]);
    let run = cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--name", &names[2]]);
    run.assert_error(1, &[&format!("'{squatter}' exists already")]);
    before.assert_unchanged(&env, &tmpl, &[&master, &squatter]);
}

#[test]
fn existing_vars_file_of_the_second_clone_is_caught_before_anything_is_made() {
    let env = TestEnv::new("preflight-vars");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    define_xml(
        &DomainSpec::new(&tmpl, true)
            .disk(DiskSpec::File { path: master.clone(), format: "qcow2".into(), target: "vda".into() })
            .xml(),
    );
    let tmpl_nvram = boot_once_for_nvram(&tmpl);
    let names = [env.name("-a"), env.name("-b")];
    let squatter = tmpl_nvram.replace(&tmpl, &names[1]);
    assert_ne!(squatter, tmpl_nvram);
    std::fs::write(&squatter, b"not yours").unwrap();
    let before = Snapshot::take(&env, &tmpl, &[&master, &squatter, &tmpl_nvram]);
    let run = cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1]]);
    run.assert_error(1, &[&format!("'{squatter}' exists already")]);
    before.assert_unchanged(&env, &tmpl, &[&master, &squatter, &tmpl_nvram]);
}

#[test]
fn failure_defining_the_second_clone_rolls_back_the_first() {
    let env = TestEnv::new("midrun");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    // libvirt refuses a newline in a domain name at define time, after the first clone is defined
    // and the second one's overlay made.
    let first = env.name("-a");
    let bad = env.name("-b\nbad");
    let run = cli(&["--original", &tmpl, "--name", &first, "--name", &bad]);
    run.assert_error(1, &[&env.name("-b bad")]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert!(!domain_exists(&first), "the first clone was undefined again");
}

#[test]
fn failure_starting_the_clones_rolls_back_definitions_template_mark_and_master_modes() {
    let env = TestEnv::new("startfail");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    let mut spec = DomainSpec::new(&tmpl, false).disk(DiskSpec::File {
        path: master.clone(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    // The serial log's directory does not exist: every clone fails to start, after all of them
    // were defined and the original was made a template.
    spec.serial_file = Some(env.in_work(&format!("no-such-dir/{tmpl}-serial.log")));
    define_xml(&spec.xml());
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    assert!(mode(&master) & 0o200 != 0);
    let names = [env.name("-a"), env.name("-b")];
    let run = cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--start"]);
    run.assert_error(1, &[&format!("starting domain '{}'", names[0])]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert!(cow_metadata(&tmpl).is_none(), "the template mark was removed again");
    let immutable = vcc_core::protect::is_immutable(std::path::Path::new(&master)).unwrap();
    assert_eq!(immutable, Some(false), "the master made immutable for the clones stayed so");
}

#[test]
fn vars_file_appearing_after_planning_fails_the_second_clone_and_rolls_back_the_first() {
    use vcc_core::overlay::OverlayOptions;
    use vcc_libvirt::Libvirt;
    use virt_clone_cow::apply::{apply, ApplyError, ApplyOptions};
    use virt_clone_cow::cmd::clone::{make_plan, CloneRequest, NameRequest};

    let env = TestEnv::new("race");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    define_xml(
        &DomainSpec::new(&tmpl, true)
            .disk(DiskSpec::File { path: master.clone(), format: "qcow2".into(), target: "vda".into() })
            .xml(),
    );
    let tmpl_nvram = boot_once_for_nvram(&tmpl);
    let before = Snapshot::take(&env, &tmpl, &[&master, &tmpl_nvram]);

    let lv = Libvirt::open(Some(URI)).unwrap();
    let names = vec![env.name("-a"), env.name("-b")];
    let req = CloneRequest {
        original: tmpl.clone(),
        names: NameRequest::Names(names.clone()),
        start: false,
        dry_run: false,
        disposable: false,
        overlay: Default::default(),
        reflink: false,
        sysprep: false,
    };
    let plan = make_plan(&lv, &req).unwrap();
    // Another process takes the second clone's vars path between planning and applying.
    let squatter = plan.clones[1].nvram.as_ref().expect("the plan copies the vars").to.clone();
    std::fs::write(&squatter, b"not yours").unwrap();

    let err = apply(&lv, &plan, ApplyOptions { start: false, overlay: OverlayOptions::detect(), sysprep: false })
        .unwrap_err();
    assert!(matches!(err, ApplyError::NvramExists(ref p) if *p == squatter), "{err:?}");
    assert_eq!(std::fs::read(&squatter).unwrap(), b"not yours", "the other process's file is untouched");
    std::fs::remove_file(&squatter).unwrap();
    before.assert_unchanged(&env, &tmpl, &[&master, &tmpl_nvram]);
    assert!(!domain_exists(&names[0]), "the first clone was undefined again");
}

// ---------------------------------------------------------------------------------------------
// More shapes of templates

#[test]
fn clones_of_a_template_with_a_vnc_unix_socket_get_their_own_sockets_and_run_side_by_side() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = TestEnv::new("vncsock");
    let (tmpl, _) = bios_template(&env, "-tmpl");
    let dir = env.work_dir.join("sockets");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let sock = dir.join(format!("{tmpl}.vnc")).to_string_lossy().into_owned();
    let xml = inactive_xml(&tmpl);
    let g0 = xml.find("<graphics").unwrap();
    let g1 = xml.find("</graphics>").unwrap() + "</graphics>".len();
    let with_socket = format!(
        "{}<graphics type='vnc'><listen type='socket' socket='{}'/></graphics>{}",
        &xml[..g0],
        esc(&sock),
        &xml[g1..]
    );
    define_xml(&with_socket);
    assert!(inactive_xml(&tmpl).contains(&format!("socket='{}'", esc(&sock))));
    let names = [env.name("-a"), env.name("-b")];
    cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--start"]).assert_ok();
    let mut socks = HashSet::new();
    for n in &names {
        assert_eq!(domstate(n), "running");
        let x = inactive_xml(n);
        let l = x.lines().find(|l| l.contains("<listen type='socket'")).unwrap();
        assert!(!l.contains(&format!("socket='{}'", esc(&sock))), "{n} does not reuse the template's socket: {l}");
        let p = l.split("socket='").nth(1).unwrap().split('\'').next().unwrap().to_string();
        assert!(std::fs::metadata(&p).unwrap().file_type().is_socket(), "{n}: {p} is a live socket");
        assert!(socks.insert(p), "each clone has its own socket");
    }
}

#[test]
fn disposable_clones_are_marked_in_their_metadata() {
    let env = TestEnv::new("disposable");
    let (tmpl, _) = bios_template(&env, "-tmpl");
    let name = env.name("-d");
    let run = cli(&["--original", &tmpl, "--name", &name, "--disposable"]);
    run.assert_ok();
    assert!(run.stdout.contains(&format!("Made 1 linked clone(s) of '{tmpl}'")), "text report:\n{}", run.stdout);
    assert!(run.stdout.contains(&name), "text report names the clone:\n{}", run.stdout);
    assert!(run.stderr.is_empty(), "nothing on stderr on success: {}", run.stderr);
    let c = cow_metadata(&name).and_then(|m| m.clone).expect("clone metadata");
    assert!(c.disposable);
    let plain = env.name("-p");
    cli(&["--original", &tmpl, "--name", &plain]).assert_ok();
    assert!(!cow_metadata(&plain).and_then(|m| m.clone).unwrap().disposable);
}

#[test]
fn a_clone_can_itself_be_cloned_and_the_grandchild_boots_over_the_whole_chain() {
    let env = TestEnv::new("chain");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let child = env.name("-child");
    cli(&["--original", &tmpl, "--name", &child]).assert_ok();
    let child_overlay = env.in_pool(&format!("{child}-vda.qcow2"));
    let grandchild = env.name("-grandchild");
    let run = cli(&["--original", &child, "--name", &grandchild, "--start", "--json"]);
    run.assert_ok();
    let g_overlay = env.in_pool(&format!("{grandchild}-vda.qcow2"));
    assert_overlay(&g_overlay, &child_overlay, "qcow2");
    assert_eq!(domstate(&grandchild), "running");
    assert_eq!(mode(&child_overlay) & 0o222, 0, "the child's overlay is now a read-only master");
    assert_eq!(mode(&master) & 0o222, 0);
    // The child is now both a clone and a template.
    let md = cow_metadata(&child).unwrap();
    assert_eq!(md.clone.unwrap().original, tmpl);
    assert_eq!(md.template.unwrap().masters[0].path, child_overlay);
    // The tree shows the grandchild under the child's overlay, and the child under the master.
    let tree = cli(&["tree", "--json"]);
    tree.assert_ok();
    let tree = tree.json();
    let clones_of = |path: &str| -> Vec<String> {
        tree["masters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["path"].as_str() == Some(path))
            .map(|m| {
                m["clones"].as_array().unwrap().iter().filter_map(|c| c["domain"].as_str().map(String::from)).collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(clones_of(&master), vec![child.clone()]);
    assert_eq!(clones_of(&child_overlay), vec![grandchild.clone()]);
}

#[test]
fn unreachable_libvirt_is_a_one_line_error_exit_1() {
    let out = std::process::Command::new(cli_path())
        .args(["--connect", "qemu+unix:///system?socket=/nonexistent/vcct.sock", "--original", "x", "--name", "y"])
        .output()
        .unwrap();
    let run = CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    run.assert_error(1, &["cannot connect to libvirt"]);
}

#[test]
fn invalid_or_duplicate_clone_names_are_refused_before_anything_is_made() {
    let env = TestEnv::new("badname");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let slash = env.name("-a/b");
    cli(&["--original", &tmpl, "--name", &slash]).assert_error(1, &[&format!("'{slash}' is not a valid domain name")]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    let twice = env.name("-twice");
    cli(&["--original", &tmpl, "--name", &twice, "--name", &twice])
        .assert_error(1, &[&format!("'{twice}' is given twice")]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
}

#[test]
fn name_with_count_makes_numbered_clones() {
    let env = TestEnv::new("numbered");
    let (tmpl, _) = bios_template(&env, "-tmpl");
    let base = env.name("-web");
    let run = cli(&["--original", &tmpl, "--name", &base, "--count", "3", "--json"]);
    run.assert_ok();
    let want: Vec<String> = (1..=3).map(|i| format!("{base}-{i}")).collect();
    assert_eq!(clone_names(&run.json()), want);
    assert!(want.iter().all(|n| domain_exists(n)));
}

#[test]
fn failed_second_run_keeps_the_first_runs_clones_read_only_masters_and_template_mark() {
    let env = TestEnv::new("rerun");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    let mut spec = DomainSpec::new(&tmpl, false).disk(DiskSpec::File {
        path: master.clone(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    // Clones cannot start (the serial log's directory is missing), but can be defined.
    spec.serial_file = Some(env.in_work(&format!("no-such-dir/{tmpl}-serial.log")));
    define_xml(&spec.xml());
    let first = env.name("-first");
    cli(&["--original", &tmpl, "--name", &first]).assert_ok();
    assert_eq!(mode(&master) & 0o222, 0);
    let md_after_first = cow_metadata(&tmpl).expect("template mark");
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let run = cli(&["--original", &tmpl, "--name", &env.name("-second"), "--start"]);
    run.assert_error(1, &["starting domain"]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert_eq!(mode(&master) & 0o222, 0, "the first clone still depends on the master: it stays read-only");
    assert_eq!(cow_metadata(&tmpl), Some(md_after_first), "the template mark is as the first run left it");
    assert!(domain_exists(&first));
}

#[test]
fn uefi_vars_inside_a_pool_are_copied_as_volumes_of_that_pool() {
    let env = TestEnv::new("poolvars");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    let vars = env.in_pool(&format!("{tmpl}_VARS.fd"));
    let xml = DomainSpec::new(&tmpl, true)
        .disk(DiskSpec::File { path: master.clone(), format: "qcow2".into(), target: "vda".into() })
        .xml()
        .replace(
            &format!("<nvram template='{OVMF_VARS}'/>"),
            &format!("<nvram template='{OVMF_VARS}'>{}</nvram>", esc(&vars)),
        );
    assert!(xml.contains(&vars));
    define_xml(&xml);
    assert_eq!(boot_once_for_nvram(&tmpl), vars);
    env.refresh_pool();
    let sha = sha256(&vars);
    let names = [env.name("-a"), env.name("-b")];
    let run = cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--json"]);
    run.assert_ok();
    for n in &names {
        let nv = env.in_pool(&format!("{n}_VARS.fd"));
        assert_eq!(facts(n).nvram.and_then(|v| v.path).as_deref(), Some(nv.as_str()));
        assert_eq!(sha256(&nv), sha, "{n}: vars copied byte for byte");
        let vol = virsh_ok(&["vol-path", "--pool", &env.pool, &format!("{n}_VARS.fd")]);
        assert_eq!(vol.trim(), nv, "{n}: the copy is a volume of the pool");
    }
    virsh_ok(&["start", &names[0]]);
    assert_eq!(wait_for_state(&names[0], "running", Duration::from_secs(10)), "running");
}

#[test]
fn clones_of_a_never_started_uefi_template_get_fresh_vars_at_first_start() {
    let env = TestEnv::new("freshvars");
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    define_xml(
        &DomainSpec::new(&tmpl, true)
            .disk(DiskSpec::File { path: master.clone(), format: "qcow2".into(), target: "vda".into() })
            .xml(),
    );
    // libvirt 9.0 names the vars file at define time, but makes it only at the first start.
    let tmpl_vars = facts(&tmpl).nvram.and_then(|n| n.path);
    assert!(tmpl_vars.as_deref().is_some_and(|p| !std::path::Path::new(p).exists()), "{tmpl_vars:?}: named, not made");
    let name = env.name("-c");
    cli(&["--original", &tmpl, "--name", &name, "--start"]).assert_ok();
    assert_eq!(domstate(&name), "running");
    let nv = facts(&name).nvram.and_then(|n| n.path).expect("the clone's vars path");
    assert_ne!(Some(&nv), tmpl_vars.as_ref());
    assert!(nv.contains(&name), "{nv} is the clone's own");
    assert!(std::path::Path::new(&nv).is_file(), "libvirt made {nv} from the OVMF template at start");
    assert!(!std::path::Path::new(tmpl_vars.as_deref().unwrap()).exists(), "the template still has no vars file");
}

/// A template with a serial log file, and two clone names where a directory sits at the second
/// clone's serial log path: only that clone cannot start. Returns (template, master, log dir, names).
fn template_whose_second_clone_cannot_start(env: &TestEnv, uefi: bool) -> (String, String, PathBuf, [String; 2]) {
    let tmpl = env.name("-tmpl");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    let logs = env.work_dir.join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mut spec = DomainSpec::new(&tmpl, uefi).disk(DiskSpec::File {
        path: master.clone(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    spec.serial_file = Some(logs.join(format!("{tmpl}-serial.log")).to_string_lossy().into_owned());
    define_xml(&spec.xml());
    let names = [env.name("-a"), env.name("-b")];
    std::fs::create_dir(logs.join(format!("{}-serial.log", names[1]))).unwrap();
    (tmpl, master, logs, names)
}

#[test]
fn failure_starting_the_second_clone_stops_and_removes_the_first() {
    let env = TestEnv::new("start2");
    let (tmpl, master, logs, names) = template_whose_second_clone_cannot_start(&env, false);
    let logs_before = list_dir(&logs);
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let run = cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--start"]);
    run.assert_error(1, &[&format!("starting domain '{}'", names[1])]);
    assert!(!domain_exists(&names[0]), "the first clone, started, was stopped and undefined");
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert_eq!(list_dir(&logs), logs_before, "no serial log of the removed first clone is left");
}

#[test]
fn template_with_an_smbios_system_uuid_can_be_cloned() {
    let env = TestEnv::new("sysinfo");
    let (tmpl, _) = bios_template(&env, "-tmpl");
    let uuid = domuuid(&tmpl);
    let xml = inactive_xml(&tmpl).replacen(
        "  <os>",
        &format!(
            "  <sysinfo type='smbios'><system><entry name='serial'>tmpl</entry><entry name='uuid'>{uuid}</entry></system></sysinfo>\n  <os>"
        ),
        1,
    );
    define_xml(&xml);
    assert!(inactive_xml(&tmpl).contains(&format!("<entry name='uuid'>{uuid}</entry>")));
    let names = [env.name("-a"), env.name("-b")];
    cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--start"]).assert_ok();
    let uuids: HashSet<String> = names.iter().map(|n| domuuid(n)).chain([uuid]).collect();
    assert_eq!(uuids.len(), 3, "every clone has its own UUID");
    for n in &names {
        assert_eq!(domstate(n), "running");
        assert!(inactive_xml(n).contains("<entry name='serial'>tmpl</entry>"), "other SMBIOS entries are kept");
    }
}

#[test]
fn clones_get_new_vm_generation_ids() {
    let env = TestEnv::new("genid");
    let (tmpl, _) = bios_template(&env, "-tmpl");
    define_xml(&inactive_xml(&tmpl).replacen("  <memory", "  <genid/>\n  <memory", 1));
    let genid = |n: &str| -> String {
        let x = inactive_xml(n);
        let l = x.lines().find(|l| l.contains("<genid>")).unwrap_or_else(|| panic!("{n} has a stored genid:\n{x}"));
        l.trim().to_string()
    };
    let names = [env.name("-a"), env.name("-b")];
    cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1]]).assert_ok();
    let ids: HashSet<String> = names.iter().map(|n| genid(n)).chain([genid(&tmpl)]).collect();
    assert_eq!(ids.len(), 3, "template and clones have distinct generation IDs: {ids:?}");
}

#[test]
fn writable_block_and_network_disks_are_refused_and_shared_ones_are_kept_as_they_are() {
    let env = TestEnv::new("blocknet");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let base = inactive_xml(&tmpl);
    let block = "<disk type='block' device='disk'><driver name='qemu' type='raw'/>\
                 <source dev='/dev/vcct-no-such-vg/lv0'/><target dev='vdb' bus='virtio'/>SHARE</disk>";
    let nbd = "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
               <source protocol='nbd' name='export1'><host name='127.0.0.1' port='10809'/></source>\
               <target dev='vdc' bus='virtio'/>SHARE</disk>";
    for (disk, needles) in [(block, ["disk vdb", "is a block disk"]), (nbd, ["disk vdc", "is a network disk"])] {
        define_xml(&base.replacen("</devices>", &format!("{}\n  </devices>", disk.replace("SHARE", "")), 1));
        let before = Snapshot::take(&env, &tmpl, &[&master]);
        cli(&["--original", &tmpl, "--name", &env.name("-c")]).assert_error(1, &needles);
        before.assert_unchanged(&env, &tmpl, &[&master]);
    }
    // Marked shareable, both stay shared and untouched in the clone.
    let shared = format!("{}{}", block.replace("SHARE", "<shareable/>"), nbd.replace("SHARE", "<readonly/>"));
    define_xml(&base.replacen("</devices>", &format!("{shared}\n  </devices>"), 1));
    let name = env.name("-c");
    cli(&["--original", &tmpl, "--name", &name]).assert_ok();
    let f = facts(&name);
    let t = facts(&tmpl);
    for target in ["vdb", "vdc"] {
        let d = |f: &vcc_core::xml::DomainFacts| {
            f.disks.iter().find(|d| d.target.as_deref() == Some(target)).cloned().unwrap()
        };
        let (c, o) = (d(&f), d(&t));
        assert_eq!(
            (c.source, c.format, c.shareable, c.readonly),
            (o.source, o.format, o.shareable, o.readonly),
            "{target}"
        );
    }
    assert_eq!(
        f.disks.iter().find(|d| d.target.as_deref() == Some("vdb")).unwrap().source,
        DiskSource::Block("/dev/vcct-no-such-vg/lv0".into())
    );
}

#[test]
fn interrupting_a_run_with_sigint_or_sigterm_leaves_nothing_behind() {
    let env = TestEnv::new("sigint");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let base = env.name(&format!("-s{signal}"));
        let mut child = std::process::Command::new(cli_path())
            .args(["--connect", URI, "--original", &tmpl, "--name", &base, "--count", "100"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait (bounded) until the run has defined its first clone, then interrupt it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !domain_exists(&format!("{base}-1")) {
            assert!(std::time::Instant::now() < deadline, "the run never defined its first clone");
            assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = i32::try_from(child.id()).unwrap();
        run_ok("kill", &[format!("-{signal}"), pid.to_string()]);
        let out = child.wait_with_output().unwrap();
        let run = CliRun {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        run.assert_error(1, &["interrupted"]);
        before.assert_unchanged(&env, &tmpl, &[&master]);
    }
}

#[test]
fn failure_starting_the_second_uefi_clone_leaves_no_vars_file_libvirt_made_for_the_first() {
    let env = TestEnv::new("start2uefi");
    // Never started: there are no vars to copy, libvirt makes each clone's at its first start.
    let (tmpl, master, _logs, names) = template_whose_second_clone_cannot_start(&env, true);
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let run = cli(&["--original", &tmpl, "--name", &names[0], "--name", &names[1], "--start"]);
    run.assert_error(1, &[&format!("starting domain '{}'", names[1])]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
}

#[test]
fn managed_saved_original_is_refused_and_its_saved_state_kept() {
    let env = TestEnv::new("msave");
    let (tmpl, master) = bios_template(&env, "-tmpl");
    virsh_ok(&["start", &tmpl]);
    assert_eq!(wait_for_state(&tmpl, "running", Duration::from_secs(10)), "running");
    virsh_ok(&["managedsave", &tmpl]);
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    let run = cli(&["--original", &tmpl, "--name", &env.name("-c")]);
    run.assert_error(1, &[&format!("domain '{tmpl}' has a saved state"), "managedsave-remove"]);
    before.assert_unchanged(&env, &tmpl, &[&master]);
    assert!(cow_metadata(&tmpl).is_none());
    virsh_ok(&["managedsave-remove", &tmpl]);
}

#[test]
fn a_template_no_longer_starts_at_boot() {
    let env = TestEnv::new("autostart");
    let (tmpl, _master) = bios_template(&env, "-tmpl");
    virsh_ok(&["autostart", &tmpl]);
    let run = cli(&["--original", &tmpl, "--name", &env.name("-c")]);
    run.assert_ok();
    let info = virsh_ok(&["dominfo", &tmpl]);
    let autostart = info.lines().find(|l| l.starts_with("Autostart:")).unwrap_or_default().to_string();
    assert!(autostart.ends_with("disable"), "{info}");
}
