//! Who needs which image file on this host: for every file, the templates, clones, recorded
//! clones, bare overlay volumes and domain disks that would break without it. `gc` removes only
//! masters nothing needs; a master that a clone-like dependant needs is kept immutable
//! (`vcc_core::protect`); `tree` says why a master is held.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use vcc_core::metadata::CowMetadata;
use vcc_core::overlay::image_info;
use vcc_core::xml::{BackingDecl, Disk, DiskSource, DomainFacts};
use vcc_libvirt::{Libvirt, LibvirtError, Volume};

/// Longest backing chain followed below a disk.
const MAX_CHAIN: usize = 16;

/// Something that needs an image file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Holder {
    /// A domain disk whose overlay is backed by the file directly.
    Clone { domain: String, target: Option<String>, running: bool },
    /// A domain whose clone metadata names the file as a master (its overlay may be gone: a
    /// disposable clone between runs, or a clone whose master has not been fetched yet).
    Recorded { domain: String },
    /// A pool volume backed by the file that no domain uses.
    Overlay { pool: String, volume: String },
    /// A domain marked as the template of this master (the file is its disk).
    Template { domain: String },
    /// A domain that uses the file as a disk, or deeper down a disk's backing chain.
    Disk { domain: String },
}

impl Holder {
    /// Whether this holder is a dependant that keeps the master immutable: a clone, a recorded
    /// clone or an overlay. A template alone does not (its own disk may go with it), nor does a
    /// domain that simply uses the file.
    pub fn depends(&self) -> bool {
        matches!(self, Holder::Clone { .. } | Holder::Recorded { .. } | Holder::Overlay { .. })
    }

    /// For messages: `clone web-1 (vda, running)`, `volume pool/x.qcow2`, `template base`.
    pub fn describe(&self) -> String {
        match self {
            Holder::Clone { domain, target, running } => {
                let mut facts: Vec<&str> = target.iter().map(String::as_str).collect();
                if *running {
                    facts.push("running");
                }
                if facts.is_empty() {
                    format!("clone {domain}")
                } else {
                    format!("clone {domain} ({})", facts.join(", "))
                }
            }
            Holder::Recorded { domain } => format!("clone {domain} (its metadata names it)"),
            Holder::Overlay { pool, volume } => format!("overlay volume {pool}/{volume}"),
            Holder::Template { domain } => format!("template {domain}"),
            Holder::Disk { domain } => format!("domain {domain} (a disk or its backing chain)"),
        }
    }
}

/// Every file something needs, keyed by [`Holds::key`] of its path.
#[derive(Debug, Clone, Default)]
pub struct Holds {
    by_path: BTreeMap<String, Vec<Holder>>,
    local: bool,
}

impl Holds {
    /// The key of a path: canonical (symlinks resolved) when the files are on this host.
    pub fn key(&self, path: &str) -> String {
        if self.local {
            if let Ok(c) = std::fs::canonicalize(path) {
                return c.to_string_lossy().into_owned();
            }
        }
        path.to_string()
    }

    fn add(&mut self, path: &str, h: Holder) {
        let k = self.key(path);
        let v = self.by_path.entry(k).or_default();
        if !v.contains(&h) {
            v.push(h);
            v.sort();
        }
    }

    /// Everything that needs `path` (empty: nothing on this host does).
    pub fn of(&self, path: &str) -> &[Holder] {
        self.by_path.get(&self.key(path)).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The dependants that keep `path` immutable ([`Holder::depends`]).
    pub fn dependants(&self, path: &str) -> Vec<&Holder> {
        self.of(path).iter().filter(|h| h.depends()).collect()
    }

    /// Every path something needs, with its holders.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<Holder>)> {
        self.by_path.iter()
    }
}

/// `who` as one line: `clone web-1 (vda), template base`. A domain is named once: its recorded
/// metadata is not repeated beside its clone disk, nor its own disk beside its template mark.
pub fn describe_all<'a>(who: impl IntoIterator<Item = &'a Holder>) -> String {
    fn clone_of(h: &Holder) -> Option<&str> {
        match h {
            Holder::Clone { domain, .. } => Some(domain),
            _ => None,
        }
    }
    fn named(h: &Holder) -> Option<&str> {
        match h {
            Holder::Clone { domain, .. } | Holder::Template { domain } | Holder::Recorded { domain } => Some(domain),
            _ => None,
        }
    }
    let who: Vec<&Holder> = who.into_iter().collect();
    let said = |d: &str, strong: fn(&Holder) -> Option<&str>| who.iter().any(|h| strong(h) == Some(d));
    who.iter()
        .filter(|h| match h {
            Holder::Recorded { domain } => !said(domain, clone_of),
            Holder::Disk { domain } => !said(domain, named),
            _ => true,
        })
        .map(|h| h.describe())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The volumes of the active pools, looked up by path or by pool and name.
#[derive(Debug)]
pub struct VolumeIndex<'v> {
    by_path: HashMap<&'v str, &'v Volume>,
    by_pool_name: HashMap<(&'v str, &'v str), &'v Volume>,
}

impl<'v> VolumeIndex<'v> {
    pub fn new(volumes: &'v [Volume]) -> Self {
        VolumeIndex {
            by_path: volumes.iter().map(|v| (v.facts.path.as_str(), v)).collect(),
            by_pool_name: volumes.iter().map(|v| ((v.pool.as_str(), v.facts.name.as_str()), v)).collect(),
        }
    }

    /// The volume at `path`, if a pool holds it.
    pub fn at(&self, path: &str) -> Option<&'v Volume> {
        self.by_path.get(path).copied()
    }

    /// A disk's image path, and its volume when a pool holds it. None for a disk with no image
    /// on this host (network, an empty drive) or a volume no active pool lists.
    pub fn disk_image(&self, disk: &Disk) -> Option<(String, Option<&'v Volume>)> {
        match &disk.source {
            DiskSource::File(p) | DiskSource::Block(p) => Some((p.clone(), self.at(p))),
            DiskSource::Volume { pool, volume } => {
                self.by_pool_name.get(&(pool.as_str(), volume.as_str())).map(|v| (v.facts.path.clone(), Some(*v)))
            }
            _ => None,
        }
    }

    /// The backing file (and its format) of the image at `path`: from its pool volume, or (local
    /// files) from qemu-img.
    pub fn backing_of(&self, lv: &Libvirt, path: &str, format: Option<&str>) -> Option<(String, Option<String>)> {
        if let Some(v) = self.at(path) {
            return v.facts.backing.clone();
        }
        if !lv.is_local() {
            return None;
        }
        let i = image_info(path, format?).ok()?;
        i.backing.map(|b| (b, i.backing_format))
    }

    /// The backing file of a domain disk whose image is at `path` ([`VolumeIndex::disk_image`]):
    /// its volume's, else the XML's `<backingStore>` (`<backingStore/>`: none), else qemu-img's.
    pub fn disk_backing(
        &self,
        lv: &Libvirt,
        disk: &Disk,
        path: &str,
        vol: Option<&Volume>,
    ) -> Option<(String, Option<String>)> {
        match (vol.and_then(|v| v.facts.backing.clone()), &disk.backing) {
            (Some(b), _) => Some(b),
            (None, BackingDecl::Store { path: Some(p), format, .. }) => Some((p.clone(), format.clone())),
            (None, BackingDecl::None) => None,
            _ => self.backing_of(lv, path, disk.format.as_deref()),
        }
    }
}

/// Reads every domain (running or defined) and every volume of the active pools.
pub fn scan(lv: &Libvirt, volumes: &[Volume]) -> Result<Holds, LibvirtError> {
    let index = VolumeIndex::new(volumes);
    let mut holds = Holds { by_path: BTreeMap::new(), local: lv.is_local() };
    let mut used = std::collections::HashSet::new();
    for d in lv.list_domains()? {
        let Ok(facts) = DomainFacts::parse(&d.xml) else { continue };
        let name = facts.name.clone();
        let md = facts.vcc_metadata.as_deref().and_then(|x| CowMetadata::parse(x).ok()).unwrap_or_default();
        if let Some(t) = &md.template {
            for m in t.masters.iter().filter(|m| m.used_by(&facts)) {
                holds.add(&m.path, Holder::Template { domain: name.clone() });
            }
        }
        if let Some(c) = &md.clone {
            for disk in &c.disks {
                holds.add(&disk.master.path, Holder::Recorded { domain: name.clone() });
            }
        }
        for disk in &facts.disks {
            let Some((path, vol)) = index.disk_image(disk) else { continue };
            used.insert(holds.key(&path));
            holds.add(&path, Holder::Disk { domain: name.clone() });
            let Some((master, mut fmt)) = index.disk_backing(lv, disk, &path, vol) else { continue };
            holds.add(&master, Holder::Clone { domain: name.clone(), target: disk.target.clone(), running: d.active });
            // Deeper down the chain: needed too (a clone of a clone).
            let mut at = master;
            for _ in 0..MAX_CHAIN {
                let Some((next, f)) = index.backing_of(lv, &at, fmt.as_deref()) else { break };
                holds.add(&next, Holder::Disk { domain: name.clone() });
                (at, fmt) = (next, f);
            }
        }
    }
    for v in volumes {
        let Some((master, _)) = &v.facts.backing else { continue };
        if used.contains(&holds.key(&v.facts.path)) {
            continue;
        }
        holds.add(master, Holder::Overlay { pool: v.pool.clone(), volume: v.facts.name.clone() });
    }
    Ok(holds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clones_recorded_clones_and_overlays_keep_a_master_immutable() {
        let c = Holder::Clone { domain: "web-1".into(), target: Some("vda".into()), running: true };
        let r = Holder::Recorded { domain: "web-2".into() };
        let o = Holder::Overlay { pool: "default".into(), volume: "x.qcow2".into() };
        let t = Holder::Template { domain: "base".into() };
        let d = Holder::Disk { domain: "other".into() };
        assert!(c.depends() && r.depends() && o.depends());
        assert!(!t.depends() && !d.depends());
        assert_eq!(
            describe_all([&c, &o, &t]),
            "clone web-1 (vda, running), overlay volume default/x.qcow2, template base"
        );
        let mut h = Holds::default();
        h.add("/p/m", t.clone());
        h.add("/p/m", c.clone());
        h.add("/p/m", c.clone());
        assert_eq!(h.of("/p/m"), [c.clone(), t]);
        assert_eq!(h.dependants("/p/m"), [&c]);
        assert!(h.of("/p/other").is_empty());
        // One domain is named once.
        let r1 = Holder::Recorded { domain: "web-1".into() };
        let t1 = Holder::Template { domain: "other".into() };
        assert_eq!(
            describe_all([&c, &r1, &r, &t1, &d]),
            "clone web-1 (vda, running), clone web-2 (its metadata names it), template other"
        );
    }
}
