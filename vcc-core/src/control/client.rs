//! The one blocking client for the control socket, used by the hook and by pool-helper's CLI.
//!
//! Every wait can be bounded: the connect ([`connect_bounded`]: a daemon that stopped accepting
//! fills its backlog, and a plain `connect(2)` would then sleep forever), the request's write, and
//! every read until the final line (a deadline). Lines may arrive in pieces; they are read as bytes
//! and parsed once whole, and no line may be longer than [`MAX_ANSWER_LINE_BYTES`].

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::proto::{Answer, Event, Final, Progress, Request, MAX_ANSWER_LINE_BYTES};

/// Why a call to the daemon did not end in a final line (or, for [`request_path`], in success).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the pool-helper daemon is not reachable at {socket}; start it with `pool-helper serve`")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the request for pool-helper")]
    Encode(#[source] serde_json::Error),
    #[error("lost the connection to pool-helper at {socket}")]
    Io {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pool-helper answered something we cannot read: {line}")]
    Protocol {
        /// The line, shortened to a few hundred bytes.
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("pool-helper answered a line longer than {MAX_ANSWER_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("the daemon closed the connection without an answer")]
    NoFinal,
    #[error("pool-helper refused: {reason}")]
    Refused { reason: String },
    #[error("still not here after {waited_s} s ({progress}); the download goes on in pool-helper, so a later start will succeed")]
    Timeout { waited_s: u64, progress: Progress },
}

/// An open connection to the daemon, ready for one request.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    socket: String,
    started: Instant,
}

/// Connects within `timeout` (`None`: as long as it takes). Returns `None` when nobody listens
/// there (no socket file, or a socket nobody accepts on), so that a caller can do without.
pub fn try_connect(socket: &Path, timeout: Option<Duration>) -> Result<Option<Connection>, ClientError> {
    match connect(socket, timeout) {
        Ok(c) => Ok(Some(c)),
        Err(ClientError::Connect { source, .. })
            if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Connects within `timeout` (`None`: as long as it takes); the request's write gets the same bound.
pub fn connect(socket: &Path, timeout: Option<Duration>) -> Result<Connection, ClientError> {
    let started = Instant::now();
    let name = socket.display().to_string();
    let stream = connect_bounded(socket, timeout.unwrap_or(Duration::MAX))
        .and_then(|s| s.set_write_timeout(timeout).map(|()| s))
        .map_err(|source| ClientError::Connect { socket: name.clone(), source })?;
    Ok(Connection { stream, socket: name, started })
}

impl Connection {
    /// Sends `req`, calls `on_event` for each event line, and returns the final line, `ok` or not.
    /// Gives up at `deadline` (`None`: waits as long as the daemon keeps the connection open).
    pub fn call(
        self,
        req: &Request,
        deadline: Option<Instant>,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Final, ClientError> {
        let io = |source| ClientError::Io { socket: self.socket.clone(), source };
        let mut line = serde_json::to_vec(req).map_err(ClientError::Encode)?;
        line.push(b'\n');
        (&self.stream).write_all(&line).map_err(io)?;

        let mut reader = BufReader::new(&self.stream);
        let mut last = Progress::default();
        let mut buf = Vec::new();
        loop {
            let wait = match deadline {
                None => None,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        let waited_s = self.started.elapsed().as_secs();
                        return Err(ClientError::Timeout { waited_s, progress: last });
                    }
                    Some((d - now).max(Duration::from_millis(1)))
                }
            };
            self.stream.set_read_timeout(wait).map_err(io)?;
            // At most one byte past the longest line, so that a longer one is seen as such.
            let room = (MAX_ANSWER_LINE_BYTES + 1).saturating_sub(buf.len()) as u64;
            match (&mut reader).take(room).read_until(b'\n', &mut buf) {
                Ok(0) => return Err(ClientError::NoFinal),
                Ok(_) if buf.last() != Some(&b'\n') => {
                    if buf.len() > MAX_ANSWER_LINE_BYTES {
                        return Err(ClientError::LineTooLong);
                    }
                    // A partial line: read the rest.
                }
                Ok(_) => {
                    match Answer::parse(&buf).map_err(|source| ClientError::Protocol { line: shorten(&buf), source })? {
                        Answer::Final(f) => return Ok(f),
                        Answer::Event(e) => {
                            if let Event::Progress(p) = &e {
                                last = p.clone();
                            }
                            on_event(&e);
                        }
                    }
                    buf.clear();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(io(e)),
            }
        }
    }
}

/// Sends a request that ends in a master's path (`ensure`, `fetch`, `seed`) and waits, until
/// `deadline`, for the final answer; calls `on_progress` for each progress event. Returns the
/// path the daemon reports; a refusal is [`ClientError::Refused`] with the daemon's reason.
pub fn request_path(
    socket: &Path,
    connect_timeout: Duration,
    deadline: Instant,
    req: &Request,
    mut on_progress: impl FnMut(&Progress),
) -> Result<Option<PathBuf>, ClientError> {
    let f = connect(socket, Some(connect_timeout))?.call(req, Some(deadline), |e| {
        if let Event::Progress(p) = e {
            on_progress(p);
        }
    })?;
    if f.ok {
        Ok(f.path.map(PathBuf::from))
    } else {
        Err(ClientError::Refused { reason: f.error.unwrap_or_else(|| "no reason given".into()) })
    }
}

/// The start of a line we could not read, for the error message.
fn shorten(line: &[u8]) -> String {
    const MAX: usize = 300;
    let s = String::from_utf8_lossy(line);
    let s = s.trim_end();
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// `connect(2)` to a Unix stream socket that gives up after `timeout`. A blocking connect sleeps
/// for as long as the listener's backlog is full (a daemon that stopped accepting), so the socket
/// is non-blocking while connecting: Linux then answers `EAGAIN` at once, and we retry until the
/// deadline. The connected socket is handed back in blocking mode. A timeout too large to add to
/// the clock (`Duration::MAX`) means no deadline.
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
    let deadline = Instant::now().checked_add(timeout);
    let before_deadline = |now: Instant| deadline.is_none_or(|d| now < d);
    loop {
        // SAFETY: `addr` is an initialised sockaddr_un that outlives the call and `len` does not
        // exceed its size; `fd` is open.
        let r = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len) };
        if r == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        let now = Instant::now();
        let left = deadline.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EISCONN) => break,
            // Backlog full: the daemon is not accepting right now.
            Some(libc::EAGAIN) if before_deadline(now) => std::thread::sleep(left.min(Duration::from_millis(10))),
            // Not what Linux does for Unix sockets, but allowed by POSIX: wait for writability.
            Some(libc::EINPROGRESS | libc::EALREADY) if before_deadline(now) => {
                let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
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
    use crate::control::proto::MasterRequest;
    use std::os::unix::net::UnixListener;

    /// A daemon that reads one request line, then writes `lines` (each whole, or in `pieces`
    /// writes), sleeping `delay` before each write. Returns the request it read.
    fn serve_in_pieces(
        lines: &'static [&'static str],
        delay: Duration,
        pieces: usize,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut req = String::new();
            BufReader::new(&s).read_line(&mut req).unwrap();
            for line in lines {
                let bytes = format!("{line}\n").into_bytes();
                for chunk in bytes.chunks(bytes.len().div_ceil(pieces)) {
                    std::thread::sleep(delay);
                    if (&s).write_all(chunk).is_err() {
                        return req;
                    }
                }
            }
            req
        });
        (dir, sock, h)
    }

    fn serve(
        lines: &'static [&'static str],
        delay: Duration,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        serve_in_pieces(lines, delay, 1)
    }

    fn ensure() -> Request {
        Request::Ensure(MasterRequest::by_path(None, "/m.json"))
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
        let p = request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_secs(5), &ensure(), |p| {
            seen.push(p.clone())
        })
        .unwrap();
        assert_eq!(p, Some(PathBuf::from("/pool/m.qcow2")));
        assert_eq!(seen, vec![Progress { done_bytes: 5, total_bytes: 10, peers: 2, down_bps: 1 }]);
        assert_eq!(h.join().unwrap(), "{\"op\":\"ensure\",\"manifest_path\":\"/m.json\"}\n");
    }

    #[test]
    fn lines_that_arrive_in_pieces_are_read_whole() {
        let (_d, sock, _h) = serve_in_pieces(
            &[
                r#"{"event":"progress","done_bytes":5,"total_bytes":10,"peers":2,"down_bps":1}"#,
                r#"{"ok":true,"state":"fetched","path":"/pool/é.qcow2"}"#,
            ],
            Duration::from_millis(20),
            7,
        );
        let mut events = Vec::new();
        let f = connect(&sock, Some(Duration::from_secs(1)))
            .unwrap()
            .call(&ensure(), Some(Instant::now() + Duration::from_secs(5)), |e| events.push(e.clone()))
            .unwrap();
        assert_eq!(f.path.as_deref(), Some("/pool/é.qcow2"));
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn without_a_deadline_the_call_waits_for_the_final_line() {
        let (_d, sock, _h) = serve(&[r#"{"ok":true,"state":"present","path":"/p/m"}"#], Duration::from_millis(300));
        let f = connect(&sock, None).unwrap().call(&ensure(), None, |_| {}).unwrap();
        assert!(f.ok);
    }

    #[test]
    fn refusal_carries_the_reason() {
        let (_d, sock, _h) = serve(&[r#"{"ok":false,"error":"no peer has it"}"#], Duration::ZERO);
        let e = request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_secs(5), &ensure(), |_| {})
            .unwrap_err();
        assert!(matches!(&e, ClientError::Refused { reason } if reason == "no peer has it"), "{e}");
        assert_eq!(e.to_string(), "pool-helper refused: no peer has it");
    }

    #[test]
    fn a_line_that_is_not_json_is_a_protocol_error_that_shows_it() {
        let (_d, sock, _h) = serve(&["hello there"], Duration::ZERO);
        let e = request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_secs(5), &ensure(), |_| {})
            .unwrap_err();
        assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
        assert!(e.to_string().ends_with("cannot read: hello there"), "{e}");
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let l = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut req = String::new();
            BufReader::new(&s).read_line(&mut req).unwrap();
            let chunk = vec![b' '; 1 << 20];
            while (&s).write_all(&chunk).is_ok() {}
        });
        let e = connect(&sock, None).unwrap().call(&ensure(), None, |_| {}).unwrap_err();
        assert!(matches!(e, ClientError::LineTooLong), "{e}");
    }

    #[test]
    fn a_daemon_that_hangs_up_without_a_final_line_is_an_error() {
        let (_d, sock, _h) =
            serve(&[r#"{"event":"progress","done_bytes":1,"total_bytes":4,"peers":0,"down_bps":0}"#], Duration::ZERO);
        let e = connect(&sock, None).unwrap().call(&ensure(), None, |_| {}).unwrap_err();
        assert!(matches!(e, ClientError::NoFinal), "{e}");
    }

    #[test]
    fn a_slow_daemon_hits_the_deadline() {
        let (_d, sock, _h) = serve(
            &[r#"{"event":"progress","done_bytes":1,"total_bytes":4,"peers":0,"down_bps":0}"#, r#"{"ok":true}"#],
            Duration::from_millis(1500),
        );
        let t0 = Instant::now();
        let e =
            request_path(&sock, Duration::from_secs(1), Instant::now() + Duration::from_millis(600), &ensure(), |_| {})
                .unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("the download goes on in pool-helper"), "{e}");
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
                &ensure(),
                |_| {},
            );
            let _ = tx.send((r.map(|_| ()).map_err(|e| crate::error::one_line(&e)), t0.elapsed()));
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

    #[test]
    fn no_daemon_says_how_to_start_it() {
        let e = request_path(
            Path::new("/nonexistent/c.sock"),
            Duration::from_millis(100),
            Instant::now() + Duration::from_secs(1),
            &ensure(),
            |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("pool-helper serve"), "{e}");
    }

    #[test]
    fn no_daemon_is_none_for_a_caller_that_can_do_without() {
        let dir = tempfile::tempdir().unwrap();
        assert!(try_connect(&dir.path().join("none.sock"), None).unwrap().is_none());
        // A socket file nobody listens on any more.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(try_connect(&stale, Some(Duration::from_secs(1))).unwrap().is_none());
    }

    #[test]
    fn an_unusable_socket_path_is_refused_without_a_panic() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let e = connect(&long, Some(Duration::from_millis(10))).unwrap_err();
        assert!(matches!(&e, ClientError::Connect { source, .. } if source.kind() == ErrorKind::InvalidInput), "{e}");
    }
}
