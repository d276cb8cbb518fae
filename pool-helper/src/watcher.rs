//! The daemon's look at libvirt, from outside the hook (which may not call libvirt): masters that
//! defined domains need but this host lacks are fetched ahead of the first start, and pools whose
//! directory holds overlays the hook made are refreshed so libvirt lists them.

use std::sync::Arc;
use std::time::Duration;

use vcc_core::error::one_line;
use vcc_libvirt::watch::{scan, Scan};
use vcc_libvirt::{Libvirt, LibvirtError};

use crate::daemon::Daemon;
use crate::manifest::Manifest;

/// Looks every `interval` until the process ends.
pub fn spawn(daemon: Arc<Daemon>, uri: Option<String>, interval: Duration) {
    tokio::spawn(async move {
        loop {
            let u = uri.clone();
            let looked = tokio::task::spawn_blocking(move || -> Result<Scan, LibvirtError> {
                let lv = Libvirt::open(u.as_deref())?;
                let s = scan(&lv)?;
                for pool in &s.pools_to_refresh {
                    match lv.refresh_pool(pool) {
                        Ok(()) => tracing::info!("refreshed pool '{pool}': it holds overlays made by the hook"),
                        Err(e) => tracing::warn!("{}", one_line(&e)),
                    }
                }
                Ok(s)
            })
            .await;
            match looked {
                Ok(Ok(s)) => prefetch(&daemon, &s),
                Ok(Err(e)) => tracing::warn!("looking at libvirt for masters to prefetch: {}", one_line(&e)),
                Err(e) => tracing::warn!("looking at libvirt for masters to prefetch: {}", one_line(&e)),
            }
            tokio::time::sleep(interval).await;
        }
    });
}

/// Starts (or joins) a fetch for every missing master whose domain names its manifest and pool.
fn prefetch(daemon: &Arc<Daemon>, s: &Scan) {
    for m in &s.missing {
        let (Some(pool), Some(path)) = (&m.master.pool, &m.master.manifest) else {
            tracing::debug!("{} is missing but its domains name no pool and manifest", m.master.path);
            continue;
        };
        let manifest = match Manifest::load(std::path::Path::new(path)) {
            Ok(man) => man,
            Err(e) => {
                tracing::warn!("master {} needed by {:?}: {}", m.master.path, m.domains, one_line(&e));
                continue;
            }
        };
        if daemon.prefetch(pool, manifest) {
            tracing::info!("prefetching {} for {} before it starts", m.master.path, m.domains.join(", "));
        }
    }
}
