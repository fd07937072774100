//! `datastore push DIR milvus://…`: copy a local store into a new Milvus collection, with a
//! progress bar; rerunning resumes an interrupted push and does nothing after a finished one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use goodtriever::milvus::{push as push_store, PushOptions};

use super::{open, print_json, progress_bar};

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The local datastore to copy (its live segments).
    pub dir: PathBuf,
    /// The target: `milvus://HOST:PORT/COLLECTION` (`milvuss://` for TLS; options in
    /// docs/usage.md). The collection must not exist, or hold an earlier push of this store.
    #[arg(value_name = "URL")]
    pub address: String,
    /// Rows per insert request.
    #[arg(long, default_value_t = PushOptions::default().batch_rows)]
    pub batch_rows: usize,
    /// Rows between checkpoints (flush, then record progress): what an interruption can cost
    /// to copy again.
    #[arg(long, default_value_t = PushOptions::default().checkpoint_rows)]
    pub checkpoint_rows: usize,
    /// HNSW M of the collection's index.
    #[arg(long, default_value_t = PushOptions::default().m)]
    pub m: usize,
    /// HNSW efConstruction of the collection's index.
    #[arg(long, default_value_t = PushOptions::default().ef_construction)]
    pub ef_construction: usize,
    /// Shards of a new collection (docs/scale-out.md).
    #[arg(long, default_value_t = PushOptions::default().shards)]
    pub shards: i32,
    /// Return once the rows are copied, without waiting for Milvus to index them.
    #[arg(long)]
    pub no_wait_index: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn push(a: PushArgs) -> Result<()> {
    let src = open(&a.dir)?;
    let opts = PushOptions {
        batch_rows: a.batch_rows,
        checkpoint_rows: a.checkpoint_rows,
        m: a.m,
        ef_construction: a.ef_construction,
        shards: a.shards,
        wait_index: !a.no_wait_index,
    };
    let bar = progress_bar(src.len() as u64, "pushing");
    let report = push_store(&src, &a.address, &opts, &|done, _| bar.set_position(done))
        .with_context(|| format!("cannot push {} to {}", a.dir.display(), a.address))?;
    bar.finish_and_clear();
    if a.json {
        return print_json(&report);
    }
    println!(
        "pushed {} to {}: {} rows in {} segment(s) ({} already there, {} copied) in {:.1} s ({:.0} rows/s), index {:.1} s",
        a.dir.display(),
        report.address,
        report.rows,
        report.segments,
        report.resumed_rows,
        report.copied_rows,
        report.copy_seconds,
        report.copied_rows as f64 / report.copy_seconds.max(1e-9),
        report.index_seconds
    );
    Ok(())
}
