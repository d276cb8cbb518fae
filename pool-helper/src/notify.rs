//! sd_notify(3) without libsystemd: one datagram on `$NOTIFY_SOCKET`.
//!
//! systemd starts a `Type=notify` service with `NOTIFY_SOCKET` set to a path (`/run/systemd/notify`)
//! or an abstract-namespace name (`@...`); the service sends `READY=1` there once it serves, and
//! systemd holds back units ordered after it until then. Without the variable (not started by
//! systemd, or another service type) this does nothing.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{NOTIFY_SOCKET}='{0}' is neither an absolute path nor an @abstract socket name")]
    Address(String),
    #[error("cannot send '{state}' to systemd on {NOTIFY_SOCKET}='{socket}'")]
    Send {
        socket: String,
        state: String,
        #[source]
        source: io::Error,
    },
}

/// Tells systemd the service is up (`READY=1`). `Ok(false)`: no `$NOTIFY_SOCKET`, nothing sent.
pub fn ready() -> Result<bool, NotifyError> {
    notify(std::env::var_os(NOTIFY_SOCKET).as_deref(), "READY=1")
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the notify socket `socket`; `None` or
/// empty: nothing to do.
pub fn notify(socket: Option<&OsStr>, state: &str) -> Result<bool, NotifyError> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let shown = socket.to_string_lossy().into_owned();
    let send_err = |source| NotifyError::Send { socket: shown.clone(), state: state.to_string(), source };
    let addr = address(socket.as_bytes()).ok_or_else(|| NotifyError::Address(shown.clone()))?.map_err(send_err)?;
    let sock = UnixDatagram::unbound().map_err(send_err)?;
    sock.send_to_addr(state.as_bytes(), &addr).map_err(send_err)?;
    Ok(true)
}

/// `@name`: the abstract namespace (Linux); `/path`: a socket file. Anything else is not an
/// address systemd hands out.
fn address(s: &[u8]) -> Option<io::Result<SocketAddr>> {
    use std::os::linux::net::SocketAddrExt;
    match s.split_first() {
        Some((b'@', name)) => Some(SocketAddr::from_abstract_name(name)),
        Some((b'/', _)) => Some(SocketAddr::from_pathname(OsStr::from_bytes(s))),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn received(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_arrives_on_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        assert!(notify(Some(path.as_os_str()), "READY=1").unwrap());
        assert_eq!(received(&sock), "READY=1");
    }

    #[test]
    fn ready_arrives_on_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vcc-notify-test-{}", std::process::id());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        assert!(notify(Some(OsStr::new(&format!("@{name}"))), "READY=1").unwrap());
        assert_eq!(received(&sock), "READY=1");
    }

    #[test]
    fn no_socket_is_a_no_op_and_a_bad_one_a_clear_error() {
        assert!(!notify(None, "READY=1").unwrap());
        assert!(!notify(Some(OsStr::new("")), "READY=1").unwrap());
        let e = notify(Some(OsStr::new("relative/notify")), "READY=1").unwrap_err().to_string();
        assert!(e.contains("NOTIFY_SOCKET='relative/notify'") && e.contains("absolute path"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nobody-listens");
        let e = notify(Some(gone.as_os_str()), "READY=1").unwrap_err();
        assert!(matches!(e, NotifyError::Send { .. }), "{e:?}");
    }
}
