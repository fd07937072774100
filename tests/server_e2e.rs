//! The gRPC server end to end, in this process, on a free loopback port: answers equal the
//! in-process engine, streams answer in order, writes are seen at once, every bad input gets
//! the right code and leaves the server serving, and the operational surfaces (health,
//! reflection, metrics) work.

mod server_support;

use std::sync::Arc;

use goodtriever::detox::{AdjustOptions, DetoxScratch};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::rule::{Mode, SparseRow};
use goodtriever::server::convert;
use goodtriever::server::encoder::{EncodeError, PairSink};
use goodtriever::server::proto::{self, Tensor};
use goodtriever::server::{AdminAuth, Limits, ServeOptions, Server, TextEncoder};
use half::{bf16, f16};
use server_support::*;
use tonic::{Code, Request};

const TOKEN: &str = "test-admin-token";

fn hidden_tensor(v: &[f32]) -> Option<Tensor> {
    Some(Tensor {
        data: f32_bytes(v).into(),
        dtype: proto::DType::F32 as i32,
        rows: 0,
    })
}

fn logits_tensor(v: &[f32]) -> Option<Tensor> {
    hidden_tensor(v)
}

fn sparse_request(hidden: &[f32]) -> proto::AdjustRequest {
    proto::AdjustRequest {
        hidden: hidden_tensor(hidden),
        ..Default::default()
    }
}

/// Queries near the stores' data: rows of the stores' own generator, slightly moved.
fn queries(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    rng.vec(rows * DIM, 3.0)
}

fn admin<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn opts_with_admin() -> ServeOptions {
    ServeOptions {
        auth: AdminAuth::with_token(TOKEN).unwrap(),
        ..Default::default()
    }
}

/// The (token, value) pairs of a sparse answer row.
fn pairs(row: &proto::SparseRow) -> Vec<(u32, f32)> {
    match convert::sparse_row_from_proto(row).unwrap() {
        SparseRow::Bias { pairs, .. } => pairs,
        SparseRow::Mixture { log_probs, .. } => log_probs,
    }
}

fn assert_same_sparse(got: &[proto::SparseRow], want: &[SparseRow]) {
    let got: Vec<SparseRow> = got
        .iter()
        .map(|r| convert::sparse_row_from_proto(r).unwrap())
        .collect();
    assert_eq!(got, want);
}

/// `serve --skip`: a server default applies where it can, to dense requests; sparse requests
/// (no logits to decide from) are searched on every row rather than refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_default_skip_applies_to_dense_requests_and_spares_sparse_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut skipping = defaults();
    skipping.params.skip = 0.5;
    let engine = engine(dir.path(), skipping);
    let server = start(engine.clone(), ServeOptions::default()).await;
    let mut client = server.client().await;
    let mut scratch = DetoxScratch::default();
    let rows = 4;
    let hidden = queries(rows, 31);
    let logits = Rng::new(32).vec(rows * VOCAB, 6.0);

    let resp = client
        .adjust(sparse_request(&hidden))
        .await
        .unwrap()
        .into_inner();
    let mut every_row = skipping;
    every_row.params.skip = 0.0;
    let mut want = Vec::new();
    engine
        .adjust_sparse(&hidden, &every_row, &mut scratch, &mut want)
        .unwrap();
    assert_same_sparse(&resp.rows, &want);

    let resp = client
        .adjust(proto::AdjustRequest {
            hidden: hidden_tensor(&hidden),
            logits: logits_tensor(&logits),
            form: proto::ResponseForm::Dense as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut dense = vec![0.0; rows * VOCAB];
    engine
        .adjust_dense(&hidden, &logits, &skipping, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(bytes_f32(&resp.log_probs), dense);
    assert_eq!(resp.params.unwrap().skip, 0.5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_and_dense_equal_the_in_process_engine() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let server = start(engine.clone(), ServeOptions::default()).await;
    let mut client = server.client().await;
    let mut scratch = DetoxScratch::default();

    let rows = 5;
    let hidden = queries(rows, 7);
    let logits = Rng::new(8).vec(rows * VOCAB, 6.0);

    // Sparse, with the server's defaults.
    let resp = client
        .adjust(sparse_request(&hidden))
        .await
        .unwrap()
        .into_inner();
    let mut want = Vec::new();
    engine
        .adjust_sparse(&hidden, engine.defaults(), &mut scratch, &mut want)
        .unwrap();
    assert!(want
        .iter()
        .any(|r| matches!(r, SparseRow::Bias { pairs, .. } if !pairs.is_empty())));
    assert_same_sparse(&resp.rows, &want);
    assert_eq!(resp.num_rows, rows as u32);
    assert_eq!(resp.params.unwrap().k, 32);

    // Dense, f32 logits.
    let resp = client
        .adjust(proto::AdjustRequest {
            hidden: hidden_tensor(&hidden),
            logits: logits_tensor(&logits),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut dense = vec![0.0; logits.len()];
    engine
        .adjust_dense(
            &hidden,
            &logits,
            engine.defaults(),
            &mut scratch,
            &mut dense,
        )
        .unwrap();
    let got = bytes_f32(&resp.log_probs);
    assert_eq!(got.len(), dense.len());
    assert!(got
        .iter()
        .zip(&dense)
        .all(|(a, b)| a.to_bits() == b.to_bits()));

    // Overrides (the prior correction among them), f16 hidden and bf16 logits: equal to the
    // engine on the same rounded values.
    let hidden16: Vec<f16> = hidden.iter().map(|&x| f16::from_f32(x)).collect();
    let logits16: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
    let overrides = proto::Overrides {
        alpha: Some(0.7),
        temperature: Some(5.0),
        k: Some(8),
        filter_p: Some(0.8),
        mode: proto::Mode::ToxicOnly as i32,
        lambda: None,
        gate: None,
        gate_neighbours: None,
        prior: Some(0.5),
        skip: None,
        skip_ratio: None,
        skip_in_nucleus: None,
        reuse: None,
        reuse_radius: None,
    };
    let resp = client
        .adjust(proto::AdjustRequest {
            hidden: Some(Tensor {
                data: hidden16.iter().flat_map(|x| x.to_le_bytes()).collect(),
                dtype: proto::DType::F16 as i32,
                rows: rows as u32,
            }),
            logits: Some(Tensor {
                data: logits16.iter().flat_map(|x| x.to_le_bytes()).collect(),
                dtype: proto::DType::Bf16 as i32,
                rows: rows as u32,
            }),
            overrides: Some(overrides),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut opts = AdjustOptions {
        mode: Mode::ToxicOnly,
        ..*engine.defaults()
    };
    opts.params.alpha = 0.7;
    opts.params.temperature = 5.0;
    opts.params.k = 8;
    opts.params.filter_p = 0.8;
    opts.params.prior = 0.5;
    let h: Vec<f32> = hidden16.iter().map(|x| x.to_f32()).collect();
    let l: Vec<f32> = logits16.iter().map(|x| x.to_f32()).collect();
    engine
        .adjust_dense(&h, &l, &opts, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(bytes_f32(&resp.log_probs), dense);
    assert_eq!(resp.params.unwrap().mode, proto::Mode::ToxicOnly as i32);

    // Sparse with the same overrides carries the toxic-only scale.
    let resp = client
        .adjust(proto::AdjustRequest {
            hidden: hidden_tensor(&h),
            overrides: Some(overrides),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    engine
        .adjust_sparse(&h, &opts, &mut scratch, &mut want)
        .unwrap();
    assert_same_sparse(&resp.rows, &want);
    assert_eq!(resp.rows[0].scale, 1.7);

    // Skipping (dense form): the server decides per row as the engine does, and echoes it.
    let skipping = proto::Overrides {
        skip: Some(0.5),
        skip_ratio: Some(2.0),
        skip_in_nucleus: Some(true),
        ..Default::default()
    };
    let resp = client
        .adjust(proto::AdjustRequest {
            hidden: hidden_tensor(&h),
            logits: logits_tensor(&l),
            form: proto::ResponseForm::Dense as i32,
            overrides: Some(skipping),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut opts = *engine.defaults();
    (opts.params.skip, opts.params.skip_ratio) = (0.5, 2.0);
    opts.params.skip_in_nucleus = true;
    engine
        .adjust_dense(&h, &l, &opts, &mut scratch, &mut dense)
        .unwrap();
    assert_eq!(bytes_f32(&resp.log_probs), dense);
    let echoed = resp.params.unwrap();
    assert_eq!(
        (echoed.skip, echoed.skip_ratio, echoed.skip_in_nucleus),
        (0.5, 2.0, true)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_100_steps_answers_in_order() {
    stream_answers_in_order_and_stops_at_a_bad_step().await;
}

/// On a current-thread runtime the steps cannot compute on the polling thread; they run on
/// the rayon pool, through the stream's other path.
#[tokio::test(flavor = "current_thread")]
async fn a_stream_answers_in_order_on_a_current_thread_runtime() {
    stream_answers_in_order_and_stops_at_a_bad_step().await;
}

async fn stream_answers_in_order_and_stops_at_a_bad_step() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let server = start(engine.clone(), ServeOptions::default()).await;
    let mut client = server.client().await;

    let steps = 100u64;
    let all: Vec<Vec<f32>> = (0..steps).map(|i| queries(1, 100 + i)).collect();
    // Send every step at once: the server must still answer them one by one, in order.
    let requests: Vec<proto::AdjustRequest> = all
        .iter()
        .enumerate()
        .map(|(i, h)| proto::AdjustRequest {
            step: i as u64,
            ..sparse_request(h)
        })
        .collect();
    let mut inbound = client
        .adjust_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut scratch = DetoxScratch::default();
    let mut want = Vec::new();
    let mut n = 0u64;
    while let Some(resp) = inbound.message().await.unwrap() {
        assert_eq!(resp.step, n, "answers out of order");
        engine
            .adjust_sparse(&all[n as usize], engine.defaults(), &mut scratch, &mut want)
            .unwrap();
        assert_same_sparse(&resp.rows, &want);
        n += 1;
    }
    assert_eq!(n, steps);

    // A bad step ends the stream with its code and names the step.
    let mut bad = sparse_request(&all[0]);
    bad.step = 1;
    bad.hidden.as_mut().unwrap().data.truncate(4 * (DIM - 1));
    let mut inbound = client
        .adjust_stream(tokio_stream::iter(vec![sparse_request(&all[0]), bad]))
        .await
        .unwrap()
        .into_inner();
    assert!(inbound.message().await.unwrap().is_some());
    let err = inbound.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("step 1:"), "{}", err.message());
    server.stop().await;
}

/// Many streams and unary calls at once, with two sets of options, on a server that computes
/// one step at a time: steps that wait are merged into shared engine calls, and every step
/// still gets exactly the answer the in-process engine gives its own rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_beyond_the_cores_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let opts = ServeOptions {
        concurrent_steps: 1,
        ..Default::default()
    };
    let server = start(engine.clone(), opts).await;
    let (streams, steps) = (24usize, 30u64);
    let other = {
        let mut o = *engine.defaults();
        o.params.k = 8;
        o
    };
    let request = |stream: usize, step: u64| {
        let rows = 1 + (stream + step as usize) % 3;
        let hidden = queries(rows, 10_000 + stream as u64 * 1000 + step);
        let mut r = proto::AdjustRequest {
            step,
            ..sparse_request(&hidden)
        };
        if stream % 2 == 1 {
            r.overrides = Some(proto::Overrides {
                k: Some(8),
                ..Default::default()
            });
        }
        (r, hidden)
    };
    let mut tasks = Vec::new();
    for stream in 0..streams {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let (reqs, hidden): (Vec<_>, Vec<_>) = (0..steps).map(|i| request(stream, i)).unzip();
            let mut answers = Vec::new();
            if stream % 4 == 0 {
                // Unary calls, all in flight at once.
                let calls: Vec<_> = reqs
                    .into_iter()
                    .map(|r| {
                        let mut c = client.clone();
                        tokio::spawn(async move { c.adjust(r).await.unwrap().into_inner() })
                    })
                    .collect();
                for call in calls {
                    answers.push(call.await.unwrap());
                }
            } else {
                let mut inbound = client
                    .adjust_stream(tokio_stream::iter(reqs))
                    .await
                    .unwrap()
                    .into_inner();
                while let Some(resp) = inbound.message().await.unwrap() {
                    answers.push(resp);
                }
            }
            (stream, hidden, answers)
        }));
    }
    let mut scratch = DetoxScratch::default();
    let mut want = Vec::new();
    let mut total = 0u64;
    for task in tasks {
        let (stream, hidden, answers) = task.await.unwrap();
        assert_eq!(answers.len(), steps as usize, "stream {stream}");
        let opts = if stream % 2 == 1 {
            &other
        } else {
            engine.defaults()
        };
        for (i, (resp, h)) in answers.iter().zip(&hidden).enumerate() {
            assert_eq!(resp.step, i as u64, "stream {stream}: answers out of order");
            assert_eq!(resp.params.unwrap().k, opts.params.k as u32);
            engine
                .adjust_sparse(h, opts, &mut scratch, &mut want)
                .unwrap();
            assert_same_sparse(&resp.rows, &want);
            total += 1;
        }
    }
    // Each step went through exactly one engine call, and with one step computing at a time
    // while 24 clients send, some calls answered several.
    let text = http_get(server.metrics_addr, "/metrics").await;
    let value = |name: &str| {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        v.trim().parse::<f64>().unwrap() as u64
    };
    assert_eq!(value("goodtriever_merged_requests_sum "), total);
    let calls = value("goodtriever_merged_requests_count ");
    assert!(
        calls < total,
        "no steps were merged: {calls} engine calls for {total} steps"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_an_open_stream_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let server = start(engine, ServeOptions::default()).await;
    let mut client = server.client().await;

    // The client keeps its side open: it is between two decoding steps when the server stops.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(sparse_request(&queries(1, 5))).await.unwrap();
    let mut answers = client
        .adjust_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some());

    let stopping = tokio::spawn(server.stop());
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), answers.message())
        .await
        .expect("the stream ends promptly")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("shutting down"), "{}", err.message());
    drop(tx);
    tokio::time::timeout(std::time::Duration::from_secs(20), stopping)
        .await
        .expect("the server stops once its streams ended")
        .unwrap();
}

/// Token of the rows added by the write tests, outside the bands the seed data uses.
const NEW_TOKEN: u32 = 197;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_single_row_adds_are_merged_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let server = start(engine.clone(), opts_with_admin()).await;
    let mut client = server.client().await;
    let adds = 40u32;
    let key = |r: u32| -> Vec<f32> { (0..DIM).map(|i| 60.0 + r as f32 + i as f32 * 0.5).collect() };
    for r in 0..adds {
        client
            .add_examples(admin(
                proto::AddExamplesRequest {
                    store: "toxic".into(),
                    hidden: Some(Tensor {
                        data: f32_bytes(&key(r)).into(),
                        dtype: proto::DType::F32 as i32,
                        rows: 1,
                    }),
                    next_tokens: vec![r % 7],
                    ..Default::default()
                },
                TOKEN,
            ))
            .await
            .unwrap();
    }
    // Merges run in the background after each add; wait for them to settle.
    let store = &engine.stores()[0].store;
    let mut segments = store.segments().iter().filter(|s| !s.retired).count();
    for _ in 0..200 {
        if segments < 8 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        segments = store.segments().iter().filter(|s| !s.retired).count();
    }
    // The default policy: fewer than 8 segments per size level, besides the seed segment.
    assert!(
        segments <= 1 + 7 + 7,
        "{segments} live segments after {adds} adds"
    );
    assert!(segments < 1 + adds as usize, "nothing was merged");
    assert_eq!(store.len(), 300 + adds as usize);
    // Every acknowledged row is on disk, under its own key.
    let reopened = goodtriever::datastore::Datastore::open(&dir.path().join("toxic")).unwrap();
    assert_eq!(reopened.len(), 300 + adds as usize);
    for r in 0..adds {
        let hit = reopened.search(&key(r), 1, &goodtriever::datastore::SearchParams::exact());
        let hit = hit.unwrap().remove(0).remove(0);
        assert_eq!((hit.dist, hit.value), (0.0, r % 7), "row {r}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_examples_then_adjust_sees_the_new_rows() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let server = start(engine.clone(), opts_with_admin()).await;
    let mut client = server.client().await;

    // A query far from the seed clusters.
    let q: Vec<f32> = (0..DIM).map(|i| 40.0 + i as f32).collect();
    let before = client
        .adjust(sparse_request(&q))
        .await
        .unwrap()
        .into_inner();
    assert!(!pairs(&before.rows[0]).iter().any(|p| p.0 == NEW_TOKEN));

    // Rows right at the query into the non-toxic store (f16 keys): four in five predict
    // NEW_TOKEN, the rest NEW_TOKEN + 1, so NEW_TOKEN gains mass over the store's minimum.
    let n = 40;
    let keys: Vec<f16> = (0..n)
        .flat_map(|r| q.iter().map(move |x| f16::from_f32(x + 0.01 * r as f32)))
        .collect();
    let resp = client
        .add_examples(admin(
            proto::AddExamplesRequest {
                store: "nontoxic".into(),
                hidden: Some(Tensor {
                    data: keys.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    dtype: proto::DType::F16 as i32,
                    rows: n,
                }),
                next_tokens: (0..n).map(|r| NEW_TOKEN + u32::from(r % 5 == 4)).collect(),
                source: "test-drift".into(),
                tag: "week-2".into(),
            },
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.rows_added, n as u64);
    let store = resp.store.unwrap();
    assert_eq!(store.rows, 300 + n as u64);
    assert_eq!(store.segments.len(), 2);
    let seg = store
        .segments
        .iter()
        .find(|s| s.id == resp.segment_id)
        .unwrap();
    assert_eq!(
        (seg.source.as_str(), seg.tag.as_str(), seg.label.as_str()),
        ("test-drift", "week-2", "nontoxic")
    );

    let after = client
        .adjust(sparse_request(&q))
        .await
        .unwrap()
        .into_inner();
    let &(_, bias) = pairs(&after.rows[0])
        .iter()
        .find(|p| p.0 == NEW_TOKEN)
        .expect("the new rows are retrieved");
    assert!(bias > 0.0, "non-toxic rows push their token up");

    // The rows are on disk: a fresh handle sees them.
    let reopened = goodtriever::datastore::Datastore::open(&dir.path().join("nontoxic")).unwrap();
    assert_eq!(reopened.len(), 300 + n as usize);
    let info = client
        .info(proto::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.writes_enabled);
    assert!(!info.has_model);
    assert_eq!(info.model.unwrap().hidden_size, DIM as u32);
    server.stop().await;
}

/// A deterministic stand-in for the language model: one row per character after the first,
/// keyed by the character code, predicting the next character's code.
struct FakeEncoder(ModelFingerprint);

impl TextEncoder for FakeEncoder {
    fn fingerprint(&self) -> ModelFingerprint {
        self.0.clone()
    }
    fn encode(
        &self,
        text: &str,
        _key_type: KeyType,
        on_pair: &mut PairSink<'_>,
    ) -> Result<(), EncodeError> {
        let codes: Vec<u32> = text.bytes().map(|b| b as u32 % VOCAB as u32).collect();
        if codes.len() < 2 {
            return Err(EncodeError::Input("too short".into()));
        }
        for (i, w) in codes.windows(2).enumerate() {
            on_pair(&[w[0] as f32; DIM], w[1], Some((i as u32, i as u32 + 1)));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_texts_runs_the_encoder_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let mut opts = opts_with_admin();
    opts.encoder = Some(Arc::new(FakeEncoder(fingerprint())));
    let server = start(engine.clone(), opts).await;
    let mut client = server.client().await;
    let resp = client
        .add_texts(admin(
            proto::AddTextsRequest {
                store: "toxic".into(),
                texts: vec!["abcd".into(), "xyz".into()],
                source: String::new(),
                tag: String::new(),
            },
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.rows_added, 5);
    assert_eq!(engine.stores()[0].store.len(), 305);
    let seg = resp.store.unwrap().segments.pop().unwrap();
    assert_eq!(seg.source, "grpc:AddTexts");
    let err = client
        .add_texts(admin(
            proto::AddTextsRequest {
                store: "toxic".into(),
                texts: vec!["ok text".into(), "a".into()],
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("texts[1]"), "{}", err.message());
    assert_eq!(
        engine.stores()[0].store.len(),
        305,
        "a failed request adds nothing"
    );
    server.stop().await;

    // A model for another hidden size is refused at startup.
    let other = ModelFingerprint::named("tiny-test", DIM * 2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = ServeOptions {
        encoder: Some(Arc::new(FakeEncoder(other))),
        ..Default::default()
    };
    let err = Server::from_listeners(engine, opts, listener, None)
        .err()
        .expect("mismatched model refused");
    assert!(err.to_string().contains("hidden size"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_the_right_code_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let limit = 64 << 10;
    let opts = ServeOptions {
        limits: Limits {
            max_rows: 8,
            max_message_bytes: limit,
        },
        ..opts_with_admin()
    };
    let server = start(engine.clone(), opts).await;
    let mut client = server.client().await;
    let good = queries(2, 3);
    let logits = Rng::new(4).vec(2 * VOCAB, 3.0);

    let with = |f: &dyn Fn(&mut proto::AdjustRequest)| {
        let mut r = sparse_request(&good);
        f(&mut r);
        r
    };
    let mut nan = good.clone();
    nan[DIM + 3] = f32::NAN;
    let mut huge = good.clone();
    huge[DIM + 3] = 3e38;
    let alternating: Vec<f32> = (0..2 * VOCAB)
        .map(|i| if i % 2 == 0 { 3e38 } else { -3e38 })
        .collect();
    let mut cases: Vec<(&str, proto::AdjustRequest, Code, &str)> = vec![
        (
            "a finite but huge hidden value",
            sparse_request(&huge),
            Code::InvalidArgument,
            "beyond",
        ),
        (
            "logits alternating between ±3e38",
            with(&|r| {
                r.logits = logits_tensor(&alternating);
                r.form = proto::ResponseForm::Dense as i32;
            }),
            Code::InvalidArgument,
            "raw logits",
        ),
        (
            "a finite but huge alpha",
            with(&|r| {
                r.overrides = Some(proto::Overrides {
                    alpha: Some(3e38),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "alpha must be a number between",
        ),
        (
            "wrong hidden size",
            sparse_request(&good[..DIM + 1]),
            Code::InvalidArgument,
            "whole number of rows",
        ),
        ("NaN", sparse_request(&nan), Code::InvalidArgument, "NaN"),
        (
            "logits of the wrong vocabulary size",
            with(&|r| r.logits = logits_tensor(&logits[..2 * VOCAB - 2])),
            Code::InvalidArgument,
            "logits has",
        ),
        (
            "logits for fewer rows",
            with(&|r| r.logits = logits_tensor(&logits[..VOCAB])),
            Code::InvalidArgument,
            "one logits row per hidden row",
        ),
        (
            "empty batch",
            sparse_request(&[]),
            Code::InvalidArgument,
            "at least one row",
        ),
        (
            "no hidden at all",
            proto::AdjustRequest::default(),
            Code::InvalidArgument,
            "hidden is missing",
        ),
        (
            "too many rows",
            sparse_request(&queries(9, 5)),
            Code::ResourceExhausted,
            "--max-rows",
        ),
        (
            "k = 0",
            with(&|r| {
                r.overrides = Some(proto::Overrides {
                    k: Some(0),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "k must be between",
        ),
        (
            "k too large",
            with(&|r| {
                r.overrides = Some(proto::Overrides {
                    k: Some(100_000),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "k must be between",
        ),
        (
            "skip in the sparse form",
            with(&|r| {
                r.overrides = Some(proto::Overrides {
                    skip: Some(0.05),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "skip needs the base logits",
        ),
        (
            "skip out of range",
            with(&|r| {
                r.logits = logits_tensor(&logits);
                r.form = proto::ResponseForm::Dense as i32;
                r.overrides = Some(proto::Overrides {
                    skip: Some(1.0),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "skip must be in",
        ),
        (
            "filter_p out of range",
            with(&|r| {
                r.overrides = Some(proto::Overrides {
                    filter_p: Some(1.5),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "filter_p",
        ),
        (
            "logits with form SPARSE",
            with(&|r| {
                r.logits = logits_tensor(&logits);
                r.form = proto::ResponseForm::Sparse as i32;
            }),
            Code::InvalidArgument,
            "form = DENSE",
        ),
        (
            "form DENSE without logits",
            with(&|r| r.form = proto::ResponseForm::Dense as i32),
            Code::InvalidArgument,
            "needs logits",
        ),
        (
            "bf16 hidden",
            with(&|r| {
                r.hidden = Some(Tensor {
                    data: vec![0; 2 * DIM].into(),
                    dtype: proto::DType::Bf16 as i32,
                    rows: 0,
                })
            }),
            Code::InvalidArgument,
            "F32 or F16",
        ),
        (
            "oversized message",
            sparse_request(&vec![0.5; limit / 4 + DIM]),
            Code::ResourceExhausted,
            "--max-message-bytes",
        ),
    ];
    let mut ok_client = server.client().await;
    for (name, req, code, needle) in cases.drain(..) {
        let err = client.adjust(req).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(needle), "{name}: {}", err.message());
        // Another client, and the same one, are still served.
        ok_client.adjust(sparse_request(&good)).await.unwrap();
        client.adjust(sparse_request(&good)).await.unwrap();
    }

    // Oversized message in a stream.
    let mut s = client
        .adjust_stream(tokio_stream::iter(vec![sparse_request(&vec![
            0.5;
            limit / 4
                + DIM
        ])]))
        .await
        .unwrap()
        .into_inner();
    let err = s.message().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());

    // Writes.
    let add = |store: &str, rows: usize, tokens: Vec<u32>| proto::AddExamplesRequest {
        store: store.into(),
        hidden: hidden_tensor(&queries(rows, 9)),
        next_tokens: tokens,
        ..Default::default()
    };
    let write_cases: Vec<(&str, Request<proto::AddExamplesRequest>, Code, &str)> = vec![
        (
            "missing admin token",
            Request::new(add("toxic", 2, vec![1, 2])),
            Code::Unauthenticated,
            "missing admin token",
        ),
        (
            "wrong admin token",
            admin(add("toxic", 2, vec![1, 2]), "not-the-token"),
            Code::Unauthenticated,
            "invalid admin token",
        ),
        (
            "unknown store",
            admin(add("neutral", 2, vec![1, 2]), TOKEN),
            Code::InvalidArgument,
            "unknown store \"neutral\"",
        ),
        (
            "token count mismatch",
            admin(add("toxic", 2, vec![1]), TOKEN),
            Code::InvalidArgument,
            "one next-token id per row",
        ),
        (
            "token outside the vocabulary",
            admin(add("toxic", 2, vec![1, VOCAB as u32]), TOKEN),
            Code::InvalidArgument,
            "outside the vocabulary",
        ),
        (
            "empty append",
            admin(add("toxic", 0, vec![]), TOKEN),
            Code::InvalidArgument,
            "at least one row",
        ),
    ];
    for (name, req, code, needle) in write_cases {
        let err = client.add_examples(req).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(err.message().contains(needle), "{name}: {}", err.message());
    }
    let err = client
        .add_texts(admin(
            proto::AddTextsRequest {
                store: "toxic".into(),
                texts: vec!["some text".into()],
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("--model"), "{}", err.message());
    // Nothing was written by any refused request.
    for s in engine.stores() {
        assert_eq!(s.store.len(), 300);
        assert_eq!(s.store.segments().len(), 1);
    }

    // The error counter saw them.
    let text = http_get(server.metrics_addr, "/metrics").await;
    assert!(
        text.contains("goodtriever_errors_total{code=\"InvalidArgument\",method=\"Adjust\"}"),
        "{text}"
    );
    server.stop().await;

    // A server without a token refuses writes outright.
    let server = start(engine.clone(), ServeOptions::default()).await;
    let mut client = server.client().await;
    let err = client
        .add_examples(admin(add("toxic", 2, vec![1, 2]), TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("--admin-token-file"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let server = start(engine, ServeOptions::default()).await;
    let channel = server.channel().await;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "goodtriever.v1.Goodtriever"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }

    // Both reflection versions: v1, and v1alpha, which most tools still speak. Their generated
    // types differ only by module, hence a macro rather than a function.
    macro_rules! listed_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            let mut reflection = ServerReflectionClient::new(channel.clone());
            let mut answers = reflection
                .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                }]))
                .await
                .unwrap()
                .into_inner();
            let answer = answers.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
                panic!("unexpected {} reflection answer", stringify!($version));
            };
            list.service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>()
        }};
    }
    for names in [listed_services!(v1), listed_services!(v1alpha)] {
        assert!(
            names.contains(&"goodtriever.v1.Goodtriever".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_string()),
            "{names:?}"
        );
    }

    let mut client = server.client().await;
    client.adjust(sparse_request(&queries(3, 1))).await.unwrap();
    let text = http_get(server.metrics_addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for needle in [
        "goodtriever_requests_total{method=\"Adjust\"} 1",
        "goodtriever_phase_seconds_count{phase=\"decode\"} 1",
        "goodtriever_phase_seconds_count{phase=\"search\"} 1",
        "goodtriever_phase_seconds_count{phase=\"rule\"} 1",
        "goodtriever_batch_rows_sum 3",
        "goodtriever_store_rows{store=\"toxic\"} 300",
        "goodtriever_request_seconds_count{method=\"Adjust\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}:\n{text}");
    }
    assert!(http_get(server.metrics_addr, "/other")
        .await
        .starts_with("HTTP/1.1 404"));
    server.stop().await;
}

/// Options a server cannot run with are refused when it is built, with the flag to fix named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_server_options_are_refused_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let with = |f: &dyn Fn(&mut ServeOptions)| {
        let mut o = ServeOptions::default();
        f(&mut o);
        o
    };
    let cases: Vec<(ServeOptions, &str)> = vec![
        (with(&|o| o.limits.max_rows = 0), "--max-rows"),
        (
            with(&|o| o.limits.max_rows = goodtriever::limits::MAX_ROWS + 1),
            "--max-rows",
        ),
        (
            with(&|o| o.limits.max_message_bytes = 100),
            "--max-message-bytes",
        ),
        (with(&|o| o.concurrent_steps = 0), "--concurrent-steps"),
    ];
    for (opts, flag) in cases {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = Server::from_listeners(engine.clone(), opts, listener, None)
            .err()
            .expect("refused");
        assert!(err.to_string().contains(flag), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjust_explains_each_row_with_the_searched_rows_and_their_source_text() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), defaults());
    let mut opts = opts_with_admin();
    opts.encoder = Some(Arc::new(FakeEncoder(fingerprint())));
    let server = start(engine.clone(), opts).await;
    let mut client = server.client().await;
    // Rows with source text: the fake encoder keys each character by its code.
    client
        .add_texts(admin(
            proto::AddTextsRequest {
                store: "toxic".into(),
                texts: vec!["quiet river".into()],
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap();
    let info = client
        .info(proto::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let segs = &info.stores[0].segments;
    assert_eq!(
        segs.iter().map(|s| s.sources).collect::<Vec<_>>(),
        [false, true]
    );

    // One row at the key of 'e' (whose row predicts 't'), one among the imported rows.
    let mut hidden = vec![b'e' as f32; DIM];
    hidden.extend(queries(1, 9));
    let logits = Rng::new(5).vec(2 * VOCAB, 2.0);
    let explain = |form: proto::ResponseForm| proto::AdjustRequest {
        hidden: hidden_tensor(&hidden),
        logits: logits_tensor(&logits),
        form: form as i32,
        explain: Some(proto::ExplainOptions {
            top: Some(10),
            rows: Some(256),
            context_bytes: Some(3),
        }),
        ..Default::default()
    };
    let resp = client
        .adjust(explain(proto::ResponseForm::Dense))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.explanations.len(), 2);
    // The answer is the one without explain.
    let plain = client
        .adjust(proto::AdjustRequest {
            hidden: hidden_tensor(&hidden),
            logits: logits_tensor(&logits),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.log_probs, plain.log_probs);

    let k = defaults().params.k;
    let mut sourced = 0;
    for (row, e) in resp.explanations.iter().enumerate() {
        let q = &hidden[row * DIM..(row + 1) * DIM];
        let direct: Vec<_> = engine
            .stores()
            .iter()
            .map(|s| {
                let mut out = vec![Vec::new()];
                s.store
                    .search_into(q, k, engine.search_params(), &mut out)
                    .unwrap();
                out.remove(0)
            })
            .collect();
        for m in e.pushed_down.iter().chain(&e.pushed_up) {
            assert!(!m.rows.is_empty());
            for r in &m.rows {
                let si = engine
                    .stores()
                    .iter()
                    .position(|s| s.name == r.store)
                    .unwrap();
                let n = direct[si]
                    .iter()
                    .find(|n| n.id == r.id)
                    .expect("an explained row is one the search returned");
                assert_eq!((n.dist, n.value), (r.distance, r.next_token));
                if let Some(src) = &r.source {
                    // The row's key is its character; its value the next character.
                    assert_eq!(src.token.len(), 1);
                    let c = src.token.as_bytes()[0] as f32;
                    let d: f32 = q.iter().map(|x| (x - c) * (x - c)).sum();
                    assert!(
                        (d - r.distance).abs() <= 1e-3 * d.max(1.0),
                        "{d} vs {}",
                        r.distance
                    );
                    assert_eq!(
                        src.after.as_bytes().first().map(|&b| b as u32),
                        Some(r.next_token)
                    );
                    sourced += 1;
                }
            }
        }
    }
    assert!(sourced > 0, "no explained row had its source text");
    // The 'e' row pushes 't' down.
    let t = resp.explanations[0]
        .pushed_down
        .iter()
        .find(|m| m.token == b't' as u32)
        .expect("'t' pushed down");
    let r = &t.rows[0];
    assert_eq!((r.store.as_str(), r.distance), ("toxic", 0.0));
    let src = r.source.as_ref().unwrap();
    assert_eq!(
        (src.before.as_str(), src.token.as_str(), src.after.as_str()),
        ("qui", "e", "t r")
    );

    // The sparse form explained the same way.
    let sparse = client
        .adjust(explain(proto::ResponseForm::Sparse))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sparse.rows.len(), 2);
    assert_eq!(sparse.explanations, resp.explanations);

    // Explain without logits, with bad options, or on a stream is refused; the server serves on.
    let mut no_logits = explain(proto::ResponseForm::Sparse);
    no_logits.logits = None;
    let err = client.adjust(no_logits).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("explain needs logits"),
        "{}",
        err.message()
    );
    let mut zero = explain(proto::ResponseForm::Dense);
    zero.explain = Some(proto::ExplainOptions {
        top: Some(0),
        ..Default::default()
    });
    let err = client.adjust(zero).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("top"), "{}", err.message());
    let stream = tokio_stream::iter(vec![explain(proto::ResponseForm::Dense)]);
    let mut answers = client.adjust_stream(stream).await.unwrap().into_inner();
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("unary Adjust"), "{}", err.message());
    client.adjust(sparse_request(&hidden)).await.unwrap();
    server.stop().await;
}
