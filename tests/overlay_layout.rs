//! `virt-clone-cow --overlay-layout`: the overlays a clone gets have the cluster size and
//! extended L2 entries asked for, as `qemu-img info --output=json` reads them, whether libvirt
//! makes them (a master in a pool: the storage API) or qemu-img does (a master outside any
//! pool); a bad value is one usage line, exit 2, and nothing is made. Real libvirtd
//! (qemu:///system) and qemu-img.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use vcc_core::layout::OverlayLayout;
use vcc_tests::*;

/// A BIOS template `<prefix><suffix>` with one master `path` (`format`) as vda.
fn template(env: &TestEnv, suffix: &str, path: &str, format: &str) -> String {
    let name = env.name(suffix);
    let spec = DomainSpec::new(&name, false).disk(DiskSpec::File {
        path: path.into(),
        format: format.into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    name
}

/// Clones `tmpl` as `name` with `args` and returns the overlay's `qemu-img info` after checking
/// it is over `master`.
fn clone_with(tmpl: &str, name: &str, args: &[&str], master: &str) -> serde_json::Value {
    let mut argv = vec!["--original", tmpl, "--name", name, "--json"];
    argv.extend_from_slice(args);
    let run = cli(&argv);
    run.assert_ok();
    let want = match args.iter().position(|a| *a == "--overlay-layout") {
        Some(i) => args[i + 1].parse::<OverlayLayout>().unwrap(),
        None => OverlayLayout::DEFAULT,
    };
    assert_eq!(run.json()["overlay_layout"].as_str(), Some(want.to_string().as_str()), "--json names the layout");
    let overlay = run.json()["clones"][0]["disks"][0]["overlay"].as_str().unwrap().to_string();
    let info = qemu_img_info(&overlay, "qcow2");
    assert_eq!(info["backing-filename"].as_str(), Some(master), "{overlay}\n{info:#}");
    info
}

fn layout_of(info: &serde_json::Value) -> (u64, bool) {
    let cluster = info["cluster-size"].as_u64().unwrap_or_else(|| panic!("no cluster-size: {info:#}"));
    (cluster, info["format-specific"]["data"]["extended-l2"].as_bool().unwrap_or(false))
}

#[test]
fn clones_get_the_overlay_layout_asked_for_from_libvirt_and_from_qemu_img() {
    let env = TestEnv::new("layout");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 32);
    env.refresh_pool();
    let tmpl = template(&env, "-tmpl", &master, "qcow2");

    let default = OverlayLayout::DEFAULT;
    let cases: [(&str, &[&str], (u64, bool)); 6] = [
        ("-none", &[], (default.cluster_size as u64, default.extended_l2)),
        ("-default", &["--overlay-layout", "default"], (64 << 10, false)),
        ("-l2-128k", &["--overlay-layout", "128k-l2"], (128 << 10, true)),
        ("-l2-64k", &["--overlay-layout", "64k-l2"], (64 << 10, true)),
        ("-l2-2m", &["--overlay-layout", "2m-l2"], (2 << 20, true)),
        ("-opts", &["--overlay-layout", "cluster_size=32k,extended_l2=off"], (32 << 10, false)),
    ];
    for (suffix, args, want) in cases {
        let name = env.name(suffix);
        let info = clone_with(&tmpl, &name, args, &master);
        assert_eq!(layout_of(&info), want, "{name} {args:?}: (cluster size, extended L2)\n{info:#}");
        assert_eq!(info["format-specific"]["data"]["compat"].as_str(), Some("1.1"), "{info:#}");
        let vol = virsh_ok(&["vol-path", "--pool", &env.pool, &format!("{name}-vda.qcow2")]);
        assert!(!vol.trim().is_empty(), "{name}: the overlay is a volume of the pool");
    }
    // A dry run says which layout it would use, and makes nothing.
    let dry = env.name("-dry");
    let run = cli(&["--original", &tmpl, "--name", &dry, "--overlay-layout", "128k-l2", "--dry-run"]);
    run.assert_ok();
    assert!(run.stdout.contains("overlay layout: 128k-l2"), "{}", run.stdout);
    let run = cli(&["--original", &tmpl, "--name", &dry, "--overlay-layout", "2m-l2", "--dry-run", "--json"]);
    run.assert_ok();
    assert_eq!(run.json()["overlay_layout"].as_str(), Some("2m-l2"), "{}", run.stdout);
    assert!(!virsh(&["dominfo", &dry]).status.success(), "a dry run defines nothing");

    // An overlay with subclusters runs: the clone starts.
    let l2 = env.name("-l2-2m");
    virsh_ok(&["start", &l2]);
    assert_eq!(wait_for_state(&l2, "running", Duration::from_secs(10)), "running");

    // A master outside any pool: qemu-img makes the overlay beside it.
    let raw = env.in_work("disk.raw");
    make_raw(&raw, 16);
    let tmpl2 = template(&env, "-tmpl2", &raw, "raw");
    let info = clone_with(&tmpl2, &env.name("-file"), &["--overlay-layout", "2M-L2"], &raw);
    assert_eq!(layout_of(&info), (2 << 20, true), "{info:#}");
    let info = clone_with(&tmpl2, &env.name("-file2"), &["--overlay-layout", "64k-l2"], &raw);
    assert_eq!(layout_of(&info), (64 << 10, true), "{info:#}");
}

#[test]
fn a_bad_overlay_layout_is_one_usage_line_and_nothing_is_made() {
    let env = TestEnv::new("layoutbad");
    let master = env.in_pool("base.qcow2");
    make_qcow2(&master, 16);
    env.refresh_pool();
    let tmpl = template(&env, "-tmpl", &master, "qcow2");
    let before = Snapshot::take(&env, &tmpl, &[&master]);
    for bad in ["fast", "8k-l2", "cluster_size=3k", "cluster_size=128k,extended_l2=yes", "4m-l2"] {
        let run = cli(&["--original", &tmpl, "--name", &env.name("-c"), "--overlay-layout", bad]);
        run.assert_error(2, &["--overlay-layout", &format!("invalid overlay layout '{bad}'"), "128k-l2"]);
    }
    before.assert_unchanged(&env, &tmpl, &[&master]);
}
