//! Where the hook may write overlays and which masters it may read.
//!
//! The hook runs as root and takes its paths from domain XML, which a site may let users define
//! without host access (libvirt ACLs). So, as defense in depth, it makes overlays (and deletes
//! disposable ones) only inside an *allowed directory*, and reads (and names as backing file) only
//! masters that are regular files inside one:
//!
//! * the directory of every `dir`, `fs` or `netfs` storage pool defined in `pool_config_dir`
//!   (`/etc/libvirt/storage/*.xml`, libvirt's own definitions: reading files, not calling libvirt,
//!   which a hook must never do);
//! * `/var/lib/libvirt/images` and every `allowed_dir` of the hook's settings.
//!
//! Everything under an allowed directory is allowed. Paths are compared after resolving symlinks:
//! an overlay's directory and a master's whole path (a master may be a symlink, to a file inside an
//! allowed directory). The check runs right before the file is used, and the resolved path is what
//! is used.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// At most this many pool definitions are read (a hook must stay bounded whatever is there).
pub const MAX_POOL_FILES: usize = 4096;
/// Largest pool definition read.
pub const MAX_POOL_XML_BYTES: u64 = 1 << 20;

/// Why a path is refused.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("path '{0}' is not absolute")]
    NotAbsolute(String),
    #[error("path '{0}' does not end in a file name")]
    NoFileName(String),
    #[error("cannot resolve the directory of '{path}'")]
    Resolve {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} '{path}' is in {dir} (symlinks resolved), which is neither the directory of a storage pool defined in {pools} nor an allowed directory; the hook makes overlays and reads masters only there: define a storage pool over {dir}, or {hint}")]
    Outside { what: &'static str, path: String, dir: String, pools: String, hint: String },
    #[error("master '{path}' is {what}, not a regular file")]
    NotRegular { path: String, what: &'static str },
}

/// The allowed directories, resolved.
#[derive(Debug, Clone, Default)]
pub struct Places {
    dirs: Vec<PathBuf>,
    pools: PathBuf,
    conf: PathBuf,
}

impl Places {
    /// The allowed directories of `cfg`: its `allowed_dirs` and the directories of the pools defined
    /// in its `pool_config_dir`. Directories that do not exist (an inactive pool's) are left out.
    pub fn load(cfg: &Config) -> Places {
        let mut all: Vec<PathBuf> = cfg.allowed_dirs.clone();
        all.extend(pool_dirs(&cfg.pool_config_dir));
        Places::with_dirs(all, cfg)
    }

    /// Exactly these directories (resolved), with `cfg` named in messages.
    pub fn with_dirs(dirs: impl IntoIterator<Item = PathBuf>, cfg: &Config) -> Places {
        let mut resolved: Vec<PathBuf> = dirs.into_iter().filter_map(|d| std::fs::canonicalize(d).ok()).collect();
        resolved.sort();
        resolved.dedup();
        Places { dirs: resolved, pools: cfg.pool_config_dir.clone(), conf: cfg.path.clone() }
    }

    /// The allowed directories, resolved.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn inside(&self, real: &Path) -> bool {
        self.dirs.iter().any(|d| real.starts_with(d))
    }

    fn outside(&self, what: &'static str, path: &Path, dir: &Path) -> PlaceError {
        PlaceError::Outside {
            what,
            path: path.display().to_string(),
            dir: dir.display().to_string(),
            pools: self.pools.display().to_string(),
            hint: crate::config::allow_hint(&self.conf, &dir.display().to_string()),
        }
    }

    /// Where an overlay at `path` would really be: its directory resolved, joined with its file
    /// name, when that directory is inside an allowed one.
    pub fn overlay(&self, path: &Path) -> Result<PathBuf, PlaceError> {
        let shown = || path.display().to_string();
        if !path.is_absolute() {
            return Err(PlaceError::NotAbsolute(shown()));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(PlaceError::NoFileName(shown()));
        };
        let dir = std::fs::canonicalize(parent).map_err(|source| PlaceError::Resolve { path: shown(), source })?;
        if !self.inside(&dir) {
            return Err(self.outside("overlay", path, &dir));
        }
        Ok(dir.join(name))
    }

    /// A master at `path`, resolved (symlinks followed): a regular file inside an allowed directory.
    pub fn master(&self, path: &Path) -> Result<PathBuf, PlaceError> {
        let shown = || path.display().to_string();
        if !path.is_absolute() {
            return Err(PlaceError::NotAbsolute(shown()));
        }
        let real = std::fs::canonicalize(path).map_err(|source| PlaceError::Resolve { path: shown(), source })?;
        if !self.inside(&real) {
            return Err(self.outside("master", path, real.parent().unwrap_or(&real)));
        }
        let meta = std::fs::metadata(&real).map_err(|source| PlaceError::Resolve { path: shown(), source })?;
        match vcc_core::managed::file_kind(&meta) {
            None => Ok(real),
            Some(what) => Err(PlaceError::NotRegular { path: shown(), what }),
        }
    }
}

/// The directories of the file pools defined in `dir` (`*.xml`), read with bounds: at most
/// [`MAX_POOL_FILES`] files of at most [`MAX_POOL_XML_BYTES`] each, regular files only, opened
/// without blocking. Anything unreadable is skipped (a pool the hook cannot read is not allowed).
pub fn pool_dirs(dir: &Path) -> Vec<PathBuf> {
    file_pools(dir).into_iter().map(|(_, d)| d).collect()
}

/// The file pools defined in `dir` (`*.xml`, read as [`pool_dirs`] does): name and directory.
pub fn file_pools(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().as_encoded_bytes().ends_with(b".xml"))
        .take(MAX_POOL_FILES)
        .filter_map(|e| read_small_file(&e.path()))
        .filter_map(|xml| {
            let d = vcc_core::xml::volume::pool_file_dir(&xml).filter(|p| p.starts_with('/'))?;
            Some((vcc_core::xml::volume::pool_name(&xml).unwrap_or_default(), PathBuf::from(d)))
        })
        .collect()
}

/// The name of the file pool defined in `dir` whose directory holds `path` directly (compared
/// as written, then with symlinks resolved); None when no pool, or more than one, does.
pub fn pool_holding(dir: &Path, path: &Path) -> Option<String> {
    let parent = path.parent()?;
    let pools: Vec<(String, PathBuf)> = file_pools(dir).into_iter().filter(|(n, _)| !n.is_empty()).collect();
    let pick = |same: &dyn Fn(&Path) -> bool| {
        let mut names: Vec<&String> = pools.iter().filter(|(_, d)| same(d)).map(|(n, _)| n).collect();
        names.dedup();
        match names.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    };
    pick(&|d| d == parent).or_else(|| {
        let real = std::fs::canonicalize(parent).ok()?;
        pick(&|d| std::fs::canonicalize(d).is_ok_and(|r| r == real))
    })
}

/// A regular file's text, opened non-blocking (a FIFO cannot hold the hook), at most
/// [`MAX_POOL_XML_BYTES`].
fn read_small_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(MAX_POOL_XML_BYTES + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX_POOL_XML_BYTES {
        return None;
    }
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// An allowed directory with a master in it, a directory outside it, and the settings.
    struct Fixture {
        _tmp: tempfile::TempDir,
        allowed: PathBuf,
        outside: PathBuf,
        cfg: Config,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let allowed = tmp.path().join("pool");
            let outside = tmp.path().join("elsewhere");
            std::fs::create_dir_all(allowed.join("sub")).unwrap();
            std::fs::create_dir_all(&outside).unwrap();
            std::fs::write(allowed.join("m.raw"), b"master").unwrap();
            let cfg = Config {
                allowed_dirs: vec![allowed.clone()],
                pool_config_dir: tmp.path().join("no-pools"),
                path: PathBuf::from("/x/hook.conf"),
                ..Config::default()
            };
            Fixture { _tmp: tmp, allowed, outside, cfg }
        }

        fn places(&self) -> Places {
            Places::with_dirs(self.cfg.allowed_dirs.clone(), &self.cfg)
        }
    }

    fn refused_naming(e: PlaceError, dir: &str) -> String {
        let msg = e.to_string();
        assert!(matches!(e, PlaceError::Outside { .. }), "{msg}");
        assert!(msg.contains(&format!("add `allowed_dir = {dir}` to /x/hook.conf")), "{msg}");
        msg
    }

    #[test]
    fn a_master_in_etc_is_refused_naming_the_setting_to_change() {
        let f = Fixture::new();
        for m in ["/etc/passwd", "/etc/shadow", "/etc/../etc/passwd"] {
            // /etc/shadow may be unreadable to a normal user, but resolving its path is allowed.
            let msg = refused_naming(f.places().master(Path::new(m)).unwrap_err(), "/etc");
            assert!(msg.starts_with(&format!("master '{m}' is in /etc")), "{msg}");
        }
    }

    #[test]
    fn an_overlay_in_etc_is_refused_naming_the_setting_to_change() {
        let f = Fixture::new();
        for (o, dir) in
            [("/etc/vm.qcow2", "/etc"), ("/etc/cron.d/evil", "/etc/cron.d"), ("/root/../etc/x.qcow2", "/etc")]
        {
            let msg = refused_naming(f.places().overlay(Path::new(o)).unwrap_err(), dir);
            assert!(msg.starts_with(&format!("overlay '{o}' is in {dir} ")), "{msg}");
        }
        // `..` out of an allowed directory is resolved before the comparison.
        let up = f.allowed.join("sub/../../elsewhere/vm.qcow2");
        refused_naming(f.places().overlay(&up).unwrap_err(), f.outside.to_str().unwrap());
    }

    #[test]
    fn symlinks_escaping_the_allowed_directories_are_refused() {
        let f = Fixture::new();
        // A master that is a symlink to a host file.
        let link = f.allowed.join("evil.raw");
        symlink("/etc/passwd", &link).unwrap();
        refused_naming(f.places().master(&link).unwrap_err(), "/etc");
        // A directory symlink inside the allowed directory pointing out of it.
        let door = f.allowed.join("door");
        symlink("/etc", &door).unwrap();
        refused_naming(f.places().master(&door.join("passwd")).unwrap_err(), "/etc");
        refused_naming(f.places().overlay(&door.join("vm.qcow2")).unwrap_err(), "/etc");
        let door2 = f.allowed.join("door2");
        symlink(&f.outside, &door2).unwrap();
        refused_naming(f.places().overlay(&door2.join("vm.qcow2")).unwrap_err(), f.outside.to_str().unwrap());
        // An allowed directory's name as a prefix of another's does not count.
        let sibling = PathBuf::from(format!("{}-other", f.allowed.display()));
        std::fs::create_dir_all(&sibling).unwrap();
        assert!(f.places().overlay(&sibling.join("vm.qcow2")).is_err());
    }

    #[test]
    fn masters_and_overlays_inside_the_allowed_directories_pass_resolved() {
        let f = Fixture::new();
        let p = f.places();
        let real = std::fs::canonicalize(&f.allowed).unwrap();
        assert_eq!(p.master(&f.allowed.join("m.raw")).unwrap(), real.join("m.raw"));
        assert_eq!(p.overlay(&f.allowed.join("vm.qcow2")).unwrap(), real.join("vm.qcow2"));
        assert_eq!(p.overlay(&f.allowed.join("sub/vm.qcow2")).unwrap(), real.join("sub/vm.qcow2"));
        // A symlink to a master inside: fine, and resolved.
        let link = f.allowed.join("sub/link.raw");
        symlink(f.allowed.join("m.raw"), &link).unwrap();
        assert_eq!(p.master(&link).unwrap(), real.join("m.raw"));
        // An allowed directory reached through a symlink: compared resolved.
        let via = f.outside.join("via");
        symlink(&f.allowed, &via).unwrap();
        assert_eq!(p.overlay(&via.join("vm.qcow2")).unwrap(), real.join("vm.qcow2"));
    }

    #[test]
    fn a_master_must_be_a_regular_file_and_paths_absolute() {
        let f = Fixture::new();
        let e = f.places().master(&f.allowed.join("sub")).unwrap_err();
        assert!(e.to_string().contains("is a directory, not a regular file"), "{e}");
        assert!(matches!(f.places().master(Path::new("m.raw")), Err(PlaceError::NotAbsolute(_))));
        assert!(matches!(f.places().overlay(Path::new("vm.qcow2")), Err(PlaceError::NotAbsolute(_))));
        assert!(matches!(f.places().overlay(Path::new("/")), Err(PlaceError::NoFileName(_))));
        assert!(matches!(f.places().master(&f.allowed.join("absent.raw")), Err(PlaceError::Resolve { .. })));
        assert!(matches!(f.places().overlay(&f.allowed.join("no/such/vm.qcow2")), Err(PlaceError::Resolve { .. })));
    }

    #[test]
    fn nothing_is_allowed_when_no_directory_is() {
        let f = Fixture::new();
        let none = Places::with_dirs(Vec::new(), &f.cfg);
        assert!(none.master(&f.allowed.join("m.raw")).is_err());
        assert!(none.overlay(&f.allowed.join("vm.qcow2")).is_err());
    }

    #[test]
    fn the_pool_holding_a_master_is_found_by_its_directory() {
        let f = Fixture::new();
        let defs = f._tmp.path().join("storage");
        std::fs::create_dir_all(&defs).unwrap();
        let def = |name: &str, kind: &str, path: &Path| {
            format!("<pool type='{kind}'><name>{name}</name><target><path>{}</path></target></pool>", path.display())
        };
        let images = f._tmp.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let via = f._tmp.path().join("via");
        symlink(&images, &via).unwrap();
        std::fs::write(defs.join("default.xml"), def("default", "dir", &images)).unwrap();
        std::fs::write(defs.join("lvm.xml"), def("vg", "logical", &f.allowed)).unwrap();
        std::fs::write(defs.join("notes.txt"), def("txt", "dir", &f.allowed)).unwrap();
        assert_eq!(pool_holding(&defs, &images.join("m.qcow2")).as_deref(), Some("default"));
        assert_eq!(pool_holding(&defs, &via.join("m.qcow2")).as_deref(), Some("default"), "symlinks resolved");
        // Only pools of files, defined in *.xml, holding the file directly.
        assert_eq!(pool_holding(&defs, &f.allowed.join("m.qcow2")), None);
        assert_eq!(pool_holding(&defs, &images.join("sub/m.qcow2")), None);
        // Two pools of one directory: ambiguous, none chosen.
        std::fs::write(defs.join("other.xml"), def("other", "dir", &images)).unwrap();
        assert_eq!(pool_holding(&defs, &images.join("m.qcow2")), None);
    }

    #[test]
    fn directories_of_defined_file_pools_are_allowed() {
        let f = Fixture::new();
        let defs = f._tmp.path().join("storage");
        std::fs::create_dir_all(defs.join("autostart")).unwrap();
        let pool_dir = f._tmp.path().join("images2");
        std::fs::create_dir_all(&pool_dir).unwrap();
        let def = |kind: &str, path: &Path| {
            format!(
                "<pool type='{kind}'>\n  <name>p</name>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n",
                path.display()
            )
        };
        std::fs::write(defs.join("images2.xml"), def("dir", &pool_dir)).unwrap();
        std::fs::write(defs.join("vg.xml"), def("logical", Path::new("/dev"))).unwrap();
        std::fs::write(defs.join("notes.txt"), def("dir", Path::new("/etc"))).unwrap();
        let mut huge = def("dir", Path::new("/root"));
        huge.push_str(&" ".repeat(MAX_POOL_XML_BYTES as usize));
        std::fs::write(defs.join("huge.xml"), huge).unwrap();
        std::fs::write(defs.join("broken.xml"), "<pool type='dir'><target><path>/usr").unwrap();
        symlink(defs.join("images2.xml"), defs.join("autostart/images2.xml")).unwrap();
        std::fs::create_dir_all(defs.join("dir.xml")).unwrap();
        assert_eq!(pool_dirs(&defs), vec![pool_dir.clone()]);

        let cfg = Config { allowed_dirs: Vec::new(), pool_config_dir: defs, ..f.cfg.clone() };
        let p = Places::load(&cfg);
        assert_eq!(p.dirs(), [std::fs::canonicalize(&pool_dir).unwrap()]);
        assert!(p.overlay(&pool_dir.join("vm.qcow2")).is_ok());
        let e = p.overlay(Path::new("/dev/vm.qcow2")).unwrap_err();
        assert!(e.to_string().contains(&format!("storage pool defined in {}", cfg.pool_config_dir.display())), "{e}");
        // The defaults: libvirt's pool definitions and its default image directory.
        assert_eq!(Config::default().pool_config_dir, PathBuf::from("/etc/libvirt/storage"));
        assert_eq!(Config::default().allowed_dirs, vec![PathBuf::from("/var/lib/libvirt/images")]);
    }
}
