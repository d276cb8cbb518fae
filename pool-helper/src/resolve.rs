//! Which master a request names (docs/many-hosts.md section 2): a manifest file, a whole manifest
//! inline, an identity (SHA-256 + info-hash, as a domain's metadata records it) or a name resolved
//! through the trusted LAN catalog. Whatever the way, the answer is a validated [`Manifest`]
//! that the fetch checks everything against.
//!
//! An identity is trusted as much as the domain XML that carries it. Without a trusted catalog
//! entry for it, the torrent's metadata comes from peers by magnet: untrusted, so it is validated
//! ([`metainfo::validate`]), its info-hash, name and length must agree with the identity, and the
//! whole file's SHA-256 (from the identity) is checked after the download as always.

use std::path::PathBuf;
use std::time::Duration;

use vcc_core::control::proto::{Identity, MasterRequest};

use crate::catalog::CatalogError;
use crate::fetch::{Ctx, FetchError};
use crate::manifest::{self, Manifest, ManifestError, MANIFEST_VERSION};
use crate::metainfo::{self, MetainfoError};
use crate::torrent::TorrentError;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("bad request: missing field `pool`")]
    NoPool,
    #[error("name the master in exactly one way: 'manifest_path', 'manifest', 'identity' or 'name'")]
    Choice,
    #[error("manifest_path '{0}' is not absolute")]
    RelativeManifestPath(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("identity of master '{name}': {what}")]
    Identity { name: String, what: String },
    #[error(
        "master '{name}' (sha256 {sha256}) is not in the trusted catalog and its identity has no info-hash to \
         fetch it by; record its info-hash, or publish it on a host of the LAN"
    )]
    NotInCatalog { name: String, sha256: String },
    #[error(
        "master '{name}' is qcow2 and its identity has no virtual size, which the fetched image is checked against; \
         record it (virt-clone-cow metadata, master/@virtual-size)"
    )]
    NoVirtualSize { name: String },
    #[error("no trusted master named '{name}' in the LAN catalog (for pool '{pool}'); publish it on a host of the LAN, or name it by identity")]
    NoSuchName { name: String, pool: String },
    #[error(transparent)]
    Conflict(#[from] CatalogError),
    #[error("the trusted catalog's master {sha256} is '{catalog}' {what}, the identity says {identity}")]
    CatalogDisagrees { sha256: String, what: &'static str, catalog: String, identity: String },
    #[error("getting the torrent of '{name}' ({info_hash}) from peers")]
    Magnet {
        name: String,
        info_hash: String,
        #[source]
        source: TorrentError,
    },
    #[error("no peer sent the torrent of '{name}' ({info_hash}) within {secs} s ({peers} peer(s) known: the config's and the catalog's)")]
    MagnetStalled { name: String, info_hash: String, secs: u64, peers: usize },
    #[error("the torrent peers sent for '{name}' ({info_hash}) is refused")]
    Metainfo {
        name: String,
        info_hash: String,
        #[source]
        source: MetainfoError,
    },
    #[error("the torrent peers sent for '{name}' ({info_hash}) disagrees with its identity: {what}")]
    Disagrees { name: String, info_hash: String, what: String },
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// The request's pool and the validated manifest of the master it names.
pub async fn resolve(ctx: &Ctx, r: &MasterRequest) -> Result<(String, Manifest), ResolveError> {
    let pool = r.pool.clone().ok_or(ResolveError::NoPool)?;
    let m = match (&r.manifest, &r.manifest_path, &r.identity, &r.name) {
        (Some(v), None, None, None) => Manifest::from_value(v.clone())?,
        (None, Some(p), None, None) => {
            if !p.starts_with('/') {
                return Err(ResolveError::RelativeManifestPath(p.clone()));
            }
            Manifest::load_off_runtime(PathBuf::from(p)).await?
        }
        (None, None, Some(id), None) => by_identity(ctx, id).await?,
        (None, None, None, Some(name)) => by_name(ctx, &pool, name)?,
        _ => return Err(ResolveError::Choice),
    };
    Ok((pool, m))
}

/// A master by name: the one trusted catalog entry of that name.
pub fn by_name(ctx: &Ctx, pool: &str, name: &str) -> Result<Manifest, ResolveError> {
    manifest::validate_name(name)
        .map_err(|e| ResolveError::Identity { name: name.to_string(), what: e.to_string() })?;
    ctx.catalog
        .by_name(name)?
        .ok_or_else(|| ResolveError::NoSuchName { name: name.to_string(), pool: pool.to_string() })
}

/// Checks what an identity says on its own (it is used as a file name and in a magnet).
pub fn check_identity(id: &Identity) -> Result<(), ResolveError> {
    let bad = |what: String| Err(ResolveError::Identity { name: id.name.clone(), what });
    if let Err(e) = manifest::validate_name(&id.name) {
        return bad(e.to_string());
    }
    if id.format != "qcow2" && id.format != "raw" {
        return bad(format!("format '{}' is not accepted (qcow2 or raw)", id.format));
    }
    if !is_hex(&id.sha256, 64) {
        return bad("sha256 is not 64 lower-case hex digits".into());
    }
    if let Some(ih) = &id.info_hash {
        if !is_hex(ih, 40) {
            return bad("info-hash is not 40 lower-case hex digits".into());
        }
    }
    if id.virtual_size == Some(0) {
        return bad("virtual size is 0".into());
    }
    Ok(())
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A master by identity: the trusted catalog's manifest, else the torrent from peers by magnet.
pub async fn by_identity(ctx: &Ctx, id: &Identity) -> Result<Manifest, ResolveError> {
    check_identity(id)?;
    if let Some(m) = ctx.catalog.by_identity(&id.sha256, id.info_hash.as_deref()) {
        return from_catalog(id, m);
    }
    let Some(ih) = id.info_hash.clone() else {
        return Err(ResolveError::NotInCatalog { name: id.name.clone(), sha256: id.sha256.clone() });
    };
    let virtual_size = match (id.format.as_str(), id.virtual_size) {
        ("qcow2", None) => return Err(ResolveError::NoVirtualSize { name: id.name.clone() }),
        (_, v) => v,
    };
    let hosts = ctx.catalog.hosts_of(&ih);
    let peers = ctx.peers_with(hosts.clone()).await?;
    let secs = ctx.cfg.stall_timeout;
    let magnet = manifest::magnet(&ih, &id.name, &[], &[]);
    let got = tokio::time::timeout(
        Duration::from_secs(secs),
        ctx.torrents.resolve_magnet(&magnet, &ih, peers.clone(), &ctx.cfg.trackers),
    )
    .await;
    let (name, info_hash) = (id.name.clone(), ih.clone());
    let bytes = match got {
        Err(_) => return Err(ResolveError::MagnetStalled { name, info_hash, secs, peers: peers.len() }),
        Ok(Err(source)) => return Err(ResolveError::Magnet { name, info_hash, source }),
        Ok(Ok(b)) => b,
    };
    let m = manifest_from_torrent(id, &ih, virtual_size, &bytes, hosts)?;
    Ok(m)
}

/// The catalog's manifest for an identity, under the identity's name (the file name the domain
/// expects). Its format and virtual size must agree with the identity.
fn from_catalog(id: &Identity, m: Manifest) -> Result<Manifest, ResolveError> {
    let disagree = |what, catalog: String, identity: String| {
        Err(ResolveError::CatalogDisagrees { sha256: id.sha256.clone(), what, catalog, identity })
    };
    if m.format != id.format {
        return disagree("format", m.format, id.format.clone());
    }
    if let Some(v) = id.virtual_size.filter(|v| *v != m.virtual_size) {
        return disagree("virtual size", m.virtual_size.to_string(), v.to_string());
    }
    let m = Manifest { name: id.name.clone(), ..m };
    m.validate()?;
    Ok(m)
}

/// The manifest of an identity whose torrent came from peers: the torrent validated, and its
/// info-hash, name and length checked against the identity.
pub fn manifest_from_torrent(
    id: &Identity,
    info_hash: &str,
    virtual_size: Option<u64>,
    bytes: &[u8],
    hosts: Vec<String>,
) -> Result<Manifest, ResolveError> {
    let (name, ih) = (id.name.clone(), info_hash.to_string());
    let mi = metainfo::validate(bytes, None).map_err(|source| ResolveError::Metainfo {
        name: name.clone(),
        info_hash: ih.clone(),
        source,
    })?;
    let disagrees = |what: String| Err(ResolveError::Disagrees { name: name.clone(), info_hash: ih.clone(), what });
    if mi.info_hash != info_hash {
        return disagrees(format!("its info-hash is {}", mi.info_hash));
    }
    if mi.name != id.name {
        return disagrees(format!("it names the file '{}'", mi.name.escape_debug()));
    }
    let virtual_size = match (id.format.as_str(), virtual_size) {
        ("raw", Some(v)) if v != mi.length => return disagrees(format!("its length is {}, not {v}", mi.length)),
        ("raw", _) => mi.length,
        (_, Some(v)) => v,
        (_, None) => return Err(ResolveError::NoVirtualSize { name }),
    };
    let peers: Vec<String> =
        hosts.into_iter().filter(|h| manifest::check_peer(h).is_ok()).take(manifest::MAX_HINTS).collect();
    let m = Manifest {
        version: MANIFEST_VERSION,
        name: id.name.clone(),
        format: id.format.clone(),
        size: mi.length,
        virtual_size,
        sha256: id.sha256.clone(),
        info_hash: info_hash.to_string(),
        piece_length: mi.piece_length,
        magnet: manifest::magnet(info_hash, &id.name, &[], &[]),
        peers,
        trackers: vec![],
        torrent_hex: Some(hex::encode(bytes)),
    };
    m.validate()?;
    Ok(m)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn torrent(name: &str, data: &[u8]) -> (Vec<u8>, String) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, data).unwrap();
        let h = metainfo::create(&p, name, 1 << 14, &[]).unwrap();
        (h.torrent, h.info_hash)
    }

    fn identity(name: &str, format: &str, ih: &str, vs: Option<u64>) -> Identity {
        Identity {
            name: name.into(),
            format: format.into(),
            sha256: "ab".repeat(32),
            info_hash: Some(ih.into()),
            virtual_size: vs,
        }
    }

    #[test]
    fn a_torrent_that_agrees_with_the_identity_makes_a_manifest_with_its_metainfo() {
        let (t, ih) = torrent("m.raw", &[7u8; 40000]);
        let m =
            manifest_from_torrent(&identity("m.raw", "raw", &ih, None), &ih, None, &t, vec!["10.0.0.1:6881".into()])
                .unwrap();
        assert_eq!((m.size, m.virtual_size, m.piece_length), (40000, 40000, 1 << 14));
        assert_eq!(m.sha256, "ab".repeat(32));
        assert_eq!(m.peers, ["10.0.0.1:6881"]);
        assert_eq!(m.torrent_bytes().unwrap(), t);
    }

    #[test]
    fn a_torrent_that_disagrees_with_the_identity_is_refused_saying_how() {
        let (t, ih) = torrent("m.raw", &[7u8; 40000]);
        let other = "0".repeat(40);
        let cases: [(Identity, &str, Option<u64>, &[u8], &str); 5] = [
            (identity("other.raw", "raw", &ih, None), &ih, None, &t, "it names the file 'm.raw'"),
            (identity("m.raw", "raw", &other, None), &other, None, &t, "its info-hash is "),
            (identity("m.raw", "raw", &ih, Some(5)), &ih, Some(5), &t, "its length is 40000, not 5"),
            (identity("m.raw", "qcow2", &ih, None), &ih, None, &t, "has no virtual size"),
            (identity("m.raw", "raw", &ih, None), &ih, None, b"d4:infod", "is refused"),
        ];
        for (id, ih, vs, bytes, says) in cases {
            let e = manifest_from_torrent(&id, ih, vs, bytes, vec![]).unwrap_err();
            let line = vcc_core::error::one_line(&e);
            assert!(line.contains(says), "{line} lacks {says}");
        }
    }

    #[test]
    fn an_identity_is_checked_before_it_is_used_as_a_file_name_or_in_a_magnet() {
        let good = identity("m.raw", "raw", &"c".repeat(40), None);
        assert!(check_identity(&good).is_ok());
        for (id, says) in [
            (Identity { name: "../etc".into(), ..good.clone() }, "name"),
            (Identity { format: "vmdk".into(), ..good.clone() }, "format 'vmdk'"),
            (Identity { sha256: "AB".repeat(32), ..good.clone() }, "sha256"),
            (Identity { info_hash: Some("c&x.pe=1".into()), ..good.clone() }, "info-hash"),
            (Identity { virtual_size: Some(0), ..good.clone() }, "virtual size is 0"),
        ] {
            let e = check_identity(&id).unwrap_err().to_string();
            assert!(e.contains(says), "{e} lacks {says}");
        }
    }
}
