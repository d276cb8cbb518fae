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
}

impl ManagedDisk {
    /// `lstat`, so a dangling symlink counts as present: it is never replaced.
    pub fn overlay_exists(&self) -> bool {
        self.overlay.symlink_metadata().is_ok()
    }

    pub fn master_exists(&self) -> bool {
        Path::new(&self.master.path).exists()
    }
}

/// The linked disks of one domain and how it is marked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkedDisks {
    /// Marked as a template by virt-clone-cow: must not start.
    pub template: bool,
    /// Marked disposable: overlays are discarded when it stops.
    pub disposable: bool,
    pub disks: Vec<ManagedDisk>,
}

/// Reads the plan out of the domain's facts: every writable qcow2 file disk whose `<backingStore>`
/// names a qcow2 or raw master file, plus the disks our clone metadata describes (which also carry
/// what pool-helper needs to fetch a missing master).
pub fn needs(facts: &DomainFacts) -> LinkedDisks {
    let md = facts.vcc_metadata.as_deref().and_then(|x| CowMetadata::parse(x).ok()).unwrap_or_default();
    let mut plan = LinkedDisks {
        template: md.template.as_ref().is_some_and(|t| is_still_template(facts, &t.masters)),
        disposable: md.clone.as_ref().is_some_and(|c| c.disposable),
        disks: Vec::new(),
    };
    let recorded = md.clone.as_ref().map(|c| c.disks.as_slice()).unwrap_or_default();
    for d in &facts.disks {
        if !matches!(d.device.as_str(), "disk" | "lun") || d.readonly || d.format.as_deref() != Some("qcow2") {
            continue;
        }
        let target = d.label();
        let rec = recorded.iter().find(|r| Some(&r.target) == d.target.as_ref());
        let overlay = match (&d.source, rec) {
            (DiskSource::File(p), _) => PathBuf::from(p),
            (DiskSource::Volume { .. }, Some(r)) => PathBuf::from(&r.overlay),
            _ => continue,
        };
        let from_xml = match &d.backing {
            BackingDecl::Store { kind, path: Some(p), format: Some(f) } if kind == "file" => {
                Some(MasterRef { path: p.clone(), format: f.clone(), ..Default::default() })
            }
            _ => None,
        };
        let master = match (from_xml, rec) {
            // The XML is what QEMU will open; metadata only adds what we need to fetch it.
            (Some(x), Some(r)) if r.master.path == x.path && r.master.format == x.format => r.master.clone(),
            (Some(x), _) => x,
            (None, Some(r)) => r.master.clone(),
            (None, None) => continue,
        };
        if !MASTER_FORMATS.contains(&master.format.as_str()) || !master.path.starts_with('/') {
            continue;
        }
        plan.disks.push(ManagedDisk { target, overlay, master });
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
        let copy = USER_DEFINED.replace("<devices>", mark).replace("<source file='/p/u.qcow2'/>", "<source file='/p/copy.qcow2'/>");
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
}
