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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::metrics::Method;
use super::proto;
use super::shared::Shared;
use super::status::map_decode_error;

const METHOD: Method = Method::AdjustStream;

type Answer = Result<proto::AdjustResponse, Status>;

pub(crate) struct StepStream {
    shared: Arc<Shared>,
    inbound: Streaming<proto::AdjustRequest>,
    /// Resolves when the server starts shutting down.
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// A step that could not compute inline: it waits in the step engine's merge queue for its
    /// answer or a core (every core is busy, or the runtime is current-thread and computes on
    /// the pool).
    pending: Option<Pin<Box<dyn Future<Output = Answer> + Send>>>,
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
            done: false,
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
