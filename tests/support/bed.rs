//! Several libvirt hosts on this machine, made by `tests/bed/bed` (docs/bed.md): host i is
//! network namespace `<prefix>-h<i>` of `tests/lab/netlab.py` at 10.213.0.(10+i) plus a mount
//! namespace with its own /etc/libvirt, /var/lib/libvirt, /run/libvirt, libvirtd + virtlogd, a
//! `default` dir pool, our hook and `pool-helper serve` (peers: the other hosts). A test reaches a
//! host's libvirt by its URI (from the root namespace, by socket path) and runs anything else
//! inside the host with [`Bed::exec`]. Removed on drop (guests, daemons, mounts, namespaces).
//! Needs root.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::libvirt::{bios_domain_type, esc};
use crate::process::{cmdline, repo_root, seq, target_bin, wait_output};

/// `tests/bed/bed`.
pub fn bed_script() -> PathBuf {
    repo_root().join("tests/bed/bed")
}

/// Where the bed keeps everything of its hosts (`/run/vcc-bed/<prefix>/h<i>/`).
pub const BED_ROOT: &str = "/run/vcc-bed";

/// Longest a bed command may take (`up` of many hosts starts a libvirtd each).
const BED_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a command inside a host may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// One host of a bed, as `bed up` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedHost {
    /// `h<i>`.
    pub name: String,
    /// Its libvirt: `qemu+unix:///system?socket=/run/vcc-bed/<prefix>/h<i>/run/libvirt/libvirt-sock`.
    pub uri: String,
    /// Its address on the bed's LAN (pool-helper listens on port 6881 there).
    pub address: String,
}

/// A bed of hosts, removed on drop.
#[derive(Debug)]
pub struct Bed {
    pub prefix: String,
    pub hosts: Vec<BedHost>,
}

fn bounded(mut c: Command, limit: Duration) -> Output {
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {c:?}: {e}"));
    wait_output(child, limit)
}

fn ok(what: String, o: Output) -> String {
    assert!(o.status.success(), "`{what}` failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl Bed {
    /// `n` hosts on unshaped links, with this build's pool-helper and hook.
    pub fn up(n: usize) -> Bed {
        Bed::up_with(n, 0.0)
    }

    /// `n` hosts whose links are shaped to `rate_mbit` each way (0: not shaped).
    pub fn up_with(n: usize, rate_mbit: f64) -> Bed {
        Bed::up_args(n, &["--rate-mbit", &rate_mbit.to_string()])
    }

    /// `n` hosts, with more `bed up` arguments (`--rate-mbit R`, `--no-sign`,
    /// `--config 'KEY = VALUE'`: docs/bed.md).
    pub fn up_args(n: usize, args: &[&str]) -> Bed {
        // Made before `up`: dropped on a failed `up`, it removes what was made.
        let mut bed = Bed { prefix: format!("vccbed{}x{}", std::process::id(), seq()), hosts: Vec::new() };
        let mut c = Command::new(bed_script());
        c.args(["up", "--prefix", &bed.prefix, "--hosts", &n.to_string()]).args(args);
        c.arg("--pool-helper").arg(target_bin("pool-helper"));
        c.arg("--hook").arg(target_bin("virt-clone-cow-hook"));
        let out = ok(format!("bed up --prefix {} --hosts {n}", bed.prefix), bounded(c, BED_TIMEOUT));
        bed.hosts = parse_hosts(&out);
        assert_eq!(bed.hosts.len(), n, "bed up printed:\n{out}");
        bed
    }

    /// Runs `argv` inside host `i` (its network and mount namespaces), bounded; any exit status.
    pub fn exec<S: AsRef<OsStr>>(&self, i: usize, argv: &[S]) -> Output {
        let mut c = Command::new(bed_script());
        c.args(["exec", "--prefix", &self.prefix, &self.hosts[i].name, "--"]).args(argv);
        bounded(c, EXEC_TIMEOUT)
    }

    /// [`Bed::exec`] that must exit 0; returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, i: usize, argv: &[S]) -> String {
        ok(format!("on {}: {}", self.hosts[i].name, cmdline("", argv)), self.exec(i, argv))
    }

    /// `virsh -c URI ARGS` against host `i`'s libvirtd (from the root namespace), bounded.
    pub fn virsh<S: AsRef<OsStr>>(&self, i: usize, args: &[S]) -> Output {
        let mut c = Command::new("virsh");
        c.args(["-q", "-c", &self.hosts[i].uri]).args(args);
        bounded(c, EXEC_TIMEOUT)
    }

    /// [`Bed::virsh`] that must exit 0; returns stdout.
    pub fn virsh_ok<S: AsRef<OsStr>>(&self, i: usize, args: &[S]) -> String {
        ok(format!("virsh -c {} {}", self.hosts[i].uri, cmdline("", args)), self.virsh(i, args))
    }

    /// The entries of host `i`'s LAN catalog (`pool-helper catalog --json`, inside the host).
    pub fn catalog(&self, i: usize) -> Vec<serde_json::Value> {
        let bin = target_bin("pool-helper");
        let out = self.exec_ok(i, &[bin.as_os_str(), OsStr::new("catalog"), OsStr::new("--json")]);
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("catalog --json on h{i}: {e}: {out}"));
        v["catalog"].as_array().cloned().unwrap_or_default()
    }

    /// Host `i`'s directory on the machine (`/run/vcc-bed/<prefix>/h<i>`).
    pub fn host_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(BED_ROOT).join(&self.prefix).join(&self.hosts[i].name)
    }

    /// Host `i`'s /run/pool-helper/control.sock, seen from the root namespace.
    pub fn control_socket(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("run/pool-helper/control.sock")
    }

    /// Host `i`'s `default` pool directory seen from the root namespace (the upper layer of its
    /// /var/lib overlay): read files there; write through [`Bed::put_in_pool`] or libvirt.
    pub fn pool_dir(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("varlib/upper/libvirt/images")
    }

    /// Copies `src` (a path of the machine) into host `i`'s `default` pool as `name` (inside
    /// the host, so through its overlay) and refreshes the pool; returns the path inside the host.
    pub fn put_in_pool(&self, i: usize, src: &std::path::Path, name: &str) -> String {
        let dest = format!("/var/lib/libvirt/images/{name}");
        self.exec_ok(i, &[OsStr::new("cp"), OsStr::new("--"), src.as_os_str(), OsStr::new(&dest)]);
        self.virsh_ok(i, &["pool-refresh", "default"]);
        dest
    }

    /// Host `i`'s network namespace (`ip netns`).
    pub fn netns(&self, i: usize) -> String {
        format!("{}-{}", self.prefix, self.hosts[i].name)
    }

    /// Host `i`'s host name (its own UTS namespace; every host's /etc/hosts knows all of them).
    pub fn hostname(&self, i: usize) -> String {
        self.netns(i)
    }

    /// Host `i`'s libvirt through its private sshd, for use INSIDE another host (the bed's LAN
    /// is not reachable from the root namespace): `qemu+ssh://<prefix>-h<i>/system`, as root with
    /// the bed's key (e.g. `virsh migrate ... URI` run with [`Bed::exec`]).
    pub fn ssh_uri(&self, i: usize) -> String {
        format!("qemu+ssh://{}/system", self.hostname(i))
    }

    /// `bed down`: everything of the bed stopped and removed (also done on drop).
    pub fn down(&mut self) -> Output {
        let mut c = Command::new(bed_script());
        c.args(["down", "--prefix", &self.prefix]);
        bounded(c, BED_TIMEOUT)
    }

    /// Creates a small qcow2 volume `vol` in host `i`'s `default` pool and defines (not starts)
    /// a guest `name` booting from it: no `<cpu>` element (QEMU's default model, which starts on
    /// every host here; docs/bed.md), KVM where /dev/kvm is usable, TCG otherwise.
    pub fn define_small_guest(&self, i: usize, name: &str, vol: &str) {
        self.virsh_ok(i, &["vol-create-as", "default", vol, "64M", "--format", "qcow2"]);
        let path = self.virsh_ok(i, &["vol-path", "--pool", "default", vol]).trim().to_string();
        let xml = small_guest_xml(name, &path);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), xml).unwrap();
        self.virsh_ok(i, &[OsStr::new("define"), file.path().as_os_str()]);
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

/// A 64 MiB, 1-vCPU guest with one qcow2 disk at `disk` and no `<cpu>` element.
pub fn small_guest_xml(name: &str, disk: &str) -> String {
    format!(
        "<domain type='{}'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        bios_domain_type(),
        esc(name),
        esc(disk)
    )
}

/// `bed up`'s output: one `NAME URI ADDRESS` line per host.
fn parse_hosts(out: &str) -> Vec<BedHost> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(BedHost { name: w.next()?.into(), uri: w.next()?.into(), address: w.next()?.into() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bed_up_output_gives_each_hosts_name_uri_and_address() {
        let hosts = parse_hosts(
            "h0 qemu+unix:///system?socket=/run/vcc-bed/p/h0/run/libvirt/libvirt-sock 10.213.0.10\n\nh1 x\n",
        );
        assert_eq!(
            hosts,
            [BedHost {
                name: "h0".into(),
                uri: "qemu+unix:///system?socket=/run/vcc-bed/p/h0/run/libvirt/libvirt-sock".into(),
                address: "10.213.0.10".into()
            }]
        );
    }
}
