//! Where a segment's rows came from in the source text (docs/architecture.md §3): the
//! optional `sources.bin` and `documents.bin` of a segment built from text.
//!
//! `sources.bin` holds one fixed-width record per row, `(document, start, end)` as
//! little-endian u32: the document (an index into the segment's own `documents.bin`) and the
//! byte range in it of the token at the row's position, the token whose successor the row's
//! value is. A row with no source (an imported row merged next to rows from text) has
//! `document = u32::MAX`. `documents.bin` is a copy of the documents the segment's rows were
//! made from, so the store stays self-contained when it is moved or its inputs change:
//!
//! ```text
//! header  : MAGIC ("GTDC"), VERSION (1), n_docs, 0           (u32 each)
//! offsets : n_docs + 1 u64, ascending, offsets[0] = 0        (byte offsets into the text)
//! text    : the documents' UTF-8 text, concatenated
//! ```
//!
//! Both files are checked at open like every segment file (size and CRC-32 against the
//! manifest), and then structurally: the offsets are ascending and end at the text's length,
//! every document is valid UTF-8, every record names a document and a range inside it. So a
//! lookup never reads out of bounds and never slices a string off a character boundary.

use std::ops::Range;
use std::path::Path;

use memmap2::Mmap;
use serde::Serialize;

use super::error::{DatastoreError, Result};

/// The per-row records file of a segment built from text.
pub const SOURCES_FILE: &str = "sources.bin";
/// The documents file of a segment built from text.
pub const DOCUMENTS_FILE: &str = "documents.bin";

const MAGIC: u32 = u32::from_le_bytes(*b"GTDC");
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 16;
/// Bytes of one `sources.bin` record.
pub const RECORD_BYTES: usize = 12;

/// Where one row came from: the byte range `start..end` of document `document` (an index into
/// the segment's documents) that holds the token at the row's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SourceSpan {
    /// Index of the document among the segment's (or the batch's) documents.
    pub document: u32,
    /// First byte of the token in the document.
    pub start: u32,
    /// One past its last byte.
    pub end: u32,
}

impl SourceSpan {
    /// The record of a row that has no source text (an imported row).
    pub const NONE: SourceSpan = SourceSpan {
        document: u32::MAX,
        start: 0,
        end: 0,
    };

    /// Whether this record names a document.
    pub fn is_some(&self) -> bool {
        self.document != u32::MAX
    }
}

/// The source text of a batch of rows, handed to an append with the rows: the documents and,
/// for every row, its span in one of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowSources {
    /// The documents the rows come from.
    pub documents: Vec<String>,
    /// One span per row, in row order ([`SourceSpan::NONE`] for a row with no source).
    pub spans: Vec<SourceSpan>,
}

impl RowSources {
    /// Checks the sources of `rows` rows: one span per row, each inside its document, and
    /// sizes that the u32 records can address.
    pub fn check(&self, rows: usize) -> Result<()> {
        let bad = |why: String| DatastoreError::BadSources(why);
        if self.spans.len() != rows {
            return Err(bad(format!(
                "{} source spans for {rows} rows; give one per row",
                self.spans.len()
            )));
        }
        if self.documents.len() >= u32::MAX as usize {
            return Err(bad(format!(
                "{} documents; a segment holds fewer than {}",
                self.documents.len(),
                u32::MAX
            )));
        }
        if let Some(i) = self
            .documents
            .iter()
            .position(|d| d.len() > u32::MAX as usize)
        {
            return Err(bad(format!(
                "document {i} is {} bytes; at most {} are addressable",
                self.documents[i].len(),
                u32::MAX
            )));
        }
        for (row, s) in self.spans.iter().enumerate() {
            if !s.is_some() {
                continue;
            }
            let Some(doc) = self.documents.get(s.document as usize) else {
                return Err(bad(format!(
                    "row {row} names document {}, but there are {}",
                    s.document,
                    self.documents.len()
                )));
            };
            if s.start > s.end || s.end as usize > doc.len() {
                return Err(bad(format!(
                    "row {row} spans bytes {}..{} of document {}, which has {} bytes",
                    s.start,
                    s.end,
                    s.document,
                    doc.len()
                )));
            }
        }
        Ok(())
    }

    /// The bytes of `sources.bin` and `documents.bin`.
    pub(crate) fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        let mut spans = Vec::with_capacity(self.spans.len() * RECORD_BYTES);
        for s in &self.spans {
            for v in [s.document, s.start, s.end] {
                spans.extend_from_slice(&v.to_le_bytes());
            }
        }
        let text: usize = self.documents.iter().map(String::len).sum();
        let n = self.documents.len();
        let mut docs = Vec::with_capacity(HEADER_BYTES + (n + 1) * 8 + text);
        for v in [MAGIC, VERSION, n as u32, 0] {
            docs.extend_from_slice(&v.to_le_bytes());
        }
        let mut off = 0u64;
        docs.extend_from_slice(&off.to_le_bytes());
        for d in &self.documents {
            off += d.len() as u64;
            docs.extend_from_slice(&off.to_le_bytes());
        }
        for d in &self.documents {
            docs.extend_from_slice(d.as_bytes());
        }
        (spans, docs)
    }

    /// Appends `other`'s documents and spans (its document indices shifted past ours), for
    /// merging segments in row order.
    pub(crate) fn extend_from(&mut self, other: &MappedSources) {
        let shift = self.documents.len() as u32;
        self.documents
            .extend((0..other.documents()).map(|i| other.document(i).to_string()));
        self.spans.extend((0..other.rows()).map(|r| {
            let s = other.span(r);
            if s.is_some() {
                SourceSpan {
                    document: s.document + shift,
                    ..s
                }
            } else {
                s
            }
        }));
    }
}

/// A segment's mapped, checked `sources.bin` and `documents.bin`.
#[derive(Debug)]
pub struct MappedSources {
    spans: Mmap,
    docs: Mmap,
    n_docs: usize,
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

impl MappedSources {
    /// Checks the structure of the two files (already size- and CRC-checked against the
    /// manifest) for a segment of `rows` rows. Errors name the file at fault.
    pub fn open(
        spans: Mmap,
        spans_path: &Path,
        docs: Mmap,
        docs_path: &Path,
        rows: usize,
    ) -> Result<Self> {
        let corrupt = |path: &Path, why: String| DatastoreError::corrupt(path, why);
        if spans.len() != rows * RECORD_BYTES {
            return Err(corrupt(
                spans_path,
                format!(
                    "is {} bytes, but {rows} rows of {RECORD_BYTES}-byte records need {}",
                    spans.len(),
                    rows * RECORD_BYTES
                ),
            ));
        }
        if docs.len() < HEADER_BYTES + 8 {
            return Err(corrupt(
                docs_path,
                format!("is {} bytes, shorter than its header", docs.len()),
            ));
        }
        if u32_at(&docs, 0) != MAGIC || u32_at(&docs, 4) != VERSION {
            return Err(corrupt(
                docs_path,
                "does not start with the documents header (GTDC, version 1)".into(),
            ));
        }
        let n_docs = u32_at(&docs, 8) as usize;
        let text_start = (n_docs + 1)
            .checked_mul(8)
            .and_then(|b| b.checked_add(HEADER_BYTES))
            .filter(|&b| b <= docs.len())
            .ok_or_else(|| {
                corrupt(
                    docs_path,
                    format!("says it holds {n_docs} documents, more than its size allows"),
                )
            })?;
        let text_len = (docs.len() - text_start) as u64;
        let mut prev = u64_at(&docs, HEADER_BYTES);
        if prev != 0 {
            return Err(corrupt(
                docs_path,
                "the first document does not start at offset 0".into(),
            ));
        }
        for i in 1..=n_docs {
            let off = u64_at(&docs, HEADER_BYTES + i * 8);
            if off < prev || off > text_len {
                return Err(corrupt(
                    docs_path,
                    format!("document {} ends at byte {off}, outside 0..={text_len} or before it starts", i - 1),
                ));
            }
            prev = off;
        }
        if prev != text_len {
            return Err(corrupt(
                docs_path,
                format!("its documents end at byte {prev}, but it holds {text_len} bytes of text"),
            ));
        }
        let me = MappedSources {
            spans,
            docs,
            n_docs,
        };
        for i in 0..n_docs {
            if std::str::from_utf8(me.doc_bytes(i)).is_err() {
                return Err(corrupt(
                    docs_path,
                    format!("document {i} is not valid UTF-8"),
                ));
            }
        }
        for row in 0..rows {
            let s = me.span(row);
            if !s.is_some() {
                continue;
            }
            let len = if (s.document as usize) < n_docs {
                me.doc_bytes(s.document as usize).len()
            } else {
                return Err(corrupt(
                    spans_path,
                    format!(
                        "row {row} names document {}, but {} holds {n_docs}",
                        s.document, DOCUMENTS_FILE
                    ),
                ));
            };
            if s.start > s.end || s.end as usize > len {
                return Err(corrupt(
                    spans_path,
                    format!(
                        "row {row} spans bytes {}..{} of document {}, which has {len} bytes",
                        s.start, s.end, s.document
                    ),
                ));
            }
        }
        Ok(me)
    }

    fn text_start(&self) -> usize {
        HEADER_BYTES + (self.n_docs + 1) * 8
    }

    fn doc_range(&self, i: usize) -> Range<usize> {
        let a = u64_at(&self.docs, HEADER_BYTES + i * 8) as usize;
        let b = u64_at(&self.docs, HEADER_BYTES + (i + 1) * 8) as usize;
        self.text_start() + a..self.text_start() + b
    }

    fn doc_bytes(&self, i: usize) -> &[u8] {
        &self.docs[self.doc_range(i)]
    }

    /// Rows covered.
    pub fn rows(&self) -> usize {
        self.spans.len() / RECORD_BYTES
    }

    /// Documents held.
    pub fn documents(&self) -> usize {
        self.n_docs
    }

    /// Document `i` (checked UTF-8 at open).
    pub fn document(&self, i: usize) -> &str {
        std::str::from_utf8(self.doc_bytes(i)).expect("checked at open")
    }

    /// The record of `row`.
    pub fn span(&self, row: usize) -> SourceSpan {
        let b = row * RECORD_BYTES;
        SourceSpan {
            document: u32_at(&self.spans, b),
            start: u32_at(&self.spans, b + 4),
            end: u32_at(&self.spans, b + 8),
        }
    }

    /// The text around `row`'s token, `context` bytes either side (widened to character
    /// boundaries); `None` for a row with no source.
    pub fn snippet(&self, row: usize, context: usize) -> Option<SourceSnippet> {
        let s = self.span(row);
        if !s.is_some() {
            return None;
        }
        let doc = self.document(s.document as usize);
        Some(SourceSnippet::cut(doc, s, context))
    }
}

/// The source text around one row: `before`, the row's own token text `token`, and `after`
/// (which starts with the token the row predicts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceSnippet {
    /// The document, an index among the segment's documents.
    pub document: u32,
    /// The token's byte range in the document (as recorded; a byte-level token may cut a
    /// character, the texts below are widened to whole characters).
    pub start: u32,
    /// One past the token's last byte.
    pub end: u32,
    /// The document's length in bytes.
    pub document_bytes: u64,
    /// Up to `context` bytes before the token.
    pub before: String,
    /// The token at the row's position.
    pub token: String,
    /// Up to `context` bytes after it: what followed in the source.
    pub after: String,
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

impl SourceSnippet {
    fn cut(doc: &str, s: SourceSpan, context: usize) -> Self {
        let start = floor_boundary(doc, s.start as usize);
        let end = ceil_boundary(doc, (s.end as usize).max(start));
        let from = floor_boundary(doc, start.saturating_sub(context));
        let to = ceil_boundary(doc, end.saturating_add(context).min(doc.len()));
        SourceSnippet {
            document: s.document,
            start: s.start,
            end: s.end,
            document_bytes: doc.len() as u64,
            before: doc[from..start].to_string(),
            token: doc[start..end].to_string(),
            after: doc[end..to].to_string(),
        }
    }
}
