//! What the pool-helper daemon looks for, from outside the hook: masters that defined domains will
//! need but that are missing on this host (to prefetch them before anyone starts the domain), and
//! storage pools whose directory holds overlays the hook created but the pool does not list yet (to
//! refresh them: the hook itself may not call libvirt).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use crate::{Libvirt, LibvirtError};
use vcc_core::managed::needs;
use vcc_core::metadata::MasterRef;
use vcc_core::xml::DomainFacts;

/// A master some defined domain needs and this host does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingMaster {
    /// The domains that need it.
    pub domains: Vec<String>,
    pub master: MasterRef,
}

/// One look at the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub missing: Vec<MissingMaster>,
    pub pools_to_refresh: Vec<String>,
}

/// Looks at every domain and active pool. Masters are keyed by path; the first domain whose
/// metadata says how to fetch one (sha256 or manifest) provides that information.
pub fn scan(lv: &Libvirt) -> Result<Scan, LibvirtError> {
    let mut missing: BTreeMap<String, MissingMaster> = BTreeMap::new();
    let mut overlays = Vec::new();
    for d in lv.list_domains()? {
        let Ok(facts) = DomainFacts::parse(&d.xml) else { continue };
        for disk in needs(&facts).disks {
            if disk.overlay_exists() {
                overlays.push(disk.overlay.clone());
            }
            if disk.master_exists() {
                continue;
            }
            let e = missing
                .entry(disk.master.path.clone())
                .or_insert_with(|| MissingMaster { domains: Vec::new(), master: disk.master.clone() });
            if e.master.sha256.is_none() && e.master.manifest.is_none() {
                e.master = disk.master.clone();
            }
            if !e.domains.contains(&facts.name) {
                e.domains.push(facts.name.clone());
            }
        }
    }
    let volumes = lv.list_volumes()?;
    let known: HashSet<&str> = volumes.iter().map(|v| v.facts.path.as_str()).collect();
    let mut pools = BTreeSet::new();
    for ov in &overlays {
        let p = ov.to_string_lossy();
        if known.contains(p.as_ref()) {
            continue;
        }
        if let Some(pool) = pool_of_dir(lv, ov.parent().unwrap_or(Path::new("/")))? {
            pools.insert(pool);
        }
    }
    Ok(Scan { missing: missing.into_values().collect(), pools_to_refresh: pools.into_iter().collect() })
}

fn pool_of_dir(lv: &Libvirt, dir: &Path) -> Result<Option<String>, LibvirtError> {
    Ok(lv.pool_targets()?.into_iter().find(|(_, target)| Path::new(target) == dir).map(|(name, _)| name))
}
