//! k-nearest-neighbour search in the collection (docs/architecture.md §4, "Milvus").
//!
//! One Milvus search per call answers every query row (nq = rows). Only committed rows are
//! searched (`pk < rows` of the metadata snapshot the call starts with), so rows of an append
//! or push still in flight, or left by a writer that died, never come back. Consistency is
//! `Session`: this client's own flushed appends are seen by its next search; other writers'
//! rows appear once the server has them and a refresh has read their metadata.

use std::collections::HashMap;

use milvus::v2::prelude::*;
// The prelude brings its own `Result`; ours is the standard one.
use std::result::Result;

use super::meta::fields;
use super::MilvusStore;
use crate::datastore::{check_query_batch, DatastoreError, Neighbour, SearchParams};

pub(super) fn search_into(
    store: &MilvusStore,
    queries: &[f32],
    k: usize,
    params: &SearchParams,
    out: &mut [Vec<Neighbour>],
) -> Result<(), DatastoreError> {
    let meta = store.meta.load_full();
    let dim = meta.fingerprint.hidden_size;
    let n = check_query_batch(queries, dim, k, params, out.len())?;
    if meta.rows == 0 {
        return Err(DatastoreError::EmptyStore(store.conn.location().into()));
    }
    if n == 0 {
        return Ok(());
    }
    let ef = params.effective_ef(k);
    let vectors: Vec<Vec<f32>> = queries.chunks_exact(dim).map(<[f32]>::to_vec).collect();
    let name = store.conn.addr.collection.clone();
    let filter = format!("{} < {}", fields::PK, meta.rows);
    let answer = store.conn.call(move |c| async move {
        c.search(
            SearchRequest::builder()
                .collection_name(name)
                .vector_field(fields::KEY)
                .vectors(SearchVectors::Float(vectors))
                .filter(filter)
                .limit(k as i64)
                .metric_type(MetricType::L2)
                .extra_params(HashMap::from([("ef".to_string(), ef.to_string())]))
                .output_fields([fields::VALUE])
                .consistency_level(ConsistencyLevel::Session)
                .build()?,
        )
        .await
    })?;
    let bad = |detail: String| DatastoreError::Backend {
        location: store.conn.location(),
        detail,
    };
    let results = answer.results().get_results();
    if results.len() != n {
        return Err(bad(format!(
            "the search answered {} query rows of {n}",
            results.len()
        )));
    }
    for (row, (res, o)) in results.iter().zip(out.iter_mut()).enumerate() {
        o.clear();
        let Ids::Int64(ids) = res.get_ids() else {
            return Err(bad("the primary keys came back as strings".into()));
        };
        let scores = res.get_scores();
        let values = res
            .get_output_field(fields::VALUE)
            .and_then(|f| f.as_int32())
            .ok_or_else(|| {
                bad(format!(
                    "query row {row}: no {:?} field in the answer",
                    fields::VALUE
                ))
            })?;
        if ids.len() != scores.len() || ids.len() != values.len() || ids.len() > k {
            return Err(bad(format!(
                "query row {row}: {} ids, {} distances and {} values for k = {k}",
                ids.len(),
                scores.len(),
                values.len()
            )));
        }
        for ((&id, &dist), &value) in ids.iter().zip(scores).zip(values) {
            if id < 0 || value < 0 || !dist.is_finite() {
                return Err(bad(format!(
                    "query row {row}: row {id} with value {value} at distance {dist}"
                )));
            }
            o.push(Neighbour {
                id: id as u64,
                value: value as u32,
                dist,
            });
        }
        // Milvus orders by distance; ties are put in id order, as the local store's are.
        o.sort_unstable_by(|a, b| a.dist.total_cmp(&b.dist).then(a.id.cmp(&b.id)));
    }
    Ok(())
}
