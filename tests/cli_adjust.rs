//! `goodtriever adjust` end to end: .npy in, the engine's answer out, and clear refusals.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::npy;
use goodtriever::rule::{RuleParams, SparseRow};

const DIM: usize = 8;
const VOCAB: usize = 30;

fn make_store(dir: &Path, seed: u32, tokens: u32) -> Arc<Datastore> {
    let mut fp = ModelFingerprint::named("tiny", DIM);
    fp.vocab_size = Some(VOCAB);
    let s = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: fp,
            key_type: KeyType::FinalHidden,
            dtype: KeyDtype::F16,
        },
    )
    .unwrap();
    let rows = 200u32;
    let keys: Vec<f32> = (0..rows * DIM as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 100.0)
        .collect();
    let values: Vec<u32> = (0..rows).map(|i| (i * 7 + seed) % tokens).collect();
    s.append(Keys::F32(&keys), &values, Provenance::new("test"))
        .unwrap();
    Arc::new(s)
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_goodtriever"))
}

#[test]
fn dense_and_sparse_outputs_equal_the_in_process_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let toxic = make_store(&p.join("tox"), 1, 15);
    let nontoxic = make_store(&p.join("non"), 2, 30);
    let rows = 3;
    let hidden: Vec<f32> = (0..rows * DIM).map(|i| (i % 11) as f32 / 2.0).collect();
    let logits: Vec<f32> = (0..rows * VOCAB)
        .map(|i| ((i * 37) % 17) as f32 / 4.0)
        .collect();
    npy::write_f32(&p.join("h.npy"), rows, DIM, &hidden).unwrap();
    npy::write_f32(&p.join("z.npy"), rows, VOCAB, &logits).unwrap();

    let args = ["--k", "16", "--temperature", "10", "--exact"];
    let status = bin()
        .args(["adjust", "--toxic"])
        .arg(p.join("tox"))
        .arg("--nontoxic")
        .arg(p.join("non"))
        .arg("--hidden")
        .arg(p.join("h.npy"))
        .arg("--logits")
        .arg(p.join("z.npy"))
        .arg("--out")
        .arg(p.join("out.npy"))
        .args(args)
        .status()
        .unwrap();
    assert!(status.success());
    let status = bin()
        .args(["adjust", "--toxic"])
        .arg(p.join("tox"))
        .arg("--nontoxic")
        .arg(p.join("non"))
        .arg("--hidden")
        .arg(p.join("h.npy"))
        .arg("--out")
        .arg(p.join("out.jsonl"))
        .args(args)
        .status()
        .unwrap();
    assert!(status.success());

    let opts = AdjustOptions {
        params: RuleParams {
            k: 16,
            temperature: 10.0,
            ..RuleParams::default()
        },
        ..AdjustOptions::default()
    };
    let detox =
        Detoxifier::goodtriever(toxic, nontoxic, opts, SearchParams::exact(), None).unwrap();
    let mut scratch = DetoxScratch::default();
    let mut want_dense = vec![0.0; rows * VOCAB];
    detox
        .adjust_dense(&hidden, &logits, &opts, &mut scratch, &mut want_dense)
        .unwrap();
    let (r, v, got_dense) = npy::read_queries(&p.join("out.npy")).unwrap();
    assert_eq!((r, v), (rows, VOCAB));
    assert_eq!(got_dense, want_dense);

    let mut want_sparse = Vec::new();
    detox
        .adjust_sparse(&hidden, &opts, &mut scratch, &mut want_sparse)
        .unwrap();
    let text = std::fs::read_to_string(p.join("out.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rows);
    for (row, (line, want)) in lines.iter().zip(&want_sparse).enumerate() {
        let SparseRow::Bias { scale, pairs } = want else {
            panic!()
        };
        assert_eq!(line["row"], row);
        assert_eq!(line["scale"].as_f64().unwrap() as f32, *scale);
        let got: Vec<(u32, f32)> = serde_json::from_value(line["bias"].clone()).unwrap();
        assert_eq!(&got, pairs);
    }
}

#[test]
fn mismatched_inputs_fail_with_a_message_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    make_store(&p.join("tox"), 1, 15);
    make_store(&p.join("non"), 2, 30);
    npy::write_f32(&p.join("h.npy"), 2, DIM + 1, &[0.5; 2 * (DIM + 1)]).unwrap();
    let out = bin()
        .args(["adjust", "--toxic"])
        .arg(p.join("tox"))
        .arg("--nontoxic")
        .arg(p.join("non"))
        .arg("--hidden")
        .arg(p.join("h.npy"))
        .arg("--out")
        .arg(p.join("out.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("9") && err.contains("8"),
        "names both sizes: {err}"
    );
    assert!(!p.join("out.jsonl").exists());

    let out = bin()
        .args(["adjust", "--toxic"])
        .arg(p.join("tox"))
        .arg("--hidden")
        .arg(p.join("h.npy"))
        .arg("--out")
        .arg(p.join("out.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nontoxic"));

    let out = bin()
        .args(["adjust", "--toxic"])
        .arg(p.join("tox"))
        .arg("--nontoxic")
        .arg(p.join("non"))
        .arg("--hidden")
        .arg(p.join("h.npy"))
        .args(["--temperature", "0", "--out"])
        .arg(p.join("out.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}
