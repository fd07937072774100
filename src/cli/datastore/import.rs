//! `datastore import`: keys and values dumped by any engine (.npy) as a new segment, creating
//! the store on first use. Everything that would not match an existing store is refused before
//! anything is written.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use goodtriever::datastore::{CreateOptions, Datastore, KeyDtype, Keys, Provenance};
use goodtriever::fingerprint::{KeyType, ModelFingerprint};
use goodtriever::npy;

use super::{open, print_segment, progress_bar};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Keys: .npy of float32 or float16, shape [N, D].
    #[arg(long)]
    pub keys: PathBuf,
    /// Values (next-token ids): .npy of int32, int64 or uint32, shape [N] or [N, 1].
    #[arg(long)]
    pub values: PathBuf,
    /// Which hidden state the keys are. Default for a new store: last_ffn_input; for an
    /// existing store it must match (default: the store's).
    #[arg(long)]
    pub key_type: Option<KeyType>,
    /// Model the keys come from. Default for a new store: "unknown"; for an existing store it
    /// must match (default: the store's).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Key storage type of a new store (f16 halves memory and scan time). An existing store
    /// keeps its dtype; giving a different one is an error.
    #[arg(long)]
    pub dtype: Option<KeyDtype>,
    /// Vocabulary size of the model (e.g. 49152), recorded in a new store so that this and
    /// every later import refuses token ids outside it. An existing store that records one
    /// checks against its own; giving a different one is an error.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Dataset label recorded in the segment's provenance, e.g. toxic or non_toxic.
    #[arg(long)]
    pub label: Option<String>,
    /// Free-form tag recorded in the segment's provenance (e.g. a drift domain).
    #[arg(long)]
    pub tag: Option<String>,
    /// Print the new segment as JSON.
    #[arg(long)]
    pub json: bool,
    /// The datastore directory.
    pub dir: PathBuf,
}

pub fn import(a: ImportArgs) -> Result<()> {
    let keys = npy::read_keys(&a.keys).context("cannot read keys")?;
    let values = npy::read_values(&a.values).context("cannot read values")?;
    if keys.rows != values.len() {
        bail!(
            "{} has {} rows but {} has {} values; they must match",
            a.keys.display(),
            keys.rows,
            a.values.display(),
            values.len()
        );
    }
    let ds = if a.dir.join("manifest.json").exists() {
        let ds = open(&a.dir)?;
        if let (Some(have), Some(given)) = (ds.fingerprint().vocab_size, a.vocab_size) {
            if have != given {
                bail!(
                    "{} records a vocabulary of {have} tokens, not {given} (--vocab-size); nothing was changed",
                    a.dir.display()
                );
            }
        }
        check_token_ids(
            &values,
            ds.fingerprint().vocab_size.or(a.vocab_size),
            &a.values,
        )?;
        if ds.dim() != keys.dim {
            bail!(
                "{} holds {}-dimensional keys but {} has D = {}; nothing was changed",
                a.dir.display(),
                ds.dim(),
                a.keys.display(),
                keys.dim
            );
        }
        if let Some(id) = &a.model_id {
            if *id != ds.fingerprint().model_id {
                bail!(
                    "{} was built for model {:?}, not {:?}; nothing was changed",
                    a.dir.display(),
                    ds.fingerprint().model_id,
                    id
                );
            }
        }
        if let Some(kt) = a.key_type {
            if kt != ds.key_type() {
                bail!(
                    "{} holds {} keys, not {}; nothing was changed",
                    a.dir.display(),
                    ds.key_type(),
                    kt
                );
            }
        }
        if let Some(dt) = a.dtype {
            if dt != ds.dtype() {
                bail!(
                    "{} stores {} keys; --dtype {} cannot change that; nothing was changed",
                    a.dir.display(),
                    ds.dtype(),
                    dt
                );
            }
        }
        ds
    } else {
        // Before the store exists: a refused import must leave nothing behind.
        check_token_ids(&values, a.vocab_size, &a.values)?;
        let mut fingerprint = ModelFingerprint::named(
            a.model_id.clone().unwrap_or_else(|| "unknown".into()),
            keys.dim,
        );
        fingerprint.vocab_size = a.vocab_size;
        let opts = CreateOptions {
            fingerprint,
            key_type: a.key_type.unwrap_or(KeyType::LastFfnInput),
            dtype: a.dtype.unwrap_or_default(),
        };
        Datastore::create(&a.dir, opts)
            .with_context(|| format!("cannot create datastore {}", a.dir.display()))?
    };
    let mut prov = Provenance::new(format!(
        "{} (values {})",
        a.keys.display(),
        a.values.display()
    ));
    prov.label = a.label;
    prov.tag = a.tag;
    let bar = progress_bar(keys.rows as u64, "indexing");
    let data = match &keys.data {
        npy::KeyArray::F32(v) => Keys::F32(v),
        npy::KeyArray::F16(v) => Keys::F16(v),
    };
    let seg = ds
        .append_with_progress(data, &values, prov, &|n| bar.set_position(n as u64))
        .with_context(|| format!("cannot append to {}", a.dir.display()))?;
    bar.finish_and_clear();
    print_segment(&seg, a.json, "added")
}

/// Refuses token ids at or beyond the vocabulary, naming the first one, when the vocabulary
/// size is known: such a row would make every later step whose neighbours include it fail.
fn check_token_ids(values: &[u32], vocab: Option<usize>, path: &std::path::Path) -> Result<()> {
    let Some(vocab) = vocab else {
        return Ok(());
    };
    if let Some(row) = values.iter().position(|&v| v as usize >= vocab) {
        bail!(
            "{} row {row} holds token id {}, outside the vocabulary of {vocab} tokens (ids below {vocab}); nothing was changed",
            path.display(),
            values[row]
        );
    }
    Ok(())
}
