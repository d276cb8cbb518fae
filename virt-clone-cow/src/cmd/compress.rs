//! `virt-clone-cow publish TEMPLATE --compress`: before publishing, each master of the template
//! is copied to a NEW zstd-compressed qcow2 volume beside it (`<stem>.zst.qcow2`, written in a
//! staging directory outside the pool's directory, checked with `qemu-img compare`, then renamed in
//! under its name: a pool refresh never lists a partial volume), and the template
//! is redefined to use it. Masters are immutable: the old master stays where it is, and clones
//! made before keep it as their backing file; clones made afterwards (and every host that fetches
//! the published master) get the compressed one, which has fewer bytes to move
//! (`docs/many-hosts.md`, section 1a).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use vcc_core::metadata::TemplateInfo;
use vcc_core::qemu_img::{QemuImg, QemuImgError};
use vcc_core::staging::{Staged, StagingError};
use vcc_core::xml::Repoint;
use vcc_libvirt::{Libvirt, LibvirtError};

/// Why a master was not compressed. Each says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("template '{0}' is running; shut it down before --compress points it at new masters")]
    Running(String),
    #[error("master {path} is already compressed ({clusters} compressed clusters); publish it without --compress")]
    AlreadyCompressed { path: String, clusters: u64 },
    #[error("master {path} is {format}; only raw and qcow2 masters can be compressed")]
    Format { path: String, format: String },
    #[error("master {path} is not in the directory of its pool '{pool}'; --compress needs a directory (dir/fs/netfs) pool, where it can write the compressed master beside it")]
    NotDirPool { path: String, pool: String },
    #[error("volume '{volume}' already exists in pool '{pool}'; remove it (virsh vol-delete --pool {pool} {volume}) or point the template at it yourself")]
    Exists { pool: String, volume: String },
    #[error("compressing master {path}")]
    QemuImg {
        path: String,
        #[source]
        source: QemuImgError,
    },
    #[error("the compressed copy of {path} does not read the same data as the master (qemu-img compare); nothing was changed")]
    Differs { path: String },
    #[error("master {path} does not compress ({size} bytes, {compressed} compressed); publish it without --compress")]
    NotSmaller { path: String, size: u64, compressed: u64 },
    #[error("writing the compressed master {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the compressed master {path}")]
    Staging {
        path: String,
        #[source]
        source: StagingError,
    },
    #[error("the XML of template '{domain}' has no disk {target} to point at the compressed master")]
    NoDisk { domain: String, target: String },
    #[error("cannot read the XML of domain '{domain}'")]
    Xml {
        domain: String,
        #[source]
        source: vcc_core::xml::XmlError,
    },
}

/// What one master became, in the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CompressedFrom {
    /// The old master (kept: the clones made before use it).
    pub path: String,
    pub format: String,
    /// Its file size, and the compressed master's, in bytes.
    pub size: u64,
    pub compressed_size: u64,
}

/// One master to compress: its index in the template's masters, its pool and volume.
#[derive(Debug, Clone)]
pub struct Todo {
    pub index: usize,
    pub pool: String,
    pub volume: String,
}

/// The compressed masters made and the template's XML before: what [`Compressed::undo`] puts
/// back when the publish that follows fails.
#[derive(Debug)]
pub struct Compressed {
    template: String,
    original_xml: Option<String>,
    made: Vec<(String, PathBuf)>,
    /// By master index: what it was.
    pub from: Vec<(usize, CompressedFrom)>,
}

impl Compressed {
    /// Puts the template's XML back and removes the compressed masters.
    pub fn undo(self, lv: &Libvirt) {
        if let Some(xml) = &self.original_xml {
            if let Err(e) = lv.define(xml, &self.template) {
                tracing::warn!(
                    "could not put back the XML of template '{}': {}",
                    self.template,
                    vcc_core::error::one_line(&e)
                );
            }
        }
        remove_made(lv, &self.made);
    }
}

fn remove_made(lv: &Libvirt, made: &[(String, PathBuf)]) {
    for (pool, path) in made {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("could not remove '{}': {e}", path.display());
        }
        let _ = lv.refresh_pool(pool);
    }
}

/// The compressed master's volume name: the master's without a `.qcow2`, `.raw` or `.img`
/// ending, then `.zst.qcow2`.
pub fn compressed_name(volume: &str) -> String {
    let stem = [".qcow2", ".raw", ".img"]
        .iter()
        .find_map(|ext| volume.strip_suffix(ext).filter(|s| !s.is_empty()))
        .unwrap_or(volume);
    format!("{stem}.zst.qcow2")
}

/// Compresses every master in `todo` and points the template at the new masters; `template`'s
/// master elements then name them (their old identity dropped: the publish that follows records
/// the new one). Checks everything it can before writing anything; a failure leaves nothing.
pub fn compress_masters(
    lv: &Libvirt,
    name: &str,
    template: &mut TemplateInfo,
    todo: &mut [Todo],
    timeout: Duration,
) -> Result<Compressed, CompressError> {
    if lv.is_active(name)? {
        return Err(CompressError::Running(name.to_string()));
    }
    let qemu_img = QemuImg::new().timeout(timeout);
    let qerr = |path: &str| {
        let path = path.to_string();
        move |source| CompressError::QemuImg { path, source }
    };
    // Everything that can refuse, before anything is written.
    let mut plan = Vec::new();
    for t in todo.iter() {
        let m = &template.masters[t.index];
        match m.format.as_str() {
            "raw" => {}
            "qcow2" => {
                let clusters = qemu_img.check(Path::new(&m.path), "qcow2").map_err(qerr(&m.path))?.compressed_clusters;
                if clusters > 0 {
                    return Err(CompressError::AlreadyCompressed { path: m.path.clone(), clusters });
                }
            }
            f => return Err(CompressError::Format { path: m.path.clone(), format: f.to_string() }),
        }
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let in_dir = lv
            .pool_dir(&t.pool)?
            .is_some_and(|d| Path::new(&m.path).parent().map(canonical) == Some(canonical(Path::new(&d))));
        if !in_dir {
            return Err(CompressError::NotDirPool { path: m.path.clone(), pool: t.pool.clone() });
        }
        let volume = compressed_name(&t.volume);
        let path = Path::new(&m.path).with_file_name(&volume);
        if lv.volume(&t.pool, &volume)?.is_some() || std::fs::symlink_metadata(&path).is_ok() {
            return Err(CompressError::Exists { pool: t.pool.clone(), volume });
        }
        plan.push((volume, path));
    }

    let mut done = Compressed { template: name.to_string(), original_xml: None, made: Vec::new(), from: Vec::new() };
    let written = write_all(lv, &qemu_img, template, todo, &plan, &mut done);
    if let Err(e) = written {
        remove_made(lv, &done.made);
        return Err(e);
    }
    if let Err(e) = repoint(lv, name, template, todo, &plan, &mut done) {
        done.undo(lv);
        return Err(e);
    }
    Ok(done)
}

fn write_all(
    lv: &Libvirt,
    qemu_img: &QemuImg,
    template: &TemplateInfo,
    todo: &[Todo],
    plan: &[(String, PathBuf)],
    done: &mut Compressed,
) -> Result<(), CompressError> {
    for (t, (_, path)) in todo.iter().zip(plan) {
        let m = &template.masters[t.index];
        let (size, compressed) = write_one(qemu_img, Path::new(&m.path), &m.format, &t.pool, path)?;
        done.made.push((t.pool.clone(), path.clone()));
        lv.refresh_pool(&t.pool)?;
        tracing::info!("compressed {} ({size} bytes) to {} ({compressed} bytes)", m.path, path.display());
        let from = CompressedFrom { path: m.path.clone(), format: m.format.clone(), size, compressed_size: compressed };
        done.from.push((t.index, from));
    }
    Ok(())
}

/// Writes the compressed copy of `master` in virt-clone-cow's staging directory for `pool` (on
/// the pool's filesystem, outside its directory: a pool refresh never lists a partial volume,
/// `vcc_core::staging`), checks that it reads the same and is smaller, gives it the master's owner
/// and (read-only) mode, syncs it and renames it in as `to` (never replacing a file there). A
/// failure leaves nothing, in the pool or in the staging directory. Returns both sizes.
fn write_one(
    qemu_img: &QemuImg,
    master: &Path,
    format: &str,
    pool: &str,
    to: &Path,
) -> Result<(u64, u64), CompressError> {
    let shown = master.display().to_string();
    let io = |p: &Path| {
        let path = p.display().to_string();
        move |source| CompressError::Io { path, source }
    };
    let staging = |source: StagingError| CompressError::Staging { path: to.display().to_string(), source };
    let (Some(dir), Some(name)) = (to.parent(), to.file_name().and_then(|n| n.to_str())) else {
        return Err(io(to)(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    };
    let sdir = vcc_core::staging::vcc_staging_dir(dir, pool).map_err(staging)?;
    let staged = Staged::create(&sdir, &format!("{name}.vcc-compress-{}", std::process::id())).map_err(staging)?;
    let tmp = staged.path().to_path_buf();
    qemu_img
        .convert_compressed(master, format, &tmp)
        .map_err(|source| CompressError::QemuImg { path: shown.clone(), source })?;
    let same = qemu_img
        .compare(master, format, &tmp, "qcow2")
        .map_err(|source| CompressError::QemuImg { path: shown.clone(), source })?;
    if !same {
        return Err(CompressError::Differs { path: shown.clone() });
    }
    let old = std::fs::metadata(master).map_err(io(master))?;
    let compressed = std::fs::metadata(&tmp).map_err(io(&tmp))?.len();
    if compressed >= old.len() {
        return Err(CompressError::NotSmaller { path: shown.clone(), size: old.len(), compressed });
    }
    std::os::unix::fs::chown(&tmp, Some(old.uid()), Some(old.gid())).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(old.mode() & 0o7555)).map_err(io(&tmp))?;
    staged.place(dir, name).map_err(staging)?;
    Ok((old.len(), compressed))
}

/// Redefines the template with its disks on the compressed masters and updates its master
/// elements (the old identity dropped).
fn repoint(
    lv: &Libvirt,
    name: &str,
    template: &mut TemplateInfo,
    todo: &mut [Todo],
    plan: &[(String, PathBuf)],
    done: &mut Compressed,
) -> Result<(), CompressError> {
    let xml = lv.domain_xml(name)?;
    let mut edits = Vec::new();
    for (t, (volume, path)) in todo.iter().zip(plan) {
        let m = &template.masters[t.index];
        let target = m.target.clone().unwrap_or_default();
        edits.push(Repoint {
            target,
            file: path.display().to_string(),
            volume: volume.clone(),
            format: "qcow2".into(),
        });
    }
    let (new_xml, found) = vcc_core::xml::repoint_disks(&xml, &edits)
        .map_err(|source| CompressError::Xml { domain: name.to_string(), source })?;
    if let Some(e) = edits.iter().find(|e| !found.contains(&e.target)) {
        return Err(CompressError::NoDisk { domain: name.to_string(), target: e.target.clone() });
    }
    lv.define(&new_xml, name)?;
    done.original_xml = Some(xml);
    for (t, (volume, path)) in todo.iter_mut().zip(plan) {
        let m = &mut template.masters[t.index];
        m.path = path.display().to_string();
        m.format = "qcow2".into();
        m.volume = Some(volume.clone());
        m.pool = Some(t.pool.clone());
        m.sha256 = None;
        m.info_hash = None;
        m.manifest = None;
        t.volume = volume.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compressed_master_is_named_after_the_old_one() {
        assert_eq!(compressed_name("base.qcow2"), "base.zst.qcow2");
        assert_eq!(compressed_name("base.raw"), "base.zst.qcow2");
        assert_eq!(compressed_name("debian.img"), "debian.zst.qcow2");
        assert_eq!(compressed_name("master"), "master.zst.qcow2");
        assert_eq!(compressed_name(".qcow2"), ".qcow2.zst.qcow2");
    }
}
