//! Datastores from labelled text: read, select, tokenize, run the LM, store (key, next token).
//!
//! This is the write side of the project (issue 4). [`build`] makes a new datastore from text
//! files; [`add`] appends text to an existing one as a single new segment, which readers (a
//! running `goodtriever serve`, any process holding the store open) pick up on their next
//! `refresh` without rebuilding anything. Retiring and compacting segments is the store's own
//! API ([`crate::datastore::Datastore::retire`], `compact`).
//!
//! Pipeline: [`input`] streams documents out of txt/jsonl/csv files through a label filter;
//! [`stream`] tokenizes them, joins them with EOS separators and cuts them into chunks;
//! [`extract_rows`] runs each chunk through the model in batches of sliding windows
//! ([`Model::encode_pairs`]) and collects one row per keyed position; each chunk is appended
//! as one segment, and a build of several chunks then compacts them into one segment with one
//! index over all its rows ([`BuildOptions::merge`]), since every segment costs a search a
//! graph walk of its own.
//!
//! Never lose or corrupt data:
//! - Bad input (unreadable file, missing field, non-numeric label, a model that does not match
//!   the store) is found before the model runs, and nothing is written.
//! - `add` commits exactly one segment through the store's atomic manifest replacement: a
//!   killed `add` leaves the store exactly as it was (its half-written segment is garbage,
//!   removed on the next open).
//! - `build` of a large input writes several segments, so it works in a hidden staging
//!   directory next to the output (`.NAME.partial/`) and renames the finished store into
//!   place: the output path either does not exist or holds the complete store. The staging
//!   directory records what is being built; a rerun with the same inputs, options and model
//!   resumes after the last committed segment, and anything else starts over. The merge of a
//!   finished build's chunks commits like any compaction (one manifest switch), so a kill
//!   during it resumes into the merge, and one after it into publishing. A kill after
//!   the publishing rename but before the staging directory is removed leaves that
//!   directory holding only the lock and journal: the published store is complete, and
//!   nothing reads the leftovers (they may be deleted).

pub mod input;
pub mod stream;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::f16;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use input::{read_documents, FileStats, InputFormat, InputSpec, LabelFilter};
pub use stream::{plan_chunks, row_positions, ChunkPlan, Corpus, Piece};

use crate::datastore::{
    CreateOptions, Datastore, DatastoreError, KeyDtype, Keys, LabelRange, Part, Provenance,
    SegmentInfo, SourceFile, TextProvenance, DEFAULT_EF_CONSTRUCTION, DEFAULT_M,
};
use crate::fingerprint::KeyType;
use crate::model::{Model, ModelError};
use crate::store::Store;

/// Default sliding window and stride, as in the paper.
pub const DEFAULT_WINDOW: usize = 1024;
/// Default number of windows run through the model together.
pub const DEFAULT_BATCH: usize = 4;
/// Default chunk (segment) size of a build, in stream tokens: ~150 MB of f16 keys at D = 576.
/// With the store's encoded copy and the HNSW index's own f32 copy while the segment is
/// indexed (~5 KB a token in all) a build needs about 0.7 GB besides the model, whatever the
/// input size.
pub const DEFAULT_SEGMENT_TOKENS: usize = 131_072;

/// HNSW parameters of a merged build's staged chunks: their graphs are only kept so that a
/// resumed build can open the staging store, never searched, so they are made as cheaply as
/// the index allows.
const STAGING_M: usize = 2;
const STAGING_EF_CONSTRUCTION: usize = 4;

/// Errors of the datastore builder. Every variant about input names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file operation on an input, the output or the staging directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`open`, `read`, `rename into place`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// An input file holds no records (for csv: not even a header).
    #[error("{0} is empty: it holds no documents")]
    EmptyInput(PathBuf),
    /// A record lacks the text or label field the options name.
    #[error("{path}:{line}: no field {field:?} (fields: {available})")]
    MissingField {
        /// The input file.
        path: PathBuf,
        /// The line, 1-based.
        line: usize,
        /// The field asked for.
        field: String,
        /// The fields the record has, comma-separated.
        available: String,
    },
    /// A record's label field is not a number, so the label filter cannot judge it.
    #[error("{path}:{line}: label {field:?} is {value}, which is not a number")]
    BadLabel {
        /// The input file.
        path: PathBuf,
        /// The line, 1-based.
        line: usize,
        /// The label field.
        field: String,
        /// Its value as found.
        value: String,
    },
    /// A record cannot be parsed (bad JSON, not an object, a broken csv quote, ...).
    #[error("{path}:{line}: {detail}")]
    BadRecord {
        /// The input file.
        path: PathBuf,
        /// The line, 1-based.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// The label filter (or blank texts) left no document; the detail counts what was read.
    #[error("no document selected: {0}")]
    NothingSelected(String),
    /// The options contradict themselves or the model (no inputs, stride above window, ...).
    #[error("invalid options: {0}")]
    Options(String),
    /// `build` was pointed at an existing datastore.
    #[error("{0} already holds a datastore; use `goodtriever datastore add` to add text to it, or remove it to build it again")]
    OutputExists(PathBuf),
    /// `build` was pointed at a non-empty directory that is not a datastore.
    #[error("{0} exists and is not an empty directory; choose another output path")]
    OutputNotEmpty(PathBuf),
    /// `add` was given a model (or key type) other than the one the store was built with.
    #[error("the model does not match the datastore in {dir}: {detail}; nothing was changed")]
    Incompatible {
        /// The datastore.
        dir: PathBuf,
        /// What differs.
        detail: String,
    },
    /// Tokenizing or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Creating, opening or appending to the store failed.
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

impl BuildError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        BuildError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How text becomes rows.
#[derive(Clone, Debug, Serialize)]
pub struct BuildOptions {
    /// Which files to read, how, and which of their documents to keep.
    pub input: InputSpec,
    /// `None`: last_ffn_input for a new store, the store's own for `add`.
    pub key_type: Option<KeyType>,
    /// `None`: [`DEFAULT_WINDOW`], or the model's context if that is smaller.
    pub window: Option<usize>,
    /// `None`: half the window.
    pub stride: Option<usize>,
    /// Windows per forward pass.
    pub batch: usize,
    /// Chunk size of `build`: the model's keys are extracted and committed one chunk at a time,
    /// which bounds extraction memory and lets an interrupted build resume; `add` always
    /// writes one segment.
    pub segment_tokens: usize,
    /// One index over the whole build (`build` only; default): with several chunks, they are
    /// staged with a light index and compacted into one segment with the full index before
    /// the store is published, so a search walks one graph instead of one per chunk. Off,
    /// each chunk stays its own segment (indexing memory bounded by one chunk).
    pub merge: bool,
    /// Key storage of a new store (`add` keeps the store's).
    pub dtype: KeyDtype,
    /// Provenance label; default: the label filter, e.g. `toxicity >= 0.5`.
    pub label: Option<String>,
    /// Provenance tag.
    pub tag: Option<String>,
}

impl BuildOptions {
    /// Options for `paths` with every default.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        BuildOptions {
            input: InputSpec {
                paths,
                format: None,
                text_field: "text".into(),
                filter: None,
            },
            key_type: None,
            window: None,
            stride: None,
            batch: DEFAULT_BATCH,
            segment_tokens: DEFAULT_SEGMENT_TOKENS,
            merge: true,
            dtype: KeyDtype::F16,
            label: None,
            tag: None,
        }
    }

    /// The window and stride to use with `model`, validated.
    pub fn windowing(&self, model: &Model) -> Result<(usize, usize), BuildError> {
        let ctx = model.config().context_length;
        let window = self.window.unwrap_or(DEFAULT_WINDOW.min(ctx));
        let stride = self.stride.unwrap_or((window / 2).max(1));
        if window < 2 || stride == 0 || stride > window {
            return Err(BuildError::Options(format!(
                "window {window} and stride {stride}: need window >= 2 and 1 <= stride <= window"
            )));
        }
        if window > ctx {
            return Err(BuildError::Options(format!(
                "window {window} exceeds the model's context of {ctx} tokens"
            )));
        }
        if self.batch == 0 {
            return Err(BuildError::Options("batch must be at least 1".into()));
        }
        Ok((window, stride))
    }

    /// The provenance of one segment: `files` are the run's inputs, `part` (index, count) the
    /// chunk of a build, `documents` and `tokens` what the segment holds.
    fn provenance(
        &self,
        files: &[SourceFile],
        (window, stride): (usize, usize),
        part: Option<(usize, usize)>,
        (documents, tokens): (usize, usize),
    ) -> Provenance {
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        let mut source = names.join(", ");
        if source.len() > Provenance::MAX_SOURCE_BYTES - 64 {
            // The one-line summary stays short; every file is in the text record.
            source = format!(
                "{} input files (listed in the text provenance)",
                files.len()
            );
        }
        let part = part.filter(|&(_, n)| n > 1);
        if let Some((i, n)) = part {
            source.push_str(&format!(" (part {}/{n})", i + 1));
        }
        let mut p = Provenance::new(source);
        p.label = self
            .label
            .clone()
            .or_else(|| self.input.filter.as_ref().map(|f| f.describe()));
        p.tag = self.tag.clone();
        p.text = Some(TextProvenance {
            files: files.to_vec(),
            text_field: self.input.text_field.clone(),
            label_filter: self.input.filter.as_ref().map(|f| LabelRange {
                field: f.field.clone(),
                min: f.min,
                max: f.max,
            }),
            window,
            stride,
            part: part.map(|(i, n)| Part {
                index: i + 1,
                of: n,
            }),
            documents,
            tokens,
        });
        p
    }
}

/// The provenance records of the input files: path, format, size, SHA-256 and the counts of
/// the read (`stats`, one per path, in order).
fn source_files(
    spec: &InputSpec,
    stats: &[FileStats],
    digests: &[(String, u64, String)],
) -> Result<Vec<SourceFile>, BuildError> {
    spec.paths
        .iter()
        .zip(stats)
        .zip(digests)
        .map(|((path, st), (name, bytes, sha))| {
            Ok(SourceFile {
                path: name.clone(),
                format: spec.format_of(path)?.as_str().to_string(),
                bytes: *bytes,
                sha256: sha.clone(),
                records: st.records,
                selected: st.selected,
            })
        })
        .collect()
}

fn digests(spec: &InputSpec) -> Result<Vec<(String, u64, String)>, BuildError> {
    spec.paths
        .iter()
        .map(|p| file_digest(p).map(|(n, h)| (p.display().to_string(), n, h)))
        .collect()
}

/// Progress callbacks; all take `&self` so a terminal progress bar can be shared with the
/// store's indexing callback. Every method has a do-nothing default.
pub trait BuildProgress: Sync {
    /// Extraction starts: `total` rows to produce, of which `done` were committed by an
    /// interrupted run that this one resumes.
    fn start(&self, _total_rows: u64, _done_rows: u64) {}
    /// `n` more rows were extracted.
    fn rows(&self, _n: u64) {}
    /// A segment of `rows` rows is being indexed; `indexed` is called with rows done so far.
    fn indexing(&self, _rows: u64) {}
    /// `rows` rows of the segment announced by `indexing` are indexed so far (called
    /// repeatedly while the index is built).
    fn indexed(&self, _rows: u64) {}
    /// A segment was committed.
    fn committed(&self, _segment: &SegmentInfo) {}
}

/// A [`BuildProgress`] that reports nothing.
pub struct NoProgress;
impl BuildProgress for NoProgress {}

/// What a build or add did.
#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    /// The datastore written to (the published path, not the staging directory).
    pub dir: PathBuf,
    /// Per input file: records read and documents selected.
    pub files: Vec<FileStats>,
    /// Documents selected over all files.
    pub documents: usize,
    /// Tokens of the selected documents (without separators).
    pub tokens: usize,
    /// Rows written by this run (resumed segments not included).
    pub rows: usize,
    /// Rows of segments committed by an interrupted run and kept.
    pub resumed_rows: usize,
    /// The sliding window used, in tokens (after defaults and the model's context).
    pub window: usize,
    /// The stride used, in tokens.
    pub stride: usize,
    /// The hidden state stored as keys.
    pub key_type: KeyType,
    /// Segments committed by this run, in order.
    pub segments: Vec<SegmentInfo>,
    /// Wall time running the model, in seconds.
    pub extract_seconds: f64,
    /// Wall time appending and indexing segments, in seconds.
    pub index_seconds: f64,
}

/// Keys of one chunk in the store's dtype.
pub enum KeyBuf {
    /// For an f16 store: converted as rows are extracted, halving the chunk's memory.
    F16(Vec<f16>),
    /// For an f32 store.
    F32(Vec<f32>),
}

impl KeyBuf {
    fn new(dtype: KeyDtype, capacity: usize) -> Self {
        match dtype {
            KeyDtype::F16 => KeyBuf::F16(Vec::with_capacity(capacity)),
            KeyDtype::F32 => KeyBuf::F32(Vec::with_capacity(capacity)),
        }
    }

    fn push(&mut self, key: &[f32]) {
        match self {
            KeyBuf::F16(v) => v.extend(key.iter().map(|&x| f16::from_f32(x))),
            KeyBuf::F32(v) => v.extend_from_slice(key),
        }
    }

    /// A borrowed view for [`Datastore::append`], without copying the chunk.
    pub fn as_keys(&self) -> Keys<'_> {
        match self {
            KeyBuf::F16(v) => Keys::F16(v),
            KeyBuf::F32(v) => Keys::F32(v),
        }
    }
}

/// Runs `tokens` through the model and returns one (key, next token) row for every position
/// in `positions` (from [`row_positions`] with the same window, stride and separators).
#[allow(clippy::too_many_arguments)]
pub fn extract_rows(
    model: &Model,
    tokens: &[u32],
    sep: &[bool],
    window: usize,
    stride: usize,
    key_type: KeyType,
    batch: usize,
    dtype: KeyDtype,
    progress: &dyn BuildProgress,
) -> Result<(KeyBuf, Vec<u32>), BuildError> {
    let positions = row_positions(tokens.len(), window, stride, sep)?;
    let dim = model.config().hidden_size;
    let mut keys = KeyBuf::new(dtype, positions.len() * dim);
    let mut values = Vec::with_capacity(positions.len());
    // encode_pairs emits the window plan's positions in order; separators are dropped here.
    let plan: Vec<usize> = crate::model::Windows::plan(tokens.len(), window, stride)?
        .iter()
        .flat_map(|w| w.first_keyed..w.last_keyed)
        .collect();
    let mut j = 0usize;
    let mut pending = 0u64;
    model.encode_pairs(tokens, window, stride, key_type, batch, |key, next| {
        let p = plan[j];
        j += 1;
        if sep[p] {
            return;
        }
        debug_assert_eq!(next, tokens[p + 1]);
        keys.push(key);
        values.push(next);
        pending += 1;
        if pending == 64 {
            progress.rows(pending);
            pending = 0;
        }
    })?;
    progress.rows(pending);
    if values.len() != positions.len() {
        return Err(BuildError::Model(ModelError::Input(format!(
            "the model produced {} rows where the window plan has {}",
            values.len(),
            positions.len()
        ))));
    }
    Ok((keys, values))
}

/// Reads and tokenizes every selected document.
fn read_corpus(model: &Model, spec: &InputSpec) -> Result<(Corpus, Vec<FileStats>), BuildError> {
    let mut corpus = Corpus::default();
    let mut batch = Vec::new();
    let tok = model.tokenizer();
    let files = read_documents(spec, |t| {
        batch.push(t);
        if batch.len() == 4096 {
            corpus.extend(tok, &batch)?;
            batch.clear();
        }
        Ok(())
    })?;
    corpus.extend(tok, &batch)?;
    if corpus.docs.is_empty() {
        let read: usize = files.iter().map(|f| f.records).sum();
        let detail = match &spec.filter {
            Some(f) => format!(
                "{read} records read, none with {} and non-blank text",
                f.describe()
            ),
            None => format!("{read} records read, all with blank text"),
        };
        return Err(BuildError::NothingSelected(detail));
    }
    Ok((corpus, files))
}

fn eos_of(model: &Model) -> Result<u32, BuildError> {
    model
        .tokenizer()
        .eos_token_id()
        .or(model.config().eos_token_id)
        .ok_or_else(|| {
            BuildError::Model(ModelError::Metadata(
                "the model has no EOS token to separate documents with".into(),
            ))
        })
}

/// Rows of each chunk, computed from the token stream alone (no model).
fn chunk_rows(
    chunks: &[ChunkPlan],
    corpus: &Corpus,
    eos: u32,
    window: usize,
    stride: usize,
) -> Result<Vec<usize>, BuildError> {
    chunks
        .iter()
        .map(|c| {
            let (t, sep) = c.stream(corpus, eos);
            Ok(row_positions(t.len(), window, stride, &sep)?.len())
        })
        .collect()
}

/// Extracts chunks and appends each as one segment, timing both phases.
struct SegmentWriter<'a> {
    store: &'a dyn Store,
    model: &'a Model,
    opts: &'a BuildOptions,
    window: usize,
    stride: usize,
    key_type: KeyType,
    sources: Vec<SourceFile>,
    progress: &'a dyn BuildProgress,
    extract_seconds: f64,
    index_seconds: f64,
}

impl<'a> SegmentWriter<'a> {
    fn new(
        store: &'a dyn Store,
        model: &'a Model,
        opts: &'a BuildOptions,
        (window, stride): (usize, usize),
        key_type: KeyType,
        sources: Vec<SourceFile>,
        progress: &'a dyn BuildProgress,
    ) -> Self {
        SegmentWriter {
            store,
            model,
            opts,
            window,
            stride,
            key_type,
            sources,
            progress,
            extract_seconds: 0.0,
            index_seconds: 0.0,
        }
    }

    /// Extracts and commits the chunk `plan` (the `part` of a build).
    fn write(
        &mut self,
        corpus: &Corpus,
        eos: u32,
        plan: &ChunkPlan,
        part: Option<(usize, usize)>,
    ) -> Result<SegmentInfo, BuildError> {
        let (tokens, sep) = plan.stream(corpus, eos);
        let doc_tokens = plan.pieces.iter().map(|p| p.range.len()).sum();
        let provenance = self.opts.provenance(
            &self.sources,
            (self.window, self.stride),
            part,
            (plan.pieces.len(), doc_tokens),
        );
        let t0 = Instant::now();
        let (keys, values) = extract_rows(
            self.model,
            &tokens,
            &sep,
            self.window,
            self.stride,
            self.key_type,
            self.opts.batch,
            self.store.dtype(),
            self.progress,
        )?;
        let t1 = Instant::now();
        let positions = row_positions(tokens.len(), self.window, self.stride, &sep)?;
        let sources = plan.sources(corpus, &positions);
        self.progress.indexing(values.len() as u64);
        let progress = self.progress;
        let seg = self.store.append_with_sources(
            keys.as_keys(),
            &values,
            provenance,
            self.store.keeps_sources().then_some(sources),
            &|n| progress.indexed(n as u64),
        )?;
        self.extract_seconds += (t1 - t0).as_secs_f64();
        self.index_seconds += t1.elapsed().as_secs_f64();
        self.progress.committed(&seg);
        Ok(seg)
    }
}

fn check_compatible(store: &dyn Store, model: &Model, key_type: KeyType) -> Result<(), BuildError> {
    let incompatible = |detail: String| BuildError::Incompatible {
        dir: PathBuf::from(store.location()),
        detail,
    };
    store
        .fingerprint()
        .check_compatible(&model.fingerprint())
        .map_err(|d| incompatible(format!("{d} (store here, model there)")))?;
    if store.key_type() != key_type {
        return Err(incompatible(format!(
            "the store holds {} keys, not {key_type}",
            store.key_type()
        )));
    }
    Ok(())
}

/// Appends the documents of `opts` to `store` (a local directory or a remote store) as one new
/// segment. All-or-nothing: on any error or crash the store is as it was. The new segment's keys stay in memory until it is
/// committed (about 5 KB a token at D = 576 while it is indexed); for inputs of millions of
/// tokens run several adds (each atomic on its own) or `build` a new store.
pub fn add(
    store: &dyn Store,
    model: &Model,
    opts: &BuildOptions,
    progress: &dyn BuildProgress,
) -> Result<BuildReport, BuildError> {
    let key_type = opts.key_type.unwrap_or(store.key_type());
    check_compatible(store, model, key_type)?;
    let (window, stride) = opts.windowing(model)?;
    let eos = eos_of(model)?;
    let (corpus, files) = read_corpus(model, &opts.input)?;
    let whole = ChunkPlan {
        pieces: corpus
            .docs
            .iter()
            .map(|r| Piece {
                range: r.clone(),
                starts_doc: true,
                ends_doc: true,
            })
            .collect(),
    };
    let (tokens, sep) = whole.stream(&corpus, eos);
    let total = row_positions(tokens.len(), window, stride, &sep)?.len();
    let sources = source_files(&opts.input, &files, &digests(&opts.input)?)?;
    progress.start(total as u64, 0);
    let mut writer = SegmentWriter::new(
        store,
        model,
        opts,
        (window, stride),
        key_type,
        sources,
        progress,
    );
    let seg = writer.write(&corpus, eos, &whole, None)?;
    Ok(BuildReport {
        dir: PathBuf::from(store.location()),
        files,
        documents: corpus.docs.len(),
        tokens: corpus.tokens.len(),
        rows: seg.rows,
        resumed_rows: 0,
        window,
        stride,
        key_type,
        segments: vec![seg],
        extract_seconds: writer.extract_seconds,
        index_seconds: writer.index_seconds,
    })
}

/// Name of the file in the staging directory that says what is being built.
const JOURNAL_FILE: &str = "build.json";
const STAGING_STORE: &str = "store";
const STAGING_LOCK: &str = "LOCK";

/// The staging directory of a build of `out`: a hidden sibling, on the same file system so
/// that the final rename is atomic.
pub fn staging_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "datastore".into());
    out.with_file_name(format!(".{name}.partial"))
}

/// What a build is: if any of it changes, an interrupted build cannot be resumed.
#[derive(Serialize)]
struct Journal<'a> {
    format: &'static str,
    inputs: Vec<(String, u64, String)>,
    text_field: &'a str,
    format_override: Option<InputFormat>,
    filter: &'a Option<LabelFilter>,
    key_type: KeyType,
    window: usize,
    stride: usize,
    segment_tokens: usize,
    merge: bool,
    dtype: KeyDtype,
    label: &'a Option<String>,
    tag: &'a Option<String>,
    fingerprint: crate::fingerprint::ModelFingerprint,
    chunk_rows: &'a [usize],
}

fn file_digest(path: &Path) -> Result<(u64, String), BuildError> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| BuildError::io("open", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| BuildError::io("read", path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((n, hex))
}

fn sync_dir(dir: &Path) -> Result<(), BuildError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BuildError::io("fsync directory", dir, e))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).map_err(|e| BuildError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| BuildError::io("write", &tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| BuildError::io("rename into place", path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn remove_if_exists(path: &Path) -> Result<(), BuildError> {
    let r = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BuildError::io("remove", path, e)),
    }
}

/// Builds a new datastore in `out` from the documents of `opts`. `out` must not exist or be
/// an empty directory. See the module documentation for what happens on interruption.
pub fn build(
    out: &Path,
    model: &Model,
    opts: &BuildOptions,
    progress: &dyn BuildProgress,
) -> Result<BuildReport, BuildError> {
    if out.join("manifest.json").exists() {
        return Err(BuildError::OutputExists(out.to_path_buf()));
    }
    if out.exists() {
        let empty = fs::read_dir(out)
            .map_err(|e| BuildError::io("read directory", out, e))?
            .next()
            .is_none();
        if !empty {
            return Err(BuildError::OutputNotEmpty(out.to_path_buf()));
        }
    }
    let key_type = opts.key_type.unwrap_or(KeyType::LastFfnInput);
    let (window, stride) = opts.windowing(model)?;
    let eos = eos_of(model)?;
    opts.input.validate()?;
    if opts.segment_tokens == 0 {
        return Err(BuildError::Options(
            "segment size must be at least 1 token".into(),
        ));
    }
    let (corpus, files) = read_corpus(model, &opts.input)?;
    let chunks = plan_chunks(&corpus, opts.segment_tokens);
    let rows_per_chunk = chunk_rows(&chunks, &corpus, eos, window, stride)?;
    if let Some(i) = rows_per_chunk.iter().position(|&r| r == 0) {
        return Err(BuildError::Options(format!(
            "chunk {i} yields no rows with window {window} and stride {stride}"
        )));
    }

    let inputs = digests(&opts.input)?;
    let sources = source_files(&opts.input, &files, &inputs)?;
    let journal = serde_json::to_vec_pretty(&Journal {
        // v2: corpus text is tokenized as plain text (control-token strings are not parsed).
        // v3: segments record their rows' source text, so a v2 partial build starts over.
        format: "goodtriever-build-v3",
        inputs,
        text_field: &opts.input.text_field,
        format_override: opts.input.format,
        filter: &opts.input.filter,
        key_type,
        window,
        stride,
        segment_tokens: opts.segment_tokens,
        merge: opts.merge,
        dtype: opts.dtype,
        label: &opts.label,
        tag: &opts.tag,
        fingerprint: model.fingerprint(),
        chunk_rows: &rows_per_chunk,
    })
    .expect("journal serialises");

    let staging = staging_dir(out);
    fs::create_dir_all(&staging).map_err(|e| BuildError::io("create directory", &staging, e))?;
    let lock_path = staging.join(STAGING_LOCK);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| BuildError::io("open lock file", &lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(BuildError::Options(format!(
                "another build of {} is running (it holds {})",
                out.display(),
                lock_path.display()
            )))
        }
        Err(fs::TryLockError::Error(e)) => return Err(BuildError::io("lock", &lock_path, e)),
    }
    let journal_path = staging.join(JOURNAL_FILE);
    let store_dir = staging.join(STAGING_STORE);
    let resumable = fs::read(&journal_path).is_ok_and(|j| j == journal);
    let total_rows: usize = rows_per_chunk.iter().sum();
    let merge = opts.merge && chunks.len() > 1;
    // A merged build committed its one segment (every chunk has rows, so with several chunks
    // no single chunk holds them all): only publishing was left.
    let merged = |segs: &[SegmentInfo]| {
        merge && segs.len() == 1 && !segs[0].retired && segs[0].rows == total_rows
    };
    let mut store = None;
    if resumable {
        match Datastore::open(&store_dir) {
            Ok(s) => {
                let segs = s.segments();
                let consistent = merged(&segs)
                    || segs.len() <= chunks.len()
                        && segs
                            .iter()
                            .zip(&rows_per_chunk)
                            .all(|(seg, &rows)| !seg.retired && seg.rows == rows);
                if consistent {
                    store = Some(s);
                } else {
                    tracing::warn!(
                        "the interrupted build in {} does not match its plan; starting over",
                        staging.display()
                    );
                }
            }
            Err(e) => tracing::info!(
                "no usable partial store in {}: {e}; starting over",
                staging.display()
            ),
        }
    } else if store_dir.exists() || journal_path.exists() {
        tracing::info!(
            "{} holds an interrupted build of other inputs or options; starting over",
            staging.display()
        );
    }
    let mut store = match store {
        Some(s) => s,
        None => {
            remove_if_exists(&store_dir)?;
            remove_if_exists(&journal_path)?;
            write_atomic(&journal_path, &journal)?;
            Datastore::create(
                &store_dir,
                CreateOptions {
                    fingerprint: model.fingerprint(),
                    key_type,
                    dtype: opts.dtype,
                },
            )?
        }
    };

    let merged_already = merged(&store.segments());
    let done = if merged_already {
        chunks.len()
    } else {
        store.segments().len()
    };
    let done_rows: usize = rows_per_chunk[..done].iter().sum();
    progress.start(total_rows as u64, done_rows as u64);
    if merge {
        // The chunks' own graphs are never searched: the merge rebuilds one over all rows.
        store.set_index_params(STAGING_M, STAGING_EF_CONSTRUCTION)?;
    }
    let mut writer = SegmentWriter::new(
        &store,
        model,
        opts,
        (window, stride),
        key_type,
        sources,
        progress,
    );
    for (i, chunk) in chunks.iter().enumerate().skip(done) {
        writer.write(&corpus, eos, chunk, Some((i, chunks.len())))?;
    }
    let mut timing = (writer.extract_seconds, writer.index_seconds);
    drop(writer);
    if merge && !merged_already {
        store.set_index_params(DEFAULT_M, DEFAULT_EF_CONSTRUCTION)?;
        let t0 = Instant::now();
        progress.indexing(total_rows as u64);
        store.compact_with_progress(&|n| progress.indexed(n as u64))?;
        timing.1 += t0.elapsed().as_secs_f64();
    }
    let segments = store.segments();
    drop(store);

    // Publish: one rename makes the complete store appear at `out`.
    if out.exists() {
        // An empty directory (checked above): rename(2) replaces it atomically.
        fs::rename(&store_dir, out)
    } else {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)
                .map_err(|e| BuildError::io("create directory", parent, e))?;
        }
        fs::rename(&store_dir, out)
    }
    .map_err(|e| BuildError::io("rename into place", out, e))?;
    sync_dir(
        out.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    // Removed while still locked, so a concurrent build cannot start in it meanwhile.
    remove_if_exists(&staging)?;
    drop(lock);

    Ok(BuildReport {
        dir: out.to_path_buf(),
        files,
        documents: corpus.docs.len(),
        tokens: corpus.tokens.len(),
        rows: total_rows - done_rows,
        resumed_rows: done_rows,
        window,
        stride,
        key_type,
        segments,
        extract_seconds: timing.0,
        index_seconds: timing.1,
    })
}
