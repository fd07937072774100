//! A decoding step allocates nothing once warm: the engine's (search + rule, sparse and dense;
//! buffers come from the caller's `DetoxScratch` and per-thread search scratch) and the model's
//! forward pass over its KV cache (buffers in the cache and the caller's `ForwardOutput`).
//!
//! A counting global allocator sees every allocation in this test binary, which is why the file
//! holds a single test: the harness would otherwise run other tests beside it. Steps that fan
//! out to rayon's pool (two stores, several segments, several rows) are allowed rayon's own
//! bookkeeping: its injector queue allocates one block per 63 jobs injected from outside the
//! pool. A step injects a few (the search; for several rows also the rule's row chunks), so
//! 3–9 allocations per 200 steps when the machine is quiet, up to 18 seen under a parallel
//! build; the bound, one per 8 steps, stays far below what any buffer of ours would cost (at
//! least one per step).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::model::testing::{write_tiny_llama, TinySpec};
use goodtriever::model::{ForwardOutput, Model, Outputs, WeightFormat};
use goodtriever::reuse::ReuseParams;
use goodtriever::rule::{Mode, RuleParams};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DIM: usize = 16;
const VOCAB: usize = 64;
const K: usize = 32;

/// A store of `segments` segments of `rows` rows each, keys spread over a few clusters.
fn store(dir: &Path, seed: u64, segments: usize, rows: usize) -> Arc<Datastore> {
    let mut fingerprint = ModelFingerprint::named("tiny", DIM);
    fingerprint.vocab_size = Some(VOCAB);
    let s = Datastore::create(
        dir,
        CreateOptions {
            fingerprint,
            key_type: KeyType::FinalHidden,
            dtype: KeyDtype::F16,
        },
    )
    .unwrap();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..segments {
        let mut keys = Vec::with_capacity(rows * DIM);
        let mut values = Vec::with_capacity(rows);
        for i in 0..rows {
            let centre = (i % 7) as f32;
            keys.extend((0..DIM).map(|_| centre + (next() % 1000) as f32 / 1000.0));
            values.push((next() % VOCAB as u64) as u32);
        }
        s.append(Keys::F32(&keys), &values, Provenance::new("test"))
            .unwrap();
    }
    Arc::new(s)
}

fn queries(rows: usize) -> Vec<f32> {
    (0..rows * DIM)
        .map(|i| ((i * 37) % 71) as f32 / 10.0)
        .collect()
}

/// Allocations over `steps` calls of `step`, after warm-up calls.
fn allocations(steps: usize, mut step: impl FnMut()) -> usize {
    for _ in 0..8 {
        step();
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..steps {
        step();
    }
    ALLOCS.load(Ordering::Relaxed) - before
}

#[test]
fn a_warm_decoding_step_allocates_nothing() {
    let mut report = engine_steps();
    report.extend(model_steps());
    let steps = STEPS;
    let too_many: Vec<_> = report
        .iter()
        .filter(|(_, fans_out, n)| *n > if *fans_out { steps / 8 } else { 0 })
        .collect();
    assert!(
        too_many.is_empty(),
        "allocations per {steps} warm steps (none allowed where nothing fans out to rayon, \
         at most {} where it does): {too_many:#?}",
        steps / 8
    );
}

const STEPS: usize = 200;

/// (case, whether it fans out to rayon, allocations over `STEPS` steps).
type Report = Vec<(String, bool, usize)>;

/// Decoding steps of a tiny model with the decoding path's weight types (the default model is
/// Q4_1; Q8_0 is the re-quantised format), batch 1 and 3, each key type. F32 weights are left
/// out: their matmuls run in the `gemm` crate, which allocates its packing buffers per call;
/// they are the batched extraction path, not the decoding one.
fn model_steps() -> Report {
    const PROMPT: usize = 260;
    let tmp = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let path = tmp.path().join(format!("tiny-{dtype:?}.gguf"));
        let spec = TinySpec {
            context: 512, // ≥ PROMPT + warm-up + STEPS, and a power of two the cache reaches
            matrix_dtype: dtype,
            embedding_dtype: dtype,
            ..TinySpec::default()
        };
        write_tiny_llama(&path, &spec).unwrap();
        let model = Model::load(&path, WeightFormat::Native).unwrap();
        for batch in [1, 3] {
            for key_type in [KeyType::LastFfnInput, KeyType::FinalHidden] {
                let outputs = Outputs::last(key_type);
                let mut cache = model.new_cache(batch);
                let mut out = ForwardOutput::default();
                // A prompt long enough that the cache has already doubled to the capacity the
                // measured steps need (it grows by doubling: amortised, not per step).
                let prompt: Vec<u32> = (0..batch * PROMPT).map(|i| 40 + (i % 200) as u32).collect();
                model
                    .forward_into(&prompt, batch, &mut cache, outputs, &mut out)
                    .unwrap();
                let next: Vec<u32> = (0..batch as u32).map(|b| 7 + b).collect();
                let n = allocations(STEPS, || {
                    model
                        .forward_into(&next, batch, &mut cache, outputs, &mut out)
                        .unwrap();
                });
                // The pass runs inside a rayon scope: it always fans out.
                let case = format!("model step, {dtype:?}, batch {batch}, {key_type:?}");
                report.push((case, true, n));
            }
        }
    }
    report
}

/// Engine steps over every search path: exact and HNSW, one and several segments, one and
/// two stores, one and several rows.
fn engine_steps() -> Report {
    let tmp = tempfile::tempdir().unwrap();
    let one_segment = store(&tmp.path().join("one"), 1, 1, 3000);
    let three_segments = store(&tmp.path().join("three"), 2, 3, 1000);
    let opts = |mode| AdjustOptions {
        params: RuleParams {
            k: K,
            ..RuleParams::default()
        },
        mode,
    };
    let steps = STEPS;
    let mut report = Vec::new();
    for (search, search_name) in [
        (SearchParams::exact(), "exact"),
        (SearchParams::hnsw(Some(64)), "hnsw"),
    ] {
        for (toxic, nontoxic, toxic_segments, stores_name) in [
            (&one_segment, &three_segments, 1, "1+3 segments"),
            (&three_segments, &one_segment, 3, "3+1 segments"),
        ] {
            let detox = Detoxifier::goodtriever(
                toxic.clone(),
                nontoxic.clone(),
                opts(Mode::Ensemble),
                search,
                Some(VOCAB),
            )
            .unwrap();
            for mode in [Mode::ToxicOnly, Mode::Ensemble] {
                let o = opts(mode);
                for rows in [1, 4] {
                    let hidden = queries(rows);
                    let logits: Vec<f32> = (0..rows * VOCAB).map(|i| (i % 13) as f32).collect();
                    let mut scratch = DetoxScratch::default();
                    let mut sparse = Vec::new();
                    let mut dense = vec![0.0; rows * VOCAB];
                    let case = format!("{search_name}, {stores_name}, {mode:?}, {rows} rows");
                    // Two stores, several segments or several rows are searched in parallel.
                    let fans_out = mode == Mode::Ensemble || toxic_segments > 1 || rows > 1;
                    let n = allocations(steps, || {
                        detox
                            .adjust_sparse(&hidden, &o, &mut scratch, &mut sparse)
                            .unwrap();
                    });
                    report.push((format!("sparse, {case}"), fans_out, n));
                    let n = allocations(steps, || {
                        detox
                            .adjust_dense(&hidden, &logits, &o, &mut scratch, &mut dense)
                            .unwrap();
                    });
                    report.push((format!("dense, {case}"), fans_out, n));
                    // Skipping decides from the logits, over the whole distribution or inside
                    // the rule's nucleus (a copy of each row into the chunk's scratch).
                    if mode == Mode::Ensemble {
                        for in_nucleus in [false, true] {
                            let mut skipping = o;
                            skipping.params.skip = 0.05;
                            skipping.params.skip_in_nucleus = in_nucleus;
                            let n = allocations(steps, || {
                                detox
                                    .adjust_dense(
                                        &hidden,
                                        &logits,
                                        &skipping,
                                        &mut scratch,
                                        &mut dense,
                                    )
                                    .unwrap();
                            });
                            report.push((
                                format!("dense skipping (in nucleus: {in_nucleus}), {case}"),
                                true,
                                n,
                            ));
                        }
                    }
                    // Reusing neighbours: each step follows the successors of the last one's
                    // (a generous setting, so that both reused and searched rows occur).
                    let mut reusing = DetoxScratch::default();
                    reusing
                        .set_reuse(Some(ReuseParams {
                            min: 0.01,
                            radius: 4.0,
                            audit: false,
                        }))
                        .unwrap();
                    detox
                        .adjust_dense(&hidden, &logits, &o, &mut reusing, &mut dense)
                        .unwrap();
                    let first = detox.searched_stores(mode).unwrap().start;
                    let tokens: Vec<u32> = (0..rows)
                        .map(|r| detox.last_neighbours(&reusing, first, r).unwrap()[0].value)
                        .collect();
                    let n = allocations(steps, || {
                        reusing.advance(&tokens);
                        detox
                            .adjust_dense(&hidden, &logits, &o, &mut reusing, &mut dense)
                            .unwrap();
                    });
                    assert!(
                        reusing.reuse_stats().reused > 0,
                        "{case}: the reuse case never reused"
                    );
                    report.push((format!("dense with reuse, {case}"), true, n));
                }
            }
        }
    }
    report
}
