//! The engine over real (small) datastores: composition with the rule, batch independence,
//! dense/sparse agreement, thread safety, live refresh, and every bad input it can meet.

use std::path::Path;
use std::sync::Arc;

use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use goodtriever::detox::{AdjustOptions, ControlStore, DetoxError, DetoxScratch, Detoxifier};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::limits::MAX_ROWS;
use goodtriever::rule::{self, Expert, Mode, RuleParams, RuleScratch, SparseRow, TokenPrior};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod wrapped_store;
use wrapped_store::Wrapped;

const DIM: usize = 16;
const VOCAB: usize = 40;

fn fingerprint(dim: usize) -> ModelFingerprint {
    let mut fp = ModelFingerprint::named("tiny", dim);
    fp.vocab_size = Some(VOCAB);
    fp
}

/// Clustered keys: each of `clusters` centres owns a few tokens, so neighbours are meaningful.
fn clustered(
    rng: &mut StdRng,
    rows: usize,
    dim: usize,
    tokens: (u32, u32),
) -> (Vec<f32>, Vec<u32>) {
    let centres: Vec<Vec<f32>> = (0..8)
        .map(|_| (0..dim).map(|_| rng.random_range(-10.0..10.0)).collect())
        .collect();
    let mut keys = Vec::with_capacity(rows * dim);
    let mut values = Vec::with_capacity(rows);
    for i in 0..rows {
        let c = &centres[i % centres.len()];
        keys.extend(c.iter().map(|x| x + rng.random_range(-1.0f32..1.0)));
        values.push(tokens.0 + (i as u32 * 7 + rng.random_range(0..3)) % (tokens.1 - tokens.0));
    }
    (keys, values)
}

fn store(
    dir: &Path,
    key_type: KeyType,
    dim: usize,
    seed: u64,
    tokens: (u32, u32),
) -> Arc<Datastore> {
    let s = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: fingerprint(dim),
            key_type,
            dtype: KeyDtype::F32,
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let (keys, values) = clustered(&mut rng, 300, dim, tokens);
    s.append(Keys::F32(&keys), &values, Provenance::new("test"))
        .unwrap();
    Arc::new(s)
}

struct Fixture {
    _tmp: tempfile::TempDir,
    toxic: Arc<Datastore>,
    nontoxic: Arc<Datastore>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let toxic = store(
        &tmp.path().join("tox"),
        KeyType::FinalHidden,
        DIM,
        1,
        (0, 20),
    );
    let nontoxic = store(
        &tmp.path().join("non"),
        KeyType::FinalHidden,
        DIM,
        2,
        (15, 40),
    );
    Fixture {
        _tmp: tmp,
        toxic,
        nontoxic,
    }
}

fn opts(k: usize) -> AdjustOptions {
    AdjustOptions {
        params: RuleParams {
            k,
            temperature: 5.0,
            ..RuleParams::default()
        },
        mode: Mode::Ensemble,
    }
}

fn engine(f: &Fixture, k: usize) -> Detoxifier {
    Detoxifier::goodtriever(
        f.toxic.clone(),
        f.nontoxic.clone(),
        opts(k),
        SearchParams::exact(),
        None,
    )
    .unwrap()
}

fn queries(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * DIM)
        .map(|_| rng.random_range(-10.0..10.0))
        .collect()
}

fn logits(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * VOCAB)
        .map(|_| rng.random_range(-5.0..5.0))
        .collect()
}

#[test]
fn engine_equals_the_rule_over_exact_neighbours() {
    let f = fixture();
    let detox = engine(&f, 32);
    let q = queries(3, 7);
    let mut scratch = DetoxScratch::default();
    let mut got = Vec::new();
    detox
        .adjust_sparse(&q, &opts(32), &mut scratch, &mut got)
        .unwrap();
    for (row, answer) in got.iter().enumerate() {
        let qr = &q[row * DIM..(row + 1) * DIM];
        let tox = f
            .toxic
            .search(qr, 32, &SearchParams::exact())
            .unwrap()
            .remove(0);
        let non = f
            .nontoxic
            .search(qr, 32, &SearchParams::exact())
            .unwrap()
            .remove(0);
        let experts = [Expert::new(-1.0, &tox[..]), Expert::new(1.0, &non[..])];
        let mut want = SparseRow::default();
        rule::sparse_row(
            Mode::Ensemble,
            &experts,
            &opts(32).params,
            VOCAB,
            &mut RuleScratch::new(),
            &mut want,
        )
        .unwrap();
        assert_eq!(answer, &want, "row {row}");
        assert!(matches!(answer, SparseRow::Bias { pairs, .. } if !pairs.is_empty()));
    }
}

#[test]
fn a_row_in_a_batch_equals_the_same_row_alone() {
    let f = fixture();
    let detox = engine(&f, 16);
    // 20 rows: both forms split the rule over row chunks in parallel (the sparse form from 16).
    let rows = 20;
    let q = queries(rows, 11);
    let z = logits(rows, 12);
    let mut scratch = DetoxScratch::default();
    let mut batch = vec![0.0; rows * VOCAB];
    detox
        .adjust_dense(&q, &z, &opts(16), &mut scratch, &mut batch)
        .unwrap();
    let mut sparse_batch = Vec::new();
    detox
        .adjust_sparse(&q, &opts(16), &mut scratch, &mut sparse_batch)
        .unwrap();
    for row in 0..rows {
        let mut alone = vec![0.0; VOCAB];
        let qr = &q[row * DIM..(row + 1) * DIM];
        detox
            .adjust_dense(
                qr,
                &z[row * VOCAB..(row + 1) * VOCAB],
                &opts(16),
                &mut DetoxScratch::default(),
                &mut alone,
            )
            .unwrap();
        assert_eq!(
            &batch[row * VOCAB..(row + 1) * VOCAB],
            &alone[..],
            "dense row {row}"
        );
        let mut sparse_alone = Vec::new();
        detox
            .adjust_sparse(
                qr,
                &opts(16),
                &mut DetoxScratch::default(),
                &mut sparse_alone,
            )
            .unwrap();
        assert_eq!(sparse_batch[row], sparse_alone[0], "sparse row {row}");
    }
}

#[test]
fn dense_equals_sparse_applied_to_the_logits_in_every_mode() {
    let f = fixture();
    let detox = engine(&f, 24);
    let q = queries(4, 21);
    let z = logits(4, 22);
    for mode in [Mode::Ensemble, Mode::ToxicOnly, Mode::KnnLm] {
        let o = AdjustOptions { mode, ..opts(24) };
        let mut scratch = DetoxScratch::default();
        let mut dense = vec![0.0; 4 * VOCAB];
        detox
            .adjust_dense(&q, &z, &o, &mut scratch, &mut dense)
            .unwrap();
        let mut in_place = z.clone();
        detox
            .adjust_dense_in_place(&q, &mut in_place, &o, &mut scratch)
            .unwrap();
        assert_eq!(in_place, dense, "{mode}: in place equals out of place");
        let mut sparse = Vec::new();
        detox
            .adjust_sparse(&q, &o, &mut scratch, &mut sparse)
            .unwrap();
        for row in 0..4 {
            let mut applied = vec![0.0; VOCAB];
            rule::apply_sparse(
                &z[row * VOCAB..(row + 1) * VOCAB],
                &sparse[row],
                o.params.filter_p,
                &mut RuleScratch::new(),
                &mut applied,
            )
            .unwrap();
            for (a, b) in applied.iter().zip(&dense[row * VOCAB..(row + 1) * VOCAB]) {
                assert!(a == b || (a - b).abs() < 1e-5, "{mode}: {a} vs {b}");
            }
        }
        match (mode, &sparse[0]) {
            (Mode::ToxicOnly, SparseRow::Bias { scale, .. }) => assert_eq!(*scale, 3.0),
            (Mode::KnnLm, SparseRow::Mixture { lambda, .. }) => assert_eq!(*lambda, 0.25),
            (Mode::Ensemble, SparseRow::Bias { scale, .. }) => assert_eq!(*scale, 1.0),
            (m, other) => panic!("{m} answered {other:?}"),
        }
    }
}

#[test]
fn identical_queries_get_identical_answers() {
    let f = fixture();
    let detox = Detoxifier::goodtriever(
        f.toxic.clone(),
        f.nontoxic.clone(),
        opts(32),
        SearchParams::default(),
        None,
    )
    .unwrap();
    let one = queries(1, 31);
    let q: Vec<f32> = one.iter().chain(&one).chain(&one).copied().collect();
    let mut out = Vec::new();
    detox
        .adjust_sparse(&q, &opts(32), &mut DetoxScratch::default(), &mut out)
        .unwrap();
    assert_eq!(out[0], out[1]);
    assert_eq!(out[1], out[2]);
}

#[test]
fn shared_across_threads_gives_the_single_threaded_answers() {
    let f = fixture();
    let detox = Arc::new(engine(&f, 32));
    let q = queries(8, 41);
    let mut want = Vec::new();
    detox
        .adjust_sparse(&q, &opts(32), &mut DetoxScratch::default(), &mut want)
        .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let detox = detox.clone();
            let q = q.clone();
            std::thread::spawn(move || {
                let mut scratch = DetoxScratch::default();
                let mut out = Vec::new();
                for _ in 0..20 {
                    detox
                        .adjust_sparse(&q, &opts(32), &mut scratch, &mut out)
                        .unwrap();
                }
                out
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}

#[test]
fn rows_appended_to_a_store_reach_the_engine_after_refresh() {
    let f = fixture();
    // T on the scale of the squared distances (~4e4 here), so the old neighbours keep some
    // weight: a store whose neighbours all point at one token has no preference at all.
    let o = AdjustOptions {
        params: RuleParams {
            temperature: 4e4,
            ..opts(4).params
        },
        ..opts(4)
    };
    let detox = engine(&f, 4);
    // A query far from every cluster, then a toxic row placed exactly on it, pointing at a
    // token no store had retrieved for it.
    let q = vec![50.0f32; DIM];
    let mut scratch = DetoxScratch::default();
    let mut before = Vec::new();
    detox
        .adjust_sparse(&q, &o, &mut scratch, &mut before)
        .unwrap();
    let appended = Datastore::open(f.toxic.dir()).unwrap();
    appended
        .append(Keys::F32(&q), &[39], Provenance::new("drift"))
        .unwrap();
    assert!(!detox
        .last_neighbours(&scratch, 0, 0)
        .unwrap()
        .iter()
        .any(|n| n.value == 39 && n.dist == 0.0));
    assert!(detox.refresh().unwrap(), "refresh sees the new segment");
    let mut after = Vec::new();
    detox
        .adjust_sparse(&q, &o, &mut scratch, &mut after)
        .unwrap();
    let nearest = detox.last_neighbours(&scratch, 0, 0).unwrap()[0];
    assert_eq!((nearest.value, nearest.dist), (39, 0.0));
    assert_ne!(before, after);
    let SparseRow::Bias { pairs, .. } = &after[0] else {
        panic!()
    };
    let b39 = pairs.iter().find(|p| p.0 == 39).map(|p| p.1).unwrap_or(0.0);
    assert!(b39 < 0.0, "the new toxic token is pushed down: {pairs:?}");
}

#[test]
fn bad_batches_are_refused_with_what_to_fix() {
    let f = fixture();
    let detox = engine(&f, 8);
    let mut scratch = DetoxScratch::default();
    let mut sparse = Vec::new();
    let o = opts(8);
    let err = |r: Result<(), DetoxError>| r.unwrap_err();

    let e = err(detox.adjust_sparse(&[0.0; DIM + 3], &o, &mut scratch, &mut sparse));
    assert!(
        matches!(e, DetoxError::HiddenShape { len: 19, dim: 16 }),
        "{e}"
    );
    assert!(e.to_string().contains("16"), "{e}");

    let e = err(detox.adjust_sparse(&[], &o, &mut scratch, &mut sparse));
    assert!(matches!(e, DetoxError::EmptyBatch));

    let mut nan = vec![0.0f32; 2 * DIM];
    nan[DIM + 3] = f32::NAN;
    let e = err(detox.adjust_sparse(&nan, &o, &mut scratch, &mut sparse));
    assert!(
        matches!(e, DetoxError::NonFiniteHidden { row: 1, index: 3 }),
        "{e}"
    );

    let big = vec![0.0f32; (MAX_ROWS + 1) * DIM];
    let e = err(detox.adjust_sparse(&big, &o, &mut scratch, &mut sparse));
    assert!(matches!(e, DetoxError::TooManyRows { .. }), "{e}");

    let mut out = vec![0.0; VOCAB + 1];
    let e = err(detox.adjust_dense(&[0.0; DIM], &[0.0; VOCAB + 1], &o, &mut scratch, &mut out));
    assert!(matches!(e, DetoxError::LogitsShape { .. }), "{e}");

    for bad in [
        RuleParams { k: 0, ..o.params },
        RuleParams {
            k: 5000,
            ..o.params
        },
        RuleParams {
            temperature: 0.0,
            ..o.params
        },
        RuleParams {
            filter_p: 0.0,
            ..o.params
        },
    ] {
        let bo = AdjustOptions { params: bad, ..o };
        let e = err(detox.adjust_sparse(&[0.0; DIM], &bo, &mut scratch, &mut sparse));
        assert!(matches!(e, DetoxError::Param(_)), "{e}");
    }

    let mut nan_logits = vec![0.0f32; VOCAB];
    nan_logits[5] = f32::NAN;
    let mut out = vec![0.0; VOCAB];
    let e = err(detox.adjust_dense(&[0.0; DIM], &nan_logits, &o, &mut scratch, &mut out));
    assert!(matches!(e, DetoxError::Row { row: 0, .. }), "{e}");

    // After every refusal the engine still answers correctly with the same scratch.
    let q = queries(2, 51);
    detox
        .adjust_sparse(&q, &o, &mut scratch, &mut sparse)
        .unwrap();
    let mut fresh = Vec::new();
    detox
        .adjust_sparse(&q, &o, &mut DetoxScratch::default(), &mut fresh)
        .unwrap();
    assert_eq!(sparse, fresh);
}

#[test]
fn stores_that_do_not_belong_together_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = store(&tmp.path().join("a"), KeyType::FinalHidden, DIM, 1, (0, 20));
    let other_dim = store(
        &tmp.path().join("b"),
        KeyType::FinalHidden,
        DIM * 2,
        2,
        (0, 20),
    );
    let other_key = store(
        &tmp.path().join("c"),
        KeyType::LastFfnInput,
        DIM,
        3,
        (0, 20),
    );
    let empty = Arc::new(
        Datastore::create(
            &tmp.path().join("d"),
            CreateOptions {
                fingerprint: fingerprint(DIM),
                key_type: KeyType::FinalHidden,
                dtype: KeyDtype::F16,
            },
        )
        .unwrap(),
    );
    let mk = |x: &Arc<Datastore>, y: &Arc<Datastore>| {
        Detoxifier::goodtriever(x.clone(), y.clone(), opts(8), SearchParams::exact(), None)
    };
    let e = mk(&a, &other_dim).err().unwrap();
    assert!(
        matches!(e, DetoxError::Incompatible { .. }) && e.to_string().contains("hidden size"),
        "{e}"
    );
    let e = mk(&a, &other_key).err().unwrap();
    assert!(matches!(e, DetoxError::KeyTypeMismatch { .. }), "{e}");
    let e = mk(&a, &empty).err().unwrap();
    assert!(matches!(e, DetoxError::EmptyStore { .. }), "{e}");

    let only_nontoxic = vec![ControlStore {
        name: "non".into(),
        store: a.clone(),
        weight: 1.0,
    }];
    let e = Detoxifier::new(
        only_nontoxic.clone(),
        AdjustOptions {
            mode: Mode::ToxicOnly,
            ..opts(8)
        },
        SearchParams::exact(),
        None,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            DetoxError::ModeNeeds {
                mode: Mode::ToxicOnly,
                ..
            }
        ),
        "{e}"
    );
    // The same stores can serve the ensemble, and a per-call toxic-only request is refused.
    let d = Detoxifier::new(only_nontoxic, opts(8), SearchParams::exact(), None).unwrap();
    let e = d
        .adjust_sparse(
            &[0.0; DIM],
            &AdjustOptions {
                mode: Mode::ToxicOnly,
                ..opts(8)
            },
            &mut DetoxScratch::default(),
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(matches!(e, DetoxError::ModeNeeds { .. }), "{e}");

    assert!(matches!(
        Detoxifier::new(Vec::new(), opts(8), SearchParams::exact(), None),
        Err(DetoxError::NoStores)
    ));
}

#[test]
fn unknown_vocabulary_must_be_given() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Datastore::create(
        tmp.path(),
        CreateOptions {
            fingerprint: ModelFingerprint::named("imported", DIM),
            key_type: KeyType::FinalHidden,
            dtype: KeyDtype::F32,
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let (keys, values) = clustered(&mut rng, 50, DIM, (0, 20));
    s.append(Keys::F32(&keys), &values, Provenance::new("npy"))
        .unwrap();
    let s = Arc::new(s);
    let stores = vec![ControlStore {
        name: "non".into(),
        store: s,
        weight: 1.0,
    }];
    let unknown = Detoxifier::new(stores.clone(), opts(8), SearchParams::exact(), None);
    assert!(matches!(unknown, Err(DetoxError::UnknownVocab)));
    // The error names the flag that fixes it.
    assert!(unknown.err().unwrap().to_string().contains("--vocab-size"));
    let d = Detoxifier::new(stores, opts(8), SearchParams::exact(), Some(20)).unwrap();
    assert_eq!(d.vocab_size(), 20);
}

/// The scratch says how long the last call searched, which the server exports as the `search`
/// phase and subtracts from the call's time for the `rule` phase.
#[test]
fn a_call_reports_its_search_time_within_its_own() {
    let f = fixture();
    let detox = engine(&f, 32);
    let mut scratch = DetoxScratch::default();
    assert_eq!(scratch.last_search_time(), std::time::Duration::ZERO);
    let mut out = Vec::new();
    let q = queries(4, 41);
    let started = std::time::Instant::now();
    detox
        .adjust_sparse(&q, &opts(32), &mut scratch, &mut out)
        .unwrap();
    let total = started.elapsed();
    let search = scratch.last_search_time();
    assert!(search > std::time::Duration::ZERO);
    assert!(search <= total, "{search:?} of {total:?}");
}

fn variant_opts(k: usize) -> AdjustOptions {
    AdjustOptions {
        params: RuleParams {
            gate: 0.75,
            gate_neighbours: 16,
            prior: 0.5,
            ..opts(k).params
        },
        mode: Mode::Ensemble,
    }
}

/// The engine with the gate and the prior equals the rule over the exact neighbours, each
/// store's size and its token prior, which is the smoothed unigram of exactly its live values.
#[test]
fn the_gate_and_the_prior_read_each_stores_size_and_own_token_counts() {
    let f = fixture();
    let o = variant_opts(32);
    let detox = Detoxifier::goodtriever(
        f.toxic.clone(),
        f.nontoxic.clone(),
        o,
        SearchParams::exact(),
        None,
    )
    .unwrap();
    let check = |detox: &Detoxifier| {
        let q = queries(4, 11);
        let mut scratch = DetoxScratch::default();
        let mut got = Vec::new();
        detox.adjust_sparse(&q, &o, &mut scratch, &mut got).unwrap();
        let (tp, np) = (f.toxic.token_prior(), f.nontoxic.token_prior());
        for (row, answer) in got.iter().enumerate() {
            let qr = &q[row * DIM..(row + 1) * DIM];
            let search =
                |s: &Datastore| s.search(qr, 32, &SearchParams::exact()).unwrap().remove(0);
            let (tox, non) = (search(&f.toxic), search(&f.nontoxic));
            let experts = [
                Expert::new(-1.0, &tox[..])
                    .with_rows(f.toxic.len() as u64)
                    .with_prior(tp.log_prior()),
                Expert::new(1.0, &non[..])
                    .with_rows(f.nontoxic.len() as u64)
                    .with_prior(np.log_prior()),
            ];
            let mut want = SparseRow::default();
            rule::sparse_row(
                Mode::Ensemble,
                &experts,
                &o.params,
                VOCAB,
                &mut RuleScratch::new(),
                &mut want,
            )
            .unwrap();
            assert_eq!(answer, &want, "row {row}");
        }
    };
    check(&detox);
    let values = |s: &Datastore| -> Vec<u32> {
        (0..s.len() as u64)
            .map(|id| s.row(id).unwrap().value)
            .collect()
    };
    assert_eq!(
        *f.toxic.token_prior(),
        TokenPrior::from_values([&values(&f.toxic)[..]], VOCAB)
    );

    // An add moves the prior with the rows, and the engine uses the new one.
    let mut rng = StdRng::seed_from_u64(5);
    let (keys, vals) = clustered(&mut rng, 50, DIM, (0, 3));
    f.toxic
        .append(Keys::F32(&keys), &vals, Provenance::new("more"))
        .unwrap();
    assert_eq!(f.toxic.token_prior().rows(), 350);
    assert_eq!(
        *f.toxic.token_prior(),
        TokenPrior::from_values([&values(&f.toxic)[..]], VOCAB)
    );
    check(&detox);
}

/// The fixture's stores with the toxic one behind a backend that keeps no token statistics.
fn remote_toxic_pair(f: &Fixture) -> Vec<ControlStore> {
    vec![
        ControlStore {
            name: "remote-toxic".into(),
            store: Arc::new(Wrapped::no_stats(f.toxic.clone())),
            weight: -1.0,
        },
        ControlStore {
            name: "nontoxic".into(),
            store: f.nontoxic.clone(),
            weight: 1.0,
        },
    ]
}

#[test]
fn variants_the_stores_or_the_mode_cannot_serve_are_refused_before_any_search() {
    let f = fixture();
    let stores = remote_toxic_pair(&f);
    let remote = Detoxifier::new(stores.clone(), opts(8), SearchParams::exact(), None).unwrap();
    let detox = &remote;
    let mut with_prior = opts(8);
    with_prior.params.prior = 1.0;
    let err = detox.check_options(&with_prior).unwrap_err();
    assert!(
        matches!(&err, DetoxError::NoPrior { name } if name == "remote-toxic"),
        "{err}"
    );
    assert!(err.to_string().contains("remote-toxic"), "{err}");
    let mut out = Vec::new();
    assert!(matches!(
        detox.adjust_sparse(
            &queries(1, 1),
            &with_prior,
            &mut DetoxScratch::default(),
            &mut out
        ),
        Err(DetoxError::NoPrior { .. })
    ));
    // As a server default it is refused at start.
    assert!(matches!(
        Detoxifier::new(stores, with_prior, SearchParams::exact(), None),
        Err(DetoxError::NoPrior { .. })
    ));
    // The gate outside the ensemble is the caller's mistake.
    let mut gated = opts(8);
    gated.params.gate = 1.0;
    gated.mode = Mode::ToxicOnly;
    let err = engine(&f, 8).check_options(&gated).unwrap_err();
    assert!(matches!(err, DetoxError::Variant(_)), "{err}");
    // The gate needs no statistics: it works over the remote-like store.
    gated.mode = Mode::Ensemble;
    remote
        .adjust_sparse(
            &queries(2, 3),
            &gated,
            &mut DetoxScratch::default(),
            &mut out,
        )
        .unwrap();
    assert_eq!(out.len(), 2);
}

/// Logits that put nearly all the mass on `token`.
fn peaked(token: u32) -> Vec<f32> {
    let mut z = vec![0.0; VOCAB];
    z[token as usize] = 10.0;
    z
}

/// The fixture's toxic store holds tokens 0..20 and the non-toxic one 15..40, so 0..15 lean
/// toxic: a row peaked on token 3 must be searched, one peaked on token 30 need not be.
#[test]
fn skipped_rows_are_not_searched_and_get_exactly_the_uncontrolled_answer() {
    let f = fixture();
    let counting = [
        Arc::new(Wrapped::new(f.toxic.clone(), true)),
        Arc::new(Wrapped::new(f.nontoxic.clone(), true)),
    ];
    let stores = vec![
        ControlStore {
            name: "toxic".into(),
            store: counting[0].clone(),
            weight: -1.0,
        },
        ControlStore {
            name: "nontoxic".into(),
            store: counting[1].clone(),
            weight: 1.0,
        },
    ];
    let detox = Detoxifier::new(stores, opts(16), SearchParams::exact(), None).unwrap();
    let rows = [3u32, 30, 5, 31, 30];
    let q = queries(rows.len(), 21);
    let z: Vec<f32> = rows.iter().flat_map(|&t| peaked(t)).collect();
    let mut skipping = opts(16);
    skipping.params.skip = 0.01;
    let mut off = opts(16);
    off.params.alpha = 0.0;
    let run = |o: &AdjustOptions, scratch: &mut DetoxScratch| {
        let mut out = vec![0.0; z.len()];
        detox.adjust_dense(&q, &z, o, scratch, &mut out).unwrap();
        out
    };
    let full = run(&opts(16), &mut DetoxScratch::default());
    let uncontrolled = run(&off, &mut DetoxScratch::default());
    let before = counting[0].searched();
    let mut scratch = DetoxScratch::default();
    let skipped = run(&skipping, &mut scratch);
    assert_eq!(scratch.last_skipped(), (5, 3));
    // Only the two rows that give mass to toxic-leaning tokens reached each store.
    assert_eq!(counting[0].searched() - before, 2);
    for (row, &t) in rows.iter().enumerate() {
        let got = &skipped[row * VOCAB..(row + 1) * VOCAB];
        let (want, what) = if t < 15 {
            (&full[row * VOCAB..(row + 1) * VOCAB], "the full control")
        } else {
            (&uncontrolled[row * VOCAB..(row + 1) * VOCAB], "alpha 0")
        };
        assert_eq!(got, want, "row {row} (token {t}) should equal {what}");
        let neighbours = detox.last_neighbours(&scratch, 0, row).unwrap();
        assert_eq!(neighbours.is_empty(), t >= 15, "row {row}");
    }
    // The searched rows kept their own neighbours (moved back to their rows, not shuffled).
    let mut alone = DetoxScratch::default();
    let mut out = vec![0.0; VOCAB];
    detox
        .adjust_dense(
            &q[2 * DIM..3 * DIM],
            &z[2 * VOCAB..3 * VOCAB],
            &opts(16),
            &mut alone,
            &mut out,
        )
        .unwrap();
    assert_eq!(
        detox.last_neighbours(&scratch, 1, 2),
        detox.last_neighbours(&alone, 1, 0)
    );
    // Nothing leans toxic enough at a huge ratio: every row is left alone, with no search.
    let before = counting[1].searched();
    let mut never = skipping;
    never.params.skip_ratio = 1e30;
    let all = run(&never, &mut scratch);
    assert_eq!(scratch.last_skipped(), (5, 5));
    assert_eq!(counting[1].searched(), before);
    assert_eq!(all, uncontrolled);
    // Off (skip 0) is the full control, whatever the ratio.
    let mut zero = never;
    zero.params.skip = 0.0;
    assert_eq!(run(&zero, &mut scratch), full);
    assert_eq!(scratch.last_skipped(), (5, 0));
}

/// A row peaked on token 30 still gives the toxic-leaning tokens 0..15 about 0.07% of its mass,
/// all of it outside the rule's nucleus (filter_p 0.9 keeps token 30 alone): counted over the
/// whole distribution that mass asks for a search, counted in the nucleus it does not.
#[test]
fn counted_in_the_nucleus_leaning_mass_the_nucleus_drops_asks_for_no_search() {
    let f = fixture();
    let detox = engine(&f, 16);
    let rows = [30u32, 3];
    let q = queries(rows.len(), 4);
    let z: Vec<f32> = rows.iter().flat_map(|&t| peaked(t)).collect();
    let run = |o: &AdjustOptions, scratch: &mut DetoxScratch| {
        let mut out = vec![0.0; z.len()];
        detox.adjust_dense(&q, &z, o, scratch, &mut out).unwrap();
        out
    };
    let mut whole = opts(16);
    whole.params.skip = 0.0005;
    let mut in_nucleus = whole;
    in_nucleus.params.skip_in_nucleus = true;
    let mut off = opts(16);
    off.params.alpha = 0.0;
    let full = run(&opts(16), &mut DetoxScratch::default());
    let uncontrolled = run(&off, &mut DetoxScratch::default());
    let mut scratch = DetoxScratch::default();
    assert_eq!(run(&whole, &mut scratch), full);
    assert_eq!(scratch.last_skipped(), (2, 0));
    let got = run(&in_nucleus, &mut scratch);
    assert_eq!(scratch.last_skipped(), (2, 1));
    assert_eq!(got[..VOCAB], uncontrolled[..VOCAB], "row 0 is left alone");
    assert_eq!(got[VOCAB..], full[VOCAB..], "row 1 keeps the full control");
    // With no nucleus (filter_p 1) there is nothing to count inside: the whole distribution.
    let (mut wide, mut wide_whole) = (in_nucleus, whole);
    (wide.params.filter_p, wide_whole.params.filter_p) = (1.0, 1.0);
    assert_eq!(
        run(&wide, &mut scratch),
        run(&wide_whole, &mut DetoxScratch::default())
    );
    assert_eq!(scratch.last_skipped(), (2, 0));
}

#[test]
fn what_leans_toxic_follows_the_stores_as_they_grow() {
    let f = fixture();
    let detox = engine(&f, 16);
    let mut skipping = opts(16);
    skipping.params.skip = 0.01;
    let q = queries(1, 5);
    let z = peaked(30);
    let mut scratch = DetoxScratch::default();
    let mut out = vec![0.0; VOCAB];
    detox
        .adjust_dense(&q, &z, &skipping, &mut scratch, &mut out)
        .unwrap();
    assert_eq!(scratch.last_skipped(), (1, 1));
    // The toxic store learns token 30 (many rows of it): the same scratch must see it.
    let mut rng = StdRng::seed_from_u64(9);
    let (keys, _) = clustered(&mut rng, 400, DIM, (0, 20));
    f.toxic
        .append(Keys::F32(&keys), &[30; 400], Provenance::new("new slur"))
        .unwrap();
    detox.refresh().unwrap();
    detox
        .adjust_dense(&q, &z, &skipping, &mut scratch, &mut out)
        .unwrap();
    assert_eq!(scratch.last_skipped(), (1, 0));
}

#[test]
fn skipping_is_refused_where_it_cannot_decide() {
    let f = fixture();
    let detox = engine(&f, 8);
    let mut skipping = opts(8);
    skipping.params.skip = 0.05;
    // The sparse form carries no logits to decide from.
    let err = detox
        .adjust_sparse(
            &queries(1, 1),
            &skipping,
            &mut DetoxScratch::default(),
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(matches!(err, DetoxError::SkipNeedsLogits), "{err}");
    // Only the ensemble weighs the toxic stores against the non-toxic ones.
    let mut toxic_only = skipping;
    toxic_only.mode = Mode::ToxicOnly;
    let err = detox.check_options(&toxic_only).unwrap_err();
    assert!(matches!(err, DetoxError::Variant(_)), "{err}");
    // A store without token statistics cannot say which tokens lean toxic.
    let stores = remote_toxic_pair(&f);
    let remote = Detoxifier::new(stores, opts(8), SearchParams::exact(), None).unwrap();
    assert!(matches!(
        remote.check_options(&skipping),
        Err(DetoxError::NoPrior { .. })
    ));
    // Out-of-range knobs.
    for (skip, ratio) in [
        (1.0, 4.0),
        (-0.1, 4.0),
        (f32::NAN, 4.0),
        (0.1, 0.5),
        (0.1, f32::INFINITY),
    ] {
        let mut bad = skipping;
        (bad.params.skip, bad.params.skip_ratio) = (skip, ratio);
        assert!(
            matches!(detox.check_options(&bad), Err(DetoxError::Param(_))),
            "skip {skip}, ratio {ratio}"
        );
    }
}
