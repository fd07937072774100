//! The merge queue: steps that found every core busy, answered in merged engine calls.
//!
//! See the [module docs](super) for the policy. Whichever waiting step gets a core takes at
//! most [`merge_steps`] of the oldest waiting steps and answers them, group by group: the
//! steps that share options and form (and fit in [`MAX_ROWS`]) go through the engine as one
//! batch, and each gets its own rows of the output through its channel.

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;

use super::buffers::StepBuffers;
use super::waiting::Waiting;
use super::{Answer, Step, StepEngine, StepError};
use crate::datastore::TASK_QUERIES;
use crate::limits::MAX_ROWS;

/// The most steps one leader takes from the queue: enough for the batched scan to give every
/// pool thread a full group of queries (`TASK_QUERIES`), few enough that steps are answered
/// roughly in the order they came. Taking the whole queue instead made a step that arrived
/// just after a large batch was taken wait for that batch and then its own
/// (docs/performance.md has the measurement).
pub(super) fn merge_steps() -> usize {
    TASK_QUERIES * rayon::current_num_threads()
}

/// The queue of steps that found every core busy.
pub(super) struct WaitQueue<S: Step>(Mutex<Vec<Waiting<S>>>);

impl<S: Step> Default for WaitQueue<S> {
    fn default() -> Self {
        Self(Mutex::new(Vec::new()))
    }
}

impl<S: Step> WaitQueue<S> {
    pub(super) fn push(&self, step: S, reply: oneshot::Sender<Answer<S>>) {
        self.lock().push(Waiting::new(step, reply));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Moves the `n` oldest waiting steps into `into` (whose allocation is kept from one batch
    /// to the next, as the queue keeps its own).
    pub(super) fn take_oldest(&self, n: usize, into: &mut Vec<Waiting<S>>) {
        let mut queue = self.lock();
        let n = n.min(queue.len());
        into.extend(queue.drain(..n));
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Waiting<S>>> {
        // A panic elsewhere cannot leave the vector half-changed; keep serving.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: Step> StepEngine<S> {
    /// Answers every step in `b.batch` and empties it.
    pub(super) fn answer_batch(&self, b: &mut StepBuffers<S>) {
        let mut batch = std::mem::take(&mut b.batch);
        let mut group = std::mem::take(&mut b.group);
        for w in &mut batch {
            if w.reply.as_ref().is_none_or(|r| r.is_closed()) {
                // Its client cancelled while it waited: nothing to compute.
                w.reply = None;
            }
        }
        for head in 0..batch.len() {
            if !batch[head].open() {
                continue;
            }
            let plan = batch[head].step.plan();
            group.clear();
            let mut rows = 0;
            for (j, w) in batch.iter().enumerate().skip(head) {
                if w.open() {
                    let p = w.step.plan();
                    // A lone step fits: a transport accepts at most MAX_ROWS rows per step.
                    if p.merges_with(&plan) && rows + p.rows <= MAX_ROWS {
                        group.push(j);
                        rows += p.rows;
                    }
                }
            }
            self.answer_group(&mut batch, &mut group, b);
        }
        batch.clear();
        b.batch = batch;
        b.group = group;
    }

    /// Answers the steps `batch[group]`, which share their options and form, with one engine
    /// call.
    fn answer_group(
        &self,
        batch: &mut [Waiting<S>],
        group: &mut Vec<usize>,
        b: &mut StepBuffers<S>,
    ) {
        let t0 = Instant::now();
        b.input.clear();
        group.retain(|&j| {
            let w = &mut batch[j];
            match w.step.decode(&mut b.input) {
                Ok(()) => {
                    self.observer.step_rows(w.step.plan().rows);
                    true
                }
                Err(e) => {
                    w.answer(Err(e));
                    false
                }
            }
        });
        let Some(&first) = group.first() else {
            return;
        };
        let plan = batch[first].step.plan();
        self.observer.decoded(t0.elapsed());

        let engine_time = match self.engine_call(&plan, b) {
            Ok(t) => t,
            Err(e) => {
                if group.len() == 1 {
                    batch[first].answer(Err(StepError::from(e).into()));
                } else {
                    // Alone, each step gets its own answer or its own error.
                    for &j in group.iter() {
                        let w = &mut batch[j];
                        let answer = self.compute_alone(&w.step, b, t0);
                        w.answer(answer);
                    }
                }
                return;
            }
        };
        self.observer.merged(group.len());

        let t2 = Instant::now();
        let mut start = 0;
        for &j in group.iter() {
            let w = &mut batch[j];
            let p = w.step.plan();
            let rows: Range<usize> = start..start + p.rows;
            start = rows.end;
            let (out, wire) = b.output(&p, rows, engine_time);
            let answer = w.step.answer(out, wire);
            w.answer(Ok(answer));
        }
        self.observer.encoded(t2.elapsed());
    }
}
