//! The step engine: concurrent decoding steps from any transport onto one [`Detoxifier`].
//!
//! A transport (the gRPC service today) receives a decoding step, checks it, and hands it to a
//! [`StepEngine`] as something that implements [`Step`]: what it asks for ([`StepPlan`]: the
//! options, its number of rows, sparse or dense), how its rows are decoded into the engine's
//! batch buffers, and how its answer is encoded from its rows of the output. The engine knows
//! nothing of protobuf or HTTP; the transport knows nothing of queues, permits or buffers.
//!
//! How a step is computed:
//! - **Inline when a core is free.** A semaphore holds one permit per step that may compute at
//!   once (one per core by default). A step that gets a permit computes on the thread that
//!   received it, so no thread hand-off sits on its path ([`StepEngine::try_inline`]).
//! - **Merged when every core is busy.** A step that finds every permit taken waits in a queue
//!   (`src/steps/queue.rs`); whichever waiting step gets a permit first answers the oldest waiting
//!   steps, those with the same options and form in one engine call, so an exactly scanned segment
//!   is read once for all of their rows. Under load the batch grows with the queue by itself; no
//!   timer holds a step back to wait for company. A row's answer never depends on its batch: the
//!   engine's search and rule are per row and bit-identical in a batch.
//! - **Reused buffers.** The decoded rows, the engine's scratch and output, and the transport's own
//!   encoding scratch ([`Step::Wire`]) come from a pool (`src/steps/buffers.rs`), so a steady
//!   stream of steps reuses the same allocations. Buffers belong to a step, not to a client's
//!   stream: a stream spends most of its life waiting for its next forward pass.
//! - **Own buffers for state across steps.** A caller whose steps need memory from one step to
//!   the next (a stream that reuses its rows' neighbours, docs/architecture.md §1.6) keeps an
//!   [`OwnBuffers`] instead and computes with it ([`StepEngine::try_inline_own`],
//!   [`StepEngine::run_own`]): under the same permits, but alone, never merged, since the
//!   memory belongs to its rows only.
//!
//! A step is checked before it is queued, so a bad request is refused with its own error and
//! never fails the others; if a merged engine call fails anyway, each step of that group is
//! computed alone, so the error lands only on the step that caused it.

mod buffers;
mod queue;
mod waiting;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{oneshot, Semaphore, SemaphorePermit};

pub use buffers::{OutputRows, StepInput, StepOutput};

use crate::detox::{AdjustOptions, DetoxError, DetoxScratch, Detoxifier};
use buffers::StepBuffers;
use queue::WaitQueue;

/// What a checked step asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPlan {
    /// The engine's options for this step (the defaults with the request's overrides).
    pub opts: AdjustOptions,
    /// How many rows the step carries.
    pub rows: usize,
    /// Whether the step wants the dense form (it then sends logits too).
    pub dense: bool,
}

impl StepPlan {
    /// Whether two steps can share one engine call: the same options and form.
    pub fn merges_with(&self, other: &StepPlan) -> bool {
        self.opts == other.opts && self.dense == other.dense
    }
}

/// Why the engine could not answer a step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The engine refused or failed the step.
    #[error(transparent)]
    Engine(#[from] DetoxError),
    /// The step's answer was lost (a worker stopped, a channel closed without an answer).
    #[error("the step was dropped without an answer; retry it")]
    Dropped,
    /// The engine no longer takes steps.
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A decoding step as a transport hands it to the [`StepEngine`].
pub trait Step: Send + 'static {
    /// What the transport sends back for a step.
    type Answer: Send + 'static;
    /// The transport's error (a gRPC status, an HTTP error body).
    type Error: From<StepError> + Send + 'static;
    /// The transport's own scratch for encoding answers, pooled with the engine's buffers.
    type Wire: Default + Send + 'static;

    /// What the step asks for; checked by the transport before the step reaches the engine.
    fn plan(&self) -> StepPlan;

    /// Appends the step's rows to `input`: `plan().rows` hidden rows, and as many logits rows
    /// for the dense form. On error `input` must be left as it was.
    fn decode(&self, input: &mut StepInput) -> Result<(), Self::Error>;

    /// The step's answer from its rows of the engine's output.
    fn answer(&self, output: StepOutput<'_>, wire: &mut Self::Wire) -> Self::Answer;
}

/// Where a step's phases go: a transport's metrics. Every method has an empty default.
pub trait StepObserver: Send + Sync {
    /// One step's rows were decoded into the batch buffers.
    fn step_rows(&self, _rows: usize) {}
    /// How long decoding the steps of one engine call took.
    fn decoded(&self, _elapsed: Duration) {}
    /// One engine call: its whole time and the part spent searching the stores.
    fn engine(&self, _total: Duration, _search: Duration) {}
    /// How many steps one engine call answered.
    fn merged(&self, _steps: usize) {}
    /// How long encoding the answers of one engine call took.
    fn encoded(&self, _elapsed: Duration) {}
}

/// An observer that records nothing.
pub struct NoObserver;

impl StepObserver for NoObserver {}

type Answer<S> = Result<<S as Step>::Answer, <S as Step>::Error>;

/// A caller's own engine buffers, kept from one of its steps to the next (see the module docs):
/// the scratch holds what its rows' next step may reuse.
pub struct OwnBuffers<S: Step>(StepBuffers<S>);

impl<S: Step> Default for OwnBuffers<S> {
    fn default() -> Self {
        Self(StepBuffers::default())
    }
}

impl<S: Step> OwnBuffers<S> {
    /// The engine scratch the caller's steps compute with (to set reuse and report tokens).
    pub fn scratch(&mut self) -> &mut DetoxScratch {
        &mut self.0.scratch
    }
}

/// Concurrent steps onto one engine: permits, the merge queue and the buffer pool (see the
/// module docs). Share it as `Arc<StepEngine<S>>`.
pub struct StepEngine<S: Step> {
    detox: Arc<Detoxifier>,
    observer: Arc<dyn StepObserver>,
    /// How many steps compute at once.
    cpu: Semaphore,
    /// Steps that found every permit taken, to be merged.
    waiting: WaitQueue<S>,
    pool: Mutex<Vec<StepBuffers<S>>>,
}

impl<S: Step> StepEngine<S> {
    /// An engine over `detox` that computes at most `concurrent_steps` steps at once (at least
    /// one) and reports their phases to `observer`.
    pub fn new(
        detox: Arc<Detoxifier>,
        concurrent_steps: usize,
        observer: Arc<dyn StepObserver>,
    ) -> Self {
        Self {
            detox,
            observer,
            cpu: Semaphore::new(concurrent_steps.max(1)),
            waiting: WaitQueue::default(),
            pool: Mutex::new(Vec::new()),
        }
    }

    /// The engine the steps run on.
    pub fn detox(&self) -> &Arc<Detoxifier> {
        &self.detox
    }

    /// How many steps wait in the merge queue now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The most waiting steps one leader answers at once.
    pub fn merge_steps() -> usize {
        queue::merge_steps()
    }

    /// The permits that bound concurrent steps (tests hold them all to force merging).
    pub fn permits(&self) -> &Semaphore {
        &self.cpu
    }

    /// One step: inline if a core is free, otherwise through the merge queue.
    pub async fn run(self: &Arc<Self>, step: S) -> Answer<S> {
        match self.try_inline(step) {
            Ok(answer) => answer,
            Err(step) => self.run_queued(step).await,
        }
    }

    /// Computes `step` on the calling thread if a core is free, or gives it back.
    ///
    /// A current-thread runtime must not block, so there every step goes through the queue,
    /// whose leader computes on the rayon pool. (Handing each step to a blocking-pool thread
    /// with `block_in_place` cost more per step than it saved.)
    pub fn try_inline(&self, step: S) -> Result<Answer<S>, S> {
        match self.try_permit() {
            Some(_permit) => Ok(self.run_alone(&step)),
            None => Err(step),
        }
    }

    /// Computes `step` with the caller's own buffers on the calling thread if a core is free;
    /// `None` (nothing computed) otherwise.
    pub fn try_inline_own(&self, step: &S, own: &mut OwnBuffers<S>) -> Option<Answer<S>> {
        let _permit = self.try_permit()?;
        Some(self.compute_alone(step, &mut own.0, Instant::now()))
    }

    /// Waits for a core, then computes `step` with the caller's own buffers, which come back
    /// with the answer (fresh ones if the pool lost them: the caller's memory is then gone).
    pub async fn run_own(
        self: &Arc<Self>,
        step: S,
        mut own: Box<OwnBuffers<S>>,
    ) -> (Answer<S>, Box<OwnBuffers<S>>) {
        let _permit = match self.cpu.acquire().await {
            Ok(p) => p,
            Err(_) => return (Err(StepError::ShuttingDown.into()), own),
        };
        if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
            let answer = self.compute_alone(&step, &mut own.0, Instant::now());
            return (answer, own);
        }
        let engine = self.clone();
        on_pool(move || {
            let answer = engine.compute_alone(&step, &mut own.0, Instant::now());
            (answer, own)
        })
        .await
        .unwrap_or_else(|| (Err(StepError::Dropped.into()), Box::default()))
    }

    fn try_permit(&self) -> Option<SemaphorePermit<'_>> {
        let inline =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        inline.then(|| self.cpu.try_acquire().ok()).flatten()
    }

    /// Computes `step` now on the calling thread, with buffers from the pool.
    pub fn run_alone(&self, step: &S) -> Answer<S> {
        let mut b = self.take_buffers();
        let answer = self.compute_alone(step, &mut b, Instant::now());
        self.return_buffers(b);
        answer
    }

    /// One step for a caller that found every core busy: queues it, and either gets its answer
    /// from another step that computed it, or gets a core and answers the oldest waiting steps,
    /// until its own is answered.
    pub async fn run_queued(self: &Arc<Self>, step: S) -> Answer<S> {
        let (tx, mut rx) = oneshot::channel();
        self.waiting.push(step, tx);
        loop {
            tokio::select! {
                biased;
                answer = &mut rx => return answer.unwrap_or_else(|_| Err(StepError::Dropped.into())),
                permit = self.cpu.acquire() => {
                    let _permit = permit.map_err(|_| StepError::ShuttingDown)?;
                    let mut b = self.take_buffers();
                    self.waiting.take_oldest(queue::merge_steps(), &mut b.batch);
                    if b.batch.is_empty() {
                        // Another step took this one and answers it.
                        self.return_buffers(b);
                        break;
                    }
                    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
                        self.answer_batch(&mut b);
                    } else {
                        // A current-thread runtime must not block: the pool computes.
                        let engine = self.clone();
                        b = on_pool(move || {
                            engine.answer_batch(&mut b);
                            b
                        })
                        .await
                        .ok_or(StepError::Dropped)?;
                    }
                    self.return_buffers(b);
                    // This step may still wait behind the batch just answered.
                }
            }
        }
        rx.await.unwrap_or_else(|_| Err(StepError::Dropped.into()))
    }

    /// A step computed alone into `b`.
    fn compute_alone(&self, step: &S, b: &mut StepBuffers<S>, t0: Instant) -> Answer<S> {
        let plan = step.plan();
        b.input.clear();
        step.decode(&mut b.input)?;
        self.observer.step_rows(plan.rows);
        self.observer.decoded(t0.elapsed());
        let engine_time = self.engine_call(&plan, b).map_err(StepError::from)?;
        self.observer.merged(1);
        let t2 = Instant::now();
        let (out, wire) = b.output(&plan, 0..plan.rows, engine_time);
        let answer = step.answer(out, wire);
        self.observer.encoded(t2.elapsed());
        Ok(answer)
    }

    /// The engine over every row decoded into `b`, into its output. Returns the call's time.
    fn engine_call(&self, plan: &StepPlan, b: &mut StepBuffers<S>) -> Result<Duration, DetoxError> {
        let started = Instant::now();
        b.compute(&self.detox, plan)?;
        let elapsed = started.elapsed();
        self.observer.engine(elapsed, b.scratch.last_search_time());
        Ok(elapsed)
    }

    fn take_buffers(&self) -> StepBuffers<S> {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn return_buffers(&self, b: StepBuffers<S>) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        // Enough for every thread that can run a step at once; more would only hold memory.
        if pool.len() < 2 * rayon::current_num_threads() + 2 {
            pool.push(b);
        }
    }
}

/// Runs `f` on the rayon pool and waits for it without blocking the executor; `None` if the
/// pool dropped it.
async fn on_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.ok()
}
