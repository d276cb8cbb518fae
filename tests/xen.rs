//! Clones of Xen (libxl) domains, without Xen: this machine runs no Xen hypervisor, so nothing here
//! starts a Xen guest or talks to libvirt's libxl driver. What runs (docs/xen.md):
//!
//! * libxl domain XML of each kind (HVM, PV with pygrub, PVH; tests/fixtures/xen/, written in the
//!   shape of libvirt's own libxl test data) through the streaming rewrite of a clone, checked
//!   against libvirt's domain schema with `virt-xml-validate` before and after;
//! * what differs for Xen: each private disk's `<driver>` becomes `name='qemu' type='qcow2'` (the
//!   qdisk backend, the one libxl opens qcow2 with), MACs come from Xen's range (00:16:3e), and
//!   disposable clones are refused;
//! * the hook binary called as libxl calls the scripts in /etc/libvirt/hooks/libxl.d (the same
//!   four arguments, the domain XML on stdin) on a Xen clone's XML: `prepare begin` makes the
//!   overlay over the master, the other operations exit 0.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};

use vcc_core::xml::{BackingDecl, DiskSource, DomainFacts};
use vcc_tests::*;
use virt_clone_cow::plan::{plan, Master, PlanError, PlanInput};

const FIXTURES: [(&str, &str); 3] = [
    ("hvm", include_str!("fixtures/xen/hvm.xml")),
    ("pv", include_str!("fixtures/xen/pv.xml")),
    ("pvh", include_str!("fixtures/xen/pvh.xml")),
];

/// `virt-xml-validate FILE domain` (libvirt's own schema); panics with its output unless valid.
fn validate(xml: &str, what: &str) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(xml.as_bytes()).unwrap();
    let out = run("virt-xml-validate", &[f.path().to_str().unwrap(), "domain"]);
    assert!(
        out.status.success(),
        "{what} does not validate against libvirt's domain schema:\n{}{}\n{xml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The masters of a domain's private disks, as virt-clone-cow resolves file disks outside pools.
fn masters(facts: &DomainFacts) -> Vec<Master> {
    facts
        .private_disks()
        .map(|d| {
            let DiskSource::File(path) = &d.source else { panic!("fixture disks are files") };
            Master::file(d.index, d.target.as_deref().unwrap(), path, d.format.as_deref().unwrap(), 1 << 30)
        })
        .collect()
}

fn clone_xml(original: &str, name: &str, disposable: bool) -> Result<String, PlanError> {
    let facts = DomainFacts::parse(original).unwrap();
    let ms = masters(&facts);
    let taken: HashSet<String> = facts.macs.iter().flatten().cloned().collect();
    let input = PlanInput {
        original_xml: original,
        facts: &facts,
        masters: &ms,
        names: &[name.to_string()],
        taken_macs: &taken,
        disposable,
        nvram_pool: None,
        reflink: false,
    };
    let mut n = 0u8;
    plan(&input, || {
        n += 1;
        [0x10, 0x20, n]
    })
    .map(|p| p.clones[0].xml.clone())
}

/// The `<driver .../>` tag of the disk with `target` in `xml`.
fn driver_tag(xml: &str, target: &str) -> String {
    let at = xml.find(&format!("<target dev='{target}'")).unwrap();
    let disk = &xml[xml[..at].rfind("<disk").unwrap()..at];
    let d = disk.find("<driver").unwrap();
    disk[d..d + disk[d..].find("/>").unwrap() + 2].to_string()
}

#[test]
fn clones_of_libxl_domains_get_qdisk_qcow2_overlays_xen_macs_and_stay_valid_libvirt_xml() {
    for (kind, original) in FIXTURES {
        validate(original, &format!("fixture {kind}"));
        let facts = DomainFacts::parse(original).unwrap();
        assert_eq!(facts.domain_type, "xen");
        let clone = clone_xml(original, &format!("{kind}-clone"), false).unwrap();
        validate(&clone, &format!("the clone of {kind}"));

        let cf = DomainFacts::parse(&clone).unwrap();
        assert_eq!(cf.name, format!("{kind}-clone"));
        assert_eq!(cf.uuid, None, "{kind}: libvirt gives the clone a new UUID");
        for (m, o) in masters(&facts).iter().zip(facts.private_disks()) {
            let target = o.target.as_deref().unwrap();
            assert_eq!(driver_tag(&clone, target), "<driver name='qemu' type='qcow2'/>", "{kind} {target}");
            let d = cf.disks.iter().find(|d| d.target.as_deref() == Some(target)).unwrap();
            assert_eq!(d.source, DiskSource::File(format!("/var/lib/xen/images/{kind}-clone-{target}.qcow2")));
            assert_eq!(
                d.backing,
                BackingDecl::Store { kind: "file".into(), format: Some(m.format.clone()), path: Some(m.path.clone()) },
                "{kind} {target}: the master is named with its format"
            );
        }
        assert_eq!(cf.macs.len(), facts.macs.len(), "{kind}: every interface keeps a MAC");
        for (old, new) in facts.macs.iter().zip(&cf.macs) {
            let new = new.as_deref().unwrap();
            assert!(new.starts_with("00:16:3e:") && Some(new) != old.as_deref(), "{kind}: {new} is a new Xen MAC");
        }
        // What libxl needs that a QEMU domain has not stays byte for byte.
        for line in original.lines().filter(|l| {
            ["<emulator>", "<bootloader>", "<kernel>", "<cmdline>", "<loader", "xenbus", "vif-bridge", "<type arch"]
                .iter()
                .any(|k| l.contains(k))
        }) {
            assert!(clone.contains(line), "{kind}: the clone keeps {line:?}");
        }
    }
    // Shared disks keep their driver (the HVM fixture's cdrom).
    let hvm = clone_xml(FIXTURES[0].1, "c", false).unwrap();
    assert_eq!(driver_tag(&hvm, "hdc"), "<driver name='qemu' type='raw'/>");
}

#[test]
fn disposable_clones_of_xen_domains_are_refused() {
    let e = clone_xml(FIXTURES[0].1, "d", true).unwrap_err();
    assert!(matches!(e, PlanError::XenDisposable(ref n) if n == "xen-hvm-base"), "{e}");
    assert!(e.to_string().contains("without --disposable"), "{e}");
}

#[test]
fn the_hook_called_as_libxl_calls_it_makes_the_overlay_of_a_xen_clone() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let conf = dir.path().join("hook.toml");
    std::fs::write(
        &conf,
        format!(
            "allowed_dirs = [\"{}\"]\nstate_dir = \"{}\"\npool_config_dir = \"{}\"\n",
            images.display(),
            dir.path().join("state").display(),
            dir.path().join("no-pools").display()
        ),
    )
    .unwrap();
    let base = images.to_str().unwrap();
    let xml = clone_xml(FIXTURES[0].1, "xen-clone", false).unwrap().replace("/var/lib/xen/images", base);
    make_qcow2(images.join("debian-12-hvm.qcow2"), 8);
    make_raw(images.join("data-hvm.img"), 4);

    let hook = |op: &str, sub: &str| {
        let mut child = Command::new(target_bin("virt-clone-cow-hook"))
            .env("VIRT_CLONE_COW_HOOK_CONF", &conf)
            .args(["xen-clone", op, sub, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
        child.wait_with_output().unwrap()
    };
    // libxl's operations (src/util/virhook.c: start, stopped, prepare, release, migrate, started,
    // reconnect), each as libxl passes it.
    let o = hook("prepare", "begin");
    assert!(o.status.success(), "prepare: {}", String::from_utf8_lossy(&o.stderr));
    for (target, master, format) in [("xvda", "debian-12-hvm.qcow2", "qcow2"), ("xvdb", "data-hvm.img", "raw")] {
        let overlay = images.join(format!("xen-clone-{target}.qcow2"));
        let info = qemu_img_info(&overlay, "qcow2");
        assert_eq!(info["backing-filename"].as_str(), Some(images.join(master).to_str().unwrap()), "{info:#}");
        assert_eq!(info["backing-filename-format"].as_str(), Some(format));
    }
    for (op, sub) in [
        ("start", "begin"),
        ("started", "begin"),
        ("migrate", "begin"),
        ("stopped", "end"),
        ("release", "end"),
        ("reconnect", "begin"),
    ] {
        let o = hook(op, sub);
        assert!(o.status.success(), "{op} {sub}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(o.stdout.is_empty(), "{op} {sub} prints no XML");
    }
    assert!(images.join("xen-clone-xvda.qcow2").is_file(), "nothing discarded the overlay");
}
