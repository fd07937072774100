//! The vocabulary-wide work of a decoding step: the rule's `nucleus_filter` and `apply_sparse`
//! (what a client does with a sparse answer, what the dense form and the embedded generator
//! run per row), and the generator's sampler (temperature 1, top-p 0.9) over V = 49152, on a
//! flat distribution (uniform logits in ±2: the nucleus keeps about half the vocabulary, the
//! worst case) and a peaked one (Gaussian logits, σ = 4). And the sparse form's rule for one
//! row (`sparse_row`, ensemble of two stores with k = 1024 neighbours each): what a sparse
//! decoding step costs beyond its search. And `skip_decision`, the per-row test that lets the
//! engine leave a row unsearched (`rule::leaning_mass`), and what a row that the decision in
//! the nucleus skips costs in all, decided and answered (`skipped_row_in_nucleus`: the
//! decision's nucleus then the answer's, as before, against one nucleus that is both).
//!
//! `cargo bench --bench rule`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use goodtriever::generate::{Sampler, SamplingParams};
use goodtriever::rule::{
    apply_sparse, apply_sparse_in_place, leaning_mass, leaning_mass_in_nucleus,
    log_softmax_in_place, nucleus_filter, skip_in_nucleus_in_place, sparse_row, Expert, Mode,
    RuleParams, RuleScratch, SparseRow, TokenPrior,
};
use rand::{rngs::StdRng, SeedableRng};

const VOCAB: usize = 49_152;

/// xorshift64 with Box–Muller normals: deterministic, no RNG dependency.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

fn rule(c: &mut Criterion) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let flat: Vec<f32> = (0..VOCAB).map(|_| rng.uniform() * 4.0 - 2.0).collect();
    let peaked: Vec<f32> = (0..VOCAB).map(|_| rng.normal() * 4.0).collect();
    // A sparse answer of the size k = 1024 gives over two stores.
    let bias = SparseRow::Bias {
        scale: 1.0,
        pairs: (0..2048u32).map(|i| (i * 23 % VOCAB as u32, 0.5)).collect(),
    };
    let mut group = c.benchmark_group(format!("rule/{VOCAB}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut scratch = RuleScratch::new();
    for (name, logits) in [("flat", &flat), ("peaked", &peaked)] {
        let mut l = logits.clone();
        log_softmax_in_place(&mut l).expect("finite");
        let mut work = vec![0.0f32; VOCAB];
        group.bench_function(BenchmarkId::new("nucleus_filter_p0.9", name), |b| {
            b.iter(|| {
                work.copy_from_slice(&l);
                nucleus_filter(&mut work, 0.9, &mut scratch);
            })
        });
        group.bench_function(BenchmarkId::new("apply_sparse_p0.9", name), |b| {
            b.iter(|| apply_sparse(logits, &bias, 0.9, &mut scratch, &mut work).expect("apply"))
        });
        // The skip decision per row: the base probability of the tokens that lean toxic
        // (a few thousand on the default stores).
        let leaning: Vec<u32> = (0..3000u32).map(|i| i * 16 % VOCAB as u32).collect();
        group.bench_function(BenchmarkId::new("skip_decision", name), |b| {
            b.iter(|| leaning_mass(logits, &leaning))
        });
        // The same counted inside the rule's nucleus (skip_in_nucleus): a copy and a nucleus.
        group.bench_function(
            BenchmarkId::new("skip_decision_in_nucleus_p0.9", name),
            |b| b.iter(|| leaning_mass_in_nucleus(logits, &leaning, 0.9, &mut scratch)),
        );
        // A skipped row, decided in the nucleus and answered in place (the dense form's
        // whole work for it): a separate decision and answer, against the one nucleus that
        // `skip_in_nucleus_in_place` shares between them.
        let unchanged = SparseRow::default();
        group.bench_function(
            BenchmarkId::new("skipped_row_in_nucleus_p0.9/decide_then_answer", name),
            |b| {
                b.iter(|| {
                    work.copy_from_slice(logits);
                    let mass = leaning_mass_in_nucleus(&work, &leaning, 0.9, &mut scratch);
                    assert!(mass < 1.5);
                    apply_sparse_in_place(&mut work, &unchanged, 0.9, &mut scratch).expect("apply");
                })
            },
        );
        group.bench_function(
            BenchmarkId::new("skipped_row_in_nucleus_p0.9/in_place", name),
            |b| {
                b.iter(|| {
                    work.copy_from_slice(logits);
                    let skipped =
                        skip_in_nucleus_in_place(&mut work, &leaning, 0.9, 1.5, &mut scratch);
                    assert!(skipped.expect("finite"));
                })
            },
        );
        let mut sampler = Sampler::default();
        let params = SamplingParams::default();
        let mut rng = StdRng::seed_from_u64(1);
        group.bench_function(BenchmarkId::new("sample_top_p0.9", name), |b| {
            b.iter(|| sampler.sample(logits, &params, &mut rng).expect("a token"))
        });
    }
    group.finish();
}

/// k neighbours as a search returns them: ascending squared distances, and tokens that repeat
/// (a context's likely continuations recur among its neighbours): about half are distinct.
fn neighbours(rng: &mut Rng, k: usize, band: u32) -> Vec<(u32, f32)> {
    let mut d = 40.0f32;
    (0..k)
        .map(|_| {
            d += rng.uniform() * 0.05;
            let u = rng.uniform();
            let token = band + ((u * u * 1500.0) as u32 * 7) % 20_000;
            (token, d)
        })
        .collect()
}

fn sparse(c: &mut Criterion) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let toxic = neighbours(&mut rng, 1024, 0);
    let nontoxic = neighbours(&mut rng, 1024, 5_000);
    // Each store's prior from its own neighbours' tokens (every retrieved token is counted,
    // as in a real store) plus a flat background; the gate needs the stores' sizes.
    let prior_of = |n: &[(u32, f32)]| {
        let mut counts = vec![1u64; VOCAB];
        for &(t, _) in n {
            counts[t as usize] += 3;
        }
        TokenPrior::from_counts(&counts, VOCAB)
    };
    let (toxic_prior, nontoxic_prior) = (prior_of(&toxic), prior_of(&nontoxic));
    let experts = [
        Expert::new(-1.0, &toxic[..])
            .with_rows(150_000)
            .with_prior(toxic_prior.log_prior()),
        Expert::new(1.0, &nontoxic[..])
            .with_rows(300_000)
            .with_prior(nontoxic_prior.log_prior()),
    ];
    let mut scratch = RuleScratch::new();
    let mut out = SparseRow::default();
    let mut group = c.benchmark_group("sparse_row");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // The paper's rule, then each variant: what the gate and the prior add to a row.
    let paper = RuleParams::default();
    let variants = [
        ("ensemble_2x1024", paper),
        ("gated_2x1024", RuleParams { gate: 1.0, ..paper }),
        (
            "prior_2x1024",
            RuleParams {
                prior: 1.0,
                ..paper
            },
        ),
        (
            "gated_prior_2x1024",
            RuleParams {
                gate: 1.0,
                prior: 1.0,
                ..paper
            },
        ),
    ];
    for (name, params) in variants {
        group.bench_function(name, |b| {
            b.iter(|| {
                sparse_row(
                    Mode::Ensemble,
                    &experts,
                    &params,
                    VOCAB,
                    &mut scratch,
                    &mut out,
                )
                .expect("a valid row")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rule, sparse);
criterion_main!(benches);
