//! `AdjustStream`'s answers, computed while the response stream is polled.
//!
//! The task that sends a stream's answers (hyper's per-stream task) polls a [`StepStream`];
//! polling reads the next request from the inbound stream and computes its answer right there,
//! so a step crosses no task boundary and no channel inside the server. (A spawned task per
//! stream feeding a channel cost a cross-task wake-up on every step.)
//!
//! One answer is in flight per stream: the next request is read only after the previous
//! answer was taken, so answers come back in order and a client that stops reading stops the
//! server from computing. A failed step ends the stream with its status; shutdown ends every
//! stream with `UNAVAILABLE` at its next step boundary.
//!
//! A step that asks for reuse (`overrides.reuse`) is computed with the stream's own engine
//! buffers ([`OwnBuffers`]), whose scratch keeps the stream's rows' neighbours from one step
//! to the next, so that a row whose sequence emitted a token its neighbours predicted can be
//! answered from their successors (docs/architecture.md §1.6). Such steps take a core like any
//! other but are never merged with other streams' steps. A step without reuse drops that
//! memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::adjust_step::GrpcStep;
use super::metrics::Method;
use super::proto;
use super::shared::Shared;
use super::status::map_decode_error;
use crate::reuse::ReuseParams;
use crate::steps::{OwnBuffers, Step};

const METHOD: Method = Method::AdjustStream;

type Answer = Result<proto::AdjustResponse, Status>;
type Own = Box<OwnBuffers<GrpcStep>>;
/// A reusing step waiting for a core; it gives the stream's buffers back with its answer.
type OwnStep = Pin<Box<dyn Future<Output = (Answer, Own)> + Send>>;

pub(crate) struct StepStream {
    shared: Arc<Shared>,
    inbound: Streaming<proto::AdjustRequest>,
    /// Resolves when the server starts shutting down.
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// A step that could not compute inline: it waits in the step engine's merge queue for its
    /// answer or a core (every core is busy, or the runtime is current-thread and computes on
    /// the pool).
    pending: Option<Pin<Box<dyn Future<Output = Answer> + Send>>>,
    /// The stream's own buffers while its steps reuse neighbours, and the rows of the last step
    /// computed with them (`None`: none yet, or it failed).
    own: Option<Own>,
    own_rows: Option<usize>,
    /// A reusing step waiting for a core, with the stream's buffers.
    pending_own: Option<OwnStep>,
    /// `continued_rows` as indices, reused from step to step.
    keep: Vec<usize>,
    done: bool,
}

impl StepStream {
    /// Must be called inside the server's runtime.
    pub(crate) fn new(shared: Arc<Shared>, inbound: Streaming<proto::AdjustRequest>) -> Self {
        let mut stop = shared.shutdown.clone();
        Self {
            shutdown: Box::pin(async move {
                // An error means the server dropped its sender: it is going away too.
                let _ = stop.wait_for(|s| *s).await;
            }),
            shared,
            inbound,
            pending: None,
            own: None,
            own_rows: None,
            pending_own: None,
            keep: Vec::new(),
            done: false,
        }
    }

    /// A step that reuses neighbours: checked against the stream's previous step, then
    /// computed with the stream's own buffers, now if a core is free.
    fn reuse_step(
        &mut self,
        checked: GrpcStep,
        params: ReuseParams,
        t: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Answer>> {
        let step = checked.req.step;
        if let Err(e) = self.check_continuation(&checked) {
            return self.answer_now(step, t, Err(e));
        }
        let mut own = self.own.take().unwrap_or_default();
        let scratch = own.scratch();
        if scratch.reuse_params() != Some(params) {
            scratch
                .set_reuse(Some(params))
                .expect("reuse params were checked with the request");
        }
        let req = &checked.req;
        if !req.emitted_tokens.is_empty() {
            if !req.continued_rows.is_empty() {
                self.keep.clear();
                self.keep
                    .extend(req.continued_rows.iter().map(|&r| r as usize));
                scratch.keep_rows(&self.keep);
            }
            scratch.advance(&req.emitted_tokens);
        }
        let rows = checked.plan().rows;
        if let Some(r) = self.shared.steps.try_inline_own(&checked, &mut own) {
            self.keep_own(own, rows, &r);
            return self.answer_now(step, t, r);
        }
        let shared = self.shared.clone();
        let mut fut: OwnStep = Box::pin(async move {
            let (r, own) = shared.steps.run_own(checked, own).await;
            shared.finished(METHOD, t, &r);
            (with_step(step, r), own)
        });
        match fut.as_mut().poll(cx) {
            Poll::Ready((answer, own)) => {
                self.keep_own(own, rows, &answer);
                self.finish_step(answer)
            }
            Poll::Pending => {
                self.pending_own = Some(fut);
                Poll::Pending
            }
        }
    }

    /// `emitted_tokens` and `continued_rows` must refer to the stream's previous step.
    fn check_continuation(&self, checked: &GrpcStep) -> Result<(), Status> {
        let req = &checked.req;
        if req.emitted_tokens.is_empty() {
            return Ok(());
        }
        let Some(prev) = self.own_rows else {
            return Err(Status::invalid_argument(
                "emitted_tokens refer to the stream's previous step with reuse, and there is none: send them from the second such step on",
            ));
        };
        let rows = checked.plan().rows;
        match req.continued_rows.last() {
            None if rows != prev => Err(Status::invalid_argument(format!(
                "this step has {rows} rows and the stream's previous step had {prev}: name the previous rows that continue in continued_rows"
            ))),
            Some(&last) if last as usize >= prev => Err(Status::invalid_argument(format!(
                "continued_rows names row {last}, but the stream's previous step had {prev} rows"
            ))),
            _ => Ok(()),
        }
    }

    /// Keeps the stream's buffers after a reusing step; after a failed one nothing follows.
    fn keep_own(&mut self, own: Own, rows: usize, answer: &Answer) {
        self.own_rows = answer.is_ok().then_some(rows);
        self.own = Some(own);
        if let Ok(a) = answer {
            self.shared.metrics.reuse(rows, a.rows_reused as usize);
        }
    }

    /// A step answered while being polled: recorded, then handed out.
    fn answer_now(&mut self, step: u64, t: Instant, r: Answer) -> Poll<Option<Answer>> {
        self.shared.finished(METHOD, t, &r);
        self.finish_step(with_step(step, r))
    }

    /// The answer to hand out, ending the stream after a failed step.
    fn finish_step(&mut self, answer: Answer) -> Poll<Option<Answer>> {
        self.done |= answer.is_err();
        Poll::Ready(Some(answer))
    }
}

/// Names the step in a failed step's message, so a client's log says which one failed.
fn with_step(step: u64, r: Answer) -> Answer {
    r.map_err(|s| Status::new(s.code(), format!("step {step}: {}", s.message())))
}

impl Stream for StepStream {
    type Item = Answer;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Answer>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(step) = this.pending.as_mut() {
            let answer = ready!(step.as_mut().poll(cx));
            this.pending = None;
            return this.finish_step(answer);
        }
        if let Some(step) = this.pending_own.as_mut() {
            let (answer, own) = ready!(step.as_mut().poll(cx));
            this.pending_own = None;
            let rows = answer.as_ref().map_or(0, |a| a.num_rows as usize);
            this.keep_own(own, rows, &answer);
            return this.finish_step(answer);
        }
        if this.shutdown.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(Some(Err(Status::unavailable(
                "the server is shutting down: reconnect to another instance or retry shortly",
            ))));
        }
        let msg = match ready!(Pin::new(&mut this.inbound).poll_next(cx)) {
            None => {
                this.done = true;
                return Poll::Ready(None);
            }
            Some(Err(status)) => {
                let status = map_decode_error(status, this.shared.limits.max_message_bytes);
                this.shared.metrics.request(METHOD);
                this.shared
                    .metrics
                    .finished(METHOD, Duration::ZERO, Some(status.code()));
                this.done = true;
                return Poll::Ready(Some(Err(status)));
            }
            Some(Ok(msg)) => msg,
        };

        let t = Instant::now();
        this.shared.metrics.request(METHOD);
        let step = msg.step;
        let checked = match this.shared.check(msg) {
            Ok(checked) if checked.req.explain.is_some() => {
                let e = Status::invalid_argument(
                    "explain is answered by the unary Adjust only: send the step you want explained there",
                );
                return this.answer_now(step, t, Err(e));
            }
            Ok(checked) => checked,
            Err(e) => return this.answer_now(step, t, Err(e)),
        };
        if let Some(params) = checked.reuse {
            return this.reuse_step(checked, params, t, cx);
        }
        // A step without reuse: the stream's rows' neighbours would be stale by its next one.
        (this.own, this.own_rows) = (None, None);
        // The common case: a core is free, so the step computes here and now.
        let checked = match this.shared.steps.try_inline(checked) {
            Ok(r) => return this.answer_now(step, t, r),
            Err(checked) => checked,
        };
        let shared = this.shared.clone();
        let mut step_future: Pin<Box<dyn Future<Output = Answer> + Send>> = Box::pin(async move {
            let r = shared.steps.run_queued(checked).await;
            shared.finished(METHOD, t, &r);
            with_step(step, r)
        });
        match step_future.as_mut().poll(cx) {
            Poll::Ready(answer) => this.finish_step(answer),
            Poll::Pending => {
                this.pending = Some(step_future);
                Poll::Pending
            }
        }
    }
}
