//! `virt-clone-cow tree`: which masters exist, which templates own them, and which clones (domain
//! disks or bare pool volumes) depend on each, with the space each clone's overlays take.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use serde::Serialize;

use crate::cmd::gc::{gc_with, GcArgs, Unused};
use crate::cmd::publish::DEFAULT_CONTROL_SOCKET;
use crate::holds::{describe_all, Holder, VolumeIndex};
use vcc_core::metadata::{CowMetadata, MasterRef};
use vcc_core::protect::{self, Protection};
use vcc_core::units::human_bytes;
use vcc_core::xml::DomainFacts;
use vcc_libvirt::{Libvirt, LibvirtError, Volume};

/// An overlay that depends on a master.
#[derive(Debug, Clone, Serialize)]
pub struct CloneNode {
    /// The domain using the overlay; None for a pool volume no domain uses.
    pub domain: Option<String>,
    pub target: Option<String>,
    pub overlay: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Bytes the overlay takes on disk.
    pub allocation: Option<u64>,
    pub running: bool,
    /// Made by virt-clone-cow (has our clone metadata).
    pub managed: bool,
    pub disposable: bool,
    /// How the disk relates to the master.
    pub link: Link,
}

/// How a clone's disk relates to its master: `linked` or `reflinked` (in `--json` and the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// A qcow2 overlay whose backing file is the master: it needs the master.
    Linked,
    /// A full copy made with `--reflink`: it shares the master's extents (until written) but
    /// does not depend on it.
    Reflinked,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Linked => "linked",
            Link::Reflinked => "reflinked",
        })
    }
}

/// A master and everything that depends on it.
#[derive(Debug, Clone, Serialize)]
pub struct MasterNode {
    pub path: String,
    pub format: Option<String>,
    pub virtual_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Domains marked as templates for this master.
    pub templates: Vec<String>,
    /// How other hosts get this master, when a template or clone records it as published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<Published>,
    pub clones: Vec<CloneNode>,
    /// Total bytes the linked clones' overlays take (reflinked copies are not counted: their
    /// extents are shared and nothing depends on the master).
    pub clones_allocation: u64,
    /// Why the master is held: everything on this host that needs it (`crate::holds`).
    pub held_by: Vec<Holder>,
    /// How it is protected (local connections): `immutable`, `read-only-mode` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protection: Option<Protection>,
}

/// A published master's identity, as the domains' metadata records it (`virt-clone-cow publish`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

impl Published {
    fn of(m: &MasterRef) -> Option<Published> {
        Some(Published { sha256: m.sha256.clone()?, info_hash: m.info_hash.clone(), manifest: m.manifest.clone() })
    }
}

/// The whole tree, masters sorted by path.
#[derive(Debug, Clone, Serialize)]
pub struct Tree {
    pub masters: Vec<MasterNode>,
    /// What `virt-clone-cow gc --yes` would remove (masters nothing needs).
    pub unused: Vec<Unused>,
}

/// Builds the tree from every domain and every volume of the active pools.
pub fn build_tree(lv: &Libvirt) -> Result<Tree, LibvirtError> {
    let volumes = lv.list_volumes()?;
    let index = VolumeIndex::new(&volumes);
    let mut masters: BTreeMap<String, MasterNode> = BTreeMap::new();
    let mut used_paths = std::collections::HashSet::new();

    let node = |masters: &mut BTreeMap<String, MasterNode>, path: &str, format: Option<String>| {
        masters
            .entry(path.to_string())
            .or_insert_with(|| {
                let vol = index.at(path);
                MasterNode {
                    path: path.to_string(),
                    format: vol.and_then(|v| v.facts.format.clone()).or(format.clone()),
                    virtual_size: vol.map(|v| v.facts.capacity),
                    pool: vol.map(|v| v.pool.clone()),
                    templates: Vec::new(),
                    published: None,
                    clones: Vec::new(),
                    clones_allocation: 0,
                    held_by: Vec::new(),
                    protection: None,
                }
            })
            .format
            .get_or_insert_with(|| format.unwrap_or_default());
    };

    for d in lv.list_domains()? {
        let Ok(facts) = DomainFacts::parse(&d.xml) else { continue };
        let md = facts.vcc_metadata.as_deref().and_then(|x| CowMetadata::parse(x).ok()).unwrap_or_default();
        // A full copy made with virt-clone carries the template mark but has disks of its own.
        if let Some(t) = &md.template {
            for m in t.masters.iter().filter(|m| m.used_by(&facts)) {
                node(&mut masters, &m.path, Some(m.format.clone()));
                if let Some(n) = masters.get_mut(&m.path) {
                    n.templates.push(facts.name.clone());
                    n.published = n.published.take().or_else(|| Published::of(m));
                }
            }
        }
        for disk in facts.private_disks() {
            let Some((path, vol)) = index.disk_image(disk) else { continue };
            used_paths.insert(path.clone());
            let Some((master, master_format)) = index.disk_backing(lv, disk, &path, vol) else { continue };
            let allocation = vol.map(|v| v.facts.allocation).or_else(|| local_allocation(lv, &path));
            node(&mut masters, &master, master_format);
            let clone_md = md.clone.as_ref();
            if let Some(n) = masters.get_mut(&master) {
                let recorded = clone_md.and_then(|c| c.disks.iter().find(|d| Some(&d.target) == disk.target.as_ref()));
                n.published = n.published.take().or_else(|| recorded.and_then(|d| Published::of(&d.master)));
                n.clones.push(CloneNode {
                    allocation,
                    managed: clone_md.is_some(),
                    disposable: clone_md.is_some_and(|c| c.disposable),
                    ..domain_disk(&facts.name, disk, &path, vol, d.active)
                });
            }
        }
        // Disks made with --reflink: recorded in our metadata only (no backing file says so).
        for r in md.clone.iter().flat_map(|c| &c.reflinks) {
            let Some(disk) = facts.private_disks().find(|d| d.target.as_ref() == Some(&r.target)) else { continue };
            let Some((path, vol)) = index.disk_image(disk) else { continue };
            if path != r.path {
                continue; // the disk was changed since (virsh edit): no longer our copy
            }
            used_paths.insert(path.clone());
            node(&mut masters, &r.from.path, Some(r.from.format.clone()));
            if let Some(n) = masters.get_mut(&r.from.path) {
                n.clones.push(CloneNode {
                    allocation: vol.map(|v| v.facts.allocation).or_else(|| local_allocation(lv, &path)),
                    link: Link::Reflinked,
                    ..domain_disk(&facts.name, disk, &path, vol, d.active)
                });
            }
        }
    }
    // Pool volumes with a backing file that no domain uses (made with `virsh vol-create-as
    // --backing-vol`, Terraform, vagrant-libvirt...).
    for v in &volumes {
        let Some((master, fmt)) = &v.facts.backing else { continue };
        if used_paths.contains(&v.facts.path) {
            continue;
        }
        node(&mut masters, master, fmt.clone());
        if let Some(n) = masters.get_mut(master) {
            n.clones.push(CloneNode {
                domain: None,
                target: None,
                overlay: v.facts.path.clone(),
                pool: Some(v.pool.clone()),
                volume: Some(v.facts.name.clone()),
                allocation: Some(v.facts.allocation),
                running: false,
                managed: false,
                disposable: false,
                link: Link::Linked,
            });
        }
    }
    let mut masters: Vec<MasterNode> = masters.into_values().collect();
    for m in &mut masters {
        m.clones_allocation = linked_allocation(&m.clones);
        m.clones.sort_by(|a, b| (&a.domain, &a.target, &a.overlay).cmp(&(&b.domain, &b.target, &b.overlay)));
    }
    // Why each master is held, and how it is protected (crate::holds, vcc_core::protect).
    let holds = crate::holds::scan(lv, &volumes)?;
    for m in &mut masters {
        m.held_by = holds.of(&m.path).to_vec();
        m.protection = if lv.is_local() { protect::protection(std::path::Path::new(&m.path)).ok() } else { None };
    }
    // What gc would free (marked masters, and pool-helper's at its default socket if it runs).
    let args = GcArgs { yes: false, masters: Vec::new(), pool: None, control_socket: DEFAULT_CONTROL_SOCKET.into() };
    let unused = match gc_with(lv, &args, &volumes, &holds) {
        Ok(r) => r.unused,
        Err(e) => {
            tracing::warn!("cannot tell what gc would free: {}", vcc_core::error::one_line(&e));
            Vec::new()
        }
    };
    Ok(Tree { masters, unused })
}

/// A domain's disk in the tree: a managed, linked one unless the caller says otherwise.
fn domain_disk(domain: &str, disk: &vcc_core::xml::Disk, path: &str, vol: Option<&Volume>, running: bool) -> CloneNode {
    CloneNode {
        domain: Some(domain.to_string()),
        target: disk.target.clone(),
        overlay: path.to_string(),
        pool: vol.map(|v| v.pool.clone()),
        volume: vol.map(|v| v.facts.name.clone()),
        allocation: None,
        running,
        managed: true,
        disposable: false,
        link: Link::Linked,
    }
}

fn local_allocation(lv: &Libvirt, path: &str) -> Option<u64> {
    if !lv.is_local() {
        return None;
    }
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

impl Tree {
    /// The tree as text, one master per block.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.masters.is_empty() {
            s.push_str("No linked clones: no domain disk or pool volume has a backing file.\n");
        }
        for m in &self.masters {
            s.push_str(&m.path);
            let mut facts = Vec::new();
            if let Some(f) = &m.format {
                facts.push(f.clone());
            }
            if let Some(v) = m.virtual_size {
                facts.push(format!("{} virtual", human_bytes(v)));
            }
            if let Some(p) = &m.pool {
                facts.push(format!("pool {p}"));
            }
            if !m.templates.is_empty() {
                facts.push(format!("template: {}", m.templates.join(", ")));
            }
            if let Some(p) = &m.published {
                facts.push(format!("published sha256 {}", p.sha256.get(..16).unwrap_or(&p.sha256)));
            }
            if let Some(p) = m.protection.filter(|p| *p != Protection::None) {
                facts.push(p.as_str().to_string());
            }
            if !facts.is_empty() {
                s.push_str(&format!("  ({})", facts.join(", ")));
            }
            s.push('\n');
            for (i, c) in m.clones.iter().enumerate() {
                let branch = if i + 1 == m.clones.len() { "└─" } else { "├─" };
                let who = match (&c.domain, &c.target) {
                    (Some(d), Some(t)) => format!("{d} [{t}]"),
                    (Some(d), None) => d.clone(),
                    (None, _) => "(no domain)".to_string(),
                };
                let mut size = c.allocation.map(human_bytes).unwrap_or_else(|| "?".into());
                if c.link == Link::Reflinked {
                    // Allocated, but shared with the master (and other copies) until written.
                    size.push_str(" shared");
                }
                let mut flags = Vec::new();
                if c.running {
                    flags.push("running");
                }
                if c.disposable {
                    flags.push("disposable");
                }
                let copy = format!("{} copy, independent", c.link);
                if c.link == Link::Reflinked {
                    flags.push(&copy);
                }
                let flags = if flags.is_empty() { String::new() } else { format!("  {}", flags.join(", ")) };
                s.push_str(&format!("{branch} {who}  {}  {size}{flags}\n", c.overlay));
            }
            let reflinked = m.clones.iter().filter(|c| c.link == Link::Reflinked).count();
            if reflinked > 0 {
                s.push_str(&format!(
                    "   {} linked clone disk(s), {} in overlays; {reflinked} reflinked (no backing file)\n",
                    m.clones.len() - reflinked,
                    human_bytes(m.clones_allocation)
                ));
            } else if !m.clones.is_empty() {
                s.push_str(&format!(
                    "   {} clone disk(s), {} in overlays\n",
                    m.clones.len(),
                    human_bytes(m.clones_allocation)
                ));
            }
            if !m.held_by.is_empty() {
                s.push_str(&format!("   held by {}\n", describe_all(&m.held_by)));
            }
        }
        if !self.unused.is_empty() {
            let bytes: u64 = self.unused.iter().map(|u| u.bytes).sum();
            s.push_str(&format!("gc would free {} master(s), {}:\n", self.unused.len(), human_bytes(bytes)));
            for u in &self.unused {
                s.push_str(&format!("  {}  {}\n", u.path, human_bytes(u.bytes)));
            }
        }
        s
    }
}

/// What a master's clones take in overlays: linked clones only (a reflinked copy shares its
/// extents with the master and depends on nothing).
fn linked_allocation(clones: &[CloneNode]) -> u64 {
    clones.iter().filter(|c| c.link == Link::Linked).filter_map(|c| c.allocation).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone_node(domain: &str, overlay: &str, allocation: u64, link: Link) -> CloneNode {
        CloneNode {
            domain: Some(domain.into()),
            target: Some("vda".into()),
            overlay: overlay.into(),
            pool: None,
            volume: None,
            allocation: Some(allocation),
            running: false,
            managed: true,
            disposable: false,
            link,
        }
    }

    #[test]
    fn tree_says_which_clones_are_linked_and_which_reflinked() {
        let mut m = MasterNode {
            path: "/p/base.raw".into(),
            format: Some("raw".into()),
            virtual_size: Some(1 << 30),
            pool: None,
            templates: vec!["base".into()],
            published: None,
            clones: vec![
                clone_node("web-1", "/p/web-1-vda.qcow2", 4096, Link::Linked),
                clone_node("db-1", "/p/db-1-vda.raw", 1 << 30, Link::Reflinked),
            ],
            clones_allocation: 0,
            held_by: Vec::new(),
            protection: None,
        };
        m.clones_allocation = linked_allocation(&m.clones);
        let text = Tree { masters: vec![m.clone()], unused: Vec::new() }.render();
        let line = |who: &str| text.lines().find(|l| l.contains(who)).unwrap().to_string();
        assert!(!line("web-1").contains("reflinked"), "{text}");
        assert!(line("db-1").contains("1.0 GiB shared  reflinked copy, independent"), "{text}");
        assert!(text.contains("1 linked clone disk(s), 4.0 KiB in overlays; 1 reflinked (no backing file)"), "{text}");
        let json = serde_json::to_value(Tree { masters: vec![m.clone()], unused: Vec::new() }).unwrap();
        assert_eq!(json["masters"][0]["clones"][1]["link"], "reflinked");
        assert_eq!(json["masters"][0]["clones"][0]["link"], "linked");
        for l in [Link::Linked, Link::Reflinked] {
            assert_eq!(serde_json::to_value(l).unwrap(), l.to_string(), "the text and --json name a link alike");
        }
        // Only linked clones: the summary as before.
        m.clones.pop();
        m.clones_allocation = linked_allocation(&m.clones);
        assert!(Tree { masters: vec![m], unused: Vec::new() }
            .render()
            .contains("   1 clone disk(s), 4.0 KiB in overlays"));
    }
}
