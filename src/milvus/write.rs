//! Appends into the collection (docs/architecture.md §3, "Milvus"): one new segment, durable
//! before the call returns.
//!
//! The order makes a crash harmless, as the local store's write order does: delete rows left
//! at or above the committed count by a writer that died; insert the rows (primary keys from
//! the committed count on) in batches; flush and wait until Milvus has persisted them; only
//! then write the metadata record that commits them. Until that record is written no search
//! sees the rows (searches filter `pk < rows`).

use std::sync::Arc;
use std::time::Duration;

use milvus::v2::prelude::*;
// The prelude brings its own `Result`; ours is the standard one.
use std::result::Result;

use super::client::Conn;
use super::meta::{fields, Meta, MetaSegment};
use super::{read_meta, write_meta, MilvusStore};
use crate::datastore::{DatastoreError, Keys, Provenance, SegmentInfo};

/// Rows per insert request: 4096 × 576 f32 keys is about 9.5 MB, well under Milvus's
/// default 64 MB gRPC message limit.
pub const INSERT_BATCH_ROWS: usize = 4096;
/// How long a flush may take to persist.
pub(super) const FLUSH_TIMEOUT: Duration = Duration::from_secs(300);

pub(super) fn append(
    store: &MilvusStore,
    keys: Keys<'_>,
    values: &[u32],
    provenance: Provenance,
    progress: &dyn Fn(usize),
) -> Result<SegmentInfo, DatastoreError> {
    let dim = store.fingerprint.hidden_size;
    if keys.is_empty() {
        return Err(DatastoreError::EmptyAppend);
    }
    if !keys.len().is_multiple_of(dim) {
        return Err(DatastoreError::DimMismatch {
            expected: dim,
            got: keys.len(),
            what: "a key batch",
        });
    }
    let rows = keys.len() / dim;
    if values.len() != rows {
        return Err(DatastoreError::ValueCountMismatch {
            rows,
            values: values.len(),
        });
    }
    if let Some(vocab) = store.fingerprint.vocab_size {
        if let Some(row) = values.iter().position(|&v| v as usize >= vocab) {
            return Err(DatastoreError::ValueOutOfVocab {
                row,
                value: values[row],
                vocab,
            });
        }
    }
    if let Some(row) = values.iter().position(|&v| v > i32::MAX as u32) {
        return Err(DatastoreError::ValueOutOfVocab {
            row,
            value: values[row],
            vocab: i32::MAX as usize,
        });
    }
    for i in 0..keys.len() {
        let v = keys.get_f32(i);
        if !v.is_finite() {
            return Err(DatastoreError::NonFinite {
                what: "key",
                row: i / dim,
                col: i % dim,
                value: v,
            });
        }
    }
    provenance.check()?;

    let _guard = store.write.lock().unwrap_or_else(|p| p.into_inner());
    let fresh = read_meta(&store.conn)?;
    store.meta.load().check_same_identity(&fresh)?;
    if fresh.push.is_some() {
        return Err(DatastoreError::BadManifest {
            path: store.conn.location().into(),
            detail:
                "a push into the collection is running or unfinished; append after it completes"
                    .into(),
        });
    }
    let start = fresh.rows;
    let seg_id = fresh.next_segment_id;
    if seg_id > i32::MAX as u64 {
        return Err(DatastoreError::InvalidOptions(format!(
            "segment id {seg_id} does not fit the collection's INT32 segment field"
        )));
    }
    delete_uncommitted(&store.conn, start)?;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(INSERT_BATCH_ROWS);
        let batch: Vec<Vec<f32>> = (done..done + n)
            .map(|r| (0..dim).map(|c| keys.get_f32(r * dim + c)).collect())
            .collect();
        insert(
            &store.conn,
            start + done as u64,
            batch,
            values[done..done + n].iter().map(|&v| v as i32).collect(),
            vec![seg_id as i32; n],
        )?;
        done += n;
        progress(done);
    }
    flush(&store.conn)?;
    let mut next: Meta = fresh;
    next.segments.push(MetaSegment {
        id: seg_id,
        rows: rows as u64,
        first_pk: start,
        provenance,
    });
    next.rows += rows as u64;
    next.next_segment_id += 1;
    next.generation += 1;
    write_meta(&store.conn, &next)?;
    let info = next
        .infos()
        .pop()
        .expect("the segment just committed is listed");
    store.meta.store(Arc::new(next));
    Ok(info)
}

/// Inserts rows with primary keys `first_pk ..`.
pub(super) fn insert(
    conn: &Conn,
    first_pk: u64,
    keys: Vec<Vec<f32>>,
    values: Vec<i32>,
    segments: Vec<i32>,
) -> Result<(), DatastoreError> {
    let n = keys.len();
    let pks: Vec<i64> = (first_pk as i64..first_pk as i64 + n as i64).collect();
    let name = conn.addr.collection.clone();
    let answer = conn.call(move |c| async move {
        c.insert(
            InsertRequest::builder()
                .collection_name(name)
                .columns(vec![
                    FieldData::int64(fields::PK, pks),
                    FieldData::int32(fields::VALUE, values),
                    FieldData::int32(fields::SEGMENT, segments),
                    FieldData::float_vector(fields::KEY, keys),
                ])
                .build()?,
        )
        .await
    })?;
    if answer.insert_count() != n as i64 {
        return Err(DatastoreError::Backend {
            location: conn.location(),
            detail: format!("inserted {} rows of {n}", answer.insert_count()),
        });
    }
    Ok(())
}

/// Flushes the collection and waits until Milvus has persisted every row inserted before.
pub(super) fn flush(conn: &Conn) -> Result<(), DatastoreError> {
    let name = conn.addr.collection.clone();
    conn.call_within(FLUSH_TIMEOUT, move |c| async move {
        c.flush(
            FlushRequest::builder()
                .collection_names([name])
                .wait_flushed_ms(FLUSH_TIMEOUT.as_millis() as i64)
                .build()?,
        )
        .await
        .map(|_| ())
    })
}

/// Deletes rows at or above `from` (uncommitted: left by a writer that died before it
/// committed them), so that re-inserting those primary keys does not duplicate them.
pub(super) fn delete_uncommitted(conn: &Conn, from: u64) -> Result<(), DatastoreError> {
    let name = conn.addr.collection.clone();
    let filter = format!("{} >= {from}", fields::PK);
    conn.call(move |c| async move {
        c.delete(
            DeleteRequest::builder()
                .collection_name(name)
                .filter(filter)
                .build()?,
        )
        .await
        .map(|_| ())
    })
}
