//! Continuous batching of decoding steps: many requests, each with its own prompt, sampling
//! parameters, seed and control options, decoded as one batch whose rows come and go
//! (docs/architecture.md §2, "One request through the HTTP API").
//!
//! The owner (the HTTP server's scheduler thread) alternates [`DecodeBatch::admit`], which
//! prefills waiting requests together (left-padded into a fresh cache) and joins them to the
//! running cache with [`KvCache::append_rows`], and [`DecodeBatch::step`], which applies the
//! control to the rows that have it, samples every row with its own random generator, drops
//! the rows that finished and runs one forward pass for the rest.
//!
//! A request's rows decode exactly as [`crate::generate::Generator`] decodes the same prompt
//! and parameters: the prompt is prefilled once and copied to its `num_samples` rows, sample
//! `i` draws from [`sample_rng`]`(seed, i)`, the control is the same dense in-place call as
//! [`crate::detox::ControlHook`]'s, and the stop tokens are the generator's. A row's forward
//! pass does not depend on the other rows of the batch (left padding, `src/model/kv_cache.rs`),
//! so a request gives the same tokens alone and in company.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;

use crate::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use crate::explain::{ExplainOptions, StepExplanation, StepTrace};
use crate::fingerprint::KeyType;
use crate::generate::{
    default_stop_tokens, sample_rng, GenerateError, Sampler, SamplingParams, StopReason,
};
use crate::model::{ForwardOutput, KvCache, Model, ModelError, Outputs, Positions};

/// One request for the batch: a prompt continued `params.num_samples` ways.
#[derive(Clone, Debug)]
pub struct BatchRequest {
    /// The caller's id for the request; events name it.
    pub id: u64,
    /// The prompt's tokens; not empty.
    pub prompt: Vec<u32>,
    /// Samples, length, temperature, top-p, top-k and seed, as for the generator.
    pub params: SamplingParams,
    /// The control's options, or `None` for the bare model.
    pub control: Option<AdjustOptions>,
    /// With `Some(k)`, each token comes with its log-probability and the `k` most likely
    /// tokens' (k may be 0), from the distribution it was sampled from before temperature.
    pub top_logprobs: Option<usize>,
    /// With options, each token comes with the explanation of its step (which tokens the
    /// control moved and which store rows moved them, docs/architecture.md §2, "Explaining a
    /// step"); needs `control`.
    pub explain: Option<ExplainOptions>,
}

/// A token's log-probability and the most likely alternatives at its step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The chosen token's natural-log probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What one call of [`DecodeBatch::step`] produced.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchEvent {
    /// Sample `choice` of request `id` generated `token`.
    Token {
        /// The request.
        id: u64,
        /// The sample's index within the request.
        choice: usize,
        /// The generated token (a stop token is reported too, then `Finished` with `Eos`).
        token: u32,
        /// Its log-probabilities when the request asked for them.
        logprob: Option<TokenLogprob>,
        /// The explanation of its step when the request asked for one (boxed: the normal
        /// event stays small).
        explanation: Option<Box<StepExplanation>>,
    },
    /// Sample `choice` of request `id` ended.
    Finished {
        /// The request.
        id: u64,
        /// The sample's index within the request.
        choice: usize,
        /// Why it ended.
        reason: StopReason,
        /// The time of the steps it took part in, and the control's share of it.
        decode: Duration,
        /// The control's part of `decode`.
        control: Duration,
    },
    /// Request `id` failed (its rows have left the batch); the message says why.
    Failed {
        /// The request.
        id: u64,
        /// What went wrong.
        message: String,
    },
}

struct Row {
    id: u64,
    choice: usize,
    params: SamplingParams,
    control: Option<AdjustOptions>,
    top_logprobs: Option<usize>,
    explain: Option<ExplainOptions>,
    /// The trace of the engine call of this step, for rows with `explain`.
    trace: Option<StepTrace>,
    rng: StdRng,
    generated: usize,
    /// The token to run through the model at the next forward pass.
    next: u32,
    done: bool,
    decode: Duration,
    control_time: Duration,
}

/// The running batch: its cache, its rows and the logits and keys they sample from next.
pub struct DecodeBatch<'m> {
    model: &'m Model,
    detox: Option<Arc<Detoxifier>>,
    stop_tokens: Vec<u32>,
    cache: Option<KvCache>,
    rows: Vec<Row>,
    /// Logits and keys of every row's last position, `rows × vocab` and `rows × hidden`.
    out: ForwardOutput,
    prefill: ForwardOutput,
    sampler: Sampler,
    scratch: DetoxScratch,
    /// Raw logits of the explained rows of the current run, copied before the in-place call.
    raw: Vec<f32>,
    tokens: Vec<u32>,
    keep: Vec<usize>,
    order: Vec<u32>,
}

impl<'m> DecodeBatch<'m> {
    /// An empty batch on `model`; `detox` is the control engine rows with options use (its
    /// stores must have been built with this model).
    pub fn new(model: &'m Model, detox: Option<Arc<Detoxifier>>) -> Self {
        Self {
            model,
            detox,
            stop_tokens: default_stop_tokens(model),
            cache: None,
            rows: Vec::new(),
            out: ForwardOutput::default(),
            prefill: ForwardOutput::default(),
            sampler: Sampler::default(),
            scratch: DetoxScratch::default(),
            raw: Vec::new(),
            tokens: Vec::new(),
            keep: Vec::new(),
            order: Vec::new(),
        }
    }

    /// Replaces the stop tokens (empty: only `max_new_tokens` ends a sample).
    pub fn set_stop_tokens(&mut self, tokens: Vec<u32>) {
        self.stop_tokens = tokens;
    }

    /// Rows decoding now.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is decoding.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn outputs(&self) -> Outputs {
        Outputs {
            logits: Positions::Last,
            keys: if self.detox.is_some() {
                Positions::Last
            } else {
                Positions::None
            },
            key_type: self
                .detox
                .as_ref()
                .map_or(KeyType::FinalHidden, |d| d.key_type()),
        }
    }

    /// Checks a request before it is admitted: a prompt, sampling parameters in range, control
    /// options the engine accepts, and room in the context for the prompt and its tokens.
    pub fn check(&self, req: &BatchRequest) -> Result<(), GenerateError> {
        req.params.validate()?;
        if req.prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let ctx = self.model.config().context_length;
        let needed = req.prompt.len() + req.params.max_new_tokens;
        if needed > ctx {
            return Err(ModelError::ContextFull {
                needed,
                context: ctx,
            }
            .into());
        }
        if let Some(opts) = &req.control {
            let detox = self.detox.as_ref().ok_or_else(|| {
                GenerateError::Params("the control was asked for but no stores are open".into())
            })?;
            detox
                .check_options(opts)
                .map_err(|e| GenerateError::Params(e.to_string()))?;
        }
        if let Some(eo) = &req.explain {
            if req.control.is_none() {
                return Err(GenerateError::Params(
                    "explain needs the control: a step without it has nothing to explain".into(),
                ));
            }
            eo.validate()
                .map_err(|e| GenerateError::Params(e.to_string()))?;
        }
        Ok(())
    }

    /// Whether `reqs` fit beside the running rows within the context: the joined cache is as
    /// long as its longest part, and every row must still be able to take all its tokens.
    pub fn fits(&self, reqs: &[BatchRequest]) -> bool {
        let run_len = self.cache.as_ref().map_or(0, |c| c.len());
        let new_len = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let remaining = self
            .rows
            .iter()
            .map(|r| r.params.max_new_tokens - r.generated)
            .chain(reqs.iter().map(|r| r.params.max_new_tokens))
            .max()
            .unwrap_or(0);
        run_len.max(new_len) + remaining <= self.model.config().context_length
    }

    /// Prefills `reqs` together (left-padded into a fresh cache), copies each prompt to its
    /// samples' rows and joins them to the running batch. The requests must have passed
    /// [`DecodeBatch::check`]; on error nothing is admitted.
    pub fn admit(&mut self, reqs: Vec<BatchRequest>) -> Result<(), GenerateError> {
        if reqs.is_empty() {
            return Ok(());
        }
        for r in &reqs {
            self.check(r)?;
        }
        let outputs = self.outputs();
        let prompts: Vec<&[u32]> = reqs.iter().map(|r| r.prompt.as_slice()).collect();
        let (tokens, pad) = self.model.pad_left(&prompts);
        let mut fresh = self.model.new_cache(reqs.len());
        fresh.set_left_padding(&pad)?;
        self.model
            .forward_into(&tokens, reqs.len(), &mut fresh, outputs, &mut self.prefill)?;
        let copies: Vec<usize> = reqs
            .iter()
            .enumerate()
            .flat_map(|(i, r)| std::iter::repeat_n(i, r.params.num_samples))
            .collect();
        if copies.len() != reqs.len() {
            fresh.select_rows(&copies)?;
        }
        match &mut self.cache {
            Some(running) => running.append_rows(&fresh)?,
            None => self.cache = Some(fresh),
        }
        let (vocab, hidden) = (
            self.model.config().vocab_size,
            self.model.config().hidden_size,
        );
        let rows = self.rows.len();
        self.out.logits.truncate(rows * vocab);
        self.out.keys.truncate(rows * hidden);
        for &i in &copies {
            self.out
                .logits
                .extend_from_slice(&self.prefill.logits[i * vocab..(i + 1) * vocab]);
            if outputs.keys == Positions::Last {
                self.out
                    .keys
                    .extend_from_slice(&self.prefill.keys[i * hidden..(i + 1) * hidden]);
            }
        }
        for r in reqs {
            for choice in 0..r.params.num_samples {
                self.rows.push(Row {
                    id: r.id,
                    choice,
                    params: r.params.clone(),
                    control: r.control,
                    top_logprobs: r.top_logprobs,
                    explain: r.explain,
                    trace: None,
                    rng: sample_rng(r.params.seed, choice as u64),
                    generated: 0,
                    next: 0,
                    done: false,
                    decode: Duration::ZERO,
                    control_time: Duration::ZERO,
                });
            }
        }
        Ok(())
    }

    /// Stops every sample of request `id` (its client left, or it has all it wants): its rows
    /// leave at the next step without another event.
    pub fn cancel(&mut self, id: u64) {
        self.cancel_where(|r| r.id == id);
    }

    /// Stops sample `choice` of request `id` (a stop sequence ended it).
    pub fn cancel_choice(&mut self, id: u64, choice: usize) {
        self.cancel_where(|r| r.id == id && r.choice == choice);
    }

    fn cancel_where(&mut self, pred: impl Fn(&Row) -> bool) {
        for r in self.rows.iter_mut().filter(|r| pred(r)) {
            r.done = true;
        }
    }

    /// One decoding step of every row: the control over each run of rows with the same
    /// options, a token per row, the finished rows dropped, one forward pass for the rest.
    /// Events go to `events` (appended). An error of the control or of sampling fails only
    /// the requests concerned; an error of the forward pass fails the whole batch and is
    /// returned, after `Failed` events for every request in it.
    pub fn step(&mut self, events: &mut Vec<BatchEvent>) -> Result<(), GenerateError> {
        let started = Instant::now();
        let first_event = events.len();
        self.drop_done()?;
        if self.rows.is_empty() {
            return Ok(());
        }
        let (vocab, hidden) = (
            self.model.config().vocab_size,
            self.model.config().hidden_size,
        );
        let mut start = 0;
        while start < self.rows.len() {
            let opts = self.rows[start].control;
            let mut end = start + 1;
            while end < self.rows.len() && self.rows[end].control == opts {
                end += 1;
            }
            if let (Some(opts), Some(detox)) = (opts, &self.detox) {
                // Only explained rows pay for the copy of their raw logits.
                self.raw.clear();
                for (i, r) in self.rows[start..end].iter().enumerate() {
                    if r.explain.is_some() && !r.done {
                        let at = (start + i) * vocab;
                        self.raw.extend_from_slice(&self.out.logits[at..at + vocab]);
                    }
                }
                let t = Instant::now();
                let result = detox.adjust_dense_in_place(
                    &self.out.keys[start * hidden..end * hidden],
                    &mut self.out.logits[start * vocab..end * vocab],
                    &opts,
                    &mut self.scratch,
                );
                let spent = t.elapsed();
                for r in &mut self.rows[start..end] {
                    r.control_time += spent;
                }
                match result {
                    Err(e) => {
                        let message = format!("the control failed: {e}");
                        fail_rows(&mut self.rows[start..end], &message, events);
                    }
                    Ok(()) if !self.raw.is_empty() => {
                        let detox = Arc::clone(detox);
                        self.trace_run(&detox, &opts, start, end, events);
                    }
                    Ok(()) => {}
                }
            }
            start = end;
        }
        for (i, row) in self.rows.iter_mut().enumerate() {
            if row.done {
                continue;
            }
            let logits = &self.out.logits[i * vocab..(i + 1) * vocab];
            let Some(token) = self.sampler.sample(logits, &row.params, &mut row.rng) else {
                let message = GenerateError::NothingToSample(row.choice).to_string();
                events.push(BatchEvent::Failed {
                    id: row.id,
                    message,
                });
                row.done = true;
                continue;
            };
            let logprob = row
                .top_logprobs
                .map(|k| token_logprob(logits, token, k, &mut self.order));
            let explanation = match (row.trace.take(), &row.explain, &self.detox) {
                (Some(trace), Some(eo), Some(detox)) => {
                    let tokenizer = self.model.tokenizer();
                    let text = |t: u32| tokenizer.decode(&[t], false).ok();
                    match trace.explain(detox, eo, Some(token), &text) {
                        Ok(e) => Some(Box::new(e)),
                        Err(e) => {
                            events.push(BatchEvent::Failed {
                                id: row.id,
                                message: format!("explaining the step failed: {e}"),
                            });
                            row.done = true;
                            continue;
                        }
                    }
                }
                _ => None,
            };
            row.generated += 1;
            row.next = token;
            events.push(BatchEvent::Token {
                id: row.id,
                choice: row.choice,
                token,
                logprob,
                explanation,
            });
        }
        // Requests that failed on one row fail on all of them.
        let failed: Vec<u64> = events[first_event..]
            .iter()
            .filter_map(|e| match e {
                BatchEvent::Failed { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let elapsed = started.elapsed();
        for row in &mut self.rows {
            if failed.contains(&row.id) {
                row.done = true;
                continue;
            }
            if row.done {
                continue;
            }
            row.decode += elapsed;
            let reason = if self.stop_tokens.contains(&row.next) {
                Some(StopReason::Eos)
            } else if row.generated >= row.params.max_new_tokens {
                Some(StopReason::MaxTokens)
            } else {
                None
            };
            if let Some(reason) = reason {
                row.done = true;
                events.push(BatchEvent::Finished {
                    id: row.id,
                    choice: row.choice,
                    reason,
                    decode: row.decode,
                    control: row.control_time,
                });
            }
        }
        self.drop_done()?;
        if self.rows.is_empty() {
            return Ok(());
        }
        self.tokens.clear();
        self.tokens.extend(self.rows.iter().map(|r| r.next));
        let outputs = self.outputs();
        let cache = self.cache.as_mut().expect("rows imply a cache");
        let t = Instant::now();
        if let Err(e) =
            self.model
                .forward_into(&self.tokens, self.rows.len(), cache, outputs, &mut self.out)
        {
            let message = format!("the forward pass failed: {e}");
            fail_rows(&mut self.rows, &message, events);
            self.rows.clear();
            self.cache = None;
            return Err(e.into());
        }
        let forward = t.elapsed();
        for r in &mut self.rows {
            r.decode += forward;
        }
        Ok(())
    }

    /// Keeps the trace of each explained row of the run `start..end` that the engine call
    /// with `opts` just controlled: its raw logits (copied to `raw` before the call, in row
    /// order), the call's dense answer and the neighbours left in the scratch.
    fn trace_run(
        &mut self,
        detox: &Detoxifier,
        opts: &AdjustOptions,
        start: usize,
        end: usize,
        events: &mut Vec<BatchEvent>,
    ) {
        let vocab = self.model.config().vocab_size;
        let mut raw = self.raw.chunks_exact(vocab);
        for i in start..end {
            let row = &mut self.rows[i];
            if row.explain.is_none() || row.done {
                continue;
            }
            let z = raw.next().expect("one raw row per explained row");
            let controlled = self.out.logits[i * vocab..(i + 1) * vocab].to_vec();
            match StepTrace::from_call(detox, opts, &self.scratch, i - start, z, controlled) {
                Ok(t) => row.trace = Some(t),
                Err(e) => {
                    events.push(BatchEvent::Failed {
                        id: row.id,
                        message: format!("explaining the step failed: {e}"),
                    });
                    row.done = true;
                }
            }
        }
    }

    /// Removes the rows marked done from the rows, the cache and the pending logits and keys.
    fn drop_done(&mut self) -> Result<(), GenerateError> {
        if !self.rows.iter().any(|r| r.done) {
            return Ok(());
        }
        self.keep.clear();
        self.keep
            .extend((0..self.rows.len()).filter(|&i| !self.rows[i].done));
        if self.keep.is_empty() {
            self.rows.clear();
            self.cache = None;
            return Ok(());
        }
        let (vocab, hidden) = (
            self.model.config().vocab_size,
            self.model.config().hidden_size,
        );
        let has_keys = self.out.keys.len() >= self.rows.len() * hidden && hidden > 0;
        // `keep` is increasing, so moving each kept row forward never overwrites one not yet
        // moved.
        for (to, &from) in self.keep.iter().enumerate() {
            if to != from {
                self.out
                    .logits
                    .copy_within(from * vocab..(from + 1) * vocab, to * vocab);
                if has_keys {
                    self.out
                        .keys
                        .copy_within(from * hidden..(from + 1) * hidden, to * hidden);
                }
            }
        }
        let n = self.keep.len();
        self.out.logits.truncate(n * vocab);
        if has_keys {
            self.out.keys.truncate(n * hidden);
        }
        let cache = self.cache.as_mut().expect("rows imply a cache");
        cache.select_rows(&self.keep)?;
        cache.trim_padding();
        let mut i = 0;
        self.rows.retain(|_| {
            let kept = self.keep.binary_search(&i).is_ok();
            i += 1;
            kept
        });
        Ok(())
    }
}

fn fail_rows(rows: &mut [Row], message: &str, events: &mut Vec<BatchEvent>) {
    let mut last = None;
    for r in rows.iter_mut().filter(|r| !r.done) {
        r.done = true;
        if last != Some(r.id) {
            events.push(BatchEvent::Failed {
                id: r.id,
                message: message.to_string(),
            });
            last = Some(r.id);
        }
    }
}

/// The log-probability of `token` under `logits` (log-softmax over the finite entries) and the
/// `k` most likely tokens, ties to the smaller id.
fn token_logprob(logits: &[f32], token: u32, k: usize, order: &mut Vec<u32>) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from(l - max).exp())
        .sum();
    let lse = max + sum.ln() as f32;
    let lp = |t: u32| logits[t as usize] - lse;
    order.clear();
    order.extend(0..logits.len() as u32);
    let by_desc = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_desc);
    }
    order.truncate(k);
    order.sort_unstable_by(by_desc);
    TokenLogprob {
        logprob: lp(token),
        top: order.iter().map(|&t| (t, lp(t))).collect(),
    }
}
