//! Command-line front end. Each subcommand lives in its own module and only parses, calls the
//! library and prints; all behaviour worth testing is in the library.

use clap::{Parser, Subcommand};

pub mod adjust;
pub mod args;
pub mod datastore;
pub mod eval;
pub mod explain;
pub mod generate;
pub mod model;
pub mod serve;

/// Toxicity-controlled decoding for language models (Goodtriever): kNN datastores of hidden
/// states steer generation away from toxic continuations.
#[derive(Debug, Parser)]
#[command(
    name = "goodtriever",
    version,
    about,
    long_about = None,
    after_help = "Environment: GOODTRIEVER_SIMD=auto|avx512|avx2|scalar caps the CPU kernels \
                  (default auto: the widest the CPU has); GOODTRIEVER_HOME is where models are \
                  cached (default ~/.cache/goodtriever)."
)]
pub struct Cli {
    /// More log output (-v info, -vv debug). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, display_order = 1000)]
    pub verbose: u8,

    /// How logs are written to stderr: `text` for people, `json` (one object per line, with
    /// the event's fields) for log collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "GOODTRIEVER_LOG_FORMAT",
        display_order = 1001
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build, inspect, verify and search kNN datastores.
    Datastore(datastore::DatastoreArgs),
    /// Apply the control offline to dumped hidden states (and logits).
    Adjust(Box<adjust::AdjustArgs>),
    /// Get (`fetch`) and inspect (`info`) the language model.
    Model(model::ModelCmdArgs),
    /// Sample continuations from the model, optionally steered by the datastores.
    Generate(Box<generate::GenerateArgs>),
    /// Generate with the control and show, per token, which store rows moved which tokens.
    Explain(Box<explain::ExplainArgs>),
    /// Serve the control over gRPC (a decoding hook for any generation engine) and, with
    /// --http, an OpenAI-compatible API that generates with the model and the control.
    ///
    /// Prints one line `listening grpc=ADDR metrics=ADDR` (and ` http=ADDR` with --http) on
    /// stdout once it accepts requests. Writes (AddExamples, AddTexts) are disabled unless an
    /// admin token is configured with --admin-token-file or the GOODTRIEVER_ADMIN_TOKEN
    /// environment variable.
    Serve(Box<serve::ServeArgs>),
    /// Toxicity evaluation: sample many prompts base vs controlled, and conditional perplexity.
    Eval(eval::EvalArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_tracing(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // A cap on the kernels that names nothing, or more than the CPU has, is refused up front
    // rather than ignored with a warning deep in the first search.
    let simd = goodtriever::simd::from_env()?;
    tracing::debug!(kernels = %simd, "SIMD build");
    match cli.command {
        Command::Datastore(args) => datastore::run(args),
        Command::Adjust(args) => adjust::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Model(args) => model::run(args),
        Command::Generate(args) => generate::run(*args),
        Command::Explain(args) => explain::run(*args),
        Command::Eval(args) => eval::run(args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command's definition only when that subcommand is parsed; this checks all
    /// of them (ids that `mut_arg`, `requires` and `conflicts_with` name, duplicate flags).
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
