//! `prepare begin` (and the master half of `migrate`/`restore begin`): make sure every master is
//! here, fetching missing ones through pool-helper within the configured bound, then create missing
//! overlays exactly as virt-clone-cow does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vcc_core::managed::ManagedDisk;
use vcc_core::overlay::{create_file_overlay, BackingSpec, OverlayError, OverlayOptions};
use vcc_core::qemu_img::{QemuImg, QemuImgError};

use vcc_core::control::client::{request_path, ClientError};
use vcc_core::control::proto::{Identity, MasterRequest, Request};

use crate::config::Config;
use crate::places::{PlaceError, Places};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("master '{master}' of disk {target} is missing on this host, and the domain names no pool-helper manifest to fetch it with; copy the master here, or record its manifest (virt-clone-cow metadata, master/@manifest)")]
    NoManifest { master: String, target: String },
    #[error("master '{master}' of disk {target} is missing on this host and could not be fetched")]
    Fetch {
        master: String,
        target: String,
        #[source]
        source: ClientError,
    },
    #[error("master '{master}' of disk {target} is missing on this host and could not be fetched: pool-helper reported success but the master is not there")]
    NotThere { master: String, target: String },
    #[error("pool-helper fetched the master of disk {target} to '{got}', but the domain expects '{master}'; fix the pool or the <backingStore> path")]
    WrongPlace { master: String, target: String, got: String },
    #[error("master '{master}' of disk {target} is {what}, not a regular file; refusing to use it (point the <backingStore> at the image file itself)")]
    NotRegular { master: String, target: String, what: &'static str },
    #[error("cannot read master '{master}' of disk {target}")]
    Master {
        master: String,
        target: String,
        #[source]
        source: QemuImgError,
    },
    #[error("refusing to make the overlay of disk {target}")]
    Place {
        target: String,
        #[source]
        source: PlaceError,
    },
    #[error("cannot create the overlay for disk {target}")]
    Overlay {
        target: String,
        #[source]
        source: OverlayError,
    },
}

/// Ensures masters (and, when `create_overlays`, overlays) for `disks`. A master must be a regular
/// file (a symlink to one is fine): qemu-img is never pointed at a FIFO, a device or a directory.
pub fn prepare(
    domain: &str,
    disks: &[ManagedDisk],
    cfg: &Config,
    create_overlays: bool,
    log: &mut dyn Write,
) -> Result<(), PrepareError> {
    let deadline = Instant::now() + cfg.fetch_timeout;
    for d in disks {
        if !d.master_exists() {
            fetch_master(domain, d, cfg, deadline, log)?;
        }
        if let Some(what) = d.master_not_regular() {
            return Err(PrepareError::NotRegular { master: d.master.path.clone(), target: d.target.clone(), what });
        }
    }
    if create_overlays {
        let todo: Vec<&ManagedDisk> = disks.iter().filter(|d| !d.overlay_exists()).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let places = Places::load(cfg);
        // Every disk is checked before any overlay is made, so a refused domain leaves nothing
        // behind; and again right before its overlay is made, whose resolved paths are used.
        for d in &todo {
            placed(&places, d)?;
        }
        for d in todo {
            let (overlay, master) = placed(&places, d)?;
            create_overlay(domain, d, &overlay, &master, log)?;
            let _ = writeln!(
                log,
                "virt-clone-cow-hook: {domain}: created overlay {} over {}",
                d.overlay.display(),
                d.master.path
            );
        }
    }
    Ok(())
}

fn fetch_master(
    domain: &str,
    d: &ManagedDisk,
    cfg: &Config,
    deadline: Instant,
    log: &mut dyn Write,
) -> Result<(), PrepareError> {
    let m = &d.master;
    let pool = m.pool.clone();
    let wanted = match (&m.manifest, &m.sha256) {
        // A manifest file on this host; one named on the publishing host (a clone's XML taken
        // here) gives way to the identity recorded beside it.
        (Some(path), sha) if sha.is_none() || Path::new(path).exists() => MasterRequest::by_path(pool, path.clone()),
        (_, Some(sha)) => {
            // The master's identity as the domain's metadata records it (trusted: the domain XML
            // is the administrator's); the daemon resolves it (catalog, or peers by magnet).
            let name = Path::new(&m.path).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let id = Identity {
                name,
                format: m.format.clone(),
                sha256: sha.clone(),
                info_hash: m.info_hash.clone(),
                virtual_size: m.virtual_size,
            };
            MasterRequest::by_identity(pool, id)
        }
        (_, None) => return Err(PrepareError::NoManifest { master: m.path.clone(), target: d.target.clone() }),
    };
    let req = Request::Ensure(wanted);
    let _ = writeln!(log, "virt-clone-cow-hook: {domain}: master {} is missing; asking pool-helper for it", m.path);
    let mut last_print = Instant::now();
    let got = request_path(&cfg.control_socket, cfg.connect_timeout, deadline, &req, |p| {
        if last_print.elapsed() >= cfg.progress_interval {
            let _ = writeln!(log, "virt-clone-cow-hook: {domain}: fetching {}: {p}", m.path);
            last_print = Instant::now();
        }
    })
    .map_err(|source| PrepareError::Fetch { master: m.path.clone(), target: d.target.clone(), source })?;
    if let Some(got) = got {
        if got != Path::new(&m.path) {
            return Err(PrepareError::WrongPlace {
                master: m.path.clone(),
                target: d.target.clone(),
                got: got.display().to_string(),
            });
        }
    }
    if !d.master_exists() {
        return Err(PrepareError::NotThere { master: m.path.clone(), target: d.target.clone() });
    }
    Ok(())
}

/// How long one qemu-img run may take in the hook: libvirt waits for the hook with no limit while
/// holding the domain's lock, and other calls on the domain fail after ~30 s while it waits.
pub const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the overlay of `d` is made and the master read (both resolved), when both are inside the
/// allowed directories (see [`crate::places`]).
fn placed(places: &Places, d: &ManagedDisk) -> Result<(PathBuf, PathBuf), PrepareError> {
    let place = |source| PrepareError::Place { target: d.target.clone(), source };
    let master = places.master(Path::new(&d.master.path)).map_err(place)?;
    let overlay = places.overlay(&d.overlay).map_err(place)?;
    Ok((overlay, master))
}

/// qemu-img the way the hook runs it: bounded by [`QEMU_IMG_TIMEOUT`].
pub fn qemu_img() -> QemuImg {
    QemuImg::new().timeout(QEMU_IMG_TIMEOUT)
}

/// The overlay gets the master's size as qemu-img reads it now: a size recorded in the metadata
/// is only a hint, and a wrong one would give the guest a disk of another size than its master.
/// `overlay` and `real_master` are the resolved paths; the overlay names the master as the domain
/// XML does (QEMU opens that path).
fn create_overlay(
    domain: &str,
    d: &ManagedDisk,
    overlay: &Path,
    real_master: &Path,
    log: &mut dyn Write,
) -> Result<(), PrepareError> {
    let m = &d.master;
    let virtual_size = qemu_img()
        .force_share(true)
        .info(real_master, &m.format)
        .map_err(|source| PrepareError::Master { master: m.path.clone(), target: d.target.clone(), source })?
        .virtual_size;
    if let Some(recorded) = m.virtual_size.filter(|v| *v != virtual_size) {
        let _ = writeln!(
            log,
            "virt-clone-cow-hook: {domain}: master {} is {virtual_size} bytes, not the {recorded} its metadata records; using {virtual_size}",
            m.path
        );
    }
    let backing = BackingSpec { path: &m.path, format: &m.format, virtual_size };
    create_file_overlay(overlay, &backing, OverlayOptions::preferred().with_timeout(QEMU_IMG_TIMEOUT))
        .map_err(|source| PrepareError::Overlay { target: d.target.clone(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcc_core::metadata::MasterRef;

    fn disk(dir: &Path, master: &Path, format: &str, recorded_size: Option<u64>) -> ManagedDisk {
        ManagedDisk {
            target: "vda".into(),
            overlay: dir.join("o.qcow2"),
            master: MasterRef {
                path: master.to_string_lossy().into_owned(),
                format: format.into(),
                virtual_size: recorded_size,
                ..Default::default()
            },
            recorded: true,
        }
    }

    /// The settings with `dir` as the one allowed directory (and no pool definitions).
    fn allowing(dir: &Path) -> Config {
        Config {
            allowed_dirs: vec![dir.to_path_buf()],
            pool_config_dir: dir.join("no-pool-definitions"),
            ..Config::default()
        }
    }

    #[test]
    fn a_master_or_an_overlay_outside_the_allowed_directories_is_refused_and_nothing_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("images");
        std::fs::create_dir_all(&allowed).unwrap();
        let good = allowed.join("m.raw");
        std::fs::write(&good, vec![0u8; 4096]).unwrap();
        let escape = allowed.join("escape.raw");
        std::os::unix::fs::symlink("/etc/passwd", &escape).unwrap();
        let cfg = allowing(&allowed);
        // A host file as the master (directly, or through a symlink in an allowed directory), and
        // the overlay in /etc: refused before qemu-img runs, naming the setting to change.
        let cases = [
            (disk(&allowed, Path::new("/etc/passwd"), "raw", None), "master '/etc/passwd' is in /etc "),
            (disk(&allowed, &escape, "raw", None), "is in /etc (symlinks resolved)"),
            (
                ManagedDisk {
                    overlay: PathBuf::from("/etc/vcc-hook-test-never.qcow2"),
                    ..disk(&allowed, &good, "raw", None)
                },
                "overlay '/etc/vcc-hook-test-never.qcow2' is in /etc ",
            ),
        ];
        for (d, says) in cases {
            // A second disk that would be fine comes first: nothing is made for it either.
            let fine = ManagedDisk {
                target: "vdb".into(),
                overlay: allowed.join("fine.qcow2"),
                ..disk(&allowed, &good, "raw", None)
            };
            let e = prepare("vm", &[fine, d.clone()], &cfg, true, &mut Vec::new()).unwrap_err();
            let msg = vcc_core::error::one_line(&e);
            assert!(matches!(e, PrepareError::Place { .. }), "{msg}");
            assert!(msg.starts_with("refusing to make the overlay of disk vda: ") && msg.contains(says), "{msg}");
            assert!(msg.contains("add \"/etc\" to `allowed_dirs` in /etc/virt-clone-cow/hook.toml"), "{msg}");
            assert!(!d.overlay.exists() && !allowed.join("fine.qcow2").exists(), "{msg}");
        }
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn the_overlay_has_the_masters_size_whatever_the_metadata_says() {
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("m.raw");
        std::fs::write(&master, vec![0u8; 1 << 20]).unwrap();
        let d = disk(dir.path(), &master, "raw", Some(1 << 30));
        let mut log = Vec::new();
        prepare("vm", std::slice::from_ref(&d), &allowing(dir.path()), true, &mut log).unwrap();
        let info = qemu_img().force_share(true).info(&d.overlay, "qcow2").unwrap();
        assert_eq!(info.virtual_size, 1 << 20);
        assert_eq!(info.backing.as_deref(), Some(d.master.path.as_str()));
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("not the 1073741824 its metadata records"), "{log}");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs mkfifo")]
    fn a_master_that_is_a_fifo_or_a_directory_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("m.fifo");
        vcc_core::process::run("mkfifo", &[fifo.to_str().unwrap()]).unwrap();
        for (master, what) in [(fifo.as_path(), "a FIFO"), (dir.path(), "a directory")] {
            let d = disk(dir.path(), master, "raw", None);
            let t0 = Instant::now();
            let e = prepare("vm", &[d], &Config::default(), true, &mut Vec::new()).unwrap_err();
            assert!(matches!(e, PrepareError::NotRegular { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(what) && msg.contains("not a regular file") && msg.contains(&master.display().to_string()),
                "{msg}"
            );
            assert!(t0.elapsed() < std::time::Duration::from_secs(2));
            assert!(!dir.path().join("o.qcow2").exists());
        }
        // Also on migrate/restore, where no overlay is made.
        let e = prepare("vm", &[disk(dir.path(), &fifo, "raw", None)], &Config::default(), false, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(e, PrepareError::NotRegular { .. }), "{e}");
    }
}
