//! What each libvirt storage pool type gets from virt-clone-cow (docs/pool-types.md).
//!
//! Clones are qcow2 overlays made through the storage API in the master's pool, which only pools
//! of files can hold: `dir`, `fs` and `netfs`. Every other pool type is refused before anything
//! changes, with one line that says what to do instead; planning asks [`check`] about the pool of
//! each master.

/// What a pool type gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// qcow2 overlays in the pool (and `--reflink` copies where the filesystem shares extents).
    Overlays,
    /// Refused; the text says why and what to do.
    Refused(&'static str),
}

/// The support for a pool type (`<pool type=...>`).
pub fn support(kind: &str) -> Support {
    match kind {
        "dir" | "fs" | "netfs" => Support::Overlays,
        "logical" => Support::Refused(
            "libvirt can only make thick LVM snapshots there (fixed-size, invalid once full) and no thin volumes, and a \
             logical volume cannot hold a qcow2 overlay; put the master in a dir pool (a thin LV formatted with xfs -m \
             reflink=1 and mounted as a dir or fs pool also gets --reflink), or make the clone's LV yourself with \
             `lvcreate -s --thinpool` and use virt-clone",
        ),
        "zfs" => Support::Refused(
            "libvirt's zfs pool has zvols only and copies them in full (no zfs clone); put the master in a dir pool on \
             a ZFS filesystem dataset (overlays work there), or clone the zvol yourself with `zfs snapshot` and \
             `zfs clone` and point a copy of the domain at /dev/zvol/...",
        ),
        "rbd" => Support::Refused(
            "a Ceph RBD image cannot hold a qcow2 overlay; use Ceph's own copy-on-write: `virsh vol-clone` of the \
             master in that pool (libvirt snapshots and clones the image when it supports layering) and point the \
             clone's disk at the new volume, or put the master in a dir pool (e.g. on CephFS as netfs)",
        ),
        "iscsi" | "iscsi-direct" | "scsi" | "mpath" => Support::Refused(
            "its volumes are LUNs the storage target makes, and libvirt cannot create new ones in it; clone the LUN on \
             the storage array (its own snapshot or clone feature), or copy the master into a dir pool",
        ),
        "disk" => Support::Refused(
            "its volumes are partitions of one disk, which have no copy-on-write; copy the master into a dir pool \
             (qemu-img convert -O qcow2) and clone from there",
        ),
        "gluster" => Support::Refused(
            "libvirt cannot create volumes in a gluster pool; mount the Gluster volume and define a netfs pool with \
             <format type='glusterfs'/> over it: overlays work there",
        ),
        "sheepdog" | "vstorage" => Support::Refused(
            "virt-clone-cow has not been made or tested for this pool type; copy the master into a dir pool",
        ),
        _ => Support::Refused("virt-clone-cow knows only dir, fs and netfs pools; copy the master into a dir pool"),
    }
}

/// A master in a pool whose type gets no overlays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk {target} of '{domain}' is in pool '{pool}' of type '{kind}': {what}")]
pub struct PoolTypeRefused {
    pub domain: String,
    pub target: String,
    pub pool: String,
    pub kind: String,
    pub what: &'static str,
}

/// Refuses a master in a pool of type `kind` that cannot hold overlays.
pub fn check(domain: &str, target: &str, pool: &str, kind: &str) -> Result<(), PoolTypeRefused> {
    match support(kind) {
        Support::Overlays => Ok(()),
        Support::Refused(what) => Err(PoolTypeRefused {
            domain: domain.into(),
            target: target.into(),
            pool: pool.into(),
            kind: kind.into(),
            what,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcc_core::xml::volume::pool_type;

    /// Pool XML as `virsh pool-dumpxml` prints it for each type (trimmed).
    const FIXTURES: &[(&str, &str)] = &[
        ("dir", "<pool type='dir'><name>default</name><target><path>/var/lib/libvirt/images</path></target></pool>"),
        (
            "fs",
            "<pool type='fs'><name>xfs</name><source><device path='/dev/loop0'/><format type='xfs'/></source>\
             <target><path>/mnt/xfs</path></target></pool>",
        ),
        (
            "netfs",
            "<pool type='netfs'><name>nfs</name><source><host name='nas'/><dir path='/export'/>\
             <format type='nfs'/></source><target><path>/mnt/nfs</path></target></pool>",
        ),
        (
            "logical",
            "<pool type='logical'><name>vg0</name><source><name>vg0</name><format type='lvm2'/></source>\
             <target><path>/dev/vg0</path></target></pool>",
        ),
        (
            "zfs",
            "<pool type='zfs'><name>tank</name><source><name>tank/vms</name></source>\
             <target><path>/dev/zvol/tank/vms</path></target></pool>",
        ),
        (
            "rbd",
            "<pool type=\"rbd\"><name>ceph</name><source><host name='mon1' port='6789'/><name>rbd</name>\
             <auth type='ceph' username='libvirt'><secret uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/></auth>\
             </source></pool>",
        ),
        (
            "iscsi",
            "<pool type='iscsi'><name>san</name><source><host name='san.example'/>\
             <device path='iqn.2013-06.com.example:iscsi-pool'/></source><target><path>/dev/disk/by-path</path>\
             </target></pool>",
        ),
        (
            "iscsi-direct",
            "<pool type='iscsi-direct'><name>sand</name><source><host name='san'/>\
             <device path='iqn.2013-06.com.example:x'/><initiator><iqn name='iqn.2013-06.com.example:y'/>\
             </initiator></source></pool>",
        ),
        (
            "disk",
            "<pool type='disk'><name>sdb</name><source><device path='/dev/sdb'/><format type='gpt'/></source>\
             <target><path>/dev</path></target></pool>",
        ),
        (
            "gluster",
            "<pool type='gluster'><name>gv</name><source><host name='g1'/><dir path='/'/><name>gv0</name></source></pool>",
        ),
        ("scsi", "<pool type='scsi'><name>hba</name><source><adapter name='host0'/></source></pool>"),
        ("mpath", "<pool type='mpath'><name>mp</name><target><path>/dev/mapper</path></target></pool>"),
    ];

    #[test]
    fn each_pool_fixture_gets_overlays_or_one_line_that_says_what_to_do() {
        for (kind, xml) in FIXTURES {
            let found = pool_type(xml).unwrap_or_else(|| panic!("no type in the {kind} fixture"));
            assert_eq!(found, *kind);
            match check("base", "vda", "p", &found) {
                Ok(()) => assert!(matches!(*kind, "dir" | "fs" | "netfs"), "{kind} must be refused"),
                Err(e) => {
                    assert!(!matches!(*kind, "dir" | "fs" | "netfs"), "{kind} must get overlays");
                    let line = e.to_string();
                    assert!(!line.contains('\n'), "{line}");
                    assert!(line.contains(&format!("pool 'p' of type '{kind}'")), "{line}");
                    assert!(line.contains("disk vda of 'base'"), "{line}");
                    // Each says what to do instead.
                    assert!(
                        ["put the master", "copy the master", "use Ceph's", "define a netfs pool", "clone the"]
                            .iter()
                            .any(|w| line.contains(w)),
                        "{line}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_and_unreadable_pool_types_are_refused() {
        assert!(matches!(support("future-pool"), Support::Refused(_)));
        assert!(matches!(support(""), Support::Refused(_)));
        assert_eq!(pool_type("<volume type='dir'/>"), None);
        assert_eq!(pool_type("not xml <"), None);
    }
}
