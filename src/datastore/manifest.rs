//! `manifest.json`: the single source of truth of what a datastore contains.
//!
//! Segments are immutable, so the manifest is the only file that ever changes, and it changes
//! only by atomic replacement (see `durable`). It records everything needed to interpret and
//! check the segment files without opening them: the model fingerprint and key type (keys of
//! different models must never be mixed), the dtype, the metric, and for every segment its
//! rows, provenance and the byte size and CRC-32 of each file. Files not referenced here are
//! garbage from an interrupted writer.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{DatastoreError, Result};
use crate::fingerprint::{KeyType, ModelFingerprint};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_NAME: &str = "goodtriever-datastore";
pub const FORMAT_VERSION: u32 = 1;
pub const METRIC: &str = "squared_l2";

/// Element type of the stored keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDtype {
    /// Half precision: half the bytes to scan, plenty of precision for hidden states.
    #[default]
    F16,
    /// Single precision: exact copies of f32 hidden states, twice the bytes of f16.
    F32,
}

impl KeyDtype {
    /// Bytes per scalar: 2 for f16, 4 for f32. A row takes `dim × size()` bytes in `keys.bin`.
    pub fn size(self) -> usize {
        match self {
            KeyDtype::F16 => 2,
            KeyDtype::F32 => 4,
        }
    }

    /// The name used in `manifest.json` and on the command line (`f16`, `f32`), the inverse
    /// of `FromStr`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyDtype::F16 => "f16",
            KeyDtype::F32 => "f32",
        }
    }
}

impl std::fmt::Display for KeyDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" => Ok(KeyDtype::F16),
            "f32" => Ok(KeyDtype::F32),
            _ => Err(format!("unknown key dtype {s:?}: expected f16 or f32")),
        }
    }
}

/// The tool that writes new segments, recorded in their provenance.
pub const TOOL: &str = concat!("goodtriever ", env!("CARGO_PKG_VERSION"));

/// Where a segment's rows came from.
///
/// The first four fields are all that stores written before version 0.1's structured
/// provenance have; every later field is optional (serde defaults), so those manifests still
/// open. The model fingerprint and key type are not repeated here: they are the store's
/// (`Manifest::fingerprint`, `Manifest::key_type`), the same for every segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// One-line summary of the source, e.g. the imported `.npy`, the input files of a build,
    /// `grpc:AddTexts`, or `compaction of segments 1,2`. The structured record is in `text`
    /// and `merged_from`.
    pub source: String,
    /// Dataset label, e.g. `toxic` or `toxicity >= 0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Free-form tag, e.g. a drift domain or a date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// When the segment was added, in seconds since the Unix epoch.
    pub added_at: u64,
    /// The program that wrote the segment, e.g. `goodtriever 0.1.0` ([`TOOL`]). Absent in
    /// older stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// How the rows were made from text (`datastore build` / `add`). Absent for imported
    /// hidden states, appends over gRPC and older stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextProvenance>,
    /// For a segment made by compaction: every original segment it holds, in row order.
    /// Merging a merged segment again lists its originals, not the intermediate merge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<MergedSegment>,
}

/// How a segment's rows were made from labelled text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextProvenance {
    /// Every input file of the run that wrote the segment, in reading order.
    pub files: Vec<SourceFile>,
    /// Field of jsonl records / csv column holding the text.
    pub text_field: String,
    /// The label filter that selected documents; `None`: every document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_filter: Option<LabelRange>,
    /// Sliding window length, in tokens: the longest context a key row's hidden state saw.
    pub window: usize,
    /// Tokens the window advances between passes; each token is keyed once, in the first
    /// window that reaches it.
    pub stride: usize,
    /// Which chunk of a build this segment is, when a build wrote several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<Part>,
    /// Documents (or pieces of documents split across segments) in this segment.
    pub documents: usize,
    /// Document tokens in this segment, the EOS separators not counted.
    pub tokens: usize,
}

/// One input file of a build or add.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// The path as given on the command line.
    pub path: String,
    /// `txt`, `jsonl` or `csv`.
    pub format: String,
    /// Size of the file when it was read, in bytes.
    pub bytes: u64,
    /// SHA-256 of the file when it was read, lowercase hex: tells whether a later file under
    /// the same path is the same input.
    pub sha256: String,
    /// Records read from the file over the whole run (a build that wrote several segments
    /// counts every segment's).
    pub records: usize,
    /// Of those, the records selected (label filter passed, non-blank text), over the whole
    /// run likewise.
    pub selected: usize,
}

/// A label threshold: documents with `min <= field <= max` (either bound optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelRange {
    /// The numeric field of a jsonl record / csv column that is compared, e.g. `toxicity`.
    pub field: String,
    /// Inclusive lower bound; `None`: no lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Inclusive upper bound; `None`: no upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl std::fmt::Display for LabelRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.max) {
            (Some(a), Some(b)) => write!(f, "{a} <= {} <= {b}", self.field),
            (Some(a), None) => write!(f, "{} >= {a}", self.field),
            (None, Some(b)) => write!(f, "{} <= {b}", self.field),
            (None, None) => write!(f, "{} (any)", self.field),
        }
    }
}

/// Segment `index` (1-based) of the `of` segments a build wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// This segment's place in the build, from 1.
    pub index: usize,
    /// How many segments the build wrote.
    pub of: usize,
}

/// An original segment inside a compacted one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergedSegment {
    /// The original segment's id (no longer in the manifest).
    pub id: u64,
    /// Rows it had, now `first_row..first_row + rows` of the compacted segment.
    pub rows: usize,
    /// Its first row within the compacted segment.
    pub first_row: u64,
    /// Its provenance as it was (with `merged_from` empty: originals are listed flat).
    pub provenance: Provenance,
}

impl Provenance {
    /// Provenance for `source`, stamped with the current time and this tool's version.
    pub fn new(source: impl Into<String>) -> Self {
        Provenance {
            source: source.into(),
            label: None,
            tag: None,
            added_at: now_unix(),
            tool: Some(TOOL.to_string()),
            text: None,
            merged_from: Vec::new(),
        }
    }

    /// The longest `source` an append accepts, in bytes. The manifest is rewritten on every
    /// change, so each segment's record must stay small.
    pub const MAX_SOURCE_BYTES: usize = 4096;
    /// The longest `label` or `tag` an append accepts, in bytes.
    pub const MAX_NAME_BYTES: usize = 256;

    /// Checks what a caller may put into an append's provenance: `source` at most
    /// [`MAX_SOURCE_BYTES`](Self::MAX_SOURCE_BYTES), `label` and `tag` at most
    /// [`MAX_NAME_BYTES`](Self::MAX_NAME_BYTES), and no control characters (newlines, terminal
    /// escapes) in any of them, since they are printed as they are.
    pub fn check(&self) -> Result<()> {
        let fields = [
            ("source", Some(&self.source), Self::MAX_SOURCE_BYTES),
            ("label", self.label.as_ref(), Self::MAX_NAME_BYTES),
            ("tag", self.tag.as_ref(), Self::MAX_NAME_BYTES),
        ];
        for (field, value, max) in fields {
            let Some(value) = value else { continue };
            let why = if value.len() > max {
                format!("is {} bytes long; at most {max} are kept", value.len())
            } else if let Some(c) = value.chars().find(|c| c.is_control()) {
                format!("contains the control character {c:?}; use printable text on one line")
            } else {
                continue;
            };
            return Err(DatastoreError::BadProvenance { field, why });
        }
        Ok(())
    }

    /// The same provenance with the dataset label set (builder style, for `Provenance::new`).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The same provenance with the free-form tag set (builder style, for `Provenance::new`).
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// The provenance of the compaction of `segments` (in row order): the originals they
    /// hold, flattened, with their row offsets; the label and tag when all originals agree.
    pub fn merged<'a>(segments: impl IntoIterator<Item = (u64, usize, &'a Provenance)>) -> Self {
        let mut merged_from = Vec::new();
        let mut ids = Vec::new();
        let mut offset = 0u64;
        for (id, rows, p) in segments {
            ids.push(id.to_string());
            if p.merged_from.is_empty() {
                merged_from.push(MergedSegment {
                    id,
                    rows,
                    first_row: offset,
                    provenance: p.clone(),
                });
            } else {
                for m in &p.merged_from {
                    merged_from.push(MergedSegment {
                        first_row: offset + m.first_row,
                        ..m.clone()
                    });
                }
            }
            offset += rows as u64;
        }
        let common = |f: fn(&Provenance) -> &Option<String>| -> Option<String> {
            let first = f(&merged_from.first()?.provenance);
            merged_from
                .iter()
                .all(|m| f(&m.provenance) == first)
                .then(|| first.clone())
                .flatten()
        };
        let mut p = Provenance::new(format!("compaction of segments {}", ids.join(",")));
        p.label = common(|p| &p.label);
        p.tag = common(|p| &p.tag);
        p.merged_from = merged_from;
        p
    }
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One file of a segment, as committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// HNSW construction parameters of a segment's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexParams {
    pub m: usize,
    pub ef_construction: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub id: u64,
    pub rows: usize,
    #[serde(default)]
    pub retired: bool,
    pub provenance: Provenance,
    pub index: IndexParams,
    pub files: Vec<FileEntry>,
}

impl SegmentEntry {
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Incremented by every committed change; lets readers detect a new manifest cheaply.
    pub generation: u64,
    pub fingerprint: ModelFingerprint,
    pub key_type: KeyType,
    pub dtype: KeyDtype,
    pub metric: String,
    pub next_segment_id: u64,
    pub segments: Vec<SegmentEntry>,
    /// CRC-32 of the manifest as serialised without this field, so that a damaged manifest
    /// whose JSON is still valid (a flipped character inside a string) is refused. Absent in
    /// manifests written before it existed, which are read unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

impl Manifest {
    pub fn new(fingerprint: ModelFingerprint, key_type: KeyType, dtype: KeyDtype) -> Self {
        Manifest {
            format: FORMAT_NAME.to_string(),
            format_version: FORMAT_VERSION,
            generation: 0,
            fingerprint,
            key_type,
            dtype,
            metric: METRIC.to_string(),
            next_segment_id: 0,
            segments: Vec::new(),
            crc32: None,
        }
    }

    pub fn dim(&self) -> usize {
        self.fingerprint.hidden_size
    }

    pub fn live(&self) -> impl Iterator<Item = &SegmentEntry> {
        self.segments.iter().filter(|s| !s.retired)
    }

    /// The manifest as written to disk, with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.crc32 = Some(m.checksum());
        m.unchecked_bytes()
    }

    fn unchecked_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serialises");
        v.push(b'\n');
        v
    }

    /// The CRC-32 of the manifest serialised without its checksum field. Serialising what was
    /// parsed gives back the bytes that were checksummed, whatever the file's whitespace.
    fn checksum(&self) -> u32 {
        let mut m = self.clone();
        m.crc32 = None;
        crc32fast::hash(&m.unchecked_bytes())
    }

    /// Parses and checks a manifest; `path` is only used in error messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |detail: String| DatastoreError::BadManifest {
            path: path.to_path_buf(),
            detail,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if let Some(want) = m.crc32 {
            let got = m.checksum();
            if got != want {
                return Err(bad(format!(
                    "checksum mismatch: its contents hash to crc32 {got:08x}, but it records {want:08x} (damaged, or edited by hand)"
                )));
            }
        }
        if m.format != FORMAT_NAME {
            return Err(bad(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                m.format
            )));
        }
        if m.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                m.format_version
            )));
        }
        if m.metric != METRIC {
            return Err(bad(format!(
                "metric {:?} is not supported (only {METRIC:?})",
                m.metric
            )));
        }
        if m.dim() == 0 {
            return Err(bad("hidden size is 0".into()));
        }
        if let Some(why) = m.fingerprint.vocab_problem() {
            return Err(bad(why));
        }
        let mut ids = std::collections::HashSet::new();
        let mut total = 0usize;
        for s in &m.segments {
            // Row ids and the counts summed from here on must not overflow.
            total = total.checked_add(s.rows).ok_or_else(|| {
                bad(format!(
                    "segment {} brings the row count past {}",
                    s.id,
                    usize::MAX
                ))
            })?;
            if !ids.insert(s.id) {
                return Err(bad(format!("segment id {} appears twice", s.id)));
            }
            if s.id >= m.next_segment_id {
                return Err(bad(format!(
                    "segment id {} is not below next_segment_id {}",
                    s.id, m.next_segment_id
                )));
            }
            if s.rows == 0 {
                return Err(bad(format!("segment {} has no rows", s.id)));
            }
        }
        Ok(m)
    }

    pub fn read(dir: &Path) -> Result<(Self, Vec<u8>)> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DatastoreError::NotFound(dir.to_path_buf()))
            }
            Err(e) => return Err(DatastoreError::io("read", &path, e)),
        };
        let m = Manifest::from_bytes(&path, &bytes)?;
        Ok((m, bytes))
    }
}
