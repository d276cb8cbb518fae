//! SELinux labels of fetched masters.
//!
//! A master is written in a staging directory (`var_lib_t` or `virt_var_lib_t` on an SELinux
//! host) and renamed into the pool, and a rename keeps the inode's label, so without this the
//! master would sit in the pool with the staging directory's type instead of the pool's
//! (`virt_image_t`), see docs/security-modules.md. Where SELinux is enabled:
//!
//! 1. before the rename, the staged file gets the pool directory's `security.selinux` label
//!    (`setxattr`), so the master is never visible in the pool with the staging label;
//! 2. after the rename, when `restorecon` (policycoreutils) is installed, it sets the exact
//!    default context of the final path (`restorecon -F PATH`, argv, bounded), which is the pool
//!    directory's label in the usual policies (`/var/lib/libvirt/images(/.*)?`, and pools given a
//!    type with `semanage fcontext -a -t virt_image_t '/srv/pool(/.*)?'`).
//!
//! Neither step is fatal: a master whose label could not be set is still the verified master,
//! and libvirt relabels backing files to `virt_content_t` when a clone starts; a line says what
//! failed. Where SELinux is not enabled (no selinuxfs with an `enforce` file), nothing is done.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The extended attribute that holds a file's SELinux context.
pub const XATTR: &str = "security.selinux";

/// Where the kernel mounts selinuxfs when SELinux is enabled.
pub const SELINUXFS: &str = "/sys/fs/selinux";

/// Places `restorecon` is installed (policycoreutils: /sbin, usr-merged /usr/sbin).
pub const RESTORECON: &[&str] = &["/usr/sbin/restorecon", "/sbin/restorecon"];

/// How long `restorecon` of one file may take.
const RESTORECON_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest label read (a context is a short string; libselinux uses 255 bytes for most).
const MAX_LABEL: usize = 4096;

/// What to do for a master renamed into a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relabel {
    /// Copy the pool directory's label to the staged file before the rename.
    pub copy_dir_label: bool,
    /// Run this `restorecon` on the final path after the rename.
    pub restorecon: Option<PathBuf>,
}

impl Relabel {
    /// Nothing to do.
    pub const NONE: Relabel = Relabel { copy_dir_label: false, restorecon: None };

    /// The decision for a host whose selinuxfs would be mounted at `selinuxfs` and whose
    /// `restorecon` candidates are `restorecon`: everything only when SELinux is enabled (selinuxfs
    /// mounted: its `enforce` file is there, in enforcing and permissive mode alike).
    pub fn decide(selinuxfs: &Path, restorecon: &[&str]) -> Relabel {
        if !selinuxfs.join("enforce").is_file() {
            return Relabel::NONE;
        }
        let restorecon = restorecon.iter().map(PathBuf::from).find(|p| p.is_file());
        Relabel { copy_dir_label: true, restorecon }
    }

    /// This host's decision.
    pub fn for_this_host() -> Relabel {
        Relabel::decide(Path::new(SELINUXFS), RESTORECON)
    }
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// The value of extended attribute `name` of `path` (not following a final symlink); None when it
/// has none.
pub fn get_xattr(path: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
    let (p, n) = (cstr(path)?, CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?);
    let mut buf = vec![0u8; MAX_LABEL];
    // SAFETY: valid NUL-terminated strings; the buffer is MAX_LABEL bytes long, as passed.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}

/// Sets extended attribute `name` of `path` (not following a final symlink) to `value`.
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let (p, n) = (cstr(path)?, CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?);
    // SAFETY: valid NUL-terminated strings; value's pointer and length describe one slice.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Copies attribute `name` of directory `dir` to `file`. Ok(false) when `dir` has none.
pub fn copy_xattr(dir: &Path, file: &Path, name: &str) -> std::io::Result<bool> {
    match get_xattr(dir, name)? {
        Some(v) => set_xattr(file, name, &v).map(|()| true),
        None => Ok(false),
    }
}

/// Step 1, before the rename: `staged` gets `pool_dir`'s label. Never fails; says what it could
/// not do. Returns whether the label was given.
pub fn before_rename(r: &Relabel, staged: &Path, pool_dir: &Path) -> bool {
    if !r.copy_dir_label {
        return false;
    }
    match copy_xattr(pool_dir, staged, XATTR) {
        Ok(true) => {
            tracing::debug!("{}: labelled as {}", staged.display(), pool_dir.display());
            true
        }
        Ok(false) => {
            tracing::warn!("{} has no SELinux label to give the master", pool_dir.display());
            false
        }
        Err(e) => {
            tracing::warn!(
                "cannot give {} the SELinux label of {}: {e}; libvirt relabels it when a clone starts",
                staged.display(),
                pool_dir.display()
            );
            false
        }
    }
}

/// Step 2, after the rename: `restorecon -F dest`, when installed. Never fails; says what did.
/// Returns whether it ran and succeeded.
pub fn after_rename(r: &Relabel, dest: &Path) -> bool {
    let Some(rc) = &r.restorecon else { return false };
    let args = [std::ffi::OsStr::new("-F"), dest.as_os_str()];
    match crate::process::run_with_timeout(&rc.to_string_lossy(), &args, RESTORECON_TIMEOUT) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("{}", crate::error::one_line(&e));
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_done_without_selinux_and_everything_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let fs = dir.path().join("selinux");
        let rc = dir.path().join("restorecon");
        let rc_s = rc.to_str().unwrap();
        // No selinuxfs at all, or one without `enforce` (not mounted): disabled.
        assert_eq!(Relabel::decide(&fs, &[rc_s]), Relabel::NONE);
        std::fs::create_dir(&fs).unwrap();
        std::fs::write(&rc, b"").unwrap();
        assert_eq!(Relabel::decide(&fs, &[rc_s]), Relabel::NONE, "an empty mount point is not SELinux");
        // Enabled (enforcing or permissive: the file is there either way).
        std::fs::write(fs.join("enforce"), b"0").unwrap();
        assert_eq!(Relabel::decide(&fs, &[rc_s]), Relabel { copy_dir_label: true, restorecon: Some(rc.clone()) });
        // restorecon only where it is installed; the first candidate that is.
        let missing = dir.path().join("nope");
        assert_eq!(
            Relabel::decide(&fs, &[missing.to_str().unwrap(), rc_s]).restorecon,
            Some(rc.clone()),
            "the second candidate"
        );
        assert_eq!(
            Relabel::decide(&fs, &[missing.to_str().unwrap()]),
            Relabel { copy_dir_label: true, restorecon: None }
        );
    }

    #[test]
    fn a_directory_attribute_is_copied_to_a_file_and_a_missing_one_is_not_an_error() {
        // The same calls as for security.selinux, on an attribute any filesystem here keeps.
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let staged = dir.path().join("m.raw");
        std::fs::write(&staged, b"m").unwrap();
        let name = "user.vcc-test-label";
        assert!(!copy_xattr(&pool, &staged, name).unwrap(), "nothing to copy");
        assert_eq!(get_xattr(&staged, name).unwrap(), None);
        set_xattr(&pool, name, b"system_u:object_r:virt_image_t:s0").unwrap();
        assert!(copy_xattr(&pool, &staged, name).unwrap());
        assert_eq!(get_xattr(&staged, name).unwrap().as_deref(), Some(&b"system_u:object_r:virt_image_t:s0"[..]));
        assert!(get_xattr(&dir.path().join("gone"), name).is_err(), "a missing file is an error");
    }

    #[test]
    fn the_steps_do_nothing_when_disabled_and_never_fail() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.raw");
        std::fs::write(&f, b"m").unwrap();
        assert!(!before_rename(&Relabel::NONE, &f, dir.path()), "disabled: no label given");
        assert!(!after_rename(&Relabel::NONE, &f), "disabled: no restorecon run");
        // Enabled, but the label cannot be read or the tool fails (sh refuses `-F`): a warning,
        // no panic, nothing done.
        let on = Relabel { copy_dir_label: true, restorecon: Some(PathBuf::from("/bin/sh")) };
        assert!(!before_rename(&on, &f, &dir.path().join("gone")));
        assert!(!after_rename(&on, &f));
        // A restorecon that succeeds (true(1) stands in for it) is run.
        let ok = Relabel { copy_dir_label: false, restorecon: Some(PathBuf::from("/bin/true")) };
        assert!(after_rename(&ok, &f));
        assert_eq!(std::fs::read(&f).unwrap(), b"m");
    }
}
