//! The state every handler shares: the engine and its step engine, metrics, limits, the
//! admin token, the optional text encoder, and the shutdown signal; plus the store-level
//! helpers the RPCs use (store info, appends, token checks).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tonic::{Code, Status};

use super::adjust_step::{params_proto, GrpcStep};
use super::auth::AdminAuth;
use super::encoder::TextEncoder;
use super::metrics::{Method, Metrics, Phase};
use super::proto;
use super::status;
use crate::datastore::{Keys, MergePolicy, Provenance, RowSources};
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
    /// When small segments written by appends are merged in the background; `None`: never.
    merge: Option<MergePolicy>,
    /// Per store: whether a background merge is running (at most one per store).
    merging: Vec<AtomicBool>,
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
        let merging = engine
            .stores()
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        let shared = Self {
            merge: None,
            merging,
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
    /// The request's checks: the step it asks for.
    pub(super) fn check(&self, req: proto::AdjustRequest) -> Result<GrpcStep, Status> {
        GrpcStep::check(&self.engine, self.limits.max_rows, req)
    }

    pub(super) async fn adjust_step(
        self: &Arc<Self>,
        req: proto::AdjustRequest,
    ) -> Result<proto::AdjustResponse, Status> {
        let step = self.check(req)?;
        if step.reuse.is_some() {
            return Err(Status::invalid_argument(
                "overrides.reuse needs AdjustStream: a unary Adjust has no previous step whose neighbours it could follow",
            ));
        }
        if let Some(options) = step.req.explain {
            // A debugging call: computed alone on the blocking pool, not merged (it copies
            // vocabulary-sized rows and reads the stores' source files).
            let shared = self.clone();
            return tokio::task::spawn_blocking(move || {
                super::explain::adjust_explained(
                    &shared.engine,
                    shared.encoder.as_deref(),
                    &step,
                    options,
                )
            })
            .await
            .map_err(|e| Status::internal(format!("the explain worker failed: {e}")))?;
        }
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

    pub(super) fn store_info(&self, index: usize) -> proto::StoreInfo {
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
                    sources: i.sources,
                })
                .collect(),
        }
    }

    pub(super) fn store_index(&self, name: &str) -> Result<usize, Status> {
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
    pub(super) fn append(
        self: &Arc<Self>,
        store: usize,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        sources: Option<RowSources>,
    ) -> Result<(u64, u64, proto::StoreInfo), Status> {
        let t = Instant::now();
        let s = &self.engine.stores()[store];
        let info = s
            .store
            .append_with_sources(
                keys,
                values,
                provenance,
                sources.filter(|_| s.store.keeps_sources()),
                &|_| {},
            )
            .map_err(|e| status::from_datastore(&format!("appending to store {:?}", s.name), e))?;
        // The append swapped the store's snapshot already; refresh picks up anything other
        // processes committed meanwhile, so Info and searches agree with the disk.
        if let Err(err) = self.engine.refresh() {
            tracing::warn!(%err, "refresh after append failed");
        }
        self.metrics.phase(Phase::Append, t.elapsed());
        self.update_store_metrics();
        tracing::info!(store = %s.name, segment = info.id, rows = info.rows, "appended");
        let answer = (info.id, info.rows as u64, self.store_info(store));
        self.merge_in_background(store);
        Ok(answer)
    }

    /// Merges small segments of `store` in the background while serving, when the policy says
    /// a merge is due (see [`MergePolicy`]). Searches keep their snapshot and move to the
    /// merged segment when the merge commits; a crash mid-merge leaves the store as it was.
    pub(super) fn merge_in_background(self: &Arc<Self>, store: usize) {
        let Some(policy) = self.merge else {
            return;
        };
        if self.merging[store].swap(true, Ordering::AcqRel) {
            return; // the running merge looks at the tail again when it is done
        }
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            let s = &shared.engine.stores()[store];
            loop {
                match s.store.merge_small_segments(&policy) {
                    Ok(Some(info)) => {
                        tracing::info!(store = %s.name, segment = info.id, rows = info.rows, merged = info.provenance.merged_from.len(), "merged small segments");
                        shared.update_store_metrics();
                    }
                    Ok(None) => break,
                    Err(err) => {
                        tracing::warn!(store = %s.name, %err, "merging small segments failed; the store is unchanged");
                        break;
                    }
                }
            }
            shared.merging[store].store(false, Ordering::Release);
        });
    }

    /// Turns on merging small segments while serving.
    pub fn with_merge_policy(mut self, policy: Option<MergePolicy>) -> Self {
        self.merge = policy;
        self
    }

    pub(super) fn check_tokens(&self, tokens: &[u32], rows: usize) -> Result<(), Status> {
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

    pub(super) fn info(&self) -> proto::InfoResponse {
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
