//! The model runtime on a tiny random llama written by the test itself (no download):
//! agreement with candle-transformers' reference llama, KV-cache and batch equivalence, key
//! capture at the right place, weight formats, tokenizer, datastore pair extraction, errors.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use goodtriever::fingerprint::KeyType;
use goodtriever::model::testing::{write_tiny_llama, TinySpec, TINY_SPECIALS};
use goodtriever::model::{Model, ModelError, Outputs, Positions, WeightFormat};

fn tiny(dir: &Path, name: &str, spec: &TinySpec) -> PathBuf {
    let path = dir.join(name);
    write_tiny_llama(&path, spec).unwrap();
    path
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn all_outputs(key_type: KeyType) -> Outputs {
    Outputs {
        logits: Positions::All,
        keys: Positions::All,
        key_type,
    }
}

const PROMPT: [u32; 7] = [40, 77, 12, 200, 5, 99, 150];

#[test]
fn forward_returns_the_shapes_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &tiny(dir.path(), "m.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    let cfg = model.config().clone();
    assert_eq!(
        (cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads),
        (64, 2, 4, 2)
    );
    assert_eq!(cfg.vocab_size, model.tokenizer().vocab_size());
    let mut cache = model.new_cache(2);
    let tokens: Vec<u32> = PROMPT.iter().chain(PROMPT.iter()).copied().collect();
    let out = model
        .forward(&tokens, 2, &mut cache, all_outputs(KeyType::FinalHidden))
        .unwrap();
    assert_eq!(
        (out.batch, out.logit_positions, out.key_positions),
        (2, 7, 7)
    );
    assert_eq!(out.logits.len(), 2 * 7 * cfg.vocab_size);
    assert_eq!(out.keys.len(), 2 * 7 * cfg.hidden_size);
    assert_eq!(cache.len(), 7);
    let out = model
        .forward(&[1, 2], 2, &mut cache, Outputs::last(KeyType::LastFfnInput))
        .unwrap();
    assert_eq!((out.logit_positions, out.key_positions), (1, 1));
    assert_eq!(out.logits.len(), 2 * cfg.vocab_size);
    assert_eq!(cache.len(), 8);
    let out = model
        .forward(
            &[3, 4],
            2,
            &mut cache,
            Outputs::keys_only(KeyType::LastFfnInput),
        )
        .unwrap();
    assert!(out.logits.is_empty());
    assert_eq!(out.keys.len(), 2 * cfg.hidden_size);
}

fn reference(path: &Path) -> ModelWeights {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap()
}

/// F32 weights: the same function to float precision. Quantised weights run on our own
/// kernels (equal to candle's per matmul up to f16 rounding of activation block sums, see
/// `model::quant`), which this random network amplifies to under 2% of the largest logit.
fn tol(dtype: GgmlDType, logits: &[f32]) -> f32 {
    if dtype == GgmlDType::F32 {
        1e-4
    } else {
        0.02 * logits.iter().fold(0f32, |m, v| m.max(v.abs()))
    }
}

#[test]
fn logits_equal_candle_transformers_quantized_llama() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (dtype, tied)) in [
        (GgmlDType::F32, true),
        (GgmlDType::Q4_1, true),
        (GgmlDType::Q8_0, false),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = TinySpec {
            matrix_dtype: dtype,
            embedding_dtype: if dtype == GgmlDType::F32 {
                GgmlDType::F32
            } else {
                GgmlDType::Q8_0
            },
            tied,
            ..TinySpec::default()
        };
        let path = tiny(dir.path(), &format!("m{i}.gguf"), &spec);
        let model = Model::load(&path, WeightFormat::Native).unwrap();
        let mut theirs = reference(&path);
        let mut cache = model.new_cache(1);
        // Prefill, then two single-token steps: both must match at every call.
        let ours = model
            .forward(&PROMPT, 1, &mut cache, Outputs::last(KeyType::FinalHidden))
            .unwrap();
        let x = Tensor::new(&PROMPT[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want: Vec<f32> = theirs
            .forward(&x, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = max_abs_diff(&ours.logits, &want);
        assert!(
            d < tol(dtype, &want),
            "{dtype:?}: prefill logits differ by {d}"
        );
        for (step, tok) in [17u32, 201].into_iter().enumerate() {
            let ours = model
                .forward(&[tok], 1, &mut cache, Outputs::last(KeyType::FinalHidden))
                .unwrap();
            let x = Tensor::new(&[tok], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want: Vec<f32> = theirs
                .forward(&x, PROMPT.len() + step)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let d = max_abs_diff(&ours.logits, &want);
            assert!(
                d < tol(dtype, &want),
                "{dtype:?}: step {step} logits differ by {d}"
            );
        }
    }
}

#[test]
fn step_by_step_decoding_equals_one_full_forward() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &tiny(dir.path(), "m.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    for key_type in KeyType::ALL {
        let mut full_cache = model.new_cache(1);
        let full = model
            .forward(&PROMPT, 1, &mut full_cache, all_outputs(key_type))
            .unwrap();
        let mut cache = model.new_cache(1);
        let first = model
            .forward(&PROMPT[..3], 1, &mut cache, all_outputs(key_type))
            .unwrap();
        for p in 0..3 {
            assert!(max_abs_diff(first.logits_at(0, p), full.logits_at(0, p)) < 1e-4);
            assert!(max_abs_diff(first.key_at(0, p), full.key_at(0, p)) < 1e-4);
        }
        for (p, &tok) in PROMPT.iter().enumerate().skip(3) {
            let step = model
                .forward(&[tok], 1, &mut cache, Outputs::last(key_type))
                .unwrap();
            let dl = max_abs_diff(step.logits_at(0, 0), full.logits_at(0, p));
            let dk = max_abs_diff(step.key_at(0, 0), full.key_at(0, p));
            assert!(
                dl < 1e-4 && dk < 1e-4,
                "{key_type} position {p}: logits {dl}, keys {dk}"
            );
        }
    }
}

#[test]
fn a_row_in_a_padded_batch_equals_the_row_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &tiny(dir.path(), "m.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    let rows: [&[u32]; 3] = [&PROMPT, &[9, 8, 7], &[100, 101, 102, 103, 104]];
    let (flat, pad) = model.pad_left(&rows);
    assert_eq!(pad, vec![0, 4, 2]);
    let mut cache = model.new_cache(3);
    cache.set_left_padding(&pad).unwrap();
    let batched = model
        .forward(&flat, 3, &mut cache, all_outputs(KeyType::LastFfnInput))
        .unwrap();
    let next = [5u32, 6, 7];
    let batched_step = model
        .forward(&next, 3, &mut cache, Outputs::last(KeyType::LastFfnInput))
        .unwrap();
    for (r, row) in rows.iter().enumerate() {
        let mut alone_cache = model.new_cache(1);
        let alone = model
            .forward(row, 1, &mut alone_cache, all_outputs(KeyType::LastFfnInput))
            .unwrap();
        for p in 0..row.len() {
            let dl = max_abs_diff(batched.logits_at(r, pad[r] + p), alone.logits_at(0, p));
            let dk = max_abs_diff(batched.key_at(r, pad[r] + p), alone.key_at(0, p));
            assert!(
                dl < 1e-4 && dk < 1e-4,
                "row {r} position {p}: logits {dl}, keys {dk}"
            );
        }
        let step = model
            .forward(
                &[next[r]],
                1,
                &mut alone_cache,
                Outputs::last(KeyType::LastFfnInput),
            )
            .unwrap();
        assert!(max_abs_diff(batched_step.logits_at(r, 0), step.logits_at(0, 0)) < 1e-4);
        assert!(max_abs_diff(batched_step.key_at(r, 0), step.key_at(0, 0)) < 1e-4);
    }
    assert!(model.new_cache(2).set_left_padding(&[1]).is_err());
}

/// Long chunks (prefill, datastore building) take the blocked attention path and decoding
/// steps the direct one: a padded batch of long rows, continued in a second long chunk, must
/// give what each row alone gives one token at a time.
#[test]
fn long_padded_chunks_equal_token_by_token_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &tiny(dir.path(), "m.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    let row = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 37 + salt * 11) % 250 + 3)
            .collect()
    };
    // Longer than one query block (64) and with a padded row, then a second chunk of 70.
    let rows = [row(150, 1), row(90, 2)];
    let refs: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
    let (flat, pad) = model.pad_left(&refs);
    assert_eq!(pad, vec![0, 60]);
    let more = [row(70, 3), row(70, 4)];
    let mut cache = model.new_cache(2);
    cache.set_left_padding(&pad).unwrap();
    let o = all_outputs(KeyType::LastFfnInput);
    let first = model.forward(&flat, 2, &mut cache, o).unwrap();
    let flat_more: Vec<u32> = more.iter().flatten().copied().collect();
    let second = model.forward(&flat_more, 2, &mut cache, o).unwrap();
    for r in 0..2 {
        let mut alone = model.new_cache(1);
        let tokens: Vec<u32> = rows[r].iter().chain(&more[r]).copied().collect();
        for (p, &t) in tokens.iter().enumerate() {
            let step = model
                .forward(&[t], 1, &mut alone, Outputs::last(KeyType::LastFfnInput))
                .unwrap();
            let (chunk, at) = if p < rows[r].len() {
                (&first, pad[r] + p)
            } else {
                (&second, p - rows[r].len())
            };
            let dl = max_abs_diff(step.logits_at(0, 0), chunk.logits_at(r, at));
            let dk = max_abs_diff(step.key_at(0, 0), chunk.key_at(r, at));
            assert!(
                dl < 1e-4 && dk < 1e-4,
                "row {r} position {p}: logits {dl}, keys {dk}"
            );
        }
    }
}

/// Reads an F32 tensor of the tiny file as a flat vector.
fn weight(path: &Path, name: &str) -> Vec<f32> {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    ct.tensor(&mut f, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm(x: &[f32], g: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + 1e-5).sqrt();
    x.iter().zip(g).map(|(v, g)| v * s * g).collect()
}

#[test]
fn keys_are_captured_at_the_last_ffn_input_and_the_final_norm() {
    // One layer, one token: attention over a single position returns V, so the whole forward
    // can be written out by hand from the file's weights.
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(
        dir.path(),
        "one.gguf",
        &TinySpec {
            n_layers: 1,
            ..TinySpec::default()
        },
    );
    let model = Model::load(&path, WeightFormat::Native).unwrap();
    let d = model.config().hidden_size;
    let tok = 77usize;
    let w = |n: &str| weight(&path, n);
    let e = w("token_embd.weight")[tok * d..(tok + 1) * d].to_vec();
    let xn = rms_norm(&e, &w("blk.0.attn_norm.weight"));
    let v = matvec(&w("blk.0.attn_v.weight"), &xn);
    // Each query head reads the V of its KV head.
    let (h, hkv, hd) = (
        model.config().n_heads,
        model.config().n_kv_heads,
        model.config().head_dim,
    );
    let y: Vec<f32> = (0..h)
        .flat_map(|q| v[(q / (h / hkv)) * hd..(q / (h / hkv) + 1) * hd].to_vec())
        .collect();
    let x1: Vec<f32> = matvec(&w("blk.0.attn_output.weight"), &y)
        .iter()
        .zip(&e)
        .map(|(a, b)| a + b)
        .collect();
    let ffn_in = rms_norm(&x1, &w("blk.0.ffn_norm.weight"));
    let gate = matvec(&w("blk.0.ffn_gate.weight"), &ffn_in);
    let up = matvec(&w("blk.0.ffn_up.weight"), &ffn_in);
    let act: Vec<f32> = gate
        .iter()
        .zip(&up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let x2: Vec<f32> = matvec(&w("blk.0.ffn_down.weight"), &act)
        .iter()
        .zip(&x1)
        .map(|(a, b)| a + b)
        .collect();
    let fin = rms_norm(&x2, &w("output_norm.weight"));

    for (key_type, want) in [
        (KeyType::LastFfnInput, &ffn_in),
        (KeyType::FinalHidden, &fin),
    ] {
        let mut cache = model.new_cache(1);
        let out = model
            .forward(&[tok as u32], 1, &mut cache, Outputs::last(key_type))
            .unwrap();
        let diff = max_abs_diff(out.key_at(0, 0), want);
        assert!(diff < 1e-4, "{key_type}: {diff}");
        // Keys-only calls (which skip the LM head and, for last_ffn_input, the last MLP) agree.
        let mut cache = model.new_cache(1);
        let only = model
            .forward(&[tok as u32], 1, &mut cache, Outputs::keys_only(key_type))
            .unwrap();
        assert!(max_abs_diff(only.key_at(0, 0), want) < 1e-4);
    }
    assert!(
        max_abs_diff(&ffn_in, &fin) > 1e-2,
        "the two key types must differ"
    );
}

#[test]
fn final_hidden_times_tied_embeddings_gives_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &tiny(dir.path(), "m.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    let mut cache = model.new_cache(1);
    let out = model
        .forward(&PROMPT, 1, &mut cache, all_outputs(KeyType::FinalHidden))
        .unwrap();
    let emb = model.embeddings().to_vec();
    for p in [0, 3, 6] {
        let logits = matvec(&emb, out.key_at(0, p));
        assert!(max_abs_diff(&logits, out.logits_at(0, p)) < 1e-3);
    }
}

#[test]
fn converted_weight_formats_stay_close_to_native() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        matrix_dtype: GgmlDType::Q4_1,
        embedding_dtype: GgmlDType::Q8_0,
        ..TinySpec::default()
    };
    let path = tiny(dir.path(), "q.gguf", &spec);
    let native = Model::load(&path, WeightFormat::Native).unwrap();
    let text: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 250 + 3).collect();
    let base = native.token_logprobs(&text).unwrap();
    assert_eq!(base.len(), text.len() - 1);
    assert!(base.iter().all(|l| l.is_finite() && *l <= 0.0));
    for format in [WeightFormat::F32, WeightFormat::Q8_0] {
        let m = Model::load(&path, format).unwrap();
        assert_eq!(
            m.fingerprint(),
            native.fingerprint(),
            "the fingerprint ignores the format"
        );
        let lp = m.token_logprobs(&text).unwrap();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let d = (mean(&lp) - mean(&base)).abs();
        // No path is exact: the native Q4_1 kernel quantises activations to Q8_1, F32 does
        // not, Q8_0 re-quantises the weights. All must stay close.
        assert!(d < 0.05, "{format}: mean log-prob moved by {d}");
        assert!(d > 0.0, "{format}: the conversion did nothing");
    }
}

#[test]
fn fingerprint_identifies_model_vocabulary_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let a = Model::load(
        &tiny(dir.path(), "a.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    let b = Model::load(
        &tiny(
            dir.path(),
            "b.gguf",
            &TinySpec {
                seed: 7,
                ..TinySpec::default()
            },
        ),
        WeightFormat::Native,
    )
    .unwrap();
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    assert_eq!(fa.model_id, "tiny-test-llama");
    assert_eq!(fa.architecture.as_deref(), Some("llama"));
    assert_eq!(
        (fa.hidden_size, fa.vocab_size),
        (64, Some(a.config().vocab_size))
    );
    assert_eq!(fa.tokenizer_digest, fb.tokenizer_digest);
    assert_eq!(fa.tokenizer_digest.as_ref().unwrap().len(), 64);
    assert_ne!(fa.weight_digest, fb.weight_digest);
    assert!(fa
        .check_compatible(&fb)
        .unwrap_err()
        .contains("weight digest"));
    let info = a.info();
    assert_eq!(info.tensor_types.values().sum::<usize>(), 2 + 2 * 9);
}

#[test]
fn tokenizer_round_trips_and_knows_its_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &tiny(dir.path(), "m.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    let tok = model.tokenizer();
    for text in [
        "hello the world",
        "héllo wörld — 中文 😀",
        "  two  spaces\nnew line\t",
        "12345",
        "",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
    // Merges apply, without a prefix space: "hello" is one token, " the" is "Ġthe".
    let hello = tok.token_to_id("hello").unwrap();
    let the = tok.token_to_id("Ġthe").unwrap();
    assert_eq!(tok.encode("hello the").unwrap(), vec![hello, the]);
    // Digits are split one by one even where a merge could join them.
    assert_eq!(tok.encode("123").unwrap().len(), 3);
    // Control tokens written in the text become their ids.
    let ids = tok.encode("<|im_start|>hello<|im_end|>").unwrap();
    assert_eq!(ids, vec![1, hello, 2]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
    assert_eq!(tok.special_token_ids(), &[0, 1, 2]);
    assert_eq!(tok.id_to_token(0).as_deref(), Some(TINY_SPECIALS[0]));
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    assert!(tok.decode(&[100_000], false).is_err());
}

#[test]
fn encode_pairs_streams_each_position_once_with_the_forward_keys() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(
        &tiny(dir.path(), "m.gguf", &TinySpec::default()),
        WeightFormat::Native,
    )
    .unwrap();
    let stream: Vec<u32> = (0..50).map(|i| (i * 13 + 5) % 260 + 3).collect();
    let collect = |batch| {
        let mut pairs = Vec::new();
        model
            .encode_pairs(&stream, 16, 8, KeyType::LastFfnInput, batch, |k, t| {
                pairs.push((k.to_vec(), t))
            })
            .unwrap();
        pairs
    };
    let one = collect(1);
    let many = collect(3);
    // Position 0 (the sink) is left out; every other position but the last has a pair.
    assert_eq!(one.len(), stream.len() - 2);
    let next: Vec<u32> = one.iter().map(|p| p.1).collect();
    assert_eq!(next, stream[2..].to_vec());
    assert_eq!(many.len(), one.len());
    for ((ka, ta), (kb, tb)) in one.iter().zip(&many) {
        assert_eq!(ta, tb);
        assert!(max_abs_diff(ka, kb) < 1e-4, "batching changed a key");
    }
    // The first window's keys are those of a plain forward over its tokens.
    let mut cache = model.new_cache(1);
    let out = model
        .forward(
            &stream[..16],
            1,
            &mut cache,
            Outputs::keys_only(KeyType::LastFfnInput),
        )
        .unwrap();
    for i in 1..15 {
        assert!(max_abs_diff(&one[i - 1].0, out.key_at(0, i)) < 1e-4);
    }
    assert!(model
        .encode_pairs(&stream, 16, 0, KeyType::FinalHidden, 2, |_, _| {})
        .is_err());
    assert!(model
        .encode_pairs(&stream, 16, 8, KeyType::FinalHidden, 0, |_, _| {})
        .is_err());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Model::load(&dir.path().join("nope.gguf"), WeightFormat::Native).unwrap_err();
    assert!(matches!(missing, ModelError::NotFound { .. }));
    assert!(
        missing.to_string().contains("goodtriever model fetch"),
        "{missing}"
    );
    std::fs::write(dir.path().join("junk.gguf"), b"not a gguf file at all").unwrap();
    assert!(matches!(
        Model::load(&dir.path().join("junk.gguf"), WeightFormat::Native).unwrap_err(),
        ModelError::Format { .. }
    ));
    let spec = TinySpec {
        context: 16,
        ..TinySpec::default()
    };
    let model = Model::load(&tiny(dir.path(), "m.gguf", &spec), WeightFormat::Native).unwrap();
    let mut cache = model.new_cache(1);
    let o = Outputs::last(KeyType::FinalHidden);
    assert!(matches!(
        model.forward(&[100_000], 1, &mut cache, o),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(
        model.forward(&[1, 2, 3], 2, &mut cache, o),
        Err(ModelError::Input(_))
    ));
    assert!(matches!(
        model.forward(&[1; 17], 1, &mut cache, o),
        Err(ModelError::ContextFull { .. })
    ));
    assert!("q4".parse::<WeightFormat>().is_err());
    assert_eq!("Q8_0".parse::<WeightFormat>().unwrap(), WeightFormat::Q8_0);
}
