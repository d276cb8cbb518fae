//! The hook's settings: `/etc/virt-clone-cow/hook.toml` (TOML, like pool-helper's config).
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
//! | `allowed_dirs` | `[]` | more directories (and everything under them) where overlays may be made and masters read, besides `/var/lib/libvirt/images` |
//! | `lazy` | `false` | start a clone whose master is missing at once, over the master's NBD export from pool-helper (docs/lazy.md; pool-helper needs `lazy = true` too) |
//! | `overlay_layout` | `"default"` | the qcow2 layout of the overlays the hook makes: `default` (QEMU's, 64 KiB clusters), `128k-l2`, `64k-l2`, `2m-l2` or `cluster_size=SIZE,extended_l2=on\|off`, as `virt-clone-cow --overlay-layout` (docs/overlay-layout.md) |
//! | `pool_config_dir` | `/etc/libvirt/storage` | where libvirt keeps the definitions of storage pools: the directories of `dir`, `fs` and `netfs` pools defined there are allowed too |
//!
//! The old `/etc/virt-clone-cow/hook.conf` (lines of `key = value`, `#` comments, `allowed_dir`
//! repeatable) is still read when `hook.toml` does not exist, with a deprecation line. A file named
//! by [`PATH_ENV`] is TOML when its name ends in `.toml`, the old syntax otherwise.
//!
//! Nothing here is ever fatal: a file that cannot be read or parsed, an unknown key, a bad value
//! each give one warning line naming the file (and key) and the default is used instead (a hook
//! must not fail every start over a typo).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The settings file.
pub const DEFAULT_PATH: &str = "/etc/virt-clone-cow/hook.toml";
/// The old settings file, read (with a deprecation line) when [`DEFAULT_PATH`] does not exist.
pub const LEGACY_PATH: &str = "/etc/virt-clone-cow/hook.conf";
/// Names another config file, for running the hook by hand.
pub const PATH_ENV: &str = "VIRT_CLONE_COW_HOOK_CONF";
/// Settings files are root's and tiny; anything longer is not read (defaults, with a warning).
pub const MAX_BYTES: u64 = 1 << 20;
/// The longest wait a setting may ask for (a day): larger values would overflow deadlines.
pub const MAX_SECS: u64 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub control_socket: PathBuf,
    pub fetch_timeout: Duration,
    pub connect_timeout: Duration,
    pub progress_interval: Duration,
    pub managed_save_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Directories (besides those of defined storage pools) where overlays may be made and
    /// masters read: [`DEFAULT_ALLOWED_DIR`] and every configured one.
    pub allowed_dirs: Vec<PathBuf>,
    /// Where libvirt keeps storage pool definitions (`NAME.xml`), read for their directories.
    pub pool_config_dir: PathBuf,
    /// Lazy starts (docs/lazy.md).
    pub lazy: bool,
    /// The layout of the overlays the hook makes (docs/overlay-layout.md).
    pub overlay_layout: vcc_core::layout::OverlayLayout,
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
            lazy: false,
            overlay_layout: vcc_core::layout::OverlayLayout::DEFAULT,
            path: PathBuf::from(DEFAULT_PATH),
        }
    }
}

/// Whether `path` is read as TOML (its name ends in `.toml`) or in the old `key = value` syntax.
pub fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml")
}

/// What to add to the settings file `conf` to allow `dir`, in that file's syntax.
pub fn allow_hint(conf: &Path, dir: &str) -> String {
    if is_toml(conf) {
        format!("add \"{dir}\" to `allowed_dirs` in {}", conf.display())
    } else {
        format!("add `allowed_dir = {dir}` to {}", conf.display())
    }
}

/// A value as written: the old syntax has only text; TOML has types.
enum Val<'a> {
    Text(&'a str),
    Toml(&'a toml::Value),
}

/// What became of one setting.
enum Outcome {
    Taken,
    UnknownKey,
    /// Not taken: what was expected instead.
    Bad(&'static str),
}

const EXPECT_PATH: &str = "a non-empty path";
const EXPECT_ABS: &str = "an absolute path";
const EXPECT_SECS: &str = "a whole number of seconds from 0 to 86400";
const EXPECT_ABS_LIST: &str = "an array of absolute paths";
const EXPECT_BOOL: &str = "true or false";
const EXPECT_LAYOUT: &str = "default, 128k-l2, 64k-l2, 2m-l2, SIZE[-l2] or cluster_size=SIZE,extended_l2=on|off";

impl Val<'_> {
    fn text(&self) -> Option<&str> {
        match self {
            Val::Text(s) => Some(s),
            Val::Toml(v) => v.as_str(),
        }
    }

    fn secs(&self) -> Option<Duration> {
        let n = match self {
            Val::Text(s) => s.parse::<u64>().ok()?,
            Val::Toml(v) => u64::try_from(v.as_integer()?).ok()?,
        };
        (n <= MAX_SECS).then(|| Duration::from_secs(n))
    }

    fn abs_path(&self) -> Option<PathBuf> {
        self.text().filter(|s| s.starts_with('/')).map(PathBuf::from)
    }
}

impl Config {
    /// The settings from the file named by [`PATH_ENV`], else [`DEFAULT_PATH`], else the old
    /// [`LEGACY_PATH`]; defaults when none exists. Never fails: problems are lines on `warn`.
    pub fn load_default(warn: &mut dyn Write) -> Self {
        match std::env::var_os(PATH_ENV) {
            Some(p) => Self::load(Path::new(&p), warn),
            None => Self::load_first(Path::new(DEFAULT_PATH), Path::new(LEGACY_PATH), warn),
        }
    }

    /// `toml` when it exists (or cannot be told apart from existing), else `legacy` with a
    /// deprecation line when that exists, else the defaults as if read from `toml`.
    pub fn load_first(toml: &Path, legacy: &Path, warn: &mut dyn Write) -> Self {
        let absent = |p: &Path| matches!(p.symlink_metadata(), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        if !absent(toml) || absent(legacy) {
            return Self::load(toml, warn);
        }
        let _ = writeln!(
            warn,
            "virt-clone-cow-hook: {} is deprecated: move its settings to {} (TOML; `allowed_dir = D` lines become `allowed_dirs = [\"D\", ...]`)",
            legacy.display(),
            toml.display()
        );
        Self::load(legacy, warn)
    }

    /// The settings of `path`, in the syntax its name says ([`is_toml`]); the defaults when it is
    /// missing.
    pub fn load(path: &Path, warn: &mut dyn Write) -> Self {
        match read_bounded(path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                if is_toml(path) {
                    Self::parse_toml(&text, path, warn)
                } else {
                    Self::parse(&text, path, warn)
                }
            }
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

    /// Sets `key` to `v`.
    fn set(&mut self, key: &str, v: Val) -> Outcome {
        let (ok, expected) = match key {
            "control_socket" => {
                (v.text().filter(|s| !s.is_empty()).map(|s| self.control_socket = PathBuf::from(s)), EXPECT_PATH)
            }
            "managed_save_dir" => (v.abs_path().map(|p| self.managed_save_dir = p), EXPECT_ABS),
            "state_dir" => (v.abs_path().map(|p| self.state_dir = p), EXPECT_ABS),
            "pool_config_dir" => (v.abs_path().map(|p| self.pool_config_dir = p), EXPECT_ABS),
            "fetch_timeout" => (v.secs().map(|d| self.fetch_timeout = d), EXPECT_SECS),
            "connect_timeout" => (v.secs().map(|d| self.connect_timeout = d), EXPECT_SECS),
            "progress_interval" => (v.secs().map(|d| self.progress_interval = d), EXPECT_SECS),
            "lazy" => {
                let b = match v {
                    Val::Text(t) => t.parse::<bool>().ok(),
                    Val::Toml(t) => t.as_bool(),
                };
                (b.map(|b| self.lazy = b), EXPECT_BOOL)
            }
            "overlay_layout" => {
                let l = match v {
                    Val::Text(t) => t.parse().ok(),
                    Val::Toml(t) => t.as_str().and_then(|s| s.parse().ok()),
                };
                (l.map(|l| self.overlay_layout = l), EXPECT_LAYOUT)
            }
            // The old syntax: one directory a line.
            "allowed_dir" if matches!(v, Val::Text(_)) => (v.abs_path().map(|p| self.allowed_dirs.push(p)), EXPECT_ABS),
            "allowed_dirs" if matches!(v, Val::Toml(_)) => {
                let all: Option<Vec<PathBuf>> = match v {
                    Val::Toml(t) => t.as_array().and_then(|items| {
                        items.iter().map(|i| i.as_str().filter(|s| s.starts_with('/')).map(PathBuf::from)).collect()
                    }),
                    Val::Text(_) => None,
                };
                (all.map(|dirs| self.allowed_dirs.extend(dirs)), EXPECT_ABS_LIST)
            }
            _ => return Outcome::UnknownKey,
        };
        match ok {
            Some(()) => Outcome::Taken,
            None => Outcome::Bad(expected),
        }
    }

    /// Parses TOML `text`, read from `path` (named in warnings).
    pub fn parse_toml(text: &str, path: &Path, warn: &mut dyn Write) -> Self {
        let mut c = Config::defaults_for(path);
        let table = match text.parse::<toml::Table>() {
            Ok(t) => t,
            Err(e) => {
                let at = e
                    .span()
                    .and_then(|s| text.get(..s.start))
                    .map(|before| format!(":{}", before.matches('\n').count() + 1))
                    .unwrap_or_default();
                let msg = e.message().replace(['\r', '\n'], " ");
                let _ = writeln!(
                    warn,
                    "virt-clone-cow-hook: {}{at}: not valid TOML ({}); using the defaults",
                    path.display(),
                    msg.trim()
                );
                return c;
            }
        };
        for (k, v) in &table {
            let shown = v.to_string().replace(['\r', '\n'], " ");
            match c.set(k, Val::Toml(v)) {
                Outcome::Taken => {}
                Outcome::UnknownKey => {
                    let hint = if k == "allowed_dir" { " (write allowed_dirs = [\"/dir\", ...])" } else { "" };
                    let _ = writeln!(warn, "virt-clone-cow-hook: {}: ignoring unknown key {k}{hint}", path.display());
                }
                Outcome::Bad(expected) => {
                    let _ = writeln!(
                        warn,
                        "virt-clone-cow-hook: {}: ignoring {k} = {shown}: expected {expected}",
                        path.display()
                    );
                }
            }
        }
        c
    }

    /// Parses `text` in the old syntax (lines of `key = value`; a line whose first non-blank
    /// character is `#` is a comment, a `#` elsewhere is part of the value), read from `path`.
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
            if !matches!(c.set(k, Val::Text(v)), Outcome::Taken) {
                let _ = writeln!(warn, "virt-clone-cow-hook: {}:{}: ignoring '{line}'", path.display(), n + 1);
            }
        }
        c
    }
}

/// The bytes of `path`, at most [`MAX_BYTES`], without blocking on a FIFO.
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    f.take(MAX_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(std::io::Error::other(format!("longer than {MAX_BYTES} bytes")));
    }
    Ok(bytes)
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

    fn toml(text: &str) -> (Config, String) {
        let mut warn = Vec::new();
        let c = Config::parse_toml(text, Path::new("/x/hook.toml"), &mut warn);
        (c, String::from_utf8(warn).unwrap())
    }

    #[test]
    fn toml_sets_every_key() {
        let (c, w) = toml(
            "# comment\ncontrol_socket = \"/tmp/s.sock\"\nfetch_timeout = 7\nconnect_timeout = 2\nprogress_interval = 0\n\
             managed_save_dir = \"/s\"\nstate_dir = \"/st\"\nallowed_dirs = [\"/srv/vms\", \"/data/a b#c\"]\n\
             pool_config_dir = \"/p\"\nlazy = true\noverlay_layout = \"2m-l2\"\n",
        );
        assert!(w.is_empty(), "{w}");
        let want = Config {
            control_socket: "/tmp/s.sock".into(),
            fetch_timeout: Duration::from_secs(7),
            connect_timeout: Duration::from_secs(2),
            progress_interval: Duration::ZERO,
            managed_save_dir: "/s".into(),
            state_dir: "/st".into(),
            allowed_dirs: ["/var/lib/libvirt/images", "/srv/vms", "/data/a b#c"].iter().map(PathBuf::from).collect(),
            pool_config_dir: "/p".into(),
            lazy: true,
            overlay_layout: vcc_core::layout::OverlayLayout::L2_2M,
            path: "/x/hook.toml".into(),
        };
        assert_eq!(c, want);
    }

    #[test]
    fn overlay_layout_is_read_in_both_syntaxes_and_a_bad_one_warns_and_keeps_the_default() {
        let (c, w) = toml("overlay_layout = \"cluster_size=128k,extended_l2=on\"\n");
        assert!(w.is_empty(), "{w}");
        assert_eq!(c.overlay_layout, vcc_core::layout::OverlayLayout::L2_128K);
        for bad in ["overlay_layout = \"fast\"\n", "overlay_layout = 128\n", "overlay_layout = \"8k-l2\"\n"] {
            let (c, w) = toml(bad);
            assert_eq!(c.overlay_layout, vcc_core::layout::OverlayLayout::DEFAULT, "{bad}");
            assert_eq!(w.lines().count(), 1, "{w}");
            assert!(
                w.contains("/x/hook.toml: ignoring overlay_layout = ") && w.contains("expected default, 128k-l2"),
                "{w}"
            );
        }
        let mut warn = Vec::new();
        let c = Config::parse("overlay_layout = 64k-l2\n", Path::new("/x/h.conf"), &mut warn);
        assert!(warn.is_empty());
        assert_eq!(c.overlay_layout, vcc_core::layout::OverlayLayout::L2_64K);
    }

    #[test]
    fn toml_unknown_keys_and_bad_values_warn_once_each_naming_file_and_key() {
        let (c, w) = toml(
            "fetch_timout = 5\nfetch_timeout = \"600\"\nconnect_timeout = -1\nstate_dir = \"rel\"\n\
             allowed_dirs = [\"/ok\", \"rel\"]\nallowed_dir = \"/old\"\ncontrol_socket = \"\"\n\
             progress_interval = 3\n[section]\nx = 1\n",
        );
        assert_eq!(c.progress_interval, Duration::from_secs(3), "good keys still apply");
        assert_eq!(
            Config { progress_interval: Duration::from_secs(10), ..c },
            Config::defaults_for(Path::new("/x/hook.toml"))
        );
        let lines: Vec<&str> = w.lines().collect();
        assert_eq!(lines.len(), 8, "{w}");
        assert!(lines.iter().all(|l| l.starts_with("virt-clone-cow-hook: /x/hook.toml: ignoring ")), "{w}");
        for key in [
            "unknown key fetch_timout",
            "fetch_timeout = \"600\": expected a whole number",
            "connect_timeout = -1: expected",
            "state_dir = \"rel\": expected an absolute path",
            "allowed_dirs = [\"/ok\", \"rel\"]: expected an array of absolute paths",
            "unknown key allowed_dir (write allowed_dirs = [",
            "control_socket = \"\": expected a non-empty path",
            "unknown key section",
        ] {
            assert!(w.contains(key), "{key}: {w}");
        }
    }

    #[test]
    fn toml_syntax_error_warns_with_the_line_and_uses_the_defaults() {
        let (c, w) = toml("fetch_timeout = 7\ncontrol_socket = /tmp/s.sock\n");
        assert_eq!(c, Config::defaults_for(Path::new("/x/hook.toml")));
        assert_eq!(w.lines().count(), 1, "{w}");
        assert!(w.starts_with("virt-clone-cow-hook: /x/hook.toml:2: not valid TOML ("), "{w}");
        assert!(w.trim_end().ends_with("); using the defaults"), "{w}");
    }

    #[test]
    fn timeouts_too_large_for_a_deadline_are_refused_in_both_syntaxes() {
        // `Instant::now() + fetch_timeout` would panic on these.
        let (c, w) = toml("fetch_timeout = 9223372036854775807\n");
        assert_eq!(c.fetch_timeout, Duration::from_secs(600));
        assert!(w.contains("ignoring fetch_timeout"), "{w}");
        let mut warn = Vec::new();
        let c = Config::parse("fetch_timeout = 18446744073709551615\n", Path::new("/x/h.conf"), &mut warn);
        assert_eq!(c.fetch_timeout, Duration::from_secs(600));
        assert!(!warn.is_empty());
        assert_eq!(toml("fetch_timeout = 86400\n").0.fetch_timeout, Duration::from_secs(MAX_SECS));
    }

    #[test]
    fn the_toml_file_wins_else_the_old_one_with_a_deprecation_line() {
        let dir = tempfile::tempdir().unwrap();
        let (new, old) = (dir.path().join("hook.toml"), dir.path().join("hook.conf"));
        let load = || {
            let mut warn = Vec::new();
            let c = Config::load_first(&new, &old, &mut warn);
            (c, String::from_utf8(warn).unwrap())
        };
        // Neither: the defaults, quietly, naming the new file.
        assert_eq!(load(), (Config::defaults_for(&new), String::new()));
        // Only the old one: read, with one deprecation line naming both files.
        std::fs::write(&old, "fetch_timeout = 7\nallowed_dir = /srv\n").unwrap();
        let (c, w) = load();
        assert_eq!((c.fetch_timeout, c.path.clone()), (Duration::from_secs(7), old.clone()));
        assert_eq!(c.allowed_dirs.last(), Some(&PathBuf::from("/srv")));
        assert_eq!(w.lines().count(), 1, "{w}");
        assert!(w.contains(&format!("{} is deprecated: move its settings to {}", old.display(), new.display())), "{w}");
        // Both: only the new one, no deprecation line.
        std::fs::write(&new, "fetch_timeout = 9\n").unwrap();
        let (c, w) = load();
        assert_eq!((c.fetch_timeout, c.path), (Duration::from_secs(9), new.clone()));
        assert!(w.is_empty(), "{w}");
    }

    #[test]
    fn a_named_file_is_read_in_the_syntax_its_extension_says() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("mine.toml");
        std::fs::write(&t, "fetch_timeout = 7\n").unwrap();
        let o = dir.path().join("mine.cfg");
        std::fs::write(&o, "fetch_timeout = 8\n").unwrap();
        let mut warn = Vec::new();
        assert_eq!(Config::load(&t, &mut warn).fetch_timeout, Duration::from_secs(7));
        assert_eq!(Config::load(&o, &mut warn).fetch_timeout, Duration::from_secs(8));
        assert!(warn.is_empty(), "{}", String::from_utf8_lossy(&warn));
        assert!(allow_hint(&t, "/etc").starts_with("add \"/etc\" to `allowed_dirs` in "));
        assert!(allow_hint(&o, "/etc").starts_with("add `allowed_dir = /etc` to "));
    }

    #[test]
    fn oversized_files_and_fifos_are_not_read_and_give_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, format!("# {}\nfetch_timeout = 7\n", "x".repeat(MAX_BYTES as usize))).unwrap();
        let mut warn = Vec::new();
        assert_eq!(Config::load(&big, &mut warn), Config::defaults_for(&big));
        let w = String::from_utf8(warn).unwrap();
        assert!(w.contains("cannot read") && w.contains("longer than"), "{w}");
        let fifo = dir.path().join("fifo.toml");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let mut warn = Vec::new();
        assert_eq!(Config::load(&fifo, &mut warn), Config::defaults_for(&fifo));
        assert!(String::from_utf8(warn).unwrap().contains("not a regular file"));
    }

    #[test]
    fn the_packaged_default_file_names_every_key_with_its_default() {
        let text = include_str!("../../packaging/hook.toml");
        let (c, w) = toml(text);
        assert_eq!((c, w.as_str()), (Config::defaults_for(Path::new("/x/hook.toml")), ""), "all commented out");
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#').filter(|r| r.starts_with(|c: char| c.is_ascii_lowercase())))
            .map(|l| format!("{l}\n"))
            .collect();
        let (c, w) = toml(&uncommented);
        assert!(w.is_empty(), "every key is one the hook knows: {w}");
        let mut want = Config::defaults_for(Path::new("/x/hook.toml"));
        want.allowed_dirs.push("/srv/vms".into());
        assert_eq!(c, want, "the values shown are the defaults");
        for key in ["control_socket", "fetch_timeout", "connect_timeout", "progress_interval", "managed_save_dir"] {
            assert!(uncommented.contains(&format!("{key} = ")), "{key} is in the file");
        }
        for key in ["state_dir", "allowed_dirs", "pool_config_dir", "overlay_layout"] {
            assert!(uncommented.contains(&format!("{key} = ")), "{key} is in the file");
        }
    }
}
