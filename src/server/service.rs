//! The `goodtriever.v1.Goodtriever` service: request checks, the engine call, the answer.
//!
//! Every CPU-bound step of a request (decoding the packed tensors, searching, the rule, encoding
//! the answer) runs on the worker thread that received it, at most `concurrent_steps` at once
//! (one per core by default; see `Shared::adjust_step`); `goodtriever serve` starts one more
//! worker than that, so one always keeps accepting and moving other clients' messages. Steps
//! that find every slot busy wait in a queue and are merged into one engine call (`merge`). A
//! stream's steps are computed as its response stream is polled (`StepStream`). Appends, which
//! fsync, run on tokio's blocking pool instead. Per-request buffers come from a pool of
//! `Buffers`, so a steady stream of steps reuses the same allocations.

use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use half::f16;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{oneshot, watch, Semaphore, SemaphorePermit};
use tonic::{Code, Request, Response, Status, Streaming};

use super::auth::AdminAuth;
use super::convert::{self, Finite, WireDType};
use super::encoder::{EncodeError, TextEncoder};
use super::merge::{WaitQueue, Waiting};
use super::metrics::{Method, Metrics, Phase};
use super::proto::{self, goodtriever_server::Goodtriever};
use super::status;
use super::step_stream::StepStream;
use crate::datastore::{Keys, Provenance};
use crate::detox::{AdjustOptions, DetoxError, DetoxScratch, Detoxifier};
use crate::rule::{Mode, SparseRow, MAX_K};

/// Limits a server enforces on each request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Rows per Adjust request or stream message.
    pub max_rows: usize,
    /// Largest encoded request message, in bytes.
    pub max_message_bytes: usize,
}

/// Reusable per-request memory.
#[derive(Default)]
pub(super) struct Buffers {
    scratch: DetoxScratch,
    pub(super) hidden: Vec<f32>,
    pub(super) logits: Vec<f32>,
    dense: Vec<f32>,
    sparse: Vec<SparseRow>,
    /// The answers' bytes. Each answer's pieces are split off this buffer and share its
    /// allocation; by the time these buffers are taken from the pool again tonic has usually
    /// encoded that answer and dropped it, and the next `reserve` then takes the allocation
    /// back in place. Pieces a message still holds are left to it, and a new one is started.
    wire: BytesMut,
    /// The waiting steps a merged batch answers, and one group of them (see `merge`).
    pub(super) batch: Vec<Waiting>,
    pub(super) group: Vec<usize>,
}

impl Buffers {
    /// Values `values` of the dense answer (`self.dense`) as packed little-endian bytes.
    fn dense_proto(&mut self, values: Range<usize>) -> Bytes {
        convert::put_f32_bytes(&self.dense[values], &mut self.wire);
        self.wire.split().freeze()
    }

    /// Rows `rows` of the sparse answer (`self.sparse`), see
    /// [`convert::sparse_row_into_proto`].
    fn sparse_rows_proto(&mut self, rows: Range<usize>) -> Vec<proto::SparseRow> {
        let rows = &self.sparse[rows];
        // All rows' bytes at once: one reclaim (or allocation) for the whole answer.
        let bytes = rows.iter().map(|r| r.pairs().len() * 8).sum();
        self.wire.reserve(bytes);
        rows.iter()
            .map(|row| convert::sparse_row_into_proto(row, &mut self.wire))
            .collect()
    }
}

/// What a checked Adjust step asks for; its tensors stay in the request until decoded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub opts: AdjustOptions,
    pub hidden: convert::Shape,
    /// The logits' shape when the dense form was asked for.
    pub logits: Option<convert::Shape>,
}

impl Plan {
    pub fn rows(&self) -> usize {
        self.hidden.rows
    }

    /// Whether two steps can share one engine call: the same options and form.
    pub fn merges_with(&self, other: &Plan) -> bool {
        self.opts == other.opts && self.logits.is_some() == other.logits.is_some()
    }
}

/// State shared by all handlers.
pub struct Shared {
    pub engine: Arc<Detoxifier>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub auth: AdminAuth,
    pub encoder: Option<Arc<dyn TextEncoder>>,
    /// Turns true when the server starts shutting down; open streams end after their step.
    pub shutdown: watch::Receiver<bool>,
    pool: Mutex<Vec<Buffers>>,
    /// How many steps compute at once (`ServeOptions::concurrent_steps`).
    pub(super) cpu: Semaphore,
    /// Steps that found every core busy, to be merged (see `merge`).
    pub(super) waiting: WaitQueue,
}

impl Shared {
    pub fn new(
        engine: Arc<Detoxifier>,
        metrics: Arc<Metrics>,
        limits: Limits,
        auth: AdminAuth,
        encoder: Option<Arc<dyn TextEncoder>>,
        shutdown: watch::Receiver<bool>,
        concurrent_steps: usize,
    ) -> Self {
        let shared = Self {
            engine,
            metrics,
            limits,
            auth,
            encoder,
            shutdown,
            pool: Mutex::new(Vec::new()),
            waiting: WaitQueue::default(),
            cpu: Semaphore::new(concurrent_steps.max(1)),
        };
        shared.update_store_metrics();
        shared
    }

    /// One Adjust step, computed on the worker thread that holds it when a core is free.
    ///
    /// Inline on a multi-threaded runtime, no thread hand-off sits on the step's path.
    /// (`block_in_place` was tried first: it hands the worker's queue to a blocking-pool
    /// thread on every call, and measured ~50 µs more gRPC overhead per step on 2 cores:
    /// 244–250 µs against 172–205 µs at p50, with no throughput change at 8 streams.) Tokio's
    /// other workers steal the queued tasks of a worker that computes; a semaphore with one
    /// permit per concurrent step (one per core by default) bounds how many compute at once,
    /// and a step that finds every permit taken waits asynchronously, merged with the other
    /// waiting steps (see `merge`).
    pub(super) async fn adjust_step(
        self: &Arc<Self>,
        req: proto::AdjustRequest,
    ) -> Result<proto::AdjustResponse, Status> {
        let inline = Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread;
        if let Some(_permit) = self.try_cpu_permit(inline) {
            return self.adjust(req);
        }
        self.adjust_queued(req).await
    }

    /// A CPU permit if one is free now, for a caller that may compute `inline`: a
    /// current-thread runtime must not block, so its steps always go through the queue, whose
    /// leader computes on the rayon pool.
    pub(super) fn try_cpu_permit(&self, inline: bool) -> Option<SemaphorePermit<'_>> {
        inline.then(|| self.cpu.try_acquire().ok()).flatten()
    }

    /// Records a finished request in the metrics (and refusals in the debug log).
    pub(super) fn finished<T>(&self, method: Method, t: Instant, r: &Result<T, Status>) {
        let code = r.as_ref().err().map(Status::code);
        if let Some(c) = code {
            if c != Code::Internal {
                tracing::debug!(method = method.name(), code = ?c, message = %r.as_ref().err().map(|s| s.message()).unwrap_or(""), "request refused");
            }
        }
        self.metrics.finished(method, t.elapsed(), code);
    }

    pub(super) fn take_buffers(&self) -> Buffers {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    pub(super) fn return_buffers(&self, b: Buffers) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        // Enough for every thread that can run a request at once; more would only hold memory.
        if pool.len() < 2 * rayon::current_num_threads() + 2 {
            pool.push(b);
        }
    }

    fn update_store_metrics(&self) {
        for s in self.engine.stores() {
            let live = s.store.segments().iter().filter(|i| !i.retired).count();
            self.metrics.store_size(&s.name, s.store.len(), live);
        }
    }

    /// The server's defaults with the request's overrides, validated.
    fn options(&self, o: Option<&proto::Overrides>) -> Result<AdjustOptions, Status> {
        let mut opts = *self.engine.defaults();
        if let Some(o) = o {
            if let Some(a) = o.alpha {
                opts.params.alpha = a;
            }
            if let Some(t) = o.temperature {
                opts.params.temperature = t;
            }
            if let Some(k) = o.k {
                opts.params.k = k as usize;
            }
            if let Some(p) = o.filter_p {
                opts.params.filter_p = p;
            }
            if let Some(l) = o.lambda {
                opts.params.lambda = l;
            }
            opts.mode = match proto::Mode::try_from(o.mode) {
                Ok(proto::Mode::Unspecified) => opts.mode,
                Ok(proto::Mode::Ensemble) => Mode::Ensemble,
                Ok(proto::Mode::ToxicOnly) => Mode::ToxicOnly,
                Ok(proto::Mode::KnnLm) => Mode::KnnLm,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "overrides.mode: unknown value {}; use ENSEMBLE, TOXIC_ONLY or KNN_LM",
                        o.mode
                    )))
                }
            };
        }
        opts.params
            .validate()
            .map_err(|e| Status::invalid_argument(format!("overrides: {e}")))?;
        self.engine
            .check_mode(opts.mode)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(opts)
    }

    fn store_info(&self, index: usize) -> proto::StoreInfo {
        let s = &self.engine.stores()[index];
        proto::StoreInfo {
            name: s.name.clone(),
            weight: s.weight,
            rows: s.store.len() as u64,
            key_dtype: s.store.dtype().as_str().to_string(),
            segments: s
                .store
                .segments()
                .into_iter()
                .filter(|i| !i.retired)
                .map(|i| proto::SegmentInfo {
                    id: i.id,
                    rows: i.rows as u64,
                    source: i.provenance.source,
                    label: i.provenance.label.unwrap_or_default(),
                    tag: i.provenance.tag.unwrap_or_default(),
                    added_at: i.provenance.added_at,
                })
                .collect(),
        }
    }

    fn store_index(&self, name: &str) -> Result<usize, Status> {
        let stores = self.engine.stores();
        stores.iter().position(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = stores.iter().map(|s| s.name.as_str()).collect();
            Status::invalid_argument(format!(
                "unknown store {name:?}: this server has {}",
                names.join(", ")
            ))
        })
    }

    /// The request's checks (options, form, tensor shapes) before anything is converted:
    /// what it asks for.
    pub(super) fn check(&self, req: &proto::AdjustRequest) -> Result<Plan, Status> {
        let opts = self.options(req.overrides.as_ref())?;
        let dense = match proto::ResponseForm::try_from(req.form) {
            Ok(proto::ResponseForm::Unspecified) => req.logits.is_some(),
            Ok(proto::ResponseForm::Sparse) => {
                if req.logits.is_some() {
                    return Err(Status::invalid_argument(
                        "logits were sent with form = SPARSE, which does not use them: omit the logits, or ask for form = DENSE",
                    ));
                }
                false
            }
            Ok(proto::ResponseForm::Dense) => true,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "form: unknown value {}; use SPARSE or DENSE",
                    req.form
                )))
            }
        };
        let engine = &self.engine;
        let (dim, vocab, max_rows) = (engine.dim(), engine.vocab_size(), self.limits.max_rows);
        let hidden = req.hidden.as_ref().ok_or_else(|| {
            Status::invalid_argument(format!(
                "hidden is missing: send the {} key hidden states, {dim} values per row",
                engine.key_type()
            ))
        })?;
        let hs = convert::check_shape(
            "hidden",
            hidden,
            dim,
            &[WireDType::F32, WireDType::F16],
            max_rows,
        )
        .map_err(status::from_convert)?;
        let logits = if dense {
            let logits = req.logits.as_ref().ok_or_else(|| {
                Status::invalid_argument(format!(
                    "form = DENSE needs logits ({vocab} values per row); send them, or ask for form = SPARSE"
                ))
            })?;
            let ls = convert::check_shape(
                "logits",
                logits,
                vocab,
                &[WireDType::F32, WireDType::F16, WireDType::Bf16],
                max_rows,
            )
            .map_err(status::from_convert)?;
            if ls.rows != hs.rows {
                return Err(Status::invalid_argument(format!(
                    "hidden has {} rows but logits have {}: send one logits row per hidden row",
                    hs.rows, ls.rows
                )));
            }
            Some(ls)
        } else {
            None
        };
        Ok(Plan {
            opts,
            hidden: hs,
            logits,
        })
    }

    /// One Adjust step (a unary request or a stream message), start to finish, on the calling
    /// thread.
    ///
    /// Buffers come from the pool for the step rather than belonging to a stream: a stream
    /// spends most of its life waiting for the client's next forward pass, and a set of
    /// buffers (vocabulary-sized scratch) per open stream would hold about a megabyte each.
    pub(super) fn adjust(
        &self,
        req: proto::AdjustRequest,
    ) -> Result<proto::AdjustResponse, Status> {
        let t0 = Instant::now();
        let plan = self.check(&req)?;
        // Taken only once the request has passed its checks.
        let mut b = self.take_buffers();
        let result = self.adjust_with(&req, &plan, &mut b, t0);
        self.return_buffers(b);
        result
    }

    /// A checked step computed alone.
    pub(super) fn adjust_with(
        &self,
        req: &proto::AdjustRequest,
        plan: &Plan,
        b: &mut Buffers,
        t0: Instant,
    ) -> Result<proto::AdjustResponse, Status> {
        b.hidden.clear();
        b.logits.clear();
        self.decode(req, plan, b)?;
        self.metrics.phase(Phase::Decode, t0.elapsed());
        let engine_time = self.engine_call(plan, b).map_err(status::from_detox)?;
        self.metrics.merged(1);
        let t2 = Instant::now();
        let resp = self.response(req, plan, 0..plan.rows(), engine_time, b);
        self.metrics.phase(Phase::Encode, t2.elapsed());
        Ok(resp)
    }

    /// Appends a checked step's hidden states (and logits) to `b.hidden` (and `b.logits`),
    /// leaving both as they were if the values are bad.
    pub(super) fn decode(
        &self,
        req: &proto::AdjustRequest,
        plan: &Plan,
        b: &mut Buffers,
    ) -> Result<(), Status> {
        let (dim, vocab) = (self.engine.dim(), self.engine.vocab_size());
        let hidden = req.hidden.as_ref().expect("checked");
        convert::append_f32(
            "hidden",
            &hidden.data,
            plan.hidden.dtype,
            dim,
            Finite::All,
            &mut b.hidden,
        )
        .map_err(status::from_convert)?;
        if let Some(ls) = plan.logits {
            let logits = req.logits.as_ref().expect("checked");
            if let Err(e) = convert::append_f32(
                "logits",
                &logits.data,
                ls.dtype,
                vocab,
                Finite::AllowNegInf,
                &mut b.logits,
            ) {
                b.hidden.truncate(b.hidden.len() - plan.rows() * dim);
                return Err(status::from_convert(e));
            }
        }
        self.metrics.rows(plan.rows());
        Ok(())
    }

    /// The engine over every row decoded into `b`, into `b.sparse` or `b.dense`. Records its
    /// search and rule phases and returns its time.
    pub(super) fn engine_call(&self, plan: &Plan, b: &mut Buffers) -> Result<Duration, DetoxError> {
        let started = Instant::now();
        if plan.logits.is_some() {
            b.dense.resize(b.logits.len(), 0.0);
            self.engine.adjust_dense(
                &b.hidden,
                &b.logits,
                &plan.opts,
                &mut b.scratch,
                &mut b.dense,
            )?;
        } else {
            self.engine
                .adjust_sparse(&b.hidden, &plan.opts, &mut b.scratch, &mut b.sparse)?;
        }
        let elapsed = started.elapsed();
        self.metrics.engine(elapsed, b.scratch.last_search_time());
        Ok(elapsed)
    }

    /// The answer to `req` from rows `rows` of the engine's output in `b`.
    pub(super) fn response(
        &self,
        req: &proto::AdjustRequest,
        plan: &Plan,
        rows: Range<usize>,
        engine_time: Duration,
        b: &mut Buffers,
    ) -> proto::AdjustResponse {
        let vocab = self.engine.vocab_size();
        let mut resp = proto::AdjustResponse {
            num_rows: rows.len() as u32,
            vocab_size: vocab as u32,
            step: req.step,
            params: Some(params_proto(&plan.opts)),
            engine_micros: engine_time.as_micros() as u64,
            ..Default::default()
        };
        if plan.logits.is_some() {
            resp.log_probs = b.dense_proto(rows.start * vocab..rows.end * vocab);
        } else {
            resp.rows = b.sparse_rows_proto(rows);
        }
        resp
    }

    /// Appends rows to a store (blocking: writes and fsyncs), then makes the engine see them.
    fn append(
        &self,
        store: usize,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
    ) -> Result<(u64, u64, proto::StoreInfo), Status> {
        let t = Instant::now();
        let s = &self.engine.stores()[store];
        let info = s
            .store
            .append(keys, values, provenance)
            .map_err(|e| status::from_datastore(&format!("appending to store {:?}", s.name), e))?;
        // The append swapped the store's snapshot already; refresh picks up anything other
        // processes committed meanwhile, so Info and searches agree with the disk.
        if let Err(err) = self.engine.refresh() {
            tracing::warn!(%err, "refresh after append failed");
        }
        self.metrics.phase(Phase::Append, t.elapsed());
        self.update_store_metrics();
        tracing::info!(store = %s.name, segment = info.id, rows = info.rows, "appended");
        Ok((info.id, info.rows as u64, self.store_info(store)))
    }

    fn check_tokens(&self, tokens: &[u32], rows: usize) -> Result<(), Status> {
        if tokens.len() != rows {
            return Err(Status::invalid_argument(format!(
                "next_tokens has {} ids for {rows} hidden rows: send exactly one next-token id per row",
                tokens.len()
            )));
        }
        let vocab = self.engine.vocab_size();
        if let Some(i) = tokens.iter().position(|&t| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "next_tokens[{i}] = {} is outside the vocabulary of {vocab} tokens",
                tokens[i]
            )));
        }
        Ok(())
    }

    fn info(&self) -> proto::InfoResponse {
        let e = &self.engine;
        let fp = e.fingerprint();
        proto::InfoResponse {
            model: Some(proto::ModelInfo {
                model_id: fp.model_id.clone(),
                architecture: fp.architecture.clone().unwrap_or_default(),
                hidden_size: e.dim() as u32,
                vocab_size: e.vocab_size() as u32,
                key_type: e.key_type().as_str().to_string(),
                tokenizer_digest: fp.tokenizer_digest.clone().unwrap_or_default(),
                weight_digest: fp.weight_digest.clone().unwrap_or_default(),
            }),
            stores: (0..e.stores().len()).map(|i| self.store_info(i)).collect(),
            defaults: Some(params_proto(e.defaults())),
            limits: Some(proto::Limits {
                max_rows: self.limits.max_rows as u32,
                max_message_bytes: self.limits.max_message_bytes as u64,
                max_k: MAX_K as u32,
            }),
            has_model: self.encoder.is_some(),
            writes_enabled: self.auth.writes_enabled(),
            server_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

fn params_proto(o: &AdjustOptions) -> proto::Params {
    proto::Params {
        alpha: o.params.alpha,
        temperature: o.params.temperature,
        k: o.params.k as u32,
        filter_p: o.params.filter_p,
        mode: match o.mode {
            Mode::Ensemble => proto::Mode::Ensemble,
            Mode::ToxicOnly => proto::Mode::ToxicOnly,
            Mode::KnnLm => proto::Mode::KnnLm,
        } as i32,
        lambda: o.params.lambda,
    }
}

/// Runs `f` on the rayon pool and waits for it without blocking the executor (how a
/// current-thread runtime computes, see [`Shared::try_cpu_permit`]).
pub(super) async fn on_pool<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let (tx, rx) = oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await
        .map_err(|_| Status::internal("the request's worker stopped without an answer"))?
}

/// Runs blocking `f` (disk writes) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("the write worker failed: {e}")))?
}

/// Rewrites tonic's "message too large" decode error into `RESOURCE_EXHAUSTED` with a
/// sentence that says what to do.
pub(crate) fn map_decode_error(status: Status, limit: usize) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        Status::resource_exhausted(format!(
            "request message too large: {}; this server accepts at most {limit} bytes per message (--max-message-bytes): send fewer rows per request, f16 instead of f32, or the sparse form without logits",
            status.message().trim_start_matches("Error, ")
        ))
    } else {
        status
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type AdjustStreamOut =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::AdjustResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Goodtriever for Service {
    async fn adjust(
        &self,
        request: Request<proto::AdjustRequest>,
    ) -> Result<Response<proto::AdjustResponse>, Status> {
        let t = Instant::now();
        self.shared.metrics.request(Method::Adjust);
        let r = self.shared.adjust_step(request.into_inner()).await;
        self.shared.finished(Method::Adjust, t, &r);
        r.map(Response::new)
    }

    type AdjustStreamStream = AdjustStreamOut;

    async fn adjust_stream(
        &self,
        request: Request<Streaming<proto::AdjustRequest>>,
    ) -> Result<Response<Self::AdjustStreamStream>, Status> {
        Ok(Response::new(Box::pin(StepStream::new(
            self.shared.clone(),
            request.into_inner(),
        ))))
    }

    async fn add_examples(
        &self,
        request: Request<proto::AddExamplesRequest>,
    ) -> Result<Response<proto::AddExamplesResponse>, Status> {
        let t = Instant::now();
        self.shared.metrics.request(Method::AddExamples);
        let r = self.add_examples_inner(request).await;
        self.shared.finished(Method::AddExamples, t, &r);
        r.map(Response::new)
    }

    async fn add_texts(
        &self,
        request: Request<proto::AddTextsRequest>,
    ) -> Result<Response<proto::AddTextsResponse>, Status> {
        let t = Instant::now();
        self.shared.metrics.request(Method::AddTexts);
        let r = self.add_texts_inner(request).await;
        self.shared.finished(Method::AddTexts, t, &r);
        r.map(Response::new)
    }

    async fn info(
        &self,
        _request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        let t = Instant::now();
        self.shared.metrics.request(Method::Info);
        let r = Ok(self.shared.info());
        self.shared.finished(Method::Info, t, &r);
        r.map(Response::new)
    }
}

impl Service {
    async fn add_examples_inner(
        &self,
        request: Request<proto::AddExamplesRequest>,
    ) -> Result<proto::AddExamplesResponse, Status> {
        self.shared.auth.check(request.metadata())?;
        let req = request.into_inner();
        let store = self.shared.store_index(&req.store)?;
        let shared = self.shared.clone();
        let (segment_id, rows_added, info) = blocking(move || {
            let dim = shared.engine.dim();
            let hidden = req.hidden.as_ref().ok_or_else(|| {
                Status::invalid_argument(format!(
                    "hidden is missing: send N rows of {dim} key hidden states"
                ))
            })?;
            let shape = convert::check_shape(
                "hidden",
                hidden,
                dim,
                &[WireDType::F32, WireDType::F16],
                usize::MAX,
            )
            .map_err(status::from_convert)?;
            shared.check_tokens(&req.next_tokens, shape.rows)?;
            let provenance = provenance(&req.source, "grpc:AddExamples", &req.store, &req.tag);
            if shape.dtype == WireDType::F16 {
                let mut keys: Vec<f16> = Vec::new();
                convert::f16_rows("hidden", &hidden.data, dim, &mut keys)
                    .map_err(status::from_convert)?;
                shared.append(store, Keys::F16(&keys), &req.next_tokens, provenance)
            } else {
                let mut keys = Vec::new();
                convert::append_f32(
                    "hidden",
                    &hidden.data,
                    shape.dtype,
                    dim,
                    Finite::All,
                    &mut keys,
                )
                .map_err(status::from_convert)?;
                shared.append(store, Keys::F32(&keys), &req.next_tokens, provenance)
            }
        })
        .await?;
        Ok(proto::AddExamplesResponse {
            segment_id,
            rows_added,
            store: Some(info),
        })
    }

    async fn add_texts_inner(
        &self,
        request: Request<proto::AddTextsRequest>,
    ) -> Result<proto::AddTextsResponse, Status> {
        self.shared.auth.check(request.metadata())?;
        let Some(encoder) = self.shared.encoder.clone() else {
            return Err(Status::failed_precondition(
                "this server has no model; start it with --model (or send hidden states with AddExamples)",
            ));
        };
        let req = request.into_inner();
        let store = self.shared.store_index(&req.store)?;
        if req.texts.iter().all(|t| t.trim().is_empty()) {
            return Err(Status::invalid_argument(
                "texts is empty: send at least one non-empty text",
            ));
        }
        let shared = self.shared.clone();
        let (segment_id, rows_added, info) = blocking(move || {
            let key_type = shared.engine.key_type();
            let mut keys = Vec::new();
            let mut values = Vec::new();
            for (i, text) in req.texts.iter().enumerate() {
                if text.trim().is_empty() {
                    continue;
                }
                encoder
                    .encode(text, key_type, &mut |k, t| {
                        keys.extend_from_slice(k);
                        values.push(t);
                    })
                    .map_err(|e| match e {
                        EncodeError::Input(m) => {
                            Status::invalid_argument(format!("texts[{i}]: {m}"))
                        }
                        EncodeError::Model(m) => {
                            tracing::error!(err = %m, "model failed on AddTexts");
                            Status::internal(format!("texts[{i}]: the model failed: {m}"))
                        }
                    })?;
            }
            shared.check_tokens(&values, values.len())?;
            let provenance = provenance(&req.source, "grpc:AddTexts", &req.store, &req.tag);
            shared.append(store, Keys::F32(&keys), &values, provenance)
        })
        .await?;
        Ok(proto::AddTextsResponse {
            segment_id,
            rows_added,
            store: Some(info),
        })
    }
}

fn provenance(source: &str, default: &str, store: &str, tag: &str) -> Provenance {
    let source = if source.trim().is_empty() {
        default
    } else {
        source
    };
    let p = Provenance::new(source).with_label(store);
    if tag.is_empty() {
        p
    } else {
        p.with_tag(tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u32) -> SparseRow {
        SparseRow::Bias {
            scale: 1.0,
            pairs: (0..n).map(|t| (t, t as f32 * 0.5)).collect(),
        }
    }

    #[test]
    fn answer_bytes_are_reused_once_the_previous_answer_is_dropped() {
        let mut b = Buffers {
            sparse: vec![row(300), row(100)],
            ..Default::default()
        };
        let first = b.sparse_rows_proto(0..b.sparse.len());
        let start = first[0].tokens.as_ptr() as usize;
        let end = first[1].values.as_ptr() as usize + first[1].values.len();
        assert_eq!(
            end - start,
            400 * 8,
            "one allocation holds the whole answer"
        );
        drop(first);
        b.sparse = vec![row(200), row(150)];
        let second = b.sparse_rows_proto(0..b.sparse.len());
        for piece in second.iter().flat_map(|r| [&r.tokens, &r.values]) {
            let p = piece.as_ptr() as usize;
            assert!(
                (start..end).contains(&p),
                "a piece outside the first answer's allocation"
            );
        }
        let rows: Vec<SparseRow> = second
            .iter()
            .map(|r| convert::sparse_row_from_proto(r).unwrap())
            .collect();
        assert_eq!(rows, [row(200), row(150)]);
    }

    #[test]
    fn answer_bytes_still_held_by_a_message_are_left_alone() {
        let mut b = Buffers {
            sparse: vec![row(300)],
            ..Default::default()
        };
        let first = b.sparse_rows_proto(0..b.sparse.len());
        b.sparse = vec![row(100)];
        let second = b.sparse_rows_proto(0..b.sparse.len());
        assert_ne!(second[0].tokens.as_ptr(), first[0].tokens.as_ptr());
        assert_eq!(convert::sparse_row_from_proto(&first[0]).unwrap(), row(300));
        assert_eq!(
            convert::sparse_row_from_proto(&second[0]).unwrap(),
            row(100)
        );
    }

    #[test]
    fn dense_answer_bytes_are_reused_too() {
        let mut b = Buffers {
            dense: vec![-1.5; 1000],
            ..Default::default()
        };
        let first = b.dense_proto(0..1000);
        let ptr = first.as_ptr();
        drop(first);
        b.dense = vec![-2.5; 1000];
        let second = b.dense_proto(0..1000);
        assert_eq!(second.as_ptr(), ptr);
        assert_eq!(&second[..], &convert::f32_bytes(&b.dense)[..]);
    }
}
