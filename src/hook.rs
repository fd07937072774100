//! The per-step hook between a sampling loop and whatever adjusts its logits.
//!
//! The generator ([`crate::generate`]) calls a [`StepHook`] at every decoding step; the engine
//! implements it ([`crate::detox::ControlHook`]). The trait sits in its own module so that
//! neither side imports the other: the engine does not depend on the generator, and the
//! generator knows nothing about stores.

use crate::fingerprint::KeyType;

/// Something that adjusts next-token logits at each decoding step.
pub trait StepHook {
    /// The hidden state the hook wants as `keys`.
    fn key_type(&self) -> KeyType;

    /// `keys` holds `rows × hidden` values, `logits` `rows × vocab` raw logits. The hook may
    /// rewrite `logits`, e.g. with normalised log-probabilities (`-inf` allowed for tokens that
    /// must not be sampled).
    fn adjust(&mut self, keys: &[f32], logits: &mut [f32], rows: usize) -> Result<(), HookError>;

    /// Rows adjusted so far, and how many of them the hook passed over without its costly
    /// work (a control that skips the search where it cannot act). `(0, 0)` when the hook
    /// does not count.
    fn skip_counts(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Before the next step: the token each row going on emitted at the last
    /// [`adjust`](Self::adjust), in row order (after [`keep_rows`](Self::keep_rows)). A hook
    /// that keeps per-sequence state (reusing a step's neighbours at the next) follows its
    /// sequences with it; the default ignores it.
    fn advance(&mut self, _tokens: &[u32]) {}

    /// Only rows `keep` (ascending) of the last step go on, in that order: finished sequences
    /// left the batch, or (empty) a new generation starts. The default ignores it.
    fn keep_rows(&mut self, _keep: &[usize]) {}

    /// What reusing neighbours did so far, for hooks that reuse; `None` otherwise.
    fn reuse_stats(&self) -> Option<crate::reuse::ReuseStats> {
        None
    }
}

/// A failure inside a [`StepHook`], with its cause.
#[derive(Debug, thiserror::Error)]
#[error("step hook failed: {0}")]
pub struct HookError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

impl HookError {
    /// Wraps the hook's own error.
    pub fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(err))
    }
}
