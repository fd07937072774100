//! Speed of the model runtime on the real default model, per weight format: prefill tokens/s
//! (batch 1 and 8, 128-token prompts), decode tokens/s (batch 1 and 25, the paper's samples
//! per prompt) and batched key extraction tokens/s (datastore building).
//!
//! `cargo bench --bench model` (after `goodtriever model fetch`). A plain timing program, not
//! criterion: each figure is the median of a few repetitions of a whole workload, which is
//! what a user of the CLI sees. Knobs (environment):
//! - `GOODTRIEVER_BENCH_FORMATS`: comma-separated subset of `native,q8_0,f32` (default all);
//! - `GOODTRIEVER_BENCH_REPS`: repetitions per figure (default 3);
//! - `GOODTRIEVER_BENCH_QUICK=1`: only decode at batch 1 and extraction.
//!
//! Compare with llama.cpp on the same file: `scripts/bench/bench_llamacpp.py`.

use std::time::Instant;

use goodtriever::fingerprint::KeyType;
use goodtriever::model::fetch::default_model_path;
use goodtriever::model::{ForwardOutput, Model, Outputs, WeightFormat};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    // Ordinary English token ids (no control tokens), varied per row.
    (0..n as u32)
        .map(|i| 300 + (i * 7919 + salt * 104_729) % 40_000)
        .collect()
}

/// Seconds to prefill `batch` rows of `len` tokens.
fn prefill(model: &Model, batch: usize, len: usize) -> f64 {
    let flat: Vec<u32> = (0..batch).flat_map(|b| tokens(len, b as u32)).collect();
    let mut cache = model.new_cache(batch);
    let t = Instant::now();
    model
        .forward(
            &flat,
            batch,
            &mut cache,
            Outputs::last(KeyType::FinalHidden),
        )
        .unwrap();
    t.elapsed().as_secs_f64()
}

/// Seconds per decoding step for `batch` rows after a 16-token prompt, over `steps` steps.
fn decode(model: &Model, batch: usize, steps: usize) -> f64 {
    let prompt = tokens(16, 1);
    let mut cache = model.new_cache(1);
    let mut out = ForwardOutput::default();
    let o = Outputs::last(KeyType::LastFfnInput);
    model
        .forward_into(&prompt, 1, &mut cache, o, &mut out)
        .unwrap();
    cache.select_rows(&vec![0; batch]).unwrap();
    let mut next = vec![500u32; batch];
    let t = Instant::now();
    for s in 0..steps {
        model
            .forward_into(&next, batch, &mut cache, o, &mut out)
            .unwrap();
        next.iter_mut()
            .enumerate()
            .for_each(|(r, x)| *x = 300 + ((s * 31 + r * 17) % 30_000) as u32);
    }
    t.elapsed().as_secs_f64() / steps as f64
}

/// Keyed positions per second for datastore building: windows of 256, stride 128... and the
/// configuration datastore building uses (window 128, stride 128, batch 8).
fn extract(model: &Model, n_tokens: usize, window: usize, stride: usize, batch: usize) -> f64 {
    let stream = tokens(n_tokens, 3);
    let mut pairs = 0usize;
    let t = Instant::now();
    model
        .encode_pairs(
            &stream,
            window,
            stride,
            KeyType::LastFfnInput,
            batch,
            |_, _| pairs += 1,
        )
        .unwrap();
    pairs as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let path = match default_model_path() {
        Ok(p) if p.is_file() => p,
        _ => {
            eprintln!("no default model: run `goodtriever model fetch` first");
            return;
        }
    };
    let formats: Vec<WeightFormat> = std::env::var("GOODTRIEVER_BENCH_FORMATS")
        .unwrap_or_else(|_| "native,q8_0,f32".into())
        .split(',')
        .map(|s| s.trim().parse().expect("native, q8_0 or f32"))
        .collect();
    let reps: usize = std::env::var("GOODTRIEVER_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let quick = std::env::var("GOODTRIEVER_BENCH_QUICK").is_ok_and(|v| v == "1");
    println!(
        "model {} | {} threads | {} repetitions, medians",
        path.display(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        reps
    );
    println!(
        "{:<7} {:>14} {:>14} {:>17} {:>17} {:>16}",
        "format", "prefill b1", "prefill b8", "decode b1", "decode b25", "extract b8"
    );
    for format in formats {
        let t = Instant::now();
        let model = Model::load(&path, format).unwrap();
        let load_s = t.elapsed().as_secs_f64();
        // Warm-up: allocators, thread pools, repacked weights.
        prefill(&model, 1, 16);
        decode(&model, 1, 3);
        let rep = |f: &dyn Fn() -> f64| median((0..reps).map(|_| f()).collect());
        let (p1, p8, d25) = if quick {
            (f64::NAN, f64::NAN, f64::NAN)
        } else {
            (
                128.0 / rep(&|| prefill(&model, 1, 128)),
                8.0 * 128.0 / rep(&|| prefill(&model, 8, 128)),
                rep(&|| decode(&model, 25, 16)),
            )
        };
        let d1 = rep(&|| decode(&model, 1, 32));
        let ex = rep(&|| extract(&model, 4096, 128, 128, 8));
        println!(
            "{:<7} {:>8.0} tok/s {:>8.0} tok/s {:>6.1} ms {:>4.0} t/s {:>6.1} ms {:>4.0} t/s {:>10.0} tok/s   (load {:.1} s)",
            format.as_str(),
            p1,
            p8,
            d1 * 1e3,
            1.0 / d1,
            d25 * 1e3,
            25.0 / d25,
            ex,
            load_s
        );
    }
}
