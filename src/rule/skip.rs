//! Skipping the search where the control would not act (docs/architecture.md §1.5).
//!
//! A step can only be made less toxic if the base model gives some chance to a token that the
//! toxic stores predict more often than the non-toxic ones. Each store's next-token statistics
//! ([`TokenPrior`]) say which tokens those are, before any search: with `w_j` the stores'
//! signed weights and `u_j` their smoothed unigram distributions, a token *leans toxic* when
//!
//! `r(v) = Σ_j −w_j · ln u_j(v) > ln ratio`
//!
//! (for the usual pair, `u_toxic(v) / u_nontoxic(v) > ratio`: the direction in which the
//! paper's rule with near-uniform experts would push it). A row whose base distribution puts
//! less than `skip` probability on the leaning tokens is not searched and gets no bias. The
//! leaning set depends only on the stores' statistics, so the engine computes it once per
//! store view, and the per-row test is one log-sum-exp over the logits plus a sum over the set.
//!
//! With `skip_in_nucleus` the mass is counted inside the rule's own base nucleus (the
//! `filter_p` cut, renormalised) instead of over the whole distribution: a leaning token the
//! nucleus drops is sampled with or without the search, so its mass is no reason to search.
//! That costs one nucleus per row (a copy of the row and a few passes over it).

use super::{RuleScratch, TokenPrior};

/// The default toxic-to-non-toxic frequency ratio above which a token leans toxic.
pub const DEFAULT_SKIP_RATIO: f32 = 4.0;

/// The tokens of a `vocab`-sized vocabulary that lean toxic by more than `ratio` (see the
/// module docs), ascending, into `out` (cleared first). `stores` holds each searched store's
/// signed weight and statistics.
pub fn leaning_tokens(stores: &[(f32, &TokenPrior)], vocab: usize, ratio: f32, out: &mut Vec<u32>) {
    out.clear();
    let threshold = (ratio as f64).ln();
    for v in 0..vocab {
        let r: f64 = stores
            .iter()
            .map(|&(w, p)| -(w as f64) * p.log_prob(v as u32) as f64)
            .sum();
        if r > threshold {
            out.push(v as u32);
        }
    }
}

/// The probability that `softmax(logits)` gives to `tokens` (ids below `logits.len()`;
/// `-inf` logits are masked tokens). The logits are finite or `-inf`, with at least one finite
/// ([`super::check_logits`]).
pub fn leaning_mass(logits: &[f32], tokens: &[u32]) -> f64 {
    let max = super::exp::max(logits);
    let total = super::exp::sum_exp(logits, max);
    gathered_exp(logits, tokens, max) / total
}

/// `Σ e^(x_t − shift)` over the tokens' values.
fn gathered_exp(values: &[f32], tokens: &[u32], shift: f32) -> f64 {
    // The tokens' values gathered a block at a time, so that their e^x runs in the vector
    // kernels too (a few thousand tokens one by one cost as much as a whole row's sum).
    const BLOCK: usize = 64;
    let (mut z, mut e) = ([0f32; BLOCK], [0f32; BLOCK]);
    let mut sum = 0f64;
    let mut ids = tokens.iter().filter_map(|&t| values.get(t as usize));
    loop {
        let mut n = 0;
        for (slot, &x) in z.iter_mut().zip(ids.by_ref()) {
            *slot = x;
            n += 1;
        }
        if n == 0 {
            break;
        }
        super::exp::exp_into(&z[..n], shift, &mut e[..n]);
        sum += e[..n].iter().map(|&v| v as f64).sum::<f64>();
    }
    sum
}

/// The probability that the rule's base nucleus gives to `tokens`: `logits` normalised, cut to
/// its `filter_p` nucleus exactly as the rule cuts it ([`super::nucleus_filter`]) and
/// renormalised over the kept tokens. `filter_p` ≥ 1 keeps every token ([`leaning_mass`]).
/// The logits are finite or `-inf`, with at least one finite ([`super::check_logits`]); the
/// row is copied into `scratch`, which keeps the buffer for the next call.
pub fn leaning_mass_in_nucleus(
    logits: &[f32],
    tokens: &[u32],
    filter_p: f32,
    scratch: &mut RuleScratch,
) -> f64 {
    if filter_p >= 1.0 {
        return leaning_mass(logits, tokens);
    }
    let mut row = std::mem::take(&mut scratch.row);
    row.clear();
    row.extend_from_slice(logits);
    let mass = if super::log_softmax_in_place(&mut row).is_ok() {
        super::nucleus_filter(&mut row, filter_p, scratch);
        leaning_mass(&row, tokens)
    } else {
        0.0
    };
    scratch.row = row;
    mass
}

/// The skip decision counted in the nucleus, for a row whose answer is written over its own
/// logits (the dense in-place form): `z` holds raw logits. A skipped row's answer is the α 0
/// one, and that answer *is* the renormalised nucleus the decision measures, so the row's
/// answer is computed first (in `scratch`, by [`super::apply_sparse_in_place`] of an
/// unchanged row, exactly as the rule would answer it) and the leaning mass read off it.
/// Returns whether the row is skipped: then `z` holds its final answer and the rule has
/// nothing left to do for it; otherwise `z` is untouched. Deciding and answering a skipped
/// row cost one nucleus instead of two.
///
/// The mass is [`leaning_mass_in_nucleus`]'s to f32 rounding (the one-pass answer and the
/// decision's separate passes round differently), so a row within rounding of `skip` may
/// fall either way.
pub fn skip_in_nucleus_in_place(
    z: &mut [f32],
    tokens: &[u32],
    filter_p: f32,
    skip: f64,
    scratch: &mut RuleScratch,
) -> Result<bool, super::RuleError> {
    let mut row = std::mem::take(&mut scratch.row);
    row.clear();
    row.extend_from_slice(z);
    // The default row is the unchanged one (no pairs, so nothing allocated).
    let unchanged = super::SparseRow::default();
    let skipped = super::apply_sparse_in_place(&mut row, &unchanged, filter_p, scratch).map(|()| {
        // Normalised log-probabilities: no max or total to find, only the tokens' own e^x.
        let skipped = gathered_exp(&row, tokens, 0.0) < skip;
        if skipped {
            z.copy_from_slice(&row);
        }
        skipped
    });
    scratch.row = row;
    skipped
}
