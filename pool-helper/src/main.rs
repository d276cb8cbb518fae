//! pool-helper: parses arguments, sets up logging, runs, maps errors to exit codes
//! (0 ok, 1 failed, 2 usage).
use clap::Parser;
use pool_helper::cli::{run, Cli};

fn main() {
    let cli = Cli::parse();
    let level = match cli.global.verbose {
        0 => "warn",
        1 => "info,librqbit=warn",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = run(cli) {
        eprintln!("pool-helper: {}", vcc_core::error::one_line(&e));
        std::process::exit(1);
    }
}
