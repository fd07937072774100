//! From documents to the token streams the model runs over, and which positions become rows.
//!
//! Documents are tokenized once and kept only as token ids (4 bytes a token, against 1–2 KB a
//! key), so the whole plan of a build — how many chunks, how many rows each — is known before
//! the model runs: that gives an exact ETA and lets an interrupted build check what it already
//! committed. The ids are then cut into **chunks** of at most `segment_tokens` tokens at
//! document boundaries (a document longer than that is split); each chunk becomes one segment, so the
//! memory of a build is bounded by one chunk's keys whatever the input size.
//!
//! Within a chunk, documents are joined as `EOS d₁ EOS d₂ … EOS`. The paper concatenated
//! documents with no separator, which pairs the end of one document with the start of an
//! unrelated one as if that were a real continuation. With the separator, the last token of a
//! document is paired with EOS (a true fact about where texts end) and every document's first
//! token is keyed with the same "start of text" context. The key *at* a separator would predict
//! the first token of whatever document happens to follow, which is noise, so separator
//! positions are never stored. Sliding windows ([`Windows::plan`]) decide the rest: every other
//! position is keyed once, by the window that gives it the most context, and the first position
//! of each window (an attention sink) is skipped.

use std::ops::Range;

use rayon::prelude::*;

use super::BuildError;
use crate::datastore::{RowSources, SourceSpan};
use crate::model::{PlainEncoding, Tokenizer, Windows};

/// All selected documents as token ids, with their text and every token's place in it.
#[derive(Clone, Debug, Default)]
pub struct Corpus {
    /// Every document's token ids, concatenated without separators (chunks add them).
    pub tokens: Vec<u32>,
    /// `docs[i]` is the range of document `i` in `tokens`. Never empty.
    pub docs: Vec<Range<usize>>,
    /// `texts[i]` is document `i`'s text: the segments keep a copy (docs/architecture.md §3).
    pub texts: Vec<String>,
    /// For every token of `tokens`, its byte range in its document's text.
    pub offsets: Vec<(u32, u32)>,
}

impl Corpus {
    /// Tokenizes `texts` (in parallel) and appends the non-empty results.
    pub fn extend(&mut self, tokenizer: &Tokenizer, texts: &[String]) -> Result<(), BuildError> {
        let ids: Vec<PlainEncoding> = texts
            .par_iter()
            .map(|t| tokenizer.encode_plain_with_offsets(t))
            .collect::<Result<_, _>>()?;
        for (PlainEncoding { ids: d, offsets }, text) in ids.into_iter().zip(texts) {
            if d.is_empty() {
                continue;
            }
            let start = self.tokens.len();
            self.tokens.extend_from_slice(&d);
            self.offsets.extend_from_slice(&offsets);
            self.docs.push(start..self.tokens.len());
            self.texts.push(text.clone());
        }
        Ok(())
    }

    /// The document holding corpus token `t`.
    fn doc_of(&self, t: usize) -> usize {
        self.docs.partition_point(|d| d.end <= t)
    }
}

/// A piece of one document inside a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Range in [`Corpus::tokens`].
    pub range: Range<usize>,
    /// The piece is the beginning of its document (it gets a separator in front).
    pub starts_doc: bool,
    /// The piece is the end of its document (a separator follows it).
    pub ends_doc: bool,
}

/// The documents (or parts of documents) that make one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// The chunk's pieces in stream order; a long document may be split across chunks.
    pub pieces: Vec<Piece>,
}

impl ChunkPlan {
    /// The token stream of this chunk and, for each position, whether it is a separator.
    pub fn stream(&self, corpus: &Corpus, eos: u32) -> (Vec<u32>, Vec<bool>) {
        let mut tokens = Vec::new();
        let mut sep = Vec::new();
        for p in &self.pieces {
            if p.starts_doc {
                tokens.push(eos);
                sep.push(true);
            }
            tokens.extend_from_slice(&corpus.tokens[p.range.clone()]);
            sep.resize(tokens.len(), false);
        }
        if self.pieces.last().is_some_and(|p| p.ends_doc) {
            tokens.push(eos);
            sep.push(true);
        }
        (tokens, sep)
    }
}

impl ChunkPlan {
    /// The source text of the rows at `positions` of this chunk's stream (from
    /// [`row_positions`]): the documents the chunk's pieces come from, whole (a document split
    /// across chunks is copied into each), and each row's token span in them.
    pub fn sources(&self, corpus: &Corpus, positions: &[usize]) -> RowSources {
        // Stream position → corpus token, as `stream` lays the tokens out.
        let mut origin: Vec<Option<usize>> = Vec::new();
        let mut local: Vec<usize> = Vec::new();
        let mut documents = Vec::new();
        for p in &self.pieces {
            if p.starts_doc {
                origin.push(None);
            }
            origin.extend(p.range.clone().map(Some));
            let doc = corpus.doc_of(p.range.start);
            local.push(documents.len());
            documents.push(corpus.texts[doc].clone());
        }
        let piece_doc: Vec<(usize, usize)> = self
            .pieces
            .iter()
            .zip(&local)
            .map(|(p, &l)| (p.range.end, l))
            .collect();
        let spans = positions
            .iter()
            .map(|&pos| match origin.get(pos).copied().flatten() {
                Some(t) => {
                    let piece = piece_doc.partition_point(|&(end, _)| end <= t);
                    let (a, b) = corpus.offsets[t];
                    SourceSpan {
                        document: piece_doc[piece].1 as u32,
                        start: a,
                        end: b,
                    }
                }
                None => SourceSpan::NONE,
            })
            .collect();
        RowSources { documents, spans }
    }
}

/// Cuts the corpus into chunks of at most `segment_tokens` stream tokens (separators
/// included, plus the final EOS) at document boundaries. Only a document that does not fit in
/// a chunk of its own is split, into pieces that each fill a chunk.
pub fn plan_chunks(corpus: &Corpus, segment_tokens: usize) -> Vec<ChunkPlan> {
    let cap = segment_tokens.max(2);
    let mut chunks = Vec::new();
    let mut cur: Vec<Piece> = Vec::new();
    let mut len = 0usize; // stream tokens of `cur`, separators included
    let close = |cur: &mut Vec<Piece>, len: &mut usize, chunks: &mut Vec<ChunkPlan>| {
        if !cur.is_empty() {
            chunks.push(ChunkPlan {
                pieces: std::mem::take(cur),
            });
        }
        *len = 0;
    };
    for doc in &corpus.docs {
        let need = doc.len() + 1; // the separator in front
        if len > 0 && len + need > cap {
            close(&mut cur, &mut len, &mut chunks);
        }
        if need <= cap {
            cur.push(Piece {
                range: doc.clone(),
                starts_doc: true,
                ends_doc: true,
            });
            len += need;
            continue;
        }
        // Longer than a chunk (and `cur` is empty here): pieces that each fill one.
        let mut pos = doc.start;
        while pos < doc.end {
            let first = usize::from(pos == doc.start);
            let take = (doc.end - pos).min((cap - len - first).max(1));
            cur.push(Piece {
                range: pos..pos + take,
                starts_doc: pos == doc.start,
                ends_doc: pos + take == doc.end,
            });
            len += take + first;
            pos += take;
            if len >= cap {
                close(&mut cur, &mut len, &mut chunks);
            }
        }
    }
    close(&mut cur, &mut len, &mut chunks);
    chunks
}

/// The positions of a stream of `n` tokens that become rows, in order: every position the
/// window plan keys, except separators. Row `j` pairs the key at `positions[j]` with the token
/// at `positions[j] + 1`.
pub fn row_positions(
    n: usize,
    window: usize,
    stride: usize,
    sep: &[bool],
) -> Result<Vec<usize>, BuildError> {
    Ok(Windows::plan(n, window, stride)?
        .iter()
        .flat_map(|w| w.first_keyed..w.last_keyed)
        .filter(|&p| !sep[p])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(lens: &[usize]) -> Corpus {
        let mut c = Corpus::default();
        for (i, &l) in lens.iter().enumerate() {
            let s = c.tokens.len();
            let mut text = String::new();
            for j in 0..l {
                let id = (100 * (i + 1) + j) as u32;
                let word = format!("w{id} ");
                c.offsets
                    .push((text.len() as u32, (text.len() + word.len() - 1) as u32));
                text.push_str(&word);
                c.tokens.push(id);
            }
            c.docs.push(s..c.tokens.len());
            c.texts.push(text);
        }
        c
    }

    #[test]
    fn sources_name_the_document_and_bytes_of_each_rows_token() {
        let c = corpus(&[3, 5, 4]);
        // Small chunks: the 5-token document is split across two of them.
        for plan in plan_chunks(&c, 5) {
            let (t, sep) = plan.stream(&c, 9);
            let positions = row_positions(t.len(), 4, 2, &sep).unwrap();
            let src = plan.sources(&c, &positions);
            src.check(positions.len()).unwrap();
            assert_eq!(src.documents.len(), plan.pieces.len());
            for (&p, span) in positions.iter().zip(&src.spans) {
                assert!(span.is_some(), "row at {p} has no source");
                let doc = &src.documents[span.document as usize];
                let word = &doc[span.start as usize..span.end as usize];
                assert_eq!(word, format!("w{}", t[p]), "position {p}");
            }
        }
    }

    #[test]
    fn streams_separate_documents_with_eos_and_mark_the_separators() {
        let c = corpus(&[2, 3]);
        let plan = plan_chunks(&c, 1000);
        assert_eq!(plan.len(), 1);
        let (t, sep) = plan[0].stream(&c, 9);
        assert_eq!(t, vec![9, 100, 101, 9, 200, 201, 202, 9]);
        assert_eq!(
            sep,
            vec![true, false, false, true, false, false, false, true]
        );
        // One window over everything: positions 1..7 keyed, minus the separator at 3.
        assert_eq!(
            row_positions(t.len(), 16, 8, &sep).unwrap(),
            vec![1, 2, 4, 5, 6]
        );
    }

    #[test]
    fn chunks_cover_every_token_once_and_split_only_long_documents() {
        let c = corpus(&[3, 4, 20, 1, 5]);
        let plan = plan_chunks(&c, 8);
        let mut seen: Vec<usize> = plan
            .iter()
            .flat_map(|ch| ch.pieces.iter().flat_map(|p| p.range.clone()))
            .collect();
        let n = seen.len();
        seen.dedup();
        assert_eq!(n, c.tokens.len());
        assert_eq!(seen, (0..c.tokens.len()).collect::<Vec<_>>());
        for ch in &plan {
            let (t, _) = ch.stream(&c, 0);
            assert!(t.len() <= 8 + 1, "{ch:?}");
        }
        // Only the 20-token document is split; its middle pieces carry no separators.
        let split: Vec<&Piece> = plan
            .iter()
            .flat_map(|ch| &ch.pieces)
            .filter(|p| !(p.starts_doc && p.ends_doc))
            .collect();
        assert!(split.iter().all(|p| c.tokens[p.range.start] / 100 == 3));
        assert_eq!(split.iter().filter(|p| p.starts_doc).count(), 1);
        assert_eq!(split.iter().filter(|p| p.ends_doc).count(), 1);
    }
}
