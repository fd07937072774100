//! Per-segment HNSW graph: built with hnsw_rs, stored in our own compact file, searched over
//! the memory-mapped keys.
//!
//! Why not keep hnsw_rs's own dump? Three reasons measured or read in hnsw_rs 0.3.5:
//! its dump stores a second (f32) copy of every vector next to our keys (three times the bytes
//! for f16 keys, and twice the page cache at search time because re-scoring reads `keys.bin`
//! anyway); its reload `panic!`s, `assert!`s or even calls `process::exit` on a damaged file,
//! where we owe the user a typed error naming the file; and its reloaded `Hnsw<'b, ..>` borrows
//! the `HnswIo` that owns the map, a self-referential pair that cannot live in an `Arc`
//! snapshot. So hnsw_rs does what it is good at, parallel graph construction, and the graph is
//! then written as flat u32 adjacency arrays (CSR) that are memory-mapped, validated once on
//! open, and walked by the search below with the same SIMD distance as the exact scan. Every
//! distance computed during the walk is already the exact squared L2 against the stored keys,
//! so "re-score candidates exactly" costs nothing extra.
//!
//! File layout (`index.bin`, all little-endian u32):
//! ```text
//! header  : MAGIC, VERSION, n_rows, max_level, entry, m, m0, 0
//! level 0 : offsets[n_rows + 1], neighbours[offsets[n_rows]]
//! level l : count, nodes[count] (ascending row ids), offsets[count + 1], neighbours[..]
//!           for l = 1..=max_level
//! ```

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;

use hnsw_rs::anndists::dist::distances::DistL2;
use hnsw_rs::hnsw::Hnsw;
use memmap2::Mmap;

use super::error::{DatastoreError, Result};
use super::hnsw_layers::Layers;
use super::hnsw_repair::{self, RepairStats};
use super::keys::{prefetch_line, KeyRows};
use super::scored::Scored;

pub const INDEX_FILE: &str = "index.bin";
const MAGIC: u32 = u32::from_le_bytes(*b"GTHN");
const VERSION: u32 = 1;
const HEADER_WORDS: usize = 8;
/// hnsw_rs's layer cap.
const MAX_LEVELS: usize = 16;

/// Default graph degree M: links kept per node on the upper layers (2·M on layer 0). The usual
/// HNSW choice; faiss uses the same M.
pub const DEFAULT_M: usize = 16;
/// Default candidate-list width while inserting: wider builds a better-connected graph at a
/// build cost roughly proportional to it. The usual HNSW choice.
pub const DEFAULT_EF_CONSTRUCTION: usize = 100;

/// Rows handed to hnsw_rs per parallel insertion batch: bounds the f32 staging copy.
const BUILD_BATCH_ROWS: usize = 16_384;

/// Builds the graph over `rows` keys of width `dim` and returns the encoded index file.
/// `progress` is called with the number of rows inserted so far.
pub fn build(
    keys: KeyRows<'_>,
    rows: usize,
    dim: usize,
    m: usize,
    ef_construction: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<u8>> {
    if rows == 0 || rows > u32::MAX as usize {
        return Err(DatastoreError::IndexBuild(format!(
            "a segment must have between 1 and {} rows, got {rows}",
            u32::MAX
        )));
    }
    if m == 0 || m > 255 {
        return Err(DatastoreError::IndexBuild(format!(
            "M = {m} is out of range 1..=255"
        )));
    }
    let hnsw: Hnsw<f32, DistL2> = Hnsw::new(m, rows, MAX_LEVELS, ef_construction.max(m), DistL2 {});
    let mut staging: Vec<f32> = Vec::new();
    let mut row = Vec::with_capacity(dim);
    let mut start = 0;
    while start < rows {
        let end = (start + BUILD_BATCH_ROWS).min(rows);
        staging.clear();
        for r in start..end {
            keys.row_f32(r, dim, &mut row);
            staging.extend_from_slice(&row);
        }
        let batch: Vec<(&[f32], usize)> = (start..end)
            .map(|r| (&staging[(r - start) * dim..(r - start + 1) * dim], r))
            .collect();
        hnsw.parallel_insert_slice(&batch);
        progress(end);
        start = end;
    }
    let mut layers = Layers::from_hnsw_rs(&hnsw, rows);
    drop(hnsw);
    repair(keys, dim, m, &mut layers)?;
    Ok(layers.encode(m))
}

/// Level-0 repair of hnsw_rs's graph (see `hnsw_repair`): heuristic re-selection with reverse
/// links, then every row made reachable from the entry point.
fn repair(keys: KeyRows<'_>, dim: usize, m: usize, layers: &mut Layers) -> Result<RepairStats> {
    let links = |l: &Layers| l.l0.iter().map(Vec::len).sum::<usize>();
    let mut stats = RepairStats {
        links_before: links(layers),
        ..RepairStats::default()
    };
    stats.reverse_added = hnsw_repair::diversify(keys, dim, &mut layers.l0, 2 * m);
    (stats.unfindable, stats.findable_linked) = hnsw_repair::make_findable(keys, dim, layers);
    (stats.unreachable, stats.reconnected) = hnsw_repair::connect(keys, dim, layers);
    stats.links_after = links(layers);
    tracing::debug!(?stats, "HNSW level-0 repair");
    Ok(stats)
}

/// Reading hnsw_rs's graph and writing `index.bin`: the file format is this module's. The
/// type itself lives in `hnsw_layers`, where the repair passes use it too.
impl Layers {
    fn from_hnsw_rs(hnsw: &Hnsw<f32, DistL2>, rows: usize) -> Self {
        let pi = hnsw.get_point_indexation();
        // levels[l] : (row, neighbours) for every point present at level l.
        let mut levels: Vec<Vec<(u32, Vec<u32>)>> = vec![Vec::new(); MAX_LEVELS];
        let mut top = 0usize;
        let mut entry = 0u32;
        for layer in 0..MAX_LEVELS {
            for point in pi.get_layer_iterator(layer) {
                let row = point.get_origin_id() as u32;
                let level = point.get_point_id().0 as usize;
                let hood = point.get_neighborhood_id();
                for (l, list) in hood.iter().enumerate().take(level + 1) {
                    let ids = list.iter().map(|n| n.d_id as u32).collect();
                    levels[l].push((row, ids));
                }
                // Any point of the highest level is a valid entry point.
                if level >= top {
                    top = level;
                    entry = row;
                }
            }
        }
        levels.truncate(top + 1);
        // Level 0 holds every row; index it by row id.
        let mut l0: Vec<Vec<u32>> = vec![Vec::new(); rows];
        for (row, n) in std::mem::take(&mut levels[0]) {
            l0[row as usize] = n;
        }
        let mut upper: Vec<_> = levels.into_iter().skip(1).collect();
        for level in &mut upper {
            level.sort_by_key(|(r, _)| *r);
        }
        Layers { entry, l0, upper }
    }

    fn encode(&self, m: usize) -> Vec<u8> {
        let rows = self.l0.len();
        let m0 = self.l0.iter().map(Vec::len).max().unwrap_or(0) as u32;
        let mut w: Vec<u32> = vec![
            MAGIC,
            VERSION,
            rows as u32,
            self.upper.len() as u32,
            self.entry,
            m as u32,
            m0,
            0,
        ];
        let csr = |w: &mut Vec<u32>, lists: &mut dyn Iterator<Item = &Vec<u32>>| {
            let lists: Vec<&Vec<u32>> = lists.collect();
            let mut off = 0u32;
            w.push(0);
            for n in &lists {
                off += n.len() as u32;
                w.push(off);
            }
            for n in &lists {
                w.extend_from_slice(n);
            }
        };
        csr(&mut w, &mut self.l0.iter());
        for level in &self.upper {
            w.push(level.len() as u32);
            w.extend(level.iter().map(|(r, _)| *r));
            csr(&mut w, &mut level.iter().map(|(_, n)| n));
        }
        let mut bytes = Vec::with_capacity(w.len() * 4);
        for x in w {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes
    }
}

/// Word ranges of one upper level inside the file.
#[derive(Clone, Debug)]
struct Upper {
    nodes: (usize, usize),
    offsets: usize,
    adj: usize,
}

/// A validated, memory-mapped HNSW graph.
#[derive(Debug)]
pub struct Graph {
    map: Mmap,
    rows: usize,
    max_level: usize,
    entry: u32,
    l0_offsets: usize,
    l0_adj: usize,
    upper: Vec<Upper>,
}

impl Graph {
    /// Checks the whole structure so that search can never index out of bounds.
    pub fn open(map: Mmap, rows: usize, path: &Path) -> Result<Self> {
        let bad = |detail: String| DatastoreError::corrupt(path, detail);
        let words = as_words(&map).ok_or_else(|| {
            bad(format!(
                "length {} is not a whole number of 32-bit words",
                map.len()
            ))
        })?;
        let get = |i: usize| -> Result<u32> {
            words
                .get(i)
                .map(|w| u32::from_le(*w))
                .ok_or_else(|| bad(format!("file ends early (needed word {i})")))
        };
        if get(0)? != MAGIC {
            return Err(bad("not a goodtriever HNSW index (bad magic)".into()));
        }
        if get(1)? != VERSION {
            return Err(bad(format!("unsupported index version {}", get(1)?)));
        }
        if get(2)? as usize != rows {
            return Err(bad(format!(
                "index covers {} rows, the segment has {rows}",
                get(2)?
            )));
        }
        let max_level = get(3)? as usize;
        if max_level >= MAX_LEVELS {
            return Err(bad(format!("max level {max_level} is out of range")));
        }
        let entry = get(4)?;
        if entry as usize >= rows {
            return Err(bad(format!("entry point {entry} is not a row")));
        }
        let check_csr = |offsets: usize, count: usize| -> Result<usize> {
            let mut prev = 0u32;
            if get(offsets)? != 0 {
                return Err(bad("adjacency offsets do not start at 0".into()));
            }
            for i in 1..=count {
                let o = get(offsets + i)?;
                if o < prev {
                    return Err(bad("adjacency offsets decrease".into()));
                }
                prev = o;
            }
            let adj = offsets + count + 1;
            for i in 0..prev as usize {
                if get(adj + i)? as usize >= rows {
                    return Err(bad(format!("neighbour id {} is not a row", get(adj + i)?)));
                }
            }
            Ok(adj + prev as usize)
        };
        let l0_offsets = HEADER_WORDS;
        let l0_adj = l0_offsets + rows + 1;
        let mut pos = check_csr(l0_offsets, rows)?;
        let mut upper = Vec::with_capacity(max_level);
        for _ in 1..=max_level {
            let count = get(pos)? as usize;
            let nodes = (pos + 1, pos + 1 + count);
            let mut prev: Option<u32> = None;
            for i in nodes.0..nodes.1 {
                let r = get(i)?;
                if r as usize >= rows || prev.is_some_and(|p| p >= r) {
                    return Err(bad("upper-level node list is not ascending row ids".into()));
                }
                prev = Some(r);
            }
            let offsets = nodes.1;
            let end = check_csr(offsets, count)?;
            upper.push(Upper {
                nodes,
                offsets,
                adj: offsets + count + 1,
            });
            pos = end;
        }
        if pos != words.len() {
            return Err(bad(format!(
                "{} unexpected trailing words",
                words.len() - pos
            )));
        }
        Ok(Graph {
            map,
            rows,
            max_level,
            entry,
            l0_offsets,
            l0_adj,
            upper,
        })
    }

    #[inline]
    fn words(&self) -> &[u32] {
        // Validated in `open`.
        as_words(&self.map).unwrap_or(&[])
    }

    #[inline]
    fn neighbours(&self, level: usize, row: u32) -> &[u32] {
        let w = self.words();
        if level == 0 {
            let r = row as usize;
            let (a, b) = (
                w[self.l0_offsets + r] as usize,
                w[self.l0_offsets + r + 1] as usize,
            );
            return &w[self.l0_adj + a..self.l0_adj + b];
        }
        let up = &self.upper[level - 1];
        match w[up.nodes.0..up.nodes.1].binary_search(&row) {
            Ok(i) => {
                let (a, b) = (w[up.offsets + i] as usize, w[up.offsets + i + 1] as usize);
                &w[up.adj + a..up.adj + b]
            }
            Err(_) => &[],
        }
    }

    /// Asks for `row`'s level-0 list bounds ahead of its expansion: a row is pushed as a
    /// candidate long before it is expanded, and its offset is otherwise a cache miss at
    /// the start of every expansion.
    #[inline]
    fn prefetch_list(&self, row: u32) {
        prefetch_line(
            self.words()
                .as_ptr()
                .wrapping_add(self.l0_offsets + row as usize),
        );
    }

    /// Asks for `row`'s level-0 neighbour ids: the walk's likely next expansion, fetched
    /// while the current one computes its distances.
    #[inline]
    fn prefetch_adjacency(&self, row: u32) {
        let w = self.words();
        let start = w[self.l0_offsets + row as usize] as usize;
        let at = w.as_ptr().wrapping_add(self.l0_adj + start);
        // An m0 = 32 list of u32 ids spans up to two lines.
        prefetch_line(at);
        prefetch_line(at.wrapping_add(16));
    }

    /// The `ef` rows nearest to `q` that the graph walk finds, as (squared L2, row), unordered.
    pub fn search(&self, keys: KeyRows<'_>, q: &[f32], ef: usize, out: &mut Vec<(f32, u32)>) {
        out.clear();
        let d = q.len();
        let mut cur = self.entry;
        let mut cur_d = keys.dist(q, cur as usize);
        for level in (1..=self.max_level).rev() {
            loop {
                let mut changed = false;
                for &nb in self.neighbours(level, cur) {
                    let dn = keys.dist(q, nb as usize);
                    if dn < cur_d {
                        cur_d = dn;
                        cur = nb;
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
            }
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let s = &mut *s;
            s.visited.start(self.rows);
            s.candidates.clear();
            s.results.clear();
            s.visited.insert(cur);
            s.candidates.push(Reverse(Scored(cur_d, cur)));
            s.results.push(Scored(cur_d, cur));
            while let Some(Reverse(Scored(dc, c))) = s.candidates.pop() {
                let worst = s.results.peek().map_or(f32::INFINITY, |w| w.0);
                if dc > worst && s.results.len() >= ef {
                    break;
                }
                if let Some(Reverse(Scored(_, next))) = s.candidates.peek() {
                    self.prefetch_adjacency(*next);
                }
                let nbs = self.neighbours(0, c);
                for &nb in nbs {
                    if !s.visited.contains(nb) {
                        keys.prefetch(nb as usize, d);
                    }
                }
                for &nb in nbs {
                    if !s.visited.insert(nb) {
                        continue;
                    }
                    let dn = keys.dist(q, nb as usize);
                    let worst = s.results.peek().map_or(f32::INFINITY, |w| w.0);
                    if s.results.len() < ef || dn < worst {
                        self.prefetch_list(nb);
                        s.candidates.push(Reverse(Scored(dn, nb)));
                        s.results.push(Scored(dn, nb));
                        if s.results.len() > ef {
                            s.results.pop();
                        }
                    }
                }
            }
            out.extend(s.results.drain().map(|c| (c.0, c.1)));
        });
    }
}

fn as_words(bytes: &[u8]) -> Option<&[u32]> {
    // SAFETY: every bit pattern is a valid u32; align_to only hands out the aligned middle.
    let (pre, mid, post) = unsafe { bytes.align_to::<u32>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

/// Visited set: one bit per row, cleared per search. A walk's visited tests land on random
/// rows, so the set's size decides which cache they hit: a bit a row keeps a 1M-row store's
/// set in 128 KB, inside a core's L2, where a 32-bit stamp a row took 4 MB (time-neutral on
/// a box whose L3 held the stamps; docs/performance.md). Clearing 128 KB per search costs
/// microseconds against a walk of milliseconds.
#[derive(Default)]
struct Visited {
    bits: Vec<u64>,
}

impl Visited {
    fn start(&mut self, rows: usize) {
        let words = rows.div_ceil(64);
        self.bits.clear();
        self.bits.resize(words, 0);
    }
    #[inline]
    fn contains(&self, r: u32) -> bool {
        self.bits[r as usize >> 6] & (1 << (r & 63)) != 0
    }
    #[inline]
    fn insert(&mut self, r: u32) -> bool {
        let (word, bit) = (&mut self.bits[r as usize >> 6], 1u64 << (r & 63));
        let fresh = *word & bit == 0;
        *word |= bit;
        fresh
    }
}

#[derive(Default)]
struct Scratch {
    visited: Visited,
    candidates: BinaryHeap<Reverse<Scored>>,
    results: BinaryHeap<Scored>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[cfg(test)]
mod tests {
    use super::Visited;

    #[test]
    fn the_visited_set_holds_exactly_what_was_inserted_since_its_start() {
        let mut v = Visited::default();
        v.start(130);
        for r in [0u32, 63, 64, 127, 129] {
            assert!(!v.contains(r));
            assert!(v.insert(r), "row {r} is new");
            assert!(!v.insert(r), "row {r} is already in");
            assert!(v.contains(r));
        }
        for r in [1u32, 62, 65, 126, 128] {
            assert!(!v.contains(r), "row {r} was never inserted");
        }
        // A new search starts empty, also when it covers more rows than the last.
        v.start(1000);
        assert!((0..1000).all(|r| !v.contains(r)));
        assert!(v.insert(999) && v.contains(999));
    }
}
