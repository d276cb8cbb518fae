//! `virt-clone-cow gc [--yes] [MASTER...]`: masters that no template, clone, recorded clone or
//! bare overlay on this host needs, with the space each frees; `--yes` removes them through the
//! storage API after telling pool-helper to stop seeding them (`forget`), and brings every
//! marked master's protection in line with its dependants (immutable while any, released when
//! none).
//!
//! A master is a candidate when virt-clone-cow marked it (`vcc_core::protect::MARK_XATTR`, set
//! when it got its first clone) or the local pool-helper daemon seeds it; it must be a volume of
//! an active pool. It is unused when nothing in [`crate::holds::scan`] needs it: no domain
//! (running or defined) has it as a disk or anywhere down a disk's backing chain, no pool volume
//! is backed by it, and no clone's metadata names it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use vcc_core::control::client::{self, ClientError};
use vcc_core::control::proto::{ForgetRequest, Masters, Request};
use vcc_core::units::human_bytes;
use vcc_libvirt::{Libvirt, LibvirtError, Volume};

use crate::holds::{describe_all, Holder, Holds};
use crate::protection::{sync_one, Sync};

/// How long pool-helper may take to answer `list` or `forget`.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(40);

/// A gc run, as the command line asked for it.
#[derive(Debug, Clone)]
pub struct GcArgs {
    /// Remove (and re-protect); without it nothing changes.
    pub yes: bool,
    /// Only these masters (paths); each must be unused, or the run fails naming what needs it.
    pub masters: Vec<String>,
    /// Only masters in this storage pool.
    pub pool: Option<String>,
    pub control_socket: PathBuf,
}

/// Why gc failed. Each says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("master {path} is still needed by {who}; remove or flatten them first (see `virt-clone-cow tree`)")]
    Held { path: String, who: String },
    #[error("{path} is not a master virt-clone-cow or pool-helper knows in an active storage pool (see `virt-clone-cow gc`)")]
    Unknown { path: String },
    #[error("asking pool-helper at {socket} which masters it seeds")]
    List {
        socket: String,
        #[source]
        source: ClientError,
    },
    #[error("telling pool-helper to stop seeding {path}")]
    Forget {
        path: String,
        #[source]
        source: ClientError,
    },
    #[error("clearing the protection of {path}")]
    Protect {
        path: String,
        #[source]
        source: vcc_core::protect::ProtectError,
    },
    #[error("removing master {path} (volume '{volume}' of pool '{pool}')")]
    Remove {
        path: String,
        pool: String,
        volume: String,
        #[source]
        source: LibvirtError,
    },
}

/// A master nothing needs.
#[derive(Debug, Clone, Serialize)]
pub struct Unused {
    pub path: String,
    pub pool: String,
    pub volume: String,
    /// Bytes removing it frees (the volume's allocation).
    pub bytes: u64,
    /// How it was found: `marked` (virt-clone-cow made it a master), `pool-helper` (seeded).
    pub found_by: Vec<&'static str>,
    /// With `--yes`: removed.
    pub removed: bool,
    /// With `--yes`, when pool-helper answered: how many of its masters it forgot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forgotten: Option<u32>,
}

/// A candidate master that something still needs.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    pub path: String,
    pub held_by: Vec<Holder>,
}

/// What `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// Whether anything was changed (`--yes`).
    pub yes: bool,
    pub unused: Vec<Unused>,
    /// Bytes the unused masters take (freed with `--yes`).
    pub bytes: u64,
    pub kept: Vec<Kept>,
    /// With `--yes`: masters made immutable (they had dependants but no protection yet).
    pub protected: Vec<String>,
    /// With `--yes`: masters whose protection was released (nothing depends on them any more).
    pub released: Vec<String>,
    /// Whether pool-helper answered at the control socket (its masters are candidates too).
    pub pool_helper: bool,
}

/// Masters candidates are looked up by: volume path key -> (volume, how found).
type Candidates<'v> = BTreeMap<String, (&'v Volume, Vec<&'static str>)>;

/// The candidate masters: marked volumes and the daemon's seeds (paths keyed as `holds` keys
/// them). Returns whether the daemon answered.
fn candidates<'v>(
    lv: &Libvirt,
    holds: &Holds,
    volumes: &'v [Volume],
    socket: &Path,
) -> Result<(Candidates<'v>, bool), ClientError> {
    let mut out: Candidates<'v> = BTreeMap::new();
    let by_key: BTreeMap<String, &Volume> = volumes.iter().map(|v| (holds.key(&v.facts.path), v)).collect();
    if lv.is_local() {
        for (k, v) in &by_key {
            if vcc_core::protect::mark(Path::new(&v.facts.path)).is_some() {
                out.entry(k.clone()).or_insert((*v, Vec::new())).1.push("marked");
            }
        }
    }
    let mut answered = false;
    if lv.is_local() {
        if let Some(c) = client::try_connect(socket, Some(Duration::from_secs(5)))? {
            let f = c.call(&Request::List, Some(Instant::now() + DAEMON_TIMEOUT), |_| {})?;
            if !f.ok {
                return Err(ClientError::Refused { reason: f.error.unwrap_or_else(|| "no reason given".into()) });
            }
            answered = true;
            let paths: Vec<String> = match f.masters {
                Some(Masters::List(l)) => l.into_iter().filter_map(|m| m.path).collect(),
                Some(Masters::Status(l)) => l.into_iter().filter_map(|m| m.path).collect(),
                None => Vec::new(),
            };
            for p in paths {
                let k = holds.key(&p);
                if let Some(v) = by_key.get(&k) {
                    out.entry(k).or_insert((*v, Vec::new())).1.push("pool-helper");
                }
            }
        }
    }
    Ok((out, answered))
}

/// Lists (and with `--yes` removes) the masters nothing needs.
pub fn gc(lv: &Libvirt, args: &GcArgs) -> Result<GcReport, GcError> {
    let volumes = lv.list_volumes()?;
    let holds = crate::holds::scan(lv, &volumes)?;
    gc_with(lv, args, &volumes, &holds)
}

/// [`gc`] over volumes and holds the caller has scanned already (`tree` scans them for itself).
pub fn gc_with(lv: &Libvirt, args: &GcArgs, volumes: &[Volume], holds: &Holds) -> Result<GcReport, GcError> {
    let list_err = |source| GcError::List { socket: args.control_socket.display().to_string(), source };
    let (cands, pool_helper) = candidates(lv, holds, volumes, &args.control_socket).map_err(list_err)?;
    let wanted: Option<Vec<String>> =
        (!args.masters.is_empty()).then(|| args.masters.iter().map(|p| holds.key(p)).collect());
    if let Some(w) = &wanted {
        for (p, k) in args.masters.iter().zip(w) {
            let who = holds.of(p);
            if !who.is_empty() {
                return Err(GcError::Held { path: p.clone(), who: describe_all(who) });
            }
            if !cands.contains_key(k) {
                return Err(GcError::Unknown { path: p.clone() });
            }
        }
    }
    let mut report = GcReport {
        yes: args.yes,
        unused: Vec::new(),
        bytes: 0,
        kept: Vec::new(),
        protected: Vec::new(),
        released: Vec::new(),
        pool_helper,
    };
    for (k, (v, found_by)) in &cands {
        if wanted.as_ref().is_some_and(|w| !w.contains(k)) || args.pool.as_ref().is_some_and(|p| *p != v.pool) {
            continue;
        }
        let who = holds.of(&v.facts.path);
        if !who.is_empty() {
            report.kept.push(Kept { path: v.facts.path.clone(), held_by: who.to_vec() });
            continue;
        }
        report.bytes += v.facts.allocation;
        report.unused.push(Unused {
            path: v.facts.path.clone(),
            pool: v.pool.clone(),
            volume: v.facts.name.clone(),
            bytes: v.facts.allocation,
            found_by: found_by.clone(),
            removed: false,
            forgotten: None,
        });
    }
    if !args.yes {
        return Ok(report);
    }
    for k in &mut report.kept {
        match sync_one(lv, holds, &k.path) {
            Sync::Held => report.protected.push(k.path.clone()),
            Sync::Released => report.released.push(k.path.clone()),
            Sync::Unchanged => {}
        }
    }
    for u in &mut report.unused {
        if pool_helper {
            let req = Request::Forget(ForgetRequest { path: u.path.clone() });
            let f = client::connect(&args.control_socket, Some(Duration::from_secs(5)))
                .and_then(|c| c.call(&req, Some(Instant::now() + DAEMON_TIMEOUT), |_| {}))
                .map_err(|source| GcError::Forget { path: u.path.clone(), source })?;
            if !f.ok {
                let reason = f.error.unwrap_or_else(|| "no reason given".into());
                return Err(GcError::Forget { path: u.path.clone(), source: ClientError::Refused { reason } });
            }
            u.forgotten = f.forgotten;
        }
        if lv.is_local() {
            vcc_core::protect::clear(Path::new(&u.path))
                .map_err(|source| GcError::Protect { path: u.path.clone(), source })?;
        }
        lv.delete_volume(&u.pool, &u.volume).map_err(|source| GcError::Remove {
            path: u.path.clone(),
            pool: u.pool.clone(),
            volume: u.volume.clone(),
            source,
        })?;
        u.removed = true;
        tracing::info!("removed unused master {} ({})", u.path, human_bytes(u.bytes));
    }
    Ok(report)
}

impl GcReport {
    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.unused.is_empty() {
            s.push_str("No unused masters.\n");
        } else {
            let verb = if self.yes { "Removed" } else { "Unused" };
            s.push_str(&format!("{verb} {} master(s), {}:\n", self.unused.len(), human_bytes(self.bytes)));
            for u in &self.unused {
                s.push_str(&format!("  {}  {}  (pool {})\n", u.path, human_bytes(u.bytes), u.pool));
            }
            if !self.yes {
                s.push_str("Run `virt-clone-cow gc --yes` to remove them.\n");
            }
        }
        for k in &self.kept {
            s.push_str(&format!("Kept {}: needed by {}\n", k.path, describe_all(&k.held_by)));
        }
        for p in &self.protected {
            s.push_str(&format!("Protected {p} (immutable while clones depend on it)\n"));
        }
        for p in &self.released {
            s.push_str(&format!("Released {p} (no clone depends on it any more)\n"));
        }
        if !self.pool_helper {
            s.push_str("(pool-helper is not running here: only masters virt-clone-cow marked were looked at)\n");
        }
        s
    }
}
