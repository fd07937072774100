//! Exact flat scan: every row's squared L2 to the query, the k smallest kept in a bounded heap.
//!
//! Memory-bandwidth bound (DESIGN §4), so the loop streams rows in blocks through the SIMD
//! kernel and touches the heap only for rows that beat the current k-th distance. Large
//! segments are split into chunks scanned in parallel (rayon) so a single query uses every
//! core; the per-chunk heaps are merged at the end. This is also the ground truth that the
//! HNSW path is measured against.

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

/// The k smallest items pushed so far.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Scored>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
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

    pub fn merge(&mut self, other: TopK) {
        for s in other.heap {
            self.push(s);
        }
    }

    /// Items in ascending order.
    pub fn into_sorted(self) -> Vec<Scored> {
        self.heap.into_sorted_vec()
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

/// The `k` nearest of `rows` rows, ascending; chunks run in parallel when there are several.
pub fn search(keys: KeyRows<'_>, rows: usize, q: &[f32], k: usize) -> Vec<Scored> {
    if rows <= CHUNK_ROWS {
        let mut top = TopK::new(k);
        scan_range(keys, q, 0, rows, &mut top);
        return top.into_sorted();
    }
    let chunks = rows.div_ceil(CHUNK_ROWS);
    (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut top = TopK::new(k);
            scan_range(
                keys,
                q,
                c * CHUNK_ROWS,
                ((c + 1) * CHUNK_ROWS).min(rows),
                &mut top,
            );
            top
        })
        .reduce(
            || TopK::new(k),
            |mut a, b| {
                a.merge(b);
                a
            },
        )
        .into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_smallest_in_order_and_breaks_ties_by_row() {
        let mut t = TopK::new(3);
        for (d, r) in [(5.0, 0), (1.0, 1), (3.0, 2), (1.0, 3), (0.5, 4), (9.0, 5)] {
            t.push(Scored(d, r));
        }
        let v: Vec<(f32, u32)> = t.into_sorted().iter().map(|s| (s.0, s.1)).collect();
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
        let par = search(KeyRows::F32(&keys), rows, &q, 10);
        let mut seq = TopK::new(10);
        scan_range(KeyRows::F32(&keys), &q, 0, rows, &mut seq);
        assert_eq!(par, seq.into_sorted());
        assert_eq!(par.len(), 10);
    }
}
