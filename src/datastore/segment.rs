//! One immutable segment: `keys.bin`, `values.bin` and `index.bin`, memory-mapped, and for
//! rows made from text `sources.bin` and `documents.bin` (`sources`).
//!
//! A segment is written once, into a temporary directory, and never modified afterwards; it
//! only becomes part of the store when a manifest that lists it is committed. Opening maps the
//! files and checks their sizes against the manifest (cheap, catches truncation); the full
//! CRC-32 check is `verify`'s job, because reading every byte at open would defeat mmap.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;

use super::error::{DatastoreError, Result};
use super::hnsw::{self, Graph, INDEX_FILE};
use super::keys::{KeyRows, Keys};
use super::manifest::{FileEntry, IndexParams, KeyDtype, SegmentEntry};
use super::sources::{MappedSources, RowSources, DOCUMENTS_FILE, RECORD_BYTES, SOURCES_FILE};

pub const KEYS_FILE: &str = "keys.bin";
pub const VALUES_FILE: &str = "values.bin";
pub const SEGMENTS_DIR: &str = "segments";

pub fn segment_dir(store: &Path, id: u64) -> PathBuf {
    store.join(SEGMENTS_DIR).join(id.to_string())
}

/// A live segment with its files mapped.
#[derive(Debug)]
pub struct Segment {
    pub id: u64,
    pub rows: usize,
    dtype: KeyDtype,
    keys: Mmap,
    values: Mmap,
    graph: Graph,
    /// Where each row came from in the source text; `None` for rows not made from text.
    sources: Option<MappedSources>,
}

/// Maps a segment file after checking its size and its CRC-32 against the manifest, so a
/// damaged segment is refused before it is ever searched. Reading every byte once costs a
/// fraction of what the first searches would pay to fault the pages in anyway
/// (docs/performance.md).
fn map_checked(path: &Path, expected: u64, crc32: u32) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| DatastoreError::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| DatastoreError::io("stat", path, e))?
        .len();
    if len != expected {
        return Err(DatastoreError::corrupt(
            path,
            format!("size is {len} bytes, the manifest says {expected} (truncated or overwritten)"),
        ));
    }
    // SAFETY: segment files are immutable once committed and are only ever deleted (never
    // truncated or rewritten) by this crate; deletion keeps existing maps valid on Unix.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| DatastoreError::io("mmap", path, e))?;
    let crc = crc32fast::hash(&map);
    if crc != crc32 {
        return Err(DatastoreError::corrupt(
            path,
            format!("checksum mismatch: crc32 is {crc:08x}, the manifest says {crc32:08x}; the store is not served with a damaged segment (`goodtriever datastore verify` lists every damaged file)"),
        ));
    }
    Ok(map)
}

impl Segment {
    pub fn open(store: &Path, entry: &SegmentEntry, dim: usize, dtype: KeyDtype) -> Result<Self> {
        let dir = segment_dir(store, entry.id);
        let want = |name: &str, bytes: u64| -> Result<(PathBuf, u32)> {
            let path = dir.join(name);
            let f = entry
                .file(name)
                .ok_or_else(|| DatastoreError::BadManifest {
                    path: store.join(super::manifest::MANIFEST_FILE),
                    detail: format!("segment {} does not list {name}", entry.id),
                })?;
            if f.bytes != bytes {
                return Err(DatastoreError::BadManifest {
                    path: store.join(super::manifest::MANIFEST_FILE),
                    detail: format!(
                        "segment {} lists {name} as {} bytes, but {} rows need {bytes}",
                        entry.id, f.bytes, entry.rows
                    ),
                });
            }
            Ok((path, f.crc32))
        };
        // The manifest's numbers are not trusted: a huge row count or hidden size must be
        // refused, not overflow.
        let size = |per_row: usize| {
            entry
                .rows
                .checked_mul(per_row)
                .and_then(|b| u64::try_from(b).ok())
                .ok_or_else(|| DatastoreError::BadManifest {
                    path: store.join(super::manifest::MANIFEST_FILE),
                    detail: format!(
                        "segment {} has {} rows of {per_row} bytes: more bytes than a file holds",
                        entry.id, entry.rows
                    ),
                })
        };
        let key_row = dim
            .checked_mul(dtype.size())
            .ok_or_else(|| DatastoreError::BadManifest {
                path: store.join(super::manifest::MANIFEST_FILE),
                detail: format!("hidden size {dim} is too large"),
            })?;
        let kbytes = size(key_row)?;
        let vbytes = size(4)?;
        let (kpath, kcrc) = want(KEYS_FILE, kbytes)?;
        let (vpath, vcrc) = want(VALUES_FILE, vbytes)?;
        let ipath = dir.join(INDEX_FILE);
        let ientry = entry
            .file(INDEX_FILE)
            .ok_or_else(|| DatastoreError::BadManifest {
                path: store.join(super::manifest::MANIFEST_FILE),
                detail: format!("segment {} does not list {INDEX_FILE}", entry.id),
            })?;
        let keys = map_checked(&kpath, kbytes, kcrc)?;
        let values = map_checked(&vpath, vbytes, vcrc)?;
        let imap = map_checked(&ipath, ientry.bytes, ientry.crc32)?;
        let graph = Graph::open(imap, entry.rows, &ipath)?;
        let sources = match (entry.file(SOURCES_FILE), entry.file(DOCUMENTS_FILE)) {
            (None, None) => None,
            (Some(_), Some(d)) => {
                let (spath, scrc) = want(SOURCES_FILE, size(RECORD_BYTES)?)?;
                let dpath = dir.join(DOCUMENTS_FILE);
                let smap = map_checked(&spath, size(RECORD_BYTES)?, scrc)?;
                let dmap = map_checked(&dpath, d.bytes, d.crc32)?;
                Some(MappedSources::open(smap, &spath, dmap, &dpath, entry.rows)?)
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(DatastoreError::BadManifest {
                    path: store.join(super::manifest::MANIFEST_FILE),
                    detail: format!(
                        "segment {} lists only one of {SOURCES_FILE} and {DOCUMENTS_FILE}",
                        entry.id
                    ),
                })
            }
        };
        Ok(Segment {
            id: entry.id,
            rows: entry.rows,
            dtype,
            keys,
            values,
            graph,
            sources,
        })
    }

    /// The segment's source positions, when its rows were made from text.
    pub fn sources(&self) -> Option<&MappedSources> {
        self.sources.as_ref()
    }

    pub fn keys(&self) -> KeyRows<'_> {
        // SAFETY: f32/f16 accept every bit pattern; the map is page-aligned and its length
        // was checked to be rows·dim·size, so the aligned middle is the whole file.
        unsafe {
            match self.dtype {
                KeyDtype::F32 => KeyRows::F32(self.keys.align_to::<f32>().1),
                KeyDtype::F16 => KeyRows::F16(self.keys.align_to::<f16>().1),
            }
        }
    }

    pub fn values(&self) -> &[u32] {
        // SAFETY: as above.
        unsafe { self.values.align_to::<u32>().1 }
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }
}

/// Writes a file, fsyncs it, and returns its manifest entry.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    let path = dir.join(name);
    let file = File::create(&path).map_err(|e| DatastoreError::io("create", &path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut crc = crc32fast::Hasher::new();
    for chunk in bytes.chunks(1 << 20) {
        crc.update(chunk);
        w.write_all(chunk)
            .map_err(|e| DatastoreError::io("write", &path, e))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| DatastoreError::io("write", &path, e.into_error()))?;
    file.sync_all()
        .map_err(|e| DatastoreError::io("fsync", &path, e))?;
    Ok(FileEntry {
        name: name.to_string(),
        bytes: bytes.len() as u64,
        crc32: crc.finalize(),
    })
}

/// Encodes validated keys in the store's dtype (little-endian bytes).
pub fn encode_keys(keys: Keys<'_>, dim: usize, dtype: KeyDtype) -> Result<Vec<u8>> {
    let n = keys.len();
    let mut out = Vec::with_capacity(n * dtype.size());
    match (dtype, keys) {
        (KeyDtype::F32, _) => {
            for i in 0..n {
                out.extend_from_slice(&keys.get_f32(i).to_le_bytes());
            }
        }
        (KeyDtype::F16, Keys::F16(k)) => {
            for v in k {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        (KeyDtype::F16, Keys::F32(k)) => {
            for (i, v) in k.iter().enumerate() {
                let h = f16::from_f32(*v);
                if !h.is_finite() {
                    return Err(DatastoreError::F16Overflow {
                        row: i / dim,
                        col: i % dim,
                        value: *v,
                    });
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
    }
    Ok(out)
}

/// Views encoded key bytes as rows (the bytes come from `encode_keys`, so they are aligned
/// by copying into a typed buffer when needed).
pub enum OwnedKeys {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl OwnedKeys {
    pub fn from_bytes(bytes: &[u8], dtype: KeyDtype) -> Self {
        match dtype {
            KeyDtype::F32 => OwnedKeys::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            KeyDtype::F16 => OwnedKeys::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        }
    }

    pub fn rows(&self) -> KeyRows<'_> {
        match self {
            OwnedKeys::F32(v) => KeyRows::F32(v),
            OwnedKeys::F16(v) => KeyRows::F16(v),
        }
    }
}

/// Writes all files of a new segment into `dir` (which must exist and be empty), builds its
/// index, fsyncs every file, and returns the manifest entries of the files. `sources` (checked
/// by the caller) adds `sources.bin` and `documents.bin`.
#[allow(clippy::too_many_arguments)]
pub fn write_segment(
    dir: &Path,
    key_bytes: &[u8],
    values: &[u32],
    sources: Option<&RowSources>,
    dim: usize,
    dtype: KeyDtype,
    params: IndexParams,
    progress: &dyn Fn(usize),
) -> Result<Vec<FileEntry>> {
    let rows = values.len();
    let keys = OwnedKeys::from_bytes(key_bytes, dtype);
    let index = hnsw::build(
        keys.rows(),
        rows,
        dim,
        params.m,
        params.ef_construction,
        progress,
    )?;
    drop(keys);
    let mut vbytes = Vec::with_capacity(rows * 4);
    for v in values {
        vbytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut files = vec![
        write_file(dir, KEYS_FILE, key_bytes)?,
        write_file(dir, VALUES_FILE, &vbytes)?,
        write_file(dir, INDEX_FILE, &index)?,
    ];
    if let Some(src) = sources {
        let (spans, docs) = src.encode();
        files.push(write_file(dir, SOURCES_FILE, &spans)?);
        files.push(write_file(dir, DOCUMENTS_FILE, &docs)?);
    }
    super::durable::sync_dir(dir)?;
    Ok(files)
}
