//! Staging and atomic publication into a pool directory: nothing partial is ever visible in a pool.
//!
//! A libvirt dir pool lists every file of its directory, dot-files included, so a file being
//! written there (a download, a compressed copy, a standalone copy of an overlay) would show up as
//! a volume on the next pool refresh. Such files are written in a root-owned 0700 staging
//! directory on the pool's filesystem but outside the pool directory ([`staging_dir`]). Only a
//! finished, checked file is fsynced and renamed into the pool with
//! `renameat2(RENAME_NOREPLACE)` ([`publish`], [`place`]), or swapped with the file it replaces
//! with `renameat2(RENAME_EXCHANGE)` ([`exchange`]); then the pool directory is fsynced.
//! pool-helper (fetched masters), `virt-clone-cow publish --compress` and `virt-clone-cow flatten`
//! use it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("{what} '{path}'")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("staging directory '{0}' is not a directory owned by us with mode 0700 (refusing to use it)")]
    Unsafe(String),
    #[error("not enough space for '{path}': {need} bytes needed, {free} free (disk full)")]
    NoSpace { path: String, need: u64, free: u64 },
    #[error("'{0}' already exists in the pool (a master is never replaced)")]
    Exists(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StagingError {
    let path = path.display().to_string();
    move |source| StagingError::Io { what, path, source }
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// pool-helper's staging directory beside a pool directory not on its state dir's filesystem.
pub const POOL_HELPER_FALLBACK: &str = ".pool-helper-staging";

/// virt-clone-cow's state directory: its staging directories are under it (`staging/<pool>`).
pub const VCC_STATE_DIR: &str = "/var/lib/virt-clone-cow";

/// virt-clone-cow's staging directory beside a pool directory not on [`VCC_STATE_DIR`]'s
/// filesystem.
pub const VCC_FALLBACK: &str = ".virt-clone-cow-staging";

/// virt-clone-cow's staging directory for files that end up in `pool_dir` (`key`: the pool's
/// name, or any fixed word for a directory that is no pool). Without [`VCC_STATE_DIR`] (a user
/// who may not create it), beside the pool directory.
pub fn vcc_staging_dir(pool_dir: &Path, key: &str) -> Result<PathBuf, StagingError> {
    let state = Path::new(VCC_STATE_DIR);
    staging_dir_in(pool_dir, std::fs::create_dir_all(state).is_ok().then_some(state), VCC_FALLBACK, key)
}

/// The staging directory for `pool`: `<state_dir>/staging/<pool>/` when the state dir is on the
/// pool's filesystem, else `<pool-dir>/../<fallback>/<pool>/`, else (the pool directory is a
/// mount point) `<pool-dir>/<fallback>/<pool>/`. Created 0700; refused if it is a symlink, not
/// ours, or not 0700.
pub fn staging_dir(pool_dir: &Path, state_dir: &Path, fallback: &str, pool: &str) -> Result<PathBuf, StagingError> {
    std::fs::create_dir_all(state_dir).map_err(io("cannot create state directory", state_dir))?;
    staging_dir_in(pool_dir, Some(state_dir), fallback, pool)
}

/// [`staging_dir`] with the state directory left out when there is none (`None`: a user who
/// cannot create it, running against `qemu:///session`, stages beside the pool directory).
fn staging_dir_in(
    pool_dir: &Path,
    state_dir: Option<&Path>,
    fallback: &str,
    pool: &str,
) -> Result<PathBuf, StagingError> {
    let pool_dev = std::fs::metadata(pool_dir).map_err(io("cannot stat pool directory", pool_dir))?.dev();
    let state_dev = match state_dir {
        Some(s) => Some(std::fs::metadata(s).map_err(io("cannot stat state directory", s))?.dev()),
        None => None,
    };
    let parent = pool_dir.parent().unwrap_or(pool_dir);
    let base = if let (Some(state_dir), true) = (state_dir, state_dev == Some(pool_dev)) {
        state_dir.join("staging")
    } else if std::fs::metadata(parent).is_ok_and(|m| m.dev() == pool_dev) {
        parent.join(fallback)
    } else {
        // The pool directory is the root of its filesystem: no place outside it on that
        // filesystem. A directory in it (a dir pool may list it, as a directory, never as a
        // partial image).
        pool_dir.join(fallback)
    };
    let dir = base.join(pool);
    for d in [&base, &dir] {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("cannot create staging directory", d)(e)),
        }
        let m = std::fs::symlink_metadata(d).map_err(io("cannot stat staging directory", d))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !m.file_type().is_dir() || m.uid() != me || m.mode() & 0o777 != 0o700 {
            return Err(StagingError::Unsafe(d.display().to_string()));
        }
    }
    Ok(dir)
}

/// Free bytes on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = cstr(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated string and `st` points to writable memory for one statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Creates (or reopens, to resume) the staging file `<dir>/<name>.part` and allocates `size`
/// bytes so a full disk shows up now, not halfway through. Symlinks are not followed.
pub fn prepare_file(dir: &Path, name: &str, size: u64) -> Result<PathBuf, StagingError> {
    let path = dir.join(format!("{name}.part"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io("cannot open staging file", &path))?;
    let m = f.metadata().map_err(io("cannot stat staging file", &path))?;
    if !m.file_type().is_file() || m.nlink() != 1 {
        return Err(StagingError::Unsafe(path.display().to_string()));
    }
    let allocated = m.blocks() * 512;
    let need = size.saturating_sub(allocated);
    let free = free_bytes(dir).map_err(io("cannot stat filesystem of", dir))?;
    if need > free {
        drop(f);
        let _ = std::fs::remove_file(&path);
        return Err(StagingError::NoSpace { path: path.display().to_string(), need, free });
    }
    // A new file stays empty: librqbit's initial check then skips it at once instead of hashing
    // a file of zeros; the storage allocates it (`allocate`) when librqbit sets its length. A file
    // left by an interrupted fetch keeps its data: every piece in it is re-hashed.
    if m.len() > size {
        f.set_len(size).map_err(io("cannot truncate staging file", &path))?;
    }
    Ok(path)
}

/// Sets the length of `f` to `size` and allocates its blocks, so a full disk fails here (ENOSPC)
/// rather than halfway through a download.
pub fn allocate(f: &File, size: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    f.set_len(size)?;
    // SAFETY: the fd is open for writing for the duration of the call; offsets are in range.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// fsyncs `staged`, makes it read-only (0444) and renames it to `<pool_dir>/<name>` without
/// replacing anything, then fsyncs the pool directory. Returns the final path. Where SELinux is
/// enabled the master gets the pool's label, not the staging directory's ([`crate::selinux`]).
pub fn publish(staged: &Path, pool_dir: &Path, name: &str) -> Result<PathBuf, StagingError> {
    let f = File::open(staged).map_err(io("cannot open staged file", staged))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o444)).map_err(io("cannot make read-only", staged))?;
    f.sync_all().map_err(io("cannot fsync", staged))?;
    drop(f);
    place(staged, pool_dir, name)
}

/// Renames the finished (fsynced) `staged` to `<pool_dir>/<name>` without replacing anything,
/// with the pool's SELinux label where SELinux is enabled, then fsyncs the pool directory.
pub fn place(staged: &Path, pool_dir: &Path, name: &str) -> Result<PathBuf, StagingError> {
    let dest = pool_dir.join(name);
    let relabel = crate::selinux::Relabel::for_this_host();
    crate::selinux::before_rename(&relabel, staged, pool_dir);
    rename_noreplace(staged, &dest).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            StagingError::Exists(dest.display().to_string())
        } else {
            io("cannot rename into the pool", &dest)(e)
        }
    })?;
    crate::selinux::after_rename(&relabel, &dest);
    File::open(pool_dir).and_then(|d| d.sync_all()).map_err(io("cannot fsync pool directory", pool_dir))?;
    Ok(dest)
}

/// `renameat2(from, to, RENAME_NOREPLACE)`.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let (a, b) = (cstr(from)?, cstr(to)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD makes them relative to the cwd.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Swaps `staged` and `dest` in one step (`renameat2(RENAME_EXCHANGE)`): `dest` is then the staged
/// file and `staged` names the old `dest`, so calling it again undoes it. On a filesystem without
/// the exchange (EINVAL), a hard link keeps the old file while the new one is renamed over it:
/// `dest` is always a whole file, the old or the new. The directories are fsynced.
pub fn exchange(staged: &Path, dest: &Path) -> std::io::Result<()> {
    let (a, b) = (cstr(staged)?, cstr(dest)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD makes them relative to the cwd.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)) {
            return Err(e);
        }
        let mut old = staged.as_os_str().to_owned();
        old.push(".old");
        let old = PathBuf::from(old);
        std::fs::hard_link(dest, &old)?;
        if let Err(e) = std::fs::rename(staged, dest) {
            let _ = std::fs::remove_file(&old);
            return Err(e);
        }
        std::fs::rename(&old, staged)?;
    }
    for d in [staged.parent(), dest.parent()].into_iter().flatten() {
        File::open(d).and_then(|d| d.sync_all())?;
    }
    Ok(())
}

/// A file in a staging directory, removed when dropped unless it was placed.
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
}

impl Staged {
    /// Creates the new, empty file `<dir>/<name>` (0600; never an existing file or a symlink).
    pub fn create(dir: &Path, name: &str) -> Result<Staged, StagingError> {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("cannot create staging file", &path))?;
        Ok(Staged { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// No longer removed when dropped; returns its path.
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.path)
    }

    /// fsyncs the file and [`place`]s it as `<pool_dir>/<name>`; it is no longer removed.
    pub fn place(self, pool_dir: &Path, name: &str) -> Result<PathBuf, StagingError> {
        File::open(&self.path).and_then(|f| f.sync_all()).map_err(io("cannot fsync", &self.path))?;
        let dest = place(&self.path, pool_dir, name)?;
        self.keep();
        Ok(dest)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes a published master read-only (0444). A master virt-clone-cow made immutable while
/// clones depend on it (`vcc_core::protect`) cannot be chmodded, and needs not be: nothing can
/// write it.
pub fn make_read_only(path: &Path) -> Result<(), StagingError> {
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)) {
        Err(e)
            if e.raw_os_error() == Some(libc::EPERM)
                && crate::protect::is_immutable(path).ok().flatten() == Some(true) =>
        {
            Ok(())
        }
        r => r.map_err(io("cannot make read-only", path)),
    }
}

/// Writes a small file atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StagingError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("cannot create directory", dir))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    {
        use std::io::Write;
        let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        f.write_all(data).and_then(|_| f.sync_all()).map_err(io("cannot write", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("cannot rename", path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn publish_never_replaces_and_leaves_a_read_only_file() {
        let d = tempfile::tempdir().unwrap();
        let pool = d.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let st = staging_dir(&pool, &d.path().join("state"), POOL_HELPER_FALLBACK, "p").unwrap();
        assert_eq!(std::fs::metadata(&st).unwrap().mode() & 0o777, 0o700);
        let f = prepare_file(&st, "m.raw", 4096).unwrap();
        allocate(&std::fs::OpenOptions::new().write(true).open(&f).unwrap(), 4096).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 4096);
        let dest = publish(&f, &pool, "m.raw").unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o777, 0o444);
        let g = prepare_file(&st, "m.raw", 10).unwrap();
        assert!(matches!(publish(&g, &pool, "m.raw"), Err(StagingError::Exists(_))));
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 4096);
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let pool = d.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let st = staging_dir(&pool, &d.path().join("state"), POOL_HELPER_FALLBACK, "p").unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, st.join("m.raw.part")).unwrap();
        assert!(prepare_file(&st, "m.raw", 4096).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn a_loose_staging_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let pool = d.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(state.join("staging/p")).unwrap();
        std::fs::set_permissions(state.join("staging/p"), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(staging_dir(&pool, &state, POOL_HELPER_FALLBACK, "p"), Err(StagingError::Unsafe(_))));
    }

    #[test]
    fn too_big_a_file_is_a_disk_full_error() {
        let d = tempfile::tempdir().unwrap();
        let e = prepare_file(d.path(), "m.raw", 1 << 60).unwrap_err();
        assert!(matches!(e, StagingError::NoSpace { .. }), "{e}");
        assert!(!d.path().join("m.raw.part").exists());
    }

    #[test]
    fn a_staged_file_is_placed_without_replacing_and_removed_when_not_placed() {
        let d = tempfile::tempdir().unwrap();
        let pool = d.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let st = staging_dir(&pool, &d.path().join("state"), VCC_FALLBACK, "p").unwrap();
        let s = Staged::create(&st, "a.tmp").unwrap();
        assert!(Staged::create(&st, "a.tmp").is_err(), "never an existing file");
        std::fs::write(s.path(), b"new").unwrap();
        let dest = s.place(&pool, "a.qcow2").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&st).unwrap().count(), 0, "staging empty after placing");
        let s = Staged::create(&st, "b.tmp").unwrap();
        std::fs::write(s.path(), b"other").unwrap();
        assert!(matches!(s.place(&pool, "a.qcow2"), Err(StagingError::Exists(_))));
        assert_eq!(std::fs::read(&dest).unwrap(), b"new", "the existing file kept");
        assert_eq!(std::fs::read_dir(&st).unwrap().count(), 0, "a failed placing leaves nothing staged");
        drop(Staged::create(&st, "c.tmp").unwrap());
        assert_eq!(std::fs::read_dir(&st).unwrap().count(), 0, "dropped: removed");
    }

    #[test]
    fn exchange_swaps_and_swaps_back() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("staged"), d.path().join("dest"));
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        exchange(&a, &b).unwrap();
        assert_eq!((std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()), (b"old".to_vec(), b"new".to_vec()));
        exchange(&a, &b).unwrap();
        assert_eq!((std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap()), (b"new".to_vec(), b"old".to_vec()));
        std::fs::remove_file(&b).unwrap();
        assert!(exchange(&a, &b).is_err(), "nothing to exchange with");
        assert_eq!(std::fs::read(&a).unwrap(), b"new");
    }

    #[test]
    fn without_a_state_dir_the_staging_dir_is_beside_the_pool() {
        let d = tempfile::tempdir().unwrap();
        let pool = d.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let st = staging_dir_in(&pool, None, VCC_FALLBACK, "p").unwrap();
        assert_eq!(st, d.path().join(VCC_FALLBACK).join("p"));
        assert_eq!(std::fs::metadata(&st).unwrap().mode() & 0o777, 0o700);
        let with_state = staging_dir(&pool, &d.path().join("state"), VCC_FALLBACK, "p").unwrap();
        assert_eq!(with_state, d.path().join("state/staging/p"), "the state dir, on the pool's filesystem");
    }
}
