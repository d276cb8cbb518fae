//! `virt-clone-cow flatten CLONE [--disk TARGET]...`: a linked clone's overlays become standalone
//! disks, so the clone no longer depends on its master.
//!
//! * A running clone: libvirt's block pull (`virDomainBlockPull`, what `virsh blockpull` does)
//!   copies the master's data into each overlay while the guest runs; we wait for each job, bounded,
//!   and check the live XML shows no backing chain. libvirt updates the persistent XML itself
//!   (we make sure). Stopped early (timeout), the overlay keeps its backing chain: as it was.
//! * A shut-off clone (this host's libvirt only): a standalone copy of each overlay is written
//!   with `qemu-img convert` in virt-clone-cow's staging directory (on the overlay's filesystem,
//!   outside the pool's directory, `vcc_core::staging`: a pool refresh never lists a partial
//!   copy), checked (no backing file, same size), and only when every disk's copy is ready is each
//!   swapped with its overlay in one step (`renameat2(RENAME_EXCHANGE)`), the old overlays then
//!   in the staging directory until the domain's XML and metadata are written: a failure at any
//!   step swaps every overlay back and puts the XML and the metadata back. A half-flattened disk
//!   is never visible under the overlay's name.
//!
//! Afterwards the clone's XML ends each disk's chain with `<backingStore/>`, and its metadata no
//! longer lists the disks (docs/metadata.md); a clone with no linked disk left loses its
//! `<vcc:clone>` element.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use vcc_core::metadata::{same_file, CloneDisk, CowMetadata, MasterRef};
use vcc_core::qemu_img::{QemuImg, QemuImgError};
use vcc_core::staging::{self, Staged};
use vcc_core::xml::{drop_backing_stores, BackingDecl, DiskSource, DomainFacts, XmlError};
use vcc_libvirt::{Libvirt, LibvirtError};

/// How long `flatten` waits for one disk by default (a pull or a copy of its whole master).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct FlattenRequest {
    pub clone: String,
    /// Targets to flatten; empty: every linked disk.
    pub disks: Vec<String>,
    /// Longest wait for one disk's pull or copy.
    pub timeout: Duration,
}

/// Why flattening failed; the clone is as it was.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(
        "domain '{0}' is not a linked clone made by virt-clone-cow (it has no clone metadata); nothing to flatten"
    )]
    NotAClone(String),
    #[error("disk {target} of '{domain}' is not a linked disk of the clone (linked: {linked})")]
    NotLinked { domain: String, target: String, linked: String },
    #[error(
        "disk {target} of '{domain}' is no longer the overlay its metadata records ('{overlay}'); nothing was changed"
    )]
    Moved { domain: String, target: String, overlay: String },
    #[error("cannot read the XML of domain '{domain}'")]
    Xml {
        domain: String,
        #[source]
        source: XmlError,
    },
    #[error("'{domain}' is shut off and the connection ({uri}) is not this host's libvirt: offline flattening writes files here. Start the clone and flatten it live, or run flatten on its host")]
    RemoteOffline { domain: String, uri: String },
    #[error("the block pull of disk {target} of '{domain}' did not end within {secs} s; it was stopped and the disk keeps its master (give more time with --timeout)")]
    PullTimeout { domain: String, target: String, secs: u64 },
    #[error("the block pull of disk {target} of '{domain}' ended, but the disk still has a backing chain (libvirtd's log says why); its master is still needed")]
    PullIncomplete { domain: String, target: String },
    #[error("making a standalone copy of disk {target} of '{domain}'")]
    Copy {
        domain: String,
        target: String,
        #[source]
        source: CopyError,
    },
    #[error(
        "'{0}' was started or its disks changed while it was being flattened; nothing was changed, flatten it again"
    )]
    Changed(String),
    #[error("putting the flattened disk {target} of '{domain}' in place")]
    Swap {
        domain: String,
        target: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a standalone copy could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("'{path}'")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the copy '{0}' still has a backing file or another size than the overlay")]
    Check(String),
    #[error("'{path}'")]
    Staging {
        path: String,
        #[source]
        source: staging::StagingError,
    },
}

/// One flattened disk in the report.
#[derive(Debug, Clone, Serialize)]
pub struct FlattenedDisk {
    pub target: String,
    /// The disk's image, now standalone.
    pub path: String,
    /// The master it no longer depends on.
    pub master: String,
    pub seconds: f64,
}

/// What `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct FlattenReport {
    pub domain: String,
    /// Flattened while running (block pull).
    pub live: bool,
    pub disks: Vec<FlattenedDisk>,
    /// Disks still linked to a master.
    pub still_linked: Vec<String>,
    /// Masters whose protection was released: nothing on this host needs them any more.
    pub released: Vec<String>,
    pub elapsed_ms: f64,
}

impl FlattenReport {
    pub fn render(&self) -> String {
        let how = if self.live { "live, by block pull" } else { "offline" };
        let mut s = format!("Flattened {} disk(s) of '{}' ({how}):\n", self.disks.len(), self.domain);
        for d in &self.disks {
            s.push_str(&format!(
                "  {}  {}  (no longer backed by {}; {:.1} s)\n",
                d.target, d.path, d.master, d.seconds
            ));
        }
        if self.still_linked.is_empty() {
            s.push_str(&format!("'{}' depends on no master now.\n", self.domain));
        } else {
            s.push_str(&format!("Still linked: {}\n", self.still_linked.join(", ")));
        }
        for m in &self.released {
            s.push_str(&format!(
                "Master {m} is needed by nothing else here: no longer immutable (virt-clone-cow gc lists it).\n"
            ));
        }
        s
    }
}

/// A disk to flatten, as resolved.
#[derive(Debug, Clone)]
struct Target {
    recorded: CloneDisk,
    /// The overlay's path now.
    path: String,
    /// (pool, volume) when the overlay is a pool volume.
    volume: Option<(String, String)>,
}

/// Flattens the clone's disks (all linked ones, or those asked for).
pub fn flatten(lv: &Libvirt, req: &FlattenRequest) -> Result<FlattenReport, FlattenError> {
    let t0 = Instant::now();
    let name = &req.clone;
    let _lock = crate::lock::OriginalLock::acquire(lv.uri(), name, Duration::from_secs(120))?;
    let md = lv.cow_metadata(name)?;
    let clone = md.as_ref().and_then(|m| m.clone.clone()).ok_or_else(|| FlattenError::NotAClone(name.clone()))?;
    let xml = lv.domain_xml(name)?;
    let facts = DomainFacts::parse(&xml).map_err(|source| FlattenError::Xml { domain: name.clone(), source })?;
    let targets = resolve(lv, name, &clone.disks, &facts, &req.disks)?;

    // The metadata afterwards: the flattened disks no longer name their masters.
    let flat: Vec<&str> = targets.iter().map(|t| t.recorded.target.as_str()).collect();
    let mut after = md.unwrap_or_default();
    let remaining = forget_disks(&mut after, &flat);
    let after = (after != CowMetadata::default()).then_some(after);

    let live = lv.is_active(name)?;
    let disks = if live {
        let disks = pull(lv, name, &targets, req.timeout)?;
        // The persistent XML: libvirt updates it after a pull; made sure of here.
        let now = lv.domain_xml(name)?;
        let (edited, _) =
            drop_backing_stores(&now, &flat).map_err(|source| FlattenError::Xml { domain: name.clone(), source })?;
        if edited != now {
            lv.define(&edited, name)?;
        }
        lv.set_cow_metadata(name, after.as_ref())?;
        disks
    } else {
        copy_offline(lv, name, &xml, &targets, req, after.as_ref())?
    };
    let released =
        masters_no_longer_needed(lv, name, &targets.iter().map(|t| t.recorded.master.clone()).collect::<Vec<_>>());

    Ok(FlattenReport {
        domain: name.clone(),
        live,
        disks,
        still_linked: remaining,
        released,
        elapsed_ms: crate::apply::ms(t0.elapsed()),
    })
}

/// Removes the flattened disks from the clone's metadata (and the clone element once no disk is
/// linked or reflinked); returns the targets still linked.
pub fn forget_disks(md: &mut CowMetadata, flat: &[&str]) -> Vec<String> {
    let Some(c) = md.clone.as_mut() else { return Vec::new() };
    c.disks.retain(|d| !flat.contains(&d.target.as_str()));
    let left: Vec<String> = c.disks.iter().map(|d| d.target.clone()).collect();
    // Reflinked disks (`--reflink`) are recorded for `tree` and stay.
    if left.is_empty() && c.reflinks.is_empty() {
        md.clone = None;
    }
    left
}

/// The one place where a clone tells that it no longer needs some masters: the protection of
/// each (the immutable flag, `crate::protection`) is released when nothing else on the host needs
/// it. Returns the masters released.
fn masters_no_longer_needed(lv: &Libvirt, domain: &str, masters: &[MasterRef]) -> Vec<String> {
    for m in masters {
        tracing::info!("'{domain}' no longer depends on master {} (on {})", m.path, lv.uri());
    }
    // Never fatal: the clone is flattened; `virt-clone-cow gc --yes` releases them later.
    crate::protection::release_if_unneeded(lv, masters.iter().map(|m| m.path.as_str())).unwrap_or_else(|e| {
        tracing::warn!("could not release the masters of '{domain}': {}", vcc_core::error::one_line(&e));
        Vec::new()
    })
}

fn resolve(
    lv: &Libvirt,
    domain: &str,
    recorded: &[CloneDisk],
    facts: &DomainFacts,
    asked: &[String],
) -> Result<Vec<Target>, FlattenError> {
    let linked = || {
        let l: Vec<&str> = recorded.iter().map(|d| d.target.as_str()).collect();
        if l.is_empty() {
            "none".to_string()
        } else {
            l.join(", ")
        }
    };
    let chosen: Vec<&CloneDisk> = if asked.is_empty() {
        recorded.iter().collect()
    } else {
        let mut v = Vec::new();
        for t in asked {
            let d = recorded.iter().find(|d| &d.target == t).ok_or_else(|| FlattenError::NotLinked {
                domain: domain.to_string(),
                target: t.clone(),
                linked: linked(),
            })?;
            if !v.iter().any(|x: &&CloneDisk| x.target == d.target) {
                v.push(d);
            }
        }
        v
    };
    if chosen.is_empty() {
        return Err(FlattenError::NotLinked { domain: domain.to_string(), target: "(any)".into(), linked: linked() });
    }
    let mut out = Vec::new();
    for d in chosen {
        let moved =
            || FlattenError::Moved { domain: domain.to_string(), target: d.target.clone(), overlay: d.overlay.clone() };
        let disk = facts.disks.iter().find(|x| x.target.as_deref() == Some(d.target.as_str())).ok_or_else(moved)?;
        let (path, volume) = match &disk.source {
            DiskSource::File(p) => (p.clone(), lv.volume_by_path(p)?.map(|v| (v.pool, v.facts.name))),
            DiskSource::Volume { pool, volume } => {
                let v = lv.volume(pool, volume)?.ok_or_else(moved)?;
                (v.facts.path, Some((pool.clone(), volume.clone())))
            }
            _ => return Err(moved()),
        };
        if path != d.overlay && !(lv.is_local() && same_file(&path, &d.overlay)) {
            return Err(moved());
        }
        out.push(Target { recorded: d.clone(), path, volume });
    }
    Ok(out)
}

/// Live: a block pull per disk, one after the other, each bounded by `timeout`.
fn pull(lv: &Libvirt, name: &str, targets: &[Target], timeout: Duration) -> Result<Vec<FlattenedDisk>, FlattenError> {
    let mut done = Vec::new();
    for t in targets {
        let target = t.recorded.target.as_str();
        let t0 = Instant::now();
        let job = lv.block_pull(name, target)?;
        let deadline = t0 + timeout;
        while job.running()? {
            if Instant::now() >= deadline {
                if let Err(e) = job.abort() {
                    tracing::warn!("{}", vcc_core::error::one_line(&e));
                }
                return Err(FlattenError::PullTimeout {
                    domain: name.to_string(),
                    target: target.to_string(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let live = DomainFacts::parse(&lv.live_domain_xml(name)?)
            .map_err(|source| FlattenError::Xml { domain: name.to_string(), source })?;
        let chain_left = live
            .disks
            .iter()
            .find(|d| d.target.as_deref() == Some(target))
            .is_none_or(|d| matches!(d.backing, BackingDecl::Store { .. }));
        if chain_left {
            return Err(FlattenError::PullIncomplete { domain: name.to_string(), target: target.to_string() });
        }
        done.push(flattened(t, t0));
    }
    Ok(done)
}

fn flattened(t: &Target, t0: Instant) -> FlattenedDisk {
    FlattenedDisk {
        target: t.recorded.target.clone(),
        path: t.path.clone(),
        master: t.recorded.master.path.clone(),
        seconds: (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    }
}

/// What identifies an overlay's content on disk: if any of it changes, the guest wrote to it.
fn stamp(path: &str) -> std::io::Result<(u64, u64, i64, i64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// A standalone copy made in the staging directory, not yet in place.
#[derive(Debug)]
struct Copy {
    target: Target,
    /// The copy; once swapped with the overlay (`swapped`), the old overlay.
    tmp: Staged,
    swapped: bool,
    seconds: f64,
}

/// Offline: standalone copies of every disk, then all put in place together with the XML and
/// `metadata_after`; any failure puts the overlays, the XML and the metadata back.
fn copy_offline(
    lv: &Libvirt,
    name: &str,
    xml: &str,
    targets: &[Target],
    req: &FlattenRequest,
    metadata_after: Option<&CowMetadata>,
) -> Result<Vec<FlattenedDisk>, FlattenError> {
    if !lv.is_local() {
        return Err(FlattenError::RemoteOffline { domain: name.to_string(), uri: lv.uri().to_string() });
    }
    let changed = || FlattenError::Changed(name.to_string());
    let mut stamps = Vec::new();
    for t in targets {
        stamps
            .push(stamp(&t.path).map_err(|source| copy_err(name, t, CopyError::Io { path: t.path.clone(), source }))?);
    }
    let mut copies: Vec<Copy> = Vec::new();
    let result = (|| {
        for t in targets {
            crate::apply::check_interrupt().map_err(|_| changed())?;
            let t0 = Instant::now();
            let tmp = standalone_copy(t, req.timeout).map_err(|e| copy_err(name, t, e))?;
            copies.push(Copy { target: t.clone(), tmp, swapped: false, seconds: t0.elapsed().as_secs_f64() });
        }
        // Nothing may have touched the disks meanwhile.
        if lv.is_active(name)? || lv.domain_xml(name)? != xml {
            return Err(changed());
        }
        for (t, s) in targets.iter().zip(&stamps) {
            if stamp(&t.path).ok().as_ref() != Some(s) {
                return Err(changed());
            }
        }
        for c in copies.iter_mut() {
            let swap = |source| FlattenError::Swap {
                domain: name.to_string(),
                target: c.target.recorded.target.clone(),
                source,
            };
            // One step: the overlay's name is the old overlay or the whole copy, never a part.
            staging::exchange(c.tmp.path(), Path::new(&c.target.path)).map_err(swap)?;
            c.swapped = true;
        }
        let flat: Vec<&str> = targets.iter().map(|t| t.recorded.target.as_str()).collect();
        let (edited, _) =
            drop_backing_stores(xml, &flat).map_err(|source| FlattenError::Xml { domain: name.to_string(), source })?;
        lv.define(&edited, name)?;
        if let Err(e) = lv.set_cow_metadata(name, metadata_after) {
            // The XML as it was holds the metadata as it was.
            if let Err(e2) = lv.define(xml, name) {
                tracing::warn!("could not put back the XML of '{name}': {}", vcc_core::error::one_line(&e2));
            }
            return Err(e.into());
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            let mut pools = Vec::new();
            // Dropping the copies removes the old overlays from the staging directory.
            for c in &copies {
                if let Some((pool, _)) = &c.target.volume {
                    pools.push(pool.clone());
                }
            }
            pools.sort();
            pools.dedup();
            for p in pools {
                if let Err(e) = lv.refresh_pool(&p) {
                    tracing::warn!("{}", vcc_core::error::one_line(&e));
                }
            }
            Ok(copies
                .iter()
                .map(|c| FlattenedDisk {
                    seconds: (c.seconds * 10.0).round() / 10.0,
                    ..flattened(&c.target, Instant::now())
                })
                .collect())
        }
        Err(e) => {
            undo_copies(lv, copies);
            Err(e)
        }
    }
}

fn copy_err(domain: &str, t: &Target, source: CopyError) -> FlattenError {
    FlattenError::Copy { domain: domain.to_string(), target: t.recorded.target.clone(), source }
}

/// Puts every old overlay back (the XML was not redefined, or the failure was before) and
/// removes every copy.
fn undo_copies(lv: &Libvirt, copies: Vec<Copy>) {
    for c in copies.into_iter().rev() {
        if c.swapped {
            if let Err(e) = staging::exchange(c.tmp.path(), Path::new(&c.target.path)) {
                tracing::warn!("could not put back '{}' from '{}': {e}", c.target.path, c.tmp.path().display());
                // The old overlay stays in the staging directory for the operator to put back.
                c.tmp.keep();
                continue;
            }
        }
        if let Some((pool, _)) = &c.target.volume {
            let _ = lv.refresh_pool(pool);
        }
    }
}

/// Writes a standalone copy of the overlay in virt-clone-cow's staging directory for its
/// directory (on its filesystem, outside the pool's listing: a pool refresh never shows a partial
/// volume, `vcc_core::staging`) and checks it. A copy that fails is removed.
fn standalone_copy(t: &Target, timeout: Duration) -> Result<Staged, CopyError> {
    let q = QemuImg::new().timeout(timeout);
    let info = q.info(Path::new(&t.path), "qcow2")?;
    let overlay = Path::new(&t.path);
    let staging_err = |source| CopyError::Staging { path: t.path.clone(), source };
    let (Some(dir), Some(file)) = (overlay.parent(), overlay.file_name()) else {
        return Err(CopyError::Check(t.path.clone()));
    };
    let key = t.volume.as_ref().map_or("files", |(pool, _)| pool.as_str());
    let sdir = staging::vcc_staging_dir(dir, key).map_err(staging_err)?;
    let tmp = Staged::create(&sdir, &format!("{}.vcc-flatten-{}", file.to_string_lossy(), std::process::id()))
        .map_err(staging_err)?;
    q.convert_standalone(overlay, "qcow2", tmp.path())?;
    check_copy(tmp.path(), &t.path, info.virtual_size, timeout)?;
    Ok(tmp)
}

/// The copy has no backing file and the overlay's size; it gets the overlay's owner, mode and
/// SELinux label (where SELinux is enabled) and is on disk (fsync) before it may replace the overlay.
fn check_copy(tmp: &Path, overlay: &str, virtual_size: u64, timeout: Duration) -> Result<(), CopyError> {
    let io = |source| CopyError::Io { path: tmp.display().to_string(), source };
    let info = QemuImg::new().timeout(timeout).info(tmp, "qcow2")?;
    if info.backing.is_some() || info.virtual_size != virtual_size {
        return Err(CopyError::Check(tmp.display().to_string()));
    }
    let old = std::fs::metadata(overlay).map_err(|source| CopyError::Io { path: overlay.to_string(), source })?;
    std::os::unix::fs::chown(tmp, Some(old.uid()), Some(old.gid())).map_err(io)?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(old.mode() & 0o7777)).map_err(io)?;
    if vcc_core::selinux::Relabel::for_this_host().copy_dir_label {
        if let Err(e) = vcc_core::selinux::copy_xattr(Path::new(overlay), tmp, vcc_core::selinux::XATTR) {
            tracing::warn!("cannot give {} the SELinux label of {overlay}: {e}", tmp.display());
        }
    }
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(t: &str) -> CloneDisk {
        CloneDisk {
            target: t.into(),
            overlay: format!("/p/c-{t}.qcow2"),
            master: MasterRef { path: format!("/p/{t}.qcow2"), format: "qcow2".into(), ..Default::default() },
        }
    }

    #[test]
    fn flattened_disks_leave_the_metadata_and_the_clone_element_goes_with_the_last() {
        let mut md = CowMetadata {
            template: None,
            clone: Some(vcc_core::metadata::CloneInfo {
                original: "t".into(),
                disposable: false,
                disks: vec![disk("vda"), disk("vdb")],
                reflinks: Vec::new(),
            }),
        };
        assert_eq!(forget_disks(&mut md, &["vda"]), ["vdb"]);
        assert_eq!(md.clone.as_ref().unwrap().disks, [disk("vdb")]);
        assert!(forget_disks(&mut md, &["vdb"]).is_empty());
        assert_eq!(md, CowMetadata::default(), "no linked disk: not a clone any more");

        // A clone with a reflinked disk keeps its element (tree shows the copy).
        let reflinked = vcc_core::metadata::ReflinkDisk {
            target: "vdc".into(),
            path: "/p/c-vdc.raw".into(),
            from: MasterRef { path: "/p/vdc.raw".into(), format: "raw".into(), ..Default::default() },
        };
        let mut md = CowMetadata {
            template: None,
            clone: Some(vcc_core::metadata::CloneInfo {
                original: "t".into(),
                disposable: false,
                disks: vec![disk("vda")],
                reflinks: vec![reflinked.clone()],
            }),
        };
        assert!(forget_disks(&mut md, &["vda"]).is_empty());
        assert_eq!(md.clone.unwrap().reflinks, [reflinked]);
    }
}
