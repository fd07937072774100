//! Why a decoding step came out as it did: which tokens the control pushed down and up, and
//! which store rows (with their source text) pushed them (docs/architecture.md §2, "Explaining
//! a step").
//!
//! An explanation is built from one engine call, never from a second search: the caller runs
//! the step through [`Detoxifier::adjust_dense`] (or lets [`StepTrace::capture`] or
//! [`ExplainHook`] do it), and [`StepTrace`] copies what that call left behind — the base
//! log-probabilities, the controlled ones and every searched store's neighbours
//! ([`Detoxifier::last_neighbours`]). [`StepTrace::explain`] then ranks the retrieved tokens by
//! how much the control moved them (controlled − base log-probability; tokens no store
//! retrieved all move by the same normalising constant and are not listed), and for each
//! lists the rows behind it with their weight in their store's expert (softmax of −d/T, as
//! the rule computes it, §1) and, when the store records sources (§3), the text around them.
//!
//! This is a debugging path: it copies a vocabulary-sized array per step and looks rows up in
//! the stores' files, which the decoding path never does.

use std::ops::Range;

use serde::Serialize;

use crate::datastore::{DatastoreError, Neighbour, SourceSnippet};
use crate::detox::{AdjustOptions, DetoxError, DetoxScratch, Detoxifier};
use crate::fingerprint::KeyType;
use crate::hook::{HookError, StepHook};

/// How much an explanation lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ExplainOptions {
    /// Tokens listed in each direction (pushed down, pushed up).
    pub top: usize,
    /// Store rows listed per token, heaviest first.
    pub rows: usize,
    /// Bytes of source text shown either side of a row's token.
    pub context_bytes: usize,
}

impl Default for ExplainOptions {
    fn default() -> Self {
        Self {
            top: 5,
            rows: 3,
            context_bytes: 80,
        }
    }
}

/// The largest [`ExplainOptions::top`] and [`ExplainOptions::rows`] accepted.
pub const MAX_EXPLAIN_ITEMS: usize = 256;
/// The largest [`ExplainOptions::context_bytes`] accepted.
pub const MAX_CONTEXT_BYTES: usize = 4096;

impl ExplainOptions {
    /// Checks the options: `top` and `rows` in 1..=[`MAX_EXPLAIN_ITEMS`] (rows may be 0: tokens
    /// only), `context_bytes` at most [`MAX_CONTEXT_BYTES`].
    pub fn validate(&self) -> Result<(), ExplainError> {
        if self.top == 0 || self.top > MAX_EXPLAIN_ITEMS {
            return Err(ExplainError::Options(format!(
                "top is {}; list 1 to {MAX_EXPLAIN_ITEMS} tokens each way",
                self.top
            )));
        }
        if self.rows > MAX_EXPLAIN_ITEMS {
            return Err(ExplainError::Options(format!(
                "rows is {}; list at most {MAX_EXPLAIN_ITEMS} rows per token",
                self.rows
            )));
        }
        if self.context_bytes > MAX_CONTEXT_BYTES {
            return Err(ExplainError::Options(format!(
                "context is {} bytes; at most {MAX_CONTEXT_BYTES} are shown",
                self.context_bytes
            )));
        }
        Ok(())
    }
}

/// Why a step could not be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The explanation's own options are out of range.
    #[error("explain options: {0}")]
    Options(String),
    /// The step itself failed (bad shapes, values, options): the engine's error.
    #[error(transparent)]
    Step(#[from] DetoxError),
    /// Looking a row up in its store failed (a store damaged or changed under the caller).
    #[error("looking up row {id} of store {name:?}: {source}")]
    Row {
        /// The store's name.
        name: String,
        /// The row id the search returned.
        id: u64,
        /// The store's error.
        #[source]
        source: DatastoreError,
    },
}

/// One store row behind a moved token.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RowExplanation {
    /// The store's name (`toxic`, `nontoxic`, or the caller's).
    pub store: String,
    /// The store's signed weight: negative for an anti-expert (toxic), positive for an expert.
    pub store_weight: f32,
    /// The row's id, as the search returned it.
    pub id: u64,
    /// The segment holding it; `None` when the backend cannot say.
    pub segment: Option<u64>,
    /// Its index within that segment.
    pub row_in_segment: Option<usize>,
    /// The row's value: the next token it stores (the moved token).
    pub next_token: u32,
    /// That token's text, when the caller knows the tokenizer.
    pub next_text: Option<String>,
    /// Squared L2 distance from the step's hidden state.
    pub distance: f32,
    /// The row's normalised weight in its store's expert: softmax over the store's
    /// neighbours of −distance / T.
    pub weight: f64,
    /// The source text around the row, when its segment records sources.
    pub source: Option<SourceSnippet>,
}

/// One store's expert opinion on a token: the probability mass its neighbours give it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExpertMass {
    /// The store's name.
    pub store: String,
    /// The store's signed weight.
    pub store_weight: f32,
    /// p_S(token): the summed weights of the store's neighbours holding the token.
    pub probability: f64,
    /// How many of the store's neighbours hold it.
    pub neighbours: usize,
}

/// A token and how the control moved it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenMove {
    /// The token id.
    pub token: u32,
    /// Its text, when the caller knows the tokenizer.
    pub text: Option<String>,
    /// log p without the control: log_softmax of the raw logits.
    pub base_log_prob: f32,
    /// log p with the control: the engine's dense answer (−∞ outside the nucleus).
    pub controlled_log_prob: f32,
    /// controlled − base.
    pub change: f32,
    /// Every searched store's mass on the token.
    pub experts: Vec<ExpertMass>,
    /// The heaviest rows behind the token, over all searched stores, at most
    /// [`ExplainOptions::rows`].
    pub rows: Vec<RowExplanation>,
    /// How many retrieved rows hold the token in all (listed or not).
    pub rows_total: usize,
}

/// The explanation of one decoding step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepExplanation {
    /// The retrieved tokens whose log-probability fell the most, most first (change < 0).
    pub pushed_down: Vec<TokenMove>,
    /// The retrieved tokens whose log-probability rose the most, most first (change > 0).
    pub pushed_up: Vec<TokenMove>,
    /// The token the caller chose at this step (sampled), when it says which.
    pub chosen: Option<TokenMove>,
}

/// One searched store's neighbours for the step, with their expert weights.
#[derive(Clone, Debug)]
struct StoreTrace {
    store: usize,
    neighbours: Vec<Neighbour>,
    weights: Vec<f64>,
}

/// What one engine call left behind for one row: enough to explain the step without searching
/// again.
#[derive(Clone, Debug)]
pub struct StepTrace {
    base: Vec<f32>,
    controlled: Vec<f32>,
    stores: Vec<StoreTrace>,
}

/// log_softmax of `z` (−∞ stays −∞), in f64 for the normaliser.
fn log_softmax(z: &[f32]) -> Vec<f32> {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = z
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| ((v - max) as f64).exp())
        .sum();
    let lse = max as f64 + sum.ln();
    z.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// softmax of −d/T over one store's neighbours (ascending by distance), the minimum
/// subtracted first and in f64, as the rule computes it (docs/architecture.md §1).
fn expert_weights(neighbours: &[Neighbour], temperature: f32) -> Vec<f64> {
    let Some(first) = neighbours.first() else {
        return Vec::new();
    };
    let d0 = neighbours.iter().map(|n| n.dist).fold(first.dist, f32::min) as f64;
    let t = temperature as f64;
    let e: Vec<f64> = neighbours
        .iter()
        .map(|n| (-(n.dist as f64 - d0) / t).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

impl StepTrace {
    /// Runs one step (`hidden`: one row of D values, `logits`: its V raw logits) through the
    /// engine's dense form and keeps what explains it. The controlled log-probabilities are
    /// [`controlled`](Self::controlled).
    pub fn capture(
        detox: &Detoxifier,
        hidden: &[f32],
        logits: &[f32],
        opts: &AdjustOptions,
        scratch: &mut DetoxScratch,
    ) -> Result<Self, ExplainError> {
        if hidden.len() != detox.dim() {
            return Err(DetoxError::HiddenShape {
                len: hidden.len(),
                dim: detox.dim(),
            }
            .into());
        }
        let mut out = vec![0f32; logits.len()];
        detox.adjust_dense(hidden, logits, opts, scratch, &mut out)?;
        Self::from_call(detox, opts, scratch, 0, logits, out)
    }

    /// The trace of row `row` of an engine call that just ran with `opts` and `scratch`:
    /// `logits` are that row's raw logits, `controlled` the call's dense answer for it (a
    /// sparse caller applies its answer first). Copies the searched stores' neighbours out of
    /// `scratch`.
    pub fn from_call(
        detox: &Detoxifier,
        opts: &AdjustOptions,
        scratch: &DetoxScratch,
        row: usize,
        logits: &[f32],
        controlled: Vec<f32>,
    ) -> Result<Self, ExplainError> {
        let vocab = detox.vocab_size();
        if logits.len() != vocab || controlled.len() != vocab {
            return Err(DetoxError::LogitsShape {
                len: logits.len().min(controlled.len()),
                rows: 1,
                vocab,
            }
            .into());
        }
        let range: Range<usize> = detox.searched_stores(opts.mode)?;
        let mut stores = Vec::with_capacity(range.len());
        for store in range {
            let neighbours = detox
                .last_neighbours(scratch, store, row)
                .ok_or(DetoxError::EmptyBatch)?
                .to_vec();
            let weights = expert_weights(&neighbours, opts.params.temperature);
            stores.push(StoreTrace {
                store,
                neighbours,
                weights,
            });
        }
        Ok(StepTrace {
            base: log_softmax(logits),
            controlled,
            stores,
        })
    }

    /// The controlled log-probabilities of the step (what the sampler draws from).
    pub fn controlled(&self) -> &[f32] {
        &self.controlled
    }

    /// The rows every searched store returned for the step, per store index (into
    /// [`Detoxifier::stores`]), ascending by distance.
    pub fn neighbours(&self) -> impl Iterator<Item = (usize, &[Neighbour])> {
        self.stores
            .iter()
            .map(|s| (s.store, s.neighbours.as_slice()))
    }

    /// Explains the step: the `top` tokens pushed down and up the most, each with its `rows`
    /// heaviest rows, and `chosen` (the sampled token) likewise. `text` gives a token's text
    /// (`None` when unknown). Row lookups use the stores' current snapshot, so call this
    /// right after the step, before the stores change.
    pub fn explain(
        &self,
        detox: &Detoxifier,
        options: &ExplainOptions,
        chosen: Option<u32>,
        text: &dyn Fn(u32) -> Option<String>,
    ) -> Result<StepExplanation, ExplainError> {
        options.validate()?;
        let vocab = self.base.len();
        if let Some(t) = chosen.filter(|&t| t as usize >= vocab) {
            return Err(ExplainError::Options(format!(
                "the chosen token {t} is outside the vocabulary of {vocab}"
            )));
        }
        let mut retrieved: Vec<u32> = self
            .stores
            .iter()
            .flat_map(|s| s.neighbours.iter().map(|n| n.value))
            .filter(|&t| (t as usize) < vocab)
            .collect();
        retrieved.sort_unstable();
        retrieved.dedup();
        let change = |t: u32| self.controlled[t as usize] - self.base[t as usize];
        let mut moved: Vec<(u32, f32)> = retrieved
            .iter()
            .map(|&t| (t, change(t)))
            .filter(|(t, c)| c.is_finite() && self.controlled[*t as usize].is_finite())
            .collect();
        // Ties by token id, so the lists are deterministic.
        moved.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        let down: Vec<u32> = moved
            .iter()
            .filter(|m| m.1 < 0.0)
            .take(options.top)
            .map(|m| m.0)
            .collect();
        let up: Vec<u32> = moved
            .iter()
            .rev()
            .filter(|m| m.1 > 0.0)
            .take(options.top)
            .map(|m| m.0)
            .collect();
        let token = |t: u32| self.token_move(detox, options, t, text);
        Ok(StepExplanation {
            pushed_down: down.into_iter().map(token).collect::<Result<_, _>>()?,
            pushed_up: up.into_iter().map(token).collect::<Result<_, _>>()?,
            chosen: chosen.map(token).transpose()?,
        })
    }

    fn token_move(
        &self,
        detox: &Detoxifier,
        options: &ExplainOptions,
        t: u32,
        text: &dyn Fn(u32) -> Option<String>,
    ) -> Result<TokenMove, ExplainError> {
        let (base, controlled) = (self.base[t as usize], self.controlled[t as usize]);
        let mut experts = Vec::with_capacity(self.stores.len());
        // (store trace, neighbour index), heaviest first.
        let mut behind: Vec<(usize, usize)> = Vec::new();
        for (si, s) in self.stores.iter().enumerate() {
            let cs = &detox.stores()[s.store];
            let mut mass = ExpertMass {
                store: cs.name.clone(),
                store_weight: cs.weight,
                probability: 0.0,
                neighbours: 0,
            };
            for (i, n) in s.neighbours.iter().enumerate() {
                if n.value == t {
                    mass.probability += s.weights[i];
                    mass.neighbours += 1;
                    behind.push((si, i));
                }
            }
            experts.push(mass);
        }
        let rows_total = behind.len();
        behind.sort_by(|a, b| {
            let (wa, wb) = (self.stores[a.0].weights[a.1], self.stores[b.0].weights[b.1]);
            wb.total_cmp(&wa).then(a.cmp(b))
        });
        let next_text = text(t);
        let rows = behind
            .into_iter()
            .take(options.rows)
            .map(|(si, i)| {
                let s = &self.stores[si];
                let cs = &detox.stores()[s.store];
                let n = s.neighbours[i];
                let origin =
                    cs.store
                        .row_origin(n.id, options.context_bytes)
                        .map_err(|source| ExplainError::Row {
                            name: cs.name.clone(),
                            id: n.id,
                            source,
                        })?;
                Ok(RowExplanation {
                    store: cs.name.clone(),
                    store_weight: cs.weight,
                    id: n.id,
                    segment: origin.as_ref().map(|o| o.segment),
                    row_in_segment: origin.as_ref().map(|o| o.row_in_segment),
                    next_token: n.value,
                    next_text: next_text.clone(),
                    distance: n.dist,
                    weight: s.weights[i],
                    source: origin.and_then(|o| o.source),
                })
            })
            .collect::<Result<_, ExplainError>>()?;
        Ok(TokenMove {
            token: t,
            text: next_text,
            base_log_prob: base,
            controlled_log_prob: controlled,
            change: controlled - base,
            experts,
            rows,
            rows_total,
        })
    }
}

/// The control as a generator hook ([`crate::detox::ControlHook`]'s twin) that keeps a
/// [`StepTrace`] of every step: the same engine call, so a seed gives the same tokens as
/// with `ControlHook`. For `explain` over a generated text; one sample (batch row) only.
pub struct ExplainHook<'d> {
    detox: &'d Detoxifier,
    opts: AdjustOptions,
    scratch: DetoxScratch,
    traces: Vec<StepTrace>,
}

impl<'d> ExplainHook<'d> {
    /// A hook that adjusts every step with `opts` and records it; fails early on options the
    /// engine cannot serve.
    pub fn new(detox: &'d Detoxifier, opts: AdjustOptions) -> Result<Self, DetoxError> {
        detox.check_options(&opts)?;
        Ok(Self {
            detox,
            opts,
            scratch: DetoxScratch::default(),
            traces: Vec::new(),
        })
    }

    /// The traces of the steps so far, one per generated token, in order.
    pub fn traces(&self) -> &[StepTrace] {
        &self.traces
    }
}

impl StepHook for ExplainHook<'_> {
    fn key_type(&self) -> KeyType {
        self.detox.key_type()
    }

    fn adjust(&mut self, keys: &[f32], logits: &mut [f32], rows: usize) -> Result<(), HookError> {
        if rows != 1 {
            return Err(HookError::new(ExplainError::Options(format!(
                "explain follows one sample; the generator decodes {rows} at once"
            ))));
        }
        let trace = StepTrace::capture(self.detox, keys, logits, &self.opts, &mut self.scratch)
            .map_err(HookError::new)?;
        logits.copy_from_slice(trace.controlled());
        self.traces.push(trace);
        Ok(())
    }
}
