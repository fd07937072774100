//! Toxicity-controlled decoding for language models: Goodtriever's retrieval-augmented product
//! of experts over memory-mapped kNN datastores of the model's own hidden states.
//!
//! At every decoding step a model hands over the hidden state of its last position; the engine
//! ([`detox::Detoxifier`]) looks up its nearest neighbours in a toxic and a non-toxic datastore
//! ([`store::Store`], implemented by the memory-mapped [`datastore::Datastore`]), turns each set
//! into a next-token distribution and combines them with the model's own ([`rule`]), so the
//! model moves away from toxic continuations. Datastores grow while serving.
//!
//! Three ways in, one engine:
//! - the gRPC decoding hook ([`server`], over the transport-free step engine in [`steps`]);
//! - the datastore CLI (the `goodtriever` binary; stores built from text by [`ingest`]);
//! - this library, including a sampling loop on a real small model ([`generate`] over
//!   [`model`], with the engine as its per-step [`hook`]).
//!
//! docs/architecture.md in the repository is the map: the decoding rule (§1), the data flow of a
//! step (§2), the on-disk format (§3), search (§4), the model runtime (§5), errors (§6).
//!
//! # Example
//!
//! The engine on two stores, for one row, in both forms (the README's example):
//!
//! ```rust
//! use std::sync::Arc;
//!
//! use goodtriever::datastore::{Datastore, SearchParams};
//! use goodtriever::detox::{AdjustOptions, DetoxScratch, Detoxifier};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // Two tiny stores where the example expects them (a real run opens the demo's stores).
//! # let dir = tempfile::tempdir()?;
//! # std::env::set_current_dir(dir.path())?;
//! # for (name, seed) in [("toxic", 1u32), ("nontoxic", 2)] {
//! #     let fingerprint = goodtriever::fingerprint::ModelFingerprint {
//! #         model_id: "doc".into(), architecture: None, hidden_size: 8, vocab_size: Some(64),
//! #         tokenizer_digest: None, weight_digest: None,
//! #     };
//! #     let store = Datastore::create(format!("datastores/{name}").as_ref(), goodtriever::datastore::CreateOptions {
//! #         fingerprint, key_type: goodtriever::fingerprint::KeyType::LastFfnInput,
//! #         dtype: goodtriever::datastore::KeyDtype::F32,
//! #     })?;
//! #     let keys: Vec<f32> = (0..64 * 8u32).map(|i| (i.wrapping_mul(2654435761) ^ seed) as f32 / 4e9).collect();
//! #     let values: Vec<u32> = (0..64).map(|i| (i * 7 + seed) % 64).collect();
//! #     store.append(goodtriever::datastore::Keys::F32(&keys), &values, goodtriever::datastore::Provenance::new("doc"))?;
//! # }
//!     let toxic = Arc::new(Datastore::open("datastores/toxic".as_ref())?);
//!     let nontoxic = Arc::new(Datastore::open("datastores/nontoxic".as_ref())?);
//!     let detox = Detoxifier::goodtriever(toxic, nontoxic, AdjustOptions::default(), SearchParams::default(), None)?;
//!     let mut scratch = DetoxScratch::default(); // one per thread; reused every step
//!
//!     // The model's key hidden state and raw logits for one row (here: placeholders).
//!     let hidden = vec![0.0f32; detox.dim()];
//!     let logits = vec![0.0f32; detox.vocab_size()];
//!
//!     let mut bias = Vec::new();
//!     detox.adjust_sparse(&hidden, detox.defaults(), &mut scratch, &mut bias)?; // per-row (token, bias)
//!     let mut log_probs = vec![0.0f32; logits.len()];
//!     detox.adjust_dense(&hidden, &logits, detox.defaults(), &mut scratch, &mut log_probs)?;
//!     Ok(())
//! }
//! ```

#![warn(missing_docs)]
#[cfg(feature = "model")]
pub mod batch;
pub mod datastore;
pub mod detox;
#[cfg(feature = "model")]
pub mod eval;
pub mod explain;
pub mod fingerprint;
#[cfg(feature = "model")]
pub mod generate;
pub mod hook;
#[cfg(feature = "model")]
pub mod ingest;
pub mod limits;
#[cfg(feature = "milvus")]
pub mod milvus;
#[cfg(feature = "model")]
pub mod model;
pub mod npy;
pub mod reuse;
pub mod rule;
#[cfg(feature = "server")]
pub mod server;
pub mod simd;
pub mod steps;
pub mod store;
pub mod store_address;
