//! The whole decoding step: `Detoxifier::adjust_sparse` for one row over a toxic and a
//! non-toxic store (search both, then the rule), exact and HNSW, k = 64 and 1024.
//!
//! `cargo bench --bench engine` builds two small synthetic stores (clustered Gaussian keys,
//! D = 576, f32) in a temporary directory and keeps criterion's run short. Knobs (environment):
//! - `GOODTRIEVER_BENCH_ROWS`: rows per store (default 20000; e.g. 200000 for the size,
//!   which takes minutes to index on 2 cores);
//! - `GOODTRIEVER_BENCH_DTYPE`: `f32` (default) or `f16`;
//! - `GOODTRIEVER_BENCH_STORES=TOXIC_DIR,NONTOXIC_DIR`: bench existing stores instead (for
//!   example the ones `scripts/bench/bench_search.py` caches under target/bench-data), no build;
//! - `GOODTRIEVER_BENCH_QUERIES=Q.npy`: queries ([B, 576] f32) drawn from those stores'
//!   distribution (e.g. the script's `queries.npy`); the default queries come from this file's
//!   own mixture and are far from other stores' data, which makes HNSW walks unrepresentative.
//!
//! For latency at matched recall against faiss, memory and build time, see
//! `scripts/bench/bench_search.py`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::rule::{Mode, RuleParams, SparseRow};

const DIM: usize = 576;
const VOCAB: usize = 49_152;
const CENTRES: usize = 400;

/// xorshift64* with Box–Muller normals: deterministic, no RNG dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// Clustered keys: centres N(0, 1) under a decaying per-dimension scale, points at spread 0.35
/// around them; each cluster predicts a handful of tokens.
struct Mixture {
    scale: Vec<f32>,
    centres: Vec<f32>,
}

impl Mixture {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let raw: Vec<f32> = (0..DIM).map(|j| (j as f32 + 1.0).powf(-0.5)).collect();
        let ms = (raw.iter().map(|s| s * s).sum::<f32>() / DIM as f32).sqrt();
        let scale: Vec<f32> = raw.iter().map(|s| s / ms).collect();
        let centres = (0..CENTRES * DIM)
            .map(|i| rng.normal() * scale[i % DIM])
            .collect();
        Mixture { scale, centres }
    }

    fn sample(&self, rows: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = Rng(seed);
        let mut keys = Vec::with_capacity(rows * DIM);
        let mut values = Vec::with_capacity(rows);
        for _ in 0..rows {
            let c = (rng.next_u64() % CENTRES as u64) as usize;
            let centre = &self.centres[c * DIM..(c + 1) * DIM];
            keys.extend(
                centre
                    .iter()
                    .zip(&self.scale)
                    .map(|(m, s)| m + 0.35 * s * rng.normal()),
            );
            values.push(((c as u64 * 7919 + rng.next_u64() % 16) % VOCAB as u64) as u32);
        }
        (keys, values)
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The two stores, and the temporary directory that holds them when they were built here.
fn stores() -> (Arc<Datastore>, Arc<Datastore>, Option<tempfile::TempDir>) {
    if let Ok(dirs) = std::env::var("GOODTRIEVER_BENCH_STORES") {
        let dirs: Vec<PathBuf> = dirs.split(',').map(PathBuf::from).collect();
        assert_eq!(
            dirs.len(),
            2,
            "GOODTRIEVER_BENCH_STORES must be TOXIC_DIR,NONTOXIC_DIR"
        );
        let open = |d: &PathBuf| {
            Arc::new(
                Datastore::open(d).unwrap_or_else(|e| panic!("cannot open {}: {e}", d.display())),
            )
        };
        return (open(&dirs[0]), open(&dirs[1]), None);
    }
    let rows = env_usize("GOODTRIEVER_BENCH_ROWS", 20_000);
    let dtype = match std::env::var("GOODTRIEVER_BENCH_DTYPE").as_deref() {
        Ok("f16") => KeyDtype::F16,
        _ => KeyDtype::F32,
    };
    let tmp = tempfile::tempdir().expect("temporary directory");
    let mix = Mixture::new(0x5eed);
    let mut fp = ModelFingerprint::named("bench", DIM);
    fp.vocab_size = Some(VOCAB);
    let make = |name: &str, seed: u64| {
        let store = Datastore::create(
            &tmp.path().join(name),
            CreateOptions {
                fingerprint: fp.clone(),
                key_type: KeyType::FinalHidden,
                dtype,
            },
        )
        .expect("create store");
        let (keys, values) = mix.sample(rows, seed);
        let t = std::time::Instant::now();
        store
            .append(Keys::F32(&keys), &values, Provenance::new("bench"))
            .expect("append");
        eprintln!(
            "built {name}: {rows} rows, {dtype} keys, HNSW in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Arc::new(store)
    };
    let toxic = make("toxic", 1);
    let nontoxic = make("nontoxic", 2);
    (toxic, nontoxic, Some(tmp))
}

fn engine(c: &mut Criterion) {
    let (toxic, nontoxic, _tmp) = stores();
    let queries = match std::env::var("GOODTRIEVER_BENCH_QUERIES") {
        Ok(p) => {
            let (b, d, q) = goodtriever::npy::read_queries(std::path::Path::new(&p))
                .unwrap_or_else(|e| panic!("cannot read {p}: {e}"));
            assert!(
                d == DIM && b >= 32,
                "{p} must hold at least 32 rows of D = {DIM}"
            );
            q[..32 * DIM].to_vec()
        }
        Err(_) => Mixture::new(0x5eed).sample(32, 3).0,
    };
    let rows = toxic.len();
    let mut group = c.benchmark_group(format!("adjust_sparse_1row/{rows}rows"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for k in [64usize, 1024] {
        let opts = AdjustOptions {
            params: RuleParams {
                k,
                ..RuleParams::default()
            },
            mode: Mode::Ensemble,
        };
        for (name, search) in [
            ("exact", SearchParams::exact()),
            ("hnsw", SearchParams::hnsw(None)),
        ] {
            let detox =
                Detoxifier::goodtriever(toxic.clone(), nontoxic.clone(), opts, search, Some(VOCAB))
                    .expect("engine");
            let mut scratch = DetoxScratch::default();
            let mut out: Vec<SparseRow> = Vec::new();
            let mut i = 0;
            group.bench_function(BenchmarkId::new(name, format!("k{k}")), |b| {
                b.iter(|| {
                    let q = &queries[(i % 32) * DIM..(i % 32 + 1) * DIM];
                    i += 1;
                    detox
                        .adjust_sparse(q, &opts, &mut scratch, &mut out)
                        .expect("adjust");
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
