//! `prepare begin` (and the master half of `migrate`/`restore begin`): make sure every master is
//! here, fetching missing ones through pool-helper within the configured bound, then create missing
//! overlays exactly as virt-clone-cow does.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use virt_clone_cow::overlay::{create_file_overlay, image_info, BackingSpec, OverlayError, OverlayOptions};

use crate::config::Config;
use crate::daemon::{request_path, DaemonError};
use virt_clone_cow::managed::{LinkedDisks, ManagedDisk};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("master '{master}' of disk {target} is missing on this host, and the domain names no pool-helper manifest to fetch it with; copy the master here, or record its manifest (virt-clone-cow metadata, master/@manifest)")]
    NoManifest { master: String, target: String },
    #[error("master '{master}' of disk {target} is missing on this host and could not be fetched")]
    Fetch {
        master: String,
        target: String,
        #[source]
        source: DaemonError,
    },
    #[error("pool-helper fetched the master of disk {target} to '{got}', but the domain expects '{master}'; fix the pool or the <backingStore> path")]
    WrongPlace { master: String, target: String, got: String },
    #[error("cannot read master '{master}' of disk {target}")]
    Master {
        master: String,
        target: String,
        #[source]
        source: OverlayError,
    },
    #[error("cannot create the overlay for disk {target}")]
    Overlay {
        target: String,
        #[source]
        source: OverlayError,
    },
}

/// Ensures masters (and, when `create_overlays`, overlays) for every managed disk.
pub fn prepare(domain: &str, plan: &LinkedDisks, cfg: &Config, create_overlays: bool, log: &mut dyn Write) -> Result<(), PrepareError> {
    let deadline = Instant::now() + cfg.fetch_timeout;
    for d in &plan.disks {
        if !d.master_exists() {
            fetch_master(domain, d, cfg, deadline, log)?;
        }
    }
    if create_overlays {
        for d in plan.disks.iter().filter(|d| !d.overlay_exists()) {
            create_overlay(d)?;
            let _ = writeln!(log, "virt-clone-cow-hook: {domain}: created overlay {} over {}", d.overlay.display(), d.master.path);
        }
    }
    Ok(())
}

fn fetch_master(domain: &str, d: &ManagedDisk, cfg: &Config, deadline: Instant, log: &mut dyn Write) -> Result<(), PrepareError> {
    let m = &d.master;
    let mut req = serde_json::json!({ "op": "ensure" });
    if let Some(pool) = &m.pool {
        req["pool"] = pool.clone().into();
    }
    match (&m.manifest, &m.sha256) {
        (Some(path), _) => req["manifest_path"] = path.clone().into(),
        (None, Some(sha)) => {
            // An inline manifest from what the domain's metadata records (trusted: the domain XML
            // is the administrator's).
            let name = Path::new(&m.path).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let mut man = serde_json::json!({ "name": name, "format": m.format, "sha256": sha });
            if let Some(ih) = &m.info_hash {
                man["info_hash"] = ih.clone().into();
            }
            if let Some(vs) = m.virtual_size {
                man["virtual_size"] = vs.into();
            }
            req["manifest"] = man;
        }
        (None, None) => return Err(PrepareError::NoManifest { master: m.path.clone(), target: d.target.clone() }),
    }
    let _ = writeln!(log, "virt-clone-cow-hook: {domain}: master {} is missing; asking pool-helper for it", m.path);
    let mut last_print = Instant::now();
    let got = request_path(&cfg.control_socket, cfg.connect_timeout, deadline, &req, |p| {
        if last_print.elapsed() >= cfg.progress_interval {
            let _ = writeln!(log, "virt-clone-cow-hook: {domain}: fetching {}: {}", m.path, p.describe());
            last_print = Instant::now();
        }
    })
    .map_err(|source| PrepareError::Fetch { master: m.path.clone(), target: d.target.clone(), source })?;
    if let Some(got) = got {
        if got != Path::new(&m.path) {
            return Err(PrepareError::WrongPlace { master: m.path.clone(), target: d.target.clone(), got: got.display().to_string() });
        }
    }
    if !d.master_exists() {
        return Err(PrepareError::Fetch {
            master: m.path.clone(),
            target: d.target.clone(),
            source: DaemonError::Protocol("pool-helper reported success but the master is not there".into()),
        });
    }
    Ok(())
}

fn create_overlay(d: &ManagedDisk) -> Result<(), PrepareError> {
    let m = &d.master;
    let virtual_size = match m.virtual_size {
        Some(v) => v,
        None => image_info(&m.path, &m.format)
            .map_err(|source| PrepareError::Master { master: m.path.clone(), target: d.target.clone(), source })?
            .virtual_size,
    };
    let backing = BackingSpec { path: &m.path, format: &m.format, virtual_size };
    create_file_overlay(&d.overlay, &backing, OverlayOptions::preferred())
        .map_err(|source| PrepareError::Overlay { target: d.target.clone(), source })
}
