//! The store's metadata inside Milvus: one JSON record, kept by `meta_store`
//! (docs/architecture.md §3, "Milvus"). It plays the local manifest's part: identity
//! (fingerprint, key type, dimension through the fingerprint), the committed row count, the
//! segments with their provenance, and the state of a push that has not finished.
//!
//! Rows are written before the metadata that commits them, and searches only see primary keys
//! below the committed count, so a writer that dies between the two leaves rows nobody sees,
//! which the next writer deletes before it writes (the local store's garbage collection).

use serde::{Deserialize, Serialize};

use crate::datastore::{DatastoreError, KeyDtype, Provenance, SegmentInfo};
use crate::fingerprint::{KeyType, ModelFingerprint};

/// `Meta::format`.
pub const FORMAT: &str = "goodtriever-milvus";
/// `Meta::format_version`.
pub const FORMAT_VERSION: u32 = 1;

/// The field names of a store's collection.
pub mod fields {
    /// INT64 primary key: the row id the store's searches return.
    pub const PK: &str = "pk";
    /// INT32: the next-token id.
    pub const VALUE: &str = "value";
    /// INT32: the id of the segment the row belongs to.
    pub const SEGMENT: &str = "segment";
    /// FLOAT_VECTOR of the key dimension: the key.
    pub const KEY: &str = "key";
}

/// One segment: a batch of rows appended (or pushed) together, with where they came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetaSegment {
    /// Unique within the store; a pushed segment keeps its local id.
    pub id: u64,
    /// Rows in the segment.
    pub rows: u64,
    /// Primary key of its first row; its rows are `first_pk .. first_pk + rows`.
    pub first_pk: u64,
    /// Where its rows came from.
    pub provenance: Provenance,
}

/// A push that has not finished: the collection is refused for serving until it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushState {
    /// The local store being copied (its directory, for messages).
    pub source: String,
    /// Rows to copy in all.
    pub total_rows: u64,
    /// Rows copied and flushed, `0 .. rows_done`, so a rerun resumes there.
    pub rows_done: u64,
}

/// HNSW parameters the collection's index was built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaIndex {
    /// HNSW M.
    pub m: usize,
    /// HNSW efConstruction.
    pub ef_construction: usize,
}

/// What a Milvus-backed store is: its one metadata record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Incremented by every committed change, as the local manifest's.
    pub generation: u64,
    /// The model the keys come from.
    pub fingerprint: ModelFingerprint,
    /// Which hidden state the keys are.
    pub key_type: KeyType,
    /// How the keys were stored where they came from (Milvus holds them as f32).
    pub source_dtype: KeyDtype,
    /// Committed rows: primary keys `0 .. rows` are the store's live rows.
    pub rows: u64,
    /// The id the next appended segment gets.
    pub next_segment_id: u64,
    /// The segments in row order.
    pub segments: Vec<MetaSegment>,
    /// The collection's vector index.
    pub index: MetaIndex,
    /// Set while a push is copying rows in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushState>,
}

impl Meta {
    /// An empty store's metadata.
    pub fn new(
        fingerprint: ModelFingerprint,
        key_type: KeyType,
        source_dtype: KeyDtype,
        index: MetaIndex,
    ) -> Self {
        Meta {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            generation: 0,
            fingerprint,
            key_type,
            source_dtype,
            rows: 0,
            next_segment_id: 0,
            segments: Vec::new(),
            index,
            push: None,
        }
    }

    /// The JSON kept in the property.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the metadata serialises")
    }

    /// Parses and checks the record of the store at `location` (`None`: there is none): a
    /// missing, unparsable or inconsistent record is [`DatastoreError::BadManifest`] naming
    /// the store, as a bad manifest.json is for a directory.
    pub fn from_json(location: &str, raw: Option<&str>) -> Result<Self, DatastoreError> {
        let bad = |detail: String| DatastoreError::BadManifest {
            path: location.into(),
            detail,
        };
        let raw = raw.ok_or_else(|| {
            bad("the collection has no metadata record (its companion collection COLLECTION__gtmeta is missing or empty): it was not made by `goodtriever datastore push`".into())
        })?;
        let meta: Meta =
            serde_json::from_str(raw).map_err(|e| bad(format!("metadata record: {e}")))?;
        meta.check().map_err(bad)?;
        Ok(meta)
    }

    /// The checks the local manifest's parser makes, on this record.
    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, not {FORMAT:?}", self.format));
        }
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.fingerprint.hidden_size == 0 {
            return Err("hidden_size is 0".into());
        }
        let mut next_pk = 0u64;
        let mut seen = std::collections::HashSet::new();
        for s in &self.segments {
            if s.rows == 0 {
                return Err(format!("segment {} is empty", s.id));
            }
            if !seen.insert(s.id) || s.id >= self.next_segment_id {
                return Err(format!(
                    "segment id {} is repeated or not below next_segment_id {}",
                    s.id, self.next_segment_id
                ));
            }
            if s.first_pk != next_pk {
                return Err(format!(
                    "segment {} starts at row {} where row {next_pk} was expected",
                    s.id, s.first_pk
                ));
            }
            next_pk += s.rows;
        }
        match &self.push {
            None if next_pk != self.rows => Err(format!(
                "the segments hold {next_pk} rows but rows is {}",
                self.rows
            )),
            Some(p) if p.total_rows != next_pk || p.rows_done > p.total_rows => Err(format!(
                "the push state ({} of {} rows) does not match the segments' {next_pk} rows",
                p.rows_done, p.total_rows
            )),
            _ => Ok(()),
        }
    }

    /// The segments as [`crate::store::Store::segments`] reports them; `bytes` is what Milvus
    /// holds raw (f32 key, value, segment id and primary key per row), before its index.
    pub fn infos(&self) -> Vec<SegmentInfo> {
        let row_bytes = (self.fingerprint.hidden_size * 4 + 4 + 4 + 8) as u64;
        self.segments
            .iter()
            .map(|s| SegmentInfo {
                id: s.id,
                rows: s.rows as usize,
                first_id: Some(s.first_pk),
                retired: false,
                provenance: s.provenance.clone(),
                bytes: s.rows * row_bytes,
                // Milvus holds keys and values only; pushing a store drops its source text.
                sources: false,
            })
            .collect()
    }

    /// Refuses a record whose identity differs from `self`'s, as a local store's refresh
    /// refuses a manifest whose fingerprint or key type changed.
    pub fn check_same_identity(&self, other: &Meta) -> Result<(), DatastoreError> {
        if other.key_type != self.key_type {
            return Err(DatastoreError::KeyTypeMismatch {
                expected: self.key_type,
                got: other.key_type,
            });
        }
        if other.fingerprint != self.fingerprint {
            let why = self
                .fingerprint
                .check_compatible(&other.fingerprint)
                .err()
                .unwrap_or_else(|| "the fingerprint's recorded fields changed".into());
            return Err(DatastoreError::ModelMismatch(format!(
                "the store's metadata changed its model: {why}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        let fp = ModelFingerprint {
            model_id: "m".into(),
            architecture: None,
            hidden_size: 4,
            vocab_size: Some(10),
            tokenizer_digest: None,
            weight_digest: None,
        };
        let mut m = Meta::new(
            fp,
            KeyType::LastFfnInput,
            KeyDtype::F16,
            MetaIndex {
                m: 16,
                ef_construction: 100,
            },
        );
        for (id, rows) in [(0u64, 3u64), (2, 5)] {
            m.segments.push(MetaSegment {
                id,
                rows,
                first_pk: m.rows,
                provenance: Provenance::new("t"),
            });
            m.rows += rows;
        }
        m.next_segment_id = 3;
        m
    }

    #[test]
    fn round_trips_and_reports_segments() {
        let m = meta();
        let back = Meta::from_json("milvus://h:1/c", Some(&m.to_json())).unwrap();
        assert_eq!(back, m);
        let infos = back.infos();
        assert_eq!(infos.len(), 2);
        assert_eq!(
            (infos[1].id, infos[1].rows, infos[1].first_id),
            (2, 5, Some(3))
        );
        assert_eq!(infos[0].bytes, 3 * (4 * 4 + 16));
    }

    #[test]
    fn refuses_missing_and_inconsistent_records() {
        let err = Meta::from_json("milvus://h:1/c", None).unwrap_err();
        assert!(matches!(err, DatastoreError::BadManifest { .. }));
        assert!(err.to_string().contains("milvus://h:1/c") && err.to_string().contains("metadata"));
        type Change = fn(&mut Meta);
        let cases: [(&str, Change); 6] = [
            ("format", |m| m.format = "other".into()),
            ("format_version", |m| m.format_version = 9),
            ("hidden_size", |m| m.fingerprint.hidden_size = 0),
            ("rows is", |m| m.rows = 7),
            ("repeated", |m| m.segments[1].id = 0),
            ("starts at row", |m| m.segments[1].first_pk = 4),
        ];
        for (what, change) in cases {
            let mut m = meta();
            change(&mut m);
            let msg = Meta::from_json("c", Some(&m.to_json()))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(what), "{what}: {msg}");
        }
        assert!(Meta::from_json("c", Some("{not json")).is_err());
    }

    #[test]
    fn identity_changes_are_refused() {
        let m = meta();
        let mut other = m.clone();
        other.fingerprint.hidden_size = 8;
        assert!(matches!(
            m.check_same_identity(&other),
            Err(DatastoreError::ModelMismatch(_))
        ));
        let mut other = m.clone();
        other.key_type = KeyType::FinalHidden;
        assert!(matches!(
            m.check_same_identity(&other),
            Err(DatastoreError::KeyTypeMismatch { .. })
        ));
        let mut grown = m.clone();
        grown.rows += 1;
        assert!(m.check_same_identity(&grown).is_ok());
    }
}
