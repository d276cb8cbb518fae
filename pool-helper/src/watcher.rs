//! The daemon's look at libvirt, from outside the hook (which may not call libvirt): masters that
//! defined domains need but this host lacks are fetched ahead of the first start, and pools whose
//! directory holds overlays the hook made are refreshed so libvirt lists them.
//!
//! It looks every `watch_interval`, and at once when libvirt reports a domain defined: a thread
//! runs libvirt's event loop ([`vcc_libvirt::events::watch_defined`]) and wakes the look. When
//! the event connection is lost (libvirtd restarted, or stopped answering keepalives) the thread
//! reconnects after [`RECONNECT_DELAY`] and wakes the look too, for the events it missed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use vcc_core::error::one_line;
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
                Ok(Ok(w)) => prefetch(&daemon, w),
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

/// A missing master whose domains name its pool and manifest, with the manifest read.
struct Wanted {
    path: String,
    domains: Vec<String>,
    pool: String,
    manifest: Manifest,
}

/// The missing masters whose domains name their manifest and pool, manifests loaded (blocking:
/// each file is read bounded, within [`crate::manifest::MANIFEST_READ_TIMEOUT`]).
fn wanted(s: &Scan) -> Vec<Wanted> {
    let mut out = Vec::new();
    for m in &s.missing {
        let (Some(pool), Some(path)) = (&m.master.pool, &m.master.manifest) else {
            tracing::debug!("{} is missing but its domains name no pool and manifest", m.master.path);
            continue;
        };
        match Manifest::load(std::path::Path::new(path)) {
            Ok(manifest) => out.push(Wanted {
                path: m.master.path.clone(),
                domains: m.domains.clone(),
                pool: pool.clone(),
                manifest,
            }),
            Err(e) => tracing::warn!("master {} needed by {:?}: {}", m.master.path, m.domains, one_line(&e)),
        }
    }
    out
}

/// Starts (or joins) a fetch for every wanted master.
fn prefetch(daemon: &Arc<Daemon>, wanted: Vec<Wanted>) {
    for w in wanted {
        if daemon.prefetch(&w.pool, w.manifest) {
            tracing::info!("prefetching {} for {} before it starts", w.path, w.domains.join(", "));
        }
    }
}
