//! Prior-corrected experts (docs/architecture.md §1.4): each store's kNN distribution measured
//! against that store's own next-token frequencies.
//!
//! With near-uniform kNN weights, a store's expert is close to its next-token histogram, so
//! the paper's `ℓ⁺ − ℓ⁻` carries the difference between the two stores' unigram distributions
//! on every step: register and topic, not toxicity. The corrected expert scores a token by how
//! much more often the row's neighbours predict it than the store predicts it overall. With
//! `p(v)` the kNN distribution over the `k` neighbours and `u(v)` the store's smoothed unigram
//! distribution, it is the log-ratio of a Dirichlet-smoothed kNN estimate
//! `(k·p(v) + ρk·u(v)) / (k + ρk)` to `u(v)`, up to a constant:
//!
//! `score(v) = ln(1 + p(v) / (ρ·u(v)))`
//!
//! which is 0 for a token no neighbour predicted (so the rule stays sparse, with no patch
//! value), `ln 2` for one predicted at exactly the store's base rate, and grows with the
//! ratio. ρ is the prior's weight relative to the `k` neighbours.

use crate::limits::MAX_VOCAB;

/// Pseudo-count added to every token's count before the unigram is normalised (Jeffreys'
/// ½): a retrieved token always has a count of at least one (it is a stored value), so the
/// smoothing only keeps the logarithm finite for tokens a store lost to retirement.
pub const PRIOR_PSEUDOCOUNT: f64 = 0.5;

/// A store's next-token statistics: its live row count and its smoothed log unigram
/// distribution over the vocabulary. Computed from the stored values when a store's view is
/// loaded (so it always matches the rows a search can return) and shared behind an `Arc`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPrior {
    rows: u64,
    log_prior: Vec<f32>,
    /// `ln u` of a token never stored: the smoothing's floor, also for ids past the table.
    log_unseen: f32,
}

impl TokenPrior {
    /// From per-token counts (index = token id) over `rows` stored rows, smoothed over a
    /// vocabulary of `vocab` tokens (at least the counts' length).
    pub fn from_counts(counts: &[u64], vocab: usize) -> Self {
        let vocab = vocab.max(counts.len()).max(1);
        let rows: u64 = counts.iter().sum();
        let denom = rows as f64 + PRIOR_PSEUDOCOUNT * vocab as f64;
        let log_unseen = (PRIOR_PSEUDOCOUNT / denom).ln() as f32;
        let mut log_prior = vec![log_unseen; vocab];
        for (slot, &c) in log_prior.iter_mut().zip(counts) {
            if c > 0 {
                *slot = ((c as f64 + PRIOR_PSEUDOCOUNT) / denom).ln() as f32;
            }
        }
        Self {
            rows,
            log_prior,
            log_unseen,
        }
    }

    /// From the stored values themselves, one slice per segment, over a vocabulary of `vocab`
    /// tokens (0 when the store does not know it: then the largest stored value decides).
    ///
    /// The table never grows past [`MAX_VOCAB`] entries, so a damaged values file cannot make
    /// an open allocate without bound. Values outside the table are left uncounted: the rule
    /// refuses them at the step that retrieves them (they are outside the logits, and for a
    /// store of unknown vocabulary outside the prior), and `verify` reports them.
    pub fn from_values<'a>(segments: impl IntoIterator<Item = &'a [u32]>, vocab: usize) -> Self {
        let cap = if vocab > 0 {
            vocab.min(MAX_VOCAB)
        } else {
            MAX_VOCAB
        };
        let mut counts = vec![0u64; vocab.min(MAX_VOCAB)];
        for values in segments {
            for &v in values {
                let v = v as usize;
                if v >= counts.len() {
                    if v >= cap {
                        continue;
                    }
                    counts.resize(v + 1, 0);
                }
                counts[v] += 1;
            }
        }
        Self::from_counts(&counts, vocab.min(MAX_VOCAB))
    }

    /// Rows counted.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// `ln u(v)` per token id.
    pub fn log_prior(&self) -> &[f32] {
        &self.log_prior
    }

    /// `ln u(v)` of one token; a token past the table was never stored, so it has the
    /// smoothing's floor.
    pub fn log_prob(&self, token: u32) -> f32 {
        self.log_prior
            .get(token as usize)
            .copied()
            .unwrap_or(self.log_unseen)
    }
}

/// The corrected score of a token with kNN probability `p` and log unigram `log_u`, for prior
/// weight `rho` > 0 (see the module docs).
#[inline]
pub(crate) fn corrected_score(p: f64, log_u: f32, rho: f32) -> f64 {
    (p / (rho as f64 * (log_u as f64).exp())).ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unigram_is_smoothed_and_normalised() {
        let p = TokenPrior::from_values([&[0u32, 0, 1][..], &[0, 3][..]], 4);
        assert_eq!(p.rows(), 5);
        let u: Vec<f64> = p.log_prior().iter().map(|&l| (l as f64).exp()).collect();
        let denom = 5.0 + 0.5 * 4.0;
        let want = [3.5 / denom, 1.5 / denom, 0.5 / denom, 1.5 / denom];
        for (got, want) in u.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{u:?}");
        }
        assert!((u.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        // Without a known vocabulary the largest value decides the table's length.
        assert_eq!(
            TokenPrior::from_values([&[7u32][..]], 0).log_prior().len(),
            8
        );
    }

    #[test]
    fn values_outside_the_table_are_not_counted_and_never_grow_it_without_bound() {
        // A known vocabulary bounds the table; the stray value is the rule's to refuse.
        let p = TokenPrior::from_values([&[1u32, 9][..]], 4);
        assert_eq!(p.log_prior().len(), 4);
        assert_eq!(p.rows(), 1);
        // Unknown vocabulary: a damaged value near u32::MAX is dropped, not allocated for.
        let p = TokenPrior::from_values([&[2u32, u32::MAX][..]], 0);
        assert_eq!(p.log_prior().len(), 3);
        assert_eq!(p.rows(), 1);
        // A declared vocabulary above the limit is clamped to it.
        let p = TokenPrior::from_values([&[0u32][..]], usize::MAX);
        assert_eq!(p.log_prior().len(), MAX_VOCAB);
    }

    #[test]
    fn a_token_at_its_base_rate_scores_ln_2_and_an_unpredicted_one_zero() {
        let u = 0.01f32;
        assert!((corrected_score(0.01, u.ln(), 1.0) - 2f64.ln()).abs() < 1e-6);
        assert_eq!(corrected_score(0.0, u.ln(), 1.0), 0.0);
        assert!(corrected_score(0.5, u.ln(), 1.0) > corrected_score(0.1, u.ln(), 1.0));
        // A larger prior weight shrinks every score toward zero.
        assert!(corrected_score(0.5, u.ln(), 4.0) < corrected_score(0.5, u.ln(), 1.0));
    }
}
