//! `--sysprep`: each clone gets its own guest identity.
//!
//! A linked clone starts as a byte copy of its template's disk, so every clone of one template
//! shares the template's `/etc/machine-id` (and with it systemd-networkd's DHCP client ID), SSH
//! host keys, hostname and DHCP leases. With `--sysprep`, Debian's `virt-sysprep` (guestfs-tools)
//! runs on each new clone's overlays before the clone is defined: it removes the shared state
//! ([`OPERATIONS`]) and, through its customize step, sets the hostname to the clone's and writes
//! a fresh machine-id chosen here (so the guest never depends on systemd making one at first
//! boot, and the report can say which).
//!
//! libguestfs runs with `LIBGUESTFS_BACKEND=direct` (its own QEMU, not through libvirtd). When
//! KVM cannot start its appliance (no `/dev/kvm`, or a KVM that rejects `-cpu host`, as nested
//! KVM on some AMD hosts does), the run is repeated once under TCG
//! (`LIBGUESTFS_BACKEND_SETTINGS=force_tcg`), and later clones of the run go straight to TCG. A
//! `LIBGUESTFS_BACKEND_SETTINGS` set by the user is left alone (and nothing is retried).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vcc_core::process::{CommandError, Limits};

/// The program, looked up on `PATH`.
pub const PROGRAM: &str = "virt-sysprep";

/// The virt-sysprep operations run on every clone: the guest state two clones must not share.
/// `customize` (last, whatever the order here) sets the hostname and writes the machine-id.
/// Left out on purpose: `ssh-userdir` (authorized keys are how users log in), `logfiles`,
/// `user-account`, `tmp-files` (the template's data, not its identity).
pub const OPERATIONS: &[&str] = &[
    "customize",
    "dhcp-client-state",
    "dhcp-server-state",
    "machine-id",
    "net-hostname",
    "net-hwaddr",
    "ssh-hostkeys",
    "udev-persistent-net",
];

/// How long one clone's virt-sysprep may take. Under TCG, on 2 busy cores, one took 107 s here
/// (most of it booting libguestfs's appliance); under KVM a few seconds.
pub const TIMEOUT: Duration = Duration::from_secs(900);

/// Most bytes of virt-sysprep's output kept (it prints a line per step).
const MAX_OUTPUT: usize = 1 << 20;

/// Set once KVM failed to start the appliance in this run: later clones go to TCG at once.
static USE_TCG: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum SysprepError {
    #[error("--sysprep needs virt-sysprep, which is not installed (Debian: apt install guestfs-tools)")]
    NotInstalled,
    #[error("--sysprep needs the clones' disks on this machine, and {0} is a remote connection; run virt-clone-cow --sysprep on that host, or clone without --sysprep")]
    Remote(String),
    #[error("--sysprep: the overlay '{path}' of '{clone}' is not a file on this machine")]
    NotAFile { clone: String, path: String },
    #[error("virt-sysprep failed on '{clone}'")]
    Failed {
        clone: String,
        #[source]
        source: CommandError,
    },
}

/// What virt-sysprep gave a clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub hostname: String,
    pub machine_id: String,
    pub elapsed: Duration,
}

/// Whether `virt-sysprep` is on `PATH` (as an executable file).
pub fn available() -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else { return false };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(PROGRAM)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The guest hostname for a clone name: lower case letters, digits and '-' (anything else
/// becomes '-'), no leading or trailing '-', at most 63 characters (one DNS label); "clone" if
/// nothing is left.
pub fn hostname_for(clone: &str) -> String {
    let mut h = String::with_capacity(clone.len());
    for c in clone.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' };
        if !(c == '-' && h.ends_with('-')) {
            h.push(c);
        }
    }
    let h: String = h.trim_matches('-').chars().take(63).collect();
    let h = h.trim_end_matches('-');
    if h.is_empty() {
        "clone".to_string()
    } else {
        h.to_string()
    }
}

/// A machine-id from 16 random bytes, as systemd writes one: 32 lower-case hex digits, a UUID v4
/// (machine-id(5)). Never all zeros.
pub fn machine_id_from(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn new_machine_id() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if ok.is_err() {
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        b = (n ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    machine_id_from(b)
}

/// The argument vector for `env`: the environment, then virt-sysprep and its arguments.
pub fn argv(overlays: &[&str], hostname: &str, machine_id: &str, tcg: bool) -> Vec<String> {
    let mut a = vec!["LIBGUESTFS_BACKEND=direct".to_string()];
    if tcg {
        a.push("LIBGUESTFS_BACKEND_SETTINGS=force_tcg".into());
    }
    a.extend([PROGRAM.to_string(), "--quiet".into(), "--format".into(), "qcow2".into()]);
    for o in overlays {
        a.extend(["-a".to_string(), (*o).to_string()]);
    }
    a.extend([
        "--operations".to_string(),
        OPERATIONS.join(","),
        "--hostname".into(),
        hostname.to_string(),
        "--write".into(),
        format!("/etc/machine-id:{machine_id}\n"),
    ]);
    a
}

/// Whether a failure is libguestfs's appliance not starting (worth one retry under TCG).
fn launch_failed(e: &CommandError) -> bool {
    e.stderr().is_some_and(|s| s.contains("guestfs_launch failed"))
}

/// Runs virt-sysprep on the overlays of clone `clone` (one guest, its disks in target order).
pub fn run(clone: &str, overlays: &[&str]) -> Result<Identity, SysprepError> {
    for o in overlays {
        if !Path::new(o).is_file() {
            return Err(SysprepError::NotAFile { clone: clone.to_string(), path: (*o).to_string() });
        }
    }
    let t0 = Instant::now();
    let hostname = hostname_for(clone);
    let machine_id = new_machine_id();
    let limits = Limits { max_output: MAX_OUTPUT, ..Limits::timeout(TIMEOUT) };
    let user_settings = std::env::var_os("LIBGUESTFS_BACKEND_SETTINGS").is_some();
    let run = |tcg: bool| {
        let args = argv(overlays, &hostname, &machine_id, tcg && !user_settings);
        tracing::info!("{clone}: running virt-sysprep{}", if tcg { " under TCG" } else { "" });
        vcc_core::process::run_limited("env", &args, &limits)
    };
    let mut out = run(USE_TCG.load(Ordering::Relaxed));
    if let Err(e) = &out {
        if !user_settings && !USE_TCG.load(Ordering::Relaxed) && launch_failed(e) {
            tracing::warn!("KVM could not start libguestfs's appliance; virt-sysprep runs under TCG (slower)");
            USE_TCG.store(true, Ordering::Relaxed);
            out = run(true);
        }
    }
    let out = out.map_err(|source| SysprepError::Failed { clone: clone.to_string(), source })?;
    tracing::debug!("{clone}: virt-sysprep said: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(Identity { hostname, machine_id, elapsed: t0.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_one_dns_label_from_the_clone_name() {
        assert_eq!(hostname_for("web-1"), "web-1");
        assert_eq!(hostname_for("Web_01.example"), "web-01-example");
        assert_eq!(hostname_for(" web 'one' & co"), "web-one-co");
        assert_eq!(hostname_for("--"), "clone");
        assert_eq!(hostname_for("été"), "t");
        let long = hostname_for(&format!("{}-x", "a".repeat(62)));
        assert_eq!(long, "a".repeat(62), "63 at most, no trailing '-'");
    }

    #[test]
    fn machine_ids_are_32_hex_digits_of_a_v4_uuid() {
        assert_eq!(machine_id_from([0; 16]), "00000000000040008000000000000000");
        assert_eq!(machine_id_from([0xff; 16]), "ffffffffffff4fffbfffffffffffffff");
        let a = new_machine_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, new_machine_id());
    }

    #[test]
    fn the_argv_names_every_overlay_the_operations_hostname_and_machine_id() {
        let a = argv(&["/p/c-vda.qcow2", "/p/c-vdb.qcow2"], "c", "ab", false);
        assert_eq!(a[0], "LIBGUESTFS_BACKEND=direct");
        assert_eq!(a[1], PROGRAM);
        let pos = |s: &str| a.iter().position(|x| x == s).unwrap();
        assert!(pos("--format") < pos("-a"), "virt-sysprep wants --format before -a");
        assert_eq!(a.iter().filter(|x| x.as_str() == "-a").count(), 2);
        assert_eq!(a[pos("--hostname") + 1], "c");
        assert_eq!(a[pos("--write") + 1], "/etc/machine-id:ab\n");
        let ops = &a[pos("--operations") + 1];
        for op in ["machine-id", "ssh-hostkeys", "dhcp-client-state", "net-hostname", "customize"] {
            assert!(ops.split(',').any(|o| o == op), "{op} in {ops}");
        }
        let t = argv(&["/o"], "c", "ab", true);
        assert_eq!(&t[..3], ["LIBGUESTFS_BACKEND=direct", "LIBGUESTFS_BACKEND_SETTINGS=force_tcg", PROGRAM]);
    }

    #[test]
    fn an_overlay_that_is_not_a_file_is_refused_before_running_anything() {
        let dir = tempfile::tempdir().unwrap();
        let e = run("c", &[dir.path().to_str().unwrap()]).unwrap_err();
        assert!(matches!(e, SysprepError::NotAFile { .. }), "{e}");
        assert!(e.to_string().contains("is not a file on this machine"), "{e}");
    }

    #[test]
    fn a_launch_failure_is_told_apart_from_other_failures() {
        let failed =
            |stderr: &str| CommandError::Failed { cmdline: "x".into(), status: "1".into(), stderr: stderr.into() };
        assert!(launch_failed(&failed("virt-sysprep: error: libguestfs error: guestfs_launch failed.; This usually")));
        assert!(!launch_failed(&failed("virt-sysprep: error: no operating systems were found in the guest image")));
    }
}
