//! `goodtriever datastore ...`: import hidden states dumped by any engine, inspect, verify,
//! search, retire and compact datastores. Thin: parse, call `goodtriever::datastore`, print.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use goodtriever::datastore::{
    CreateOptions, Datastore, KeyDtype, Keys, Provenance, SearchMode, SearchParams,
};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::npy;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct DatastoreArgs {
    #[command(subcommand)]
    pub command: DatastoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// Build a new datastore from labelled text by running the model (see `add` to grow one).
    Build(Box<super::datastore_build::BuildArgs>),
    /// Add labelled text to a datastore as one new segment; open readers see it on refresh.
    Add(Box<super::datastore_build::AddArgs>),
    /// List segments with their provenance (source, label filter, tag, time, rows).
    Segments(super::datastore_build::SegmentsArgs),
    /// Import keys and values from .npy files as a new segment (creating the store if needed).
    Import(ImportArgs),
    /// Show a datastore's model, key type, dtype, rows and segments.
    Info(InfoArgs),
    /// Check every file's size and CRC-32 and every index; exit non-zero on any problem.
    Verify(InfoArgs),
    /// Batch k-nearest-neighbour search; writes ids and squared L2 distances as .npy.
    Search(SearchArgs),
    /// Take a segment out of search (its files stay until `compact`).
    Retire(SegmentArgs),
    /// Put a retired segment back into search.
    Unretire(SegmentArgs),
    /// Merge all live segments into one and delete retired and merged files.
    Compact(InfoArgs),
    /// Read one row back: its segment, value (next token id) and key (summary, or all of it
    /// with --full). For checking what an import or build stored.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The datastore directory.
    pub dir: PathBuf,
    /// Row id among live rows, as searches return it (0-based).
    #[arg(long)]
    pub row: u64,
    /// Print the whole key, not only its summary.
    #[arg(long)]
    pub full: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Keys: .npy of float32 or float16, shape [N, D].
    #[arg(long)]
    pub keys: PathBuf,
    /// Values (next-token ids): .npy of int32, int64 or uint32, shape [N] or [N, 1].
    #[arg(long)]
    pub values: PathBuf,
    /// Which hidden state the keys are. Default for a new store: last_ffn_input; for an
    /// existing store it must match (default: the store's).
    #[arg(long)]
    pub key_type: Option<KeyType>,
    /// Model the keys come from. Default for a new store: "unknown"; for an existing store it
    /// must match (default: the store's).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Key storage type of a new store (f16 halves memory and scan time). An existing store
    /// keeps its dtype; giving a different one is an error.
    #[arg(long)]
    pub dtype: Option<KeyDtype>,
    /// Dataset label recorded in the segment's provenance, e.g. toxic or non_toxic.
    #[arg(long)]
    pub label: Option<String>,
    /// Free-form tag recorded in the segment's provenance (e.g. a drift domain).
    #[arg(long)]
    pub tag: Option<String>,
    /// Print the new segment as JSON.
    #[arg(long)]
    pub json: bool,
    /// The datastore directory.
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The datastore directory.
    pub dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// The datastore directory.
    pub dir: PathBuf,
    /// Segment id (see `datastore info`).
    pub segment: u64,
    /// Print the segment as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
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

pub fn run(args: DatastoreArgs) -> Result<()> {
    match args.command {
        DatastoreCommand::Build(a) => super::datastore_build::build(*a),
        DatastoreCommand::Add(a) => super::datastore_build::add(*a),
        DatastoreCommand::Segments(a) => super::datastore_build::segments(a),
        DatastoreCommand::Import(a) => import(a),
        DatastoreCommand::Info(a) => info(&a.dir, a.json),
        DatastoreCommand::Verify(a) => verify(&a.dir, a.json),
        DatastoreCommand::Search(a) => search(a),
        DatastoreCommand::Show(a) => show(a),
        DatastoreCommand::Retire(a) => {
            let ds = open(&a.dir)?;
            let s = ds.retire(a.segment)?;
            print_segment(&s, a.json, "retired")
        }
        DatastoreCommand::Unretire(a) => {
            let ds = open(&a.dir)?;
            let s = ds.unretire(a.segment)?;
            print_segment(&s, a.json, "unretired")
        }
        DatastoreCommand::Compact(a) => {
            let ds = open(&a.dir)?;
            let bar = progress_bar(ds.len() as u64, "indexing");
            let r = ds.compact_with_progress(&|n| bar.set_position(n as u64))?;
            bar.finish_and_clear();
            match r {
                Some(s) => print_segment(&s, a.json, "compacted into"),
                None => {
                    if a.json {
                        println!("null");
                    } else {
                        println!("nothing to compact");
                    }
                    Ok(())
                }
            }
        }
    }
}

fn open(dir: &Path) -> Result<Datastore> {
    Datastore::open(dir).with_context(|| format!("cannot open datastore {}", dir.display()))
}

fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} rows ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn print_segment(s: &goodtriever::datastore::SegmentInfo, json: bool, verb: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
    } else {
        println!("{verb} segment {} ({} rows)", s.id, s.rows);
    }
    Ok(())
}

fn import(a: ImportArgs) -> Result<()> {
    let keys = npy::read_keys(&a.keys).context("cannot read keys")?;
    let values = npy::read_values(&a.values).context("cannot read values")?;
    if keys.rows != values.len() {
        bail!(
            "{} has {} rows but {} has {} values; they must match",
            a.keys.display(),
            keys.rows,
            a.values.display(),
            values.len()
        );
    }
    let ds = if a.dir.join("manifest.json").exists() {
        let ds = open(&a.dir)?;
        if ds.dim() != keys.dim {
            bail!(
                "{} holds {}-dimensional keys but {} has D = {}; nothing was changed",
                a.dir.display(),
                ds.dim(),
                a.keys.display(),
                keys.dim
            );
        }
        if let Some(id) = &a.model_id {
            if *id != ds.fingerprint().model_id {
                bail!(
                    "{} was built for model {:?}, not {:?}; nothing was changed",
                    a.dir.display(),
                    ds.fingerprint().model_id,
                    id
                );
            }
        }
        if let Some(kt) = a.key_type {
            if kt != ds.key_type() {
                bail!(
                    "{} holds {} keys, not {}; nothing was changed",
                    a.dir.display(),
                    ds.key_type(),
                    kt
                );
            }
        }
        if let Some(dt) = a.dtype {
            if dt != ds.dtype() {
                bail!(
                    "{} stores {} keys; --dtype {} cannot change that; nothing was changed",
                    a.dir.display(),
                    ds.dtype(),
                    dt
                );
            }
        }
        ds
    } else {
        let opts = CreateOptions {
            fingerprint: ModelFingerprint::named(
                a.model_id.clone().unwrap_or_else(|| "unknown".into()),
                keys.dim,
            ),
            key_type: a.key_type.unwrap_or(KeyType::LastFfnInput),
            dtype: a.dtype.unwrap_or_default(),
        };
        Datastore::create(&a.dir, opts)
            .with_context(|| format!("cannot create datastore {}", a.dir.display()))?
    };
    let mut prov = Provenance::new(format!(
        "{} (values {})",
        a.keys.display(),
        a.values.display()
    ));
    prov.label = a.label;
    prov.tag = a.tag;
    let bar = progress_bar(keys.rows as u64, "indexing");
    let data = match &keys.data {
        npy::KeyArray::F32(v) => Keys::F32(v),
        npy::KeyArray::F16(v) => Keys::F16(v),
    };
    let seg = ds
        .append_with_progress(data, &values, prov, &|n| bar.set_position(n as u64))
        .with_context(|| format!("cannot append to {}", a.dir.display()))?;
    bar.finish_and_clear();
    print_segment(&seg, a.json, "added")
}

fn info(dir: &Path, json: bool) -> Result<()> {
    let ds = open(dir)?;
    let segments = ds.segments();
    if json {
        let v = serde_json::json!({
            "dir": ds.dir(),
            "fingerprint": ds.fingerprint(),
            "key_type": ds.key_type(),
            "dtype": ds.dtype(),
            "dim": ds.dim(),
            "rows": ds.len(),
            "segments": segments,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("datastore  {}", ds.dir().display());
    println!("model      {}", ds.fingerprint().model_id);
    println!("key type   {}", ds.key_type());
    println!("dtype      {}", ds.dtype());
    println!("dim        {}", ds.dim());
    println!("rows       {}", ds.len());
    println!("segments   {}", segments.len());
    for s in segments {
        println!(
            "  #{:<5} {:>10} rows {:>12} bytes{}  {}{}{}",
            s.id,
            s.rows,
            s.bytes,
            if s.retired { "  RETIRED" } else { "" },
            s.provenance.source,
            s.provenance
                .label
                .as_ref()
                .map(|l| format!(" label={l}"))
                .unwrap_or_default(),
            s.provenance
                .tag
                .as_ref()
                .map(|t| format!(" tag={t}"))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

/// Number of leading key components `show` prints without --full.
const SHOW_HEAD: usize = 8;

fn show(a: ShowArgs) -> Result<()> {
    let ds = open(&a.dir)?;
    let row = ds
        .row(a.row)
        .with_context(|| format!("cannot read row {} of {}", a.row, a.dir.display()))?;
    let seg = ds
        .segments()
        .into_iter()
        .find(|s| s.id == row.segment)
        .context("the row's segment is not listed (the store changed while reading)")?;
    let k = &row.key;
    let norm = k
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let mean = k.iter().map(|&x| f64::from(x)).sum::<f64>() / k.len().max(1) as f64;
    let min = k.iter().copied().fold(f32::INFINITY, f32::min);
    let max = k.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let head = &k[..k.len().min(SHOW_HEAD)];
    if a.json {
        let mut v = serde_json::json!({
            "dir": ds.dir(),
            "row": row.id,
            "live_rows": ds.len(),
            "segment": row.segment,
            "row_in_segment": row.row_in_segment,
            "value": row.value,
            "key_type": ds.key_type(),
            "dtype": ds.dtype(),
            "dim": k.len(),
            "key_summary": {"l2_norm": norm, "mean": mean, "min": min, "max": max, "head": head},
            "segment_provenance": seg.provenance,
        });
        if a.full {
            v["key"] = serde_json::json!(k);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("row        {} of {} live rows", row.id, ds.len());
    println!(
        "segment    {} (row {} of its {}){}",
        row.segment,
        row.row_in_segment,
        seg.rows,
        seg.provenance
            .tag
            .as_ref()
            .map(|t| format!(", tag {t}"))
            .unwrap_or_default()
    );
    println!("source     {}", seg.provenance.source);
    println!("value      {} (next token id)", row.value);
    println!(
        "key        {} x {} {}: l2 norm {norm:.4}, mean {mean:.4}, min {min:.4}, max {max:.4}",
        k.len(),
        ds.dtype(),
        ds.key_type()
    );
    let fmt = |xs: &[f32]| {
        xs.iter()
            .map(|x| format!("{x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if a.full {
        println!("key values [{}]", fmt(k));
    } else {
        println!(
            "key head   [{}{}]  (--full prints all {})",
            fmt(head),
            if k.len() > head.len() { ", ..." } else { "" },
            k.len()
        );
    }
    Ok(())
}

fn verify(dir: &Path, json: bool) -> Result<()> {
    let ds = open(dir)?;
    let report = ds.verify()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} files of {} segments ({} live rows)",
            report.files.len(),
            report.segments,
            report.live_rows
        );
    }
    if !report.is_ok() {
        let lines: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        bail!(
            "{} problem(s) in {}:\n  {}",
            lines.len(),
            dir.display(),
            lines.join("\n  ")
        );
    }
    if !json {
        println!("ok");
    }
    Ok(())
}

fn search(a: SearchArgs) -> Result<()> {
    let ds = open(&a.dir)?;
    let (b, d, queries) = npy::read_queries(&a.queries).context("cannot read queries")?;
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
