//! Human-readable sizes, and sizes as users write them (`20G`, `512M`).

/// Formats a byte count as `1.5 GiB`, `196 KiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A size a user wrote that we cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a size; write it as bytes or with a unit: 512M, 20G, 1.5T (K, M, G, T are powers of 1024; KiB/MiB/GiB/TiB too)")]
pub struct SizeError(pub String);

/// The bytes one unit stands for, as libvirt and virsh read units (case-insensitive): none, `B`
/// or `bytes` 1; `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` powers of 1024; `KB`, `MB`, `GB`,
/// `TB` powers of 1000.
pub fn unit_bytes(unit: &str) -> Option<u64> {
    Some(match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" | "bytes" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Reads a size as qemu-img and virsh accept it: a number (a decimal fraction allowed before a
/// unit) with an optional unit `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (powers of 1024,
/// case-insensitive; `KB`, `MB`, `GB`, `TB` are powers of 1000, as in virsh). The result is a
/// whole number of bytes that fits 63 bits (what QEMU accepts as a disk size).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let bad = || SizeError(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult = unit_bytes(unit).ok_or_else(bad)?;
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if (whole.is_empty() && frac.is_empty()) || frac.len() > 9 || (!frac.is_empty() && mult == 1) {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
    let mut bytes = whole.checked_mul(mult).ok_or_else(bad)?;
    if !frac.is_empty() {
        let digits: u64 = frac.parse().map_err(|_| bad())?;
        let scale = 10u64.pow(frac.len() as u32);
        // Exact for every unit: mult * digits fits in 128 bits.
        let part = (u128::from(mult) * u128::from(digits)) / u128::from(scale);
        bytes = bytes.checked_add(u64::try_from(part).map_err(|_| bad())?).ok_or_else(bad)?;
    }
    if bytes > i64::MAX as u64 {
        return Err(bad());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::{human_bytes, parse_size};

    #[test]
    fn sizes_are_read_as_qemu_img_and_virsh_write_them() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size(" 64 K "), Ok(64 << 10));
        for bad in ["", "G", "-1G", "1.5", "twenty", "20X", "1..5G", "99999999999T", "1e9", "0x10"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(196 * 1024), "196 KiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
