//! Protecting a master while anything depends on it: the immutable attribute (`chattr +i`,
//! `FS_IMMUTABLE_FL`) makes `unlink`, `rename`, `truncate`, writes, `chmod` and `chown` of the
//! file fail for everyone, root included, so neither `virsh vol-delete` nor
//! `virsh undefine --remove-all-storage` nor a careless `rm` can take a master from under its
//! clones. It can still be opened read-only, which is all QEMU does with a backing file.
//!
//! ext4, xfs and btrfs have the attribute; on a filesystem without it (tmpfs, NFS...) the caller
//! keeps only the write bits cleared (`chmod a-w`) and says so. Setting and clearing it takes
//! `CAP_LINUX_IMMUTABLE` (root has it; pool-helper's systemd unit does not).
//!
//! A master we protected also carries the extended attribute [`MARK_XATTR`] (set before the flag,
//! since an immutable file's attributes cannot change): it is how `virt-clone-cow gc` finds
//! masters that nothing uses any more, and its value says whether the flag is ours to clear.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `FS_IMMUTABLE_FL` of `<linux/fs.h>` (libc does not export it).
pub const FS_IMMUTABLE_FL: libc::c_int = 0x0000_0010;

/// The extended attribute marking a file virt-clone-cow made a master (see the module docs).
pub const MARK_XATTR: &str = "user.virt-clone-cow.master";
/// [`MARK_XATTR`]'s value while we hold the immutable flag on the file.
pub const MARK_HELD: &str = "held";
/// [`MARK_XATTR`]'s value once released (or when the filesystem has no immutable flag).
pub const MARK_RELEASED: &str = "released";

/// How a master is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// The immutable attribute is set: nothing can delete or change it.
    Immutable,
    /// Only the write bits are cleared: root (and libvirt) can still delete it.
    ReadOnlyMode,
    /// Writable.
    None,
}

impl Protection {
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Immutable => "immutable",
            Protection::ReadOnlyMode => "read-only mode",
            Protection::None => "none",
        }
    }
}

/// A protection change that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} '{path}'")]
pub struct ProtectError {
    pub what: &'static str,
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProtectError {
    let path = path.display().to_string();
    move |source| ProtectError { what, path, source }
}

/// Opens a regular file read-only (no symlink followed, no blocking on a FIFO).
fn open(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(f)
}

#[allow(unsafe_code)]
fn get_flags(f: &std::fs::File) -> std::io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel's size, whatever the macro says) to the
    // pointer, which points to a live c_int.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags)
}

#[allow(unsafe_code)]
fn set_flags(f: &std::fs::File, flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer, which points to a live c_int.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags as *const libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether an ioctl's error says the filesystem does not support it (inode flags on tmpfs before
/// Linux 6.0 or NFS; FICLONE on ext4): the errno values such filesystems answer with.
pub fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// Whether the immutable attribute is set; None when the filesystem has no such attribute.
pub fn is_immutable(path: &Path) -> Result<Option<bool>, ProtectError> {
    let f = open(path).map_err(err("cannot open", path))?;
    match get_flags(&f) {
        Ok(fl) => Ok(Some(fl & FS_IMMUTABLE_FL != 0)),
        Err(e) if unsupported(&e) => Ok(None),
        Err(e) => Err(err("cannot read the attributes of", path)(e)),
    }
}

/// How `path` is protected now.
pub fn protection(path: &Path) -> Result<Protection, ProtectError> {
    use std::os::unix::fs::PermissionsExt;
    if is_immutable(path)? == Some(true) {
        return Ok(Protection::Immutable);
    }
    let mode = std::fs::metadata(path).map_err(err("cannot read", path))?.permissions().mode();
    Ok(if mode & 0o222 == 0 { Protection::ReadOnlyMode } else { Protection::None })
}

/// Sets (`on`) or clears the immutable attribute. Ok(false): the filesystem has no such
/// attribute (nothing changed). Needs `CAP_LINUX_IMMUTABLE`.
pub fn set_immutable(path: &Path, on: bool) -> Result<bool, ProtectError> {
    let f = open(path).map_err(err("cannot open", path))?;
    let flags = match get_flags(&f) {
        Ok(fl) => fl,
        Err(e) if unsupported(&e) => return Ok(false),
        Err(e) => return Err(err("cannot read the attributes of", path)(e)),
    };
    let want = if on { flags | FS_IMMUTABLE_FL } else { flags & !FS_IMMUTABLE_FL };
    if want == flags {
        return Ok(true);
    }
    match set_flags(&f, want) {
        Ok(()) => Ok(true),
        Err(e) if unsupported(&e) => Ok(false),
        Err(e) => {
            Err(err(if on { "cannot make immutable" } else { "cannot clear the immutable attribute of" }, path)(e))
        }
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// [`MARK_XATTR`] of `path`: None when absent or unreadable (no user xattrs on this filesystem).
#[allow(unsafe_code)]
pub fn mark(path: &Path) -> Option<String> {
    let p = c_path(path).ok()?;
    let name = CString::new(MARK_XATTR).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated; the buffer is live and its length is given.
    let n = unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return None;
    }
    let n = usize::try_from(n).ok()?.min(buf.len());
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Sets [`MARK_XATTR`] to `value`. Ok(false): the filesystem has no user xattrs.
#[allow(unsafe_code)]
pub fn set_mark(path: &Path, value: &str) -> Result<bool, ProtectError> {
    let p = c_path(path).map_err(err("cannot mark", path))?;
    let name =
        CString::new(MARK_XATTR).map_err(|_| err("cannot mark", path)(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: both strings are NUL-terminated; the value slice is live and its length is given.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP)) {
            return Ok(false);
        }
        return Err(err("cannot mark", path)(e));
    }
    Ok(true)
}

/// What [`hold`] did to a master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The result: [`Protection::Immutable`], or [`Protection::ReadOnlyMode`] on a filesystem
    /// without the attribute.
    pub protection: Protection,
    /// Whether this call set the flag (false: it was set already, or cannot be).
    pub newly: bool,
}

/// Protects a master that has a dependant: marks it and sets the immutable attribute (a file
/// already immutable is left as it is, and marked only when we can).
pub fn hold(path: &Path) -> Result<Held, ProtectError> {
    if is_immutable(path)? == Some(true) {
        return Ok(Held { protection: Protection::Immutable, newly: false });
    }
    set_mark(path, MARK_HELD)?;
    if set_immutable(path, true)? {
        Ok(Held { protection: Protection::Immutable, newly: true })
    } else {
        set_mark(path, MARK_RELEASED)?;
        Ok(Held { protection: Protection::ReadOnlyMode, newly: false })
    }
}

/// Releases a master nothing depends on any more: clears the immutable attribute if we set it
/// (marked [`MARK_HELD`]); a flag an administrator set stays. Returns whether it was cleared.
pub fn release(path: &Path) -> Result<bool, ProtectError> {
    if mark(path).as_deref() != Some(MARK_HELD) || is_immutable(path)? != Some(true) {
        return Ok(false);
    }
    set_immutable(path, false)?;
    set_mark(path, MARK_RELEASED)?;
    Ok(true)
}

/// Clears the immutable attribute whoever set it (before deleting the file: `gc --yes`).
pub fn clear(path: &Path) -> Result<(), ProtectError> {
    if is_immutable(path)? == Some(true) {
        set_immutable(path, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        let uid = unsafe { libc::geteuid() };
        uid == 0
    }

    #[test]
    fn a_file_that_is_not_regular_is_refused_and_a_missing_one_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(is_immutable(d.path()).unwrap_err().to_string().starts_with("cannot open"));
        assert!(hold(&d.path().join("missing")).is_err());
        assert_eq!(mark(&d.path().join("missing")), None);
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: needs root (CAP_LINUX_IMMUTABLE)")]
    fn hold_makes_a_file_undeletable_and_release_undoes_only_our_flag() {
        assert!(root(), "run as root");
        // /var/tmp: a disk filesystem (ext4/xfs/btrfs on the machines we test on), not tmpfs.
        let d = tempfile::Builder::new().prefix("vcc-protect-").tempdir_in("/var/tmp").unwrap();
        let f = d.path().join("m.raw");
        std::fs::write(&f, b"master").unwrap();
        let h = hold(&f).unwrap();
        assert_eq!(h, Held { protection: Protection::Immutable, newly: true });
        assert_eq!(protection(&f).unwrap(), Protection::Immutable);
        assert_eq!(mark(&f).as_deref(), Some(MARK_HELD));
        let e = std::fs::remove_file(&f).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        assert!(std::fs::OpenOptions::new().write(true).open(&f).is_err(), "an immutable file opened for writing");
        assert_eq!(std::fs::read(&f).unwrap(), b"master", "read-only opens still work");
        // Held again: nothing new.
        assert!(!hold(&f).unwrap().newly);
        assert!(release(&f).unwrap());
        assert_eq!(mark(&f).as_deref(), Some(MARK_RELEASED));
        assert_eq!(protection(&f).unwrap(), Protection::None);
        // A flag we did not set (no mark "held") is not ours to clear.
        set_immutable(&f, true).unwrap();
        assert!(!release(&f).unwrap());
        assert_eq!(is_immutable(&f).unwrap(), Some(true));
        clear(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
    }
}
