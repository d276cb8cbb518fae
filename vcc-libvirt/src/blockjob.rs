//! Block jobs of running domains: libvirt's block pull (`virsh blockpull`), which copies the
//! backing chain's data into the top image while the guest runs, then drops the chain.
//!
//! The `virt` crate has no wrapper for these calls, so they go through `virt::sys`; every unsafe
//! block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;

use virt::domain::Domain;
use virt::sys;

use crate::{call, Libvirt, LibvirtError};

/// A block pull started on one disk of a running domain. It holds the domain handle, looked up
/// once, for the polls ([`BlockPull::running`]) and the abort.
#[derive(Debug)]
pub struct BlockPull {
    domain: Domain,
    /// The domain's name and the disk (target or path), for messages.
    name: String,
    disk: String,
    c_disk: CString,
}

fn c_disk(disk: &str, what: &str) -> Result<CString, LibvirtError> {
    CString::new(disk).map_err(|_| LibvirtError::Call {
        op: format!("{what}: the disk name '{}' contains a NUL byte", disk.escape_debug()),
        source: crate::VirtError { message: "invalid disk name".into(), code: 0 },
    })
}

impl Libvirt {
    /// The running domain's XML (what QEMU runs now), secrets left out.
    pub fn live_domain_xml(&self, name: &str) -> Result<String, LibvirtError> {
        self.domain(name)?.xml_desc(0).map_err(call(format!("reading the live XML of domain '{name}'")))
    }

    /// Starts pulling the whole backing chain of disk `disk` (target or path) into its top image
    /// (`virDomainBlockPull`, no bandwidth limit). The job runs on in QEMU; poll it with
    /// [`BlockPull::running`].
    pub fn block_pull(&self, name: &str, disk: &str) -> Result<BlockPull, LibvirtError> {
        let what = format!("starting a block pull of disk {disk} of '{name}'");
        let domain = self.domain(name)?;
        let c = c_disk(disk, &what)?;
        // SAFETY: `domain` is a live domain handle for the duration of the call; `c` is a valid
        // NUL-terminated string that libvirt only reads.
        let r = unsafe { sys::virDomainBlockPull(domain.as_ptr(), c.as_ptr(), 0, 0) };
        if r < 0 {
            return Err(call(what)(virt::error::Error::last_error()));
        }
        Ok(BlockPull { domain, name: name.to_string(), disk: disk.to_string(), c_disk: c })
    }
}

impl BlockPull {
    /// Whether a block job still runs on the disk (a finished pull is gone).
    pub fn running(&self) -> Result<bool, LibvirtError> {
        let mut info = sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
        // SAFETY: `self.domain` is a live domain handle, `self.c_disk` a valid C string, `info`
        // a writable struct of the type libvirt fills in.
        let r = unsafe { sys::virDomainGetBlockJobInfo(self.domain.as_ptr(), self.c_disk.as_ptr(), &mut info, 0) };
        if r < 0 {
            let what = format!("reading the block job of disk {} of '{}'", self.disk, self.name);
            return Err(call(what)(virt::error::Error::last_error()));
        }
        Ok(r > 0)
    }

    /// Stops the pull (one stopped early leaves a consistent image that still has its backing
    /// chain).
    pub fn abort(&self) -> Result<(), LibvirtError> {
        // SAFETY: as in `running`.
        let r = unsafe { sys::virDomainBlockJobAbort(self.domain.as_ptr(), self.c_disk.as_ptr(), 0) };
        if r < 0 {
            let what = format!("stopping the block job of disk {} of '{}'", self.disk, self.name);
            return Err(call(what)(virt::error::Error::last_error()));
        }
        Ok(())
    }
}
