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
}

impl TokenPrior {
    /// From per-token counts (index = token id) over `rows` stored rows, smoothed over a
    /// vocabulary of `vocab` tokens (at least the counts' length).
    pub fn from_counts(counts: &[u64], vocab: usize) -> Self {
        let vocab = vocab.max(counts.len()).max(1);
        let rows: u64 = counts.iter().sum();
        let denom = rows as f64 + PRIOR_PSEUDOCOUNT * vocab as f64;
        let mut log_prior = vec![(PRIOR_PSEUDOCOUNT / denom).ln() as f32; vocab];
        for (slot, &c) in log_prior.iter_mut().zip(counts) {
            if c > 0 {
                *slot = ((c as f64 + PRIOR_PSEUDOCOUNT) / denom).ln() as f32;
            }
        }
        Self { rows, log_prior }
    }

    /// From the stored values themselves, one slice per segment.
    pub fn from_values<'a>(segments: impl IntoIterator<Item = &'a [u32]>, vocab: usize) -> Self {
        let mut counts = vec![0u64; vocab];
        for values in segments {
            for &v in values {
                let v = v as usize;
                if v >= counts.len() {
                    counts.resize(v + 1, 0);
                }
                counts[v] += 1;
            }
        }
        Self::from_counts(&counts, vocab)
    }

    /// Rows counted.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// `ln u(v)` per token id.
    pub fn log_prior(&self) -> &[f32] {
        &self.log_prior
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
        // A value beyond the given vocabulary widens it rather than being dropped.
        assert_eq!(
            TokenPrior::from_values([&[7u32][..]], 4).log_prior().len(),
            8
        );
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
