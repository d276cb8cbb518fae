//! Carrying out a clone plan, all or nothing.
//!
//! Every change is recorded in a [`Transaction`] as it is made; unless the whole run succeeds,
//! the transaction undoes them in reverse order: running clones are stopped, domains undefined,
//! overlays and UEFI vars copies deleted, the masters' modes and the original's metadata restored.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::plan::{ClonePlan, CloneSpec, NvramPlan, OverlayLocation};
use vcc_core::metadata::CowMetadata;
use vcc_core::overlay::{create_file_overlay, overlay_volume_xml, BackingSpec, OverlayError, OverlayOptions};
use vcc_libvirt::{Libvirt, LibvirtError};

/// A step of a clone run that failed (everything done before it has been undone).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("creating the overlay for disk {target} of '{clone}'")]
    Overlay {
        clone: String,
        target: String,
        #[source]
        source: OverlayError,
    },
    #[error("creating the overlay for disk {target} of '{clone}'")]
    OverlayVolume {
        clone: String,
        target: String,
        #[source]
        source: LibvirtError,
    },
    #[error("making the reflinked copy for disk {target} of '{clone}'")]
    Reflink {
        clone: String,
        target: String,
        #[source]
        source: crate::reflink::ReflinkError,
    },
    #[error("making the reflinked copy for disk {target} of '{clone}'")]
    ReflinkVolume {
        clone: String,
        target: String,
        #[source]
        source: LibvirtError,
    },
    #[error("copying the UEFI vars '{from}' to '{to}'")]
    Nvram {
        from: String,
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("copying the UEFI vars '{from}' to '{to}'")]
    NvramVolume {
        from: String,
        to: String,
        #[source]
        source: LibvirtError,
    },
    #[error("'{0}' exists already; refusing to overwrite it")]
    NvramExists(String),
    #[error("interrupted by a signal; everything made so far has been removed")]
    Interrupted,
    #[error("domain '{0}' was started while it was being cloned; shut it down and clone again")]
    OriginalStarted(String),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    Sysprep(#[from] crate::sysprep::SysprepError),
    #[error("making the master '{path}' read-only")]
    Protect {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What was made for one clone.
#[derive(Debug, Clone, Serialize)]
pub struct CloneOutcome {
    pub name: String,
    pub uuid: String,
    pub started: bool,
    /// Time to create the overlays, copy the vars, run virt-sysprep and define the domain.
    pub define_ms: f64,
    /// With `sysprep`: what virt-sysprep gave the clone.
    #[serde(skip)]
    pub sysprep: Option<crate::sysprep::Identity>,
}

#[derive(Debug)]
pub(crate) enum Undo {
    File(PathBuf),
    /// A file that starting the clone may create (serial log, UEFI vars): removed if it was.
    StartedFile(PathBuf),
    Volume {
        pool: String,
        name: String,
    },
    Domain(String),
    Running(String),
    /// A volume that the hook may have made at start (an overlay over a master fetched then): the
    /// pool is refreshed and the volume deleted if it is there.
    HookVolume {
        pool: String,
        name: String,
    },
    Mode {
        path: String,
        mode: u32,
    },
    Autostart(String),
    /// A master this run made immutable.
    Immutable(PathBuf),
    /// `saved_xml`: the persistent XML before the change. With no previous metadata it is
    /// defined again, because removing the element leaves an empty `<metadata/>` behind.
    Metadata {
        domain: String,
        previous: Option<CowMetadata>,
        saved_xml: String,
    },
}

/// An undo log over one or more libvirt connections (hosts); each step names its host.
#[derive(Debug)]
pub struct Transaction<'a> {
    hosts: Vec<&'a Libvirt>,
    undo: Vec<(usize, Undo)>,
    done: bool,
}

impl<'a> Transaction<'a> {
    pub fn new(lv: &'a Libvirt) -> Self {
        Transaction::over(vec![lv])
    }

    /// One log over several hosts: host 0 holds the original, the others are numbered as given.
    /// Undoing it undoes every host's steps, newest first.
    pub fn over(hosts: Vec<&'a Libvirt>) -> Self {
        Transaction { hosts, undo: Vec::new(), done: false }
    }

    /// The connection to the original's host.
    pub(crate) fn lv(&self) -> &'a Libvirt {
        self.hosts[0]
    }

    /// Records a step done on the original's host.
    pub(crate) fn push(&mut self, u: Undo) {
        self.undo.push((0, u));
    }

    /// Records a step done on host `host` (an index into the hosts given to [`Transaction::over`]).
    pub(crate) fn push_on(&mut self, host: usize, u: Undo) {
        self.undo.push((host, u));
    }

    /// Keeps everything.
    pub fn commit(mut self) {
        self.done = true;
    }

    /// Undoes everything recorded, newest first. Failures are logged, not raised: the first
    /// error is what the user needs to see.
    pub fn rollback(&mut self) {
        self.done = true;
        while let Some((host, u)) = self.undo.pop() {
            let Some(lv) = self.hosts.get(host).copied() else { continue };
            let r: Result<(), Box<dyn std::error::Error>> = match &u {
                Undo::Running(n) => lv.destroy(n).map_err(Into::into),
                Undo::Domain(n) => lv.undefine(n).map_err(Into::into),
                Undo::Volume { pool, name } => lv.delete_volume(pool, name).map_err(Into::into),
                Undo::HookVolume { pool, name } => lv
                    .refresh_pool(pool)
                    .and_then(|()| match lv.volume(pool, name)? {
                        Some(_) => lv.delete_volume(pool, name),
                        None => Ok(()),
                    })
                    .map_err(Into::into),
                // Already gone (the hook discards a disposable clone's overlay when it stops): fine.
                Undo::File(p) => match std::fs::remove_file(p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                },
                Undo::StartedFile(p) => match std::fs::remove_file(p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                    _ => Ok(()),
                },
                Undo::Autostart(n) => lv.set_autostart(n, true).map_err(Into::into),
                Undo::Immutable(p) => vcc_core::protect::release(p).map(drop).map_err(Into::into),
                Undo::Mode { path, mode } => {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode)).map_err(Into::into)
                }
                Undo::Metadata { domain, previous: None, saved_xml } => {
                    lv.define(saved_xml, domain).map(|_| ()).map_err(Into::into)
                }
                Undo::Metadata { domain, previous, .. } => {
                    lv.set_cow_metadata(domain, previous.as_ref()).map_err(Into::into)
                }
            };
            match r {
                Ok(()) => tracing::debug!("undone on {}: {u:?}", lv.uri()),
                Err(e) => tracing::warn!("could not undo {u:?} on {}: {}", lv.uri(), vcc_core::error::one_line(&*e)),
            }
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.rollback();
        }
    }
}

/// Set by the handler [`catch_interrupts`] installs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP stop a clone run at its next step and undo it, instead of
/// killing the process with half the clones made. A second signal during the undo is ignored.
#[allow(unsafe_code)]
pub fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `on_interrupt` has the signature signal(2) expects and only stores to an
        // atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler) };
    }
}

pub(crate) fn check_interrupt() -> Result<(), ApplyError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(ApplyError::Interrupted)
    } else {
        Ok(())
    }
}

/// Options for carrying out a plan.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    pub start: bool,
    pub overlay: OverlayOptions,
    /// Run virt-sysprep on each clone's overlays before it is defined ([`crate::sysprep`]).
    pub sysprep: bool,
}

/// Carries out `plan`. On error, nothing it did remains.
pub fn apply(lv: &Libvirt, plan: &ClonePlan, opts: ApplyOptions) -> Result<Vec<CloneOutcome>, ApplyError> {
    let mut tx = Transaction::new(lv);
    let mut outcomes = Vec::with_capacity(plan.clones.len());
    let result = (|| {
        // Protect first: once marked (and its masters read-only) the original cannot be started
        // through the hook, and a start that slipped in since planning is caught here.
        // Reflinked copies depend on nothing: the original stays an ordinary domain.
        if !plan.reflink {
            make_template(&mut tx, plan)?;
        }
        if lv.is_active(&plan.original)? {
            return Err(ApplyError::OriginalStarted(plan.original.clone()));
        }
        for c in &plan.clones {
            check_interrupt()?;
            let t0 = Instant::now();
            make_clone(&mut tx, c, opts.overlay)?;
            let sysprep = if opts.sysprep && c.overlays.is_empty() {
                tracing::warn!("'{}' has no private disk: nothing for virt-sysprep to reset", c.name);
                None
            } else if opts.sysprep {
                let overlays: Vec<&str> = c.overlays.iter().map(|o| o.location.path()).collect();
                Some(crate::sysprep::run(&c.name, &overlays)?)
            } else {
                None
            };
            check_interrupt()?;
            let uuid = lv.define(&c.xml, &c.name)?;
            tx.push(Undo::Domain(c.name.clone()));
            outcomes.push(CloneOutcome {
                name: c.name.clone(),
                uuid,
                started: false,
                define_ms: ms(t0.elapsed()),
                sysprep,
            });
        }
        // Not a template, the original could start while it was copied: the copies may be torn.
        if plan.reflink && lv.is_active(&plan.original)? {
            return Err(ApplyError::OriginalStarted(plan.original.clone()));
        }
        check_interrupt()?;
        // The masters have dependants now: immutable until the last one goes (crate::protection).
        // Reflinked copies depend on nothing.
        if !plan.clones.is_empty() && !plan.reflink {
            for m in &plan.masters {
                if crate::protection::hold_master(lv, &m.path) == (crate::protection::Outcome::Held { newly: true }) {
                    tx.push(Undo::Immutable(PathBuf::from(&m.path)));
                }
            }
        }
        if opts.start {
            for (o, c) in outcomes.iter_mut().zip(&plan.clones) {
                check_interrupt()?;
                if lv.is_local() {
                    // Files made at start (serial logs; UEFI vars libvirt makes from the firmware
                    // template when none were copied) go if the run is undone.
                    let paths = vcc_core::xml::DomainFacts::parse(&c.xml)
                        .map(|f| f.char_paths.into_iter().chain(f.nvram.and_then(|n| n.path)).collect::<Vec<_>>())
                        .unwrap_or_default();
                    for p in paths.into_iter().filter(|p| !Path::new(p).exists()) {
                        tx.push(Undo::StartedFile(PathBuf::from(p)));
                    }
                }
                lv.start(&o.name)?;
                tx.push(Undo::Running(o.name.clone()));
                o.started = true;
            }
        }
        check_interrupt()
    })();
    match result {
        Ok(()) => {
            tx.commit();
            Ok(outcomes)
        }
        Err(e) => {
            tx.rollback();
            Err(e)
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn make_clone(tx: &mut Transaction<'_>, c: &CloneSpec, opts: OverlayOptions) -> Result<(), ApplyError> {
    for o in c.overlays.iter().filter(|o| o.reflink) {
        crate::reflink::make_copy(tx, &c.name, o)?;
    }
    for o in c.overlays.iter().filter(|o| !o.reflink) {
        let backing = BackingSpec { path: &o.master.path, format: &o.master.format, virtual_size: o.size };
        match &o.location {
            OverlayLocation::File { path } => {
                create_file_overlay(Path::new(path), &backing, opts).map_err(|source| ApplyError::Overlay {
                    clone: c.name.clone(),
                    target: o.target.clone(),
                    source,
                })?;
                tx.push(Undo::File(PathBuf::from(path)));
            }
            OverlayLocation::Volume { pool, name, .. } => {
                create_overlay_volume(tx.lv(), pool, name, &backing, opts).map_err(|source| {
                    ApplyError::OverlayVolume { clone: c.name.clone(), target: o.target.clone(), source }
                })?;
                tx.push(Undo::Volume { pool: pool.clone(), name: name.clone() });
            }
        }
    }
    if let Some(nv) = &c.nvram {
        copy_nvram(tx, nv)?;
    }
    Ok(())
}

/// Makes an overlay volume over `backing` in `pool` through the storage API, in QEMU's default layout
/// when libvirt or its qemu-img refuses extended L2 entries.
pub(crate) fn create_overlay_volume(
    lv: &Libvirt,
    pool: &str,
    name: &str,
    backing: &BackingSpec<'_>,
    opts: OverlayOptions,
) -> Result<(), LibvirtError> {
    let xml = overlay_volume_xml(name, backing, opts);
    let mut made = lv.create_volume(pool, &xml, name);
    if opts.layout.extended_l2 && made.as_ref().is_err_and(refuses_extended_l2) {
        // QEMU older than 5.2 (or libvirt older than 8.0): the plain layout.
        let plain = overlay_volume_xml(name, backing, opts.plain());
        made = lv.create_volume(pool, &plain, name);
    }
    made.map(|_| ())
}

fn copy_nvram(tx: &mut Transaction<'_>, nv: &NvramPlan) -> Result<(), ApplyError> {
    if let Some(pool) = &nv.pool {
        let name = Path::new(&nv.to).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let xml =
            format!("<volume><name>{}</name><capacity>0</capacity></volume>", quick_xml::escape::escape(name.as_str()));
        tx.lv().copy_volume(pool, &xml, &name, &nv.from).map_err(|source| ApplyError::NvramVolume {
            from: nv.from.clone(),
            to: nv.to.clone(),
            source,
        })?;
        tx.push(Undo::Volume { pool: pool.clone(), name });
        return Ok(());
    }
    if !Path::new(&nv.from).exists() {
        // Never started: libvirt makes the clone's vars from the template at its first start.
        return Ok(());
    }
    let err = |source| ApplyError::Nvram { from: nv.from.clone(), to: nv.to.clone(), source };
    let mut src = std::fs::File::open(&nv.from).map_err(err)?;
    let mode = src.metadata().map_err(err)?.permissions().mode();
    let mut dst = match std::fs::OpenOptions::new().write(true).create_new(true).open(&nv.to) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(ApplyError::NvramExists(nv.to.clone())),
        Err(e) => return Err(err(e)),
    };
    tx.push(Undo::File(PathBuf::from(&nv.to)));
    std::io::copy(&mut src, &mut dst).map_err(err)?;
    dst.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)).map_err(err)?;
    dst.sync_all().map_err(err)?;
    Ok(())
}

/// Whether libvirt or the qemu-img it ran refused extended L2 entries (and only that: libvirt's
/// message quotes the qemu-img command line, which names the option in every failure).
fn refuses_extended_l2(e: &LibvirtError) -> bool {
    let m = vcc_core::error::one_line(e);
    m.contains("Invalid parameter 'extended_l2'") || (m.contains("extended_l2") && !m.contains("Child process"))
}

/// Marks the original as a template and makes its masters read-only (local files only: over a
/// remote connection libvirt has no call for a volume's mode).
pub(crate) fn make_template(tx: &mut Transaction<'_>, plan: &ClonePlan) -> Result<(), ApplyError> {
    if plan.masters.is_empty() {
        // Nothing is shared with the clones (no private disk): the original stays an ordinary
        // domain that may start.
        return Ok(());
    }
    if tx.lv().is_local() {
        for m in &plan.masters {
            let meta =
                std::fs::metadata(&m.path).map_err(|source| ApplyError::Protect { path: m.path.clone(), source })?;
            let mode = meta.permissions().mode() & 0o7777;
            // An immutable master (held for earlier clones) cannot be chmodded, nor written.
            let immutable = vcc_core::protect::is_immutable(Path::new(&m.path)).ok().flatten() == Some(true);
            if mode & 0o222 != 0 && !immutable {
                std::fs::set_permissions(&m.path, std::fs::Permissions::from_mode(mode & !0o222))
                    .map_err(|source| ApplyError::Protect { path: m.path.clone(), source })?;
                tx.push(Undo::Mode { path: m.path.clone(), mode });
            }
        }
    }
    // A template must not start at boot either (its masters would change under the clones).
    if tx.lv().autostart(&plan.original)? {
        tx.lv().set_autostart(&plan.original, false)?;
        tx.push(Undo::Autostart(plan.original.clone()));
    }
    let previous = tx.lv().cow_metadata(&plan.original)?;
    let saved_xml = tx.lv().domain_xml(&plan.original)?;
    tx.lv().set_cow_metadata(&plan.original, Some(&plan.template_metadata))?;
    tx.push(Undo::Metadata { domain: plan.original.clone(), previous, saved_xml });
    Ok(())
}
