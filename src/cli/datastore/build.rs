//! `datastore build | add`: datastores from labelled text, keyed by running the model, with
//! terminal progress for extraction and indexing. Resuming, segmenting and provenance are
//! `goodtriever::ingest`'s.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use goodtriever::datastore::{KeyDtype, SegmentInfo};
use goodtriever::fingerprint::KeyType;
use goodtriever::ingest::{
    self, BuildOptions, BuildProgress, BuildReport, InputFormat, LabelFilter, DEFAULT_BATCH,
    DEFAULT_SEGMENT_TOKENS,
};
use goodtriever::model::{Model, WeightFormat};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::{open_any, print_json};
use crate::cli::args::{ModelArgs, ModelFlags};

/// Where the text comes from and how it becomes rows (shared by `build` and `add`).
#[derive(Debug, Args)]
pub struct TextArgs {
    /// Input files: txt (one document per line), jsonl (one object per line) or csv (with a
    /// header row).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Input format; default: from each file's extension (.txt, .jsonl/.ndjson, .csv).
    #[arg(long)]
    pub format: Option<InputFormat>,
    /// Field of jsonl records / csv column that holds the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Numeric field / column to select documents by (with --min-label and/or --max-label).
    #[arg(long)]
    pub label_field: Option<String>,
    /// Keep documents whose label is at least this (e.g. toxicity >= 0.5 for a toxic store).
    #[arg(long, requires = "label_field")]
    pub min_label: Option<f64>,
    /// Keep documents whose label is at most this (e.g. toxicity <= 0.0 for a clean store).
    #[arg(long, requires = "label_field")]
    pub max_label: Option<f64>,
    /// Which hidden state to key on: last_ffn_input (the paper's) or final_hidden. Default:
    /// last_ffn_input for a new store, the store's own for `add`.
    #[arg(long)]
    pub key_type: Option<KeyType>,
    #[command(flatten)]
    pub model: ModelArgs<BuildModel>,
    /// Sliding window in tokens (default 1024, or the model's context if smaller).
    #[arg(long)]
    pub window: Option<usize>,
    /// Distance between window starts (default: half the window).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Label recorded in the segment's provenance (default: the label filter).
    #[arg(long)]
    pub label: Option<String>,
    /// Free-form tag recorded in the segment's provenance (a drift domain, a date).
    #[arg(long)]
    pub tag: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `build` and `add` extract keys from whole windows in batches: dequantised weights are the
/// fastest.
#[derive(Debug)]
pub enum BuildModel {}

impl ModelFlags for BuildModel {
    const MODEL_HELP: &'static str =
        "GGUF model; default: the cached default model (`goodtriever model fetch`)";
    const WEIGHTS_HELP: &'static str =
        "Weights in memory: f32 is the fastest for batched extraction";
    const DEFAULT_WEIGHTS: WeightFormat = WeightFormat::F32;
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub text: TextArgs,
    /// The new datastore's directory (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per chunk: the keys are extracted and committed a chunk at a time, which bounds
    /// extraction memory and lets an interrupted build resume after the last chunk.
    #[arg(long, default_value_t = DEFAULT_SEGMENT_TOKENS)]
    pub segment_tokens: usize,
    /// Keep each chunk as its own segment instead of merging them into one segment with one
    /// index at the end. The merge needs memory for all keys in f32 while it indexes (about
    /// 2.3 KB a row at D = 576), but a search then walks one graph instead of one per chunk.
    #[arg(long)]
    pub keep_segments: bool,
    /// Key storage type (f16 halves memory and scan time).
    #[arg(long, default_value = "f16")]
    pub dtype: KeyDtype,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The datastore to add to: a directory, or a Milvus store `milvus://HOST:PORT/COLLECTION`
    /// (acknowledged once Milvus has persisted the rows).
    #[arg(value_name = "DIR|URL")]
    pub dir: String,
    #[command(flatten)]
    pub text: TextArgs,
}

fn options(t: &TextArgs) -> BuildOptions {
    let mut o = BuildOptions::new(t.input.clone());
    o.input.format = t.format;
    o.input.text_field = t.text_field.clone();
    o.input.filter = t.label_field.as_ref().map(|f| LabelFilter {
        field: f.clone(),
        min: t.min_label,
        max: t.max_label,
    });
    o.key_type = t.key_type;
    o.window = t.window;
    o.stride = t.stride;
    o.batch = t.batch;
    o.label = t.label.clone();
    o.tag = t.tag.clone();
    o
}

fn load_model(t: &TextArgs) -> Result<Model> {
    let path = t.model.path()?;
    let spinner = ProgressBar::new_spinner().with_message(format!("loading {}", path.display()));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let m = Model::load(&path, t.model.weights)
        .with_context(|| format!("cannot load the model {}", path.display()));
    spinner.finish_and_clear();
    m
}

pub fn build(a: BuildArgs) -> Result<()> {
    let mut opts = options(&a.text);
    opts.segment_tokens = a.segment_tokens;
    opts.merge = !a.keep_segments;
    opts.dtype = a.dtype;
    // Cheap checks first, so a typo does not cost a model load.
    opts.input.validate()?;
    let model = load_model(&a.text)?;
    let progress = Bars::new();
    let report = ingest::build(&a.out, &model, &opts, &progress)
        .with_context(|| format!("cannot build {}", a.out.display()))?;
    progress.finish();
    print_report(&report, a.text.json, "built")
}

pub fn add(a: AddArgs) -> Result<()> {
    let opts = options(&a.text);
    opts.input.validate()?;
    let store = open_any(&a.dir)?;
    let model = load_model(&a.text)?;
    let progress = Bars::new();
    let report = ingest::add(store.as_ref(), &model, &opts, &progress)
        .with_context(|| format!("cannot add to {}", a.dir))?;
    progress.finish();
    print_report(&report, a.text.json, "added to")
}

fn print_report(r: &BuildReport, json: bool, verb: &str) -> Result<()> {
    if json {
        return print_json(r);
    }
    let secs = r.extract_seconds + r.index_seconds;
    println!(
        "{verb} {}: {} documents, {} tokens -> {} rows ({} resumed) in {} segment(s); window {} stride {}, {} keys",
        r.dir.display(),
        r.documents,
        r.tokens,
        r.rows + r.resumed_rows,
        r.resumed_rows,
        r.segments.len(),
        r.window,
        r.stride,
        r.key_type
    );
    if r.rows > 0 {
        println!(
            "extraction {:.1} s ({:.0} rows/s), indexing {:.1} s, total {:.1} s",
            r.extract_seconds,
            r.rows as f64 / r.extract_seconds.max(1e-9),
            r.index_seconds,
            secs
        );
    }
    Ok(())
}

/// Terminal progress: one bar for extraction (rows = keyed tokens, with rate and ETA) and one
/// per segment being indexed. Hidden automatically when stderr is not a terminal.
struct Bars {
    multi: MultiProgress,
    extract: ProgressBar,
    index: Mutex<Option<ProgressBar>>,
    /// When stderr is not a terminal (logs, CI) the bars are hidden; a plain line is printed
    /// every `PLAIN_EVERY` instead, so long builds still show signs of life.
    plain: Option<Mutex<PlainLog>>,
}

struct PlainLog {
    start: Instant,
    last: Instant,
    done_at_start: u64,
}

const PLAIN_EVERY: Duration = Duration::from_secs(15);

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::new();
        let extract = multi.add(ProgressBar::new(0));
        extract.set_style(
            ProgressStyle::with_template(
                "{msg:10} [{bar:36}] {human_pos}/{human_len} tokens  {per_sec:>14}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        extract.set_message("extracting");
        let plain = (!std::io::stderr().is_terminal()).then(|| {
            Mutex::new(PlainLog {
                start: Instant::now(),
                last: Instant::now(),
                done_at_start: 0,
            })
        });
        Bars {
            multi,
            extract,
            index: Mutex::new(None),
            plain,
        }
    }

    fn finish(&self) {
        self.extract.finish_and_clear();
        if let Some(b) = self.index.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

impl BuildProgress for Bars {
    fn start(&self, total: u64, done: u64) {
        self.extract.set_length(total);
        self.extract.set_position(done);
        self.extract.reset_eta();
        if done > 0 {
            self.say(format!(
                "resuming an interrupted build: {done} of {total} rows already committed"
            ));
        }
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            p.start = Instant::now();
            p.last = p.start;
            p.done_at_start = done;
        }
    }

    fn rows(&self, n: u64) {
        self.extract.inc(n);
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            if p.last.elapsed() >= PLAIN_EVERY {
                p.last = Instant::now();
                let (pos, len) = (self.extract.position(), self.extract.length().unwrap_or(0));
                let rate = (pos - p.done_at_start) as f64 / p.start.elapsed().as_secs_f64();
                let eta = len.saturating_sub(pos) as f64 / rate.max(1e-9);
                eprintln!("extracting: {pos}/{len} tokens, {rate:.0} tokens/s, ETA {eta:.0} s");
            }
        }
    }

    fn indexing(&self, rows: u64) {
        let b = self.multi.add(ProgressBar::new(rows));
        b.set_style(
            ProgressStyle::with_template(
                "{msg:10} [{bar:36}] {human_pos}/{human_len} rows    ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message("indexing");
        if let Some(old) = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(b)
        {
            old.finish_and_clear();
        }
    }

    fn indexed(&self, rows: u64) {
        if let Some(b) = &*self.index.lock().unwrap_or_else(|p| p.into_inner()) {
            b.set_position(rows);
        }
    }

    fn committed(&self, s: &SegmentInfo) {
        if let Some(b) = self.index.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
        self.say(format!("committed segment {} ({} rows)", s.id, s.rows));
    }
}

impl Bars {
    fn say(&self, line: String) {
        if self.plain.is_some() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}
