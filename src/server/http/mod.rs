//! The OpenAI-compatible HTTP API: `goodtriever serve --model PATH --http ADDR`.
//!
//! `POST /v1/completions` and `POST /v1/chat/completions` (both also as server-sent events
//! with `"stream": true`), `GET /v1/models` and `GET /health`, on axum. The server runs the
//! model itself: requests become rows of one continuously batched decoding loop
//! (`scheduler`, on `crate::batch`) with the server's stores as the control, on by default and
//! overridable per request in `"goodtriever": {...}`, where `"explain"` also asks for each
//! token's explanation (docs/architecture.md §2, "One request through the HTTP API" and
//! "Explaining a step"). Errors have OpenAI's shape and status codes (`error`).
//!
//! Modules: `api` (request bodies and their checks), `chat` (the model's chat template),
//! `error` (OpenAI-style errors), `scheduler` (the batch's thread and the bounded queue),
//! `generation` (a request's events as text updates, and its metrics), `text` (incremental
//! detokenization and stop sequences), `respond` (the JSON and SSE answers), `tls` (HTTPS).

pub mod api;
pub mod chat;
pub mod error;
pub mod generation;
mod respond;
pub mod scheduler;
pub mod text;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::batch::BatchRequest;
use crate::detox::Detoxifier;
use crate::generate::{default_stop_tokens, SamplingParams};
use crate::model::Model;
use api::{check_top_logprobs, ChatRequest, Checked, CompletionRequest, Prompt};
use chat::ChatTemplate;
use error::ApiError;
use generation::Generation;
pub use scheduler::Scheduler;

use super::metrics::Metrics;
use super::TlsPem;

/// Default number of requests that may wait for rows before 429.
pub const DEFAULT_QUEUE: usize = 64;
/// Default most rows decoding at once.
pub const DEFAULT_BATCH_ROWS: usize = 32;
/// Default largest request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// How the HTTP API is served.
pub struct HttpOptions {
    /// The model the API generates with (its stores are the server's).
    pub model: Arc<Model>,
    /// The name clients put in `model` (GET /v1/models lists it).
    pub model_name: String,
    /// The API key clients must send as `Authorization: Bearer KEY`; `None`: open.
    pub api_key: Option<String>,
    /// Requests that may wait for rows; one more is answered 429.
    pub queue: usize,
    /// Rows (prompts × n over all requests) decoding at once.
    pub max_batch_rows: usize,
    /// Largest request body, in bytes; a larger one is answered 413.
    pub max_body_bytes: usize,
}

/// Why the HTTP API could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A limit is 0.
    #[error("{0} must be at least 1")]
    Limit(&'static str),
    /// The API key is empty or has whitespace.
    #[error("the API key is empty or contains whitespace or control characters")]
    BadKey,
    /// The model's chat template does not compile.
    #[error("the model's chat template (tokenizer.chat_template) does not compile: {0}")]
    Template(String),
    /// The TLS identity could not be used.
    #[error("TLS for the HTTP API: {0}")]
    Tls(String),
    /// The scheduler thread could not start.
    #[error("starting the decoding scheduler: {0}")]
    Thread(#[source] std::io::Error),
    /// The listener failed.
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

struct AppState {
    scheduler: Scheduler,
    model: Arc<Model>,
    detox: Arc<Detoxifier>,
    name: String,
    api_key: Option<String>,
    template: Option<ChatTemplate>,
    stop_tokens: Arc<[u32]>,
    metrics: Arc<Metrics>,
    max_body: usize,
    created: u64,
}

type Shared = Arc<AppState>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed for a request that gave none: different for every request, as OpenAI's are.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The HTTP API bound to its socket, ready to serve.
pub struct HttpServer {
    listener: TcpListener,
    opts: HttpOptions,
    tls: Option<tls::Acceptor>,
}

impl HttpServer {
    /// Checks `opts` and the TLS identity (when given) against `listener`.
    pub fn new(
        listener: TcpListener,
        opts: HttpOptions,
        tls: Option<&TlsPem>,
    ) -> Result<Self, HttpError> {
        if opts.queue == 0 {
            return Err(HttpError::Limit("--http-queue"));
        }
        if opts.max_batch_rows == 0 {
            return Err(HttpError::Limit("--http-batch-rows"));
        }
        if opts.max_body_bytes == 0 {
            return Err(HttpError::Limit("--http-max-body-bytes"));
        }
        if let Some(k) = &opts.api_key {
            if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(HttpError::BadKey);
            }
        }
        if let Some(src) = opts.model.chat_template() {
            ChatTemplate::new(src, String::new(), String::new())
                .map_err(|e| HttpError::Template(e.to_string()))?;
        }
        let tls = tls.map(tls::Acceptor::new).transpose()?;
        Ok(Self {
            listener,
            opts,
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves until `stop` turns true, then lets open requests finish.
    pub async fn run(
        self,
        detox: Arc<Detoxifier>,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), HttpError> {
        let o = self.opts;
        let (scheduler, _thread) = Scheduler::start(
            o.model.clone(),
            detox.clone(),
            o.queue,
            o.max_batch_rows,
            metrics.clone(),
        )
        .map_err(HttpError::Thread)?;
        let tok = o.model.tokenizer();
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tok.decode(&[i], false).ok())
                .unwrap_or_default()
        };
        let template = match o.model.chat_template() {
            Some(src) => Some(
                ChatTemplate::new(
                    src,
                    token_text(tok.bos_token_id()),
                    token_text(tok.eos_token_id()),
                )
                .map_err(|e| HttpError::Template(e.to_string()))?,
            ),
            None => None,
        };
        let state = Arc::new(AppState {
            scheduler,
            stop_tokens: default_stop_tokens(&o.model).into(),
            model: o.model,
            detox,
            name: o.model_name,
            api_key: o.api_key,
            template,
            metrics,
            max_body: o.max_body_bytes,
            created: now_secs(),
        });
        let app = router(state, o.max_body_bytes);
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let addr = self.listener.local_addr().ok();
        tracing::info!(?addr, tls = self.tls.is_some(), "HTTP API listening");
        use axum::serve::ListenerExt;
        let result = match self.tls {
            None => {
                let l = self.listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(l, app).with_graceful_shutdown(shutdown).await
            }
            Some(acceptor) => {
                let l = acceptor.listen(self.listener);
                axum::serve(l, app).with_graceful_shutdown(shutdown).await
            }
        };
        result.map_err(HttpError::Serve)
    }
}

fn router(state: Shared, max_body: usize) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::no_route(uri.path())
}

async fn health() -> impl IntoResponse {
    (StatusCode::OK, "ok")
}

fn check_key(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &st.api_key else {
        return Ok(());
    };
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if super::auth::constant_time_eq(p.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::unauthorized(
            "Incorrect API key provided: the key in 'Authorization: Bearer <key>' does not match the server's",
        )),
        None => Err(ApiError::unauthorized(
            "You didn't provide an API key: send 'Authorization: Bearer <key>' (the key of --api-key-file or GOODTRIEVER_API_KEY)",
        )),
    }
}

async fn models(State(st): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&st, &headers) {
        st.metrics.http_request("models", e.outcome());
        return e.into_response();
    }
    st.metrics.http_request("models", "ok");
    let body = serde_json::json!({
        "object": "list",
        "data": [{
            "id": st.name,
            "object": "model",
            "created": st.created,
            "owned_by": "goodtriever",
        }],
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The body as JSON of type `T`, with OpenAI's errors for a body too large or malformed.
fn parse<T: serde::de::DeserializeOwned>(
    st: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(st.max_body)
        } else {
            ApiError::invalid(None, format!("could not read the request body: {r}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })
}

/// What both endpoints turn a request into before queueing it.
struct Plan {
    prompts: Vec<Vec<u32>>,
    checked: Checked,
    top_logprobs: Option<usize>,
}

impl AppState {
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let ids =
            self.model.tokenizer().encode(text).map_err(|e| {
                ApiError::invalid(Some("prompt"), format!("tokenizing failed: {e}"))
            })?;
        Ok(ids)
    }

    fn batch_requests(&self, plan: &Plan) -> Result<Vec<BatchRequest>, ApiError> {
        let ctx = self.model.config().context_length;
        let vocab = self.model.config().vocab_size;
        let c = &plan.checked;
        let rows = plan.prompts.len() * c.n;
        if rows > self.scheduler.max_rows() {
            return Err(ApiError::invalid(
                Some("n"),
                format!(
                    "{} prompts × n = {rows} rows, more than this server decodes at once ({}, --http-batch-rows)",
                    plan.prompts.len(),
                    self.scheduler.max_rows()
                ),
            ));
        }
        let mut out = Vec::with_capacity(plan.prompts.len());
        for p in &plan.prompts {
            if p.is_empty() {
                return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
            }
            if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            let max_new = match c.max_tokens {
                Some(m) => m,
                None => ctx.saturating_sub(p.len()).max(1),
            };
            if p.len() + max_new > ctx {
                return Err(ApiError {
                    param: Some("max_tokens".into()),
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid(
                        None,
                        format!(
                            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in your prompt; {max_new} for the completion). Please reduce your prompt or completion length.",
                            p.len() + max_new,
                            p.len()
                        ),
                    )
                });
            }
            out.push(BatchRequest {
                id: 0,
                prompt: p.clone(),
                params: SamplingParams {
                    num_samples: c.n,
                    max_new_tokens: max_new,
                    temperature: c.temperature,
                    top_p: c.top_p,
                    top_k: c.top_k,
                    seed: c.seed,
                },
                control: c.control,
                top_logprobs: plan.top_logprobs,
                explain: c.explain,
            });
        }
        Ok(out)
    }

    fn start(
        self: &Arc<Self>,
        plan: &Plan,
        endpoint: &'static str,
        started: Instant,
    ) -> Result<Generation, ApiError> {
        let reqs = self.batch_requests(plan)?;
        let ticket = self.scheduler.submit(reqs)?;
        Ok(Generation::new(
            ticket,
            self.model.clone(),
            self.metrics.clone(),
            endpoint,
            plan.checked.n,
            plan.checked.stop.clone(),
            self.stop_tokens.clone(),
            plan.prompts.iter().map(Vec::len).sum(),
            started,
        ))
    }
}

async fn completions(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        check_key(&st, &headers)?;
        let req: CompletionRequest = parse(&st, body)?;
        let top_logprobs = check_top_logprobs("logprobs", req.logprobs)?;
        let checked = req.common.check(&st.name, None, fresh_seed(), &st.detox)?;
        let prompts = match req.prompt {
            None => {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    "you must provide a prompt",
                ))
            }
            Some(Prompt::Text(t)) => vec![st.tokenize(&t)?],
            Some(Prompt::Texts(ts)) => ts
                .iter()
                .map(|t| st.tokenize(t))
                .collect::<Result<_, _>>()?,
            Some(Prompt::Tokens(ids)) => vec![ids],
            Some(Prompt::TokenLists(lists)) => lists,
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid(
                Some("prompt"),
                "the prompt list is empty",
            ));
        }
        let plan = Plan {
            prompts,
            checked,
            top_logprobs,
        };
        let generation = st.start(&plan, "completions", started)?;
        Ok((plan, generation))
    }
    .await;
    answer(&st, respond::Kind::Completion, "completions", result).await
}

async fn chat_completions(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = async {
        check_key(&st, &headers)?;
        let req: ChatRequest = parse(&st, body)?;
        let top_logprobs = match (req.logprobs, check_top_logprobs("top_logprobs", req.top_logprobs)?) {
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    "top_logprobs needs logprobs: true",
                ))
            }
            (false, None) => None,
            (true, k) => Some(k.unwrap_or(0)),
        };
        let checked =
            req.common
                .check(&st.name, req.max_completion_tokens, fresh_seed(), &st.detox)?;
        let messages = match req.messages {
            Some(m) if !m.is_empty() => m,
            _ => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "messages must be a non-empty list of {\"role\", \"content\"} objects",
                ))
            }
        };
        let Some(template) = &st.template else {
            return Err(ApiError::invalid(
                Some("messages"),
                format!(
                    "the model `{}` has no chat template (GGUF tokenizer.chat_template); use /v1/completions",
                    st.name
                ),
            ));
        };
        let text = template.render(&messages)?;
        let plan = Plan {
            prompts: vec![st.tokenize(&text)?],
            checked,
            top_logprobs,
        };
        let generation = st.start(&plan, "chat", started)?;
        Ok((plan, generation))
    }
    .await;
    answer(&st, respond::Kind::Chat, "chat", result).await
}

/// The answer of a checked and started request, or its error (counted under `endpoint`: a
/// request refused before it started has no generation to record its outcome).
async fn answer(
    st: &Shared,
    kind: respond::Kind,
    endpoint: &'static str,
    result: Result<(Plan, Generation), ApiError>,
) -> Response {
    match result {
        Ok((plan, generation)) => respond::answer(st, kind, plan.checked, generation).await,
        Err(e) => {
            st.metrics.http_request(endpoint, e.outcome());
            e.into_response()
        }
    }
}
