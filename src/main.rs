//! The `goodtriever` command: parses arguments, calls the library, prints. Nothing else.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if !matches!(args.command, cli::Command::Serve(_)) {
        quit_quietly_on_closed_pipe();
    }
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

/// Rust ignores SIGPIPE, so printing into a closed pipe (`goodtriever datastore info S | head
/// -1`) is an error that `println!` turns into a panic with a backtrace. A command that prints
/// and is read by a pipe should instead stop quietly when the reader goes away, as `cat` does:
/// restore the default action. Not for `serve`, whose sockets must see a closed connection as an
/// error to handle rather than a signal that ends the server.
fn quit_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called once at start-up, before any thread exists; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
