//! Copying a local store into a new collection, and checking a copy
//! (docs/architecture.md §3, "Milvus").
//!
//! A push is resumable and idempotent. The collection is created with its metadata record
//! already in it (the schema, the source's segments and provenance, and a push state of 0
//! rows), its HNSW index and its load, before any row is copied. Rows go in by their local
//! row id as primary key, in batches; every `checkpoint_rows` the collection is flushed and
//! the push state's `rows_done` is written. A rerun after an interruption finds the record,
//! checks that it describes the same source, deletes rows above `rows_done` (those copied
//! after the last checkpoint: Milvus does not deduplicate primary keys, so they would be
//! doubled) and goes on from there. A rerun after a finished push changes nothing. The store
//! opens for serving only once the push state is cleared, the last write of a push.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use milvus::v2::prelude::*;
// The prelude brings its own `Result`; ours is the standard one.
use serde::Serialize;
use std::result::Result;

use super::client::Conn;
use super::meta::{fields, Meta, MetaIndex, MetaSegment, PushState};
use super::meta_store;
use super::write::{delete_uncommitted, flush, insert, INSERT_BATCH_ROWS};
use super::{has_collection, load, read_meta, write_meta, MilvusAddress, MilvusStore};
use crate::datastore::{Datastore, DatastoreError, DEFAULT_EF_CONSTRUCTION, DEFAULT_M};
use crate::store::Store;

/// How long an index build over the pushed rows may take.
const INDEX_TIMEOUT: Duration = Duration::from_secs(3600);

/// How to push.
#[derive(Clone, Copy, Debug)]
pub struct PushOptions {
    /// Rows per insert request.
    pub batch_rows: usize,
    /// Rows between flush-and-record checkpoints (what an interruption can cost again).
    pub checkpoint_rows: usize,
    /// HNSW M of the collection's index.
    pub m: usize,
    /// HNSW efConstruction of the collection's index.
    pub ef_construction: usize,
    /// Shards of a new collection (see docs/scale-out.md).
    pub shards: i32,
    /// Wait until Milvus has indexed every row before returning.
    pub wait_index: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            batch_rows: INSERT_BATCH_ROWS,
            checkpoint_rows: 64 * 1024,
            m: DEFAULT_M,
            ef_construction: DEFAULT_EF_CONSTRUCTION,
            shards: 1,
            wait_index: true,
        }
    }
}

/// What a push did.
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    /// The target, without options.
    pub address: String,
    /// Rows in the source (and now in the collection).
    pub rows: u64,
    /// Rows found already copied by an earlier run.
    pub resumed_rows: u64,
    /// Rows this run copied.
    pub copied_rows: u64,
    /// Segments, with their provenance.
    pub segments: usize,
    /// Seconds spent inserting and flushing.
    pub copy_seconds: f64,
    /// Seconds spent waiting for the index after the copy.
    pub index_seconds: f64,
}

/// Copies the live rows of `src` into the collection at `address` (see the module docs).
/// `progress(rows_done, total)` is called after each batch.
pub fn push(
    src: &Datastore,
    address: &str,
    opts: &PushOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<PushReport, DatastoreError> {
    if opts.batch_rows == 0
        || opts.checkpoint_rows == 0
        || opts.m == 0
        || opts.ef_construction == 0
        || opts.shards < 1
    {
        return Err(DatastoreError::InvalidOptions(format!(
            "push options must be positive: batch_rows {}, checkpoint_rows {}, m {}, ef_construction {}, shards {}",
            opts.batch_rows, opts.checkpoint_rows, opts.m, opts.ef_construction, opts.shards
        )));
    }
    let addr = MilvusAddress::parse(address)?;
    let conn = Conn::connect(&addr)?;
    let total = src.len() as u64;
    if total == 0 {
        return Err(DatastoreError::EmptyStore(src.dir().to_path_buf()));
    }
    let plan = planned_meta(src, opts);
    let mut meta = if has_collection(&conn)? {
        let found = read_meta(&conn)?;
        check_same_source(&conn, &found, &plan, src)?;
        found
    } else {
        create(&conn, &plan, opts)?;
        plan
    };
    let resumed = meta.push.as_ref().map_or(total, |p| p.rows_done);
    ensure_index_and_load(&conn, &meta)?;
    let t = Instant::now();
    if let Some(state) = meta.push.clone() {
        delete_uncommitted(&conn, state.rows_done)?;
        let segments = meta.segments.clone();
        let segment_of = segment_lookup(&segments);
        let dim = meta.fingerprint.hidden_size;
        let mut done = state.rows_done;
        let mut since_checkpoint = 0usize;
        progress(done, total);
        while done < total {
            let n = ((total - done) as usize).min(opts.batch_rows);
            let mut keys = Vec::with_capacity(n);
            let mut values = Vec::with_capacity(n);
            let mut segs = Vec::with_capacity(n);
            for id in done..done + n as u64 {
                let row = src.row(id)?;
                debug_assert_eq!(row.key.len(), dim);
                keys.push(row.key);
                values.push(row.value as i32);
                segs.push(segment_of(id) as i32);
            }
            insert(&conn, done, keys, values, segs)?;
            done += n as u64;
            since_checkpoint += n;
            if since_checkpoint >= opts.checkpoint_rows || done == total {
                flush(&conn)?;
                meta.push = Some(PushState {
                    rows_done: done,
                    ..state.clone()
                });
                meta.rows = done;
                meta.generation += 1;
                write_meta(&conn, &meta)?;
                since_checkpoint = 0;
            }
            progress(done, total);
        }
        meta.push = None;
        meta.rows = total;
        meta.generation += 1;
        write_meta(&conn, &meta)?;
    }
    let copy_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    if opts.wait_index {
        wait_indexed(&conn, total)?;
    }
    Ok(PushReport {
        address: conn.location(),
        rows: total,
        resumed_rows: resumed,
        copied_rows: total - resumed,
        segments: meta.segments.len(),
        copy_seconds,
        index_seconds: t.elapsed().as_secs_f64(),
    })
}

/// The metadata a push of `src` ends with, with its push state at 0 rows.
fn planned_meta(src: &Datastore, opts: &PushOptions) -> Meta {
    let mut meta = Meta::new(
        src.fingerprint().clone(),
        src.key_type(),
        src.dtype(),
        MetaIndex {
            m: opts.m,
            ef_construction: opts.ef_construction,
        },
    );
    for s in src.segments().into_iter().filter(|s| !s.retired) {
        meta.segments.push(MetaSegment {
            id: s.id,
            rows: s.rows as u64,
            first_pk: s.first_id.expect("a live segment has a first row"),
            provenance: s.provenance,
        });
        meta.next_segment_id = meta.next_segment_id.max(s.id + 1);
    }
    let total = src.len() as u64;
    meta.push = Some(PushState {
        source: src.dir().display().to_string(),
        total_rows: total,
        rows_done: 0,
    });
    meta
}

/// A collection found at the target must hold (part of) this very source.
fn check_same_source(
    conn: &Conn,
    found: &Meta,
    plan: &Meta,
    src: &Datastore,
) -> Result<(), DatastoreError> {
    plan.check_same_identity(found)?;
    let shape = |m: &Meta| {
        m.segments
            .iter()
            .map(|s| (s.id, s.rows, s.first_pk))
            .collect::<Vec<_>>()
    };
    if shape(found) != shape(plan) || found.source_dtype != plan.source_dtype {
        return Err(DatastoreError::InvalidOptions(format!(
            "the collection at {} holds another store than the live segments of {}; push to a new collection, or drop this one",
            conn.location(),
            src.dir().display()
        )));
    }
    Ok(())
}

fn schema(dim: usize) -> CollectionSchema {
    CollectionSchema::new()
        .description("a goodtriever kNN datastore (docs/architecture.md §3)")
        .add_field(
            FieldSchema::new()
                .name(fields::PK)
                .data_type(DataType::Int64)
                .primary_key(true)
                .auto_id(false),
        )
        .add_field(
            FieldSchema::new()
                .name(fields::VALUE)
                .data_type(DataType::Int32),
        )
        .add_field(
            FieldSchema::new()
                .name(fields::SEGMENT)
                .data_type(DataType::Int32),
        )
        .add_field(
            FieldSchema::new()
                .name(fields::KEY)
                .data_type(DataType::FloatVector)
                .dimension(dim as u32),
        )
}

/// Creates the metadata record first (in a fresh companion collection), then the data
/// collection, so that a data collection made by a push always has its record; a push that
/// died in between left only the record, and the rerun starts here again.
fn create(conn: &Conn, meta: &Meta, opts: &PushOptions) -> Result<(), DatastoreError> {
    meta_store::create(conn)?;
    write_meta(conn, meta)?;
    let name = conn.addr.collection.clone();
    let schema = schema(meta.fingerprint.hidden_size);
    let shards = opts.shards;
    conn.call(move |c| async move {
        c.create_collection(
            CreateCollectionRequest::builder()
                .collection_name(name)
                .schema(schema)
                .num_shards(shards)
                .consistency_level(ConsistencyLevel::Session)
                .build()?,
        )
        .await
    })
}

/// Creates the HNSW index when the collection has none, and loads the collection (deletes
/// by expression and searches need it loaded).
fn ensure_index_and_load(conn: &Conn, meta: &Meta) -> Result<(), DatastoreError> {
    let name = conn.addr.collection.clone();
    let has_index = conn.call(move |c| async move {
        match c
            .list_indexes(
                ListIndexesRequest::builder()
                    .collection_name(name)
                    .build()?,
            )
            .await
        {
            Ok(r) => Ok(!r.index_names().is_empty()),
            // Milvus 2.3 answers a collection without an index with error 700.
            Err(e) if index_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    })?;
    if !has_index {
        let name = conn.addr.collection.clone();
        let index = meta.index;
        conn.call(move |c| async move {
            c.create_index(
                CreateIndexRequest::builder()
                    .collection_name(name)
                    .index_param(
                        IndexParam::new()
                            .field_name(fields::KEY)
                            .index_name("key_hnsw")
                            .index_type(IndexType::Hnsw)
                            .metric_type(MetricType::L2)
                            .extra_params(HashMap::from([
                                ("M".to_string(), index.m.to_string()),
                                (
                                    "efConstruction".to_string(),
                                    index.ef_construction.to_string(),
                                ),
                            ])),
                    )
                    .sync(false)
                    .build()?,
            )
            .await
        })?;
    }
    load(conn)
}

fn index_not_found(e: &Error) -> bool {
    match e {
        Error::Server(s) => s.code() == 700 || s.reason().contains("index not found"),
        Error::RetryExhausted { source, .. } => index_not_found(source),
        _ => false,
    }
}

/// Waits until the index covers `rows` rows, polling once a second.
fn wait_indexed(conn: &Conn, rows: u64) -> Result<(), DatastoreError> {
    let t = Instant::now();
    loop {
        let name = conn.addr.collection.clone();
        let desc = conn.call(move |c| async move {
            c.describe_index(
                DescribeIndexRequest::builder()
                    .collection_name(name)
                    .field_name(fields::KEY)
                    .build()?,
            )
            .await
        })?;
        let idx = desc
            .indexes()
            .first()
            .ok_or_else(|| DatastoreError::Backend {
                location: conn.location(),
                detail: "the collection has no index on its key field".into(),
            })?;
        if !idx.get_failure_reason().is_empty() {
            return Err(DatastoreError::IndexBuild(format!(
                "Milvus could not build the index of {}: {}",
                conn.location(),
                idx.get_failure_reason()
            )));
        }
        if idx.get_indexed_rows() as u64 >= rows && idx.get_pending_rows() == 0 {
            return Ok(());
        }
        if t.elapsed() > INDEX_TIMEOUT {
            return Err(DatastoreError::TimedOut {
                location: conn.location(),
                after: INDEX_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Row id → segment id from the metadata's segment ranges.
fn segment_lookup(segments: &[MetaSegment]) -> impl Fn(u64) -> u64 + '_ {
    move |id| {
        let i = segments.partition_point(|s| s.first_pk <= id) - 1;
        segments[i].id
    }
}

/// What [`verify_milvus`] found.
#[derive(Clone, Debug, Serialize)]
pub struct MilvusVerifyReport {
    /// The store's address.
    pub address: String,
    /// Rows the metadata commits.
    pub rows: u64,
    /// Committed rows Milvus counts (`pk < rows`).
    pub counted_rows: u64,
    /// Rows above the committed count (left by a writer that died; the next write deletes them).
    pub uncommitted_rows: u64,
    /// Segments checked (each one's row count in Milvus against the metadata).
    pub segments: usize,
    /// Rows read back and compared (with the source store when one was given).
    pub sampled_rows: usize,
    /// The source store compared against, if any.
    pub source: Option<String>,
    /// Every problem found; empty for a sound copy.
    pub problems: Vec<String>,
}

impl MilvusVerifyReport {
    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn count(conn: &Conn, filter: String) -> Result<u64, DatastoreError> {
    let name = conn.addr.collection.clone();
    let answer = conn.call(move |c| async move {
        c.query(
            QueryRequest::builder()
                .collection_name(name)
                .filter(filter)
                .output_fields(["count(*)"])
                .consistency_level(ConsistencyLevel::Strong)
                .build()?,
        )
        .await
    })?;
    answer
        .results()
        .get_output_field("count(*)")
        .and_then(|f| f.as_int64())
        .and_then(|v| v.first().copied())
        .map(|n| n as u64)
        .ok_or_else(|| DatastoreError::Backend {
            location: conn.location(),
            detail: "count(*) came back without a count".into(),
        })
}

/// Checks a Milvus store: row counts against its metadata (in all and per segment), and
/// `sample` rows spread over the store read back, each compared with `source` when given
/// (value, segment and every key component; f16 source keys compare exactly, since Milvus
/// holds their f32 widening).
pub fn verify_milvus(
    store: &MilvusStore,
    source: Option<&Datastore>,
    sample: usize,
) -> Result<MilvusVerifyReport, DatastoreError> {
    let conn = &store.conn;
    let meta = store.meta();
    let mut problems = Vec::new();
    let counted = count(conn, format!("{} < {}", fields::PK, meta.rows))?;
    if counted != meta.rows {
        problems.push(format!(
            "Milvus holds {counted} committed rows, the metadata {}",
            meta.rows
        ));
    }
    let uncommitted = count(conn, format!("{} >= {}", fields::PK, meta.rows))?;
    for s in &meta.segments {
        let n = count(
            conn,
            format!(
                "{} == {} && {} >= {} && {} < {}",
                fields::SEGMENT,
                s.id,
                fields::PK,
                s.first_pk,
                fields::PK,
                s.first_pk + s.rows
            ),
        )?;
        if n != s.rows {
            problems.push(format!(
                "segment {}: Milvus holds {n} of its {} rows",
                s.id, s.rows
            ));
        }
    }
    if let Some(src) = source {
        if let Err(why) = src.fingerprint().check_compatible(&meta.fingerprint) {
            problems.push(format!("the source's model differs: {why}"));
        }
        if src.key_type() != meta.key_type {
            problems.push(format!(
                "the source holds {} keys, the copy {}",
                src.key_type(),
                meta.key_type
            ));
        }
        if src.len() as u64 != meta.rows {
            problems.push(format!(
                "the source has {} rows, the copy {}",
                src.len(),
                meta.rows
            ));
        }
        let theirs: Vec<_> = src
            .segments()
            .into_iter()
            .filter(|s| !s.retired)
            .map(|s| (s.id, s.rows, s.first_id))
            .collect();
        let ours: Vec<_> = meta
            .infos()
            .into_iter()
            .map(|s| (s.id, s.rows, s.first_id))
            .collect();
        if !ours.starts_with(&theirs) {
            problems
                .push("the copy's segments do not start with the source's live segments".into());
        }
    }
    let n = sample.min(meta.rows as usize);
    let ids: Vec<i64> = (0..n)
        .map(|i| (i as u64 * meta.rows / n as u64) as i64)
        .collect();
    if !ids.is_empty() {
        let name = conn.addr.collection.clone();
        // A literal list: the SDK's `get` sends a filter template, which 2.3 servers cannot parse.
        let filter = format!(
            "{} in [{}]",
            fields::PK,
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let answer = conn.call(move |c| async move {
            c.query(
                QueryRequest::builder()
                    .collection_name(name)
                    .filter(filter)
                    .output_fields([fields::PK, fields::VALUE, fields::SEGMENT, fields::KEY])
                    .consistency_level(ConsistencyLevel::Strong)
                    .build()?,
            )
            .await
        })?;
        let r = answer.results();
        let col = |name: &str| r.get_output_field(name);
        let (Some(pks), Some(values), Some(segs), Some(keys)) = (
            col(fields::PK).and_then(|f| f.as_int64()),
            col(fields::VALUE).and_then(|f| f.as_int32()),
            col(fields::SEGMENT).and_then(|f| f.as_int32()),
            col(fields::KEY).and_then(|f| f.as_float_vectors()),
        ) else {
            return Err(DatastoreError::Backend {
                location: conn.location(),
                detail: "reading sample rows back returned incomplete fields".into(),
            });
        };
        let by_pk: HashMap<i64, usize> = pks.iter().enumerate().map(|(i, &pk)| (pk, i)).collect();
        let segment_of = segment_lookup(&meta.segments);
        for &id in &ids {
            let Some(&i) = by_pk.get(&id) else {
                problems.push(format!("row {id} is missing"));
                continue;
            };
            if segs[i] as u64 != segment_of(id as u64) {
                problems.push(format!(
                    "row {id} is in segment {}, the metadata says {}",
                    segs[i],
                    segment_of(id as u64)
                ));
            }
            if let Some(src) = source {
                let Ok(row) = src.row(id as u64) else {
                    continue;
                };
                if row.value as i64 != values[i] as i64 {
                    problems.push(format!(
                        "row {id}: value {} here, {} in the source",
                        values[i], row.value
                    ));
                }
                if row.segment as i64 != segs[i] as i64 {
                    problems.push(format!(
                        "row {id}: segment {} here, {} in the source",
                        segs[i], row.segment
                    ));
                }
                if row.key != keys[i] {
                    problems.push(format!("row {id}: the key differs from the source's"));
                }
            }
        }
    }
    Ok(MilvusVerifyReport {
        address: store.location(),
        rows: meta.rows,
        counted_rows: counted,
        uncommitted_rows: uncommitted,
        segments: meta.segments.len(),
        sampled_rows: ids.len(),
        source: source.map(|s| s.dir().display().to_string()),
        problems,
    })
}
