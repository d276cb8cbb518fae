//! qemu-img: the one place in the workspace that runs it.
//!
//! A [`QemuImg`] says how to run it (force-share, a wall-clock limit, resource limits, which
//! program); its operations say what to run: [`QemuImg::info`], [`QemuImg::create_overlay`],
//! [`QemuImg::create`], [`QemuImg::check`], [`QemuImg::snapshot_create`], and
//! [`QemuImg::probe_confined`], the one run that lets qemu-img probe the format, confined with
//! Landlock so that it can open no file the image refers to. Every run goes through
//! [`crate::process::run_limited`]: argument vectors, both pipes drained while qemu-img runs, at
//! most [`MAX_OUTPUT`] bytes kept of each (qemu-img is killed past that: a hostile image cannot
//! make it print gigabytes into our memory), and the image format always stated (except in the
//! confined probe), so a raw image is never probed as something else.
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use vcc_core::qemu_img::QemuImg;
//!
//! let info = QemuImg::new().force_share(true).timeout(Duration::from_secs(30)).info(Path::new("/m.qcow2"), "qcow2")?;
//! println!("{} bytes, backing file {:?}", info.virtual_size, info.backing);
//! # Ok::<(), vcc_core::qemu_img::QemuImgError>(())
//! ```

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::layout::OverlayLayout;
use crate::process::{capture, run_limited, CommandError, ConfineError, Limits};

/// Most bytes of qemu-img output kept per stream; qemu-img is killed when it prints more. The
/// JSON of `info` or `check` on an image with many snapshots or bitmaps is far smaller.
pub const MAX_OUTPUT: usize = 4 << 20;

/// Why qemu-img gave no usable answer. The [`CommandError`] cause shows the command line and what
/// qemu-img printed on stderr (boxed: errors stay small on the `Ok` path).
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("qemu-img could not read '{path}'")]
    Info {
        path: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error("qemu-img printed information about '{path}' that we cannot read")]
    InfoOutput {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("qemu-img could not create '{path}'")]
    Create {
        path: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error("qemu-img could not copy '{from}' to '{path}'")]
    Convert {
        from: String,
        path: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error("qemu-img could not compare '{a}' with '{b}'")]
    Compare {
        a: String,
        b: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error("qemu-img could not rebase '{path}'")]
    Rebase {
        path: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error("qemu-img could not check '{path}'")]
    Check {
        path: String,
        #[source]
        source: Box<CommandError>,
    },
    #[error("qemu-img printed a check report about '{path}' that we cannot read")]
    CheckOutput {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("qemu-img could not create snapshot '{name}' in '{path}'")]
    Snapshot {
        path: String,
        name: String,
        #[source]
        source: Box<CommandError>,
    },
    /// [`QemuImg::probe_confined`] on a kernel without Landlock: qemu-img was not run.
    #[error(
        "qemu-img's own probe of '{path}' was not run: this kernel has no Landlock to confine it with \
         (Linux 5.13 or later with landlock among the enabled LSMs, see /sys/kernel/security/lsm)"
    )]
    NoConfinement { path: String },
}

impl QemuImgError {
    /// What qemu-img printed on stderr, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            QemuImgError::Info { source, .. }
            | QemuImgError::Create { source, .. }
            | QemuImgError::Rebase { source, .. }
            | QemuImgError::Check { source, .. }
            | QemuImgError::Convert { source, .. }
            | QemuImgError::Compare { source, .. }
            | QemuImgError::Snapshot { source, .. } => source.stderr(),
            QemuImgError::InfoOutput { .. } | QemuImgError::CheckOutput { .. } | QemuImgError::NoConfinement { .. } => {
                None
            }
        }
    }
}

/// What qemu-img says about an image: the union of what the CLI, the hook and the pool-helper's
/// verification read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format qemu-img opened the image as (the one we stated).
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the file takes on disk.
    pub actual_size: Option<u64>,
    /// The backing file as recorded in the image (`full-backing-filename` when qemu-img gives it).
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    /// Internal snapshots the image holds.
    pub snapshots: usize,
    /// The image says it was not closed cleanly (`dirty-flag`).
    pub dirty: bool,
    /// Encrypted (`encrypted`, or an `encrypt` block in the format-specific data).
    pub encrypted: bool,
    /// qcow2 marked corrupt.
    pub corrupt: bool,
    /// qcow2 external data file.
    pub data_file: Option<String>,
}

/// What `qemu-img check` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckReport {
    /// Errors that kept the check from looking at everything.
    pub check_errors: u64,
    pub corruptions: u64,
    /// Clusters allocated but not used: wasted space, not damage.
    pub leaks: u64,
    /// Clusters stored compressed (`compressed-clusters`; 0 when qemu-img does not say).
    pub compressed_clusters: u64,
}

impl CheckReport {
    /// Nothing wrong at all (leaks included).
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }
}

/// What an overlay is built over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingSpec<'a> {
    pub path: &'a str,
    pub format: &'a str,
    pub virtual_size: u64,
}

/// How qemu-img is run: which program, with `--force-share` or not, and within which limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuImg {
    program: PathBuf,
    force_share: bool,
    limits: Limits,
}

impl Default for QemuImg {
    fn default() -> Self {
        QemuImg {
            program: PathBuf::from("qemu-img"),
            force_share: false,
            limits: Limits { max_output: MAX_OUTPUT, ..Limits::default() },
        }
    }
}

impl QemuImg {
    /// `qemu-img` from `PATH`, without force-share, within [`crate::process::DEFAULT_TIMEOUT`]
    /// and [`MAX_OUTPUT`], no resource limits.
    pub fn new() -> Self {
        QemuImg::default()
    }

    /// Runs another program in qemu-img's place (tests).
    pub fn program(self, program: impl Into<PathBuf>) -> Self {
        QemuImg { program: program.into(), ..self }
    }

    /// `--force-share` (`-U`) on `info`: the image is read even while a QEMU has it open. Without
    /// it, qemu-img fails on an image a QEMU holds open for writing, which is how the hook tells
    /// that an overlay is in use.
    pub fn force_share(self, on: bool) -> Self {
        QemuImg { force_share: on, ..self }
    }

    /// Wall-clock limit for one run; qemu-img is killed and reaped when it is exceeded.
    pub fn timeout(self, timeout: Duration) -> Self {
        QemuImg { limits: Limits { timeout, ..self.limits }, ..self }
    }

    /// Address-space limit (`RLIMIT_AS`) of qemu-img, in bytes.
    pub fn address_space_limit(self, bytes: u64) -> Self {
        QemuImg { limits: Limits { address_space: Some(bytes), ..self.limits }, ..self }
    }

    /// CPU-time limit (`RLIMIT_CPU`) of qemu-img, in seconds.
    pub fn cpu_limit(self, seconds: u64) -> Self {
        QemuImg { limits: Limits { cpu_seconds: Some(seconds), ..self.limits }, ..self }
    }

    /// Most bytes kept of each output stream (default [`MAX_OUTPUT`]).
    pub fn max_output(self, bytes: usize) -> Self {
        QemuImg { limits: Limits { max_output: bytes, ..self.limits }, ..self }
    }

    fn run(&self, args: &[&OsStr]) -> Result<Output, CommandError> {
        run_limited(&self.program, args, &self.limits)
    }

    /// `qemu-img info -f FORMAT --output=json [--force-share] PATH`. qemu-img info does not open
    /// the backing chain.
    pub fn info(&self, path: &Path, format: &str) -> Result<ImageInfo, QemuImgError> {
        let shown = || path.display().to_string();
        let mut args: Vec<&OsStr> = vec!["info".as_ref(), "-f".as_ref(), format.as_ref(), "--output=json".as_ref()];
        if self.force_share {
            args.push("--force-share".as_ref());
        }
        args.push(path.as_os_str());
        let out = self.run(&args).map_err(|source| QemuImgError::Info { path: shown(), source: Box::new(source) })?;
        parse_info(&out.stdout).map_err(|source| QemuImgError::InfoOutput { path: shown(), source })
    }

    /// `qemu-img info --output=json --force-share PATH` WITHOUT `-f`: qemu-img's own format probe,
    /// as a second opinion on an image that must be raw. Probing is what makes qemu-img follow
    /// what an image refers to (a vmdk descriptor's extents, for one), so qemu-img runs confined
    /// with Landlock ([`Limits::confine_reads_to`]): it can read `path`, /usr, /etc/ld.so.cache
    /// and /dev/null and nothing else, and write nothing but /dev/null. An image that refers to
    /// another file then fails to open. On a kernel without Landlock this is
    /// [`QemuImgError::NoConfinement`] and qemu-img is not run.
    pub fn probe_confined(&self, path: &Path) -> Result<ImageInfo, QemuImgError> {
        let shown = || path.display().to_string();
        let args: [&OsStr; 4] = ["info".as_ref(), "--output=json".as_ref(), "--force-share".as_ref(), path.as_os_str()];
        let limits = Limits { confine_reads_to: Some(path.to_path_buf()), ..self.limits.clone() };
        let out = run_limited(&self.program, &args, &limits).map_err(|source| match source {
            CommandError::Confine { source: ConfineError::Unsupported, .. } => {
                QemuImgError::NoConfinement { path: shown() }
            }
            source => QemuImgError::Info { path: shown(), source: Box::new(source) },
        })?;
        parse_info(&out.stdout).map_err(|source| QemuImgError::InfoOutput { path: shown(), source })
    }

    /// `qemu-img create -q -f FORMAT PATH SIZE`: a new empty image with no backing file.
    pub fn create(&self, path: &Path, format: &str, size: u64) -> Result<(), QemuImgError> {
        let size = size.to_string();
        let args: [&OsStr; 6] =
            ["create".as_ref(), "-q".as_ref(), "-f".as_ref(), format.as_ref(), path.as_os_str(), size.as_ref()];
        self.run(&args)
            .map(drop)
            .map_err(|source| QemuImgError::Create { path: path.display().to_string(), source: Box::new(source) })
    }

    /// Creates the qcow2 overlay `path` over `backing`: the backing format always stated (`-F`),
    /// compat 1.1, and `layout`'s cluster size and subclusters. A qemu-img that does not know
    /// extended L2 entries (before QEMU 5.2) gets QEMU's default layout instead.
    /// qemu-img overwrites `path`: callers make sure it is theirs.
    pub fn create_overlay(
        &self,
        path: &Path,
        backing: &BackingSpec<'_>,
        layout: OverlayLayout,
    ) -> Result<(), QemuImgError> {
        let size = backing.virtual_size.to_string();
        let options = layout.qemu_img_options();
        let plain = OverlayLayout::QEMU_DEFAULT.qemu_img_options();
        let mut argv: [&OsStr; 12] = [
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            options.as_ref(),
            "-b".as_ref(),
            backing.path.as_ref(),
            "-F".as_ref(),
            backing.format.as_ref(),
            path.as_os_str(),
            size.as_ref(),
        ];
        let result = match self.run(&argv) {
            // Only qemu-img's own complaint counts (our command line contains the word too).
            Err(e) if layout.extended_l2 && e.stderr().is_some_and(|s| s.contains("extended_l2")) => {
                argv[5] = plain.as_ref();
                self.run(&argv)
            }
            other => other,
        };
        result
            .map(drop)
            .map_err(|source| QemuImgError::Create { path: path.display().to_string(), source: Box::new(source) })
    }

    /// `qemu-img convert -q -f FORMAT -O qcow2 -o compat=1.1 FROM PATH`: a standalone copy of
    /// `from` and everything its backing chain holds (the chain as the image names it, its formats
    /// stated). qemu-img overwrites `path`: callers make sure it is theirs.
    pub fn convert_standalone(&self, from: &Path, format: &str, path: &Path) -> Result<(), QemuImgError> {
        self.convert_to_qcow2(&[], "compat=1.1", from, format, path)
    }

    /// `qemu-img convert -q -c -f FORMAT -O qcow2 -o compat=1.1,compression_type=zstd FROM PATH`:
    /// a standalone qcow2 copy of `from` whose clusters are zstd-compressed (QEMU 5.1 and later
    /// read it as any qcow2, as a backing file too). qemu-img overwrites `path`: callers make sure
    /// it is theirs.
    pub fn convert_compressed(&self, from: &Path, format: &str, path: &Path) -> Result<(), QemuImgError> {
        self.convert_to_qcow2(&["-c".as_ref()], COMPRESSED_OPTIONS, from, format, path)
    }

    /// `qemu-img convert -q [FLAGS] -f FORMAT -O qcow2 -o OPTIONS FROM PATH`.
    fn convert_to_qcow2(
        &self,
        flags: &[&OsStr],
        options: &str,
        from: &Path,
        format: &str,
        path: &Path,
    ) -> Result<(), QemuImgError> {
        let mut args: Vec<&OsStr> = vec!["convert".as_ref(), "-q".as_ref()];
        args.extend_from_slice(flags);
        let rest: [&OsStr; 6] =
            ["-f".as_ref(), format.as_ref(), "-O".as_ref(), "qcow2".as_ref(), "-o".as_ref(), options.as_ref()];
        args.extend(rest);
        args.extend([from.as_os_str(), path.as_os_str()]);
        self.run(&args).map(drop).map_err(|source| QemuImgError::Convert {
            from: from.display().to_string(),
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// `qemu-img compare -q -f FA -F FB A B`: whether the two images read the same guest-visible
    /// bytes (qemu-img exits 0 when they do, 1 when they differ, anything else on an error).
    pub fn compare(&self, a: &Path, fa: &str, b: &Path, fb: &str) -> Result<bool, QemuImgError> {
        let err = |source| QemuImgError::Compare {
            a: a.display().to_string(),
            b: b.display().to_string(),
            source: Box::new(source),
        };
        let mut args: Vec<&OsStr> =
            vec!["compare".as_ref(), "-q".as_ref(), "-f".as_ref(), fa.as_ref(), "-F".as_ref(), fb.as_ref()];
        if self.force_share {
            args.push("-U".as_ref());
        }
        args.push(a.as_os_str());
        args.push(b.as_os_str());
        let out = capture(&self.program, &args, &self.limits).map_err(err)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => {
                let cmdline = crate::process::display_cmdline(&self.program.to_string_lossy(), &args);
                Err(err(CommandError::failed(cmdline, &out)))
            }
        }
    }

    /// Whether `qemu-img create -f qcow2` knows `extended_l2` (QEMU 5.2 and later).
    pub fn supports_extended_l2(&self) -> bool {
        let args: [&OsStr; 5] = ["create".as_ref(), "-f".as_ref(), "qcow2".as_ref(), "-o".as_ref(), "help".as_ref()];
        self.run(&args).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("extended_l2"))
    }

    /// `qemu-img check -f FORMAT --output=json [--force-share] PATH`. Corruptions and leaks are a
    /// report, not an error (qemu-img exits 2 and 3 for them); an error is a check qemu-img could
    /// not run or complete (a raw image cannot be checked).
    pub fn check(&self, path: &Path, format: &str) -> Result<CheckReport, QemuImgError> {
        let shown = || path.display().to_string();
        let mut args: Vec<&OsStr> = vec!["check".as_ref(), "-f".as_ref(), format.as_ref(), "--output=json".as_ref()];
        if self.force_share {
            args.push("--force-share".as_ref());
        }
        args.push(path.as_os_str());
        let out = capture(&self.program, &args, &self.limits)
            .map_err(|source| QemuImgError::Check { path: shown(), source: Box::new(source) })?;
        if !matches!(out.status.code(), Some(0 | 2 | 3)) {
            let cmdline = crate::process::display_cmdline(&self.program.to_string_lossy(), &args);
            return Err(QemuImgError::Check { path: shown(), source: Box::new(CommandError::failed(cmdline, &out)) });
        }
        parse_check(&out.stdout).map_err(|source| QemuImgError::CheckOutput { path: shown(), source })
    }

    /// `qemu-img rebase -u -f qcow2 -b BACKING -F FORMAT PATH`: names another backing file in the
    /// header without reading either (the caller knows they hold the same bytes).
    pub fn rebase_unsafe(&self, path: &Path, backing: &Path, format: &str) -> Result<(), QemuImgError> {
        let args: [&OsStr; 9] = [
            "rebase".as_ref(),
            "-u".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            backing.as_os_str(),
            "-F".as_ref(),
            format.as_ref(),
            path.as_os_str(),
        ];
        self.run(&args)
            .map(drop)
            .map_err(|source| QemuImgError::Rebase { path: path.display().to_string(), source: Box::new(source) })
    }

    /// `qemu-img snapshot -c NAME PATH`: an internal snapshot.
    pub fn snapshot_create(&self, path: &Path, name: &str) -> Result<(), QemuImgError> {
        let args: [&OsStr; 4] = ["snapshot".as_ref(), "-c".as_ref(), name.as_ref(), path.as_os_str()];
        self.run(&args).map(drop).map_err(|source| QemuImgError::Snapshot {
            path: path.display().to_string(),
            name: name.to_string(),
            source: Box::new(source),
        })
    }
}

/// The creation options of a compressed master: zstd, which decompresses several times faster
/// than zlib (qcow2's default) for a similar ratio.
pub const COMPRESSED_OPTIONS: &str = "compat=1.1,compression_type=zstd";

/// The fields of `qemu-img info --output=json` we read. Only format and size are required;
/// everything else is read leniently (a backing file of any JSON type counts as one).
#[derive(serde::Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<Value>,
    #[serde(rename = "full-backing-filename")]
    full_backing_filename: Option<Value>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<Value>,
    snapshots: Option<Value>,
    #[serde(rename = "dirty-flag")]
    dirty_flag: Option<Value>,
    encrypted: Option<Value>,
    #[serde(rename = "format-specific")]
    format_specific: Option<Value>,
}

/// A string as itself; any other JSON value as its JSON text.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn parse_info(json: &[u8]) -> Result<ImageInfo, serde_json::Error> {
    let r: RawInfo = serde_json::from_slice(json)?;
    let data = r.format_specific.as_ref().and_then(|f| f.get("data"));
    let is_true = |v: Option<&Value>| v.and_then(Value::as_bool) == Some(true);
    Ok(ImageInfo {
        format: r.format,
        virtual_size: r.virtual_size,
        actual_size: r.actual_size,
        backing: text(r.full_backing_filename.as_ref()).or_else(|| text(r.backing_filename.as_ref())),
        backing_format: text(r.backing_format.as_ref()),
        snapshots: r.snapshots.as_ref().and_then(Value::as_array).map_or(0, Vec::len),
        dirty: is_true(r.dirty_flag.as_ref()),
        encrypted: is_true(r.encrypted.as_ref()) || data.and_then(|d| d.get("encrypt")).is_some(),
        corrupt: is_true(data.and_then(|d| d.get("corrupt"))),
        data_file: text(data.and_then(|d| d.get("data-file"))),
    })
}

#[derive(serde::Deserialize)]
struct RawCheck {
    #[serde(rename = "check-errors")]
    check_errors: u64,
    #[serde(default)]
    corruptions: u64,
    #[serde(default)]
    leaks: u64,
    #[serde(default, rename = "compressed-clusters")]
    compressed_clusters: u64,
}

fn parse_check(json: &[u8]) -> Result<CheckReport, serde_json::Error> {
    let r: RawCheck = serde_json::from_slice(json)?;
    Ok(CheckReport {
        check_errors: r.check_errors,
        corruptions: r.corruptions,
        leaks: r.leaks,
        compressed_clusters: r.compressed_clusters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Writes an executable /bin/sh script standing in for qemu-img. The file is written by a
    /// shell, not by us: an open write descriptor of ours, inherited by a child another test
    /// thread forks meanwhile, would make executing it fail with ETXTBSY.
    fn fake_qemu_img(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fake-qemu-img");
        let script = format!("#!/bin/sh\n{body}\n");
        crate::process::run("/bin/sh", &["-c", "printf '%s' \"$1\" > \"$0\"", p.to_str().unwrap(), &script]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn compare_reads_qemu_imgs_exit_status_and_compressed_convert_states_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Path::new("/a.raw"), Path::new("/b.qcow2"));
        for (code, want) in [(0, Some(true)), (1, Some(false)), (2, None)] {
            let fake = fake_qemu_img(dir.path(), &format!("echo \"$*\" > {}/args; exit {code}", dir.path().display()));
            let got = QemuImg::new().program(&fake).compare(a, "raw", b, "qcow2");
            assert_eq!(got.as_ref().ok().copied(), want, "exit {code}: {got:?}");
            let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
            assert_eq!(args.trim(), "compare -q -f raw -F qcow2 /a.raw /b.qcow2");
            std::fs::remove_file(&fake).unwrap();
        }
        let fake = fake_qemu_img(dir.path(), &format!("echo \"$*\" > {}/args", dir.path().display()));
        QemuImg::new().program(&fake).convert_compressed(a, "raw", b).unwrap();
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(args.trim(), "convert -q -c -f raw -O qcow2 -o compat=1.1,compression_type=zstd /a.raw /b.qcow2");
    }

    #[test]
    fn a_program_printing_a_mib_and_exiting_returns_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu_img(dir.path(), crate::process::tests::MIB_TO_STDOUT);
        let t0 = Instant::now();
        let err = QemuImg::new()
            .program(fake)
            .timeout(Duration::from_secs(30))
            .info(Path::new("/m.qcow2"), "qcow2")
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
        assert!(matches!(err, QemuImgError::InfoOutput { .. }), "{err}");
    }

    #[test]
    fn a_program_printing_without_end_is_killed_at_the_output_bound() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu_img(dir.path(), "while :; do echo '{\"format\": \"qcow2\", \"virtual-size\": 1}'; done");
        let t0 = Instant::now();
        let err = QemuImg::new()
            .program(fake)
            .timeout(Duration::from_secs(60))
            .max_output(256 << 10)
            .info(Path::new("/m.qcow2"), "qcow2")
            .unwrap_err();
        assert!(
            matches!(&err, QemuImgError::Info { source, .. } if matches!(**source, CommandError::OutputTooLarge { limit: 262144, .. })),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
    }

    #[test]
    fn info_states_the_format_and_force_share_in_the_command() {
        let dir = tempfile::tempdir().unwrap();
        // Echoes its arguments back as the backing file name.
        let fake = fake_qemu_img(
            dir.path(),
            r#"printf '{"format": "raw", "virtual-size": 7, "backing-filename": "%s"}' "$*""#,
        );
        let q = QemuImg::new().program(fake);
        let shared = q.clone().force_share(true).info(Path::new("/p/m.raw"), "raw").unwrap();
        assert_eq!(shared.backing.as_deref(), Some("info -f raw --output=json --force-share /p/m.raw"));
        let plain = q.info(Path::new("/p/m.raw"), "raw").unwrap();
        assert_eq!(plain.backing.as_deref(), Some("info -f raw --output=json /p/m.raw"));
    }

    #[test]
    fn info_reads_every_field_the_callers_use() {
        let j = br#"{"virtual-size": 67108864, "filename": "o.qcow2", "format": "qcow2",
            "actual-size": 200704, "backing-filename": "m.raw", "full-backing-filename": "/m.raw",
            "backing-filename-format": "raw", "dirty-flag": true, "snapshots": [{"id": "1"}, {"id": "2"}],
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": true,
                "data-file": "/etc/shadow", "encrypt": {"format": "luks"}}}}"#;
        let i = parse_info(j).unwrap();
        let want = ImageInfo {
            format: "qcow2".into(),
            virtual_size: 64 << 20,
            actual_size: Some(200704),
            backing: Some("/m.raw".into()),
            backing_format: Some("raw".into()),
            snapshots: 2,
            dirty: true,
            encrypted: true,
            corrupt: true,
            data_file: Some("/etc/shadow".into()),
        };
        assert_eq!(i, want);
    }

    #[test]
    fn info_of_a_plain_image_has_no_backing_and_no_flags() {
        let i = parse_info(br#"{"virtual-size": 4096, "format": "raw", "backing-filename": "b.raw"}"#).unwrap();
        assert_eq!(i.backing.as_deref(), Some("b.raw"), "backing-filename when there is no full name");
        let i = parse_info(br#"{"virtual-size": 4096, "format": "raw"}"#).unwrap();
        assert_eq!(
            (i.backing, i.snapshots, i.dirty, i.encrypted, i.corrupt, i.data_file),
            (None, 0, false, false, false, None)
        );
    }

    #[test]
    fn info_without_size_or_format_is_unreadable() {
        assert!(parse_info(b"{}").is_err());
        assert!(parse_info(br#"{"format": "raw"}"#).is_err());
        assert!(parse_info(br#"{"virtual-size": 1}"#).is_err());
        assert!(parse_info(br#"{"virtual-size": -1, "format": "raw"}"#).is_err());
    }

    #[test]
    fn a_failing_qemu_img_reports_the_command_and_its_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu_img(dir.path(), "echo \"qemu-img: Could not open '$5'\" >&2; exit 1");
        let err = QemuImg::new().program(&fake).info(Path::new("/p/m.raw"), "raw").unwrap_err();
        assert_eq!(err.stderr(), Some("qemu-img: Could not open '/p/m.raw'"));
        let line = crate::error::one_line(&err);
        assert!(line.starts_with("qemu-img could not read '/p/m.raw': `"), "{line}");
        assert!(line.contains("info -f raw --output=json /p/m.raw` failed (exit status: 1)"), "{line}");
    }

    #[test]
    fn overlays_state_the_backing_format_and_fall_back_without_extended_l2() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let body = format!(
            "case \"$*\" in *extended_l2*) echo \"qemu-img: Invalid parameter 'extended_l2'\" >&2; exit 1;; esac\n\
             echo \"$*\" >> '{}'",
            log.display()
        );
        let fake = fake_qemu_img(dir.path(), &body);
        let b = BackingSpec { path: "/p/m a.raw", format: "raw", virtual_size: 1 << 20 };
        QemuImg::new().program(&fake).create_overlay(Path::new("/p/o.qcow2"), &b, OverlayLayout::L2_128K).unwrap();
        let ran = std::fs::read_to_string(&log).unwrap();
        assert_eq!(ran, "create -q -f qcow2 -o compat=1.1 -b /p/m a.raw -F raw /p/o.qcow2 1048576\n");
    }

    #[test]
    fn overlays_get_the_layout_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let fake = fake_qemu_img(dir.path(), &format!("echo \"$*\" >> '{}'", log.display()));
        let b = BackingSpec { path: "/p/m.raw", format: "raw", virtual_size: 1 << 20 };
        let q = QemuImg::new().program(&fake);
        q.create_overlay(Path::new("/p/a.qcow2"), &b, OverlayLayout::L2_2M).unwrap();
        q.create_overlay(Path::new("/p/b.qcow2"), &b, OverlayLayout::QEMU_DEFAULT).unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "create -q -f qcow2 -o compat=1.1,cluster_size=2097152,extended_l2=on -b /p/m.raw -F raw /p/a.qcow2 1048576\n\
             create -q -f qcow2 -o compat=1.1 -b /p/m.raw -F raw /p/b.qcow2 1048576\n"
        );
    }

    #[test]
    fn a_failed_overlay_that_is_not_about_extended_l2_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let fake = fake_qemu_img(dir.path(), &format!("echo x >> '{}'; echo 'no space' >&2; exit 1", log.display()));
        let b = BackingSpec { path: "/p/m.raw", format: "raw", virtual_size: 1 << 20 };
        let err = QemuImg::new()
            .program(&fake)
            .create_overlay(Path::new("/p/o.qcow2"), &b, OverlayLayout::L2_128K)
            .unwrap_err();
        assert!(matches!(err, QemuImgError::Create { .. }), "{err}");
        assert_eq!(err.stderr(), Some("no space"));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "x\n", "one run only");
    }

    #[test]
    fn check_reports_leaks_and_corruptions_and_fails_on_an_incomplete_check() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu_img(
            dir.path(),
            r#"case "$5" in
                 */leaky) printf '{"check-errors": 0, "leaks": 3, "filename": "x"}'; exit 3;;
                 */bad) printf '{"check-errors": 0, "corruptions": 2, "leaks": 1}'; exit 2;;
                 */clean) printf '{"check-errors": 0, "image-end-offset": 262144}';;
                 *) echo 'qemu-img: This image format does not support checks' >&2; exit 63;;
               esac"#,
        );
        let q = QemuImg::new().program(&fake);
        let leaky = q.check(Path::new("/p/leaky"), "qcow2").unwrap();
        assert_eq!(leaky, CheckReport { check_errors: 0, corruptions: 0, leaks: 3, compressed_clusters: 0 });
        assert!(!leaky.is_clean());
        let bad = q.check(Path::new("/p/bad"), "qcow2").unwrap();
        assert_eq!(bad, CheckReport { check_errors: 0, corruptions: 2, leaks: 1, compressed_clusters: 0 });
        assert!(q.check(Path::new("/p/clean"), "qcow2").unwrap().is_clean());
        let err = q.check(Path::new("/p/m.raw"), "raw").unwrap_err();
        assert_eq!(err.stderr(), Some("qemu-img: This image format does not support checks"));
    }

    #[test]
    fn limits_reach_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let fake = fake_qemu_img(dir.path(), r#"printf '{"format": "raw", "virtual-size": %s}' "$(ulimit -v)""#);
        let i = QemuImg::new()
            .program(fake)
            .address_space_limit(2 << 30)
            .cpu_limit(30)
            .info(Path::new("/m"), "raw")
            .unwrap();
        assert_eq!(i.virtual_size, 2 << 20, "ulimit -v reports KiB");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn real_qemu_img_creates_reads_and_checks_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let master = dir.path().join("m.qcow2");
        let overlay = dir.path().join("o.qcow2");
        let q = QemuImg::new().force_share(true);
        q.create(&master, "qcow2", 1 << 20).unwrap();
        let m = master.to_str().unwrap();
        let b = BackingSpec { path: m, format: "qcow2", virtual_size: 1 << 20 };
        q.create_overlay(&overlay, &b, OverlayLayout::L2_128K).unwrap();
        q.snapshot_create(&overlay, "s1").unwrap();
        let i = q.info(&overlay, "qcow2").unwrap();
        assert_eq!((i.format.as_str(), i.virtual_size), ("qcow2", 1 << 20));
        assert_eq!((i.backing.as_deref(), i.backing_format.as_deref()), (Some(m), Some("qcow2")));
        assert_eq!((i.snapshots, i.dirty, i.encrypted, i.corrupt, i.data_file), (1, false, false, false, None));
        assert!(q.check(&overlay, "qcow2").unwrap().is_clean());
        assert!(q.supports_extended_l2(), "QEMU 5.2 and later");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn the_confined_probe_takes_zeros_for_raw() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let i = QemuImg::new().probe_confined(&p).unwrap();
        assert_eq!((i.format.as_str(), i.virtual_size, i.backing), ("raw", 1 << 20, None));
    }

    /// A vmdk descriptor whose one extent is `extent`, a file qemu-img can read.
    fn vmdk_descriptor(dir: &Path, extent: &Path) -> PathBuf {
        let p = dir.join("m.img");
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
             RW 8 FLAT \"{}\" 0\n",
            extent.display()
        );
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn the_confined_probe_cannot_open_what_a_vmdk_descriptor_names() {
        let dir = tempfile::tempdir().unwrap();
        let extent = dir.path().join("secret");
        std::fs::write(&extent, vec![7u8; 4096]).unwrap();
        let p = vmdk_descriptor(dir.path(), &extent);
        // The hazard: unconfined, qemu-img's probe takes it for vmdk and opens the extent.
        let out = crate::process::run("qemu-img", &["info".as_ref(), "--output=json".as_ref(), p.as_os_str()]).unwrap();
        assert_eq!(parse_info(&out.stdout).unwrap().format, "vmdk");
        let err = QemuImg::new().probe_confined(&p).unwrap_err();
        let stderr = err.stderr().unwrap_or_default();
        assert!(matches!(err, QemuImgError::Info { .. }), "{err}");
        let want = format!("Could not open '{}': Permission denied", extent.display());
        assert!(stderr.ends_with(&want), "{stderr}");
    }

    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "integration tier: runs qemu-img")]
    fn the_confined_probe_reports_a_qcow2_overlay_without_its_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let (backing, overlay) = (dir.path().join("b.raw"), dir.path().join("o.img"));
        let q = QemuImg::new();
        q.create(&backing, "raw", 1 << 20).unwrap();
        let b = BackingSpec { path: backing.to_str().unwrap(), format: "raw", virtual_size: 1 << 20 };
        q.create_overlay(&overlay, &b, OverlayLayout::QEMU_DEFAULT).unwrap();
        let i = q.probe_confined(&overlay).unwrap();
        assert_eq!((i.format.as_str(), i.backing.as_deref()), ("qcow2", backing.to_str()));
    }
}
