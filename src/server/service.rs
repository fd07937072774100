//! The `goodtriever.v1.Goodtriever` service: the RPCs, as an adapter over the library.
//!
//! An Adjust step is checked here (`adjust_step.rs`), then computed by the transport-free
//! [`StepEngine`]: inline on the worker thread that received it when a core is free, merged
//! with other waiting steps into one engine call when every core is busy (`crate::steps`).
//! `goodtriever serve` starts one more tokio worker than steps may compute at once, so one
//! always keeps accepting and moving other clients' messages. A stream's steps are computed as
//! its response stream is polled (`step_stream.rs`). Appends, which fsync, run on tokio's
//! blocking pool instead.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use half::f16;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status, Streaming};

use super::adjust_step::{params_proto, GrpcStep};
use super::auth::AdminAuth;
use super::convert::{self, Finite, WireDType};
use super::encoder::{EncodeError, TextEncoder};
use super::metrics::{Method, Metrics, Phase};
use super::proto::{self, goodtriever_server::Goodtriever};
use super::status;
use super::step_stream::StepStream;
use crate::datastore::{Keys, Provenance};
use crate::detox::Detoxifier;
use crate::limits::MAX_K;
use crate::steps::StepEngine;

/// Limits a server enforces on each request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Rows per Adjust request or stream message.
    pub max_rows: usize,
    /// Largest encoded request message, in bytes.
    pub max_message_bytes: usize,
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
    /// Adjust steps onto the engine, at most `ServeOptions::concurrent_steps` at once.
    pub(super) steps: Arc<StepEngine<GrpcStep>>,
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
        let steps = Arc::new(StepEngine::new(
            engine.clone(),
            concurrent_steps,
            metrics.clone(),
        ));
        let shared = Self {
            engine,
            metrics,
            limits,
            auth,
            encoder,
            shutdown,
            steps,
        };
        shared.update_store_metrics();
        shared
    }

    /// One Adjust step: checked, then computed inline if a core is free or merged with other
    /// waiting steps otherwise.
    pub(super) async fn adjust_step(
        &self,
        req: proto::AdjustRequest,
    ) -> Result<proto::AdjustResponse, Status> {
        let step = self.check(req)?;
        self.steps.run(step).await
    }

    /// One Adjust step computed now on the calling thread, whatever else is running.
    #[cfg(test)]
    pub(super) fn adjust(
        &self,
        req: proto::AdjustRequest,
    ) -> Result<proto::AdjustResponse, Status> {
        let step = self.check(req)?;
        self.steps.run_alone(&step)
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

    fn update_store_metrics(&self) {
        for s in self.engine.stores() {
            let live = s.store.segments().iter().filter(|i| !i.retired).count();
            self.metrics.store_size(&s.name, s.store.len(), live);
        }
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
