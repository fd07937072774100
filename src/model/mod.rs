//! The language-model runtime: a llama-family GGUF model on candle that returns, besides the
//! logits, the hidden states that Goodtriever uses as retrieval keys.
//!
//! - [`Model::load`] reads a GGUF file, converts the weights to the chosen [`WeightFormat`]
//!   (Q4_1 and Q8_0 weights as stored run on our AVX2 kernels, the fastest way to decode one
//!   token at a time; dequantised to F32 they run on gemm, the fastest way to extract keys in
//!   large batches) and builds the [`Tokenizer`] from the file's own metadata.
//! - [`Model::forward`] runs a batch of rows with a [`KvCache`], per-row left padding, and
//!   returns logits and/or keys at the positions asked for.
//! - [`Model::encode_pairs`] turns a token stream into (key, next token) pairs for building a
//!   datastore, with sliding windows, batched, streaming.
//! - [`fetch`] downloads the default model into the cache directory; [`resolve_model_path`]
//!   finds it and otherwise says what to run.
//!
//! The forward pass is our own (see [`llama`]) and is checked against candle-transformers'
//! `quantized_llama::ModelWeights` in the tests.

pub mod config;
mod extract;
pub mod fetch;
pub mod kv_cache;
pub mod llama;
mod quant;
mod scratch;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use config::LlamaConfig;
pub use extract::Windows;
pub use fetch::{default_model_path, goodtriever_home, resolve_model_path, FetchError};
pub use kv_cache::KvCache;
pub use llama::{ForwardOutput, Outputs, Positions};
pub use tokenizer::{PlainEncoding, Tokenizer};

use crate::fingerprint::{KeyType, ModelFingerprint};

/// Errors of the model runtime.
///
/// Loading errors name the file; input errors (`Input`, `ContextFull`) are the caller's to fix
/// and are raised before any computation, so a cache is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file does not exist (most often: the default model was never fetched).
    #[error("no model file at {path}; run `goodtriever model fetch` to download the default model, or pass --model PATH to a GGUF llama-family file")]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The model file exists but could not be opened or read (or written, for a test model).
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not GGUF, or a tensor in it cannot be decoded.
    #[error("{path} is not a readable GGUF file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the GGUF reader said.
        message: String,
    },
    /// A required metadata key is missing or has the wrong type, or the sizes contradict
    /// each other.
    #[error("GGUF metadata: {0}")]
    Metadata(String),
    /// The file is a valid GGUF model this runtime does not run (another architecture,
    /// partial RoPE, another tokenizer type).
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The tokenizer could not be built from the metadata, or failed to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The caller's arguments do not fit the model (shapes, batch, window, weight format name).
    #[error("invalid input: {0}")]
    Input(String),
    /// A forward pass would put more positions in the cache than the model's context length.
    #[error("context full: {needed} positions needed, the model has {context}")]
    ContextFull {
        /// Positions the cache would hold after the pass.
        needed: usize,
        /// The model's `context_length`.
        context: usize,
    },
    /// A candle tensor operation failed (loading or dequantising weights).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// How the weights are held in memory after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// As stored in the file (Q4_1 and Q8_0 on our kernels): the fast decoding path.
    Native,
    /// Re-quantised to Q8_0, for files whose own type has no fast kernel here.
    Q8_0,
    /// Dequantised to f32 (gemm matmuls): the fast batched extraction path.
    F32,
}

impl WeightFormat {
    /// Every format, for listing the choices in help and error messages.
    pub const ALL: [WeightFormat; 3] =
        [WeightFormat::Native, WeightFormat::Q8_0, WeightFormat::F32];

    /// The name on the command line and in reports (`native`, `q8_0`, `f32`), the inverse of
    /// `FromStr` (which ignores case).
    pub fn as_str(self) -> &'static str {
        match self {
            WeightFormat::Native => "native",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::F32 => "f32",
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WeightFormat {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WeightFormat::ALL
            .into_iter()
            .find(|w| w.as_str() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "unknown weight format {s:?}: expected native, q8_0 or f32"
                ))
            })
    }
}

/// What a GGUF file holds, for `goodtriever model info`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The GGUF file, as given to [`Model::load`].
    pub path: PathBuf,
    /// Its size, in bytes.
    pub file_size: u64,
    /// The hyper-parameters read from its metadata.
    pub config: LlamaConfig,
    /// Number of tensors of each storage type, e.g. `{"Q4_1": 210, "F32": 61, "Q8_0": 1}`.
    pub tensor_types: BTreeMap<String, usize>,
    /// Scalars over all tensors (embeddings and norms included), whatever their storage type.
    pub parameters: usize,
    /// The identity a datastore built with this model records.
    pub fingerprint: ModelFingerprint,
}

/// A loaded model: weights, configuration, tokenizer and fingerprint. `Send + Sync`; every
/// method takes `&self`, so one instance can serve several threads (each with its own cache).
pub struct Model {
    config: LlamaConfig,
    weights: llama::Weights,
    tokenizer: Tokenizer,
    fingerprint: ModelFingerprint,
    format: WeightFormat,
    info: ModelInfo,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// The GGUF metadata key of the chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// The tensor whose raw bytes identify the weights in the fingerprint.
const DIGEST_TENSOR: &str = "token_embd.weight";

fn open_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>, u64), ModelError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            ModelError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let size = file
        .metadata()
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok((content, reader, size))
}

fn tensor_type_name(t: candle_core::quantized::GgmlDType) -> String {
    format!("{t:?}")
}

impl Model {
    /// Loads a GGUF llama-family model and converts its weights to `format`.
    pub fn load(path: &Path, format: WeightFormat) -> Result<Self, ModelError> {
        let (content, mut reader, file_size) = open_gguf(path)?;
        let md = &content.metadata;
        let tokenizer = Tokenizer::from_gguf_metadata(md)?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let config = LlamaConfig::from_metadata(md, &stem, tokenizer.vocab_size())?;
        let chat_template = md
            .get(CHAT_TEMPLATE_KEY)
            .and_then(|v| v.to_string().ok())
            .filter(|t| !t.trim().is_empty())
            .cloned();
        if config.vocab_size != tokenizer.vocab_size() {
            return Err(ModelError::Metadata(format!(
                "vocabulary size {} but {} tokens",
                config.vocab_size,
                tokenizer.vocab_size()
            )));
        }
        let fmt_err = |e: candle_core::Error| ModelError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut weight_digest = None;
        let weights = llama::Weights::load(
            &config,
            format,
            |name| {
                let q = content
                    .tensor(&mut reader, name, &candle_core::Device::Cpu)
                    .map_err(fmt_err)?;
                if name == DIGEST_TENSOR {
                    weight_digest = Some(tokenizer::hex(&Sha256::digest(q.data()?.as_ref())));
                }
                Ok(q)
            },
            |name| content.tensor_infos.contains_key(name),
        )?;
        let mut tensor_types = BTreeMap::new();
        let mut parameters = 0;
        for info in content.tensor_infos.values() {
            *tensor_types
                .entry(tensor_type_name(info.ggml_dtype))
                .or_insert(0) += 1;
            parameters += info.shape.elem_count();
        }
        let fingerprint = ModelFingerprint {
            model_id: config.name.clone(),
            architecture: Some(config.architecture.clone()),
            hidden_size: config.hidden_size,
            vocab_size: Some(config.vocab_size),
            tokenizer_digest: Some(tokenizer.vocab_digest().to_string()),
            weight_digest,
        };
        let info = ModelInfo {
            path: path.to_path_buf(),
            file_size,
            config: config.clone(),
            tensor_types,
            parameters,
            fingerprint: fingerprint.clone(),
        };
        Ok(Self {
            config,
            weights,
            tokenizer,
            fingerprint,
            format,
            info,
            chat_template,
        })
    }

    /// The Jinja chat template of the file's `tokenizer.chat_template` metadata (how an
    /// instruct model's conversations are written as text), when it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The hyper-parameters: sizes for buffers (`hidden_size`, `vocab_size`) and the context
    /// limit.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Identity of the model for datastore manifests: name, architecture, sizes, and SHA-256
    /// digests of the vocabulary and of the token-embedding tensor's bytes as stored in the
    /// file (so it does not depend on the [`WeightFormat`] chosen at load time).
    pub fn fingerprint(&self) -> ModelFingerprint {
        self.fingerprint.clone()
    }

    /// The tokenizer built from the file's own vocabulary and merges, so text and token ids
    /// always agree with the weights.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// How the weights were converted at load time, which decides the fast path (decoding
    /// or batched extraction).
    pub fn weight_format(&self) -> WeightFormat {
        self.format
    }

    /// File-level facts: size, tensor storage types, parameter count.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The token embedding matrix `(vocab, hidden)`, row-major, in f32 (the LM head when tied).
    pub fn embeddings(&self) -> &[f32] {
        self.weights.embeddings()
    }

    /// An empty cache for `batch` rows.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(
            batch,
            self.config.n_layers,
            self.config.n_kv_heads,
            self.config.head_dim,
        )
    }

    /// Runs `tokens` (`batch` rows of equal length, row-major) after what `cache` holds and
    /// returns the outputs asked for. Row `b`'s first `cache.left_padding()[b]` slots are
    /// padding (see [`KvCache::set_left_padding`]).
    pub fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        outputs: Outputs,
    ) -> Result<ForwardOutput, ModelError> {
        let mut out = ForwardOutput::default();
        self.forward_into(tokens, batch, cache, outputs, &mut out)?;
        Ok(out)
    }

    /// [`Model::forward`] writing into `out`, whose buffers are reused (decoding loops).
    pub fn forward_into(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        outputs: Outputs,
        out: &mut ForwardOutput,
    ) -> Result<(), ModelError> {
        // On a pool thread, the many small parallel loops of one step hand work to the other
        // workers directly; from an outside thread each of them would be a round trip through
        // the pool's queue and a sleep/wake of the caller (hundreds per decoding step).
        rayon::scope(|_| {
            self.weights
                .forward(&self.config, tokens, batch, cache, outputs, out)
        })
    }

    /// Left-pads `rows` to a common length. Returns the flat tokens and each row's padding,
    /// ready for [`KvCache::set_left_padding`] and [`Model::forward`].
    pub fn pad_left(&self, rows: &[&[u32]]) -> (Vec<u32>, Vec<usize>) {
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let pad_id = self.config.eos_token_id.unwrap_or(0);
        let mut tokens = Vec::with_capacity(rows.len() * len);
        let mut pad = Vec::with_capacity(rows.len());
        for r in rows {
            let p = len - r.len();
            tokens.extend(std::iter::repeat_n(pad_id, p));
            tokens.extend_from_slice(r);
            pad.push(p);
        }
        (tokens, pad)
    }

    /// Natural-log probability of each token of `tokens` given the ones before it (the first
    /// token has none and is skipped): `tokens.len() - 1` values. For checking weight formats
    /// and comparing with other engines.
    pub fn token_logprobs(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        if tokens.len() < 2 {
            return Ok(Vec::new());
        }
        let mut cache = self.new_cache(1);
        let out = self.forward(
            &tokens[..tokens.len() - 1],
            1,
            &mut cache,
            Outputs {
                logits: Positions::All,
                keys: Positions::None,
                key_type: KeyType::FinalHidden,
            },
        )?;
        Ok((0..tokens.len() - 1)
            .map(|i| {
                let l = out.logits_at(0, i);
                let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + l.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
                l[tokens[i + 1] as usize] - lse
            })
            .collect())
    }

    /// Reads only the header of a GGUF file: configuration and tensor types, without loading
    /// or converting weights (the weight digest is still computed from its one tensor).
    pub fn inspect(path: &Path) -> Result<ModelInfo, ModelError> {
        // Loading natively converts nothing; the tensors are read once and dropped.
        Ok(Self::load(path, WeightFormat::Native)?.info)
    }
}

const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Model>();
    is_send_sync::<KeyType>();
};
