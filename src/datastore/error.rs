//! The one error type of the datastore.
//!
//! Every variant says what went wrong in words a person can act on and, where a file is
//! involved, names it: a datastore is a directory of many files and "checksum mismatch"
//! without a path sends people hunting. Errors about bad input are raised before anything is
//! written, so they always leave the directory as it was.

use std::path::{Path, PathBuf};

use crate::fingerprint::KeyType;
use crate::limits::MAX_K;

/// Everything that can go wrong opening, writing or searching a datastore.
///
/// One enum for the whole module (and for every [`crate::store::Store`] backend) so callers
/// match on one type; the server maps each variant to a gRPC status code in one place. Bad
/// input (shapes, non-finite values, out-of-range knobs) has its own variants because the
/// caller can fix it; file and format problems carry the path of the file involved.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// A file system call failed on one file of the datastore.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, as words for the message ("create", "fsync", "rename into place").
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// `create` was pointed at a directory that already holds a datastore.
    #[error("a datastore already exists in {0} (it has a manifest.json); open it instead")]
    AlreadyExists(PathBuf),

    /// `open` was pointed at a directory without a manifest.
    #[error("no datastore in {0}: manifest.json is missing")]
    NotFound(PathBuf),

    /// manifest.json does not parse, has an unknown format version, or disagrees with itself.
    #[error("manifest {path} is invalid: {detail}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// A segment file has the wrong size, a bad header or a checksum that does not match.
    #[error("file {path} is corrupt: {detail}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },

    /// `create` or an index build was given options that cannot work together.
    #[error("invalid datastore options: {0}")]
    InvalidOptions(String),

    /// A key or query buffer's length is not a multiple of the key dimension.
    #[error("dimension mismatch: the datastore holds {expected}-dimensional keys, got {what} of {got} values, which is not a whole number of rows")]
    DimMismatch {
        /// The datastore's key dimension.
        expected: usize,
        /// How many values the caller passed.
        got: usize,
        /// Which input it was ("a key batch" or "a query batch").
        what: &'static str,
    },

    /// A key or query holds NaN or an infinity, which would poison every distance.
    #[error("{what} row {row} column {col} is {value}: keys and queries must be finite")]
    NonFinite {
        /// Which input it was ("key" or "query").
        what: &'static str,
        /// The row within the batch, from 0.
        row: usize,
        /// The column within the row, from 0.
        col: usize,
        /// The offending value.
        value: f32,
    },

    /// An f32 key appended to an f16 store is too large in magnitude for f16.
    #[error("key row {row} column {col} is {value}, which does not fit in f16 (largest finite f16 is 65504); store f32 keys or rescale")]
    F16Overflow {
        /// The row within the batch, from 0.
        row: usize,
        /// The column within the row, from 0.
        col: usize,
        /// The value that overflows.
        value: f32,
    },

    /// `append` was called with no rows; an empty segment is never written.
    #[error("nothing to append: the key batch is empty")]
    EmptyAppend,

    /// An append's provenance has a field that is too long or not printable text.
    #[error("the segment's {field} {why}")]
    BadProvenance {
        /// `source`, `label` or `tag`.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },

    /// The source text handed to an append does not fit its rows (docs/architecture.md §3).
    #[error("bad row sources: {0}")]
    BadSources(String),

    /// `append` got a next-token value at or beyond the store's vocabulary size.
    #[error("value {value} of row {row} is not a token id: the store's vocabulary has {vocab} tokens (ids below {vocab})")]
    ValueOutOfVocab {
        /// The row, 0-based within the batch.
        row: usize,
        /// The value given.
        value: u32,
        /// The store's vocabulary size.
        vocab: usize,
    },

    /// `append` got a different number of next-token values than key rows.
    #[error("got {values} values for {rows} key rows; every key row needs exactly one value")]
    ValueCountMismatch {
        /// Key rows in the batch.
        rows: usize,
        /// Values passed with them.
        values: usize,
    },

    /// A search asked for 0 or more than [`MAX_K`] neighbours.
    #[error("k = {0} is out of range: k must be between 1 and {MAX_K}")]
    BadK(usize),

    /// A search was given `ef = 0`.
    #[error("ef = {0} is out of range: ef must be at least 1")]
    BadEf(usize),

    /// A search ran on a store with no live rows (none appended, or every segment retired).
    #[error("the datastore in {0} is empty: there is nothing to search")]
    EmptyStore(PathBuf),

    /// The caller's output slice does not have one vector per query row.
    #[error("output buffer has {got} rows for {expected} queries")]
    OutputMismatch {
        /// Query rows.
        expected: usize,
        /// Output vectors passed.
        got: usize,
    },

    /// A caller's keys are a different hidden state than the ones the store holds.
    #[error("key type mismatch: the datastore holds {expected} keys, got {got}")]
    KeyTypeMismatch {
        /// The store's key type.
        expected: KeyType,
        /// The caller's.
        got: KeyType,
    },

    /// A caller's model fingerprint does not match the store's.
    #[error("model mismatch: {0}")]
    ModelMismatch(String),

    /// A segment id passed to retire or unretire is not in the manifest.
    #[error("no segment {0} in this datastore")]
    UnknownSegment(u64),

    /// Retiring a segment that is already retired, or unretiring one that is not.
    #[error("segment {id} is {state}")]
    SegmentState {
        /// The segment.
        id: u64,
        /// Its current state, as words for the message ("already retired", "not retired").
        state: &'static str,
    },

    /// Building a segment's HNSW index was given impossible parameters or rows.
    #[error("index build failed: {0}")]
    IndexBuild(String),

    /// A row id past the end of the live rows was looked up.
    #[error("no row {id}: the datastore has {rows} live rows (row ids start at 0)")]
    NoSuchRow {
        /// The id asked for.
        id: u64,
        /// Live rows in the store.
        rows: usize,
    },

    /// A store behind a server could not be reached (see [`crate::store`]).
    #[error("the store at {location} is unavailable: {reason}")]
    Unavailable {
        /// The store's address, as [`crate::store::Store::location`] gives it.
        location: String,
        /// The client's error.
        reason: String,
    },

    /// A store address (`milvus://HOST:PORT/COLLECTION`, see [`crate::store::open_store`])
    /// that cannot be used: malformed, or of a backend this build does not include.
    #[error("store address {address:?} cannot be used: {why}")]
    BadAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        why: String,
    },

    /// A remote store's collection does not exist.
    #[error("no datastore at {0}: the collection does not exist (copy a store there with `goodtriever datastore push DIR {0}`)")]
    NoCollection(String),

    /// A store behind a server answered, but with an error that is not about reaching it (a
    /// refused request, an answer that does not decode).
    #[error("the store at {location} failed: {detail}")]
    Backend {
        /// The store's address, as [`crate::store::Store::location`] gives it.
        location: String,
        /// The server's or the client's error.
        detail: String,
    },

    /// A store behind a server did not answer in time (see [`crate::store`]).
    #[error("the store at {location} did not answer within {after:?}")]
    TimedOut {
        /// The store's address, as [`crate::store::Store::location`] gives it.
        location: String,
        /// How long the caller waited.
        after: std::time::Duration,
    },
}

impl DatastoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        DatastoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> Self {
        DatastoreError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}

/// Short alias used throughout the module.
pub type Result<T, E = DatastoreError> = std::result::Result<T, E>;
