//! Running external programs from argument vectors (never shell strings), with errors that show
//! the command line and what it printed on stderr.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

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
    Failed {
        cmdline: String,
        status: String,
        stderr: String,
    },
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

/// Runs `program args...` with stdin closed, captures its output, and fails unless it exits 0.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, CommandError> {
    let cmdline = display_cmdline(program, args);
    tracing::debug!(%cmdline, "running");
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn { cmdline: cmdline.clone(), source })?;
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
    fn missing_program_is_a_spawn_error() {
        let err = run("/nonexistent/program", &["x"]).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
    }
}
