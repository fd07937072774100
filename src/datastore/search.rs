//! Search across the live segments of a snapshot: pick exact or HNSW per segment, map rows to
//! store-wide ids, merge the per-segment top-k, and search identical queries once.
//!
//! `Auto` decides per segment, because segments differ in size by orders of magnitude (a
//! fresh import of a few hundred rows next to a compacted million). The HNSW walk at a given
//! `ef` computes on the order of `ef × 30` distances (a walk visits ~ef nodes with up to
//! 2M = 32 neighbours each), so a flat scan of a segment smaller than a small multiple of `ef`
//! rows does the same work without the random access and with perfect recall. The constants
//! below come from `benches/search.rs` (50k × 576 f16 clustered rows, 2 cores): one exact scan
//! cost ~12 ms (~0.24 µs a row), HNSW ~0.5 ms at ef = 128 and ~4.9 ms at ef = 1024, i.e. the
//! break-even is near 20 × ef rows.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::exact::{self, Scored};
use super::segment::Segment;

/// One retrieved row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbour {
    /// Row index over the live segments, in manifest order (stable until segments are
    /// retired or compacted).
    pub id: u64,
    /// The stored value (a token id).
    pub value: u32,
    /// Exact squared L2 distance, computed in f32 against the stored key.
    pub dist: f32,
}

/// How to search each segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SearchMode {
    /// Flat scan of every row: perfect recall, cost linear in rows.
    Exact,
    /// HNSW graph walk on every segment that has more than `k` rows.
    Hnsw,
    /// Exact for segments of at most `max(AUTO_MIN_ROWS, AUTO_EF_FACTOR × ef)` rows, HNSW above.
    #[default]
    Auto,
}

/// Search options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchParams {
    pub mode: SearchMode,
    /// HNSW candidate list size; `None` means `max(k, DEFAULT_EF)`. Always raised to `k`.
    pub ef: Option<usize>,
}

impl SearchParams {
    pub fn exact() -> Self {
        SearchParams {
            mode: SearchMode::Exact,
            ef: None,
        }
    }

    pub fn hnsw(ef: Option<usize>) -> Self {
        SearchParams {
            mode: SearchMode::Hnsw,
            ef,
        }
    }

    /// The `ef` actually used for a search of `k` neighbours.
    pub fn effective_ef(&self, k: usize) -> usize {
        self.ef.unwrap_or(DEFAULT_EF).max(k)
    }
}

/// Default HNSW `ef` when the caller gives none (and k is smaller).
pub const DEFAULT_EF: usize = 128;
/// `Auto` scans segments of at most this many rows exactly, whatever `ef` is.
pub const AUTO_MIN_ROWS: usize = 4_096;
/// `Auto` scans exactly when rows ≤ this × ef.
pub const AUTO_EF_FACTOR: usize = 20;

/// Whether a segment of `rows` rows is scanned exactly under `params` for `k` neighbours.
pub fn use_exact(params: &SearchParams, rows: usize, k: usize) -> bool {
    if rows <= k {
        return true;
    }
    match params.mode {
        SearchMode::Exact => true,
        SearchMode::Hnsw => false,
        SearchMode::Auto => rows <= AUTO_MIN_ROWS.max(AUTO_EF_FACTOR * params.effective_ef(k)),
    }
}

/// The k nearest rows of one segment, ascending, as (dist, local row).
fn search_segment(seg: &Segment, q: &[f32], k: usize, params: &SearchParams) -> Vec<Scored> {
    let keys = seg.keys();
    if use_exact(params, seg.rows, k) {
        return exact::search(keys, seg.rows, q, k);
    }
    let mut cand = Vec::new();
    seg.graph()
        .search(keys, q, params.effective_ef(k), &mut cand);
    if cand.len() < k.min(seg.rows) {
        // The walk could not reach k rows (a disconnected graph region): answer exactly
        // rather than return fewer neighbours than the store holds.
        return exact::search(keys, seg.rows, q, k);
    }
    let mut v: Vec<Scored> = cand.into_iter().map(|(d, r)| Scored(d, r)).collect();
    v.sort_unstable();
    v.truncate(k);
    v
}

/// Searches one query over all segments and writes the merged top-k into `out`.
pub fn search_query(
    segments: &[Arc<Segment>],
    starts: &[u64],
    q: &[f32],
    k: usize,
    params: &SearchParams,
    out: &mut Vec<Neighbour>,
) {
    out.clear();
    let per_segment = |(seg, &start): (&Arc<Segment>, &u64)| -> Vec<Neighbour> {
        let values = seg.values();
        search_segment(seg, q, k, params)
            .into_iter()
            .map(|Scored(dist, row)| Neighbour {
                id: start + row as u64,
                value: values[row as usize],
                dist,
            })
            .collect()
    };
    if segments.len() == 1 {
        out.extend(per_segment((&segments[0], &starts[0])));
        return;
    }
    let parts: Vec<Vec<Neighbour>> = segments
        .par_iter()
        .zip(starts.par_iter())
        .map(per_segment)
        .collect();
    for p in parts {
        out.extend(p);
    }
    out.sort_unstable_by(|a, b| a.dist.total_cmp(&b.dist).then(a.id.cmp(&b.id)));
    out.truncate(k);
}

/// Bit-exact identity of a query row, for de-duplication within a batch.
#[derive(PartialEq, Eq, Hash)]
struct QueryBits<'a>(&'a [u8]);

/// Searches `out.len()` query rows of width `dim`; identical rows are searched once.
pub fn search_batch(
    segments: &[Arc<Segment>],
    starts: &[u64],
    queries: &[f32],
    dim: usize,
    k: usize,
    params: &SearchParams,
    out: &mut [Vec<Neighbour>],
) {
    let n = out.len();
    // SAFETY: any f32 is valid as bytes.
    let bytes: &[u8] = unsafe { queries.align_to::<u8>().1 };
    let mut first: HashMap<QueryBits<'_>, usize> = HashMap::with_capacity(n);
    let mut source = Vec::with_capacity(n);
    for i in 0..n {
        let key = QueryBits(&bytes[i * dim * 4..(i + 1) * dim * 4]);
        source.push(*first.entry(key).or_insert(i));
    }
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        if source[i] == i {
            search_query(
                segments,
                starts,
                &queries[i * dim..(i + 1) * dim],
                k,
                params,
                o,
            );
        }
    });
    for (i, &s) in source.iter().enumerate() {
        if s != i {
            let (head, tail) = out.split_at_mut(i);
            tail[0].clear();
            tail[0].extend_from_slice(&head[s]);
        }
    }
}
