//! Reusing neighbours over gRPC with the real model (issue 19, docs/architecture.md §1.6), for
//! `scripts/bench/bench_control_cost.py --grpc-reuse`: the default model generates every
//! prompt's samples twice with the same seeds, once with the engine in-process (the
//! generator's `--reuse`) and once through an `AdjustStream` of a `goodtriever serve` started
//! in this process on loopback, which asks for `overrides.reuse` and sends the tokens its rows
//! emitted (`emitted_tokens`, `continued_rows`), dense answers. Prints one JSON object: how
//! many store searches each path saved, whether both generated the same tokens (they must: the
//! server runs the same engine on the same hidden states), and each path's control time per
//! step.
//!
//! The gRPC side is a [`StepHook`], so the generator's loop is the same code on both paths.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use goodtriever::datastore::SearchParams;
use goodtriever::detox::{AdjustOptions, ControlHook, ControlStore, Detoxifier};
use goodtriever::eval::read_prompts;
use goodtriever::fingerprint::KeyType;
use goodtriever::generate::{Generator, SamplingParams};
use goodtriever::hook::{HookError, StepHook};
use goodtriever::model::{resolve_model_path, Model, WeightFormat};
use goodtriever::reuse::ReuseParams;
use goodtriever::rule::RuleParams;
use goodtriever::server::proto::{self, goodtriever_client::GoodtrieverClient};
use goodtriever::server::{convert, ServeOptions, Server};
use tokio::sync::mpsc;
use tonic::Streaming;

mod driver_args;

const SCRIPT: &str = "scripts/bench/bench_control_cost.py --grpc-reuse";

#[derive(Parser)]
#[command(name = "bench_grpc_reuse", bin_name = "bench_grpc_reuse")]
struct Args {
    #[arg(long)]
    toxic: String,
    #[arg(long)]
    nontoxic: String,
    /// Evaluation prompts (JSON Lines, as `eval generate` reads them).
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long, default_value_t = 12)]
    limit: usize,
    #[arg(long, default_value_t = 5)]
    num_samples: usize,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The model (GGUF); the default model when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = RuleParams::default().alpha)]
    alpha: f32,
    #[arg(long, default_value_t = RuleParams::default().filter_p)]
    filter_p: f32,
    #[arg(long, default_value_t = 0.0)]
    skip: f32,
    #[arg(long, default_value_t = 0.02)]
    reuse: f32,
    #[arg(long, default_value_t = ReuseParams::default().radius)]
    reuse_radius: f32,
}

/// Counts of one path over the run.
#[derive(Default, serde::Serialize)]
struct PathStats {
    rows: u64,
    rows_reused: u64,
    /// (row, store) searches needed without reuse, and of those answered from successors
    /// (in-process only: the server reports rows, not stores).
    store_searches: u64,
    store_searches_reused: u64,
    steps: u64,
    control_ms_per_step: f64,
    /// gRPC only: the engine time the server reported, per step.
    engine_ms_per_step: f64,
}

/// A [`StepHook`] that sends each step over one `AdjustStream` and writes the dense answer
/// back, following its rows with `emitted_tokens` / `continued_rows` as the generator reports
/// them.
struct GrpcHook {
    runtime: Arc<tokio::runtime::Runtime>,
    client: GoodtrieverClient<tonic::transport::Channel>,
    key_type: KeyType,
    overrides: proto::Overrides,
    stream: Option<(
        mpsc::Sender<proto::AdjustRequest>,
        Streaming<proto::AdjustResponse>,
    )>,
    emitted: Vec<u32>,
    continued: Option<Vec<u32>>,
    step: u64,
    rows: u64,
    reused: u64,
    engine: Duration,
}

impl GrpcHook {
    fn open(&mut self) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel(1);
        let mut client = self.client.clone();
        let answers = self.runtime.block_on(async move {
            client
                .adjust_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        })?;
        self.stream = Some((tx, answers));
        Ok(())
    }

    fn step(&mut self, keys: &[f32], logits: &mut [f32], rows: usize) -> anyhow::Result<()> {
        if self.stream.is_none() {
            self.open()?;
        }
        let req = proto::AdjustRequest {
            hidden: Some(proto::Tensor {
                data: convert::f32_bytes(keys),
                dtype: proto::DType::F32 as i32,
                rows: rows as u32,
            }),
            logits: Some(proto::Tensor {
                data: convert::f32_bytes(logits),
                dtype: proto::DType::F32 as i32,
                rows: rows as u32,
            }),
            form: proto::ResponseForm::Dense as i32,
            overrides: Some(self.overrides),
            step: self.step,
            emitted_tokens: std::mem::take(&mut self.emitted),
            continued_rows: self.continued.take().unwrap_or_default(),
            ..Default::default()
        };
        let (tx, answers) = self.stream.as_mut().expect("opened above");
        let answer = self.runtime.block_on(async {
            tx.send(req).await?;
            answers
                .message()
                .await?
                .ok_or_else(|| anyhow::anyhow!("the server ended the stream"))
        })?;
        anyhow::ensure!(answer.step == self.step, "answers out of order");
        anyhow::ensure!(
            answer.log_probs.len() == logits.len() * 4,
            "a dense answer of {} bytes for {} logits",
            answer.log_probs.len(),
            logits.len()
        );
        for (out, b) in logits.iter_mut().zip(answer.log_probs.chunks_exact(4)) {
            *out = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        self.step += 1;
        self.rows += rows as u64;
        self.reused += answer.rows_reused as u64;
        self.engine += Duration::from_micros(answer.engine_micros);
        Ok(())
    }
}

impl StepHook for GrpcHook {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn adjust(&mut self, keys: &[f32], logits: &mut [f32], rows: usize) -> Result<(), HookError> {
        self.step(keys, logits, rows)
            .map_err(|e| HookError::new(std::io::Error::other(format!("{e:#}"))))
    }

    fn advance(&mut self, tokens: &[u32]) {
        self.emitted = tokens.to_vec();
    }

    fn keep_rows(&mut self, keep: &[usize]) {
        if keep.is_empty() {
            // A new generation: a new stream, whose first step has nothing to follow.
            self.stream = None;
            self.emitted.clear();
            self.continued = None;
        } else {
            self.continued = Some(keep.iter().map(|&r| r as u32).collect());
        }
    }
}

/// Each prompt's seed, as `eval generate` derives it (src/cli/eval.rs), so that the figures
/// line up with its runs.
fn prompt_seed(seed: u64, prompt_index: usize) -> u64 {
    seed ^ (prompt_index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse_from(driver_args::args("bench_grpc_reuse", SCRIPT));
    let model = Model::load(
        &resolve_model_path(args.model.as_deref())?,
        WeightFormat::Native,
    )?;
    let open = |address: &str| goodtriever::store_address::open_store(address);
    let stores = vec![
        ControlStore {
            name: "toxic".into(),
            store: open(&args.toxic)?,
            weight: -1.0,
        },
        ControlStore {
            name: "nontoxic".into(),
            store: open(&args.nontoxic)?,
            weight: 1.0,
        },
    ];
    let opts = AdjustOptions {
        params: RuleParams {
            alpha: args.alpha,
            filter_p: args.filter_p,
            skip: args.skip,
            ..RuleParams::default()
        },
        ..AdjustOptions::default()
    };
    let reuse = ReuseParams {
        min: args.reuse,
        radius: args.reuse_radius,
        audit: false,
    };
    reuse.validate()?;
    let engine = Arc::new(Detoxifier::new(
        stores,
        opts,
        SearchParams::default(),
        Some(model.config().vocab_size),
    )?);
    model
        .fingerprint()
        .check_compatible(engine.fingerprint())
        .map_err(anyhow::Error::msg)?;

    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    );
    let (addr, stop, served) = runtime.block_on(async {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = Server::from_listeners(engine.clone(), ServeOptions::default(), grpc, None)?;
        let addr = server.grpc_addr().expect("a gRPC listener");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        anyhow::Ok((addr, tx, served))
    })?;
    let client = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        anyhow::Ok(
            GoodtrieverClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
    })?;

    let mut local = ControlHook::new(engine.clone(), opts)?.with_reuse(reuse)?;
    let mut remote = GrpcHook {
        runtime: runtime.clone(),
        client,
        key_type: engine.key_type(),
        overrides: proto::Overrides {
            reuse: Some(reuse.min),
            reuse_radius: Some(reuse.radius),
            ..Default::default()
        },
        stream: None,
        emitted: Vec::new(),
        continued: None,
        step: 0,
        rows: 0,
        reused: 0,
        engine: Duration::ZERO,
    };
    let prompts = read_prompts(std::io::BufReader::new(std::fs::File::open(&args.prompts)?))?;
    let (mut local_s, mut remote_s) = (PathStats::default(), PathStats::default());
    let (mut local_ms, mut remote_ms) = (0.0, 0.0);
    let (mut same, mut sequences) = (0usize, 0usize);
    let started = Instant::now();
    for (pi, prompt) in prompts.iter().take(args.limit).enumerate() {
        let params = SamplingParams {
            num_samples: args.num_samples,
            max_new_tokens: args.max_new_tokens,
            seed: prompt_seed(args.seed, pi),
            ..SamplingParams::default()
        };
        let tokens = model.tokenizer().encode(&prompt.text)?;
        let mut generator = Generator::new(&model, params)?;
        let a = generator.generate(&tokens, Some(&mut local))?;
        let b = generator.generate(&tokens, Some(&mut remote))?;
        for (x, y) in a.iter().zip(&b) {
            same += (x.tokens == y.tokens) as usize;
            sequences += 1;
        }
        let steps = |s: &[goodtriever::generate::Sample]| {
            s.iter().map(|x| x.timing.step_ms.len()).max().unwrap_or(0) as u64
        };
        local_s.steps += steps(&a);
        remote_s.steps += steps(&b);
        let hook_ms = |s: &[goodtriever::generate::Sample]| {
            s.iter()
                .max_by_key(|x| x.timing.step_ms.len())
                .map_or(0.0, |x| x.timing.total_hook_ms())
        };
        local_ms += hook_ms(&a);
        remote_ms += hook_ms(&b);
        eprintln!(
            "[bench_grpc_reuse] prompt {}/{}: {:.0} s",
            pi + 1,
            args.limit.min(prompts.len()),
            started.elapsed().as_secs_f64()
        );
    }
    let stats = local.reuse_stats().unwrap_or_default();
    let (rows, _) = local.skip_counts();
    local_s.rows = rows;
    local_s.store_searches = stats.row_searches;
    local_s.store_searches_reused = stats.reused;
    local_s.control_ms_per_step = local_ms / local_s.steps.max(1) as f64;
    remote_s.rows = remote.rows;
    remote_s.rows_reused = remote.reused;
    remote_s.control_ms_per_step = remote_ms / remote_s.steps.max(1) as f64;
    remote_s.engine_ms_per_step = remote.engine.as_secs_f64() * 1e3 / remote_s.steps.max(1) as f64;
    // In-process the engine counts (row, store) pairs; a row is answered from successors only
    // when every store passed, so rows are pairs over stores.
    local_s.rows_reused = stats.reused / engine.stores().len().max(1) as u64;
    drop(remote);
    let _ = stop.send(());
    runtime.block_on(served)??;
    let report = serde_json::json!({
        "prompts": args.limit.min(prompts.len()),
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "rule": opts.params,
        "reuse": reuse,
        "sequences": sequences,
        "same_tokens": same,
        "in_process": local_s,
        "grpc": remote_s,
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{report}");
    Ok(())
}
