//! Search latency on synthetic clustered data at the default model's width (D = 576):
//! exact flat scan vs HNSW, k = 64 and k = 1024, single queries (the decoding-step shape), and
//! a batch of 8 rows searched together vs each row alone on the pool's threads.
//! Also prints HNSW recall@k against exact once per configuration, so a speed number is never
//! read without its recall. Sizes are moderate so `cargo bench --bench search` stays short;
//! set GT_BENCH_ROWS to change N (the faiss comparison script uses the CLI instead).

use std::collections::HashSet;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use goodtriever::datastore::{
    kernel_name, CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams,
};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use rayon::prelude::*;

const D: usize = 576;

fn rng(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 + 1e-7
}

fn normal(s: &mut u64) -> f32 {
    let (u, v) = (rng(s), rng(s));
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
}

/// Gaussian clusters: hidden states cluster, and HNSW on uniform noise is meaningless.
fn clustered(n: usize, clusters: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let centres: Vec<f32> = (0..clusters * D).map(|_| normal(&mut s)).collect();
    let mut out = Vec::with_capacity(n * D);
    for _ in 0..n {
        let c = ((rng(&mut s) * clusters as f32) as usize).min(clusters - 1);
        for j in 0..D {
            out.push(centres[c * D + j] + 0.35 * normal(&mut s));
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let rows: usize = std::env::var("GT_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let tmp = tempfile::tempdir().unwrap();
    let ds = Datastore::create(
        tmp.path(),
        CreateOptions {
            fingerprint: ModelFingerprint::named("bench", D),
            key_type: KeyType::LastFfnInput,
            dtype: KeyDtype::F16,
        },
    )
    .unwrap();
    let keys = clustered(rows, 200, 1);
    let values: Vec<u32> = (0..rows as u32).collect();
    let t = std::time::Instant::now();
    ds.append(Keys::F32(&keys), &values, Provenance::new("bench"))
        .unwrap();
    eprintln!(
        "kernel {}; {rows} rows x {D} f16: append + HNSW build {:.1} s",
        kernel_name(),
        t.elapsed().as_secs_f64()
    );
    drop(keys);
    let queries = clustered(64, 200, 1); // same centres, fresh noise
    let mut g = c.benchmark_group(format!("search_{rows}x{D}_f16"));
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for k in [64usize, 1024] {
        let truth = ds.search(&queries, k, &SearchParams::exact()).unwrap();
        let hnsw = ds.search(&queries, k, &SearchParams::hnsw(None)).unwrap();
        let mut hit = 0;
        for (h, t) in hnsw.iter().zip(&truth) {
            let ts: HashSet<u64> = t.iter().map(|n| n.id).collect();
            hit += h.iter().filter(|n| ts.contains(&n.id)).count();
        }
        eprintln!(
            "k={k}: HNSW (ef={}) recall@k = {:.4}",
            SearchParams::hnsw(None).effective_ef(k),
            hit as f64 / (k * truth.len()) as f64
        );
        for (name, params) in [
            ("exact", SearchParams::exact()),
            ("hnsw", SearchParams::hnsw(None)),
        ] {
            let mut i = 0;
            let mut out = vec![Vec::new(); 1];
            g.bench_function(BenchmarkId::new(name, k), |b| {
                b.iter(|| {
                    let q = &queries[(i % 64) * D..(i % 64 + 1) * D];
                    i += 1;
                    ds.search_into(q, k, &params, &mut out).unwrap();
                })
            });
        }
    }
    g.finish();

    // A batch of rows (a batched generation, or a request of several rows): the exact scan
    // reads the keys once for every TASK_QUERIES rows, so the batch costs a fraction of its
    // rows searched one by one; HNSW walks stay one per row.
    let mut g = c.benchmark_group(format!("batch{BATCH}_{rows}x{D}_f16_k1024"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    let batch = &queries[..BATCH * D];
    for (name, params) in [
        ("exact", SearchParams::exact()),
        ("hnsw", SearchParams::hnsw(None)),
    ] {
        let mut out = vec![Vec::new(); BATCH];
        g.bench_function(BenchmarkId::new(name, "together"), |b| {
            b.iter(|| ds.search_into(batch, 1024, &params, &mut out).unwrap())
        });
        // What a batch cost before rows were scanned together: each row searched alone,
        // the rows spread over the pool's threads.
        let mut each: Vec<Vec<Vec<_>>> = vec![vec![Vec::new()]; BATCH];
        g.bench_function(BenchmarkId::new(name, "rows_in_parallel"), |b| {
            b.iter(|| {
                batch
                    .par_chunks(D)
                    .zip(each.par_iter_mut())
                    .for_each(|(q, o)| ds.search_into(q, 1024, &params, o).unwrap())
            })
        });
    }
    g.finish();
}

const BATCH: usize = 8;

criterion_group!(benches, bench);
criterion_main!(benches);
