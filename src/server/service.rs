//! The `goodtriever.v1.Goodtriever` service: the RPCs, as an adapter over the library.
//!
//! An Adjust step is checked (`adjust_step.rs`) and handed to the transport-free
//! [`StepEngine`](crate::steps::StepEngine) through the handlers' shared state (`shared.rs`):
//! inline on the worker thread that received it when a core is free, merged with other
//! waiting steps into one engine call when every core is busy. `goodtriever serve` starts one
//! more tokio worker than steps may compute at once, so one always keeps accepting and moving
//! other clients' messages. A stream's steps are computed as its response stream is polled
//! (`step_stream.rs`). Appends, which fsync, run on tokio's blocking pool instead.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use half::f16;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, Finite, WireDType};
use super::encoder::EncodeError;
use super::metrics::Method;
use super::proto::{self, goodtriever_server::Goodtriever};
use super::shared::Shared;
use super::status;
use super::step_stream::StepStream;
use crate::datastore::{Keys, Provenance, RowSources, SourceSpan};

/// Runs blocking `f` (disk writes) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("the write worker failed: {e}")))?
}

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    /// The service over the handlers' shared state; cloning it clones an `Arc`.
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
                shared.append(store, Keys::F16(&keys), &req.next_tokens, provenance, None)
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
                shared.append(store, Keys::F32(&keys), &req.next_tokens, provenance, None)
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
            // Every row's place in its text: the store keeps a copy of the texts (§3).
            let mut sources = RowSources::default();
            for (i, text) in req.texts.iter().enumerate() {
                if text.trim().is_empty() {
                    continue;
                }
                let doc = sources.documents.len() as u32;
                encoder
                    .encode(text, key_type, &mut |k, t, span| {
                        keys.extend_from_slice(k);
                        values.push(t);
                        sources.spans.push(match span {
                            Some((start, end)) => SourceSpan {
                                document: doc,
                                start,
                                end,
                            },
                            None => SourceSpan::NONE,
                        });
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
                sources.documents.push(text.clone());
            }
            shared.check_tokens(&values, values.len())?;
            let provenance = provenance(&req.source, "grpc:AddTexts", &req.store, &req.tag);
            let sources = sources
                .spans
                .iter()
                .any(SourceSpan::is_some)
                .then_some(sources);
            shared.append(store, Keys::F32(&keys), &values, provenance, sources)
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
