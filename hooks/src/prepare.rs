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
use crate::places::{pool_holding, PlaceError, Places};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("master '{master}' of disk {target} is missing on this host; the domain names no manifest or identity to fetch it with, and no storage pool defined in {pools} holds its directory (to look its name up in the LAN catalog); copy the master here, define a pool for its directory, or record its identity (virt-clone-cow metadata, master/@sha256 and @info-hash)")]
    NoManifest { master: String, target: String, pools: String },
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
    #[error("no lazy start for disk {target}: {why}")]
    Lazy { target: String, why: String },
    #[error("cannot create the overlay for disk {target}")]
    Overlay {
        target: String,
        #[source]
        source: OverlayError,
    },
}

/// `now + wait`, capped at [`crate::config::MAX_SECS`]: the settings file caps it at parse time,
/// and a `Config` made another way must not panic at `Instant + Duration` either.
pub fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait.min(Duration::from_secs(crate::config::MAX_SECS))).unwrap_or(now)
}

/// The libvirt step `prepare` runs for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `prepare begin`: missing overlays are made.
    Start,
    /// `restore begin`: no overlay is made; no QEMU has the overlays open (libvirt refuses to
    /// restore a running domain).
    Restore,
    /// `migrate begin` (on the destination): no overlay is made, and none is changed: on shared
    /// storage the source's QEMU still has it open.
    Migrate,
}

/// Ensures masters (and, at [`Step::Start`], overlays) for `disks`. A master must be a regular
/// file (a symlink to one is fine): qemu-img is never pointed at a FIFO, a device or a directory.
pub fn prepare(
    domain: &str,
    disks: &[ManagedDisk],
    cfg: &Config,
    step: Step,
    log: &mut dyn Write,
) -> Result<(), PrepareError> {
    let create_overlays = step == Step::Start;
    let deadline = deadline_after(cfg.fetch_timeout);
    for d in disks {
        // A restored or incoming guest whose overlay reads its master's export (docs/lazy.md)
        // reads it again: the export is asked for, not the whole master.
        let lazy = crate::lazy::applies(d, cfg) && (create_overlays || crate::lazy::reads_export(d, cfg));
        if lazy && !d.master_exists() && crate::lazy::start(domain, d, cfg, deadline, log)? {
            continue; // its overlay reads the master's export (docs/lazy.md)
        }
        if !d.master_exists() {
            fetch_master(domain, d, cfg, deadline, log)?;
        }
        if lazy && step != Step::Migrate && d.overlay_exists() {
            crate::lazy::repoint(domain, d, cfg, log)?;
        }
        if let Some(what) = d.master_not_regular() {
            return Err(PrepareError::NotRegular { master: d.master.path.clone(), target: d.target.clone(), what });
        }
    }
    if create_overlays {
        let todo: Vec<&ManagedDisk> = disks.iter().filter(|d| !d.overlay_exists() && d.master_exists()).collect();
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
            create_overlay(domain, d, &overlay, &master, cfg, log)?;
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

/// What to ask pool-helper for the master of `d`: by manifest, identity, or name.
pub(crate) fn wanted_of(d: &ManagedDisk, cfg: &Config) -> Result<MasterRequest, PrepareError> {
    let m = &d.master;
    // The pool the metadata names, else the one whose directory holds the master (from the pool
    // definitions, never libvirt).
    let pool = m.pool.clone().or_else(|| pool_holding(&cfg.pool_config_dir, Path::new(&m.path)));
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
        (_, None) => {
            // A plain <backingStore>: the pool whose directory holds it (from the pool definitions,
            // never libvirt), and the file name as the volume name, resolved by the daemon
            // through the trusted LAN catalog.
            let name = Path::new(&m.path).file_name().map(|f| f.to_string_lossy().into_owned());
            match (pool, name) {
                (Some(pool), Some(name)) => MasterRequest::by_name(Some(pool), name),
                _ => {
                    return Err(PrepareError::NoManifest {
                        master: m.path.clone(),
                        target: d.target.clone(),
                        pools: cfg.pool_config_dir.display().to_string(),
                    })
                }
            }
        }
    };
    Ok(wanted)
}

fn fetch_master(
    domain: &str,
    d: &ManagedDisk,
    cfg: &Config,
    deadline: Instant,
    log: &mut dyn Write,
) -> Result<(), PrepareError> {
    let m = &d.master;
    let req = Request::Ensure(wanted_of(d, cfg)?.for_domain(domain));
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
    cfg: &Config,
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
    let opts = OverlayOptions::preferred().with_layout(cfg.overlay_layout).with_timeout(QEMU_IMG_TIMEOUT);
    create_file_overlay(overlay, &backing, opts)
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
            master_in_xml: true,
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
            let e = prepare("vm", &[fine, d.clone()], &cfg, Step::Start, &mut Vec::new()).unwrap_err();
            let msg = vcc_core::error::one_line(&e);
            assert!(matches!(e, PrepareError::Place { .. }), "{msg}");
            assert!(msg.starts_with("refusing to make the overlay of disk vda: ") && msg.contains(says), "{msg}");
            assert!(msg.contains("add \"/etc\" to `allowed_dirs` in /etc/virt-clone-cow/hook.toml"), "{msg}");
            assert!(!d.overlay.exists() && !allowed.join("fine.qcow2").exists(), "{msg}");
        }
    }

    /// Runs `prepare` on one disk whose master is missing, against a stand-in daemon that answers
    /// every request with an error; returns the request line it got (None: no request) and the
    /// error.
    fn ask(master: MasterRef, cfg: Config) -> (Option<String>, String) {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        l.set_nonblocking(true).unwrap();
        let server = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let mut line = String::new();
                        BufReader::new(&s).read_line(&mut line).unwrap();
                        let _ = writeln!(s, r#"{{"ok":false,"error":"stand-in"}}"#);
                        return Some(line.trim().to_string());
                    }
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    Err(_) => return None,
                }
            }
        });
        let d = ManagedDisk {
            target: "vda".into(),
            overlay: dir.path().join("o.qcow2"),
            master,
            recorded: false,
            master_in_xml: true,
        };
        let cfg = Config { control_socket: sock.clone(), fetch_timeout: Duration::from_secs(5), ..cfg };
        let e = prepare("vm", &[d], &cfg, Step::Start, &mut Vec::new()).unwrap_err();
        // Wake the stand-in if nothing was asked.
        let _ = std::os::unix::net::UnixStream::connect(&sock).map(|mut s| writeln!(s));
        let line = server.join().unwrap().filter(|l| !l.is_empty());
        (line, vcc_core::error::one_line(&e))
    }

    #[test]
    fn a_master_named_by_identity_is_asked_for_by_identity() {
        let m = MasterRef {
            path: "/var/lib/libvirt/images/base.qcow2".into(),
            format: "qcow2".into(),
            virtual_size: Some(1 << 30),
            pool: Some("default".into()),
            sha256: Some("ab".repeat(32)),
            info_hash: Some("cd".repeat(20)),
            ..Default::default()
        };
        let (line, e) = ask(m, Config::default());
        let want = format!(
            r#"{{"op":"ensure","pool":"default","identity":{{"name":"base.qcow2","format":"qcow2","sha256":"{}","info_hash":"{}","virtual_size":1073741824}},"domain":"vm"}}"#,
            "ab".repeat(32),
            "cd".repeat(20)
        );
        assert_eq!(line.as_deref(), Some(want.as_str()));
        assert!(e.contains("stand-in"), "{e}");
    }

    #[test]
    fn a_plain_backing_store_is_asked_for_by_name_in_the_pool_holding_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (defs, images) = (dir.path().join("storage"), dir.path().join("images"));
        std::fs::create_dir_all(&defs).unwrap();
        std::fs::create_dir_all(&images).unwrap();
        let pool =
            format!("<pool type='dir'><name>imgs</name><target><path>{}</path></target></pool>", images.display());
        std::fs::write(defs.join("imgs.xml"), pool).unwrap();
        let cfg = Config { pool_config_dir: defs.clone(), ..Config::default() };
        let plain = |path: &Path| MasterRef {
            path: path.to_string_lossy().into_owned(),
            format: "qcow2".into(),
            ..Default::default()
        };
        let (line, _) = ask(plain(&images.join("debian-12.qcow2")), cfg.clone());
        assert_eq!(line.as_deref(), Some(r#"{"op":"ensure","pool":"imgs","name":"debian-12.qcow2","domain":"vm"}"#));
        // An identity whose metadata names no pool goes into that pool too.
        let id = MasterRef { sha256: Some("ab".repeat(32)), ..plain(&images.join("debian-12.qcow2")) };
        let (line, _) = ask(id, cfg.clone());
        let want = format!(
            r#"{{"op":"ensure","pool":"imgs","identity":{{"name":"debian-12.qcow2","format":"qcow2","sha256":"{}"}},"domain":"vm"}}"#,
            "ab".repeat(32)
        );
        assert_eq!(line.as_deref(), Some(want.as_str()));
        // Outside every pool: nothing asked, and the error says what to do.
        let (line, e) = ask(plain(&dir.path().join("elsewhere.qcow2")), cfg);
        assert_eq!(line, None);
        assert!(e.contains("no storage pool defined in") && e.contains("master/@sha256 and @info-hash"), "{e}");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn the_overlay_has_the_masters_size_whatever_the_metadata_says() {
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("m.raw");
        std::fs::write(&master, vec![0u8; 1 << 20]).unwrap();
        let d = disk(dir.path(), &master, "raw", Some(1 << 30));
        let mut log = Vec::new();
        prepare("vm", std::slice::from_ref(&d), &allowing(dir.path()), Step::Start, &mut log).unwrap();
        let info = qemu_img().force_share(true).info(&d.overlay, "qcow2").unwrap();
        assert_eq!(info.virtual_size, 1 << 20);
        assert_eq!(info.backing.as_deref(), Some(d.master.path.as_str()));
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("not the 1073741824 its metadata records"), "{log}");
    }

    #[test]
    fn a_huge_fetch_timeout_is_capped_not_a_panic() {
        let cap = Duration::from_secs(crate::config::MAX_SECS);
        for wait in [Duration::MAX, Duration::from_secs(u64::MAX / 2), cap + Duration::from_secs(1)] {
            let before = Instant::now();
            let d = deadline_after(wait);
            assert!(d >= before + cap && d <= Instant::now() + cap, "{wait:?} gives a day from now");
        }
        let before = Instant::now();
        assert!(deadline_after(Duration::from_secs(7)) >= before + Duration::from_secs(7));
        // The whole of `prepare`, with a Config not read from a file.
        let cfg = Config { fetch_timeout: Duration::MAX, ..Config::default() };
        assert!(prepare("vm", &[], &cfg, Step::Start, &mut Vec::new()).is_ok());
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
            let e = prepare("vm", &[d], &Config::default(), Step::Start, &mut Vec::new()).unwrap_err();
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
        let e =
            prepare("vm", &[disk(dir.path(), &fifo, "raw", None)], &Config::default(), Step::Restore, &mut Vec::new())
                .unwrap_err();
        assert!(matches!(e, PrepareError::NotRegular { .. }), "{e}");
    }
}
