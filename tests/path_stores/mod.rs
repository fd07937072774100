//! Stores made of noisy copies of one path through key space, shared by the tests of reusing
//! neighbours (in-process and over a gRPC stream).
//!
//! Each copy is a document whose row `t` predicts token `t`: a sequence walking the path finds
//! the copies of its position as nearest rows, and after emitting token `t` their successors
//! are the copies of `t + 1`, the nearest rows of the next step.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use goodtriever::datastore::{
    CreateOptions, Datastore, KeyDtype, Keys, Provenance, RowSources, SourceSpan,
};
use goodtriever::detox::AdjustOptions;
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::rule::{Mode, RuleParams};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

pub const DIM: usize = 8;
pub const VOCAB: usize = 64;
/// Positions along the path, and copies of it (documents) per store.
pub const LEN: usize = 20;
pub const COPIES: usize = 6;

/// The path: a walk with unit steps, so consecutive positions are far apart next to the
/// copies' noise.
pub fn path() -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut x = vec![0.0f32; DIM];
    (0..LEN)
        .map(|_| {
            for v in &mut x {
                *v += if rng.random_range(0..2) == 0 {
                    1.0
                } else {
                    -1.0
                };
            }
            x.clone()
        })
        .collect()
}

/// The token row `t` of every copy predicts.
pub fn token(t: usize) -> u32 {
    t as u32 + 1
}

/// A store of `COPIES` noisy copies of the path, one document each, with sources unless
/// `sources` is false (like an imported store).
pub fn store(dir: &Path, seed: u64, sources: bool) -> Arc<Datastore> {
    let mut fp = ModelFingerprint::named("tiny", DIM);
    fp.vocab_size = Some(VOCAB);
    let s = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: fp,
            key_type: KeyType::FinalHidden,
            dtype: KeyDtype::F32,
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut keys, mut values, mut spans, mut documents) = (vec![], vec![], vec![], vec![]);
    for c in 0..COPIES {
        let text: String = (0..LEN).map(|t| format!("w{t} ")).collect();
        let mut at = 0u32;
        for (t, x) in path().iter().enumerate() {
            keys.extend(x.iter().map(|v| v + rng.random_range(-0.05f32..0.05)));
            values.push(token(t));
            let w = format!("w{t} ").len() as u32;
            spans.push(SourceSpan {
                document: c as u32,
                start: at,
                end: at + w - 1,
            });
            at += w;
        }
        documents.push(text);
    }
    let sources = sources.then_some(RowSources { documents, spans });
    s.append_with_sources(
        Keys::F32(&keys),
        &values,
        Provenance::new("test"),
        sources,
        &|_| {},
    )
    .unwrap();
    Arc::new(s)
}

/// Queries on the path at positions `ts`, off every copy.
pub fn at(ts: &[usize]) -> Vec<f32> {
    let p = path();
    ts.iter()
        .flat_map(|&t| p[t].iter().map(|v| v + 0.01))
        .collect()
}

pub fn logits(rows: usize) -> Vec<f32> {
    (0..rows * VOCAB).map(|i| (i % 11) as f32 * 0.3).collect()
}

/// The paper's rule over both path stores, k = one neighbour per copy.
pub fn opts() -> AdjustOptions {
    AdjustOptions {
        params: RuleParams {
            k: COPIES,
            ..RuleParams::default()
        },
        mode: Mode::Ensemble,
    }
}
