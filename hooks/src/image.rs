//! qemu-img, the way the hook runs it: bounded by [`QEMU_IMG_TIMEOUT`] (libvirt waits for the
//! hook with no limit while holding the domain's lock), from argument vectors, format stated.

use std::time::Duration;

use vcc_core::process::{run_with_timeout, CommandError};

/// How long one qemu-img run may take in the hook; other calls on the domain fail after ~30 s
/// while it waits.
pub const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(30);

/// What the hook needs to know about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub virtual_size: u64,
    /// The backing file as recorded in the image (`full-backing-filename` when qemu-img gives it).
    pub backing: Option<String>,
    /// Internal snapshots the image holds.
    pub snapshots: usize,
}

/// Why qemu-img gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("qemu-img printed information about '{path}' that we cannot read: {why}")]
    Format { path: String, why: String },
}

/// `qemu-img info -f FORMAT --output=json PATH`. With `force_share` (`-U`) the image is read even
/// while a QEMU has it open; without it, qemu-img fails on an image a QEMU holds open for writing,
/// which is how the hook tells that an overlay is in use. qemu-img info does not open the backing
/// chain.
pub fn info(path: &str, format: &str, force_share: bool) -> Result<Info, InfoError> {
    let mut args = vec!["info", "-f", format, "--output=json"];
    if force_share {
        args.push("--force-share");
    }
    args.push(path);
    let out = run_with_timeout("qemu-img", &args, QEMU_IMG_TIMEOUT)?;
    parse(path, &out.stdout)
}

fn parse(path: &str, json: &[u8]) -> Result<Info, InfoError> {
    let bad = |why: &str| InfoError::Format { path: path.into(), why: why.into() };
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
    Ok(Info {
        virtual_size: v["virtual-size"].as_u64().ok_or_else(|| bad("no virtual-size"))?,
        backing: v["full-backing-filename"].as_str().or(v["backing-filename"].as_str()).map(String::from),
        snapshots: v["snapshots"].as_array().map_or(0, Vec::len),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_size_backing_and_snapshots() {
        let i = parse("o", br#"{"virtual-size": 4096, "full-backing-filename": "/m.raw", "snapshots": [{"id": "1"}]}"#)
            .unwrap();
        assert_eq!(i, Info { virtual_size: 4096, backing: Some("/m.raw".into()), snapshots: 1 });
        assert!(parse("o", b"{}").is_err());
    }
}
