//! Measurement driver for `scripts/bench/bench_milvus.py`: the local memory-mapped store (HNSW)
//! against the same rows in Milvus — ingestion rows/s (the push), k-nearest search latency
//! p50/p99 at 1 and N concurrent requests, and the per-step cost of the full control (both
//! stores searched, the rule applied) with each backend.
//!
//! ```text
//! cargo bench --features milvus --bench bench_milvus -- --store DIR \
//!     --address milvus://127.0.0.1:19530/bench --k 1024 --ef 1024 --queries 200 --concurrency 1,8
//! ```
//!
//! Queries are stored keys (real hidden states) spread over the store. Prints one JSON object.
//! `--local-only` measures the local store alone (no Milvus, no push; `--address` unused):
//! the same queries and figures, to compare local stores with each other.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use goodtriever::datastore::{Datastore, Neighbour, SearchParams};
use goodtriever::detox::{AdjustOptions, ControlStore, DetoxScratch, Detoxifier};
use goodtriever::milvus::{push, MilvusStore, PushOptions};
use goodtriever::rule::{Mode, RuleParams};
use goodtriever::store::Store;
use serde_json::{json, Value};

mod driver_args;

const SCRIPT: &str = "scripts/bench/bench_milvus.py";

#[derive(Parser)]
#[command(name = "bench_milvus", bin_name = "bench_milvus")]
struct Cli {
    /// The local store (its live rows are pushed).
    #[arg(long)]
    store: PathBuf,
    /// The Milvus collection to push into (dropped first unless --reuse).
    #[arg(long, required_unless_present = "local_only")]
    address: Option<String>,
    /// Measure the local store only: no Milvus server is needed.
    #[arg(long, conflicts_with = "reuse")]
    local_only: bool,
    /// Keep an existing, finished copy instead of pushing again.
    #[arg(long)]
    reuse: bool,
    #[arg(long, default_value_t = 1024)]
    k: usize,
    #[arg(long, default_value_t = 1024)]
    ef: usize,
    /// Query rows (stored keys spread over the store).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Concurrent requests to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut ms: Vec<f64>, wall: Duration) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({
        "p50_ms": percentile(&ms, 0.5),
        "p99_ms": percentile(&ms, 0.99),
        "mean_ms": ms.iter().sum::<f64>() / ms.len() as f64,
        "requests": ms.len(),
        "throughput_per_s": ms.len() as f64 / wall.as_secs_f64(),
    })
}

/// Each of `threads` threads searches every query once, one at a time; per-request latency.
fn search_latency(
    store: &Arc<dyn Store>,
    queries: &[Vec<f32>],
    k: usize,
    params: SearchParams,
    threads: usize,
) -> Result<Value> {
    let t = Instant::now();
    let all: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = vec![Vec::<Neighbour>::new()];
                    let mut ms = Vec::with_capacity(queries.len());
                    for q in queries {
                        let t = Instant::now();
                        store.search_into(q, k, &params, &mut out)?;
                        ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(ms)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a search thread panicked"))
            .collect()
    });
    let wall = t.elapsed();
    let mut ms = Vec::new();
    for r in all {
        ms.extend(r?);
    }
    Ok(summary(ms, wall))
}

/// One row per step through the whole control (both stores, the rule), as a decoding step.
fn control_step(
    store: &Arc<dyn Store>,
    queries: &[Vec<f32>],
    k: usize,
    ef: usize,
) -> Result<Value> {
    let opts = AdjustOptions {
        params: RuleParams {
            k,
            ..RuleParams::default()
        },
        mode: Mode::Ensemble,
    };
    // The same store as both experts: the cost of two searches and the rule, which is what a
    // step pays whatever the stores hold.
    let stores = vec![
        ControlStore {
            name: "toxic".into(),
            store: store.clone(),
            weight: -1.0,
        },
        ControlStore {
            name: "nontoxic".into(),
            store: store.clone(),
            weight: 1.0,
        },
    ];
    let detox = Detoxifier::new(stores, opts, SearchParams::hnsw(Some(ef)), None)?;
    let mut scratch = DetoxScratch::default();
    let mut out = Vec::new();
    detox.adjust_sparse(&queries[0], &opts, &mut scratch, &mut out)?;
    let t = Instant::now();
    let mut ms = Vec::new();
    let mut search_ms = 0.0;
    for q in queries {
        let t = Instant::now();
        detox.adjust_sparse(q, &opts, &mut scratch, &mut out)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        search_ms += scratch.last_search_time().as_secs_f64() * 1e3;
    }
    let mut v = summary(ms, t.elapsed());
    v["search_share"] = json!(search_ms / v["mean_ms"].as_f64().unwrap() / queries.len() as f64);
    Ok(v)
}

fn main() -> Result<()> {
    let args = driver_args::args("bench_milvus", SCRIPT);
    let cli = Cli::parse_from(args);
    let local =
        Datastore::open(&cli.store).with_context(|| format!("opening {}", cli.store.display()))?;
    let rows = local.len();
    let queries: Vec<Vec<f32>> = (0..cli.queries)
        .map(|i| local.row((i * rows / cli.queries) as u64).map(|r| r.key))
        .collect::<Result<_, _>>()?;

    let segments = local.segments().iter().filter(|s| !s.retired).count();
    let mut ingest = Value::Null;
    let address = cli.address.as_deref().filter(|_| !cli.local_only);
    if let Some(address) = address.filter(|_| !cli.reuse) {
        let _ = MilvusStore::drop_collection(address);
        let t = Instant::now();
        let r = push(&local, address, &PushOptions::default(), &|_, _| {})?;
        ingest = json!({
            "rows": r.rows,
            "copy_seconds": r.copy_seconds,
            "rows_per_s": r.rows as f64 / r.copy_seconds,
            "index_seconds": r.index_seconds,
            "total_seconds": t.elapsed().as_secs_f64(),
        });
    }
    let local: Arc<dyn Store> = Arc::new(local);
    let mut backends = vec![("local_hnsw", local.clone())];
    if let Some(address) = address {
        let remote: Arc<dyn Store> = Arc::new(MilvusStore::open(address)?);
        backends.push(("milvus", remote));
    }
    let params = SearchParams::hnsw(Some(cli.ef));
    let mut search = serde_json::Map::new();
    for (name, store) in &backends {
        search_latency(store, &queries[..queries.len().min(20)], cli.k, params, 1)?; // warm-up
        let mut per = serde_json::Map::new();
        for &c in &cli.concurrency {
            per.insert(
                format!("concurrency_{c}"),
                search_latency(store, &queries, cli.k, params, c)?,
            );
        }
        per.insert(
            "control_step".into(),
            control_step(store, &queries, cli.k, cli.ef)?,
        );
        search.insert((*name).into(), Value::Object(per));
    }
    let report = json!({
        "store": cli.store,
        "rows": rows,
        "segments": segments,
        "search_threads": rayon::current_num_threads(),
        "dim": local.dim(),
        "k": cli.k,
        "ef": cli.ef,
        "queries": cli.queries,
        "ingest": ingest,
        "backends": search,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
