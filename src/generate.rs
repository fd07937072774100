//! Sampling continuations from the model, with a per-step hook for the Goodtriever control.
//!
//! [`Generator::generate`] prefills the prompt once, copies its KV cache to `num_samples`
//! rows, and then decodes all rows as one batch (the paper samples 25 continuations per
//! prompt). At every step the [`StepHook`] (the engine, in production) sees each active row's
//! key hidden state and raw logits and may replace the logits, e.g. with re-weighted
//! log-probabilities; then temperature, top-k and top-p sampling pick the next token. Rows that
//! produce a stop token leave the batch, so finished rows cost nothing.
//!
//! Each sample has its own random generator seeded from (seed, sample index): the same seed
//! gives the same samples whatever the batch does. The loop reuses its buffers (logits, keys,
//! sampling scratch, the forward pass's, in the KV cache): a step allocates nothing once the
//! cache has grown to the sequence length (`tests/hot_path_alloc.rs`).

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::fingerprint::KeyType;
use crate::hook::{HookError, StepHook};
use crate::model::{ForwardOutput, Model, ModelError, Outputs, Positions};
use crate::rule::{rank_key, NucleusHistogram};

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Tokenizing the prompt or a forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The step hook (the engine, in production) refused a step.
    #[error(transparent)]
    Hook(#[from] HookError),
    /// [`SamplingParams::validate`] refused the parameters (what is wrong is given).
    #[error("invalid sampling parameters: {0}")]
    Params(String),
    /// The prompt has no tokens: there is no position to continue from.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Every candidate of a sample's row (the index is given) was masked after the hook.
    #[error("no token can be sampled for sample {0}: every logit is -inf or NaN")]
    NothingToSample(usize),
}

/// Sampling parameters. `temperature == 0` means greedy (argmax); `top_k == 0` and
/// `top_p == 1` switch those filters off.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SamplingParams {
    /// Continuations per prompt, decoded as one batch; at least 1 (the paper uses 25).
    pub num_samples: usize,
    /// The most tokens a sample may generate; default 20, the paper's.
    pub max_new_tokens: usize,
    /// Softmax temperature, ≥ 0; 0 is greedy. Default 1.
    pub temperature: f32,
    /// Nucleus mass kept, in (0, 1]; 1 keeps every token. Default 0.9.
    pub top_p: f32,
    /// Candidates kept by logit before the nucleus; 0 (the default) keeps all.
    pub top_k: usize,
    /// Seed of the per-sample random generators: sample `i` draws from (seed, i), so a seed
    /// gives the same samples whatever the batch does.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            num_samples: 1,
            max_new_tokens: 20,
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges above (`num_samples` ≥ 1, `temperature` finite and ≥ 0, `top_p` in
    /// (0, 1]); [`Generator::new`] calls it, so a bad value fails before any forward pass.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |m: String| Err(GenerateError::Params(m));
        if self.num_samples == 0 {
            return bad("num_samples must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature {} must be ≥ 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

/// Why a sample ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It produced a stop token (EOS); the token is the last of `tokens`.
    Eos,
    /// It reached `max_new_tokens`.
    MaxTokens,
}

/// Time spent on one sample. Samples are decoded together, so `prefill_ms` is shared and each
/// step's time is the batch's; `hook_ms` is the hook's share of each step.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SampleTiming {
    /// The prompt's prefill, in milliseconds (shared by all samples of the prompt).
    pub prefill_ms: f64,
    /// For each generated token: the forward pass that produced its logits (none for the
    /// first, whose logits come from the prefill), the hook, and sampling.
    pub step_ms: Vec<f64>,
    /// For each generated token: the hook's share of `step_ms`, in milliseconds (0 without a
    /// hook).
    pub hook_ms: Vec<f64>,
}

impl SampleTiming {
    /// The sample's decoding time in milliseconds, prefill excluded.
    pub fn total_step_ms(&self) -> f64 {
        self.step_ms.iter().sum()
    }

    /// The time the hook took over the whole sample, in milliseconds: the control's cost.
    pub fn total_hook_ms(&self) -> f64 {
        self.hook_ms.iter().sum()
    }
}

/// One continuation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Generated token ids (the stop token included when `stop == Eos`).
    pub tokens: Vec<u32>,
    /// The generated text, without the stop token.
    pub text: String,
    /// Why the sample ended.
    pub stop: StopReason,
    /// Where its time went.
    pub timing: SampleTiming,
}

/// Reusable scratch for choosing a token from one row of logits.
#[derive(Debug, Default)]
pub struct Sampler {
    /// Candidate token ids, and their unnormalised weights `exp((ℓ − max)/T)` alongside.
    idx: Vec<u32>,
    weights: Vec<f64>,
    /// The nucleus's histogram (as in [`crate::rule::nucleus_filter`]), over
    /// temperature-scaled log-weights.
    hist: NucleusHistogram,
}

impl Sampler {
    /// Picks a token from `logits` (raw logits or log-probabilities). `None` when no token has
    /// a finite value.
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        rng: &mut StdRng,
    ) -> Option<u32> {
        if params.temperature <= 0.0 {
            return argmax(logits);
        }
        if !self.candidates(logits, params) {
            return None;
        }
        let total: f64 = self.weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        for (&i, &w) in self.idx.iter().zip(&self.weights) {
            u -= w;
            if u <= 0.0 {
                return Some(i);
            }
        }
        self.idx.last().copied()
    }

    /// Fills `idx` and `weights` with the tokens a draw chooses from (top-k, then the
    /// nucleus) and their unnormalised weights. False when no token has a finite value.
    fn candidates(&mut self, logits: &[f32], params: &SamplingParams) -> bool {
        // Ties go to the smaller token id, as in `argmax`, so top-k 1 and a tiny top-p are
        // exactly greedy and the kept set never depends on the selection algorithm's order.
        let by_logit_desc = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        self.idx.clear();
        self.idx
            .extend((0..logits.len() as u32).filter(|&i| logits[i as usize] > f32::NEG_INFINITY));
        let n = self.idx.len();
        if n == 0 {
            return false;
        }
        if params.top_k > 0 && params.top_k < n {
            self.idx
                .select_nth_unstable_by(params.top_k - 1, by_logit_desc);
            self.idx.truncate(params.top_k);
        }
        let inv_t = 1.0 / params.temperature;
        let m = self
            .idx
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let scaled = |i: u32| (logits[i as usize] - m) * inv_t;
        self.weights.clear();
        if params.top_p < 1.0 {
            // One pass for the weights and the nucleus's histogram.
            self.hist.clear();
            for &i in &self.idx {
                let x = scaled(i);
                let w = (x as f64).exp();
                // `x` is at most 0, with the largest candidate at exactly 0.
                self.hist.push(0.0, x, w);
                self.weights.push(w);
            }
            self.nucleus(logits, f64::from(params.top_p), &scaled);
        } else {
            self.weights
                .extend(self.idx.iter().map(|&i| (scaled(i) as f64).exp()));
        }
        true
    }

    /// Keeps the nucleus of the candidates: rank r (by logit, ties to the smaller id) stays iff
    /// r = 0 or the weight of the ranks above it is below `top_p` of the total. Without
    /// sorting the candidates: the histogram [`Sampler::candidates`] filled (weight per
    /// bucket of scaled log-weight) finds the bucket where the cumulative weight reaches the
    /// target, and only that bucket is ranked. Leaves the kept candidates in `idx` and
    /// `weights`, in no particular order (a draw's distribution does not depend on it).
    fn nucleus(&mut self, logits: &[f32], top_p: f64, scaled: &impl Fn(u32) -> f32) {
        let Sampler { idx, weights, hist } = self;
        let key = |j: usize| rank_key(logits[idx[j] as usize], idx[j]);
        let target = top_p * hist.total();
        let Some(cut) = hist.cut(target, key, |k| (scaled(k as u32) as f64).exp()) else {
            return;
        };
        let mut kept = 0;
        for j in 0..idx.len() {
            let i = idx[j];
            if hist.keeps(&cut, j, || rank_key(logits[i as usize], i)) {
                idx[kept] = i;
                weights[kept] = weights[j];
                kept += 1;
            }
        }
        idx.truncate(kept);
        weights.truncate(kept);
    }
}

/// Index of the largest finite value (the first one on ties).
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l > f32::NEG_INFINITY && best.is_none_or(|(_, b)| l > b) {
            best = Some((i as u32, l));
        }
    }
    best.map(|(i, _)| i)
}

/// The random generator of sample `index` of a request seeded with `seed`; the generator and
/// the batch core (`crate::batch`) use the same one, so a seed gives the same samples in both.
pub fn sample_rng(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The stop tokens [`Generator::new`] uses: the model's EOS, and
/// `<|endoftext|>` when the vocabulary has it.
pub fn default_stop_tokens(model: &Model) -> Vec<u32> {
    let mut stop: Vec<u32> = model.config().eos_token_id.into_iter().collect();
    if let Some(eot) = model.tokenizer().token_to_id("<|endoftext|>") {
        if !stop.contains(&eot) {
            stop.push(eot);
        }
    }
    stop
}

/// Samples continuations from a [`Model`].
pub struct Generator<'m> {
    model: &'m Model,
    params: SamplingParams,
    stop_tokens: Vec<u32>,
    sampler: Sampler,
    out: ForwardOutput,
    next: Vec<u32>,
}

impl<'m> Generator<'m> {
    /// A generator that stops rows at the model's EOS token (and at `<|endoftext|>` when the
    /// vocabulary has it: base-model text ends there).
    pub fn new(model: &'m Model, params: SamplingParams) -> Result<Self, GenerateError> {
        params.validate()?;
        let stop_tokens = default_stop_tokens(model);
        Ok(Self {
            model,
            params,
            stop_tokens,
            sampler: Sampler::default(),
            out: ForwardOutput::default(),
            next: Vec::new(),
        })
    }

    /// The sampling parameters every [`Generator::generate`] call uses (checked at
    /// construction).
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Replaces the stop tokens (empty: only `max_new_tokens` ends a sample).
    pub fn set_stop_tokens(&mut self, tokens: Vec<u32>) {
        self.stop_tokens = tokens;
    }

    /// Tokenizes `prompt` and generates from it.
    pub fn generate_text(
        &mut self,
        prompt: &str,
        hook: Option<&mut dyn StepHook>,
    ) -> Result<Vec<Sample>, GenerateError> {
        let tokens = self.model.tokenizer().encode(prompt)?;
        self.generate(&tokens, hook)
    }

    /// Generates `num_samples` continuations of `prompt` in one batch.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        mut hook: Option<&mut dyn StepHook>,
    ) -> Result<Vec<Sample>, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let cfg = self.model.config();
        let needed = prompt.len() + self.params.max_new_tokens;
        if needed > cfg.context_length {
            return Err(ModelError::ContextFull {
                needed,
                context: cfg.context_length,
            }
            .into());
        }
        let n = self.params.num_samples;
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let outputs = Outputs {
            logits: Positions::Last,
            keys: if hook.is_some() {
                Positions::Last
            } else {
                Positions::None
            },
            key_type: hook
                .as_ref()
                .map(|h| h.key_type())
                .unwrap_or(KeyType::FinalHidden),
        };
        let mut samples: Vec<Sample> = (0..n)
            .map(|_| Sample {
                tokens: Vec::with_capacity(self.params.max_new_tokens),
                text: String::new(),
                stop: StopReason::MaxTokens,
                timing: SampleTiming::default(),
            })
            .collect();
        let mut rngs: Vec<StdRng> = (0..n as u64)
            .map(|i| sample_rng(self.params.seed, i))
            .collect();

        if let Some(h) = hook.as_deref_mut() {
            // A new generation: no row of the hook's last step goes on.
            h.keep_rows(&[]);
        }
        let t0 = Instant::now();
        let mut cache = self.model.new_cache(1);
        self.model
            .forward_into(prompt, 1, &mut cache, outputs, &mut self.out)?;
        if n > 1 {
            cache.select_rows(&vec![0; n])?;
            replicate(&mut self.out.logits, vocab, n);
            replicate(&mut self.out.keys, hidden, n);
        }
        let prefill_ms = ms(t0);
        for s in &mut samples {
            s.timing.prefill_ms = prefill_ms;
        }

        // `active[r]` is the sample decoded in batch row r.
        let mut active: Vec<usize> = (0..n).collect();
        let mut step_start = Instant::now();
        for step in 0..self.params.max_new_tokens {
            let rows = active.len();
            let mut hook_ms = 0.0;
            if let Some(h) = hook.as_deref_mut() {
                let th = Instant::now();
                h.adjust(
                    &self.out.keys[..rows * hidden],
                    &mut self.out.logits[..rows * vocab],
                    rows,
                )?;
                hook_ms = ms(th);
            }
            self.next.clear();
            let mut finished = false;
            for (r, &s) in active.iter().enumerate() {
                let logits = &self.out.logits[r * vocab..(r + 1) * vocab];
                let tok = self
                    .sampler
                    .sample(logits, &self.params, &mut rngs[s])
                    .ok_or(GenerateError::NothingToSample(s))?;
                samples[s].tokens.push(tok);
                if self.stop_tokens.contains(&tok) {
                    samples[s].stop = StopReason::Eos;
                    finished = true;
                }
                self.next.push(tok);
            }
            let step_ms = ms(step_start);
            for &s in &active {
                samples[s].timing.step_ms.push(step_ms);
                samples[s].timing.hook_ms.push(hook_ms);
            }
            step_start = Instant::now();
            if step + 1 == self.params.max_new_tokens {
                break;
            }
            if finished {
                let keep: Vec<usize> = (0..rows)
                    .filter(|&r| samples[active[r]].stop != StopReason::Eos)
                    .collect();
                if keep.is_empty() {
                    break;
                }
                cache.select_rows(&keep)?;
                if let Some(h) = hook.as_deref_mut() {
                    h.keep_rows(&keep);
                }
                self.next = keep.iter().map(|&r| self.next[r]).collect();
                active = keep.iter().map(|&r| active[r]).collect();
            }
            if let Some(h) = hook.as_deref_mut() {
                h.advance(&self.next);
            }
            self.model.forward_into(
                &self.next,
                active.len(),
                &mut cache,
                outputs,
                &mut self.out,
            )?;
        }
        let tok = self.model.tokenizer();
        for s in &mut samples {
            let body = match s.stop {
                StopReason::Eos => &s.tokens[..s.tokens.len() - 1],
                StopReason::MaxTokens => &s.tokens[..],
            };
            s.text = tok.decode(body, false)?;
        }
        Ok(samples)
    }
}

/// Turns one row of `width` values into `n` identical rows, in place.
fn replicate(buf: &mut Vec<f32>, width: usize, n: usize) {
    buf.truncate(width);
    buf.resize(width * n, 0.0);
    for r in 1..n {
        buf.copy_within(0..width, r * width);
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_is_argmax_and_skips_neg_inf() {
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(1);
        let l = [0.5, 3.0, f32::NEG_INFINITY, 2.9];
        assert_eq!(s.sample(&l, &params(0.0, 1.0, 0), &mut rng), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1e30]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), None);
        assert_eq!(
            s.sample(&[f32::NEG_INFINITY; 3], &params(1.0, 0.9, 0), &mut rng),
            None
        );
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(7);
        let l: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        let best = argmax(&l).unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &params(1.0, 1.0, 1), &mut rng), Some(best));
            assert_eq!(s.sample(&l, &params(1.0, 1e-6, 0), &mut rng), Some(best));
        }
    }

    #[test]
    fn nucleus_keeps_exactly_the_head_that_reaches_top_p() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two only.
        let l: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[s.sample(&l, &params(1.0, 0.7, 0), &mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        // Renormalised 0.5 : 0.3 = 0.625.
        let frac = seen[0] as f64 / 4000.0;
        assert!((frac - 0.625).abs() < 0.03, "{seen:?}");
    }

    #[test]
    fn nucleus_over_a_wide_flat_tail_widens_its_head() {
        // 10 000 equal logits: top_p 0.5 must keep half of them, beyond the first head of 64.
        let l = vec![0.0f32; 10_000];
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(5);
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..2000 {
            distinct.insert(s.sample(&l, &params(1.0, 0.5, 0), &mut rng).unwrap());
        }
        assert!(distinct.len() > 1000, "{}", distinct.len());
    }

    /// The kept set of a full stable sort: top-k, then rank r stays iff r = 0 or the weight of
    /// the ranks above it is below top_p of the total. `None` when the cut falls within
    /// rounding of a rank's cumulative weight, where either answer is right.
    fn sorted_candidates(l: &[f32], p: &SamplingParams) -> Option<Vec<u32>> {
        let mut idx: Vec<u32> = (0..l.len() as u32)
            .filter(|&i| l[i as usize] > f32::NEG_INFINITY)
            .collect();
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let m = l[idx[0] as usize];
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i as usize] - m) / p.temperature) as f64).exp())
            .collect();
        let target = p.top_p as f64 * w.iter().sum::<f64>();
        let mut cum = 0.0;
        let mut kept = Vec::new();
        for (r, (&i, &wi)) in idx.iter().zip(&w).enumerate() {
            if (cum - target).abs() < 1e-9 * target {
                return None;
            }
            if r == 0 || cum < target {
                kept.push(i);
            }
            cum += wi;
        }
        kept.sort_unstable();
        Some(kept)
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn candidates_are_the_sorted_nucleus(
            l in prop::collection::vec(
                prop_oneof![
                    4 => -3.0f32..3.0,
                    2 => (-3i32..3).prop_map(|x| x as f32),
                    1 => -200.0f32..0.0,
                    1 => Just(f32::NEG_INFINITY),
                ],
                1..1500,
            ),
            temperature in prop_oneof![0.05f32..0.2, 0.5f32..2.0],
            top_p in 0.05f32..0.9995,
            top_k in prop_oneof![Just(0usize), 1usize..60],
        ) {
            prop_assume!(l.iter().any(|x| x.is_finite()));
            let p = SamplingParams { temperature, top_p, top_k, ..SamplingParams::default() };
            let want = sorted_candidates(&l, &p);
            prop_assume!(want.is_some());
            let mut s = Sampler::default();
            prop_assert!(s.candidates(&l, &p));
            let mut got = s.idx.clone();
            got.sort_unstable();
            prop_assert_eq!(Some(got), want);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let l: Vec<f32> = (0..500).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::default();
            let mut rng = StdRng::seed_from_u64(seed);
            (0..50)
                .map(|_| s.sample(&l, &params(1.0, 0.95, 40), &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(params(-1.0, 0.9, 0).validate().is_err());
        assert!(params(1.0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 1.5, 0).validate().is_err());
        assert!(params(f32::NAN, 0.9, 0).validate().is_err());
        assert!(params(0.0, 1.0, 0).validate().is_ok());
    }
}
