//! Talking to the pool-helper daemon over its control socket (`docs/control-protocol.md`):
//! one JSON request line; event lines; one final line with `"ok"`. Every wait is bounded.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Progress of a fetch, as the daemon reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Progress {
    #[serde(default)]
    pub done_bytes: u64,
    #[serde(default)]
    pub total_bytes: u64,
    #[serde(default)]
    pub peers: u64,
    #[serde(default)]
    pub down_bps: u64,
}

impl Progress {
    pub fn describe(&self) -> String {
        let pct = if self.total_bytes > 0 { self.done_bytes as f64 * 100.0 / self.total_bytes as f64 } else { 0.0 };
        format!(
            "{pct:.0}% of {}, {} peer(s), {}/s",
            virt_clone_cow::units::human_bytes(self.total_bytes),
            self.peers,
            virt_clone_cow::units::human_bytes(self.down_bps)
        )
    }
}

#[derive(Debug, Deserialize)]
struct Line {
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(flatten)]
    progress: Progress,
}

/// Why the daemon could not give us the master.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the pool-helper daemon is not reachable at {socket} ({source}); start it with `pool-helper serve`")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to pool-helper")]
    Io(#[source] std::io::Error),
    #[error("pool-helper refused: {0}")]
    Refused(String),
    #[error("pool-helper answered something we cannot read: {0}")]
    Protocol(String),
    #[error("still not here after {waited_s} s ({progress}); the download goes on in pool-helper, so a later start will succeed")]
    Timeout { waited_s: u64, progress: String },
}

/// Sends `request` and waits, until `deadline`, for the final answer; calls `on_progress` for
/// each progress event. Returns the path the daemon reports.
pub fn request_path(
    socket: &Path,
    connect_timeout: Duration,
    deadline: Instant,
    request: &serde_json::Value,
    mut on_progress: impl FnMut(&Progress),
) -> Result<Option<PathBuf>, DaemonError> {
    let started = Instant::now();
    let stream = connect(socket, connect_timeout)?;
    stream.set_write_timeout(Some(connect_timeout)).map_err(DaemonError::Io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| DaemonError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(DaemonError::Io)?;

    let mut reader = BufReader::new(&stream);
    let mut last = Progress::default();
    let mut buf = String::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(DaemonError::Timeout { waited_s: started.elapsed().as_secs(), progress: last.describe() });
        }
        let wait = (deadline - now).min(Duration::from_secs(1)).max(Duration::from_millis(1));
        stream.set_read_timeout(Some(wait)).map_err(DaemonError::Io)?;
        match reader.read_line(&mut buf) {
            Ok(0) => return Err(DaemonError::Protocol("the daemon closed the connection without an answer".into())),
            Ok(_) => {
                if !buf.ends_with('\n') {
                    continue; // partial line: read the rest
                }
                let parsed: Line = serde_json::from_str(buf.trim()).map_err(|e| DaemonError::Protocol(format!("{e}: {}", buf.trim())))?;
                buf.clear();
                match parsed.ok {
                    Some(true) => return Ok(parsed.path.map(PathBuf::from)),
                    Some(false) => return Err(DaemonError::Refused(parsed.error.unwrap_or_else(|| "no reason given".into()))),
                    None => {
                        if parsed.event.as_deref() == Some("progress") {
                            last = parsed.progress;
                            on_progress(&last);
                        }
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(DaemonError::Io(e)),
        }
    }
}

fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, DaemonError> {
    // connect(2) on a Unix socket answers at once unless the listen backlog is full: retry briefly.
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => return Err(DaemonError::Connect { socket: socket.display().to_string(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve(lines: &'static [&'static str], delay: Duration) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut req = String::new();
            BufReader::new(&s).read_line(&mut req).unwrap();
            for line in lines {
                std::thread::sleep(delay);
                if (&s).write_all(format!("{line}\n").as_bytes()).is_err() {
                    break;
                }
            }
            req
        });
        (dir, sock, h)
    }

    #[test]
    fn progress_then_path_is_returned() {
        let (_d, sock, h) = serve(
            &[r#"{"event":"progress","done_bytes":5,"total_bytes":10,"peers":2,"down_bps":1}"#, r#"{"ok":true,"state":"fetched","path":"/pool/m.qcow2"}"#],
            Duration::ZERO,
        );
        let mut seen = Vec::new();
        let req = serde_json::json!({"op":"ensure","manifest_path":"/m.json"});
        let p = request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_secs(5), &req, |p| seen.push(p.clone())).unwrap();
        assert_eq!(p, Some(PathBuf::from("/pool/m.qcow2")));
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].peers, 2);
        assert!(h.join().unwrap().contains("\"manifest_path\":\"/m.json\""));
    }

    #[test]
    fn refusal_carries_the_reason() {
        let (_d, sock, _h) = serve(&[r#"{"ok":false,"error":"no peer has it"}"#], Duration::ZERO);
        let e = request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_secs(5), &serde_json::json!({}), |_| {}).unwrap_err();
        assert!(e.to_string().contains("no peer has it"), "{e}");
    }

    #[test]
    fn a_slow_daemon_hits_the_deadline() {
        let (_d, sock, _h) = serve(&[r#"{"event":"progress","done_bytes":1,"total_bytes":4,"peers":0,"down_bps":0}"#, r#"{"ok":true}"#], Duration::from_millis(1500));
        let t0 = Instant::now();
        let e = request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_millis(600), &serde_json::json!({}), |_| {}).unwrap_err();
        assert!(matches!(e, DaemonError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn no_daemon_says_how_to_start_it() {
        let e = request_path(Path::new("/nonexistent/c.sock"), Duration::from_millis(100), Instant::now() + Duration::from_secs(1), &serde_json::json!({}), |_| {}).unwrap_err();
        assert!(e.to_string().contains("pool-helper serve"), "{e}");
    }
}
