//! Reflinked clones (`--reflink`): full copies of a master that share its extents, made in
//! constant time on filesystems that can (xfs made with `reflink=1`, btrfs), with no backing
//! chain. Raw pool volumes are copied by libvirt (`VIR_STORAGE_VOL_CREATE_REFLINK`, which
//! libvirt allows for raw only); everything else (a qcow2 volume, a file outside any pool) with the
//! `FICLONE` ioctl here: cloned into virt-clone-cow's staging directory on the same filesystem
//! (`vcc_core::staging`), then renamed to its name, so no partial image is ever in the pool.
//!
//! Nothing falls back to a slow full copy: a filesystem that cannot share extents is refused with
//! one line that says what to do.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vcc_core::staging::{self, Staged, StagingError};

/// Why a reflinked copy cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ReflinkError {
    #[error("'{dir}' is on {fs}, which cannot share extents between files: --reflink needs xfs (made with -m reflink=1) or btrfs; clone without --reflink for a linked (qcow2 overlay) clone")]
    Unsupported { dir: String, fs: String },
    #[error(
        "'{from}' and '{dir}' are on different filesystems: a reflinked copy must stay on its master's filesystem"
    )]
    CrossDevice { from: String, dir: String },
    #[error("'{0}' exists already; refusing to overwrite it")]
    Exists(String),
    #[error("its image '{path}' has a backing file of its own, which a reflinked copy would still need; flatten it first (qemu-img convert) or clone without --reflink")]
    HasBacking { path: String },
    #[error("'{path}' is a {format} image {where_}, and over a remote connection ({uri}) libvirt can reflink raw pool volumes only; run virt-clone-cow on that host, or clone without --reflink")]
    Remote { path: String, format: String, where_: &'static str, uri: String },
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("{op} '{path}'")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ReflinkError + 'a {
    move |source| ReflinkError::Io { op, path: path.display().to_string(), source }
}

/// The name of the filesystem type holding `path` (from `statfs`), for messages.
pub fn fs_name(path: &Path) -> String {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return "?".into() };
    let mut st: libc::statfs = unsafe_zeroed_statfs();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized, writable statfs.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return "an unknown filesystem".into();
    }
    // f_type's C type differs between architectures (i64 on x86_64, u32 on s390x).
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    fs_type_name(magic)
}

#[allow(unsafe_code)]
fn unsafe_zeroed_statfs() -> libc::statfs {
    // SAFETY: statfs is a plain C struct of integers, for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

/// A filesystem magic number (`statfs.f_type`) by name.
pub fn fs_type_name(magic: i64) -> String {
    match magic {
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0xEF53 => "ext2/3/4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6573_5546 => "fuse".into(),
        m => format!("a filesystem of type {m:#x}"),
    }
}

/// Shares all of `src`'s extents with `dst` (the `FICLONE` ioctl).
fn ficlone(dst: &File, src: &File) -> std::io::Result<()> {
    // SAFETY: both are open file descriptors for the duration of the call; FICLONE takes the
    // source descriptor as its argument and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The error for a failed `FICLONE` from `from` into a file in `dir`.
fn clone_failed(e: std::io::Error, from: &Path, dir: &Path, tmp: &Path) -> ReflinkError {
    match e.raw_os_error() {
        Some(libc::EXDEV) => {
            ReflinkError::CrossDevice { from: from.display().to_string(), dir: dir.display().to_string() }
        }
        _ if vcc_core::protect::unsupported(&e) => {
            ReflinkError::Unsupported { dir: dir.display().to_string(), fs: fs_name(dir) }
        }
        _ => ReflinkError::Io { op: "reflinking into", path: tmp.display().to_string(), source: e },
    }
}

/// Clones `from` into a new file in the staging directory of `to`'s directory (on its
/// filesystem, outside the pool's listing: `vcc_core::staging`); returns it (removed when dropped).
fn clone_to_temp(from: &Path, to: &Path) -> Result<(Staged, File), ReflinkError> {
    let dir = to.parent().unwrap_or(Path::new("/"));
    let src = File::open(from).map_err(io("opening", from))?;
    let mode = src.metadata().map_err(io("reading", from))?.permissions().mode();
    let file = to.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let sdir = staging::vcc_staging_dir(dir, "reflink")?;
    let tmp = Staged::create(&sdir, &format!("{file}.vcc-reflink-{}", std::process::id()))?;
    let dst = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp.path())
        .map_err(io("opening", tmp.path()))?;
    ficlone(&dst, &src).map_err(|e| clone_failed(e, from, dir, tmp.path()))?;
    // The copy is the clone's own disk: writable by its owner whatever the master's mode (a
    // template's masters are read-only).
    let mode = (mode & 0o666) | 0o600;
    dst.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io("setting the mode of", tmp.path()))?;
    Ok((tmp, dst))
}

/// Makes one reflinked copy of a clone's plan and records its undo: a raw pool volume through
/// libvirt, anything else with `FICLONE` (a copy in a pool is then made known by a refresh).
pub(crate) fn make_copy(
    tx: &mut crate::apply::Transaction<'_>,
    clone: &str,
    o: &crate::plan::OverlayPlan,
) -> Result<(), crate::apply::ApplyError> {
    use crate::apply::{ApplyError, Undo};
    use crate::plan::OverlayLocation;
    let err = |source| ApplyError::Reflink { clone: clone.to_string(), target: o.target.clone(), source };
    match &o.location {
        OverlayLocation::Volume { pool, name, .. } if o.master.format == "raw" && o.master.pool.is_some() => {
            let xml = format!(
                "<volume><name>{}</name><capacity>0</capacity><target><format type='raw'/></target></volume>",
                quick_xml::escape::escape(name.as_str())
            );
            tx.lv().reflink_volume(pool, &xml, name, &o.master.path).map_err(|source| ApplyError::ReflinkVolume {
                clone: clone.to_string(),
                target: o.target.clone(),
                source,
            })?;
            tx.push(Undo::Volume { pool: pool.clone(), name: name.clone() });
        }
        OverlayLocation::Volume { pool, name, path } => {
            reflink_file(Path::new(&o.master.path), Path::new(path)).map_err(err)?;
            tx.push(Undo::File(PathBuf::from(path)));
            // Undone first: the volume goes through libvirt once the pool lists it.
            tx.push(Undo::HookVolume { pool: pool.clone(), name: name.clone() });
            tx.lv().refresh_pool(pool)?;
        }
        OverlayLocation::File { path } => {
            reflink_file(Path::new(&o.master.path), Path::new(path)).map_err(err)?;
            tx.push(Undo::File(PathBuf::from(path)));
        }
    }
    Ok(())
}

/// Checks before any change that every master can be copied with a reflink where the plan puts
/// its copy (beside it): self-contained, and on a filesystem that shares extents (probed when
/// local; over a remote connection only raw pool volumes, which libvirt copies).
pub fn check_master(lv: &vcc_libvirt::Libvirt, m: &crate::plan::Master) -> Result<(), ReflinkError> {
    if !m.self_contained {
        return Err(ReflinkError::HasBacking { path: m.path.clone() });
    }
    if !lv.is_local() {
        if m.format == "raw" && m.pool.is_some() {
            return Ok(());
        }
        let where_ = if m.pool.is_some() { "in a pool" } else { "outside any pool" };
        return Err(ReflinkError::Remote {
            path: m.path.clone(),
            format: m.format.clone(),
            where_,
            uri: lv.uri().to_string(),
        });
    }
    let from = Path::new(&m.path);
    probe(from, from.parent().unwrap_or(Path::new("/")))
}

/// Whether a reflinked copy of `from` can be made in `dir`: clones it into a temporary file there
/// (constant time where it works; it fails at once where it does not) and removes it.
pub fn probe(from: &Path, dir: &Path) -> Result<(), ReflinkError> {
    let name = from.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    clone_to_temp(from, &dir.join(format!("{name}.probe"))).map(|_| ())
}

/// Makes `to` a reflinked copy of `from`: cloned into the staging directory (nothing partial
/// is ever in the pool's directory), synced, then renamed to `to` (which must not exist: an
/// existing file is never replaced).
pub fn reflink_file(from: &Path, to: &Path) -> Result<(), ReflinkError> {
    let (tmp, dst) = clone_to_temp(from, to)?;
    drop(dst);
    let dir = to.parent().unwrap_or(Path::new("/"));
    let name = to.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    match tmp.place(dir, &name) {
        Ok(_) => Ok(()),
        Err(StagingError::Exists(_)) => Err(ReflinkError::Exists(to.display().to_string())),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_names_are_known_or_shown_in_hex() {
        assert_eq!(fs_type_name(0x5846_5342), "xfs");
        assert_eq!(fs_type_name(0x9123_683E), "btrfs");
        assert_eq!(fs_type_name(0x1234), "a filesystem of type 0x1234");
    }

    #[test]
    fn a_filesystem_without_reflink_is_refused_and_leaves_nothing() {
        // The test directory is on whatever /tmp is; where that can reflink (btrfs, xfs) the
        // copy is checked instead.
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("m.raw");
        std::fs::write(&from, vec![7u8; 65536]).unwrap();
        let to = dir.path().join("c.raw");
        match reflink_file(&from, &to) {
            Err(ReflinkError::Unsupported { fs, .. }) => {
                assert!(!fs.is_empty());
                assert!(!to.exists());
            }
            Ok(()) => assert_eq!(std::fs::read(&to).unwrap(), std::fs::read(&from).unwrap()),
            Err(e) => panic!("{e}"),
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().contains("vcc-reflink")), "{left:?}");
    }
}
