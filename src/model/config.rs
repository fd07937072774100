//! Hyper-parameters of a llama-family model, read from GGUF metadata.
//!
//! Everything the forward pass, the tokenizer and the fingerprint need is gathered here once, so
//! that the rest of the runtime never looks at raw metadata keys. Missing optional keys get
//! llama.cpp's defaults; missing required ones are a [`ModelError::Metadata`] naming the key.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Serialize;

use super::ModelError;

/// The architectures whose tensors and metadata follow llama's GGUF layout and whose RoPE is
/// the interleaved ("normal") variant. Others are refused rather than run wrongly.
const LLAMA_FAMILY: &[&str] = &["llama", "mistral", "smollm", "granite"];

/// Sizes and constants of a llama-family model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaConfig {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// `general.name`, or the file stem when absent.
    pub name: String,
    /// Width of the residual stream (`embedding_length`): the dimension of every key a
    /// datastore built from this model holds.
    pub hidden_size: usize,
    /// Width of the feed-forward layer's gate and up projections (`feed_forward_length`).
    pub intermediate_size: usize,
    /// Rows of the LM head: the number of logits per position (`vocab_size`, else the length
    /// of `tokenizer.ggml.tokens`).
    pub vocab_size: usize,
    /// Transformer blocks (`block_count`).
    pub n_layers: usize,
    /// Query heads (`attention.head_count`); `hidden_size` is a multiple of it.
    pub n_heads: usize,
    /// Key/value heads (`attention.head_count_kv`, default `n_heads`): fewer than `n_heads`
    /// for grouped-query attention, and what the KV cache stores per position.
    pub n_kv_heads: usize,
    /// Values per head, `hidden_size / n_heads`.
    pub head_dim: usize,
    /// Number of dimensions of each head that RoPE rotates (`rope.dimension_count`).
    pub rope_dim: usize,
    /// RoPE frequency base θ (`rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// ε added inside every RMSNorm (`attention.layer_norm_rms_epsilon`, default 1e-5).
    pub rms_norm_eps: f64,
    /// Longest sequence the model was trained for, in tokens (`context_length`, default 2048);
    /// a forward pass that would go past it fails with `ContextFull`.
    pub context_length: usize,
    /// `tokenizer.ggml.bos_token_id`, when the file names one.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`, when the file names one; generation stops on it, and
    /// datastore builds separate documents with it when the tokenizer names none.
    pub eos_token_id: Option<u32>,
    /// Whether the tokenizer metadata asks for a BOS token in front of every text.
    pub add_bos_token: bool,
}

pub(crate) fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value, ModelError> {
    md.get(key)
        .ok_or_else(|| ModelError::Metadata(format!("missing key {key}")))
}

pub(crate) fn get_u32(md: &HashMap<String, Value>, key: &str) -> Result<u32, ModelError> {
    let v = get(md, key)?;
    number(v).ok_or_else(|| ModelError::Metadata(format!("{key} is not an integer: {v:?}")))
}

fn opt_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(number)
}

pub(crate) fn number(v: &Value) -> Option<u32> {
    Some(match v {
        Value::U8(x) => u32::from(*x),
        Value::I8(x) => u32::try_from(*x).ok()?,
        Value::U16(x) => u32::from(*x),
        Value::I16(x) => u32::try_from(*x).ok()?,
        Value::U32(x) => *x,
        Value::I32(x) => u32::try_from(*x).ok()?,
        Value::U64(x) => u32::try_from(*x).ok()?,
        Value::I64(x) => u32::try_from(*x).ok()?,
        _ => return None,
    })
}

fn float(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(f64::from(*x)),
        Value::F64(x) => Some(*x),
        other => number(other).map(f64::from),
    }
}

impl LlamaConfig {
    /// Reads the configuration from GGUF metadata. `vocab_len` is the length of
    /// `tokenizer.ggml.tokens`, used when `<arch>.vocab_size` is absent.
    pub fn from_metadata(
        md: &HashMap<String, Value>,
        fallback_name: &str,
        vocab_len: usize,
    ) -> Result<Self, ModelError> {
        let architecture = get(md, "general.architecture")?
            .to_string()
            .map_err(|_| ModelError::Metadata("general.architecture is not a string".into()))?
            .clone();
        if !LLAMA_FAMILY.contains(&architecture.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "architecture {architecture:?}: only llama-family GGUF files ({}) are supported",
                LLAMA_FAMILY.join(", ")
            )));
        }
        let a = |k: &str| format!("{architecture}.{k}");
        let name = md
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| fallback_name.to_string());
        let hidden_size = get_u32(md, &a("embedding_length"))? as usize;
        let n_heads = get_u32(md, &a("attention.head_count"))? as usize;
        let n_kv_heads =
            opt_u32(md, &a("attention.head_count_kv")).unwrap_or(n_heads as u32) as usize;
        if n_heads == 0
            || n_kv_heads == 0
            || !hidden_size.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(ModelError::Metadata(format!(
                "inconsistent attention sizes: hidden {hidden_size}, heads {n_heads}, kv heads {n_kv_heads}"
            )));
        }
        let head_dim = hidden_size / n_heads;
        let rope_dim = opt_u32(md, &a("rope.dimension_count")).unwrap_or(head_dim as u32) as usize;
        if rope_dim != head_dim {
            return Err(ModelError::Unsupported(format!(
                "partial rotary embeddings (rope dimension {rope_dim} of head size {head_dim})"
            )));
        }
        let rope_base = md
            .get(&a("rope.freq_base"))
            .and_then(float)
            .unwrap_or(10_000.0) as f32;
        let rms_norm_eps = md
            .get(&a("attention.layer_norm_rms_epsilon"))
            .and_then(float)
            .unwrap_or(1e-5);
        let vocab_size = opt_u32(md, &a("vocab_size"))
            .map(|v| v as usize)
            .unwrap_or(vocab_len);
        Ok(Self {
            name,
            hidden_size,
            intermediate_size: get_u32(md, &a("feed_forward_length"))? as usize,
            vocab_size,
            n_layers: get_u32(md, &a("block_count"))? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_base,
            rms_norm_eps,
            context_length: opt_u32(md, &a("context_length")).unwrap_or(2048) as usize,
            bos_token_id: opt_u32(md, "tokenizer.ggml.bos_token_id"),
            eos_token_id: opt_u32(md, "tokenizer.ggml.eos_token_id"),
            add_bos_token: md
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            architecture,
        })
    }
}
