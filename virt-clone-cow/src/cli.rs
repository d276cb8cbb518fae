//! Command-line arguments, modelled on virt-clone's, and their validation into a request.

use clap::{Args, Parser, Subcommand};

use virt_clone_cow::cmd::clone::{CloneRequest, NameRequest};
use virt_clone_cow::multi::MultiRequest;
use virt_clone_cow::placement::{parse_disk_size, OverlayRequest};

/// Linked (copy-on-write) clones of libvirt domains.
///
/// Each writable disk of a clone is a qcow2 overlay backed by the original's disk (the master), so
/// a clone costs one `virsh define` and a few hundred KiB whatever the disk size. The original
/// becomes a template: its masters are made read-only and it is marked so it is not started again.
#[derive(Debug, Parser)]
#[command(
    name = "virt-clone-cow",
    version,
    after_help = "Examples:\n  virt-clone-cow --original base --name web-1 --name web-2 --start\n  \
                  virt-clone-cow --original base --auto-clone --count 10 --json\n  \
                  virt-clone-cow --original base --name web --count 6 --host qemu+ssh://b/system --host qemu+ssh://c/system --start\n  \
                  virt-clone-cow tree\n  \
                  virt-clone-cow flatten web-1\n  \
                  virt-clone-cow gc --yes\n  \
                  virt-clone-cow publish base"
)]
pub struct Cli {
    /// libvirt connection URI (as virsh -c); defaults to LIBVIRT_DEFAULT_URI or libvirt's default.
    #[arg(short = 'c', long, value_name = "URI", global = true)]
    pub connect: Option<String>,

    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// More log output on stderr (-v info, -vv debug); VIRT_CLONE_COW_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub clone: CloneArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show masters, their templates, and the clones (domains and pool volumes) that depend on each.
    Tree,
    /// Publish a template's masters through the local pool-helper daemon and record their identity
    /// (SHA-256, info-hash, manifest) on the template, so its clones can be started on any host.
    Publish {
        /// The template (a domain already cloned with virt-clone-cow).
        #[arg(value_name = "TEMPLATE")]
        template: String,
        /// The pool-helper daemon's control socket.
        #[arg(long, value_name = "PATH", default_value = virt_clone_cow::cmd::publish::DEFAULT_CONTROL_SOCKET)]
        control_socket: std::path::PathBuf,
        /// Publish zstd-compressed copies of the masters instead (fewer bytes to move): each is
        /// written as a new volume NAME.zst.qcow2 beside its master and the template is pointed
        /// at it; clones made before keep the old master. The template must be shut off.
        #[arg(long)]
        compress: bool,
    },
    /// Turn a linked clone's overlays into standalone disks, so it no longer depends on its
    /// master: live with libvirt's block pull when it runs, else by a standalone copy put in
    /// place of each overlay (all disks or none).
    Flatten {
        /// The clone (a domain made by virt-clone-cow).
        #[arg(value_name = "CLONE")]
        clone: String,
        /// Flatten only this disk (its target, like vda); repeatable. Default: every linked disk.
        #[arg(long = "disk", value_name = "TARGET")]
        disks: Vec<String>,
        /// Longest wait, in seconds, for one disk's block pull or qemu-img copy; a pull still
        /// running then is stopped and the disk keeps its master (a copy through libvirt's storage
        /// API has no bound a client can set).
        #[arg(long, value_name = "SECS", default_value_t = virt_clone_cow::cmd::flatten::DEFAULT_TIMEOUT.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
    },
    /// List masters no template, clone or overlay needs and the space each frees; with --yes,
    /// remove them (pool-helper stops seeding them) and release or renew masters' protection.
    Gc {
        /// Remove them; without it nothing changes.
        #[arg(long)]
        yes: bool,
        /// Only these masters (paths); one still needed fails the run, naming what needs it.
        #[arg(value_name = "MASTER")]
        masters: Vec<String>,
        /// Only masters in this storage pool.
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
        /// The pool-helper daemon's control socket (its seeded masters are candidates too).
        #[arg(long, value_name = "PATH", default_value = virt_clone_cow::cmd::publish::DEFAULT_CONTROL_SOCKET)]
        control_socket: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The shut-off domain to clone; it becomes a template.
    #[arg(short = 'o', long, value_name = "NAME")]
    pub original: Option<String>,

    /// Name of a new clone (repeat for several; with --count N and one name: NAME-1..NAME-N).
    #[arg(short = 'n', long = "name", value_name = "NEW")]
    pub names: Vec<String>,

    /// Pick free names: ORIGINAL-clone, ORIGINAL-clone-1, ...
    #[arg(long, conflicts_with = "names")]
    pub auto_clone: bool,

    /// How many clones to make.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub count: Option<u32>,

    /// Start the clones once they are defined.
    #[arg(long)]
    pub start: bool,

    /// Print what would be done and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Mark the clones disposable: the libvirt hook discards their changes when they stop.
    #[arg(long)]
    pub disposable: bool,

    /// Make each disk a reflinked full copy of the master instead of an overlay (as virt-clone
    /// --reflink): constant time on xfs (reflink=1) and btrfs, no backing chain, and the original
    /// stays an ordinary domain. Refused where the filesystem cannot share extents.
    #[arg(long, conflicts_with_all = ["disposable", "hosts", "sysprep"])]
    pub reflink: bool,
    /// Reset each clone's guest identity before it is defined: virt-sysprep (guestfs-tools) on its
    /// overlays removes the template's machine-id, SSH host keys, DHCP leases and network
    /// hostnames, sets the hostname to the clone's name and writes a fresh /etc/machine-id.
    /// Local connections only; not with --host, nor with --disposable (whose overlays, and the
    /// identity in them, are discarded at every start).
    #[arg(long, conflicts_with_all = ["hosts", "disposable"])]
    pub sysprep: bool,

    /// Define the clones on this libvirt host instead of the original's (repeat: the clones are
    /// dealt round-robin over the hosts). The original is read from --connect.
    #[arg(long = "host", value_name = "URI")]
    pub hosts: Vec<String>,

    /// With --host: the overlays of masters in pool SRC go to pool DST on the hosts (default:
    /// the pool of the same name). Repeatable.
    #[arg(long = "pool-map", value_name = "SRC=DST", requires = "hosts")]
    pub pool_map: Vec<String>,

    /// Make each overlay SIZE large (20G, 512M; at least its master's size): the guest sees a
    /// larger disk. TARGET=SIZE (vdb=50G) sizes one disk; repeatable.
    #[arg(long = "disk-size", value_name = "[TARGET=]SIZE", conflicts_with = "reflink")]
    pub disk_sizes: Vec<String>,

    /// Put the overlays in this storage pool (dir, fs or netfs) instead of beside their masters,
    /// e.g. masters on shared storage, overlays on local disk.
    #[arg(long, value_name = "POOL", conflicts_with = "reflink")]
    pub overlay_pool: Option<String>,

    /// The overlays' qcow2 cluster layout: default (QEMU's: 64 KiB clusters), 128k-l2, 64k-l2,
    /// 2m-l2 (that cluster size with extended L2 entries: a first write allocates a 1/32
    /// subcluster instead of copying a whole cluster), or cluster_size=SIZE,extended_l2=on|off.
    /// See docs/overlay-layout.md for which workloads each suits.
    #[arg(long, value_name = "LAYOUT", conflicts_with = "reflink")]
    pub overlay_layout: Option<String>,
}

impl CloneArgs {
    /// Whether any clone flag was given (they make no sense with a subcommand).
    pub fn any_given(&self) -> bool {
        self.original.is_some()
            || !self.names.is_empty()
            || self.auto_clone
            || self.count.is_some()
            || self.start
            || self.dry_run
            || self.disposable
            || self.reflink
            || self.sysprep
            || !self.hosts.is_empty()
            || !self.pool_map.is_empty()
            || !self.disk_sizes.is_empty()
            || self.overlay_pool.is_some()
            || self.overlay_layout.is_some()
    }

    /// The multi-host request, when --host was given.
    pub fn to_multi_request(&self) -> Result<Option<MultiRequest>, String> {
        if self.hosts.is_empty() {
            return Ok(None);
        }
        let r = self.to_request()?;
        if !r.overlay.is_default() {
            return Err("--disk-size and --overlay-pool do not work with --host yet (there the hook may make the \
                        overlay at start, beside its master and at its size); --pool-map places overlays on hosts"
                .into());
        }
        virt_clone_cow::multi::plan::parse_pool_map(&self.pool_map)?;
        Ok(Some(MultiRequest {
            original: r.original,
            names: r.names,
            hosts: self.hosts.clone(),
            pool_map: self.pool_map.clone(),
            start: r.start,
            dry_run: r.dry_run,
            disposable: r.disposable,
            layout: r.overlay.layout,
        }))
    }

    /// Turns the flags into a request, or says which flags are wrong.
    pub fn to_request(&self) -> Result<CloneRequest, String> {
        let original =
            self.original.clone().ok_or("--original NAME is required (or a subcommand such as `tree`); see --help")?;
        let count = self.count.map(|c| c as usize);
        let names = match (self.auto_clone, self.names.len(), count) {
            (true, _, c) => NameRequest::Auto { count: c.unwrap_or(1) },
            (false, 0, _) => return Err("give the clone a name with --name NEW, or use --auto-clone".into()),
            (false, 1, Some(c)) if c > 1 => NameRequest::Numbered { base: self.names[0].clone(), count: c },
            (false, n, Some(c)) if c != n => {
                return Err(format!("--count {c} does not match the {n} names given with --name"))
            }
            _ => NameRequest::Names(self.names.clone()),
        };
        let overlay = OverlayRequest {
            disk_sizes: self.disk_sizes.iter().map(|s| parse_disk_size(s)).collect::<Result<_, _>>()?,
            pool: self.overlay_pool.clone(),
            layout: match &self.overlay_layout {
                Some(l) => l.parse().map_err(|e: vcc_core::layout::LayoutError| format!("--overlay-layout: {e}"))?,
                None => Default::default(),
            },
        };
        Ok(CloneRequest {
            original,
            names,
            start: self.start,
            dry_run: self.dry_run,
            disposable: self.disposable,
            overlay,
            reflink: self.reflink,
            sysprep: self.sysprep,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<CloneRequest, String> {
        let mut v = vec!["virt-clone-cow"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map_err(|e| e.to_string())?.clone.to_request()
    }

    #[test]
    fn overlay_layout_is_parsed_and_a_bad_one_is_one_usage_line() {
        use vcc_core::layout::OverlayLayout;
        assert_eq!(parse(&["-o", "b", "--name", "x"]).unwrap().overlay.layout, OverlayLayout::DEFAULT);
        assert_eq!(
            parse(&["-o", "b", "--name", "x", "--overlay-layout", "128k-l2"]).unwrap().overlay.layout,
            OverlayLayout::L2_128K
        );
        let r = parse(&["-o", "b", "--name", "x", "--overlay-layout", "cluster_size=2M,extended_l2=on"]).unwrap();
        assert_eq!(r.overlay.layout, OverlayLayout::L2_2M);
        assert!(r.overlay.is_default(), "a layout alone does not move or size overlays");
        let e = parse(&["-o", "b", "--name", "x", "--overlay-layout", "huge"]).unwrap_err();
        assert!(e.starts_with("--overlay-layout: invalid overlay layout 'huge': "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(parse(&["-o", "b", "--name", "x", "--overlay-layout", "64k-l2", "--reflink"]).is_err());
        let mut v = vec!["virt-clone-cow", "-o", "b", "--name", "x", "--host", "h", "--overlay-layout", "2m-l2"];
        let m = Cli::try_parse_from(&v).unwrap().clone.to_multi_request().unwrap().unwrap();
        assert_eq!(m.layout, OverlayLayout::L2_2M);
        v.truncate(7);
        let m = Cli::try_parse_from(&v).unwrap().clone.to_multi_request().unwrap().unwrap();
        assert_eq!(m.layout, OverlayLayout::DEFAULT);
    }

    #[test]
    fn names_count_and_auto_clone_become_requests() {
        assert_eq!(
            parse(&["-o", "b", "--name", "x", "--name", "y"]).unwrap().names,
            NameRequest::Names(vec!["x".into(), "y".into()])
        );
        assert_eq!(
            parse(&["-o", "b", "--name", "w", "--count", "3"]).unwrap().names,
            NameRequest::Numbered { base: "w".into(), count: 3 }
        );
        assert_eq!(parse(&["-o", "b", "--auto-clone", "--count", "2"]).unwrap().names, NameRequest::Auto { count: 2 });
        assert!(parse(&["-o", "b", "--name", "x", "--name", "y", "--count", "3"])
            .unwrap_err()
            .contains("does not match"));
        assert!(parse(&["-o", "b"]).unwrap_err().contains("--auto-clone"));
        assert!(parse(&["--name", "x"]).unwrap_err().contains("--original"));
        assert!(parse(&["-o", "b", "--name", "x", "--auto-clone"]).is_err());
        assert!(parse(&["-o", "b", "--name", "x", "--reflink"]).unwrap().reflink);
        assert!(!parse(&["-o", "b", "--name", "x"]).unwrap().reflink);
        // A reflinked copy is nothing the hook discards, and it stays on the master's filesystem.
        assert!(parse(&["-o", "b", "--name", "x", "--reflink", "--disposable"]).is_err());
        assert!(parse(&["-o", "b", "--name", "x", "--reflink", "--host", "h"]).is_err());
        assert!(parse(&["-o", "b", "--name", "x", "--reflink", "--sysprep"]).is_err());
    }

    #[test]
    fn disk_sizes_and_an_overlay_pool_become_part_of_the_request() {
        let r = parse(&[
            "-o",
            "b",
            "--name",
            "x",
            "--disk-size",
            "20G",
            "--disk-size",
            "vdb=1T",
            "--overlay-pool",
            "local",
        ])
        .unwrap();
        assert_eq!(r.overlay.disk_sizes.len(), 2);
        assert_eq!(r.overlay.disk_sizes[1].bytes, 1 << 40);
        assert_eq!(r.overlay.pool.as_deref(), Some("local"));
        assert!(parse(&["-o", "b", "--name", "x", "--disk-size", "big"]).unwrap_err().contains("not a size"));
        let with_host =
            Cli::try_parse_from(["virt-clone-cow", "-o", "t", "-n", "w", "--host", "h", "--disk-size", "2G"]);
        assert!(with_host.unwrap().clone.to_multi_request().unwrap_err().contains("--host"));
        // A reflinked copy is the master's size, beside it.
        assert!(parse(&["-o", "b", "--name", "x", "--reflink", "--disk-size", "2G"]).is_err());
        assert!(parse(&["-o", "b", "--name", "x", "--reflink", "--overlay-pool", "p"]).is_err());
    }

    #[test]
    fn hosts_and_pool_maps_make_a_multi_host_request() {
        let cli = |args: &[&str]| {
            let mut v = vec!["virt-clone-cow"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).map_err(|e| e.to_string())
        };
        let c = cli(&["-o", "t", "--name", "web", "--count", "6", "--host", "qemu:///system", "--host", "h2"]).unwrap();
        let m = c.clone.to_multi_request().unwrap().unwrap();
        assert_eq!(m.hosts, ["qemu:///system", "h2"]);
        assert_eq!(m.names, NameRequest::Numbered { base: "web".into(), count: 6 });
        assert!(cli(&["-o", "t", "--name", "w"]).unwrap().clone.to_multi_request().unwrap().is_none());
        let bad = cli(&["-o", "t", "--name", "w", "--host", "h", "--pool-map", "nodst"]).unwrap();
        assert!(bad.clone.to_multi_request().unwrap_err().contains("SRC=DST"));
        assert!(cli(&["-o", "t", "--name", "w", "--pool-map", "a=b"]).is_err(), "--pool-map needs --host");
        assert!(cli(&["--host", "h", "tree"]).unwrap().clone.any_given(), "main refuses --host with `tree`");
        let e = cli(&["-o", "t", "--name", "w", "--sysprep", "--host", "h"]).unwrap_err();
        assert!(e.contains("--sysprep") && e.contains("--host"), "--sysprep is for local clones: {e}");
        let e = cli(&["-o", "t", "--name", "w", "--disposable", "--sysprep"]).unwrap_err();
        assert!(e.contains("--sysprep") && e.contains("--disposable"), "a disposable clone loses it at start: {e}");
        assert!(cli(&["-o", "t", "--name", "w", "--sysprep"]).unwrap().clone.to_request().unwrap().sysprep);
    }

    #[test]
    fn global_flags_work_before_and_after_the_tree_subcommand() {
        for args in [&["--connect", "qemu:///system", "--json", "tree"][..], &["tree", "--connect", "u", "--json"]] {
            let mut v = vec!["virt-clone-cow"];
            v.extend_from_slice(args);
            let cli = Cli::try_parse_from(v).unwrap();
            assert!(matches!(cli.command, Some(Command::Tree)) && cli.json && cli.connect.is_some());
            assert!(!cli.clone.any_given());
        }
        let cli = Cli::try_parse_from(["virt-clone-cow", "-o", "b", "tree"]).unwrap();
        assert!(cli.clone.any_given(), "main refuses clone flags with a subcommand");
    }
}
