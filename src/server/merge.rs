//! Concurrent Adjust steps merged into one engine call while every core is busy.
//!
//! A step that finds a core free computes at once, alone (`Shared::adjust`): merging would
//! only add waiting. A step that finds every core busy joins the [`Waiting`] queue and waits
//! for either its answer or a core. Whichever waiting step gets a core first takes the oldest
//! waiting steps (see [`merge_steps`]) and answers them: the steps with the same options and
//! form go through the engine as one batch, so an exactly scanned segment is read once for all
//! of their rows instead of once per row (see `datastore::exact::BatchPlan`). The steps it took
//! get their answers through their channels; its own answer may be among them, come from
//! another step that took it, or, if it was not among the oldest, it waits for a core again.
//!
//! So merging costs nothing when the server keeps up, and under load the batch grows with
//! the queue by itself; no timer holds a step back to wait for company. A row's answer never
//! depends on its batch, because the engine's search and rule are per row and bit-identical
//! in a batch (DESIGN §1), which the tests check against lone requests.
//!
//! Each step is checked on its own first, so a bad request is refused with its own status and
//! never fails the others; if the merged engine call fails anyway, each step of that group is
//! computed alone, so the error lands only on the step that caused it.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;
use tonic::Status;

use super::metrics::Phase;
use super::proto;
use super::service::{on_pool, Buffers, Plan, Shared};
use super::status;
use crate::datastore::TASK_QUERIES;
use crate::detox::MAX_ROWS;

type Answer = Result<proto::AdjustResponse, Status>;

/// The most steps one leader takes from the queue: enough for the batched scan to give every
/// pool thread a full group of queries (`TASK_QUERIES`), few enough that steps are answered
/// roughly in the order they came. Taking the whole queue instead made a step that arrived just
/// after a large batch was taken wait for that batch and then its own: at 64 streams on HNSW
/// stores p99 was 194–198 ms that way against 166–176 ms with this cap, in two A/B rounds.
fn merge_steps() -> usize {
    TASK_QUERIES * rayon::current_num_threads()
}

/// A step waiting for a core, with the channel its answer goes back through.
pub(super) struct Waiting {
    req: proto::AdjustRequest,
    /// Set once the step passed its checks.
    plan: Option<Plan>,
    /// Taken when the step is answered.
    reply: Option<oneshot::Sender<Answer>>,
}

impl Waiting {
    fn answer(&mut self, answer: Answer) {
        if let Some(reply) = self.reply.take() {
            // A closed channel means the client went away; nobody is left to tell.
            let _ = reply.send(answer);
        }
    }

    /// The step's plan while it still waits for its answer.
    fn open_plan(&self) -> Option<Plan> {
        self.reply.as_ref().and(self.plan)
    }
}

/// The queue of steps that found every core busy.
#[derive(Default)]
pub(super) struct WaitQueue(Mutex<Vec<Waiting>>);

impl WaitQueue {
    fn push(&self, req: proto::AdjustRequest, reply: oneshot::Sender<Answer>) {
        self.lock().push(Waiting {
            req,
            plan: None,
            reply: Some(reply),
        });
    }

    /// Moves the `n` oldest waiting steps into `into` (whose allocation is kept from one
    /// batch to the next, as the queue keeps its own).
    fn take_oldest(&self, n: usize, into: &mut Vec<Waiting>) {
        let mut queue = self.lock();
        let n = n.min(queue.len());
        into.extend(queue.drain(..n));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        // A panic elsewhere cannot leave the vector half-changed; keep serving.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    /// One Adjust step for a caller that found every core busy: queues it, and either gets
    /// its answer from another step that computed it, or gets a core and answers the oldest
    /// waiting steps, until its own is answered (see the module docs).
    pub(super) async fn adjust_queued(self: &Arc<Self>, req: proto::AdjustRequest) -> Answer {
        let (tx, mut rx) = oneshot::channel();
        self.waiting.push(req, tx);
        loop {
            tokio::select! {
                biased;
                answer = &mut rx => return answer.unwrap_or_else(|_| Err(unanswered())),
                permit = self.cpu.acquire() => {
                    let _permit = permit
                        .map_err(|_| Status::unavailable("the server is shutting down"))?;
                    let mut b = self.take_buffers();
                    self.waiting.take_oldest(merge_steps(), &mut b.batch);
                    if b.batch.is_empty() {
                        // Another step took this one and answers it.
                        self.return_buffers(b);
                        break;
                    }
                    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
                        self.answer_batch(&mut b);
                    } else {
                        // A current-thread runtime must not block: the pool computes.
                        let shared = self.clone();
                        b = on_pool(move || {
                            shared.answer_batch(&mut b);
                            Ok(b)
                        })
                        .await?;
                    }
                    self.return_buffers(b);
                    // This step may still wait behind the batch just answered.
                }
            }
        }
        rx.await.unwrap_or_else(|_| Err(unanswered()))
    }

    /// Answers every step in `b.batch` and empties it.
    fn answer_batch(&self, b: &mut Buffers) {
        let mut batch = std::mem::take(&mut b.batch);
        let mut group = std::mem::take(&mut b.group);
        for w in &mut batch {
            if w.reply.as_ref().is_none_or(|r| r.is_closed()) {
                // Its client cancelled while it waited: nothing to compute.
                w.reply = None;
                continue;
            }
            match self.check(&w.req) {
                Ok(plan) => w.plan = Some(plan),
                Err(e) => w.answer(Err(e)),
            }
        }
        for head in 0..batch.len() {
            let Some(plan) = batch[head].open_plan() else {
                continue;
            };
            group.clear();
            let mut rows = 0;
            for (j, w) in batch.iter().enumerate().skip(head) {
                if let Some(p) = w.open_plan() {
                    // A lone step fits: the server's --max-rows is at most MAX_ROWS.
                    if p.merges_with(&plan) && rows + p.rows() <= MAX_ROWS {
                        group.push(j);
                        rows += p.rows();
                    }
                }
            }
            self.answer_group(&mut batch, &mut group, &plan, b);
        }
        batch.clear();
        b.batch = batch;
        b.group = group;
    }

    /// Answers the steps `batch[group]`, which share `plan`'s options and form, with one
    /// engine call.
    fn answer_group(
        &self,
        batch: &mut [Waiting],
        group: &mut Vec<usize>,
        plan: &Plan,
        b: &mut Buffers,
    ) {
        let t0 = Instant::now();
        b.hidden.clear();
        b.logits.clear();
        group.retain(|&j| {
            let w = &mut batch[j];
            match self.decode(&w.req, w.plan.as_ref().expect("checked"), b) {
                Ok(()) => true,
                Err(e) => {
                    w.answer(Err(e));
                    false
                }
            }
        });
        if group.is_empty() {
            return;
        }
        self.metrics.phase(Phase::Decode, t0.elapsed());

        let engine_time = match self.engine_call(plan, b) {
            Ok(t) => t,
            Err(e) => {
                if group.len() == 1 {
                    batch[group[0]].answer(Err(status::from_detox(e)));
                } else {
                    // Alone, each step gets its own answer or its own error.
                    for &j in group.iter() {
                        let w = &mut batch[j];
                        let plan = w.plan.expect("checked");
                        let answer = self.adjust_with(&w.req, &plan, b, t0);
                        w.answer(answer);
                    }
                }
                return;
            }
        };
        self.metrics.merged(group.len());

        let t2 = Instant::now();
        let mut start = 0;
        for &j in group.iter() {
            let w = &mut batch[j];
            let p = w.plan.expect("checked");
            let rows: Range<usize> = start..start + p.rows();
            start = rows.end;
            let resp = self.response(&w.req, &p, rows, engine_time, b);
            w.answer(Ok(resp));
        }
        self.metrics.phase(Phase::Encode, t2.elapsed());
    }
}

fn unanswered() -> Status {
    Status::internal("the step was dropped without an answer; retry it")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;
    use tonic::Code;

    use super::*;
    use crate::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchParams};
    use crate::detox::{AdjustOptions, Detoxifier};
    use crate::fingerprint::{KeyType, ModelFingerprint};
    use crate::server::convert::f32_bytes;
    use crate::server::service::Limits;
    use crate::server::{AdminAuth, Metrics};

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
        let n = s.cpu.available_permits() as u32;
        s.cpu.acquire_many(n).await.unwrap()
    }

    async fn until_waiting(s: &Shared, n: usize) {
        for _ in 0..5000 {
            if s.waiting.lock().len() == n {
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
        until_waiting(&s, tasks.len()).await;
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
        assert!(s.waiting.lock().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_takes_at_most_merge_steps_from_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path());
        let cap = merge_steps();
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
        assert!(s.waiting.lock().is_empty());
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
        assert!(s.waiting.lock().is_empty());
    }
}
