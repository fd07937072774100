//! Datastore lifecycle: create, append, reopen, refresh, verify, corruption, bad input,
//! retire and compact.

mod datastore_common;

use std::sync::Arc;

use datastore_common::*;
use goodtriever::datastore::{Datastore, DatastoreError, KeyDtype, Keys, Provenance, SearchParams};
use half::f16;

const D: usize = 16;

fn prov(tag: &str) -> Provenance {
    Provenance::new("test").with_tag(tag)
}

#[test]
fn create_append_open_round_trip_keeps_rows_values_and_provenance() {
    for dtype in [KeyDtype::F16, KeyDtype::F32] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let keys = clustered(300, D, 5, 1);
        let vals = values(300, 1);
        {
            let ds = create(&dir, D, dtype);
            assert!(ds.is_empty());
            let info = ds
                .append(Keys::F32(&keys), &vals, prov("first").with_label("toxic"))
                .unwrap();
            assert_eq!((info.rows, info.first_id), (300, Some(0)));
            assert_eq!(ds.len(), 300);
        }
        let ds = Datastore::open(&dir).unwrap();
        assert_eq!(ds.dim(), D);
        assert_eq!(ds.dtype(), dtype);
        assert_eq!(ds.len(), 300);
        assert_eq!(ds.fingerprint().model_id, "test-model");
        let segs = ds.segments();
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0].provenance.tag.as_deref(), Some("first"));
        assert_eq!(segs[0].provenance.label.as_deref(), Some("toxic"));
        // Every row finds itself at distance ~0 with its own value.
        let stored = as_stored(&keys, dtype);
        let res = ds.search(&stored, 1, &SearchParams::exact()).unwrap();
        for (i, r) in res.iter().enumerate() {
            assert_eq!(r[0].dist, 0.0, "row {i}");
            assert_eq!(vals[r[0].id as usize], r[0].value);
        }
        assert!(ds.verify().unwrap().is_ok());
        assert!(matches!(
            Datastore::create(&dir, options(D, dtype)),
            Err(DatastoreError::AlreadyExists(_))
        ));
    }
}

#[test]
fn f16_input_is_accepted_and_f32_that_overflows_f16_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = create(tmp.path(), 2, KeyDtype::F16);
    let k16: Vec<f16> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    ds.append(Keys::F16(&k16), &[7, 8], prov("h")).unwrap();
    let r = ds.search(&[3.0, 4.0], 1, &SearchParams::exact()).unwrap();
    assert_eq!((r[0][0].id, r[0][0].value, r[0][0].dist), (1, 8, 0.0));
    let before = snapshot(tmp.path());
    let err = ds
        .append(Keys::F32(&[1.0, 70000.0]), &[1], prov("x"))
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::F16Overflow { row: 0, col: 1, .. }),
        "{err}"
    );
    assert_eq!(before, snapshot(tmp.path()));
}

#[test]
fn every_bad_input_is_a_clear_error_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F16);
    // Empty store.
    let q = vec![0.0f32; D];
    let e = ds.search(&q, 1, &SearchParams::default()).unwrap_err();
    assert!(matches!(e, DatastoreError::EmptyStore(_)), "{e}");
    let keys = clustered(50, D, 2, 3);
    ds.append(Keys::F32(&keys), &values(50, 3), prov("a"))
        .unwrap();
    let before = snapshot(dir);

    let mut nan = keys.clone();
    nan[3 * D + 5] = f32::NAN;
    let mut inf = keys.clone();
    inf[7] = f32::NEG_INFINITY;
    let cases: Vec<(DatastoreError, &str)> = vec![
        (
            ds.append(Keys::F32(&keys[..D * 3 + 1]), &[1, 2, 3], prov("x"))
                .unwrap_err(),
            "dimension",
        ),
        (
            ds.append(Keys::F32(&[]), &[], prov("x")).unwrap_err(),
            "empty",
        ),
        (
            ds.append(Keys::F32(&keys), &values(49, 3), prov("x"))
                .unwrap_err(),
            "values",
        ),
        (
            ds.append(Keys::F32(&nan), &values(50, 3), prov("x"))
                .unwrap_err(),
            "row 3 column 5",
        ),
        (
            ds.append(Keys::F32(&inf), &values(50, 3), prov("x"))
                .unwrap_err(),
            "finite",
        ),
        (
            ds.search(&q, 0, &SearchParams::default()).unwrap_err(),
            "k = 0",
        ),
        (
            ds.search(&q, 4097, &SearchParams::default()).unwrap_err(),
            "4096",
        ),
        (
            ds.search(&q[..D - 1], 1, &SearchParams::default())
                .unwrap_err(),
            "dimension",
        ),
        (
            ds.search(&[f32::NAN; D], 1, &SearchParams::default())
                .unwrap_err(),
            "query row 0",
        ),
        (
            ds.search(&q, 1, &SearchParams::hnsw(Some(0))).unwrap_err(),
            "ef",
        ),
        (
            ds.search_into(&q, 1, &SearchParams::default(), &mut [])
                .unwrap_err(),
            "output buffer",
        ),
    ];
    for (err, needle) in cases {
        let msg = err.to_string();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
    assert_eq!(
        before,
        snapshot(dir),
        "a refused call changed the directory"
    );
    assert_eq!(ds.len(), 50);
    assert!(matches!(
        Datastore::open(&tmp.path().join("nope")),
        Err(DatastoreError::NotFound(_))
    ));
}

#[test]
fn verify_names_the_file_with_a_flipped_byte_and_open_catches_truncation() {
    for name in ["keys.bin", "values.bin", "index.bin"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ds = create(dir, D, KeyDtype::F32);
        ds.append(
            Keys::F32(&clustered(200, D, 3, 4)),
            &values(200, 4),
            prov("a"),
        )
        .unwrap();
        let path = dir.join("segments/0").join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2 + 1;
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let report = ds.verify().unwrap();
        assert!(!report.is_ok(), "{name}: flip not detected");
        let first = &report.problems[0];
        assert!(
            first.path.ends_with(format!("segments/0/{name}")),
            "{first}"
        );
        assert!(first.detail.contains("checksum"), "{first}");
        let err = report.into_result().unwrap_err().to_string();
        assert!(err.contains(name), "{err}");

        bytes.truncate(bytes.len() - 4);
        std::fs::write(&path, &bytes).unwrap();
        let err = Datastore::open(dir).unwrap_err();
        assert!(matches!(err, DatastoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn damaged_index_structure_is_a_typed_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F32);
    ds.append(
        Keys::F32(&clustered(100, D, 3, 5)),
        &values(100, 5),
        prov("a"),
    )
    .unwrap();
    drop(ds);
    let path = dir.join("segments/0/index.bin");
    let clean = std::fs::read(&path).unwrap();
    // Every single-word overwrite with an out-of-range id must be refused or harmless.
    let mut rng = Rng::new(9);
    for _ in 0..200 {
        let mut bytes = clean.clone();
        let w = rng.below((bytes.len() / 4) as u64) as usize;
        bytes[w * 4..w * 4 + 4].copy_from_slice(&(rng.next_u64() as u32).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(ds) = Datastore::open(dir) {
            // Structurally valid damage: search must still work.
            ds.search(&[0.5; D], 5, &SearchParams::hnsw(None)).unwrap();
        }
    }
}

#[test]
fn a_reader_sees_rows_appended_by_another_handle_after_refresh() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let writer = create(dir, D, KeyDtype::F16);
    let a = clustered(100, D, 2, 6);
    writer
        .append(Keys::F32(&a), &values(100, 6), prov("a"))
        .unwrap();
    let reader = Arc::new(Datastore::open(dir).unwrap());
    assert!(
        !reader.refresh().unwrap(),
        "unchanged manifest must be a no-op"
    );
    let b = clustered(40, D, 2, 7);
    writer
        .append(Keys::F32(&b), &values(40, 7), prov("b"))
        .unwrap();
    assert_eq!(reader.len(), 100);
    let q = as_stored(&b[..D], KeyDtype::F16);
    let before = reader.search(&q, 1, &SearchParams::exact()).unwrap();
    assert_ne!(before[0][0].dist, 0.0);
    assert!(reader.refresh().unwrap());
    assert_eq!(reader.len(), 140);
    let after = reader.search(&q, 1, &SearchParams::exact()).unwrap();
    assert_eq!((after[0][0].id, after[0][0].dist), (100, 0.0));
    assert_eq!(reader.segments().len(), 2);
}

#[test]
fn garbage_of_an_interrupted_writer_is_removed_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F16);
    ds.append(
        Keys::F32(&clustered(30, D, 2, 8)),
        &values(30, 8),
        prov("a"),
    )
    .unwrap();
    drop(ds);
    std::fs::create_dir_all(dir.join("segments/.tmp-1-999")).unwrap();
    std::fs::write(dir.join("segments/.tmp-1-999/keys.bin"), b"half").unwrap();
    std::fs::create_dir_all(dir.join("segments/7")).unwrap();
    let ds = Datastore::open(dir).unwrap();
    assert!(!dir.join("segments/.tmp-1-999").exists());
    assert!(!dir.join("segments/7").exists());
    assert!(dir.join("segments/0/keys.bin").exists());
    assert_eq!(ds.len(), 30);
}

#[test]
fn retire_unretire_and_compact_keep_ids_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F32);
    let parts: Vec<Vec<f32>> = (0..3).map(|i| clustered(60, D, 3, 20 + i)).collect();
    for (i, p) in parts.iter().enumerate() {
        ds.append(Keys::F32(p), &values(60, 20 + i as u64), prov("p"))
            .unwrap();
    }
    assert_eq!(ds.len(), 180);
    ds.retire(1).unwrap();
    assert_eq!(ds.len(), 120);
    assert!(matches!(
        ds.retire(1),
        Err(DatastoreError::SegmentState { .. })
    ));
    assert!(matches!(
        ds.retire(9),
        Err(DatastoreError::UnknownSegment(9))
    ));
    // Segment 2's first row is now id 60.
    let r = ds
        .search(&parts[2][..D], 1, &SearchParams::exact())
        .unwrap();
    assert_eq!((r[0][0].id, r[0][0].dist), (60, 0.0));
    let reopened = Datastore::open(dir).unwrap();
    assert_eq!(reopened.len(), 120);
    ds.unretire(1).unwrap();
    assert_eq!(ds.len(), 180);
    ds.retire(0).unwrap();
    let all_before = ds.search(&parts[2], 3, &SearchParams::exact()).unwrap();
    let info = ds.compact().unwrap().expect("something to compact");
    assert_eq!(info.rows, 120);
    assert_eq!(ds.segments().len(), 1);
    assert!(!dir.join("segments/0").exists() && !dir.join("segments/1").exists());
    let all_after = ds.search(&parts[2], 3, &SearchParams::exact()).unwrap();
    assert_eq!(all_before, all_after, "compaction changed ids or distances");
    assert!(ds.verify().unwrap().is_ok());
    assert!(ds.compact().unwrap().is_none());
    // The reader opened before compaction still works on its old snapshot, then refreshes.
    assert_eq!(
        reopened
            .search(&parts[2][..D], 1, &SearchParams::exact())
            .unwrap()[0][0]
            .dist,
        0.0
    );
    assert!(reopened.refresh().unwrap());
    assert_eq!(reopened.len(), 120);
}

/// A manifest written before provenance was structured: each segment's provenance has only
/// `source`, `label`, `tag` and `added_at` (as in the default stores built then).
#[test]
fn a_manifest_with_the_old_provenance_format_still_opens_and_compacts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let keys = clustered(50, D, 3, 5);
    {
        let ds = create(dir, D, KeyDtype::F16);
        ds.append(Keys::F32(&keys), &values(50, 5), prov("x"))
            .unwrap();
    }
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let old = serde_json::json!({
        "source": "data/corpora/toxic.jsonl",
        "label": "toxicity >= 0.8",
        "tag": "default-toxic",
        "added_at": 1_795_769_723u64
    });
    m["segments"][0]["provenance"] = old.clone();
    // Manifests of that format predate the manifest's own checksum too.
    m.as_object_mut().unwrap().remove("crc32");
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    let ds = Datastore::open(dir).unwrap();
    assert_eq!(ds.len(), 50);
    let p = &ds.segments()[0].provenance;
    assert_eq!(p.source, "data/corpora/toxic.jsonl");
    assert_eq!(p.label.as_deref(), Some("toxicity >= 0.8"));
    assert_eq!(p.tag.as_deref(), Some("default-toxic"));
    assert_eq!(p.added_at, 1_795_769_723);
    assert!(p.tool.is_none() && p.text.is_none() && p.merged_from.is_empty());
    assert!(ds.verify().unwrap().is_ok());

    // A new segment records the tool; rewriting the manifest leaves the old record as it was.
    let info = ds
        .append(Keys::F32(&keys), &values(50, 6), prov("new"))
        .unwrap();
    assert_eq!(
        info.provenance.tool.as_deref(),
        Some(goodtriever::datastore::TOOL)
    );
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(m["segments"][0]["provenance"], old);

    // Compacting keeps the old record among the merged originals.
    let merged = ds.compact().unwrap().unwrap();
    assert_eq!(merged.provenance.merged_from.len(), 2);
    assert_eq!(
        merged.provenance.merged_from[0].provenance.source,
        "data/corpora/toxic.jsonl"
    );
    assert_eq!(
        merged.provenance.merged_from[0].provenance.added_at,
        1_795_769_723
    );
    assert!(Datastore::open(dir).unwrap().verify().unwrap().is_ok());
}

#[test]
fn compaction_keeps_the_provenance_of_every_merged_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F32);
    let rows = [40usize, 25, 30];
    for (i, &n) in rows.iter().enumerate() {
        let p = Provenance::new(format!("part-{i}.npy"))
            .with_label(if i == 2 { "non_toxic" } else { "toxic" })
            .with_tag(format!("week-{i}"));
        ds.append(
            Keys::F32(&clustered(n, D, 2, 40 + i as u64)),
            &values(n, 40 + i as u64),
            p,
        )
        .unwrap();
    }
    ds.retire(1).unwrap();
    let before = ds.segments();
    let merged = ds.compact().unwrap().unwrap();
    let p = &merged.provenance;
    // Retired segment 1 is deleted, not merged.
    let got: Vec<String> = p
        .merged_from
        .iter()
        .map(|m| {
            let q = &m.provenance;
            format!(
                "#{} rows {} from {} label {:?} tag {:?}",
                m.id, m.rows, m.first_row, q.label, q.tag
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            r#"#0 rows 40 from 0 label Some("toxic") tag Some("week-0")"#,
            r#"#2 rows 30 from 40 label Some("non_toxic") tag Some("week-2")"#,
        ]
    );
    assert_eq!(p.merged_from[0].provenance, before[0].provenance);
    assert_eq!(p.merged_from[1].provenance, before[2].provenance);
    // Labels and tags differ, so the merged segment claims neither.
    assert_eq!((p.label.as_deref(), p.tag.as_deref()), (None, None));
    assert_eq!(p.source, "compaction of segments 0,2");

    // Another segment, compacted again: the originals are listed flat, with their offsets.
    ds.append(
        Keys::F32(&clustered(10, D, 2, 50)),
        &values(10, 50),
        Provenance::new("late.npy").with_label("toxic"),
    )
    .unwrap();
    let again = ds.compact().unwrap().unwrap();
    let ids: Vec<(u64, usize, u64)> = again
        .provenance
        .merged_from
        .iter()
        .map(|m| (m.id, m.rows, m.first_row))
        .collect();
    assert_eq!(ids, vec![(0, 40, 0), (2, 30, 40), (4, 10, 70)]);
    assert!(again
        .provenance
        .merged_from
        .iter()
        .all(|m| m.provenance.merged_from.is_empty()));
    // Persisted: a fresh open reads the same record.
    let reopened = Datastore::open(dir).unwrap();
    assert_eq!(reopened.segments()[0].provenance, again.provenance);
    assert_eq!(reopened.len(), 80);
}

#[test]
fn row_reads_back_the_stored_key_and_value_of_any_live_row() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F16);
    let parts: Vec<(Vec<f32>, Vec<u32>)> = (0..3)
        .map(|i| (clustered(20, D, 2, 60 + i), values(20, 60 + i)))
        .collect();
    for (k, v) in &parts {
        ds.append(Keys::F32(k), v, prov("r")).unwrap();
    }
    ds.retire(1).unwrap();
    // Live ids 20..40 are segment 2's rows now.
    let r = ds.row(27).unwrap();
    assert_eq!(
        (r.segment, r.row_in_segment, r.value),
        (2, 7, parts[2].1[7])
    );
    assert_eq!(r.key, as_stored(&parts[2].0[7 * D..8 * D], KeyDtype::F16));
    let r0 = ds.row(0).unwrap();
    assert_eq!(
        (r0.segment, r0.row_in_segment, r0.value),
        (0, 0, parts[0].1[0])
    );
    assert!(matches!(
        ds.row(40),
        Err(DatastoreError::NoSuchRow { id: 40, rows: 40 })
    ));
}

#[test]
fn token_ids_beyond_the_vocabulary_are_refused_and_verify_flags_old_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new");
    let mut opts = options(D, KeyDtype::F32);
    opts.fingerprint.vocab_size = Some(49_152);
    let ds = Datastore::create(&dir, opts).unwrap();
    let keys = clustered(10, D, 2, 5);
    let mut vals = values(10, 5);
    ds.append(Keys::F32(&keys), &vals, prov("good")).unwrap();
    let before = snapshot(&dir);
    vals[3] = 60_000;
    let e = ds.append(Keys::F32(&keys), &vals, prov("bad")).unwrap_err();
    assert!(
        matches!(
            e,
            DatastoreError::ValueOutOfVocab {
                row: 3,
                value: 60_000,
                vocab: 49_152
            }
        ),
        "{e}"
    );
    assert_eq!(snapshot(&dir), before, "a refused append changed the store");

    // A store written without a vocabulary in its fingerprint, which later learnt one (as a
    // store imported before the check could): verify names the values file and the row.
    let old = tmp.path().join("old");
    let ds = create(&old, D, KeyDtype::F32);
    ds.append(Keys::F32(&keys), &vals, prov("old")).unwrap();
    assert!(ds.verify().unwrap().is_ok());
    drop(ds);
    let path = old.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["fingerprint"]["vocab_size"] = 49_152.into();
    m.as_object_mut().unwrap().remove("crc32"); // an old manifest has no checksum either
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let report = Datastore::open(&old).unwrap().verify().unwrap();
    assert!(!report.is_ok());
    let problem = &report.problems[0];
    assert!(problem.path.ends_with("segments/0/values.bin"), "{problem}");
    assert!(
        problem.detail.contains("row 3") && problem.detail.contains("60000"),
        "{problem}"
    );
}

#[test]
fn a_search_of_zero_query_rows_answers_nothing_and_does_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = create(tmp.path(), D, KeyDtype::F16);
    ds.append(
        Keys::F32(&clustered(20, D, 2, 6)),
        &values(20, 6),
        prov("a"),
    )
    .unwrap();
    let mut out: Vec<Vec<goodtriever::datastore::Neighbour>> = Vec::new();
    ds.search_into(&[], 4, &SearchParams::default(), &mut out)
        .unwrap();
    assert!(ds
        .search(&[], 4, &SearchParams::default())
        .unwrap()
        .is_empty());
}

#[test]
fn provenance_that_is_too_long_or_not_printable_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F32);
    let keys = clustered(10, D, 2, 8);
    ds.append(Keys::F32(&keys), &values(10, 8), prov("a"))
        .unwrap();
    let before = snapshot(dir);
    let cases = [
        (prov(&"x".repeat(1 << 20)), "tag", "1048576 bytes"),
        (prov("two\nlines"), "tag", "control character"),
        (
            prov("ok").with_label("\u{1b}[31mred"),
            "label",
            "control character",
        ),
        (Provenance::new("s".repeat(5000)), "source", "5000 bytes"),
    ];
    for (p, field, why) in cases {
        let e = ds.append(Keys::F32(&keys), &values(10, 8), p).unwrap_err();
        match &e {
            DatastoreError::BadProvenance { field: f, why: w } => {
                assert_eq!(*f, field, "{e}");
                assert!(w.contains(why), "{e}");
            }
            other => panic!("{field}: {other}"),
        }
    }
    assert_eq!(snapshot(dir), before, "a refused append changed the store");
    assert_eq!(ds.segments().len(), 1);
}

#[test]
fn a_segment_with_any_damaged_byte_is_never_served() {
    for name in ["keys.bin", "values.bin", "index.bin"] {
        for at in [0usize, 1, 7, 4096, usize::MAX] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let ds = create(dir, D, KeyDtype::F16);
            ds.append(
                Keys::F32(&clustered(300, D, 3, 9)),
                &values(300, 9),
                prov("a"),
            )
            .unwrap();
            let path = dir.join("segments/0").join(name);
            let mut bytes = std::fs::read(&path).unwrap();
            let i = at.min(bytes.len() - 1);
            bytes[i] ^= 0x01;
            std::fs::write(&path, &bytes).unwrap();
            // The size is intact, so only the checksum can tell.
            let err = Datastore::open(dir).unwrap_err();
            assert!(
                matches!(err, DatastoreError::Corrupt { .. }),
                "{name}@{i}: {err}"
            );
            assert!(err.to_string().contains(name), "{name}@{i}: {err}");
            assert!(err.to_string().contains("checksum"), "{name}@{i}: {err}");
        }
    }
}

#[test]
fn a_reader_keeps_serving_its_snapshot_when_a_new_segment_is_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let writer = create(dir, D, KeyDtype::F32);
    writer
        .append(
            Keys::F32(&clustered(100, D, 2, 10)),
            &values(100, 10),
            prov("a"),
        )
        .unwrap();
    let reader = Datastore::open(dir).unwrap();
    writer
        .append(
            Keys::F32(&clustered(50, D, 2, 11)),
            &values(50, 11),
            prov("b"),
        )
        .unwrap();
    let path = dir.join("segments/1/values.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let err = reader.refresh().unwrap_err();
    assert!(err.to_string().contains("values.bin"), "{err}");
    assert_eq!(reader.len(), 100, "the damaged segment was swapped in");
    let q = clustered(1, D, 2, 10);
    assert_eq!(
        reader.search(&q, 5, &SearchParams::exact()).unwrap()[0].len(),
        5
    );
}

#[test]
fn the_merge_policy_keeps_few_segments_and_every_row_id() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = create(&tmp.path().join("merged"), D, KeyDtype::F32);
    let plain = create(&tmp.path().join("plain"), D, KeyDtype::F32);
    let policy = goodtriever::datastore::MergePolicy {
        min_segments: 4,
        base_rows: 8,
        max_rows: 1 << 20,
    };
    let base = clustered(40, D, 2, 12);
    let base_values = values(40, 12);
    for ds in [&merged, &plain] {
        ds.append(Keys::F32(&base), &base_values, prov("built"))
            .unwrap();
    }
    let adds = 60;
    let keys = clustered(adds, D, 3, 13);
    let vals = values(adds, 13);
    let mut most = 0;
    for r in 0..adds {
        let (k, v) = (&keys[r * D..(r + 1) * D], &vals[r..r + 1]);
        merged.append(Keys::F32(k), v, prov("one")).unwrap();
        plain.append(Keys::F32(k), v, prov("one")).unwrap();
        while merged.merge_tail(&policy).unwrap().is_some() {}
        most = most.max(merged.segments().len());
    }
    // Levels: < 8, < 32, < 128 rows; fewer than 4 segments per level, plus the built one.
    assert!(most <= 1 + 3 * 3 + 1, "{most} segments");
    assert_eq!(plain.segments().len(), 1 + adds);
    assert_eq!(merged.len(), plain.len());
    // The same rows under the same ids: searches agree exactly.
    let q = clustered(5, D, 3, 14);
    let a = merged.search(&q, 10, &SearchParams::exact()).unwrap();
    let b = plain.search(&q, 10, &SearchParams::exact()).unwrap();
    assert_eq!(a, b);
    for id in [0, 39, 40, 41, 99] {
        assert_eq!(merged.row(id).unwrap().value, plain.row(id).unwrap().value);
    }
    // Every original add is in some merged segment's provenance, once.
    let originals: usize = merged
        .segments()
        .iter()
        .map(|s| s.provenance.merged_from.len().max(1))
        .sum();
    assert_eq!(originals, 1 + adds);
    assert!(merged.verify().unwrap().is_ok());

    // A retired segment at the tail stops merging (until compaction removes it).
    let tail = merged.segments().last().unwrap().id;
    merged.retire(tail).unwrap();
    for r in 0..4 {
        merged
            .append(
                Keys::F32(&keys[r * D..(r + 1) * D]),
                &vals[r..r + 1],
                prov("x"),
            )
            .unwrap();
    }
    let before = merged.segments().len();
    assert!(
        merged.merge_tail(&policy).unwrap().is_some(),
        "four new small segments merge"
    );
    assert_eq!(merged.segments().len(), before - 3);
    assert!(merged.segments().iter().any(|s| s.id == tail && s.retired));
}

#[test]
fn a_manifest_edited_or_damaged_inside_a_string_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = create(dir, D, KeyDtype::F32);
    ds.append(
        Keys::F32(&clustered(20, D, 2, 15)),
        &values(20, 15),
        prov("tagged"),
    )
    .unwrap();
    drop(ds);
    let path = dir.join("manifest.json");
    let good = std::fs::read_to_string(&path).unwrap();
    assert!(
        good.contains("\"crc32\""),
        "the manifest records its checksum"
    );
    // One character inside a string: still valid JSON, so only the checksum can tell.
    let bad = good.replacen("test-model", "tesT-model", 1);
    assert_ne!(bad, good);
    std::fs::write(&path, &bad).unwrap();
    let err = Datastore::open(dir).unwrap_err();
    assert!(matches!(err, DatastoreError::BadManifest { .. }), "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    // Whitespace changes nothing the manifest means: still accepted.
    std::fs::write(&path, good.replace("\n", "\n  ")).unwrap();
    assert_eq!(Datastore::open(dir).unwrap().len(), 20);
}
