//! The `virt-clone-cow` binary of this build, run against qemu:///system.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::libvirt::URI;
use crate::process::target_bin;

/// The built `virt-clone-cow` binary.
pub fn cli_path() -> PathBuf {
    target_bin("virt-clone-cow")
}

/// What a CLI run did.
#[derive(Debug)]
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// The stdout as JSON; panics with both streams otherwise.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }

    /// Asserts success.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, 0, "virt-clone-cow failed:\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    /// Asserts a failure with exit `code` and exactly one stderr line `virt-clone-cow: error: ...`
    /// (usage errors: `virt-clone-cow: ...`) containing every one of `needles`.
    pub fn assert_error(&self, code: i32, needles: &[&str]) {
        assert_eq!(self.code, code, "exit code; stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr must be one line, got:\n{}", self.stderr);
        let prefix = if code == 2 { "virt-clone-cow: " } else { "virt-clone-cow: error: " };
        assert!(lines[0].starts_with(prefix), "stderr must start with '{prefix}': {}", lines[0]);
        for n in needles {
            assert!(lines[0].contains(n), "stderr should mention '{n}': {}", lines[0]);
        }
        assert!(self.stdout.is_empty(), "nothing on stdout on failure, got:\n{}", self.stdout);
    }
}

/// Runs `virt-clone-cow --connect qemu:///system ARGS...`.
pub fn cli<S: AsRef<OsStr>>(args: &[S]) -> CliRun {
    let bin = cli_path();
    let out = Command::new(&bin)
        .arg("--connect")
        .arg(URI)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("VIRT_CLONE_COW_LOG")
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()));
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What a pool listed while a command ran ([`cli_watching_pool`]).
#[derive(Debug, Default)]
pub struct PoolWatch {
    /// The volumes listed before the command ran.
    pub before: Vec<String>,
    /// How many times the pool was refreshed and listed.
    pub samples: usize,
    /// Volumes listed that were neither there before nor allowed (a partial file in the pool).
    pub extra: Vec<String>,
    /// How many samples found a staged file (the convert was caught in the middle).
    pub staged_seen: usize,
    /// Refreshes or listings that failed (libvirt choking on a partial file), with virsh's error.
    pub errors: Vec<String>,
}

/// Runs `virt-clone-cow ARGS...` while refreshing `pool` (`virsh pool-refresh`) and listing its
/// volumes (`virsh vol-list`) over and over until it ends (bounded: 10 minutes); volumes other than those before and
/// `allowed` are reported, and `staged()` (the count of staged files) is sampled each time.
pub fn cli_watching_pool<S: AsRef<OsStr>>(
    args: &[S],
    pool: &str,
    allowed: &[&str],
    staged: impl Fn() -> usize,
) -> (CliRun, PoolWatch) {
    let list = |errors: &mut Vec<String>| -> Vec<String> {
        let refresh = crate::libvirt::virsh(&["pool-refresh", pool]);
        let out = crate::libvirt::virsh(&["vol-list", "--pool", pool]);
        for (what, o) in [("pool-refresh", &refresh), ("vol-list", &out)] {
            if !o.status.success() {
                errors.push(format!("virsh {what}: {}", String::from_utf8_lossy(&o.stderr).trim()));
            }
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // One volume a line (test names have no spaces), after the ` Name  Path` header and its
        // line of dashes unless virsh runs quiet.
        let rows: Vec<&str> = text.lines().collect();
        let start = rows.iter().position(|l| l.starts_with("---")).map_or(0, |i| i + 1);
        rows[start..].iter().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
    };
    let mut errors = Vec::new();
    let before = list(&mut errors);
    assert!(errors.is_empty(), "the pool could not be listed before: {errors:?}");
    let bin = cli_path();
    let child = Command::new(&bin)
        .arg("--connect")
        .arg(URI)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("VIRT_CLONE_COW_LOG")
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()));
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let mut w = PoolWatch { before: before.clone(), ..PoolWatch::default() };
    while !waiter.is_finished() {
        assert!(std::time::Instant::now() < deadline, "virt-clone-cow ran for over 10 minutes");
        let staged_now = staged();
        for v in list(&mut w.errors) {
            if !before.contains(&v) && !allowed.contains(&v.as_str()) && !w.extra.contains(&v) {
                w.extra.push(v);
            }
        }
        w.samples += 1;
        if staged_now > 0 || staged() > 0 {
            w.staged_seen += 1;
        }
    }
    let out = waiter.join().unwrap().unwrap();
    let run = CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    (run, w)
}
