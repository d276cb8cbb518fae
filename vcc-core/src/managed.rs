//! Which disks of a domain are linked clones of a master, worked out from the domain XML alone:
//! the hook uses it at start (it may not call libvirt), and the pool-helper daemon uses it to
//! prefetch masters that defined domains will need.

use std::path::{Path, PathBuf};

use crate::metadata::{CowMetadata, MasterRef};
use crate::overlay::MASTER_FORMATS;
use crate::xml::{BackingDecl, DiskSource, DomainFacts};

/// A disk that is an overlay over a master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedDisk {
    pub target: String,
    pub overlay: PathBuf,
    pub master: MasterRef,
    /// Our clone metadata lists this disk (same target), its current `<source>` is the recorded
    /// overlay, and its master is the recorded one: only such disks are ever discarded, and only
    /// they are checked on `migrate`/`restore`.
    pub recorded: bool,
    /// The domain XML names the master in a `<backingStore>` (libvirt then opens that file, not
    /// what the overlay's header says): false when only the metadata names it.
    pub master_in_xml: bool,
}

impl ManagedDisk {
    /// `lstat`, so a dangling symlink counts as present: it is never replaced.
    pub fn overlay_exists(&self) -> bool {
        self.overlay.symlink_metadata().is_ok()
    }

    /// Follows symlinks: a dangling link is a missing master.
    pub fn master_exists(&self) -> bool {
        Path::new(&self.master.path).exists()
    }

    /// Why the master, which exists, cannot be one (after following symlinks): `None` for a
    /// regular file, else what it is ("a FIFO", "a directory", ...).
    pub fn master_not_regular(&self) -> Option<&'static str> {
        file_kind(&std::fs::metadata(&self.master.path).ok()?)
    }
}

/// What a file is when it is not a regular file ("a FIFO", "a directory", ...); `None` for a
/// regular file.
pub fn file_kind(meta: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    })
}

/// The linked disks of one domain and how it is marked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkedDisks {
    /// Marked as a template by virt-clone-cow: must not start.
    pub template: bool,
    /// Marked disposable: every start is fresh (the hook discards the recorded overlays).
    pub disposable: bool,
    pub disks: Vec<ManagedDisk>,
}

/// Reads the plan out of the domain's facts. A disk counts when it is a `disk` or `lun`, not
/// read-only, not `<shareable/>`, not `<transient/>`, has a qcow2 driver, and either
///
/// * is a file disk whose first `<backingStore>` is a file with its format stated (qcow2 or raw)
///   and an absolute path, or
/// * is listed in our clone metadata (same target) and its source is the recorded overlay (a file
///   disk with that path, or a volume disk whose volume name is the overlay's file name).
///
/// Metadata adds what pool-helper needs to fetch a missing master when it names the same master
/// as the XML; when the XML names another master, the XML wins (it is what QEMU opens).
pub fn needs(facts: &DomainFacts) -> LinkedDisks {
    let md = facts.vcc_metadata.as_deref().and_then(|x| CowMetadata::parse(x).ok()).unwrap_or_default();
    let mut plan = LinkedDisks {
        template: md.template.as_ref().is_some_and(|t| is_still_template(facts, &t.masters)),
        disposable: md.clone.as_ref().is_some_and(|c| c.disposable),
        disks: Vec::new(),
    };
    let recorded = md.clone.as_ref().map(|c| c.disks.as_slice()).unwrap_or_default();
    for d in &facts.disks {
        if !d.is_private_writable() || d.format.as_deref() != Some("qcow2") {
            continue;
        }
        let target = d.label();
        let rec = recorded.iter().find(|r| Some(&r.target) == d.target.as_ref());
        // Whether the disk still uses the overlay the metadata records.
        let (overlay, source_is_recorded) = match (&d.source, rec) {
            (DiskSource::File(p), Some(r)) => (PathBuf::from(p), *p == r.overlay),
            (DiskSource::File(p), None) => (PathBuf::from(p), false),
            (DiskSource::Volume { volume, .. }, Some(r))
                if Path::new(&r.overlay).file_name().is_some_and(|f| f == volume.as_str()) =>
            {
                (PathBuf::from(&r.overlay), true)
            }
            _ => continue,
        };
        let from_xml = match &d.backing {
            BackingDecl::Store { kind, path: Some(p), format: Some(f) } if kind == "file" => {
                Some(MasterRef { path: p.clone(), format: f.clone(), ..Default::default() })
            }
            _ => None,
        };
        let master_in_xml = from_xml.is_some();
        let (master, master_is_recorded) = match (from_xml, rec) {
            // The XML is what QEMU will open; metadata only adds what we need to fetch it.
            (Some(x), Some(r)) if r.master.path == x.path && r.master.format == x.format => (r.master.clone(), true),
            (Some(x), _) => (x, false),
            // No master in the XML: the metadata's, only for the overlay it records.
            (None, Some(r)) if source_is_recorded => (r.master.clone(), true),
            (None, _) => continue,
        };
        let recorded = source_is_recorded && master_is_recorded;
        // A volume disk is ours only through the metadata (its path comes from there).
        if matches!(d.source, DiskSource::Volume { .. }) && !recorded {
            continue;
        }
        if !MASTER_FORMATS.contains(&master.format.as_str()) || !master.path.starts_with('/') {
            continue;
        }
        plan.disks.push(ManagedDisk { target, overlay, master, recorded, master_in_xml });
    }
    plan
}

/// A template mark counts while the domain still uses one of the recorded masters: a full copy
/// made with virt-clone carries the mark along but has disks of its own, and must start.
pub fn is_still_template(facts: &DomainFacts, masters: &[MasterRef]) -> bool {
    masters.is_empty() || masters.iter().any(|m| m.used_by(facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(xml: &str) -> DomainFacts {
        DomainFacts::parse(xml).unwrap()
    }

    const USER_DEFINED: &str = "<domain type='kvm'><name>u</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/p/u.qcow2'/>\
        <backingStore type='file'><format type='raw'/><source file='/p/m.raw'/></backingStore><target dev='vda'/></disk>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/p/plain.qcow2'/><target dev='vdb'/></disk>\
        <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/p/x.iso'/><backingStore/><target dev='sda'/><readonly/></disk>\
        </devices></domain>";

    #[test]
    fn a_user_written_backing_store_makes_a_managed_disk() {
        let p = needs(&facts(USER_DEFINED));
        assert!(!p.template);
        assert_eq!(p.disks.len(), 1);
        assert_eq!(p.disks[0].overlay, PathBuf::from("/p/u.qcow2"));
        assert_eq!(p.disks[0].master.path, "/p/m.raw");
        assert_eq!(p.disks[0].master.format, "raw");
    }

    #[test]
    fn metadata_adds_fetch_information_and_flags() {
        let xml = USER_DEFINED.replace(
            "<devices>",
            "<metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='yes'>\
             <vcc:disk target='vda' overlay='/p/u.qcow2'><vcc:master path='/p/m.raw' format='raw' sha256='ab' manifest='/m.json'/></vcc:disk>\
             </vcc:clone></vcc:cow></metadata><devices>",
        );
        let p = needs(&facts(&xml));
        assert!(p.disposable);
        assert_eq!(p.disks[0].master.sha256.as_deref(), Some("ab"));
        assert_eq!(p.disks[0].master.manifest.as_deref(), Some("/m.json"));
    }

    #[test]
    fn a_full_copy_of_a_template_is_not_a_template() {
        let mark = "<metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:template>\
                    <vcc:master target='vda' path='/p/u.qcow2' format='qcow2'/></vcc:template></vcc:cow></metadata><devices>";
        assert!(needs(&facts(&USER_DEFINED.replace("<devices>", mark))).template);
        let copy = USER_DEFINED
            .replace("<devices>", mark)
            .replace("<source file='/p/u.qcow2'/>", "<source file='/p/copy.qcow2'/>");
        assert!(!needs(&facts(&copy)).template, "a copy with its own disks must start");
    }

    #[test]
    fn templates_are_recognised() {
        let xml = USER_DEFINED.replace(
            "<devices>",
            "<metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:template/></vcc:cow></metadata><devices>",
        );
        assert!(needs(&facts(&xml)).template);
    }

    #[test]
    fn relative_or_unsupported_masters_are_not_ours() {
        let xml = USER_DEFINED.replace("/p/m.raw", "m.raw");
        assert!(needs(&facts(&xml)).disks.is_empty());
        let xml = USER_DEFINED.replace("<format type='raw'/>", "<format type='vmdk'/>");
        assert!(needs(&facts(&xml)).disks.is_empty());
    }

    const RECORDED: &str =
        "<metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='yes'>\
        <vcc:disk target='vda' overlay='/p/u.qcow2'><vcc:master path='/p/m.raw' format='raw' sha256='ab'/></vcc:disk>\
        </vcc:clone></vcc:cow></metadata><devices>";

    #[test]
    fn shareable_and_transient_disks_are_never_ours() {
        for flag in ["<shareable/>", "<transient/>", "<readonly/>"] {
            let xml = USER_DEFINED.replace("<target dev='vda'/>", &format!("<target dev='vda'/>{flag}"));
            assert!(needs(&facts(&xml)).disks.is_empty(), "{flag}");
            let xml = xml.replace("<devices>", RECORDED);
            assert!(needs(&facts(&xml)).disks.is_empty(), "{flag} with metadata");
        }
    }

    #[test]
    fn only_disks_whose_source_and_master_are_the_recorded_ones_count_as_recorded() {
        let p = needs(&facts(USER_DEFINED));
        assert!(!p.disks[0].recorded, "no metadata: a user-written backing store only");
        let p = needs(&facts(&USER_DEFINED.replace("<devices>", RECORDED)));
        assert!(p.disks[0].recorded);
        // The disk now uses another file: the metadata no longer describes it.
        let moved = USER_DEFINED
            .replace("<devices>", RECORDED)
            .replace("<source file='/p/u.qcow2'/>", "<source file='/p/mine.qcow2'/>");
        let p = needs(&facts(&moved));
        assert_eq!(p.disks[0].overlay, PathBuf::from("/p/mine.qcow2"));
        assert!(!p.disks[0].recorded);
        assert_eq!(p.disks[0].master.sha256.as_deref(), Some("ab"), "the same master keeps its fetch information");
        // Another master in the XML: QEMU opens that one, and it is not the recorded one.
        let other = USER_DEFINED
            .replace("<devices>", RECORDED)
            .replace("/p/m.raw'/></backingStore>", "/p/other.raw'/></backingStore>");
        let p = needs(&facts(&other));
        assert_eq!(p.disks[0].master.path, "/p/other.raw");
        assert!(!p.disks[0].recorded);
        // No backing store in the XML, and the disk is not the recorded overlay: nothing is known.
        let plain = "<domain><name>x</name>".to_string() + RECORDED
            + "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/p/else.qcow2'/><target dev='vda'/></disk></devices></domain>";
        assert!(needs(&facts(&plain)).disks.is_empty());
    }

    #[test]
    fn a_volume_disk_is_ours_only_when_its_volume_is_the_recorded_overlay() {
        let vol = |name: &str| {
            "<domain><name>x</name>".to_string() + RECORDED
                + &format!("<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='p' volume='{name}'/><target dev='vda'/></disk></devices></domain>")
        };
        let p = needs(&facts(&vol("u.qcow2")));
        assert_eq!(p.disks.len(), 1);
        assert!(p.disks[0].recorded);
        assert_eq!(p.disks[0].overlay, PathBuf::from("/p/u.qcow2"));
        assert!(needs(&facts(&vol("other.qcow2"))).disks.is_empty());
    }

    #[test]
    fn a_master_that_is_not_a_regular_file_is_named_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &Path| ManagedDisk {
            target: "vda".into(),
            overlay: dir.path().join("o"),
            master: MasterRef { path: p.to_string_lossy().into_owned(), format: "raw".into(), ..Default::default() },
            recorded: false,
            master_in_xml: true,
        };
        assert_eq!(d(dir.path()).master_not_regular(), Some("a directory"));
        assert_eq!(d(Path::new("/dev/null")).master_not_regular(), Some("a character device"));
        let f = dir.path().join("m.raw");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(d(&f).master_not_regular(), None);
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(d(&link).master_not_regular(), None, "a symlink to a regular file is fine for a master");
        assert_eq!(d(&dir.path().join("absent")).master_not_regular(), None);
    }
}
