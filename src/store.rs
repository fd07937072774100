//! The store interface: what the engine needs from a datastore, whatever holds its rows.
//!
//! The engine ([`crate::detox::Detoxifier`]) and the server only ever talk to a [`Store`]: its
//! identity (dimension, model fingerprint with the vocabulary size, key type, key dtype), its
//! size and segments, a k-nearest-neighbour search into the caller's buffers, a refresh that
//! picks up rows other writers committed, and an append. The memory-mapped, segmented
//! [`Datastore`] is the first implementation; a remote vector engine is meant to be another.
//!
//! Why the trait is shaped so:
//! - **Blocking, `&self`, `Send + Sync`.** The engine calls `search_into` from its rayon pool
//!   (one task per store, concurrently) and shares stores between threads as
//!   `Arc<dyn Store>`. A remote backend blocks the pool thread on its client (with its own
//!   timeout) instead of making every caller async; the engine's pool already bounds how many
//!   steps wait at once.
//! - **Caller buffers.** `search_into` fills one reusable `Vec` per query row, so a decoding
//!   step allocates nothing once the buffers have grown; a backend that receives its answer in
//!   its own buffers copies it once into these.
//! - **One typed error.** Every failure is a [`DatastoreError`]; a backend that cannot reach
//!   its server says so with [`DatastoreError::Unavailable`] or [`DatastoreError::TimedOut`],
//!   which the server maps to `UNAVAILABLE` and `DEADLINE_EXCEEDED` instead of `INTERNAL`, so
//!   the error needs no special case anywhere above the store.
//! - **Rows with their next token only.** A neighbour is `(id, value, squared L2 distance)`;
//!   everything the rule needs. Ids are the store's own, stable until segments change.

use crate::datastore::{
    Datastore, DatastoreError, KeyDtype, Keys, MergePolicy, Neighbour, Provenance, RowOrigin,
    RowSources, SearchParams, SegmentInfo,
};
use crate::fingerprint::{KeyType, ModelFingerprint};
use crate::rule::TokenPrior;
use std::sync::Arc;

/// A kNN datastore as the engine sees it. See the module docs for the contract.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Where the store lives, for messages: a directory, or a server address and collection.
    fn location(&self) -> String;

    /// The model the keys come from; its `hidden_size` is the key dimension and its
    /// `vocab_size`, when known, bounds the stored values.
    fn fingerprint(&self) -> &ModelFingerprint;

    /// Which hidden state the keys are.
    fn key_type(&self) -> KeyType;

    /// How the keys are stored.
    fn dtype(&self) -> KeyDtype;

    /// The key dimension.
    fn dim(&self) -> usize {
        self.fingerprint().hidden_size
    }

    /// Live rows (retired segments excluded).
    fn len(&self) -> usize;

    /// The live rows' next-token statistics, for prior-corrected experts; `None` when the
    /// backend does not keep them (the default: a remote store would have to read every
    /// row's value to count them).
    fn token_prior(&self) -> Option<Arc<TokenPrior>> {
        None
    }

    /// Whether the store has no live rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every segment, retired ones included, in manifest order.
    fn segments(&self) -> Vec<SegmentInfo>;

    /// The `k` nearest rows of each query row (`queries` is row-major, `out.len()` × dim) into
    /// `out`, each sorted by ascending squared L2 distance, with `k` neighbours unless the store
    /// has fewer rows. `out`'s vectors are cleared and refilled; their allocations are kept.
    fn search_into(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        out: &mut [Vec<Neighbour>],
    ) -> Result<(), DatastoreError>;

    /// Appends to `out` the row after each neighbour in `prev` (from the last search) whose
    /// value is `token`, in the same source document, with its exact squared L2 distance to
    /// `query`: the candidates for reusing a step's neighbours at the next one
    /// (docs/architecture.md §1.6). Returns `false`, leaving `out` alone, when the backend
    /// cannot say which row follows which (the default: a remote engine's ids carry no order).
    fn successors_into(
        &self,
        _prev: &[Neighbour],
        _token: u32,
        _query: &[f32],
        _out: &mut Vec<Neighbour>,
    ) -> bool {
        false
    }

    /// Picks up changes other writers committed; `true` when something changed.
    fn refresh(&self) -> Result<bool, DatastoreError>;

    /// Appends rows (keys with their next-token values), durable when this returns.
    fn append(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
    ) -> Result<SegmentInfo, DatastoreError>;

    /// Whether [`append_with_sources`](Self::append_with_sources) keeps rows' source text
    /// (a local store does; the default, for backends that keep only keys and values, does
    /// not). Writers from text pass sources only where they are kept.
    fn keeps_sources(&self) -> bool {
        false
    }

    /// [`append_with_progress`](Self::append_with_progress) that also records each row's place
    /// in its source text (docs/architecture.md §3). A backend that keeps no source text
    /// refuses sources rather than dropping them: the default does.
    fn append_with_sources(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        sources: Option<RowSources>,
        progress: &dyn Fn(usize),
    ) -> Result<SegmentInfo, DatastoreError> {
        match sources {
            None => self.append_with_progress(keys, values, provenance, progress),
            Some(_) => Err(DatastoreError::BadSources(format!(
                "the store at {} keeps no source text; append without sources",
                self.location()
            ))),
        }
    }

    /// Where row `id` (as the last search returned it) lives and the source text around it,
    /// `context` bytes either side; `None` when the backend cannot say (the default, for
    /// stores without segments of their own). Used by `explain`, never on the decoding path.
    fn row_origin(&self, _id: u64, _context: usize) -> Result<Option<RowOrigin>, DatastoreError> {
        Ok(None)
    }

    /// [`append`](Self::append) that reports the rows written (or indexed) so far to
    /// `progress`, for the progress bars of long appends; the default reports nothing.
    fn append_with_progress(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        progress: &dyn Fn(usize),
    ) -> Result<SegmentInfo, DatastoreError> {
        let _ = progress;
        self.append(keys, values, provenance)
    }

    /// One step of keeping the segment count low as small appends accumulate: merges what
    /// `policy` says is due and returns the merged segment, or `None` when nothing was (or the
    /// backend keeps its own segments, as a remote engine does: the default).
    fn merge_small_segments(
        &self,
        _policy: &MergePolicy,
    ) -> Result<Option<SegmentInfo>, DatastoreError> {
        Ok(None)
    }
}

impl Store for Datastore {
    fn location(&self) -> String {
        self.dir().display().to_string()
    }
    fn fingerprint(&self) -> &ModelFingerprint {
        Datastore::fingerprint(self)
    }
    fn key_type(&self) -> KeyType {
        Datastore::key_type(self)
    }
    fn dtype(&self) -> KeyDtype {
        Datastore::dtype(self)
    }
    fn dim(&self) -> usize {
        Datastore::dim(self)
    }
    fn len(&self) -> usize {
        Datastore::len(self)
    }
    fn token_prior(&self) -> Option<Arc<TokenPrior>> {
        Some(Datastore::token_prior(self))
    }
    fn segments(&self) -> Vec<SegmentInfo> {
        Datastore::segments(self)
    }
    fn search_into(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        out: &mut [Vec<Neighbour>],
    ) -> Result<(), DatastoreError> {
        Datastore::search_into(self, queries, k, params, out)
    }
    fn refresh(&self) -> Result<bool, DatastoreError> {
        Datastore::refresh(self)
    }
    fn successors_into(
        &self,
        prev: &[Neighbour],
        token: u32,
        query: &[f32],
        out: &mut Vec<Neighbour>,
    ) -> bool {
        Datastore::successors_into(self, prev, token, query, out);
        true
    }
    fn append(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
    ) -> Result<SegmentInfo, DatastoreError> {
        Datastore::append(self, keys, values, provenance)
    }
    fn append_with_progress(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        progress: &dyn Fn(usize),
    ) -> Result<SegmentInfo, DatastoreError> {
        Datastore::append_with_progress(self, keys, values, provenance, progress)
    }
    fn merge_small_segments(
        &self,
        policy: &MergePolicy,
    ) -> Result<Option<SegmentInfo>, DatastoreError> {
        self.merge_tail(policy)
    }
    fn append_with_sources(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        sources: Option<RowSources>,
        progress: &dyn Fn(usize),
    ) -> Result<SegmentInfo, DatastoreError> {
        Datastore::append_with_sources(self, keys, values, provenance, sources, progress)
    }
    fn keeps_sources(&self) -> bool {
        true
    }
    fn row_origin(&self, id: u64, context: usize) -> Result<Option<RowOrigin>, DatastoreError> {
        Datastore::row_origin(self, id, context).map(Some)
    }
}
