//! Load generator for `scripts/bench/bench_server.py`: drives N concurrent `AdjustStream` sessions
//! against a running `goodtriever serve` with tonic, then calls the same engine in-process on
//! the same stores and queries, and prints one JSON object with steps/s, p50 and p99 per step
//! for both, and the overhead of the gRPC path measured per step (round trip minus the engine
//! time the server reports in `engine_micros`), which stays meaningful on a busy machine where
//! two separately timed runs do not.
//!
//! Written in Rust so that the client's own cost (a Python gRPC client spends more per call
//! than the server does) does not hide the server's overhead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use goodtriever::datastore::{Datastore, SearchMode, SearchParams};
use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use goodtriever::server::proto::{self, goodtriever_client::GoodtrieverClient};
use goodtriever::server::{convert, GrpcAddr};
use prost::Message;

mod driver_args;

/// The script that runs this driver.
const SCRIPT: &str = "scripts/bench/bench_server.py";

#[derive(Parser)]
#[command(name = "bench_server_load", bin_name = "bench_server_load")]
struct Args {
    /// HOST:PORT or unix:PATH.
    #[arg(long)]
    addr: String,
    #[arg(long)]
    toxic: PathBuf,
    #[arg(long)]
    nontoxic: PathBuf,
    /// Queries, .npy f32 [N, D].
    #[arg(long)]
    queries: PathBuf,
    #[arg(long, default_value_t = 1)]
    streams: usize,
    #[arg(long, default_value = "sparse")]
    form: String,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 2000)]
    max_steps: usize,
    #[arg(long, default_value_t = 1024)]
    k: usize,
    #[arg(long)]
    vocab: usize,
    #[arg(long)]
    exact: bool,
    /// Drive the streams from a current-thread runtime (one client thread) instead of a
    /// multi-threaded one.
    #[arg(long)]
    current_thread: bool,
}

struct Load {
    dim: usize,
    queries: Vec<f32>,
    logits: Vec<f32>,
    vocab: usize,
    dense: bool,
}

impl Load {
    fn query(&self, stream: usize, step: usize) -> &[f32] {
        let n = self.queries.len() / self.dim;
        let i = (stream * 7919 + step) % n;
        &self.queries[i * self.dim..(i + 1) * self.dim]
    }
    fn logits(&self, step: usize) -> &[f32] {
        let n = self.logits.len() / self.vocab;
        let i = step % n;
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Encoded message bytes over a run.
#[derive(Default)]
struct Sizes {
    request: usize,
    response: usize,
    steps: usize,
}

impl Sizes {
    fn add(&mut self, o: &Sizes) {
        self.request += o.request;
        self.response += o.response;
        self.steps += o.steps;
    }
}

#[derive(serde::Serialize)]
struct Stats {
    steps: usize,
    seconds: f64,
    steps_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(f64::NAN)
    };
    Stats {
        steps: lat.len(),
        seconds: wall.as_secs_f64(),
        steps_per_s: lat.len() as f64 / wall.as_secs_f64(),
        p50_us: q(0.5),
        p99_us: q(0.99),
    }
}

async fn grpc_stream(
    addr: String,
    load: Arc<Load>,
    stream: usize,
    deadline: Instant,
    max_steps: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Sizes)> {
    let addr: GrpcAddr = addr.parse().map_err(anyhow::Error::msg)?;
    let channel = addr.connect().await?;
    let mut client = GoodtrieverClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .adjust_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut lat = Vec::with_capacity(max_steps);
    let mut overhead = Vec::with_capacity(max_steps);
    let mut sizes = Sizes::default();
    for step in 0..max_steps {
        if Instant::now() >= deadline {
            break;
        }
        let req = proto::AdjustRequest {
            hidden: Some(proto::Tensor {
                data: convert::f32_bytes(load.query(stream, step)),
                dtype: proto::DType::F32 as i32,
                rows: 1,
            }),
            logits: load.dense.then(|| proto::Tensor {
                data: convert::f32_bytes(load.logits(step)),
                dtype: proto::DType::F32 as i32,
                rows: 1,
            }),
            step: step as u64,
            ..Default::default()
        };
        sizes.request += req.encoded_len();
        let t = Instant::now();
        tx.send(req).await?;
        let answer = answers
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        // A client needs the (token, value) pairs, so unpacking them is part of the round trip.
        let rows = answer
            .rows
            .iter()
            .map(convert::sparse_row_from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let rtt = t.elapsed();
        sizes.response += answer.encoded_len();
        sizes.steps += 1;
        std::hint::black_box(rows);
        lat.push(rtt);
        overhead.push(rtt.saturating_sub(Duration::from_micros(answer.engine_micros)));
        anyhow::ensure!(answer.step == step as u64, "out of order");
    }
    Ok((lat, overhead, sizes))
}

fn in_process(
    engine: Arc<Detoxifier>,
    load: Arc<Load>,
    streams: usize,
    seconds: f64,
    max_steps: usize,
) -> Stats {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let handles: Vec<_> = (0..streams)
        .map(|s| {
            let engine = engine.clone();
            let load = load.clone();
            std::thread::spawn(move || {
                let opts: AdjustOptions = *engine.defaults();
                let mut scratch = DetoxScratch::default();
                let mut sparse = Vec::new();
                let mut dense = vec![0.0; load.vocab];
                let mut lat = Vec::new();
                for step in 0..max_steps {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let t = Instant::now();
                    if load.dense {
                        engine
                            .adjust_dense(
                                load.query(s, step),
                                load.logits(step),
                                &opts,
                                &mut scratch,
                                &mut dense,
                            )
                            .unwrap();
                    } else {
                        engine
                            .adjust_sparse(load.query(s, step), &opts, &mut scratch, &mut sparse)
                            .unwrap();
                    }
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    stats(lat, start.elapsed())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse_from(driver_args::args("bench_server_load", SCRIPT));
    let (_, dim, queries) = goodtriever::npy::read_queries(&args.queries)?;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let logits: Vec<f32> = (0..16 * args.vocab)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 22) as f32 - 2.0
        })
        .collect();
    let load = Arc::new(Load {
        dim,
        queries,
        logits,
        vocab: args.vocab,
        dense: args.form == "dense",
    });

    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Runtime::new()?
    };
    let grpc = runtime.block_on(async {
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(args.seconds);
        let tasks: Vec<_> = (0..args.streams)
            .map(|s| {
                tokio::spawn(grpc_stream(
                    args.addr.clone(),
                    load.clone(),
                    s,
                    deadline,
                    args.max_steps,
                ))
            })
            .collect();
        let (mut lat, mut overhead, mut sizes) = (Vec::new(), Vec::new(), Sizes::default());
        for t in tasks {
            let (l, o, s) = t.await??;
            sizes.add(&s);
            lat.extend(l);
            overhead.extend(o);
        }
        let wall = start.elapsed();
        anyhow::Ok((stats(lat, wall), stats(overhead, wall), sizes))
    })?;
    let (grpc, overhead, sizes) = grpc;
    drop(runtime);

    let mut opts = AdjustOptions::default();
    opts.params.k = args.k;
    let search = SearchParams {
        mode: if args.exact {
            SearchMode::Exact
        } else {
            SearchMode::Auto
        },
        ef: None,
    };
    let engine = Arc::new(Detoxifier::goodtriever(
        Arc::new(Datastore::open(&args.toxic)?),
        Arc::new(Datastore::open(&args.nontoxic)?),
        opts,
        search,
        Some(args.vocab),
    )?);
    let local = in_process(engine, load, args.streams, args.seconds, args.max_steps);
    let out = serde_json::json!({
        "form": args.form,
        "streams": args.streams,
        "grpc": grpc,
        "in_process": local,
        // Per step: round trip minus the engine time the server reported for that step.
        "overhead_p50_us": overhead.p50_us,
        "overhead_p99_us": overhead.p99_us,
        // Mean protobuf message sizes, for the socket floor (bench_socket_floor.rs, beside this).
        "request_bytes": sizes.request / sizes.steps.max(1),
        "response_bytes": sizes.response / sizes.steps.max(1),
    });
    println!("{out}");
    Ok(())
}
