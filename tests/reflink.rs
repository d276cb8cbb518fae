//! `virt-clone-cow --reflink` against the real libvirtd on real xfs (reflink=1) and btrfs
//! filesystems made in the test on loop files, with the tiny guest (docs/guests.md) as master.
//!
//! Each filesystem gets a dir pool; a raw master there (a pool volume: libvirt's reflink volume
//! creation), a qcow2 master there as a volume disk (FICLONE, then a pool refresh) and a raw
//! master in a directory of the filesystem outside any pool (FICLONE) are cloned. The copies have
//! no backing file, share the master's extents (`filefrag -v` says `shared`, and the
//! filesystem's used space barely grows), boot, and writes to them leave the master as it was.
//! On ext4 and tmpfs `--reflink` is refused with one line and nothing changed.

#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vcc_tests::*;

/// A filesystem made on a sparse loop file and mounted, with a dir pool over its `pool/`
/// directory; everything is undone on drop (also when a test panics), in reverse.
struct LoopFs {
    image: PathBuf,
    device: Option<String>,
    mount: PathBuf,
    mounted: bool,
    pool: Option<String>,
}

impl LoopFs {
    /// `kind`: `xfs` (made with `-m reflink=1`) or `btrfs`; `size`: as truncate takes it.
    fn new(prefix: &str, kind: &str, size: &str) -> LoopFs {
        let base = PathBuf::from(BASE_DIR);
        std::fs::create_dir_all(&base).unwrap();
        let mut fs = LoopFs {
            image: base.join(format!("{prefix}-{kind}.img")),
            device: None,
            mount: base.join(format!("{prefix}-{kind}.mnt")),
            mounted: false,
            pool: None,
        };
        run_ok("truncate", &[OsStr::new("-s"), size.as_ref(), fs.image.as_os_str()]);
        let dev = run_ok("losetup", &[OsStr::new("-f"), "--show".as_ref(), fs.image.as_os_str()]).trim().to_string();
        fs.device = Some(dev.clone());
        match kind {
            "xfs" => run_ok("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", &dev]),
            "btrfs" => run_ok("mkfs.btrfs", &["-q", "-f", &dev]),
            other => panic!("no such filesystem here: {other}"),
        };
        std::fs::create_dir_all(&fs.mount).unwrap();
        run_ok("mount", &[OsStr::new(&dev), fs.mount.as_os_str()]);
        fs.mounted = true;
        std::fs::create_dir(fs.mount.join("pool")).unwrap();
        std::fs::create_dir(fs.mount.join("outside")).unwrap();
        let name = format!("{prefix}-{kind}");
        virsh_ok(&["pool-define-as", &name, "dir", "--target", fs.mount.join("pool").to_str().unwrap()]);
        fs.pool = Some(name.clone());
        virsh_ok(&["pool-start", &name]);
        fs
    }

    fn pool(&self) -> &str {
        self.pool.as_deref().unwrap()
    }

    fn in_pool(&self, file: &str) -> PathBuf {
        self.mount.join("pool").join(file)
    }

    /// Bytes used on the filesystem (after a sync, so delayed allocation is counted).
    fn used(&self) -> u64 {
        run_ok("sync", &[OsStr::new("-f"), self.mount.as_os_str()]);
        let out = run_ok("stat", &[OsStr::new("-f"), "-c".as_ref(), "%b %f %S".as_ref(), self.mount.as_os_str()]);
        let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        (v[0] - v[1]) * v[2]
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            let _ = virsh(&["pool-destroy", p]);
            let _ = virsh(&["pool-undefine", p]);
        }
        if self.mounted && !run("umount", &[self.mount.as_os_str()]).status.success() {
            let _ = run("umount", &[OsStr::new("-l"), self.mount.as_os_str()]);
        }
        if let Some(d) = &self.device {
            let _ = run("losetup", &["-d", d]);
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}

/// The tiny guest's XML with its disk in `format`, as a file disk or (with `volume`) a volume.
fn tiny_xml(name: &str, disk: &Path, format: &str, volume: Option<(&str, &str)>, log: &Path) -> String {
    let xml = guest_xml(name, guest_domain_type(), disk, log).replace("type='qcow2'", &format!("type='{format}'"));
    match volume {
        None => xml,
        Some((pool, vol)) => {
            xml.replace("<disk type='file' device='disk'>", "<disk type='volume' device='disk'>").replace(
                &format!("<source file='{}'/>", esc(&disk.to_string_lossy())),
                &format!("<source pool='{}' volume='{}'/>", esc(pool), esc(vol)),
            )
        }
    }
}

/// Copies a cached tiny master to `to` (a real copy: the test's own extents to share).
fn place_master(from: &Path, to: &Path) {
    run_ok("cp", &[OsStr::new("--sparse=always"), "--reflink=never".as_ref(), from.as_os_str(), to.as_os_str()]);
}

fn filefrag_says_shared(path: &Path) -> bool {
    run_ok("filefrag", &[OsStr::new("-v"), path.as_os_str()]).lines().any(|l| l.contains("shared"))
}

fn tree_clone<'a>(tree: &'a Value, master: &str, domain: &str) -> Option<&'a Value> {
    tree["masters"]
        .as_array()?
        .iter()
        .find(|m| m["path"] == master)?
        .get("clones")?
        .as_array()?
        .iter()
        .find(|c| c["domain"] == domain)
}

/// One master cloned with --reflink, checked, booted (with `boot`) and written to.
struct Case<'a> {
    what: &'a str,
    master: PathBuf,
    format: &'a str,
    volume: Option<(&'a str, &'a str)>,
    boot: bool,
}

fn reflink_clones_on(kind: &str) {
    let env = TestEnv::new(&format!("rl{kind}"));
    let fs = LoopFs::new(&env.prefix, kind, "1200M");
    let tiny_q = tiny_master();
    let tiny_r = tiny_master_raw();

    let raw = fs.in_pool("base.raw");
    let qcow = fs.in_pool("base.qcow2");
    let outside = fs.mount.join("outside/loose.raw");
    place_master(tiny_r, &raw);
    place_master(tiny_q, &qcow);
    place_master(tiny_r, &outside);
    virsh_ok(&["pool-refresh", fs.pool()]);

    let cases = [
        Case { what: "raw pool volume", master: raw.clone(), format: "raw", volume: None, boot: true },
        Case {
            what: "qcow2 volume disk",
            master: qcow.clone(),
            format: "qcow2",
            volume: Some((fs.pool(), "base.qcow2")),
            boot: true,
        },
        Case { what: "raw file outside any pool", master: outside.clone(), format: "raw", volume: None, boot: false },
    ];
    for (i, case) in cases.iter().enumerate() {
        let tmpl = env.name(&format!("-t{i}"));
        let log = PathBuf::from(env.in_work(&format!("{tmpl}-serial.log")));
        define_xml(&tiny_xml(&tmpl, &case.master, case.format, case.volume, &log));
        let master_sha = sha256(&case.master);
        let master_mode = mode(&case.master);
        let used_before = fs.used();

        let clone = env.name(&format!("-c{i}"));
        let run = cli(&["--original", &tmpl, "--name", &clone, "--reflink", "--json"]);
        run.assert_ok();
        let report = run.json();
        let used_after = fs.used();
        let disk = &report["clones"][0]["disks"][0];
        let copy = PathBuf::from(disk["overlay"].as_str().unwrap());
        eprintln!(
            "{kind} {}: cloned in {} ms (copy and define: {} ms), filesystem grew by {} KiB for a {} MiB master",
            case.what,
            report["elapsed_ms"],
            report["clones"][0]["define_ms"],
            used_after.saturating_sub(used_before) / 1024,
            std::fs::metadata(&case.master).unwrap().len() >> 20
        );
        assert_eq!(disk["reflinked"], true, "{}: {report:#}", case.what);
        assert_eq!(disk["format"], case.format, "{}: {report:#}", case.what);
        assert_eq!(report["template"], false, "{}: the original stays an ordinary domain", case.what);
        assert_eq!(copy.parent(), case.master.parent(), "{}: the copy is beside its master", case.what);

        // A standalone image in the master's format, sharing its extents.
        let info = qemu_img_info(&copy, case.format);
        assert!(info.get("backing-filename").is_none(), "{}: no backing file\n{info:#}", case.what);
        assert_eq!(info["format"], case.format);
        assert!(filefrag_says_shared(&copy), "{}: {} shares no extent", case.what, copy.display());
        let grew = used_after.saturating_sub(used_before);
        assert!(grew < 16 << 20, "{}: the filesystem grew by {grew} bytes for a reflinked copy", case.what);
        assert_eq!(sha256(&copy), master_sha, "{}: the copy has the master's content", case.what);
        let leftovers: Vec<String> =
            list_dir(copy.parent().unwrap()).into_iter().filter(|n| n.contains("vcc-reflink")).collect();
        assert!(leftovers.is_empty(), "{}: temporary files left: {leftovers:?}", case.what);
        // The clone was made in the staging directory on the same filesystem, outside the pool's
        // directory (nothing partial is ever a volume), and nothing is left there.
        let staging = fs.mount.join(".virt-clone-cow-staging/reflink");
        assert!(staging.is_dir(), "{}: no staging directory {}", case.what, staging.display());
        assert!(list_dir(&staging).is_empty(), "{}: left in staging: {:?}", case.what, list_dir(&staging));

        // The clone's XML and metadata: its own disk, no chain, recorded as reflinked.
        let f = facts(&clone);
        let d = f.disks.iter().find(|d| d.target.as_deref() == Some("vda")).unwrap();
        assert_eq!(d.format.as_deref(), Some(case.format));
        assert_eq!(d.backing, vcc_core::xml::BackingDecl::None, "{}: {}", case.what, inactive_xml(&clone));
        if case.volume.is_some() {
            assert!(matches!(&d.source, vcc_core::xml::DiskSource::Volume { pool, .. } if pool == fs.pool()));
        }
        let md = cow_metadata(&clone).unwrap().clone.unwrap();
        assert!(md.disks.is_empty(), "{}: no overlay recorded", case.what);
        assert_eq!(md.reflinks.len(), 1);
        assert_eq!(Path::new(&md.reflinks[0].path), copy.as_path());
        assert_eq!(Path::new(&md.reflinks[0].from.path), case.master.as_path());
        // The original is no template: no mark, master mode untouched.
        assert!(cow_metadata(&tmpl).and_then(|m| m.template).is_none(), "{}: original marked as template", case.what);
        assert_eq!(mode(&case.master), master_mode, "{}: the master's mode is untouched", case.what);
        // A copy in a pool is a volume libvirt knows.
        if copy.starts_with(fs.mount.join("pool")) {
            let name = copy.file_name().unwrap().to_string_lossy().into_owned();
            assert!(virsh_ok(&["vol-list", fs.pool()]).contains(&name), "{}: {name} not in the pool", case.what);
        }

        // tree: the clone is listed under the image it was copied from, as reflinked.
        let tree = cli(&["tree", "--json"]);
        tree.assert_ok();
        let tree = tree.json();
        let node = tree_clone(&tree, case.master.to_str().unwrap(), &clone)
            .unwrap_or_else(|| panic!("{}: {clone} not in tree: {tree:#}", case.what));
        assert_eq!(node["link"], "reflinked", "{node:#}");
        let text = cli(&["tree"]);
        text.assert_ok();
        assert!(
            text.stdout.lines().any(|l| l.contains(&clone) && l.contains("reflinked")),
            "{}: tree text:\n{}",
            case.what,
            text.stdout
        );

        // It boots, and what it writes stays in the copy.
        if case.boot {
            let clone_log = f.char_paths.iter().find(|p| p.ends_with("serial.log")).cloned().unwrap();
            let (line, took) = start_and_wait_up(&clone, Path::new(&clone_log), Duration::from_secs(180));
            eprintln!("{kind} {}: the reflinked clone booted in {took:?}: {line}", case.what);
            virsh_ok(&["destroy", &clone]);
        }
        let write = format!("write -P 0xa5 {} 1M", 64 << 20);
        run_ok("qemu-io", &["-f", case.format, "-c", &write, copy.to_str().unwrap()]);
        assert_ne!(sha256(&copy), master_sha, "{}: the write reached the copy", case.what);
        assert_eq!(sha256(&case.master), master_sha, "{}: writes in the clone changed the master", case.what);
        assert!(filefrag_says_shared(&case.master), "{}: the unwritten extents stay shared", case.what);
    }
    drop(env); // domains first: then the filesystem can be unmounted
    drop(fs);
}

#[test]
fn reflink_clones_on_xfs_share_extents_have_no_backing_chain_and_boot() {
    reflink_clones_on("xfs");
}

#[test]
fn reflink_clones_on_btrfs_share_extents_have_no_backing_chain_and_boot() {
    reflink_clones_on("btrfs");
}

#[test]
fn reflink_is_refused_on_ext4_and_tmpfs_and_nothing_changes() {
    let mut env = TestEnv::new("rlno");
    // The env's pool directory (/var/lib/vcc-tests): ext4 on these machines, where the refusal
    // names ext2/3/4; on another filesystem (not checked to be ext4) only the general refusal is
    // checked, with a line on stderr saying so.
    let fs_type = run_ok("stat", &["-f", "-c", "%T", BASE_DIR]);
    let tmpfs = env.mount_tmpfs("tmpfs", "16M");
    let places = [PathBuf::from(env.in_pool("base.raw")), tmpfs.join("base.raw")];
    for (i, master) in places.iter().enumerate() {
        make_raw(master, 8);
        env.refresh_pool();
        let tmpl = env.name(&format!("-t{i}"));
        define_xml(
            &DomainSpec::new(&tmpl, false)
                .disk(DiskSpec::File {
                    path: master.to_string_lossy().into(),
                    format: "raw".into(),
                    target: "vda".into(),
                })
                .xml(),
        );
        let before = Snapshot::take(&env, &tmpl, &[master.to_str().unwrap()]);
        let run = cli(&["--original", &tmpl, "--name", &env.name(&format!("-c{i}")), "--reflink"]);
        let expected_fs = if i == 0 {
            if fs_type.trim().starts_with("ext") {
                "ext2/3/4"
            } else {
                eprintln!("{BASE_DIR} is {}, not ext4: checking only the refusal", fs_type.trim());
                "cannot share extents"
            }
        } else {
            "tmpfs"
        };
        run.assert_error(1, &["cannot be reflinked", "cannot share extents", expected_fs, "without --reflink"]);
        before.assert_unchanged(&env, &tmpl, &[master.to_str().unwrap()]);
        let dir = master.parent().unwrap();
        let left: Vec<String> = list_dir(dir).into_iter().filter(|n| n.contains("vcc-reflink")).collect();
        assert!(left.is_empty(), "probe files left in {}: {left:?}", dir.display());
        // The same clone without --reflink is a linked clone, as before.
        cli(&["--original", &tmpl, "--name", &env.name(&format!("-l{i}"))]).assert_ok();
    }
}

#[test]
fn a_reflink_run_that_fails_halfway_leaves_no_copy_no_volume_and_no_domain() {
    use vcc_core::overlay::OverlayOptions;
    use vcc_libvirt::Libvirt;
    use virt_clone_cow::apply::{apply, ApplyError, ApplyOptions};
    use virt_clone_cow::cmd::clone::{make_plan, CloneRequest};
    use virt_clone_cow::reflink::ReflinkError;

    let env = TestEnv::new("rlundo");
    let fs = LoopFs::new(&env.prefix, "xfs", "600M");
    // A qcow2 master in the pool, as a volume disk: FICLONE, then a pool refresh.
    let master = fs.in_pool("base.qcow2");
    make_qcow2(&master, 8);
    virsh_ok(&["pool-refresh", fs.pool()]);
    let tmpl = env.name("-t");
    let spec = DomainSpec::new(&tmpl, false).disk(DiskSpec::File {
        path: master.to_string_lossy().into(),
        format: "qcow2".into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    let before = Snapshot::take(&env, &tmpl, &[master.to_str().unwrap()]);
    let pool_files = list_dir(fs.mount.join("pool"));

    let names = vec![env.name("-a"), env.name("-b")];
    let lv = Libvirt::open(Some(URI)).unwrap();
    let plan = make_plan(&lv, &CloneRequest { reflink: true, ..CloneRequest::named(&tmpl, names.clone()) }).unwrap();
    assert!(plan.reflink);
    // Another process takes the second clone's copy path between planning and applying.
    let squatter = PathBuf::from(plan.clones[1].overlays[0].location.path());
    std::fs::write(&squatter, b"not yours").unwrap();

    let err = apply(&lv, &plan, ApplyOptions { start: false, overlay: OverlayOptions::detect(), sysprep: false })
        .unwrap_err();
    assert!(
        matches!(&err, ApplyError::Reflink { source: ReflinkError::Exists(p), .. } if Path::new(p) == squatter),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&squatter).unwrap(), b"not yours", "the other process's file is untouched");
    std::fs::remove_file(&squatter).unwrap();
    // The first clone's copy, its volume and its domain are gone; nothing temporary is left.
    before.assert_unchanged(&env, &tmpl, &[master.to_str().unwrap()]);
    assert_eq!(list_dir(fs.mount.join("pool")), pool_files, "the pool directory is as it was");
    virsh_ok(&["pool-refresh", fs.pool()]);
    let vols = virsh_ok(&["vol-list", fs.pool()]);
    assert!(!names.iter().any(|n| vols.contains(n.as_str())), "a copy is still a volume:\n{vols}");
    assert!(names.iter().all(|n| !domain_exists(n)));
    drop(env);
    drop(fs);
}
