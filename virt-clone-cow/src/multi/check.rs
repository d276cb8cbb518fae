//! What a template needs from a host (networks, bridges, emulator, pools) and whether a host has
//! it: pure, from the template's XML and an [`Inventory`] read beforehand.

use std::collections::{BTreeSet, HashMap, HashSet};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// What the template's XML asks of a host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// `<interface type='network'><source network=N>`.
    pub networks: BTreeSet<String>,
    /// `<interface type='bridge'><source bridge=B>` and `type='direct'` `<source dev=D>`.
    pub host_interfaces: BTreeSet<String>,
    /// `<devices><emulator>`.
    pub emulator: Option<String>,
}

/// Bounds on what we read from libvirt (a hostile or broken daemon must not make us loop).
const MAX_XML: usize = 16 << 20;

impl Needs {
    /// Reads a domain's XML. XML it cannot read needs nothing more than planning already found
    /// (the planner reads the same XML and refuses it first).
    pub fn parse(xml: &str) -> Needs {
        let mut needs = Needs::default();
        if xml.len() > MAX_XML {
            return needs;
        }
        let mut r = Reader::from_str(xml);
        let mut path: Vec<String> = Vec::new();
        let mut iface_type: Option<String> = None;
        loop {
            let (e, empty) = match r.read_event() {
                Ok(Event::Start(e)) => (e, false),
                Ok(Event::Empty(e)) => (e, true),
                Ok(Event::End(_)) => {
                    if path.pop().as_deref() == Some("interface") {
                        iface_type = None;
                    }
                    continue;
                }
                Ok(Event::Text(t)) => {
                    if path.iter().map(String::as_str).eq(["domain", "devices", "emulator"]) {
                        if let Ok(s) = t.unescape() {
                            let s = s.trim();
                            if !s.is_empty() {
                                needs.emulator = Some(s.to_string());
                            }
                        }
                    }
                    continue;
                }
                Ok(Event::Eof) | Err(_) => break,
                Ok(_) => continue,
            };
            let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
            let in_devices = path.iter().map(String::as_str).eq(["domain", "devices"]);
            if in_devices && name == "interface" {
                iface_type = attr(&e, "type");
            }
            let in_iface = path.iter().map(String::as_str).eq(["domain", "devices", "interface"]);
            if in_iface && name == "source" {
                match iface_type.as_deref() {
                    Some("network") => needs.networks.extend(attr(&e, "network")),
                    Some("bridge") => needs.host_interfaces.extend(attr(&e, "bridge")),
                    Some("direct") => needs.host_interfaces.extend(attr(&e, "dev")),
                    _ => {}
                }
            }
            if !empty {
                path.push(name);
            } else if name == "interface" && in_devices {
                iface_type = None;
            }
        }
        needs
    }
}

fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.try_get_attribute(name).ok().flatten().and_then(|a| a.unescape_value().ok()).map(|v| v.into_owned())
}

/// The emulators a host's capabilities XML offers.
pub fn emulators(capabilities: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    if capabilities.len() > MAX_XML {
        return out;
    }
    let mut r = Reader::from_str(capabilities);
    let mut in_emulator = false;
    loop {
        match r.read_event() {
            Ok(Event::Start(e)) => in_emulator = e.local_name().as_ref() == b"emulator",
            Ok(Event::End(_)) => in_emulator = false,
            Ok(Event::Text(t)) if in_emulator => {
                if let Ok(s) = t.unescape() {
                    out.insert(s.trim().to_string());
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => {}
        }
    }
    out
}

/// What one host has, read before anything is planned.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub uri: String,
    /// Every domain name on the host.
    pub domains: HashSet<String>,
    /// Every MAC of every domain on the host (lower case).
    pub macs: HashSet<String>,
    /// Networks: name -> active.
    pub networks: HashMap<String, bool>,
    /// Host interfaces (bridges included); None when the host's libvirt cannot list them.
    pub interfaces: Option<HashSet<String>>,
    pub emulators: HashSet<String>,
    /// Active storage pools: name -> target directory.
    pub pools: HashMap<String, String>,
    /// Pool types (`<pool type=...>`) by name, where known.
    pub pool_types: HashMap<String, String>,
}

/// A host that lacks something the clones need (or already has one of their names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host '{host}': {what}")]
pub struct CheckError {
    pub host: String,
    pub what: String,
}

/// Checks one host before anything is defined anywhere: the clones' names are free, the pools
/// exist and are active, the networks exist (and are active when the clones are to start), the
/// bridges and the emulator exist.
pub fn check_host(
    needs: &Needs,
    inv: &Inventory,
    pools: &BTreeSet<String>,
    names: &[String],
    start: bool,
) -> Result<(), CheckError> {
    let fail = |what: String| Err(CheckError { host: inv.uri.clone(), what });
    if let Some(n) = names.iter().find(|n| inv.domains.contains(*n)) {
        return fail(format!("a domain named '{n}' exists already; pick another --name, or use --auto-clone"));
    }
    for p in pools {
        if !inv.pools.contains_key(p) {
            return fail(format!(
                "no active storage pool '{p}' (define and start it, or map it with --pool-map {p}=OTHER)"
            ));
        }
        if let Some(kind) = inv.pool_types.get(p) {
            if let crate::pool_types::Support::Refused(what) = crate::pool_types::support(kind) {
                return fail(format!("storage pool '{p}' is of type '{kind}': {what}"));
            }
        }
    }
    for n in &needs.networks {
        match inv.networks.get(n) {
            None => return fail(format!("network '{n}' is not defined (the template's interfaces use it)")),
            Some(false) if start => return fail(format!("network '{n}' is not active (virsh net-start '{n}')")),
            _ => {}
        }
    }
    if let Some(ifaces) = &inv.interfaces {
        if let Some(b) = needs.host_interfaces.iter().find(|b| !ifaces.contains(*b)) {
            return fail(format!("host interface or bridge '{b}' does not exist (the template's interfaces use it)"));
        }
    }
    if let Some(e) = &needs.emulator {
        if !inv.emulators.contains(e) {
            return fail(format!("emulator '{e}' is not offered by libvirt there (virsh capabilities)"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'><name>t</name><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
        <interface type='network'><mac address='52:54:00:00:00:01'/><source network='lan'/></interface>\
        <interface type='bridge'><source bridge='br0'/></interface>\
        <interface type='direct'><source dev='eth1' mode='bridge'/></interface>\
        <interface type='user'/><disk type='file'><source file='/x' network='no'/></disk></devices></domain>";

    fn host() -> Inventory {
        Inventory {
            uri: "qemu+ssh://b/system".into(),
            domains: ["other".to_string()].into(),
            macs: HashSet::new(),
            networks: [("lan".to_string(), true)].into(),
            interfaces: Some(["br0".to_string(), "eth1".to_string()].into()),
            emulators: ["/usr/bin/qemu-system-x86_64".to_string()].into(),
            pools: [("default".to_string(), "/var/lib/libvirt/images".to_string())].into(),
            pool_types: [("default".to_string(), "dir".to_string())].into(),
        }
    }

    #[test]
    fn needs_are_read_from_the_interfaces_and_the_emulator() {
        let n = Needs::parse(XML);
        assert_eq!(n.networks, ["lan".to_string()].into());
        assert_eq!(n.host_interfaces, ["br0".to_string(), "eth1".to_string()].into());
        assert_eq!(n.emulator.as_deref(), Some("/usr/bin/qemu-system-x86_64"));
        assert_eq!(Needs::parse("not xml <<"), Needs::default());
    }

    #[test]
    fn emulators_come_from_the_capabilities() {
        let caps = "<capabilities><guest><arch name='x86_64'><emulator>/usr/bin/qemu-system-x86_64</emulator>\
                    </arch></guest><guest><arch name='i686'><emulator>/usr/bin/qemu-system-i386</emulator></arch></guest></capabilities>";
        let e = emulators(caps);
        assert!(e.contains("/usr/bin/qemu-system-x86_64") && e.contains("/usr/bin/qemu-system-i386") && e.len() == 2);
    }

    #[test]
    fn a_complete_host_passes_and_each_missing_object_is_named_with_the_host() {
        let needs = Needs::parse(XML);
        let pools: BTreeSet<String> = ["default".to_string()].into();
        let names = vec!["web-1".to_string()];
        assert_eq!(check_host(&needs, &host(), &pools, &names, true), Ok(()));

        type Spoil = fn(&mut Inventory);
        let cases: Vec<(Spoil, &str)> = vec![
            (|h| h.networks.clear(), "network 'lan' is not defined"),
            (
                |h| {
                    h.networks.insert("lan".into(), false);
                },
                "network 'lan' is not active",
            ),
            (|h| h.interfaces = Some(["eth1".to_string()].into()), "bridge 'br0' does not exist"),
            (|h| h.emulators.clear(), "emulator '/usr/bin/qemu-system-x86_64'"),
            (|h| h.pools.clear(), "no active storage pool 'default'"),
            (
                |h| {
                    h.pool_types.insert("default".into(), "logical".into());
                },
                "storage pool 'default' is of type 'logical': libvirt can only make thick LVM snapshots",
            ),
            (
                |h| {
                    h.domains.insert("web-1".into());
                },
                "a domain named 'web-1' exists already",
            ),
        ];
        for (spoil, says) in cases {
            let mut h = host();
            spoil(&mut h);
            let e = check_host(&needs, &h, &pools, &names, true).unwrap_err().to_string();
            assert!(e.starts_with("host 'qemu+ssh://b/system': ") && e.contains(says), "{e}");
        }
        // An inactive network is fine when nothing starts; unknown interfaces are not checked.
        let mut h = host();
        h.networks.insert("lan".into(), false);
        h.interfaces = None;
        assert_eq!(check_host(&needs, &h, &pools, &names, false), Ok(()));
    }
}
