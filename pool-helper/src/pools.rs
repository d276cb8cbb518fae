//! Where storage pools live, and telling their lister that a file appeared: the one seam between
//! the fetch/publish pipeline and libvirt. The daemon and the CLI use [`LibvirtPools`]; tests that
//! run the pipeline in process, without libvirtd, use [`DirPools`] (pool name -> directory).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use vcc_core::qcow2;
use vcc_libvirt::{Libvirt, LibvirtError};

use crate::config::Config;

/// Why a pool or a volume in it could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The libvirt call failed (the error names the call, the pool and the volume).
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("pool '{0}' has no target directory (only directory-based pools are supported)")]
    NoDir(String),
    #[error("pool '{0}' is not known here")]
    Unknown(String),
    #[error("cannot read volume '{path}'")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A volume as publishing needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolVolume {
    pub path: PathBuf,
    /// `qcow2`, `raw`, ...; `None` when the pool does not say.
    pub format: Option<String>,
    /// Whether the image has a backing file (a master cannot).
    pub has_backing: bool,
}

/// The pools a process fetches into and publishes from.
pub trait Pools: Send + Sync + std::fmt::Debug {
    /// The directory of `pool`.
    fn dir(&self, pool: &str) -> Result<PathBuf, PoolError>;
    /// Volume `name` of `pool`; `Ok(None)` when there is none.
    fn volume(&self, pool: &str, name: &str) -> Result<Option<PoolVolume>, PoolError>;
    /// Makes a file just renamed into `pool` show up in its listing.
    fn refresh(&self, pool: &str) -> Result<(), PoolError>;
}

/// Pools as libvirt defines them. Every call opens its own connection (they are rare and run on
/// blocking threads).
#[derive(Debug, Clone)]
pub struct LibvirtPools {
    uri: String,
}

impl LibvirtPools {
    pub fn new(cfg: &Config) -> Self {
        LibvirtPools { uri: cfg.libvirt_uri.clone().unwrap_or_else(|| "qemu:///system".into()) }
    }

    fn open(&self) -> Result<Libvirt, PoolError> {
        Ok(Libvirt::open(Some(&self.uri))?)
    }
}

impl Pools for LibvirtPools {
    fn dir(&self, pool: &str) -> Result<PathBuf, PoolError> {
        self.open()?.pool_dir(pool)?.map(PathBuf::from).ok_or_else(|| PoolError::NoDir(pool.into()))
    }

    fn volume(&self, pool: &str, name: &str) -> Result<Option<PoolVolume>, PoolError> {
        Ok(self.open()?.volume(pool, name)?.map(|v| PoolVolume {
            path: PathBuf::from(&v.facts.path),
            format: v.facts.format.clone(),
            has_backing: v.facts.backing.is_some(),
        }))
    }

    fn refresh(&self, pool: &str) -> Result<(), PoolError> {
        Ok(self.open()?.refresh_pool(pool)?)
    }
}

/// Plain directories by pool name, for tests and tools that run without libvirt. A volume is the
/// file of that name; its format is read from its first bytes (qcow2 magic, else raw), as a
/// directory pool would probe it.
#[derive(Debug, Clone, Default)]
pub struct DirPools {
    dirs: HashMap<String, PathBuf>,
}

impl DirPools {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) pool `name` at `dir`.
    pub fn with(mut self, name: &str, dir: &Path) -> Self {
        self.dirs.insert(name.into(), dir.to_path_buf());
        self
    }
}

impl Pools for DirPools {
    fn dir(&self, pool: &str) -> Result<PathBuf, PoolError> {
        self.dirs.get(pool).cloned().ok_or_else(|| PoolError::Unknown(pool.into()))
    }

    fn volume(&self, pool: &str, name: &str) -> Result<Option<PoolVolume>, PoolError> {
        let path = self.dir(pool)?.join(name);
        let read = |source| PoolError::Read { path: path.display().to_string(), source };
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read(e)),
        };
        // The fixed header (vcc_core::qcow2): the magic, and backing_file_offset (0: none).
        let mut head = Vec::with_capacity(qcow2::V2_HEADER_LEN);
        (&mut f).take(qcow2::V2_HEADER_LEN as u64).read_to_end(&mut head).map_err(read)?;
        let qcow2 = qcow2::has_magic(&head);
        let has_backing = qcow2::Header::parse(&head).is_ok_and(|h| h.backing_file_offset != 0);
        let format = if qcow2 { "qcow2" } else { "raw" };
        Ok(Some(PoolVolume { path, format: Some(format.into()), has_backing }))
    }

    fn refresh(&self, pool: &str) -> Result<(), PoolError> {
        self.dir(pool).map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dir_pools_resolve_known_pools_and_refuse_others() {
        let d = tempfile::tempdir().unwrap();
        let pools = DirPools::new().with("a", d.path());
        assert_eq!(pools.dir("a").unwrap(), d.path());
        assert!(pools.refresh("a").is_ok());
        let e = pools.dir("b").unwrap_err();
        assert!(matches!(&e, PoolError::Unknown(p) if p == "b"), "{e}");
        assert!(pools.refresh("b").is_err());
    }

    #[test]
    fn dir_pools_probe_volume_format_and_backing_from_the_header() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("m.raw"), vec![7u8; 4096]).unwrap();
        let mut q = qcow2::MAGIC.to_vec();
        q.extend_from_slice(&3u32.to_be_bytes());
        q.resize(qcow2::V2_HEADER_LEN, 0);
        std::fs::write(d.path().join("m.qcow2"), &q).unwrap();
        q[15] = 0x80;
        std::fs::write(d.path().join("o.qcow2"), &q).unwrap();
        let pools = DirPools::new().with("p", d.path());
        let raw = pools.volume("p", "m.raw").unwrap().unwrap();
        assert_eq!((raw.format.as_deref(), raw.has_backing), (Some("raw"), false));
        assert_eq!(raw.path, d.path().join("m.raw"));
        let qcow2 = pools.volume("p", "m.qcow2").unwrap().unwrap();
        assert_eq!((qcow2.format.as_deref(), qcow2.has_backing), (Some("qcow2"), false));
        assert!(pools.volume("p", "o.qcow2").unwrap().unwrap().has_backing);
        assert_eq!(pools.volume("p", "none").unwrap(), None);
    }
}
