//! The metadata virt-clone-cow records in libvirt domains (namespace [`NAMESPACE`]).
//!
//! libvirt keeps one metadata element per namespace, so everything lives under one root,
//! `<vcc:cow version='1'>`, with a `<vcc:template>` child on templates and a `<vcc:clone>` child
//! on clones (a clone that was later cloned itself has both). The schema is documented in
//! `docs/metadata.md`; readers ignore elements and attributes they do not know, so pool-helper and
//! the hook can add to it.

use quick_xml::escape::escape;
use quick_xml::events::Event;
use serde::Serialize;

use crate::xml::XmlError;

/// Our metadata namespace URI (defined beside the XML reader, which finds our element by it).
pub use crate::xml::COW_NAMESPACE as NAMESPACE;
/// The prefix we write (readers must not depend on it).
pub const PREFIX: &str = "vcc";
/// Version of the schema written by this build.
pub const SCHEMA_VERSION: u32 = 1;

/// A master image: what a clone's overlay is backed by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MasterRef {
    /// Disk target in the template (`vda`); on a clone's disk it is the disk's own target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Absolute path of the master on this host.
    pub path: String,
    /// Image format: `qcow2` or `raw`.
    pub format: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// SHA-256 of the whole master file (hex), once pool-helper has published or verified it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// BitTorrent info-hash (hex, v1) of the published master.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info_hash: Option<String>,
    /// Path or URL of the pool-helper manifest describing the master.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

impl MasterRef {
    /// Whether one of the domain's disks is this master (by path, or by pool and volume).
    pub fn used_by(&self, facts: &crate::xml::DomainFacts) -> bool {
        use crate::xml::DiskSource;
        facts.disks.iter().any(|d| match &d.source {
            DiskSource::File(p) => same_file(p, &self.path),
            DiskSource::Volume { pool, volume } => {
                self.pool.as_ref() == Some(pool) && self.volume.as_ref() == Some(volume)
            }
            _ => false,
        })
    }
}

/// Whether two paths name the same file: equal, or equal once symlinks are resolved (a pool's
/// canonical volume path and a disk path through a symlinked directory).
pub fn same_file(a: &str, b: &str) -> bool {
    a == b
        || match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
}

/// One disk of a clone: its overlay and the master under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloneDisk {
    pub target: String,
    /// The overlay file (or pool volume path).
    pub overlay: String,
    pub master: MasterRef,
}

/// Present on clones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CloneInfo {
    /// Name of the template it was cloned from (at the time of cloning).
    pub original: String,
    /// Discard the overlay when the guest stops, so every start is fresh (the hook acts on it).
    pub disposable: bool,
    pub disks: Vec<CloneDisk>,
    /// Disks that are reflinked copies (`--reflink`): standalone images, no master dependency.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reflinks: Vec<ReflinkDisk>,
}

/// One disk of a clone made with `--reflink`: a full copy of `from` sharing its extents (on xfs or
/// btrfs), with no backing file. Nothing depends on `from` any more; it is recorded for `tree`.
/// Kept apart from [`CloneInfo::disks`] so that readers that know only overlays (the hook) leave
/// these disks alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReflinkDisk {
    pub target: String,
    /// The copy (file or pool volume path).
    pub path: String,
    /// The image it was copied from, at cloning time.
    pub from: MasterRef,
}

/// Present on templates: the masters its clones depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TemplateInfo {
    pub masters: Vec<MasterRef>,
}

/// The whole `<vcc:cow>` element.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CowMetadata {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneInfo>,
}

impl CowMetadata {
    /// The element as XML, with its namespace declared (for domain XML).
    pub fn to_xml(&self) -> String {
        self.render(&format!("{PREFIX}:"), &format!(" xmlns:{PREFIX}='{NAMESPACE}'"))
    }

    /// The element without prefixes or namespace declaration, as `virDomainSetMetadata` wants it
    /// (libvirt puts its own prefix on every element).
    pub fn to_bare_xml(&self) -> String {
        self.render("", "")
    }

    fn render(&self, p: &str, decl: &str) -> String {
        let mut s = format!("<{p}cow{decl} version='{SCHEMA_VERSION}'>");
        if let Some(t) = &self.template {
            s.push_str(&format!("<{p}template>"));
            for m in &t.masters {
                s.push_str(&master_xml(p, m));
            }
            s.push_str(&format!("</{p}template>"));
        }
        if let Some(c) = &self.clone {
            s.push_str(&format!(
                "<{p}clone original='{}' disposable='{}'>",
                escape(c.original.as_str()),
                if c.disposable { "yes" } else { "no" }
            ));
            for d in &c.disks {
                s.push_str(&format!(
                    "<{p}disk target='{}' overlay='{}'>",
                    escape(d.target.as_str()),
                    escape(d.overlay.as_str())
                ));
                s.push_str(&master_xml(p, &d.master));
                s.push_str(&format!("</{p}disk>"));
            }
            for d in &c.reflinks {
                s.push_str(&format!(
                    "<{p}reflink target='{}' path='{}'>",
                    escape(d.target.as_str()),
                    escape(d.path.as_str())
                ));
                s.push_str(&master_xml(p, &d.from));
                s.push_str(&format!("</{p}reflink>"));
            }
            s.push_str(&format!("</{p}clone>"));
        }
        s.push_str(&format!("</{p}cow>"));
        s
    }

    /// Reads the element back (any prefix; unknown elements and attributes are ignored).
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let mut r = crate::xml::reader(xml);
        let mut md = CowMetadata::default();
        let mut in_template = false;
        let mut disk: Option<(String, String)> = None;
        let mut reflink: Option<(String, String)> = None;
        loop {
            let ev = r.read_event().map_err(|e| crate::xml::syntax(&r, e))?;
            match ev {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let empty = matches!(ev, Event::Empty(_));
                    let local = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                    let a = |k: &str| crate::xml::attr(e, k);
                    match local.as_str() {
                        "template" => {
                            md.template = Some(TemplateInfo::default());
                            in_template = !empty;
                        }
                        "clone" => {
                            md.clone = Some(CloneInfo {
                                original: a("original")?.unwrap_or_default(),
                                disposable: a("disposable")?.as_deref() == Some("yes"),
                                disks: Vec::new(),
                                reflinks: Vec::new(),
                            });
                        }
                        "disk" => {
                            disk = Some((a("target")?.unwrap_or_default(), a("overlay")?.unwrap_or_default()));
                        }
                        "reflink" => {
                            reflink = Some((a("target")?.unwrap_or_default(), a("path")?.unwrap_or_default()));
                        }
                        "master" => {
                            let m = MasterRef {
                                target: a("target")?,
                                path: a("path")?.unwrap_or_default(),
                                format: a("format")?.unwrap_or_default(),
                                virtual_size: a("virtual-size")?.and_then(|v| v.parse().ok()),
                                pool: a("pool")?,
                                volume: a("volume")?,
                                sha256: a("sha256")?,
                                info_hash: a("info-hash")?,
                                manifest: a("manifest")?,
                            };
                            if in_template {
                                if let Some(t) = md.template.as_mut() {
                                    t.masters.push(m);
                                }
                            } else if let (Some((target, path)), Some(c)) = (reflink.take(), md.clone.as_mut()) {
                                c.reflinks.push(ReflinkDisk { target, path, from: m });
                            } else if let (Some((target, overlay)), Some(c)) = (disk.take(), md.clone.as_mut()) {
                                c.disks.push(CloneDisk { target, overlay, master: m });
                            }
                        }
                        _ => {}
                    }
                }
                Event::End(ref e) => {
                    if e.local_name().as_ref() == b"template" {
                        in_template = false;
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        Ok(md)
    }
}

fn master_xml(p: &str, m: &MasterRef) -> String {
    let mut s = format!("<{p}master");
    let mut push = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            s.push_str(&format!(" {k}='{}'", escape(v)));
        }
    };
    push("target", m.target.as_deref());
    push("path", Some(&m.path));
    push("format", Some(&m.format));
    let vs = m.virtual_size.map(|v| v.to_string());
    push("virtual-size", vs.as_deref());
    push("pool", m.pool.as_deref());
    push("volume", m.volume.as_deref());
    push("sha256", m.sha256.as_deref());
    push("info-hash", m.info_hash.as_deref());
    push("manifest", m.manifest.as_deref());
    s.push_str("/>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CowMetadata {
        let master = MasterRef {
            target: None,
            path: "/pool/base & 'x'.qcow2".into(),
            format: "qcow2".into(),
            virtual_size: Some(1 << 30),
            pool: Some("default".into()),
            volume: Some("base & 'x'.qcow2".into()),
            ..Default::default()
        };
        CowMetadata {
            template: Some(TemplateInfo { masters: vec![MasterRef { target: Some("vda".into()), ..master.clone() }] }),
            clone: Some(CloneInfo {
                original: "tmpl \"1\"".into(),
                disposable: true,
                disks: vec![CloneDisk {
                    target: "vda".into(),
                    overlay: "/pool/c-vda.qcow2".into(),
                    master: master.clone(),
                }],
                reflinks: vec![ReflinkDisk { target: "vdb".into(), path: "/pool/c-vdb.raw".into(), from: master }],
            }),
        }
    }

    #[test]
    fn metadata_round_trips_through_xml() {
        let md = sample();
        let xml = md.to_xml();
        assert!(xml.contains("xmlns:vcc='urn:virt-clone-cow:1'"), "{xml}");
        assert_eq!(CowMetadata::parse(&xml).unwrap(), md);
        let bare = md.to_bare_xml();
        assert!(!bare.contains("vcc:") && bare.starts_with("<cow "), "{bare}");
        assert_eq!(CowMetadata::parse(&bare).unwrap(), md);
    }

    #[test]
    fn a_master_is_recognised_through_a_symlinked_directory() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("base.qcow2"), b"x").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let via_link = dir.path().join("link/base.qcow2");
        let xml = format!(
            "<domain><name>t</name><devices><disk type='file' device='disk'><driver type='qcow2'/>\
             <source file='{}'/><target dev='vda'/></disk></devices></domain>",
            via_link.display()
        );
        let facts = crate::xml::DomainFacts::parse(&xml).unwrap();
        let m = MasterRef {
            path: real.join("base.qcow2").to_string_lossy().into_owned(),
            format: "qcow2".into(),
            ..Default::default()
        };
        assert!(m.used_by(&facts));
        let other = MasterRef { path: real.join("other.qcow2").to_string_lossy().into_owned(), ..m };
        assert!(!other.used_by(&facts));
    }

    #[test]
    fn metadata_is_read_whatever_the_prefix() {
        let xml = "<x:cow xmlns:x='urn:virt-clone-cow:1' version='1'><x:clone original='a' disposable='no'>\
                   <x:disk target='vdb' overlay='/o'><x:master path='/m' format='raw' future='1'/></x:disk>\
                   <x:unknown/></x:clone></x:cow>";
        let md = CowMetadata::parse(xml).unwrap();
        let c = md.clone.unwrap();
        assert_eq!(c.disks[0].master.path, "/m");
        assert_eq!(c.disks[0].target, "vdb");
        assert!(md.template.is_none());
    }
}
