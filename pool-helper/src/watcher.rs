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

use vcc_core::control::proto::Identity;
use vcc_core::error::one_line;
use vcc_core::metadata::MasterRef;
use vcc_libvirt::watch::{scan, Scan};
use vcc_libvirt::{Libvirt, LibvirtError};

use crate::daemon::Daemon;
use crate::manifest::Manifest;

/// How long the event thread waits before connecting again.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Looks every `interval`, and when a domain is defined, until the process ends.
pub fn spawn(daemon: Arc<Daemon>, uri: Option<String>, interval: Duration) {
    let wake = Arc::new(Notify::new());
    spawn_events(uri.clone(), wake.clone());
    let resolving = Arc::new(Mutex::new(HashSet::new()));
    tokio::spawn(async move {
        loop {
            let u = uri.clone();
            // libvirt and the manifest files named in domains' metadata are read here, off the
            // async workers; each manifest bounded ([`Manifest::load`]).
            let looked = tokio::task::spawn_blocking(move || -> Result<Vec<Wanted>, LibvirtError> {
                let lv = Libvirt::open(u.as_deref())?;
                let s = scan(&lv)?;
                for pool in &s.pools_to_refresh {
                    match lv.refresh_pool(pool) {
                        Ok(()) => tracing::info!("refreshed pool '{pool}': it holds overlays made by the hook"),
                        Err(e) => tracing::warn!("{}", one_line(&e)),
                    }
                }
                Ok(wanted(&s))
            })
            .await;
            match looked {
                Ok(Ok(w)) => prefetch(&daemon, w, &resolving),
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
            tracing::debug!("domain '{name}' defined: looking for its masters now");
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

/// A missing master whose domains name its pool and say how to get it.
struct Wanted {
    path: String,
    domains: Vec<String>,
    pool: String,
    how: How,
}

/// How to get a wanted master.
enum How {
    /// Its manifest, read from the file the metadata names (a file on this host).
    Manifest(Manifest),
    /// Its identity, as the metadata records it: the manifest named is on the publishing host.
    Identity(Identity),
}

/// The missing masters whose domains name their pool and manifest or identity, manifests loaded
/// (blocking: each file is read bounded, within [`crate::manifest::MANIFEST_READ_TIMEOUT`]). A
/// manifest file that is not on this host gives way to the identity, as in the hook.
fn wanted(s: &Scan) -> Vec<Wanted> {
    let mut out = Vec::new();
    for m in &s.missing {
        let Some(pool) = &m.master.pool else {
            tracing::debug!("{} is missing but its domains name no pool", m.master.path);
            continue;
        };
        let how = match (&m.master.manifest, identity(&m.master)) {
            // A manifest file on this host, or the only way the metadata gives.
            (Some(path), id) if id.is_none() || std::path::Path::new(path).exists() => {
                match Manifest::load(std::path::Path::new(path)) {
                    Ok(manifest) => How::Manifest(manifest),
                    Err(e) => {
                        tracing::warn!("master {} needed by {:?}: {}", m.master.path, m.domains, one_line(&e));
                        continue;
                    }
                }
            }
            (_, Some(id)) => How::Identity(id),
            (_, None) => {
                tracing::debug!("{} is missing but its domains say neither manifest nor identity", m.master.path);
                continue;
            }
        };
        out.push(Wanted { path: m.master.path.clone(), domains: m.domains.clone(), pool: pool.clone(), how });
    }
    out
}

/// The identity a master element records, if it records a SHA-256 (the file name is the name).
fn identity(m: &MasterRef) -> Option<Identity> {
    let name = std::path::Path::new(&m.path).file_name()?.to_string_lossy().into_owned();
    Some(Identity {
        name,
        format: m.format.clone(),
        sha256: m.sha256.clone()?,
        info_hash: m.info_hash.clone(),
        virtual_size: m.virtual_size,
    })
}

/// Starts (or joins) a fetch for every wanted master. Identities are resolved in their own tasks
/// (that may ask peers), at most one at a time per master.
fn prefetch(daemon: &Arc<Daemon>, wanted: Vec<Wanted>, resolving: &Arc<Mutex<HashSet<(String, String)>>>) {
    for w in wanted {
        let who = w.domains.join(", ");
        match w.how {
            How::Manifest(m) => {
                if daemon.prefetch(&w.pool, m) {
                    tracing::info!("prefetching {} for {who} before it starts", w.path);
                }
            }
            How::Identity(id) => {
                let key = (w.pool.clone(), id.sha256.clone());
                if !resolving.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
                    continue;
                }
                let (daemon, resolving) = (daemon.clone(), resolving.clone());
                tokio::spawn(async move {
                    if daemon.prefetch_identity(&w.pool, &id).await {
                        tracing::info!("prefetching {} for {who} before it starts (by identity)", w.path);
                    }
                    resolving.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcc_libvirt::watch::MissingMaster;

    fn missing(master: MasterRef) -> Scan {
        Scan { missing: vec![MissingMaster { domains: vec!["vm".into()], master }], pools_to_refresh: Vec::new() }
    }

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

    #[test]
    fn a_manifest_named_on_another_host_gives_way_to_the_identity() {
        for manifest in [Some("/elsewhere/.pool-helper/base.qcow2.json"), None] {
            let w = wanted(&missing(published(manifest)));
            assert_eq!(w.len(), 1, "{manifest:?}");
            let How::Identity(id) = &w[0].how else { panic!("by identity: {manifest:?}") };
            assert_eq!(
                id,
                &Identity {
                    name: "base.qcow2".into(),
                    format: "qcow2".into(),
                    sha256: "ab".repeat(32),
                    info_hash: Some("cd".repeat(20)),
                    virtual_size: Some(1 << 30),
                }
            );
            assert_eq!((w[0].pool.as_str(), w[0].domains.as_slice()), ("default", &["vm".to_string()][..]));
        }
    }

    #[test]
    fn a_master_with_no_pool_or_no_way_to_get_it_is_skipped() {
        assert!(wanted(&missing(MasterRef { pool: None, ..published(None) })).is_empty());
        let nothing = MasterRef { sha256: None, info_hash: None, ..published(None) };
        assert!(wanted(&missing(nothing)).is_empty());
        // A manifest file that is not here and nothing else: logged, skipped.
        let only_manifest = MasterRef { sha256: None, ..published(Some("/nonexistent/m.json")) };
        assert!(wanted(&missing(only_manifest)).is_empty());
    }
}
