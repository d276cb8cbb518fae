//! Records of the masters this host published or fetched, in `<state-dir>/masters/`, so the
//! daemon seeds them again (after re-verifying them) when it starts.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::manifest::{Manifest, ManifestError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub pool: String,
    pub manifest: Manifest,
    /// Final path in the pool.
    pub path: PathBuf,
    /// `published`, `fetched`, or `pending` (a fetch that has not finished: resumed at start).
    pub state: String,
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
