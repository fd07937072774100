//! kNN datastores of LM hidden states: a directory of immutable, memory-mapped segments under
//! one atomically replaced `manifest.json` (docs/architecture.md §3), searched exactly or with
//! per-segment HNSW graphs (docs/architecture.md §4).
//!
//! The shape follows tantivy and qdrant: segments never change after they are written, so
//! readers need no locks; every change (append, retire, compact) writes new files first and
//! then publishes them with one atomic manifest replacement, so a crash leaves either the old
//! or the new store and never a mix. A [`Datastore`] holds an immutable snapshot (manifest +
//! mapped segments) behind an `ArcSwap`: searches take the current snapshot and keep it for
//! their whole duration, while `append`/`refresh` swap in a new one.
//!
//! Module map: `manifest` (the JSON format), `durable` (fsync, atomic replace, writer lock),
//! `segment` (files of one segment), `keys` (typed views of key rows), `distance` (SIMD squared
//! L2), `scored` (the distance-ordered (distance, row) pair), `exact` (flat scan + top-k),
//! `hnsw` (graph build, file, walk), `hnsw_layers` (the graph in memory), `hnsw_repair`
//! (level-0 repair before writing), `search` (per-segment choice, merge, de-duplication),
//! `sources` (rows' positions in their source text), `successors` (the rows after earlier
//! neighbours, for reuse), `verify` (checksums), `error`.

mod distance;
mod durable;
mod error;
mod exact;
mod hnsw;
mod hnsw_layers;
mod hnsw_repair;
mod keys;
mod manifest;
mod scored;
mod search;
mod segment;
mod sources;
mod successors;
mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::rule::TokenPrior;

pub use distance::kernel_name;
pub use error::DatastoreError;
pub use exact::TASK_QUERIES;
pub use hnsw::{DEFAULT_EF_CONSTRUCTION, DEFAULT_M};
pub use keys::Keys;
pub use manifest::{
    KeyDtype, LabelRange, MergedSegment, Part, Provenance, SourceFile, TextProvenance, TOOL,
};
pub use search::{Neighbour, SearchMode, SearchParams, AUTO_EF_FACTOR, AUTO_MIN_ROWS, DEFAULT_EF};
pub use sources::{RowSources, SourceSnippet, SourceSpan, DOCUMENTS_FILE, SOURCES_FILE};
pub use verify::{FileCheck, VerifyProblem, VerifyReport};

use crate::fingerprint::{KeyType, ModelFingerprint};
use crate::limits::MAX_K;
use durable::WriterLock;
use error::Result;
use manifest::{IndexParams, Manifest, SegmentEntry, MANIFEST_FILE};
use segment::{segment_dir, Segment, SEGMENTS_DIR};

#[cfg(target_endian = "big")]
compile_error!("the datastore maps little-endian files directly and needs a little-endian target");

/// What a new datastore holds.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// The model the keys come from; `hidden_size` is the key dimension D.
    pub fingerprint: ModelFingerprint,
    /// Which hidden state the keys are; every append and every query must be the same kind,
    /// since distances between different states mean nothing.
    pub key_type: KeyType,
    /// How keys are stored on disk; fixed for the life of the store (appends convert).
    pub dtype: KeyDtype,
}

/// A segment as the manifest describes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SegmentInfo {
    /// The segment's id: unique within the store, never reused, names its directory
    /// under `segments/`.
    pub id: u64,
    /// Key rows in the segment.
    pub rows: usize,
    /// Id of the segment's first row among live rows; `None` for a retired segment.
    pub first_id: Option<u64>,
    /// Whether the segment is retired: kept on disk and in the manifest, left out of search
    /// and of the live row ids until it is unretired.
    pub retired: bool,
    /// Where its rows came from.
    pub provenance: Provenance,
    /// Total bytes of the segment's files.
    pub bytes: u64,
    /// Whether the segment records its rows' source text (`sources.bin`, `documents.bin`):
    /// segments built from text do, imported ones and those written before do not.
    pub sources: bool,
}

/// Where a live row lives and, for rows made from text, the text around it
/// ([`Datastore::row_origin`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RowOrigin {
    /// The row's id among live rows, as searches return it.
    pub id: u64,
    /// The id of the segment that holds it.
    pub segment: u64,
    /// Its index within that segment, from 0.
    pub row_in_segment: usize,
    /// The value: the next token id.
    pub value: u32,
    /// The source text around the row; `None` when its segment records none.
    pub source: Option<SourceSnippet>,
}

/// One stored row read back ([`Datastore::row`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredRow {
    /// The row's id among live rows, as searches return it.
    pub id: u64,
    /// The id of the segment that holds it.
    pub segment: u64,
    /// Its index within that segment, from 0.
    pub row_in_segment: usize,
    /// The value: the next token id.
    pub value: u32,
    /// The key, widened to f32 (exact for f16 stores: every f16 is an f32).
    pub key: Vec<f32>,
}

/// An immutable view: one manifest and its mapped live segments.
struct Snapshot {
    manifest: Manifest,
    raw: Vec<u8>,
    segments: Vec<Arc<Segment>>,
    starts: Vec<u64>,
    rows: usize,
    /// The live rows' next-token statistics, for prior-corrected experts: computed with the
    /// view (one pass over the mapped values), so they always describe exactly the rows a
    /// search of this snapshot can return.
    prior: Arc<TokenPrior>,
}

impl Snapshot {
    fn load(dir: &Path, manifest: Manifest, raw: Vec<u8>, old: Option<&Snapshot>) -> Result<Self> {
        let reuse: HashMap<u64, Arc<Segment>> = old
            .map(|o| o.segments.iter().map(|s| (s.id, s.clone())).collect())
            .unwrap_or_default();
        let mut segments = Vec::new();
        let mut starts = Vec::new();
        let mut rows = 0usize;
        for e in manifest.live() {
            let seg = match reuse.get(&e.id) {
                Some(s) => s.clone(),
                None => Arc::new(Segment::open(dir, e, manifest.dim(), manifest.dtype)?),
            };
            starts.push(rows as u64);
            rows += seg.rows;
            segments.push(seg);
        }
        let vocab = manifest.fingerprint.vocab_size.unwrap_or(0);
        let prior = Arc::new(TokenPrior::from_values(
            segments.iter().map(|s| s.values()),
            vocab,
        ));
        Ok(Snapshot {
            manifest,
            raw,
            segments,
            starts,
            rows,
            prior,
        })
    }

    fn infos(&self) -> Vec<SegmentInfo> {
        let mut next = 0u64;
        self.manifest
            .segments
            .iter()
            .map(|e| {
                let first_id = (!e.retired).then(|| {
                    let f = next;
                    next += e.rows as u64;
                    f
                });
                SegmentInfo {
                    id: e.id,
                    rows: e.rows,
                    first_id,
                    retired: e.retired,
                    provenance: e.provenance.clone(),
                    bytes: e.bytes(),
                    sources: e.file(SOURCES_FILE).is_some(),
                }
            })
            .collect()
    }
}

/// A kNN datastore. `Send + Sync`: share it as `Arc<Datastore>`.
pub struct Datastore {
    dir: PathBuf,
    snap: ArcSwap<Snapshot>,
    /// Serialises writers of this process; `WriterLock` serialises processes.
    write: Mutex<()>,
    index_params: IndexParams,
    // Identity fields are fixed at creation; a manifest that changes them is refused.
    fingerprint: ModelFingerprint,
    key_type: KeyType,
    dtype: KeyDtype,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snap.load();
        f.debug_struct("Datastore")
            .field("dir", &self.dir)
            .field("rows", &s.rows)
            .field("segments", &s.segments.len())
            .finish()
    }
}

fn validate_finite(data: &[f32], dim: usize, what: &'static str) -> Result<()> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(DatastoreError::NonFinite {
            what,
            row: i / dim,
            col: i % dim,
            value: data[i],
        });
    }
    Ok(())
}

/// Checks a search's arguments, whatever the backend ([`crate::store::Store::search_into`]):
/// `k` in 1..=[`MAX_K`], `ef` not 0, `queries` whole rows of `dim` finite values, one output
/// vector per row. Returns the number of query rows.
pub(crate) fn check_query_batch(
    queries: &[f32],
    dim: usize,
    k: usize,
    params: &SearchParams,
    outputs: usize,
) -> Result<usize> {
    if k == 0 || k > MAX_K {
        return Err(DatastoreError::BadK(k));
    }
    if params.ef == Some(0) {
        return Err(DatastoreError::BadEf(0));
    }
    if !queries.len().is_multiple_of(dim) {
        return Err(DatastoreError::DimMismatch {
            expected: dim,
            got: queries.len(),
            what: "a query batch",
        });
    }
    let n = queries.len() / dim;
    if outputs != n {
        return Err(DatastoreError::OutputMismatch {
            expected: n,
            got: outputs,
        });
    }
    validate_finite(queries, dim, "query")?;
    Ok(n)
}

impl Datastore {
    /// Creates an empty datastore in `dir` (created if missing). Fails if `dir` already holds
    /// a manifest.
    pub fn create(dir: &Path, opts: CreateOptions) -> Result<Self> {
        if opts.fingerprint.hidden_size == 0 {
            return Err(DatastoreError::InvalidOptions(
                "hidden size (key dimension) must be at least 1".into(),
            ));
        }
        if let Some(why) = opts.fingerprint.vocab_problem() {
            return Err(DatastoreError::InvalidOptions(why));
        }
        if dir.join(MANIFEST_FILE).exists() {
            return Err(DatastoreError::AlreadyExists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(|e| DatastoreError::io("create directory", dir, e))?;
        let _lock = WriterLock::acquire(dir)?;
        if dir.join(MANIFEST_FILE).exists() {
            return Err(DatastoreError::AlreadyExists(dir.to_path_buf()));
        }
        let seg_dir = dir.join(SEGMENTS_DIR);
        std::fs::create_dir_all(&seg_dir)
            .map_err(|e| DatastoreError::io("create directory", &seg_dir, e))?;
        durable::sync_dir(dir)?;
        let m = Manifest::new(opts.fingerprint, opts.key_type, opts.dtype);
        let raw = m.to_bytes();
        durable::atomic_write(&dir.join(MANIFEST_FILE), &raw)?;
        Ok(Self::from_snapshot(dir, Snapshot::load(dir, m, raw, None)?))
    }

    /// Opens an existing datastore: maps every live segment and checks file sizes. Leftovers
    /// of interrupted writers are removed when no other writer is active.
    pub fn open(dir: &Path) -> Result<Self> {
        let (m, raw) = Manifest::read(dir)?;
        if let Some(_lock) = WriterLock::try_acquire(dir)? {
            // Re-read under the lock: a writer may have committed since.
            let (m, raw) = Manifest::read(dir)?;
            remove_garbage(dir, &m);
            return Ok(Self::from_snapshot(dir, Snapshot::load(dir, m, raw, None)?));
        }
        Ok(Self::from_snapshot(dir, Snapshot::load(dir, m, raw, None)?))
    }

    fn from_snapshot(dir: &Path, snap: Snapshot) -> Self {
        Datastore {
            fingerprint: snap.manifest.fingerprint.clone(),
            key_type: snap.manifest.key_type,
            dtype: snap.manifest.dtype,
            dir: dir.to_path_buf(),
            snap: ArcSwap::from_pointee(snap),
            write: Mutex::new(()),
            index_params: IndexParams {
                m: DEFAULT_M,
                ef_construction: DEFAULT_EF_CONSTRUCTION,
            },
        }
    }

    /// Sets the HNSW construction parameters used by later appends and compactions.
    pub fn set_index_params(&mut self, m: usize, ef_construction: usize) -> Result<()> {
        if m == 0 || m > 255 || ef_construction == 0 {
            return Err(DatastoreError::InvalidOptions(format!(
                "HNSW M must be in 1..=255 and ef_construction at least 1 (got M={m}, ef_construction={ef_construction})"
            )));
        }
        self.index_params = IndexParams { m, ef_construction };
        Ok(())
    }

    /// The key dimension D (the model's `hidden_size`): every key and query row has D values.
    pub fn dim(&self) -> usize {
        self.fingerprint.hidden_size
    }
    /// Live rows in the current snapshot (retired segments excluded).
    pub fn len(&self) -> usize {
        self.snap.load().rows
    }
    /// The live rows' next-token statistics (rows and smoothed log unigram), as of the
    /// current snapshot.
    pub fn token_prior(&self) -> Arc<TokenPrior> {
        self.snap.load().prior.clone()
    }
    /// Whether the current snapshot has no live rows; searching it fails with `EmptyStore`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Which hidden state the keys are, fixed when the store was created.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
    /// The model the keys come from, as recorded in `manifest.json`; callers compare it with
    /// their own model before searching or appending.
    pub fn fingerprint(&self) -> &ModelFingerprint {
        &self.fingerprint
    }
    /// How keys are stored in `keys.bin` (f16 or f32), fixed when the store was created.
    pub fn dtype(&self) -> KeyDtype {
        self.dtype
    }
    /// The store's directory, as given to `open` or `create`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All segments of the current snapshot (live and retired), in manifest order.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.snap.load().infos()
    }

    /// Reads live row `id` (the id searches return) back from its segment.
    pub fn row(&self, id: u64) -> Result<StoredRow> {
        let snap = self.snap.load();
        if id >= snap.rows as u64 {
            return Err(DatastoreError::NoSuchRow {
                id,
                rows: snap.rows,
            });
        }
        // `starts` is ascending; the segment is the last one starting at or before `id`.
        let s = snap.starts.partition_point(|&st| st <= id) - 1;
        let seg = &snap.segments[s];
        let r = (id - snap.starts[s]) as usize;
        let mut key = Vec::new();
        seg.keys().row_f32(r, snap.manifest.dim(), &mut key);
        Ok(StoredRow {
            id,
            segment: seg.id,
            row_in_segment: r,
            value: seg.values()[r],
            key,
        })
    }

    /// Appends `keys` (row-major, `values.len()` × D) as a new segment and builds its index.
    /// Durable on return. Bad input is refused before anything is written.
    pub fn append(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
    ) -> Result<SegmentInfo> {
        self.append_with_progress(keys, values, provenance, &|_| {})
    }

    /// [`append`](Self::append) that reports rows indexed so far to `progress`.
    pub fn append_with_progress(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        progress: &dyn Fn(usize),
    ) -> Result<SegmentInfo> {
        self.append_with_sources(keys, values, provenance, None, progress)
    }

    /// Where live row `id` lives (segment, row in it, value) and, when its segment records
    /// sources, the text around it: `context` bytes either side of the row's token. Ids are
    /// those of the current snapshot, as a search run just before returns them.
    pub fn row_origin(&self, id: u64, context: usize) -> Result<RowOrigin> {
        let snap = self.snap.load();
        if id >= snap.rows as u64 {
            return Err(DatastoreError::NoSuchRow {
                id,
                rows: snap.rows,
            });
        }
        let s = snap.starts.partition_point(|&st| st <= id) - 1;
        let seg = &snap.segments[s];
        let r = (id - snap.starts[s]) as usize;
        Ok(RowOrigin {
            id,
            segment: seg.id,
            row_in_segment: r,
            value: seg.values()[r],
            source: seg.sources().and_then(|src| src.snippet(r, context)),
        })
    }

    /// [`append_with_progress`](Self::append_with_progress) that also records where every row
    /// came from in its source text (`sources.bin` and `documents.bin` in the new segment,
    /// docs/architecture.md §3). The sources are checked against the rows before anything is
    /// written.
    pub fn append_with_sources(
        &self,
        keys: Keys<'_>,
        values: &[u32],
        provenance: Provenance,
        sources: Option<RowSources>,
        progress: &dyn Fn(usize),
    ) -> Result<SegmentInfo> {
        let (dim, dtype) = {
            let s = self.snap.load();
            (s.manifest.dim(), s.manifest.dtype)
        };
        if keys.is_empty() {
            return Err(DatastoreError::EmptyAppend);
        }
        if !keys.len().is_multiple_of(dim) {
            return Err(DatastoreError::DimMismatch {
                expected: dim,
                got: keys.len(),
                what: "a key batch",
            });
        }
        let rows = keys.len() / dim;
        if rows != values.len() {
            return Err(DatastoreError::ValueCountMismatch {
                rows,
                values: values.len(),
            });
        }
        if rows > u32::MAX as usize {
            return Err(DatastoreError::InvalidOptions(format!(
                "a segment holds at most {} rows, got {rows}; append in parts",
                u32::MAX
            )));
        }
        provenance.check()?;
        if let Some(src) = &sources {
            src.check(rows)?;
        }
        if let Some(vocab) = self.fingerprint.vocab_size {
            if let Some(row) = values.iter().position(|&v| v as usize >= vocab) {
                return Err(DatastoreError::ValueOutOfVocab {
                    row,
                    value: values[row],
                    vocab,
                });
            }
        }
        match keys {
            Keys::F32(k) => validate_finite(k, dim, "key")?,
            Keys::F16(k) => {
                if let Some(i) = k.iter().position(|v| !v.is_finite()) {
                    return Err(DatastoreError::NonFinite {
                        what: "key",
                        row: i / dim,
                        col: i % dim,
                        value: k[i].to_f32(),
                    });
                }
            }
        }
        let key_bytes = segment::encode_keys(keys, dim, dtype)?;
        let values = values.to_vec();
        let info = self.commit_new_segment(
            |_m| Ok(Some((key_bytes, values, sources, provenance, Vec::new()))),
            progress,
        )?;
        Ok(info.expect("an append always writes a segment"))
    }

    /// The common path of append and compact: under the writer lock, read the manifest on
    /// disk, produce a segment from it, write it, and commit a manifest that adds it (and
    /// removes the segments listed in the returned `replaces`).
    fn commit_new_segment<F>(
        &self,
        make: F,
        progress: &dyn Fn(usize),
    ) -> Result<Option<SegmentInfo>>
    where
        F: FnOnce(&Manifest) -> Result<Option<NewSegment>>,
    {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let _lock = WriterLock::acquire(&self.dir)?;
        let (mut m, _) = Manifest::read(&self.dir)?;
        let Some((key_bytes, values, sources, provenance, replaces)) = make(&m)? else {
            return Ok(None);
        };
        let id = m.next_segment_id;
        let seg_root = self.dir.join(SEGMENTS_DIR);
        let tmp = seg_root.join(format!(".tmp-{id}-{}", std::process::id()));
        let fin = segment_dir(&self.dir, id);
        for stale in [&tmp, &fin] {
            if stale.exists() {
                std::fs::remove_dir_all(stale)
                    .map_err(|e| DatastoreError::io("remove stale directory", stale, e))?;
            }
        }
        std::fs::create_dir_all(&tmp)
            .map_err(|e| DatastoreError::io("create directory", &tmp, e))?;
        let written = segment::write_segment(
            &tmp,
            &key_bytes,
            &values,
            sources.as_ref(),
            m.dim(),
            m.dtype,
            self.index_params,
            progress,
        );
        let files = match written {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, &fin)
            .map_err(|e| DatastoreError::io("rename into place", &fin, e))?;
        durable::sync_dir(&seg_root)?;
        let entry = SegmentEntry {
            id,
            rows: values.len(),
            retired: false,
            provenance,
            index: self.index_params,
            files,
        };
        let removed: Vec<u64> = replaces;
        m.segments.retain(|s| !removed.contains(&s.id));
        m.segments.push(entry);
        m.next_segment_id = id + 1;
        m.generation += 1;
        let raw = m.to_bytes();
        durable::atomic_write(&self.dir.join(MANIFEST_FILE), &raw)?;
        self.install(m, raw)?;
        for old in removed {
            remove_segment_files(&self.dir, old);
        }
        let info = self
            .segments()
            .into_iter()
            .find(|s| s.id == id)
            .expect("the committed segment is in the new snapshot");
        Ok(Some(info))
    }

    fn install(&self, m: Manifest, raw: Vec<u8>) -> Result<()> {
        if m.fingerprint != self.fingerprint || m.key_type != self.key_type || m.dtype != self.dtype
        {
            return Err(DatastoreError::BadManifest {
                path: self.dir.join(MANIFEST_FILE),
                detail: "its model fingerprint, key type or dtype changed since this store was opened; open it again".into(),
            });
        }
        let old = self.snap.load_full();
        let snap = Snapshot::load(&self.dir, m, raw, Some(&old))?;
        self.snap.store(Arc::new(snap));
        Ok(())
    }

    /// Picks up changes committed by other handles or processes. Returns `false` (after one
    /// small file read) when the manifest is unchanged. Searches already running keep the
    /// snapshot they started with.
    pub fn refresh(&self) -> Result<bool> {
        let (m, raw) = Manifest::read(&self.dir)?;
        {
            let cur = self.snap.load();
            if cur.manifest.generation == m.generation && cur.raw == raw {
                return Ok(false);
            }
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.install(m, raw)?;
        Ok(true)
    }

    /// Searches `queries` (row-major, B × D) for their `k` nearest rows each.
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
    ) -> Result<Vec<Vec<Neighbour>>> {
        let dim = self.dim();
        let mut out = vec![Vec::new(); queries.len() / dim.max(1)];
        self.search_into(queries, k, params, &mut out)?;
        Ok(out)
    }

    /// [`search`](Self::search) into the caller's buffers (one per query row; their
    /// allocations are reused). Each row comes back sorted by ascending distance, with `k`
    /// neighbours unless the store has fewer rows.
    pub fn search_into(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        out: &mut [Vec<Neighbour>],
    ) -> Result<()> {
        let snap = self.snap.load_full();
        let dim = snap.manifest.dim();
        check_query_batch(queries, dim, k, params, out.len())?;
        if snap.rows == 0 {
            return Err(DatastoreError::EmptyStore(self.dir.clone()));
        }
        search::search_batch(&snap.segments, &snap.starts, queries, dim, k, params, out);
        Ok(())
    }

    /// Reads every file and checks sizes, checksums, index structure and key finiteness
    /// against the manifest currently on disk.
    pub fn verify(&self) -> Result<VerifyReport> {
        Self::verify_dir(&self.dir)
    }

    /// [`verify`](Self::verify) of the store in `dir` without opening it: a store with a
    /// damaged segment does not open (every segment's checksums are checked before it is
    /// served), and this is how to see every damaged file at once.
    pub fn verify_dir(dir: &Path) -> Result<VerifyReport> {
        let (m, _) = Manifest::read(dir)?;
        Ok(verify::verify(dir, &m))
    }

    /// Takes segment `id` out of search (a manifest change; its files stay until `compact`,
    /// so [`unretire`](Self::unretire) can bring it back). Ids of later rows shift down.
    pub fn retire(&self, id: u64) -> Result<SegmentInfo> {
        self.set_retired(id, true)
    }

    /// Puts a retired segment back into search.
    pub fn unretire(&self, id: u64) -> Result<SegmentInfo> {
        self.set_retired(id, false)
    }

    fn set_retired(&self, id: u64, retired: bool) -> Result<SegmentInfo> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let _lock = WriterLock::acquire(&self.dir)?;
        let (mut m, _) = Manifest::read(&self.dir)?;
        let e = m
            .segments
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or(DatastoreError::UnknownSegment(id))?;
        if e.retired == retired {
            return Err(DatastoreError::SegmentState {
                id,
                state: if retired {
                    "already retired"
                } else {
                    "not retired"
                },
            });
        }
        e.retired = retired;
        m.generation += 1;
        let raw = m.to_bytes();
        // Opening the new snapshot first proves an unretired segment's files are intact
        // before the manifest points at them.
        let snap = Snapshot::load(
            &self.dir,
            m.clone(),
            raw.clone(),
            Some(&self.snap.load_full()),
        )?;
        durable::atomic_write(&self.dir.join(MANIFEST_FILE), &raw)?;
        self.snap.store(Arc::new(snap));
        Ok(self
            .segments()
            .into_iter()
            .find(|s| s.id == id)
            .expect("segment still listed"))
    }

    /// Merges all live segments into one new segment (same rows, same order, so ids do not
    /// change) and deletes the files of the merged and retired segments. The new segment's
    /// provenance lists every merged original (id, rows, first row, provenance) in
    /// `merged_from`. Returns the new segment, or `None` when there is nothing to do (at most
    /// one live segment and no retired ones). Handles that still use the old segments keep
    /// working until they `refresh` (their maps outlive the deleted files).
    pub fn compact(&self) -> Result<Option<SegmentInfo>> {
        self.compact_with_progress(&|_| {})
    }

    /// [`compact`](Self::compact) reporting rows indexed so far.
    pub fn compact_with_progress(&self, progress: &dyn Fn(usize)) -> Result<Option<SegmentInfo>> {
        {
            let (m, _) = Manifest::read(&self.dir)?;
            if m.live().count() <= 1 && m.segments.iter().all(|s| !s.retired) {
                return Ok(None);
            }
        }
        let dir = self.dir.clone();
        let info = self.commit_new_segment(
            |m| {
                let live: Vec<&SegmentEntry> = m.live().collect();
                let (key_bytes, values, sources, prov) = merge_rows(&dir, m, &live)?;
                // Retired segments are deleted, not merged, so they are not listed.
                let replaces = m.segments.iter().map(|s| s.id).collect();
                Ok(Some((key_bytes, values, sources, prov, replaces)))
            },
            progress,
        )?;
        Ok(info)
    }

    /// One step of the merge policy: merges the trailing run of small segments that `policy`
    /// says is due, if any (see [`MergePolicy`]). Crash-safe as compaction is: the manifest
    /// switch is the commit point, and readers swap to the merged segment atomically. Returns
    /// the merged segment, or `None` when nothing was due.
    pub fn merge_tail(&self, policy: &MergePolicy) -> Result<Option<SegmentInfo>> {
        {
            let (m, _) = Manifest::read(&self.dir)?;
            if policy.tail_run(&m.segments).is_none() {
                return Ok(None);
            }
        }
        let dir = self.dir.clone();
        self.commit_new_segment(
            // Decided again under the writer lock: another writer may have merged or added.
            |m| {
                let Some(run) = policy.tail_run(&m.segments) else {
                    return Ok(None);
                };
                let entries: Vec<&SegmentEntry> = m.segments[run.clone()].iter().collect();
                let (key_bytes, values, sources, prov) = merge_rows(&dir, m, &entries)?;
                let replaces = entries.iter().map(|e| e.id).collect();
                // The run is the manifest's tail, so the merged segment, appended last, keeps
                // every row's id.
                Ok(Some((key_bytes, values, sources, prov, replaces)))
            },
            &|_| {},
        )
    }
}

/// What [`Datastore::commit_new_segment`] writes: key bytes, values, row sources, provenance,
/// and the segments it replaces.
type NewSegment = (Vec<u8>, Vec<u32>, Option<RowSources>, Provenance, Vec<u64>);

/// Key bytes, values, row sources and provenance of a merged segment.
type MergedRows = (Vec<u8>, Vec<u32>, Option<RowSources>, Provenance);

/// The rows of `entries` (live segments, in order) as one segment's key bytes, values and
/// row sources (when any original has them; rows of originals without get
/// [`SourceSpan::NONE`]), with the provenance of every original.
fn merge_rows(dir: &Path, m: &Manifest, entries: &[&SegmentEntry]) -> Result<MergedRows> {
    let mut key_bytes = Vec::new();
    let mut values = Vec::new();
    let any_sources = entries.iter().any(|e| e.file(SOURCES_FILE).is_some());
    let mut sources = any_sources.then(RowSources::default);
    for e in entries {
        let seg = Segment::open(dir, e, m.dim(), m.dtype)?;
        if let Some(out) = &mut sources {
            match seg.sources() {
                Some(src) => out.extend_from(src),
                None => out
                    .spans
                    .extend(std::iter::repeat_n(SourceSpan::NONE, seg.rows)),
            }
        }
        match seg.keys() {
            keys::KeyRows::F32(k) => {
                for v in k {
                    key_bytes.extend_from_slice(&v.to_le_bytes())
                }
            }
            keys::KeyRows::F16(k) => {
                for v in k {
                    key_bytes.extend_from_slice(&v.to_le_bytes())
                }
            }
        }
        values.extend_from_slice(seg.values());
    }
    if values.is_empty() {
        return Err(DatastoreError::EmptyStore(dir.to_path_buf()));
    }
    // The merged segment keeps every original's provenance (ids, rows, row offsets).
    let prov = Provenance::merged(entries.iter().map(|e| (e.id, e.rows, &e.provenance)));
    if let Some(src) = &sources {
        src.check(values.len())?;
    }
    Ok((key_bytes, values, sources, prov))
}

/// When small segments are merged while a store grows (a log merge policy, as search engines
/// keep their segment count low): segments are grouped in levels by size — level 0 below
/// `base_rows` rows, level `n` below `base_rows · min_segments^n` — and a run of
/// `min_segments` segments of one level at the end of the manifest is merged into one segment
/// of the next level. Every row is rewritten about once per level, and a store holds fewer
/// than `min_segments` segments per level on top of what it was built with. Only the
/// manifest's tail is merged, so row ids never change; a retired segment at the tail stops
/// merging until it is compacted away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergePolicy {
    /// How many segments of one level make a merge (at least 2).
    pub min_segments: usize,
    /// Segments below this many rows are level 0.
    pub base_rows: usize,
    /// Runs whose merged segment would exceed this many rows are left alone (bounds the work
    /// one merge does; larger segments come from builds and `compact`).
    pub max_rows: usize,
}

impl Default for MergePolicy {
    fn default() -> Self {
        Self {
            min_segments: 8,
            base_rows: 4096,
            max_rows: 1 << 20,
        }
    }
}

impl MergePolicy {
    fn level(&self, rows: usize) -> u32 {
        let mut level = 0;
        let mut bound = self.base_rows.max(1);
        while rows >= bound {
            level += 1;
            bound = bound.saturating_mul(self.min_segments.max(2));
        }
        level
    }

    /// The positions (in `segments`) of the run to merge, if one is due.
    fn tail_run(&self, segments: &[SegmentEntry]) -> Option<std::ops::Range<usize>> {
        if self.min_segments < 2 {
            return None;
        }
        let last = segments.last().filter(|s| !s.retired)?;
        let level = self.level(last.rows);
        let mut start = segments.len();
        let mut rows = 0usize;
        while start > 0 {
            let s = &segments[start - 1];
            if s.retired || self.level(s.rows) != level || rows + s.rows > self.max_rows {
                break;
            }
            rows += s.rows;
            start -= 1;
        }
        (segments.len() - start >= self.min_segments).then_some(start..segments.len())
    }
}

/// Removes what no manifest references: segment directories of interrupted writers and
/// stale temporary manifests. Best effort; called only while holding the writer lock.
fn remove_garbage(dir: &Path, m: &Manifest) {
    let listed: std::collections::HashSet<String> =
        m.segments.iter().map(|s| s.id.to_string()).collect();
    if let Ok(entries) = std::fs::read_dir(dir.join(SEGMENTS_DIR)) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !listed.contains(&name) {
                let p = e.path();
                let r = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                match r {
                    Ok(()) => tracing::info!("removed unreferenced {}", p.display()),
                    Err(err) => tracing::warn!("could not remove {}: {err}", p.display()),
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(".{MANIFEST_FILE}.tmp-")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn remove_segment_files(dir: &Path, id: u64) {
    let p = segment_dir(dir, id);
    if let Err(e) = std::fs::remove_dir_all(&p) {
        tracing::warn!(
            "could not remove {} (it is garbage now and will be removed on a later open): {e}",
            p.display()
        );
    }
}
