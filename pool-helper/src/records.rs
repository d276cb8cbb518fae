//! Records of the masters this host published or fetched, in `<state-dir>/masters/`, so the
//! daemon seeds them again (after re-verifying them) when it starts.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::manifest::Manifest;

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
            Err(e) => tracing::warn!("skipping record {}: {e}", p.display()),
        }
    }
    out.sort_by(|a, b| (&a.pool, &a.manifest.name).cmp(&(&b.pool, &b.manifest.name)));
    out
}

fn read(p: &Path) -> Result<Record, String> {
    let text = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
    let r: Record = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    r.manifest.validate().map_err(|e| e.to_string())?;
    Ok(r)
}
