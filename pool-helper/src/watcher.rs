//! The daemon's look at libvirt, from outside the hook (which may not call libvirt): masters that
//! defined domains need but this host lacks are fetched ahead of the first start, and pools whose
//! directory holds overlays the hook made are refreshed so libvirt lists them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vcc_core::error::one_line;
use vcc_libvirt::watch::{scan, Scan};
use vcc_libvirt::{Libvirt, LibvirtError};

use vcc_core::control::proto::{Identity, MasterRequest};

use crate::daemon::Daemon;

/// Looks every `interval` until the process ends.
pub fn spawn(daemon: Arc<Daemon>, uri: Option<String>, interval: Duration) {
    let resolving = Resolving::default();
    tokio::spawn(async move {
        loop {
            let u = uri.clone();
            // libvirt is read here, off the async workers; manifest files named in domains'
            // metadata are read when the request is resolved (bounded, off the workers too).
            let looked = tokio::task::spawn_blocking(move || -> Result<Vec<Wanted>, LibvirtError> {
                let lv = Libvirt::open(u.as_deref())?;
                let s = scan(&lv)?;
                for pool in &s.pools_to_refresh {
                    match lv.refresh_pool(pool) {
                        Ok(()) => tracing::info!("refreshed pool '{pool}': it holds overlays made by the hook"),
                        Err(e) => tracing::warn!("{}", one_line(&e)),
                    }
                }
                Ok(wanted(&lv, &s))
            })
            .await;
            match looked {
                Ok(Ok(w)) => prefetch(&daemon, &resolving, w),
                Ok(Err(e)) => tracing::warn!("looking at libvirt for masters to prefetch: {}", one_line(&e)),
                Err(e) => tracing::warn!("looking at libvirt for masters to prefetch: {}", one_line(&e)),
            }
            tokio::time::sleep(interval).await;
        }
    });
}

/// A missing master and how to ask for it.
struct Wanted {
    path: String,
    domains: Vec<String>,
    request: MasterRequest,
}

/// The missing masters and how to name each, as the hook would (docs/many-hosts.md): the manifest
/// file their metadata names, else their identity, else (a plain `<backingStore>`) the file name
/// in the pool whose directory holds it, resolved through the trusted catalog. Blocking: it asks
/// libvirt for the pools' directories.
fn wanted(lv: &Libvirt, s: &Scan) -> Vec<Wanted> {
    let mut pool_dirs: Option<Vec<(String, String)>> = None;
    let mut out = Vec::new();
    for m in &s.missing {
        let r = &m.master;
        let path = std::path::Path::new(&r.path);
        let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let mut pool = r.pool.clone();
        if pool.is_none() {
            let dirs = pool_dirs.get_or_insert_with(|| match lv.pool_targets() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("listing storage pools: {}", one_line(&e));
                    Vec::new()
                }
            });
            let parent = path.parent().unwrap_or(std::path::Path::new("/"));
            let holding: Vec<&String> =
                dirs.iter().filter(|(_, d)| std::path::Path::new(d) == parent).map(|(n, _)| n).collect();
            if let [one] = holding.as_slice() {
                pool = Some((*one).clone());
            }
        }
        let Some(pool) = pool else {
            tracing::debug!("{} is missing but no pool holds its directory", r.path);
            continue;
        };
        let request = match (&r.manifest, &r.sha256) {
            (Some(manifest), _) => MasterRequest::by_path(Some(pool), manifest.clone()),
            (None, Some(sha256)) => {
                let id = Identity {
                    name,
                    format: r.format.clone(),
                    sha256: sha256.clone(),
                    info_hash: r.info_hash.clone(),
                    virtual_size: r.virtual_size,
                };
                MasterRequest::by_identity(Some(pool), id)
            }
            (None, None) => MasterRequest::by_name(Some(pool), name),
        };
        out.push(Wanted { path: r.path.clone(), domains: m.domains.clone(), request });
    }
    out
}

/// The masters being resolved now (a resolution may wait for peers longer than an interval).
type Resolving = Arc<Mutex<HashSet<String>>>;

/// Starts (or joins) a fetch for every wanted master, each resolved in a task of its own.
fn prefetch(daemon: &Arc<Daemon>, resolving: &Resolving, wanted: Vec<Wanted>) {
    for w in wanted {
        if !resolving.lock().unwrap_or_else(|p| p.into_inner()).insert(w.path.clone()) {
            continue;
        }
        let (daemon, resolving) = (daemon.clone(), resolving.clone());
        tokio::spawn(async move {
            match daemon.prefetch_request(&w.request).await {
                Ok(true) => tracing::info!("prefetching {} for {} before it starts", w.path, w.domains.join(", ")),
                Ok(false) => {}
                // A plain backing store that the catalog does not (yet) name is common: quieter.
                Err(e) if w.request.name.is_some() => {
                    tracing::debug!("master {} needed by {}: {e}", w.path, w.domains.join(", "))
                }
                Err(e) => tracing::warn!("master {} needed by {}: {e}", w.path, w.domains.join(", ")),
            }
            resolving.lock().unwrap_or_else(|p| p.into_inner()).remove(&w.path);
        });
    }
}
