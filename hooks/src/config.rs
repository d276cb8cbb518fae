//! The hook's settings: `/etc/virt-clone-cow/hook.conf`, lines of `key = value`; a line whose first
//! non-blank character is `#` is a comment (a `#` elsewhere is part of the value).
//! libvirt runs hooks with a minimal environment, so a file is the only way to configure it.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `control_socket` | `/run/pool-helper/control.sock` | the pool-helper daemon's socket |
//! | `fetch_timeout` | `600` | seconds `prepare` waits for a missing master before refusing the start |
//! | `connect_timeout` | `5` | seconds to reach the daemon |
//! | `progress_interval` | `10` | seconds between progress lines on stderr |
//! | `managed_save_dir` | `/var/lib/libvirt/qemu/save` | where libvirt keeps managed-save images (`NAME.save`) |
//! | `state_dir` | `/run/virt-clone-cow-hook` | where `migrate`/`restore` leave a note for the `prepare` that follows |
//! | `allowed_dir` | `/var/lib/libvirt/images` | one more directory (and everything under it) where overlays may be made and masters read; the key may be repeated, each line adds one |
//! | `pool_config_dir` | `/etc/libvirt/storage` | where libvirt keeps the definitions of storage pools: the directories of `dir`, `fs` and `netfs` pools defined there are allowed too |

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/etc/virt-clone-cow/hook.conf";
/// Names another config file, for running the hook by hand.
pub const PATH_ENV: &str = "VIRT_CLONE_COW_HOOK_CONF";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub control_socket: PathBuf,
    pub fetch_timeout: Duration,
    pub connect_timeout: Duration,
    pub progress_interval: Duration,
    pub managed_save_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Directories (besides those of defined storage pools) where overlays may be made and
    /// masters read: [`DEFAULT_ALLOWED_DIR`] and every `allowed_dir` line.
    pub allowed_dirs: Vec<PathBuf>,
    /// Where libvirt keeps storage pool definitions (`NAME.xml`), read for their directories.
    pub pool_config_dir: PathBuf,
    /// The settings file these came from (named in messages that say which setting to change).
    pub path: PathBuf,
}

/// Always an allowed directory: libvirt's own default pool directory.
pub const DEFAULT_ALLOWED_DIR: &str = "/var/lib/libvirt/images";
/// libvirt's directory of storage pool definitions for `qemu:///system`.
pub const DEFAULT_POOL_CONFIG_DIR: &str = "/etc/libvirt/storage";

impl Default for Config {
    fn default() -> Self {
        Config {
            control_socket: PathBuf::from("/run/pool-helper/control.sock"),
            fetch_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            progress_interval: Duration::from_secs(10),
            managed_save_dir: PathBuf::from("/var/lib/libvirt/qemu/save"),
            state_dir: PathBuf::from("/run/virt-clone-cow-hook"),
            allowed_dirs: vec![PathBuf::from(DEFAULT_ALLOWED_DIR)],
            pool_config_dir: PathBuf::from(DEFAULT_POOL_CONFIG_DIR),
            path: PathBuf::from(DEFAULT_PATH),
        }
    }
}

impl Config {
    /// The settings from [`DEFAULT_PATH`] (or the file named by [`PATH_ENV`]); defaults when it is
    /// missing. Unknown keys and bad values are ignored with a note on `warn` naming that file (a
    /// hook must not fail every start over a typo).
    pub fn load_default(warn: &mut dyn Write) -> Self {
        match std::env::var_os(PATH_ENV) {
            Some(p) => Self::load(Path::new(&p), warn),
            None => Self::load(Path::new(DEFAULT_PATH), warn),
        }
    }

    pub fn load(path: &Path, warn: &mut dyn Write) -> Self {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&String::from_utf8_lossy(&bytes), path, warn),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::defaults_for(path),
            Err(e) => {
                let _ = writeln!(warn, "virt-clone-cow-hook: cannot read {}: {e}; using the defaults", path.display());
                Config::defaults_for(path)
            }
        }
    }

    /// The defaults, as if read from `path`.
    pub fn defaults_for(path: &Path) -> Self {
        Config { path: path.to_path_buf(), ..Config::default() }
    }

    /// Parses `text`, read from `path` (named in warnings).
    pub fn parse(text: &str, path: &Path, warn: &mut dyn Write) -> Self {
        let mut c = Config::defaults_for(path);
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                let _ = writeln!(warn, "virt-clone-cow-hook: {}:{}: expected key = value", path.display(), n + 1);
                continue;
            };
            let (k, v) = (k.trim(), v.trim().trim_matches('"'));
            let secs = || v.parse::<u64>().ok().map(Duration::from_secs);
            let ok = match k {
                "control_socket" => {
                    !v.is_empty() && {
                        c.control_socket = PathBuf::from(v);
                        true
                    }
                }
                "managed_save_dir" => {
                    v.starts_with('/') && {
                        c.managed_save_dir = PathBuf::from(v);
                        true
                    }
                }
                "state_dir" => {
                    v.starts_with('/') && {
                        c.state_dir = PathBuf::from(v);
                        true
                    }
                }
                "allowed_dir" => {
                    v.starts_with('/') && {
                        c.allowed_dirs.push(PathBuf::from(v));
                        true
                    }
                }
                "pool_config_dir" => {
                    v.starts_with('/') && {
                        c.pool_config_dir = PathBuf::from(v);
                        true
                    }
                }
                "fetch_timeout" => secs().map(|d| c.fetch_timeout = d).is_some(),
                "connect_timeout" => secs().map(|d| c.connect_timeout = d).is_some(),
                "progress_interval" => secs().map(|d| c.progress_interval = d).is_some(),
                _ => false,
            };
            if !ok {
                let _ = writeln!(warn, "virt-clone-cow-hook: {}:{}: ignoring '{line}'", path.display(), n + 1);
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_sets_keys_and_ignores_garbage() {
        let mut warn = Vec::new();
        let c = Config::parse(
            "# x\ncontrol_socket = /tmp/s.sock\nfetch_timeout=7\nbogus = 1\nnoequals\n",
            Path::new("/x/h.conf"),
            &mut warn,
        );
        assert_eq!(c.control_socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.fetch_timeout, Duration::from_secs(7));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        let w = String::from_utf8(warn).unwrap();
        assert!(w.contains("ignoring 'bogus = 1'") && w.contains("expected key = value"), "{w}");
    }

    #[test]
    fn a_hash_inside_a_value_is_part_of_it_and_only_leading_hashes_are_comments() {
        let mut warn = Vec::new();
        let c = Config::parse(
            "  # indented comment = 3\ncontrol_socket = /run/a#b/c.sock\n#fetch_timeout = 1\n",
            Path::new("/x/h.conf"),
            &mut warn,
        );
        assert_eq!(c.control_socket, PathBuf::from("/run/a#b/c.sock"));
        assert_eq!(c.fetch_timeout, Duration::from_secs(600));
        assert!(warn.is_empty(), "{}", String::from_utf8_lossy(&warn));
    }

    #[test]
    fn allowed_dirs_add_to_the_default_and_relative_ones_are_ignored() {
        let mut warn = Vec::new();
        let c = Config::parse(
            "allowed_dir = /srv/vms\nallowed_dir=/data/a b\nallowed_dir = rel/dir\npool_config_dir = /tmp/pools\n",
            Path::new("/x/h.conf"),
            &mut warn,
        );
        let want: Vec<PathBuf> =
            ["/var/lib/libvirt/images", "/srv/vms", "/data/a b"].iter().map(PathBuf::from).collect();
        assert_eq!(c.allowed_dirs, want);
        assert_eq!(c.pool_config_dir, PathBuf::from("/tmp/pools"));
        assert_eq!(c.path, PathBuf::from("/x/h.conf"));
        let w = String::from_utf8(warn).unwrap();
        assert!(w.contains("ignoring 'allowed_dir = rel/dir'"), "{w}");
    }

    #[test]
    fn warnings_name_the_file_actually_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("other.conf");
        std::fs::write(&f, "fetch_timeout = soon\n").unwrap();
        let mut warn = Vec::new();
        let c = Config::load(&f, &mut warn);
        assert_eq!(c.fetch_timeout, Duration::from_secs(600));
        let w = String::from_utf8(warn).unwrap();
        assert!(w.contains(&format!("{}:1: ignoring 'fetch_timeout = soon'", f.display())), "{w}");
        assert!(!w.contains(DEFAULT_PATH), "{w}");
        let mut warn = Vec::new();
        let absent = dir.path().join("absent");
        assert_eq!(Config::load(&absent, &mut warn), Config { path: absent.clone(), ..Config::default() });
        assert!(warn.is_empty());
    }
}
