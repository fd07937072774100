//! The Goodtriever decoding rule (docs/architecture.md §1): pure functions over slices.
//!
//! Everything here is per row: a row's answer never depends on the other rows of its batch
//! (the reference implementation took the patch minimum over the whole batch; we do not).
//! Nothing in this module allocates once its [`RuleScratch`] has grown to the vocabulary size,
//! so a decoding step can call it without touching the allocator.
//!
//! The rule is computed in its *sparse form*: for a token retrieved by no store, every store's
//! patched log-probability equals that store's patch minimum, so the product of experts adds
//! the same constant to all such tokens, and a constant vanishes under softmax. The whole rule
//! is therefore "add a bias to at most `k` tokens per store, then renormalise", which is what
//! the sidecar sends to clients and what [`apply_sparse`] turns back into the dense answer.
//!
//! Two variants keep that shape and leave the paper's rule as their zero setting: the
//! per-step toxicity gate (`gate`, [`toxicity_gate`]), which scales a row's α by the evidence
//! its neighbours give that the context is toxic, and prior-corrected experts (`prior`,
//! [`TokenPrior`]), which score a token against its store's own next-token frequencies.
//! A third knob, `skip`, lets the engine leave a row unsearched (and unbiased) when its base
//! distribution gives almost nothing to tokens that lean toxic ([`leaning_tokens`]).

use crate::limits::{MAX_ALPHA, MAX_K, MAX_LOGIT, MAX_PRIOR, MIN_PRIOR};

mod exp;
mod gate;
mod prior;
mod skip;

pub use gate::{toxicity_gate, GateReading};
pub use prior::{TokenPrior, PRIOR_PSEUDOCOUNT};
pub use skip::{
    leaning_mass, leaning_mass_in_nucleus, leaning_tokens, skip_in_nucleus_in_place,
    DEFAULT_SKIP_RATIO,
};

/// Log-probability given to tokens a store did not retrieve (the paper's `ZERO_LOG`).
pub const ZERO_LOG: f32 = -10_000.0;
/// Log-probabilities at or below this are patched to the store's smallest retrieved one.
pub const PATCH: f32 = -50.0;

/// Why a set of rule parameters was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    /// `alpha` is NaN, infinite, or larger in magnitude than [`MAX_ALPHA`].
    #[error("alpha must be a number between -{MAX_ALPHA} and {MAX_ALPHA} (negative steers toward the toxic store), got {0}")]
    Alpha(f32),
    /// `temperature` is not a finite positive number.
    #[error("temperature must be a finite number > 0, got {0}")]
    Temperature(f32),
    /// `k` is 0 or above [`MAX_K`].
    #[error("k must be between 1 and {MAX_K}, got {0}")]
    K(usize),
    /// `filter_p` is outside (0, 1].
    #[error("filter_p must be in (0, 1], got {0}")]
    FilterP(f32),
    /// `lambda` is outside [0, 1].
    #[error("lambda must be in [0, 1], got {0}")]
    Lambda(f32),
    /// `gate` is outside [0, 1].
    #[error("gate must be in [0, 1] (0: the paper's rule, 1: fully gated), got {0}")]
    Gate(f32),
    /// `gate_neighbours` is 0 or above twice [`MAX_K`].
    #[error("gate_neighbours must be between 1 and {max}, got {0}", max = 2 * MAX_K)]
    GateNeighbours(usize),
    /// `prior` is neither 0 nor in [[`MIN_PRIOR`], [`MAX_PRIOR`]].
    #[error("prior must be 0 (off) or between {MIN_PRIOR} and {MAX_PRIOR}, got {0}")]
    Prior(f32),
    /// `skip` is outside [0, 1).
    #[error("skip must be in [0, 1) (0: search every row), got {0}")]
    Skip(f32),
    /// `skip_ratio` is not a finite number ≥ 1.
    #[error("skip_ratio must be a finite number >= 1, got {0}")]
    SkipRatio(f32),
    /// A store's signed weight is NaN or infinite.
    #[error("store weight {index} must be finite, got {weight}")]
    Weight {
        /// The store's position in the ensemble, 0-based.
        index: usize,
        /// The weight given.
        weight: f32,
    },
}

/// Why a rule evaluation was refused. Every case is a caller bug or a store/model mismatch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// The rule parameters are out of range.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// A row of logits is not vocabulary-sized.
    #[error("logits have {got} entries, expected the vocabulary size {expected}")]
    LogitsLen {
        /// Entries received.
        got: usize,
        /// The vocabulary size.
        expected: usize,
    },
    /// A logit is NaN or +∞ (the index is given); −∞ is a legal mask.
    #[error("logits contain NaN or +inf at token {0}")]
    NonFiniteLogit(usize),
    /// A logit is above [`MAX_LOGIT`].
    #[error("logit {value} at token {index} is above {MAX_LOGIT}: send the model's raw logits (values this large cannot be normalised in f32)")]
    LogitTooLarge {
        /// The token.
        index: usize,
        /// The logit sent.
        value: f32,
    },
    /// Every logit is −∞, so there is nothing to normalise.
    #[error("all logits are -inf: there is no distribution to adjust")]
    EmptyDistribution,
    /// A neighbour's (or a sparse row's) token id is not below the vocabulary size.
    #[error("a datastore returned token id {token}, outside the vocabulary of {vocab} tokens (store built for another model?)")]
    TokenOutOfVocab {
        /// The offending token id.
        token: u32,
        /// The vocabulary size it must be below.
        vocab: usize,
    },
    /// A neighbour's squared distance is NaN or infinite.
    #[error("a datastore returned a non-finite distance {0}")]
    NonFiniteDistance(f32),
    /// The gate needs every store's size and store `store` (0-based) gave none.
    #[error("the gate needs each store's row count, and store {store} has none")]
    GateNeedsRows {
        /// The store's position among the experts.
        store: usize,
    },
    /// Prior-corrected experts need every store's token statistics, and store `store` has
    /// none (or none covering a token it returned).
    #[error("prior-corrected experts need each store's token statistics, and store {store} has none (a local store computes them; a remote one may not)")]
    NoPrior {
        /// The store's position among the experts.
        store: usize,
    },
    /// A variant (the gate, the prior) was asked of a mode it does not apply to.
    #[error("{what} does not apply to mode {mode}: {why}")]
    NotInMode {
        /// The variant asked for.
        what: &'static str,
        /// The mode.
        mode: Mode,
        /// Which modes it applies to, in words.
        why: &'static str,
    },
    /// A store contributed no neighbours to a row, or a single-store mode got no expert.
    #[error("no neighbours were retrieved for a store (is it empty?)")]
    NoNeighbours,
}

/// The knobs of the rule, with the paper's defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleParams {
    /// Strength of the control (α): 0 switches it off, the paper's 2 is the default, |α| is at
    /// most [`MAX_ALPHA`]; a negative α steers toward the toxic store.
    pub alpha: f32,
    /// Temperature of the kNN softmax over distances (T).
    pub temperature: f32,
    /// Neighbours retrieved per store (k).
    pub k: usize,
    /// Base nucleus mass kept before the experts are combined; 1 keeps every token.
    pub filter_p: f32,
    /// Interpolation weight of the kNN distribution in kNN-LM mode (λ).
    pub lambda: f32,
    /// Strength of the per-step toxicity gate (γ ∈ [0, 1], ensemble only): each row's α is
    /// scaled by `1 − γ + γ·g`, g the evidence from its neighbours that the context is toxic
    /// ([`toxicity_gate`]). 0 is the paper's rule.
    #[serde(default)]
    pub gate: f32,
    /// How many nearest neighbours of all stores together the gate counts (m).
    #[serde(default = "default_gate_neighbours")]
    pub gate_neighbours: usize,
    /// Weight ρ of each store's own next-token prior in its expert (ensemble and toxic-only):
    /// above 0 an expert scores `ln(1 + p(v) / (ρ·u(v)))` instead of the paper's patched
    /// `ℓ(v) − m`, so the stores' frequency differences stop being a bias ([`TokenPrior`];
    /// docs/architecture.md §1.4). 0 is the paper's rule.
    #[serde(default)]
    pub prior: f32,
    /// Skip threshold ε ∈ [0, 1) (ensemble, dense form): a row whose base distribution gives
    /// less than ε to the tokens that lean toxic by more than `skip_ratio` is not searched and
    /// gets no bias ([`leaning_tokens`]). 0 searches every row, as the paper does.
    #[serde(default)]
    pub skip: f32,
    /// How much more often (toxic over non-toxic store frequency) a token must be predicted
    /// to count as leaning toxic for `skip`.
    #[serde(default = "default_skip_ratio")]
    pub skip_ratio: f32,
    /// Whether `skip` counts the leaning tokens' probability inside the rule's base nucleus
    /// (`filter_p`, renormalised) instead of over the whole base distribution
    /// ([`leaning_mass_in_nucleus`]): tokens the nucleus drops are no reason to search.
    #[serde(default)]
    pub skip_in_nucleus: bool,
}

fn default_skip_ratio() -> f32 {
    DEFAULT_SKIP_RATIO
}

/// The gate's default neighbour count: the nearest few dozen of 2k say where the context is;
/// all 2k (near-equal distances) say only how big the stores are.
pub const DEFAULT_GATE_NEIGHBOURS: usize = 64;

fn default_gate_neighbours() -> usize {
    DEFAULT_GATE_NEIGHBOURS
}

impl Default for RuleParams {
    fn default() -> Self {
        Self {
            alpha: 2.0,
            temperature: 100.0,
            k: 1024,
            filter_p: 0.9,
            lambda: 0.25,
            gate: 0.0,
            gate_neighbours: DEFAULT_GATE_NEIGHBOURS,
            prior: 0.0,
            skip: 0.0,
            skip_ratio: DEFAULT_SKIP_RATIO,
            skip_in_nucleus: false,
        }
    }
}

impl RuleParams {
    /// Checks every knob's range: |α| ≤ [`MAX_ALPHA`], T finite and > 0, k in 1..=[`MAX_K`], filter_p in
    /// (0, 1], λ in [0, 1], γ in [0, 1], m in 1..=2·[`MAX_K`], ρ 0 or in [[`MIN_PRIOR`], [`MAX_PRIOR`]], skip in [0, 1), skip_ratio finite and ≥ 1. The engine calls it on every request's options, so the rule's
    /// functions can assume valid parameters.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.alpha.is_nan() || self.alpha.abs() > MAX_ALPHA {
            return Err(ParamError::Alpha(self.alpha));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(ParamError::Temperature(self.temperature));
        }
        if self.k == 0 || self.k > MAX_K {
            return Err(ParamError::K(self.k));
        }
        if !(self.filter_p > 0.0 && self.filter_p <= 1.0) {
            return Err(ParamError::FilterP(self.filter_p));
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return Err(ParamError::Lambda(self.lambda));
        }
        if !(0.0..=1.0).contains(&self.gate) {
            return Err(ParamError::Gate(self.gate));
        }
        if self.gate_neighbours == 0 || self.gate_neighbours > 2 * MAX_K {
            return Err(ParamError::GateNeighbours(self.gate_neighbours));
        }
        if !(self.prior == 0.0 || (MIN_PRIOR..=MAX_PRIOR).contains(&self.prior)) {
            return Err(ParamError::Prior(self.prior));
        }
        if !(0.0..1.0).contains(&self.skip) {
            return Err(ParamError::Skip(self.skip));
        }
        if !(self.skip_ratio.is_finite() && self.skip_ratio >= 1.0) {
            return Err(ParamError::SkipRatio(self.skip_ratio));
        }
        Ok(())
    }
}

/// How the experts are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Product of experts over signed stores: `s = ℓ + Σ_j w_j·α·(ℓ_j − m_j)`. With a
    /// non-toxic store at +1 and a toxic one at −1 this is the paper's Goodtriever ensemble.
    Ensemble,
    /// Anti-expert only: `s = (1 + α)·ℓ − α·ℓ⁻`.
    ToxicOnly,
    /// kNN-LM interpolation with one store: `out = ln((1 − λ)·e^ℓ + λ·p_S)`.
    KnnLm,
}

impl Mode {
    /// The mode's kebab-case name, as on the command line, in configs and in messages; the
    /// inverse of its `FromStr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ensemble => "ensemble",
            Mode::ToxicOnly => "toxic-only",
            Mode::KnnLm => "knn-lm",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ensemble" => Ok(Mode::Ensemble),
            "toxic-only" | "toxic_only" => Ok(Mode::ToxicOnly),
            "knn-lm" | "knn_lm" => Ok(Mode::KnnLm),
            other => Err(format!(
                "unknown mode {other:?}: expected ensemble, toxic-only or knn-lm"
            )),
        }
    }
}

/// One row's answer in sparse form.
///
/// `Bias`: the client computes `log_softmax(scale · nucleus(log_softmax(z)) + bias)` where the
/// bias is zero for tokens not listed. `Mixture`: the client mixes `(1 − λ)·e^ℓ + λ·p` with the
/// kNN distribution, listed as natural-log probabilities `ln p` (p is zero elsewhere), and takes
/// the log; logs, because far neighbours' masses underflow `f32`.
#[derive(Debug, Clone, PartialEq)]
pub enum SparseRow {
    /// The ensemble and toxic-only answer: scale the filtered log-probabilities, add biases.
    Bias {
        /// Factor on the base log-probabilities: 1 for the ensemble, 1 + α for toxic-only.
        scale: f32,
        /// `(token, bias)` pairs for the tokens any store retrieved, sorted by token id.
        pairs: Vec<(u32, f32)>,
    },
    /// The kNN-LM answer: interpolate with the kNN distribution.
    Mixture {
        /// Weight of the kNN distribution (λ), in [0, 1].
        lambda: f32,
        /// `(token, ln p)` pairs of the kNN distribution, sorted by token id.
        log_probs: Vec<(u32, f32)>,
    },
}

impl SparseRow {
    /// The row's (token, value) pairs: biases, or log-probabilities for a mixture.
    pub fn pairs(&self) -> &[(u32, f32)] {
        match self {
            SparseRow::Bias { pairs, .. } => pairs,
            SparseRow::Mixture { log_probs, .. } => log_probs,
        }
    }
}

impl Default for SparseRow {
    fn default() -> Self {
        SparseRow::Bias {
            scale: 1.0,
            pairs: Vec::new(),
        }
    }
}

/// One store's neighbours for one row, as parallel `(token, squared L2 distance)` pairs, with
/// the signed weight the store carries in the ensemble and what the variants need of the
/// store: its size (the gate) and its token prior (prior-corrected experts).
#[derive(Debug, Clone, Copy)]
pub struct Expert<'a, N> {
    /// The store's signed weight `w_j` (ignored by the single-store modes).
    pub weight: f32,
    /// The row's neighbours from that store, any order; at most `k` of them.
    pub neighbours: &'a [N],
    /// The store's live rows; 0 when unknown (the gate then refuses the row).
    pub rows: u64,
    /// The store's `ln u(v)` per token ([`TokenPrior::log_prior`]); empty when unknown
    /// (prior-corrected experts then refuse the row).
    pub log_prior: &'a [f32],
}

impl<'a, N> Expert<'a, N> {
    /// An expert with neither size nor prior: enough for the paper's rule.
    pub fn new(weight: f32, neighbours: &'a [N]) -> Self {
        Self {
            weight,
            neighbours,
            rows: 0,
            log_prior: &[],
        }
    }

    /// The store's size, for the gate.
    pub fn with_rows(self, rows: u64) -> Self {
        Self { rows, ..self }
    }

    /// The store's token prior, for prior-corrected experts.
    pub fn with_prior(self, log_prior: &'a [f32]) -> Self {
        Self { log_prior, ..self }
    }
}

/// What the rule needs to know of a neighbour; implemented by the datastore's result type.
///
/// A trait rather than a struct so the rule reads the datastore's own result buffers (and
/// tests' plain `(token, distance)` tuples) without a copy per neighbour.
pub trait Retrieved {
    /// The token that followed the neighbour's context: the value the store holds for it.
    fn token(&self) -> u32;
    /// The squared L2 distance from the query to the neighbour's key; must be finite.
    fn sq_dist(&self) -> f32;
}

impl Retrieved for (u32, f32) {
    fn token(&self) -> u32 {
        self.0
    }
    fn sq_dist(&self) -> f32 {
        self.1
    }
}

/// Reusable buffers. Vocabulary-sized arrays are kept zeroed between calls: only the entries a
/// call touched are reset, so a call costs O(k) (plus a scan of V/64 bitmap words), not O(V),
/// outside the dense paths.
#[derive(Debug, Default)]
pub struct RuleScratch {
    /// Per-token accumulator for one store's kNN probability mass. `f64`, so that the mass of a
    /// far neighbour (e^-150 is common with T = 100) does not underflow before its log is taken.
    mass: Vec<f64>,
    mass_touched: Vec<u32>,
    /// Per-token accumulator for the combined bias over all stores.
    bias: Vec<f32>,
    /// One bit per token whose `bias` slot was touched: reading the set bits in order lists
    /// them sorted and once each, which sorting a list of them cost several times over.
    bias_touched: Vec<u64>,
    /// Exponentiated, unnormalised kNN weights, one per neighbour.
    weights: Vec<f64>,
    /// The nucleus's histogram.
    nucleus: NucleusHistogram,
    /// Each token's probability, for the nucleus.
    probs: Vec<f32>,
    /// The gate's (distance, store) keys.
    gate_keys: Vec<u64>,
    /// Each bias pair's shifted, biased logit, for the one-pass bias.
    pair_y: Vec<f32>,
    /// A copy of one row of logits, for the skip decision's nucleus.
    row: Vec<f32>,
}

impl RuleScratch {
    /// An empty scratch; it grows to the vocabulary size on first use and stays there.
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure_vocab(&mut self, vocab: usize) {
        if self.mass.len() < vocab {
            self.mass.resize(vocab, 0.0);
            self.bias.resize(vocab, 0.0);
            self.bias_touched.resize(vocab.div_ceil(64), 0);
        }
    }
}

/// `z ← z − logsumexp(z)`. Entries at −∞ stay −∞. Returns an error when every entry is −∞.
pub fn log_softmax_in_place(z: &mut [f32]) -> Result<(), RuleError> {
    let lse = logsumexp(z);
    if lse == f32::NEG_INFINITY {
        return Err(RuleError::EmptyDistribution);
    }
    for x in z.iter_mut() {
        *x -= lse;
    }
    Ok(())
}

/// Numerically stable `ln Σ e^z`; −∞ for an empty or all −∞ slice.
pub fn logsumexp(z: &[f32]) -> f32 {
    let max = exp::max(z);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    max + exp::sum_exp(z, max).ln() as f32
}

fn logaddexp(a: f64, b: f64) -> f64 {
    let hi = a.max(b);
    if hi == f64::NEG_INFINITY {
        return hi;
    }
    hi + ((a - hi).exp() + (b - hi).exp()).ln()
}

/// Histogram resolution of the nucleus filter: buckets 1/64 nat wide below the largest
/// log-probability, over 48 nats, and one last bucket for everything further down (at most
/// e^-48 of mass per token there).
const NUCLEUS_BUCKETS_PER_NAT: f32 = 64.0;
const NUCLEUS_BUCKETS: usize = 48 * 64 + 1;

/// The histogram bucket of log-probability `x` when the largest is `max`. Non-increasing in
/// `x`, so every token of a bucket ranks above every token of a later one. `as` saturates:
/// −∞ lands in the last bucket.
#[cfg(feature = "model")]
fn nucleus_bucket(max: f32, x: f32) -> usize {
    (((max - x) * NUCLEUS_BUCKETS_PER_NAT) as usize).min(NUCLEUS_BUCKETS - 1)
}

/// A key whose ascending order is the nucleus's rank order: larger log-probability first,
/// then the smaller token id, so the kept set is well defined even under ties.
pub(crate) fn rank_key(x: f32, token: u32) -> u64 {
    // `+ 0.0` turns −0 into +0, which compare equal as floats but not as bits.
    let bits = (x + 0.0).to_bits();
    let ascending = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    };
    (u64::from(!ascending) << 32) | u64::from(token)
}

/// Base nucleus filter over normalised log-probabilities `l`: keeps rank `r` iff `r = 0` or
/// the probability mass of the ranks above it is below `filter_p`; sets the rest to −∞.
///
/// Nothing is sorted but the tokens near the cut: one pass adds each token's mass into a
/// histogram of log-probability buckets, the cumulative mass over buckets finds the bucket
/// where it reaches `filter_p`, and only that bucket's tokens are ranked exactly. Cost is a few
/// passes over the vocabulary whatever the shape of the distribution (a flat one used to mean
/// sorting most of it).
pub fn nucleus_filter(l: &mut [f32], filter_p: f32, scratch: &mut RuleScratch) {
    if filter_p >= 1.0 || l.is_empty() {
        return;
    }
    let max = exp::max(l);
    if max == f32::NEG_INFINITY {
        return;
    }
    let hist = &mut scratch.nucleus;
    // `l` is normalised: every entry is ≤ 0, or above it by a rounding error that the
    // polynomial (good to |x| ≤ ln 2 / 2 after reduction) takes in its stride.
    let p = &mut scratch.probs;
    p.resize(l.len(), 0.0);
    exp::exp_into(l, 0.0, p);
    hist.fill(max, l, p);
    let cut = hist.cut(
        filter_p as f64,
        |t| rank_key(l[t], t as u32),
        |key| p[key as u32 as usize] as f64,
    );
    let Some(cut) = cut else {
        // Rounding left the total below filter_p: every token is kept.
        return;
    };
    hist.write_cut(&cut, l, |x| x);
}

/// A histogram of probability mass over log-probability buckets, for finding where a nucleus
/// ends without sorting (see [`nucleus_filter`]; the generator's sampler uses it too).
/// Elements are pushed in order and named by their position.
#[derive(Debug, Default)]
pub(crate) struct NucleusHistogram {
    /// Mass per bucket.
    mass: Vec<f64>,
    /// Each element's bucket.
    bucket: Vec<u16>,
    /// Rank keys of the elements in the cut bucket.
    keys: Vec<u64>,
}

impl NucleusHistogram {
    pub(crate) fn clear(&mut self) {
        self.mass.clear();
        self.mass.resize(NUCLEUS_BUCKETS, 0.0);
        self.bucket.clear();
    }

    /// Adds the next element: log-weight `x` (the largest is `max`) of weight `w`.
    #[cfg(feature = "model")]
    pub(crate) fn push(&mut self, max: f32, x: f32, w: f64) {
        let b = nucleus_bucket(max, x);
        self.mass[b] += w;
        self.bucket.push(b as u16);
    }

    /// [`Self::clear`], then every element of `x` (log-weights, the largest `max`) with weight
    /// `w`, in order. One pass that vectorises computes the buckets, a second adds the masses:
    /// pushing one at a time cost a dozen cycles an element, the most of any vocabulary pass.
    pub(crate) fn fill(&mut self, max: f32, x: &[f32], w: &[f32]) {
        debug_assert_eq!(x.len(), w.len());
        self.clear();
        self.bucket.resize(x.len(), 0);
        const LAST: f32 = (NUCLEUS_BUCKETS - 1) as f32;
        for (b, &v) in self.bucket.iter_mut().zip(x) {
            // Clamped as a float into [0, LAST] (−∞ becomes the last bucket, a rounding error
            // above `max` bucket 0, as `nucleus_bucket` puts them), so the truncation needs no
            // saturation: a plain `cvttps2dq`, four or more lanes at once. The saturating `as`
            // was a scalar conversion with NaN tests per element, half of this function.
            // Not `clamp`, which passes NaN through: the truncation below must never see one.
            #[allow(clippy::manual_clamp)]
            let bucket = ((max - v) * NUCLEUS_BUCKETS_PER_NAT).min(LAST).max(0.0);
            // SAFETY: `bucket` is finite and in [0, LAST] (`min` then `max` map NaN there too).
            *b = unsafe { bucket.to_int_unchecked::<i32>() } as u16;
        }
        let mass = &mut self.mass[..NUCLEUS_BUCKETS];
        for (&b, &v) in self.bucket.iter().zip(w) {
            debug_assert!((b as usize) < NUCLEUS_BUCKETS);
            // SAFETY: every bucket was clamped to at most LAST = NUCLEUS_BUCKETS − 1 above.
            unsafe { *mass.get_unchecked_mut(b as usize) += v as f64 };
        }
    }

    /// The total mass pushed (the top-p cut of the sampler and of the fused rule need it).
    pub(crate) fn total(&self) -> f64 {
        self.mass.iter().sum()
    }

    /// Where the nucleus reaching `target` mass ends. `key(j)` is element j's [`rank_key`];
    /// `weight(key)` the mass of the element with that key. `None` when the whole histogram
    /// stays below the target (rounding): every element is kept.
    pub(crate) fn cut(
        &mut self,
        target: f64,
        key: impl Fn(usize) -> u64,
        weight: impl Fn(u64) -> f64,
    ) -> Option<NucleusCut> {
        // The cut bucket: the first whose mass takes the cumulative mass to the target. Every
        // element before it has less than the target above it (kept); every element after it
        // has at least that much (dropped).
        let mut before = 0.0f64;
        let bucket = self.mass.iter().position(|&m| {
            let reached = before + m >= target;
            if !reached {
                before += m;
            }
            reached
        })? as u16;
        self.keys.clear();
        // The cut bucket holds a few hundred of ~50k elements: a test per block that
        // vectorises finds the blocks that hold any, and only those are walked one by one.
        const BLOCK: usize = 16;
        for (c, block) in self.bucket.chunks(BLOCK).enumerate() {
            if block.iter().fold(false, |any, &b| any | (b == bucket)) {
                for (i, &b) in block.iter().enumerate() {
                    if b == bucket {
                        self.keys.push(key(c * BLOCK + i));
                    }
                }
            }
        }
        self.keys.sort_unstable();
        let mut cum = before;
        let mut first_dropped = None;
        let mut dropped_from = self.keys.len();
        for (r, &k) in self.keys.iter().enumerate() {
            // `r > 0` only matters for the top-ranked element (then `before` is zero).
            if r > 0 && cum >= target {
                first_dropped = Some(k);
                dropped_from = r;
                break;
            }
            cum += weight(k);
        }
        Some(NucleusCut {
            bucket,
            first_dropped,
            dropped_from,
            kept: cum,
        })
    }

    /// Writes `kept(x)` over every element `x` of `l` that `cut` keeps and −∞ over the rest,
    /// for rank keys whose low 32 bits are the element's position (as
    /// [`rank_key`]`(x, position)` makes them). The bucket test is a select, not a conditional
    /// store, so that the pass vectorises; then the cut bucket's dropped elements are masked.
    pub(crate) fn write_cut(&self, cut: &NucleusCut, l: &mut [f32], kept: impl Fn(f32) -> f32) {
        for (x, &b) in l.iter_mut().zip(&self.bucket) {
            *x = if b > cut.bucket {
                f32::NEG_INFINITY
            } else {
                kept(*x)
            };
        }
        for &k in &self.keys[cut.dropped_from..] {
            l[k as u32 as usize] = f32::NEG_INFINITY;
        }
    }

    /// Whether element `j`, whose rank key `key` computes, stays in the nucleus.
    pub(crate) fn keeps(&self, cut: &NucleusCut, j: usize, key: impl FnOnce() -> u64) -> bool {
        let b = self.bucket[j];
        b < cut.bucket || (b == cut.bucket && cut.first_dropped.is_none_or(|d| key() < d))
    }
}

/// Where a nucleus ends: every element of an earlier bucket is kept, every element of a later
/// one dropped, and in the cut bucket itself the elements ranked before `first_dropped`.
pub(crate) struct NucleusCut {
    bucket: u16,
    first_dropped: Option<u64>,
    /// Where `first_dropped` is among the cut bucket's sorted keys (their count if none is).
    dropped_from: usize,
    /// The mass of the kept elements, as `weight` gave it.
    kept: f64,
}

/// Adds one store's expert, times `weight`, to the scratch bias accumulator.
///
/// The paper's expert (`prior` `None`): `ℓ_S(v) − m_S`, with `ℓ_S` the log of the kNN
/// distribution over retrieved tokens, patched at [`PATCH`] to its per-row minimum `m_S`, so
/// patched and unretrieved tokens contribute exactly zero. The prior-corrected expert (`prior`
/// the store's `ln u` and ρ): `ln(1 + p_S(v)/(ρ·u_S(v)))`, zero for unretrieved tokens by
/// construction (module `prior`). `store` names the store in errors.
fn accumulate_expert<N: Retrieved>(
    neighbours: &[N],
    weight: f32,
    temperature: f32,
    vocab: usize,
    prior: Option<(&[f32], f32)>,
    store: usize,
    scratch: &mut RuleScratch,
) -> Result<(), RuleError> {
    if prior.is_some_and(|(log_prior, _)| log_prior.is_empty()) {
        return Err(RuleError::NoPrior { store });
    }
    knn_mass(neighbours, temperature, vocab, scratch)?;
    let RuleScratch {
        mass,
        mass_touched,
        bias,
        bias_touched,
        ..
    } = scratch;
    if let Some((log_prior, rho)) = prior {
        for &t in mass_touched.iter() {
            let p = std::mem::take(&mut mass[t as usize]);
            // A stored value is always counted in its store's prior; a shorter prior means
            // the statistics and the rows disagree, which must not pass silently.
            let &log_u = log_prior
                .get(t as usize)
                .ok_or(RuleError::NoPrior { store })?;
            bias[t as usize] += weight * prior::corrected_score(p, log_u, rho) as f32;
            bias_touched[t as usize / 64] |= 1 << (t % 64);
        }
        mass_touched.clear();
        return Ok(());
    }
    let mut min_kept = f64::INFINITY;
    for &t in mass_touched.iter() {
        let lp = mass[t as usize].ln();
        mass[t as usize] = lp;
        if lp > PATCH as f64 && lp < min_kept {
            min_kept = lp;
        }
    }
    for &t in mass_touched.iter() {
        let lp = std::mem::take(&mut mass[t as usize]);
        let centred = if lp > PATCH as f64 {
            (lp - min_kept) as f32
        } else {
            0.0
        };
        bias[t as usize] += weight * centred;
        bias_touched[t as usize / 64] |= 1 << (t % 64);
    }
    mass_touched.clear();
    Ok(())
}

/// Fills `scratch.mass` with the kNN distribution `p_S(v) = Σ_i softmax(−d_i/T)·[v_i = v]` and
/// `scratch.mass_touched` with the distinct retrieved tokens of nonzero mass, in the order they
/// were first retrieved.
fn knn_mass<N: Retrieved>(
    neighbours: &[N],
    temperature: f32,
    vocab: usize,
    scratch: &mut RuleScratch,
) -> Result<(), RuleError> {
    if neighbours.is_empty() {
        return Err(RuleError::NoNeighbours);
    }
    scratch.ensure_vocab(vocab);
    let mut dmin = f32::INFINITY;
    for n in neighbours {
        let d = n.sq_dist();
        if !d.is_finite() {
            return Err(RuleError::NonFiniteDistance(d));
        }
        if n.token() as usize >= vocab {
            return Err(RuleError::TokenOutOfVocab {
                token: n.token(),
                vocab,
            });
        }
        dmin = dmin.min(d);
    }
    let weights = &mut scratch.weights;
    weights.clear();
    let mut total = 0.0f64;
    for n in neighbours {
        let w = (-(n.sq_dist() - dmin) as f64 / temperature as f64).exp();
        total += w;
        weights.push(w);
    }
    let inv = 1.0 / total;
    for (n, &w) in neighbours.iter().zip(weights.iter()) {
        let p = w * inv;
        // A far neighbour's weight can underflow to zero: it adds nothing, and skipping it
        // keeps a slot at zero exactly until its token's first mass, so each token is listed
        // once, without sorting the list to deduplicate it.
        if p == 0.0 {
            continue;
        }
        let t = n.token();
        let slot = &mut scratch.mass[t as usize];
        if *slot == 0.0 {
            scratch.mass_touched.push(t);
        }
        *slot += p;
    }
    Ok(())
}

/// Calls `f` with every token whose bit is set, in increasing order, and clears the bits.
fn for_each_touched(bits: &mut [u64], mut f: impl FnMut(u32)) {
    for (w, word) in bits.iter_mut().enumerate() {
        if *word == 0 {
            continue;
        }
        let mut rest = std::mem::take(word);
        while rest != 0 {
            f(w as u32 * 64 + rest.trailing_zeros());
            rest &= rest - 1;
        }
    }
}

/// Moves the accumulated bias into `pairs` (sorted by token id, zeros dropped) and re-zeroes
/// the accumulator.
fn drain_bias(scratch: &mut RuleScratch, pairs: &mut Vec<(u32, f32)>) {
    pairs.clear();
    let RuleScratch {
        bias, bias_touched, ..
    } = scratch;
    for_each_touched(bias_touched, |t| {
        let b = std::mem::take(&mut bias[t as usize]);
        if b != 0.0 {
            pairs.push((t, b));
        }
    });
}

/// Sparse form of the ensemble rule: the per-token bias `Σ_j α·w_j·(ℓ_j(v) − m_j)` over the
/// tokens any store retrieved, written to `pairs` sorted by token id. With a gate (γ > 0)
/// α is scaled by the row's [`GateReading::alpha_factor`]; with a prior (ρ > 0) each expert
/// is prior-corrected (see [`RuleParams`]).
pub fn ensemble_bias<N: Retrieved>(
    experts: &[Expert<'_, N>],
    params: &RuleParams,
    vocab: usize,
    scratch: &mut RuleScratch,
    pairs: &mut Vec<(u32, f32)>,
) -> Result<(), RuleError> {
    params.validate()?;
    scratch.ensure_vocab(vocab);
    let alpha = if params.gate > 0.0 {
        let reading = toxicity_gate(experts, params.gate_neighbours, &mut scratch.gate_keys)?;
        params.alpha * reading.alpha_factor(params.gate)
    } else {
        params.alpha
    };
    for (index, e) in experts.iter().enumerate() {
        if !e.weight.is_finite() {
            return Err(ParamError::Weight {
                index,
                weight: e.weight,
            }
            .into());
        }
        let prior = (params.prior > 0.0).then_some((e.log_prior, params.prior));
        if let Err(err) = accumulate_expert(
            e.neighbours,
            alpha * e.weight,
            params.temperature,
            vocab,
            prior,
            index,
            scratch,
        ) {
            reset(scratch);
            return Err(err);
        }
    }
    drain_bias(scratch, pairs);
    Ok(())
}

/// Leaves the scratch zeroed after a failed call, so the next call starts clean.
fn reset(scratch: &mut RuleScratch) {
    for &t in &scratch.mass_touched {
        scratch.mass[t as usize] = 0.0;
    }
    scratch.mass_touched.clear();
    let RuleScratch {
        bias, bias_touched, ..
    } = scratch;
    for_each_touched(bias_touched, |t| bias[t as usize] = 0.0);
}

/// The sparse answer for one row in the given mode. `experts` carry their signed weights for
/// the ensemble; toxic-only and kNN-LM use exactly one expert (the toxic store, resp. the
/// store to interpolate with), whose weight is ignored.
pub fn sparse_row<N: Retrieved>(
    mode: Mode,
    experts: &[Expert<'_, N>],
    params: &RuleParams,
    vocab: usize,
    scratch: &mut RuleScratch,
    out: &mut SparseRow,
) -> Result<(), RuleError> {
    params.validate()?;
    check_variants(mode, params)?;
    match mode {
        Mode::Ensemble => {
            let pairs = out.bias_pairs(1.0);
            ensemble_bias(experts, params, vocab, scratch, pairs)
        }
        Mode::ToxicOnly => {
            let toxic = single(experts)?;
            let pairs = out.bias_pairs(1.0 + params.alpha);
            let e = [Expert::new(-1.0, toxic.neighbours)
                .with_rows(toxic.rows)
                .with_prior(toxic.log_prior)];
            ensemble_bias(&e, params, vocab, scratch, pairs)
        }
        Mode::KnnLm => {
            let store = single(experts)?;
            let log_probs = out.mixture_log_probs(params.lambda);
            knn_mass(store.neighbours, params.temperature, vocab, scratch)?;
            log_probs.clear();
            // Pairs go out sorted by token id, like every sparse row.
            scratch.mass_touched.sort_unstable();
            for &t in &scratch.mass_touched {
                let p = std::mem::take(&mut scratch.mass[t as usize]);
                log_probs.push((t, p.ln() as f32));
            }
            scratch.mass_touched.clear();
            Ok(())
        }
    }
}

/// Refuses a variant the mode does not have: the gate outside the ensemble (it weighs one
/// side's neighbours against the other's), the prior correction in kNN-LM mode (which mixes
/// probabilities rather than adding experts).
pub fn check_variants(mode: Mode, params: &RuleParams) -> Result<(), RuleError> {
    if params.gate > 0.0 && mode != Mode::Ensemble {
        return Err(RuleError::NotInMode {
            what: "the gate",
            mode,
            why: "it weighs the toxic stores' neighbours against the non-toxic ones', so it needs the ensemble",
        });
    }
    if params.skip > 0.0 && mode != Mode::Ensemble {
        return Err(RuleError::NotInMode {
            what: "skipping",
            mode,
            why: "a token leans toxic by the toxic stores' frequencies against the non-toxic ones', so it needs the ensemble",
        });
    }
    if params.prior > 0.0 && mode == Mode::KnnLm {
        return Err(RuleError::NotInMode {
            what: "the prior correction",
            mode,
            why:
                "kNN-LM mixes probabilities; the correction applies to the ensemble and toxic-only",
        });
    }
    Ok(())
}

fn single<'e, 'a, N>(experts: &'e [Expert<'a, N>]) -> Result<&'e Expert<'a, N>, RuleError> {
    experts.first().ok_or(RuleError::NoNeighbours)
}

impl SparseRow {
    /// Makes `self` the row that changes nothing (no bias, scale 1): what a skipped row gets.
    /// Keeps the allocation when it already was a `Bias` row.
    pub fn set_unchanged(&mut self) {
        self.bias_pairs(1.0).clear();
    }

    /// Turns `self` into a `Bias` row with the given scale and hands out its pair buffer,
    /// keeping the allocation when it already was one.
    fn bias_pairs(&mut self, new_scale: f32) -> &mut Vec<(u32, f32)> {
        if !matches!(self, SparseRow::Bias { .. }) {
            *self = SparseRow::Bias {
                scale: new_scale,
                pairs: Vec::new(),
            };
        }
        match self {
            SparseRow::Bias { scale, pairs } => {
                *scale = new_scale;
                pairs
            }
            SparseRow::Mixture { .. } => unreachable!("converted above"),
        }
    }

    fn mixture_log_probs(&mut self, new_lambda: f32) -> &mut Vec<(u32, f32)> {
        if !matches!(self, SparseRow::Mixture { .. }) {
            *self = SparseRow::Mixture {
                lambda: new_lambda,
                log_probs: Vec::new(),
            };
        }
        match self {
            SparseRow::Mixture { lambda, log_probs } => {
                *lambda = new_lambda;
                log_probs
            }
            SparseRow::Bias { .. } => unreachable!("converted above"),
        }
    }
}

/// Checks a row of logits: right length, no NaN or +∞ (−∞ is a legal mask).
pub fn check_logits(logits: &[f32], vocab: usize) -> Result<(), RuleError> {
    if logits.len() != vocab {
        return Err(RuleError::LogitsLen {
            got: logits.len(),
            expected: vocab,
        });
    }
    // One pass that vectorises (NaN and +∞ both fail `x <= MAX_LOGIT`); only a bad row pays
    // for finding which entry and why.
    if logits.iter().fold(true, |ok, &x| ok & (x <= MAX_LOGIT)) {
        return Ok(());
    }
    if let Some(i) = logits
        .iter()
        .position(|x| x.is_nan() || *x == f32::INFINITY)
    {
        return Err(RuleError::NonFiniteLogit(i));
    }
    if let Some(index) = logits.iter().position(|&x| x > MAX_LOGIT) {
        return Err(RuleError::LogitTooLarge {
            index,
            value: logits[index],
        });
    }
    Ok(())
}

/// Applies a sparse answer to raw logits: the dense rule. `out` receives normalised
/// log-probabilities (−∞ where filtered). This is what a client does with a sparse answer, and
/// how the dense form is computed, so the two agree by construction up to rounding.
pub fn apply_sparse(
    logits: &[f32],
    row: &SparseRow,
    filter_p: f32,
    scratch: &mut RuleScratch,
    out: &mut [f32],
) -> Result<(), RuleError> {
    check_logits(logits, out.len())?;
    out.copy_from_slice(logits);
    apply_sparse_in_place(out, row, filter_p, scratch)
}

/// [`apply_sparse`] over the logits' own buffer: `z` holds raw logits on entry and the
/// normalised adjusted log-probabilities on return. Saves a vocabulary-sized copy per row in
/// the generator's loop.
pub fn apply_sparse_in_place(
    z: &mut [f32],
    row: &SparseRow,
    filter_p: f32,
    scratch: &mut RuleScratch,
) -> Result<(), RuleError> {
    check_logits(z, z.len())?;
    if let SparseRow::Bias { scale, pairs } = row {
        if *scale == 1.0
            && bias_fits_one_pass(pairs, z.len())
            && bias_in_one_pass(z, pairs, filter_p, scratch)?
        {
            return Ok(());
        }
    }
    let vocab = z.len();
    let out = z;
    log_softmax_in_place(out)?;
    nucleus_filter(out, filter_p, scratch);
    match row {
        SparseRow::Bias { scale, pairs } => {
            if *scale != 1.0 {
                // Scale only kept tokens: the −∞ mask must survive a scale of zero or below.
                for x in out.iter_mut().filter(|x| x.is_finite()) {
                    *x *= scale;
                }
            }
            for &(t, b) in pairs {
                let slot = out
                    .get_mut(t as usize)
                    .ok_or(RuleError::TokenOutOfVocab { token: t, vocab })?;
                *slot += b;
            }
        }
        SparseRow::Mixture { lambda, log_probs } => {
            // In log space throughout: ln((1 − λ)·e^ℓ + λ·p) = logaddexp(ln(1 − λ) + ℓ, ln λ + ln p).
            let ln_keep = (1.0 - *lambda as f64).ln();
            for x in out.iter_mut() {
                *x = (ln_keep + *x as f64) as f32;
            }
            let ln_lambda = (*lambda as f64).ln();
            for &(t, lp) in log_probs {
                let slot = out
                    .get_mut(t as usize)
                    .ok_or(RuleError::TokenOutOfVocab { token: t, vocab })?;
                *slot = logaddexp(*slot as f64, ln_lambda + lp as f64) as f32;
            }
        }
    }
    log_softmax_in_place(out)
}

/// Whether [`bias_in_one_pass`] can apply `pairs`: tokens in the vocabulary, strictly
/// ascending (each token once, as [`sparse_row`] writes them), finite biases. Anything else
/// takes the general path, which handles (or refuses) it as it always has.
fn bias_fits_one_pass(pairs: &[(u32, f32)], vocab: usize) -> bool {
    pairs
        .iter()
        .all(|&(t, b)| (t as usize) < vocab && b.is_finite())
        && pairs.windows(2).all(|w| w[0].0 < w[1].0)
}

/// The unscaled bias row (what the paper's rule, the prior and a skipped row give) applied
/// with one write over the vocabulary after the nucleus, instead of a log-softmax before it and
/// another after the bias.
///
/// With `m` the largest logit, `K = Σ_kept e^(z−m)` the nucleus's mass, and `y_t = z_t − m`
/// (plus `b_t` for a pair token), every kept token becomes `(y_t − M) − ln Σ'` where
/// `M = max(0, y_pairs)` keeps every term at most 1 and
/// `Σ' = e^−M (K − Σ_pairs e^(z_t−m)) + Σ_pairs e^(y_t − M)` over the kept tokens: only the
/// pairs are visited besides the vocabulary's passes. Subtracting in that order makes the
/// dominant token's answer exact, as a second log-softmax over the rounded `y` would. The
/// nucleus is found on the unnormalised weights `e^(z−m)` with target `filter_p · Σ`, which
/// ranks and cuts the tokens as the normalised ones do (docs/architecture.md §1.1).
///
/// Returns false, with `z` untouched, when `Σ'` is too small for the subtraction that makes
/// it to be resolved in f64 (biases that take nearly all of the nucleus's mass away); the
/// general path normalises those exactly.
fn bias_in_one_pass(
    z: &mut [f32],
    pairs: &[(u32, f32)],
    filter_p: f32,
    scratch: &mut RuleScratch,
) -> Result<bool, RuleError> {
    // `Σ'` is at least 1 when the top token is kept unbiased and the rest is an error of a
    // few ulps of K ≤ V; below this that error could show in an f32 answer.
    const SMALLEST_RESOLVED_SUM: f64 = 1e-4;
    let max = exp::max(z);
    if max == f32::NEG_INFINITY {
        return Err(RuleError::EmptyDistribution);
    }
    let RuleScratch {
        nucleus: hist,
        probs: p,
        pair_y,
        ..
    } = scratch;
    let (cut, kept) = if filter_p < 1.0 {
        p.resize(z.len(), 0.0);
        exp::exp_into(z, max, p);
        hist.fill(max, z, p);
        let total = hist.total();
        let zs: &[f32] = z;
        match hist.cut(
            filter_p as f64 * total,
            |t| rank_key(zs[t], t as u32),
            |key| p[key as u32 as usize] as f64,
        ) {
            Some(cut) => {
                let kept = cut.kept;
                (Some(cut), kept)
            }
            // Rounding left the total below the target: every token is kept.
            None => (None, total),
        }
    } else {
        (None, exp::sum_exp(z, max))
    };
    let keeps = |t: usize, z: &[f32]| match &cut {
        Some(cut) => hist.keeps(cut, t, || rank_key(z[t], t as u32)),
        None => z[t] > f32::NEG_INFINITY,
    };
    // Each pair's biased value, −∞ for a pair outside the nucleus (it adds nothing below).
    pair_y.clear();
    let (mut top, mut rest) = (0f32, kept);
    // The nucleus pass already holds each token's weight e^(z−m) in `p`: the same value the
    // scalar `exp_le0` would give, without ~2k scalar evaluations per row.
    let weights = (filter_p < 1.0).then_some(&p[..]);
    for &(t, b) in pairs {
        let shifted = z[t as usize] - max;
        if keeps(t as usize, z) {
            let y = shifted + b;
            top = top.max(y);
            rest -= weights.map_or_else(|| exp::exp_le0(shifted), |w| w[t as usize]) as f64;
            pair_y.push(y);
        } else {
            pair_y.push(f32::NEG_INFINITY);
        }
    }
    // `top` is at least every pair's `y`: the vector pass of `exp` applies (−∞ adds nothing).
    let sum = (-(top as f64)).exp() * rest.max(0.0) + exp::sum_exp(pair_y, top);
    if !(sum.is_finite() && sum >= SMALLEST_RESOLVED_SUM) {
        return Ok(false);
    }
    let ln_sum = sum.ln() as f32;
    match &cut {
        Some(cut) => hist.write_cut(cut, z, |x| ((x - max) - top) - ln_sum),
        None => {
            for x in z.iter_mut() {
                *x = ((*x - max) - top) - ln_sum;
            }
        }
    }
    for (&(t, _), &y) in pairs.iter().zip(pair_y.iter()) {
        // A dropped token stays at −∞.
        if y > f32::NEG_INFINITY {
            z[t as usize] = (y - top) - ln_sum;
        }
    }
    Ok(true)
}

/// The dense rule for one row: raw `logits` in, normalised adjusted log-probabilities out.
pub fn dense_row<N: Retrieved>(
    mode: Mode,
    experts: &[Expert<'_, N>],
    params: &RuleParams,
    logits: &[f32],
    scratch: &mut RuleScratch,
    sparse: &mut SparseRow,
    out: &mut [f32],
) -> Result<(), RuleError> {
    check_logits(logits, out.len())?;
    sparse_row(mode, experts, params, logits.len(), scratch, sparse)?;
    apply_sparse(logits, sparse, params.filter_p, scratch, out)
}
