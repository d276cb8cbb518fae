//! `virt-clone-cow --original T --count N --host URI [--host URI ...]`: linked clones of a
//! template defined on other hosts, through libvirt alone.
//!
//! The run, in order (nothing is changed before step 5):
//!
//! 1. connect to the original's host (`--connect`) and to every `--host`;
//! 2. read the original and its masters there (as a one-host clone does);
//! 3. read every host: domain names, every MAC, networks, interfaces, emulators, pools; refuse a
//!    host that lacks what the clones need, or has one of their names (one line naming host and
//!    object) — see [`check`];
//! 4. plan: names dealt round-robin, each master found in the (mapped) pool of each host, MACs
//!    unique over every host — see [`plan`]; any overlay volume already there is refused;
//! 5. carry it out under one undo log over every host: the original becomes a template, each
//!    host's overlays are made through the storage API where the host has the master, and by the
//!    hook at first start where it does not (the clone names its master by path and identity, so
//!    the host's pool-helper fetches it); then the domains are defined, and with `--start`
//!    started, in parallel across hosts. Any failure undoes every host.

pub mod check;
pub mod plan;

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use serde::Serialize;

use crate::apply::{check_interrupt, create_overlay_volume, make_template, ms, ApplyError, Transaction, Undo};
use crate::cmd::clone::{clone_entry, random3, read_original, CloneEntry, CloneError, NameRequest};
use crate::plan::{auto_names, numbered_names, ClonePlan, Master, OverlayLocation};
use check::{check_host, emulators, CheckError, Inventory, Needs};
use plan::{host_masters, parse_pool_map, plan_host, pools_needed, spread, HostInput, HostPlan, MultiPlanError};
use vcc_core::overlay::{BackingSpec, OverlayOptions};
use vcc_core::xml::DomainFacts;
use vcc_libvirt::{Libvirt, LibvirtError};

/// A multi-host clone run, as the command line asked for it.
#[derive(Debug, Clone)]
pub struct MultiRequest {
    pub original: String,
    pub names: NameRequest,
    /// libvirt URIs of the hosts that get clones, in the order given.
    pub hosts: Vec<String>,
    /// `--pool-map SRC=DST` arguments.
    pub pool_map: Vec<String>,
    pub start: bool,
    pub dry_run: bool,
    pub disposable: bool,
    /// `--overlay-layout` of the overlays made now (the hook makes the others with its own).
    pub layout: vcc_core::layout::OverlayLayout,
}

/// Why a multi-host run failed; whatever it made has been removed from every host.
#[derive(Debug, thiserror::Error)]
pub enum MultiError {
    #[error("--host '{0}' is given twice")]
    DuplicateHost(String),
    #[error("{0}")]
    PoolMap(String),
    #[error("host '{host}'")]
    Host {
        host: String,
        #[source]
        source: LibvirtError,
    },
    #[error("host '{host}': volume '{volume}' exists already in pool '{pool}' (left from an earlier clone with this name?); remove it or pick another name")]
    OverlayExists { host: String, pool: String, volume: String },
    #[error("host '{host}': '{path}' exists already (UEFI vars left from an earlier clone with this name?); remove it or pick another name")]
    VarsExist { host: String, path: String },
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Plan(#[from] MultiPlanError),
    #[error(transparent)]
    Original(#[from] Box<CloneError>),
    #[error("host '{host}'")]
    Apply {
        host: String,
        #[source]
        source: ApplyError,
    },
    #[error("host '{host}': starting '{name}' (everything made on every host has been removed)")]
    Start {
        host: String,
        name: String,
        #[source]
        source: LibvirtError,
    },
}

/// One master on one host in the report.
#[derive(Debug, Clone, Serialize)]
pub struct HostMaster {
    pub target: String,
    pub path: String,
    pub pool: String,
    /// The host had it when the clones were defined; otherwise the hook's pool-helper fetches it
    /// at the first start, which then makes the overlays.
    pub present: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info_hash: Option<String>,
}

/// One clone on one host in the report.
#[derive(Debug, Clone, Serialize)]
pub struct HostClone {
    #[serde(flatten)]
    pub clone: CloneEntry,
    /// Time `virsh start` took, the hook's fetch of a missing master and its overlays included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<f64>,
    /// The UEFI vars are made fresh from the template's nvram template at the first start.
    pub fresh_uefi_vars: bool,
}

/// One host in the report.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub uri: String,
    pub masters: Vec<HostMaster>,
    pub clones: Vec<HostClone>,
}

/// What `--json` prints for a multi-host run.
#[derive(Debug, Clone, Serialize)]
pub struct MultiReport {
    pub original: String,
    pub source: String,
    pub dry_run: bool,
    pub template: bool,
    pub hosts: Vec<HostReport>,
    pub elapsed_ms: f64,
}

/// Connects to every `--host` (refusing one given twice).
pub fn connect_hosts(uris: &[String]) -> Result<Vec<Libvirt>, MultiError> {
    let mut seen = HashSet::new();
    if let Some(d) = uris.iter().find(|u| !seen.insert(u.as_str())) {
        return Err(MultiError::DuplicateHost(d.clone()));
    }
    uris.iter().map(|u| Libvirt::open(Some(u)).map_err(|source| MultiError::Host { host: u.clone(), source })).collect()
}

fn on(host: &str) -> impl FnOnce(LibvirtError) -> MultiError + '_ {
    move |source| MultiError::Host { host: host.to_string(), source }
}

/// Reads what a host has (step 3).
pub fn inventory(lv: &Libvirt, uri: &str) -> Result<Inventory, MultiError> {
    let domains = lv.list_domains().map_err(on(uri))?;
    let mut inv = Inventory { uri: uri.to_string(), ..Default::default() };
    for d in &domains {
        inv.domains.insert(d.name.clone());
        if let Ok(f) = DomainFacts::parse(&d.xml) {
            inv.macs.extend(f.macs.into_iter().flatten().map(|m| m.to_ascii_lowercase()));
        }
    }
    inv.networks = lv.networks().map_err(on(uri))?.into_iter().collect();
    inv.interfaces = match lv.interfaces() {
        Ok(i) => Some(i.into_iter().collect()),
        Err(e) => {
            tracing::warn!(
                "host '{uri}': cannot list host interfaces ({}); bridges are not checked there",
                vcc_core::error::one_line(&e)
            );
            None
        }
    };
    inv.emulators = emulators(&lv.capabilities().map_err(on(uri))?);
    // Pools with a target directory, and their types (each pool's XML read once).
    for p in lv.active_pools().map_err(on(uri))? {
        let Some(target) = p.target() else { continue };
        if let Some(kind) = p.kind() {
            inv.pool_types.insert(p.name.clone(), kind);
        }
        inv.pools.insert(p.name, target);
    }
    Ok(inv)
}

/// Plans (step 1 to 4) and, unless a dry run, makes the clones on every host.
pub fn clone_to_hosts(src: &Libvirt, hosts: &[Libvirt], req: &MultiRequest) -> Result<MultiReport, MultiError> {
    let t0 = Instant::now();
    let map = parse_pool_map(&req.pool_map).map_err(MultiError::PoolMap)?;
    let _lock = if req.dry_run {
        None
    } else {
        Some(
            crate::lock::OriginalLock::acquire(src.uri(), &req.original, std::time::Duration::from_secs(120))
                .map_err(|e| Box::new(CloneError::from(e)))?,
        )
    };
    let (xml, facts, masters) = read_original(src, &req.original).map_err(Box::new)?;
    let needs = Needs::parse(&xml);
    let pools = pools_needed(&masters, &map)?;

    let src_inv = inventory(src, src.uri())?;
    let invs: Vec<Inventory> =
        hosts.iter().zip(&req.hosts).map(|(lv, uri)| inventory(lv, uri)).collect::<Result<_, _>>()?;
    let mut existing: HashSet<String> = src_inv.domains.clone();
    let mut taken_macs: HashSet<String> = src_inv.macs.clone();
    for inv in &invs {
        existing.extend(inv.domains.iter().cloned());
        taken_macs.extend(inv.macs.iter().cloned());
    }
    let names = match &req.names {
        NameRequest::Names(n) => n.clone(),
        NameRequest::Numbered { base, count } => numbered_names(base, *count),
        NameRequest::Auto { count } => auto_names(&req.original, &existing, *count),
    };
    let dealt = spread(&names, hosts.len());
    for (inv, names) in invs.iter().zip(&dealt) {
        check_host(&needs, inv, &pools, names, req.start)?;
    }

    let mut plans = Vec::with_capacity(hosts.len());
    for ((lv, inv), names) in hosts.iter().zip(&invs).zip(&dealt) {
        let hm = host_masters(&masters, &map, &inv.pools)?;
        // The pools must list what is in their directories now: a master copied there, or a
        // file left with an overlay's name, which would otherwise be overwritten.
        for p in &pools {
            lv.refresh_pool(p).map_err(on(&inv.uri))?;
        }
        let mut present = Vec::with_capacity(hm.len());
        for m in &hm {
            let (Some(pool), Some(vol)) = (&m.pool, &m.volume) else { continue };
            let there = lv.volume(pool, vol).map_err(on(&inv.uri))?.is_some();
            if !there && !names.is_empty() && m.sha256.is_none() && m.manifest.is_none() {
                tracing::warn!(
                    "host '{}' has no '{}' and the template records no identity for it (virt-clone-cow publish '{}'): \
                     its pool-helper must find it in the LAN catalog by name",
                    inv.uri,
                    m.path,
                    req.original
                );
            }
            present.push(there);
        }
        let input = HostInput {
            uri: &inv.uri,
            original_xml: &xml,
            facts: &facts,
            masters: &hm,
            present,
            names,
            disposable: req.disposable,
        };
        let hp = plan_host(&input, &mut taken_macs, random3)?;
        for c in &hp.plan.clones {
            // Fresh UEFI vars: a file left at the clone's vars path would be used instead. It is
            // seen only where a pool covers that directory (remote files are libvirt's alone).
            if let Some(nv) = &c.nvram {
                if lv.volume_by_path(&nv.to).map_err(on(&inv.uri))?.is_some() {
                    return Err(MultiError::VarsExist { host: inv.uri.clone(), path: nv.to.clone() });
                }
            }
            for o in &c.overlays {
                if let OverlayLocation::Volume { pool, name, .. } = &o.location {
                    if lv.volume(pool, name).map_err(on(&inv.uri))?.is_some() {
                        return Err(MultiError::OverlayExists {
                            host: inv.uri.clone(),
                            pool: pool.clone(),
                            volume: name.clone(),
                        });
                    }
                }
            }
        }
        plans.push(hp);
    }

    // The original's own plan: no clones there, only its template metadata and masters.
    let template = crate::cmd::clone::template_plan(&xml, &facts, &masters)
        .map_err(|source| MultiPlanError::Plan { host: src.uri().to_string(), source })?;

    let starts =
        if req.dry_run { BTreeMap::new() } else { apply_all(src, hosts, &template, &plans, req.start, req.layout)? };
    Ok(report(src, &req.original, &plans, &starts, req.dry_run, t0))
}

/// What was made for one clone: UUID, and the start time when started.
#[derive(Debug, Clone)]
struct Made {
    uuid: String,
    start_ms: Option<f64>,
}

/// Step 5, under one undo log over every host (index 0: the original's host).
fn apply_all(
    src: &Libvirt,
    hosts: &[Libvirt],
    template: &ClonePlan,
    plans: &[HostPlan],
    start: bool,
    layout: vcc_core::layout::OverlayLayout,
) -> Result<BTreeMap<(usize, String), Made>, MultiError> {
    let mut lvs = vec![src];
    lvs.extend(hosts.iter());
    let mut tx = Transaction::over(lvs);
    let src_err = |source| MultiError::Apply { host: src.uri().to_string(), source };
    let result = (|| {
        make_template(&mut tx, template).map_err(src_err)?;
        if src.is_active(&template.original).map_err(|e| src_err(e.into()))? {
            return Err(src_err(ApplyError::OriginalStarted(template.original.clone())));
        }
        let mut made = BTreeMap::new();
        let opts = OverlayOptions::preferred().with_layout(layout);
        for (h, (lv, hp)) in hosts.iter().zip(plans).enumerate() {
            let err = |source| MultiError::Apply { host: hp.uri.clone(), source };
            for c in &hp.plan.clones {
                check_interrupt().map_err(err)?;
                for (i, o) in c.overlays.iter().enumerate() {
                    let OverlayLocation::Volume { pool, name, .. } = &o.location else { continue };
                    if hp.made_now(i) {
                        let backing =
                            BackingSpec { path: &o.master.path, format: &o.master.format, virtual_size: o.size };
                        create_overlay_volume(lv, pool, name, &backing, opts).map_err(|source| {
                            err(ApplyError::OverlayVolume { clone: c.name.clone(), target: o.target.clone(), source })
                        })?;
                        tx.push_on(h + 1, Undo::Volume { pool: pool.clone(), name: name.clone() });
                    } else {
                        tx.push_on(h + 1, Undo::HookVolume { pool: pool.clone(), name: name.clone() });
                    }
                }
                let uuid = lv.define(&c.xml, &c.name).map_err(|e| err(e.into()))?;
                tx.push_on(h + 1, Undo::Domain(c.name.clone()));
                made.insert((h, c.name.clone()), Made { uuid, start_ms: None });
            }
        }
        check_interrupt().map_err(src_err)?;
        if start {
            start_all(&mut tx, hosts, plans, &mut made)?;
        }
        check_interrupt().map_err(src_err)?;
        Ok(made)
    })();
    match result {
        Ok(made) => {
            tx.commit();
            Ok(made)
        }
        Err(e) => {
            tx.rollback();
            Err(e)
        }
    }
}

/// Starts every host's clones, hosts in parallel, each host's one after another (its first start
/// waits for the master when the host lacks it; the others then find it). Every start that
/// succeeded is recorded for undo, even when another failed.
fn start_all(
    tx: &mut Transaction<'_>,
    hosts: &[Libvirt],
    plans: &[HostPlan],
    made: &mut BTreeMap<(usize, String), Made>,
) -> Result<(), MultiError> {
    /// Per host: the clones started (name, ms), and the one that failed.
    type Started = Vec<(String, f64)>;
    type HostStarts = (Started, Option<(String, LibvirtError)>);
    let results: Vec<HostStarts> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .zip(plans)
            .map(|(lv, hp)| {
                s.spawn(move || {
                    let mut ok = Vec::new();
                    for c in &hp.plan.clones {
                        if check_interrupt().is_err() {
                            break;
                        }
                        let t = Instant::now();
                        match lv.start(&c.name) {
                            Ok(()) => ok.push((c.name.clone(), ms(t.elapsed()))),
                            Err(e) => return (ok, Some((c.name.clone(), e))),
                        }
                    }
                    (ok, None)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (Vec::new(), Some((String::new(), LibvirtError::NoDomain("(a start thread panicked)".into()))))
                })
            })
            .collect()
    });
    let mut first_error = None;
    for (h, (ok, failed)) in results.into_iter().enumerate() {
        for (name, t) in ok {
            tx.push_on(h + 1, Undo::Running(name.clone()));
            if let Some(m) = made.get_mut(&(h, name)) {
                m.start_ms = Some(t);
            }
        }
        if let (None, Some((name, source))) = (&first_error, failed) {
            first_error = Some(MultiError::Start { host: plans[h].uri.clone(), name, source });
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn report(
    src: &Libvirt,
    original: &str,
    plans: &[HostPlan],
    made: &BTreeMap<(usize, String), Made>,
    dry_run: bool,
    t0: Instant,
) -> MultiReport {
    let hosts = plans
        .iter()
        .enumerate()
        .map(|(h, hp)| HostReport {
            uri: hp.uri.clone(),
            masters: hp
                .plan
                .masters
                .iter()
                .zip(&hp.present)
                .map(|(m, present): (&Master, &bool)| HostMaster {
                    target: m.target.clone(),
                    path: m.path.clone(),
                    pool: m.pool.clone().unwrap_or_default(),
                    present: *present,
                    sha256: m.sha256.clone(),
                    info_hash: m.info_hash.clone(),
                })
                .collect(),
            clones: hp
                .plan
                .clones
                .iter()
                .map(|c| {
                    let m = made.get(&(h, c.name.clone()));
                    let outcome = m.map(|m| crate::apply::CloneOutcome {
                        name: c.name.clone(),
                        uuid: m.uuid.clone(),
                        started: m.start_ms.is_some(),
                        define_ms: 0.0,
                        sysprep: None,
                    });
                    let mut clone = clone_entry(c, outcome.as_ref());
                    clone.define_ms = None;
                    HostClone { clone, start_ms: m.and_then(|m| m.start_ms), fresh_uefi_vars: c.nvram.is_some() }
                })
                .collect(),
        })
        .collect();
    MultiReport {
        original: original.to_string(),
        source: src.uri().to_string(),
        dry_run,
        template: !dry_run,
        hosts,
        elapsed_ms: ms(t0.elapsed()),
    }
}

impl MultiReport {
    /// The text output: per host, its masters (there or to be fetched) and its clones.
    pub fn render(&self) -> String {
        let n: usize = self.hosts.iter().map(|h| h.clones.len()).sum();
        let mut s = if self.dry_run {
            format!(
                "Dry run: would make {n} linked clone(s) of '{}' on {} host(s) (nothing changed):\n",
                self.original,
                self.hosts.len()
            )
        } else {
            format!(
                "Made {n} linked clone(s) of '{}' on {} host(s) in {:.0} ms; '{}' is now a template on {}.\n",
                self.original,
                self.hosts.len(),
                self.elapsed_ms,
                self.original,
                self.source
            )
        };
        for h in &self.hosts {
            s.push_str(&format!("host {}: {} clone(s)\n", h.uri, h.clones.len()));
            for m in &h.masters {
                let state = if m.present {
                    "there: overlays through the storage API"
                } else {
                    "missing: the host's pool-helper fetches it at the first start, then the hook makes the overlays"
                };
                s.push_str(&format!("  master {}  {}  ({state})\n", m.target, m.path));
            }
            for c in &h.clones {
                let e = &c.clone;
                let started = c.start_ms.map(|t| format!("  started in {t:.0} ms")).unwrap_or_default();
                s.push_str(&format!(
                    "  {}{}{started}\n",
                    e.name,
                    e.uuid.as_ref().map(|u| format!("  uuid {u}")).unwrap_or_default()
                ));
                for d in &e.disks {
                    s.push_str(&format!("    {}  {}  -> {} ({})\n", d.target, d.overlay, d.backing, d.backing_format));
                }
                if !e.macs.is_empty() {
                    s.push_str(&format!("    mac  {}\n", e.macs.join(", ")));
                }
                if let Some(nv) = &e.nvram {
                    s.push_str(&format!("    uefi vars  {nv}  (made fresh from the template's nvram template)\n"));
                }
            }
        }
        s
    }
}
