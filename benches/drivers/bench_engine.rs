//! Measurement driver for `scripts/bench/bench_search.py`: single-query search latency, resident
//! memory after open, and the full decoding rule over two stores, on datastores that the script
//! imported with `goodtriever datastore import`.
//!
//! ```text
//! cargo bench --bench bench_engine -- search --store DIR --queries Q.npy --k 1024 \
//!     --ef 1024,1536 --out-dir OUT
//! cargo bench --bench bench_engine -- rule --toxic DIR --nontoxic DIR \
//!     --queries Q.npy --k 1024 --ef 1024
//! ```
//!
//! Every query is searched alone, one after the other, as a decoding step does; the printed JSON
//! holds p50/p99/mean latency per configuration, and `search` writes each configuration's ids as
//! `.npy` so the script scores recall against one ground truth (faiss `IndexFlatL2`) for both
//! libraries. Resident memory is read from `/proc/self/status` (Linux).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use goodtriever::datastore::{Datastore, Neighbour, SearchParams};
use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
use goodtriever::npy;
use goodtriever::rule::{self, Expert, Mode, RuleParams, RuleScratch, SparseRow};
use serde_json::{json, Value};

mod driver_args;

/// The script that runs this driver.
const SCRIPT: &str = "scripts/bench/bench_search.py";

#[derive(Parser)]
#[command(name = "bench_engine", bin_name = "bench_engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Single-query search latency of one store, exact and HNSW at each `ef`.
    Search {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        queries: PathBuf,
        #[arg(long)]
        k: usize,
        /// HNSW `ef` values to sweep (comma-separated; each is raised to k).
        #[arg(long, value_delimiter = ',')]
        ef: Vec<usize>,
        /// Skip the exact scan.
        #[arg(long)]
        no_exact: bool,
        /// Where to write `ids_<config>.npy`.
        #[arg(long)]
        out_dir: PathBuf,
        /// Untimed passes over all queries first, so the pages of the keys and graph that the
        /// queries touch are mapped and scratch buffers have grown (a server's steady state).
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// The full rule (`Detoxifier::adjust_sparse`, ensemble mode) for one row at a time over
    /// two stores, with a breakdown of where the time goes.
    Rule {
        #[arg(long)]
        toxic: PathBuf,
        #[arg(long)]
        nontoxic: PathBuf,
        #[arg(long)]
        queries: PathBuf,
        #[arg(long)]
        k: usize,
        /// HNSW `ef` (raised to k).
        #[arg(long)]
        ef: Option<usize>,
        /// Vocabulary size for the rule (SmolLM2's by default).
        #[arg(long, default_value_t = 49_152)]
        vocab: usize,
        /// Untimed passes over all queries first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
}

/// `VmRSS`, `RssAnon` and `RssFile` of this process, in MiB.
fn rss_mib() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<f64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    json!({
        "vm_rss": field("VmRSS:"),
        "rss_anon": field("RssAnon:"),
        "rss_file": field("RssFile:"),
    })
}

fn stats(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    json!({
        "n": ms.len(),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mean_ms": ms.iter().sum::<f64>() / ms.len() as f64,
    })
}

fn open(dir: &Path) -> Result<Arc<Datastore>> {
    Ok(Arc::new(Datastore::open(dir).with_context(|| {
        format!("cannot open datastore {}", dir.display())
    })?))
}

fn read_queries(path: &Path, dim: usize) -> Result<(usize, Vec<f32>)> {
    let (b, d, q) = npy::read_queries(path).context("cannot read queries")?;
    anyhow::ensure!(d == dim, "queries have D = {d}, the store {dim}");
    anyhow::ensure!(b > 0, "no queries");
    Ok((b, q))
}

/// Times `f(query)` for every query (after `warmup` untimed passes), in milliseconds.
fn time_each(
    queries: &[f32],
    dim: usize,
    warmup: usize,
    mut f: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<Vec<f64>> {
    let b = queries.len() / dim;
    for _ in 0..warmup {
        for i in 0..b {
            f(i, &queries[i * dim..(i + 1) * dim])?;
        }
    }
    let mut ms = Vec::with_capacity(b);
    for i in 0..b {
        let t = Instant::now();
        f(i, &queries[i * dim..(i + 1) * dim])?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ms)
}

#[allow(clippy::too_many_arguments)]
fn search(
    store: &Path,
    queries: &Path,
    k: usize,
    efs: &[usize],
    no_exact: bool,
    out_dir: &Path,
    warmup: usize,
) -> Result<Value> {
    let rss_before = rss_mib();
    let t = Instant::now();
    let ds = open(store)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_open = rss_mib();
    let dim = ds.dim();
    let (b, q) = read_queries(queries, dim)?;
    std::fs::create_dir_all(out_dir)?;
    let mut configs: Vec<(String, SearchParams)> = Vec::new();
    if !no_exact {
        configs.push(("exact".into(), SearchParams::exact()));
    }
    for &ef in efs {
        configs.push((format!("hnsw_ef{ef}"), SearchParams::hnsw(Some(ef))));
    }
    let mut results = Vec::new();
    let mut one = vec![Vec::<Neighbour>::new()];
    for (name, params) in configs {
        let mut ids = vec![-1i64; b * k];
        let ms = time_each(&q, dim, warmup, |i, row| {
            ds.search_into(row, k, &params, &mut one)?;
            for (j, n) in one[0].iter().enumerate() {
                ids[i * k + j] = n.id as i64;
            }
            Ok(())
        })?;
        let path = out_dir.join(format!("ids_{name}.npy"));
        npy::write_i64(&path, b, k, &ids)?;
        results.push(json!({
            "config": name,
            "ef": params.ef.map(|e| e.max(k)),
            "latency": stats(ms),
            "ids": path,
        }));
    }
    Ok(json!({
        "rows": ds.len(),
        "dim": dim,
        "dtype": ds.dtype().to_string(),
        "kernel": goodtriever::datastore::kernel_name(),
        "rayon_threads": rayon::current_num_threads(),
        "queries": b,
        "k": k,
        "open_ms": open_ms,
        "rss_mib_before_open": rss_before,
        "rss_mib_after_open": rss_open,
        "rss_mib_after_search": rss_mib(),
        "results": results,
    }))
}

fn rule_bench(
    toxic: &Path,
    nontoxic: &Path,
    queries: &Path,
    k: usize,
    ef: Option<usize>,
    vocab: usize,
    warmup: usize,
) -> Result<Value> {
    let rss_before = rss_mib();
    let tox = open(toxic)?;
    let non = open(nontoxic)?;
    let rss_open = rss_mib();
    let dim = tox.dim();
    let (_, q) = read_queries(queries, dim)?;
    let opts = AdjustOptions {
        params: RuleParams {
            k,
            ..RuleParams::default()
        },
        mode: Mode::Ensemble,
    };
    let mut out = Vec::new();
    for (name, params) in [
        ("exact", SearchParams::exact()),
        ("hnsw", SearchParams::hnsw(ef)),
    ] {
        let detox = Detoxifier::goodtriever(tox.clone(), non.clone(), opts, params, Some(vocab))?;
        let mut scratch = DetoxScratch::default();
        let mut rows: Vec<SparseRow> = Vec::new();
        // The whole step, as a client of the engine sees it.
        let full = time_each(&q, dim, warmup, |_, row| {
            detox.adjust_sparse(row, &opts, &mut scratch, &mut rows)?;
            Ok(())
        })?;
        // Breakdown: each store's search alone, then the rule alone on the last neighbours.
        let mut nb_t = vec![Vec::<Neighbour>::new()];
        let mut nb_n = vec![Vec::<Neighbour>::new()];
        let search_t = time_each(&q, dim, 0, |_, row| {
            tox.search_into(row, k, &params, &mut nb_t)?;
            Ok(())
        })?;
        let search_n = time_each(&q, dim, 0, |_, row| {
            non.search_into(row, k, &params, &mut nb_n)?;
            Ok(())
        })?;
        let experts = [
            Expert::new(-1.0, nb_t[0].as_slice()),
            Expert::new(1.0, nb_n[0].as_slice()),
        ];
        let mut rs = RuleScratch::new();
        let mut answer = SparseRow::default();
        let reps = 200;
        let mut rule_ms = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            rule::sparse_row(
                Mode::Ensemble,
                &experts,
                &opts.params,
                vocab,
                &mut rs,
                &mut answer,
            )?;
            rule_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let pairs = match &answer {
            SparseRow::Bias { pairs, .. } => pairs.len(),
            SparseRow::Mixture { log_probs, .. } => log_probs.len(),
        };
        out.push(json!({
            "search": name,
            "ef": (name == "hnsw").then(|| params.effective_ef(k)),
            "full_rule": stats(full),
            "toxic_search_alone": stats(search_t),
            "nontoxic_search_alone": stats(search_n),
            "rule_alone": stats(rule_ms),
            "bias_pairs": pairs,
        }));
    }
    Ok(json!({
        "rows": [tox.len(), non.len()],
        "dim": dim,
        "dtype": tox.dtype().to_string(),
        "k": k,
        "rayon_threads": rayon::current_num_threads(),
        "rss_mib_before_open": rss_before,
        "rss_mib_after_open": rss_open,
        "rss_mib_after_bench": rss_mib(),
        "results": out,
    }))
}

fn main() -> Result<()> {
    let v = match Cli::parse_from(driver_args::args("bench_engine", SCRIPT)).cmd {
        Cmd::Search {
            store,
            queries,
            k,
            ef,
            no_exact,
            out_dir,
            warmup,
        } => search(&store, &queries, k, &ef, no_exact, &out_dir, warmup)?,
        Cmd::Rule {
            toxic,
            nontoxic,
            queries,
            k,
            ef,
            vocab,
            warmup,
        } => rule_bench(&toxic, &nontoxic, &queries, k, ef, vocab, warmup)?,
    };
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
