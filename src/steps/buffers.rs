//! The memory one engine call needs, pooled by the [`StepEngine`](super::StepEngine).
//!
//! A set holds the decoded rows of a batch ([`StepInput`]), the engine's scratch and output,
//! the transport's encoding scratch, and the merge queue's working lists. Every vector keeps
//! its allocation from one call to the next, so a steady stream of steps allocates nothing
//! once the buffers have grown to the largest batch.

use std::ops::Range;
use std::time::Duration;

use super::waiting::Waiting;
use super::{Step, StepPlan};
use crate::detox::{DetoxError, DetoxScratch, Detoxifier};
use crate::rule::SparseRow;

/// A batch's decoded rows, which [`Step::decode`] appends to.
#[derive(Default)]
pub struct StepInput {
    /// Hidden states, row-major (rows × the engine's dimension).
    pub hidden: Vec<f32>,
    /// Raw logits for the dense form, row-major (rows × the vocabulary size).
    pub logits: Vec<f32>,
}

impl StepInput {
    pub(super) fn clear(&mut self) {
        self.hidden.clear();
        self.logits.clear();
    }
}

/// A step's rows of an engine call's output, for [`Step::answer`].
pub struct StepOutput<'a> {
    /// What the step asked for.
    pub plan: &'a StepPlan,
    /// How long the engine call took (shared by every step merged into it).
    pub engine_time: Duration,
    /// How many of the call's rows were answered from reused neighbours (only a step computed
    /// alone with its own buffers reuses, so these are the step's own rows).
    pub reused: usize,
    /// The step's rows.
    pub rows: OutputRows<'a>,
}

/// The engine's answer for a step's rows, in the form it asked for.
pub enum OutputRows<'a> {
    /// One sparse row (bias pairs, or the kNN distribution) per row.
    Sparse(&'a [SparseRow]),
    /// Normalised adjusted log-probabilities, `rows × vocab` values.
    Dense {
        /// The values, row-major.
        values: &'a [f32],
        /// The vocabulary size (values per row).
        vocab: usize,
    },
}

/// One set of pooled buffers.
pub(super) struct StepBuffers<S: Step> {
    pub(super) scratch: DetoxScratch,
    pub(super) input: StepInput,
    dense: Vec<f32>,
    sparse: Vec<SparseRow>,
    /// The transport's encoding scratch.
    pub(super) wire: S::Wire,
    /// The waiting steps a merged batch answers, and one group of them (see `queue`).
    pub(super) batch: Vec<Waiting<S>>,
    pub(super) group: Vec<usize>,
    vocab: usize,
}

impl<S: Step> Default for StepBuffers<S> {
    fn default() -> Self {
        Self {
            scratch: DetoxScratch::default(),
            input: StepInput::default(),
            dense: Vec::new(),
            sparse: Vec::new(),
            wire: S::Wire::default(),
            batch: Vec::new(),
            group: Vec::new(),
            vocab: 0,
        }
    }
}

impl<S: Step> StepBuffers<S> {
    /// The engine over every decoded row, in `plan`'s form.
    pub(super) fn compute(
        &mut self,
        detox: &Detoxifier,
        plan: &StepPlan,
    ) -> Result<(), DetoxError> {
        self.vocab = detox.vocab_size();
        if plan.dense {
            self.dense.resize(self.input.logits.len(), 0.0);
            detox.adjust_dense(
                &self.input.hidden,
                &self.input.logits,
                &plan.opts,
                &mut self.scratch,
                &mut self.dense,
            )
        } else {
            detox.adjust_sparse(
                &self.input.hidden,
                &plan.opts,
                &mut self.scratch,
                &mut self.sparse,
            )
        }
    }

    /// Rows `rows` of the last [`compute`](Self::compute)'s output, with the wire scratch
    /// beside it (both borrowed at once, for [`Step::answer`]).
    pub(super) fn output<'a>(
        &'a mut self,
        plan: &'a StepPlan,
        rows: Range<usize>,
        engine_time: Duration,
    ) -> (StepOutput<'a>, &'a mut S::Wire) {
        let out = if plan.dense {
            let v = self.vocab;
            OutputRows::Dense {
                values: &self.dense[rows.start * v..rows.end * v],
                vocab: v,
            }
        } else {
            OutputRows::Sparse(&self.sparse[rows])
        };
        (
            StepOutput {
                plan,
                engine_time,
                reused: self.scratch.last_reused(),
                rows: out,
            },
            &mut self.wire,
        )
    }
}
