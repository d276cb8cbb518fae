//! The virt-clone-cow libvirt hook.
//!
//! Contract (see `docs/hook.md`): it never calls libvirt; it reads the domain XML on stdin, works
//! on files, and asks the pool-helper daemon over its Unix socket for anything else. Every wait is
//! bounded. For domains it does not manage it exits 0 at once and prints nothing.
//!
//! * `prepare begin`: refuses to start templates; for each disk whose overlay file is missing and
//!   whose `<backingStore>` names a master, makes sure the master is here (asking pool-helper to
//!   fetch it if not, within a bound) and creates the overlay exactly as virt-clone-cow does. An
//!   existing file is never recreated or truncated.
//! * `migrate begin` / `restore begin`: filters whose stdout libvirt parses; we print nothing
//!   (XML unchanged) and only make sure the masters are here.
//! * `release end`: disposable clones lose their overlay, so the next start is fresh.
//! * everything else, `reconnect` included: exit 0.

pub mod config;
pub mod daemon;
pub mod prepare;
pub mod release;

use std::io::Write;

use config::Config;
use virt_clone_cow::metadata::NAMESPACE;

/// Largest domain XML we read from stdin.
pub const MAX_XML_BYTES: u64 = 16 << 20;

/// How libvirt called us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub domain: String,
    pub operation: String,
    pub sub_operation: String,
    pub extra: String,
}

impl Invocation {
    /// libvirt always passes four arguments.
    pub fn from_args(args: &[String]) -> Option<Self> {
        match args {
            [domain, operation, sub_operation, extra] => Some(Invocation {
                domain: domain.clone(),
                operation: operation.clone(),
                sub_operation: sub_operation.clone(),
                extra: extra.clone(),
            }),
            _ => None,
        }
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
        source: virt_clone_cow::xml::XmlError,
    },
    #[error(transparent)]
    Prepare(#[from] prepare::PrepareError),
}

/// The error and its causes on one line.
pub use virt_clone_cow::error::one_line as error_line;

/// Whether the XML can concern us at all: our metadata or a `<backingStore>` somewhere. Every other
/// domain leaves in microseconds, without parsing.
pub fn may_concern_us(xml: &str) -> bool {
    xml.contains(NAMESPACE) || xml.contains("<backingStore")
}

/// Runs the hook. Progress goes to `log` (stderr); stdout is never written.
pub fn run(inv: &Invocation, xml: &str, cfg: &Config, log: &mut dyn Write) -> Result<(), HookError> {
    let op = (inv.operation.as_str(), inv.sub_operation.as_str());
    let relevant = matches!(op, ("prepare", "begin") | ("migrate", "begin") | ("restore", "begin") | ("release", "end"));
    if !relevant || !may_concern_us(xml) {
        return Ok(());
    }
    let facts = virt_clone_cow::xml::DomainFacts::parse(xml);
    if op == ("release", "end") {
        // Cannot abort anything, and may repeat: never fail.
        if let Ok(f) = facts {
            release::discard_disposable(&f, log);
        }
        return Ok(());
    }
    let facts = facts.map_err(|source| HookError::Xml { domain: inv.domain.clone(), source })?;
    let plan = virt_clone_cow::managed::needs(&facts);
    if op == ("prepare", "begin") && plan.template {
        return Err(HookError::Template(facts.name.clone()));
    }
    let create_overlays = op == ("prepare", "begin");
    prepare::prepare(&facts.name, &plan, cfg, create_overlays, log)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_arguments_make_an_invocation() {
        let a: Vec<String> = ["d e", "prepare", "begin", "-"].iter().map(|s| s.to_string()).collect();
        assert_eq!(Invocation::from_args(&a).unwrap().domain, "d e");
        assert!(Invocation::from_args(&a[..3]).is_none());
    }

    #[test]
    fn unmanaged_domains_are_left_at_once() {
        let xml = "<domain type='kvm'><name>x</name><devices><disk type='file'><source file='/nope'/></disk></devices></domain>";
        assert!(!may_concern_us(xml));
        let inv = Invocation::from_args(&["x".into(), "prepare".into(), "begin".into(), "-".into()]).unwrap();
        let mut log = Vec::new();
        run(&inv, xml, &Config::default(), &mut log).unwrap();
        assert!(log.is_empty());
    }
}
