//! Getting a master into a pool: the pipeline shared by the daemon and in-process `fetch`.
//!
//! manifest → pool directory ([`Pools`]: libvirt, or plain directories in tests) → already there and verified? → staging file (0700 dir,
//! preallocated) → validated metainfo → download (librqbit, peers from config + manifest hints)
//! → SHA-256 + own header checks + qemu-img → fsync, 0444, renameat2(NOREPLACE), fsync dir →
//! pool refresh ([`Pools`]) → record → seed read-only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::manifest::{parse_peer, Manifest, ManifestError};
use crate::metainfo::{self, MetainfoError};
use crate::pools::{LibvirtPools, PoolError, Pools};
use crate::records::{self, Record, RecordState};
use crate::staging::{self, StagingError};
use crate::torrent::{Failure, Handle, Progress, Stopped, TorrentError, TorrentState, Torrents};
use crate::verify::{self, ImageError};
use vcc_core::control::proto::FinalState;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Torrent(#[from] TorrentError),
    #[error("metainfo for '{name}' refused")]
    Metainfo {
        name: String,
        #[source]
        source: MetainfoError,
    },
    #[error("'{name}' failed verification (nothing was put in the pool)")]
    Image {
        name: String,
        #[source]
        source: ImageError,
    },
    #[error("'{path}' is already in the pool but differs from the manifest")]
    Conflict {
        path: String,
        #[source]
        source: ImageError,
    },
    #[error("cannot stat '{path}'")]
    Stat {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("'{path}' is gone")]
    Gone { path: String },
    #[error("download of '{name}' failed")]
    Download {
        name: String,
        #[source]
        source: Stopped,
    },
    #[error("disk full while downloading '{name}' (staging file removed, nothing in the pool)")]
    DiskFull {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("download of '{name}' stalled: no progress for {secs} s ({peers} peers connected)")]
    Stalled { name: String, secs: u64, peers: u32 },
    #[error("a blocking task of the fetch died")]
    Task(#[source] tokio::task::JoinError),
    /// A task of the daemon panicked (a bug, or a peer that found one in librqbit): its waiters
    /// get this as their final answer, and the next request starts afresh.
    #[error("the {task} task panicked: {message}")]
    Panicked { task: &'static str, message: String },
}

/// What a process needs to fetch and seed.
#[derive(Debug)]
pub struct Ctx {
    pub cfg: Config,
    pub torrents: Torrents,
    /// Where pools are (libvirt, or plain directories in tests).
    pub pools: Arc<dyn Pools>,
    /// The trusted LAN catalog (docs/many-hosts.md).
    pub catalog: Arc<crate::catalog::Catalog>,
}

/// How a fetch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already in the pool and verified.
    Present(PathBuf),
    /// Downloaded, verified and published.
    Fetched(PathBuf),
}

impl Outcome {
    pub fn path(&self) -> &Path {
        match self {
            Outcome::Present(p) | Outcome::Fetched(p) => p,
        }
    }

    /// The `state` a final answer reports for it.
    pub fn state(&self) -> FinalState {
        match self {
            Outcome::Present(_) => FinalState::Present,
            Outcome::Fetched(_) => FinalState::Fetched,
        }
    }
}

/// Events during a fetch.
#[derive(Debug, Clone)]
pub enum Event {
    /// The download is running; `have_bytes` were already in staging (resumed).
    Started {
        have_bytes: u64,
        total_bytes: u64,
    },
    Progress(Progress),
    /// The download's torrent, for a lazy export to read verified pieces from (docs/lazy.md).
    Downloading(Handle),
    Verifying,
    /// The master passed every check and is in the pool at this path (its download torrent is
    /// about to go).
    Published(PathBuf),
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(f).await.map_err(FetchError::Task)
}

pub fn expect<'a>(cfg: &Config, m: &'a Manifest, qemu_img: bool) -> verify::Expect<'a> {
    let policy = verify::ImagePolicy::of(cfg);
    verify::Expect {
        format: &m.format,
        name: &m.name,
        size: m.size,
        virtual_size: m.virtual_size,
        sha256: &m.sha256,
        policy: verify::ImagePolicy { qemu_img: qemu_img && policy.qemu_img, ..policy },
    }
}

/// Where a master's swarm is: the peers and trackers to try. Computed once per fetch or seed and
/// handed to each step (metainfo, download, seed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swarm {
    pub peers: Vec<SocketAddr>,
    pub trackers: Vec<String>,
}

impl Ctx {
    /// A context whose pools are libvirt's (the daemon and the CLI).
    pub fn new(cfg: Config, torrents: Torrents) -> Self {
        let pools = Arc::new(LibvirtPools::new(&cfg));
        Ctx { cfg, torrents, pools, catalog: Arc::default() }
    }

    /// The swarm of `m`: see [`peers_for`] and [`Ctx::trackers_for`]. Peer names are resolved on
    /// the blocking pool: a slow resolver must not stall the runtime's workers.
    pub async fn swarm_for(&self, m: &Manifest) -> Result<Swarm, FetchError> {
        let peers = self.peers_with(m.peer_hints()).await?;
        Ok(Swarm { peers, trackers: self.trackers_for(m) })
    }

    /// Peers to try: the config's, then `hints` (resolved off the async workers, ourselves left
    /// out: see [`peers_for`]).
    pub async fn peers_with(&self, hints: Vec<String>) -> Result<Vec<SocketAddr>, FetchError> {
        let own = self.torrents.listen_addr().map(|a| a.port()).unwrap_or(self.cfg.listen_port);
        let mut all = self.cfg.peers.clone();
        all.extend(hints);
        let advertise = self.cfg.advertise.clone();
        blocking(move || peers_for(&all, own, advertise.as_deref())).await
    }

    /// Trackers: the config's, then the manifest's others.
    fn trackers_for(&self, m: &Manifest) -> Vec<String> {
        let mut t = self.cfg.trackers.clone();
        t.extend(m.trackers.iter().filter(|x| !self.cfg.trackers.contains(x)).cloned());
        t
    }

    /// The validated metainfo: from the manifest, or from peers via the magnet.
    pub async fn metainfo(&self, m: &Manifest, swarm: &Swarm) -> Result<Vec<u8>, FetchError> {
        let bytes = match m.torrent_bytes() {
            Some(b) => b,
            None => {
                let magnet = m.librqbit_magnet();
                self.torrents.resolve_magnet(&magnet, &m.info_hash, swarm.peers.clone(), &swarm.trackers).await?
            }
        };
        let err = |source| FetchError::Metainfo { name: m.name.clone(), source };
        let mi = metainfo::validate(&bytes, Some(m.size)).map_err(err)?;
        if mi.info_hash != m.info_hash {
            return Err(err(MetainfoError::InfoHash { got: mi.info_hash, want: m.info_hash.clone() }));
        }
        if mi.piece_length != m.piece_length {
            return Err(err(MetainfoError::PieceLength(mi.piece_length)));
        }
        Ok(bytes)
    }

    /// Checks the master already in the pool (if any). Ok(None): not there.
    pub async fn check_present(&self, m: &Manifest, dest: &Path) -> Result<Option<PathBuf>, FetchError> {
        match std::fs::symlink_metadata(dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FetchError::Stat { path: dest.display().to_string(), source }),
            Ok(_) => {
                let (cfg, m2, d) = (self.cfg.clone(), m.clone(), dest.to_path_buf());
                blocking(move || verify::verify_image(&d, &expect(&cfg, &m2, true)))
                    .await?
                    .map_err(|source| FetchError::Conflict { path: dest.display().to_string(), source })?;
                Ok(Some(dest.to_path_buf()))
            }
        }
    }

    /// Seeds a verified master in the pool (read-only).
    pub async fn seed(&self, m: &Manifest, path: &Path) -> Result<Handle, FetchError> {
        let swarm = self.swarm_for(m).await?;
        let torrent = self.metainfo(m, &swarm).await?;
        Ok(self.torrents.seed(&torrent, path, swarm.peers, &swarm.trackers).await?)
    }

    /// The whole pipeline. `on_event` is called about once a second while downloading.
    pub async fn fetch(
        &self,
        pool: &str,
        m: &Manifest,
        on_event: &(dyn Fn(Event) + Send + Sync),
    ) -> Result<(Outcome, Option<Handle>), FetchError> {
        m.validate()?;
        let (pools, p) = (self.pools.clone(), pool.to_string());
        let pool_dir = blocking(move || pools.dir(&p)).await??;
        let dest = pool_dir.join(&m.name);
        if let Some(path) = self.check_present(m, &dest).await? {
            return Ok((Outcome::Present(path), None));
        }
        let swarm = self.swarm_for(m).await?;
        let torrent = self.metainfo(m, &swarm).await?;
        // Keep the validated metainfo with the record, so seeding later needs no peer for it.
        let m = &Manifest { torrent_hex: Some(hex::encode(&torrent)), ..m.clone() };
        let sdir = staging::staging_dir(&pool_dir, &self.cfg.state_dir, staging::POOL_HELPER_FALLBACK, pool)?;
        let (sd, name, size) = (sdir.clone(), m.name.clone(), m.size);
        let staged = blocking(move || staging::prepare_file(&sd, &name, size)).await??;
        records::save(
            &self.cfg,
            &Record { pool: pool.into(), manifest: m.clone(), path: dest.clone(), state: RecordState::Pending },
        )?;

        let h = self.torrents.download(&torrent, &staged, swarm.peers.clone(), &swarm.trackers).await?;
        on_event(Event::Downloading(h.clone()));
        if let Err(e) = self.wait(m, &h, on_event).await {
            self.torrents.remove(&h).await;
            if matches!(e, FetchError::DiskFull { .. }) {
                let _ = std::fs::remove_file(&staged);
                records::remove(&self.cfg, pool, &m.name);
            }
            return Err(e);
        }
        // The finished download keeps seeding (every piece passed its SHA-1, as any piece it
        // uploaded while downloading did) until the read-only seed replaces it: hosts that finish
        // together would otherwise all leave the swarm for the verification, just when the last
        // ones need them. librqbit holds the file open, so the rename below does not disturb it;
        // it writes nothing once complete.
        let published = self.verify_and_publish(pool, m, &staged, &pool_dir, on_event).await;
        if let Ok(p) = &published {
            on_event(Event::Published(p.clone()));
        }
        self.torrents.remove(&h).await;
        let path = published?;
        records::save(
            &self.cfg,
            &Record { pool: pool.into(), manifest: m.clone(), path: path.clone(), state: RecordState::Fetched },
        )?;
        let h = self.torrents.seed(&torrent, &path, swarm.peers, &swarm.trackers).await?;
        Ok((Outcome::Fetched(path), Some(h)))
    }

    /// Whole-file checks, then the master goes into the pool and libvirt learns of it. On a
    /// failed check the staged file and the record go.
    async fn verify_and_publish(
        &self,
        pool: &str,
        m: &Manifest,
        staged: &Path,
        pool_dir: &Path,
        on_event: &(dyn Fn(Event) + Send + Sync),
    ) -> Result<PathBuf, FetchError> {
        on_event(Event::Verifying);
        let (cfg, m2, st) = (self.cfg.clone(), m.clone(), staged.to_path_buf());
        if let Err(source) = blocking(move || verify::verify_image(&st, &expect(&cfg, &m2, true))).await? {
            let _ = std::fs::remove_file(staged);
            let err = FetchError::Image { name: m.name.clone(), source };
            // This manifest can never succeed: the record says why, and is not resumed at start-up.
            let failed = RecordState::Failed { error: vcc_core::error::one_line(&err) };
            let r = Record { pool: pool.into(), manifest: m.clone(), path: pool_dir.join(&m.name), state: failed };
            if let Err(e) = records::save(&self.cfg, &r) {
                tracing::warn!("recording the failure of '{}': {}", m.name, vcc_core::error::one_line(&e));
                records::remove(&self.cfg, pool, &m.name);
            }
            return Err(err);
        }
        let (st, pd, name) = (staged.to_path_buf(), pool_dir.to_path_buf(), m.name.clone());
        let path = blocking(move || staging::publish(&st, &pd, &name)).await??;
        let (pools, p) = (self.pools.clone(), pool.to_string());
        blocking(move || pools.refresh(&p)).await??;
        Ok(path)
    }

    async fn wait(&self, m: &Manifest, h: &Handle, on_event: &(dyn Fn(Event) + Send + Sync)) -> Result<(), FetchError> {
        let name = m.name.clone();
        let stall = Duration::from_secs(self.cfg.stall_timeout);
        let mut last_done = 0u64;
        let mut last_change = Instant::now();
        let mut started = false;
        loop {
            let p = h.progress();
            if p.state == TorrentState::Error {
                return Err(match h.failure() {
                    Failure::DiskFull(source) => FetchError::DiskFull { name, source },
                    Failure::Stopped(source) => FetchError::Download { name, source },
                });
            }
            if p.state == TorrentState::Live && !started {
                started = true;
                on_event(Event::Started { have_bytes: p.done_bytes, total_bytes: p.total_bytes });
            }
            if p.state == TorrentState::Live {
                on_event(Event::Progress(p.clone()));
            }
            if p.finished && p.state == TorrentState::Live {
                return Ok(());
            }
            if p.done_bytes != last_done || p.state == TorrentState::Initializing {
                last_done = p.done_bytes;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                return Err(FetchError::Stalled { name, secs: stall.as_secs(), peers: p.peers });
            }
            // Wake at completion rather than at the next tick: up to a second sooner, during which
            // this host would otherwise keep its finished copy out of the pool.
            let tick = Duration::from_millis(if started { 1000 } else { 200 });
            let _ = tokio::time::timeout(tick, h.completed()).await;
        }
    }
}

/// Shared context.
pub type SharedCtx = Arc<Ctx>;

/// Peers to try: `hints` (config list plus manifest hints) resolved, minus ourselves (our port on
/// a loopback, unspecified or advertised address). Resolves names: call it off the async workers.
fn peers_for(hints: &[String], own_port: u16, advertise: Option<&str>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for h in hints {
        let Ok(addrs) = parse_peer(h) else { continue };
        for a in addrs {
            let me = a.port() == own_port
                && (a.ip().is_loopback() || a.ip().is_unspecified() || advertise.is_some_and(|adv| h.starts_with(adv)));
            if !me && !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_reads_as_one_line_with_its_cause_once() {
        let e = FetchError::DiskFull { name: "m.raw".into(), source: std::io::Error::from_raw_os_error(libc::ENOSPC) };
        let line = vcc_core::error::one_line(&e);
        assert_eq!(
            line,
            "disk full while downloading 'm.raw' (staging file removed, nothing in the pool): \
             No space left on device (os error 28)"
        );
    }

    #[test]
    fn a_missing_pool_names_the_pool() {
        let e = FetchError::from(PoolError::Unknown("nope".into()));
        assert_eq!(vcc_core::error::one_line(&e), "pool 'nope' is not known here");
    }
}
