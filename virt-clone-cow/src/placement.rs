//! Where a clone's overlays go and how large they are: `--overlay-pool POOL` and
//! `--disk-size [TARGET=]SIZE`.
//!
//! By default an overlay is as large as its master and lives beside it (in the master's pool, or
//! its directory). `--disk-size` makes it larger (the guest sees a larger disk and grows its
//! partition itself, as after `virsh blockresize`); a size smaller than the master is refused,
//! since a qcow2 overlay smaller than its backing file hides the master's end. `--overlay-pool`
//! puts the overlays in another pool of files (dir, fs, netfs), say local disk under masters on
//! shared storage; the overlay is a volume of that pool whose backing store is the master, made
//! through the storage API like any other overlay.

use std::collections::BTreeMap;

use crate::plan::Master;
use vcc_core::units::{human_bytes, parse_size};
use vcc_libvirt::{Libvirt, LibvirtError};

/// What the command line asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayRequest {
    /// `--disk-size`: for every private disk (no target) or one disk.
    pub disk_sizes: Vec<DiskSize>,
    /// `--overlay-pool`.
    pub pool: Option<String>,
    /// `--overlay-layout`: cluster size and subclusters of the overlays made.
    pub layout: vcc_core::layout::OverlayLayout,
}

impl OverlayRequest {
    /// Overlays at their masters' size, beside them (whatever their layout).
    pub fn is_default(&self) -> bool {
        self.disk_sizes.is_empty() && self.pool.is_none()
    }
}

/// One `--disk-size`: `SIZE` (every private disk) or `TARGET=SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSize {
    pub target: Option<String>,
    pub bytes: u64,
}

/// Reads `SIZE` or `TARGET=SIZE` (`20G`, `vdb=512M`).
pub fn parse_disk_size(text: &str) -> Result<DiskSize, String> {
    let (target, size) = match text.split_once('=') {
        Some((t, s)) => (Some(t.trim().to_string()), s),
        None => (None, text),
    };
    if target.as_deref().is_some_and(|t| t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric())) {
        return Err(format!("--disk-size {text}: the disk is named by its target, like vda=20G"));
    }
    let bytes = parse_size(size).map_err(|e| format!("--disk-size: {e}"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("--disk-size {text}: a disk size is a whole number of 512-byte sectors, not 0"));
    }
    Ok(DiskSize { target, bytes })
}

/// A pool of files that takes the overlays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayPool {
    pub name: String,
    /// Its target directory.
    pub dir: String,
}

/// What planning applies: a size for some disks, another pool for all overlays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Overlay size by disk target; the others get their master's size.
    pub sizes: BTreeMap<String, u64>,
    pub pool: Option<OverlayPool>,
}

impl Placement {
    /// The overlay's virtual size for `m`.
    pub fn size_for(&self, m: &Master) -> u64 {
        self.sizes.get(&m.target).copied().unwrap_or(m.virtual_size)
    }
}

/// Why the requested size or pool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("--disk-size {asked} is smaller than the master of disk {target} ({master}, {master_bytes} bytes); an overlay can only be as large or larger. Give a size of at least {master} (or name the disk: --disk-size vdb=SIZE)")]
    Smaller { target: String, asked: String, master: String, master_bytes: u64 },
    #[error("--disk-size names disk {target}, which is not a private disk of '{domain}' (those are: {known})")]
    NoSuchDisk { target: String, domain: String, known: String },
    #[error("--disk-size is given twice for disk {0}")]
    Twice(String),
    #[error("storage pool '{0}' for --overlay-pool does not exist or is not active (virsh pool-list --all; virsh pool-start '{0}')")]
    NoPool(String),
    #[error(
        "storage pool '{0}' for --overlay-pool is not a pool of files (dir, fs or netfs); qcow2 overlays need one"
    )]
    NotFilePool(String),
    #[error("--disk-size does not work with --disposable yet: the hook makes a disposable clone's overlay again at each start, at the master's size")]
    Disposable,
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
}

/// Checks the request against the masters and the host, and resolves it.
pub fn resolve(
    lv: &Libvirt,
    req: &OverlayRequest,
    domain: &str,
    masters: &[Master],
    disposable: bool,
) -> Result<Placement, PlacementError> {
    let sizes = sizes_for(req, domain, masters)?;
    if disposable && masters.iter().any(|m| sizes.get(&m.target).is_some_and(|s| *s != m.virtual_size)) {
        return Err(PlacementError::Disposable);
    }
    let pool = match &req.pool {
        None => None,
        Some(name) => {
            let pool = lv.active_pools()?.into_iter().find(|p| p.name == *name);
            let pool = pool.ok_or_else(|| PlacementError::NoPool(name.clone()))?;
            let dir = pool.file_dir().ok_or_else(|| PlacementError::NotFilePool(name.clone()))?;
            Some(OverlayPool { name: name.clone(), dir: dir.trim_end_matches('/').to_string() })
        }
    };
    Ok(Placement { sizes, pool })
}

/// The overlay size of each disk a `--disk-size` applies to; refuses one smaller than its master.
pub fn sizes_for(
    req: &OverlayRequest,
    domain: &str,
    masters: &[Master],
) -> Result<BTreeMap<String, u64>, PlacementError> {
    let mut sizes = BTreeMap::new();
    let mut named = BTreeMap::new();
    let mut every = false;
    for d in &req.disk_sizes {
        match &d.target {
            None => {
                if std::mem::replace(&mut every, true) {
                    return Err(PlacementError::Twice("every disk".into()));
                }
                for m in masters {
                    sizes.entry(m.target.clone()).or_insert(d.bytes);
                }
            }
            Some(t) => {
                if !masters.iter().any(|m| &m.target == t) {
                    let known: Vec<&str> = masters.iter().map(|m| m.target.as_str()).collect();
                    return Err(PlacementError::NoSuchDisk {
                        target: t.clone(),
                        domain: domain.to_string(),
                        known: if known.is_empty() { "none".into() } else { known.join(", ") },
                    });
                }
                if named.insert(t.clone(), d.bytes).is_some() {
                    return Err(PlacementError::Twice(t.clone()));
                }
            }
        }
    }
    // A disk named on its own wins over the size for every disk.
    sizes.extend(named);
    for m in masters {
        if let Some(&s) = sizes.get(&m.target) {
            if s < m.virtual_size {
                return Err(PlacementError::Smaller {
                    target: m.target.clone(),
                    asked: human_bytes(s),
                    master: human_bytes(m.virtual_size),
                    master_bytes: m.virtual_size,
                });
            }
        }
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(target: &str, size: u64) -> Master {
        Master {
            pool: Some("default".into()),
            volume: Some(format!("{target}.qcow2")),
            ..Master::file(0, target, &format!("/p/{target}.qcow2"), "qcow2", size)
        }
    }

    fn req(sizes: &[&str]) -> OverlayRequest {
        OverlayRequest {
            disk_sizes: sizes.iter().map(|s| parse_disk_size(s).unwrap()).collect(),
            pool: None,
            layout: Default::default(),
        }
    }

    #[test]
    fn disk_sizes_are_read_for_every_disk_or_one() {
        assert_eq!(parse_disk_size("20G"), Ok(DiskSize { target: None, bytes: 20 << 30 }));
        assert_eq!(parse_disk_size("vdb=512M"), Ok(DiskSize { target: Some("vdb".into()), bytes: 512 << 20 }));
        for bad in ["=20G", "v/d=1G", "20X", "0", "1000", "vda="] {
            assert!(parse_disk_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_size_smaller_than_the_master_is_refused_with_both_sizes() {
        let ms = [master("vda", 1 << 30), master("vdb", 4 << 30)];
        let e = sizes_for(&req(&["2G"]), "t", &ms).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--disk-size 2.0 GiB is smaller than the master of disk vdb (4.0 GiB, 4294967296 bytes); an overlay can \
             only be as large or larger. Give a size of at least 4.0 GiB (or name the disk: --disk-size vdb=SIZE)"
        );
        let s = sizes_for(&req(&["2G", "vdb=8G"]), "t", &ms).unwrap();
        assert_eq!(s.get("vda"), Some(&(2 << 30)));
        assert_eq!(s.get("vdb"), Some(&(8 << 30)));
        assert_eq!(sizes_for(&req(&["vda=1G"]), "t", &ms).unwrap().len(), 1, "the master's own size is fine");
        assert!(matches!(sizes_for(&req(&["vdc=9G"]), "t", &ms), Err(PlacementError::NoSuchDisk { .. })));
        assert!(matches!(sizes_for(&req(&["vda=2G", "vda=3G"]), "t", &ms), Err(PlacementError::Twice(_))));
        assert!(matches!(sizes_for(&req(&["8G", "9G"]), "t", &ms), Err(PlacementError::Twice(_))));
        let p = Placement { sizes: s, pool: None };
        assert_eq!(p.size_for(&ms[1]), 8 << 30);
        assert_eq!(Placement::default().size_for(&ms[1]), 4 << 30);
    }
}
