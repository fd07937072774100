//! Store addresses: what every command and the server accept where a store is named — a
//! datastore directory, or a remote store's URL (`milvus://HOST:PORT/COLLECTION`,
//! `milvuss://` with TLS; docs/architecture.md §3, "Milvus") — and the one function that
//! opens what an address names.

use std::path::Path;
use std::sync::Arc;

use crate::datastore::{Datastore, DatastoreError};
use crate::store::Store;

/// The URL schemes of remote stores.
pub const REMOTE_SCHEMES: [&str; 2] = ["milvus://", "milvuss://"];

/// Whether `address` names a remote store rather than a directory.
pub fn is_remote(address: &str) -> bool {
    REMOTE_SCHEMES.iter().any(|s| address.starts_with(s))
}

/// Opens the store `address` names: a Milvus store for a `milvus://` or `milvuss://` URL
/// (with the `milvus` cargo feature; without it such an address is
/// [`DatastoreError::BadAddress`]), the memory-mapped [`Datastore`] in that directory
/// otherwise.
pub fn open_store(address: &str) -> Result<Arc<dyn Store>, DatastoreError> {
    if is_remote(address) {
        return open_remote(address);
    }
    Ok(Arc::new(Datastore::open(Path::new(address))?))
}

#[cfg(feature = "milvus")]
fn open_remote(address: &str) -> Result<Arc<dyn Store>, DatastoreError> {
    Ok(Arc::new(crate::milvus::MilvusStore::open(address)?))
}

#[cfg(not(feature = "milvus"))]
fn open_remote(address: &str) -> Result<Arc<dyn Store>, DatastoreError> {
    Err(DatastoreError::BadAddress {
        address: address.to_string(),
        why: "this build has no Milvus backend; build goodtriever with `--features milvus`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_urls_from_directories() {
        assert!(is_remote("milvus://127.0.0.1:19530/toxic"));
        assert!(is_remote("milvuss://db/nontoxic"));
        assert!(!is_remote("datastores/toxic"));
        assert!(!is_remote("./milvus:/x"));
    }

    #[test]
    fn a_missing_directory_is_the_local_error() {
        let err = open_store("/nonexistent/goodtriever-store").unwrap_err();
        assert!(
            matches!(err, DatastoreError::NotFound(_) | DatastoreError::Io { .. }),
            "{err}"
        );
    }

    #[cfg(not(feature = "milvus"))]
    #[test]
    fn a_url_without_the_feature_says_how_to_build() {
        let err = open_store("milvus://127.0.0.1:19530/toxic").unwrap_err();
        assert!(err.to_string().contains("--features milvus"), "{err}");
    }
}
