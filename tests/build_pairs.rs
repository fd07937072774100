//! Windowing and (key, next token) pairing of a built store, checked against a direct
//! computation written here from the definition: the stream is `EOS d₁ EOS d₂ … EOS`; every
//! position p except separators is keyed by the earliest window `[ks, ks + w)` with
//! `ks < p < ks + w`, its key is the hidden state at p of a plain forward pass over that
//! window alone, and its value is the token at p + 1.

mod build_common;

use build_common::*;
use goodtriever::datastore::{Datastore, KeyDtype};
use goodtriever::fingerprint::KeyType;
use goodtriever::ingest::{self, BuildOptions, NoProgress};
use goodtriever::model::{Model, Outputs, Positions, WeightFormat};

fn direct(
    model: &Model,
    docs: &[String],
    w: usize,
    s: usize,
    key_type: KeyType,
) -> (Vec<f32>, Vec<u32>) {
    let tok = model.tokenizer();
    let eos = tok.eos_token_id().unwrap();
    let mut stream = vec![eos];
    let mut sep = vec![true];
    for d in docs {
        let ids = tok.encode_plain(d).unwrap();
        sep.extend(std::iter::repeat_n(false, ids.len()));
        stream.extend(ids);
        stream.push(eos);
        sep.push(true);
    }
    let n = stream.len();
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for p in 1..n - 1 {
        if sep[p] {
            continue;
        }
        let Some(k) = (0..)
            .take_while(|k| k * s < n)
            .find(|k| k * s < p && p < k * s + w)
        else {
            continue;
        };
        let (b, e) = (k * s, (k * s + w).min(n));
        let mut cache = model.new_cache(1);
        let out = model
            .forward(
                &stream[b..e],
                1,
                &mut cache,
                Outputs {
                    logits: Positions::None,
                    keys: Positions::All,
                    key_type,
                },
            )
            .unwrap();
        keys.extend_from_slice(out.key_at(0, p - b));
        values.push(stream[p + 1]);
    }
    (keys, values)
}

fn check(window: usize, stride: usize, batch: usize, key_type: KeyType) {
    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model(dir.path(), 64);
    let model = Model::load(&model_path, WeightFormat::F32).unwrap();
    let docs = texts(12, 7);
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &docs);

    let mut opts = BuildOptions::new(vec![input]);
    opts.window = Some(window);
    opts.stride = Some(stride);
    opts.batch = batch;
    opts.dtype = KeyDtype::F32;
    opts.key_type = Some(key_type);
    let out = dir.path().join("store");
    let report = ingest::build(&out, &model, &opts, &NoProgress).unwrap();

    let (want_k, want_v) = direct(&model, &docs, window, stride, key_type);
    let (got_k, got_v) = live_rows(&out);
    assert_eq!(report.rows, want_v.len());
    assert_eq!(got_v, want_v, "values (next tokens) differ");
    assert_eq!(got_k.len(), want_k.len());
    let worst = got_k
        .iter()
        .zip(&want_k)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "keys differ from the direct computation by {worst}"
    );
    let ds = Datastore::open(&out).unwrap();
    assert_eq!(ds.len(), want_v.len());
    assert_eq!(ds.key_type(), key_type);
    assert_eq!(ds.fingerprint(), &model.fingerprint());
}

#[test]
fn overlapping_windows_key_each_position_once_with_most_context() {
    check(16, 6, 3, KeyType::LastFfnInput);
}

#[test]
fn disjoint_windows_skip_each_window_start() {
    check(10, 10, 2, KeyType::FinalHidden);
}

#[test]
fn one_window_over_everything_matches_a_single_forward_pass() {
    check(256, 128, 1, KeyType::LastFfnInput);
}

#[test]
fn label_filter_selects_documents_and_multi_segment_builds_cover_all_rows() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&tiny_model(dir.path(), 64), WeightFormat::F32).unwrap();
    let docs = texts(40, 3);
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &docs);
    let toxic: Vec<String> = docs.iter().step_by(2).cloned().collect();

    let mut opts = BuildOptions::new(vec![input.clone()]);
    opts.window = Some(32);
    opts.stride = Some(16);
    opts.dtype = KeyDtype::F32;
    opts.input.filter = Some(ingest::LabelFilter {
        field: "toxicity".into(),
        min: Some(0.5),
        max: None,
    });
    // Small segments: several chunks, each its own segment.
    opts.segment_tokens = 60;
    opts.merge = false;
    let out = dir.path().join("toxic");
    let report = ingest::build(&out, &model, &opts, &NoProgress).unwrap();
    assert_eq!(report.documents, toxic.len());
    assert!(
        report.segments.len() >= 3,
        "{} segments",
        report.segments.len()
    );
    let segs = Datastore::open(&out).unwrap().segments();
    assert!(segs
        .iter()
        .all(|s| s.provenance.label.as_deref() == Some("toxicity >= 0.5")));
    // Structured provenance: the filter as numbers, the part of the build, and counts that
    // add up to the whole build.
    let n = segs.len();
    let mut tokens = 0;
    for (i, s) in segs.iter().enumerate() {
        let t = s.provenance.text.as_ref().expect("text provenance");
        let f = t.label_filter.as_ref().unwrap();
        assert_eq!(
            (f.field.as_str(), f.min, f.max),
            ("toxicity", Some(0.5), None)
        );
        assert_eq!(t.part.map(|p| (p.index, p.of)), Some((i + 1, n)));
        assert_eq!((t.window, t.stride), (32, 16));
        assert_eq!(t.files.len(), 1);
        assert_eq!((t.files[0].records, t.files[0].selected), (40, 20));
        assert!(t.documents >= 1);
        tokens += t.tokens;
    }
    assert_eq!(tokens, report.tokens);

    // The same documents given directly as txt, as one chunk. Chunking only loses the pairs
    // that straddle a split document (the last token of one chunk has no successor, the first
    // token of the next is a window start), so the chunked rows are the whole build's rows
    // minus at most two per chunk boundary, in the same order.
    let txt = dir.path().join("toxic.txt");
    std::fs::write(&txt, toxic.join("\n")).unwrap();
    let mut one = BuildOptions::new(vec![txt]);
    one.window = Some(32);
    one.stride = Some(16);
    one.dtype = KeyDtype::F32;
    let whole = dir.path().join("whole");
    let r1 = ingest::build(&whole, &model, &one, &NoProgress).unwrap();
    assert_eq!(r1.tokens, report.tokens);
    assert_eq!(r1.segments.len(), 1);
    let (_, v_chunked) = live_rows(&out);
    let (_, v_whole) = live_rows(&whole);
    assert_eq!(v_chunked.len(), report.rows);
    let lost = v_whole.len() - v_chunked.len();
    assert!(
        lost <= 2 * (report.segments.len() - 1),
        "chunking lost {lost} rows over {} chunks",
        report.segments.len()
    );
    let mut it = v_whole.iter();
    assert!(
        v_chunked.iter().all(|v| it.any(|w| w == v)),
        "the chunked build's values are not a subsequence of the whole build's"
    );

    // The default merges the same chunks into one segment with one full index: the same rows
    // in the same order, every chunk's provenance kept, and the same neighbours.
    opts.merge = true;
    let merged = dir.path().join("merged");
    let r2 = ingest::build(&merged, &model, &opts, &NoProgress).unwrap();
    assert_eq!(r2.segments.len(), 1);
    assert_eq!(live_rows(&merged), live_rows(&out));
    let store = Datastore::open(&merged).unwrap();
    let seg = &store.segments()[0];
    assert_eq!(seg.provenance.merged_from.len(), report.segments.len());
    assert!(seg.sources);
    assert!(store.verify().unwrap().is_ok());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merged.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        m["segments"][0]["index"],
        serde_json::json!({"m": 16, "ef_construction": 100}),
        "the merged segment has the full index, not the staging one"
    );
    let chunked = Datastore::open(&out).unwrap();
    let (keys, _) = live_rows(&out);
    let q = &keys[..keys.len() / report.rows];
    let exact = goodtriever::datastore::SearchParams::exact();
    assert_eq!(
        store.search(q, 8, &exact).unwrap(),
        chunked.search(q, 8, &exact).unwrap()
    );
}

#[test]
fn control_token_strings_in_corpus_text_are_plain_text_but_prompts_parse_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&tiny_model(dir.path(), 64), WeightFormat::F32).unwrap();
    let tok = model.tokenizer();
    let eos = tok.eos_token_id().unwrap();
    let specials = tok.special_token_ids().to_vec();
    assert!(specials.contains(&eos));
    let tweet = "the cat<|im_end|> sat <|endoftext|>on <|im_start|>the mat";

    // Corpus text: the literal strings are characters, and they round-trip.
    let plain = tok.encode_plain(tweet).unwrap();
    assert!(
        plain.iter().all(|t| !specials.contains(t)),
        "a control id in {plain:?}"
    );
    assert_eq!(tok.decode(&plain, false).unwrap(), tweet);
    // Prompts (chat templates) still parse them into their single ids.
    let prompt = tok.encode(tweet).unwrap();
    for s in ["<|im_end|>", "<|endoftext|>", "<|im_start|>"] {
        assert!(prompt.contains(&tok.token_to_id(s).unwrap()), "{s}");
    }
    assert_eq!(
        tok.encode("<|im_start|>hello").unwrap()[0],
        tok.token_to_id("<|im_start|>").unwrap()
    );

    // A store built from such documents holds no control id except the EOS we insert between
    // documents: exactly one EOS value per document (its last token predicts the separator).
    let docs = vec![tweet.to_string(), "hello <|im_end|> world".to_string()];
    let input = dir.path().join("tweets.jsonl");
    write_jsonl(&input, &docs);
    let mut opts = BuildOptions::new(vec![input]);
    opts.window = Some(256);
    opts.stride = Some(128);
    opts.dtype = KeyDtype::F32;
    let out = dir.path().join("store");
    let report = ingest::build(&out, &model, &opts, &NoProgress).unwrap();
    let want_tokens: usize = docs.iter().map(|d| plain_len(&model, d)).sum();
    assert_eq!(report.tokens, want_tokens);
    let (_, values) = live_rows(&out);
    assert_eq!(values.iter().filter(|&&v| v == eos).count(), docs.len());
    assert!(
        values.iter().all(|v| *v == eos || !specials.contains(v)),
        "a control id stored as a value: {values:?}"
    );
    // And the rows equal the direct computation over the plain tokens.
    let (_, want_v) = direct(&model, &docs, 256, 128, KeyType::LastFfnInput);
    assert_eq!(values, want_v);
}

fn plain_len(model: &Model, text: &str) -> usize {
    model.tokenizer().encode_plain(text).unwrap().len()
}
