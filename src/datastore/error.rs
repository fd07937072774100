//! The one error type of the datastore.
//!
//! Every variant says what went wrong in words a person can act on and, where a file is
//! involved, names it: a datastore is a directory of many files and "checksum mismatch"
//! without a path sends people hunting. Errors about bad input are raised before anything is
//! written, so they always leave the directory as it was.

use std::path::{Path, PathBuf};

use crate::fingerprint::KeyType;
use crate::limits::MAX_K;

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("a datastore already exists in {0} (it has a manifest.json); open it instead")]
    AlreadyExists(PathBuf),

    #[error("no datastore in {0}: manifest.json is missing")]
    NotFound(PathBuf),

    #[error("manifest {path} is invalid: {detail}")]
    BadManifest { path: PathBuf, detail: String },

    #[error("file {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },

    #[error("invalid datastore options: {0}")]
    InvalidOptions(String),

    #[error("dimension mismatch: the datastore holds {expected}-dimensional keys, got {what} of {got} values, which is not a whole number of rows")]
    DimMismatch {
        expected: usize,
        got: usize,
        what: &'static str,
    },

    #[error("{what} row {row} column {col} is {value}: keys and queries must be finite")]
    NonFinite {
        what: &'static str,
        row: usize,
        col: usize,
        value: f32,
    },

    #[error("key row {row} column {col} is {value}, which does not fit in f16 (largest finite f16 is 65504); store f32 keys or rescale")]
    F16Overflow { row: usize, col: usize, value: f32 },

    #[error("nothing to append: the key batch is empty")]
    EmptyAppend,

    #[error("got {values} values for {rows} key rows; every key row needs exactly one value")]
    ValueCountMismatch { rows: usize, values: usize },

    #[error("k = {0} is out of range: k must be between 1 and {MAX_K}")]
    BadK(usize),

    #[error("ef = {0} is out of range: ef must be at least 1")]
    BadEf(usize),

    #[error("the datastore in {0} is empty: there is nothing to search")]
    EmptyStore(PathBuf),

    #[error("output buffer has {got} rows for {expected} queries")]
    OutputMismatch { expected: usize, got: usize },

    #[error("key type mismatch: the datastore holds {expected} keys, got {got}")]
    KeyTypeMismatch { expected: KeyType, got: KeyType },

    #[error("model mismatch: {0}")]
    ModelMismatch(String),

    #[error("no segment {0} in this datastore")]
    UnknownSegment(u64),

    #[error("segment {id} is {state}")]
    SegmentState { id: u64, state: &'static str },

    #[error("index build failed: {0}")]
    IndexBuild(String),

    #[error("no row {id}: the datastore has {rows} live rows (row ids start at 0)")]
    NoSuchRow { id: u64, rows: usize },

    /// A store behind a server could not be reached (see [`crate::store`]).
    #[error("the store at {location} is unavailable: {reason}")]
    Unavailable { location: String, reason: String },

    /// A store behind a server did not answer in time (see [`crate::store`]).
    #[error("the store at {location} did not answer within {after:?}")]
    TimedOut {
        location: String,
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
