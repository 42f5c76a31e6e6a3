//! Entry point (main thread): parse the command line, start logging, run, report the error chain.

use std::process::ExitCode;

use clap::Parser;
use kubelet_device_plugins::{cli::Cli, error_chain, init_logging, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
