#![allow(clippy::unwrap_used)]
//! Masters kept while anything depends on them, and garbage collection, against the real libvirtd
//! and a real pool-helper daemon: a master with clones is immutable (libvirt's `vol-delete`,
//! `undefine --remove-all-storage` and `rm` all fail, QEMU still starts the clone over it);
//! `tree` says who holds it; once the last clone is gone `gc --yes` releases it; and on a host
//! with three masters of which one is unused, `gc` lists exactly that one and `gc --yes` removes
//! exactly it, and pool-helper stops seeding it (and drops its record, so a restart does not
//! seed it again).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vcc_core::protect;
use vcc_tests::*;

fn immutable(path: &str) -> bool {
    protect::is_immutable(Path::new(path)).unwrap() == Some(true)
}

/// The node of `path` in `tree --json`.
fn tree_node(path: &str) -> serde_json::Value {
    let tree = cli(&["--json", "tree"]).assert_ok().json();
    tree["masters"].as_array().unwrap().iter().find(|n| n["path"].as_str() == Some(path)).cloned().unwrap_or_default()
}

/// The paths `gc --json` (more arguments: `rest`) lists as unused in this env's pool.
fn unused(env: &TestEnv, rest: &[&str]) -> (Vec<String>, serde_json::Value) {
    let mut args = vec!["--json", "gc", "--pool", &env.pool];
    args.extend_from_slice(rest);
    let r = cli(&args).assert_ok().json();
    let paths = r["unused"].as_array().unwrap().iter().map(|u| u["path"].as_str().unwrap().to_string()).collect();
    (paths, r)
}

/// A test env with a template `-tmpl` over the raw master `base.raw` of its pool: (env, master,
/// template).
fn template(tag: &str) -> (TestEnv, String, String) {
    let env = TestEnv::new(tag);
    let master = env.in_pool("base.raw");
    let tmpl = raw_domain(&env, "-tmpl", &master);
    (env, master, tmpl)
}

/// [`template`] and its clone `-c1`: (env, master, clone).
fn cloned(tag: &str) -> (TestEnv, String, String) {
    let (env, master, tmpl) = template(tag);
    let clone = env.name("-c1");
    cli(&["--original", &tmpl, "--name", &clone]).assert_ok();
    (env, master, clone)
}

#[test]
fn a_master_with_clones_cannot_be_deleted_and_is_released_when_the_last_clone_goes() {
    let (env, master, tmpl) = template("gcprot");
    let clone = env.name("-c1");
    assert!(!immutable(&master));
    cli(&["--original", &tmpl, "--name", &clone]).assert_ok();
    assert!(immutable(&master), "the master of a clone is not immutable");
    assert_eq!(protect::mark(Path::new(&master)).as_deref(), Some(protect::MARK_HELD));

    // libvirt's storage API cannot delete it...
    let o = virsh(&["vol-delete", "--pool", &env.pool, "base.raw"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("Operation not permitted"), "vol-delete: {err}");
    assert!(Path::new(&master).is_file());
    // ...nor a careless rm, as root...
    let o = run("rm", &["-f", &master]);
    assert!(!o.status.success(), "rm -f removed a held master");
    assert!(Path::new(&master).is_file());
    // ...nor undefining the template with all its storage: the domain goes, the master stays.
    let o = virsh(&["undefine", "--remove-all-storage", &tmpl]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("Failed to remove storage volume"), "undefine: {err}");
    assert!(!domain_exists(&tmpl));
    assert!(Path::new(&master).is_file() && immutable(&master));

    // QEMU still opens it (read-only) under the clone.
    virsh_ok(&["start", &clone]);
    assert_eq!(domstate(&clone), "running");

    // tree says why it is held, and how; our own refusal names the dependant.
    let node = tree_node(&master);
    assert_eq!(node["protection"], "immutable", "{node:#}");
    let held = node["held_by"].as_array().unwrap();
    assert!(
        held.iter().any(|h| h["kind"] == "clone" && h["domain"] == clone.as_str() && h["running"] == true),
        "{node:#}"
    );
    let text = cli(&["tree"]).assert_ok().stdout.clone();
    assert!(text.contains(&format!("held by clone {clone} (vda, running)")), "{text}");
    assert!(text.lines().any(|l| l.starts_with(&master) && l.contains("immutable")), "{text}");
    cli(&["gc", "--yes", &master]).assert_error(1, &["is still needed by", &format!("clone {clone}")]);
    assert!(unused(&env, &[]).0.is_empty(), "a held master listed as unused");
    virsh_ok(&["destroy", &clone]);

    // A second template whose clone goes: the master stays held until gc releases it, and then
    // libvirt may delete it with its template.
    let master2 = env.in_pool("base2.raw");
    let tmpl2 = raw_domain(&env, "-tmpl2", &master2);
    let clone2 = env.name("-c2");
    cli(&["--original", &tmpl2, "--name", &clone2]).assert_ok();
    assert!(immutable(&master2));
    virsh_ok(&["undefine", "--remove-all-storage", &clone2]);
    assert!(immutable(&master2), "nothing released it yet");
    let (listed, r) = unused(&env, &["--yes"]);
    assert!(listed.is_empty(), "the template still needs it: {r:#}");
    assert_eq!(r["released"], serde_json::json!([master2]), "{r:#}");
    let kept: Vec<&str> = r["kept"].as_array().unwrap().iter().map(|k| k["path"].as_str().unwrap()).collect();
    assert!(kept.contains(&master2.as_str()) && kept.contains(&master.as_str()), "{r:#}");
    assert!(!immutable(&master2), "released but still immutable");
    assert!(immutable(&master), "the first master (clone c1 left) was released");
    assert_eq!(tree_node(&master2)["protection"], "read-only-mode");
    virsh_ok(&["undefine", "--remove-all-storage", &tmpl2]);
    assert!(!Path::new(&master2).exists(), "undefine --remove-all-storage left the released master");
}

#[test]
fn gc_removes_exactly_the_unused_master_and_pool_helper_stops_seeding_it() {
    let env = TestEnv::new("gc");
    let mut daemon = PoolHelper::new(&env.work_dir.join("state"));
    daemon.serve();
    let sock = daemon.state.join("control.sock").to_string_lossy().into_owned();
    let mut masters = Vec::new();
    for x in ["a", "b", "c"] {
        let master = env.in_pool(&format!("base-{x}.raw"));
        let tmpl = raw_domain(&env, &format!("-tmpl-{x}"), &master);
        cli(&["--original", &tmpl, "--name", &env.name(&format!("-{x}1"))]).assert_ok();
        cli(&["publish", &tmpl, "--control-socket", &sock]).assert_ok();
        masters.push((master, tmpl));
    }
    let listed = |d: &PoolHelper| -> Vec<String> {
        let (_, f) = request(&d.state.join("control.sock"), &serde_json::json!({"op": "list"}));
        let mut v: Vec<String> =
            f["masters"].as_array().unwrap().iter().map(|m| m["path"].as_str().unwrap().to_string()).collect();
        v.sort();
        v
    };
    let all: Vec<String> = masters.iter().map(|(m, _)| m.clone()).collect();
    assert_eq!(listed(&daemon), all, "{}", daemon.log());
    assert!(unused(&env, &["--control-socket", &sock]).0.is_empty(), "every master is used");

    // Master c loses its clone (with its overlay) and its template (keeping its disk).
    let (mc, tc) = &masters[2];
    virsh_ok(&["undefine", "--remove-all-storage", &env.name("-c1")]);
    virsh_ok(&["undefine", tc]);
    let (paths, r) = unused(&env, &["--control-socket", &sock]);
    assert_eq!(paths, [mc.clone()], "{r:#}");
    let u = &r["unused"][0];
    assert_eq!((u["pool"].as_str(), u["volume"].as_str()), (Some(env.pool.as_str()), Some("base-c.raw")));
    let allocated = std::fs::metadata(mc).unwrap().blocks() * 512;
    assert_eq!(u["bytes"].as_u64(), Some(allocated), "the space it frees: {u}");
    assert_eq!(u["found_by"], serde_json::json!(["marked", "pool-helper"]), "{u}");
    assert_eq!(r["pool_helper"], true);
    // tree shows what gc would free.
    let tree = cli(&["--json", "tree"]).assert_ok().json();
    assert!(tree["unused"].as_array().unwrap().iter().any(|u| u["path"].as_str() == Some(mc)), "{tree:#}");
    let text = cli(&["gc", "--pool", &env.pool, "--control-socket", &sock]).assert_ok().stdout.clone();
    assert!(text.contains("Unused 1 master(s), ") && text.contains(mc.as_str()), "{text}");
    assert!(Path::new(mc).is_file(), "gc without --yes removed it");

    let (paths, r) = unused(&env, &["--yes", "--control-socket", &sock]);
    assert_eq!(paths, [mc.clone()], "{r:#}");
    assert_eq!((r["unused"][0]["removed"].as_bool(), r["unused"][0]["forgotten"].as_u64()), (Some(true), Some(1)));
    assert!(!Path::new(mc).exists(), "gc --yes left the unused master");
    for (m, t) in &masters[..2] {
        assert!(Path::new(m).is_file() && immutable(m), "{m} was touched");
        assert!(domain_exists(t));
    }
    let vols = virsh_ok(&["vol-list", &env.pool]);
    assert!(!vols.contains("base-c.raw") && vols.contains("base-a.raw"), "{vols}");
    assert_eq!(listed(&daemon), all[..2], "pool-helper still lists it: {}", daemon.log());
    // Forgotten for good: no record left for a restarted daemon to seed again.
    let records = list_dir(daemon.state.join("masters"));
    assert!(!records.iter().any(|f| f.ends_with("base-c.raw.json")), "{records:?}");
    assert_eq!(records.iter().filter(|f| f.ends_with(".json")).count(), 2, "{records:?}");
    assert!(unused(&env, &["--control-socket", &sock]).0.is_empty());
}

#[test]
fn a_flag_an_administrator_set_is_kept_through_clones_and_gc() {
    let env = TestEnv::new("gcadmin");
    let master = env.in_pool("base.raw");
    let tmpl = raw_domain(&env, "-tmpl", &master);
    // Immutable but still with its write bits: cloning must not try to chmod it.
    run_ok("chattr", &["+i", &master]);
    assert!(mode(&master) & 0o200 != 0);
    let clone = env.name("-c1");
    cli(&["--original", &tmpl, "--name", &clone]).assert_ok();
    assert!(immutable(&master));
    assert_eq!(protect::mark(Path::new(&master)), None, "marked as ours");
    virsh_ok(&["undefine", "--remove-all-storage", &clone]);
    let (listed, r) = unused(&env, &["--yes"]);
    assert!(listed.is_empty() && r["released"] == serde_json::json!([]), "{r:#}");
    assert!(immutable(&master), "gc cleared a flag it did not set");
}

#[test]
fn a_master_only_root_could_read_is_given_to_qemus_user_and_the_clone_starts() {
    let env = TestEnv::new("gcdac");
    let master = env.in_pool("base.raw");
    let tmpl = raw_domain(&env, "-tmpl", &master);
    std::fs::set_permissions(&master, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let clone = env.name("-c1");
    cli(&["--original", &tmpl, "--name", &clone]).assert_ok();
    assert!(immutable(&master));
    let meta = std::fs::metadata(&master).unwrap();
    assert_ne!(meta.uid(), 0, "still root's: QEMU could not read it once immutable");
    // libvirt cannot chown an immutable file at start; QEMU reads it as its owner.
    virsh_ok(&["start", &clone]);
    assert_eq!(domstate(&clone), "running");
    virsh_ok(&["destroy", &clone]);
}

#[test]
fn gc_yes_makes_a_marked_master_that_lost_its_flag_immutable_again() {
    let (env, master, clone) = cloned("gcreprot");
    // Someone clears the flag while the clone still depends on the master.
    run_ok("chattr", &["-i", &master]);
    assert!(!immutable(&master));
    assert_eq!(tree_node(&master)["protection"], "read-only-mode");
    // gc without --yes changes nothing...
    let (_, r) = unused(&env, &[]);
    assert_eq!(r["protected"], serde_json::json!([]), "{r:#}");
    assert!(!immutable(&master), "gc without --yes protected it");
    // ...with --yes it protects it again, and says so.
    let (listed, r) = unused(&env, &["--yes"]);
    assert!(listed.is_empty(), "{r:#}");
    assert_eq!(r["protected"], serde_json::json!([master]), "{r:#}");
    assert!(immutable(&master), "gc --yes did not make it immutable again");
    assert_eq!(protect::mark(Path::new(&master)).as_deref(), Some(protect::MARK_HELD));
    // Once protected, a second run has nothing to do.
    let (_, r) = unused(&env, &["--yes"]);
    assert_eq!(r["protected"], serde_json::json!([]), "{r:#}");
    run_ok("chattr", &["-i", &master]);
    let text = cli(&["gc", "--yes", "--pool", &env.pool]).assert_ok().stdout.clone();
    assert!(text.contains(&format!("Kept {master}: needed by clone {clone}")), "{text}");
    assert!(text.contains(&format!("Protected {master} (immutable while clones depend on it)")), "{text}");
}

#[test]
fn a_clone_whose_overlay_is_gone_still_holds_its_master_by_its_metadata() {
    let (env, master, clone) = cloned("gcrec");
    // Its disk and overlay go (as a disposable clone's overlay does between runs); the domain
    // and its clone metadata stay.
    virsh_ok(&["detach-disk", &clone, "vda", "--config"]);
    virsh_ok(&["vol-delete", "--pool", &env.pool, &format!("{clone}-vda.qcow2")]);
    let node = tree_node(&master);
    let held = node["held_by"].as_array().unwrap();
    assert!(held.iter().any(|h| h["kind"] == "recorded" && h["domain"] == clone.as_str()), "{node:#}");
    assert!(!held.iter().any(|h| h["kind"] == "clone" || h["kind"] == "overlay"), "no disk now: {node:#}");
    let text = cli(&["tree"]).assert_ok().stdout.clone();
    assert!(text.contains(&format!("clone {clone} (its metadata names it)")), "{text}");
    // gc keeps it, and keeps it immutable; naming it fails with the reason.
    let (listed, r) = unused(&env, &["--yes"]);
    assert!(listed.is_empty(), "{r:#}");
    assert_eq!(r["released"], serde_json::json!([]), "{r:#}");
    assert!(immutable(&master), "released while a clone's metadata names it");
    cli(&["gc", "--yes", &master]).assert_error(1, &["is still needed by", &format!("clone {clone} (its metadata")]);
    // Lost its flag: gc --yes protects it again for the recorded clone alone.
    run_ok("chattr", &["-i", &master]);
    let (_, r) = unused(&env, &["--yes"]);
    assert_eq!(r["protected"], serde_json::json!([master]), "{r:#}");
    assert!(immutable(&master));
    // Once that domain is gone too, only the template is left: released.
    virsh_ok(&["undefine", &clone]);
    let (_, r) = unused(&env, &["--yes"]);
    assert_eq!(r["released"], serde_json::json!([master]), "{r:#}");
    assert!(!immutable(&master));
}

/// Runs `virt-clone-cow --connect qemu:///system ARGS...` without `CAP_LINUX_IMMUTABLE` in its
/// bounding set (so not in its capabilities either, root as it is).
fn cli_without_cap_linux_immutable(args: &[&str]) -> std::process::Output {
    let bin = cli_path();
    let mut argv = vec!["--bounding-set", "-linux_immutable", "--", bin.to_str().unwrap(), "--connect", URI];
    argv.extend_from_slice(args);
    run("setpriv", &argv)
}

#[test]
fn without_cap_linux_immutable_the_master_is_only_read_only_with_a_warning() {
    let (env, master, tmpl) = template("gcnocap");
    let clone = env.name("-c1");
    let o = cli_without_cap_linux_immutable(&["--original", &tmpl, "--name", &clone]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "the clone is made anyway: {err}");
    assert!(err.contains(&format!("master {master} is only read-only, not immutable")), "the warning: {err}");
    assert!(domain_exists(&clone));
    assert!(!immutable(&master));
    assert_eq!(mode(&master) & 0o222, 0, "read-only: mode {:o}", mode(&master));
    assert_eq!(tree_node(&master)["protection"], "read-only-mode");
    // With the capability, the next gc --yes protects it.
    let (_, r) = unused(&env, &["--yes"]);
    assert_eq!(r["protected"], serde_json::json!([master]), "{r:#}");
    assert!(immutable(&master));
}

#[test]
fn on_a_filesystem_without_the_attribute_the_master_is_only_read_only_with_a_warning() {
    let mut env = TestEnv::new("gcramfs");
    // ramfs has neither the immutable attribute nor user xattrs (tmpfs has the attribute since
    // Linux 6.0).
    let fs = env.mount_ramfs("ramfs");
    let master = fs.join("base.raw").to_string_lossy().into_owned();
    let tmpl = raw_domain(&env, "-tmpl", &master);
    let clone = env.name("-c1");
    let run = cli(&["--original", &tmpl, "--name", &clone]);
    run.assert_ok();
    let warning = format!("master {master} is on a filesystem without the immutable attribute");
    assert!(run.stderr.contains(&warning), "the warning: {}", run.stderr);
    assert!(domain_exists(&clone));
    assert_eq!(protect::is_immutable(Path::new(&master)).unwrap(), None, "ramfs has no such attribute");
    assert_eq!(mode(&master) & 0o222, 0, "read-only: mode {:o}", mode(&master));
    assert_eq!(tree_node(&master)["protection"], "read-only-mode");
}
