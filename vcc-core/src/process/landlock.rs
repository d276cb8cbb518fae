//! Linux Landlock: confining a child so it can read only what we name.
//!
//! The ruleset is built in the parent, before the fork (opening the rule paths and adding the
//! rules allocates and may fail with a message); the child only calls
//! `prctl(PR_SET_NO_NEW_PRIVS)` and `landlock_restrict_self` on the ruleset's descriptor, both
//! async-signal-safe system calls. The ruleset descriptor is close-on-exec, so neither the
//! confined program nor a child another thread forks meanwhile keeps it.
//!
//! The ruleset handles the filesystem rights of Landlock ABI 1 (and `TRUNCATE` from ABI 3), with
//! the ABI-1 attribute struct, so it works on every kernel that has Landlock (5.13 and later).

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const ACCESS_FS_EXECUTE: u64 = 1 << 0;
const ACCESS_FS_WRITE_FILE: u64 = 1 << 1;
const ACCESS_FS_READ_FILE: u64 = 1 << 2;
const ACCESS_FS_READ_DIR: u64 = 1 << 3;
/// EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR,
/// MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM: every right of ABI 1.
const ACCESS_FS_ABI1: u64 = 0x1fff;
/// `LANDLOCK_ACCESS_FS_TRUNCATE`, ABI 3.
const ACCESS_FS_TRUNCATE: u64 = 1 << 14;
const CREATE_RULESET_VERSION: libc::c_uint = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

/// `struct landlock_ruleset_attr` as of ABI 1 (later ABIs append fields; the kernel takes the
/// size we pass).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's UAPI header).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Why a child could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "this kernel has no Landlock (it needs Linux 5.13 or later with landlock among the enabled LSMs, \
         see /sys/kernel/security/lsm)"
    )]
    Unsupported,
    #[error("could not create a Landlock ruleset")]
    Ruleset(#[source] io::Error),
    #[error("could not open '{path}' for a Landlock rule")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("could not add the Landlock rule for '{path}'")]
    Rule {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The Landlock ABI version this kernel offers; [`ConfineError::Unsupported`] when it has none
/// (the system call is missing, `ENOSYS`, or Landlock is not enabled at boot, `EOPNOTSUPP`).
pub fn abi_version() -> Result<u32, ConfineError> {
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION the kernel reads neither the (null) attribute
    // pointer nor its size; it returns the ABI version or -1 with errno set.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EOPNOTSUPP) => ConfineError::Unsupported,
            _ => ConfineError::Ruleset(e),
        });
    }
    Ok(u32::try_from(v).unwrap_or(0))
}

/// A ruleset under which a program can read, list and execute what is under /usr (programs,
/// the dynamic loader and libraries on a merged-/usr system, QEMU's block modules), read
/// `/etc/ld.so.cache`, read and write `/dev/null`, and read the one file `file`; nothing else
/// can be read, written, created or removed anywhere. Close-on-exec.
pub fn ruleset_reading_only(file: &Path) -> Result<OwnedFd, ConfineError> {
    let mut handled = ACCESS_FS_ABI1;
    if abi_version()? >= 3 {
        handled |= ACCESS_FS_TRUNCATE;
    }
    let attr = RulesetAttr { handled_access_fs: handled };
    // SAFETY: the kernel reads `size_of::<RulesetAttr>()` bytes from `attr`, which lives across
    // the call; it returns a new descriptor (close-on-exec) or -1 with errno set.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(ConfineError::Ruleset(io::Error::last_os_error()));
    }
    let fd = RawFd::try_from(fd).map_err(|_| ConfineError::Ruleset(io::Error::from(io::ErrorKind::InvalidData)))?;
    // SAFETY: `fd` is a descriptor the kernel just returned to us and nothing else owns.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd) };
    add_rule(&ruleset, Path::new("/usr"), ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR | ACCESS_FS_EXECUTE)?;
    // On a system without merged /usr, the loader and libraries live in real /lib* directories
    // (on Debian 12 these are symlinks into /usr, which the rule above covers).
    for dir in ["/lib", "/lib64", "/lib32", "/libx32"] {
        let d = Path::new(dir);
        if d.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            add_rule(&ruleset, d, ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR | ACCESS_FS_EXECUTE)?;
        }
    }
    // The loader's cache; /dev/null, which QEMU opens read-write to probe for OFD locks.
    for (extra, access) in
        [("/etc/ld.so.cache", ACCESS_FS_READ_FILE), ("/dev/null", ACCESS_FS_READ_FILE | ACCESS_FS_WRITE_FILE)]
    {
        let extra = Path::new(extra);
        if extra.exists() {
            add_rule(&ruleset, extra, access)?;
        }
    }
    add_rule(&ruleset, file, ACCESS_FS_READ_FILE)?;
    Ok(ruleset)
}

/// Allows `access` beneath `path` (the file itself when it is not a directory).
fn add_rule(ruleset: &OwnedFd, path: &Path, access: u64) -> Result<(), ConfineError> {
    let shown = || path.display().to_string();
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| ConfineError::Open { path: shown(), source: io::Error::new(io::ErrorKind::InvalidInput, e) })?;
    // SAFETY: `c` is a NUL-terminated string that lives across the call; open returns a new
    // descriptor or -1 with errno set.
    let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(ConfineError::Open { path: shown(), source: io::Error::last_os_error() });
    }
    // SAFETY: `raw` is a descriptor open just returned to us and nothing else owns.
    let target = unsafe { OwnedFd::from_raw_fd(raw) };
    let rule = PathBeneathAttr { allowed_access: access, parent_fd: target.as_raw_fd() };
    // SAFETY: the kernel reads the `PathBeneathAttr` at the pointer, which lives across the call;
    // both descriptors are open for the whole call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &rule as *const PathBeneathAttr,
            0 as libc::c_uint,
        )
    };
    if r != 0 {
        return Err(ConfineError::Rule { path: shown(), source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Confines the calling process (and what it executes) to `ruleset`: sets no_new_privs, then
/// `landlock_restrict_self`. Async-signal-safe: two system calls, no allocation, no locks; meant
/// for the child between fork and exec.
pub fn restrict_self(ruleset: RawFd) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers; a plain system call.
    if unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: landlock_restrict_self takes a descriptor number and flags, no pointers; a plain
    // system call.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0 as libc::c_uint) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
