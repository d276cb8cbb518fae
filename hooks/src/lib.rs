//! The virt-clone-cow libvirt hook.
//!
//! Contract (see `docs/hook.md`): it never calls libvirt; it reads the domain XML on stdin, works
//! on files, and asks the pool-helper daemon over its Unix socket for anything else. Every wait is
//! bounded. For domains it does not manage it exits 0 at once and prints nothing.
//!
//! * `prepare begin`: refuses to start templates; discards the overlays of disposable clones
//!   unless the start resumes saved state; for each linked disk makes sure the master is here
//!   (asking pool-helper to fetch it if not, within a bound) and creates a missing overlay exactly
//!   as virt-clone-cow does. An existing file is never recreated or truncated.
//! * `migrate begin` / `restore begin`: filters whose stdout libvirt parses; we print nothing
//!   (XML unchanged) and only make sure the masters of the disks our clone metadata records are
//!   here (or, with `lazy`, that the export an overlay reads is there; docs/lazy.md).
//! * `release end`: disposable clones lose their overlay when libvirt says the guest was shut
//!   down, destroyed or crashed.
//! * everything else, `reconnect` included: exit 0, without reading anything. Only the three
//!   `begin` steps above can ever exit non-zero.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod disposable;
pub mod lazy;
pub mod places;
pub mod prepare;

use std::io::{Read, Write};

use config::Config;
use vcc_core::metadata::NAMESPACE;

/// Largest domain XML we read from stdin.
pub const MAX_XML_BYTES: u64 = 16 << 20;

/// How libvirt called us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub domain: String,
    pub operation: String,
    pub sub_operation: String,
    /// `-` when libvirt passes none (or, since 10.5, the shut-off reason on `release end`).
    pub extra: String,
}

impl Invocation {
    /// libvirt passes four arguments; the operation only needs three, and a missing extra
    /// argument reads as `-`. `None` when not even the operation is there.
    pub fn from_args(args: &[String]) -> Option<Self> {
        match args {
            [domain, operation, sub_operation, rest @ ..] => Some(Invocation {
                domain: domain.clone(),
                operation: operation.clone(),
                sub_operation: sub_operation.clone(),
                extra: rest.first().cloned().unwrap_or_else(|| "-".into()),
            }),
            _ => None,
        }
    }

    pub fn op(&self) -> Op {
        Op::of(&self.operation, &self.sub_operation)
    }
}

/// The operations the hook acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Prepare,
    Migrate,
    Restore,
    Release,
    /// Everything else (`start`, `started`, `stopped`, `reconnect`, `attach`, ends of others):
    /// nothing to do.
    Other,
}

impl Op {
    pub fn of(operation: &str, sub_operation: &str) -> Op {
        match (operation, sub_operation) {
            ("prepare", "begin") => Op::Prepare,
            ("migrate", "begin") => Op::Migrate,
            ("restore", "begin") => Op::Restore,
            ("release", "end") => Op::Release,
            _ => Op::Other,
        }
    }

    /// Whether the hook may fail this operation (and so stop it). Never `release`, `reconnect`
    /// (libvirt would kill the running guest) or anything else.
    pub fn may_fail(self) -> bool {
        matches!(self, Op::Prepare | Op::Migrate | Op::Restore)
    }
}

/// Why the hook refuses an operation.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("domain '{0}' is a virt-clone-cow template: its disks are the masters of linked clones, and starting it would change them under every clone. Clone it instead (virt-clone-cow --original '{0}' --name NEW); to start it anyway, first remove the mark: virsh metadata '{0}' urn:virt-clone-cow:1 --remove --config")]
    Template(String),
    #[error("cannot read the domain XML of '{domain}'")]
    Xml {
        domain: String,
        #[source]
        source: vcc_core::xml::XmlError,
    },
    #[error("cannot read the domain XML on stdin")]
    Stdin(#[source] std::io::Error),
    #[error("the domain XML on stdin is larger than {MAX_XML_BYTES} bytes")]
    TooLarge,
    #[error("cannot note in {dir} that '{domain}' resumes saved state, so the next step would discard its disposable overlay; refusing")]
    Note {
        domain: String,
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Prepare(#[from] prepare::PrepareError),
    #[error("the hook hit a bug (the panic message is above); please report it")]
    Bug,
}

/// Whether the XML can concern us at all for `op`, without parsing it. `prepare` acts on our
/// metadata and on user-written `<backingStore>`s; `migrate`, `restore` and `release` only on
/// domains with our metadata (a live XML shows the `<backingStore>` chain libvirt detected for
/// every disk with a backing file, ordinary snapshots included).
pub fn may_concern_us(op: Op, xml: &str) -> bool {
    match op {
        Op::Prepare => xml.contains(NAMESPACE) || xml.contains("<backingStore"),
        Op::Migrate | Op::Restore | Op::Release => xml.contains(NAMESPACE),
        Op::Other => false,
    }
}

/// Whether the XML is a live one showing the backing chains libvirt detected: their
/// `<backingStore>` elements carry an `index` attribute, which a user-written one in a domain
/// definition never has (libvirt drops it from inactive XML).
pub fn shows_detected_chains(xml: &str) -> bool {
    xml.match_indices("<backingStore").any(|(i, _)| {
        let tag = &xml[i..];
        let end = tag.find('>').unwrap_or(tag.len());
        tag[..end].contains(" index=")
    })
}

/// The whole hook: arguments as libvirt passes them (program name excluded), stdin, a way to
/// load the settings (called only for domains that concern us), stderr. Returns the exit status.
/// The operation is decided from the arguments first: anything but `prepare`/`migrate`/
/// `restore begin` exits 0 whatever happens, and only `release end` reads stdin among those.
pub fn main_with(
    args: &[String],
    stdin: &mut dyn Read,
    load_cfg: &dyn Fn(&mut dyn Write) -> Config,
    log: &mut dyn Write,
) -> u8 {
    let Some(inv) = Invocation::from_args(args) else {
        let _ = writeln!(log, "virt-clone-cow-hook: run by libvirt as `HOOK DOMAIN OPERATION SUB-OPERATION EXTRA`; install it with packaging/hook-install");
        return 0;
    };
    let op = inv.op();
    if op == Op::Other {
        return 0;
    }
    let outcome = read_xml(stdin).and_then(|xml| {
        // Nothing in the hook should panic; if it does, only an operation that may fail fails.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&inv, &xml, load_cfg, log)))
            .unwrap_or(Err(HookError::Bug))
    });
    match outcome {
        Ok(()) => 0,
        Err(e) if op.may_fail() => {
            let _ = writeln!(log, "virt-clone-cow-hook: {}", vcc_core::error::one_line(&e));
            1
        }
        Err(_) => 0,
    }
}

/// The XML on stdin, bytes converted lossily (a stray byte must not matter), at most
/// [`MAX_XML_BYTES`].
fn read_xml(stdin: &mut dyn Read) -> Result<String, HookError> {
    let mut bytes = Vec::new();
    stdin.take(MAX_XML_BYTES + 1).read_to_end(&mut bytes).map_err(HookError::Stdin)?;
    if bytes.len() as u64 > MAX_XML_BYTES {
        return Err(HookError::TooLarge);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Runs the hook on the XML. Progress goes to `log` (stderr); stdout is never written.
pub fn run(
    inv: &Invocation,
    xml: &str,
    load_cfg: &dyn Fn(&mut dyn Write) -> Config,
    log: &mut dyn Write,
) -> Result<(), HookError> {
    let op = inv.op();
    if !may_concern_us(op, xml) {
        return Ok(());
    }
    let facts = match vcc_core::xml::DomainFacts::parse(xml) {
        Ok(f) => f,
        Err(_) if !op.may_fail() => return Ok(()),
        Err(source) => return Err(HookError::Xml { domain: inv.domain.clone(), source }),
    };
    let mut plan = vcc_core::managed::needs(&facts);
    match op {
        Op::Prepare => {
            if plan.template {
                return Err(HookError::Template(facts.name.clone()));
            }
            if shows_detected_chains(xml) {
                // A start that resumes a guest (restore, incoming migration) gets the live XML:
                // its backing stores are what libvirt detected, not requests for overlays.
                plan.disks.retain(|d| d.recorded);
            }
            if plan.disks.is_empty() {
                return Ok(());
            }
            let cfg = load_cfg(log);
            disposable::fresh_start(&facts, &plan, &cfg, log);
            prepare::prepare(&facts.name, &plan.disks, &cfg, prepare::Step::Start, log)?;
        }
        Op::Migrate | Op::Restore => {
            plan.disks.retain(|d| d.recorded);
            if plan.disks.is_empty() {
                return Ok(());
            }
            let cfg = load_cfg(log);
            let step = if op == Op::Migrate { prepare::Step::Migrate } else { prepare::Step::Restore };
            prepare::prepare(&facts.name, &plan.disks, &cfg, step, log)?;
            if plan.disposable {
                disposable::note_incoming(&cfg, &facts).map_err(|source| HookError::Note {
                    domain: facts.name.clone(),
                    dir: cfg.state_dir.display().to_string(),
                    source,
                })?;
            }
        }
        Op::Release => {
            if plan.disposable && disposable::release_may_discard(&inv.extra) {
                let cfg = load_cfg(log);
                disposable::release(&facts, &plan, &inv.extra, &cfg, log);
            }
        }
        Op::Other => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("stdin is broken"))
        }
    }

    /// Panics if stdin is read at all.
    struct Untouchable;
    impl Read for Untouchable {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            panic!("stdin was read")
        }
    }

    fn no_cfg(_: &mut dyn Write) -> Config {
        panic!("the config was loaded")
    }

    const UNMANAGED: &str =
        "<domain type='kvm'><name>x</name><devices><disk type='file'><source file='/nope'/></disk></devices></domain>";

    /// A domain WITHOUT our metadata whose live XML shows the chain libvirt detected (ordinary
    /// external snapshots); the backing file is absent here.
    const SNAPSHOT_CHAIN: &str = "<domain type='kvm' id='3'><name>s</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/nonexistent/s.snap1' index='2'/>\
        <backingStore type='file' index='1'><format type='qcow2'/><source file='/nonexistent/s.qcow2'/><backingStore/></backingStore>\
        <target dev='vda' bus='virtio'/></disk></devices></domain>";

    #[test]
    fn four_arguments_make_an_invocation_and_a_missing_extra_reads_as_dash() {
        let a = args(&["d e", "prepare", "begin", "-"]);
        assert_eq!(Invocation::from_args(&a).unwrap().domain, "d e");
        assert_eq!(Invocation::from_args(&a[..3]).unwrap().extra, "-");
        assert_eq!(
            Invocation::from_args(&args(&["d", "release", "end", "destroyed", "more"])).unwrap().extra,
            "destroyed"
        );
        assert!(Invocation::from_args(&a[..2]).is_none());
    }

    #[test]
    fn operations_that_must_not_fail_exit_0_whatever_the_arguments_or_stdin() {
        for a in [
            args(&["vm", "reconnect", "begin", "-"]),
            args(&["vm", "reconnect", "begin"]),
            args(&["vm", "reconnect", "begin", "-", "extra", "more"]),
            args(&["vm", "started", "begin", "-"]),
            args(&["vm", "start", "begin", "-"]),
            args(&["vm", "stopped", "end", "-"]),
            args(&["vm", "release"]),
            args(&["vm"]),
            args(&[]),
        ] {
            // Not even stdin or the config is touched.
            let mut log = Vec::new();
            assert_eq!(main_with(&a, &mut Untouchable, &no_cfg, &mut log), 0, "{a:?}");
        }
        for a in [
            args(&["vm", "release", "end", "-"]),
            args(&["vm", "release", "end"]),
            args(&["vm", "release", "end", "destroyed", "x"]),
        ] {
            assert_eq!(main_with(&a, &mut Broken, &no_cfg, &mut Vec::new()), 0, "{a:?}: unreadable stdin");
            assert_eq!(main_with(&a, &mut &b"\xff\xfe<not xml"[..], &no_cfg, &mut Vec::new()), 0, "{a:?}: garbage");
            let mut md = format!("<domain><name>x</name><metadata><c xmlns='{NAMESPACE}'>").into_bytes();
            md.extend_from_slice(b"\xff</c></metadata></domain>");
            assert_eq!(
                main_with(&a, &mut &md[..], &|_: &mut dyn Write| Config::default(), &mut Vec::new()),
                0,
                "{a:?}"
            );
        }
    }

    #[test]
    fn a_panic_fails_only_operations_that_may_fail() {
        let xml = "<domain><name>x</name><metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='yes'>\
            <vcc:disk target='vda' overlay='/x/o.qcow2'><vcc:master path='/x/m.raw' format='raw'/></vcc:disk></vcc:clone></vcc:cow></metadata>\
            <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/x/o.qcow2'/><target dev='vda'/></disk></devices></domain>";
        let boom = |_: &mut dyn Write| -> Config { panic!("boom") };
        let mut log = Vec::new();
        assert_eq!(main_with(&args(&["x", "prepare", "begin", "-"]), &mut xml.as_bytes(), &boom, &mut log), 1);
        assert!(String::from_utf8_lossy(&log).contains("bug"));
        assert_eq!(
            main_with(&args(&["x", "release", "end", "destroyed"]), &mut xml.as_bytes(), &boom, &mut Vec::new()),
            0
        );
    }

    #[test]
    fn begin_steps_report_unreadable_stdin() {
        for op in ["prepare", "migrate", "restore"] {
            let mut log = Vec::new();
            assert_eq!(main_with(&args(&["vm", op, "begin", "-"]), &mut Broken, &no_cfg, &mut log), 1, "{op}");
            let log = String::from_utf8(log).unwrap();
            assert!(log.contains("cannot read the domain XML on stdin") && log.contains("stdin is broken"), "{log}");
        }
        // Invalid UTF-8 is converted, not refused: an unmanaged domain passes.
        let bytes = UNMANAGED
            .replace("<name>x", "<name>x\u{1}")
            .into_bytes()
            .into_iter()
            .map(|b| if b == 1 { 0xff } else { b })
            .collect::<Vec<u8>>();
        assert_eq!(main_with(&args(&["x", "prepare", "begin", "-"]), &mut &bytes[..], &no_cfg, &mut Vec::new()), 0);
    }

    #[test]
    fn unmanaged_domains_are_left_at_once_without_loading_the_config() {
        for op in ["prepare", "migrate", "restore"] {
            let inv = Invocation::from_args(&args(&["x", op, "begin", "-"])).unwrap();
            let mut log = Vec::new();
            run(&inv, UNMANAGED, &no_cfg, &mut log).unwrap();
            assert!(log.is_empty());
        }
        assert!(!may_concern_us(Op::Prepare, UNMANAGED));
    }

    #[test]
    fn migrate_and_restore_ignore_detected_backing_chains_without_our_metadata() {
        let loaded = Cell::new(false);
        let cfg = |_: &mut dyn Write| {
            loaded.set(true);
            Config::default()
        };
        for op in ["migrate", "restore"] {
            let mut log = Vec::new();
            assert_eq!(
                main_with(&args(&["s", op, "begin", "-"]), &mut SNAPSHOT_CHAIN.as_bytes(), &cfg, &mut log),
                0,
                "{op}"
            );
            assert!(log.is_empty(), "{op}: {}", String::from_utf8_lossy(&log));
        }
        assert!(!loaded.get(), "the config was read for a domain that is not ours");
        // Our metadata, but it does not record this disk: nothing to check either.
        let other = SNAPSHOT_CHAIN.replace(
            "<devices>",
            "<metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
             <vcc:disk target='vdb' overlay='/x/o.qcow2'><vcc:master path='/x/m.raw' format='raw'/></vcc:disk></vcc:clone></vcc:cow></metadata><devices>",
        );
        assert_eq!(main_with(&args(&["s", "migrate", "begin", "-"]), &mut other.as_bytes(), &cfg, &mut Vec::new()), 0);
    }

    #[test]
    fn prepare_for_a_resumed_guest_ignores_detected_chains_without_our_metadata() {
        assert!(shows_detected_chains(SNAPSHOT_CHAIN));
        assert!(!shows_detected_chains(
            "<backingStore type='file'><format type='raw'/></backingStore><source index='1'/>"
        ));
        let mut log = Vec::new();
        assert_eq!(
            main_with(&args(&["s", "prepare", "begin", "-"]), &mut SNAPSHOT_CHAIN.as_bytes(), &no_cfg, &mut log),
            0
        );
        assert!(log.is_empty(), "{}", String::from_utf8_lossy(&log));
        // Written by the user (no index): a missing master is reported.
        let user = SNAPSHOT_CHAIN.replace(" index='1'", "");
        let mut log = Vec::new();
        assert_eq!(
            main_with(
                &args(&["s", "prepare", "begin", "-"]),
                &mut user.as_bytes(),
                &|_: &mut dyn Write| Config::default(),
                &mut log
            ),
            1
        );
        assert!(String::from_utf8_lossy(&log).contains("names no manifest or identity"));
    }

    #[test]
    fn a_recorded_disk_whose_master_is_missing_refuses_migrate() {
        let xml = SNAPSHOT_CHAIN.replace(
            "<devices>",
            "<metadata><vcc:cow xmlns:vcc='urn:virt-clone-cow:1' version='1'><vcc:clone original='t' disposable='no'>\
             <vcc:disk target='vda' overlay='/nonexistent/s.snap1'><vcc:master path='/nonexistent/s.qcow2' format='qcow2'/></vcc:disk></vcc:clone></vcc:cow></metadata><devices>",
        );
        let mut log = Vec::new();
        assert_eq!(
            main_with(
                &args(&["s", "migrate", "begin", "-"]),
                &mut xml.as_bytes(),
                &|_: &mut dyn Write| Config::default(),
                &mut log
            ),
            1
        );
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("/nonexistent/s.qcow2") && log.contains("names no manifest or identity"), "{log}");
    }
}
