//! `datastore search`: the store's own kNN search on a batch of queries, for checking recall
//! against the exact scan and measuring latency outside any engine.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use goodtriever::datastore::{SearchMode, SearchParams};
use goodtriever::npy;

use super::open;

#[derive(Debug, Args)]
pub struct BatchSearchArgs {
    /// The datastore directory.
    pub dir: PathBuf,
    /// Queries: .npy of float32 or float16, shape [B, D].
    #[arg(long)]
    pub queries: PathBuf,
    /// Neighbours per query (1..=4096).
    #[arg(long)]
    pub k: usize,
    /// Exact flat scan of every segment (ground truth) instead of the automatic choice.
    #[arg(long, conflicts_with = "hnsw")]
    pub exact: bool,
    /// HNSW on every segment larger than k, whatever its size.
    #[arg(long)]
    pub hnsw: bool,
    /// HNSW candidate list size (raised to k). Default: max(k, 128).
    #[arg(long)]
    pub ef: Option<usize>,
    /// Output ids, int64 [B, K]; -1 pads rows when the store has fewer than K rows.
    #[arg(long)]
    pub out_ids: PathBuf,
    /// Output squared L2 distances, float32 [B, K]; +inf pads like the ids.
    #[arg(long)]
    pub out_dists: PathBuf,
    /// Search the queries one at a time (single-query latency) instead of as one batch.
    #[arg(long)]
    pub one_by_one: bool,
    /// Print timings as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn search(a: BatchSearchArgs) -> Result<()> {
    let ds = open(&a.dir)?;
    let (b, d, queries) = npy::read_queries(&a.queries).context("cannot read queries")?;
    if b == 0 {
        bail!(
            "{} has no rows: give at least one query row",
            a.queries.display()
        );
    }
    if d != ds.dim() {
        bail!(
            "{} has D = {d} but {} holds {}-dimensional keys",
            a.queries.display(),
            a.dir.display(),
            ds.dim()
        );
    }
    let params = SearchParams {
        mode: if a.exact {
            SearchMode::Exact
        } else if a.hnsw {
            SearchMode::Hnsw
        } else {
            SearchMode::Auto
        },
        ef: a.ef,
    };
    let mut out = vec![Vec::new(); b];
    let mut lat_ms = Vec::new();
    let t = Instant::now();
    if a.one_by_one {
        for (i, o) in out.iter_mut().enumerate() {
            let t1 = Instant::now();
            ds.search_into(
                &queries[i * d..(i + 1) * d],
                a.k,
                &params,
                std::slice::from_mut(o),
            )?;
            lat_ms.push(t1.elapsed().as_secs_f64() * 1e3);
        }
    } else {
        ds.search_into(&queries, a.k, &params, &mut out)?;
    }
    let total_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut ids = vec![-1i64; b * a.k];
    let mut dists = vec![f32::INFINITY; b * a.k];
    for (i, row) in out.iter().enumerate() {
        for (j, n) in row.iter().enumerate() {
            ids[i * a.k + j] = n.id as i64;
            dists[i * a.k + j] = n.dist;
        }
    }
    npy::write_i64(&a.out_ids, b, a.k, &ids)?;
    npy::write_f32(&a.out_dists, b, a.k, &dists)?;
    lat_ms.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| -> Option<f64> {
        (!lat_ms.is_empty()).then(|| lat_ms[((lat_ms.len() - 1) as f64 * p).round() as usize])
    };
    if a.json {
        let v = serde_json::json!({
            "queries": b, "k": a.k, "ef": params.effective_ef(a.k),
            "mode": format!("{:?}", params.mode).to_lowercase(),
            "total_ms": total_ms, "per_query_ms": total_ms / b.max(1) as f64,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99),
        });
        println!("{v}");
    } else {
        eprintln!(
            "{b} queries, k = {}, {:.3} ms total, {:.3} ms per query",
            a.k,
            total_ms,
            total_ms / b.max(1) as f64
        );
    }
    Ok(())
}
