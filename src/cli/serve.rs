//! `goodtriever serve`: parses the flags, opens the stores (and the model), starts the gRPC
//! server from the library and stops it on SIGTERM/SIGINT. Everything else is in
//! `goodtriever::server`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use goodtriever::datastore::MergePolicy;
use goodtriever::detox::Detoxifier;
use goodtriever::model::{Model, WeightFormat};
use goodtriever::rule::Mode;
use goodtriever::server::{
    default_concurrent_steps, AdminAuth, GrpcAddr, Limits, ServeOptions, Server, TextEncoder,
    TlsPem, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_ROWS,
};

use super::args::{ModelArgs, ModelFlags, RuleArgs, SearchArgs, StoreArgs};

/// Environment variable holding the admin token (an alternative to --admin-token-file).
const TOKEN_ENV: &str = "GOODTRIEVER_ADMIN_TOKEN";

/// Serve the control over gRPC: a decoding hook for any generation engine.
///
/// Prints one line `listening grpc=ADDR metrics=ADDR` on stdout once it accepts requests.
/// Writes (AddExamples, AddTexts) are disabled unless an admin token is configured with
/// --admin-token-file or the GOODTRIEVER_ADMIN_TOKEN environment variable.
#[derive(Debug, Args)]
// Both stores are required, whatever --mode says: each request may ask for another mode.
#[command(
    mut_arg("toxic", |a| a.required(true)),
    mut_arg("nontoxic", |a| a.required(true))
)]
pub struct ServeArgs {
    #[command(flatten)]
    pub stores: StoreArgs,
    /// gRPC address: HOST:PORT, or unix:PATH for a Unix domain socket (a sidecar on the same
    /// host: no TCP stack per message, access set by the file's permissions). Loopback by
    /// default; a non-loopback TCP address needs TLS (or --allow-plaintext).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: GrpcAddr,
    /// Prometheus metrics address (plain HTTP, GET /metrics).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_addr: SocketAddr,
    /// Do not serve metrics.
    #[arg(long)]
    pub no_metrics: bool,
    #[command(flatten)]
    pub model: ModelArgs<ServeModel>,
    /// File holding the admin token that write RPCs must carry as `authorization: Bearer`.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Merge the small segments that AddExamples/AddTexts write once this many of one size
    /// level sit at the end of a store (0: never merge while serving). Levels: below
    /// --merge-base-rows rows, then each level this many times larger.
    #[arg(long, default_value_t = MergePolicy::default().min_segments)]
    pub merge_segments: usize,
    /// Segments below this many rows are the smallest merge level.
    #[arg(long, default_value_t = MergePolicy::default().base_rows)]
    pub merge_base_rows: usize,
    /// Serve plain-text gRPC on a non-loopback address. Without it such an address needs
    /// --tls-cert and --tls-key: hidden states and the admin token would cross the network in
    /// clear. Only for a network you trust.
    #[arg(long)]
    pub allow_plaintext: bool,
    /// TLS certificate chain (PEM). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM). Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Rows accepted per Adjust request or stream message.
    #[arg(long, default_value_t = DEFAULT_MAX_ROWS)]
    pub max_rows: usize,
    /// Largest request message, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Vocabulary size, for stores imported without one.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Adjust steps computed at once (default: one per core). Steps that arrive while all are
    /// busy wait and are merged into shared searches. Lower it to leave cores to a generation
    /// server on the same host.
    #[arg(long)]
    pub concurrent_steps: Option<usize>,
    /// Seconds open connections may take to finish after SIGTERM before the server exits.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    #[command(flatten)]
    pub rule: RuleArgs,
    #[command(flatten)]
    pub search: SearchArgs,
}

/// The server only loads a model it is given (for AddTexts, which extracts keys in batches);
/// it never falls back to the default model.
#[derive(Debug)]
pub enum ServeModel {}

impl ModelFlags for ServeModel {
    const MODEL_HELP: &'static str = "A GGUF model for AddTexts (the server computes keys \
        itself). Without it, AddTexts answers FAILED_PRECONDITION";
    const WEIGHTS_HELP: &'static str =
        "How the model's weights are held: f32 (fastest batched extraction), q8_0 or native";
    const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::F32;
}

fn admin_auth(file: Option<&Path>) -> anyhow::Result<AdminAuth> {
    let token = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the admin token file {}", f.display()))?,
        ),
        None => std::env::var(TOKEN_ENV).ok(),
    };
    match token {
        Some(t) => AdminAuth::with_token(&t).context("the admin token"),
        None => Ok(AdminAuth::disabled()),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let opts = args.rule.options()?;
    // Both stores, as the ensemble needs them (clap requires both): a request may pick any mode.
    let stores = args.stores.open(Mode::Ensemble)?;
    let detox = Detoxifier::new(stores, opts, args.search.params(), args.vocab_size)?;
    let encoder: Option<Arc<dyn TextEncoder>> = match &args.model.model {
        Some(path) => {
            let model = Model::load(path, args.model.weights)
                .with_context(|| format!("loading the model {}", path.display()))?;
            Some(Arc::new(model))
        }
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(TlsPem {
            cert: std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            key: std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
        }),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let serve_opts = ServeOptions {
        limits: Limits {
            max_rows: args.max_rows,
            max_message_bytes: args.max_message_bytes,
        },
        auth: admin_auth(args.admin_token_file.as_deref())?,
        encoder,
        tls,
        allow_plaintext_remote: args.allow_plaintext,
        merge: (args.merge_segments >= 2).then(|| MergePolicy {
            min_segments: args.merge_segments,
            base_rows: args.merge_base_rows.max(1),
            ..MergePolicy::default()
        }),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        concurrent_steps: args
            .concurrent_steps
            .unwrap_or_else(default_concurrent_steps),
    };
    let metrics_addr = (!args.no_metrics).then_some(args.metrics_addr);

    // Steps compute on their worker, `concurrent_steps` at once (`Shared::adjust_step`): one
    // more worker keeps accepting and moving messages meanwhile.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(serve_opts.concurrent_steps + 1)
        .enable_all()
        .thread_name("goodtriever-serve")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(Arc::new(detox), serve_opts, &args.addr, metrics_addr).await?;
        let grpc = server
            .grpc_endpoint()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let metrics = server
            .metrics_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into());
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening grpc={grpc} metrics={metrics}")?;
        out.flush()?;
        drop(out);
        server.run(shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
