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
            vcc_core::units::human_bytes(self.total_bytes),
            self.peers,
            vcc_core::units::human_bytes(self.down_bps)
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
                let parsed: Line = serde_json::from_str(buf.trim())
                    .map_err(|e| DaemonError::Protocol(format!("{e}: {}", buf.trim())))?;
                buf.clear();
                match parsed.ok {
                    Some(true) => return Ok(parsed.path.map(PathBuf::from)),
                    Some(false) => {
                        return Err(DaemonError::Refused(parsed.error.unwrap_or_else(|| "no reason given".into())))
                    }
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
    connect_bounded(socket, timeout)
        .map_err(|source| DaemonError::Connect { socket: socket.display().to_string(), source })
}

/// `connect(2)` to a Unix stream socket that gives up after `timeout`. A blocking connect sleeps
/// for as long as the listener's backlog is full (a daemon that stopped accepting), so the socket
/// is non-blocking while connecting: Linux then answers `EAGAIN` at once, and we retry until the
/// deadline. The connected socket is handed back in blocking mode.
#[allow(unsafe_code)]
pub fn connect_bounded(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let path = socket.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.is_empty() || path.len() >= addr.sun_path.len() || path.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a usable Unix socket path (empty, too long, or with a NUL byte)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::offset_of!(libc::sockaddr_un, sun_path) + path.len() + 1) as libc::socklen_t;

    // SAFETY: plain system call with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just opened and own; OwnedFd closes it exactly once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: `addr` is an initialised sockaddr_un that outlives the call and `len` does not
        // exceed its size; `fd` is open.
        let r = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len) };
        if r == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        let now = Instant::now();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EISCONN) => break,
            // Backlog full: the daemon is not accepting right now.
            Some(libc::EAGAIN) if now < deadline => std::thread::sleep((deadline - now).min(Duration::from_millis(10))),
            // Not what Linux does for Unix sockets, but allowed by POSIX: wait for writability.
            Some(libc::EINPROGRESS | libc::EALREADY) if now < deadline => {
                let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
                // SAFETY: one valid pollfd, count 1.
                let _ = unsafe { libc::poll(&mut p, 1, ms) };
            }
            Some(libc::EAGAIN | libc::EINPROGRESS | libc::EALREADY) => {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the daemon did not accept the connection within {} ms (its backlog is full)",
                        timeout.as_millis()
                    ),
                ))
            }
            _ => return Err(err),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve(
        lines: &'static [&'static str],
        delay: Duration,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
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
            &[
                r#"{"event":"progress","done_bytes":5,"total_bytes":10,"peers":2,"down_bps":1}"#,
                r#"{"ok":true,"state":"fetched","path":"/pool/m.qcow2"}"#,
            ],
            Duration::ZERO,
        );
        let mut seen = Vec::new();
        let req = serde_json::json!({"op":"ensure","manifest_path":"/m.json"});
        let p = request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_secs(5), &req, |p| {
            seen.push(p.clone())
        })
        .unwrap();
        assert_eq!(p, Some(PathBuf::from("/pool/m.qcow2")));
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].peers, 2);
        assert!(h.join().unwrap().contains("\"manifest_path\":\"/m.json\""));
    }

    #[test]
    fn refusal_carries_the_reason() {
        let (_d, sock, _h) = serve(&[r#"{"ok":false,"error":"no peer has it"}"#], Duration::ZERO);
        let e = request_path(
            &sock,
            Duration::from_secs(1),
            Instant::now() + Duration::from_secs(5),
            &serde_json::json!({}),
            |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("no peer has it"), "{e}");
    }

    #[test]
    fn a_slow_daemon_hits_the_deadline() {
        let (_d, sock, _h) = serve(
            &[r#"{"event":"progress","done_bytes":1,"total_bytes":4,"peers":0,"down_bps":0}"#, r#"{"ok":true}"#],
            Duration::from_millis(1500),
        );
        let t0 = Instant::now();
        let e = request_path(
            &sock,
            Duration::from_secs(1),
            Instant::now() + Duration::from_millis(600),
            &serde_json::json!({}),
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, DaemonError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    /// Lowers a listening socket's backlog to 0 (std listens with a large one) and fills it.
    #[allow(unsafe_code)]
    fn full_listener() -> (tempfile::TempDir, PathBuf, UnixListener, Vec<UnixStream>) {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("full.sock");
        let l = UnixListener::bind(&sock).unwrap();
        // SAFETY: listen(2) on a socket we own; re-listening only changes the backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let mut queued = Vec::new();
        loop {
            match connect_bounded(&sock, Duration::from_millis(50)) {
                Ok(s) => queued.push(s),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
                    break;
                }
            }
            assert!(queued.len() < 64, "the backlog never filled");
        }
        (dir, sock, l, queued)
    }

    #[test]
    fn a_daemon_that_stops_accepting_makes_the_connect_give_up_within_the_timeout() {
        let (_d, sock, _l, _queued) = full_listener();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let r = request_path(
                &sock,
                Duration::from_millis(300),
                Instant::now() + Duration::from_secs(5),
                &serde_json::json!({}),
                |_| {},
            );
            let _ = tx.send((r.map(|_| ()).map_err(|e| error_text(&e)), t0.elapsed()));
        });
        let (r, took) = rx.recv_timeout(Duration::from_secs(10)).expect("connect never gave up");
        let e = r.unwrap_err();
        assert!(e.contains("not reachable") && e.contains("did not accept"), "{e}");
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "took {took:?}");
    }

    #[test]
    fn a_listening_daemon_is_reached_and_talked_to_in_blocking_mode() {
        let (_d, sock, h) = serve(&[r#"{"ok":true}"#], Duration::from_millis(50));
        let s = connect_bounded(&sock, Duration::from_secs(1)).unwrap();
        (&s).write_all(b"{}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), r#"{"ok":true}"#);
        let _ = h.join();
    }

    fn error_text(e: &DaemonError) -> String {
        vcc_core::error::one_line(e)
    }

    #[test]
    fn no_daemon_says_how_to_start_it() {
        let e = request_path(
            Path::new("/nonexistent/c.sock"),
            Duration::from_millis(100),
            Instant::now() + Duration::from_secs(1),
            &serde_json::json!({}),
            |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("pool-helper serve"), "{e}");
    }
}
