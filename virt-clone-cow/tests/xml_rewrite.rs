//! Hermetic tests of reading domain XML and of the streaming clone rewrite, on real
//! `virsh dumpxml --inactive --security-info` captures from libvirt 9.0 (see `data/README.md`).
//!
//! The rewrite must touch only what a clone must change. These tests align the original and the
//! rewritten XML line by line and allow a difference only on the lines that carry something the
//! clone changes (name, MACs, fixed graphics ports, UEFI vars path, char device paths, and the
//! driver and source of the disks given overlays); everything else must be byte-identical.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};

use vcc_core::metadata::{CloneDisk, CloneInfo, CowMetadata, MasterRef};
use vcc_core::xml::{rewrite_domain, BackingDecl, BackingEdit, DiskEdit, DiskSource, DomainEdits, DomainFacts};
use virt_clone_cow::plan::{plan, Master, OverlayLocation, PlanInput};

const EVERY_KIND: &str = include_str!("data/every-disk-kind-uefi.xml");
const SOURCE_FORM: &str = include_str!("data/nvram-source-form-backing-chain.xml");
const EMPTY_METADATA: &str = include_str!("data/empty-metadata-fixed-vnc.xml");
const ODD_NAME: &str = include_str!("data/odd-name-all-disk-kinds.xml");

const ALL: [(&str, &str); 4] = [
    ("every-disk-kind-uefi", EVERY_KIND),
    ("nvram-source-form-backing-chain", SOURCE_FORM),
    ("empty-metadata-fixed-vnc", EMPTY_METADATA),
    ("odd-name-all-disk-kinds", ODD_NAME),
];

/// A clone name with everything awkward in it.
const CLONE: &str = "-clone <1> & \"q\" 'x' ünï";

// ---------------------------------------------------------------------------------------------
// Helpers

/// What a disk is, for comparisons: (type, device, format, source, target, readonly, shareable, transient).
type DiskSummary = (String, String, Option<String>, DiskSource, Option<String>, bool, bool, bool);

fn summary(f: &DomainFacts) -> Vec<DiskSummary> {
    f.disks
        .iter()
        .map(|d| {
            (
                d.disk_type.clone(),
                d.device.clone(),
                d.format.clone(),
                d.source.clone(),
                d.target.clone(),
                d.readonly,
                d.shareable,
                d.transient,
            )
        })
        .collect()
}

fn file(p: &str) -> DiskSource {
    DiskSource::File(p.to_string())
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// The overlay path a test gives a disk's clone.
fn overlay_for(target: &str) -> String {
    format!("/var/lib/vcc-test/overlays/{CLONE}-{target}.qcow2")
}

/// Edits as the planner would make them: every private disk gets an overlay over its source.
fn edits_for(facts: &DomainFacts) -> (DomainEdits, CowMetadata) {
    let mut disks = BTreeMap::new();
    let mut md_disks = Vec::new();
    for d in facts.private_disks() {
        let target = d.target.clone().unwrap();
        let (source_attr, master) = match &d.source {
            DiskSource::File(p) => (("file", overlay_for(&target)), p.clone()),
            DiskSource::Volume { volume, .. } => {
                (("volume", format!("{CLONE}-{target}.qcow2")), format!("/var/lib/vcc-test/pool/{volume}"))
            }
            other => panic!("not a disk for an overlay: {other:?}"),
        };
        let format = d.format.clone().unwrap();
        md_disks.push(CloneDisk {
            target: target.clone(),
            overlay: overlay_for(&target),
            master: MasterRef { path: master.clone(), format: format.clone(), ..Default::default() },
        });
        disks.insert(
            d.index,
            DiskEdit {
                source_attr,
                to_file: false,
                pool: None,
                driver_name: None,
                backing: BackingEdit { path: master, format, self_contained: true },
                copy: false,
            },
        );
    }
    let md = CowMetadata {
        template: None,
        clone: Some(CloneInfo {
            original: facts.name.clone(),
            disposable: true,
            disks: md_disks,
            ..Default::default()
        }),
    };
    let edits = DomainEdits {
        name: CLONE.to_string(),
        macs: (0..facts.macs.len()).map(|i| Some(format!("52:54:00:fe:00:{i:02x}"))).collect(),
        disks,
        nvram_path: facts
            .nvram
            .as_ref()
            .and_then(|n| n.path.as_ref())
            .map(|_| format!("/var/lib/vcc-test/nvram/{CLONE}_VARS.fd")),
        nvram_source_form: facts.nvram.as_ref().is_some_and(|n| n.source_form),
        char_paths: facts.char_paths.iter().map(|p| (p.clone(), format!("{p}.{CLONE}"))).collect(),
        metadata: Some(md.to_xml()),
    };
    (edits, md)
}

/// The top-level `<metadata>` block's lines (None when there is none) and the other lines.
fn split_metadata(xml: &str) -> (Vec<&str>, Option<String>) {
    let mut rest = Vec::new();
    let mut block: Option<Vec<&str>> = None;
    let mut inside = false;
    for l in xml.lines() {
        if l == "  <metadata/>" {
            block = Some(vec![l]);
        } else if l == "  <metadata>" {
            inside = true;
            block = Some(vec![l]);
        } else if inside {
            block.as_mut().unwrap().push(l);
            if l == "  </metadata>" {
                inside = false;
            }
        } else {
            rest.push(l);
        }
    }
    (rest, block.map(|b| b.join("\n")))
}

fn trimmed(l: &str) -> &str {
    l.trim_start()
}

/// Asserts that, apart from the dropped `<uuid>`, the `<metadata>` block (checked elsewhere), the
/// edited disks' old `<backingStore>` and the new one inserted after their `<source>`, the two
/// documents have the same lines, and that a line differs only where the clone must differ.
/// Returns how many lines differ.
fn assert_only_expected_lines_changed(original: &str, rewritten: &str, edited: &HashSet<usize>) -> usize {
    let (orig, _) = split_metadata(original);
    let (out, _) = split_metadata(rewritten);

    // Original lines, with the dropped ones removed and each labelled "may change".
    let mut kept: Vec<(&str, bool)> = Vec::new();
    let mut disk_index: Option<usize> = None;
    let mut disks_seen = 0usize;
    let mut in_char = false;
    let mut in_nvram = false;
    let mut in_graphics = false;
    let mut in_old_backing = 0usize;
    for l in orig {
        let t = trimmed(l);
        if t.starts_with("<uuid>") {
            continue;
        }
        if t.starts_with("<disk ") {
            disk_index = Some(disks_seen);
            disks_seen += 1;
        }
        let edited_disk = disk_index.is_some_and(|i| edited.contains(&i));
        if edited_disk && (in_old_backing > 0 || t.starts_with("<backingStore")) {
            // The edited disk's old chain is replaced whole.
            if t.starts_with("<backingStore") && !t.ends_with("/>") {
                in_old_backing += 1;
            }
            if t.starts_with("</backingStore>") {
                in_old_backing -= 1;
            }
            continue;
        }
        if ["<serial ", "<console ", "<channel ", "<parallel "].iter().any(|p| t.starts_with(p)) && !t.ends_with("/>") {
            in_char = true;
        }
        if t.starts_with("<nvram") && !t.contains("</nvram>") && !t.ends_with("/>") {
            in_nvram = true;
        }
        if t.starts_with("<graphics ") && !t.ends_with("/>") {
            in_graphics = true;
        }
        let may_change = (t.starts_with("<name>") && l.starts_with("  <name>"))
            || t.starts_with("<mac address=")
            || t.starts_with("<genid>")
            || t.starts_with("<graphics ")
            || t.starts_with("<nvram")
            || (in_nvram && t.starts_with("<source "))
            || (in_graphics && t.starts_with("<listen ") && t.contains(" socket="))
            || (edited_disk && (t.starts_with("<driver ") || t.starts_with("<source ")))
            || (in_char && (t.starts_with("<source ") || t.starts_with("<log ")));
        kept.push((l, may_change));
        if t.starts_with("</disk>") {
            disk_index = None;
        }
        if ["</serial>", "</console>", "</channel>", "</parallel>"].contains(&t) {
            in_char = false;
        }
        if t == "</nvram>" {
            in_nvram = false;
        }
        if t == "</graphics>" {
            in_graphics = false;
        }
    }

    let inserted: Vec<&&str> =
        out.iter().filter(|l| trimmed(l).starts_with("<backingStore type='file'><format type=")).collect();
    assert_eq!(inserted.len(), edited.len(), "one new <backingStore> per edited disk:\n{rewritten}");
    let out: Vec<&str> =
        out.into_iter().filter(|l| !trimmed(l).starts_with("<backingStore type='file'><format type=")).collect();

    assert_eq!(
        kept.len(),
        out.len(),
        "same lines apart from the known drops and inserts\n--- original\n{original}\n--- rewritten\n{rewritten}"
    );
    let mut changed = 0;
    for ((o, may_change), n) in kept.iter().zip(&out) {
        if o != n {
            assert!(may_change, "a line that must survive byte for byte changed:\n  was: {o}\n  now: {n}");
            changed += 1;
        }
    }
    changed
}

/// The `<disk>...</disk>` block (lines) holding `<target dev='TARGET'`.
fn disk_block(xml: &str, target: &str) -> String {
    let mut cur: Vec<&str> = Vec::new();
    let mut inside = false;
    for l in xml.lines() {
        let t = trimmed(l);
        if t.starts_with("<disk ") {
            inside = true;
            cur.clear();
        }
        if inside {
            cur.push(l);
        }
        if t == "</disk>" {
            inside = false;
            if cur.iter().any(|c| c.contains(&format!("<target dev='{target}'"))) {
                return cur.join("\n");
            }
        }
    }
    panic!("no disk with target {target}");
}

fn line_with<'a>(xml: &'a str, needle: &str) -> &'a str {
    xml.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no line with {needle} in\n{xml}"))
}

fn rewrite(xml: &str) -> (DomainFacts, DomainEdits, CowMetadata, String, DomainFacts) {
    let facts = DomainFacts::parse(xml).unwrap();
    let (edits, md) = edits_for(&facts);
    let out = rewrite_domain(xml, &edits).unwrap();
    let new = DomainFacts::parse(&out).unwrap_or_else(|e| panic!("the clone XML is well-formed: {e}\n{out}"));
    (facts, edits, md, out, new)
}

// ---------------------------------------------------------------------------------------------
// Reading the captures

#[test]
fn facts_of_the_every_disk_kind_capture_are_read_correctly() {
    let f = DomainFacts::parse(EVERY_KIND).unwrap();
    assert_eq!(f.name, "-vcc <tmpl> & \"q\" 'x' ünïcødé");
    assert_eq!(f.uuid.as_deref(), Some("a3cf41b8-ae81-4857-8db7-a5276bb06d2e"));
    assert_eq!(f.domain_type, "qemu");
    let p = "/var/lib/vcc-capture/pool/";
    let t = |s: &str| Some(s.to_string());
    let (f_, n_) = (false, true);
    assert_eq!(
        summary(&f),
        vec![
            ("file".into(), "disk".into(), t("qcow2"), file(&format!("{p}base & \"1\".qcow2")), t("vda"), f_, f_, f_),
            (
                "file".into(),
                "disk".into(),
                t("raw"),
                file("/var/lib/vcc-capture/outside/data.raw"),
                t("vdb"),
                f_,
                f_,
                f_
            ),
            (
                "volume".into(),
                "disk".into(),
                t("qcow2"),
                DiskSource::Volume { pool: "vcc-capture".into(), volume: "vol.qcow2".into() },
                t("vdc"),
                f_,
                f_,
                f_
            ),
            (
                "block".into(),
                "disk".into(),
                t("raw"),
                DiskSource::Block("/dev/vcc-capture-vg/lv0".into()),
                t("vdd"),
                f_,
                f_,
                f_
            ),
            (
                "network".into(),
                "disk".into(),
                t("raw"),
                DiskSource::Other("network export1".into()),
                t("vde"),
                f_,
                f_,
                f_
            ),
            ("file".into(), "disk".into(), t("qcow2"), file(&format!("{p}ro.qcow2")), t("vdf"), n_, f_, f_),
            ("file".into(), "disk".into(), t("raw"), file(&format!("{p}shared.raw")), t("vdg"), f_, n_, f_),
            ("file".into(), "disk".into(), t("qcow2"), file(&format!("{p}scratch.qcow2")), t("vdh"), f_, f_, n_),
            (
                "file".into(),
                "cdrom".into(),
                t("raw"),
                file("/var/lib/vcc-capture/iso/install.iso"),
                t("sda"),
                n_,
                f_,
                f_
            ),
            ("file".into(), "cdrom".into(), t("raw"), DiskSource::None, t("sdb"), n_, f_, f_),
        ]
    );
    assert!(f.disks.iter().all(|d| d.backing == BackingDecl::Absent));
    let private: Vec<_> = f.private_disks().map(|d| d.target.clone().unwrap()).collect();
    // Block and network disks are private too: planning refuses them with a clear message.
    assert_eq!(private, vec!["vda", "vdb", "vdc", "vdd", "vde"]);
    assert_eq!(f.macs, vec![s("52:54:00:12:34:56"), s("52:54:00:ab:cd:ef")]);
    let nv = f.nvram.as_ref().unwrap();
    assert_eq!(nv.path.as_deref(), Some("/var/lib/libvirt/qemu/nvram/-vcc <tmpl> & \"q\" 'x' ünïcødé_VARS.fd"));
    assert_eq!(nv.template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS_4M.fd"));
    assert!(!nv.source_form);
    assert_eq!(
        f.char_paths,
        vec![
            "/var/log/vcc-capture/tmpl-serial.log".to_string(),
            "/var/log/vcc-capture/tmpl-serial.chardev.log".to_string(),
            "/var/lib/vcc-capture/tmpl.agent.sock".to_string(),
        ]
    );
    let ours = CowMetadata::parse(f.vcc_metadata.as_deref().expect("our metadata is found")).unwrap();
    assert_eq!(ours.clone.unwrap().original, "older");
    assert!(!f.vcc_metadata.unwrap().contains("app1"), "only our element is captured");
}

#[test]
fn facts_of_the_nvram_source_form_capture_are_read_correctly() {
    let f = DomainFacts::parse(SOURCE_FORM).unwrap();
    assert_eq!(f.name, "tmpl's <2nd> & ünï");
    assert_eq!(f.domain_type, "kvm");
    let nv = f.nvram.unwrap();
    assert!(nv.source_form);
    assert_eq!(nv.path.as_deref(), Some("/var/lib/vcc-capture/nvram/tmpl's 2nd_VARS.fd"));
    assert_eq!(nv.template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS_4M.fd"));
    assert_eq!(
        f.disks[0].backing,
        BackingDecl::Store {
            kind: "file".into(),
            format: s("qcow2"),
            path: s("/var/lib/vcc-capture/pool/layer1.qcow2")
        }
    );
    assert_eq!(f.disks[1].backing, BackingDecl::Absent);
    assert_eq!(f.disks[1].source, file("/var/lib/vcc-capture/pool/swap.raw"));
    assert_eq!(f.macs, vec![s("52:54:00:d3:47:58")]);
    assert!(f.vcc_metadata.is_none());
    assert!(f.char_paths.is_empty());
}

#[test]
fn facts_of_the_empty_metadata_capture_are_read_correctly() {
    let f = DomainFacts::parse(EMPTY_METADATA).unwrap();
    assert_eq!(f.name, "vcc capture plain");
    assert!(EMPTY_METADATA.contains("  <metadata/>\n"), "the capture has libvirt's empty metadata element");
    assert!(f.vcc_metadata.is_none());
    assert!(f.nvram.is_none());
    assert!(f.char_paths.is_empty(), "pty consoles have no paths");
    assert_eq!(f.macs, vec![s("52:54:00:00:00:01")]);
    assert_eq!(f.private_disks().count(), 1);
}

#[test]
fn facts_of_the_odd_name_capture_are_read_correctly() {
    let f = DomainFacts::parse(ODD_NAME).unwrap();
    assert_eq!(f.name, "tmpl & \"odd\" name");
    let private: Vec<_> = f.private_disks().map(|d| (d.target.clone().unwrap(), d.source.clone())).collect();
    assert_eq!(
        private,
        vec![
            ("vda".into(), file("/var/lib/vcc-scratch/pool/base.qcow2")),
            ("vdb".into(), DiskSource::Volume { pool: "scratch".into(), volume: "data.raw".into() }),
            ("vdc".into(), file("/var/lib/vcc-scratch/outside.raw")),
        ]
    );
    let vdd = &f.disks[3];
    assert!(vdd.shareable && !vdd.is_private_writable(), "the shareable disk stays shared");
    assert_eq!(f.disks[4].source, DiskSource::None, "empty cdrom drive");
    assert_eq!(f.macs.len(), 2);
    assert_eq!(f.char_paths, vec!["/var/log/vcc-tmpl-serial.log".to_string()]);
}

#[test]
fn every_capture_parses_and_a_rewrite_without_disk_edits_keeps_its_disks_byte_identical() {
    for (what, xml) in ALL {
        let facts = DomainFacts::parse(xml).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (mut edits, _) = edits_for_safe(&facts);
        edits.disks.clear();
        let out = rewrite_domain(xml, &edits).unwrap();
        let changed = assert_only_expected_lines_changed(xml, &out, &HashSet::new());
        assert!(changed >= 1, "{what}: at least the name changes");
        for d in &facts.disks {
            let t = d.target.as_deref().unwrap();
            assert_eq!(disk_block(&out, t), disk_block(xml, t), "{what}: disk {t} untouched");
        }
    }
}

/// Like [`edits_for`] but skipping disks an overlay cannot be made for (block, network).
fn edits_for_safe(facts: &DomainFacts) -> (DomainEdits, CowMetadata) {
    let mut f = facts.clone();
    // Disk::index keeps referring to the position in the full list.
    f.disks.retain(|d| matches!(d.source, DiskSource::File(_) | DiskSource::Volume { .. } | DiskSource::None));
    edits_for(&f)
}

// ---------------------------------------------------------------------------------------------
// The rewrite

#[test]
fn rewrite_of_every_disk_kind_changes_only_the_lines_a_clone_must_change() {
    let facts = DomainFacts::parse(EVERY_KIND).unwrap();
    let (edits, md) = edits_for_safe(&facts);
    let out = rewrite_domain(EVERY_KIND, &edits).unwrap();
    let new = DomainFacts::parse(&out).unwrap();
    let edited: HashSet<usize> = edits.disks.keys().copied().collect();
    assert_eq!(edited, HashSet::from([0, 1, 2]), "vda, vdb, vdc get overlays");
    let changed = assert_only_expected_lines_changed(EVERY_KIND, &out, &edited);
    // name, 2 MACs, nvram, 3 disks x (driver? + source), serial src+log, console src+log, channel, 2 graphics
    assert!(changed >= 14, "{changed} lines changed:\n{out}");

    assert_eq!(new.name, CLONE);
    assert_eq!(new.uuid, None, "libvirt gives the clone a new UUID");
    assert!(!out.contains("a3cf41b8-ae81-4857-8db7-a5276bb06d2e"));
    assert_eq!(new.domain_type, "qemu");
    assert_eq!(new.macs, vec![s("52:54:00:fe:00:00"), s("52:54:00:fe:00:01")]);

    // Overlaid disks: new source, qcow2, backing chain naming the master with its format.
    let vda = &new.disks[0];
    assert_eq!(vda.source, file(&overlay_for("vda")));
    assert_eq!(vda.format.as_deref(), Some("qcow2"));
    assert_eq!(
        vda.backing,
        BackingDecl::Store {
            kind: "file".into(),
            format: s("qcow2"),
            path: s("/var/lib/vcc-capture/pool/base & \"1\".qcow2")
        }
    );
    let vdb = &new.disks[1];
    assert_eq!(vdb.format.as_deref(), Some("qcow2"), "a raw master's overlay is qcow2");
    assert_eq!(
        vdb.backing,
        BackingDecl::Store { kind: "file".into(), format: s("raw"), path: s("/var/lib/vcc-capture/outside/data.raw") }
    );
    assert_eq!(
        new.disks[2].source,
        DiskSource::Volume { pool: "vcc-capture".into(), volume: format!("{CLONE}-vdc.qcow2") },
        "a volume disk stays a volume of the same pool"
    );
    // The rest of each edited disk's element is kept (cache, discard, boot order, serial, address).
    assert!(disk_block(&out, "vda").contains("cache='none' discard='unmap'"));
    assert!(disk_block(&out, "vda").contains("<boot order='1'/>"));
    assert!(disk_block(&out, "vdb").contains("<serial>data-disk-0001</serial>"));
    assert!(
        line_with(&disk_block(&out, "vda"), "<backingStore").ends_with("<backingStore/></backingStore>"),
        "a self-contained master closes the chain"
    );

    // Disks without overlays are left exactly as they were.
    assert_eq!(summary(&new)[3..], summary(&facts)[3..]);
    for t in ["vdd", "vde", "vdf", "vdg", "vdh", "sda", "sdb"] {
        assert_eq!(disk_block(&out, t), disk_block(EVERY_KIND, t), "disk {t} byte-identical");
    }

    // UEFI vars and char devices get the clone's paths.
    let nv = new.nvram.as_ref().unwrap();
    assert_eq!(nv.path, edits.nvram_path);
    assert_eq!(nv.template.as_deref(), Some("/usr/share/OVMF/OVMF_VARS_4M.fd"), "the vars template is kept");
    let want: Vec<String> = facts.char_paths.iter().map(|p| format!("{p}.{CLONE}")).collect();
    assert_eq!(new.char_paths, want);
    assert!(line_with(&out, "<source path=").contains("append='on'"), "other char attributes are kept");

    // Fixed graphics ports become automatic; the VNC password is kept.
    let vnc = line_with(&out, "<graphics type='vnc'");
    assert!(vnc.contains("port='-1'") && vnc.contains("autoport='yes'") && vnc.contains("websocket='-1'"), "{vnc}");
    assert!(vnc.contains("passwd='s3cr&amp;t'") && vnc.contains("listen='127.0.0.1'"), "{vnc}");
    let spice = line_with(&out, "<graphics type='spice'");
    assert!(spice.contains("port='-1'") && spice.contains("autoport='yes'"), "{spice}");

    // Metadata: the other application's element survives byte for byte; ours is replaced.
    let (_, old_block) = split_metadata(EVERY_KIND);
    let (_, new_block) = split_metadata(&out);
    let (old_block, new_block) = (old_block.unwrap(), new_block.unwrap());
    let foreign: String = old_block.lines().filter(|l| l.contains("app1")).collect::<Vec<_>>().join("\n");
    assert_eq!(foreign.lines().count(), 3);
    assert!(new_block.contains(&foreign), "foreign metadata kept:\n{new_block}");
    assert!(!new_block.contains("older"), "our old metadata is gone:\n{new_block}");
    assert_eq!(new_block.matches("urn:virt-clone-cow:1").count(), 1, "exactly one element of ours:\n{new_block}");
    assert_eq!(CowMetadata::parse(new.vcc_metadata.as_deref().unwrap()).unwrap(), md);
}

#[test]
fn rewrite_drops_a_fixed_spice_tls_port_for_autoport() {
    // libvirt here refuses spice tlsPort unless spice_tls is on in qemu.conf, so the capture has
    // none: add one as libvirt formats it (after port).
    let xml = EVERY_KIND.replace(
        "<graphics type='spice' port='5930' autoport='no'",
        "<graphics type='spice' port='5930' tlsPort='5931' autoport='no'",
    );
    assert_ne!(xml, EVERY_KIND);
    let facts = DomainFacts::parse(&xml).unwrap();
    let (edits, _) = edits_for_safe(&facts);
    let out = rewrite_domain(&xml, &edits).unwrap();
    let spice = line_with(&out, "<graphics type='spice'");
    assert!(!spice.contains("tlsPort"), "{spice}");
    assert!(spice.contains("port='-1'") && spice.contains("autoport='yes'"), "{spice}");
}

#[test]
fn rewrite_with_nvram_source_form_replaces_the_source_and_the_old_backing_chain() {
    let (facts, edits, md, out, new) = rewrite(SOURCE_FORM);
    let edited: HashSet<usize> = edits.disks.keys().copied().collect();
    assert_eq!(edited, HashSet::from([0, 1]));
    assert_only_expected_lines_changed(SOURCE_FORM, &out, &edited);
    let nv = new.nvram.unwrap();
    assert!(nv.source_form);
    assert_eq!(nv.path, edits.nvram_path);
    let nvram_line = line_with(&out, "<nvram ");
    assert_eq!(nvram_line, line_with(SOURCE_FORM, "<nvram "), "the <nvram> element itself is unchanged");
    // The disk that was itself an overlay gets a chain of one: the master, not the old chain.
    assert_eq!(
        new.disks[0].backing,
        BackingDecl::Store {
            kind: "file".into(),
            format: s("qcow2"),
            path: s("/var/lib/vcc-capture/pool/layer2.qcow2")
        }
    );
    assert!(!out.contains("layer1.qcow2"), "the old chain is gone:\n{out}");
    assert_eq!(disk_block(&out, "vda").matches("<backingStore").count(), 2, "one store and its <backingStore/> end");
    // Foreign XML outside metadata survives.
    let qemu_cmd =
        |x: &str| x.lines().skip_while(|l| !l.contains("<qemu:commandline>")).take(4).collect::<Vec<_>>().join("\n");
    assert_eq!(qemu_cmd(&out), qemu_cmd(SOURCE_FORM));
    assert!(out.starts_with("<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"));
    // No <metadata> before: one is added holding ours.
    assert!(split_metadata(SOURCE_FORM).1.is_none());
    let block = split_metadata(&out).1.expect("a <metadata> element is added");
    assert_eq!(block.matches("urn:virt-clone-cow:1").count(), 1);
    assert_eq!(CowMetadata::parse(new.vcc_metadata.as_deref().unwrap()).unwrap(), md);
    assert_eq!(new.name, CLONE);
    assert_ne!(new.macs, facts.macs);
}

#[test]
fn rewrite_fills_libvirts_empty_metadata_element_and_frees_the_fixed_vnc_port() {
    let (_, edits, md, out, new) = rewrite(EMPTY_METADATA);
    let edited: HashSet<usize> = edits.disks.keys().copied().collect();
    let changed = assert_only_expected_lines_changed(EMPTY_METADATA, &out, &edited);
    assert_eq!(changed, 4, "name, disk source, MAC and graphics (a qcow2 master keeps its driver line)\n{out}");
    assert!(!out.contains("<metadata/>"));
    assert_eq!(out.matches("<metadata>").count(), 1);
    assert_eq!(CowMetadata::parse(new.vcc_metadata.as_deref().unwrap()).unwrap(), md);
    let vnc = line_with(&out, "<graphics type='vnc'");
    assert!(vnc.contains("port='-1'") && vnc.contains("autoport='yes'") && !vnc.contains("5999"), "{vnc}");
    // pty serial/console untouched
    assert!(out.contains("<serial type='pty'>") && out.contains("<console type='pty'>"));
}

#[test]
fn rewritten_odd_names_round_trip_exactly() {
    for name in [CLONE, "-leading-dash", "a&b", "<tag>", "quote's \"both\"", "ünïcødé 名前", "  spaces  "] {
        let facts = DomainFacts::parse(ODD_NAME).unwrap();
        let (mut edits, _) = edits_for(&facts);
        edits.name = name.to_string();
        let out = rewrite_domain(ODD_NAME, &edits).unwrap();
        let new = DomainFacts::parse(&out).unwrap();
        assert_eq!(new.name, name);
        let md = CowMetadata::parse(new.vcc_metadata.as_deref().unwrap()).unwrap();
        assert_eq!(md.clone.unwrap().original, "tmpl & \"odd\" name", "metadata keeps the original's name exactly");
    }
}

#[test]
fn plan_on_a_real_capture_makes_overlays_for_file_and_volume_disks_and_keeps_shared_ones() {
    let facts = DomainFacts::parse(ODD_NAME).unwrap();
    let m = |i: usize, target: &str, path: &str, format: &str, pool: Option<&str>, volume_disk: bool| Master {
        pool: pool.map(String::from),
        volume_disk,
        ..Master::file(i, target, path, format, 1 << 30)
    };
    let masters = vec![
        m(0, "vda", "/var/lib/vcc-scratch/pool/base.qcow2", "qcow2", Some("scratch"), false),
        m(1, "vdb", "/var/lib/vcc-scratch/pool/data.raw", "raw", Some("scratch"), true),
        m(2, "vdc", "/var/lib/vcc-scratch/outside.raw", "raw", None, false),
    ];
    let names = vec!["web & 'one'".to_string(), "web-2".to_string()];
    let taken: HashSet<String> = facts.macs.iter().flatten().cloned().collect();
    let input = PlanInput {
        original_xml: ODD_NAME,
        facts: &facts,
        masters: &masters,
        names: &names,
        taken_macs: &taken,
        disposable: false,
        nvram_pool: None,
        reflink: false,
    };
    let mut n = 0u8;
    let p = plan(&input, || {
        n += 1;
        [0xaa, 0, n]
    })
    .unwrap();
    assert_eq!(p.clones.len(), 2);
    let mut all_macs = taken.clone();
    for c in &p.clones {
        let f = DomainFacts::parse(&c.xml).unwrap();
        assert_eq!(f.name, c.name);
        for mac in f.macs.iter().flatten() {
            assert!(all_macs.insert(mac.clone()), "MAC {mac} unique");
        }
        let edited: HashSet<usize> = [0, 1, 2].into();
        assert_only_expected_lines_changed(ODD_NAME, &c.xml, &edited);
        assert_eq!(f.disks[0].source, file(&format!("/var/lib/vcc-scratch/pool/{}-vda.qcow2", c.name)));
        assert_eq!(
            f.disks[1].source,
            DiskSource::Volume { pool: "scratch".into(), volume: format!("{}-vdb.qcow2", c.name) }
        );
        assert_eq!(f.disks[2].source, file(&format!("/var/lib/vcc-scratch/{}-vdc.qcow2", c.name)));
        assert_eq!(disk_block(&c.xml, "vdd"), disk_block(ODD_NAME, "vdd"), "shareable disk untouched");
        assert_eq!(disk_block(&c.xml, "sda"), disk_block(ODD_NAME, "sda"), "empty cdrom untouched");
        assert_eq!(f.char_paths, vec![format!("/var/log/vcc-tmpl-serial-{}.log", c.name)]);
        assert!(matches!(&c.overlays[0].location, OverlayLocation::Volume { pool, .. } if pool == "scratch"));
        assert!(matches!(&c.overlays[2].location, OverlayLocation::File { .. }));
        let vnc = line_with(&c.xml, "<graphics type='vnc'");
        assert!(vnc.contains("autoport='yes'"), "{vnc}");
    }
    let t = p.template_metadata.template.as_ref().unwrap();
    assert_eq!(t.masters.len(), 3);
}

const GRAPHICS_SOCKET: &str = include_str!("data/graphics-unix-socket.xml");

#[test]
fn clones_get_their_own_vnc_unix_socket_path() {
    // Two clones keeping the template's socket path would fight over it: QEMU unlinks and rebinds
    // the path, so the first clone's display becomes unreachable.
    let facts = DomainFacts::parse(GRAPHICS_SOCKET).unwrap();
    let old = "/var/lib/vcc-capture/vcc-capture-sock.vnc";
    assert!(facts.char_paths.iter().any(|p| p == old), "the VNC socket is a path to rename: {:?}", facts.char_paths);
    let (edits, _) = edits_for(&facts);
    let out = rewrite_domain(GRAPHICS_SOCKET, &edits).unwrap();
    assert!(!out.contains(&format!("socket='{old}'")), "the template's socket path is not reused:\n{out}");
    let new = format!("{old}.{}", quick_escape(CLONE));
    assert!(line_with(&out, "<graphics type='vnc'").contains(&format!("socket='{new}'")), "{out}");
    assert!(line_with(&out, "<listen type='socket'").contains(&format!("socket='{new}'")), "{out}");
    // The unix serial socket is renamed as before.
    assert_eq!(
        DomainFacts::parse(&out).unwrap().char_paths.iter().filter(|p| p.ends_with(&format!(".{CLONE}"))).count(),
        2
    );
    assert_only_expected_lines_changed(GRAPHICS_SOCKET, &out, &HashSet::new());
}

/// Attribute escaping as the rewrite writes it (libvirt's style: `&apos;` and `&quot;`).
fn quick_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

const SYSINFO_UUID: &str = include_str!("data/sysinfo-system-uuid.xml");

#[test]
fn rewrite_drops_the_smbios_system_uuid_so_libvirt_gives_the_clone_a_new_one() {
    // Without <uuid>, libvirt takes the domain UUID from <sysinfo><system><entry name='uuid'>:
    // the clone would collide with its template ("already defined with uuid").
    let (_, _, _, out, new) = rewrite(SYSINFO_UUID);
    assert_eq!(new.uuid, None);
    assert!(!out.contains("11111111-2222-3333-4444-555555555555"), "no trace of the template's UUID:\n{out}");
    assert!(
        out.contains("<entry name='manufacturer'>vcc</entry>")
            && out.contains("<entry name='serial'>tmpl-serial</entry>")
    );
    let (orig, _) = split_metadata(SYSINFO_UUID);
    let (out_lines, _) = split_metadata(&out);
    assert_eq!(out_lines.len() + 2, orig.len(), "only the <uuid> and the sysinfo uuid entry lines are dropped");
}

const GENID: &str = include_str!("data/genid.xml");

#[test]
fn rewrite_empties_the_vm_generation_id_so_each_clone_gets_a_new_one() {
    // libvirt stores the generated <genid> in the config; a clone keeping it would look to the
    // guest like the same VM generation (Windows AD, the Linux RNG reseed on vmgenid change).
    let old = line_with(GENID, "<genid>").trim().to_string();
    assert!(old.len() > "<genid></genid>".len(), "the capture has a stored generation ID: {old}");
    let (_, _, _, out, _) = rewrite(GENID);
    assert!(!out.contains(&old), "the template's generation ID is not kept:\n{out}");
    assert_eq!(line_with(&out, "<genid").trim(), "<genid></genid>", "empty: libvirt generates a new one");
    assert_only_expected_lines_changed(GENID, &out, &HashSet::new());
}

/// The facts of `xml` (a domain with no disks to clone) and its plan for `names`.
fn plan_without_disks(xml: &str, names: &[&str]) -> (DomainFacts, virt_clone_cow::plan::ClonePlan) {
    let facts = DomainFacts::parse(xml).unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let input = PlanInput {
        original_xml: xml,
        facts: &facts,
        masters: &[],
        names: &names,
        taken_macs: &HashSet::new(),
        disposable: false,
        nvram_pool: None,
        reflink: false,
    };
    let p = plan(&input, || [1, 2, 3]).unwrap();
    (facts, p)
}

#[test]
fn only_per_domain_char_paths_are_renamed_host_devices_and_connect_sockets_stay() {
    let xml = "<domain type='kvm'><name>tmpl</name><devices>\
        <serial type='dev'><source path='/dev/ttyS0'/><target port='0'/></serial>\
        <serial type='file'><source path='/var/log/tmpl-serial.log'/><target port='1'/></serial>\
        <channel type='unix'><source mode='connect' path='/run/agent/ext.sock'/><target type='virtio' name='a.0'/></channel>\
        <channel type='unix'><source mode='bind' path='/run/tmpl/own.sock'/><target type='virtio' name='b.0'/></channel>\
        <console type='pty'><log file='/var/log/tmpl-console.log'/><target type='serial' port='0'/></console>\
        <parallel type='pipe'><source path='/tmp/tmpl-pipe'/></parallel>\
        </devices></domain>";
    let (facts, p) = plan_without_disks(xml, &["c1"]);
    let mut got = facts.char_paths.clone();
    got.sort();
    assert_eq!(got, vec!["/run/tmpl/own.sock", "/var/log/tmpl-console.log", "/var/log/tmpl-serial.log"]);
    let out = &p.clones[0].xml;
    assert!(
        out.contains("path='/dev/ttyS0'")
            && out.contains("path='/run/agent/ext.sock'")
            && out.contains("path='/tmp/tmpl-pipe'"),
        "{out}"
    );
    assert!(
        out.contains("/var/log/c1-serial.log")
            && out.contains("/run/tmpl/own-c1.sock")
            && out.contains("/var/log/c1-console.log"),
        "{out}"
    );
}

/// virt-clone keeps a file serial's path and a pty's log file as they are, so two clones of one
/// template would write one file. Here each clone gets its own, beside the original, even when the
/// path does not hold the template's name; a serial and its console twin still share one file.
#[test]
fn serial_and_log_paths_without_the_templates_name_get_each_clones_name() {
    // As `virsh dumpxml --inactive` gives it: the console repeats the first serial's source.
    let xml = "<domain type='kvm'><name>tmpl</name><devices>\
        <serial type='file'><source path='/var/log/vm/console.log'/><target type='isa-serial' port='0'>\
        <model name='isa-serial'/></target></serial>\
        <serial type='pty'><log file='/var/log/vm/serial1'/><target type='isa-serial' port='1'>\
        <model name='isa-serial'/></target></serial>\
        <console type='file'><source path='/var/log/vm/console.log'/><target type='serial' port='0'/></console>\
        </devices></domain>";
    let (facts, p) = plan_without_disks(xml, &["c1", "c2"]);
    let mut seen: HashSet<String> = facts.char_paths.iter().cloned().collect();
    for c in &p.clones {
        let f = DomainFacts::parse(&c.xml).unwrap();
        let want = vec![format!("/var/log/vm/console-{}.log", c.name), format!("/var/log/vm/serial1-{}", c.name)];
        assert_eq!(f.char_paths, want, "{}", c.xml);
        assert_eq!(c.xml.matches(&format!("path='/var/log/vm/console-{}.log'", c.name)).count(), 2, "{}", c.xml);
        for path in f.char_paths {
            assert!(seen.insert(path.clone()), "{path} is the template's or another clone's");
        }
    }
}

/// A qcow2 master of 1 GiB on the odd-name capture's disk `i`.
fn scratch_master(i: usize, target: &str, path: &str, pool: Option<&str>, volume: Option<&str>) -> Master {
    Master {
        pool: pool.map(String::from),
        volume: volume.map(String::from),
        ..Master::file(i, target, path, "qcow2", 1 << 30)
    }
}

/// The plan for one clone `c1` of `original`.
fn plan_one(original: &str, masters: &[Master]) -> virt_clone_cow::plan::ClonePlan {
    let facts = DomainFacts::parse(original).unwrap();
    let names = vec!["c1".to_string()];
    let input = PlanInput {
        original_xml: original,
        facts: &facts,
        masters,
        names: &names,
        taken_macs: &HashSet::new(),
        disposable: false,
        nvram_pool: None,
        reflink: false,
    };
    let mut n = 0u8;
    plan(&input, || {
        n += 1;
        [0xbb, 0, n]
    })
    .unwrap()
}

#[test]
fn a_published_masters_identity_passes_from_the_template_to_every_clone_and_stays_on_the_template() {
    // The odd-name capture as a template whose vda master was published (`virt-clone-cow publish`).
    let sha = "ab".repeat(32);
    let ih = "cd".repeat(20);
    let md = format!(
        "  <metadata>\n    <vcc:cow xmlns:vcc=\"urn:virt-clone-cow:1\" version=\"1\">\n      <vcc:template>\n        \
         <vcc:master target=\"vda\" path=\"/var/lib/vcc-scratch/pool/base.qcow2\" format=\"qcow2\" \
         virtual-size=\"1073741824\" pool=\"scratch\" volume=\"base.qcow2\" sha256=\"{sha}\" info-hash=\"{ih}\" \
         manifest=\"/var/lib/vcc-scratch/pool/.pool-helper/base.qcow2.json\" future=\"kept\"/>\n      \
         </vcc:template>\n    </vcc:cow>\n  </metadata>\n"
    );
    let uuid_end = ODD_NAME.find("</uuid>\n").unwrap() + "</uuid>\n".len();
    let original = format!("{}{md}{}", &ODD_NAME[..uuid_end], &ODD_NAME[uuid_end..]);
    let masters = vec![
        scratch_master(0, "vda", "/var/lib/vcc-scratch/pool/base.qcow2", Some("scratch"), Some("base.qcow2")),
        scratch_master(2, "vdc", "/var/lib/vcc-scratch/outside.raw", None, None),
    ];
    let p = plan_one(&original, &masters);
    let c = &p.clones[0];
    assert_only_expected_lines_changed(&original, &c.xml, &[0, 2].into());
    let clone_md = CowMetadata::parse(DomainFacts::parse(&c.xml).unwrap().vcc_metadata.as_deref().unwrap()).unwrap();
    assert!(clone_md.template.is_none(), "a clone is no template");
    let disks = clone_md.clone.unwrap().disks;
    let vda = &disks.iter().find(|d| d.target == "vda").unwrap().master;
    assert_eq!(vda.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(vda.info_hash.as_deref(), Some(ih.as_str()));
    assert_eq!(vda.manifest.as_deref(), Some("/var/lib/vcc-scratch/pool/.pool-helper/base.qcow2.json"));
    assert_eq!((vda.pool.as_deref(), vda.volume.as_deref()), (Some("scratch"), Some("base.qcow2")));
    let vdc = &disks.iter().find(|d| d.target == "vdc").unwrap().master;
    assert_eq!((&vdc.sha256, &vdc.info_hash, &vdc.manifest), (&None, &None, &None), "an unpublished master: none");
    // The template keeps its identity when it is cloned again.
    let t = p.template_metadata.template.as_ref().unwrap();
    let tvda = t.masters.iter().find(|m| m.target.as_deref() == Some("vda")).unwrap();
    assert_eq!(tvda.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(tvda.info_hash.as_deref(), Some(ih.as_str()));
    assert!(t.masters.iter().find(|m| m.target.as_deref() == Some("vdc")).unwrap().sha256.is_none());
}

#[test]
fn an_unpublished_template_gives_clones_the_metadata_of_before() {
    let masters = [scratch_master(0, "vda", "/var/lib/vcc-scratch/pool/base.qcow2", None, None)];
    let p = plan_one(ODD_NAME, &masters);
    let (_, block) = split_metadata(&p.clones[0].xml);
    let block = block.unwrap();
    assert!(
        block.contains(
            "<vcc:master path='/var/lib/vcc-scratch/pool/base.qcow2' format='qcow2' virtual-size='1073741824'/>"
        ),
        "{block}"
    );
    assert!(!block.contains("sha256") && !block.contains("info-hash") && !block.contains("manifest"), "{block}");
}
