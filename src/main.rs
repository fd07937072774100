//! The `goodtriever` command: parses arguments, calls the library, prints. Nothing else.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let format = args.log_format;
    cli::init_tracing(args.verbose, format);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            match format {
                cli::LogFormat::Text => eprintln!("error: {err:#}"),
                // A log collector reads stderr line by line as JSON: the last words too.
                cli::LogFormat::Json => tracing::error!(error = %format!("{err:#}"), "exiting"),
            }
            ExitCode::FAILURE
        }
    }
}
