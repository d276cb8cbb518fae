//! `virt-clone-cow publish TEMPLATE`: each master of a template that is a pool volume is published
//! by the local pool-helper daemon (hashed, made a torrent, seeded, announced), and what identifies
//! it (SHA-256, info-hash, manifest path, format, virtual size) is recorded on the template's
//! master elements, from where every later clone copies it (`docs/many-hosts.md`, section 1).
//! With `--compress`, zstd-compressed copies of the masters are made and published instead
//! ([`crate::cmd::compress`], section 1a).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use vcc_core::control::client::{self, ClientError};
use vcc_core::control::proto::{Identity, PublishRequest, Request};
use vcc_core::metadata::MasterRef;
use vcc_core::xml::{DomainFacts, XmlError};
use vcc_libvirt::{Libvirt, LibvirtError};

use crate::cmd::compress::Todo;

/// The daemon's control socket when none is given (pool-helper's default).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/pool-helper/control.sock";

/// How long the daemon may take to connect and to publish one master (it hashes the whole file).
#[derive(Debug, Clone, Copy)]
pub struct PublishLimits {
    pub connect: Duration,
    pub per_master: Duration,
}

impl Default for PublishLimits {
    fn default() -> Self {
        PublishLimits { connect: Duration::from_secs(10), per_master: Duration::from_secs(3600) }
    }
}

/// A publish run, as the command line asked for it.
#[derive(Debug, Clone)]
pub struct PublishRequestArgs {
    pub template: String,
    pub control_socket: PathBuf,
    pub limits: PublishLimits,
    /// Publish zstd-compressed copies of the masters (`--compress`, [`crate::cmd::compress`]).
    pub compress: bool,
}

/// Why a publish failed. Each says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("'{0}' did not become a template")]
    NotTemplate(String),
    #[error("making '{domain}' a template")]
    MakeTemplate {
        domain: String,
        #[source]
        source: crate::cmd::clone::CloneError,
    },
    #[error("template '{0}' records no master that one of its disks uses; nothing to publish")]
    NoMasters(String),
    #[error("master {path} of '{domain}' (disk {target}) is in no storage pool; define a pool over its directory (virsh pool-define-as) so pool-helper can publish it")]
    NotInPool { domain: String, target: String, path: String },
    #[error("cannot read the XML of domain '{domain}'")]
    Xml {
        domain: String,
        #[source]
        source: XmlError,
    },
    #[error("publishing volume '{volume}' of pool '{pool}'")]
    Daemon {
        pool: String,
        volume: String,
        #[source]
        source: ClientError,
    },
    #[error("pool-helper's answer to publishing '{volume}' has no usable identity: {what}")]
    BadAnswer { volume: String, what: String },
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(transparent)]
    Compress(#[from] crate::cmd::compress::CompressError),
}

/// One published master in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedMaster {
    pub target: Option<String>,
    pub path: String,
    pub pool: String,
    pub volume: String,
    pub format: String,
    pub virtual_size: Option<u64>,
    pub sha256: String,
    pub info_hash: Option<String>,
    pub manifest: String,
    /// With `--compress`: the master this one is a compressed copy of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_from: Option<crate::cmd::compress::CompressedFrom>,
}

/// What `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    pub template: String,
    pub masters: Vec<PublishedMaster>,
    pub elapsed_ms: f64,
}

/// Publishes every master of `req.template` and records their identity on the template.
pub fn publish_template(lv: &Libvirt, req: &PublishRequestArgs) -> Result<PublishReport, PublishError> {
    let t0 = Instant::now();
    let name = &req.template;
    // The clone run writes the template's metadata too: one of us at a time.
    let _lock = crate::lock::OriginalLock::acquire(lv.uri(), name, Duration::from_secs(120))?;
    let xml = lv.domain_xml(name)?;
    let facts = DomainFacts::parse(&xml).map_err(|source| PublishError::Xml { domain: name.clone(), source })?;
    let mut md = lv.cow_metadata(name)?.unwrap_or_default();
    // A domain never cloned becomes a template here, as a first clone would make it; undone
    // (dropped uncommitted) when the publish fails.
    let made = match md.template {
        Some(_) => None,
        None => {
            let tx = crate::cmd::clone::make_template_only(lv, name)
                .map_err(|source| PublishError::MakeTemplate { domain: name.clone(), source })?;
            md = lv.cow_metadata(name)?.unwrap_or_default();
            Some(tx)
        }
    };
    let Some(template) = md.template.as_mut() else {
        return Err(PublishError::NotTemplate(name.clone()));
    };

    // Every master must be a pool volume before the daemon is asked anything.
    let mut todo = Vec::new();
    for (i, m) in template.masters.iter().enumerate() {
        if !m.used_by(&facts) {
            continue;
        }
        let (pool, volume) = match (&m.pool, &m.volume) {
            (Some(p), Some(v)) => (p.clone(), v.clone()),
            _ => match lv.volume_by_path(&m.path)? {
                Some(v) => (v.pool, v.facts.name),
                None => {
                    return Err(PublishError::NotInPool {
                        domain: name.clone(),
                        target: m.target.clone().unwrap_or_default(),
                        path: m.path.clone(),
                    })
                }
            },
        };
        todo.push(Todo { index: i, pool, volume });
    }
    if todo.is_empty() {
        return Err(PublishError::NoMasters(name.clone()));
    }

    let compressed = if req.compress {
        Some(crate::cmd::compress::compress_masters(lv, name, template, &mut todo, req.limits.per_master)?)
    } else {
        None
    };
    let published = publish_each(req, template, &todo, compressed.as_ref());
    let out = match published {
        Ok(out) => out,
        Err(e) => {
            // Nothing of a failed publish stays: not the template's new XML, not the new masters.
            if let Some(c) = compressed {
                c.undo(lv);
            }
            return Err(e);
        }
    };
    if let Err(e) = lv.set_cow_metadata(name, Some(&md)) {
        if let Some(c) = compressed {
            c.undo(lv);
        }
        return Err(e.into());
    }
    if let Some(tx) = made {
        tx.commit();
    }
    Ok(PublishReport {
        template: name.clone(),
        masters: out,
        elapsed_ms: (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3,
    })
}

/// Asks the daemon to publish each master and records its identity on `template`.
fn publish_each(
    req: &PublishRequestArgs,
    template: &mut vcc_core::metadata::TemplateInfo,
    todo: &[Todo],
    compressed: Option<&crate::cmd::compress::Compressed>,
) -> Result<Vec<PublishedMaster>, PublishError> {
    let mut out = Vec::new();
    for Todo { index, pool, volume } in todo {
        let (identity, manifest) = ask_daemon(&req.control_socket, req.limits, pool, volume)?;
        let m = &mut template.masters[*index];
        record(m, pool, volume, &identity, &manifest);
        tracing::info!("published {} ({}) as sha256 {}", m.path, volume, identity.sha256);
        let compressed_from =
            compressed.and_then(|c| c.from.iter().find(|(i, _)| i == index)).map(|(_, from)| from.clone());
        out.push(PublishedMaster {
            target: m.target.clone(),
            path: m.path.clone(),
            pool: pool.clone(),
            volume: volume.clone(),
            format: identity.format,
            virtual_size: identity.virtual_size,
            sha256: identity.sha256,
            info_hash: identity.info_hash,
            manifest,
            compressed_from,
        });
    }
    Ok(out)
}

/// Writes a published master's identity into its metadata element.
pub fn record(m: &mut MasterRef, pool: &str, volume: &str, id: &Identity, manifest: &str) {
    m.pool = Some(pool.to_string());
    m.volume = Some(volume.to_string());
    m.format = id.format.clone();
    if id.virtual_size.is_some() {
        m.virtual_size = id.virtual_size;
    }
    m.sha256 = Some(id.sha256.clone());
    m.info_hash = id.info_hash.clone();
    m.manifest = Some(manifest.to_string());
}

/// One `publish` request; returns the master's identity and the manifest's path.
fn ask_daemon(
    socket: &Path,
    limits: PublishLimits,
    pool: &str,
    volume: &str,
) -> Result<(Identity, String), PublishError> {
    let daemon = |source| PublishError::Daemon { pool: pool.to_string(), volume: volume.to_string(), source };
    let req = Request::Publish(PublishRequest { pool: pool.to_string(), volume: volume.to_string() });
    let f = client::connect(socket, Some(limits.connect))
        .and_then(|c| c.call(&req, Some(Instant::now() + limits.per_master), |_| {}))
        .map_err(daemon)?;
    if !f.ok {
        return Err(daemon(ClientError::Refused { reason: f.error.unwrap_or_else(|| "no reason given".into()) }));
    }
    let bad = |what: &str| PublishError::BadAnswer { volume: volume.to_string(), what: what.to_string() };
    let manifest_path = f.manifest_path.ok_or_else(|| bad("no manifest_path"))?;
    let manifest = f.manifest.ok_or_else(|| bad("no manifest"))?;
    let identity = identity_of(&manifest).map_err(|e| bad(&e))?;
    Ok((identity, manifest_path))
}

/// The identity in a manifest object (the daemon's answer), checked: lower-case hex digests of
/// the right length, a master format.
pub fn identity_of(manifest: &serde_json::Value) -> Result<Identity, String> {
    let id: Identity = serde_json::from_value(manifest.clone()).map_err(|e| format!("the manifest: {e}"))?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(&id.sha256, 64) {
        return Err(format!("sha256 '{}' is not 64 lower-case hex digits", id.sha256));
    }
    if let Some(ih) = &id.info_hash {
        if !hex(ih, 40) {
            return Err(format!("info_hash '{ih}' is not 40 lower-case hex digits"));
        }
    }
    if !vcc_core::overlay::MASTER_FORMATS.contains(&id.format.as_str()) {
        return Err(format!("format '{}' is not a master format", id.format));
    }
    Ok(id)
}

impl PublishReport {
    pub fn render(&self) -> String {
        let mut s = format!("Published {} master(s) of template '{}':\n", self.masters.len(), self.template);
        for m in &self.masters {
            s.push_str(&format!(
                "  {}  {} (pool {}, volume {})\n    sha256 {}\n",
                m.target.as_deref().unwrap_or("?"),
                m.path,
                m.pool,
                m.volume,
                m.sha256
            ));
            if let Some(ih) = &m.info_hash {
                s.push_str(&format!("    info-hash {ih}\n"));
            }
            if let Some(c) = &m.compressed_from {
                s.push_str(&format!(
                    "    compressed (zstd) from {} ({}, {} bytes) to {} bytes; clones made before keep the old master\n",
                    c.path, c.format, c.size, c.compressed_size
                ));
            }
            s.push_str(&format!("    manifest {}\n", m.manifest));
        }
        s.push_str(
            "Clones made from now on carry this identity, so any host with pool-helper can fetch the masters.\n",
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> serde_json::Value {
        serde_json::json!({
            "version": 1, "name": "base.qcow2", "format": "qcow2", "size": 5, "virtual_size": 1048576,
            "sha256": "ab".repeat(32), "info_hash": "cd".repeat(20), "piece_length": 262144,
            "magnet": "magnet:?xt=urn:btih:x", "peers": [], "trackers": []
        })
    }

    #[test]
    fn the_identity_is_read_from_the_manifest_and_recorded_on_the_master() {
        let id = identity_of(&manifest()).unwrap();
        assert_eq!((id.name.as_str(), id.format.as_str(), id.virtual_size), ("base.qcow2", "qcow2", Some(1048576)));
        let mut m = MasterRef { target: Some("vda".into()), path: "/p/base.qcow2".into(), ..Default::default() };
        record(&mut m, "default", "base.qcow2", &id, "/p/.pool-helper/base.qcow2.json");
        let xml = vcc_core::metadata::CowMetadata {
            template: Some(vcc_core::metadata::TemplateInfo { masters: vec![m] }),
            clone: None,
        }
        .to_xml();
        assert!(xml.contains(&format!("sha256='{}'", "ab".repeat(32))), "{xml}");
        assert!(xml.contains(&format!("info-hash='{}'", "cd".repeat(20))), "{xml}");
        assert!(xml.contains("manifest='/p/.pool-helper/base.qcow2.json'"), "{xml}");
        assert!(xml.contains("pool='default' volume='base.qcow2'") && xml.contains("format='qcow2'"), "{xml}");
    }

    #[test]
    fn a_bad_answer_is_refused_with_what_is_wrong() {
        for (k, v, says) in [
            ("sha256", serde_json::json!("AB"), "sha256"),
            ("sha256", serde_json::json!("zz".repeat(32)), "sha256"),
            ("info_hash", serde_json::json!("cd"), "info_hash"),
            ("format", serde_json::json!("vmdk"), "format"),
            ("sha256", serde_json::json!(7), "manifest"),
        ] {
            let mut m = manifest();
            m[k] = v;
            let e = identity_of(&m).unwrap_err();
            assert!(e.contains(says), "{k}: {e}");
        }
        assert!(identity_of(&serde_json::json!("not an object")).is_err());
    }
}
