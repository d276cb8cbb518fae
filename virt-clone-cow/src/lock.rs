//! One clone run per original at a time on this machine: two runs on the same original would each
//! record the other's half-done state as "before" and undo each other's template protection.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the lock files live.
pub const LOCK_DIR: &str = "/run/lock/virt-clone-cow";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another virt-clone-cow run is cloning '{0}' and did not finish within {1} s; try again when it has")]
    Busy(String, u64),
    #[error("cannot use the lock file '{path}'")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Held while a run plans and applies; released on drop (and by the kernel if the process dies).
#[derive(Debug)]
pub struct OriginalLock {
    _file: File,
}

impl OriginalLock {
    /// Waits at most `wait` for the lock of `original` (keyed by connection URI and name).
    pub fn acquire(uri: &str, original: &str, wait: Duration) -> Result<Self, LockError> {
        Self::acquire_in(Path::new(LOCK_DIR), uri, original, wait)
    }

    /// [`OriginalLock::acquire`] with the lock files in `dir` (tests use a temporary one).
    fn acquire_in(dir: &Path, uri: &str, original: &str, wait: Duration) -> Result<Self, LockError> {
        let dir = dir.to_path_buf();
        let io = |path: &PathBuf| {
            let path = path.display().to_string();
            move |source| LockError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        // Hex of the key: any domain name makes a safe file name.
        let key: String = format!("{uri}\n{original}").bytes().map(|b| format!("{b:02x}")).collect();
        let name: String = key.chars().take(200).collect();
        let path = dir.join(format!("{name}.lock"));
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(OriginalLock { _file: file }),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(TryLockError::WouldBlock) => return Err(LockError::Busy(original.to_string(), wait.as_secs())),
                Err(TryLockError::Error(source)) => {
                    return Err(LockError::Io { path: path.display().to_string(), source })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_run_on_the_same_original_waits_then_gives_up() {
        // A private lock directory: /run/lock is root's, and this test must pass as any user.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("virt-clone-cow");
        let acquire = |name: &str, wait| OriginalLock::acquire_in(&dir, "test:///x", name, wait);
        let a = acquire("lock-test 'odd' name", Duration::from_secs(1)).unwrap();
        let t0 = Instant::now();
        let err = acquire("lock-test 'odd' name", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, LockError::Busy(..)), "{err}");
        assert!(t0.elapsed() >= Duration::from_millis(300));
        // Another original is not blocked.
        let _b = acquire("another", Duration::from_millis(100)).unwrap();
        drop(a);
        acquire("lock-test 'odd' name", Duration::from_millis(100)).unwrap();
    }
}
