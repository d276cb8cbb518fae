//! Overlay layouts: the qcow2 cluster size and whether L2 entries are extended (subclusters).
//! The one definition of what `virt-clone-cow clone --overlay-layout` and the hook's
//! `overlay_layout` setting accept (docs/overlay-layout.md; measured in docs/benchmarks/clone.md).
//!
//! Accepted values (case-insensitive):
//!
//! | value | cluster size | extended L2 |
//! |---|---|---|
//! | `default` (also `qemu`, `64k`) | 64 KiB, QEMU's default | off |
//! | `128k-l2` | 128 KiB | on (32 subclusters of 4 KiB) |
//! | `64k-l2` | 64 KiB | on (32 subclusters of 2 KiB) |
//! | `2m-l2` | 2 MiB | on (32 subclusters of 64 KiB) |
//! | `SIZE` or `SIZE-l2` | any valid size (`32k`, `1m`, ...) | off / on |
//! | `cluster_size=SIZE,extended_l2=on\|off` | as qemu-img's `-o` options (either key may be left out) | |
//!
//! SIZE is a power of two from 512 bytes (`512`, `4k`) to 2 MiB (`2m`), at least 16 KiB with
//! extended L2 entries (QEMU's limits).

use std::fmt;
use std::str::FromStr;

/// How an overlay's qcow2 clusters are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OverlayLayout {
    /// Bytes per cluster: a power of two, 512 B to 2 MiB.
    pub cluster_size: u32,
    /// Extended L2 entries: 32 subclusters per cluster, allocated one by one on first write.
    pub extended_l2: bool,
}

/// A layout value that is not one of the accepted forms (the message says which are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid overlay layout '{value}': {why}; expected default, 128k-l2, 64k-l2, 2m-l2, SIZE[-l2] or cluster_size=SIZE,extended_l2=on|off")]
pub struct LayoutError {
    pub value: String,
    pub why: String,
}

const MIN_CLUSTER: u32 = 512;
const MAX_CLUSTER: u32 = 2 << 20;
const MIN_L2_CLUSTER: u32 = 16 << 10;

impl OverlayLayout {
    /// QEMU's own default: 64 KiB clusters, no subclusters.
    pub const QEMU_DEFAULT: OverlayLayout = OverlayLayout { cluster_size: 64 << 10, extended_l2: false };
    /// 128 KiB clusters with extended L2 entries (4 KiB subclusters).
    pub const L2_128K: OverlayLayout = OverlayLayout { cluster_size: 128 << 10, extended_l2: true };
    /// 64 KiB clusters with extended L2 entries (2 KiB subclusters).
    pub const L2_64K: OverlayLayout = OverlayLayout { cluster_size: 64 << 10, extended_l2: true };
    /// 2 MiB clusters with extended L2 entries (64 KiB subclusters).
    pub const L2_2M: OverlayLayout = OverlayLayout { cluster_size: 2 << 20, extended_l2: true };

    /// What virt-clone-cow and the hook use unless told otherwise. Chosen by measurement
    /// (docs/benchmarks/clone.md, "Overlay layouts side by side"): no layout was both never
    /// more than 5 % slower than QEMU's default and 1.5x faster on scattered first writes, so
    /// the default is QEMU's and the others are offered.
    pub const DEFAULT: OverlayLayout = OverlayLayout::QEMU_DEFAULT;

    /// The `-o` options for `qemu-img create -f qcow2` (compat 1.1 always; QEMU's default
    /// layout states nothing more, so any qemu-img takes it).
    pub fn qemu_img_options(&self) -> String {
        if *self == OverlayLayout::QEMU_DEFAULT {
            return "compat=1.1".to_string();
        }
        let mut s = format!("compat=1.1,cluster_size={}", self.cluster_size);
        if self.extended_l2 {
            s.push_str(",extended_l2=on");
        }
        s
    }

    /// The elements of a libvirt storage volume's `<target>` that state this layout (nothing for
    /// QEMU's default).
    pub fn volume_xml(&self) -> String {
        if *self == OverlayLayout::QEMU_DEFAULT {
            return String::new();
        }
        let mut s = if self.cluster_size % 1024 == 0 {
            format!("<clusterSize unit='KiB'>{}</clusterSize>", self.cluster_size / 1024)
        } else {
            format!("<clusterSize unit='bytes'>{}</clusterSize>", self.cluster_size)
        };
        if self.extended_l2 {
            s.push_str("<features><extended_l2/></features>");
        }
        s
    }
}

impl Default for OverlayLayout {
    fn default() -> Self {
        OverlayLayout::DEFAULT
    }
}

/// The layout's name as `--overlay-layout` takes it: `default`, `128k-l2`, `2m-l2`, `32k`, ...
impl fmt::Display for OverlayLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == OverlayLayout::QEMU_DEFAULT {
            return f.write_str("default");
        }
        let c = self.cluster_size;
        if c % (1 << 20) == 0 {
            write!(f, "{}m", c >> 20)?;
        } else if c % 1024 == 0 {
            write!(f, "{}k", c >> 10)?;
        } else {
            write!(f, "{c}")?;
        }
        if self.extended_l2 {
            f.write_str("-l2")?;
        }
        Ok(())
    }
}

impl FromStr for OverlayLayout {
    type Err = LayoutError;

    fn from_str(value: &str) -> Result<Self, LayoutError> {
        let err = |why: String| LayoutError { value: value.chars().take(100).collect(), why };
        let v = value.trim().to_ascii_lowercase();
        if v.is_empty() {
            return Err(err("empty".into()));
        }
        if v.len() > 100 {
            return Err(err("too long".into()));
        }
        let layout = if v == "default" || v == "qemu" {
            OverlayLayout::QEMU_DEFAULT
        } else if v.contains('=') {
            let mut cluster_size = None;
            let mut extended_l2 = None;
            for part in v.split(',') {
                let (key, val) = part.split_once('=').ok_or_else(|| err(format!("'{part}' is not KEY=VALUE")))?;
                match key.trim() {
                    "cluster_size" if cluster_size.is_none() => {
                        cluster_size = Some(parse_size(val.trim()).map_err(err)?)
                    }
                    "extended_l2" if extended_l2.is_none() => {
                        extended_l2 = Some(match val.trim() {
                            "on" => true,
                            "off" => false,
                            other => return Err(err(format!("extended_l2 is on or off, not '{other}'"))),
                        })
                    }
                    "cluster_size" | "extended_l2" => return Err(err(format!("{} given twice", key.trim()))),
                    other => return Err(err(format!("unknown option '{other}'"))),
                }
            }
            OverlayLayout {
                cluster_size: cluster_size.unwrap_or(OverlayLayout::QEMU_DEFAULT.cluster_size),
                extended_l2: extended_l2.unwrap_or(false),
            }
        } else {
            let (size, extended_l2) = match v.strip_suffix("-l2") {
                Some(s) => (s, true),
                None => (v.as_str(), false),
            };
            OverlayLayout { cluster_size: parse_size(size).map_err(err)?, extended_l2 }
        };
        if layout.extended_l2 && layout.cluster_size < MIN_L2_CLUSTER {
            return Err(err("extended L2 entries need clusters of at least 16k".into()));
        }
        Ok(layout)
    }
}

/// A cluster size: bytes, or a number with `k` or `m`; a power of two from 512 B to 2 MiB.
fn parse_size(s: &str) -> Result<u32, String> {
    let (digits, shift) = match s.strip_suffix(['k', 'm']) {
        Some(d) if s.ends_with('k') => (d, 10),
        Some(d) => (d, 20),
        None => (s, 0),
    };
    let n: u64 = match digits.parse() {
        Ok(n) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => return Err(format!("'{s}' is not a cluster size (like 64k or 2m)")),
    };
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).unwrap_or(u64::MAX);
    if !(MIN_CLUSTER as u64..=MAX_CLUSTER as u64).contains(&bytes) || !bytes.is_power_of_two() {
        return Err(format!("the cluster size '{s}' must be a power of two from 512 bytes to 2m"));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<OverlayLayout, LayoutError> {
        s.parse()
    }

    #[test]
    fn named_layouts_parse_to_their_cluster_size_and_subclusters() {
        assert_eq!(p("default").unwrap(), OverlayLayout::QEMU_DEFAULT);
        assert_eq!(p("qemu").unwrap(), OverlayLayout::QEMU_DEFAULT);
        assert_eq!(p("64k").unwrap(), OverlayLayout::QEMU_DEFAULT);
        assert_eq!(p("128k-l2").unwrap(), OverlayLayout::L2_128K);
        assert_eq!(p("64k-l2").unwrap(), OverlayLayout::L2_64K);
        assert_eq!(p("2m-l2").unwrap(), OverlayLayout::L2_2M);
        assert_eq!(p(" 2M-L2 ").unwrap(), OverlayLayout::L2_2M);
        assert_eq!(p("32k").unwrap(), OverlayLayout { cluster_size: 32768, extended_l2: false });
        assert_eq!(p("512").unwrap(), OverlayLayout { cluster_size: 512, extended_l2: false });
        assert_eq!(p("1m-l2").unwrap(), OverlayLayout { cluster_size: 1 << 20, extended_l2: true });
    }

    #[test]
    fn qemu_img_style_options_parse_in_any_order() {
        assert_eq!(p("cluster_size=128k,extended_l2=on").unwrap(), OverlayLayout::L2_128K);
        assert_eq!(p("extended_l2=on,cluster_size=2M").unwrap(), OverlayLayout::L2_2M);
        assert_eq!(p("cluster_size=65536,extended_l2=off").unwrap(), OverlayLayout::QEMU_DEFAULT);
        assert_eq!(p("extended_l2=on").unwrap(), OverlayLayout::L2_64K);
        assert_eq!(p("cluster_size=131072").unwrap(), OverlayLayout { cluster_size: 131072, extended_l2: false });
    }

    #[test]
    fn bad_values_are_refused_with_one_line_naming_the_value() {
        for bad in [
            "",
            "fast",
            "128k-l3",
            "3k",
            "4m",
            "256",
            "8k-l2",
            "k",
            "-64k",
            "+64k",
            "99999999999999999999k",
            "18014398509481984m",
            "cluster_size=128k,extended_l2=yes",
            "cluster_size=128k,cluster_size=64k",
            "cluster_size=128k,compat=0.10",
            "cluster_size",
            "cluster_size=128k,",
            "extended_l2=on,cluster_size=8k",
        ] {
            let e = p(bad).expect_err(bad).to_string();
            assert!(e.starts_with(&format!("invalid overlay layout '{bad}': ")), "{e}");
            assert!(e.contains("expected default, 128k-l2"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let long = "x".repeat(10_000);
        assert!(p(&long).unwrap_err().to_string().len() < 400, "a long value is not echoed whole");
    }

    #[test]
    fn names_round_trip_and_options_are_what_qemu_img_takes() {
        for l in [OverlayLayout::QEMU_DEFAULT, OverlayLayout::L2_128K, OverlayLayout::L2_64K, OverlayLayout::L2_2M] {
            assert_eq!(p(&l.to_string()).unwrap(), l);
        }
        assert_eq!(OverlayLayout::QEMU_DEFAULT.to_string(), "default");
        assert_eq!(OverlayLayout::L2_128K.to_string(), "128k-l2");
        assert_eq!(OverlayLayout::L2_2M.to_string(), "2m-l2");
        assert_eq!(p("512").unwrap().to_string(), "512");
        assert_eq!(OverlayLayout::QEMU_DEFAULT.qemu_img_options(), "compat=1.1");
        assert_eq!(OverlayLayout::L2_128K.qemu_img_options(), "compat=1.1,cluster_size=131072,extended_l2=on");
        assert_eq!(p("32k").unwrap().qemu_img_options(), "compat=1.1,cluster_size=32768");
        assert_eq!(OverlayLayout::QEMU_DEFAULT.volume_xml(), "");
        assert_eq!(
            OverlayLayout::L2_2M.volume_xml(),
            "<clusterSize unit='KiB'>2048</clusterSize><features><extended_l2/></features>"
        );
        assert_eq!(p("512").unwrap().volume_xml(), "<clusterSize unit='bytes'>512</clusterSize>");
    }
}
