#![allow(clippy::unwrap_used)]
//! `virt-clone-cow publish TEMPLATE` against the real libvirtd and a real pool-helper daemon: the
//! template's masters are published by the daemon and their identity recorded on the template,
//! clones made afterwards carry it, `tree` shows it; and the clear errors (not a template, no
//! daemon, a master in no pool).

use std::os::unix::fs::PermissionsExt;

use vcc_tests::*;

fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[test]
fn publish_records_the_masters_identity_on_the_template_and_later_clones_carry_it() {
    let env = TestEnv::new("pub");
    let master = env.in_pool("base.raw");
    let tmpl = raw_domain(&env, "-tmpl", &master);
    let mut daemon = PoolHelper::new(&env.work_dir.join("state"));
    daemon.serve();
    let sock = daemon.state.join("control.sock").to_string_lossy().into_owned();

    // Not a template yet, and no daemon at that socket: says how to start one, and the domain
    // stays as it was (not a template, its master writable).
    let mode = std::fs::metadata(&master).unwrap().permissions().mode();
    cli(&["publish", &tmpl, "--control-socket", &env.in_work("none.sock")])
        .assert_error(1, &["publishing volume 'base.raw'", "pool-helper serve"]);
    assert!(cow_metadata(&tmpl).is_none_or(|m| m.template.is_none()), "a failed publish left a template");
    assert_eq!(std::fs::metadata(&master).unwrap().permissions().mode(), mode, "a failed publish changed the master");

    let before = env.name("-before");
    cli(&["--original", &tmpl, "--name", &before]).assert_ok();
    // No daemon at that socket: says how to start one, changes nothing.
    cli(&["publish", &tmpl, "--control-socket", &env.in_work("none.sock")])
        .assert_error(1, &["publishing volume 'base.raw'", "pool-helper serve"]);
    assert!(cow_metadata(&tmpl).unwrap().template.unwrap().masters[0].sha256.is_none());

    let run = cli(&["--json", "publish", &tmpl, "--control-socket", &sock]);
    let report = run.assert_ok().json();
    let m = &report["masters"][0];
    let want_sha = sha256(&master);
    assert_eq!(m["sha256"].as_str(), Some(want_sha.as_str()), "{report:#}");
    assert_eq!((m["pool"].as_str(), m["volume"].as_str()), (Some(env.pool.as_str()), Some("base.raw")));
    let info_hash = m["info_hash"].as_str().unwrap().to_string();
    assert!(is_hex(&info_hash, 40), "{info_hash}");
    let manifest_path = m["manifest"].as_str().unwrap().to_string();
    let mf = manifest(std::path::Path::new(&manifest_path));
    assert_eq!((mf["sha256"].as_str(), mf["info_hash"].as_str()), (Some(want_sha.as_str()), Some(info_hash.as_str())));
    // The daemon seeds it.
    let log = daemon.log();
    assert!(std::path::Path::new(&manifest_path).is_file(), "{log}");

    // Recorded on the template, through libvirt.
    let t = cow_metadata(&tmpl).unwrap().template.unwrap();
    let tm = &t.masters[0];
    assert_eq!(tm.target.as_deref(), Some("vda"));
    assert_eq!(tm.sha256.as_deref(), Some(want_sha.as_str()));
    assert_eq!(tm.info_hash.as_deref(), Some(info_hash.as_str()));
    assert_eq!(tm.manifest.as_deref(), Some(manifest_path.as_str()));
    assert_eq!((tm.format.as_str(), tm.virtual_size), ("raw", Some(8 << 20)));
    assert_eq!((tm.pool.as_deref(), tm.volume.as_deref()), (Some(env.pool.as_str()), Some("base.raw")));

    // A clone made afterwards carries it; the one made before does not.
    let after = env.name("-after");
    cli(&["--original", &tmpl, "--name", &after]).assert_ok();
    let cm = cow_metadata(&after).unwrap().clone.unwrap().disks[0].master.clone();
    assert_eq!(cm.sha256.as_deref(), Some(want_sha.as_str()));
    assert_eq!(cm.info_hash.as_deref(), Some(info_hash.as_str()));
    assert_eq!(cm.manifest.as_deref(), Some(manifest_path.as_str()));
    assert!(cow_metadata(&before).unwrap().clone.unwrap().disks[0].master.sha256.is_none());
    // Cloning again kept the identity on the template.
    assert_eq!(cow_metadata(&tmpl).unwrap().template.unwrap().masters[0].sha256.as_deref(), Some(want_sha.as_str()));

    // tree says which master is published.
    let tree = cli(&["--json", "tree"]).assert_ok().json();
    let node = tree["masters"].as_array().unwrap().iter().find(|n| n["path"].as_str() == Some(&master)).unwrap();
    assert_eq!(node["published"]["sha256"].as_str(), Some(want_sha.as_str()), "{node:#}");
    let text = cli(&["tree"]).assert_ok().stdout.clone();
    let line = text.lines().find(|l| l.starts_with(&master)).unwrap();
    assert!(line.contains(&format!("published sha256 {}", &want_sha[..16])), "{line}");
}

#[test]
fn a_master_in_no_pool_is_refused_with_what_to_do() {
    let env = TestEnv::new("pubnp");
    let master = env.in_work("outside.raw");
    let tmpl = raw_domain(&env, "-tmpl", &master);
    cli(&["--original", &tmpl, "--name", &env.name("-c")]).assert_ok();
    let mut daemon = PoolHelper::new(&env.work_dir.join("state"));
    daemon.serve();
    let sock = daemon.state.join("control.sock").to_string_lossy().into_owned();
    cli(&["publish", &tmpl, "--control-socket", &sock]).assert_error(1, &["is in no storage pool", "pool-define-as"]);
    assert!(cow_metadata(&tmpl).unwrap().template.unwrap().masters[0].sha256.is_none(), "nothing recorded");
}
