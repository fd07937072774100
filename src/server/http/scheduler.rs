//! The scheduler thread: the one owner of the decoding batch (docs/architecture.md §2, "One
//! request through the HTTP API").
//!
//! Handlers put a [`Job`] (one HTTP request: one or more prompts, each continued `n` ways) on a
//! bounded queue; a full queue is answered 429 at once, so waiting work never grows without
//! limit. Each iteration the thread admits waiting jobs while the batch has rows to spare
//! ([`DecodeBatch::admit`]: prefilled together, joined to the running cache), runs one
//! [`DecodeBatch::step`] for every active row, and sends each job's events to its handler. A
//! handler that stops listening (its client disconnected, or every choice met a stop
//! sequence) drops its receiver, and the job's rows leave the batch at the next step.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::error::ApiError;
use crate::batch::{BatchEvent, BatchRequest, DecodeBatch};
use crate::detox::Detoxifier;
use crate::model::Model;
use crate::server::metrics::Metrics;

/// One HTTP request's prompts, queued together (all are admitted at once or none).
pub struct Job {
    requests: Vec<BatchRequest>,
    events: UnboundedSender<BatchEvent>,
}

impl Job {
    fn rows(&self) -> usize {
        self.requests.iter().map(|r| r.params.num_samples).sum()
    }
}

/// What a handler holds of its queued job: the events, and a way to end single choices early.
pub struct Ticket {
    /// The job's events, in order.
    pub events: UnboundedReceiver<BatchEvent>,
    /// The batch request id of each prompt, in prompt order.
    pub ids: Vec<u64>,
    cancels: mpsc::Sender<(u64, usize)>,
}

impl Ticket {
    /// Ends choice `choice` of prompt id `id` (a stop sequence matched): its row leaves the
    /// batch at the next step.
    pub fn cancel_choice(&self, id: u64, choice: usize) {
        let _ = self.cancels.send((id, choice));
    }
}

/// The handle handlers submit through; cheap to share.
pub struct Scheduler {
    tx: SyncSender<Job>,
    cancels: mpsc::Sender<(u64, usize)>,
    queue: usize,
    max_rows: usize,
    next_id: AtomicU64,
    waiting: Arc<AtomicUsize>,
}

impl Scheduler {
    /// Starts the scheduler thread on `model` with the control engine `detox`; at most
    /// `queue` jobs wait and at most `max_rows` rows decode at once.
    pub fn start(
        model: Arc<Model>,
        detox: Arc<Detoxifier>,
        queue: usize,
        max_rows: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let (cancels, cancel_rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let w = waiting.clone();
        let handle = std::thread::Builder::new()
            .name("goodtriever-http-batch".into())
            .spawn(move || {
                let queues = Queues {
                    jobs: rx,
                    cancels: cancel_rx,
                    waiting: &w,
                };
                run(&model, detox, queues, max_rows, &metrics)
            })?;
        Ok((
            Self {
                tx,
                cancels,
                queue,
                max_rows,
                next_id: AtomicU64::new(1),
                waiting,
            },
            handle,
        ))
    }

    /// The most rows that decode at once; one request may ask for at most this many
    /// (prompts × n).
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Jobs waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Queues `requests` (their ids are assigned here) or refuses at once: 429 when `queue`
    /// jobs already wait, 503 when the scheduler has stopped.
    pub fn submit(&self, mut requests: Vec<BatchRequest>) -> Result<Ticket, ApiError> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::queue_full(self.queue));
        }
        let mut ids = Vec::with_capacity(requests.len());
        for r in &mut requests {
            r.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            ids.push(r.id);
        }
        let (events, rx) = unbounded_channel();
        match self.tx.try_send(Job { requests, events }) {
            Ok(()) => Ok(Ticket {
                events: rx,
                ids,
                cancels: self.cancels.clone(),
            }),
            Err(e) => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => ApiError::queue_full(self.queue),
                    TrySendError::Disconnected(_) => {
                        ApiError::unavailable("the decoding scheduler has stopped")
                    }
                })
            }
        }
    }
}

struct Queues<'a> {
    jobs: Receiver<Job>,
    cancels: Receiver<(u64, usize)>,
    waiting: &'a AtomicUsize,
}

impl Queues<'_> {
    /// The next waiting job: waits up to a second when `block`, else only takes one that is
    /// there. `Err(true)` once every sender is gone. The job still counts as waiting.
    fn next(&self, block: bool) -> Result<Job, bool> {
        if block {
            self.jobs
                .recv_timeout(Duration::from_secs(1))
                .map_err(|e| matches!(e, RecvTimeoutError::Disconnected))
        } else {
            self.jobs
                .try_recv()
                .map_err(|e| matches!(e, TryRecvError::Disconnected))
        }
    }

    /// A job left the queue (admitted, or dropped because its client left): the one held back
    /// for room in the batch still counts as waiting until then.
    fn left(&self, jobs: usize) {
        self.waiting.fetch_sub(jobs, Ordering::AcqRel);
    }
}

/// A job in the batch: where its events go and which of its choices still run.
struct Active {
    events: UnboundedSender<BatchEvent>,
    ids: Vec<u64>,
    running: HashSet<(u64, usize)>,
}

fn run(
    model: &Model,
    detox: Arc<Detoxifier>,
    queues: Queues<'_>,
    max_rows: usize,
    metrics: &Metrics,
) {
    let mut batch = DecodeBatch::new(model, Some(detox));
    let mut held: Option<Job> = None;
    // Keyed by the job's first request id; `owner` maps every request id to that key.
    let mut active: HashMap<u64, Active> = HashMap::new();
    let mut owner: HashMap<u64, u64> = HashMap::new();
    let mut events = Vec::new();
    let mut closed = false;
    loop {
        // Admit what fits; block only when there is nothing to decode.
        let mut admit: Vec<Job> = Vec::new();
        let mut rows = batch.rows();
        loop {
            let job = match held.take() {
                Some(j) => j,
                None => match queues.next(batch.is_empty() && admit.is_empty() && !closed) {
                    Ok(j) => j,
                    Err(gone) => {
                        closed |= gone;
                        break;
                    }
                },
            };
            if job.events.is_closed() {
                queues.left(1);
                continue;
            }
            let mut all: Vec<BatchRequest> = admit
                .iter()
                .flat_map(|j| j.requests.iter().cloned())
                .collect();
            all.extend(job.requests.iter().cloned());
            if rows + job.rows() > max_rows || !batch.fits(&all) {
                held = Some(job);
                break;
            }
            rows += job.rows();
            admit.push(job);
        }
        if !admit.is_empty() {
            queues.left(admit.len());
            let reqs: Vec<BatchRequest> = admit
                .iter()
                .flat_map(|j| j.requests.iter().cloned())
                .collect();
            match batch.admit(reqs) {
                Ok(()) => {
                    for job in admit {
                        let ids: Vec<u64> = job.requests.iter().map(|r| r.id).collect();
                        let running = job
                            .requests
                            .iter()
                            .flat_map(|r| (0..r.params.num_samples).map(|c| (r.id, c)))
                            .collect();
                        for &id in &ids {
                            owner.insert(id, ids[0]);
                        }
                        active.insert(
                            ids[0],
                            Active {
                                events: job.events,
                                ids,
                                running,
                            },
                        );
                    }
                }
                Err(e) => {
                    let message = format!("prefill failed: {e}");
                    for job in admit {
                        for r in &job.requests {
                            let _ = job.events.send(BatchEvent::Failed {
                                id: r.id,
                                message: message.clone(),
                            });
                        }
                    }
                }
            }
        }
        if batch.is_empty() {
            if closed && held.is_none() {
                return;
            }
            continue;
        }
        // Single choices a stop sequence ended, and jobs whose handler left.
        while let Ok((id, choice)) = queues.cancels.try_recv() {
            if let Some(a) = owner.get(&id).and_then(|k| active.get_mut(k)) {
                a.running.remove(&(id, choice));
                batch.cancel_choice(id, choice);
            }
        }
        for a in active.values_mut() {
            if a.events.is_closed() {
                for &id in &a.ids {
                    batch.cancel(id);
                }
                a.running.clear();
            }
        }
        events.clear();
        let result = batch.step(&mut events);
        metrics.http_batch_rows(batch.rows());
        for e in events.drain(..) {
            let id = match &e {
                BatchEvent::Token { id, .. }
                | BatchEvent::Finished { id, .. }
                | BatchEvent::Failed { id, .. } => *id,
            };
            let Some(a) = owner.get(&id).and_then(|k| active.get_mut(k)) else {
                continue;
            };
            match &e {
                BatchEvent::Finished { choice, .. } => {
                    a.running.remove(&(id, *choice));
                }
                BatchEvent::Failed { .. } => a.running.retain(|(i, _)| *i != id),
                BatchEvent::Token { .. } => {}
            }
            if a.events.send(e).is_err() {
                for &id in &a.ids {
                    batch.cancel(id);
                }
                a.running.clear();
            }
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "the decoding batch failed; its requests were answered with errors");
        }
        active.retain(|_, a| {
            let keep = !a.running.is_empty();
            if !keep {
                for id in &a.ids {
                    owner.remove(id);
                }
            }
            keep
        });
    }
}
