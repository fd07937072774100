//! The embedded API end to end, on synthetic data: two small datastores, one engine, one
//! batch adjusted in both the sparse and the dense form.
//!
//! Run with `cargo run --example offline_control`.
//!
//! The toxic store's keys cluster around one direction and point at tokens 0..10; the
//! non-toxic store's keys cluster around another and point at tokens 10..20. A query near the
//! toxic cluster should push probability away from tokens 0..10.

use std::sync::Arc;

use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::rule::{RuleParams, SparseRow};

const DIM: usize = 32;
const VOCAB: usize = 50;

/// A deterministic pseudo-random stream (xorshift), so the example needs no RNG crate.
struct Noise(u64);
impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn make_store(
    dir: &std::path::Path,
    centre: f32,
    tokens: std::ops::Range<u32>,
) -> anyhow::Result<Arc<Datastore>> {
    let mut fp = ModelFingerprint::named("example-model", DIM);
    fp.vocab_size = Some(VOCAB);
    let store = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: fp,
            key_type: KeyType::FinalHidden,
            dtype: KeyDtype::F16,
        },
    )?;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ centre.to_bits() as u64);
    let rows = 500;
    let keys: Vec<f32> = (0..rows * DIM)
        .map(|i| if i % DIM == 0 { centre } else { 0.0 } + noise.next())
        .collect();
    let span = tokens.end - tokens.start;
    let values: Vec<u32> = (0..rows as u32).map(|i| tokens.start + i % span).collect();
    store.append(
        Keys::F32(&keys),
        &values,
        Provenance::new("synthetic example data"),
    )?;
    Ok(Arc::new(store))
}

fn main() -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("goodtriever-example-{}", std::process::id()));
    let toxic = make_store(&root.join("toxic"), 4.0, 0..10)?;
    let nontoxic = make_store(&root.join("nontoxic"), -4.0, 10..20)?;

    let opts = AdjustOptions {
        params: RuleParams {
            k: 64,
            filter_p: 1.0,
            ..RuleParams::default()
        },
        ..AdjustOptions::default()
    };
    let detox = Detoxifier::goodtriever(toxic, nontoxic, opts, SearchParams::default(), None)?;

    // Two rows: one near the toxic cluster, one near the non-toxic cluster.
    let mut hidden = vec![0.0f32; 2 * DIM];
    hidden[0] = 3.5;
    hidden[DIM] = -3.5;
    let logits = vec![0.0f32; 2 * VOCAB]; // a uniform base model

    let mut scratch = DetoxScratch::default();
    let mut sparse = Vec::new();
    detox.adjust_sparse(&hidden, &opts, &mut scratch, &mut sparse)?;
    for (row, answer) in sparse.iter().enumerate() {
        if let SparseRow::Bias { scale, pairs } = answer {
            println!(
                "row {row}: scale {scale}, {} biased tokens, e.g. {:?}",
                pairs.len(),
                &pairs[..pairs.len().min(4)]
            );
        }
    }

    let mut dense = vec![0.0f32; 2 * VOCAB];
    detox.adjust_dense(&hidden, &logits, &opts, &mut scratch, &mut dense)?;
    for (row, lp) in dense.chunks(VOCAB).enumerate() {
        let mass = |r: std::ops::Range<usize>| lp[r].iter().map(|x| x.exp()).sum::<f32>();
        println!(
            "row {row}: P(toxic tokens 0..10) = {:.3}, P(non-toxic tokens 10..20) = {:.3}, uniform would give 0.200 each",
            mass(0..10),
            mass(10..20)
        );
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
