//! Lazy starts (docs/lazy.md), when the settings say `lazy = true`: a disk whose master is
//! missing and whose XML names no `<backingStore>` (the metadata records the master) gets its
//! overlay over the master's NBD export from pool-helper (`export`), as an
//! `nbd+unix:///?socket=PATH` backing file that libvirt and QEMU open as a network backing store.
//! At a later start, once the master is in the pool, the overlay is pointed back at the master
//! (`qemu-img rebase -u`: the export served exactly the master's bytes).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use vcc_core::control::client::{connect, ClientError};
use vcc_core::control::proto::{FinalState, Request};
use vcc_core::managed::ManagedDisk;
use vcc_core::overlay::{create_overlay_over_export, BackingSpec, OverlayOptions};

use crate::config::Config;
use crate::places::Places;
use crate::prepare::{qemu_img, wanted_of, PrepareError, QEMU_IMG_TIMEOUT};

/// The backing file name of an overlay over the export on `socket`.
pub fn export_url(socket: &str) -> String {
    format!("nbd+unix:///?socket={socket}")
}

/// The socket an overlay's backing file name points at, when it is one of pool-helper's exports
/// (`<control socket's directory>/nbd/<info-hash>.sock`); with `info_hash`, only that master's.
pub fn export_socket<'a>(backing: &'a str, cfg: &Config, info_hash: Option<&str>) -> Option<&'a str> {
    let socket = backing.strip_prefix("nbd+unix:///?socket=")?;
    let p = Path::new(socket);
    let nbd_dir = vcc_core::control::export_dir(&cfg.control_socket);
    let name = p.file_name()?.to_str()?.strip_suffix(".sock")?;
    let ours = p.parent() == Some(nbd_dir.as_path())
        && name.len() == 40
        && name.bytes().all(|b| b.is_ascii_hexdigit())
        && info_hash.is_none_or(|h| h.eq_ignore_ascii_case(name));
    ours.then_some(socket)
}

/// The most bytes of an overlay read to find its backing file name (qcow2 puts it in the first
/// cluster, at most 1023 bytes long).
const MAX_BACKING_END: u64 = 2 << 20;

/// The backing file name in a qcow2 overlay's header, read directly (a bounded read, no
/// `qemu-img` run): `None` when the file is not a qcow2 image, names no backing file, or names
/// one the header does not hold sensibly.
pub fn backing_name(overlay: &Path) -> Option<String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(overlay).ok()?;
    let mut h = [0u8; 20];
    f.read_exact_at(&mut h, 0).ok()?;
    if &h[0..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(h[16..20].try_into().ok()?);
    if off == 0 || len == 0 || len > 1023 || off.checked_add(u64::from(len))? > MAX_BACKING_END {
        return None;
    }
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, off).ok()?;
    String::from_utf8(name).ok()
}

/// A socket path that goes into a URL as is.
fn plain(socket: &str) -> bool {
    socket.starts_with('/') && socket.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
}

/// Whether `d` may start lazily: the settings ask for it and libvirt will read the overlay's own
/// backing file name (no `<backingStore>` in the XML).
pub fn applies(d: &ManagedDisk, cfg: &Config) -> bool {
    cfg.lazy && !d.master_in_xml
}

/// For a missing master: asks pool-helper for its export and makes the overlay over it. `true`:
/// done (the overlay reads the export); `false`: the master is here after all (`present`, or the
/// fetch ended first), and the usual path goes on.
pub fn start(
    domain: &str,
    d: &ManagedDisk,
    cfg: &Config,
    deadline: Instant,
    log: &mut dyn Write,
) -> Result<bool, PrepareError> {
    let m = &d.master;
    let fetch = |source| PrepareError::Fetch { master: m.path.clone(), target: d.target.clone(), source };
    let t0 = Instant::now();
    let req = Request::Export(wanted_of(d, cfg)?.for_domain(domain));
    let _ =
        writeln!(log, "virt-clone-cow-hook: {domain}: master {} is missing; asking pool-helper to export it", m.path);
    let f = connect(&cfg.control_socket, Some(cfg.connect_timeout)).and_then(|c| c.call(&req, Some(deadline), |_| {}));
    let f = f.map_err(fetch)?;
    if !f.ok {
        return Err(fetch(ClientError::Refused { reason: f.error.unwrap_or_else(|| "no reason given".into()) }));
    }
    let socket = match (f.state, f.path) {
        (Some(FinalState::Exported), Some(s)) => s,
        _ => return Ok(false),
    };
    let lazy = |why: String| PrepareError::Lazy { target: d.target.clone(), why };
    if !plain(&socket) || export_socket(&export_url(&socket), cfg, m.info_hash.as_deref()).is_none() {
        return Err(lazy(format!("pool-helper named an export socket the hook does not expect: '{socket}'")));
    }
    let url = export_url(&socket);
    let export_ms = t0.elapsed().as_millis();
    if d.overlay_exists() {
        // A restart while the master still arrives: the overlay must read this export.
        if backing_name(&d.overlay).as_deref() == Some(url.as_str()) {
            let _ = writeln!(
                log,
                "virt-clone-cow-hook: {domain}: overlay {} reads the export of {}",
                d.overlay.display(),
                m.path
            );
            return Ok(true);
        }
        return Ok(false);
    }
    let overlay = Places::load(cfg)
        .overlay(&d.overlay)
        .map_err(|source| PrepareError::Place { target: d.target.clone(), source })?;
    let virtual_size = qemu_img()
        .info(Path::new(&url), &m.format)
        .map_err(|source| PrepareError::Master { master: m.path.clone(), target: d.target.clone(), source })?
        .virtual_size;
    let backing = BackingSpec { path: &url, format: &m.format, virtual_size };
    let opts = OverlayOptions::preferred().with_layout(cfg.overlay_layout).with_timeout(QEMU_IMG_TIMEOUT);
    create_overlay_over_export(&overlay, &backing, opts)
        .map_err(|source| PrepareError::Overlay { target: d.target.clone(), source })?;
    let _ = writeln!(
        log,
        "virt-clone-cow-hook: {domain}: created overlay {} over the export of {} ({socket}) in {} ms (export answered at {export_ms} ms); the master keeps arriving",
        d.overlay.display(),
        m.path,
        t0.elapsed().as_millis()
    );
    Ok(true)
}

/// For a master that is here: an overlay still over its export is pointed at the master file.
pub fn repoint(domain: &str, d: &ManagedDisk, cfg: &Config, log: &mut dyn Write) -> Result<(), PrepareError> {
    let m = &d.master;
    // Read from the header (no qemu-img run per start): not a qcow2 overlay, or an unreadable
    // one, is not ours to judge here (QEMU reports it itself).
    let Some(backing) = backing_name(&d.overlay) else { return Ok(()) };
    if export_socket(&backing, cfg, m.info_hash.as_deref()).is_none() {
        return Ok(());
    }
    let places = Places::load(cfg);
    let place = |source| PrepareError::Place { target: d.target.clone(), source };
    let overlay = places.overlay(&d.overlay).map_err(place)?;
    places.master(Path::new(&m.path)).map_err(place)?;
    qemu_img().rebase_unsafe(&overlay, Path::new(&m.path), &m.format).map_err(|source| PrepareError::Master {
        master: m.path.clone(),
        target: d.target.clone(),
        source,
    })?;
    let _ = writeln!(log, "virt-clone-cow-hook: {domain}: overlay {} now reads master {}", d.overlay.display(), m.path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_export_socket_of_pool_helper_for_this_master_counts() {
        let cfg = Config { control_socket: "/run/pool-helper/control.sock".into(), ..Config::default() };
        let h = "0123456789abcdef0123456789abcdef01234567";
        let url = export_url(&format!("/run/pool-helper/nbd/{h}.sock"));
        assert!(export_socket(&url, &cfg, Some(h)).is_some());
        assert!(export_socket(&url, &cfg, None).is_some());
        assert!(export_socket(&url, &cfg, Some(&"f".repeat(40))).is_none(), "another master's export");
        assert!(export_socket(&export_url("/tmp/nbd/x.sock"), &cfg, None).is_none());
        assert!(export_socket("/var/lib/libvirt/images/m.qcow2", &cfg, None).is_none());
        assert!(plain("/run/pool-helper/nbd/a.sock") && !plain("/run/x y.sock") && !plain("/r?a&b"));
    }

    #[test]
    fn the_backing_name_is_read_from_the_overlay_header_and_nonsense_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.qcow2");
        let mut h = vec![0u8; 4096];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        let name = b"nbd+unix:///?socket=/run/pool-helper/nbd/x.sock";
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        h[512..512 + name.len()].copy_from_slice(name);
        std::fs::write(&p, &h).unwrap();
        assert_eq!(backing_name(&p).as_deref(), Some(std::str::from_utf8(name).unwrap()));
        let mut long = h.clone();
        long[16..20].copy_from_slice(&1024u32.to_be_bytes());
        std::fs::write(&p, &long).unwrap();
        assert_eq!(backing_name(&p), None, "a name longer than qcow2 allows");
        let mut far = h.clone();
        far[8..16].copy_from_slice(&(u64::MAX - 4).to_be_bytes());
        std::fs::write(&p, &far).unwrap();
        assert_eq!(backing_name(&p), None, "an offset past the bound");
        let mut none = h.clone();
        none[8..20].fill(0);
        std::fs::write(&p, &none).unwrap();
        assert_eq!(backing_name(&p), None);
        std::fs::write(&p, b"raw").unwrap();
        assert_eq!(backing_name(&p), None);
    }
}
