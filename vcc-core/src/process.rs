//! Running external programs from argument vectors (never shell strings), with errors that show
//! the command line and what it printed on stderr.
//!
//! Every run is bounded: a wall-clock limit (the child is killed and reaped when it is exceeded),
//! and, through [`Limits`], how much of its output we keep (a child printing more is killed, so a
//! hostile input cannot make a tool print gigabytes into our memory) and resource limits applied
//! to the child alone, and optionally a Landlock confinement ([`Limits::confine_reads_to`]).
//! Both pipes are drained by threads while the child runs, so a chatty child
//! never blocks on a full pipe.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

mod landlock;
pub use landlock::{abi_version as landlock_abi_version, ConfineError};

/// An external program failed to run or exited non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not run `{cmdline}`")]
    Spawn {
        cmdline: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmdline}` failed ({status}): {stderr}")]
    Failed { cmdline: String, status: String, stderr: String },
    #[error("`{cmdline}` did not finish within {seconds} s and was killed")]
    TimedOut { cmdline: String, seconds: u64 },
    #[error("`{cmdline}` printed more than {limit} bytes on {stream} and was killed")]
    OutputTooLarge { cmdline: String, stream: &'static str, limit: usize },
    /// The confinement [`Limits::confine_reads_to`] asks for could not be set up; the program was
    /// not run.
    #[error("could not confine `{cmdline}`, so it was not run")]
    Confine {
        cmdline: String,
        #[source]
        source: ConfineError,
    },
}

impl CommandError {
    /// The error for a program that ran and exited non-zero (or was killed by a signal).
    pub fn failed(cmdline: String, out: &Output) -> Self {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
        CommandError::Failed { cmdline, status: out.status.to_string(), stderr }
    }

    /// What the program printed on stderr, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            CommandError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Renders an argument vector for messages, quoting arguments that need it.
pub fn display_cmdline<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut out = String::from(program);
    for a in args {
        let a = a.as_ref().to_string_lossy();
        out.push(' ');
        if a.is_empty() || a.chars().any(|c| c.is_whitespace() || "'\"$\\`".contains(c)) {
            out.push('\'');
            out.push_str(&a.replace('\'', "'\\''"));
            out.push('\'');
        } else {
            out.push_str(&a);
        }
    }
    out
}

/// How long any external program may run before it is killed: image tools can block forever on
/// a FIFO or a hung network filesystem named by a disk path.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What one run of an external program may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock limit; the child is killed and reaped when it is exceeded.
    pub timeout: Duration,
    /// Most bytes kept of each of stdout and stderr; a child printing more is killed.
    pub max_output: usize,
    /// `RLIMIT_AS` of the child (soft and hard), in bytes.
    pub address_space: Option<u64>,
    /// `RLIMIT_CPU` of the child (soft and hard), in seconds: the kernel kills it with SIGXCPU.
    pub cpu_seconds: Option<u64>,
    /// Confine the child with Landlock (see `process/landlock.rs`) so that it can read only this
    /// file, what is under /usr, /etc/ld.so.cache and /dev/null, and can write nothing but
    /// /dev/null, create or remove nothing.
    /// Set up before the child runs the program; when it cannot be (no Landlock in the kernel:
    /// [`ConfineError::Unsupported`]), the program is not run at all.
    pub confine_reads_to: Option<PathBuf>,
}

impl Limits {
    /// Only a wall-clock limit: output is kept whole, no resource limits.
    pub const fn timeout(timeout: Duration) -> Self {
        Limits { timeout, max_output: usize::MAX, address_space: None, cpu_seconds: None, confine_reads_to: None }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::timeout(DEFAULT_TIMEOUT)
    }
}

/// Runs `program args...` with stdin closed, captures its output, and fails unless it exits 0
/// within [`DEFAULT_TIMEOUT`].
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, CommandError> {
    run_with_timeout(program, args, DEFAULT_TIMEOUT)
}

/// [`run`] with a given wall-clock limit; the child is killed and reaped when it is exceeded, so
/// it never outlives the caller holding our stdout/stderr.
pub fn run_with_timeout<S: AsRef<OsStr>>(program: &str, args: &[S], limit: Duration) -> Result<Output, CommandError> {
    run_limited(program, args, &Limits::timeout(limit))
}

/// [`run`] within `limits`: killed at the wall-clock limit or as soon as it prints more than
/// `limits.max_output` bytes on either stream, resource limits set in the child before it runs
/// the program.
pub fn run_limited<P: AsRef<OsStr>, S: AsRef<OsStr>>(
    program: P,
    args: &[S],
    limits: &Limits,
) -> Result<Output, CommandError> {
    let program = program.as_ref();
    let out = capture(program, args, limits)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(CommandError::failed(display_cmdline(&program.to_string_lossy(), args), &out))
    }
}

/// [`run_limited`] that returns whatever the exit status, for programs whose non-zero exits
/// still come with an answer (`qemu-img check`). Fails only when the program cannot run, runs
/// out of time or prints too much.
pub fn capture<P: AsRef<OsStr>, S: AsRef<OsStr>>(
    program: P,
    args: &[S],
    limits: &Limits,
) -> Result<Output, CommandError> {
    let program = program.as_ref();
    let cmdline = display_cmdline(&program.to_string_lossy(), args);
    tracing::debug!(%cmdline, "running");
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Built before the fork, used by number in the child, closed here once the child has it.
    let ruleset = match &limits.confine_reads_to {
        Some(file) => Some(
            landlock::ruleset_reading_only(file)
                .map_err(|source| CommandError::Confine { cmdline: cmdline.clone(), source })?,
        ),
        None => None,
    };
    set_child_limits(&mut cmd, limits, ruleset.as_ref().map(AsRawFd::as_raw_fd));
    let spawned = cmd.spawn();
    drop(ruleset);
    let mut child = spawned.map_err(|source| CommandError::Spawn { cmdline: cmdline.clone(), source })?;
    // Drain both pipes in threads so a chatty child cannot block on a full pipe; a reader that
    // reaches the bound records its stream in `overflow` and stops reading.
    let overflow = Arc::new(AtomicU8::new(NO_OVERFLOW));
    let (tx, rx) = mpsc::channel();
    if let Some(p) = child.stdout.take() {
        drain(p, Stream::Stdout, limits.max_output, Arc::clone(&overflow), tx.clone());
    }
    if let Some(p) = child.stderr.take() {
        drain(p, Stream::Stderr, limits.max_output, Arc::clone(&overflow), tx);
    } else {
        drop(tx);
    }
    let deadline = Instant::now() + limits.timeout;
    let too_large = |stream: Stream| CommandError::OutputTooLarge {
        cmdline: cmdline.clone(),
        stream: stream.name(),
        limit: limits.max_output,
    };
    let status = loop {
        match overflow.load(Ordering::Relaxed) {
            NO_OVERFLOW => {}
            n => {
                kill(&mut child);
                return Err(too_large(if n == Stream::Stderr as u8 { Stream::Stderr } else { Stream::Stdout }));
            }
        }
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                kill(&mut child);
                return Err(CommandError::TimedOut { cmdline, seconds: limits.timeout.as_secs() });
            }
            Err(source) => {
                kill(&mut child);
                return Err(CommandError::Spawn { cmdline, source });
            }
        }
    };
    // The child is gone; its pipes close unless it left a process behind holding them, so the
    // wait for the readers is bounded by the same deadline (with a moment's grace for a child
    // that exited just before it).
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match rx.recv_timeout(left) {
            Ok(c) if c.overflowed => return Err(too_large(c.stream)),
            Ok(Captured { stream: Stream::Stdout, bytes, .. }) => stdout = bytes,
            Ok(Captured { stream: Stream::Stderr, bytes, .. }) => stderr = bytes,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(CommandError::TimedOut { cmdline, seconds: limits.timeout.as_secs() })
            }
        }
    }
    Ok(Output { status, stdout, stderr })
}

fn kill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `overflow` while no stream went past the bound; otherwise it holds the `Stream` as u8.
const NO_OVERFLOW: u8 = 0;

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout = 1,
    Stderr = 2,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// What a reader thread kept of one stream.
#[derive(Debug)]
struct Captured {
    stream: Stream,
    bytes: Vec<u8>,
    /// The stream went past the bound (the bytes stop there).
    overflowed: bool,
}

/// Reads `pipe` to its end in a thread, keeping at most `max` bytes; past that it records its
/// stream in `overflow` and stops (the child is then killed). Sends what it kept on `tx`.
fn drain<R: Read + Send + 'static>(
    mut pipe: R,
    stream: Stream,
    max: usize,
    overflow: Arc<AtomicU8>,
    tx: mpsc::Sender<Captured>,
) {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        let mut overflowed = false;
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) if bytes.len().saturating_add(n) > max => {
                    overflowed = true;
                    overflow.store(stream as u8, Ordering::Relaxed);
                    break;
                }
                Ok(n) => bytes.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(Captured { stream, bytes, overflowed });
    });
}

/// Makes the child set its own resource limits, and confine itself to `ruleset` (a Landlock
/// ruleset descriptor, close-on-exec) when there is one, between fork and exec, so they bind the
/// program from its first instruction and nothing else. A child that cannot confine itself fails
/// to spawn rather than run unconfined.
#[allow(unsafe_code)]
fn set_child_limits(cmd: &mut Command, limits: &Limits, ruleset: Option<RawFd>) {
    use std::os::unix::process::CommandExt;
    let (address_space, cpu_seconds) = (limits.address_space, limits.cpu_seconds);
    if address_space.is_none() && cpu_seconds.is_none() && ruleset.is_none() {
        return;
    }
    let hook = move || -> std::io::Result<()> {
        if let Some(v) = address_space {
            let lim = libc::rlimit { rlim_cur: v as libc::rlim_t, rlim_max: v as libc::rlim_t };
            // SAFETY: setrlimit reads the valid `lim` that lives across the call; it is a plain
            // system call, async-signal-safe, so it may run in the forked child.
            if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(v) = cpu_seconds {
            let lim = libc::rlimit { rlim_cur: v as libc::rlim_t, rlim_max: v as libc::rlim_t };
            // SAFETY: as above, for RLIMIT_CPU.
            if unsafe { libc::setrlimit(libc::RLIMIT_CPU, &lim) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(fd) = ruleset {
            landlock::restrict_self(fd)?;
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec. It neither allocates nor takes
    // locks: it copies integers into stack values and calls setrlimit, prctl and
    // landlock_restrict_self (plain system calls, async-signal-safe); `last_os_error` only reads
    // errno. The ruleset descriptor was opened before the fork and stays open in the parent
    // until `spawn` has returned.
    unsafe {
        cmd.pre_exec(hook);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A shell command printing exactly 1 MiB on stdout, with shell builtins only.
    pub(crate) const MIB_TO_STDOUT: &str =
        "s=x; i=0; while [ $i -lt 20 ]; do s=\"$s$s\"; i=$((i+1)); done; printf %s \"$s\"";

    #[test]
    fn cmdline_quotes_spaces_and_quotes() {
        let s = display_cmdline("cp", &["create", "/a b/c'd.qcow2"]);
        assert_eq!(s, "cp create '/a b/c'\\''d.qcow2'");
    }

    #[test]
    fn failing_command_reports_stderr() {
        let err = run("/bin/sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn a_hanging_program_is_killed_at_the_limit() {
        let t0 = Instant::now();
        let err = run_with_timeout("/bin/sh", &["-c", "while :; do :; done"], Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, CommandError::TimedOut { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run("/nonexistent/program", &["x"]).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }

    #[test]
    fn output_past_the_bound_kills_the_program_at_once() {
        let limits = Limits { max_output: 1 << 20, ..Limits::timeout(Duration::from_secs(30)) };
        let t0 = Instant::now();
        let err = run_limited("/bin/sh", &["-c", "while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"], &limits)
            .unwrap_err();
        assert!(matches!(err, CommandError::OutputTooLarge { stream: "stdout", limit: 1048576, .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn output_within_the_bound_is_kept_whole() {
        let limits = Limits { max_output: 4 << 20, ..Limits::default() };
        let out = run_limited("/bin/sh", &["-c", &format!("{MIB_TO_STDOUT}; echo done >&2")], &limits).unwrap();
        assert_eq!(out.stdout.len(), 1 << 20);
        assert_eq!(out.stderr, b"done\n");
    }

    #[test]
    fn the_cpu_limit_binds_the_child() {
        let limits = Limits { cpu_seconds: Some(1), ..Limits::timeout(Duration::from_secs(30)) };
        let t0 = Instant::now();
        let err = run_limited("/bin/sh", &["-c", "while :; do :; done"], &limits).unwrap_err();
        assert!(matches!(err, CommandError::Failed { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn the_address_space_limit_binds_the_child() {
        // 64 MiB; `sh -c ulimit -v` reports KiB.
        let limits = Limits { address_space: Some(64 << 20), ..Limits::default() };
        let out = run_limited("/bin/sh", &["-c", "ulimit -v"], &limits).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65536");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: needs a kernel with Landlock")]
    fn a_confined_child_reads_its_file_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (mine, other) = (dir.path().join("mine"), dir.path().join("other"));
        std::fs::write(&mine, "mine\n").unwrap();
        std::fs::write(&other, "other\n").unwrap();
        let limits = Limits { confine_reads_to: Some(mine.clone()), ..Limits::default() };
        let out = run_limited("/bin/cat", &[&mine], &limits).unwrap();
        assert_eq!(out.stdout, b"mine\n");
        let err = run_limited("/bin/cat", &[&other], &limits).unwrap_err();
        assert!(err.stderr().is_some_and(|s| s.contains("Permission denied")), "{err}");
        let err = run_limited("/bin/cat", &["/etc/passwd"], &limits).unwrap_err();
        assert!(err.stderr().is_some_and(|s| s.contains("Permission denied")), "{err}");
        // Nor can it write, even where it can read.
        let w = format!("echo x >> '{}'", mine.display());
        assert!(run_limited("/bin/sh", &["-c", &w], &limits).is_err());
        assert_eq!(std::fs::read(&mine).unwrap(), b"mine\n");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: needs a kernel with Landlock")]
    fn a_confinement_that_cannot_be_set_up_runs_nothing() {
        let limits = Limits { confine_reads_to: Some("/nonexistent/file".into()), ..Limits::default() };
        let err = run_limited("/bin/true", &[] as &[&str], &limits).unwrap_err();
        assert!(matches!(&err, CommandError::Confine { source: ConfineError::Open { .. }, .. }), "{err}");
    }
}
