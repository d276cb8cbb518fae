//! Real bootable guests (docs/guests.md): masters built from Debian's packages by
//! `tests/guest/build-guest`, domains that boot them from an overlay with the serial console
//! written to a file, and the "up" line timed from outside.
//!
//! Every guest writes `vcc-guest up uuid=<SMBIOS UUID> host=<hostname> uptime=<seconds>` to
//! ttyS0 once it is up; libvirt gives the guest the domain's UUID as its SMBIOS UUID, so the line
//! names the domain that booted.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::libvirt::{domstate, esc, kvm_usable, virsh, virsh_ok, BASE_DIR};
use crate::process::{repo_root, run_ok, wait_output};

/// What a guest writes on ttyS0 once it is up.
pub const UP_MARKER: &str = "vcc-guest up ";

/// Which guest `tests/guest/build-guest` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// Debian's kernel, a busybox-static initramfs, syslinux; 256 MiB, ~9 MiB read by boot.
    Tiny,
    /// A debootstrapped minimal Debian 12 (systemd) on ext4; 2 GiB; a login prompt on ttyS0.
    Realistic,
}

impl GuestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Tiny => "tiny",
            GuestKind::Realistic => "realistic",
        }
    }
}

/// Builds (or finds in its cache, /var/cache/vcc-guest) a guest master with
/// `tests/guest/build-guest KIND`; returns the qcow2 master's path. Bounded: 10 min for tiny,
/// 40 min for realistic (debootstrap).
pub fn build_guest(kind: GuestKind) -> PathBuf {
    build_guest_as(kind, "qcow2")
}

/// [`build_guest`] with the master's format: `qcow2` or `raw` (`--format`; a raw master of a
/// cached qcow2 one is converted, not rebuilt).
pub fn build_guest_as(kind: GuestKind, format: &str) -> PathBuf {
    let script = repo_root().join("tests/guest/build-guest");
    let limit = match kind {
        GuestKind::Tiny => Duration::from_secs(600),
        GuestKind::Realistic => Duration::from_secs(2400),
    };
    let child = Command::new(&script)
        .arg(kind.as_str())
        .args(["--format", format])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
    let out = wait_output(child, limit);
    assert!(
        out.status.success(),
        "{} {} failed ({}): {}",
        script.display(),
        kind.as_str(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(path.is_file(), "build-guest printed {path:?}, which is not a file");
    path
}

/// The tiny master, built or found once per test process.
pub fn tiny_master() -> &'static Path {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| build_guest(GuestKind::Tiny))
}

/// The tiny master as a raw file, built or found once per test process.
pub fn tiny_master_raw() -> &'static Path {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| build_guest_as(GuestKind::Tiny, "raw"))
}

/// The realistic master, built or found once per test process.
pub fn realistic_master() -> &'static Path {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| build_guest(GuestKind::Realistic))
}

/// Makes a qcow2 overlay (compat 1.1) of a qcow2 master at `path`.
pub fn make_overlay(master: &Path, path: &Path) {
    make_overlay_of(master, "qcow2", path);
}

/// Makes a qcow2 overlay (compat 1.1) of a master of format `master_format` at `path`.
pub fn make_overlay_of(master: &Path, master_format: &str, path: &Path) {
    run_ok(
        "qemu-img",
        &[
            OsStr::new("create"),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            "compat=1.1".as_ref(),
            "-b".as_ref(),
            master.as_os_str(),
            "-F".as_ref(),
            master_format.as_ref(),
            path.as_os_str(),
        ],
    );
}

/// The domain XML of a guest booting (SeaBIOS, from its disk) a qcow2 `disk` on virtio `vda`,
/// its serial console written to `serial_log`. No `<cpu>` (docs/testing.md); no NIC.
pub fn guest_xml(name: &str, domain_type: &str, disk: &Path, serial_log: &Path) -> String {
    format!(
        "<domain type='{domain_type}'>\n  <name>{}</name>\n  <memory unit='MiB'>256</memory>\n  \
         <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n  \
         <features><acpi/></features>\n  <devices>\n    \
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
         <target dev='vda' bus='virtio'/></disk>\n    \
         <serial type='file'><source path='{2}'/><target port='0'/></serial>\
         <console type='file'><source path='{2}'/><target type='serial' port='0'/></console>\n    \
         <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>\n  </devices>\n</domain>\n",
        esc(name),
        esc(&disk.to_string_lossy()),
        esc(&serial_log.to_string_lossy())
    )
}

/// The domain type the guests run under: `kvm` when /dev/kvm is usable and a tiny guest boots
/// under it, else `qemu` (TCG). On some hosts of this project's kind (AMD EPYC, nested KVM)
/// syslinux's real-mode code stops KVM with "KVM internal error. Suberror: 1 (emulation
/// failure)" and the domain pauses; a one-time probe (a transient tiny guest under KVM, up to
/// 60 s) decides. Cached for the process.
pub fn guest_domain_type() -> &'static str {
    static TYPE: OnceLock<&'static str> = OnceLock::new();
    TYPE.get_or_init(|| if kvm_usable() && probe_kvm_boot() { "kvm" } else { "qemu" })
}

fn probe_kvm_boot() -> bool {
    let name = format!("vcct-guest-probe-{}", std::process::id());
    let dir = PathBuf::from(BASE_DIR).join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("probe.qcow2");
    let log = dir.join("serial.log");
    make_overlay(tiny_master(), &disk);
    let xml_path = dir.join("probe.xml");
    std::fs::write(&xml_path, guest_xml(&name, "kvm", &disk, &log)).unwrap();
    let ok = virsh(&[OsStr::new("create"), xml_path.as_os_str()]).status.success() && {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if up_line(&log).is_some() {
                break true;
            }
            if domstate(&name) != "running" || Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let _ = virsh(&["destroy", &name]);
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

/// The first "up" line in a serial log, if there is one yet.
pub fn up_line(serial_log: &Path) -> Option<String> {
    let bytes = std::fs::read(serial_log).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let start = text.find(UP_MARKER)?;
    // Only a whole line: the console writes it a character at a time.
    let end = text[start..].find(['\r', '\n'])?;
    Some(text[start..start + end].to_string())
}

/// Polls a serial log every 50 ms until the "up" line appears, up to `timeout`; returns the line
/// and the time waited. Panics (with the log's tail) if it does not appear in time.
pub fn wait_for_up(serial_log: &Path, timeout: Duration) -> (String, Duration) {
    let start = Instant::now();
    loop {
        if let Some(line) = up_line(serial_log) {
            return (line, start.elapsed());
        }
        if start.elapsed() >= timeout {
            let bytes = std::fs::read(serial_log).unwrap_or_default();
            panic!(
                "no {UP_MARKER:?} line in {} after {timeout:?}; its end:\n{}",
                serial_log.display(),
                log_tail(&bytes)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls a serial log every 50 ms until it contains `text`, up to `timeout`; returns the time
/// waited. Panics (with the log's tail) if it does not appear in time.
pub fn wait_for_text(serial_log: &Path, text: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let bytes = std::fs::read(serial_log).unwrap_or_default();
        if String::from_utf8_lossy(&bytes).contains(text) {
            return start.elapsed();
        }
        if start.elapsed() >= timeout {
            panic!("no {text:?} in {} after {timeout:?}; its end:\n{}", serial_log.display(), log_tail(&bytes));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let skip = text.chars().count().saturating_sub(2000);
    text.chars().skip(skip).collect()
}

/// Starts a defined domain and waits for its "up" line; returns the line and the time from
/// `virsh start` to the line.
pub fn start_and_wait_up(name: &str, serial_log: &Path, timeout: Duration) -> (String, Duration) {
    let t0 = Instant::now();
    virsh_ok(&["start", name]);
    let (line, _) = wait_for_up(serial_log, timeout);
    (line, t0.elapsed())
}

/// A field of the "up" line (`uuid`, `host`, `uptime`).
pub fn up_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// How many bytes the guest has read from a disk (`virsh domblkstat DOMAIN DEV`: rd_bytes).
pub fn disk_read_bytes(name: &str, dev: &str) -> u64 {
    let out = virsh_ok(&["domblkstat", name, dev]);
    out.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(dev) && w.next() == Some("rd_bytes")).then(|| w.next()).flatten()
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rd_bytes for {dev} in `virsh domblkstat {name} {dev}`:\n{out}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_line_fields_are_read() {
        let line = "vcc-guest up uuid=e8fb8f84-1e05-4a04-9f02-71ee08b2414c host=vcc-tiny uptime=2.18";
        assert_eq!(up_field(line, "uuid"), Some("e8fb8f84-1e05-4a04-9f02-71ee08b2414c"));
        assert_eq!(up_field(line, "host"), Some("vcc-tiny"));
        assert_eq!(up_field(line, "uptime"), Some("2.18"));
        assert_eq!(up_field(line, "nope"), None);
    }

    #[test]
    fn up_line_is_found_in_a_serial_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        assert_eq!(up_line(&log), None);
        std::fs::write(&log, b"\r\nSYSLINUX 6.04\r\nvcc-guest up uui").unwrap();
        assert_eq!(up_line(&log), None, "a line still being written is not up yet");
        std::fs::write(&log, b"\r\nSYSLINUX 6.04\r\nvcc-guest up uuid=x host=h uptime=1.0\r\n/ # ").unwrap();
        assert_eq!(up_line(&log).as_deref(), Some("vcc-guest up uuid=x host=h uptime=1.0"));
    }
}
