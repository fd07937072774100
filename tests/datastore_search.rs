//! Search correctness: exact against a naive brute force, HNSW recall on clustered data,
//! merging across segments, de-duplication of identical queries, f16 and f32 keys.

mod datastore_common;

use datastore_common::*;
use goodtriever::datastore::{
    Datastore, KeyDtype, Keys, Neighbour, Provenance, SearchMode, SearchParams,
};
use proptest::prelude::*;

/// Exact results must equal the brute force up to float rounding: same distances (to a
/// relative 1e-4) and the same ids except where two distances are that close.
fn assert_matches_naive(got: &[Neighbour], want: &[(f64, u64)], values: &[u32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let tol = 1e-4 * w.0.max(1.0);
        assert!(
            (g.dist as f64 - w.0).abs() <= tol,
            "dist {} vs {}",
            g.dist,
            w.0
        );
        if g.id != w.1 {
            // Only a near-tie may swap ids.
            let wd = want.iter().find(|x| x.1 == g.id).map(|x| x.0);
            assert!(
                wd.is_some_and(|d| (d - w.0).abs() <= tol),
                "id {} vs {}",
                g.id,
                w.1
            );
        }
        assert_eq!(g.value, values[g.id as usize]);
    }
    assert!(got.windows(2).all(|p| p[0].dist <= p[1].dist), "not sorted");
}

#[test]
fn exact_search_equals_brute_force_over_several_segments() {
    for dtype in [KeyDtype::F32, KeyDtype::F16] {
        let d = 40;
        let tmp = tempfile::tempdir().unwrap();
        let ds = create(tmp.path(), d, dtype);
        let mut all_keys = Vec::new();
        let mut all_vals = Vec::new();
        for (i, n) in [500usize, 37, 1200].into_iter().enumerate() {
            let k = clustered(n, d, 6, 100 + i as u64);
            let v = values(n, 100 + i as u64);
            ds.append(Keys::F32(&k), &v, Provenance::new("t")).unwrap();
            all_keys.extend(as_stored(&k, dtype));
            all_vals.extend(v);
        }
        let queries = clustered(12, d, 6, 100);
        for k in [1, 10, 64, 2000] {
            let res = ds.search(&queries, k, &SearchParams::exact()).unwrap();
            for (qi, r) in res.iter().enumerate() {
                let want = naive_knn(&all_keys, d, &queries[qi * d..(qi + 1) * d], k);
                assert_matches_naive(r, &want, &all_vals);
            }
        }
        // k larger than the store: every row, once.
        let res = ds
            .search(&queries[..d], 4096, &SearchParams::exact())
            .unwrap();
        assert_eq!(res[0].len(), 1737);
        let mut ids: Vec<u64> = res[0].iter().map(|n| n.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 1737);
    }
}

fn recall(got: &[Vec<Neighbour>], truth: &[Vec<Neighbour>]) -> f64 {
    let mut hit = 0usize;
    let mut total = 0usize;
    for (g, t) in got.iter().zip(truth) {
        let ts: std::collections::HashSet<u64> = t.iter().map(|n| n.id).collect();
        hit += g.iter().filter(|n| ts.contains(&n.id)).count();
        total += t.len();
    }
    hit as f64 / total as f64
}

#[test]
fn hnsw_recall_on_clustered_data_is_high_and_distances_are_exact() {
    let d = 32;
    let tmp = tempfile::tempdir().unwrap();
    let ds = create(tmp.path(), d, KeyDtype::F16);
    let keys = clustered(6000, d, 30, 7);
    ds.append(Keys::F32(&keys), &values(6000, 7), Provenance::new("t"))
        .unwrap();
    ds.append(
        Keys::F32(&clustered(3000, d, 30, 8)),
        &values(3000, 8),
        Provenance::new("t"),
    )
    .unwrap();
    // Queries near the data, not copies of it.
    let mut queries = clustered(50, d, 30, 7);
    for (i, x) in queries.iter_mut().enumerate() {
        *x += ((i % 7) as f32 - 3.0) * 0.1;
    }
    for k in [10usize, 100] {
        let truth = ds.search(&queries, k, &SearchParams::exact()).unwrap();
        let got = ds.search(&queries, k, &SearchParams::hnsw(None)).unwrap();
        let r = recall(&got, &truth);
        eprintln!("k={k} recall={r:.4}");
        assert!(r >= 0.9, "recall@{k} = {r}");
        for (g, t) in got.iter().zip(&truth) {
            assert_eq!(g.len(), k);
            // Re-scored: a neighbour found by both has the identical exact distance.
            for n in g {
                if let Some(m) = t.iter().find(|m| m.id == n.id) {
                    assert_eq!(n.dist, m.dist);
                    assert_eq!(n.value, m.value);
                }
            }
            assert!(g.windows(2).all(|p| p[0].dist <= p[1].dist));
        }
        // Larger ef never hurts on this data.
        let wide = ds
            .search(&queries, k, &SearchParams::hnsw(Some(4 * k.max(64))))
            .unwrap();
        assert!(recall(&wide, &truth) >= r - 1e-9);
    }
    // Auto decides per segment: with ef = 400 both segments (6000 and 3000 rows) are under
    // 20 × ef rows, so both are scanned exactly; with the default ef = 128 the 6000-row one is
    // over the threshold and is walked with HNSW, the 3000-row one is still scanned.
    assert!(use_exact_for(400, 6000) && use_exact_for(400, 3000));
    assert!(!use_exact_for(128, 6000) && use_exact_for(128, 3000));
    let auto_wide = SearchParams {
        mode: SearchMode::Auto,
        ef: Some(400),
    };
    assert_eq!(
        ds.search(&queries, 10, &auto_wide).unwrap(),
        ds.search(&queries, 10, &SearchParams::exact()).unwrap()
    );
}

fn use_exact_for(ef: usize, rows: usize) -> bool {
    rows <= goodtriever::datastore::AUTO_MIN_ROWS.max(goodtriever::datastore::AUTO_EF_FACTOR * ef)
}

#[test]
fn hnsw_never_returns_fewer_than_k_when_the_store_has_k_rows() {
    let d = 8;
    let tmp = tempfile::tempdir().unwrap();
    let ds = create(tmp.path(), d, KeyDtype::F32);
    ds.append(
        Keys::F32(&clustered(700, d, 3, 11)),
        &values(700, 11),
        Provenance::new("t"),
    )
    .unwrap();
    let q = clustered(3, d, 3, 12);
    for k in [1usize, 50, 699, 700, 1000] {
        let res = ds.search(&q, k, &SearchParams::hnsw(Some(1))).unwrap();
        for r in res {
            assert_eq!(r.len(), k.min(700));
            let mut ids: Vec<u64> = r.iter().map(|n| n.id).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), k.min(700), "duplicate ids");
            assert!(ids.iter().all(|&i| i < 700), "an id that does not exist");
        }
    }
}

#[test]
fn identical_queries_in_a_batch_get_identical_results() {
    let d = 24;
    let tmp = tempfile::tempdir().unwrap();
    let ds = create(tmp.path(), d, KeyDtype::F16);
    ds.append(
        Keys::F32(&clustered(2000, d, 10, 13)),
        &values(2000, 13),
        Provenance::new("t"),
    )
    .unwrap();
    let a = clustered(1, d, 10, 14);
    let b = clustered(1, d, 10, 15);
    let batch: Vec<f32> = [&a, &b, &a, &a, &b]
        .iter()
        .flat_map(|v| v.iter().copied())
        .collect();
    for mode in [SearchMode::Exact, SearchMode::Hnsw, SearchMode::Auto] {
        let p = SearchParams { mode, ef: None };
        let r = ds.search(&batch, 20, &p).unwrap();
        assert_eq!(r[0], r[2]);
        assert_eq!(r[0], r[3]);
        assert_eq!(r[1], r[4]);
        assert_ne!(r[0], r[1]);
        let single = ds.search(&a, 20, &p).unwrap();
        assert_eq!(single[0], r[0]);
        // search_into reuses buffers and gives the same answer.
        let mut out: Vec<Vec<Neighbour>> = (0..5).map(|_| Vec::with_capacity(20)).collect();
        ds.search_into(&batch, 20, &p, &mut out).unwrap();
        assert_eq!(out, r);
    }
}

#[test]
fn every_row_of_a_batch_gets_exactly_what_it_gets_alone() {
    // Segments on both sides of Auto's threshold, so one batch is scanned exactly in one pass
    // for all its rows in some segments and walked row by row in another; more distinct rows
    // than one batched-scan task takes, and repeated rows.
    let d = 36;
    for dtype in [KeyDtype::F16, KeyDtype::F32] {
        let tmp = tempfile::tempdir().unwrap();
        let ds = create(tmp.path(), d, dtype);
        for (i, n) in [900usize, 5000, 40].into_iter().enumerate() {
            let keys = clustered(n, d, 8, 40 + i as u64);
            ds.append(
                Keys::F32(&keys),
                &values(n, 40 + i as u64),
                Provenance::new("t"),
            )
            .unwrap();
        }
        let distinct = clustered(11, d, 8, 99);
        let mut batch = distinct.clone();
        batch.extend_from_slice(&distinct[3 * d..4 * d]);
        batch.extend_from_slice(&distinct[..d]);
        let rows = batch.len() / d;
        for mode in [SearchMode::Exact, SearchMode::Auto, SearchMode::Hnsw] {
            let p = SearchParams { mode, ef: None };
            for k in [1, 50, 1200] {
                let together = ds.search(&batch, k, &p).unwrap();
                assert_eq!(together.len(), rows);
                for (i, got) in together.iter().enumerate() {
                    let alone = ds.search(&batch[i * d..(i + 1) * d], k, &p).unwrap();
                    assert_eq!(got, &alone[0], "{dtype:?} {mode:?} k {k} row {i}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random stores (1–3 segments, either dtype, any small D) and random k: exact search
    /// agrees with brute force, and a fresh handle opened from disk agrees with the writer.
    #[test]
    fn exact_search_agrees_with_brute_force_on_random_stores(
        d in 1usize..20,
        sizes in proptest::collection::vec(1usize..120, 1..4),
        k in 1usize..150,
        f16 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dtype = if f16 { KeyDtype::F16 } else { KeyDtype::F32 };
        let tmp = tempfile::tempdir().unwrap();
        let ds = create(tmp.path(), d, dtype);
        let mut all = Vec::new();
        let mut vals = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let k = clustered(*n, d, 3, seed.wrapping_add(i as u64));
            let v = values(*n, seed ^ i as u64);
            ds.append(Keys::F32(&k), &v, Provenance::new("p")).unwrap();
            all.extend(as_stored(&k, dtype));
            vals.extend(v);
        }
        let q = clustered(3, d, 3, seed ^ 77);
        let res = ds.search(&q, k, &SearchParams::exact()).unwrap();
        for (qi, r) in res.iter().enumerate() {
            let want = naive_knn(&all, d, &q[qi * d..(qi + 1) * d], k);
            assert_matches_naive(r, &want, &vals);
        }
        let reopened = Datastore::open(tmp.path()).unwrap();
        prop_assert_eq!(reopened.search(&q, k, &SearchParams::exact()).unwrap(), res);
        let hnsw = ds.search(&q, k, &SearchParams::hnsw(None)).unwrap();
        for r in &hnsw {
            prop_assert_eq!(r.len(), k.min(all.len() / d));
        }
    }
}

/// Level-0 adjacency of a segment's `index.bin` (the layout documented in `hnsw.rs`: an
/// 8-word header — magic, version, rows, max level, entry, M, max level-0 degree, 0 — then the
/// level-0 CSR offsets[rows + 1] and neighbours) and the entry point.
fn level0(index: &std::path::Path) -> (Vec<Vec<u32>>, u32) {
    let bytes = std::fs::read(index).unwrap();
    let w: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(&w[0].to_le_bytes(), b"GTHN");
    let rows = w[2] as usize;
    let off = &w[8..8 + rows + 1];
    let adj = &w[8 + rows + 1..];
    let lists = (0..rows)
        .map(|r| adj[off[r] as usize..off[r + 1] as usize].to_vec())
        .collect();
    (lists, w[4])
}

/// A mixture like the benchmark's (scripts/bench/bench_search.py), scaled down: topics → centres →
/// points, a decaying per-dimension scale, Zipf-like cluster sizes and clusters of different
/// tightness. Tight, populous clusters are where hnsw_rs's plain "drop the farthest" pruning
/// cuts a cluster's links to the rest of the graph.
fn mixture(n: usize, d: usize, centres: usize, sample: u64) -> Vec<f32> {
    let mut rng = datastore_common::Rng::new(20240);
    let scale: Vec<f32> = (0..d).map(|j| ((j + 1) as f32).powf(-0.5) * 2.0).collect();
    let topics: Vec<f32> = (0..8 * d).map(|i| rng.normal() * scale[i % d]).collect();
    let mut cs = Vec::with_capacity(centres * d);
    let mut sigma = Vec::with_capacity(centres);
    for _ in 0..centres {
        let t = rng.below(8) as usize;
        for j in 0..d {
            cs.push(topics[t * d + j] + 0.5 * rng.normal() * scale[j]);
        }
        sigma.push(0.35 * (0.8 * rng.normal()).exp());
    }
    let w: Vec<f64> = (0..centres).map(|c| 1.0 / (c as f64 + 10.0)).collect();
    let total: f64 = w.iter().sum();
    let mut rng = datastore_common::Rng::new(sample);
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        let mut x = rng.uniform() as f64 * total;
        let mut c = 0;
        while c + 1 < centres && x >= w[c] {
            x -= w[c];
            c += 1;
        }
        for j in 0..d {
            out.push(cs[c * d + j] + sigma[c] * rng.normal() * scale[j]);
        }
    }
    out
}

/// After the build every row is reachable from the entry point over level 0, and a search for
/// a row's own key finds it. hnsw_rs's graph as it comes out fails both on this data (rows with
/// no path to them; rows in tight clusters that no walk enters); the build repairs level 0.
#[test]
fn hnsw_build_leaves_every_row_reachable_and_findable() {
    let (n, d, centres) = (12_000, 64, 60);
    let tmp = tempfile::tempdir().unwrap();
    let ds = create(tmp.path(), d, KeyDtype::F16);
    let keys = mixture(n, d, centres, 21);
    ds.append(Keys::F32(&keys), &values(n, 21), Provenance::new("t"))
        .unwrap();
    let seg = ds.segments()[0].id;
    let (l0, entry) = level0(&tmp.path().join(format!("segments/{seg}/index.bin")));
    assert_eq!(l0.len(), n);
    let mut seen = vec![false; n];
    let mut stack = vec![entry];
    seen[entry as usize] = true;
    while let Some(u) = stack.pop() {
        for &v in &l0[u as usize] {
            if !std::mem::replace(&mut seen[v as usize], true) {
                stack.push(v);
            }
        }
    }
    let unreachable = seen.iter().filter(|s| !**s).count();
    let max_degree = l0.iter().map(Vec::len).max().unwrap();
    // Every row searched for with its own (stored) key, k = 1, ef = 64.
    let stored = as_stored(&keys, KeyDtype::F16);
    let res = ds
        .search(&stored, 1, &SearchParams::hnsw(Some(64)))
        .unwrap();
    let missed = res
        .iter()
        .enumerate()
        .filter(|(i, r)| r[0].id != *i as u64 && r[0].dist > 0.0)
        .count();
    // And recall on fresh queries from the same mixture.
    let queries = mixture(40, d, centres, 22);
    let truth = ds.search(&queries, 100, &SearchParams::exact()).unwrap();
    let got = ds
        .search(&queries, 100, &SearchParams::hnsw(Some(128)))
        .unwrap();
    let r = recall(&got, &truth);
    eprintln!(
        "unreachable {unreachable}, not found by their own key {missed} of {n}, \
         max level-0 degree {max_degree}, recall@100 (ef 128) {r:.4}"
    );
    assert_eq!(unreachable, 0, "{unreachable} rows unreachable at level 0");
    // The repair guarantees findability when it checks a row; links it adds later for other
    // rows can reroute a few walks (measured: 3 to 6 of 12000; hnsw_rs alone: see above).
    assert!(
        missed <= n / 500,
        "{missed} rows not found by their own key"
    );
    assert!(max_degree <= 2 * 16 + 8, "level-0 degree {max_degree}");
    assert!(r >= 0.97, "recall@100 = {r}");
}
