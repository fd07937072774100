//! Exact flat scan: every row's squared L2 to the query, the k smallest kept in a bounded heap.
//!
//! Memory-bandwidth bound (DESIGN §4), so the loop streams rows in blocks through the SIMD
//! kernel and touches the heap only for rows that beat the current k-th distance. Large
//! segments are split into chunks scanned in parallel (rayon) so a single query uses every
//! core; the per-chunk heaps are merged at the end. This is also the ground truth that the
//! HNSW path is measured against.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use super::keys::KeyRows;

/// Rows per parallel chunk: large enough that scheduling is noise (~20–40 MB of keys at D=576).
pub const CHUNK_ROWS: usize = 32_768;
/// Rows per distance block: keeps the distances in L1.
const BLOCK_ROWS: usize = 64;

/// A (distance, row) pair ordered by distance, then row: a total order, so results are
/// deterministic when distances tie.
#[derive(Clone, Copy, Debug)]
pub struct Scored(pub f32, pub u32);

impl PartialEq for Scored {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// The k smallest items pushed so far. Reusable: [`reset`](Self::reset) keeps the heap's
/// allocation for the next query.
#[derive(Default)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Scored>,
}

impl TopK {
    /// Empties the heap for a new search of `k` items.
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.heap.clear();
        self.heap.reserve(k + 1);
    }

    /// Distance an item must beat to enter (∞ until the heap is full).
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::INFINITY
        } else {
            self.heap.peek().map_or(f32::INFINITY, |s| s.0)
        }
    }

    #[inline]
    pub fn push(&mut self, s: Scored) {
        if self.heap.len() < self.k {
            self.heap.push(s);
        } else if let Some(top) = self.heap.peek() {
            if s < *top {
                self.heap.pop();
                self.heap.push(s);
            }
        }
    }

    /// Appends the items to `out` in ascending order and leaves the heap empty (its
    /// allocation kept).
    pub fn drain_sorted_into(&mut self, out: &mut Vec<Scored>) {
        let mut sorted = std::mem::take(&mut self.heap).into_sorted_vec();
        out.extend_from_slice(&sorted);
        sorted.clear();
        self.heap = BinaryHeap::from(sorted);
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
    /// Each parallel chunk's top-k (in heap order), `k` slots per chunk, and how many slots
    /// it filled.
    chunk_items: Vec<Scored>,
    chunk_lens: Vec<usize>,
}

thread_local! {
    /// A chunk's heap, per pool thread.
    static CHUNK_TOP: RefCell<TopK> = RefCell::new(TopK::default());
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
            // A chunk's scan never waits on the pool, so its thread's heap is borrowed by
            // one chunk at a time.
            CHUNK_TOP.with_borrow_mut(|top| {
                top.reset(k);
                let end = ((c + 1) * CHUNK_ROWS).min(rows);
                scan_range(keys, q, c * CHUNK_ROWS, end, top);
                let items = top.heap.as_slice();
                *len = items.len();
                slots[..items.len()].copy_from_slice(items);
            });
        });
    scratch.top.reset(k);
    for (c, &len) in scratch.chunk_lens.iter().enumerate() {
        for &s in &scratch.chunk_items[c * k..c * k + len] {
            scratch.top.push(s);
        }
    }
    scratch.top.drain_sorted_into(out);
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
}
