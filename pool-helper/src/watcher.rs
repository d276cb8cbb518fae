//! The daemon's look at libvirt, from outside the hook (which may not call libvirt): masters that
//! defined domains need but this host lacks are fetched ahead of the first start, and pools whose
//! directory holds overlays the hook made are refreshed so libvirt lists them.
//!
//! It looks every `watch_interval`, and at once when libvirt reports a domain defined: a thread
//! runs libvirt's event loop ([`vcc_libvirt::events::watch_defined`]) and wakes the look. When
//! the event connection is lost (libvirtd restarted, or stopped answering keepalives) the thread
//! reconnects after [`RECONNECT_DELAY`] and wakes the look too, for the events it missed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use vcc_core::error::one_line;
use vcc_core::metadata::MasterRef;
use vcc_libvirt::watch::{scan, Scan};
use vcc_libvirt::{Libvirt, LibvirtError};

use vcc_core::control::proto::{Identity, MasterRequest};

use crate::daemon::Daemon;

/// How long the event thread waits before connecting again.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Looks every `interval`, and when a domain is defined, until the process ends.
pub fn spawn(daemon: Arc<Daemon>, uri: Option<String>, interval: Duration) {
    let resolving = Resolving::default();
    let wake = Arc::new(Notify::new());
    spawn_events(uri.clone(), wake.clone());
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
            // A wake-up that came while looking is kept (Notify stores one), so a domain defined
            // during a look is seen by the next one, at once.
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = wake.notified() => {}
            }
        }
    });
}

/// The thread that turns libvirt's `DEFINED` events into wake-ups of the look.
fn spawn_events(uri: Option<String>, wake: Arc<Notify>) {
    let spawned = std::thread::Builder::new().name("libvirt-events".into()).spawn(move || loop {
        let w = wake.clone();
        let on_defined = move |name: &str| {
            tracing::info!("domain '{name}' defined: looking for its masters now");
            w.notify_one();
        };
        match vcc_libvirt::events::watch_defined(uri.as_deref(), Default::default(), on_defined) {
            Ok(()) => tracing::warn!("lost libvirt's domain events; reconnecting in {} s", RECONNECT_DELAY.as_secs()),
            Err(e) => tracing::warn!(
                "libvirt's domain events: {}; polling only, trying again in {} s",
                one_line(&e),
                RECONNECT_DELAY.as_secs()
            ),
        }
        std::thread::sleep(RECONNECT_DELAY);
        // Domains defined while we were not listening.
        wake.notify_one();
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the thread for libvirt's domain events ({e}); polling only");
    }
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
        let request = request_for(r, name, pool);
        out.push(Wanted { path: r.path.clone(), domains: m.domains.clone(), request });
    }
    out
}

/// How to ask for a missing master, as the hook asks: the manifest file its metadata names when
/// that file is on this host (or nothing else is recorded), else its identity, else (a plain
/// `<backingStore>`) its file name `name`, resolved through the trusted catalog. A clone's XML
/// taken from the publishing host names the manifest there, and carries the identity beside it.
fn request_for(r: &MasterRef, name: String, pool: String) -> MasterRequest {
    match (&r.manifest, &r.sha256) {
        (Some(manifest), sha256) if sha256.is_none() || std::path::Path::new(manifest).exists() => {
            MasterRequest::by_path(Some(pool), manifest.clone())
        }
        (_, Some(sha256)) => {
            let id = Identity {
                name,
                format: r.format.clone(),
                sha256: sha256.clone(),
                info_hash: r.info_hash.clone(),
                virtual_size: r.virtual_size,
            };
            MasterRequest::by_identity(Some(pool), id)
        }
        (_, None) => MasterRequest::by_name(Some(pool), name),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn published(manifest: Option<&str>) -> MasterRef {
        MasterRef {
            path: "/pool/base.qcow2".into(),
            format: "qcow2".into(),
            virtual_size: Some(1 << 30),
            pool: Some("default".into()),
            sha256: Some("ab".repeat(32)),
            info_hash: Some("cd".repeat(20)),
            manifest: manifest.map(String::from),
            ..Default::default()
        }
    }

    fn ask(r: &MasterRef) -> MasterRequest {
        request_for(r, "base.qcow2".into(), "default".into())
    }

    #[test]
    fn a_manifest_named_on_another_host_gives_way_to_the_identity() {
        let id = Identity {
            name: "base.qcow2".into(),
            format: "qcow2".into(),
            sha256: "ab".repeat(32),
            info_hash: Some("cd".repeat(20)),
            virtual_size: Some(1 << 30),
        };
        for manifest in [Some("/elsewhere/.pool-helper/base.qcow2.json"), None] {
            assert_eq!(ask(&published(manifest)), MasterRequest::by_identity(Some("default".into()), id.clone()));
        }
    }

    #[test]
    fn a_manifest_file_here_or_alone_is_asked_for_by_its_path() {
        let here = tempfile::NamedTempFile::new().unwrap();
        let path = here.path().to_string_lossy().into_owned();
        assert_eq!(ask(&published(Some(&path))), MasterRequest::by_path(Some("default".into()), path));
        let alone = MasterRef { sha256: None, ..published(Some("/nonexistent/m.json")) };
        assert_eq!(ask(&alone), MasterRequest::by_path(Some("default".into()), "/nonexistent/m.json"));
        let plain = MasterRef { sha256: None, info_hash: None, ..published(None) };
        assert_eq!(ask(&plain), MasterRequest::by_name(Some("default".into()), "base.qcow2"));
    }
}
