//! `pool-helper serve`: seeds every recorded master (re-verified first), resumes pending fetches,
//! and answers the control socket. Several requests for the same master share one download.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::fetch::{self, Ctx};
use crate::manifest::{Manifest, ManifestError};
use crate::records::{self, RecordState};
use crate::torrent::{Handle, Progress, TorrentState};
use vcc_core::control::proto::{
    self, Event, Final, FinalState, MasterListEntry, MasterRequest, MasterState, MasterStatus, Masters, Request,
};
use vcc_core::error::one_line;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another daemon already listens on '{0}'")]
    Running(String),
    #[error("cannot listen on '{path}'")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a request for a master gets `"ok":false` (the final line's error is its chain).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("bad request")]
    Bad(#[source] serde_json::Error),
    #[error("bad request: missing field `pool`")]
    NoPool,
    #[error("give exactly one of 'manifest' and 'manifest_path'")]
    ManifestChoice,
    #[error("manifest_path '{0}' is not absolute")]
    RelativeManifestPath(String),
    #[error("bad request: the manifest is not a JSON object")]
    ManifestObject(#[source] serde_json::Error),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("pool '{pool}' already has a master named '{name}' with another SHA-256 ({sha256})")]
    OtherSha256 { pool: String, name: String, sha256: String },
    #[error("no published master '{name}' in pool '{pool}' on this host")]
    NotPublished { pool: String, name: String },
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
}

type Key = (String, String); // (pool, name)
/// What a request follows: the fetch's progress and its final line.
type Watches = (watch::Receiver<Option<Progress>>, watch::Receiver<Option<Final>>);

struct Entry {
    manifest: Manifest,
    pool: String,
    state: MasterState,
    path: Option<PathBuf>,
    handle: Option<Handle>,
    error: Option<String>,
    fetches: u32,
    /// Bytes uploaded while this host was still downloading (the download torrent is gone).
    uploaded_base: u64,
    progress: watch::Sender<Option<Progress>>,
    done: watch::Sender<Option<Final>>,
}

impl Entry {
    /// A master in `state`, with no path, torrent or error yet, and fresh watches.
    fn new(manifest: Manifest, pool: String, state: MasterState) -> Entry {
        Entry {
            manifest,
            pool,
            state,
            path: None,
            handle: None,
            error: None,
            fetches: 0,
            uploaded_base: 0,
            progress: watch::channel(None).0,
            done: watch::channel(None).0,
        }
    }
}

/// The daemon's shared state.
pub struct Daemon {
    ctx: Arc<Ctx>,
    masters: Mutex<HashMap<Key, Entry>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

impl Daemon {
    pub fn new(ctx: Arc<Ctx>) -> Arc<Self> {
        Arc::new(Daemon { ctx, masters: Mutex::new(HashMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.masters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds the control socket (0600), refusing to steal one a live daemon answers on.
    pub fn bind(path: &std::path::Path) -> Result<UnixListener, DaemonError> {
        let p = path.display().to_string();
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Running(p));
        }
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DaemonError::Listen { path: p.clone(), source })?;
        }
        let l = UnixListener::bind(path).map_err(|source| DaemonError::Listen { path: p.clone(), source })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| DaemonError::Listen { path: p, source })?;
        Ok(l)
    }

    /// Re-verifies and seeds every recorded master; resumes pending fetches.
    pub fn start_recorded(self: &Arc<Self>) {
        for r in records::load_all(&self.ctx.cfg) {
            let key = (r.pool.clone(), r.manifest.name.clone());
            if r.state == RecordState::Pending {
                tracing::info!(name = %r.manifest.name, "resuming an interrupted fetch");
                let _ = self.start_fetch(key, r.pool.clone(), r.manifest.clone());
                continue;
            }
            let e = Entry {
                path: Some(r.path.clone()),
                ..Entry::new(r.manifest.clone(), r.pool.clone(), MasterState::Verifying)
            };
            self.lock().insert(key.clone(), e);
            let me = self.clone();
            tokio::spawn(async move {
                let res = match me.ctx.check_present(&r.manifest, &r.path).await {
                    Ok(Some(p)) => me.ctx.seed(&r.manifest, &p).await,
                    Ok(None) => Err(fetch::FetchError::Gone { path: r.path.display().to_string() }),
                    Err(e) => Err(e),
                };
                let mut g = me.lock();
                if let Some(e) = g.get_mut(&key) {
                    match res {
                        Ok(h) => {
                            e.state = MasterState::Seeding;
                            e.handle = Some(h);
                        }
                        Err(err) => {
                            tracing::warn!("not seeding {}: {}", r.manifest.name, one_line(&err));
                            e.state = MasterState::Failed;
                            e.error = Some(one_line(&err));
                        }
                    }
                }
            });
        }
    }

    /// Fetches a master ahead of need (the watcher): true when a new download started, false when
    /// it is already here, being fetched, or cannot be (logged).
    pub fn prefetch(self: &Arc<Self>, pool: &str, m: Manifest) -> bool {
        let key = (pool.to_string(), m.name.clone());
        if let Some(e) = self.lock().get(&key) {
            if e.state != MasterState::Failed {
                return false;
            }
        }
        match self.start_fetch(key, pool.to_string(), m) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("prefetch into pool '{pool}': {}", one_line(&e));
                false
            }
        }
    }

    /// Starts a fetch for `key` or joins the running one. Returns the watches to follow.
    fn start_fetch(self: &Arc<Self>, key: Key, pool: String, m: Manifest) -> Result<Watches, Refusal> {
        let mut g = self.lock();
        if let Some(e) = g.get(&key) {
            if e.manifest.sha256 != m.sha256 {
                return Err(Refusal::OtherSha256 { pool, name: m.name, sha256: e.manifest.sha256.clone() });
            }
            match e.state {
                MasterState::Seeding if e.path.as_ref().is_some_and(|p| p.exists()) => {
                    let (_, d) = watch::channel(Some(Final::done(
                        FinalState::Present,
                        &e.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    )));
                    return Ok((e.progress.subscribe(), d));
                }
                MasterState::Fetching | MasterState::Verifying => {
                    return Ok((e.progress.subscribe(), e.done.subscribe()))
                }
                // Failed, or seeding a file that vanished from the pool: try again.
                MasterState::Seeding | MasterState::Failed => {}
            }
        }
        let fetches = g.get(&key).map(|e| e.fetches).unwrap_or(0) + 1;
        // A seed whose file vanished from the pool: drop it before fetching again.
        let stale = g.get_mut(&key).and_then(|e| e.handle.take());
        let e = Entry { fetches, ..Entry::new(m.clone(), pool.clone(), MasterState::Fetching) };
        let (ptx, dtx) = (e.progress.clone(), e.done.clone());
        let (prx, drx) = (ptx.subscribe(), dtx.subscribe());
        g.insert(key.clone(), e);
        drop(g);
        let me = self.clone();
        let last = ptx.subscribe();
        tokio::spawn(async move {
            if let Some(h) = stale {
                me.ctx.torrents.remove(&h).await;
            }
            let total = m.size;
            let on_event = move |ev: fetch::Event| match ev {
                fetch::Event::Progress(p) => {
                    let _ = ptx.send(Some(p));
                }
                fetch::Event::Started { have_bytes, total_bytes } => {
                    let _ = ptx.send(Some(Progress {
                        state: TorrentState::Live,
                        done_bytes: have_bytes,
                        total_bytes,
                        ..Default::default()
                    }));
                }
                fetch::Event::Verifying => {
                    let up = ptx.borrow().as_ref().map(|p| p.uploaded_bytes).unwrap_or(0);
                    // The finished download still seeds while the whole file is checked.
                    let _ = ptx.send(Some(Progress {
                        state: TorrentState::Live,
                        done_bytes: total,
                        total_bytes: total,
                        uploaded_bytes: up,
                        ..Default::default()
                    }));
                }
            };
            let res = me.ctx.fetch(&pool, &m, &on_event).await;
            let seeded = match &res {
                Ok((outcome, None)) => me.ctx.seed(&m, outcome.path()).await.map(Some),
                Ok((_, Some(h))) => Ok(Some(h.clone())),
                Err(_) => Ok(None),
            };
            let uploaded = last.borrow().as_ref().map(|p| p.uploaded_bytes).unwrap_or(0);
            let fin = {
                let mut g = me.lock();
                let mut e = g.get_mut(&key);
                if let Some(e) = e.as_mut() {
                    e.uploaded_base = uploaded;
                }
                match (res, seeded) {
                    (Ok((outcome, _)), Ok(h)) => {
                        if let Some(e) = e {
                            e.state = MasterState::Seeding;
                            e.path = Some(outcome.path().to_path_buf());
                            e.handle = h;
                            e.error = None;
                        }
                        Final::done(outcome.state(), &outcome.path().display().to_string())
                    }
                    (Ok((outcome, _)), Err(err)) => {
                        // In the pool and verified, but seeding failed: still a success for the caller.
                        if let Some(e) = e {
                            e.state = MasterState::Failed;
                            e.path = Some(outcome.path().to_path_buf());
                            e.error = Some(format!("seeding: {}", one_line(&err)));
                        }
                        Final::done(outcome.state(), &outcome.path().display().to_string())
                    }
                    (Err(err), _) => {
                        let msg = one_line(&err);
                        tracing::warn!("fetch failed: {msg}");
                        if let Some(e) = e {
                            e.state = MasterState::Failed;
                            e.error = Some(msg.clone());
                        }
                        Final::error(msg)
                    }
                }
            };
            let _ = dtx.send(Some(fin));
        });
        Ok((prx, drx))
    }

    fn status(&self) -> Vec<MasterStatus> {
        let g = self.lock();
        let mut v: Vec<MasterStatus> = g
            .values()
            .map(|e| {
                let p =
                    e.handle.as_ref().map(|h| h.progress()).or_else(|| e.progress.borrow().clone()).unwrap_or_default();
                MasterStatus {
                    name: e.manifest.name.clone(),
                    pool: e.pool.clone(),
                    sha256: e.manifest.sha256.clone(),
                    state: e.state,
                    path: e.path.as_ref().map(|p| p.display().to_string()),
                    done_bytes: p.done_bytes,
                    total_bytes: if p.total_bytes == 0 { e.manifest.size } else { p.total_bytes },
                    peers: p.peers,
                    up_bps: p.up_bps,
                    down_bps: p.down_bps,
                    uploaded_bytes: e.uploaded_base + p.uploaded_bytes,
                    error: e.error.clone().or(p.error),
                    fetches: e.fetches,
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.pool, &a.name).cmp(&(&b.pool, &b.name)));
        v
    }

    /// The request's pool and its validated manifest (a manifest file is read off the async
    /// workers, bounded: [`Manifest::load`]).
    async fn master_of(r: &MasterRequest) -> Result<(String, Manifest), Refusal> {
        let pool = r.pool.clone().ok_or(Refusal::NoPool)?;
        let m = match (&r.manifest, &r.manifest_path) {
            (Some(obj), None) => Manifest::from_value(obj.to_value().map_err(Refusal::ManifestObject)?)?,
            (None, Some(p)) => {
                if !p.starts_with('/') {
                    return Err(Refusal::RelativeManifestPath(p.clone()));
                }
                Manifest::load_off_runtime(PathBuf::from(p)).await?
            }
            _ => return Err(Refusal::ManifestChoice),
        };
        Ok((pool, m))
    }

    /// Serves connections until the process ends.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.handle(s).await {
                            tracing::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, s: UnixStream) -> std::io::Result<()> {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r).take(proto::MAX_REQUEST_BYTES as u64);
        let mut line = String::new();
        r.read_line(&mut line).await?;
        let req: Request = match serde_json::from_str(line.trim()) {
            Ok(q) => q,
            Err(e) => return write_final(&mut w, &Final::error(one_line(&Refusal::Bad(e)))).await,
        };
        match req {
            Request::Status => write_final(&mut w, &Final::masters(Masters::Status(self.status()))).await,
            Request::List => {
                let l = self
                    .status()
                    .into_iter()
                    .map(|s| MasterListEntry { name: s.name, pool: s.pool, path: s.path, state: s.state })
                    .collect();
                write_final(&mut w, &Final::masters(Masters::List(l))).await
            }
            Request::Seed(mr) => {
                let f = match self.seed_published(&mr).await {
                    Ok(f) => f,
                    Err(e) => Final::error(one_line(&e)),
                };
                write_final(&mut w, &f).await
            }
            Request::Ensure(mr) => self.ensure(w, mr, false).await,
            Request::Fetch(mr) => self.ensure(w, mr, true).await,
        }
    }

    /// `seed`: re-verifies a master this host published and seeds it.
    async fn seed_published(&self, mr: &MasterRequest) -> Result<Final, Refusal> {
        let (pool, m) = Self::master_of(mr).await?;
        let rec = records::load_all(&self.ctx.cfg)
            .into_iter()
            .find(|r| r.pool == pool && r.manifest.name == m.name && r.manifest.sha256 == m.sha256)
            .ok_or_else(|| Refusal::NotPublished { pool: pool.clone(), name: m.name.clone() })?;
        let p = match self.ctx.check_present(&m, &rec.path).await? {
            Some(p) => p,
            None => return Err(fetch::FetchError::Gone { path: rec.path.display().to_string() }.into()),
        };
        let h = self.ctx.seed(&m, &p).await?;
        let key = (pool.clone(), m.name.clone());
        let e = Entry { path: Some(p.clone()), handle: Some(h), ..Entry::new(m, pool, MasterState::Seeding) };
        self.lock().insert(key, e);
        Ok(Final::done(FinalState::Seeding, &p.display().to_string()))
    }

    async fn ensure(
        self: Arc<Self>,
        mut w: tokio::net::unix::OwnedWriteHalf,
        mr: MasterRequest,
        always: bool,
    ) -> std::io::Result<()> {
        let started = Self::master_of(&mr).await.and_then(|(pool, m)| {
            let key = (pool.clone(), m.name.clone());
            let size = m.size;
            self.start_fetch(key, pool, m).map(|w| (w, size))
        });
        let ((mut prx, mut drx), size) = match started {
            Ok(x) => x,
            Err(e) => return write_final(&mut w, &Final::error(one_line(&e))).await,
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent_any = false;
        loop {
            let fin = drx.borrow_and_update().clone();
            if let Some(f) = fin {
                if always && !sent_any {
                    let ev =
                        Event::Progress(proto::Progress { done_bytes: size, total_bytes: size, peers: 0, down_bps: 0 });
                    write_line(&mut w, &ev).await?;
                }
                return write_final(&mut w, &f).await;
            }
            tokio::select! {
                _ = drx.changed() => {}
                _ = tick.tick() => {
                    let p = prx.borrow_and_update().clone();
                    if let Some(p) = p {
                        let ev = Event::Progress(p.event());
                        // A client that went away does not stop the download.
                        write_line(&mut w, &ev).await?;
                        sent_any = true;
                    }
                }
            }
        }
    }
}

async fn write_line<T: serde::Serialize>(w: &mut tokio::net::unix::OwnedWriteHalf, v: &T) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    w.write_all(s.as_bytes()).await
}

async fn write_final(w: &mut tokio::net::unix::OwnedWriteHalf, f: &Final) -> std::io::Result<()> {
    write_line(w, f).await?;
    w.shutdown().await
}
