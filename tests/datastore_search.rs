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
