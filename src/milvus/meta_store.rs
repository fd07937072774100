//! Where the metadata record lives: a small companion collection `COLLECTION__gtmeta`, one
//! row per committed generation (docs/architecture.md §3, "Milvus").
//!
//! Not the collection's properties, although Milvus has them: on the 2.3.5 server an
//! `AlterCollection` is acknowledged and read back, yet after a restart the collection comes
//! back with the properties of an earlier alter (`tests/milvus_store.rs` caught an append's
//! commit disappearing), so properties cannot be a commit point. Rows of a flushed collection
//! are what Milvus persists, so the record is a row: `pk` = the generation, `json` = the
//! record, and a 2-dimensional dummy vector because 2.3 refuses a collection without one.
//! A commit inserts the next generation's row and flushes (waiting until it is persisted);
//! a reader takes the row with the largest generation; older rows are deleted after.

use std::time::Duration;

use milvus::v2::prelude::*;
// The prelude brings its own `Result`; ours is the standard one.
use std::result::Result;

use super::client::Conn;
use super::meta::Meta;
use crate::datastore::DatastoreError;

/// The companion collection's name suffix.
pub const META_SUFFIX: &str = "__gtmeta";
/// The longest record a row holds (Milvus's VARCHAR limit).
pub const MAX_META_BYTES: usize = 65_535;
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
const FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

fn name(conn: &Conn) -> String {
    format!("{}{META_SUFFIX}", conn.addr.collection)
}

/// Whether the companion collection exists.
pub fn exists(conn: &Conn) -> Result<bool, DatastoreError> {
    let name = name(conn);
    conn.has_collection(name)
}

/// Drops the companion collection if it exists.
pub fn drop(conn: &Conn) -> Result<(), DatastoreError> {
    if !exists(conn)? {
        return Ok(());
    }
    let name = name(conn);
    conn.call(move |c| async move {
        c.drop_collection(
            DropCollectionRequest::builder()
                .collection_name(name)
                .build()?,
        )
        .await
    })
}

/// Creates (anew) the companion collection, indexed and loaded.
pub fn create(conn: &Conn) -> Result<(), DatastoreError> {
    drop(conn)?;
    let coll = name(conn);
    let schema = CollectionSchema::new()
        .description("goodtriever datastore metadata, one row per generation")
        .add_field(
            FieldSchema::new()
                .name("pk")
                .data_type(DataType::Int64)
                .primary_key(true)
                .auto_id(false),
        )
        .add_field(
            FieldSchema::new()
                .name("json")
                .data_type(DataType::VarChar)
                .max_length(MAX_META_BYTES as u32),
        )
        .add_field(
            FieldSchema::new()
                .name("v")
                .data_type(DataType::FloatVector)
                .dimension(2),
        );
    let n = coll.clone();
    conn.call(move |c| async move {
        c.create_collection(
            CreateCollectionRequest::builder()
                .collection_name(n)
                .schema(schema)
                .num_shards(1)
                .build()?,
        )
        .await
    })?;
    let n = coll.clone();
    conn.call(move |c| async move {
        c.create_index(
            CreateIndexRequest::builder()
                .collection_name(n)
                .index_param(
                    IndexParam::new()
                        .field_name("v")
                        .index_name("v_flat")
                        .index_type(IndexType::Flat)
                        .metric_type(MetricType::L2),
                )
                .sync(false)
                .build()?,
        )
        .await
    })?;
    conn.load_collection(coll, LOAD_TIMEOUT)
}

/// Loads the companion collection (a no-op when loaded; after a server restart it is not).
fn load(conn: &Conn) -> Result<(), DatastoreError> {
    let coll = name(conn);
    conn.load_collection(coll, LOAD_TIMEOUT)
}

/// The newest record's JSON, or `None` when the companion collection does not exist or holds
/// no row.
pub fn read(conn: &Conn) -> Result<Option<String>, DatastoreError> {
    if !exists(conn)? {
        return Ok(None);
    }
    load(conn)?;
    let coll = name(conn);
    let answer = conn.call(move |c| async move {
        c.query(
            QueryRequest::builder()
                .collection_name(coll)
                .filter("pk >= 0")
                .output_fields(["pk", "json"])
                .consistency_level(ConsistencyLevel::Strong)
                .build()?,
        )
        .await
    })?;
    let r = answer.results();
    let (Some(pks), Some(jsons)) = (
        r.get_output_field("pk").and_then(|f| f.as_int64()),
        r.get_output_field("json").and_then(|f| f.as_varchar()),
    ) else {
        return Ok(None);
    };
    Ok(pks
        .iter()
        .zip(jsons)
        .max_by_key(|(pk, _)| **pk)
        .map(|(_, j)| j.clone()))
}

/// Commits `meta`: its generation's row, flushed (persisted) before this returns; then the
/// older rows are deleted (a failure there leaves them, and readers still take the newest).
pub fn write(conn: &Conn, meta: &Meta) -> Result<(), DatastoreError> {
    let json = meta.to_json();
    if json.len() > MAX_META_BYTES {
        return Err(DatastoreError::InvalidOptions(format!(
            "the store's metadata is {} bytes, more than the {MAX_META_BYTES} a Milvus VARCHAR holds (too many segments or too much provenance); compact the source before pushing",
            json.len()
        )));
    }
    let gen = meta.generation as i64;
    let coll = name(conn);
    // A commit of this generation that failed after its insert would otherwise be doubled.
    let n = coll.clone();
    conn.call(move |c| async move {
        c.delete(
            DeleteRequest::builder()
                .collection_name(n)
                .filter(format!("pk >= {gen}"))
                .build()?,
        )
        .await
        .map(|_| ())
    })?;
    let n = coll.clone();
    conn.call(move |c| async move {
        c.insert(
            InsertRequest::builder()
                .collection_name(n)
                .columns(vec![
                    FieldData::int64("pk", vec![gen]),
                    FieldData::varchar("json", vec![json]),
                    FieldData::float_vector("v", vec![vec![0.0, 0.0]]),
                ])
                .build()?,
        )
        .await
        .map(|_| ())
    })?;
    let n = coll.clone();
    conn.call_within(FLUSH_TIMEOUT, move |c| async move {
        c.flush(
            FlushRequest::builder()
                .collection_names([n])
                .wait_flushed_ms(FLUSH_TIMEOUT.as_millis() as i64)
                .build()?,
        )
        .await
        .map(|_| ())
    })?;
    let _ = conn.call(move |c| async move {
        c.delete(
            DeleteRequest::builder()
                .collection_name(coll)
                .filter(format!("pk < {gen}"))
                .build()?,
        )
        .await
        .map(|_| ())
    });
    Ok(())
}
