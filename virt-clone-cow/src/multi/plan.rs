//! The multi-host plan, pure: which clones go to which host, where each host keeps the masters
//! and overlays, and each host's clone plan with MACs unique across every host.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::plan::{plan, ClonePlan, Master, PlanError, PlanInput};
use vcc_core::xml::DomainFacts;

/// Why the multi-host plan cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum MultiPlanError {
    #[error("disk {target}: the master '{path}' is in no storage pool on the original's host; the other hosts find a master by pool and volume name: define a pool over its directory")]
    MasterNotInPool { target: String, path: String },
    #[error("disk {target} is a volume disk of pool '{pool}', which --pool-map maps to '{to}'; only file disks can change pool (virsh edit: <disk type='file'>)")]
    VolumeDiskRemapped { target: String, pool: String, to: String },
    #[error("host '{host}'")]
    Plan {
        host: String,
        #[source]
        source: PlanError,
    },
}

/// Clone names dealt round-robin over `hosts` hosts: clone i goes to host i mod hosts.
pub fn spread(names: &[String], hosts: usize) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); hosts];
    if hosts == 0 {
        return out;
    }
    for (i, n) in names.iter().enumerate() {
        out[i % hosts].push(n.clone());
    }
    out
}

/// `--pool-map SRC=DST` arguments as a map (a pool named twice is refused).
pub fn parse_pool_map(args: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for a in args {
        let (src, dst) = a
            .split_once('=')
            .filter(|(s, d)| !s.is_empty() && !d.is_empty())
            .ok_or_else(|| format!("--pool-map '{a}': expected SRC=DST (two pool names)"))?;
        if map.insert(src.to_string(), dst.to_string()).is_some() {
            return Err(format!("--pool-map: pool '{src}' is mapped twice"));
        }
    }
    Ok(map)
}

/// The pool each master's overlays go to on the other hosts.
pub fn target_pool<'a>(source_pool: &'a str, map: &'a BTreeMap<String, String>) -> &'a str {
    map.get(source_pool).map(String::as_str).unwrap_or(source_pool)
}

/// The pools the clones need on every host.
pub fn pools_needed(masters: &[Master], map: &BTreeMap<String, String>) -> Result<BTreeSet<String>, MultiPlanError> {
    masters
        .iter()
        .map(|m| match &m.pool {
            Some(p) => Ok(target_pool(p, map).to_string()),
            None => Err(MultiPlanError::MasterNotInPool { target: m.target.clone(), path: m.path.clone() }),
        })
        .collect()
}

/// The masters as a host sees them: in the mapped pool, under that pool's directory, with the
/// same volume name and identity. `pool_dirs`: the host's pools (name -> directory), checked.
pub fn host_masters(
    masters: &[Master],
    map: &BTreeMap<String, String>,
    pool_dirs: &std::collections::HashMap<String, String>,
) -> Result<Vec<Master>, MultiPlanError> {
    masters
        .iter()
        .map(|m| {
            let not_in_pool = || MultiPlanError::MasterNotInPool { target: m.target.clone(), path: m.path.clone() };
            let pool = m.pool.as_deref().ok_or_else(not_in_pool)?;
            let volume = m.volume.clone().ok_or_else(not_in_pool)?;
            let to = target_pool(pool, map);
            if m.volume_disk && to != pool {
                return Err(MultiPlanError::VolumeDiskRemapped {
                    target: m.target.clone(),
                    pool: pool.to_string(),
                    to: to.to_string(),
                });
            }
            // Checked before (check_host); an unknown pool keeps the original's directory.
            let dir = pool_dirs.get(to).cloned().unwrap_or_else(|| {
                std::path::Path::new(&m.path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
            });
            Ok(Master {
                path: format!("{}/{volume}", dir.trim_end_matches('/')),
                pool: Some(to.to_string()),
                volume: Some(volume),
                ..m.clone()
            })
        })
        .collect()
}

/// One host's share of the run.
#[derive(Debug, Clone, Serialize)]
pub struct HostPlan {
    pub uri: String,
    /// Per master (as in `plan.masters`): whether the host has it now. When it does not, the
    /// clones' overlays are made by the hook at their first start, once pool-helper fetched it.
    pub present: Vec<bool>,
    pub plan: ClonePlan,
}

impl HostPlan {
    /// Whether the overlay of master `i` is made now through the storage API (else by the hook).
    pub fn made_now(&self, i: usize) -> bool {
        self.present.get(i).copied().unwrap_or(false)
    }
}

/// What planning one host needs.
#[derive(Debug)]
pub struct HostInput<'a> {
    pub uri: &'a str,
    pub original_xml: &'a str,
    pub facts: &'a DomainFacts,
    /// As [`host_masters`] made them for this host.
    pub masters: &'a [Master],
    pub present: Vec<bool>,
    pub names: &'a [String],
    pub disposable: bool,
}

/// Plans one host's clones. `taken_macs` holds every MAC on every host (and those planned so
/// far); the new ones are added, so the next host avoids them too.
pub fn plan_host(
    input: &HostInput<'_>,
    taken_macs: &mut HashSet<String>,
    random: impl FnMut() -> [u8; 3],
) -> Result<HostPlan, MultiPlanError> {
    // A manifest path is the publishing host's: where the host must fetch the master and its
    // identity is known, the clone names it by identity (the hook prefers a manifest).
    let masters: Vec<Master> = input
        .masters
        .iter()
        .zip(input.present.iter().chain(std::iter::repeat(&false)))
        .map(|(m, present)| Master {
            manifest: if !present && m.sha256.is_some() { None } else { m.manifest.clone() },
            // The hook makes the overlay at start, after libvirt's volume lookup: a file disk.
            as_file_disk: m.volume_disk && !present,
            ..m.clone()
        })
        .collect();
    let pi = PlanInput {
        original_xml: input.original_xml,
        facts: input.facts,
        masters: &masters,
        names: input.names,
        taken_macs,
        disposable: input.disposable,
        // UEFI vars are made fresh from the template's nvram template at first start.
        nvram_pool: None,
        reflink: false,
    };
    let plan = plan(&pi, random).map_err(|source| MultiPlanError::Plan { host: input.uri.to_string(), source })?;
    for c in &plan.clones {
        taken_macs.extend(c.macs.iter().cloned());
    }
    Ok(HostPlan { uri: input.uri.to_string(), present: input.present.clone(), plan })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn master(pool: Option<&str>, volume_disk: bool) -> Master {
        Master {
            pool: pool.map(String::from),
            volume: pool.map(|_| "base.qcow2".to_string()),
            volume_disk,
            sha256: Some("ab".repeat(32)),
            info_hash: Some("cd".repeat(20)),
            manifest: Some("/var/lib/pool-helper/manifests/base.json".into()),
            ..Master::file(0, "vda", "/srv/a/base.qcow2", "qcow2", 1 << 30)
        }
    }

    #[test]
    fn names_are_dealt_round_robin() {
        let names: Vec<String> = (1..=7).map(|i| format!("web-{i}")).collect();
        let s = spread(&names, 3);
        assert_eq!(s[0], ["web-1", "web-4", "web-7"]);
        assert_eq!(s[1], ["web-2", "web-5"]);
        assert_eq!(s[2], ["web-3", "web-6"]);
        assert_eq!(spread(&names[..6], 3).iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 2]);
        assert_eq!(spread(&names[..1], 3).iter().map(Vec::len).collect::<Vec<_>>(), [1, 0, 0]);
    }

    #[test]
    fn pool_maps_parse_and_bad_ones_are_refused() {
        let m = parse_pool_map(&["a=b".into(), "c=d".into()]).unwrap();
        assert_eq!(target_pool("a", &m), "b");
        assert_eq!(target_pool("x", &m), "x");
        for bad in ["a", "=b", "a=", "a=b,a=c"] {
            let args: Vec<String> = bad.split(',').map(String::from).collect();
            assert!(parse_pool_map(&args).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hosts_masters_live_in_the_mapped_pools_directory_and_keep_their_identity() {
        let map = parse_pool_map(&["a=b".into()]).unwrap();
        let dirs: HashMap<String, String> = [("b".to_string(), "/data/b/".to_string())].into();
        let hm = host_masters(&[master(Some("a"), false)], &map, &dirs).unwrap();
        assert_eq!(hm[0].path, "/data/b/base.qcow2");
        assert_eq!(hm[0].pool.as_deref(), Some("b"));
        assert_eq!(hm[0].sha256, master(None, false).sha256);
        assert_eq!(pools_needed(&[master(Some("a"), false)], &map).unwrap(), ["b".to_string()].into());

        assert!(matches!(
            host_masters(&[master(None, false)], &map, &dirs),
            Err(MultiPlanError::MasterNotInPool { .. })
        ));
        assert!(matches!(pools_needed(&[master(None, false)], &map), Err(MultiPlanError::MasterNotInPool { .. })));
        assert!(matches!(
            host_masters(&[master(Some("a"), true)], &map, &dirs),
            Err(MultiPlanError::VolumeDiskRemapped { .. })
        ));
    }

    const XML: &str = "<domain type='kvm'><name>t</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/a/base.qcow2'/><target dev='vda'/></disk>\
        <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>\
        <interface type='network'><source network='default'/></interface></devices></domain>";

    #[test]
    fn macs_are_unique_across_hosts_even_when_the_random_source_repeats() {
        let facts = DomainFacts::parse(XML).unwrap();
        let masters = host_masters(&[master(Some("a"), false)], &BTreeMap::new(), &HashMap::new()).unwrap();
        let names: Vec<String> = (1..=6).map(|i| format!("web-{i}")).collect();
        // MACs already on the hosts, and a random source that repeats itself a lot.
        let mut taken: HashSet<String> = ["52:54:00:00:00:01".to_string(), "52:54:00:00:00:03".to_string()].into();
        let mut n = 0u8;
        let mut random = || {
            n = n.wrapping_add(1);
            [0, 0, n / 2]
        };
        let mut all = Vec::new();
        for (h, names) in spread(&names, 3).iter().enumerate() {
            let uri = format!("host{h}");
            let input = HostInput {
                uri: &uri,
                original_xml: XML,
                facts: &facts,
                masters: &masters,
                present: vec![h == 0],
                names,
                disposable: false,
            };
            let hp = plan_host(&input, &mut taken, &mut random).unwrap();
            assert_eq!(hp.plan.clones.len(), 2);
            assert_eq!(hp.made_now(0), h == 0);
            for c in &hp.plan.clones {
                assert_eq!(c.macs.len(), 2);
                // The master is named by path and identity in the clone's metadata; the publishing
                // host's manifest path only where the master is there already.
                assert!(c.xml.contains("/srv/a/base.qcow2") && c.xml.contains(&"ab".repeat(32)), "{}", c.xml);
                assert_eq!(c.xml.contains("manifests/base.json"), h == 0, "{}", c.xml);
                all.extend(c.macs.clone());
            }
        }
        let unique: HashSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), 12, "{all:?}");
        assert!(!all.iter().any(|m| m == "52:54:00:00:00:01" || m == "52:54:00:00:00:03"), "{all:?}");
    }

    #[test]
    fn a_volume_disk_whose_master_is_missing_on_a_host_becomes_a_file_disk_there_and_stays_a_volume_elsewhere() {
        let xml = "<domain type='kvm'><name>t</name><devices>\
            <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>\
            <source pool='a' volume='base.qcow2'/><target dev='vda'/></disk></devices></domain>";
        let facts = DomainFacts::parse(xml).unwrap();
        let masters = vec![master(Some("a"), true)];
        let names = vec!["web-1".to_string()];
        let clone_xml = |present: bool| {
            let input = HostInput {
                uri: "qemu+ssh://c/system",
                original_xml: xml,
                facts: &facts,
                masters: &masters,
                present: vec![present],
                names: &names,
                disposable: false,
            };
            plan_host(&input, &mut HashSet::new(), || [1, 2, 3]).unwrap().plan.clones[0].xml.clone()
        };
        // Missing: the hook makes the overlay at start, after libvirt's volume lookup.
        let missing = clone_xml(false);
        assert!(missing.contains("<disk type=\"file\"") || missing.contains("<disk type='file'"), "{missing}");
        assert!(missing.contains("<source file='/srv/a/web-1-vda.qcow2'/>"), "{missing}");
        assert!(!missing.contains("<source pool="), "{missing}");
        // Present: the overlay is a volume made now, and the disk stays a volume disk.
        let present = clone_xml(true);
        assert!(
            present.contains("volume='web-1-vda.qcow2'") || present.contains("volume=\"web-1-vda.qcow2\""),
            "{present}"
        );
        assert!(present.contains("pool='a'") || present.contains("pool=\"a\""), "{present}");
    }
}
