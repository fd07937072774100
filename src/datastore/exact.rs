//! Exact flat scan: every row's squared L2 to the query, the k smallest kept in a bounded buffer.
//!
//! Memory-bandwidth bound (docs/architecture.md §4), so the loop streams rows in blocks through
//! the SIMD kernel and touches the top-k buffer only for rows that beat the current cut. Large
//! segments are split into chunks scanned in parallel (rayon) so a single query uses every
//! core; the per-chunk results are merged at the end. This is also the ground truth that the
//! HNSW path is measured against.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::distance::QUERY_GROUP;
use super::keys::KeyRows;
use super::scored::Scored;

/// Rows per parallel chunk: large enough that scheduling is noise (36 MiB of f16 keys at
/// D = 576, twice that in f32).
pub const CHUNK_ROWS: usize = 32_768;
/// Rows per distance block: keeps the distances in L1.
const BLOCK_ROWS: usize = 64;

/// The k smallest items pushed so far. Items below the current cut are appended to a buffer of
/// up to 2k, which is cut back to its k smallest (a linear-time selection) when full: O(1)
/// amortised per item, where a binary heap pays O(log k) for each of the ~k·ln(n/k) rows that
/// beat the k-th so far, a visible share of a single-query scan at the large k the rule uses
/// (docs/performance.md).
/// Reusable: [`reset`](Self::reset) keeps the buffer's allocation for the next query.
#[derive(Default)]
pub struct TopK {
    k: usize,
    items: Vec<Scored>,
    /// The k-th smallest at the last cut: k items are known to be below anything at or above
    /// it.
    cut: Option<Scored>,
}

impl TopK {
    /// Empties the buffer for a new search of `k` items.
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.items.clear();
        self.items.reserve(2 * k);
        self.cut = None;
    }

    /// Distance an item must not exceed to be kept (∞ until k items were kept).
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.cut.map_or(f32::INFINITY, |c| c.0)
    }

    #[inline]
    pub fn push(&mut self, s: Scored) {
        if self.cut.is_some_and(|c| s >= c) || self.k == 0 {
            return;
        }
        self.items.push(s);
        if self.items.len() >= 2 * self.k {
            self.shrink();
        }
    }

    /// Keeps only the k smallest items and moves the cut to the largest of them.
    fn shrink(&mut self) {
        if self.items.len() > self.k {
            self.items.select_nth_unstable(self.k - 1);
            self.items.truncate(self.k);
        }
        if self.items.len() == self.k {
            self.cut = self.items.iter().copied().max();
        }
    }

    /// The k smallest items, in no particular order.
    pub fn items(&mut self) -> &[Scored] {
        self.shrink();
        &self.items
    }

    /// Appends the items to `out` in ascending order and leaves the buffer empty (its
    /// allocation kept).
    pub fn drain_sorted_into(&mut self, out: &mut Vec<Scored>) {
        self.shrink();
        self.items.sort_unstable();
        out.extend_from_slice(&self.items);
        self.items.clear();
        self.cut = None;
    }
}

/// Scans rows `start..end` sequentially.
pub fn scan_range(keys: KeyRows<'_>, q: &[f32], start: usize, end: usize, top: &mut TopK) {
    let mut buf = [0f32; BLOCK_ROWS];
    let mut r = start;
    while r < end {
        let n = (end - r).min(BLOCK_ROWS);
        keys.dist_block(q, r, &mut buf[..n]);
        let mut thr = top.threshold();
        for (i, &d) in buf[..n].iter().enumerate() {
            if d <= thr {
                top.push(Scored(d, (r + i) as u32));
                thr = top.threshold();
            }
        }
        r += n;
    }
}

/// Buffers of an exact search, reused from one query to the next.
#[derive(Default)]
pub struct ExactScratch {
    top: TopK,
    /// Each parallel chunk's top-k (unordered), `k` slots per chunk, and how many slots
    /// it filled.
    chunk_items: Vec<Scored>,
    chunk_lens: Vec<usize>,
}

/// Appends the `k` nearest of `rows` rows to `out`, ascending; chunks run in parallel when
/// there are several.
pub fn search_into(
    keys: KeyRows<'_>,
    rows: usize,
    q: &[f32],
    k: usize,
    scratch: &mut ExactScratch,
    out: &mut Vec<Scored>,
) {
    if rows <= CHUNK_ROWS {
        scratch.top.reset(k);
        scan_range(keys, q, 0, rows, &mut scratch.top);
        scratch.top.drain_sorted_into(out);
        return;
    }
    let chunks = rows.div_ceil(CHUNK_ROWS);
    scratch.chunk_items.clear();
    scratch
        .chunk_items
        .resize(chunks * k, Scored(f32::INFINITY, 0));
    scratch.chunk_lens.clear();
    scratch.chunk_lens.resize(chunks, 0);
    scratch
        .chunk_items
        .par_chunks_mut(k)
        .zip(scratch.chunk_lens.par_iter_mut())
        .enumerate()
        .for_each(|(c, (slots, len))| {
            let end = ((c + 1) * CHUNK_ROWS).min(rows);
            scan_task(
                keys,
                q,
                q.len(),
                c * CHUNK_ROWS..end,
                k,
                slots,
                std::slice::from_mut(len),
            );
        });
    scratch.top.reset(k);
    for (c, &len) in scratch.chunk_lens.iter().enumerate() {
        for &s in &scratch.chunk_items[c * k..c * k + len] {
            scratch.top.push(s);
        }
    }
    scratch.top.drain_sorted_into(out);
}

/// Queries one task of a batched scan serves: each block of keys read from memory is then
/// used this many times while it is in cache, widened (f16 to f32) once per group of queries
/// the SIMD kernel takes together.
pub const TASK_QUERIES: usize = 8;

/// A batched scan splits a segment into chunks of no fewer rows than this to use more threads.
const MIN_TASK_ROWS: usize = 4_096;

/// Scans rows `start..end` for the queries `qs` (rows of width `d`, at most
/// [`TASK_QUERIES`]), query `j` into `tops[j]`.
fn scan_range_multi(
    keys: KeyRows<'_>,
    qs: &[f32],
    d: usize,
    start: usize,
    end: usize,
    tops: &mut [TopK],
) {
    let m = tops.len();
    debug_assert!(m <= TASK_QUERIES && qs.len() == m * d);
    let mut buf = [0f32; BLOCK_ROWS * TASK_QUERIES];
    let mut r = start;
    while r < end {
        let n = (end - r).min(BLOCK_ROWS);
        keys.dist_block_multi(qs, d, r, &mut buf[..n * m]);
        for (j, top) in tops.iter_mut().enumerate() {
            let mut thr = top.threshold();
            for i in 0..n {
                let dist = buf[i * m + j];
                if dist <= thr {
                    top.push(Scored(dist, (r + i) as u32));
                    thr = top.threshold();
                }
            }
        }
        r += n;
    }
}

/// How a batched scan of `m` queries over `rows` rows is split into tasks for the pool: by
/// queries first (their results need no merging), then by rows, until every pool thread has a
/// task or the pieces would be too small to pay for themselves.
#[derive(Clone, Copy, Debug)]
pub struct BatchPlan {
    m: usize,
    rows: usize,
    per_part: usize,
    chunks: usize,
    chunk_rows: usize,
}

impl BatchPlan {
    pub fn new(m: usize, rows: usize, threads: usize) -> Self {
        let threads = threads.max(1);
        let per_part = m
            .div_ceil(threads)
            .next_multiple_of(QUERY_GROUP)
            .clamp(1, TASK_QUERIES);
        let parts = m.div_ceil(per_part);
        let chunks = rows
            .div_ceil(CHUNK_ROWS)
            .max(threads.div_ceil(parts).min(rows / MIN_TASK_ROWS))
            .max(1);
        BatchPlan {
            m,
            rows,
            per_part,
            chunks,
            chunk_rows: rows.div_ceil(chunks).max(1),
        }
    }

    pub fn tasks(&self) -> usize {
        self.m.div_ceil(self.per_part) * self.chunks
    }

    /// The queries (indices into the batch) and the rows of task `t`.
    pub fn task(&self, t: usize) -> (Range<usize>, Range<usize>) {
        let (p, c) = (t / self.chunks, t % self.chunks);
        let queries = p * self.per_part..((p + 1) * self.per_part).min(self.m);
        let rows = (c * self.chunk_rows).min(self.rows)..((c + 1) * self.chunk_rows).min(self.rows);
        (queries, rows)
    }
}

thread_local! {
    /// A task's top-k per query, per thread.
    static TASK_TOPS: RefCell<Vec<TopK>> = const { RefCell::new(Vec::new()) };
}

/// Scans `rows` for the queries `qs` (at most [`TASK_QUERIES`] rows of width `d`) in one pass
/// over the keys: query `j`'s k nearest (unordered) go to `slots[j·k..]` and their count to
/// `lens[j]`. Each query gets exactly what [`scan_range`] gives it alone: the distances are
/// bit-identical, and ties break by row.
pub fn scan_task(
    keys: KeyRows<'_>,
    qs: &[f32],
    d: usize,
    rows: Range<usize>,
    k: usize,
    slots: &mut [Scored],
    lens: &mut [usize],
) {
    let m = qs.len() / d;
    // The scan never waits on the pool, so this thread's buffers are borrowed by one task
    // at a time.
    TASK_TOPS.with_borrow_mut(|tops| {
        if tops.len() < m {
            tops.resize_with(m, TopK::default);
        }
        let tops = &mut tops[..m];
        for t in tops.iter_mut() {
            t.reset(k);
        }
        if let [top] = tops {
            scan_range(keys, qs, rows.start, rows.end, top);
        } else {
            scan_range_multi(keys, qs, d, rows.start, rows.end, tops);
        }
        for (j, top) in tops.iter_mut().enumerate() {
            let items = top.items();
            lens[j] = items.len();
            slots[j * k..j * k + items.len()].copy_from_slice(items);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_smallest_in_order_and_breaks_ties_by_row() {
        let mut t = TopK::default();
        t.reset(3);
        for (d, r) in [(5.0, 0), (1.0, 1), (3.0, 2), (1.0, 3), (0.5, 4), (9.0, 5)] {
            t.push(Scored(d, r));
        }
        let mut sorted = Vec::new();
        t.drain_sorted_into(&mut sorted);
        let v: Vec<(f32, u32)> = sorted.iter().map(|s| (s.0, s.1)).collect();
        assert_eq!(v, vec![(0.5, 4), (1.0, 1), (1.0, 3)]);
    }

    #[test]
    fn chunked_parallel_scan_equals_sequential_scan() {
        let d = 4;
        let rows = CHUNK_ROWS * 2 + 17;
        let keys: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let q = [3.0, 1.0, 4.0, 1.5];
        let mut par = Vec::new();
        search_into(
            KeyRows::F32(&keys),
            rows,
            &q,
            10,
            &mut ExactScratch::default(),
            &mut par,
        );
        let mut seq = TopK::default();
        seq.reset(10);
        scan_range(KeyRows::F32(&keys), &q, 0, rows, &mut seq);
        let mut want = Vec::new();
        seq.drain_sorted_into(&mut want);
        assert_eq!(par, want);
        assert_eq!(par.len(), 10);
        // The same scratch again gives the same answer (nothing left over from before).
        let mut scratch = ExactScratch::default();
        for _ in 0..2 {
            let mut again = Vec::new();
            search_into(KeyRows::F32(&keys), rows, &q, 10, &mut scratch, &mut again);
            assert_eq!(again, want);
        }
    }

    #[test]
    fn batched_scan_gives_each_query_exactly_its_own_scan() {
        let d = 20;
        for rows in [5usize, 700, 9_000, CHUNK_ROWS + 300] {
            let keys: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
                .collect();
            for m in [1usize, 2, 3, TASK_QUERIES, 3 * TASK_QUERIES + 3] {
                let qs: Vec<f32> = (0..m * d).map(|i| ((i * 31) % 97) as f32 / 10.0).collect();
                for (k, threads) in [(1usize, 1usize), (10, 2), (64, 3), (64, 16)] {
                    let plan = BatchPlan::new(m, rows, threads);
                    let mut got: Vec<TopK> = (0..m).map(|_| TopK::default()).collect();
                    for g in &mut got {
                        g.reset(k);
                    }
                    let mut covered = vec![0usize; m * rows];
                    for t in 0..plan.tasks() {
                        let (queries, range) = plan.task(t);
                        assert!(queries.len() <= TASK_QUERIES);
                        for j in queries.clone() {
                            for r in range.clone() {
                                covered[j * rows + r] += 1;
                            }
                        }
                        let mut slots = vec![Scored(0.0, 0); TASK_QUERIES * k];
                        let mut lens = [0usize; TASK_QUERIES];
                        let q = &qs[queries.start * d..queries.end * d];
                        scan_task(KeyRows::F32(&keys), q, d, range, k, &mut slots, &mut lens);
                        for (jj, j) in queries.enumerate() {
                            for &s in &slots[jj * k..jj * k + lens[jj]] {
                                got[j].push(s);
                            }
                        }
                    }
                    assert!(covered.iter().all(|&c| c == 1), "every (query, row) once");
                    for (j, g) in got.iter_mut().enumerate() {
                        let mut want = Vec::new();
                        let q = &qs[j * d..(j + 1) * d];
                        search_into(
                            KeyRows::F32(&keys),
                            rows,
                            q,
                            k,
                            &mut ExactScratch::default(),
                            &mut want,
                        );
                        let mut have = Vec::new();
                        g.drain_sorted_into(&mut have);
                        assert_eq!(have, want, "rows {rows}, m {m}, k {k}, query {j}");
                    }
                }
            }
        }
    }
}
