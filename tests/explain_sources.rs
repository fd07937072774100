//! Rows' source positions (docs/architecture.md §3) and `explain` (§2): a store built from
//! text maps every row back to the token it was made at; the rows an explanation names are
//! exactly the rows the search returned, with their distances and weights; damaged source
//! files are refused naming the file; merges and compaction carry the sources; stores without
//! sources (imported rows, stores written before sources existed) open and explain without
//! text; and the `explain` command on the tiny model, as text and as JSON.

mod build_common;
mod datastore_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use build_common::*;
use goodtriever::datastore::{
    Datastore, DatastoreError, KeyDtype, Keys, MergePolicy, Provenance, RowSources, SearchParams,
    SourceSnippet, SourceSpan,
};
use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use goodtriever::explain::{ExplainOptions, StepTrace, TokenMove};
use goodtriever::ingest::{self, BuildOptions, NoProgress};
use goodtriever::model::{Model, WeightFormat};
use goodtriever::store::Store;

const HIDDEN: usize = 64;

/// Documents with a few non-ASCII characters, so byte-level tokens cut characters.
fn documents(n: usize, seed: u64) -> Vec<String> {
    let mut t = texts(n, seed);
    t.push("café naïve — the moon over the ünïcode road".into());
    t
}

/// A store of `docs` whose chunks of `segment_tokens` stay separate segments.
fn build(dir: &Path, model: &Model, name: &str, docs: &[String], segment_tokens: usize) -> PathBuf {
    build_with(dir, model, name, docs, segment_tokens, false)
}

fn build_with(
    dir: &Path,
    model: &Model,
    name: &str,
    docs: &[String],
    segment_tokens: usize,
    merge: bool,
) -> PathBuf {
    let input = dir.join(format!("{name}.jsonl"));
    write_jsonl(&input, docs);
    let mut o = BuildOptions::new(vec![input]);
    o.window = Some(32);
    o.stride = Some(16);
    o.dtype = KeyDtype::F32;
    o.segment_tokens = segment_tokens;
    o.merge = merge;
    let out = dir.join(name);
    ingest::build(&out, model, &o, &NoProgress).unwrap();
    out
}

fn tiny(dir: &Path) -> Model {
    Model::load(&tiny_model(dir, HIDDEN), WeightFormat::F32).unwrap()
}

#[test]
fn every_row_of_a_store_built_from_text_maps_back_to_the_token_it_was_made_at() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let docs = documents(14, 3);
    // Small chunks: several segments, and documents split across them.
    let store = Datastore::open(&build(dir.path(), &model, "s", &docs, 40)).unwrap();
    let segments = store.segments();
    assert!(segments.len() > 2, "{} segments", segments.len());
    assert!(segments.iter().all(|s| s.sources));
    assert!(store.verify().unwrap().is_ok());
    // Merged into one segment (the default), every row keeps its origin.
    let merged = Datastore::open(&build_with(dir.path(), &model, "m", &docs, 40, true)).unwrap();
    assert_eq!(merged.segments().len(), 1);
    assert_eq!(merged.len(), store.len());
    for id in 0..store.len() as u64 {
        let (a, b) = (
            store.row_origin(id, 10_000).unwrap(),
            merged.row_origin(id, 10_000).unwrap(),
        );
        // The same text around the same token; the document's number may differ (a merged
        // segment numbers all its chunks' documents in one list).
        let text = |o: &goodtriever::datastore::RowOrigin| {
            o.source.as_ref().map(|s| {
                (
                    s.start,
                    s.end,
                    s.before.clone(),
                    s.token.clone(),
                    s.after.clone(),
                )
            })
        };
        assert_eq!((a.value, text(&a)), (b.value, text(&b)), "row {id}");
    }
    let tok = model.tokenizer();
    let eos = tok.eos_token_id().unwrap();
    let mut cut_chars = 0;
    for id in 0..store.len() as u64 {
        let origin = store.row_origin(id, 10_000).unwrap();
        let src = origin.source.expect("a row built from text has a source");
        // With the whole document as context, the snippet is the document.
        let doc = format!("{}{}{}", src.before, src.token, src.after);
        assert!(docs.contains(&doc), "row {id}: {doc:?} is not an input");
        let enc = tok.encode_plain_with_offsets(&doc).unwrap();
        assert_eq!(
            enc.ids,
            tok.encode_plain(&doc).unwrap(),
            "the same ids as encode_plain"
        );
        let (ids, offsets) = (enc.ids, enc.offsets);
        // The tokens recorded at this byte range (several when byte tokens share a character).
        let at: Vec<usize> = (0..ids.len())
            .filter(|&j| offsets[j] == (src.start, src.end))
            .collect();
        assert!(
            !at.is_empty(),
            "row {id}: no token at {}..{}",
            src.start,
            src.end
        );
        let next: Vec<u32> = at
            .iter()
            .map(|&j| ids.get(j + 1).copied().unwrap_or(eos))
            .collect();
        assert!(
            next.contains(&origin.value),
            "row {id} predicts {} but the token at {}..{} of {doc:?} is followed by {next:?}",
            origin.value,
            src.start,
            src.end
        );
        let text = tok.decode(&[ids[at[0]]], false).unwrap();
        if text.contains('\u{FFFD}') {
            cut_chars += 1;
        } else {
            assert_eq!(text.trim(), src.token.trim(), "row {id}");
            assert!(
                doc.contains(text.trim()),
                "row {id}: {doc:?} lacks {text:?}"
            );
        }
    }
    assert!(cut_chars > 0, "the non-ASCII document yields byte tokens");
}

fn engine(toxic: Arc<dyn Store>, nontoxic: Arc<dyn Store>, opts: AdjustOptions) -> Detoxifier {
    Detoxifier::goodtriever(toxic, nontoxic, opts, SearchParams::exact(), None).unwrap()
}

fn options() -> AdjustOptions {
    let mut o = AdjustOptions::default();
    o.params.k = 24;
    o.params.temperature = 50.0;
    o
}

fn logits(vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = datastore_common::Rng::new(seed);
    (0..vocab).map(|_| rng.normal() * 2.0).collect()
}

fn log_softmax(z: &[f32]) -> Vec<f64> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 - lse).collect()
}

fn all_moves(e: &goodtriever::explain::StepExplanation) -> Vec<&TokenMove> {
    e.pushed_down
        .iter()
        .chain(&e.pushed_up)
        .chain(&e.chosen)
        .collect()
}

#[test]
fn explain_names_the_rows_the_search_returned_with_their_distances_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let toxic =
        Arc::new(Datastore::open(&build(dir.path(), &model, "t", &texts(10, 1), 60)).unwrap());
    let nontoxic =
        Arc::new(Datastore::open(&build(dir.path(), &model, "n", &texts(10, 2), 4096)).unwrap());
    let opts = options();
    let detox = engine(toxic.clone(), nontoxic.clone(), opts);
    let vocab = detox.vocab_size();
    let stores: [&Datastore; 2] = [&toxic, &nontoxic];
    let mut explained_rows = 0;
    for (qi, query_row) in [3u64, 17, 40].into_iter().enumerate() {
        // A stored key, moved a little: near real rows of both stores.
        let mut q = toxic.row(query_row).unwrap().key;
        for (i, x) in q.iter_mut().enumerate() {
            *x += ((i * 7 + qi) % 5) as f32 * 0.01;
        }
        let z = logits(vocab, 10 + qi as u64);
        let mut scratch = DetoxScratch::default();
        let trace = StepTrace::capture(&detox, &q, &z, &opts, &mut scratch).unwrap();

        // The trace's neighbours are the search's, and its controlled answer the engine's.
        let direct: Vec<Vec<_>> = stores
            .iter()
            .map(|s| {
                s.search(&q, opts.params.k, &SearchParams::exact())
                    .unwrap()
                    .remove(0)
            })
            .collect();
        let traced: Vec<(usize, Vec<_>)> =
            trace.neighbours().map(|(s, n)| (s, n.to_vec())).collect();
        assert_eq!(traced, vec![(0, direct[0].clone()), (1, direct[1].clone())]);
        let mut dense = vec![0f32; vocab];
        detox
            .adjust_dense(&q, &z, &opts, &mut DetoxScratch::default(), &mut dense)
            .unwrap();
        assert_eq!(trace.controlled(), &dense[..]);

        let eo = ExplainOptions {
            top: 8,
            rows: 256,
            context_bytes: 20,
        };
        let chosen = (0..vocab as u32)
            .max_by(|&a, &b| dense[a as usize].total_cmp(&dense[b as usize]))
            .unwrap();
        let e = trace
            .explain(&detox, &eo, Some(chosen), &|t| Some(format!("<{t}>")))
            .unwrap();
        assert!(!e.pushed_down.is_empty() || !e.pushed_up.is_empty());
        assert!(e.pushed_down.iter().all(|m| m.change < 0.0));
        assert!(e.pushed_up.iter().all(|m| m.change > 0.0));
        assert!(e.pushed_down.windows(2).all(|w| w[0].change <= w[1].change));
        assert!(e.pushed_up.windows(2).all(|w| w[0].change >= w[1].change));
        assert_eq!(e.chosen.as_ref().unwrap().token, chosen);
        let base = log_softmax(&z);
        for m in all_moves(&e) {
            let t = m.token as usize;
            assert!((m.base_log_prob as f64 - base[t]).abs() < 1e-4);
            assert_eq!(m.controlled_log_prob, dense[t]);
            assert_eq!(m.text.as_deref(), Some(format!("<{t}>").as_str()));
            // Every row holding the token, from both stores (rows = 256 lists them all).
            let holding: usize = direct
                .iter()
                .map(|d| d.iter().filter(|n| n.value == m.token).count())
                .sum();
            assert_eq!(m.rows_total, holding);
            assert_eq!(m.rows.len(), holding);
            assert!(m.rows.windows(2).all(|w| w[0].weight >= w[1].weight));
            for (si, (name, expert)) in ["toxic", "nontoxic"].iter().zip(&m.experts).enumerate() {
                assert_eq!(&expert.store, name);
                let d = &direct[si];
                let w = weights(d, opts.params.temperature);
                let p: f64 = d
                    .iter()
                    .zip(&w)
                    .filter(|(n, _)| n.value == m.token)
                    .map(|(_, w)| w)
                    .sum();
                assert!((expert.probability - p).abs() < 1e-12);
            }
            for r in &m.rows {
                let si = if r.store == "toxic" { 0 } else { 1 };
                assert_eq!(r.store_weight, if si == 0 { -1.0 } else { 1.0 });
                let d = &direct[si];
                let i = d.iter().position(|n| n.id == r.id).unwrap_or_else(|| {
                    panic!("row {} of {} was not returned by the search", r.id, r.store)
                });
                assert_eq!(r.distance, d[i].dist);
                assert_eq!(r.next_token, d[i].value);
                assert_eq!(r.next_token, m.token);
                let w = weights(d, opts.params.temperature);
                assert!((r.weight - w[i]).abs() < 1e-12);
                let stored = stores[si].row(r.id).unwrap();
                assert_eq!(r.segment, Some(stored.segment));
                assert_eq!(r.row_in_segment, Some(stored.row_in_segment));
                let src = r
                    .source
                    .as_ref()
                    .expect("stores built from text have sources");
                assert!(src.before.len() <= 20 + 3 && src.after.len() <= 20 + 3);
                explained_rows += 1;
            }
        }
    }
    assert!(explained_rows > 0);
    // Out-of-range options and a chosen token outside the vocabulary are refused.
    let q = toxic.row(0).unwrap().key;
    let trace = StepTrace::capture(
        &detox,
        &q,
        &logits(vocab, 1),
        &opts,
        &mut DetoxScratch::default(),
    )
    .unwrap();
    for bad in [
        ExplainOptions {
            top: 0,
            ..Default::default()
        },
        ExplainOptions {
            rows: 100_000,
            ..Default::default()
        },
        ExplainOptions {
            context_bytes: 1 << 20,
            ..Default::default()
        },
    ] {
        let err = trace.explain(&detox, &bad, None, &|_| None).unwrap_err();
        assert!(err.to_string().contains("explain options"), "{err}");
    }
    let err = trace
        .explain(
            &detox,
            &ExplainOptions::default(),
            Some(vocab as u32),
            &|_| None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    // A hidden state of the wrong size is the engine's error.
    let err = StepTrace::capture(
        &detox,
        &q[1..],
        &logits(vocab, 1),
        &opts,
        &mut DetoxScratch::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("hidden"), "{err}");
}

/// softmax(−d/T) with the minimum subtracted, as docs/architecture.md §1 defines it.
fn weights(d: &[goodtriever::datastore::Neighbour], t: f32) -> Vec<f64> {
    let d0 = d.iter().map(|n| n.dist).fold(f32::INFINITY, f32::min) as f64;
    let e: Vec<f64> = d
        .iter()
        .map(|n| (-(n.dist as f64 - d0) / t as f64).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Rewrites `file` of segment `seg` with `bytes` and makes the manifest agree (size, CRC),
/// dropping the manifest's own checksum (manifests without one are read unchecked): the file
/// is then consistent with the manifest but structurally wrong.
fn replace_consistently(store: &Path, seg: u64, file: &str, bytes: &[u8]) {
    let path = store.join("segments").join(seg.to_string()).join(file);
    std::fs::write(&path, bytes).unwrap();
    let mpath = store.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("crc32");
    for s in m["segments"].as_array_mut().unwrap() {
        if s["id"].as_u64() == Some(seg) {
            for f in s["files"].as_array_mut().unwrap() {
                if f["name"] == file {
                    f["bytes"] = (bytes.len() as u64).into();
                    f["crc32"] = crc32fast::hash(bytes).into();
                }
            }
        }
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn first_segment(store: &Path) -> u64 {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    m["segments"][0]["id"].as_u64().unwrap()
}

fn expect_refused(store: &Path, file: &str, detail: &str) {
    let err = Datastore::open(store).unwrap_err().to_string();
    assert!(err.contains(file) && err.contains(detail), "open: {err}");
    let report = Datastore::verify_dir(store).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| (p.path.ends_with(file) || p.detail.contains(file))
                && p.detail.contains(detail)),
        "verify: {:?}",
        report.problems
    );
}

#[test]
fn damaged_sources_or_documents_are_refused_by_open_and_verify_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let pristine = build(dir.path(), &model, "p", &documents(6, 4), 4096);
    let seg = first_segment(&pristine);
    let read = |p: &Path, f: &str| {
        std::fs::read(p.join("segments").join(seg.to_string()).join(f)).unwrap()
    };

    // A flipped byte: the checksum.
    for file in ["sources.bin", "documents.bin"] {
        let case = dir.path().join(format!("flip-{file}"));
        datastore_common::copy_dir(&pristine, &case);
        let path = case.join("segments").join(seg.to_string()).join(file);
        let mut b = std::fs::read(&path).unwrap();
        let at = b.len() / 2;
        b[at] ^= 0x20;
        std::fs::write(&path, b).unwrap();
        expect_refused(&case, file, "checksum");
    }

    // Consistent with the manifest but wrong inside: every record and offset is checked.
    let mut bad_doc = read(&pristine, "sources.bin");
    bad_doc[12..16].copy_from_slice(&999u32.to_le_bytes()); // row 1 names document 999
    let mut bad_range = read(&pristine, "sources.bin");
    bad_range[8..12].copy_from_slice(&u32::MAX.to_le_bytes()); // row 0 ends past its document
    let docs = read(&pristine, "documents.bin");
    let mut bad_offsets = docs.clone();
    bad_offsets[24..32].copy_from_slice(&u64::MAX.to_le_bytes()); // document 0 ends past the text
    let mut bad_utf8 = docs.clone();
    let last = bad_utf8.len() - 1;
    bad_utf8[last] = 0xff;
    let mut short = read(&pristine, "sources.bin");
    short.truncate(short.len() - 12);
    for (name, file, bytes, detail) in [
        ("doc", "sources.bin", bad_doc, "names document 999"),
        ("range", "sources.bin", bad_range, "spans bytes"),
        ("offsets", "documents.bin", bad_offsets, "document 0 ends"),
        ("utf8", "documents.bin", bad_utf8, "not valid UTF-8"),
        ("short", "sources.bin", short, "bytes"),
    ] {
        let case = dir.path().join(format!("structure-{name}"));
        datastore_common::copy_dir(&pristine, &case);
        replace_consistently(&case, seg, file, &bytes);
        expect_refused(&case, file, detail);
    }

    // A manifest that lists only one of the two files.
    let case = dir.path().join("half");
    datastore_common::copy_dir(&pristine, &case);
    let mpath = case.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("crc32");
    m["segments"][0]["files"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "documents.bin");
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let err = Datastore::open(&case).unwrap_err().to_string();
    assert!(
        err.contains("only one of sources.bin and documents.bin"),
        "{err}"
    );
}

#[test]
fn bad_row_sources_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = datastore_common::create(dir.path(), 4, KeyDtype::F32);
    let keys = vec![0.5f32; 8];
    let docs = vec!["abc".to_string()];
    let span = |document, start, end| SourceSpan {
        document,
        start,
        end,
    };
    for (spans, why) in [
        (vec![span(0, 0, 1)], "1 source spans for 2 rows"),
        (vec![span(0, 0, 1), span(1, 0, 1)], "names document 1"),
        (vec![span(0, 0, 1), span(0, 2, 4)], "spans bytes 2..4"),
        (vec![span(0, 2, 1), SourceSpan::NONE], "spans bytes 2..1"),
    ] {
        let sources = RowSources {
            documents: docs.clone(),
            spans,
        };
        let err = store
            .append_with_sources(
                Keys::F32(&keys),
                &[1, 2],
                Provenance::new("t"),
                Some(sources),
                &|_| {},
            )
            .unwrap_err();
        assert!(matches!(err, DatastoreError::BadSources(_)), "{err}");
        assert!(err.to_string().contains(why), "{err}");
        assert!(store.is_empty() && store.segments().is_empty());
    }
    // A row with no source next to one with a source is fine.
    let sources = RowSources {
        documents: docs,
        spans: vec![span(0, 1, 2), SourceSpan::NONE],
    };
    store
        .append_with_sources(
            Keys::F32(&keys),
            &[1, 2],
            Provenance::new("t"),
            Some(sources),
            &|_| {},
        )
        .unwrap();
    let a = store.row_origin(0, 5).unwrap().source.unwrap();
    assert_eq!(
        (a.before.as_str(), a.token.as_str(), a.after.as_str()),
        ("a", "b", "c")
    );
    assert_eq!(store.row_origin(1, 5).unwrap().source, None);
    assert!(store.segments()[0].sources);
}

fn origins(store: &Datastore) -> Vec<(u32, Option<SourceSnippet>)> {
    (0..store.len() as u64)
        .map(|id| {
            let o = store.row_origin(id, 30).unwrap();
            // The document index is the segment's own: a merge renumbers it.
            (
                o.value,
                o.source.map(|s| SourceSnippet { document: 0, ..s }),
            )
        })
        .collect()
}

#[test]
fn merges_and_compaction_carry_the_sources_and_imported_rows_have_none() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let path = build(dir.path(), &model, "m", &documents(12, 5), 50);
    let store = Datastore::open(&path).unwrap();
    let built = store.segments().len();
    assert!(built >= 3);
    // Imported rows (hidden states without text) in between.
    let keys = datastore_common::clustered(20, HIDDEN, 2, 9);
    store
        .append(Keys::F32(&keys), &[7; 20], Provenance::new("import"))
        .unwrap();
    let text = dir.path().join("more.jsonl");
    write_jsonl(&text, &texts(3, 77));
    let mut o = BuildOptions::new(vec![text]);
    o.window = Some(32);
    o.stride = Some(16);
    ingest::add(&store, &model, &o, &NoProgress).unwrap();
    let before = origins(&store);
    assert!(before.iter().filter(|o| o.1.is_none()).count() == 20);

    let policy = MergePolicy {
        min_segments: 2,
        base_rows: 1 << 20,
        max_rows: 1 << 30,
    };
    let merged = store.merge_tail(&policy).unwrap().expect("a merge was due");
    assert!(merged.sources);
    assert_eq!(
        origins(&store),
        before,
        "merge_tail kept every row's source"
    );
    assert!(store.verify().unwrap().is_ok());

    assert_eq!(store.segments().len(), 1, "the whole tail was one level");

    // Compaction: another text segment, and a retired imported one that it deletes.
    let text = dir.path().join("later.jsonl");
    write_jsonl(&text, &texts(4, 78));
    ingest::add(
        &store,
        &model,
        &BuildOptions {
            input: BuildOptions::new(vec![text]).input,
            ..o
        },
        &NoProgress,
    )
    .unwrap();
    let imported = store
        .append(Keys::F32(&keys), &[8; 20], Provenance::new("import"))
        .unwrap();
    store.retire(imported.id).unwrap();
    let retired = origins(&store);
    store.compact().unwrap().expect("compaction ran");
    assert_eq!(store.segments().len(), 1);
    assert!(store.segments()[0].sources);
    assert_eq!(
        origins(&store),
        retired,
        "compaction kept every row's source"
    );
    assert!(store.verify().unwrap().is_ok());
    // And a fresh open reads the same from disk.
    assert_eq!(origins(&Datastore::open(&path).unwrap()), retired);
}

/// Turns a store into one written before sources existed: no source files, no manifest
/// entries for them, no manifest checksum.
fn strip_sources(store: &Path) {
    let mpath = store.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("crc32");
    for s in m["segments"].as_array_mut().unwrap() {
        let id = s["id"].as_u64().unwrap();
        s["files"]
            .as_array_mut()
            .unwrap()
            .retain(|f| f["name"] != "sources.bin" && f["name"] != "documents.bin");
        for f in ["sources.bin", "documents.bin"] {
            std::fs::remove_file(store.join("segments").join(id.to_string()).join(f)).unwrap();
        }
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn a_store_without_sources_opens_verifies_and_explains_without_text() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let toxic = build(dir.path(), &model, "old-t", &texts(8, 1), 4096);
    let nontoxic = build(dir.path(), &model, "old-n", &texts(8, 2), 4096);
    strip_sources(&toxic);
    strip_sources(&nontoxic);
    let t = Arc::new(Datastore::open(&toxic).unwrap());
    let n = Arc::new(Datastore::open(&nontoxic).unwrap());
    assert!(t.segments().iter().all(|s| !s.sources));
    assert!(t.verify().unwrap().is_ok());
    assert_eq!(t.row_origin(0, 10).unwrap().source, None);
    let opts = options();
    let detox = engine(t.clone(), n, opts);
    let q = t.row(5).unwrap().key;
    let trace = StepTrace::capture(
        &detox,
        &q,
        &logits(detox.vocab_size(), 3),
        &opts,
        &mut DetoxScratch::default(),
    )
    .unwrap();
    // The query is row 5's key: its token, as the chosen one, has row 5 behind it.
    let chosen = t.row(5).unwrap().value;
    let e = trace
        .explain(&detox, &ExplainOptions::default(), Some(chosen), &|_| None)
        .unwrap();
    let rows: Vec<_> = all_moves(&e).into_iter().flat_map(|m| &m.rows).collect();
    assert!(rows
        .iter()
        .any(|r| r.store == "toxic" && r.id == 5 && r.distance == 0.0));
    assert!(rows
        .iter()
        .all(|r| r.source.is_none() && r.segment.is_some()));
}

#[test]
fn the_explain_command_shows_each_token_with_its_rows_and_their_source_text() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model(dir.path(), HIDDEN);
    let model = Model::load(&model_path, WeightFormat::F32).unwrap();
    let toxic = build(dir.path(), &model, "ct", &texts(12, 1), 4096);
    let nontoxic = build(dir.path(), &model, "cn", &texts(12, 2), 4096);
    let (m, t, n) = (
        model_path.to_str().unwrap(),
        toxic.to_str().unwrap(),
        nontoxic.to_str().unwrap(),
    );
    let common = [
        "--model",
        m,
        "--weights",
        "f32",
        "--toxic",
        t,
        "--nontoxic",
        n,
        "--prompt",
        "the quiet river",
        "--max-new-tokens",
        "4",
        "--seed",
        "7",
        "--k",
        "16",
        // The tiny model is peaked: keep every token in the rule's nucleus, and weigh many
        // neighbours, so the stores move tokens the model could still choose.
        "--filter-p",
        "1",
        "--knn-temperature",
        "5000",
    ];
    let mut json_args = vec!["explain"];
    json_args.extend(common);
    json_args.extend(["--json", "--rows", "2", "--top", "3"]);
    let (ok, out, err) = run(&json_args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids: Vec<u64> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), ids.len());
    assert_eq!(ids.len(), 4);
    let mut with_source = 0;
    for (s, id) in steps.iter().zip(&ids) {
        assert_eq!(s["chosen"]["token"].as_u64(), Some(*id));
        for list in ["pushed_down", "pushed_up"] {
            let moves = s[list].as_array().unwrap();
            assert!(moves.len() <= 3);
            for mv in moves {
                let rows = mv["rows"].as_array().unwrap();
                assert!(rows.len() <= 2);
                for r in rows {
                    assert_eq!(r["next_token"], mv["token"]);
                    assert!(r["store"] == "toxic" || r["store"] == "nontoxic");
                    if r["source"]["token"].is_string() {
                        with_source += 1;
                    }
                }
            }
        }
    }
    assert!(with_source > 0, "no row showed its source text: {out}");

    // The continuation is the one `generate` samples with the same control and seed.
    let mut gen = vec!["generate"];
    gen.extend(common);
    gen.push("--json");
    let (ok, gout, err) = run(&gen);
    assert!(ok, "{err}");
    let g: serde_json::Value = serde_json::from_str(gout.lines().next().unwrap()).unwrap();
    assert_eq!(g["continuation"], v["continuation"]);
    assert_eq!(g["token_ids"], v["token_ids"]);

    // Readable text by default.
    let mut text_args = vec!["explain"];
    text_args.extend(common);
    let (ok, out, err) = run(&text_args);
    assert!(ok, "{err}");
    assert!(out.contains("continuation"), "{out}");
    assert!(out.contains("step   1  chose"), "{out}");
    assert!(out.contains("segment "), "{out}");

    // `info` and `segments` say which segments record sources.
    let (ok, out, err) = run(&["datastore", "info", t, "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["segments"][0]["sources"], true);
    let (ok, out, err) = run(&["datastore", "segments", t]);
    assert!(ok, "{err}");
    assert!(out.contains("sources: every row's position"), "{out}");
    let (ok, out, _) = run(&["datastore", "info", t]);
    assert!(ok && out.contains("  sources  "), "{out}");

    // Without stores there is nothing to explain.
    let (ok, _, err) = run(&["explain", "--model", m, "--prompt", "x"]);
    assert!(!ok);
    assert!(err.contains("--toxic"), "{err}");
    let mut bad = vec!["explain"];
    bad.extend(common);
    bad.extend(["--top", "0"]);
    let (ok, _, err) = run(&bad);
    assert!(!ok);
    assert!(err.contains("top"), "{err}");
}
