//! The one adapter through which virt-clone-cow and pool-helper talk to libvirt (crate `virt`).
//!
//! Everything else works on XML strings and plain data (`vcc-core`), so it can be tested without a
//! daemon. Errors are classified by libvirt error code, never by message text. The hook does not
//! depend on this crate: it never calls libvirt.

pub mod blockjob;
pub mod events;
pub mod watch;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use vcc_core::metadata::{CowMetadata, NAMESPACE, PREFIX};
use vcc_core::xml::{VolumeFacts, XmlError};

/// libvirt's own message for a failed call (its code is kept for matching, not shown).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct VirtError {
    pub message: String,
    pub code: i64,
}

impl From<virt::error::Error> for VirtError {
    fn from(e: virt::error::Error) -> Self {
        VirtError { message: e.message().to_string(), code: e.code().to_raw() as i64 }
    }
}

/// A libvirt call that failed, with what we were doing.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at '{uri}' (is libvirtd running, and may you use it?)")]
    Connect {
        uri: String,
        #[source]
        source: VirtError,
    },
    #[error("domain '{0}' not found (see `virsh list --all`)")]
    NoDomain(String),
    #[error("{op}")]
    Call {
        op: String,
        #[source]
        source: VirtError,
    },
    #[error("libvirt returned XML we cannot read ({what})")]
    Xml {
        what: String,
        #[source]
        source: XmlError,
    },
}

type Result<T> = std::result::Result<T, LibvirtError>;

fn call(op: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let op = op.into();
    move |source| LibvirtError::Call { op, source: source.into() }
}

fn is(e: &virt::error::Error, n: ErrorNumber) -> bool {
    e.code() == n.into()
}

/// A domain as listed: name, inactive XML, whether it runs.
#[derive(Debug, Clone)]
pub struct DomainEntry {
    pub name: String,
    pub xml: String,
    pub active: bool,
}

/// An active storage pool and its XML, read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivePool {
    pub name: String,
    pub xml: String,
}

impl ActivePool {
    /// `<pool type=...>`: dir, fs, netfs, logical, zfs, rbd, iscsi, ...
    pub fn kind(&self) -> Option<String> {
        vcc_core::xml::volume::pool_type(&self.xml)
    }

    /// `<target><path>`, if it has one.
    pub fn target(&self) -> Option<String> {
        vcc_core::xml::volume::pool_target_path(&self.xml)
    }

    /// The directory of files of a dir, fs or netfs pool; None for other pool types.
    pub fn file_dir(&self) -> Option<String> {
        vcc_core::xml::volume::pool_file_dir(&self.xml)
    }
}

/// A storage volume and the pool it lives in.
#[derive(Debug, Clone)]
pub struct Volume {
    pub pool: String,
    pub facts: VolumeFacts,
}

/// Whether a libvirt URI reaches the daemon of this host, whose files we may touch: no host part,
/// and no `socket=` parameter (a socket may belong to a daemon with its own filesystem, such as a
/// test bed host in its own mount namespace), and no transport other than the local socket.
pub fn uri_is_local(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else { return true };
    let transport_local = match scheme.split_once('+') {
        None => true,
        Some((_, t)) => t == "unix",
    };
    let query = rest.split_once('?').map(|(_, q)| q).unwrap_or("");
    let socket = query.split('&').any(|kv| kv.split('=').next() == Some("socket"));
    rest.starts_with('/') && transport_local && !socket
}

/// An open libvirt connection.
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).finish()
    }
}

impl Libvirt {
    /// Connects to `uri` (None: libvirt's default, `LIBVIRT_DEFAULT_URI` or qemu:///system as root).
    pub fn open(uri: Option<&str>) -> Result<Self> {
        // libvirt prints every error to stderr by default; we report errors ourselves.
        virt::error::clear_error_callback();
        let conn = Connect::open(uri).map_err(|source| LibvirtError::Connect {
            uri: uri.unwrap_or("(default)").to_string(),
            source: source.into(),
        })?;
        let uri = conn.uri().unwrap_or_else(|_| uri.unwrap_or_default().to_string());
        Ok(Libvirt { conn, uri })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the daemon runs on this host, so files can be touched directly. Remote
    /// connections work through the storage API only. See [`uri_is_local`].
    pub fn is_local(&self) -> bool {
        uri_is_local(&self.uri)
    }

    fn domain(&self, name: &str) -> Result<Domain> {
        self.conn.lookup_domain_by_name(name).map_err(|e| {
            if is(&e, ErrorNumber::NoDomain) {
                LibvirtError::NoDomain(name.to_string())
            } else {
                call(format!("looking up domain '{name}'"))(e)
            }
        })
    }

    pub fn domain_exists(&self, name: &str) -> Result<bool> {
        match self.domain(name) {
            Ok(_) => Ok(true),
            Err(LibvirtError::NoDomain(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The persistent (inactive) XML, with secrets such as VNC passwords included so the clone
    /// keeps them, as virt-clone does.
    pub fn domain_xml(&self, name: &str) -> Result<String> {
        let d = self.domain(name)?;
        d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(call(format!("reading the XML of domain '{name}'")))
    }

    pub fn is_active(&self, name: &str) -> Result<bool> {
        self.domain(name)?.is_active().map_err(call(format!("asking whether '{name}' runs")))
    }

    pub fn autostart(&self, name: &str) -> Result<bool> {
        self.domain(name)?.autostart().map_err(call(format!("reading the autostart flag of '{name}'")))
    }

    pub fn set_autostart(&self, name: &str, on: bool) -> Result<()> {
        self.domain(name)?.set_autostart(on).map_err(call(format!("setting the autostart flag of '{name}'")))
    }

    /// Whether the domain has a managed-save image (its RAM state saved with `virsh managedsave`).
    pub fn has_managed_save(&self, name: &str) -> Result<bool> {
        self.domain(name)?.has_managed_save(0).map_err(call(format!("asking whether '{name}' has a saved state")))
    }

    /// Every domain on the connection, running or not.
    pub fn list_domains(&self) -> Result<Vec<DomainEntry>> {
        let doms = self.conn.list_all_domains(0).map_err(call("listing domains"))?;
        let mut out = Vec::with_capacity(doms.len());
        for d in doms {
            // A domain may vanish between listing and reading it: skip it.
            let (Ok(name), Ok(xml)) = (d.name(), d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)) else {
                continue;
            };
            let active = d.is_active().unwrap_or(false);
            out.push(DomainEntry { name, xml, active });
        }
        Ok(out)
    }

    /// Defines a persistent domain; returns its UUID.
    pub fn define(&self, xml: &str, name: &str) -> Result<String> {
        let d = self.conn.define_domain_xml(xml).map_err(call(format!("defining domain '{name}'")))?;
        d.uuid_string().map_err(call(format!("reading the UUID of '{name}'")))
    }

    /// Undefines a domain, keeping its UEFI vars file (the caller owns that file).
    pub fn undefine(&self, name: &str) -> Result<()> {
        let d = self.domain(name)?;
        d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            .map_err(call(format!("undefining domain '{name}'")))
    }

    pub fn start(&self, name: &str) -> Result<()> {
        self.domain(name)?.create().map_err(call(format!("starting domain '{name}'")))
    }

    pub fn destroy(&self, name: &str) -> Result<()> {
        self.domain(name)?.destroy().map_err(call(format!("stopping domain '{name}'")))
    }

    /// Our metadata element of a domain's persistent config, if it has one.
    pub fn cow_metadata(&self, name: &str) -> Result<Option<CowMetadata>> {
        let d = self.domain(name)?;
        match d.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(NAMESPACE), sys::VIR_DOMAIN_AFFECT_CONFIG) {
            Ok(x) => CowMetadata::parse(&x)
                .map(Some)
                .map_err(|source| LibvirtError::Xml { what: format!("the metadata of '{name}'"), source }),
            Err(e) if is(&e, ErrorNumber::NoDomainMetadata) => Ok(None),
            Err(e) => Err(call(format!("reading the metadata of '{name}'"))(e)),
        }
    }

    /// Sets (Some) or removes (None) our metadata element in a domain's persistent config.
    pub fn set_cow_metadata(&self, name: &str, md: Option<&CowMetadata>) -> Result<()> {
        let d = self.domain(name)?;
        // libvirt declares the namespace and prefixes every element itself.
        let xml = md.map(CowMetadata::to_bare_xml);
        d.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            xml.as_deref(),
            xml.as_ref().map(|_| PREFIX),
            Some(NAMESPACE),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        )
        .map_err(call(format!("writing the metadata of '{name}'")))
    }

    fn pool(&self, name: &str) -> Result<StoragePool> {
        self.conn.lookup_storage_pool_by_name(name).map_err(call(format!("looking up storage pool '{name}'")))
    }

    fn volume_of(&self, vol: &StorageVol, what: &str) -> Result<Volume> {
        let pool =
            vol.lookup_storage_pool().and_then(|p| p.name()).map_err(call(format!("finding the pool of {what}")))?;
        let xml = vol.xml_desc(0).map_err(call(format!("reading the XML of {what}")))?;
        let facts = VolumeFacts::parse(&xml).map_err(|source| LibvirtError::Xml { what: what.into(), source })?;
        Ok(Volume { pool, facts })
    }

    /// The pool volume at `path`, if the file belongs to a storage pool. A dir pool that has not
    /// seen the file yet is refreshed once.
    pub fn volume_by_path(&self, path: &str) -> Result<Option<Volume>> {
        let what = format!("volume '{path}'");
        match self.conn.lookup_storage_vol_by_path(path) {
            Ok(v) => return self.volume_of(&v, &what).map(Some),
            Err(e) if is(&e, ErrorNumber::NoStorageVolume) => {}
            Err(e) => return Err(call(format!("looking up {what}"))(e)),
        }
        let dir = match std::path::Path::new(path).parent() {
            Some(d) => d.to_string_lossy().into_owned(),
            None => return Ok(None),
        };
        let Some((pname, _)) = self.pool_targets()?.into_iter().find(|(_, target)| *target == dir) else {
            return Ok(None);
        };
        self.refresh_pool(&pname)?;
        match self.conn.lookup_storage_vol_by_path(path) {
            Ok(v) => self.volume_of(&v, &what).map(Some),
            Err(e) if is(&e, ErrorNumber::NoStorageVolume) => Ok(None),
            Err(e) => Err(call(format!("looking up {what}"))(e)),
        }
    }

    /// The volume `name` in `pool`, if it exists.
    pub fn volume(&self, pool: &str, name: &str) -> Result<Option<Volume>> {
        let p = self.pool(pool)?;
        match p.lookup_storage_vol_by_name(name) {
            Ok(v) => self.volume_of(&v, &format!("volume '{name}' in pool '{pool}'")).map(Some),
            Err(e) if is(&e, ErrorNumber::NoStorageVolume) => Ok(None),
            Err(e) => Err(call(format!("looking up volume '{name}' in pool '{pool}'"))(e)),
        }
    }

    /// Creates a volume from XML in `pool`; returns it.
    pub fn create_volume(&self, pool: &str, xml: &str, name: &str) -> Result<Volume> {
        let p = self.pool(pool)?;
        let what = format!("volume '{name}' in pool '{pool}'");
        let v = StorageVol::create_xml(&p, xml, 0).map_err(call(format!("creating {what}")))?;
        self.volume_of(&v, &what)
    }

    /// Creates a volume in `pool` as a copy of the volume at `from_path`.
    pub fn copy_volume(&self, pool: &str, xml: &str, name: &str, from_path: &str) -> Result<Volume> {
        self.create_volume_from(pool, xml, name, from_path, 0, "copying")
    }

    /// Creates a raw volume in `pool` as a reflinked copy of the raw volume at `from_path`
    /// (`VIR_STORAGE_VOL_CREATE_REFLINK`): it shares the source's extents, in constant time, on
    /// xfs (reflink=1) and btrfs. libvirt fails rather than copy when the filesystem cannot.
    pub fn reflink_volume(&self, pool: &str, xml: &str, name: &str, from_path: &str) -> Result<Volume> {
        self.create_volume_from(pool, xml, name, from_path, sys::VIR_STORAGE_VOL_CREATE_REFLINK, "reflinking")
    }

    /// `virStorageVolCreateXMLFrom` with `flags`; `verb` names the copy in the error.
    fn create_volume_from(
        &self,
        pool: &str,
        xml: &str,
        name: &str,
        from_path: &str,
        flags: u32,
        verb: &str,
    ) -> Result<Volume> {
        let p = self.pool(pool)?;
        let what = format!("volume '{name}' in pool '{pool}'");
        let src = self.conn.lookup_storage_vol_by_path(from_path).map_err(call(format!("looking up '{from_path}'")))?;
        let v = StorageVol::create_xml_from(&p, xml, &src, flags)
            .map_err(call(format!("{verb} '{from_path}' to {what}")))?;
        self.volume_of(&v, &what)
    }

    /// The XML of storage pool `pool`.
    fn pool_xml(&self, pool: &str) -> Result<String> {
        self.pool(pool)?.xml_desc(0).map_err(call(format!("reading the XML of storage pool '{pool}'")))
    }

    /// The type of a pool (`<pool type=...>`: dir, fs, netfs, logical, zfs, rbd, iscsi, ...).
    pub fn pool_type(&self, pool: &str) -> Result<Option<String>> {
        Ok(vcc_core::xml::volume::pool_type(&self.pool_xml(pool)?))
    }

    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        let p = self.pool(pool)?;
        let v =
            p.lookup_storage_vol_by_name(name).map_err(call(format!("looking up volume '{name}' in pool '{pool}'")))?;
        v.delete(0).map_err(call(format!("deleting volume '{name}' in pool '{pool}'")))
    }

    /// Every volume of every active pool.
    pub fn list_volumes(&self) -> Result<Vec<Volume>> {
        let pools = self
            .conn
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(call("listing storage pools"))?;
        let mut out = Vec::new();
        for p in pools {
            let pname = p.name().unwrap_or_default();
            let Ok(vols) = p.list_all_volumes(0) else { continue };
            for v in vols {
                let name = v.name().unwrap_or_default();
                match self.volume_of(&v, &format!("volume '{name}' in pool '{pname}'")) {
                    Ok(vol) => out.push(vol),
                    Err(e) => tracing::debug!("skipping a volume: {e}"),
                }
            }
        }
        Ok(out)
    }

    /// Every active pool, its XML read once.
    pub fn active_pools(&self) -> Result<Vec<ActivePool>> {
        let pools = self
            .conn
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(call("listing storage pools"))?;
        Ok(pools.iter().filter_map(|p| Some(ActivePool { name: p.name().ok()?, xml: p.xml_desc(0).ok()? })).collect())
    }

    /// Name and target directory of every active pool.
    pub fn pool_targets(&self) -> Result<Vec<(String, String)>> {
        Ok(self.active_pools()?.into_iter().filter_map(|p| p.target().map(|t| (p.name, t))).collect())
    }

    /// The target directory of a pool (`<target><path>`), if it has one (dir, fs, netfs pools).
    pub fn pool_dir(&self, pool: &str) -> Result<Option<String>> {
        Ok(vcc_core::xml::volume::pool_target_path(&self.pool_xml(pool)?))
    }

    /// Name and whether it is active, for every network defined on the host.
    pub fn networks(&self) -> Result<Vec<(String, bool)>> {
        let nets = self.conn.list_all_networks(0).map_err(call("listing networks"))?;
        nets.iter()
            .map(|n| {
                let name = n.name().map_err(call("reading a network's name"))?;
                let active = n.is_active().map_err(call(format!("reading the state of network '{name}'")))?;
                Ok((name, active))
            })
            .collect()
    }

    /// Names of the host's network interfaces (bridges included) as libvirt's interface API
    /// lists them, active or not.
    pub fn interfaces(&self) -> Result<Vec<String>> {
        let ifaces = self.conn.list_all_interfaces(0).map_err(call("listing host interfaces"))?;
        ifaces.iter().map(|i| i.name().map_err(call("reading an interface's name"))).collect()
    }

    /// The host's capabilities XML (guest architectures, emulators).
    pub fn capabilities(&self) -> Result<String> {
        self.conn.capabilities().map_err(call("reading the host's capabilities"))
    }

    /// Refreshes a pool so it lists what changed in its directory.
    pub fn refresh_pool(&self, pool: &str) -> Result<()> {
        self.pool(pool)?.refresh(0).map_err(call(format!("refreshing storage pool '{pool}'")))
    }
}

#[cfg(test)]
mod tests {
    use super::uri_is_local;

    #[test]
    fn only_uris_of_this_hosts_daemon_are_local() {
        for local in ["qemu:///system", "qemu+unix:///system", "qemu:///session", "test:///default", ""] {
            assert!(uri_is_local(local), "{local}");
        }
        for remote in [
            "qemu+ssh://root@b/system",
            "qemu+tls://b/system",
            "qemu+ssh:///system",
            "qemu+unix:///system?socket=/run/bed/b/libvirt-sock",
            "qemu:///system?socket=/x",
            "qemu+ext:///system?command=/bin/x",
            "qemu://b/system",
        ] {
            assert!(!uri_is_local(remote), "{remote}");
        }
    }
}
