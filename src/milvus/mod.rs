//! A [`Store`] whose rows live in a Milvus collection (docs/architecture.md §3, "Milvus", and
//! §8, "A new store backend"): for stores larger than one machine serves from memory, and for
//! a fleet of generation servers sharing one store.
//!
//! One collection per datastore: `pk` (INT64, the row id), `value` (INT32, the next token),
//! `segment` (INT32, the segment id) and `key` (FLOAT_VECTOR of the key dimension, HNSW, L2).
//! The identity, segments and provenance are one JSON record ([`meta`]) in a companion
//! collection (`meta_store`). Searches return Milvus's own squared L2 distances, computed in f32 on the
//! stored f32 keys; the tests measure their agreement with the exact scan (docs/scale-out.md
//! says why this, not a re-rank from returned vectors).
//!
//! Modules: [`address`] (parsing `milvus://`), [`meta`] (the metadata record), `client`
//! (the runtime and bounded calls), `search`, `write` (appends), [`push`] (copying a local
//! store in, verifying a copy).

pub mod address;
mod client;
pub mod meta;
mod meta_store;
pub mod push;
mod search;
mod write;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use milvus::v2::prelude::*;
// The prelude brings its own `Result`; ours is the standard one.
use std::result::Result;

pub use address::{is_milvus_address, MilvusAddress};
use client::Conn;
use meta::{fields, Meta, MetaIndex};
pub use push::{push, verify_milvus, MilvusVerifyReport, PushOptions, PushReport};

use crate::datastore::{
    DatastoreError, KeyDtype, Keys, Neighbour, Provenance, SearchParams, SegmentInfo,
};
use crate::fingerprint::{KeyType, ModelFingerprint};
use crate::store::Store;

/// How long loading a collection into the query nodes may take.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A datastore in a Milvus collection. `Send + Sync`; share it as `Arc<dyn Store>`.
pub struct MilvusStore {
    conn: Conn,
    meta: ArcSwap<Meta>,
    // Identity is fixed at open; a metadata record that changes it is refused on refresh.
    fingerprint: ModelFingerprint,
    key_type: KeyType,
    /// Serialises this process's writers (one writer process per collection: docs/scale-out.md).
    write: Mutex<()>,
}

impl std::fmt::Debug for MilvusStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.meta.load();
        f.debug_struct("MilvusStore")
            .field("address", &self.conn.addr)
            .field("rows", &m.rows)
            .field("segments", &m.segments.len())
            .finish()
    }
}

impl MilvusStore {
    /// Opens the store at `address` (`milvus://HOST:PORT/COLLECTION`): connects, reads and
    /// checks its metadata and the collection's schema, and loads the collection for search.
    /// An unreachable server is [`DatastoreError::Unavailable`] naming the address; a missing
    /// collection [`DatastoreError::NoCollection`]; a collection that is not a store, or whose
    /// push has not finished, [`DatastoreError::BadManifest`].
    pub fn open(address: &str) -> Result<Self, DatastoreError> {
        let addr = MilvusAddress::parse(address)?;
        let conn = Conn::connect(&addr)?;
        let meta = read_meta(&conn)?;
        if let Some(p) = &meta.push {
            return Err(DatastoreError::BadManifest {
                path: conn.location().into(),
                detail: format!(
                    "a push from {} has not finished ({} of {} rows copied): run `goodtriever datastore push` again to resume it",
                    p.source, p.rows_done, p.total_rows
                ),
            });
        }
        load(&conn)?;
        Ok(Self::from_parts(conn, meta))
    }

    fn from_parts(conn: Conn, meta: Meta) -> Self {
        MilvusStore {
            fingerprint: meta.fingerprint.clone(),
            key_type: meta.key_type,
            meta: ArcSwap::from_pointee(meta),
            conn,
            write: Mutex::new(()),
        }
    }

    /// The address the store was opened with.
    pub fn address(&self) -> &MilvusAddress {
        &self.conn.addr
    }

    /// The metadata record as last read.
    pub fn meta(&self) -> Arc<Meta> {
        self.meta.load_full()
    }

    /// The HNSW parameters of the collection's index.
    pub fn index(&self) -> MetaIndex {
        self.meta.load().index
    }

    /// Drops the store's collection and everything in it. For tests and for replacing a
    /// failed copy; there is no undo.
    pub fn drop_collection(address: &str) -> Result<(), DatastoreError> {
        let addr = MilvusAddress::parse(address)?;
        let conn = Conn::connect(&addr)?;
        let name = addr.collection.clone();
        if has_collection(&conn)? {
            conn.call(move |c| async move {
                c.drop_collection(
                    DropCollectionRequest::builder()
                        .collection_name(name)
                        .build()?,
                )
                .await
            })?;
        }
        meta_store::drop(&conn)
    }
}

/// Whether the collection exists.
fn has_collection(conn: &Conn) -> Result<bool, DatastoreError> {
    let name = conn.addr.collection.clone();
    conn.has_collection(name)
}

/// Reads the collection's metadata record and checks its schema against it.
fn read_meta(conn: &Conn) -> Result<Meta, DatastoreError> {
    if !has_collection(conn)? {
        return Err(DatastoreError::NoCollection(conn.location()));
    }
    let name = conn.addr.collection.clone();
    let desc = conn.call(move |c| async move {
        c.describe_collection(
            DescribeCollectionRequest::builder()
                .collection_name(name)
                .build()?,
        )
        .await
    })?;
    let desc = desc.description();
    let location = conn.location();
    let meta = Meta::from_json(&location, meta_store::read(conn)?.as_deref())?;
    check_schema(&location, desc.get_schema(), meta.fingerprint.hidden_size)?;
    Ok(meta)
}

/// The collection must have exactly the fields a store writes, with the key dimension the
/// metadata records.
fn check_schema(
    location: &str,
    schema: &CollectionSchema,
    dim: usize,
) -> Result<(), DatastoreError> {
    let bad = |detail: String| DatastoreError::BadManifest {
        path: location.into(),
        detail,
    };
    let want = [
        (fields::PK, DataType::Int64),
        (fields::VALUE, DataType::Int32),
        (fields::SEGMENT, DataType::Int32),
        (fields::KEY, DataType::FloatVector),
    ];
    for (name, ty) in want {
        let f = schema
            .get_fields()
            .iter()
            .find(|f| f.get_name() == name)
            .ok_or_else(|| bad(format!("the collection has no field {name:?}")))?;
        if f.get_data_type() != ty {
            return Err(bad(format!(
                "field {name:?} is {:?}, not {ty:?}",
                f.get_data_type()
            )));
        }
        if name == fields::PK && !f.is_primary_key() {
            return Err(bad(format!("field {name:?} is not the primary key")));
        }
        if name == fields::KEY {
            let d = f
                .get_type_params()
                .get("dim")
                .and_then(|d| d.parse::<usize>().ok());
            if d != Some(dim) {
                return Err(bad(format!(
                    "field {name:?} has dimension {d:?}, but the metadata's hidden_size is {dim}"
                )));
            }
        }
    }
    Ok(())
}

/// Loads the collection into the query nodes (a no-op when it is loaded).
fn load(conn: &Conn) -> Result<(), DatastoreError> {
    let name = conn.addr.collection.clone();
    conn.load_collection(name, LOAD_TIMEOUT)
}

/// Commits `meta` (see `meta_store`): the commit point of every change.
fn write_meta(conn: &Conn, meta: &Meta) -> Result<(), DatastoreError> {
    meta_store::write(conn, meta)
}

impl Store for MilvusStore {
    fn location(&self) -> String {
        self.conn.location()
    }
    fn fingerprint(&self) -> &ModelFingerprint {
        &self.fingerprint
    }
    fn key_type(&self) -> KeyType {
        self.key_type
    }
    fn dtype(&self) -> KeyDtype {
        KeyDtype::F32
    }
    fn len(&self) -> usize {
        self.meta.load().rows as usize
    }
    fn segments(&self) -> Vec<SegmentInfo> {
        self.meta.load().infos()
    }
    fn search_into(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        out: &mut [Vec<Neighbour>],
    ) -> Result<(), DatastoreError> {
        search::search_into(self, queries, k, params, out)
    }
    fn refresh(&self) -> Result<bool, DatastoreError> {
        let fresh = read_meta(&self.conn)?;
        let cur = self.meta.load();
        cur.check_same_identity(&fresh)?;
        if fresh == **cur {
            return Ok(false);
        }
        if fresh.push.is_some() {
            // Something is pushing into the collection again; keep serving what was committed.
            return Ok(false);
        }
        self.meta.store(Arc::new(fresh));
        Ok(true)
    }
    fn append(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
    ) -> Result<SegmentInfo, DatastoreError> {
        write::append(self, keys, values, provenance, &|_| {})
    }
    fn append_with_progress(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        progress: &dyn Fn(usize),
    ) -> Result<SegmentInfo, DatastoreError> {
        write::append(self, keys, values, provenance, progress)
    }
}
