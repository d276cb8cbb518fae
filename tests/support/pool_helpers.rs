//! pool-helper instances for the integration tests: real `pool-helper` processes (each with its own
//! state dir, port and control socket) on 127.0.0.1 or inside a network namespace, bounded by
//! timeouts and cleaned up on drop.
//!
//! [`PoolHelper`] (a state dir the test chooses; the hook's and remote tests) and [`Instance`] (a
//! temporary state dir, extra flags, optionally a namespace; pool-helper's own tests).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::libvirt::Pool;
use crate::process::{free_port, target_bin, wait_output};

/// This build's `pool-helper` binary.
pub fn pool_helper_bin() -> PathBuf {
    target_bin("pool-helper")
}

/// A pool-helper instance on 127.0.0.1: its own state dir (fresh), port and control socket
/// (`<state>/control.sock`); its daemon is killed on drop.
#[derive(Debug)]
pub struct PoolHelper {
    pub state: PathBuf,
    pub port: u16,
    /// `--watch-interval`: "0" unless a test wants the daemon to look at libvirt (other tests'
    /// domains are not this instance's business).
    pub watch_interval: &'static str,
    /// `--peer` for every master (a host that knows another by its address only).
    pub peers: Vec<String>,
    /// More flags before the subcommand (`--config`, `--signing-key`, `--allowed-signers`, ...).
    pub extra: Vec<String>,
    daemon: Option<Child>,
}

impl PoolHelper {
    pub fn new(state: &Path) -> PoolHelper {
        let _ = std::fs::remove_dir_all(state);
        std::fs::create_dir_all(state).unwrap();
        let port = free_port();
        PoolHelper {
            state: state.to_path_buf(),
            port,
            watch_interval: "0",
            peers: Vec::new(),
            extra: Vec::new(),
            daemon: None,
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(pool_helper_bin());
        c.arg("--state-dir").arg(&self.state);
        c.args(["--listen-port", &self.port.to_string(), "--advertise", "127.0.0.1", "--no-lsd"]);
        c.args(["--watch-interval", self.watch_interval]);
        for p in &self.peers {
            c.args(["--peer", p]);
        }
        c.args(&self.extra);
        c.args(args).stdin(Stdio::null());
        c
    }

    /// Starts `serve` and waits until its control socket answers.
    pub fn serve(&mut self) {
        let log = std::fs::File::create(self.state.join("daemon.log")).unwrap();
        self.daemon = Some(self.cmd(&["-v", "serve"]).stdout(Stdio::null()).stderr(log).spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.state.join("control.sock")).is_err() {
            assert!(Instant::now() < deadline, "pool-helper did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `publish --pool POOL VOLUME`; returns the manifest's path.
    pub fn publish(&self, pool: &str, volume: &str) -> String {
        let o = self.cmd(&["publish", "--pool", pool, volume]).output().unwrap();
        assert!(o.status.success(), "publish: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("daemon.log")).unwrap_or_default()
    }

    /// Waits (at most 20 s) until the daemon's LAN catalog lists a master named `name`.
    pub fn wait_listed(&self, name: &str) {
        let t0 = Instant::now();
        loop {
            let (_, c) = request(&self.state.join("control.sock"), &serde_json::json!({"op": "catalog"}));
            if c["catalog"].as_array().is_some_and(|l| l.iter().any(|e| e["name"] == name)) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "{name} not in the catalog: {c}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An ed25519 key in `dir` made by ssh-keygen (`signing_key`), and an allowed-signers file
/// trusting it as `principal` (`allowed_signers`).
pub fn signer(dir: &Path, principal: &str) -> (PathBuf, PathBuf) {
    let key = dir.join("signing-key");
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", principal, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&o.stderr));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let allowed = dir.join("allowed_signers");
    std::fs::write(&allowed, format!("{principal} {}\n", public.trim())).unwrap();
    (key, allowed)
}

impl Drop for PoolHelper {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One pool-helper "host": its own state dir, port and control socket.
#[derive(Debug)]
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
                c.args(["netns", "exec", ns]).arg(pool_helper_bin());
                c
            }
            None => Command::new(pool_helper_bin()),
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
