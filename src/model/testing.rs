//! A tiny random llama written as a GGUF file, for tests that must not download anything.
//!
//! It has the real file layout (tensor names, metadata keys, a byte-level BPE vocabulary with
//! merges and control tokens), so loading, the tokenizer, the forward pass, datastore building
//! and generation can all be exercised end to end in milliseconds. Weights are drawn from a
//! seeded generator: the same spec always gives the same file.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::ModelError;

/// Shape and storage of the tiny model.
#[derive(Clone, Debug)]
pub struct TinySpec {
    /// Hidden size (the key dimension of stores built with the model); a multiple of
    /// `n_heads`.
    pub hidden: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; a divisor of `n_heads`, fewer to exercise grouped-query attention.
    pub n_kv_heads: usize,
    /// Context length in tokens, written as `llama.context_length`.
    pub context: usize,
    /// RoPE frequency base, written as `llama.rope.freq_base`.
    pub rope_base: f32,
    /// Storage type of the projection matrices (norms stay F32).
    pub matrix_dtype: GgmlDType,
    /// Storage type of the token embedding.
    pub embedding_dtype: GgmlDType,
    /// Whether the LM head is the token embedding (no `output.weight`).
    pub tied: bool,
    /// Seed of the weight generator: the same seed and shape give the same bytes.
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            context: 256,
            rope_base: 10_000.0,
            matrix_dtype: GgmlDType::F32,
            embedding_dtype: GgmlDType::F32,
            tied: true,
            seed: 42,
        }
    }
}

/// Control tokens at the front of the tiny vocabulary: ids 0, 1, 2.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The tiny model's chat template: ChatML, as SmolLM2-Instruct writes conversations.
pub const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Merges of the tiny vocabulary, in rank order (byte-level symbols, `Ġ` is a space).
pub const TINY_MERGES: [(&str, &str); 8] = [
    ("h", "e"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
];

/// GPT-2's byte → printable character table used by byte-level BPE.
pub fn byte_to_char(b: u8) -> char {
    let printable =
        |x: u32| (33..=126).contains(&x) || (161..=172).contains(&x) || (174..=255).contains(&x);
    if printable(u32::from(b)) {
        return char::from(b);
    }
    let n = (0..u32::from(b)).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("valid code point")
}

/// The tiny vocabulary: control tokens, the 256 byte symbols, then one token per merge.
pub fn tiny_vocab() -> Vec<String> {
    let mut v: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    v.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
    v.extend(TINY_MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    v
}

struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        // xorshift64*, then a uniform in [-1, 1).
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn matrix(&mut self, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
        (0..rows * cols).map(|_| self.next_f32() * scale).collect()
    }
}

/// Writes the tiny model described by `spec` to `path`.
pub fn write_tiny_llama(path: &Path, spec: &TinySpec) -> Result<(), ModelError> {
    let vocab = tiny_vocab();
    let v = vocab.len();
    let (d, f) = (spec.hidden, spec.intermediate);
    let hd = d / spec.n_heads;
    let kv = spec.n_kv_heads * hd;
    let mut rng = Rng(spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let dev = Device::Cpu;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String,
                   rows: usize,
                   cols: usize,
                   data: Vec<f32>,
                   dtype: GgmlDType|
     -> Result<(), ModelError> {
        let t = if rows == 1 {
            Tensor::from_vec(data, cols, &dev)?
        } else {
            Tensor::from_vec(data, (rows, cols), &dev)?
        };
        tensors.push((name, QTensor::quantize(&t, dtype)?));
        Ok(())
    };
    let norm = |rng: &mut Rng, n: usize| {
        (0..n)
            .map(|_| 1.0 + 0.2 * rng.next_f32())
            .collect::<Vec<_>>()
    };
    add(
        "token_embd.weight".into(),
        v,
        d,
        rng.matrix(v, d, 1.0),
        spec.embedding_dtype,
    )?;
    add(
        "output_norm.weight".into(),
        1,
        d,
        norm(&mut rng, d),
        GgmlDType::F32,
    )?;
    if !spec.tied {
        add(
            "output.weight".into(),
            v,
            d,
            rng.matrix(v, d, 0.5),
            spec.matrix_dtype,
        )?;
    }
    let s_in = 1.0 / (d as f32).sqrt() * 1.7;
    let s_ff = 1.0 / (f as f32).sqrt() * 1.7;
    for i in 0..spec.n_layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        let m = spec.matrix_dtype;
        add(p("attn_norm"), 1, d, norm(&mut rng, d), GgmlDType::F32)?;
        add(p("attn_q"), d, d, rng.matrix(d, d, s_in), m)?;
        add(p("attn_k"), kv, d, rng.matrix(kv, d, s_in), m)?;
        add(p("attn_v"), kv, d, rng.matrix(kv, d, s_in), m)?;
        add(p("attn_output"), d, d, rng.matrix(d, d, s_in), m)?;
        add(p("ffn_norm"), 1, d, norm(&mut rng, d), GgmlDType::F32)?;
        add(p("ffn_gate"), f, d, rng.matrix(f, d, s_in), m)?;
        add(p("ffn_up"), f, d, rng.matrix(f, d, s_in), m)?;
        add(p("ffn_down"), d, f, rng.matrix(d, f, s_ff), m)?;
    }

    let u = |x: usize| Value::U32(x as u32);
    let s = |x: &str| Value::String(x.to_string());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("tiny-test-llama")),
        ("llama.block_count", u(spec.n_layers)),
        ("llama.context_length", u(spec.context)),
        ("llama.embedding_length", u(d)),
        ("llama.feed_forward_length", u(f)),
        ("llama.attention.head_count", u(spec.n_heads)),
        ("llama.attention.head_count_kv", u(spec.n_kv_heads)),
        ("llama.rope.freq_base", Value::F32(spec.rope_base)),
        ("llama.rope.dimension_count", u(hd)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", u(v)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vocab.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(
                (0..v)
                    .map(|i| Value::I32(if i < TINY_SPECIALS.len() { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                TINY_MERGES
                    .iter()
                    .map(|(a, b)| s(&format!("{a} {b}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (super::CHAT_TEMPLATE_KEY, s(TINY_CHAT_TEMPLATE)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file =
        std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })?,
        );
    gguf_file::write(&mut file, &md, &ts)?;
    use std::io::Write;
    file.flush().map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}
