//! The engine: datastores plus rule parameters, adjusting a batch of decoding rows.
//!
//! The gRPC server, the CLI and the generator all call [`Detoxifier`]; it owns no I/O beyond
//! the datastores' memory maps and is shared across threads behind an `Arc`. Per-call buffers
//! live in a [`DetoxScratch`] that the caller keeps, so a decoding step allocates nothing once
//! the scratch has grown to the batch size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datastore::{DatastoreError, Neighbour, SearchParams};
use crate::fingerprint::{KeyType, ModelFingerprint};
use crate::hook::{HookError, StepHook};
use crate::limits::{MAX_ABS_HIDDEN, MAX_ROWS, MAX_STORES};
use crate::reuse::{self, ReuseMemory, ReuseParamError, ReuseParams, ReuseStats};
use crate::rule::{
    self, Expert, Mode, ParamError, Retrieved, RuleError, RuleParams, RuleScratch, SparseRow,
    TokenPrior,
};
use crate::store::Store;

impl Retrieved for Neighbour {
    #[inline]
    fn token(&self) -> u32 {
        self.value
    }
    #[inline]
    fn sq_dist(&self) -> f32 {
        self.dist
    }
}

/// Errors of the engine. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DetoxError {
    /// [`Detoxifier::new`] got an empty store list.
    #[error("no datastores given: the control needs at least one store")]
    NoStores,
    /// [`Detoxifier::new`] got more than [`MAX_STORES`] stores (the count is given).
    #[error("at most {MAX_STORES} stores can be combined, got {0}")]
    TooManyStores(usize),
    /// A store has no live rows, so every search would come back empty.
    #[error("store {name:?} is empty: add data to it before serving")]
    EmptyStore {
        /// The store's name in the ensemble.
        name: String,
    },
    /// A store's keys come from a different model (or hidden size) than the first store's.
    #[error("store {name:?} does not match store {first:?}: {why}")]
    Incompatible {
        /// The store that does not match.
        name: String,
        /// The first store, whose fingerprint the others are checked against.
        first: String,
        /// What differs, from [`ModelFingerprint::check_compatible`].
        why: String,
    },
    /// A store holds a different hidden state than the first store.
    #[error("store {name:?} holds {got} keys, but the control uses {want} keys")]
    KeyTypeMismatch {
        /// The store that does not match.
        name: String,
        /// The key type that store holds.
        got: KeyType,
        /// The first store's key type, which the engine uses.
        want: KeyType,
    },
    /// Neither the caller nor any store's fingerprint gives the vocabulary size.
    #[error(
        "the vocabulary size is unknown (the stores were imported without one): give it with --vocab-size (the library's `vocab` argument)"
    )]
    UnknownVocab,
    /// The mode needs a store with a weight sign that no store has (e.g. toxic-only without a
    /// negative-weight store).
    #[error("mode {mode} needs {what}")]
    ModeNeeds {
        /// The mode asked for.
        mode: Mode,
        /// The kind of store it needs, in words.
        what: &'static str,
    },
    /// The hidden-state buffer's length is not a multiple of the key dimension.
    #[error("hidden states have {len} values, which is not a whole number of rows of size {dim}")]
    HiddenShape {
        /// Values received.
        len: usize,
        /// The stores' key dimension.
        dim: usize,
    },
    /// A call carried no rows.
    #[error("the batch is empty: send at least one row")]
    EmptyBatch,
    /// A call carried more than [`MAX_ROWS`] rows.
    #[error("the batch has {rows} rows; at most {max} are accepted per call")]
    TooManyRows {
        /// Rows received.
        rows: usize,
        /// The limit, [`MAX_ROWS`].
        max: usize,
    },
    /// A hidden state holds NaN or ±∞, which would poison every distance.
    #[error("hidden state of row {row} contains NaN or infinity at index {index}")]
    NonFiniteHidden {
        /// The row, 0-based within the call.
        row: usize,
        /// The position within the row, 0-based.
        index: usize,
    },
    /// A hidden-state value is larger in magnitude than [`MAX_ABS_HIDDEN`], which would
    /// overflow the squared distances.
    #[error("hidden state of row {row} has {value} at index {index}, beyond ±{MAX_ABS_HIDDEN}: send the model's hidden states as they are")]
    HiddenOutOfRange {
        /// The row, 0-based within the call.
        row: usize,
        /// The position within the row, 0-based.
        index: usize,
        /// The value sent.
        value: f32,
    },
    /// The logits (or output) buffer is not `rows × vocab` long.
    #[error("logits have {len} values, expected {rows} rows of the vocabulary size {vocab}")]
    LogitsShape {
        /// Values received.
        len: usize,
        /// Rows in the call, from the hidden states.
        rows: usize,
        /// The engine's vocabulary size.
        vocab: usize,
    },
    /// The rule refused one row (bad logits, a store's token outside the vocabulary, ...).
    #[error("row {row}: {source}")]
    Row {
        /// The row, 0-based within the call.
        row: usize,
        /// Why the rule refused it.
        source: RuleError,
    },
    /// The call's (or the defaults') rule parameters are out of range.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The options ask for a variant the mode does not have (the gate outside the ensemble,
    /// the prior correction in kNN-LM mode): [`RuleError::NotInMode`].
    #[error(transparent)]
    Variant(RuleError),
    /// Prior-corrected experts were asked for, and a searched store keeps no token
    /// statistics.
    #[error("store {name:?} keeps no token statistics, which prior-corrected experts need: a local store computes them, a remote one does not (use prior 0 with it)")]
    NoPrior {
        /// The store's name in the ensemble.
        name: String,
    },
    /// A reuse setting is out of range.
    #[error(transparent)]
    Reuse(#[from] ReuseParamError),
    /// Skipping was asked for in a call without the base logits (the sparse form): the
    /// decision reads the base distribution.
    #[error("skip needs the base logits: send them and ask for the dense form, or use skip 0")]
    SkipNeedsLogits,
    /// A store's search or refresh failed.
    #[error("searching store {name:?}: {source}")]
    Search {
        /// The store's name in the ensemble.
        name: String,
        /// The store's own error (I/O, corruption, an unreachable remote store, ...).
        source: DatastoreError,
    },
}

/// A datastore with the signed weight it carries in the ensemble: `-1` for the toxic
/// (anti-expert) store, `+1` for the non-toxic (expert) one, anything finite for n-store
/// control.
#[derive(Clone)]
pub struct ControlStore {
    /// A name for messages and metrics (`toxic`, `nontoxic`, or the caller's).
    pub name: String,
    /// The datastore; shared, so one store can serve several engines.
    pub store: Arc<dyn Store>,
    /// The store's signed weight `w_j` in the product of experts; must be finite. Its sign
    /// also picks the store for the single-store modes (see [`Mode`]).
    pub weight: f32,
}

/// Per-call choices; the engine's defaults unless a request overrides them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdjustOptions {
    /// The rule's knobs (α, T, k, filter_p, λ); checked with [`RuleParams::validate`] on
    /// every call.
    pub params: RuleParams,
    /// How the stores' experts are combined; default [`Mode::Ensemble`].
    pub mode: Mode,
}

impl Default for AdjustOptions {
    fn default() -> Self {
        Self {
            params: RuleParams::default(),
            mode: Mode::Ensemble,
        }
    }
}

/// Reusable per-caller buffers for [`Detoxifier`] calls.
#[derive(Default)]
pub struct DetoxScratch {
    /// `neighbours[store][row]`.
    neighbours: Vec<Vec<Vec<Neighbour>>>,
    /// Each searched store's live rows at the call (the gate's size correction).
    store_rows: Vec<u64>,
    /// Each searched store's token statistics at the call, when the prior correction is on:
    /// held for the call so a refresh cannot swap them mid-row. Cloning an `Arc` per store
    /// and call is the whole cost.
    priors: Vec<Option<Arc<TokenPrior>>>,
    /// One rule scratch (and, for the dense form, one sparse row) per chunk of rows: a batch's
    /// rows run the rule in parallel (see [`row_chunks`]).
    chunks: Vec<(RuleScratch, SparseRow)>,
    /// How long the last call searched the stores.
    search_time: Duration,
    /// Per row of the last call: left unsearched by `skip`.
    skipped: Vec<bool>,
    /// The last call's rows, and how many of them `skip` left unsearched.
    last_rows: usize,
    last_skipped: usize,
    /// The tokens that lean toxic for the statistics and ratio in `leaning_key`: recomputed
    /// only when a store's view or the ratio changes, not per call.
    leaning: Vec<u32>,
    leaning_key: Option<(Vec<Arc<TokenPrior>>, f32)>,
    /// The searched rows' hidden states, gathered when some rows of a batch are not searched.
    gathered: Vec<f32>,
    /// The rows searched when not all are, and `found[store][i]` the search's answer for the
    /// i-th of them before it is swapped into the row's list.
    searched: Vec<usize>,
    found: Vec<Vec<Vec<Neighbour>>>,
    /// Reusing the last call's neighbours (off unless [`set_reuse`](Self::set_reuse)).
    reuse: ReuseMemory,
}

impl DetoxScratch {
    /// How long the last call with this scratch spent searching the stores; the rest of its
    /// time went to the rule (a server reports the two as separate phases).
    pub fn last_search_time(&self) -> Duration {
        self.search_time
    }

    /// The last call's rows and how many of them `skip` left unsearched (and unbiased).
    pub fn last_skipped(&self) -> (usize, usize) {
        (self.last_rows, self.last_skipped)
    }

    /// Turns reusing neighbours from one call to the next on (`Some`) or off for the
    /// sequences this scratch serves (docs/architecture.md §1.6). The caller then reports
    /// after each call the token every row emitted ([`advance`](Self::advance)) and which rows
    /// go on ([`keep_rows`](Self::keep_rows)); rows of a call with no report are searched.
    pub fn set_reuse(&mut self, params: Option<ReuseParams>) -> Result<(), ReuseParamError> {
        if let Some(p) = &params {
            p.validate()?;
        }
        self.reuse.params = params;
        self.reuse.pending = false;
        Ok(())
    }

    /// The token each row of the last call emitted, in row order (after
    /// [`keep_rows`](Self::keep_rows)): the next call's rows continue these sequences. A
    /// count that does not match the last call's rows reports nothing.
    pub fn advance(&mut self, tokens: &[u32]) {
        if self.reuse.params.is_none() {
            return;
        }
        self.reuse.tokens.clear();
        self.reuse.tokens.extend_from_slice(tokens);
        self.reuse.pending = tokens.len() == self.reuse.rows;
    }

    /// Only rows `keep` (ascending, in range) of the last call go on, in that order (the
    /// generator drops finished sequences; empty: new sequences start).
    pub fn keep_rows(&mut self, keep: &[usize]) {
        self.reuse.pending = false;
        if self.reuse.params.is_none() {
            return;
        }
        let rows = self.reuse.rows;
        if keep.iter().any(|&r| r >= rows) || keep.windows(2).any(|w| w[0] >= w[1]) {
            self.reuse.rows = 0;
            return;
        }
        for per_store in &mut self.neighbours {
            reuse::keep_in_place(per_store, keep);
        }
        for per_store in &mut self.reuse.radius {
            reuse::keep_in_place(per_store, keep);
        }
        self.reuse.rows = keep.len();
    }

    /// The reuse setting of this scratch (`None`: off).
    pub fn reuse_params(&self) -> Option<ReuseParams> {
        self.reuse.params
    }

    /// What reuse did over this scratch's calls so far.
    pub fn reuse_stats(&self) -> ReuseStats {
        self.reuse.stats
    }

    /// How many rows of the last call were answered from reused neighbours.
    pub fn last_reused(&self) -> usize {
        self.reuse.last_reused
    }
}

/// Whether the skip decision counts in the nucleus, and so writes a skipped row's answer over
/// its logits itself ([`rule::skip_in_nucleus_in_place`]).
fn skips_answer_in_place(params: &RuleParams) -> bool {
    params.skip > 0.0 && params.skip_in_nucleus && params.filter_p < 1.0
}

/// How a batch of `rows` rows is split for the rule: (rows per chunk, chunks), contiguous
/// chunks of at least `min_chunk` rows, at most one per pool thread. Rows are independent and
/// each chunk has its own scratch, so a row's answer does not depend on how its batch was split.
fn row_chunks(rows: usize, min_chunk: usize) -> (usize, usize) {
    let chunks = (rows / min_chunk.max(1))
        .min(rayon::current_num_threads())
        .max(1);
    let chunk_rows = rows.div_ceil(chunks).max(1);
    (chunk_rows, rows.div_ceil(chunk_rows).max(1))
}

/// The dense form's passes over the vocabulary cost a few hundred microseconds per row (with
/// the vector `exp` of `rule`): every row is still worth a pool thread.
const DENSE_MIN_CHUNK: usize = 1;
/// The sparse rule costs tens of microseconds per row, a few times what handing work to a pool
/// thread does; it runs in parallel only for batches like the server's merged ones.
const SPARSE_MIN_CHUNK: usize = 8;

/// The toxicity control engine. Cheap to share (`Arc<Detoxifier>`); every method takes `&self`.
pub struct Detoxifier {
    stores: Vec<ControlStore>,
    defaults: AdjustOptions,
    search: SearchParams,
    dim: usize,
    vocab: usize,
    key_type: KeyType,
    fingerprint: ModelFingerprint,
}

impl Detoxifier {
    /// The paper's setting: a toxic anti-expert and a non-toxic expert.
    pub fn goodtriever(
        toxic: Arc<dyn Store>,
        nontoxic: Arc<dyn Store>,
        defaults: AdjustOptions,
        search: SearchParams,
        vocab: Option<usize>,
    ) -> Result<Self, DetoxError> {
        let stores = vec![
            ControlStore {
                name: "toxic".into(),
                store: toxic,
                weight: -1.0,
            },
            ControlStore {
                name: "nontoxic".into(),
                store: nontoxic,
                weight: 1.0,
            },
        ];
        Self::new(stores, defaults, search, vocab)
    }

    /// Any set of signed stores. All must hold keys of the same model and key type. The
    /// vocabulary size comes from the stores' fingerprint unless given.
    pub fn new(
        stores: Vec<ControlStore>,
        defaults: AdjustOptions,
        search: SearchParams,
        vocab: Option<usize>,
    ) -> Result<Self, DetoxError> {
        defaults.params.validate()?;
        let first = stores.first().ok_or(DetoxError::NoStores)?;
        if stores.len() > MAX_STORES {
            return Err(DetoxError::TooManyStores(stores.len()));
        }
        let fingerprint = first.store.fingerprint().clone();
        let key_type = first.store.key_type();
        for (index, s) in stores.iter().enumerate() {
            if !s.weight.is_finite() {
                return Err(ParamError::Weight {
                    index,
                    weight: s.weight,
                }
                .into());
            }
            if s.store.is_empty() {
                return Err(DetoxError::EmptyStore {
                    name: s.name.clone(),
                });
            }
            if s.store.key_type() != key_type {
                return Err(DetoxError::KeyTypeMismatch {
                    name: s.name.clone(),
                    got: s.store.key_type(),
                    want: key_type,
                });
            }
            fingerprint
                .check_compatible(s.store.fingerprint())
                .map_err(|why| DetoxError::Incompatible {
                    name: s.name.clone(),
                    first: first.name.clone(),
                    why,
                })?;
        }
        let vocab = vocab
            .or(fingerprint.vocab_size)
            .or_else(|| stores.iter().find_map(|s| s.store.fingerprint().vocab_size))
            .ok_or(DetoxError::UnknownVocab)?;
        let detox = Self {
            dim: fingerprint.hidden_size,
            stores,
            defaults,
            search,
            vocab,
            key_type,
            fingerprint,
        };
        detox.check_options(&defaults)?;
        Ok(detox)
    }

    /// The key dimension: every row of `hidden` holds this many values.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// The vocabulary size: every row of logits holds this many values, and stored token ids
    /// must be below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }
    /// The hidden state the stores hold; callers must send that one as `hidden`.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
    /// The model the stores' keys come from (the first store's; the others are checked
    /// compatible).
    pub fn fingerprint(&self) -> &ModelFingerprint {
        &self.fingerprint
    }
    /// The signed stores, in the order given to [`Detoxifier::new`].
    pub fn stores(&self) -> &[ControlStore] {
        &self.stores
    }
    /// The options a call uses when its request does not override them.
    pub fn defaults(&self) -> &AdjustOptions {
        &self.defaults
    }
    /// How every store is searched (exact or HNSW, and its `ef`).
    pub fn search_params(&self) -> &SearchParams {
        &self.search
    }

    /// Picks up segments added to (or retired from) any store since the last call.
    pub fn refresh(&self) -> Result<bool, DetoxError> {
        let mut changed = false;
        for s in &self.stores {
            changed |= s.store.refresh().map_err(|source| DetoxError::Search {
                name: s.name.clone(),
                source,
            })?;
        }
        Ok(changed)
    }

    /// Which stores a mode searches, in order: all of them for the ensemble, the toxic one
    /// (first negative weight) for toxic-only, the first positive one for kNN-LM.
    fn stores_for(&self, mode: Mode) -> Result<StoreSelection, DetoxError> {
        let pick = |pred: fn(f32) -> bool, what| {
            self.stores
                .iter()
                .position(|s| pred(s.weight))
                .map(StoreSelection::One)
                .ok_or(DetoxError::ModeNeeds { mode, what })
        };
        match mode {
            Mode::Ensemble => Ok(StoreSelection::All),
            Mode::ToxicOnly => pick(|w| w < 0.0, "a toxic store (negative weight)"),
            Mode::KnnLm => pick(|w| w > 0.0, "a non-toxic store (positive weight)"),
        }
    }

    /// The stores (indices into [`stores`](Self::stores)) that a call in `mode` searches:
    /// after such a call, [`last_neighbours`](Self::last_neighbours) holds their answers, and
    /// only theirs.
    pub fn searched_stores(&self, mode: Mode) -> Result<std::ops::Range<usize>, DetoxError> {
        Ok(self.stores_for(mode)?.range(self.stores.len()))
    }

    /// Checks that the engine's stores can serve `mode`.
    pub fn check_mode(&self, mode: Mode) -> Result<(), DetoxError> {
        self.stores_for(mode).map(|_| ())
    }

    /// Checks a call's options before any search: the knobs' ranges, that the stores can serve
    /// the mode, that the mode has the variants asked for, and that every store the prior
    /// correction or skipping needs keeps token statistics.
    pub fn check_options(&self, opts: &AdjustOptions) -> Result<(), DetoxError> {
        let selection = self.selection(opts)?;
        if opts.params.prior > 0.0 || opts.params.skip > 0.0 {
            for s in &self.stores[selection.range(self.stores.len())] {
                if s.store.token_prior().is_none() {
                    return Err(DetoxError::NoPrior {
                        name: s.name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The stores a call searches, after the checks of [`check_options`](Self::check_options)
    /// that cost nothing per store.
    fn selection(&self, opts: &AdjustOptions) -> Result<StoreSelection, DetoxError> {
        opts.params.validate()?;
        let selection = self.stores_for(opts.mode)?;
        rule::check_variants(opts.mode, &opts.params).map_err(DetoxError::Variant)?;
        Ok(selection)
    }

    fn check_hidden(&self, hidden: &[f32]) -> Result<usize, DetoxError> {
        if hidden.is_empty() {
            return Err(DetoxError::EmptyBatch);
        }
        if !hidden.len().is_multiple_of(self.dim) {
            return Err(DetoxError::HiddenShape {
                len: hidden.len(),
                dim: self.dim,
            });
        }
        let rows = hidden.len() / self.dim;
        if rows > MAX_ROWS {
            return Err(DetoxError::TooManyRows {
                rows,
                max: MAX_ROWS,
            });
        }
        if let Some(i) = hidden.iter().position(|x| !x.is_finite()) {
            return Err(DetoxError::NonFiniteHidden {
                row: i / self.dim,
                index: i % self.dim,
            });
        }
        if let Some(i) = hidden.iter().position(|x| x.abs() > MAX_ABS_HIDDEN) {
            return Err(DetoxError::HiddenOutOfRange {
                row: i / self.dim,
                index: i % self.dim,
                value: hidden[i],
            });
        }
        Ok(rows)
    }

    /// Searches the stores `mode` needs for every row into `scratch.neighbours`; the stores are
    /// searched concurrently. With `skip` on, `logits` (the rows' raw logits) decide first
    /// which rows need no search; only the others are searched, and a skipped row's neighbour
    /// lists are left empty.
    fn retrieve(
        &self,
        hidden: &[f32],
        logits: Option<&mut [f32]>,
        rows: usize,
        opts: &AdjustOptions,
        scratch: &mut DetoxScratch,
    ) -> Result<StoreSelection, DetoxError> {
        let selection = self.selection(opts)?;
        let range = selection.range(self.stores.len());
        if scratch.neighbours.len() < self.stores.len() {
            scratch.neighbours.resize_with(self.stores.len(), Vec::new);
            scratch.store_rows.resize(self.stores.len(), 0);
            scratch.priors.resize(self.stores.len(), None);
        }
        let needs_stats = opts.params.prior > 0.0 || opts.params.skip > 0.0;
        for j in range.clone() {
            let store = &self.stores[j].store;
            scratch.store_rows[j] = store.len() as u64;
            scratch.priors[j] = if needs_stats {
                Some(store.token_prior().ok_or_else(|| DetoxError::NoPrior {
                    name: self.stores[j].name.clone(),
                })?)
            } else {
                None
            };
        }
        for per_store in &mut scratch.neighbours[range.clone()] {
            if per_store.len() < rows {
                per_store.resize_with(rows, Vec::new);
            }
        }
        scratch.skipped.clear();
        scratch.skipped.resize(rows, false);
        if opts.params.skip > 0.0 {
            let logits = logits.ok_or(DetoxError::SkipNeedsLogits)?;
            self.decide_skips(logits, range.clone(), &opts.params, scratch);
        }
        let skipped = scratch.skipped.iter().filter(|&&s| s).count();
        (scratch.last_rows, scratch.last_skipped) = (rows, skipped);
        let k = opts.params.k;
        let reused = self.reuse_successors(hidden, rows, range.clone(), k, scratch);
        let audit = scratch.reuse.params.is_some_and(|p| p.audit);

        // Rows a store search must answer: all, or (when some are skipped or reused) the
        // others, gathered into one batch whose answers are swapped into place afterwards.
        // An audit searches the reused rows too, to compare.
        let all = skipped == 0 && reused == 0;
        scratch.searched.clear();
        if !all {
            scratch.gathered.clear();
            for row in 0..rows {
                if !scratch.skipped[row] && (audit || !scratch.reuse.reused[row]) {
                    scratch.searched.push(row);
                    scratch
                        .gathered
                        .extend_from_slice(&hidden[row * self.dim..(row + 1) * self.dim]);
                }
            }
            if scratch.found.len() < self.stores.len() {
                scratch.found.resize_with(self.stores.len(), Vec::new);
            }
            let searched = scratch.searched.len();
            for per_store in &mut scratch.found[range.clone()] {
                if per_store.len() < searched {
                    per_store.resize_with(searched, Vec::new);
                }
            }
        }
        let (queries, searched) = if all {
            (hidden, rows)
        } else {
            (&scratch.gathered[..], scratch.searched.len())
        };
        let started = Instant::now();
        let search = |(s, out): (&ControlStore, &mut Vec<Vec<Neighbour>>)| {
            if searched == 0 {
                return Ok(());
            }
            s.store
                .search_into(queries, k, &self.search, &mut out[..searched])
                .map_err(|source| DetoxError::Search {
                    name: s.name.clone(),
                    source,
                })
        };
        let stores = &self.stores[range.clone()];
        let outs = if all {
            &mut scratch.neighbours[range.clone()]
        } else {
            &mut scratch.found[range.clone()]
        };
        if stores.len() == 1 {
            search((&stores[0], &mut outs[0]))?;
        } else {
            use rayon::prelude::*;
            stores
                .par_iter()
                .zip(outs.par_iter_mut())
                .try_for_each(search)?;
        }
        scratch.search_time = started.elapsed();
        if !all {
            place_found(rows, range.clone(), scratch);
        }
        if scratch.reuse.params.is_some() {
            note_radii(rows, range, scratch);
            scratch.reuse.rows = rows;
        }
        Ok(selection)
    }

    /// Fills the lists of rows that may reuse their neighbours (the caller reported the token
    /// each row emitted) from the successors of their last neighbours, and marks in
    /// `scratch.reuse.reused` the rows whose every store kept enough of them; returns how many.
    fn reuse_successors(
        &self,
        hidden: &[f32],
        rows: usize,
        range: std::ops::Range<usize>,
        k: usize,
        scratch: &mut DetoxScratch,
    ) -> usize {
        let memory = &mut scratch.reuse;
        memory.reused.clear();
        memory.reused.resize(rows, false);
        memory.last_reused = 0;
        let pending = std::mem::take(&mut memory.pending) && memory.tokens.len() == rows;
        let Some(params) = memory.params else {
            return 0;
        };
        if memory.prev.len() < self.stores.len() {
            memory.prev.resize_with(self.stores.len(), Vec::new);
            memory.radius.resize_with(self.stores.len(), Vec::new);
            memory.ok.resize_with(self.stores.len(), Vec::new);
        }
        let searchable = (rows - scratch.skipped.iter().filter(|&&s| s).count()) * range.len();
        memory.stats.row_searches += searchable as u64;
        if !pending {
            return 0;
        }
        let needed = params.needed(k);
        let factor = params.radius * params.radius;
        let (dim, skipped, tokens) = (self.dim, &scratch.skipped, &memory.tokens);
        let follow = |(((s, lists), prev), (radius, ok)): FollowItem<'_>| {
            if prev.len() < rows {
                prev.resize_with(rows, Vec::new);
            }
            radius.resize(rows.max(radius.len()), 0.0);
            ok.clear();
            ok.resize(rows, false);
            for row in 0..rows {
                // The last call's list becomes the memory; its buffer takes this call's.
                std::mem::swap(&mut lists[row], &mut prev[row]);
                if skipped[row] || radius[row] <= 0.0 || prev[row].is_empty() {
                    continue;
                }
                let out = &mut lists[row];
                out.clear();
                let q = &hidden[row * dim..(row + 1) * dim];
                ok[row] = s.store.successors_into(&prev[row], tokens[row], q, out)
                    && reuse::accept_successors(out, radius[row] * factor, k, needed);
            }
        };
        let stores = &self.stores[range.clone()];
        let lists = &mut scratch.neighbours[range.clone()];
        let prev = &mut memory.prev[range.clone()];
        let radius = &mut memory.radius[range.clone()];
        let ok = &mut memory.ok[range.clone()];
        {
            use rayon::prelude::*;
            stores
                .par_iter()
                .zip(lists.par_iter_mut())
                .zip(prev.par_iter_mut())
                .zip(radius.par_iter_mut().zip(ok.par_iter_mut()))
                .for_each(follow);
        }
        let mut reused = 0;
        for row in 0..rows {
            let every = memory.ok[range.clone()].iter().all(|ok| ok[row]);
            memory.reused[row] = every;
            reused += every as usize;
        }
        memory.stats.reused += (reused * range.len()) as u64;
        memory.last_reused = reused;
        reused
    }

    /// Marks in `scratch.skipped` the rows whose base distribution gives less than `skip` to
    /// the tokens that lean toxic (docs/architecture.md §1.5). The leaning set is computed
    /// again only when a store's statistics or the ratio changed since the last call. Counted
    /// in the nucleus ([`skips_answer_in_place`]), a skipped row's logits are replaced by its
    /// answer on the way, since the decision computes that answer anyway.
    fn decide_skips(
        &self,
        logits: &mut [f32],
        range: std::ops::Range<usize>,
        params: &RuleParams,
        scratch: &mut DetoxScratch,
    ) {
        let current = |key: &(Vec<Arc<TokenPrior>>, f32)| {
            key.1 == params.skip_ratio
                && key.0.len() == range.len()
                && key
                    .0
                    .iter()
                    .zip(&scratch.priors[range.clone()])
                    .all(|(a, b)| b.as_ref().is_some_and(|b| Arc::ptr_eq(a, b)))
        };
        if !scratch.leaning_key.as_ref().is_some_and(current) {
            let priors: Vec<Arc<TokenPrior>> = scratch.priors[range.clone()]
                .iter()
                .map(|p| p.clone().expect("statistics loaded for skip"))
                .collect();
            let stores: Vec<(f32, &TokenPrior)> = self.stores[range.clone()]
                .iter()
                .zip(&priors)
                .map(|(s, p)| (s.weight, &**p))
                .collect();
            rule::leaning_tokens(&stores, self.vocab, params.skip_ratio, &mut scratch.leaning);
            scratch.leaning_key = Some((priors, params.skip_ratio));
        }
        let leaning = &scratch.leaning;
        let (skip, filter_p) = (params.skip as f64, params.filter_p);
        let in_nucleus = skips_answer_in_place(params);
        let rows = scratch.skipped.len();
        // Counting in the nucleus costs what the dense rule's passes do: every row is worth a
        // pool thread then, as in the dense form.
        let min_chunk = if in_nucleus {
            DENSE_MIN_CHUNK
        } else {
            SPARSE_MIN_CHUNK
        };
        let (chunk_rows, chunks) = row_chunks(rows, min_chunk);
        if scratch.chunks.len() < chunks {
            scratch.chunks.resize_with(chunks, Default::default);
        }
        // Each chunk of rows decides with its own rule scratch (the nucleus's buffers).
        let decide = |z: &mut [f32], skipped: &mut [bool], rule: &mut RuleScratch| {
            for (z, skip_row) in z.chunks_exact_mut(self.vocab).zip(skipped) {
                *skip_row = if in_nucleus {
                    // A row the unchanged answer refuses is searched: the rule then meets
                    // the same row and reports it.
                    rule::skip_in_nucleus_in_place(z, leaning, filter_p, skip, rule)
                        .unwrap_or(false)
                } else {
                    rule::leaning_mass(z, leaning) < skip
                };
            }
        };
        let chunk_len = chunk_rows * self.vocab;
        if chunks == 1 {
            decide(logits, &mut scratch.skipped, &mut scratch.chunks[0].0);
        } else {
            use rayon::prelude::*;
            logits
                .par_chunks_mut(chunk_len)
                .zip(scratch.skipped.par_chunks_mut(chunk_rows))
                .zip(scratch.chunks.par_iter_mut())
                .for_each(|((z, skipped), (rule, _))| decide(z, skipped, rule));
        }
    }

    /// Fills the stack array of experts for one row.
    fn experts_for<'a>(
        &self,
        selection: StoreSelection,
        found: &'a Found<'a>,
        row: usize,
        buf: &mut [Expert<'a, Neighbour>; MAX_STORES],
    ) -> usize {
        let range = selection.range(self.stores.len());
        let n = range.len();
        for (slot, j) in buf.iter_mut().zip(range) {
            let prior = found.priors[j]
                .as_deref()
                .map_or(&[][..], TokenPrior::log_prior);
            *slot = Expert::new(self.stores[j].weight, &found.neighbours[j][row])
                .with_rows(found.store_rows[j])
                .with_prior(prior);
        }
        n
    }

    /// Sparse form: hidden states (`rows × dim`) in, one [`SparseRow`] per row out.
    pub fn adjust_sparse(
        &self,
        hidden: &[f32],
        opts: &AdjustOptions,
        scratch: &mut DetoxScratch,
        out: &mut Vec<SparseRow>,
    ) -> Result<(), DetoxError> {
        let rows = self.check_hidden(hidden)?;
        let selection = self.retrieve(hidden, None, rows, opts, scratch)?;
        out.resize_with(rows, SparseRow::default);
        out.truncate(rows);
        let (mode, params, vocab) = (opts.mode, &opts.params, self.vocab);
        self.rule_rows(
            selection,
            scratch,
            out,
            1,
            SPARSE_MIN_CHUNK,
            |experts, rule, _, answer, _| {
                rule::sparse_row(mode, experts, params, vocab, rule, &mut answer[0])
            },
        )
    }

    /// Dense form: hidden states (`rows × dim`) and raw logits (`rows × vocab`) in; normalised
    /// adjusted log-probabilities (`rows × vocab`, −∞ where filtered) out.
    pub fn adjust_dense(
        &self,
        hidden: &[f32],
        logits: &[f32],
        opts: &AdjustOptions,
        scratch: &mut DetoxScratch,
        out: &mut [f32],
    ) -> Result<(), DetoxError> {
        if out.len() != logits.len() {
            return Err(DetoxError::LogitsShape {
                len: out.len(),
                rows: hidden.len() / self.dim.max(1),
                vocab: self.vocab,
            });
        }
        out.copy_from_slice(logits);
        self.adjust_dense_in_place(hidden, out, opts, scratch)
    }

    /// Dense form over the logits' own buffer: `logits` (`rows × vocab`) holds raw logits on
    /// entry and normalised adjusted log-probabilities on return. For in-process generation,
    /// where the caller does not need the raw logits afterwards.
    pub fn adjust_dense_in_place(
        &self,
        hidden: &[f32],
        logits: &mut [f32],
        opts: &AdjustOptions,
        scratch: &mut DetoxScratch,
    ) -> Result<(), DetoxError> {
        let rows = self.check_hidden(hidden)?;
        if logits.len() != rows * self.vocab {
            return Err(DetoxError::LogitsShape {
                len: logits.len(),
                rows,
                vocab: self.vocab,
            });
        }
        for (row, z) in logits.chunks_exact(self.vocab).enumerate() {
            rule::check_logits(z, self.vocab).map_err(|source| DetoxError::Row { row, source })?;
        }
        let selection = self.retrieve(hidden, Some(&mut *logits), rows, opts, scratch)?;
        let (mode, params, vocab) = (opts.mode, &opts.params, self.vocab);
        let answered_when_skipped = skips_answer_in_place(params);
        self.rule_rows(
            selection,
            scratch,
            logits,
            vocab,
            DENSE_MIN_CHUNK,
            |experts, rule, sparse, z, skipped| {
                if skipped && answered_when_skipped {
                    // The decision wrote the row's answer already (`decide_skips`).
                    return Ok(());
                }
                if skipped {
                    sparse.set_unchanged();
                } else {
                    rule::sparse_row(mode, experts, params, vocab, rule, sparse)?;
                }
                rule::apply_sparse_in_place(z, sparse, params.filter_p, rule)
            },
        )
    }

    /// Runs `row_rule` for every row of a batch whose neighbours `retrieve` found: the row's
    /// experts, a rule scratch, a sparse-row buffer, the row's `per_row` items of `out`, and
    /// whether `skip` left the row unsearched.
    /// Contiguous chunks of rows run in parallel, each with its own scratch (see
    /// [`row_chunks`]).
    fn rule_rows<T: Send>(
        &self,
        selection: StoreSelection,
        scratch: &mut DetoxScratch,
        out: &mut [T],
        per_row: usize,
        min_chunk: usize,
        row_rule: impl Fn(
                &[Expert<'_, Neighbour>],
                &mut RuleScratch,
                &mut SparseRow,
                &mut [T],
                bool,
            ) -> Result<(), RuleError>
            + Sync,
    ) -> Result<(), DetoxError> {
        let rows = out.len() / per_row;
        let (chunk_rows, chunks) = row_chunks(rows, min_chunk);
        if scratch.chunks.len() < chunks {
            scratch.chunks.resize_with(chunks, Default::default);
        }
        let DetoxScratch {
            neighbours,
            store_rows,
            priors,
            chunks: scratches,
            skipped,
            ..
        } = scratch;
        let skipped = &skipped[..];
        let found = Found {
            neighbours,
            store_rows,
            priors,
        };
        let run_chunk =
            |(c, (items, (rule, sparse))): (usize, (&mut [T], &mut (RuleScratch, SparseRow)))| {
                let mut experts = [Expert::<Neighbour>::new(0.0, &[]); MAX_STORES];
                for (i, row_items) in items.chunks_exact_mut(per_row).enumerate() {
                    let row = c * chunk_rows + i;
                    let n = self.experts_for(selection, &found, row, &mut experts);
                    let skip = skipped.get(row).copied().unwrap_or(false);
                    row_rule(&experts[..n], rule, sparse, row_items, skip)
                        .map_err(|source| DetoxError::Row { row, source })?;
                }
                Ok(())
            };
        if chunks == 1 {
            out.chunks_mut(chunk_rows * per_row)
                .zip(scratches.iter_mut())
                .enumerate()
                .try_for_each(run_chunk)
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(chunk_rows * per_row)
                .zip(scratches.par_iter_mut())
                .enumerate()
                .try_for_each(run_chunk)
        }
    }

    /// The neighbours found for `row` of the last call, per searched store (for `explain`-style
    /// debugging and tests).
    pub fn last_neighbours<'s>(
        &self,
        scratch: &'s DetoxScratch,
        store: usize,
        row: usize,
    ) -> Option<&'s [Neighbour]> {
        scratch
            .neighbours
            .get(store)
            .and_then(|s| s.get(row))
            .map(Vec::as_slice)
    }
}

/// Moves a gathered search's answers (`scratch.found`) into their rows' lists and leaves
/// skipped rows' lists empty; when auditing, compares each reused row's successors with its
/// full search instead of replacing them.
fn place_found(rows: usize, range: std::ops::Range<usize>, scratch: &mut DetoxScratch) {
    let DetoxScratch {
        neighbours,
        found,
        searched,
        skipped,
        reuse: memory,
        ..
    } = scratch;
    for j in range {
        for (i, &row) in searched.iter().enumerate() {
            if memory.reused[row] {
                let (recall, in_top_k) =
                    reuse::audit(&neighbours[j][row], &found[j][i], &mut memory.ids);
                memory.stats.audited += 1;
                memory.stats.recall_sum += recall;
                memory.stats.in_top_k_sum += in_top_k;
            } else {
                std::mem::swap(&mut neighbours[j][row], &mut found[j][i]);
            }
        }
        for row in (0..rows).filter(|&r| skipped[r]) {
            neighbours[j][row].clear();
        }
    }
}

/// Remembers, per store, each searched row's k-th distance: the neighbourhood a later call's
/// successors must fall in. Reused rows keep the radius of their last full search, so reuse
/// cannot drift away from what a search found; skipped rows have none.
fn note_radii(rows: usize, range: std::ops::Range<usize>, scratch: &mut DetoxScratch) {
    let memory = &mut scratch.reuse;
    for j in range {
        let radius = &mut memory.radius[j];
        radius.resize(rows.max(radius.len()), 0.0);
        for (row, r) in radius.iter_mut().enumerate().take(rows) {
            if scratch.skipped[row] {
                *r = 0.0;
            } else if !memory.reused[row] {
                *r = scratch.neighbours[j][row].last().map_or(0.0, |n| n.dist);
            }
        }
    }
}

/// Per-row neighbour lists of one store.
type Lists = Vec<Vec<Neighbour>>;

/// One store's part in following successors: the store, this call's lists, the last call's,
/// the radii and the per-row verdicts.
type FollowItem<'a> = (
    ((&'a ControlStore, &'a mut Lists), &'a mut Lists),
    (&'a mut Vec<f32>, &'a mut Vec<bool>),
);

/// What a call's search left for the rule, borrowed from the scratch.
struct Found<'a> {
    neighbours: &'a [Vec<Vec<Neighbour>>],
    store_rows: &'a [u64],
    priors: &'a [Option<Arc<TokenPrior>>],
}

#[derive(Debug, Clone, Copy)]
enum StoreSelection {
    All,
    One(usize),
}

impl StoreSelection {
    fn range(self, n: usize) -> std::ops::Range<usize> {
        match self {
            StoreSelection::All => 0..n,
            StoreSelection::One(j) => j..j + 1,
        }
    }
}

/// The engine as the generator's per-step hook: every decoding step's keys are searched and
/// the step's logits are replaced by the controlled log-probabilities.
pub struct ControlHook {
    detox: Arc<Detoxifier>,
    opts: AdjustOptions,
    scratch: DetoxScratch,
    rows: u64,
    skipped: u64,
}

impl ControlHook {
    /// A hook that adjusts every step with `opts`; fails early if the options are out of range
    /// or the engine's stores cannot serve them ([`Detoxifier::check_options`]), rather than at
    /// the first step.
    pub fn new(detox: Arc<Detoxifier>, opts: AdjustOptions) -> Result<Self, DetoxError> {
        detox.check_options(&opts)?;
        Ok(Self {
            detox,
            opts,
            scratch: DetoxScratch::default(),
            rows: 0,
            skipped: 0,
        })
    }

    /// The same hook reusing each sequence's neighbours from one step to the next where
    /// `reuse` allows (docs/architecture.md §1.6).
    pub fn with_reuse(mut self, reuse: ReuseParams) -> Result<Self, DetoxError> {
        self.scratch.set_reuse(Some(reuse))?;
        Ok(self)
    }
}

impl StepHook for ControlHook {
    fn key_type(&self) -> KeyType {
        self.detox.key_type()
    }

    fn adjust(&mut self, keys: &[f32], logits: &mut [f32], rows: usize) -> Result<(), HookError> {
        debug_assert_eq!(keys.len(), rows * self.detox.dim());
        self.detox
            .adjust_dense_in_place(keys, logits, &self.opts, &mut self.scratch)
            .map_err(HookError::new)?;
        let (rows, skipped) = self.scratch.last_skipped();
        self.rows += rows as u64;
        self.skipped += skipped as u64;
        Ok(())
    }

    /// Rows adjusted so far, and how many of them `skip` left unsearched.
    fn skip_counts(&self) -> (u64, u64) {
        (self.rows, self.skipped)
    }

    fn advance(&mut self, tokens: &[u32]) {
        self.scratch.advance(tokens);
    }

    fn keep_rows(&mut self, keep: &[usize]) {
        self.scratch.keep_rows(keep);
    }

    fn reuse_stats(&self) -> Option<ReuseStats> {
        self.scratch
            .reuse
            .params
            .is_some()
            .then(|| self.scratch.reuse_stats())
    }
}
