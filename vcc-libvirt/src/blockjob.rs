//! Block jobs of running domains: libvirt's block pull (`virsh blockpull`), which copies the
//! backing chain's data into the top image while the guest runs, then drops the chain.
//!
//! The `virt` crate has no wrapper for these calls, so they go through `virt::sys`; every unsafe
//! block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;

use virt::sys;

use crate::{call, Libvirt, LibvirtError};

/// A block job's progress: `cur` of `end` (units libvirt chooses, bytes for a pull).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    pub kind: i32,
    pub cur: u64,
    pub end: u64,
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
    /// (`virDomainBlockPull`, no bandwidth limit). The job runs on in QEMU; see [`Libvirt::block_job`].
    pub fn block_pull(&self, name: &str, disk: &str) -> Result<(), LibvirtError> {
        let what = format!("starting a block pull of disk {disk} of '{name}'");
        let d = self.domain(name)?;
        let c = c_disk(disk, &what)?;
        // SAFETY: `d` is a live domain handle for the duration of the call; `c` is a valid
        // NUL-terminated string that libvirt only reads.
        let r = unsafe { sys::virDomainBlockPull(d.as_ptr(), c.as_ptr(), 0, 0) };
        if r < 0 {
            return Err(call(what)(virt::error::Error::last_error()));
        }
        Ok(())
    }

    /// The block job running on disk `disk`, or None when there is none (a finished pull is gone).
    pub fn block_job(&self, name: &str, disk: &str) -> Result<Option<BlockJob>, LibvirtError> {
        let what = format!("reading the block job of disk {disk} of '{name}'");
        let d = self.domain(name)?;
        let c = c_disk(disk, &what)?;
        let mut info = sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
        // SAFETY: `d` is a live domain handle, `c` a valid C string, `info` a writable struct of
        // the type libvirt fills in.
        let r = unsafe { sys::virDomainGetBlockJobInfo(d.as_ptr(), c.as_ptr(), &mut info, 0) };
        match r {
            0 => Ok(None),
            r if r > 0 => Ok(Some(BlockJob { kind: info.type_, cur: info.cur, end: info.end })),
            _ => Err(call(what)(virt::error::Error::last_error())),
        }
    }

    /// Stops the block job on disk `disk` (a pull stopped early leaves a consistent image that
    /// still has its backing chain).
    pub fn abort_block_job(&self, name: &str, disk: &str) -> Result<(), LibvirtError> {
        let what = format!("stopping the block job of disk {disk} of '{name}'");
        let d = self.domain(name)?;
        let c = c_disk(disk, &what)?;
        // SAFETY: as in `block_pull`.
        let r = unsafe { sys::virDomainBlockJobAbort(d.as_ptr(), c.as_ptr(), 0) };
        if r < 0 {
            return Err(call(what)(virt::error::Error::last_error()));
        }
        Ok(())
    }
}
