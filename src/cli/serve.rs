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
use goodtriever::server::http::HttpOptions;
use goodtriever::server::{
    default_concurrent_steps, AdminAuth, GrpcAddr, Limits, ServeOptions, Server, TextEncoder,
    TlsPem, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_ROWS,
};

use super::args::{ModelArgs, ModelFlags, RuleArgs, SearchArgs, StoreArgs};

/// Environment variable holding the admin token (an alternative to --admin-token-file).
const TOKEN_ENV: &str = "GOODTRIEVER_ADMIN_TOKEN";
/// Environment variable holding the HTTP API key (an alternative to --api-key-file).
const API_KEY_ENV: &str = "GOODTRIEVER_API_KEY";

/// Serve the control over gRPC (a decoding hook for any generation engine) and, with --model
/// and --http, an OpenAI-compatible HTTP API that generates with the model and the control.
///
/// Prints one line `listening grpc=ADDR metrics=ADDR` (and ` http=ADDR` with --http) on
/// stdout once it accepts requests. Writes (AddExamples, AddTexts) are disabled unless an
/// admin token is configured with --admin-token-file or the GOODTRIEVER_ADMIN_TOKEN
/// environment variable.
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
    /// Do not serve gRPC (only the HTTP API of --http).
    #[arg(long, requires = "http")]
    pub no_grpc: bool,
    /// Serve the OpenAI-compatible HTTP API on HOST:PORT with --model (default: the cached
    /// default model, `goodtriever model fetch`): POST
    /// /v1/completions and /v1/chat/completions (streaming with "stream": true), GET
    /// /v1/models, GET /health. The control is on with the server's stores; a request may
    /// override it in "goodtriever": {"alpha": ..., "mode": ..., "k": ..., "temperature": ...}
    /// ("alpha": 0 switches it off). Same bind and TLS rules as gRPC.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// File holding the key HTTP clients must send as `Authorization: Bearer KEY` (or the
    /// GOODTRIEVER_API_KEY environment variable); without either the HTTP API is open.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// The model name the HTTP API serves under (GET /v1/models; requests must name it).
    /// Default: the GGUF file's name without extension.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// HTTP requests that may wait for a place in the batch; one more is answered 429.
    #[arg(long, default_value_t = goodtriever::server::http::DEFAULT_QUEUE)]
    pub http_queue: usize,
    /// Rows the HTTP API decodes together (every choice of every request is a row).
    #[arg(long, default_value_t = goodtriever::server::http::DEFAULT_BATCH_ROWS)]
    pub http_batch_rows: usize,
    /// Largest HTTP request body, in bytes; a larger one is answered 413.
    #[arg(long, default_value_t = goodtriever::server::http::DEFAULT_MAX_BODY_BYTES)]
    pub http_max_body_bytes: usize,
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
        itself) and for the HTTP API (--http). Without it, AddTexts answers FAILED_PRECONDITION";
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

fn http_options(
    args: &ServeArgs,
    path: Option<&Path>,
    model: Arc<Model>,
) -> anyhow::Result<HttpOptions> {
    let api_key = match &args.api_key_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the API key file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var(API_KEY_ENV)
            .ok()
            .map(|k| k.trim().to_string()),
    };
    let model_name = match &args.served_model_name {
        Some(n) => n.clone(),
        None => path
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.config().name.clone()),
    };
    Ok(HttpOptions {
        model,
        model_name,
        api_key,
        queue: args.http_queue,
        max_batch_rows: args.http_batch_rows,
        max_body_bytes: args.http_max_body_bytes,
    })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let opts = args.rule.options()?;
    // Both stores, as the ensemble needs them (clap requires both): a request may pick any mode.
    let stores = args.stores.open(Mode::Ensemble)?;
    let detox = Detoxifier::new(stores, opts, args.search.params(), args.vocab_size)?;
    // The HTTP API needs a model: without --model it runs the default one.
    let model_path = match (&args.model.model, args.http) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(_)) => Some(args.model.path()?),
        (None, None) => None,
    };
    let model: Option<Arc<Model>> = match &model_path {
        Some(path) => {
            let model = Model::load(path, args.model.weights)
                .with_context(|| format!("loading the model {}", path.display()))?;
            Some(Arc::new(model))
        }
        None => None,
    };
    let encoder = model.clone().map(|m| m as Arc<dyn TextEncoder>);
    let http = match (args.http, &model) {
        (Some(addr), Some(model)) => Some((
            addr,
            http_options(&args, model_path.as_deref(), model.clone())?,
        )),
        _ => None,
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
        let detox = Arc::new(detox);
        let mut server = if args.no_grpc {
            Server::bind_without_grpc(detox, serve_opts, metrics_addr).await?
        } else {
            Server::bind(detox, serve_opts, &args.addr, metrics_addr).await?
        };
        if let Some((addr, opts)) = http {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the HTTP address {addr}"))?;
            server = server.with_http(listener, opts)?;
        }
        let grpc = server
            .grpc_endpoint()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into());
        let http = server
            .http_addr()
            .map(|a| format!(" http={a}"))
            .unwrap_or_default();
        let metrics = server
            .metrics_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into());
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening grpc={grpc} metrics={metrics}{http}")?;
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
