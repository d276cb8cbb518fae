//! `virt-clone-cow --original NAME --name NEW ...`: linked clones of a shut-off domain.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::apply::{apply, ApplyError, ApplyOptions, CloneOutcome};
use crate::plan::{auto_names, numbered_names, plan, ClonePlan, Master, OverlayLocation, PlanError, PlanInput};
use vcc_core::overlay::{image_info, OverlayError, OverlayOptions, MASTER_FORMATS};
use vcc_core::xml::{DiskSource, DomainFacts, XmlError};
use vcc_libvirt::{Libvirt, LibvirtError};

/// Which names the clones get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameRequest {
    /// Exactly these names.
    Names(Vec<String>),
    /// `BASE-1` .. `BASE-count`.
    Numbered { base: String, count: usize },
    /// Free names `ORIGINAL-clone`, `ORIGINAL-clone-1`, ...
    Auto { count: usize },
}

/// A clone run, as the command line asked for it.
#[derive(Debug, Clone)]
pub struct CloneRequest {
    pub original: String,
    pub names: NameRequest,
    pub start: bool,
    pub dry_run: bool,
    /// Mark the clones disposable: the hook discards their overlays when they stop.
    pub disposable: bool,
    /// Overlays larger than their masters, or in another pool (`--disk-size`, `--overlay-pool`).
    pub overlay: crate::placement::OverlayRequest,
    /// Reflinked full copies instead of overlays (xfs with reflink=1, btrfs): no backing chain,
    /// and the original stays an ordinary domain.
    pub reflink: bool,
    /// Reset each clone's guest identity with virt-sysprep ([`crate::sysprep`]).
    pub sysprep: bool,
}

impl CloneRequest {
    /// Linked clones of `original` with exactly these names, nothing started: the defaults of the
    /// command line (`CloneRequest { reflink: true, ..CloneRequest::named(o, n) }`).
    pub fn named(original: &str, names: Vec<String>) -> Self {
        CloneRequest {
            original: original.to_string(),
            names: NameRequest::Names(names),
            start: false,
            dry_run: false,
            disposable: false,
            reflink: false,
            overlay: Default::default(),
            sysprep: false,
        }
    }
}

/// Why a clone run failed. Each says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("domain '{0}' is running; shut it down first (virsh shutdown '{0}'): a linked clone needs its master unchanging")]
    OriginalRunning(String),
    #[error("a domain named '{0}' exists already; pick another --name, or use --auto-clone")]
    NameTaken(String),
    #[error("disk {target} of '{domain}' has format '{format}', which cannot be a master (only qcow2 and raw); convert it first with `qemu-img convert -O qcow2`")]
    UnsupportedFormat { domain: String, target: String, format: String },
    #[error("disk {target} of '{domain}' states no format (<driver type=...>); add one (virsh edit) so the image is never probed")]
    NoFormat { domain: String, target: String },
    #[error("disk {target} of '{domain}' is a {kind} disk ({what}); only file and volume disks can be linked. Mark it <shareable/> or <readonly/> to share it with the clones, or move it to a file")]
    UnsupportedDiskType { domain: String, target: String, kind: String, what: String },
    #[error("disk {target} of '{domain}': '{path}' is in no storage pool and the connection ({uri}) is remote; define a pool over its directory so libvirt can make the overlay")]
    RemoteNeedsPool { domain: String, target: String, path: String, uri: String },
    #[error("disk {target} of '{domain}': volume '{volume}' is not in pool '{pool}'")]
    NoVolume { domain: String, target: String, pool: String, volume: String },
    #[error("disk {target} of '{domain}': cannot read the master")]
    Master {
        domain: String,
        target: String,
        #[source]
        source: OverlayError,
    },
    #[error("'{path}' is the master of disk {master_target} and also the shared writable disk {shared_target} of '{domain}'; a master must not change under its clones: make {shared_target} <readonly/> or give it its own file")]
    MasterShared { domain: String, path: String, master_target: String, shared_target: String },
    #[error("disk '{target}' of '{domain}' has a target name that cannot name an overlay file (letters and digits only, like vda)")]
    BadTarget { domain: String, target: String },
    #[error("disk {target} of '{domain}' names its image by a relative path ('{path}'); give the absolute path (virsh edit)")]
    RelativeMaster { domain: String, target: String, path: String },
    #[error("domain '{0}' has a saved state (managed save): its disks are mid-flight. Start it and shut it down, or drop the state with `virsh managedsave-remove '{0}'`, then clone")]
    OriginalSaved(String),
    #[error("'{0}' exists already (left from an earlier clone with this name?); remove it or pick another name")]
    OverlayExists(String),
    #[error("cannot read the XML of domain '{domain}'")]
    Xml {
        domain: String,
        #[source]
        source: XmlError,
    },
    #[error("disk {target} of '{domain}' cannot be reflinked")]
    Reflink {
        domain: String,
        target: String,
        #[source]
        source: crate::reflink::ReflinkError,
    },
    #[error(transparent)]
    PoolType(#[from] crate::pool_types::PoolTypeRefused),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Placement(#[from] crate::placement::PlacementError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Sysprep(#[from] crate::sysprep::SysprepError),
}

/// One disk of a clone in the report.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub target: String,
    pub overlay: String,
    /// `qcow2` for an overlay; the master's format for a reflinked copy.
    pub format: String,
    /// The master (for a reflinked copy: the image it was copied from, not a backing file).
    pub backing: String,
    pub backing_format: String,
    /// The overlay's virtual size in bytes.
    pub virtual_size: u64,
    /// A reflinked full copy (`--reflink`) with no backing file, not an overlay.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reflinked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// One clone in the report.
#[derive(Debug, Clone, Serialize)]
pub struct CloneEntry {
    pub name: String,
    /// None in a dry run (libvirt assigns it at define).
    pub uuid: Option<String>,
    pub started: bool,
    pub macs: Vec<String>,
    pub disks: Vec<DiskReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvram: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub define_ms: Option<f64>,
    /// With --sysprep: the guest's new hostname and machine-id, and virt-sysprep's time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sysprep: Option<SysprepReport>,
}

/// What --sysprep gave a clone.
#[derive(Debug, Clone, Serialize)]
pub struct SysprepReport {
    pub hostname: String,
    pub machine_id: String,
    pub ms: f64,
}

/// What `--json` prints: one object.
#[derive(Debug, Clone, Serialize)]
pub struct CloneReport {
    pub original: String,
    pub dry_run: bool,
    /// The original is now a template (its masters read-only).
    pub template: bool,
    pub clones: Vec<CloneEntry>,
    /// The overlays' qcow2 layout as `--overlay-layout` names it (none for reflinked copies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_layout: Option<String>,
    pub elapsed_ms: f64,
}

/// Plans and (unless a dry run) makes the clones.
pub fn clone_domain(lv: &Libvirt, req: &CloneRequest) -> Result<CloneReport, CloneError> {
    let t0 = Instant::now();
    if req.sysprep {
        // Before anything is made: where virt-sysprep cannot run, nothing is.
        if !lv.is_local() {
            return Err(crate::sysprep::SysprepError::Remote(lv.uri().to_string()).into());
        }
        if !crate::sysprep::available() {
            return Err(crate::sysprep::SysprepError::NotInstalled.into());
        }
    }
    let _lock = if req.dry_run {
        None
    } else {
        Some(crate::lock::OriginalLock::acquire(lv.uri(), &req.original, std::time::Duration::from_secs(120))?)
    };
    let plan = make_plan(lv, req)?;
    let outcomes = if req.dry_run {
        Vec::new()
    } else {
        apply(
            lv,
            &plan,
            ApplyOptions {
                start: req.start,
                overlay: OverlayOptions::preferred().with_layout(req.overlay.layout),
                sysprep: req.sysprep,
            },
        )?
    };
    Ok(report(&plan, &outcomes, req.dry_run, req.overlay.layout, t0))
}

/// Reads the original and the host, checks everything that can be checked before any change, and
/// returns the plan.
pub fn make_plan(lv: &Libvirt, req: &CloneRequest) -> Result<ClonePlan, CloneError> {
    let (xml, facts, masters) = read_original(lv, &req.original)?;
    let placement = crate::placement::resolve(lv, &req.overlay, &req.original, &masters, req.disposable)?;
    if req.reflink {
        for m in &masters {
            crate::reflink::check_master(lv, m).map_err(|source| CloneError::Reflink {
                domain: req.original.clone(),
                target: m.target.clone(),
                source,
            })?;
        }
    }

    let domains = lv.list_domains()?;
    let existing: HashSet<String> = domains.iter().map(|d| d.name.clone()).collect();
    let mut taken_macs = HashSet::new();
    for d in &domains {
        if let Ok(f) = DomainFacts::parse(&d.xml) {
            taken_macs.extend(f.macs.into_iter().flatten().map(|m| m.to_ascii_lowercase()));
        }
    }
    let names = match &req.names {
        NameRequest::Names(n) => n.clone(),
        NameRequest::Numbered { base, count } => numbered_names(base, *count),
        NameRequest::Auto { count } => auto_names(&req.original, &existing, *count),
    };
    if let Some(n) = names.iter().find(|n| existing.contains(*n)) {
        return Err(CloneError::NameTaken(n.clone()));
    }

    let nvram_pool = match facts.nvram.as_ref().and_then(|n| n.path.as_deref()) {
        Some(p) => lv.volume_by_path(p)?.map(|v| v.pool),
        None => None,
    };
    let input = PlanInput {
        original_xml: &xml,
        facts: &facts,
        masters: &masters,
        names: &names,
        taken_macs: &taken_macs,
        disposable: req.disposable,
        nvram_pool,
        reflink: req.reflink,
    };
    let mut plan = crate::plan::plan_with(&input, &placement, random3)?;

    // Nothing may be overwritten: check every path the plan would create.
    for c in &mut plan.clones {
        for o in &c.overlays {
            let exists = match &o.location {
                OverlayLocation::File { path } => Path::new(path).exists(),
                OverlayLocation::Volume { pool, name, path } => {
                    lv.volume(pool, name)?.is_some() || (lv.is_local() && Path::new(path).exists())
                }
            };
            if exists {
                return Err(CloneError::OverlayExists(o.location.path().to_string()));
            }
        }
        if let Some(nv) = &c.nvram {
            if lv.is_local() && Path::new(&nv.to).exists() {
                return Err(CloneError::OverlayExists(nv.to.clone()));
            }
            if !lv.is_local() && nv.pool.is_none() {
                tracing::warn!(
                    "the UEFI vars of '{}' are not in a storage pool on the remote host; '{}' starts with fresh vars",
                    req.original,
                    c.name
                );
                c.nvram = None;
            }
        }
    }
    Ok(plan)
}

/// The original's XML, facts and masters, once it is known to be shut off with no saved state.
pub(crate) fn read_original(lv: &Libvirt, original: &str) -> Result<(String, DomainFacts, Vec<Master>), CloneError> {
    let xml = lv.domain_xml(original)?;
    if lv.is_active(original)? {
        return Err(CloneError::OriginalRunning(original.to_string()));
    }
    if lv.has_managed_save(original)? {
        return Err(CloneError::OriginalSaved(original.to_string()));
    }
    let facts = DomainFacts::parse(&xml).map_err(|source| CloneError::Xml { domain: original.to_string(), source })?;
    let masters = resolve_masters(lv, &facts)?;
    Ok((xml, facts, masters))
}

/// Finds the master behind every private disk, refusing disks that cannot be linked. Each takes
/// the identity the original's metadata records for it (once published).
/// The original's own plan, with no clones: its template metadata and masters.
pub(crate) fn template_plan(xml: &str, facts: &DomainFacts, masters: &[Master]) -> Result<ClonePlan, PlanError> {
    let input = PlanInput {
        original_xml: xml,
        facts,
        masters,
        names: &[],
        taken_macs: &HashSet::new(),
        disposable: false,
        nvram_pool: None,
        reflink: false,
    };
    plan(&input, random3)
}

/// Makes `original` a template without cloning it (what a first clone does: its masters
/// read-only, the template metadata written), for `publish` of a domain never cloned yet. The
/// returned log undoes it when dropped uncommitted.
pub(crate) fn make_template_only<'a>(
    lv: &'a Libvirt,
    original: &str,
) -> Result<crate::apply::Transaction<'a>, CloneError> {
    let (xml, facts, masters) = read_original(lv, original)?;
    let plan = template_plan(&xml, &facts, &masters)?;
    let mut tx = crate::apply::Transaction::new(lv);
    crate::apply::make_template(&mut tx, &plan)?;
    Ok(tx)
}

pub(crate) fn resolve_masters(lv: &Libvirt, facts: &DomainFacts) -> Result<Vec<Master>, CloneError> {
    let domain = &facts.name;
    let mut out = Vec::new();
    for d in facts.private_disks() {
        let target = d.label();
        // The target names the overlay file: keep it to what libvirt's own targets look like.
        if d.target.is_none() || !target.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(CloneError::BadTarget { domain: domain.clone(), target });
        }
        if let DiskSource::File(path) = &d.source {
            if !path.starts_with('/') {
                return Err(CloneError::RelativeMaster { domain: domain.clone(), target, path: path.clone() });
            }
        }
        let format =
            d.format.clone().ok_or_else(|| CloneError::NoFormat { domain: domain.clone(), target: target.clone() })?;
        if !MASTER_FORMATS.contains(&format.as_str()) {
            return Err(CloneError::UnsupportedFormat { domain: domain.clone(), target, format });
        }
        let (vol, volume_disk) = match &d.source {
            DiskSource::File(path) => (lv.volume_by_path(path)?, false),
            DiskSource::Volume { pool, volume } => match lv.volume(pool, volume)? {
                Some(v) => (Some(v), true),
                None => {
                    return Err(CloneError::NoVolume {
                        domain: domain.clone(),
                        target,
                        pool: pool.clone(),
                        volume: volume.clone(),
                    })
                }
            },
            DiskSource::Block(dev) => {
                return Err(CloneError::UnsupportedDiskType {
                    domain: domain.clone(),
                    target,
                    kind: "block".into(),
                    what: dev.clone(),
                })
            }
            DiskSource::Other(what) => {
                return Err(CloneError::UnsupportedDiskType {
                    domain: domain.clone(),
                    target,
                    kind: d.disk_type.clone(),
                    what: what.clone(),
                })
            }
            DiskSource::None => continue,
        };
        if let Some(v) = &vol {
            // Only pools of files hold overlays: any other type is refused with what to do.
            let kind = lv.pool_type(&v.pool)?.unwrap_or_default();
            crate::pool_types::check(domain, &target, &v.pool, &kind)?;
        }
        let master = match vol {
            Some(v) => Master {
                pool: Some(v.pool.clone()),
                volume: Some(v.facts.name.clone()),
                volume_disk,
                self_contained: v.facts.backing.is_none(),
                ..Master::file(d.index, &target, &v.facts.path, &format, v.facts.capacity)
            },
            None => {
                let DiskSource::File(path) = &d.source else { continue };
                if !lv.is_local() {
                    return Err(CloneError::RemoteNeedsPool {
                        domain: domain.clone(),
                        target,
                        path: path.clone(),
                        uri: lv.uri().to_string(),
                    });
                }
                let info = image_info(path, &format).map_err(|source| CloneError::Master {
                    domain: domain.clone(),
                    target: target.clone(),
                    source,
                })?;
                Master {
                    self_contained: info.backing.is_none(),
                    ..Master::file(d.index, &target, path, &format, info.virtual_size)
                }
            }
        };
        out.push(master);
    }
    // A published template's masters carry their identity from here on (also to other hosts,
    // where a pool map moves them to another path and pool).
    let template = facts
        .vcc_metadata
        .as_deref()
        .and_then(|x| vcc_core::metadata::CowMetadata::parse(x).ok())
        .and_then(|md| md.template);
    crate::plan::carry_identity(&mut out, template.as_ref());
    // A master must not also be written through a shareable disk.
    for m in &out {
        for d in &facts.disks {
            let writable_shared = d.shareable && !d.readonly && matches!(d.device.as_str(), "disk" | "lun");
            if writable_shared && matches!(&d.source, DiskSource::File(p) if vcc_core::metadata::same_file(p, &m.path))
            {
                return Err(CloneError::MasterShared {
                    domain: domain.clone(),
                    path: m.path.clone(),
                    master_target: m.target.clone(),
                    shared_target: d.label(),
                });
            }
        }
    }
    Ok(out)
}

fn report(
    plan: &ClonePlan,
    outcomes: &[CloneOutcome],
    dry_run: bool,
    layout: vcc_core::layout::OverlayLayout,
    t0: Instant,
) -> CloneReport {
    let clones = plan.clones.iter().map(|c| clone_entry(c, outcomes.iter().find(|o| o.name == c.name))).collect();
    CloneReport {
        original: plan.original.clone(),
        dry_run,
        template: !dry_run && !plan.reflink,
        clones,
        overlay_layout: (!plan.reflink).then(|| layout.to_string()),
        elapsed_ms: (t0.elapsed().as_secs_f64() * 1e6).round() / 1e3,
    }
}

/// One clone as the report shows it (`o`: what was made, None in a dry run).
pub(crate) fn clone_entry(c: &crate::plan::CloneSpec, o: Option<&CloneOutcome>) -> CloneEntry {
    CloneEntry {
        name: c.name.clone(),
        uuid: o.map(|o| o.uuid.clone()),
        started: o.is_some_and(|o| o.started),
        macs: c.macs.clone(),
        disks: c
            .overlays
            .iter()
            .map(|ov| {
                let (pool, volume) = match &ov.location {
                    OverlayLocation::Volume { pool, name, .. } => (Some(pool.clone()), Some(name.clone())),
                    OverlayLocation::File { .. } => (None, None),
                };
                DiskReport {
                    target: ov.target.clone(),
                    overlay: ov.location.path().to_string(),
                    format: if ov.reflink { ov.master.format.clone() } else { "qcow2".into() },
                    backing: ov.master.path.clone(),
                    backing_format: ov.master.format.clone(),
                    virtual_size: ov.size,
                    reflinked: ov.reflink,
                    pool,
                    volume,
                }
            })
            .collect(),
        nvram: c.nvram.as_ref().map(|n| n.to.clone()),
        define_ms: o.map(|o| o.define_ms),
        sysprep: o.and_then(|o| o.sysprep.as_ref()).map(|s| SysprepReport {
            hostname: s.hostname.clone(),
            machine_id: s.machine_id.clone(),
            ms: crate::apply::ms(s.elapsed),
        }),
    }
}

/// Three random bytes from the kernel, for MAC addresses.
pub(crate) fn random3() -> [u8; 3] {
    let mut b = [0u8; 3];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if ok.is_err() {
        // Fall back to the clock; uniqueness is still enforced against taken MACs.
        let n =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
    }
    b
}
