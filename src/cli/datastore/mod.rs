//! `goodtriever datastore ...`: every subcommand that makes, reads or changes a kNN datastore.
//! One file per family (`build`, `import`, `inspect`, `search`, `maintain`); this one holds the
//! subcommand list, the dispatch and what the families share: opening a store, printing JSON
//! and segments, the row progress bar. Thin: parse, call `goodtriever::datastore` (and
//! `goodtriever::ingest`), print.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use goodtriever::datastore::{Datastore, SegmentInfo};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

mod build;
mod import;
mod inspect;
mod maintain;
#[cfg(feature = "milvus")]
mod push;
mod search;

#[derive(Debug, Args)]
pub struct DatastoreArgs {
    #[command(subcommand)]
    pub command: DatastoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// Build a new datastore from labelled text by running the model (see `add` to grow one).
    Build(Box<build::BuildArgs>),
    /// Add labelled text to a datastore as one new segment; open readers see it on refresh.
    Add(Box<build::AddArgs>),
    /// List segments with their provenance (source, label filter, tag, time, rows); a
    /// directory or a `milvus://` address.
    Segments(StoreArg),
    /// Import keys and values from .npy files as a new segment (creating the store if needed).
    Import(import::ImportArgs),
    /// Show a datastore's model, key type, dtype, rows and segments (a directory or a
    /// `milvus://` address).
    Info(StoreArg),
    /// Check every file's size and CRC-32 and every index; for a `milvus://` store, its row
    /// counts and metadata and a sample of rows (against --against DIR after a push). Exits
    /// non-zero on any problem.
    Verify(inspect::VerifyArgs),
    /// Copy a local datastore into a new Milvus collection (`milvus://HOST:PORT/COLLECTION`),
    /// with its segments and provenance; rerun to resume after an interruption.
    #[cfg(feature = "milvus")]
    Push(push::PushArgs),
    /// Batch k-nearest-neighbour search; writes ids and squared L2 distances as .npy.
    Search(search::BatchSearchArgs),
    /// Take a segment out of search (its files stay until `compact`).
    Retire(maintain::SegmentArgs),
    /// Put a retired segment back into search.
    Unretire(maintain::SegmentArgs),
    /// Merge all live segments into one and delete retired and merged files.
    Compact(DirArgs),
    /// Read one row back: its segment, value (next token id) and key (summary, or all of it
    /// with --full). For checking what an import or build stored.
    Show(inspect::ShowArgs),
}

/// The arguments of the read-only subcommands that work on any store.
#[derive(Debug, Args)]
pub struct StoreArg {
    /// The datastore: a directory, or a Milvus store `milvus://HOST:PORT/COLLECTION`.
    #[arg(value_name = "DIR|URL")]
    pub store: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of the subcommands that need nothing but the store.
#[derive(Debug, Args)]
pub struct DirArgs {
    /// The datastore directory.
    pub dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DatastoreArgs) -> Result<()> {
    match args.command {
        DatastoreCommand::Build(a) => build::build(*a),
        DatastoreCommand::Add(a) => build::add(*a),
        DatastoreCommand::Segments(a) => inspect::segments(a),
        DatastoreCommand::Import(a) => import::import(a),
        DatastoreCommand::Info(a) => inspect::info(&a.store, a.json),
        DatastoreCommand::Verify(a) => inspect::verify(a),
        #[cfg(feature = "milvus")]
        DatastoreCommand::Push(a) => push::push(a),
        DatastoreCommand::Search(a) => search::search(a),
        DatastoreCommand::Show(a) => inspect::show(a),
        DatastoreCommand::Retire(a) => maintain::retire(a),
        DatastoreCommand::Unretire(a) => maintain::unretire(a),
        DatastoreCommand::Compact(a) => maintain::compact(a),
    }
}

/// Opens an existing store, naming it in the error.
fn open(dir: &Path) -> Result<Datastore> {
    Datastore::open(dir).with_context(|| format!("cannot open datastore {}", dir.display()))
}

/// Opens the store an address names (a directory or a `milvus://` URL), naming it in the error.
fn open_any(address: &str) -> Result<std::sync::Arc<dyn goodtriever::store::Store>> {
    goodtriever::store_address::open_store(address)
        .with_context(|| format!("cannot open datastore {address}"))
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`), for a terminal: a store's
/// provenance is data, and one written before appends checked it could hold anything.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// The answer of the subcommands that make or change one segment.
fn print_segment(s: &SegmentInfo, json: bool, verb: &str) -> Result<()> {
    if json {
        print_json(s)
    } else {
        println!("{verb} segment {} ({} rows)", s.id, s.rows);
        Ok(())
    }
}

/// Progress of indexing `len` rows (import, compact); `build` and `add` have their own bars.
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
