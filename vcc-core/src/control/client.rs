//! A blocking client for the control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::proto::{Final, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at '{path}'")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon")]
    Io(#[source] std::io::Error),
    #[error("the daemon sent a line we cannot read: {0}")]
    Protocol(String),
    #[error("the daemon closed the connection without a final line")]
    NoFinal,
}

/// Connects, or `None` when no daemon listens there.
pub fn connect(path: &Path) -> Result<Option<UnixStream>, ClientError> {
    match UnixStream::connect(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => Ok(None),
        Err(source) => Err(ClientError::Connect { path: path.display().to_string(), source }),
    }
}

/// Sends one request; calls `on_event` for each event line; returns the final line.
pub fn call(
    mut s: UnixStream,
    req: &Request,
    mut on_event: impl FnMut(&serde_json::Value),
) -> Result<Final, ClientError> {
    let mut line = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(ClientError::Io)?;
    let r = BufReader::new(s);
    for l in r.lines() {
        let l = l.map_err(ClientError::Io)?;
        let v: serde_json::Value = serde_json::from_str(&l).map_err(|e| ClientError::Protocol(format!("{e}: {l}")))?;
        if v.get("ok").is_some() {
            return serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string()));
        }
        on_event(&v);
    }
    Err(ClientError::NoFinal)
}
