//! vcc-gen: writes the man pages and shell completions of `virt-clone-cow` and `pool-helper`,
//! generated from their clap definitions, into a directory laid out as the installed system:
//!
//! ```text
//! vcc-gen ROOT
//!   ROOT/usr/share/man/man1/{virt-clone-cow,pool-helper,pool-helper-SUBCOMMAND}.1
//!   ROOT/usr/share/bash-completion/completions/{virt-clone-cow,pool-helper}
//!   ROOT/usr/share/zsh/vendor-completions/_{virt-clone-cow,pool-helper}
//!   ROOT/usr/share/fish/vendor_completions.d/{virt-clone-cow,pool-helper}.fish
//! ```
//!
//! A separate program rather than a hidden subcommand: the shipped binaries carry no generator
//! code, and the pages come from exactly the `Cli` types the binaries parse with (pool-helper's
//! from its library, virt-clone-cow's `cli.rs` compiled in here as it is in its binary).
//! `packaging/build-deb` runs it; the hook's page, virt-clone-cow-hook(8), is written by hand
//! (`packaging/man/virt-clone-cow-hook.8`): libvirt, not a user, gives the hook its arguments.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

#[allow(dead_code)] // the binary's validation code, unused here
#[path = "../../../virt-clone-cow/src/cli.rs"]
mod vcc_cli;

#[derive(Debug, thiserror::Error)]
enum GenError {
    #[error("cannot write '{path}'")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Extra sections of a program's main page, in roff.
const VCC_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/libvirt/hooks/qemu.d/50\-virt\-clone\-cow\fR
The libvirt hook that makes a clone's overlays at its start; see \fBvirt\-clone\-cow\-hook\fR(8).
.SH ENVIRONMENT
.TP
\fBLIBVIRT_DEFAULT_URI\fR
The connection used without \fB\-\-connect\fR.
.TP
\fBVIRT_CLONE_COW_LOG\fR
Log filter (tracing EnvFilter syntax); overrides \fB\-v\fR.
.SH EXIT STATUS
0 done, 1 failed (one line on standard error says what and why), 2 usage.
.SH SEE ALSO
\fBpool\-helper\fR(1), \fBvirt\-clone\-cow\-hook\fR(8), \fBvirsh\fR(1), \fBvirt\-clone\fR(1)
"#;

const PH_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/pool\-helper/config.toml\fR
Settings, read when it exists and no \fB\-\-config\fR names another file; every key is in the
packaged file, commented out, with its default. Flags override it. A key pool\-helper does not
know is an error naming it.
.TP
\fI/var/lib/pool\-helper\fR
State: records of published and fetched masters, manifests, .torrent files. Masters themselves
live in libvirt storage pools.
.TP
\fI/run/pool\-helper/control.sock\fR
The daemon's control socket (the hook and the CLI use it).
.TP
\fI/lib/systemd/system/pool\-helper.service\fR
Runs \fBpool\-helper serve\fR (Type=notify). Pools outside /var/lib/libvirt need a drop\-in
adding them to ReadWritePaths=.
.SH ENVIRONMENT
.TP
\fBPOOL_HELPER_CONFIG\fR, \fBPOOL_HELPER_STATE_DIR\fR
As \fB\-\-config\fR and \fB\-\-state\-dir\fR.
.TP
\fBVIRT_CLONE_COW_LOG\fR
Log filter (tracing EnvFilter syntax); overrides \fB\-v\fR.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd: \fBserve\fR sends READY=1 there once it serves.
.SH EXIT STATUS
0 ok, 1 failed (one line on standard error says what and why), 2 usage.
.SH SEE ALSO
\fBvirt\-clone\-cow\fR(1), \fBvirt\-clone\-cow\-hook\fR(8), \fBpool\-helper\-serve\fR(1),
\fBpool\-helper\-fetch\fR(1), \fBpool\-helper\-publish\fR(1), \fBsystemctl\fR(1)
"#;

fn write(path: PathBuf, bytes: &[u8]) -> Result<(), GenError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, bytes))
        .map_err(|source| GenError::Write { path, source })
}

/// `cmd`'s page: clap_mangen's sections, then `extra` before the version.
fn page(cmd: &clap::Command, extra: &str) -> Vec<u8> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let _ = man.render_description_section(&mut out);
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        let _ = man.render_options_section(&mut out);
    }
    if cmd.has_subcommands() {
        let _ = man.render_subcommands_section(&mut out);
    }
    if cmd.get_after_long_help().or(cmd.get_after_help()).is_some() {
        let _ = man.render_extra_section(&mut out);
    }
    out.extend_from_slice(extra.as_bytes());
    let _ = man.render_version_section(&mut out);
    out
}

/// Everything, under `root`.
fn generate(root: &Path) -> Result<(), GenError> {
    let man1 = root.join("usr/share/man/man1");
    let programs = [(vcc_cli::Cli::command(), VCC_EXTRA), (pool_helper::cli::Cli::command(), PH_EXTRA)];
    for (cmd, extra) in programs {
        let mut cmd = cmd;
        cmd.build();
        let name = cmd.get_name().to_string();
        write(man1.join(format!("{name}.1")), &page(&cmd, extra))?;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let full = format!("{name}-{}", sub.get_name());
            let sub = sub
                .clone()
                .name(&full)
                .bin_name(format!("{name} {}", sub.get_name()))
                .version(env!("CARGO_PKG_VERSION"));
            let see = format!(".SH SEE ALSO\n\\fB{}\\fR(1)\n", name.replace('-', "\\-"));
            write(man1.join(format!("{full}.1")), &page(&sub, &see))?;
        }
        for (shell, path) in [
            (Shell::Bash, format!("usr/share/bash-completion/completions/{name}")),
            (Shell::Zsh, format!("usr/share/zsh/vendor-completions/_{name}")),
            (Shell::Fish, format!("usr/share/fish/vendor_completions.d/{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
            write(root.join(path), &out)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(root), None) = (args.next(), args.next()) else {
        eprintln!("usage: vcc-gen ROOT   (writes ROOT/usr/share/{{man,bash-completion,zsh,fish}}/...)");
        return ExitCode::from(2);
    };
    match generate(Path::new(&root)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vcc-gen: {}", vcc_core::error::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_come_from_the_clap_definitions() {
        let root = tempfile::tempdir().unwrap();
        generate(root.path()).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        let vcc = read("usr/share/man/man1/virt-clone-cow.1");
        assert!(vcc.contains(".TH virt-clone-cow 1") && vcc.contains("\\-\\-original"), "{vcc}");
        assert!(vcc.contains("virt\\-clone\\-cow\\-hook"), "the page points at the hook's");
        let ph = read("usr/share/man/man1/pool-helper.1");
        assert!(ph.contains("/etc/pool\\-helper/config.toml") && ph.contains("serve"), "{ph}");
        assert!(!ph.contains("listen\\-port <"), "the top page lists no BitTorrent flag");
        let serve = read("usr/share/man/man1/pool-helper-serve.1");
        assert!(serve.contains(".TH pool-helper-serve 1") && serve.contains("\\-\\-listen\\-port"), "{serve}");
        let bash = read("usr/share/bash-completion/completions/virt-clone-cow");
        assert!(bash.contains("--original") && bash.contains("complete -F"), "{bash}");
        assert!(read("usr/share/bash-completion/completions/pool-helper").contains("--listen-port"));
        assert!(read("usr/share/zsh/vendor-completions/_virt-clone-cow").contains("#compdef virt-clone-cow"));
        assert!(read("usr/share/fish/vendor_completions.d/pool-helper.fish").contains("complete -c pool-helper"));
    }
}
