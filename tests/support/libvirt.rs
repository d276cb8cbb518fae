//! libvirt (qemu:///system) for the integration tests: virsh, test domains and guests, and the
//! environments a test makes and removes.
//!
//! Every test of `tests/` makes a [`TestEnv`]: a uniquely named dir storage pool and a work
//! directory outside any pool. Every domain, file and mount a test makes carries the env's prefix
//! (`vcct-<test>-<pid>`) or lives in its directories, and the env removes all of it on drop, also
//! when the test panics. Tests run in parallel threads, so nothing here is shared between envs
//! except the cached UEFI probe. pool-helper's tests use [`Pool`], a temporary dir pool.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::files::{list_dir, make_raw, mode, random_bytes, sha256};
use crate::process::{run, run_ok, uid};

/// The libvirt connection every test uses.
pub const URI: &str = "qemu:///system";
/// Where envs put their pools and work directories.
pub const BASE_DIR: &str = "/var/lib/vcc-tests";
/// Where libvirt keeps per-domain UEFI vars by default.
pub const NVRAM_DIR: &str = "/var/lib/libvirt/qemu/nvram";
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

// ---------------------------------------------------------------------------------------------
// virsh

fn with_uri<S: AsRef<OsStr>>(args: &[S]) -> Vec<&OsStr> {
    let mut v: Vec<&OsStr> = vec!["-q".as_ref(), "-c".as_ref(), URI.as_ref()];
    v.extend(args.iter().map(AsRef::as_ref));
    v
}

/// `virsh -q -c qemu:///system ARGS...`, whatever the exit status.
pub fn virsh<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run("virsh", &with_uri(args))
}

/// `virsh -q -c qemu:///system ARGS...`; panics unless it succeeds; returns stdout.
pub fn virsh_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    run_ok("virsh", &with_uri(args))
}

/// The state of a domain as `virsh domstate` prints it (`running`, `paused`, `shut off`).
pub fn domstate(name: &str) -> String {
    virsh_ok(&["domstate", name]).trim().to_string()
}

/// Polls `domstate` until it is `want` or `timeout` passes; returns the last state seen.
pub fn wait_for_state(name: &str, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let s = domstate(name);
        if s == want || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a domain of this name is defined (or running).
pub fn domain_exists(name: &str) -> bool {
    virsh(&["domuuid", name]).status.success()
}

/// The persistent XML of a domain, secrets included (what virt-clone-cow reads).
pub fn inactive_xml(name: &str) -> String {
    virsh_ok(&["dumpxml", "--inactive", "--security-info", name])
}

/// The names of all domains, running or not, sorted.
pub fn all_domain_names() -> Vec<String> {
    let mut v: Vec<String> =
        virsh_ok(&["list", "--all", "--name"]).lines().map(str::to_string).filter(|l| !l.is_empty()).collect();
    v.sort();
    v
}

/// The domain's UUID.
pub fn domuuid(name: &str) -> String {
    virsh_ok(&["domuuid", name]).trim().to_string()
}

/// Our metadata element of a domain's persistent config, parsed; None when it has none.
pub fn cow_metadata(name: &str) -> Option<vcc_core::metadata::CowMetadata> {
    let out = virsh(&["metadata", name, "--uri", vcc_core::metadata::NAMESPACE, "--config"]);
    if !out.status.success() {
        return None;
    }
    let xml = String::from_utf8_lossy(&out.stdout);
    Some(vcc_core::metadata::CowMetadata::parse(&xml).unwrap())
}

/// Facts of a domain's persistent XML, read with the library's reader (which the hermetic tests
/// check against real captures).
pub fn facts(name: &str) -> vcc_core::xml::DomainFacts {
    vcc_core::xml::DomainFacts::parse(&inactive_xml(name)).unwrap()
}

/// Escapes text for XML attribute values and element text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

// ---------------------------------------------------------------------------------------------
// Guests

/// Whether KVM can be used: /dev/kvm opens read-write.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// The domain type for a BIOS guest: kvm when /dev/kvm opens read-write, else qemu (TCG).
pub fn bios_domain_type() -> &'static str {
    if kvm_usable() {
        "kvm"
    } else {
        "qemu"
    }
}

/// The domain type for a UEFI guest. On some hosts OVMF under KVM pauses with a KVM internal
/// error; a one-time probe (a tiny transient UEFI guest under KVM, watched for ~2 s) decides
/// between kvm and qemu (TCG). Cached for the process.
pub fn uefi_domain_type() -> &'static str {
    static TYPE: OnceLock<&'static str> = OnceLock::new();
    TYPE.get_or_init(|| if kvm_usable() && probe_uefi_under_kvm() { "kvm" } else { "qemu" })
}

fn probe_uefi_under_kvm() -> bool {
    let name = format!("vcct-uefi-probe-{}", std::process::id());
    let dir = PathBuf::from(BASE_DIR).join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let vars = dir.join("VARS.fd");
    let xml = format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type>\
         <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>\
         <nvram template='{OVMF_VARS}'>{}</nvram></os><features><acpi/></features>\
         <devices><graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices></domain>",
        esc(&vars.to_string_lossy())
    );
    let xml_path = dir.join("probe.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let ok = if virsh(&[OsStr::new("create"), xml_path.as_os_str()]).status.success() {
        // Paused at any point within ~2 s: KVM cannot run OVMF here.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut running = true;
        while Instant::now() < deadline {
            if domstate(&name) != "running" {
                running = false;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = virsh(&["destroy", &name]);
        running
    } else {
        false
    };
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

/// A disk of a test domain.
#[derive(Debug, Clone)]
pub enum DiskSpec {
    /// `<disk type='file' device='disk'>`.
    File { path: String, format: String, target: String },
    /// `<disk type='volume' device='disk'>`.
    Volume { pool: String, volume: String, format: String, target: String },
    /// `<disk type='file' device='cdrom'>`, read-only, with or without a medium.
    Cdrom { path: Option<String>, target: String },
}

/// A test domain, as XML for `virsh define`.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub name: String,
    pub uefi: bool,
    pub memory_mib: u32,
    pub disks: Vec<DiskSpec>,
    /// How many `<interface type='user'>` NICs (MACs left to libvirt).
    pub nics: usize,
    /// A fixed VNC port (autoport='no'); None: autoport.
    pub vnc_port: Option<u16>,
    /// A `<serial type='file'>` (with the matching console) writing to this path.
    pub serial_file: Option<String>,
}

impl DomainSpec {
    /// A domain with no disks, one NIC, VNC autoport.
    pub fn new(name: &str, uefi: bool) -> Self {
        DomainSpec {
            name: name.to_string(),
            uefi,
            memory_mib: if uefi { 128 } else { 64 },
            disks: Vec::new(),
            nics: 1,
            vnc_port: None,
            serial_file: None,
        }
    }

    pub fn disk(mut self, d: DiskSpec) -> Self {
        self.disks.push(d);
        self
    }

    pub fn xml(&self) -> String {
        let (dtype, os) = if self.uefi {
            (
                uefi_domain_type(),
                format!(
                    "<type arch='x86_64' machine='q35'>hvm</type>\
                     <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>\
                     <nvram template='{OVMF_VARS}'/><boot dev='hd'/>"
                ),
            )
        } else {
            (bios_domain_type(), "<type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/>".to_string())
        };
        let cdrom_bus = if self.uefi { "sata" } else { "ide" };
        let mut devices = String::new();
        for d in &self.disks {
            match d {
                DiskSpec::File { path, format, target } => {
                    let _ = write!(
                        devices,
                        "\n    <disk type='file' device='disk'><driver name='qemu' type='{}'/>\
                         <source file='{}'/><target dev='{}' bus='virtio'/></disk>",
                        esc(format),
                        esc(path),
                        esc(target)
                    );
                }
                DiskSpec::Volume { pool, volume, format, target } => {
                    let _ = write!(
                        devices,
                        "\n    <disk type='volume' device='disk'><driver name='qemu' type='{}'/>\
                         <source pool='{}' volume='{}'/><target dev='{}' bus='virtio'/></disk>",
                        esc(format),
                        esc(pool),
                        esc(volume),
                        esc(target)
                    );
                }
                DiskSpec::Cdrom { path, target } => {
                    let source = path.as_ref().map(|p| format!("<source file='{}'/>", esc(p))).unwrap_or_default();
                    let _ = write!(
                        devices,
                        "\n    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>{source}\
                         <target dev='{}' bus='{cdrom_bus}'/><readonly/></disk>",
                        esc(target)
                    );
                }
            }
        }
        for _ in 0..self.nics {
            devices.push_str("\n    <interface type='user'><model type='virtio'/></interface>");
        }
        if let Some(p) = &self.serial_file {
            let _ = write!(
                devices,
                "\n    <serial type='file'><source path='{0}'/><target port='0'/></serial>\
                 <console type='file'><source path='{0}'/><target type='serial' port='0'/></console>",
                esc(p)
            );
        }
        match self.vnc_port {
            Some(port) => {
                let _ = write!(devices, "\n    <graphics type='vnc' port='{port}' autoport='no' listen='127.0.0.1'/>");
            }
            None => devices.push_str("\n    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>"),
        }
        format!(
            "<domain type='{dtype}'>\n  <name>{}</name>\n  <memory unit='MiB'>{}</memory>\n  <vcpu>1</vcpu>\n  \
             <os>{os}</os>\n  <features><acpi/></features>\n  <devices>{devices}\n  </devices>\n</domain>\n",
            esc(&self.name),
            self.memory_mib
        )
    }
}

/// Defines a domain from XML (through a temporary file).
pub fn define_xml(xml: &str) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, xml.as_bytes()).unwrap();
    virsh_ok(&[OsStr::new("define"), f.path().as_os_str()]);
}

// ---------------------------------------------------------------------------------------------
// The environment

/// A test's pool, work directory and names; everything is removed on drop.
#[derive(Debug)]
pub struct TestEnv {
    /// `vcct-<test>-<pid>`: the pool name and the start of every domain name.
    pub prefix: String,
    /// The dir pool (named `prefix`).
    pub pool: String,
    pub pool_dir: PathBuf,
    /// A directory outside any pool.
    pub work_dir: PathBuf,
    mounts: Vec<PathBuf>,
}

impl TestEnv {
    /// Makes and starts the pool `vcct-<test>-<pid>` over `/var/lib/vcc-tests/<that name>`.
    pub fn new(test: &str) -> Self {
        let prefix = format!("vcct-{test}-{}", std::process::id());
        let env = TestEnv {
            pool: prefix.clone(),
            pool_dir: PathBuf::from(BASE_DIR).join(&prefix),
            work_dir: PathBuf::from(BASE_DIR).join(format!("{prefix}.work")),
            prefix,
            mounts: Vec::new(),
        };
        // Leftovers of a killed run with the same pid.
        env.cleanup();
        std::fs::create_dir_all(&env.pool_dir).unwrap();
        std::fs::create_dir_all(&env.work_dir).unwrap();
        let dir = env.pool_dir.to_string_lossy().into_owned();
        virsh_ok(&["pool-define-as", &env.pool, "dir", "--target", &dir]);
        virsh_ok(&["pool-start", &env.pool]);
        env
    }

    /// A domain name in this env: `<prefix><suffix>`.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// A path in the pool directory.
    pub fn in_pool(&self, file: &str) -> String {
        self.pool_dir.join(file).to_string_lossy().into_owned()
    }

    /// A path in the work directory (outside any pool).
    pub fn in_work(&self, file: &str) -> String {
        self.work_dir.join(file).to_string_lossy().into_owned()
    }

    /// Makes the pool see files created in its directory behind libvirt's back.
    pub fn refresh_pool(&self) {
        virsh_ok(&["pool-refresh", &self.pool]);
    }

    /// Mounts a tmpfs of `size` (e.g. `4M`) at `<work>/<name>`; unmounted on drop.
    pub fn mount_tmpfs(&mut self, name: &str, size: &str) -> PathBuf {
        self.mount_in_memory("tmpfs", name, &format!("size={size},mode=0755"))
    }

    /// Mounts a ramfs (no size limit, no immutable attribute, no user xattrs) at
    /// `<work>/<name>`; unmounted on drop.
    pub fn mount_ramfs(&mut self, name: &str) -> PathBuf {
        self.mount_in_memory("ramfs", name, "mode=0755")
    }

    fn mount_in_memory(&mut self, kind: &str, name: &str, opts: &str) -> PathBuf {
        let dir = self.work_dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        run_ok(
            "mount",
            &[OsStr::new("-t"), kind.as_ref(), "-o".as_ref(), opts.as_ref(), kind.as_ref(), dir.as_os_str()],
        );
        self.mounts.push(dir.clone());
        dir
    }

    /// Makes a filesystem on a sparse file of `size` in the work directory with `mkfs` (the
    /// program and its options; the file is appended) and loop-mounts it at `<work>/<name>`;
    /// unmounted (and the loop device detached) on drop. Returns the mount point and the loop device.
    pub fn mount_image(&mut self, name: &str, size: &str, mkfs: &[&str]) -> (PathBuf, String) {
        let image = self.work_dir.join(format!("{name}.img"));
        let dir = self.work_dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        run_ok("truncate", &[OsStr::new("-s"), size.as_ref(), image.as_os_str()]);
        let (program, opts) = mkfs.split_first().expect("a mkfs program");
        let mut args: Vec<&OsStr> = opts.iter().map(OsStr::new).collect();
        args.push(image.as_os_str());
        run_ok(program, &args);
        run_ok("mount", &[OsStr::new("-o"), "loop".as_ref(), image.as_os_str(), dir.as_os_str()]);
        self.mounts.push(dir.clone());
        let device = run_ok("findmnt", &[OsStr::new("-n"), "-o".as_ref(), "SOURCE".as_ref(), dir.as_os_str()]);
        (dir, device.trim().to_string())
    }

    /// Names of this env's domains, sorted.
    pub fn domains(&self) -> Vec<String> {
        all_domain_names().into_iter().filter(|n| n.starts_with(&self.prefix)).collect()
    }

    /// UEFI vars files of this env's domains in libvirt's default directory.
    pub fn nvram_files(&self) -> Vec<String> {
        list_dir(NVRAM_DIR).into_iter().filter(|n| n.starts_with(&self.prefix)).collect()
    }

    /// Everything removed: domains (stopped, undefined with their UEFI vars), mounts, the pool and
    /// both directories. Never panics.
    fn cleanup(&self) {
        for name in all_domain_names_quiet().into_iter().filter(|n| n.starts_with(&self.prefix)) {
            let _ = virsh(&["destroy", &name]);
            if !virsh(&["undefine", "--nvram", "--managed-save", &name]).status.success() {
                let _ = virsh(&["undefine", &name]);
            }
        }
        for f in list_dir(NVRAM_DIR).into_iter().filter(|n| n.starts_with(&self.prefix)) {
            let _ = std::fs::remove_file(Path::new(NVRAM_DIR).join(f));
        }
        for m in self.mounts.iter().rev() {
            let _ = run("umount", &[m.as_os_str()]);
        }
        let _ = virsh(&["pool-destroy", &self.pool]);
        let _ = virsh(&["pool-undefine", &self.pool]);
        for d in [&self.pool_dir, &self.work_dir] {
            // Masters were made read-only (root removes them anyway) and immutable (not even root).
            clear_immutable(d);
            let _ = std::fs::remove_dir_all(d);
        }
        // virt-clone-cow's staging directory for this pool, when empty (`vcc_core::staging`).
        let staging = Path::new(vcc_core::staging::VCC_STATE_DIR).join("staging").join(&self.pool);
        let _ = std::fs::remove_dir(staging);
    }
}

/// A BIOS domain `<prefix><suffix>` with one disk vda on `master` (raw, 8 MiB, made here).
pub fn raw_domain(env: &TestEnv, suffix: &str, master: &str) -> String {
    let name = env.name(suffix);
    make_raw(master, 8);
    env.refresh_pool();
    let spec = DomainSpec::new(&name, false).disk(DiskSpec::File {
        path: master.into(),
        format: "raw".into(),
        target: "vda".into(),
    });
    define_xml(&spec.xml());
    name
}

/// Clears the immutable attribute virt-clone-cow sets on masters (`chattr -R -i`), on every file
/// under `dir`, so that the directory can be removed. Never panics.
pub fn clear_immutable(dir: &Path) {
    if dir.is_dir() {
        let _ = run("chattr", &[OsStr::new("-R"), OsStr::new("-f"), OsStr::new("-i"), dir.as_os_str()]);
    }
}

fn all_domain_names_quiet() -> Vec<String> {
    let out = virsh(&["list", "--all", "--name"]);
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// What a failed run must leave as it was: this env's domains, the pool and work directories, the
/// UEFI vars directory, the original's persistent XML, and each watched file's mode and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub domains: Vec<String>,
    pub pool_files: Vec<String>,
    pub work_files: Vec<String>,
    pub nvram_files: Vec<String>,
    pub original_xml: Option<String>,
    /// (path, mode, sha256).
    pub files: Vec<(String, u32, String)>,
}

impl Snapshot {
    pub fn take(env: &TestEnv, original: &str, watched: &[&str]) -> Self {
        let original_xml = domain_exists(original).then(|| inactive_xml(original));
        Snapshot {
            domains: env.domains(),
            pool_files: list_dir(&env.pool_dir),
            work_files: list_dir(&env.work_dir),
            nvram_files: env.nvram_files(),
            original_xml,
            files: watched.iter().map(|p| (p.to_string(), mode(p), sha256(p))).collect(),
        }
    }

    /// Asserts that nothing changed since `self`, field by field for readable failures.
    pub fn assert_unchanged(&self, env: &TestEnv, original: &str, watched: &[&str]) {
        let now = Snapshot::take(env, original, watched);
        assert_eq!(now.domains, self.domains, "domains left behind or removed");
        assert_eq!(now.pool_files, self.pool_files, "files left behind in the pool directory");
        assert_eq!(now.work_files, self.work_files, "files left behind in the work directory");
        assert_eq!(now.nvram_files, self.nvram_files, "UEFI vars files left behind");
        assert_eq!(now.original_xml, self.original_xml, "the original's persistent XML changed");
        assert_eq!(now.files, self.files, "a master's mode or content changed");
    }
}

/// Installs this build's hook in /etc/libvirt/hooks/qemu.d with packaging/hook-install (which
/// reloads libvirt), once per test process. Its settings (/etc/virt-clone-cow/hook.toml) are the
/// caller's to write first.
pub fn install_built_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let hook = crate::process::target_bin("virt-clone-cow-hook");
        let script = crate::process::repo_root().join("packaging/hook-install");
        let o = run(script.to_str().expect("utf-8 path"), &["install", hook.to_str().expect("utf-8 path")]);
        assert!(o.status.success(), "hook-install failed: {}", String::from_utf8_lossy(&o.stderr));
    });
}

// ---------------------------------------------------------------------------------------------
// A temporary pool (pool-helper's tests)

/// Starts libvirtd (`.ci/start-libvirtd`) unless virsh reaches it; once per test process.
pub fn ensure_libvirtd() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !virsh(&["version"]).status.success() {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/start-libvirtd");
            run_ok::<&str>(script, &[]);
        }
    });
}

/// A temporary libvirt dir pool, named `ph<pid>-<n>-<tag>`; undefined on drop.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub dir: PathBuf,
    _root: Option<tempfile::TempDir>,
}

impl Pool {
    /// A pool over a fresh directory under /var/tmp (removed on drop).
    pub fn new(tag: &str) -> Pool {
        let root = tempfile::Builder::new().prefix("ph-pool-").tempdir_in("/var/tmp").unwrap();
        let dir = root.path().join("pool");
        std::fs::create_dir(&dir).unwrap();
        Self::at(tag, dir, Some(root))
    }

    /// A pool over `dir` (kept alive with `root`, if any).
    pub fn at(tag: &str, dir: PathBuf, root: Option<tempfile::TempDir>) -> Pool {
        ensure_libvirtd();
        let name = uid(tag);
        virsh_ok(&["pool-define-as", &name, "dir", "--target", dir.to_str().unwrap()]);
        virsh_ok(&["pool-start", &name]);
        Pool { name, dir, _root: root }
    }

    pub fn path(&self, vol: &str) -> PathBuf {
        self.dir.join(vol)
    }

    pub fn refresh(&self) {
        virsh_ok(&["pool-refresh", &self.name]);
    }

    pub fn volumes(&self) -> Vec<String> {
        self.refresh();
        virsh_ok(&["vol-list", &self.name])
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

    /// A raw master of `size` pseudo-random bytes (seeded, so reruns are reproducible).
    pub fn raw_master(&self, vol: &str, size: usize) -> PathBuf {
        let p = self.path(vol);
        std::fs::write(&p, random_bytes(size, vol.len() as u64 + size as u64)).unwrap();
        self.refresh();
        p
    }

    /// A qcow2 master with `size` bytes of pseudo-random data in it.
    pub fn qcow2_master(&self, vol: &str, size: usize) -> PathBuf {
        let src = self.dir.parent().unwrap().join(format!("{vol}.src"));
        std::fs::write(&src, random_bytes(size, 7)).unwrap();
        let p = self.path(vol);
        run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", src.to_str().unwrap(), p.to_str().unwrap()]);
        std::fs::remove_file(&src).unwrap();
        self.refresh();
        p
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = virsh(&["pool-destroy", &self.name]);
        let _ = virsh(&["pool-undefine", &self.name]);
        // Masters were made read-only and immutable: make them removable by the TempDir.
        clear_immutable(&self.dir);
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644));
            }
        }
    }
}
