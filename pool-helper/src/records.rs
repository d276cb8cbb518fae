//! Records of the masters this host published or fetched, in `<state-dir>/masters/`, so the
//! daemon seeds them again (after re-verifying them) when it starts.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::manifest::{Manifest, ManifestError};

/// Where a recorded master stands. Stored as today's strings (`published`, `fetched`,
/// `pending`), so records written by older versions load; a failed fetch as
/// `{"failed":{"error":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// Published from a volume of this host.
    Published,
    /// Fetched, verified and in the pool.
    Fetched,
    /// A fetch that has not finished: resumed when the daemon starts.
    Pending,
    /// A fetch that cannot succeed with this manifest (the download is not what the manifest
    /// says): shown with why, never resumed, and no hold on the name (the next fetch of the
    /// name replaces this record).
    Failed { error: String },
}

impl std::fmt::Display for RecordState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            RecordState::Published => "published",
            RecordState::Fetched => "fetched",
            RecordState::Pending => "pending",
            RecordState::Failed { .. } => "failed",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub pool: String,
    pub manifest: Manifest,
    /// Final path in the pool.
    pub path: PathBuf,
    pub state: RecordState,
}

fn file_for(cfg: &Config, pool: &str, name: &str) -> PathBuf {
    cfg.masters_dir().join(format!("{}_{}.json", hex::encode(pool.as_bytes()), name))
}

pub fn save(cfg: &Config, r: &Record) -> Result<(), crate::staging::StagingError> {
    let data = serde_json::to_vec_pretty(r).unwrap_or_default();
    crate::staging::write_atomic(&file_for(cfg, &r.pool, &r.manifest.name), &data)
}

pub fn remove(cfg: &Config, pool: &str, name: &str) {
    let _ = std::fs::remove_file(file_for(cfg, pool, name));
}

/// Every readable record; unreadable ones are reported and skipped.
pub fn load_all(cfg: &Config) -> Vec<Record> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(cfg.masters_dir()) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match read(&p) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("skipping a record: {}", vcc_core::error::one_line(&e)),
        }
    }
    out.sort_by(|a, b| (&a.pool, &a.manifest.name).cmp(&(&b.pool, &b.manifest.name)));
    out
}

/// Why a record was skipped.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read record '{path}'")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("record '{path}' is not valid JSON")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("record '{path}' holds a bad manifest")]
    Manifest {
        path: String,
        #[source]
        source: ManifestError,
    },
}

fn read(p: &Path) -> Result<Record, RecordError> {
    let path = || p.display().to_string();
    let text = std::fs::read_to_string(p).map_err(|source| RecordError::Read { path: path(), source })?;
    let r: Record = serde_json::from_str(&text).map_err(|source| RecordError::Json { path: path(), source })?;
    r.manifest.validate().map_err(|source| RecordError::Manifest { path: path(), source })?;
    Ok(r)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A record as `serde_json::to_vec_pretty` wrote it before the state was typed.
    fn old_record(state: &str) -> String {
        format!(
            r#"{{
  "pool": "default",
  "manifest": {{
    "version": 1,
    "name": "base.raw",
    "format": "raw",
    "size": 1048576,
    "virtual_size": 1048576,
    "sha256": "{sha}",
    "info_hash": "{ih}",
    "piece_length": 262144,
    "magnet": "magnet:?xt=urn:btih:{ih}",
    "peers": [],
    "trackers": []
  }},
  "path": "/var/lib/libvirt/images/base.raw",
  "state": "{state}"
}}"#,
            sha = "a".repeat(64),
            ih = "b".repeat(40)
        )
    }

    #[test]
    fn records_written_by_older_versions_load_and_are_written_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        for (text, state) in [
            ("published", RecordState::Published),
            ("fetched", RecordState::Fetched),
            ("pending", RecordState::Pending),
        ] {
            let p = dir.path().join(format!("{text}.json"));
            std::fs::write(&p, old_record(text)).unwrap();
            let r = read(&p).unwrap();
            assert_eq!(r.state, state);
            assert_eq!(state.to_string(), text);
            assert_eq!(String::from_utf8(serde_json::to_vec_pretty(&r).unwrap()).unwrap(), old_record(text));
        }
    }

    #[test]
    fn a_failed_record_keeps_why_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        let text = old_record("pending").replace(r#""state": "pending""#, r#""state": {"failed": {"error": "bad"}}"#);
        std::fs::write(&p, &text).unwrap();
        let r = read(&p).unwrap();
        assert_eq!(r.state, RecordState::Failed { error: "bad".into() });
        assert_eq!(r.state.to_string(), "failed");
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["state"], serde_json::json!({"failed": {"error": "bad"}}));
    }

    #[test]
    fn a_record_with_an_unknown_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        std::fs::write(&p, old_record("seeding")).unwrap();
        assert!(matches!(read(&p), Err(RecordError::Json { .. })));
    }
}
