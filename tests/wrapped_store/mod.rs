//! A local store behind the store interface that counts what it is asked to search, shared
//! by the engine's test files.

use std::sync::Arc;

use goodtriever::datastore::{
    Datastore, DatastoreError, KeyDtype, Keys, Neighbour, Provenance, SearchParams, SegmentInfo,
};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::rule::TokenPrior;
use goodtriever::store::Store;

/// A local store behind the store interface, counting the query rows it is asked to search,
/// and optionally keeping no token statistics (as a remote backend): everything else delegated.
#[derive(Debug)]
pub struct Wrapped {
    inner: Arc<Datastore>,
    keeps_stats: bool,
    /// Whether it can say which row follows which (a remote engine cannot).
    pub follows: bool,
    searched: std::sync::atomic::AtomicUsize,
}

impl Wrapped {
    pub fn new(inner: Arc<Datastore>, keeps_stats: bool) -> Self {
        Self {
            inner,
            keeps_stats,
            follows: true,
            searched: Default::default(),
        }
    }

    /// Like a remote backend: no token statistics.
    #[allow(dead_code)] // used by detox_engine, not by every test that shares the module
    pub fn no_stats(inner: Arc<Datastore>) -> Self {
        Self::new(inner, false)
    }

    pub fn searched(&self) -> usize {
        self.searched.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Store for Wrapped {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn fingerprint(&self) -> &ModelFingerprint {
        Store::fingerprint(&*self.inner)
    }
    fn key_type(&self) -> KeyType {
        Store::key_type(&*self.inner)
    }
    fn dtype(&self) -> KeyDtype {
        Store::dtype(&*self.inner)
    }
    fn len(&self) -> usize {
        Store::len(&*self.inner)
    }
    fn token_prior(&self) -> Option<Arc<TokenPrior>> {
        self.keeps_stats
            .then(|| Store::token_prior(&*self.inner))
            .flatten()
    }
    fn segments(&self) -> Vec<SegmentInfo> {
        Store::segments(&*self.inner)
    }
    fn search_into(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        out: &mut [Vec<Neighbour>],
    ) -> Result<(), DatastoreError> {
        self.searched.fetch_add(
            queries.len() / Store::dim(&*self.inner),
            std::sync::atomic::Ordering::SeqCst,
        );
        Store::search_into(&*self.inner, queries, k, params, out)
    }
    fn refresh(&self) -> Result<bool, DatastoreError> {
        Store::refresh(&*self.inner)
    }
    fn successors_into(
        &self,
        prev: &[Neighbour],
        token: u32,
        query: &[f32],
        out: &mut Vec<Neighbour>,
    ) -> bool {
        self.follows && Store::successors_into(&*self.inner, prev, token, query, out)
    }
    fn append(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
    ) -> Result<SegmentInfo, DatastoreError> {
        Store::append(&*self.inner, keys, values, provenance)
    }
}
