//! Level-0 repair of the graph hnsw_rs builds, before it is written to `index.bin`.
//!
//! hnsw_rs 0.3.5 selects a new point's neighbours with the diversity heuristic (Malkov &
//! Yashunin, Algorithm 4), but when the reverse link overflows a neighbour's list it just
//! drops that list's farthest entry. In dense clusters the lists then fill with near
//! duplicates, long links are lost, and some rows end up with no path to them at all (far more
//! than faiss leaves, which re-applies the heuristic on overflow). Worse than unreachable rows
//! are unreachable *regions*: a tight, populous cluster whose members' lists hold only each
//! other and whose links to the rest were all dropped is entered only through far-away rows, so
//! a query right next to it walks past it at any `ef`: recall stops improving however wide the
//! search (the counts and the recall ceiling are in docs/performance.md). Four passes fix
//! level 0, where every search ends:
//!
//! 1. [`diversify`]: every row's list is re-selected with the heuristic, up to `m0` = 2·M, from
//!    the pool of its current neighbours and the rows that list it (exact squared L2 against
//!    the stored keys): a candidate is kept only if it is closer to the row than to every
//!    neighbour kept before it (faiss's `shrink_neighbor_list`, hnswlib's
//!    `getNeighborsByHeuristic2`).
//! 2. Reverse links (same function): a row `u` that selected `v` is appended to `v`'s list
//!    while `v` has room, nearest first (faiss's `add_link` when the list is not full).
//! 3. [`make_findable`]: every row is searched for with its own key (the search of
//!    `hnsw::Graph`, ef = [`WALK_EF`]); a row the walk does not return is linked, both ways,
//!    with the two nearest rows the walk does return — where walks towards it end. A link into
//!    an island makes the rest of it findable, so rows are re-checked one at a time before
//!    linking.
//! 4. [`connect`]: breadth-first search from the entry point over level 0; every row it does
//!    not reach is linked both ways to its nearest reachable row, and everything it reaches in
//!    turn is marked. Afterwards every row is reachable at level 0.
//!
//! Links of passes 3 and 4 may push a list a few entries past `m0`; the file format has no
//! fixed degree. Passes 1–3 run in parallel (rayon); together the passes add a fraction of
//! hnsw_rs's own build time (docs/performance.md).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rayon::prelude::*;

use super::hnsw_layers::Layers;
use super::keys::KeyRows;
use super::scored::Scored;

/// Beam width of the walks that check findability and look for link targets: wide enough that
/// a wider beam did not raise search recall, narrow enough to keep the build short
/// (docs/performance.md).
const WALK_EF: usize = 32;
/// Rows that link to a row no walk finds.
const LINKS_PER_ROW: usize = 2;

/// What the repair did, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairStats {
    /// Level-0 links before and after.
    pub links_before: usize,
    pub links_after: usize,
    /// Reverse links added in pass 2.
    pub reverse_added: usize,
    /// Rows a walk for their own key did not find after passes 1 and 2, and rows linked
    /// because a re-check after the earlier links still did not find them.
    pub unfindable: usize,
    pub findable_linked: usize,
    /// Rows not reachable from the entry point after pass 3.
    pub unreachable: usize,
    /// Links added to reconnect them (each one reattaches a whole unreachable component).
    pub reconnected: usize,
}

/// Passes 1 and 2: re-selects every level-0 list with the heuristic and adds reverse links.
/// Returns the number of reverse links added.
pub fn diversify(keys: KeyRows<'_>, dim: usize, l0: &mut [Vec<u32>], m0: usize) -> usize {
    let rows = l0.len();
    let rev = reverse(l0, |n| n.iter().copied());
    // Pass 1: the heuristic over (neighbours ∪ reverse neighbours), exact distances.
    let selected: Vec<Vec<(f32, u32)>> = (0..rows)
        .into_par_iter()
        .map_init(
            || (Vec::with_capacity(dim), Vec::with_capacity(dim), Vec::new()),
            |(qu, qc, pool), u| {
                pool.clear();
                keys.row_f32(u, dim, qu);
                let (a, b) = (rev.0[u] as usize, rev.0[u + 1] as usize);
                for &c in l0[u].iter().chain(&rev.1[a..b]) {
                    if c as usize != u {
                        pool.push((keys.dist(qu, c as usize), c));
                    }
                }
                pool.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
                pool.dedup_by_key(|x| x.1);
                select(keys, dim, pool, m0, qc)
            },
        )
        .collect();
    // Pass 2: u selected v → offer u to v, nearest offers first, while v has room.
    let offers = reverse(&selected, |s| s.iter().map(|&(_, v)| v));
    let added: Vec<usize> = l0
        .par_iter_mut()
        .enumerate()
        .map_init(Vec::new, |mine: &mut Vec<(f32, u32)>, (v, list)| {
            let sel = &selected[v];
            list.clear();
            list.extend(sel.iter().map(|&(_, n)| n));
            if list.len() >= m0 {
                return 0;
            }
            mine.clear();
            let (a, b) = (offers.0[v] as usize, offers.0[v + 1] as usize);
            for &u in &offers.1[a..b] {
                if !sel.iter().any(|&(_, n)| n == u) {
                    let d = selected[u as usize]
                        .iter()
                        .find(|&&(_, n)| n as usize == v)
                        .map_or(f32::INFINITY, |&(d, _)| d);
                    mine.push((d, u));
                }
            }
            mine.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            let room = m0 - list.len();
            list.extend(mine.iter().take(room).map(|&(_, u)| u));
            mine.len().min(room)
        })
        .collect();
    added.into_iter().sum()
}

/// The heuristic over `pool` (sorted by distance to the row): keep a candidate only if no kept
/// neighbour is strictly closer to it than the row is.
fn select(
    keys: KeyRows<'_>,
    dim: usize,
    pool: &[(f32, u32)],
    m0: usize,
    qc: &mut Vec<f32>,
) -> Vec<(f32, u32)> {
    let mut kept: Vec<(f32, u32)> = Vec::with_capacity(m0);
    for &(dc, c) in pool {
        if kept.len() >= m0 {
            break;
        }
        keys.row_f32(c as usize, dim, qc);
        if kept.iter().all(|&(_, s)| keys.dist(qc, s as usize) >= dc) {
            kept.push((dc, c));
        }
    }
    kept
}

/// CSR of the reverse adjacency: (offsets[rows + 1], sources).
fn reverse<'a, T, I: Iterator<Item = u32>>(
    lists: &'a [T],
    ids: impl Fn(&'a T) -> I,
) -> (Vec<u32>, Vec<u32>) {
    let rows = lists.len();
    let mut offsets = vec![0u32; rows + 1];
    for l in lists {
        for v in ids(l) {
            offsets[v as usize + 1] += 1;
        }
    }
    for i in 0..rows {
        offsets[i + 1] += offsets[i];
    }
    let mut fill = offsets.clone();
    let mut src = vec![0u32; offsets[rows] as usize];
    for (u, l) in lists.iter().enumerate() {
        for v in ids(l) {
            src[fill[v as usize] as usize] = u as u32;
            fill[v as usize] += 1;
        }
    }
    (offsets, src)
}

/// Marks every row reachable from `from` over `l0` (and not marked yet); returns how many.
fn mark_from(l0: &[Vec<u32>], from: u32, seen: &mut [bool], queue: &mut VecDeque<u32>) -> usize {
    if seen[from as usize] {
        return 0;
    }
    seen[from as usize] = true;
    queue.clear();
    queue.push_back(from);
    let mut n = 1;
    while let Some(u) = queue.pop_front() {
        for &v in &l0[u as usize] {
            if !seen[v as usize] {
                seen[v as usize] = true;
                n += 1;
                queue.push_back(v);
            }
        }
    }
    n
}

/// Rows reachable from `entry` over level 0.
pub fn reachable(l0: &[Vec<u32>], entry: u32) -> Vec<bool> {
    let mut seen = vec![false; l0.len()];
    mark_from(l0, entry, &mut seen, &mut VecDeque::new());
    seen
}

/// Pass 3: every row must be findable by a search for its own key. A row that a walk from the
/// entry point for its own key does not return is linked from the nearest rows that walk does
/// return: those are exactly where searches for its neighbourhood end. Returns (rows
/// unfindable on the graph as it came in, rows linked).
pub fn make_findable(keys: KeyRows<'_>, dim: usize, layers: &mut Layers) -> (usize, usize) {
    let rows = layers.l0.len();
    let graph = &*layers;
    // Check every row in parallel on the graph as it is...
    let suspects: Vec<u32> = (0..rows)
        .into_par_iter()
        .map_init(
            || (Walker::new(rows), Vec::with_capacity(dim), Vec::new()),
            |(w, q, out), u| {
                keys.row_f32(u, dim, q);
                w.walk(keys, graph, q, WALK_EF, out);
                (!found(out, u as u32, WALK_EF)).then_some(u as u32)
            },
        )
        .flatten()
        .collect();
    // ...then, one at a time, re-check and link: a link into an island makes the rest of it
    // findable, so most suspects need none.
    let mut w = Walker::new(rows);
    let (mut q, mut out) = (Vec::with_capacity(dim), Vec::new());
    let mut linked = 0;
    for &u in &suspects {
        keys.row_f32(u as usize, dim, &mut q);
        w.walk(keys, layers, &q, WALK_EF, &mut out);
        if found(&out, u, WALK_EF) {
            continue;
        }
        for &(_, r) in out.iter().filter(|x| x.1 != u).take(LINKS_PER_ROW) {
            link(&mut layers.l0, r, u);
        }
        linked += 1;
    }
    (suspects.len(), linked)
}

/// Whether a walk for row `u`'s own key returned it (or only exact duplicates of it).
fn found(out: &[(f32, u32)], u: u32, ef: usize) -> bool {
    out.iter().any(|x| x.1 == u) || (out.len() >= ef && out.iter().all(|x| x.0 == 0.0))
}

/// Adds the links r → u and u → r where missing.
fn link(l0: &mut [Vec<u32>], r: u32, u: u32) {
    if !l0[r as usize].contains(&u) {
        l0[r as usize].push(u);
    }
    if !l0[u as usize].contains(&r) {
        l0[u as usize].push(r);
    }
}

/// Pass 4: links every row unreachable from the entry point over level 0 to its nearest
/// reachable row, both ways. Returns (rows unreachable before, links added).
pub fn connect(keys: KeyRows<'_>, dim: usize, layers: &mut Layers) -> (usize, usize) {
    let rows = layers.l0.len();
    let mut seen = reachable(&layers.l0, layers.entry);
    let unreachable = seen.iter().filter(|s| !**s).count();
    let mut linked = 0;
    let mut queue = VecDeque::new();
    let mut w = Walker::new(rows);
    let (mut q, mut out) = (Vec::with_capacity(dim), Vec::new());
    for u in 0..rows {
        if seen[u] {
            continue;
        }
        keys.row_f32(u, dim, &mut q);
        w.walk(keys, layers, &q, WALK_EF, &mut out);
        // The walk descends through the upper levels, so it can land in a part of level 0 that
        // the entry point does not reach: keep only rows marked reachable.
        let near = out
            .iter()
            .find(|&&(_, r)| seen[r as usize])
            .map(|&(_, r)| r)
            .unwrap_or_else(|| nearest_marked(keys, &q, &seen));
        link(&mut layers.l0, near, u as u32);
        linked += 1;
        mark_from(&layers.l0, u as u32, &mut seen, &mut queue);
    }
    (unreachable, linked)
}

/// Exact scan over the marked rows (fallback when the walk found none of them).
fn nearest_marked(keys: KeyRows<'_>, q: &[f32], seen: &[bool]) -> u32 {
    let mut best = (f32::INFINITY, 0u32);
    for (r, _) in seen.iter().enumerate().filter(|(_, s)| **s) {
        let d = keys.dist(q, r);
        if d < best.0 {
            best = (d, r as u32);
        }
    }
    best.1
}

/// The search of `hnsw::Graph::search` over the in-memory graph being repaired.
struct Walker {
    stamps: Vec<u32>,
    epoch: u32,
    candidates: BinaryHeap<Reverse<Scored>>,
    results: BinaryHeap<Scored>,
}

impl Walker {
    fn new(rows: usize) -> Self {
        Walker {
            stamps: vec![0; rows],
            epoch: 0,
            candidates: BinaryHeap::new(),
            results: BinaryHeap::new(),
        }
    }

    /// The `ef` nearest rows to `q` the walk finds, ascending.
    fn walk(
        &mut self,
        keys: KeyRows<'_>,
        g: &Layers,
        q: &[f32],
        ef: usize,
        out: &mut Vec<(f32, u32)>,
    ) {
        let mut cur = g.entry;
        let mut cur_d = keys.dist(q, cur as usize);
        for level in g.upper.iter().rev() {
            loop {
                let mut changed = false;
                if let Ok(i) = level.binary_search_by_key(&cur, |(r, _)| *r) {
                    for &nb in &level[i].1 {
                        let dn = keys.dist(q, nb as usize);
                        if dn < cur_d {
                            (cur_d, cur) = (dn, nb);
                            changed = true;
                        }
                    }
                }
                if !changed {
                    break;
                }
            }
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamps.fill(0);
            self.epoch = 1;
        }
        self.candidates.clear();
        self.results.clear();
        self.stamps[cur as usize] = self.epoch;
        self.candidates.push(Reverse(Scored(cur_d, cur)));
        self.results.push(Scored(cur_d, cur));
        while let Some(Reverse(Scored(dc, c))) = self.candidates.pop() {
            let worst = self.results.peek().map_or(f32::INFINITY, |w| w.0);
            if dc > worst && self.results.len() >= ef {
                break;
            }
            for &nb in &g.l0[c as usize] {
                let s = &mut self.stamps[nb as usize];
                if *s == self.epoch {
                    continue;
                }
                *s = self.epoch;
                let dn = keys.dist(q, nb as usize);
                let worst = self.results.peek().map_or(f32::INFINITY, |w| w.0);
                if self.results.len() < ef || dn < worst {
                    self.candidates.push(Reverse(Scored(dn, nb)));
                    self.results.push(Scored(dn, nb));
                    if self.results.len() > ef {
                        self.results.pop();
                    }
                }
            }
        }
        out.clear();
        out.extend(self.results.drain().map(|c| (c.0, c.1)));
        out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heuristic_drops_a_candidate_hidden_behind_a_kept_one() {
        // Row 0 at the origin; 1 and 2 on the same side (2 behind 1), 3 on the other side.
        let keys: Vec<f32> = vec![0.0, 0.0, 1.0, 0.0, 2.0, 0.1, -3.0, 0.0];
        let k = KeyRows::F32(&keys);
        let mut l0 = vec![vec![1, 2, 3], vec![0], vec![0], vec![0]];
        diversify(k, 2, &mut l0, 4);
        // 2 is closer to 1 than to 0: pruned from 0's list, but 2 selected 0 and 0 has room,
        // so it comes back as a reverse link after the heuristic's choices.
        assert_eq!(l0[0], vec![1, 3, 2]);
        assert_eq!(l0[2], vec![0]);
        // With no room, the reverse link is not added.
        let mut l0 = vec![vec![1, 2, 3], vec![0], vec![0], vec![0]];
        diversify(k, 2, &mut l0, 2);
        assert_eq!(l0[0], vec![1, 3]);
    }

    /// Rows 0–2 form the reachable part; row 3 has no links and rows 4–5 only each other.
    fn islands() -> (Vec<f32>, Layers) {
        let keys = vec![0.0, 1.0, 2.0, 3.0, 10.0, 11.0];
        let l0 = vec![vec![1], vec![0, 2], vec![1], vec![], vec![5], vec![4]];
        (
            keys,
            Layers {
                entry: 0,
                l0,
                upper: Vec::new(),
            },
        )
    }

    #[test]
    fn unfindable_rows_are_linked_from_where_the_walk_ends() {
        let (keys, mut g) = islands();
        let k = KeyRows::F32(&keys);
        assert_eq!(make_findable(k, 1, &mut g), (3, 2));
        // Row 3 from the two nearest rows the walk found (2, 1); then row 4 from 3 and 2;
        // row 5 is then found through 4 and needs no link.
        assert_eq!(g.l0[3], vec![2, 1, 4]);
        assert!(g.l0[2].contains(&3) && g.l0[1].contains(&3) && g.l0[2].contains(&4));
        assert_eq!(g.l0[5], vec![4]);
        assert!(reachable(&g.l0, 0).iter().all(|r| *r));
    }

    #[test]
    fn unreachable_rows_are_connected_to_the_nearest_reachable_one() {
        let (keys, mut g) = islands();
        let k = KeyRows::F32(&keys);
        // Row 3 gets a link from 2; rows 4 and 5 are one component: one link (4 ↔ 3) does.
        assert_eq!(connect(k, 1, &mut g), (3, 2));
        assert!(g.l0[2].contains(&3) && g.l0[3].contains(&4));
        assert!(reachable(&g.l0, 0).iter().all(|r| *r));
    }

    #[test]
    fn reverse_lists_every_source() {
        let lists = vec![vec![1u32, 2], vec![2], vec![]];
        let (off, src) = reverse(&lists, |l| l.iter().copied());
        assert_eq!(off, vec![0, 0, 1, 3]);
        assert_eq!(src, vec![0, 0, 1]);
    }
}
