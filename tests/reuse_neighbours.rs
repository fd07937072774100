//! Reusing a step's neighbours at the next (docs/architecture.md §1.6): the rows that follow
//! the neighbours which predicted the emitted token answer the step instead of a search, only
//! within the last search's neighbourhood, per sequence, and never across a document's end.
//!
//! The stores hold several noisy copies of one path through key space (`path_stores`).

mod path_stores;
mod wrapped_store;

use std::sync::Arc;

use goodtriever::datastore::{Neighbour, SearchParams};
use goodtriever::detox::{AdjustOptions, ControlStore, DetoxError, DetoxScratch, Detoxifier};
use goodtriever::reuse::{ReuseParamError, ReuseParams};
use goodtriever::rule::Mode;
use goodtriever::store::Store;
use path_stores::*;
use wrapped_store::Wrapped;

struct Fixture {
    _tmp: tempfile::TempDir,
    toxic: Arc<Wrapped>,
    nontoxic: Arc<Wrapped>,
}

fn fixture(sources: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let toxic = Arc::new(Wrapped::new(
        store(&tmp.path().join("tox"), 1, sources),
        true,
    ));
    let nontoxic = Arc::new(Wrapped::new(
        store(&tmp.path().join("non"), 2, sources),
        true,
    ));
    Fixture {
        _tmp: tmp,
        toxic,
        nontoxic,
    }
}

fn engine(f: &Fixture) -> Detoxifier {
    let stores = vec![
        ControlStore {
            name: "toxic".into(),
            store: f.toxic.clone(),
            weight: -1.0,
        },
        ControlStore {
            name: "nontoxic".into(),
            store: f.nontoxic.clone(),
            weight: 1.0,
        },
    ];
    Detoxifier::new(stores, opts(), SearchParams::exact(), Some(VOCAB)).unwrap()
}

fn reuse(min: f32, radius: f32, audit: bool) -> ReuseParams {
    ReuseParams { min, radius, audit }
}

/// Searches (query rows) both stores were asked for so far.
fn searches(f: &Fixture) -> (usize, usize) {
    (f.toxic.searched(), f.nontoxic.searched())
}

fn ids(list: &[Neighbour]) -> Vec<u64> {
    let mut v: Vec<u64> = list.iter().map(|n| n.id).collect();
    v.sort_unstable();
    v
}

#[test]
fn successors_are_the_next_rows_of_the_same_documents_with_exact_distances() {
    let f = fixture(true);
    let inner = store(&f._tmp.path().join("probe"), 3, true);
    let q = at(&[4]);
    let mut found = vec![Vec::new()];
    Store::search_into(&*inner, &q, COPIES, &SearchParams::exact(), &mut found).unwrap();
    // The nearest rows are the copies of position 4, and all predicted token(4).
    assert!(found[0].iter().all(|n| n.value == token(4)), "{found:?}");
    let next = at(&[5]);
    let mut out = Vec::new();
    assert!(Store::successors_into(
        &*inner,
        &found[0],
        token(4),
        &next,
        &mut out
    ));
    let expected: Vec<u64> = (0..COPIES as u64).map(|c| c * LEN as u64 + 5).collect();
    assert_eq!(ids(&out), expected);
    for n in &out {
        let row = inner.row(n.id).unwrap();
        assert_eq!(n.value, row.value);
        let d: f32 = row
            .key
            .iter()
            .zip(&next)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        assert!((n.dist - d).abs() <= 1e-4 * d.max(1.0), "{} vs {d}", n.dist);
    }
    // Neighbours that predicted another token point nowhere.
    out.clear();
    Store::successors_into(&*inner, &found[0], token(9), &next, &mut out);
    assert!(out.is_empty());
    // A document's last row has no successor: the next row is another document's first.
    let last = at(&[LEN - 1]);
    Store::search_into(&*inner, &last, COPIES, &SearchParams::exact(), &mut found).unwrap();
    Store::successors_into(&*inner, &found[0], token(LEN - 1), &at(&[0]), &mut out);
    assert!(out.is_empty(), "{out:?}");
    // Ids beyond the store (it shrank since the search) are passed over.
    let stale = [Neighbour {
        id: (COPIES * LEN) as u64 + 3,
        value: token(0),
        dist: 0.0,
    }];
    Store::successors_into(&*inner, &stale, token(0), &next, &mut out);
    assert!(out.is_empty());
}

#[test]
fn a_continuing_sequence_is_answered_from_successors_without_a_search() {
    let f = fixture(true);
    let detox = engine(&f);
    let o = opts();
    let mut scratch = DetoxScratch::default();
    scratch.set_reuse(Some(reuse(1.0, 2.0, false))).unwrap();
    let mut dense = vec![0.0; VOCAB];
    detox
        .adjust_dense(&at(&[3]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(searches(&f), (1, 1));
    assert_eq!(scratch.last_reused(), 0);

    scratch.advance(&[token(3)]);
    detox
        .adjust_dense(&at(&[4]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(searches(&f), (1, 1), "the reused step searched");
    assert_eq!(scratch.last_reused(), 1);
    // The successors are exactly what a full search finds, so the answer is a full search's.
    let mut fresh = DetoxScratch::default();
    let mut expected = vec![0.0; VOCAB];
    detox
        .adjust_dense(&at(&[4]), &logits(1), &o, &mut fresh, &mut expected)
        .unwrap();
    for j in 0..2 {
        let reused = detox.last_neighbours(&scratch, j, 0).unwrap();
        let searched = detox.last_neighbours(&fresh, j, 0).unwrap();
        assert_eq!(reused, searched, "store {j}");
    }
    assert_eq!(dense, expected);
    let stats = scratch.reuse_stats();
    assert_eq!((stats.row_searches, stats.reused), (4, 2));

    // Following keeps going along the path, each step from the last one's successors...
    for t in 5..9 {
        scratch.advance(&[token(t - 1)]);
        detox
            .adjust_dense(&at(&[t]), &logits(1), &o, &mut scratch, &mut dense)
            .unwrap();
        assert_eq!(scratch.last_reused(), 1, "step {t}");
    }
    assert_eq!(searches(&f), (2, 2));
    // ...but a token no neighbour predicted, or a call with no token reported, is searched.
    scratch.advance(&[token(15)]);
    detox
        .adjust_dense(&at(&[9]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!((searches(&f), scratch.last_reused()), ((3, 3), 0));
    detox
        .adjust_dense(&at(&[10]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!((searches(&f), scratch.last_reused()), ((4, 4), 0));
}

#[test]
fn successors_must_stay_within_the_last_search_neighbourhood() {
    let f = fixture(true);
    let detox = engine(&f);
    let o = opts();
    let mut dense = vec![0.0; VOCAB];
    // A jump off the path: the successors of position 3 are far from a query at 12.
    let mut scratch = DetoxScratch::default();
    scratch.set_reuse(Some(reuse(0.5, 4.0, false))).unwrap();
    detox
        .adjust_dense(&at(&[3]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    scratch.advance(&[token(3)]);
    detox
        .adjust_dense(&at(&[12]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 0);
    assert_eq!(searches(&f), (2, 2));
    let nearest = detox.last_neighbours(&scratch, 0, 0).unwrap();
    assert!(nearest.iter().all(|n| n.value == token(12)), "{nearest:?}");
}

#[test]
fn without_sources_a_documents_end_is_caught_by_the_distance_test() {
    let f = fixture(false);
    let detox = engine(&f);
    let o = opts();
    let mut scratch = DetoxScratch::default();
    scratch.set_reuse(Some(reuse(0.5, 1.5, false))).unwrap();
    let mut dense = vec![0.0; VOCAB];
    detox
        .adjust_dense(&at(&[LEN - 1]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    // The rows after the last positions are the next copies' first ones, far from any
    // continuation of the path.
    scratch.advance(&[token(LEN - 1)]);
    let beyond: Vec<f32> = path()[LEN - 1].iter().map(|v| v + 1.0).collect();
    detox
        .adjust_dense(&beyond, &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 0);
    // Within a document the rows still follow one another.
    detox
        .adjust_dense(&at(&[2]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    scratch.advance(&[token(2)]);
    detox
        .adjust_dense(&at(&[3]), &logits(1), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 1);
}

#[test]
fn an_audit_searches_the_reused_rows_and_changes_no_answer() {
    let f = fixture(true);
    let detox = engine(&f);
    let o = opts();
    let run = |audit: bool| {
        let mut scratch = DetoxScratch::default();
        scratch.set_reuse(Some(reuse(0.5, 1.5, audit))).unwrap();
        let mut answers = Vec::new();
        let mut dense = vec![0.0; 2 * VOCAB];
        for t in 2..8 {
            if t > 2 {
                scratch.advance(&[token(t - 1), token(t + 9)]);
            }
            detox
                .adjust_dense(&at(&[t, t + 10]), &logits(2), &o, &mut scratch, &mut dense)
                .unwrap();
            answers.push(dense.clone());
        }
        (answers, scratch.reuse_stats())
    };
    let before = searches(&f);
    let (plain, plain_stats) = run(false);
    let after_plain = searches(&f);
    let (audited, stats) = run(true);
    let after_audit = searches(&f);
    assert_eq!(plain, audited);
    assert_eq!(plain_stats.reused, stats.reused);
    assert_eq!(
        stats.reused,
        2 * 2 * 5,
        "every continuing row of both stores reused"
    );
    // Without the audit only the first step searched; with it every step did.
    assert_eq!(after_plain.0 - before.0, 2);
    assert_eq!(after_audit.0 - after_plain.0, 2 * 6);
    assert_eq!(stats.audited, stats.reused);
    assert_eq!(stats.recall(), 1.0);
    assert_eq!(stats.in_top_k(), 1.0);
    assert!(plain_stats.recall().is_nan(), "nothing audited");
}

#[test]
fn rows_that_leave_the_batch_take_their_memory_with_them() {
    let f = fixture(true);
    let detox = engine(&f);
    let o = opts();
    let mut scratch = DetoxScratch::default();
    scratch.set_reuse(Some(reuse(1.0, 2.0, false))).unwrap();
    let mut dense = vec![0.0; 3 * VOCAB];
    detox
        .adjust_dense(&at(&[2, 7, 12]), &logits(3), &o, &mut scratch, &mut dense)
        .unwrap();
    // The middle sequence finished: rows 0 and 2 go on as rows 0 and 1.
    scratch.keep_rows(&[0, 2]);
    scratch.advance(&[token(2), token(12)]);
    let mut dense = vec![0.0; 2 * VOCAB];
    detox
        .adjust_dense(&at(&[3, 13]), &logits(2), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 2);
    assert_eq!(searches(&f), (3, 3));
    for (row, t) in [(0, 3), (1, 13)] {
        let list = detox.last_neighbours(&scratch, 1, row).unwrap();
        assert!(
            list.iter().all(|n| n.value == token(t)),
            "row {row}: {list:?}"
        );
    }
    // A new generation (no row goes on) searches again.
    scratch.keep_rows(&[]);
    scratch.advance(&[]);
    detox
        .adjust_dense(&at(&[4, 14]), &logits(2), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 0);
    // Out-of-range or unordered rows to keep forget every sequence instead of guessing.
    scratch.keep_rows(&[1, 0]);
    scratch.advance(&[token(4), token(14)]);
    detox
        .adjust_dense(&at(&[5, 15]), &logits(2), &o, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 0);
}

#[test]
fn a_store_that_cannot_follow_its_rows_is_always_searched() {
    let tmp = tempfile::tempdir().unwrap();
    let mut remote = Wrapped::new(store(&tmp.path().join("tox"), 1, true), true);
    remote.follows = false;
    let remote = Arc::new(remote);
    let local = Arc::new(Wrapped::new(store(&tmp.path().join("non"), 2, true), true));
    let detox = Detoxifier::new(
        vec![
            ControlStore {
                name: "remote".into(),
                store: remote.clone(),
                weight: -1.0,
            },
            ControlStore {
                name: "local".into(),
                store: local.clone(),
                weight: 1.0,
            },
        ],
        opts(),
        SearchParams::exact(),
        Some(VOCAB),
    )
    .unwrap();
    let o = opts();
    let mut scratch = DetoxScratch::default();
    scratch.set_reuse(Some(reuse(0.5, 1.5, false))).unwrap();
    let mut dense = vec![0.0; VOCAB];
    for t in 3..6 {
        scratch.advance(&[token(t - 1)]);
        detox
            .adjust_dense(&at(&[t]), &logits(1), &o, &mut scratch, &mut dense)
            .unwrap();
        assert_eq!(scratch.last_reused(), 0);
    }
    // The row is reused only when every store can answer it: both were searched each step.
    assert_eq!((remote.searched(), local.searched()), (3, 3));
    // In the single-store mode over the local store, reuse works.
    let knn = AdjustOptions {
        mode: Mode::KnnLm,
        ..opts()
    };
    detox
        .adjust_dense(&at(&[6]), &logits(1), &knn, &mut scratch, &mut dense)
        .unwrap();
    scratch.advance(&[token(6)]);
    detox
        .adjust_dense(&at(&[7]), &logits(1), &knn, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 1);
    assert_eq!(local.searched(), 4);
}

#[test]
fn bad_reuse_settings_are_refused_and_change_nothing() {
    let mut scratch = DetoxScratch::default();
    scratch.set_reuse(Some(reuse(0.5, 1.5, false))).unwrap();
    for (p, err) in [
        (reuse(0.0, 1.0, false), ReuseParamError::Min(0.0)),
        (reuse(1.5, 1.0, false), ReuseParamError::Min(1.5)),
        (reuse(0.5, 0.0, false), ReuseParamError::Radius(0.0)),
        (reuse(0.5, 9.0, false), ReuseParamError::Radius(9.0)),
    ] {
        assert_eq!(scratch.set_reuse(Some(p)).unwrap_err(), err);
    }
    // The refused settings left the earlier one on.
    let f = fixture(true);
    let detox = engine(&f);
    let mut dense = vec![0.0; VOCAB];
    detox
        .adjust_dense(&at(&[3]), &logits(1), &opts(), &mut scratch, &mut dense)
        .unwrap();
    scratch.advance(&[token(3)]);
    detox
        .adjust_dense(&at(&[4]), &logits(1), &opts(), &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(scratch.last_reused(), 1);
    // The engine's error type carries the setting's message.
    let e: DetoxError = ReuseParamError::Radius(9.0).into();
    assert!(e.to_string().contains("radius"), "{e}");
}
