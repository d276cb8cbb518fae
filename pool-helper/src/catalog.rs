//! The LAN catalog: the masters other hosts announce, each trusted because its manifest is signed
//! by a key of `allowed_signers` (docs/many-hosts.md). This module is the store and its lookups;
//! signatures are checked before an entry gets here ([`Catalog::insert_trusted`] takes only
//! verified entries), announcements are sent and heard elsewhere.
//!
//! A name never silently changes meaning: two trusted masters with one name and different
//! SHA-256 are a conflict, listed with both publishers, and the name is not resolved.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vcc_core::control::proto::CatalogEntry;

use crate::manifest::Manifest;

/// How long an announcer stays among an entry's hosts without announcing again.
pub const HOST_TTL: Duration = Duration::from_secs(90);
/// At most this many entries; past it, the oldest-heard entry makes room.
pub const MAX_ENTRIES: usize = 4096;
/// At most this many hosts per entry.
pub const MAX_HOSTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "two different masters are published as '{name}': sha256 {sha_a} by {signer_a} ({hosts_a}) and sha256 {sha_b} \
         by {signer_b} ({hosts_b}); withdraw one, or name the master by identity"
    )]
    Conflict {
        name: String,
        sha_a: String,
        signer_a: String,
        hosts_a: String,
        sha_b: String,
        signer_b: String,
        hosts_b: String,
    },
}

/// A trusted master: its manifest, who signed it, who announced it.
#[derive(Debug, Clone)]
struct Known {
    manifest: Manifest,
    /// The exact manifest text that was signed and its armored signature (re-announced as heard).
    signed_text: String,
    signature: String,
    signer: String,
    /// Announcer `HOST:PORT` -> when last heard.
    hosts: HashMap<String, Instant>,
    last_heard: Instant,
}

/// The trusted entries, keyed by SHA-256 (one master can be announced by many hosts).
#[derive(Debug, Default)]
pub struct Catalog {
    entries: Mutex<HashMap<String, Known>>,
}

/// A verified announcement, ready for [`Catalog::insert_trusted`].
#[derive(Debug, Clone)]
pub struct Trusted {
    pub manifest: Manifest,
    pub signed_text: String,
    pub signature: String,
    pub signer: String,
    /// Who announced it (`HOST:PORT`, a BitTorrent peer for its swarm); None for our own.
    pub host: Option<String>,
}

impl Catalog {
    pub fn new() -> Catalog {
        Catalog::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a verified entry or refreshes its host. Returns true when the master was new here.
    pub fn insert_trusted(&self, t: Trusted) -> bool {
        self.insert_at(t, Instant::now())
    }

    fn insert_at(&self, t: Trusted, now: Instant) -> bool {
        let mut e = self.lock();
        let key = t.manifest.sha256.clone();
        let new = !e.contains_key(&key);
        if new && e.len() >= MAX_ENTRIES {
            if let Some(oldest) = e.iter().min_by_key(|(_, k)| k.last_heard).map(|(k, _)| k.clone()) {
                e.remove(&oldest);
            }
        }
        let k = e.entry(key).or_insert_with(|| Known {
            manifest: t.manifest.clone(),
            signed_text: t.signed_text.clone(),
            signature: t.signature.clone(),
            signer: t.signer.clone(),
            hosts: HashMap::new(),
            last_heard: now,
        });
        k.last_heard = now;
        if let Some(h) = t.host {
            if k.hosts.len() < MAX_HOSTS || k.hosts.contains_key(&h) {
                k.hosts.insert(h, now);
            }
        }
        new
    }

    /// Forgets announcers not heard for [`HOST_TTL`]. Entries stay (a master once trusted stays
    /// known), so a lone host can still resolve what it heard of.
    pub fn expire(&self, now: Instant) {
        self.expire_after(now, HOST_TTL);
    }

    /// Forgets announcers not heard for `ttl` (three announce intervals).
    pub fn expire_after(&self, now: Instant, ttl: Duration) {
        for k in self.lock().values_mut() {
            k.hosts.retain(|_, t| now.saturating_duration_since(*t) < ttl);
        }
    }

    /// The one trusted master named `name`; None when there is none; an error naming both
    /// publishers when two different masters carry the name.
    pub fn by_name(&self, name: &str) -> Result<Option<Manifest>, CatalogError> {
        let e = self.lock();
        let mut found: Vec<&Known> = e.values().filter(|k| k.manifest.name == name).collect();
        found.sort_by(|a, b| a.manifest.sha256.cmp(&b.manifest.sha256));
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.manifest.clone())),
            [a, b, ..] => Err(conflict(name, a, b)),
        }
    }

    /// The trusted master with this SHA-256 (and this info-hash, when given).
    pub fn by_identity(&self, sha256: &str, info_hash: Option<&str>) -> Option<Manifest> {
        let e = self.lock();
        let k = e.get(sha256)?;
        match info_hash {
            Some(ih) if ih != k.manifest.info_hash => None,
            _ => Some(k.manifest.clone()),
        }
    }

    /// The announcers of the master with this info-hash: peers for its swarm.
    pub fn hosts_of(&self, info_hash: &str) -> Vec<String> {
        let e = self.lock();
        e.values().filter(|k| k.manifest.info_hash == info_hash).flat_map(|k| k.hosts.keys().cloned()).collect()
    }

    /// The signed text and signature of a trusted master (to announce it on).
    pub fn signed(&self, sha256: &str) -> Option<(String, String)> {
        self.lock().get(sha256).map(|k| (k.signed_text.clone(), k.signature.clone()))
    }

    /// Every entry, sorted by name then SHA-256, with conflicts marked.
    pub fn entries(&self) -> Vec<CatalogEntry> {
        let e = self.lock();
        let mut v: Vec<&Known> = e.values().collect();
        v.sort_by(|a, b| (&a.manifest.name, &a.manifest.sha256).cmp(&(&b.manifest.name, &b.manifest.sha256)));
        v.iter()
            .map(|k| {
                let other =
                    v.iter().find(|o| o.manifest.name == k.manifest.name && o.manifest.sha256 != k.manifest.sha256);
                CatalogEntry {
                    conflict: other.map(|o| conflict(&k.manifest.name, k, o).to_string()),
                    format: k.manifest.format.clone(),
                    hosts: hosts_newest_first(k),
                    info_hash: k.manifest.info_hash.clone(),
                    name: k.manifest.name.clone(),
                    sha256: k.manifest.sha256.clone(),
                    signer: k.signer.clone(),
                    size: k.manifest.size,
                    virtual_size: k.manifest.virtual_size,
                }
            })
            .collect()
    }
}

fn hosts_newest_first(k: &Known) -> Vec<String> {
    let mut h: Vec<(&String, &Instant)> = k.hosts.iter().collect();
    h.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    h.into_iter().map(|(s, _)| s.clone()).collect()
}

fn conflict(name: &str, a: &Known, b: &Known) -> CatalogError {
    let hosts = |k: &Known| {
        let h = hosts_newest_first(k);
        if h.is_empty() {
            "this host".to_string()
        } else {
            h.join(", ")
        }
    };
    CatalogError::Conflict {
        name: name.to_string(),
        sha_a: a.manifest.sha256.clone(),
        signer_a: a.signer.clone(),
        hosts_a: hosts(a),
        sha_b: b.manifest.sha256.clone(),
        signer_b: b.signer.clone(),
        hosts_b: hosts(b),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A valid manifest whose hashes repeat `sha` and `ih` (other modules' tests use it too).
    pub(crate) fn manifest(name: &str, sha: char, ih: char) -> Manifest {
        let info_hash: String = std::iter::repeat_n(ih, 40).collect();
        Manifest {
            version: crate::manifest::MANIFEST_VERSION,
            name: name.into(),
            format: "raw".into(),
            size: 1 << 20,
            virtual_size: 1 << 20,
            sha256: std::iter::repeat_n(sha, 64).collect(),
            magnet: format!("magnet:?xt=urn:btih:{info_hash}"),
            info_hash,
            piece_length: 1 << 18,
            peers: vec![],
            trackers: vec![],
            torrent_hex: None,
        }
    }

    fn trusted(m: Manifest, signer: &str, host: &str) -> Trusted {
        Trusted {
            manifest: m,
            signed_text: "{}".into(),
            signature: "sig".into(),
            signer: signer.into(),
            host: Some(host.into()),
        }
    }

    #[test]
    fn a_name_resolves_to_its_one_master_and_identity_must_match_both_hashes() {
        let c = Catalog::new();
        assert_eq!(c.by_name("base.img"), Ok(None));
        assert!(c.insert_trusted(trusted(manifest("base.img", 'a', 'b'), "alice", "10.0.0.1:6881")));
        assert!(!c.insert_trusted(trusted(manifest("base.img", 'a', 'b'), "alice", "10.0.0.2:6881")));
        assert_eq!(c.by_name("base.img").unwrap().unwrap().sha256, "a".repeat(64));
        assert!(c.by_identity(&"a".repeat(64), Some(&"b".repeat(40))).is_some());
        assert!(c.by_identity(&"a".repeat(64), None).is_some());
        assert!(c.by_identity(&"a".repeat(64), Some(&"c".repeat(40))).is_none());
        let mut hosts = c.hosts_of(&"b".repeat(40));
        hosts.sort();
        assert_eq!(hosts, ["10.0.0.1:6881", "10.0.0.2:6881"]);
    }

    #[test]
    fn two_masters_under_one_name_are_an_error_naming_both_publishers() {
        let c = Catalog::new();
        c.insert_trusted(trusted(manifest("base.img", 'a', 'b'), "alice", "10.0.0.1:6881"));
        c.insert_trusted(trusted(manifest("base.img", 'd', 'e'), "bob", "10.0.0.9:6881"));
        let e = c.by_name("base.img").unwrap_err().to_string();
        for s in ["alice", "bob", "10.0.0.1:6881", "10.0.0.9:6881", &"a".repeat(64), &"d".repeat(64)] {
            assert!(e.contains(s), "{e} lacks {s}");
        }
        let l = c.entries();
        assert_eq!(l.len(), 2);
        assert!(l.iter().all(|x| x.conflict.is_some()));
    }

    #[test]
    fn silent_hosts_drop_out_but_the_master_stays_known() {
        let c = Catalog::new();
        let t0 = Instant::now();
        c.insert_at(trusted(manifest("m", 'a', 'b'), "alice", "h1:1"), t0);
        c.expire(t0 + HOST_TTL + Duration::from_secs(1));
        assert!(c.hosts_of(&"b".repeat(40)).is_empty());
        assert!(c.by_name("m").unwrap().is_some());
    }
}
