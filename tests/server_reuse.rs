//! Reusing neighbours over a gRPC stream (docs/architecture.md §1.6): a stream that asks for
//! reuse and reports the token each row emitted is answered from its rows' successors without
//! a search, gets the answer a full search gives where the successors are the nearest rows,
//! follows its rows when some finish, and every malformed continuation is refused with a clear
//! message; a unary Adjust cannot ask for reuse.

mod path_stores;
mod server_support;
mod wrapped_store;

use std::sync::Arc;

use goodtriever::datastore::SearchParams;
use goodtriever::detox::{ControlStore, DetoxScratch, Detoxifier};
use goodtriever::server::proto::{self, Tensor};
use goodtriever::server::ServeOptions;
use goodtriever::store::Store;
use path_stores::*;
use server_support::{bytes_f32, f32_bytes, http_get, start};
use tonic::Code;
use wrapped_store::Wrapped;

struct Fixture {
    _tmp: tempfile::TempDir,
    toxic: Arc<Wrapped>,
    nontoxic: Arc<Wrapped>,
    /// What the server serves: the stores behind counters.
    engine: Arc<Detoxifier>,
    /// The same stores without counters, for the answers a full search gives.
    reference: Detoxifier,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (tox, non) = (
        store(&tmp.path().join("tox"), 1, true),
        store(&tmp.path().join("non"), 2, true),
    );
    let toxic = Arc::new(Wrapped::new(tox.clone(), true));
    let nontoxic = Arc::new(Wrapped::new(non.clone(), true));
    let detox = |t: Arc<dyn Store>, n: Arc<dyn Store>| {
        let stores = vec![
            ControlStore {
                name: "toxic".into(),
                store: t,
                weight: -1.0,
            },
            ControlStore {
                name: "nontoxic".into(),
                store: n,
                weight: 1.0,
            },
        ];
        Detoxifier::new(stores, opts(), SearchParams::exact(), Some(VOCAB)).unwrap()
    };
    Fixture {
        engine: Arc::new(detox(toxic.clone(), nontoxic.clone())),
        reference: detox(tox, non),
        _tmp: tmp,
        toxic,
        nontoxic,
    }
}

fn tensor(v: &[f32]) -> Option<Tensor> {
    Some(Tensor {
        data: f32_bytes(v).into(),
        dtype: proto::DType::F32 as i32,
        rows: 0,
    })
}

/// A dense step at path positions `ts`, asking for reuse `min` (radius 2) when given.
fn step(n: u64, ts: &[usize], min: Option<f32>, emitted: &[usize]) -> proto::AdjustRequest {
    proto::AdjustRequest {
        hidden: tensor(&at(ts)),
        logits: tensor(&logits(ts.len())),
        step: n,
        overrides: min.map(|m| proto::Overrides {
            reuse: Some(m),
            reuse_radius: Some(2.0),
            ..Default::default()
        }),
        emitted_tokens: emitted.iter().map(|&t| token(t)).collect(),
        ..Default::default()
    }
}

/// What a full search answers for rows at `ts`.
fn full_search(engine: &Detoxifier, ts: &[usize]) -> Vec<f32> {
    let mut out = vec![0.0; ts.len() * VOCAB];
    engine
        .adjust_dense(
            &at(ts),
            &logits(ts.len()),
            engine.defaults(),
            &mut DetoxScratch::default(),
            &mut out,
        )
        .unwrap();
    out
}

fn searches(f: &Fixture) -> (usize, usize) {
    (f.toxic.searched(), f.nontoxic.searched())
}

/// One stream: a sequence walking the path from position 3, then a two-row stream whose
/// first row finishes after one step.
async fn a_stream_walks_the_path_from_successors() {
    let f = fixture();
    let server = start(f.engine.clone(), ServeOptions::default()).await;
    let mut client = server.client().await;

    let mut reqs = vec![step(0, &[3], Some(1.0), &[])];
    reqs.extend((4..9).map(|t| step(t as u64 - 3, &[t], Some(1.0), &[t - 1])));
    let mut answers = client
        .adjust_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut reused = Vec::new();
    let mut t = 3;
    while let Some(resp) = answers.message().await.unwrap() {
        reused.push(resp.rows_reused);
        let params = resp.params.unwrap();
        assert_eq!((params.reuse, params.reuse_radius), (1.0, 2.0));
        // The successors are the copies of the next position: the nearest rows.
        assert_eq!(
            bytes_f32(&resp.log_probs),
            full_search(&f.reference, &[t]),
            "step at {t}"
        );
        t += 1;
    }
    assert_eq!(reused, [0, 1, 1, 1, 1, 1]);
    assert_eq!(searches(&f), (1, 1), "only the first step searched");

    // Two sequences; the first finishes, the second continues as the only row.
    let first = step(0, &[3, 10], Some(1.0), &[]);
    let mut second = step(1, &[11], Some(1.0), &[10]);
    second.continued_rows = vec![1];
    let mut answers = client
        .adjust_stream(tokio_stream::iter(vec![first, second]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answers.message().await.unwrap().unwrap().rows_reused, 0);
    let resp = answers.message().await.unwrap().unwrap();
    assert_eq!(resp.rows_reused, 1);
    assert_eq!(bytes_f32(&resp.log_probs), full_search(&f.reference, &[11]));
    assert_eq!(
        searches(&f),
        (3, 3),
        "the second stream searched its first step's two rows"
    );

    // The same walk without reuse searches every step, and reports nothing reused.
    let plain: Vec<_> = (3..6).map(|t| step(t as u64, &[t], None, &[])).collect();
    let mut answers = client
        .adjust_stream(tokio_stream::iter(plain))
        .await
        .unwrap()
        .into_inner();
    while let Some(resp) = answers.message().await.unwrap() {
        assert_eq!(resp.rows_reused, 0);
        assert_eq!(resp.params.unwrap().reuse, 0.0);
    }
    assert_eq!(searches(&f), (6, 6));

    // The metrics count the reusing steps' rows and the ones not searched.
    let metrics = http_get(server.metrics_addr, "/metrics").await;
    for line in [
        "goodtriever_reuse_rows_total 9",
        "goodtriever_reused_rows_total 6",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reusing_stream_is_answered_from_successors() {
    a_stream_walks_the_path_from_successors().await;
}

/// On a current-thread runtime a reusing step computes on the rayon pool with the stream's
/// buffers, which must come back for the next step.
#[tokio::test(flavor = "current_thread")]
async fn a_reusing_stream_works_on_a_current_thread_runtime() {
    a_stream_walks_the_path_from_successors().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_continuation_is_refused_and_the_server_keeps_serving() {
    let f = fixture();
    let server = start(f.engine.clone(), ServeOptions::default()).await;
    let mut client = server.client().await;
    let ok = || step(0, &[3, 10], Some(1.0), &[]);
    let with = |emitted: &[usize], continued: &[u32], rows: &[usize]| {
        let mut r = step(1, rows, Some(1.0), emitted);
        r.continued_rows = continued.to_vec();
        r
    };
    let mut out_of_vocab = with(&[3, 10], &[], &[4, 11]);
    out_of_vocab.emitted_tokens[1] = VOCAB as u32;
    let mut no_reuse = with(&[3, 10], &[], &[4, 11]);
    no_reuse.overrides = None;
    let mut radius_only = step(1, &[4, 11], None, &[]);
    radius_only.overrides = Some(proto::Overrides {
        reuse_radius: Some(1.0),
        ..Default::default()
    });
    let mut too_strict = step(1, &[4, 11], Some(1.5), &[]);
    too_strict.overrides.as_mut().unwrap().reuse = Some(1.5);
    let cases: Vec<(
        &str,
        Option<proto::AdjustRequest>,
        proto::AdjustRequest,
        &str,
    )> = vec![
        (
            "first step",
            None,
            step(0, &[3], Some(1.0), &[2]),
            "there is none",
        ),
        (
            "count",
            Some(ok()),
            with(&[3], &[], &[4, 11]),
            "emitted_tokens has 1 ids for 2 hidden rows",
        ),
        ("vocab", Some(ok()), out_of_vocab, "outside the vocabulary"),
        (
            "rows changed",
            Some(ok()),
            with(&[10], &[], &[11]),
            "name the previous rows that continue",
        ),
        (
            "beyond",
            Some(ok()),
            with(&[10], &[2], &[11]),
            "names row 2, but the stream's previous step had 2 rows",
        ),
        (
            "order",
            Some(ok()),
            with(&[10, 3], &[1, 0], &[11, 4]),
            "strictly ascending",
        ),
        (
            "continued without emitted",
            Some(ok()),
            with(&[], &[1], &[11]),
            "without emitted_tokens",
        ),
        (
            "emitted without reuse",
            Some(ok()),
            no_reuse,
            "only read with overrides.reuse",
        ),
        (
            "radius without reuse",
            Some(ok()),
            radius_only,
            "reuse_radius is set without overrides.reuse",
        ),
        (
            "range",
            Some(ok()),
            too_strict,
            "reuse min must be in (0, 1]",
        ),
    ];
    for (what, first, bad, says) in cases {
        let mut reqs: Vec<_> = first.into_iter().collect();
        let good = reqs.len();
        reqs.push(bad);
        let mut answers = client
            .adjust_stream(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..good {
            assert!(answers.message().await.unwrap().is_some(), "{what}");
        }
        let err = answers.message().await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
        assert!(err.message().contains(says), "{what}: {}", err.message());
    }

    // A unary Adjust has no previous step to follow.
    let err = client
        .adjust(step(0, &[3], Some(1.0), &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("needs AdjustStream"),
        "{}",
        err.message()
    );
    // Still serving.
    let resp = client
        .adjust(step(0, &[3], None, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bytes_f32(&resp.log_probs), full_search(&f.reference, &[3]));
    server.stop().await;
}
