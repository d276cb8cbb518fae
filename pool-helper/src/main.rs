//! pool-helper: parses arguments, sets up logging, runs, maps errors to exit codes
//! (0 ok, 1 failed, 2 usage).
use clap::Parser;
use pool_helper::cli::{run, Cli, Command};

fn main() {
    let cli = Cli::parse();
    // The daemon logs at info by default: what it fetches, and for which domain's start.
    let serve = matches!(cli.cmd, Command::Serve(_));
    vcc_core::log::init(
        if serve { cli.global.verbose.max(1) } else { cli.global.verbose },
        &vcc_core::log::Setup {
            program: "pool-helper",
            levels: &["warn", "info,librqbit=warn", "debug", "trace"],
            // Until the release after next: RUST_LOG was pool-helper's variable.
            deprecated_env: Some("RUST_LOG"),
            targets: true,
        },
    );
    if let Err(e) = run(cli) {
        eprintln!("pool-helper: {}", vcc_core::error::one_line(&e));
        std::process::exit(1);
    }
}
