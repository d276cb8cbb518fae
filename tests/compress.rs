#![allow(clippy::unwrap_used)]
//! `virt-clone-cow publish TEMPLATE --compress` against the real libvirtd, qemu-img and a real
//! pool-helper daemon: the tiny guest's raw master gets a new zstd-compressed qcow2 master beside
//! it that reads the same data, the template is pointed at it and published with it, a clone made
//! before keeps the old master, a clone made after gets the new one, and a guest boots from an
//! overlay of it. Refusals (already compressed, incompressible) and a failed publish leave
//! nothing behind.

use std::path::Path;
use std::time::Duration;

use vcc_tests::*;

const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// A template domain named `<prefix><suffix>` on the raw master `master` (vda), its serial console
/// to `log`.
fn template_on(env: &TestEnv, suffix: &str, master: &str, log: &Path) -> String {
    let name = env.name(suffix);
    let xml = guest_xml(&name, guest_domain_type(), Path::new(master), log)
        .replace("<driver name='qemu' type='qcow2'/>", "<driver name='qemu' type='raw'/>");
    assert!(xml.contains("type='raw'"), "{xml}");
    define_xml(&xml);
    name
}

fn compare(a: &str, fa: &str, b: &str, fb: &str) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-U", "-f", fa, "-F", fb, a, b])
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare {a} {b}: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// Files in the pool directory that are ours and hidden (a staging file left behind).
fn hidden(env: &TestEnv) -> Vec<String> {
    list_dir(&env.pool_dir).into_iter().filter(|f| f.starts_with('.') && f.contains("vcc-compress")).collect()
}

#[test]
fn compress_publishes_a_smaller_master_that_reads_the_same_and_boots_and_old_clones_keep_theirs() {
    let env = TestEnv::new("cmp");
    let master = env.in_pool("base.raw");
    std::fs::copy(tiny_master_raw(), &master).unwrap();
    env.refresh_pool();
    let master_sha = sha256(&master);
    let log = env.work_dir.join("tmpl.serial.log");
    let tmpl = template_on(&env, "-tmpl", &master, &log);
    let mut daemon = PoolHelper::new(&env.work_dir.join("state"));
    daemon.serve();
    let sock = daemon.state.join("control.sock").to_string_lossy().into_owned();

    let before = env.name("-before");
    cli(&["--original", &tmpl, "--name", &before]).assert_ok();

    let report = cli(&["--json", "publish", &tmpl, "--compress", "--control-socket", &sock]).assert_ok().json();
    let m = &report["masters"][0];
    let zst = env.in_pool("base.zst.qcow2");
    assert_eq!(m["path"].as_str(), Some(zst.as_str()), "{report:#}");
    assert_eq!((m["volume"].as_str(), m["format"].as_str()), (Some("base.zst.qcow2"), Some("qcow2")), "{report:#}");
    let from = &m["compressed_from"];
    assert_eq!((from["path"].as_str(), from["format"].as_str()), (Some(master.as_str()), Some("raw")), "{report:#}");
    let raw_size = std::fs::metadata(&master).unwrap().len();
    let zst_size = std::fs::metadata(&zst).unwrap().len();
    assert_eq!((from["size"].as_u64(), from["compressed_size"].as_u64()), (Some(raw_size), Some(zst_size)));
    println!("tiny master: raw {raw_size} bytes, zstd qcow2 {zst_size} bytes");
    // The tiny master is mostly random padding (docs/guests.md): smaller, not much smaller.
    assert!(zst_size < raw_size, "compressed {zst_size} of {raw_size}");

    // A compressed qcow2 (zstd) with the same guest-visible data; the old master untouched; the
    // new one read-only like a master; nothing of the staging left.
    let info = qemu_img_info(&zst, "qcow2");
    assert_eq!(info["format-specific"]["data"]["compression-type"].as_str(), Some("zstd"), "{info:#}");
    assert!(compare(&master, "raw", &zst, "qcow2"), "the compressed master reads other data");
    assert_eq!(sha256(&master), master_sha, "the old master changed");
    assert_eq!(mode(&zst) & 0o222, 0, "the new master is writable: {:o}", mode(&zst));
    assert!(hidden(&env).is_empty(), "{:?}", list_dir(&env.pool_dir));

    // Published with the new master's identity, which the template records; its disk reads it.
    assert_eq!(m["sha256"].as_str(), Some(sha256(&zst).as_str()), "{report:#}");
    let t = cow_metadata(&tmpl).unwrap().template.unwrap();
    assert_eq!((t.masters[0].path.as_str(), t.masters[0].format.as_str()), (zst.as_str(), "qcow2"));
    assert_eq!(t.masters[0].sha256.as_deref(), m["sha256"].as_str());
    let disk = &facts(&tmpl).disks[0];
    assert_eq!(disk.source, vcc_core::xml::DiskSource::File(zst.clone()));
    assert_eq!(disk.format.as_deref(), Some("qcow2"));
    let manifest_path = m["manifest"].as_str().unwrap();
    assert_eq!(manifest(Path::new(manifest_path))["format"].as_str(), Some("qcow2"));
    assert!(cli(&["--json", "publish", &tmpl, "--control-socket", &sock]).json()["masters"][0]["sha256"]
        .as_str()
        .is_some_and(|s| s == sha256(&zst)));

    // The clone made before keeps the old master; one made after gets the new one.
    let old = cow_metadata(&before).unwrap().clone.unwrap().disks[0].master.clone();
    assert_eq!((old.path.as_str(), old.format.as_str()), (master.as_str(), "raw"));
    let after = env.name("-after");
    cli(&["--original", &tmpl, "--name", &after]).assert_ok();
    let new = cow_metadata(&after).unwrap().clone.unwrap().disks[0].master.clone();
    assert_eq!((new.path.as_str(), new.format.as_str()), (zst.as_str(), "qcow2"));
    assert_eq!(new.sha256.as_deref(), m["sha256"].as_str());

    // A guest boots from an overlay of the compressed master.
    let overlay = env.pool_dir.join("boot.qcow2");
    make_overlay_of(Path::new(&zst), "qcow2", &overlay);
    let name = env.name("-boot");
    let boot_log = env.work_dir.join("boot.serial.log");
    define_xml(&guest_xml(&name, guest_domain_type(), &overlay, &boot_log));
    let (line, took) = start_and_wait_up(&name, &boot_log, BOOT_LIMIT);
    println!("tiny guest up in {:.2} s from an overlay of the compressed master", took.as_secs_f64());
    assert_eq!(up_field(&line, "uuid"), Some(domuuid(&name).as_str()), "up line: {line}");
    virsh_ok(&["destroy", &name]);

    // Again: already compressed, refused, nothing changes.
    let xml = inactive_xml(&tmpl);
    cli(&["publish", &tmpl, "--compress", "--control-socket", &sock])
        .assert_error(1, &["already compressed", "without --compress"]);
    assert_eq!(inactive_xml(&tmpl), xml);
}

#[test]
fn a_failed_or_refused_compress_leaves_the_template_and_the_pool_as_they_were() {
    let env = TestEnv::new("cmpf");
    // An 8 MiB raw master: a pattern in its first MiB, the rest sparse (compresses well).
    let master = env.in_pool("base.raw");
    let tmpl = raw_domain(&env, "-tmpl", &master);
    cli(&["--original", &tmpl, "--name", &env.name("-c")]).assert_ok();
    let xml = inactive_xml(&tmpl);
    let files = list_dir(&env.pool_dir);

    // No daemon: the compressed master was made, then the publish failed: both undone.
    cli(&["publish", &tmpl, "--compress", "--control-socket", &env.in_work("none.sock")])
        .assert_error(1, &["publishing volume 'base.zst.qcow2'", "pool-helper serve"]);
    assert_eq!(inactive_xml(&tmpl), xml, "the template was left pointing elsewhere");
    assert_eq!(list_dir(&env.pool_dir), files, "the pool kept something");
    assert!(virsh(&["vol-info", "--pool", &env.pool, "base.zst.qcow2"]).status.code() != Some(0));

    // A volume of that name is there already: refused, not replaced.
    let squatter = env.in_pool("base.zst.qcow2");
    std::fs::write(&squatter, b"not mine").unwrap();
    env.refresh_pool();
    cli(&["publish", &tmpl, "--compress", "--control-socket", &env.in_work("none.sock")])
        .assert_error(1, &["'base.zst.qcow2' already exists", "vol-delete"]);
    assert_eq!(std::fs::read(&squatter).unwrap(), b"not mine");
    std::fs::remove_file(&squatter).unwrap();
    env.refresh_pool();

    // Random data does not compress: refused, nothing left.
    let noise = env.in_pool("noise.raw");
    std::fs::write(&noise, random_bytes(8 << 20, 7)).unwrap();
    env.refresh_pool();
    let noisy = env.name("-noisy");
    let spec = DomainSpec::new(&noisy, false).disk(DiskSpec::File {
        path: noise.clone(),
        format: "raw".into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    let (xml, files) = (inactive_xml(&noisy), list_dir(&env.pool_dir));
    cli(&["publish", &noisy, "--compress", "--control-socket", &env.in_work("none.sock")])
        .assert_error(1, &["does not compress", "without --compress"]);
    assert_eq!(inactive_xml(&noisy), xml);
    assert_eq!(list_dir(&env.pool_dir), files);
    assert!(hidden(&env).is_empty());
    assert_eq!(staged_files(&env.pool_dir, &env.pool, ".zst.qcow2"), Vec::<String>::new(), "nothing left staged");
}

/// `big.raw` in the env's pool: 512 MiB that compress to about half and keep qemu-img busy a
/// while (each 64 KiB cluster the same low-entropy bytes), the disk of a new shut-off domain.
fn big_raw_domain(env: &TestEnv, master: &str) -> String {
    let cluster: Vec<u8> = random_bytes(64 << 10, 3).iter().map(|b| b & 0x0f).collect();
    write_repeated(master, &cluster, 8192);
    env.refresh_pool();
    let name = env.name("-big");
    let spec = DomainSpec::new(&name, false).disk(DiskSpec::File {
        path: master.to_string(),
        format: "raw".into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    name
}

#[test]
fn a_pool_refreshed_while_a_master_is_compressed_never_lists_a_partial_volume() {
    let env = TestEnv::new("cmpref");
    let master = env.in_pool("big.raw");
    let tmpl = big_raw_domain(&env, &master);
    let xml = inactive_xml(&tmpl);
    let staged = || staged_files(&env.pool_dir, &env.pool, "big.zst.qcow2").len();
    // No daemon: the compressed master is made and placed, then the publish fails and it goes.
    let (run, watch) = cli_watching_pool(
        &["publish", &tmpl, "--compress", "--control-socket", &env.in_work("none.sock")],
        &env.pool,
        &["big.zst.qcow2"],
        staged,
    );
    eprintln!("{watch:?}");
    run.assert_error(1, &["publishing volume 'big.zst.qcow2'"]);
    assert!(watch.staged_seen > 0, "the pool was refreshed while the compressed copy was written: {watch:?}");
    assert!(watch.before.iter().any(|v| v == "big.raw"), "the listing reads the volumes: {watch:?}");
    assert!(watch.errors.is_empty(), "the pool could not be refreshed or listed while compressing: {watch:?}");
    assert!(watch.extra.is_empty(), "the pool listed a partial volume while compressing: {watch:?}");
    assert_eq!(staged(), 0, "nothing left staged");
    assert_eq!(list_dir(&env.pool_dir), ["big.raw"], "nothing left in the pool");
    assert_eq!(inactive_xml(&tmpl), xml);
}
