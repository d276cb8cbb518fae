//! Control socket protocol (documented in `docs/control-protocol.md`).
//!
//! Unix stream socket, newline-delimited JSON. The client writes ONE request line; the server
//! writes zero or more event lines, then exactly one final line carrying `"ok"`, then closes.

use serde::{Deserialize, Serialize};

/// Longest request line the server reads.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// A request line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Make sure a master is in the pool: answer `present` at once, or fetch it.
    Ensure(MasterRequest),
    /// Like `ensure`, always streaming progress.
    Fetch(MasterRequest),
    /// Seed a master just published on this host (sent by `pool-helper publish`).
    Seed(MasterRequest),
    Status,
    List,
}

/// Which master, in which pool: the manifest inline or as an absolute path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterRequest {
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_path: Option<String>,
}

/// A progress event line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressEvent {
    pub event: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub peers: u32,
    pub down_bps: u64,
}

/// One master as `status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct MasterStatus {
    pub name: String,
    pub pool: String,
    pub sha256: String,
    /// `seeding`, `fetching`, `verifying` or `failed`.
    pub state: String,
    pub path: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub peers: u32,
    pub up_bps: u64,
    pub down_bps: u64,
    pub uploaded_bytes: u64,
    pub error: Option<String>,
    /// How many downloads were started for this master by this daemon (coalesced requests share one).
    pub fetches: u32,
}

/// One master as `list` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterListEntry {
    pub name: String,
    pub pool: String,
    pub path: Option<String>,
    pub state: String,
}

/// The final line.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Final {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masters: Option<serde_json::Value>,
}

impl Final {
    pub fn error(msg: impl Into<String>) -> Self {
        Final { ok: false, error: Some(newlines_to_semicolons(&msg.into())), ..Default::default() }
    }
    pub fn done(state: &str, path: &str) -> Self {
        Final { ok: true, state: Some(state.into()), path: Some(path.into()), ..Default::default() }
    }
}

/// Errors travel as one line: each line break becomes "; ".
pub fn newlines_to_semicolons(s: &str) -> String {
    s.replace(['\n', '\r'], "; ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_documented() {
        let r: Request = serde_json::from_str(r#"{"op":"ensure","pool":"default","manifest_path":"/m.json"}"#).unwrap();
        assert!(matches!(r, Request::Ensure(MasterRequest { ref pool, .. }) if pool == "default"));
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert!(matches!(r, Request::Status));
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn final_lines_are_as_documented() {
        let s = serde_json::to_string(&Final::done("present", "/p/m")).unwrap();
        assert_eq!(s, r#"{"ok":true,"state":"present","path":"/p/m"}"#);
        let s = serde_json::to_string(&Final::error("a\nb")).unwrap();
        assert_eq!(s, r#"{"ok":false,"error":"a; b"}"#);
    }
}
