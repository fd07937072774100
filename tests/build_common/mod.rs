//! Shared helpers of the datastore-builder tests: a tiny random llama written by the test
//! (the model runtime's own `write_tiny_llama`, so no download), deterministic texts, the
//! binary, and raw readers of a store's committed rows that bypass the datastore API (so the
//! tests check the files, not the code that wrote them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use goodtriever::model::testing::{write_tiny_llama, TinySpec};

/// Writes the tiny model with hidden size `hidden` into `dir` and returns its path.
pub fn tiny_model(dir: &Path, hidden: usize) -> PathBuf {
    let path = dir.join(format!("tiny-{hidden}.gguf"));
    let spec = TinySpec {
        hidden,
        n_heads: 4,
        n_kv_heads: 2,
        ..TinySpec::default()
    };
    write_tiny_llama(&path, &spec).expect("write tiny model");
    path
}

/// `n` deterministic documents of varied length (3–20 words) over a small vocabulary.
pub fn texts(n: usize, seed: u64) -> Vec<String> {
    const WORDS: [&str; 16] = [
        "hello", "the", "world", "cat", "sat", "on", "mat", "rain", "over", "hill", "bright",
        "stone", "river", "quiet", "moon", "road",
    ];
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = move || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (s >> 33) as usize
    };
    (0..n)
        .map(|_| {
            let len = 3 + next() % 18;
            (0..len)
                .map(|_| WORDS[next() % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Writes `texts` as jsonl with a `toxicity` label (alternating 0.9 / 0.05).
pub fn write_jsonl(path: &Path, texts: &[String]) {
    let mut out = String::new();
    for (i, t) in texts.iter().enumerate() {
        let label = if i % 2 == 0 { 0.9 } else { 0.05 };
        out.push_str(&serde_json::json!({"text": t, "toxicity": label}).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_goodtriever"))
}

/// Runs the binary with `args`; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().expect("run goodtriever");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One committed segment as the files say.
#[derive(Clone, Debug, PartialEq)]
pub struct RawSegment {
    pub id: u64,
    pub retired: bool,
    pub keys: Vec<f32>,
    pub values: Vec<u32>,
}

/// Reads every segment listed in `dir/manifest.json` straight from `keys.bin` (f32 or f16)
/// and `values.bin`.
pub fn raw_segments(dir: &Path) -> Vec<RawSegment> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let f16 = m["dtype"] == "f16";
    m["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let id = s["id"].as_u64().unwrap();
            let seg = dir.join("segments").join(id.to_string());
            let kb = std::fs::read(seg.join("keys.bin")).unwrap();
            let keys = if f16 {
                kb.chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            } else {
                kb.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            };
            let values = std::fs::read(seg.join("values.bin"))
                .unwrap()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            RawSegment {
                id,
                retired: s["retired"].as_bool().unwrap_or(false),
                keys,
                values,
            }
        })
        .collect()
}

/// Keys and values of the live rows, in id order.
pub fn live_rows(dir: &Path) -> (Vec<f32>, Vec<u32>) {
    let mut k = Vec::new();
    let mut v = Vec::new();
    for s in raw_segments(dir).into_iter().filter(|s| !s.retired) {
        k.extend(s.keys);
        v.extend(s.values);
    }
    (k, v)
}
