//! Publishing a pool volume as a master: read-only, hashed, .torrent + manifest written.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::manifest::{self, Manifest, NameError};
use crate::metainfo;
use crate::pools::{LibvirtPools, PoolError, Pools};
use crate::records::{self, Record, RecordState};
use crate::staging;
use crate::verify::{self, ImageError};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("volume '{volume}' not found in pool '{pool}' (see `virsh vol-list {pool}`)")]
    NoVolume { pool: String, volume: String },
    #[error("volume '{volume}' cannot be a master")]
    BadName {
        volume: String,
        #[source]
        source: NameError,
    },
    #[error("volume '{volume}' cannot be a master: {why}")]
    Unfit { volume: String, why: Unfit },
    #[error("volume '{volume}' cannot be a master: its virtual size cannot be read")]
    VirtualSize {
        volume: String,
        #[source]
        source: ImageError,
    },
    #[error("volume '{volume}' cannot be a master: fetchers would refuse it")]
    Refused {
        volume: String,
        #[source]
        source: ImageError,
    },
    #[error("cannot hash '{path}'")]
    Hash {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Staging(#[from] staging::StagingError),
    #[error(transparent)]
    Sign(#[from] crate::sign::SignError),
}

/// Why a volume cannot be a master.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("it has a backing file")]
    Backing,
    #[error("format '{0}' (qcow2 or raw only)")]
    Format(String),
    #[error("not a regular file")]
    NotAFile,
    #[error("it changed while being hashed")]
    Changed,
}

/// What `publish` made.
#[derive(Debug, Clone)]
pub struct Published {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub torrent_path: PathBuf,
    pub path: PathBuf,
    /// `NAME.json.sig` (when the config has a `signing_key`).
    pub signature_path: Option<PathBuf>,
}

/// Our address for manifests: `advertise` from the config, else the host name.
pub fn advertised_peer(cfg: &Config) -> String {
    let host = cfg.advertise.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    });
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", cfg.listen_port)
    } else {
        format!("{host}:{}", cfg.listen_port)
    }
}

/// Publishes VOLUME of a libvirt POOL (`pool-helper publish`).
pub fn publish(cfg: &Config, pool: &str, volume: &str) -> Result<Published, PublishError> {
    publish_in(cfg, &LibvirtPools::new(cfg), pool, volume)
}

/// Publishes VOLUME of POOL as `pools` resolve it.
pub fn publish_in(cfg: &Config, pools: &dyn Pools, pool: &str, volume: &str) -> Result<Published, PublishError> {
    let unfit = |why| PublishError::Unfit { volume: volume.into(), why };
    manifest::validate_name(volume).map_err(|source| PublishError::BadName { volume: volume.into(), source })?;
    // A key that cannot sign fails the publication before anything is written.
    let key = cfg.signing_key.as_deref().map(crate::sign::SigningKey::load).transpose()?;
    let vol = pools
        .volume(pool, volume)?
        .ok_or_else(|| PublishError::NoVolume { pool: pool.into(), volume: volume.into() })?;
    let path = vol.path;
    if vol.has_backing {
        return Err(unfit(Unfit::Backing));
    }
    let format = vol.format.unwrap_or_else(|| "raw".into());
    if format != "qcow2" && format != "raw" {
        return Err(unfit(Unfit::Format(format)));
    }
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|source| PublishError::Hash { path: path.display().to_string(), source })?;
    if !meta.file_type().is_file() {
        return Err(unfit(Unfit::NotAFile));
    }
    // Immutable from now on: overlays will reference this path.
    staging::make_read_only(&path)?;
    let size = meta.len();
    let virtual_size = verify::local_virtual_size(&path, &format, size)
        .map_err(|source| PublishError::VirtualSize { volume: volume.into(), source })?;
    // The checks every fetcher will make (the same function, the same policy), before hashing.
    let e = verify::Expect {
        format: &format,
        name: volume,
        size,
        virtual_size,
        sha256: "",
        policy: verify::ImagePolicy::of(cfg),
    };
    verify::check_content(&path, &e).map_err(|source| PublishError::Refused { volume: volume.into(), source })?;
    let pl = metainfo::choose_piece_length(size);
    let hashed = metainfo::create(&path, volume, pl, &cfg.trackers)
        .map_err(|source| PublishError::Hash { path: path.display().to_string(), source })?;
    if hashed.size != size {
        return Err(unfit(Unfit::Changed));
    }
    let mut peers = vec![advertised_peer(cfg)];
    peers.extend(cfg.peers.iter().filter(|p| !peers.contains(p)).cloned().collect::<Vec<_>>());
    let m = Manifest {
        version: manifest::MANIFEST_VERSION,
        name: volume.into(),
        format,
        size,
        virtual_size,
        sha256: hashed.sha256.clone(),
        info_hash: hashed.info_hash.clone(),
        piece_length: pl,
        magnet: manifest::magnet(&hashed.info_hash, volume, &cfg.trackers, &peers),
        peers,
        trackers: cfg.trackers.clone(),
        torrent_hex: Some(hex::encode(&hashed.torrent)),
    };
    let dir = cfg.published_dir();
    let torrent_path = dir.join(format!("{volume}.torrent"));
    let manifest_path = dir.join(format!("{volume}.json"));
    staging::write_atomic(&torrent_path, &hashed.torrent)?;
    let mut json = serde_json::to_vec_pretty(&m).unwrap_or_default();
    json.push(b'\n');
    // The signature covers the exact bytes of the manifest file: written first, so a manifest
    // never sits beside a signature of its previous content.
    let sig_path = dir.join(format!("{volume}.json.sig"));
    let signature_path = match &key {
        Some(k) => {
            staging::write_atomic(&sig_path, k.sign(&json)?.as_bytes())?;
            Some(abs(&sig_path))
        }
        None => {
            // Unsigned now: a signature of an earlier publication would not match.
            let _ = std::fs::remove_file(&sig_path);
            None
        }
    };
    staging::write_atomic(&manifest_path, &json)?;
    records::save(
        cfg,
        &Record { pool: pool.into(), manifest: m.clone(), path: path.clone(), state: RecordState::Published },
    )?;
    Ok(Published {
        manifest: m,
        manifest_path: abs(&manifest_path),
        torrent_path: abs(&torrent_path),
        path,
        signature_path,
    })
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};
    use crate::pools::DirPools;

    fn setup() -> (tempfile::TempDir, Config, DirPools, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (state, pool) = (tmp.path().join("state"), tmp.path().join("pool"));
        std::fs::create_dir(&pool).unwrap();
        let o = Overrides { state_dir: Some(state), advertise: Some("127.0.0.1".into()), ..Default::default() };
        let cfg = Config::merge(FileConfig::default(), &o).unwrap();
        let pools = DirPools::new().with("p", &pool);
        (tmp, cfg, pools, pool)
    }

    #[test]
    fn with_a_signing_key_the_manifest_file_gets_a_signature_of_its_exact_bytes() {
        let (tmp, mut cfg, pools, dir) = setup();
        std::fs::write(dir.join("m.raw"), vec![7u8; 65536]).unwrap();
        let p = publish_in(&cfg, &pools, "p", "m.raw").unwrap();
        assert!(p.signature_path.is_none());
        let sig_path = cfg.published_dir().join("m.raw.json.sig");
        std::fs::write(&sig_path, "stale").unwrap();
        publish_in(&cfg, &pools, "p", "m.raw").unwrap();
        assert!(!sig_path.exists(), "an unsigned publication leaves no stale signature");

        let k = crate::sign::SigningKey::from_seed(&[9; 32]);
        let key_path = tmp.path().join("key");
        std::fs::write(&key_path, "not a key").unwrap();
        cfg.signing_key = Some(key_path.clone());
        let e = vcc_core::error::one_line(&publish_in(&cfg, &pools, "p", "m.raw").unwrap_err());
        assert!(e.contains("signing key") && e.contains(&key_path.display().to_string()), "{e}");
        std::fs::write(&key_path, k.openssh_private()).unwrap();
        let p = publish_in(&cfg, &pools, "p", "m.raw").unwrap();
        assert_eq!(p.signature_path.as_deref(), Some(sig_path.as_path()));
        let allowed = crate::sign::AllowedSigners::parse(&format!("me {}", k.public_line())).unwrap();
        let text = std::fs::read(&p.manifest_path).unwrap();
        let sig = std::fs::read_to_string(&sig_path).unwrap();
        assert_eq!(allowed.verify(&text, &sig, std::time::SystemTime::now()), Ok("me".into()));
    }

    #[test]
    fn a_qcow2_of_1_eib_is_not_published_as_every_fetcher_would_refuse_it() {
        let (_tmp, cfg, pools, dir) = setup();
        std::fs::write(dir.join("huge.qcow2"), verify::test_qcow2(1 << 60)).unwrap();
        // The policy refuses it before qemu-img would run.
        let e = publish_in(&cfg, &pools, "p", "huge.qcow2").unwrap_err();
        assert!(matches!(&e, PublishError::Refused { source: ImageError::TooBig { .. }, .. }), "{e:?}");
        assert_eq!(
            vcc_core::error::one_line(&e),
            format!(
                "volume 'huge.qcow2' cannot be a master: fetchers would refuse it: virtual size 1152921504606846976 \
                 is above the policy maximum {} (config key max_virtual_size, the same on every host)",
                crate::config::DEFAULT_MAX_VIRTUAL_SIZE
            )
        );
        assert!(!cfg.published_dir().join("huge.qcow2.json").exists(), "no manifest written");
    }

    #[test]
    fn a_raw_volume_any_qemu_probe_would_take_for_another_format_is_not_published() {
        let (_tmp, cfg, pools, dir) = setup();
        let mut vmdk = b"# a comment first\nversion=1\nRW 8 FLAT \"/etc/passwd\" 0\n".to_vec();
        vmdk.resize(65536, 0);
        std::fs::write(dir.join("desc.raw"), &vmdk).unwrap();
        let e = vcc_core::error::one_line(&publish_in(&cfg, &pools, "p", "desc.raw").unwrap_err());
        assert!(e.contains("declared raw, but the content starts like a vmdk image"), "{e}");
        std::fs::write(dir.join("zeros.dmg"), vec![0u8; 65536]).unwrap();
        let e = vcc_core::error::one_line(&publish_in(&cfg, &pools, "p", "zeros.dmg").unwrap_err());
        assert!(e.contains("would probe it as dmg by its name"), "{e}");
    }
}
