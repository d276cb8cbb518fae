//! The hook's settings: `/etc/virt-clone-cow/hook.conf`, lines of `key = value` (`#` comments).
//! libvirt runs hooks with a minimal environment, so a file is the only way to configure it.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `control_socket` | `/run/pool-helper/control.sock` | the pool-helper daemon's socket |
//! | `fetch_timeout` | `600` | seconds `prepare` waits for a missing master before refusing the start |
//! | `connect_timeout` | `5` | seconds to reach the daemon |
//! | `progress_interval` | `10` | seconds between progress lines on stderr |

use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/etc/virt-clone-cow/hook.conf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub control_socket: PathBuf,
    pub fetch_timeout: Duration,
    pub connect_timeout: Duration,
    pub progress_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            control_socket: PathBuf::from("/run/pool-helper/control.sock"),
            fetch_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            progress_interval: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// The settings from [`DEFAULT_PATH`] (or the file named by `VIRT_CLONE_COW_HOOK_CONF`, for
    /// running the hook by hand); defaults when it is missing. Unknown keys and bad values are
    /// ignored with a note on stderr (a hook must not fail every start over a typo).
    pub fn load_default() -> Self {
        match std::env::var_os("VIRT_CLONE_COW_HOOK_CONF") {
            Some(p) => Self::load(Path::new(&p)),
            None => Self::load(Path::new(DEFAULT_PATH)),
        }
    }

    pub fn load(path: &Path) -> Self {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &mut std::io::stderr()),
            Err(_) => Config::default(),
        }
    }

    pub fn parse(text: &str, warn: &mut dyn std::io::Write) -> Self {
        let mut c = Config::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                let _ = writeln!(warn, "virt-clone-cow-hook: {DEFAULT_PATH}:{}: expected key = value", n + 1);
                continue;
            };
            let (k, v) = (k.trim(), v.trim().trim_matches('"'));
            let secs = || v.parse::<u64>().ok().map(Duration::from_secs);
            let ok = match k {
                "control_socket" => {
                    c.control_socket = PathBuf::from(v);
                    true
                }
                "fetch_timeout" => secs().map(|d| c.fetch_timeout = d).is_some(),
                "connect_timeout" => secs().map(|d| c.connect_timeout = d).is_some(),
                "progress_interval" => secs().map(|d| c.progress_interval = d).is_some(),
                _ => false,
            };
            if !ok {
                let _ = writeln!(warn, "virt-clone-cow-hook: {DEFAULT_PATH}:{}: ignoring '{line}'", n + 1);
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
        let c = Config::parse("# x\ncontrol_socket = /tmp/s.sock\nfetch_timeout=7\nbogus = 1\nnoequals\n", &mut warn);
        assert_eq!(c.control_socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.fetch_timeout, Duration::from_secs(7));
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        let w = String::from_utf8(warn).unwrap();
        assert!(w.contains("ignoring 'bogus = 1'") && w.contains("expected key = value"), "{w}");
    }
}
