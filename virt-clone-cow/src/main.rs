//! virt-clone-cow: parse arguments, set up logging, run, map errors to exit codes
//! (0 done, 1 failed, 2 usage).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cli;
mod output;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use vcc_libvirt::Libvirt;
use virt_clone_cow::cmd::{clone::clone_domain, tree::build_tree};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
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
    match cli.command {
        Some(Command::Tree) if cli.clone.any_given() => {
            Err(Failure::Usage("clone flags (--original, --name, ...) cannot be used with `tree`".into()))
        }
        Some(Command::Tree) => {
            let lv = Libvirt::open(cli.connect.as_deref())?;
            let tree = build_tree(&lv)?;
            output::print(cli.json, &tree, || tree.render())
        }
        None => {
            let req = cli.clone.to_request().map_err(Failure::Usage)?;
            let lv = Libvirt::open(cli.connect.as_deref())?;
            // Ctrl-C or a kill during the run undoes it instead of leaving half the clones.
            virt_clone_cow::apply::catch_interrupts();
            let report = clone_domain(&lv, &req)?;
            output::print(cli.json, &report, || output::render_clone_report(&report))
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VIRT_CLONE_COW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
