//! The merge queue seen from the gRPC side: steps that wait for a core share one engine call
//! and still get their own answers (bit-identical to a lone request's), bad steps are refused
//! alone, a leader takes a bounded batch, a cancelled step is not computed, and a
//! current-thread runtime answers through the pool.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Code, Status};

use super::proto;
use super::shared::Shared;
use crate::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
use crate::detox::{AdjustOptions, Detoxifier};
use crate::fingerprint::{KeyType, ModelFingerprint};
use crate::server::convert::f32_bytes;
use crate::server::shared::Limits;
use crate::server::{AdminAuth, Metrics};
use crate::steps::StepEngine;

type Answer = Result<proto::AdjustResponse, Status>;

const DIM: usize = 8;
const VOCAB: usize = 64;

fn store(dir: &std::path::Path, seed: u32) -> Arc<Datastore> {
    let store = Datastore::create(
        dir,
        CreateOptions {
            fingerprint: ModelFingerprint {
                model_id: "merge-test".into(),
                architecture: None,
                hidden_size: DIM,
                vocab_size: Some(VOCAB),
                tokenizer_digest: None,
                weight_digest: None,
            },
            key_type: KeyType::LastFfnInput,
            dtype: KeyDtype::F32,
        },
    )
    .unwrap();
    let rows = 200;
    let keys: Vec<f32> = (0..rows * DIM)
        .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) % 1000)
        .map(|x| x as f32 / 250.0 - 2.0)
        .collect();
    let values: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 7 + seed) % VOCAB as u32)
        .collect();
    store
        .append(Keys::F32(&keys), &values, Provenance::new("test"))
        .unwrap();
    Arc::new(store)
}

fn shared(dir: &std::path::Path) -> Arc<Shared> {
    let mut defaults = AdjustOptions::default();
    defaults.params.k = 16;
    let engine = Detoxifier::goodtriever(
        store(&dir.join("toxic"), 1),
        store(&dir.join("nontoxic"), 2),
        defaults,
        SearchParams::exact(),
        None,
    )
    .unwrap();
    Arc::new(Shared::new(
        Arc::new(engine),
        Arc::new(Metrics::new()),
        Limits {
            max_rows: 8,
            max_message_bytes: 1 << 20,
        },
        AdminAuth::disabled(),
        None,
        watch::channel(false).1,
        2,
    ))
}

fn request(rows: usize, seed: usize) -> proto::AdjustRequest {
    let hidden: Vec<f32> = (0..rows * DIM)
        .map(|i| ((i * 31 + seed * 17) % 97) as f32 / 24.0 - 2.0)
        .collect();
    proto::AdjustRequest {
        hidden: Some(proto::Tensor {
            data: f32_bytes(&hidden),
            dtype: proto::DType::F32 as i32,
            rows: rows as u32,
        }),
        step: seed as u64,
        ..Default::default()
    }
}

fn with_k(mut r: proto::AdjustRequest, k: u32) -> proto::AdjustRequest {
    r.overrides = Some(proto::Overrides {
        k: Some(k),
        ..Default::default()
    });
    r
}

/// The answer without its timing, which differs from call to call.
fn content(mut r: proto::AdjustResponse) -> proto::AdjustResponse {
    r.engine_micros = 0;
    r
}

/// The histogram of requests per engine call, as (calls, requests).
fn engine_calls(s: &Shared) -> (u64, u64) {
    let text = s.metrics.render();
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}")) as u64
    };
    (
        value("goodtriever_merged_requests_count"),
        value("goodtriever_merged_requests_sum"),
    )
}

/// Takes every CPU permit, so that every step waits in the queue.
async fn hold_every_core(s: &Shared) -> tokio::sync::SemaphorePermit<'_> {
    let n = s.steps.permits().available_permits() as u32;
    s.steps.permits().acquire_many(n).await.unwrap()
}

async fn until_waiting(s: &Shared, n: usize) {
    for _ in 0..5000 {
        if s.steps.waiting() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{n} steps never queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_that_wait_for_a_core_share_one_engine_call_and_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = shared(&dir.path().join("merged"));
    let alone = shared(&dir.path().join("alone"));

    let mut reqs: Vec<proto::AdjustRequest> = (0..6).map(|i| request(1 + i % 3, i)).collect();
    // f16 hidden states merge with f32 ones: both are decoded to f32.
    let mut f16 = request(2, 40);
    let values: Vec<u8> = f16
        .hidden
        .as_ref()
        .unwrap()
        .data
        .chunks_exact(4)
        .flat_map(|b| {
            half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
        })
        .collect();
    f16.hidden.as_mut().unwrap().data = values.into();
    f16.hidden.as_mut().unwrap().dtype = proto::DType::F16 as i32;
    reqs.push(f16);
    // Other options: a group of its own.
    reqs.push(with_k(request(2, 50), 4));
    // The dense form: a group of its own.
    let mut dense = request(1, 60);
    dense.logits = Some(proto::Tensor {
        data: f32_bytes(&vec![0.5; VOCAB]),
        dtype: proto::DType::F32 as i32,
        rows: 1,
    });
    reqs.push(dense);
    let good = reqs.len();
    // Bad steps: refused alone, the others still answered.
    let mut nan = request(2, 70);
    let mut bytes = nan.hidden.as_ref().unwrap().data.to_vec();
    bytes[DIM * 4..DIM * 4 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    nan.hidden.as_mut().unwrap().data = bytes.into();
    reqs.push(nan);
    let mut short = request(1, 80);
    short.hidden.as_mut().unwrap().data = f32_bytes(&[1.0; DIM - 1]);
    short.hidden.as_mut().unwrap().rows = 0;
    reqs.push(short);
    reqs.push(with_k(request(1, 90), 0));

    let want: Vec<Answer> = reqs
        .iter()
        .map(|r| alone.adjust(r.clone()).map(content))
        .collect();
    for (i, a) in want[..good].iter().enumerate() {
        assert!(a.is_ok(), "step {i} alone: {a:?}");
    }
    assert!(want[good..].iter().all(|a| a.is_err()));

    let held = hold_every_core(&s).await;
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let s = s.clone();
            tokio::spawn(async move { s.adjust_step(r).await })
        })
        .collect();
    // Steps whose request fails its checks (the short tensor, k = 0) are refused before they
    // queue; the NaN step passes them and is refused when its values are decoded.
    until_waiting(&s, good + 1).await;
    assert_eq!(
        engine_calls(&s),
        (0, 0),
        "nothing computes while every core is busy"
    );
    drop(held);

    for (i, (task, want)) in tasks.into_iter().zip(want).enumerate() {
        let got = task.await.unwrap();
        match (got, want) {
            (Ok(got), Ok(want)) => assert_eq!(content(got), want, "step {i}"),
            (Err(got), Err(want)) => {
                assert_eq!(got.code(), want.code(), "step {i}: {got:?}");
                assert_eq!(got.message(), want.message(), "step {i}");
                assert_ne!(got.code(), Code::Internal, "step {i}: {got:?}");
            }
            (got, want) => panic!("step {i}: got {got:?}, alone {want:?}"),
        }
    }
    // One call for the seven steps with the defaults, one for k = 4, one for the dense form.
    assert_eq!(engine_calls(&s), (3, good as u64));
    assert_eq!(s.steps.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_takes_at_most_merge_steps_from_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = shared(dir.path());
    let cap = StepEngine::<super::adjust_step::GrpcStep>::merge_steps();
    let n = 2 * cap + 3;
    let held = hold_every_core(&s).await;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.adjust_step(request(1, i)).await })
        })
        .collect();
    until_waiting(&s, n).await;
    drop(held);
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().num_rows, 1);
    }
    let (calls, steps) = engine_calls(&s);
    assert_eq!(steps, n as u64);
    assert!(
        calls >= 3,
        "{n} steps in {calls} calls: more than {cap} in one"
    );
    assert!(calls < n as u64, "nothing was merged");
    assert_eq!(s.steps.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_client_left_while_it_waited_is_not_computed() {
    let dir = tempfile::tempdir().unwrap();
    let s = shared(dir.path());
    let held = hold_every_core(&s).await;
    let gone = {
        let s = s.clone();
        tokio::spawn(async move { s.adjust_step(request(1, 1)).await })
    };
    until_waiting(&s, 1).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    let stays = {
        let s = s.clone();
        tokio::spawn(async move { s.adjust_step(request(2, 2)).await })
    };
    until_waiting(&s, 2).await;
    drop(held);
    let answer = stays.await.unwrap().unwrap();
    assert_eq!(answer.num_rows, 2);
    assert_eq!(engine_calls(&s), (1, 1));
}

#[tokio::test(flavor = "current_thread")]
async fn a_current_thread_runtime_answers_through_the_queue_on_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let s = shared(dir.path());
    let want = s.adjust(request(3, 5)).map(content).unwrap();
    let got = s.adjust_step(request(3, 5)).await.map(content).unwrap();
    assert_eq!(got, want);
    assert_eq!(s.steps.waiting(), 0);
}
