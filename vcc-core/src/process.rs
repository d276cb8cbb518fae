//! Running external programs from argument vectors (never shell strings), with errors that show
//! the command line and what it printed on stderr.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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
}

impl CommandError {
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

/// Runs `program args...` with stdin closed, captures its output, and fails unless it exits 0
/// within [`DEFAULT_TIMEOUT`].
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, CommandError> {
    run_with_timeout(program, args, DEFAULT_TIMEOUT)
}

/// [`run`] with a given wall-clock limit; the child is killed and reaped when it is exceeded, so
/// it never outlives the caller holding our stdout/stderr.
pub fn run_with_timeout<S: AsRef<OsStr>>(program: &str, args: &[S], limit: Duration) -> Result<Output, CommandError> {
    let cmdline = display_cmdline(program, args);
    tracing::debug!(%cmdline, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn { cmdline: cmdline.clone(), source })?;
    // Drain both pipes in threads so a chatty child cannot block on a full pipe.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let reader = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = reader(out_pipe.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err_t = reader(err_pipe.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::TimedOut { cmdline, seconds: limit.as_secs() });
            }
            Err(source) => return Err(CommandError::Spawn { cmdline, source }),
        }
    };
    let out = Output { status, stdout: out_t.join().unwrap_or_default(), stderr: err_t.join().unwrap_or_default() };
    if out.status.success() {
        Ok(out)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
        Err(CommandError::Failed { cmdline, status: out.status.to_string(), stderr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_quotes_spaces_and_quotes() {
        let s = display_cmdline("qemu-img", &["create", "/a b/c'd.qcow2"]);
        assert_eq!(s, "qemu-img create '/a b/c'\\''d.qcow2'");
    }

    #[test]
    fn failing_command_reports_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn a_hanging_program_is_killed_at_the_limit() {
        let t0 = Instant::now();
        let err = run_with_timeout("sleep", &["30"], Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, CommandError::TimedOut { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run("/nonexistent/program", &["x"]).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }
}
