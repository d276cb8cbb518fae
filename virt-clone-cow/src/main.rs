//! virt-clone-cow: parse arguments, set up logging, run, map errors to exit codes
//! (0 done, 1 failed, 2 usage).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cli;
mod output;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use vcc_libvirt::Libvirt;
use virt_clone_cow::cmd::flatten::{flatten, FlattenRequest};
use virt_clone_cow::cmd::gc::{gc, GcArgs};
use virt_clone_cow::cmd::publish::{publish_template, PublishLimits, PublishRequestArgs};
use virt_clone_cow::cmd::{clone::clone_domain, tree::build_tree};

fn main() -> ExitCode {
    let cli = Cli::parse();
    vcc_core::log::init(
        cli.verbose,
        &vcc_core::log::Setup {
            program: "virt-clone-cow",
            levels: &["warn", "info", "debug"],
            deprecated_env: None,
            targets: false,
        },
    );
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("virt-clone-cow: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Error(e)) => {
            eprintln!("virt-clone-cow: error: {}", vcc_core::error::one_line(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Error(Box<dyn std::error::Error>),
}

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Error(Box::new(e))
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Some(_) if cli.clone.any_given() => {
            Err(Failure::Usage("clone flags (--original, --name, ...) cannot be used with a subcommand".into()))
        }
        Some(Command::Tree) => {
            let lv = Libvirt::open(cli.connect.as_deref())?;
            let tree = build_tree(&lv)?;
            output::print(cli.json, &tree, || tree.render())
        }
        Some(Command::Publish { template, control_socket, compress }) => {
            let lv = Libvirt::open(cli.connect.as_deref())?;
            let req = PublishRequestArgs {
                template: template.clone(),
                control_socket: control_socket.clone(),
                limits: PublishLimits::default(),
                compress: *compress,
            };
            let report = publish_template(&lv, &req)?;
            output::print(cli.json, &report, || report.render())
        }
        Some(Command::Flatten { clone, disks, timeout }) => {
            let lv = Libvirt::open(cli.connect.as_deref())?;
            let req = FlattenRequest {
                clone: clone.clone(),
                disks: disks.clone(),
                timeout: std::time::Duration::from_secs(*timeout),
            };
            let report = flatten(&lv, &req)?;
            output::print(cli.json, &report, || report.render())
        }
        Some(Command::Gc { yes, masters, pool, control_socket }) => {
            let lv = Libvirt::open(cli.connect.as_deref())?;
            let args = GcArgs {
                yes: *yes,
                masters: masters.clone(),
                pool: pool.clone(),
                control_socket: control_socket.clone(),
            };
            let report = gc(&lv, &args)?;
            output::print(cli.json, &report, || report.render())
        }
        None => {
            if let Some(req) = cli.clone.to_multi_request().map_err(Failure::Usage)? {
                let src = Libvirt::open(cli.connect.as_deref())?;
                let hosts = virt_clone_cow::multi::connect_hosts(&req.hosts)?;
                virt_clone_cow::apply::catch_interrupts();
                let report = virt_clone_cow::multi::clone_to_hosts(&src, &hosts, &req)?;
                return output::print(cli.json, &report, || report.render());
            }
            let req = cli.clone.to_request().map_err(Failure::Usage)?;
            let lv = Libvirt::open(cli.connect.as_deref())?;
            // Ctrl-C or a kill during the run undoes it instead of leaving half the clones.
            virt_clone_cow::apply::catch_interrupts();
            let report = clone_domain(&lv, &req)?;
            output::print(cli.json, &report, || output::render_clone_report(&report))
        }
    }
}
