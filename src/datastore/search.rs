//! Search across the live segments of a snapshot: pick exact or HNSW per segment, map rows to
//! store-wide ids, merge the per-segment top-k, and search identical queries once.
//!
//! `Auto` decides per segment, because segments differ in size by orders of magnitude (a
//! fresh import of a few hundred rows next to a compacted million). The HNSW walk at a given
//! `ef` computes on the order of `ef × 30` distances (a walk visits ~ef nodes with up to
//! 2M = 32 neighbours each), so a flat scan of a segment smaller than a small multiple of `ef`
//! rows does the same work without the random access and with perfect recall. The constants
//! below put the switch where `benches/search.rs` found the break-even: exact below about
//! 20 × ef rows, and always exact for small segments (the figures are in docs/performance.md).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::exact::{self, BatchPlan, ExactScratch, TASK_QUERIES};
use super::scored::Scored;
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
    /// Exact, HNSW or the per-segment choice; `Auto` by default.
    pub mode: SearchMode,
    /// HNSW candidate list size; `None` means `max(k, DEFAULT_EF)`. Always raised to `k`.
    pub ef: Option<usize>,
}

impl SearchParams {
    /// Exact scans everywhere: the reference for recall and the choice for small stores.
    pub fn exact() -> Self {
        SearchParams {
            mode: SearchMode::Exact,
            ef: None,
        }
    }

    /// The HNSW walk on every segment larger than `k`, with candidate list `ef` (`None`:
    /// `max(k, DEFAULT_EF)`).
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

/// Per-thread buffers of a segment search, reused from one query to the next so that a
/// decoding step allocates nothing once warm.
#[derive(Default)]
struct SegmentScratch {
    exact: ExactScratch,
    /// The graph walk's candidates, (squared L2, row).
    walk: Vec<(f32, u32)>,
    /// A segment's top-k, ascending.
    scored: Vec<Scored>,
}

/// Per-thread buffers of a batch.
#[derive(Default)]
struct BatchScratch {
    /// The batch's rows in byte order.
    order: Vec<usize>,
    /// Each row's first identical row.
    source: Vec<usize>,
    /// Each distinct row's place among the distinct rows.
    place: Vec<usize>,
    /// The distinct rows' queries side by side, for batched scans.
    queries: Vec<f32>,
    tasks: Vec<Task>,
    /// Each task's results (unordered), `k` slots per query it serves, and how many it filled.
    task_items: Vec<Scored>,
    task_lens: Vec<usize>,
}

/// A piece of a batch's search that one pool thread runs.
struct Task {
    segment: usize,
    work: Work,
}

enum Work {
    /// One pass over some rows of an exactly scanned segment for some distinct rows.
    Scan {
        queries: Range<usize>,
        rows: Range<usize>,
    },
    /// One distinct row's search of a walked segment.
    Walk { query: usize },
}

impl Task {
    /// Where the results of distinct row `j` are among this task's, if it serves that row.
    fn place_of(&self, j: usize) -> Option<usize> {
        match &self.work {
            Work::Scan { queries, .. } if queries.contains(&j) => Some(j - queries.start),
            Work::Walk { query } if *query == j => Some(0),
            _ => None,
        }
    }
}

thread_local! {
    static SEGMENT_SCRATCH: RefCell<SegmentScratch> = RefCell::new(SegmentScratch::default());
    static BATCH_SCRATCH: RefCell<BatchScratch> = RefCell::new(BatchScratch::default());
}

/// Runs `f` with this thread's scratch of type `T`. The scratch is taken out for the call, not
/// borrowed: a rayon thread waiting inside `f` may run another search on the same thread,
/// which then starts from empty buffers instead of finding these borrowed.
fn with_scratch<T: Default, R>(
    key: &'static std::thread::LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut scratch = key.with(RefCell::take);
    let r = f(&mut scratch);
    key.with(|cell| cell.replace(scratch));
    r
}

/// The k nearest rows of one segment, ascending, into `s.scored` as (dist, local row).
fn segment_top_k(
    seg: &Segment,
    q: &[f32],
    k: usize,
    params: &SearchParams,
    s: &mut SegmentScratch,
) {
    let keys = seg.keys();
    s.scored.clear();
    let mut exact = use_exact(params, seg.rows, k);
    if !exact {
        seg.graph()
            .search(keys, q, params.effective_ef(k), &mut s.walk);
        // A walk that could not reach k rows (a disconnected graph region) is answered
        // exactly rather than with fewer neighbours than the store holds.
        exact = s.walk.len() < k.min(seg.rows);
    }
    if exact {
        exact::search_into(keys, seg.rows, q, k, &mut s.exact, &mut s.scored);
    } else {
        s.walk
            .sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        s.walk.truncate(k);
        s.scored
            .extend(s.walk.iter().map(|&(dist, row)| Scored(dist, row)));
    }
}

/// Appends the k nearest rows of one segment to `out`, ascending, with store-wide ids.
fn search_segment(
    seg: &Segment,
    start: u64,
    q: &[f32],
    k: usize,
    params: &SearchParams,
    out: &mut Vec<Neighbour>,
) {
    with_scratch(&SEGMENT_SCRATCH, |s| {
        segment_top_k(seg, q, k, params, s);
        out.extend(neighbours(seg, start, &s.scored));
    });
}

/// A segment's scored rows as neighbours with store-wide ids and their values.
fn neighbours<'a>(
    seg: &'a Segment,
    start: u64,
    scored: &'a [Scored],
) -> impl Iterator<Item = Neighbour> + 'a {
    let values = seg.values();
    scored.iter().map(move |&Scored(dist, row)| Neighbour {
        id: start + row as u64,
        value: values[row as usize],
        dist,
    })
}

/// Marks a slot of `out` that no segment filled (a segment with fewer than k rows).
const EMPTY_SLOT: Neighbour = Neighbour {
    id: u64::MAX,
    value: 0,
    dist: f32::INFINITY,
};

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
    if let ([seg], [start]) = (segments, starts) {
        search_segment(seg, *start, q, k, params, out);
        return;
    }
    // Each segment fills its own k slots of `out`, in parallel; then the slots are merged in
    // place, so the caller's buffer is the only one a multi-segment search needs.
    out.resize(segments.len() * k, EMPTY_SLOT);
    out.par_chunks_mut(k)
        .zip(segments.par_iter().zip(starts.par_iter()))
        .for_each(|(slots, (seg, &start))| {
            with_scratch(&SEGMENT_SCRATCH, |s| {
                segment_top_k(seg, q, k, params, s);
                for (slot, n) in slots.iter_mut().zip(neighbours(seg, start, &s.scored)) {
                    *slot = n;
                }
            });
        });
    out.retain(|n| n.id != EMPTY_SLOT.id);
    out.sort_unstable_by(|a, b| a.dist.total_cmp(&b.dist).then(a.id.cmp(&b.id)));
    out.truncate(k);
}

/// Searches `out.len()` query rows of width `dim`; identical rows are searched once.
///
/// A segment scanned exactly is scanned for all the distinct rows together, each block of keys
/// serving every row while it is in cache ([`exact::scan_task`]): a batch of 8 costs a
/// fraction of its rows scanned one by one. Graph walks stay one per row. Either way each row
/// gets exactly what it gets alone.
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
    if n == 0 {
        return;
    }
    if n == 1 {
        search_query(segments, starts, queries, k, params, &mut out[0]);
        return;
    }
    // SAFETY: any f32 is valid as bytes.
    let bytes: &[u8] = unsafe { queries.align_to::<u8>().1 };
    let row = |i: usize| &bytes[i * dim * 4..(i + 1) * dim * 4];
    with_scratch(&BATCH_SCRATCH, |s| {
        // Sorting by (bytes, index) puts identical rows together, first occurrence first.
        s.order.clear();
        s.order.extend(0..n);
        s.order
            .sort_unstable_by(|&a, &b| row(a).cmp(row(b)).then(a.cmp(&b)));
        s.source.clear();
        s.source.resize(n, 0);
        let mut first = s.order[0];
        for &i in &s.order {
            if row(i) != row(first) {
                first = i;
            }
            s.source[i] = first;
        }
        if segments.iter().any(|seg| use_exact(params, seg.rows, k)) {
            search_distinct(segments, starts, queries, dim, k, params, s, out);
        } else {
            // Walks only: nothing to share between rows, so each row is searched as alone.
            let source = &s.source;
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
        }
        for (i, &src) in s.source.iter().enumerate() {
            if src != i {
                let (head, tail) = out.split_at_mut(i);
                tail[0].clear();
                tail[0].extend_from_slice(&head[src]);
            }
        }
    });
}

/// Searches the distinct rows of a batch (those with `s.source[i] == i`) in two parallel
/// passes: every task of every segment, then each row's merge of the tasks that served it.
#[allow(clippy::too_many_arguments)]
fn search_distinct(
    segments: &[Arc<Segment>],
    starts: &[u64],
    queries: &[f32],
    dim: usize,
    k: usize,
    params: &SearchParams,
    s: &mut BatchScratch,
    out: &mut [Vec<Neighbour>],
) {
    let query = |i: usize| &queries[i * dim..(i + 1) * dim];
    s.place.clear();
    s.queries.clear();
    let mut m = 0;
    for (i, &src) in s.source.iter().enumerate() {
        s.place.push(m);
        if src == i {
            s.queries.extend_from_slice(query(i));
            m += 1;
        }
    }
    let threads = rayon::current_num_threads();
    s.tasks.clear();
    for (segment, seg) in segments.iter().enumerate() {
        if use_exact(params, seg.rows, k) {
            let plan = BatchPlan::new(m, seg.rows, threads);
            s.tasks.extend((0..plan.tasks()).map(|t| {
                let (queries, rows) = plan.task(t);
                Task {
                    segment,
                    work: Work::Scan { queries, rows },
                }
            }));
        } else {
            s.tasks.extend((0..m).map(|query| Task {
                segment,
                work: Work::Walk { query },
            }));
        }
    }
    let slots = TASK_QUERIES * k;
    s.task_items.clear();
    s.task_items
        .resize(s.tasks.len() * slots, Scored(f32::INFINITY, 0));
    s.task_lens.clear();
    s.task_lens.resize(s.tasks.len() * TASK_QUERIES, 0);
    let distinct = &s.queries;
    let run = |task: &Task, items: &mut [Scored], lens: &mut [usize]| {
        let seg = &segments[task.segment];
        match &task.work {
            Work::Scan { queries, rows } => exact::scan_task(
                seg.keys(),
                &distinct[queries.start * dim..queries.end * dim],
                dim,
                rows.clone(),
                k,
                items,
                lens,
            ),
            Work::Walk { query } => with_scratch(&SEGMENT_SCRATCH, |sc| {
                segment_top_k(
                    seg,
                    &distinct[query * dim..(query + 1) * dim],
                    k,
                    params,
                    sc,
                );
                lens[0] = sc.scored.len();
                items[..sc.scored.len()].copy_from_slice(&sc.scored);
            }),
        }
    };
    if let [task] = &s.tasks[..] {
        run(task, &mut s.task_items, &mut s.task_lens);
    } else {
        s.tasks
            .par_iter()
            .zip(s.task_items.par_chunks_mut(slots))
            .zip(s.task_lens.par_chunks_mut(TASK_QUERIES))
            .for_each(|((task, items), lens)| run(task, items, lens));
    }

    // The k nearest of the union of each task's k nearest are the k nearest overall.
    let (tasks, items, lens) = (&s.tasks, &s.task_items, &s.task_lens);
    let (source, place) = (&s.source, &s.place);
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        if source[i] != i {
            return;
        }
        o.clear();
        for (t, task) in tasks.iter().enumerate() {
            if let Some(at) = task.place_of(place[i]) {
                let slot = t * TASK_QUERIES + at;
                let found = &items[slot * k..slot * k + lens[slot]];
                let seg = &segments[task.segment];
                o.extend(neighbours(seg, starts[task.segment], found));
            }
        }
        o.sort_unstable_by(|a, b| a.dist.total_cmp(&b.dist).then(a.id.cmp(&b.id)));
        o.truncate(k);
    });
}
