//! The clone plan: everything a clone will be, worked out before anything is changed.
//!
//! Planning is pure (no libvirt, no files): it takes the original's XML and facts, the resolved
//! masters and the names and MACs already taken, and returns the clones' XML, overlay locations
//! and metadata. `--dry-run` prints it; `apply` carries it out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::placement::Placement;
use vcc_core::metadata::{CloneDisk, CloneInfo, CowMetadata, MasterRef, ReflinkDisk, TemplateInfo};
use vcc_core::xml::{rewrite_domain, BackingEdit, DiskEdit, DomainEdits, DomainFacts, XmlError};

/// A master image behind one of the original's private disks, as resolved on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Master {
    #[serde(skip)]
    pub disk_index: usize,
    pub target: String,
    pub path: String,
    pub format: String,
    pub virtual_size: u64,
    /// The storage pool holding the master, if any: overlays go to the same pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The disk is `type='volume'` in the domain XML.
    #[serde(skip)]
    pub volume_disk: bool,
    /// The clone's disk is written as a file disk although the original's is a volume disk
    /// (a host where the hook makes the overlay at start).
    #[serde(skip)]
    pub as_file_disk: bool,
    /// The master has no backing file of its own.
    #[serde(skip)]
    pub self_contained: bool,
    /// How a host without the master gets it, once `virt-clone-cow publish` recorded it on the
    /// template: the SHA-256, info-hash and manifest path. Planning fills them in from the
    /// template's metadata ([`carry_identity`]), and every clone's metadata copies them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

impl Master {
    /// A self-contained master file in no pool, with no recorded identity: what every plan needs.
    /// Whatever else is known (pool, volume, a backing file, identity) goes on with struct update
    /// syntax: `Master { pool: Some(p), ..Master::file(..) }`.
    pub fn file(disk_index: usize, target: &str, path: &str, format: &str, virtual_size: u64) -> Master {
        Master {
            disk_index,
            target: target.to_string(),
            path: path.to_string(),
            format: format.to_string(),
            virtual_size,
            pool: None,
            volume: None,
            volume_disk: false,
            as_file_disk: false,
            self_contained: true,
            sha256: None,
            info_hash: None,
            manifest: None,
        }
    }

    fn to_ref(&self, with_target: bool) -> MasterRef {
        MasterRef {
            target: with_target.then(|| self.target.clone()),
            path: self.path.clone(),
            format: self.format.clone(),
            virtual_size: Some(self.virtual_size),
            pool: self.pool.clone(),
            volume: self.volume.clone(),
            sha256: self.sha256.clone(),
            info_hash: self.info_hash.clone(),
            manifest: self.manifest.clone(),
        }
    }

    /// Whether a master element of the template's metadata describes this master: the same
    /// path, or the same pool volume.
    fn described_by(&self, m: &MasterRef) -> bool {
        m.path == self.path
            || (self.pool.is_some() && self.volume.is_some() && m.pool == self.pool && m.volume == self.volume)
    }
}

/// Fills in each master's published identity (SHA-256, info-hash, manifest) from the template's
/// metadata, where a master element there describes it and the master has none of its own yet.
/// A template that was never published has none, and its clones' metadata stays as it was.
pub fn carry_identity(masters: &mut [Master], template: Option<&TemplateInfo>) {
    let Some(t) = template else { return };
    for m in masters.iter_mut() {
        if m.sha256.is_some() || m.info_hash.is_some() || m.manifest.is_some() {
            continue;
        }
        if let Some(r) = t.masters.iter().find(|r| m.described_by(r)) {
            m.sha256 = r.sha256.clone();
            m.info_hash = r.info_hash.clone();
            m.manifest = r.manifest.clone();
        }
    }
}

/// Where a clone's overlay goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OverlayLocation {
    /// A file outside any pool, made with qemu-img.
    File { path: String },
    /// A volume in the master's pool (or `--overlay-pool`), made through the libvirt storage API.
    Volume { pool: String, name: String, path: String },
}

impl OverlayLocation {
    pub fn path(&self) -> &str {
        match self {
            OverlayLocation::File { path } | OverlayLocation::Volume { path, .. } => path,
        }
    }
}

/// One overlay of one clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverlayPlan {
    pub target: String,
    pub location: OverlayLocation,
    /// Its virtual size in bytes: the master's, or larger with `--disk-size`.
    pub size: u64,
    pub master: Master,
    /// Not an overlay but a reflinked full copy of the master, in its format (`--reflink`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reflink: bool,
}

/// Copying the original's UEFI vars for a clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvramPlan {
    pub from: String,
    pub to: String,
    /// The pool that holds the vars, when they are a pool volume (copied through libvirt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// One clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloneSpec {
    pub name: String,
    pub macs: Vec<String>,
    pub overlays: Vec<OverlayPlan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvram: Option<NvramPlan>,
    #[serde(skip)]
    pub xml: String,
}

/// Everything a clone run will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClonePlan {
    pub original: String,
    pub masters: Vec<Master>,
    pub clones: Vec<CloneSpec>,
    /// The clones' disks are reflinked copies: nothing depends on the masters, and the original
    /// does not become a template.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reflink: bool,
    /// The original's metadata once it is a template.
    #[serde(skip)]
    pub template_metadata: CowMetadata,
}

/// What planning needs.
#[derive(Debug)]
pub struct PlanInput<'a> {
    pub original_xml: &'a str,
    pub facts: &'a DomainFacts,
    pub masters: &'a [Master],
    pub names: &'a [String],
    /// MACs used by any domain on the host.
    pub taken_macs: &'a HashSet<String>,
    pub disposable: bool,
    /// The pool holding the original's UEFI vars, if they are a pool volume.
    pub nvram_pool: Option<String>,
    /// Reflinked full copies instead of overlays (`--reflink`).
    pub reflink: bool,
}

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("clone name '{0}' is given twice")]
    DuplicateName(String),
    #[error("'{0}' is not a valid domain name (empty, or contains '/' or a control character such as a newline)")]
    BadName(String),
    #[error("could not write the clone's XML")]
    Xml(#[from] XmlError),
    #[error("the original's metadata cannot be read")]
    Metadata(#[source] XmlError),
    #[error("'{0}' is a Xen domain: disposable clones are not offered there (libxl runs no hook on `virsh restore`, so the hook could not tell a fresh start from a restored guest); clone it without --disposable")]
    XenDisposable(String),
}

/// Makes the plan. `random` supplies 3 random bytes per MAC.
pub fn plan(input: &PlanInput<'_>, random: impl FnMut() -> [u8; 3]) -> Result<ClonePlan, PlanError> {
    plan_with(input, &Placement::default(), random)
}

/// Makes the plan with overlays placed and sized as `placement` says (`--overlay-pool`,
/// `--disk-size`); [`plan`] puts them beside their masters, at their masters' size.
pub fn plan_with(
    input: &PlanInput<'_>,
    placement: &Placement,
    mut random: impl FnMut() -> [u8; 3],
) -> Result<ClonePlan, PlanError> {
    let mut seen = HashSet::new();
    for n in input.names {
        if n.is_empty() || n.contains('/') || n.chars().any(char::is_control) {
            return Err(PlanError::BadName(n.clone()));
        }
        if !seen.insert(n.as_str()) {
            return Err(PlanError::DuplicateName(n.clone()));
        }
    }
    let original = &input.facts.name;
    // libxl (`<domain type='xen'>`): overlays go through the qdisk backend, MACs in Xen's range.
    let xen = input.facts.domain_type == "xen";
    if xen && input.disposable && !input.names.is_empty() {
        return Err(PlanError::XenDisposable(original.clone()));
    }
    let mac_prefix = if xen { XEN_MAC_PREFIX } else { QEMU_MAC_PREFIX };
    // The original's metadata: whatever clone information it carried stays, and a master it
    // recorded as published keeps (and passes on) its identity.
    let mut md = match &input.facts.vcc_metadata {
        Some(x) => CowMetadata::parse(x).map_err(PlanError::Metadata)?,
        None => CowMetadata::default(),
    };
    let mut masters = input.masters.to_vec();
    carry_identity(&mut masters, md.template.as_ref());
    let mut taken_macs = input.taken_macs.clone();
    let mut clones = Vec::with_capacity(input.names.len());

    for name in input.names {
        let mut macs = Vec::new();
        let mac_edits: Vec<Option<String>> = input
            .facts
            .macs
            .iter()
            .map(|_| {
                let mac = new_mac(mac_prefix, &mut taken_macs, &mut random);
                macs.push(mac.clone());
                Some(mac)
            })
            .collect();

        let mut overlays = Vec::new();
        let mut disk_edits = BTreeMap::new();
        for m in &masters {
            // A reflinked copy keeps the master's format (qcow2 or raw, checked when resolved).
            let ext = if input.reflink { m.format.as_str() } else { "qcow2" };
            let file_name = format!("{name}-{}.{ext}", m.target);
            let (dir, pool) = match &placement.pool {
                Some(p) => (p.dir.clone(), Some(p.name.clone())),
                None => (
                    Path::new(&m.path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
                    m.pool.clone(),
                ),
            };
            // A volume disk names its overlay's pool when that is not the master's.
            let other_pool = pool.clone().filter(|p| m.pool.as_ref() != Some(p));
            let path = format!("{dir}/{file_name}");
            let location = match &pool {
                Some(pool) => {
                    OverlayLocation::Volume { pool: pool.clone(), name: file_name.clone(), path: path.clone() }
                }
                None => OverlayLocation::File { path: path.clone() },
            };
            // A reflinked copy exists before the start: a volume disk stays one.
            let to_file = !input.reflink && m.volume_disk && m.as_file_disk;
            let source_attr = if m.volume_disk && !to_file { ("volume", file_name) } else { ("file", path) };
            disk_edits.insert(
                m.disk_index,
                DiskEdit {
                    source_attr,
                    to_file,
                    pool: other_pool.filter(|_| m.volume_disk && !to_file),
                    driver_name: xen.then(|| "qemu".to_string()),
                    backing: BackingEdit {
                        path: m.path.clone(),
                        format: m.format.clone(),
                        self_contained: m.self_contained,
                    },
                    copy: input.reflink,
                },
            );
            let size = placement.size_for(m);
            overlays.push(OverlayPlan {
                target: m.target.clone(),
                location,
                size,
                master: m.clone(),
                reflink: input.reflink,
            });
        }

        let nvram = input.facts.nvram.as_ref().and_then(|nv| nv.path.as_ref()).map(|from| NvramPlan {
            from: from.clone(),
            to: nvram_path_for(from, original, name),
            pool: input.nvram_pool.clone(),
        });

        let char_paths: HashMap<String, String> =
            input.facts.char_paths.iter().map(|p| (p.clone(), rename_path(p, original, name))).collect();

        let metadata = CowMetadata {
            template: None,
            clone: Some(CloneInfo {
                original: original.clone(),
                disposable: input.disposable,
                disks: overlays
                    .iter()
                    .filter(|o| !o.reflink)
                    .map(|o| CloneDisk {
                        target: o.target.clone(),
                        overlay: o.location.path().to_string(),
                        master: o.master.to_ref(false),
                    })
                    .collect(),
                reflinks: overlays
                    .iter()
                    .filter(|o| o.reflink)
                    .map(|o| ReflinkDisk {
                        target: o.target.clone(),
                        path: o.location.path().to_string(),
                        from: o.master.to_ref(false),
                    })
                    .collect(),
            }),
        };

        let edits = DomainEdits {
            name: name.clone(),
            macs: mac_edits,
            disks: disk_edits,
            nvram_path: nvram.as_ref().map(|n| n.to.clone()),
            nvram_source_form: input.facts.nvram.as_ref().is_some_and(|n| n.source_form),
            char_paths,
            metadata: Some(metadata.to_xml()),
        };
        let xml = rewrite_domain(input.original_xml, &edits)?;
        clones.push(CloneSpec { name: name.clone(), macs, overlays, nvram, xml });
    }

    // The original becomes a template.
    md.template = Some(TemplateInfo { masters: masters.iter().map(|m| m.to_ref(true)).collect() });

    Ok(ClonePlan { original: original.clone(), masters, clones, reflink: input.reflink, template_metadata: md })
}

/// The MAC prefix libvirt's QEMU driver gives new NICs (locally administered unicast).
pub const QEMU_MAC_PREFIX: &str = "52:54:00";
/// The prefix libvirt's libxl driver gives new NICs: the Xen project's OUI.
pub const XEN_MAC_PREFIX: &str = "00:16:3e";

/// A MAC with `prefix` (three bytes), unused on the host.
fn new_mac(prefix: &str, taken: &mut HashSet<String>, random: &mut impl FnMut() -> [u8; 3]) -> String {
    loop {
        let [a, b, c] = random();
        let mac = format!("{prefix}:{a:02x}:{b:02x}:{c:02x}");
        if taken.insert(mac.clone()) {
            return mac;
        }
    }
}

/// Free names `NAME-clone`, `NAME-clone-1`, ... as virt-clone's `--auto-clone` picks them.
pub fn auto_names(original: &str, existing: &HashSet<String>, count: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(count);
    let mut i = 0usize;
    while out.len() < count {
        let candidate = if i == 0 { format!("{original}-clone") } else { format!("{original}-clone-{i}") };
        if !existing.contains(&candidate) {
            out.push(candidate);
        }
        i += 1;
    }
    out
}

/// `--name BASE --count N`: `BASE-1` .. `BASE-N`.
pub fn numbered_names(base: &str, count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("{base}-{i}")).collect()
}

/// A path for the clone in place of one the original uses: the original's name in the file name
/// is replaced by the clone's; otherwise the clone's name is added before the extension.
pub fn rename_path(path: &str, original: &str, clone: &str) -> String {
    let p = Path::new(path);
    let (dir, file) = match (p.parent(), p.file_name()) {
        (Some(d), Some(f)) => (d.to_string_lossy().into_owned(), f.to_string_lossy().into_owned()),
        _ => return format!("{path}-{clone}"),
    };
    let new_file = if let Some(replaced) = replace_token(&file, original, clone) {
        replaced
    } else {
        match file.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{clone}.{ext}"),
            _ => format!("{file}-{clone}"),
        }
    };
    if dir.is_empty() {
        new_file
    } else {
        format!("{}/{new_file}", dir.trim_end_matches('/'))
    }
}

/// `text` with every occurrence of `token` that stands alone (not inside a longer word: the
/// characters around it are not letters or digits) replaced by `with`; None if there is none.
fn replace_token(text: &str, token: &str, with: &str) -> Option<String> {
    if token.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut found = false;
    while let Some(i) = rest.find(token) {
        let before = rest[..i].chars().next_back().or_else(|| out.chars().next_back());
        let after = rest[i + token.len()..].chars().next();
        let alone = !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric);
        out.push_str(&rest[..i]);
        out.push_str(if alone { with } else { token });
        found |= alone;
        rest = &rest[i + token.len()..];
    }
    out.push_str(rest);
    found.then_some(out)
}

/// The clone's UEFI vars path: libvirt's own naming (`NAME_VARS.fd`) in the same directory.
fn nvram_path_for(from: &str, original: &str, clone: &str) -> String {
    rename_path(from, original, clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_slashes_or_newlines_are_refused_before_planning() {
        let facts = DomainFacts::parse("<domain><name>t</name></domain>").unwrap();
        for bad in ["", "a/b", "two\nlines"] {
            let input = PlanInput {
                original_xml: "<domain><name>t</name></domain>",
                facts: &facts,
                masters: &[],
                names: &[bad.to_string()],
                taken_macs: &HashSet::new(),
                disposable: false,
                nvram_pool: None,
                reflink: false,
            };
            assert!(matches!(plan(&input, || [1, 2, 3]), Err(PlanError::BadName(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_reflink_plan_copies_each_disk_in_its_format_with_no_backing_chain() {
        let xml = "<domain type='kvm'><name>t</name><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/p/t.raw'/><backingStore/>\
            <target dev='vda'/></disk>\
            <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='x' volume='d.qcow2'/>\
            <target dev='vdb'/></disk></devices></domain>";
        let facts = DomainFacts::parse(xml).unwrap();
        let m = |i: usize, t: &str, path: &str, format: &str, pool: Option<&str>| Master {
            pool: pool.map(Into::into),
            volume: pool.map(|_| "d.qcow2".into()),
            volume_disk: pool.is_some(),
            as_file_disk: pool.is_some(),
            ..Master::file(i, t, path, format, 1 << 20)
        };
        let masters = [m(0, "vda", "/p/t.raw", "raw", None), m(1, "vdb", "/x/d.qcow2", "qcow2", Some("x"))];
        let input = PlanInput {
            original_xml: xml,
            facts: &facts,
            masters: &masters,
            names: &["c".to_string()],
            taken_macs: &HashSet::new(),
            disposable: false,
            nvram_pool: None,
            reflink: true,
        };
        let p = plan(&input, || [1, 2, 3]).unwrap();
        assert!(p.reflink);
        let c = &p.clones[0];
        assert!(c.overlays.iter().all(|o| o.reflink));
        assert_eq!(c.overlays[0].location, OverlayLocation::File { path: "/p/c-vda.raw".into() });
        assert_eq!(
            c.overlays[1].location,
            OverlayLocation::Volume { pool: "x".into(), name: "c-vdb.qcow2".into(), path: "/x/c-vdb.qcow2".into() }
        );
        let f = DomainFacts::parse(&c.xml).unwrap();
        assert_eq!(f.disks[0].format.as_deref(), Some("raw"), "a copy keeps its format");
        assert_eq!(f.disks[0].source, vcc_core::xml::DiskSource::File("/p/c-vda.raw".into()));
        assert_eq!(f.disks[0].backing, vcc_core::xml::BackingDecl::None, "{}", c.xml);
        assert_eq!(f.disks[1].format.as_deref(), Some("qcow2"));
        assert_eq!(
            f.disks[1].source,
            vcc_core::xml::DiskSource::Volume { pool: "x".into(), volume: "c-vdb.qcow2".into() },
            "a volume disk stays one: the copy exists before the start"
        );
        assert_eq!(f.disks[1].backing, vcc_core::xml::BackingDecl::None);
        let md = CowMetadata::parse(f.vcc_metadata.as_deref().unwrap()).unwrap().clone.unwrap();
        assert!(md.disks.is_empty(), "nothing for the hook to manage");
        assert_eq!(md.reflinks.len(), 2);
        assert_eq!(md.reflinks[0].path, "/p/c-vda.raw");
        assert_eq!(md.reflinks[0].from.path, "/p/t.raw");
        // A clone that nothing depends on is nothing the hook manages.
        assert!(vcc_core::managed::needs(&f).disks.is_empty());
    }

    #[test]
    fn auto_names_skip_taken_ones() {
        let existing: HashSet<String> = ["base-clone", "base-clone-2"].iter().map(|s| s.to_string()).collect();
        assert_eq!(auto_names("base", &existing, 3), vec!["base-clone-1", "base-clone-3", "base-clone-4"]);
    }

    #[test]
    fn rename_path_replaces_the_name_or_appends_it() {
        assert_eq!(
            rename_path("/var/log/libvirt/qemu/tmpl-serial.log", "tmpl", "web 1"),
            "/var/log/libvirt/qemu/web 1-serial.log"
        );
        assert_eq!(rename_path("/var/log/console.log", "tmpl", "c1"), "/var/log/console-c1.log");
        assert_eq!(rename_path("/run/sock", "tmpl", "c1"), "/run/sock-c1");
        assert_eq!(
            rename_path("/var/lib/libvirt/qemu/nvram/tmpl_VARS.fd", "tmpl", "c1"),
            "/var/lib/libvirt/qemu/nvram/c1_VARS.fd"
        );
        // A short original name inside a longer word is not the name.
        assert_eq!(rename_path("/var/log/tmpl-serial.log", "e", "web"), "/var/log/tmpl-serial-web.log");
        assert_eq!(rename_path("/var/log/e-serial.log", "e", "web"), "/var/log/web-serial.log");
    }

    #[test]
    fn macs_are_unique_and_avoid_taken_ones() {
        let mut taken: HashSet<String> = ["52:54:00:00:00:01".to_string()].into();
        let mut seq = [[0u8, 0, 1], [0, 0, 1], [0, 0, 2], [0, 0, 2], [0, 0, 3]].into_iter();
        let mut rnd = || seq.next().unwrap_or([9, 9, 9]);
        assert_eq!(new_mac(QEMU_MAC_PREFIX, &mut taken, &mut rnd), "52:54:00:00:00:02");
        assert_eq!(new_mac(QEMU_MAC_PREFIX, &mut taken, &mut rnd), "52:54:00:00:00:03");
    }
}
