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

/// A socket path that goes into a URL as is.
fn plain(socket: &str) -> bool {
    socket.starts_with('/') && socket.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
}

/// Whether `d` may start lazily: the settings ask for it and libvirt will read the overlay's own
/// backing file name (no `<backingStore>` in the XML).
pub fn applies(d: &ManagedDisk, cfg: &Config) -> bool {
    cfg.lazy && !d.master_in_xml
}

/// Whether the overlay of `d` reads its master's export now (its header's backing file name is
/// one of pool-helper's export sockets, for this master when the metadata records its info-hash).
pub fn reads_export(d: &ManagedDisk, cfg: &Config) -> bool {
    vcc_core::qcow2::backing_name(&d.overlay)
        .is_some_and(|b| export_socket(&b, cfg, d.master.info_hash.as_deref()).is_some())
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
        if vcc_core::qcow2::backing_name(&d.overlay).as_deref() == Some(url.as_str()) {
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
    let Some(backing) = vcc_core::qcow2::backing_name(&d.overlay) else { return Ok(()) };
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
    fn an_overlay_reads_the_export_only_when_its_header_names_this_masters_socket() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config { control_socket: "/run/pool-helper/control.sock".into(), ..Config::default() };
        let h = "0123456789abcdef0123456789abcdef01234567";
        let overlay = dir.path().join("o.qcow2");
        let with_backing = |name: &str| {
            let mut b = vec![0u8; 4096];
            b[0..4].copy_from_slice(b"QFI\xfb");
            b[8..16].copy_from_slice(&512u64.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b[512..512 + name.len()].copy_from_slice(name.as_bytes());
            std::fs::write(&overlay, b).unwrap();
        };
        let d = ManagedDisk {
            target: "vda".into(),
            overlay: overlay.clone(),
            master: vcc_core::metadata::MasterRef {
                path: "/p/m.qcow2".into(),
                format: "qcow2".into(),
                info_hash: Some(h.into()),
                ..Default::default()
            },
            recorded: true,
            master_in_xml: false,
        };
        assert!(!reads_export(&d, &cfg), "no overlay yet");
        with_backing(&export_url(&format!("/run/pool-helper/nbd/{h}.sock")));
        assert!(reads_export(&d, &cfg));
        with_backing(&export_url(&format!("/run/pool-helper/nbd/{}.sock", "e".repeat(40))));
        assert!(!reads_export(&d, &cfg), "another master's export");
        with_backing("/p/m.qcow2");
        assert!(!reads_export(&d, &cfg), "the master file");
    }
}
