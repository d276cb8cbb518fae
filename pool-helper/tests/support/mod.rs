//! Test harness: real pool-helper processes (each with its own state dir, port and control
//! socket) on 127.0.0.1, real libvirt dir pools, real third-party clients. Everything is bounded
//! by timeouts and cleaned up on drop.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pool-helper");

/// aria2c on loopback only: no DHT, LSD or PEX, quiet.
pub fn aria2c(args: &[&str]) -> Command {
    let mut c = Command::new("aria2c");
    c.args([
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--disable-ipv6=true",
    ]);
    c.args(args).stdin(Stdio::null());
    c
}

/// aria2c seeding `torrent` from the data in `dir` on `port`, trusting that data as it is
/// (`--bt-seed-unverified`: how a peer serving a corrupt copy is made), until killed.
pub fn aria2c_seed_unverified(port: u16, dir: &Path, torrent: &Path) -> Bg {
    Bg(aria2c(&[
        "--bt-seed-unverified=true",
        "--seed-ratio=0.0",
        "--listen-port",
        &port.to_string(),
        "-d",
        dir.to_str().unwrap(),
        torrent.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short id for names in this test run.
pub fn uid(tag: &str) -> String {
    format!("ph{}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst), tag)
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn run(prog: &str, args: &[&str]) -> Output {
    let out = Command::new(prog).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn ensure_libvirtd() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let ok = Command::new("virsh")
            .args(["-q", "-c", "qemu:///system", "version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/start-libvirtd");
            run(script, &[]);
        }
    });
}

/// A temporary libvirt dir pool.
pub struct Pool {
    pub name: String,
    pub dir: PathBuf,
    _root: Option<tempfile::TempDir>,
}

impl Pool {
    pub fn new(tag: &str) -> Pool {
        let root = tempfile::Builder::new().prefix("ph-pool-").tempdir_in("/var/tmp").unwrap();
        let dir = root.path().join("pool");
        std::fs::create_dir(&dir).unwrap();
        Self::at(tag, dir, Some(root))
    }

    pub fn at(tag: &str, dir: PathBuf, root: Option<tempfile::TempDir>) -> Pool {
        ensure_libvirtd();
        let name = uid(tag);
        run("virsh", &["-q", "pool-define-as", &name, "dir", "--target", dir.to_str().unwrap()]);
        run("virsh", &["-q", "pool-start", &name]);
        Pool { name, dir, _root: root }
    }

    pub fn path(&self, vol: &str) -> PathBuf {
        self.dir.join(vol)
    }

    pub fn refresh(&self) {
        run("virsh", &["-q", "pool-refresh", &self.name]);
    }

    pub fn volumes(&self) -> Vec<String> {
        self.refresh();
        let o = run("virsh", &["-q", "vol-list", &self.name]);
        String::from_utf8_lossy(&o.stdout)
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
        run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", src.to_str().unwrap(), p.to_str().unwrap()]);
        std::fs::remove_file(&src).unwrap();
        self.refresh();
        p
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = Command::new("virsh").args(["-q", "pool-destroy", &self.name]).output();
        let _ = Command::new("virsh").args(["-q", "pool-undefine", &self.name]).output();
        let _ = make_writable(&self.dir);
    }
}

fn make_writable(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644));
    }
    Ok(())
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// One pool-helper "host": its own state dir, port and control socket.
pub struct Instance {
    pub state: tempfile::TempDir,
    pub port: u16,
    pub extra: Vec<String>,
    pub daemon: Option<Child>,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    pub advertise: String,
    /// Local service discovery (off by default in tests: explicit peers are deterministic).
    pub lsd: bool,
}

impl Instance {
    pub fn new(extra: &[&str]) -> Instance {
        let state = tempfile::Builder::new().prefix("ph-state-").tempdir_in("/var/tmp").unwrap();
        Instance {
            state,
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            daemon: None,
            netns: None,
            advertise: "127.0.0.1".into(),
            lsd: false,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.state.path().join("control.sock")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        c.arg("--state-dir").arg(self.state.path());
        c.args(["--listen-port", &self.port.to_string(), "--advertise", &self.advertise]);
        // No watching libvirt: other tests' domains are not this instance's business.
        c.args(["--watch-interval", "0"]);
        if !self.lsd {
            c.arg("--no-lsd");
        }
        c.args(&self.extra);
        c.args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs a command to completion (bounded), returning its output.
    pub fn run(&self, args: &[&str]) -> Output {
        let child = self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        wait_output(child, Duration::from_secs(180))
    }

    pub fn run_ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "pool-helper {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn publish(&self, pool: &Pool, vol: &str) -> PathBuf {
        PathBuf::from(self.run_ok(&["publish", "--pool", &pool.name, vol]).trim())
    }

    /// Starts `serve` and waits until the control socket answers.
    pub fn serve(&mut self) {
        let log = std::fs::File::create(self.state.path().join("daemon.log")).unwrap();
        let child = self.cmd(&["-v", "serve"]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemon = Some(child);
        let start = Instant::now();
        while UnixStream::connect(self.socket()).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "daemon did not start: {}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends one request line; returns (events, final line).
    pub fn request(&self, req: &serde_json::Value) -> (Vec<serde_json::Value>, serde_json::Value) {
        request(&self.socket(), req)
    }

    pub fn status(&self) -> Vec<serde_json::Value> {
        let (_, f) = self.request(&serde_json::json!({"op": "status"}));
        assert_eq!(f["ok"], true, "{f}");
        f["masters"].as_array().unwrap().clone()
    }

    /// Waits until the daemon seeds `name`.
    pub fn wait_seeding(&self, name: &str) {
        let start = Instant::now();
        loop {
            let s = self.status();
            if s.iter().any(|m| m["name"] == name && m["state"] == "seeding") {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{name} not seeding: {s:?}\n{}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn master_status(&self, name: &str) -> serde_json::Value {
        self.status().into_iter().find(|m| m["name"] == name).unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

pub fn request(sock: &Path, req: &serde_json::Value) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    writeln!(s, "{req}").unwrap();
    let mut events = Vec::new();
    for l in BufReader::new(s).lines() {
        let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
        if v.get("ok").is_some() {
            return (events, v);
        }
        events.push(v);
    }
    panic!("no final line; events: {events:?}");
}

/// Waits for a child with a deadline (killed after it), collecting its output.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("timed out after {limit:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A background child killed on drop (third-party clients, trackers).
pub struct Bg(pub Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn manifest(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// The access modes (O_RDONLY=0, O_WRONLY=1, O_RDWR=2) with which process `pid` holds `path` open.
pub fn open_modes(pid: u32, path: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let want = std::fs::canonicalize(path).unwrap();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        out.push(u32::from_str_radix(flags, 8).unwrap() & 0o3);
    }
    out
}

/// Network namespaces on one bridge: the project's own test hosts, removed on drop.
pub struct Lan {
    pub bridge: String,
    pub hosts: Vec<(String, String)>, // (namespace, address)
}

impl Lan {
    pub fn new(n: usize) -> Lan {
        let tag = format!("{}{}", std::process::id() % 100000, SEQ.fetch_add(1, Ordering::SeqCst));
        let bridge = format!("phbr{tag}");
        let net = format!("10.251.{}", std::process::id() % 200);
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        let mut lan = Lan { bridge: bridge.clone(), hosts: Vec::new() };
        run("ip", &["link", "set", &bridge, "up"]);
        for i in 0..n {
            let ns = format!("ph{tag}-{i}");
            let veth = format!("phv{tag}{i}");
            let addr = format!("{net}.{}", 10 + i);
            run("ip", &["netns", "add", &ns]);
            lan.hosts.push((ns.clone(), addr.clone()));
            run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            run("ip", &["link", "set", &veth, "master", &bridge, "up"]);
            run("ip", &["netns", "exec", &ns, "ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            run("ip", &["netns", "exec", &ns, "ip", "link", "set", "eth0", "up"]);
            run("ip", &["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            run("ip", &["netns", "exec", &ns, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for (ns, _) in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}
