//! Incremental updates: `add` writes one new segment and touches nothing else, readers that
//! opened the store earlier see the new rows after `refresh`, and retire / unretire / compact
//! keep search results equal to an exact search over the live rows (computed here from the
//! segment files).

mod build_common;
mod datastore_common;

use build_common::*;
use goodtriever::datastore::{Datastore, KeyDtype, SearchMode, SearchParams};
use goodtriever::ingest::{self, BuildOptions, NoProgress};
use goodtriever::model::{Model, WeightFormat};

fn opts(path: std::path::PathBuf, tag: &str) -> BuildOptions {
    let mut o = BuildOptions::new(vec![path]);
    o.window = Some(32);
    o.stride = Some(16);
    o.dtype = KeyDtype::F32;
    o.tag = Some(tag.into());
    o
}

fn input(dir: &std::path::Path, name: &str, n: usize, seed: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    write_jsonl(&p, &texts(n, seed));
    p
}

#[test]
fn add_creates_one_segment_and_leaves_existing_files_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&tiny_model(dir.path(), 64), WeightFormat::F32).unwrap();
    let store = dir.path().join("store");
    let base = input(dir.path(), "base.jsonl", 20, 1);
    ingest::build(&store, &model, &opts(base, "base"), &NoProgress).unwrap();
    let before = datastore_common::snapshot(&store);
    let (k0, v0) = live_rows(&store);

    // A reader that opened before the add.
    let reader = Datastore::open(&store).unwrap();
    assert_eq!(reader.len(), v0.len());

    let writer = Datastore::open(&store).unwrap();
    let new = input(dir.path(), "drift.jsonl", 8, 99);
    let report = ingest::add(
        &writer,
        &model,
        &opts(new.clone(), "drift-week-2"),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.segments.len(), 1);
    let seg = &report.segments[0];
    assert_eq!(seg.provenance.tag.as_deref(), Some("drift-week-2"));
    assert!(seg.provenance.source.ends_with("drift.jsonl"));
    check_text_provenance(&model, seg, &new, 8);

    let after = datastore_common::snapshot(&store);
    for (path, bytes) in &before {
        if path
            .file_name()
            .is_some_and(|n| n == "manifest.json" || n == "LOCK")
        {
            continue;
        }
        assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
    }
    let new_files: Vec<_> = after.keys().filter(|p| !before.contains_key(*p)).collect();
    assert!(!new_files.is_empty());
    let prefix = std::path::Path::new("segments").join(seg.id.to_string());
    assert!(
        new_files.iter().all(|p| p.starts_with(&prefix)),
        "files outside the new segment appeared: {new_files:?}"
    );
    let (k1, v1) = live_rows(&store);
    assert_eq!(&k1[..k0.len()], &k0[..]);
    assert_eq!(&v1[..v0.len()], &v0[..]);
    assert_eq!(v1.len(), v0.len() + seg.rows);

    // The old reader sees the old rows until it refreshes, then the new ones.
    let d = reader.dim();
    let probe = &k1[(v1.len() - 1) * d..];
    let p = SearchParams {
        mode: SearchMode::Exact,
        ef: None,
    };
    let hit = &reader.search(probe, 1, &p).unwrap()[0][0];
    assert!(hit.id < v0.len() as u64);
    assert!(reader.refresh().unwrap());
    assert_eq!(reader.len(), v1.len());
    let hit = &reader.search(probe, 1, &p).unwrap()[0][0];
    assert_eq!(hit.dist, 0.0);
    assert_eq!(v1[hit.id as usize], v1[v1.len() - 1]);
    assert!(
        hit.id >= v0.len() as u64,
        "the new row is not found: {hit:?}"
    );
}

/// The structured provenance of a segment that `add` wrote from `input` (`docs` documents).
fn check_text_provenance(
    model: &Model,
    seg: &goodtriever::datastore::SegmentInfo,
    input: &std::path::Path,
    docs: usize,
) {
    use sha2::Digest;
    let p = &seg.provenance;
    assert_eq!(p.tool.as_deref(), Some(goodtriever::datastore::TOOL));
    let t = p
        .text
        .as_ref()
        .expect("a segment from text records how it was made");
    assert_eq!(t.files.len(), 1);
    let f = &t.files[0];
    let bytes = std::fs::read(input).unwrap();
    assert_eq!(f.path, input.display().to_string());
    assert_eq!(f.format, "jsonl");
    assert_eq!(f.bytes, bytes.len() as u64);
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(f.sha256, sha);
    assert_eq!((f.records, f.selected), (docs, docs));
    assert_eq!(t.text_field, "text");
    assert!(t.label_filter.is_none());
    assert_eq!((t.window, t.stride), (32, 16));
    assert!(t.part.is_none());
    assert_eq!(t.documents, docs);
    let tokens: usize = std::fs::read_to_string(input)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let text = v["text"].as_str().unwrap();
            model.tokenizer().encode_plain(text).unwrap().len()
        })
        .sum();
    assert_eq!(t.tokens, tokens);
}

fn assert_matches_exact(ds: &Datastore, store: &std::path::Path, queries: &[f32], k: usize) {
    let (keys, _) = live_rows(store);
    let d = ds.dim();
    assert_eq!(keys.len() / d, ds.len());
    for mode in [SearchMode::Exact, SearchMode::Auto] {
        let got = ds
            .search(queries, k, &SearchParams { mode, ef: None })
            .unwrap();
        for (qi, q) in queries.chunks_exact(d).enumerate() {
            let want = datastore_common::naive_knn(&keys, d, q, k);
            let got_d: Vec<f64> = got[qi].iter().map(|n| n.dist as f64).collect();
            let want_d: Vec<f64> = want.iter().map(|w| w.0).collect();
            assert_eq!(got[qi].len(), want.len());
            for (g, w) in got_d.iter().zip(&want_d) {
                assert!(
                    (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                    "{mode:?}: {got_d:?} vs {want_d:?}"
                );
            }
            // Ids may differ only among exact ties.
            for (n, w) in got[qi].iter().zip(&want) {
                if n.id != w.1 {
                    let dn = datastore_common::naive_knn(
                        &keys[n.id as usize * d..(n.id as usize + 1) * d],
                        d,
                        q,
                        1,
                    )[0]
                    .0;
                    assert!(
                        (dn - w.0).abs() <= 1e-3 * (1.0 + w.0.abs()),
                        "{mode:?}: id {} is not a neighbour",
                        n.id
                    );
                }
            }
        }
    }
}

#[test]
fn retire_and_compact_keep_search_equal_to_an_exact_search_over_live_rows() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&tiny_model(dir.path(), 64), WeightFormat::F32).unwrap();
    let store = dir.path().join("store");
    ingest::build(
        &store,
        &model,
        &opts(input(dir.path(), "a.jsonl", 15, 1), "a"),
        &NoProgress,
    )
    .unwrap();
    let ds = Datastore::open(&store).unwrap();
    for (name, seed) in [("b.jsonl", 2), ("c.jsonl", 3)] {
        ingest::add(
            &ds,
            &model,
            &opts(input(dir.path(), name, 10, seed), name),
            &NoProgress,
        )
        .unwrap();
    }
    let segs = ds.segments();
    assert_eq!(segs.len(), 3);
    // Queries: rows of every segment (exact hits) plus perturbed ones.
    let raw = raw_segments(&store);
    let d = ds.dim();
    let mut queries = Vec::new();
    for s in &raw {
        for r in [0, s.values.len() / 2] {
            queries.extend(s.keys[r * d..(r + 1) * d].iter().map(|x| x + 0.01));
        }
    }
    let k = 7;
    assert_matches_exact(&ds, &store, &queries, k);

    ds.retire(segs[1].id).unwrap();
    assert_eq!(ds.len(), segs[0].rows + segs[2].rows);
    assert_matches_exact(&ds, &store, &queries, k);
    ds.unretire(segs[1].id).unwrap();
    assert_matches_exact(&ds, &store, &queries, k);
    ds.retire(segs[0].id).unwrap();
    let (live_k, live_v) = live_rows(&store);

    let merged = ds.compact().unwrap().expect("something to compact");
    assert_eq!(ds.segments().len(), 1);
    assert_eq!(merged.rows, segs[1].rows + segs[2].rows);
    // The merged segment keeps the provenance of both originals, text records included.
    let from: Vec<(u64, usize, u64, Option<&str>)> = merged
        .provenance
        .merged_from
        .iter()
        .map(|m| (m.id, m.rows, m.first_row, m.provenance.tag.as_deref()))
        .collect();
    assert_eq!(
        from,
        vec![
            (segs[1].id, segs[1].rows, 0, Some("b.jsonl")),
            (
                segs[2].id,
                segs[2].rows,
                segs[1].rows as u64,
                Some("c.jsonl")
            ),
        ]
    );
    assert_eq!(
        merged.provenance.merged_from[0].provenance,
        segs[1].provenance
    );
    assert_eq!(
        merged.provenance.merged_from[1].provenance,
        segs[2].provenance
    );
    assert_eq!(live_rows(&store), (live_k, live_v));
    assert_matches_exact(&ds, &store, &queries, k);
    assert!(
        !store.join("segments").join(segs[0].id.to_string()).exists(),
        "the retired segment's files survive compaction"
    );
    assert!(ds.unretire(segs[0].id).is_err());
}

#[test]
fn cli_segments_shows_structured_provenance_and_show_reads_a_row_back() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = tiny_model(dir.path(), 64);
    let store = dir.path().join("store");
    let input = input(dir.path(), "tweets.jsonl", 12, 4);
    let store_s = store.to_str().unwrap();
    let (ok, _, err) = run(&[
        "datastore",
        "build",
        "--input",
        input.to_str().unwrap(),
        "--out",
        store_s,
        "--model",
        model_path.to_str().unwrap(),
        "--window",
        "32",
        "--stride",
        "16",
        "--label-field",
        "toxicity",
        "--min-label",
        "0.5",
        "--tag",
        "week-1",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["datastore", "segments", store_s]);
    assert!(ok, "{err}");
    assert!(out.contains("week-1"), "{out}");
    assert!(
        out.contains("filter toxicity >= 0.5, window 32 stride 16, 6 document(s)"),
        "{out}"
    );
    assert!(out.contains("(jsonl, "), "{out}");
    assert!(out.contains("6 of 12 records selected"), "{out}");
    assert!(out.contains("written by goodtriever "), "{out}");

    let (ok, out, err) = run(&["datastore", "segments", store_s, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let t = &v[0]["provenance"]["text"];
    assert_eq!(
        t["label_filter"],
        serde_json::json!({"field": "toxicity", "min": 0.5})
    );
    assert_eq!(t["files"][0]["path"], input.to_str().unwrap());
    assert_eq!(t["files"][0]["selected"], 6);
    assert_eq!(t["documents"], 6);

    // `show` reads row 5 back exactly as the files hold it.
    let (keys, values) = live_rows(&store);
    let d = 64;
    let (ok, out, err) = run(&[
        "datastore",
        "show",
        store_s,
        "--row",
        "5",
        "--json",
        "--full",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["segment"], 0);
    assert_eq!(v["row_in_segment"], 5);
    assert_eq!(v["value"], values[5]);
    let key: Vec<f32> = serde_json::from_value(v["key"].clone()).unwrap();
    assert_eq!(key, keys[5 * d..6 * d]);
    let head: Vec<f32> = serde_json::from_value(v["key_summary"]["head"].clone()).unwrap();
    assert_eq!(head, keys[5 * d..5 * d + 8]);
    let (ok, out, err) = run(&["datastore", "show", store_s, "--row", "5"]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("value      {} ", values[5])), "{out}");
    assert!(out.contains("key        64 x f16"), "{out}");
    // A row past the end is a clear error.
    let rows = values.len().to_string();
    let (ok, _, err) = run(&["datastore", "show", store_s, "--row", &rows]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "no row {rows}: the datastore has {rows} live rows"
        )),
        "{err}"
    );
}
