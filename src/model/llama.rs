//! The llama forward pass over candle's GGUF reader, written so that it can return what
//! `candle_transformers::models::quantized_llama::ModelWeights` keeps private: the hidden state
//! at any position (the retrieval key) and logits at chosen positions only, for a batch of rows
//! with per-row positions.
//!
//! It computes the same function as `ModelWeights` (checked by the tests), but on plain `f32`
//! buffers that live in the [`KvCache`] instead of a graph of candle tensors: one decoding
//! step of the 30-layer default model is ~400 small operations, and as tensors each allocated
//! its output and every matmul asked the OS for the CPU count (candle reads `/proc/cpuinfo` on
//! each call), which cost more than the arithmetic. Besides that: the Q, K, V projections and
//! the gate and up projections are each fused into one matrix (one pass over the activations);
//! grouped-query attention reads each cached key once for all the query heads that share it;
//! only causally visible slots are scored; the LM head and even the last MLP are skipped when
//! the caller asks only for keys. Matrices run on our quantised kernels (`model::quant`),
//! on `gemm` (candle's own f32 matmul) for f32 weights, and on candle's `QMatMul` for any other
//! GGUF type.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use rayon::prelude::*;

use super::config::LlamaConfig;
use super::kv_cache::{KvCache, LayerMut};
use super::quant::{Activations, Q4_1Linear, Q8Linear, BLOCK};
use super::{ModelError, WeightFormat};
use crate::fingerprint::KeyType;

/// A weight matrix `(out, in)` applied to rows of activations.
enum Linear {
    /// Dense weights, row-major `(n, k)`; shared with the embedding when the head is tied.
    F32 {
        w: Arc<[f32]>,
        n: usize,
        k: usize,
    },
    Q8(Q8Linear),
    Q4_1(Q4_1Linear),
    /// Any other GGUF type, through candle's kernels (copies in and out; not a hot path).
    Candle {
        m: QMatMul,
        n: usize,
        k: usize,
    },
}

impl Linear {
    fn out_features(&self) -> usize {
        match self {
            Linear::F32 { n, .. } | Linear::Candle { n, .. } => *n,
            Linear::Q8(l) => l.out_features(),
            Linear::Q4_1(l) => l.out_features(),
        }
    }

    fn in_features(&self) -> usize {
        match self {
            Linear::F32 { k, .. } | Linear::Candle { k, .. } => *k,
            Linear::Q8(l) => l.in_features(),
            Linear::Q4_1(l) => l.in_features(),
        }
    }

    /// `out` (`m × n`) = `x` (`m × k`) times the transposed weights; `act` is reused scratch.
    fn forward(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        act: &mut Activations,
    ) -> Result<(), ModelError> {
        let (n, k) = (self.out_features(), self.in_features());
        debug_assert!(x.len() == m * k && out.len() == m * n);
        match self {
            Linear::F32 { w, .. } => sgemm_nt(x, m, k, w, n, out),
            Linear::Q8(l) => {
                act.quantize(x, m, k);
                l.forward_quantized(act, out);
            }
            Linear::Q4_1(l) => {
                act.quantize(x, m, k);
                l.forward_quantized(act, out);
            }
            Linear::Candle { m: mm, .. } => {
                let y = mm.forward(&Tensor::from_slice(x, (m, k), &Device::Cpu)?)?;
                out.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}

/// `out = x · wᵀ` with `x` `(m, k)` and `w` `(n, k)`, both row-major.
fn sgemm_nt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert bounds every index: out (i, j) at i·n + j, x (i, t) at i·k + t,
    // wᵀ (t, j) = w[j][t] at j·k + t; `out` is a distinct exclusive borrow.
    unsafe {
        gemm_into(
            (m, n, k),
            (out.as_mut_ptr(), n),
            (x.as_ptr(), k),
            (w.as_ptr(), 1, k),
            1.0,
            parallelism,
        )
    }
}

/// Several projections of the same input (Q, K, V; gate, up), fused into one matrix when
/// their storage allows it, else kept apart and their outputs laid side by side.
struct Proj {
    parts: Vec<Linear>,
    width: usize,
}

impl Proj {
    fn forward(
        &self,
        x: &[f32],
        m: usize,
        out: &mut Vec<f32>,
        tmp: &mut Vec<f32>,
        act: &mut Activations,
    ) -> Result<(), ModelError> {
        out.resize(m * self.width, 0.0);
        if let [one] = self.parts.as_slice() {
            return one.forward(x, m, out, act);
        }
        let mut at = 0;
        for p in &self.parts {
            let n = p.out_features();
            tmp.resize(m * n, 0.0);
            p.forward(x, m, tmp, act)?;
            for (dst, src) in out.chunks_mut(self.width).zip(tmp.chunks(n)) {
                dst[at..at + n].copy_from_slice(src);
            }
            at += n;
        }
        Ok(())
    }
}

pub(crate) struct Layer {
    attn_norm: Vec<f32>,
    qkv: Proj,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Proj,
    down: Linear,
}

pub(crate) struct Weights {
    /// Token embeddings, `(vocab, hidden)` row-major.
    embed: Arc<[f32]>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// RoPE tables, `(context, head_dim / 2)` row-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Which positions of each row a forward call should return something for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Nothing (and the work that only it needs is skipped).
    None,
    /// The last position of each row (decoding).
    Last,
    /// Every position of the chunk (datastore building, scoring text).
    All,
}

/// What [`crate::model::Model::forward`] should return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outputs {
    /// Positions whose logits are returned; `None` skips the LM head, the largest matmul of a
    /// small model.
    pub logits: Positions,
    /// Positions whose hidden state (of `key_type`) is returned as a key.
    pub keys: Positions,
    /// The hidden state returned as the key.
    pub key_type: KeyType,
}

impl Outputs {
    /// Logits and keys of the last position: one decoding step.
    pub fn last(key_type: KeyType) -> Self {
        Self {
            logits: Positions::Last,
            keys: Positions::Last,
            key_type,
        }
    }

    /// Keys of every position and no logits: datastore building.
    pub fn keys_only(key_type: KeyType) -> Self {
        Self {
            logits: Positions::None,
            keys: Positions::All,
            key_type,
        }
    }
}

/// Results of a forward call, in reusable buffers.
///
/// `logits` holds `batch × logit_positions × vocab` values, `keys` holds
/// `batch × key_positions × hidden` values, both row-major with rows outermost.
#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
    /// Rows of the batch that was run.
    pub batch: usize,
    /// Logit positions per row: 0, 1 (`Last`) or the chunk length (`All`).
    pub logit_positions: usize,
    /// Key positions per row, likewise.
    pub key_positions: usize,
    /// Logits per position: the model's vocabulary size.
    pub vocab: usize,
    /// Values per key: the model's hidden size.
    pub hidden: usize,
    /// Raw logits (f32, before any softmax), `batch × logit_positions × vocab`.
    pub logits: Vec<f32>,
    /// Keys (f32), `batch × key_positions × hidden`.
    pub keys: Vec<f32>,
}

impl ForwardOutput {
    /// Logits of row `row` at its `pos`-th returned position.
    pub fn logits_at(&self, row: usize, pos: usize) -> &[f32] {
        let o = (row * self.logit_positions + pos) * self.vocab;
        &self.logits[o..o + self.vocab]
    }

    /// Key of row `row` at its `pos`-th returned position.
    pub fn key_at(&self, row: usize, pos: usize) -> &[f32] {
        let o = (row * self.key_positions + pos) * self.hidden;
        &self.keys[o..o + self.hidden]
    }
}

fn in_features(q: &QTensor) -> usize {
    *q.shape().dims().last().unwrap_or(&0)
}

fn dequantize(q: &QTensor) -> Result<Vec<f32>, ModelError> {
    Ok(q.dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

fn convert(q: QTensor, format: WeightFormat) -> Result<Linear, ModelError> {
    let (n, k) = q.shape().dims2()?;
    let dtype = q.dtype();
    Ok(match (format, dtype) {
        (WeightFormat::F32, _)
        | (WeightFormat::Native, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
            Linear::F32 {
                w: dequantize(&q)?.into(),
                n,
                k,
            }
        }
        (WeightFormat::Native, GgmlDType::Q4_1) if k.is_multiple_of(BLOCK) => {
            Linear::Q4_1(Q4_1Linear::from_ggml(&q.data()?, n, k))
        }
        // Q8_0 stored: re-quantising its dequantised values gives back the same blocks.
        (WeightFormat::Q8_0, _) | (WeightFormat::Native, GgmlDType::Q8_0)
            if k.is_multiple_of(BLOCK) =>
        {
            Linear::Q8(Q8Linear::from_f32(&dequantize(&q)?, n, k))
        }
        _ => Linear::Candle {
            m: QMatMul::from_qtensor(q)?,
            n,
            k,
        },
    })
}

/// Fuses `parts` (same input size) into one matrix if their storage allows it.
fn fuse(parts: Vec<QTensor>, format: WeightFormat) -> Result<Proj, ModelError> {
    let dev = Device::Cpu;
    let width: usize = parts.iter().map(|q| q.shape().dims()[0]).sum();
    let k = in_features(&parts[0]);
    let dtype = parts[0].dtype();
    let same = parts
        .iter()
        .all(|q| q.shape().rank() == 2 && in_features(q) == k && q.dtype() == dtype);
    let one = if !same {
        None
    } else if format == WeightFormat::Native
        && !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    {
        // Quantised rows are whole blocks: concatenating the raw bytes stacks the rows.
        if k.is_multiple_of(dtype.block_size()) {
            let mut bytes = Vec::new();
            for q in &parts {
                bytes.extend_from_slice(&q.data()?);
            }
            let storage = QStorage::from_data(Cow::Owned(bytes), &dev, dtype)?;
            Some(convert(QTensor::new(storage, (width, k))?, format)?)
        } else {
            None
        }
    } else if format == WeightFormat::Q8_0 && !k.is_multiple_of(BLOCK) {
        None
    } else {
        let mut w = Vec::with_capacity(width * k);
        for q in &parts {
            w.extend(dequantize(q)?);
        }
        Some(if format == WeightFormat::Q8_0 {
            Linear::Q8(Q8Linear::from_f32(&w, width, k))
        } else {
            Linear::F32 {
                w: w.into(),
                n: width,
                k,
            }
        })
    };
    let parts = match one {
        Some(l) => vec![l],
        None => parts
            .into_iter()
            .map(|q| convert(q, format))
            .collect::<Result<_, _>>()?,
    };
    Ok(Proj { parts, width })
}

/// `(cos, sin)` of every position's rotation angles, `(context, head_dim / 2)` row-major.
fn rope_tables(cfg: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let theta: Vec<f32> = (0..cfg.head_dim)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_base.powf(i as f32 / cfg.head_dim as f32))
        .collect();
    let n = cfg.context_length.max(1);
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &t in &theta {
            let a = p as f32 * t;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

impl Weights {
    /// Reads and converts every tensor. `fetch(name)` returns the tensor as stored.
    pub(crate) fn load(
        cfg: &LlamaConfig,
        format: WeightFormat,
        mut fetch: impl FnMut(&str) -> Result<QTensor, ModelError>,
        has: impl Fn(&str) -> bool,
    ) -> Result<Self, ModelError> {
        let embed_q = fetch("token_embd.weight")?;
        let embed: Arc<[f32]> = dequantize(&embed_q)?.into();
        let lm_head = if has("output.weight") {
            convert(fetch("output.weight")?, format)?
        } else if matches!(format, WeightFormat::F32)
            || matches!(
                embed_q.dtype(),
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            )
        {
            Linear::F32 {
                w: embed.clone(),
                n: cfg.vocab_size,
                k: cfg.hidden_size,
            }
        } else {
            convert(embed_q, format)?
        };
        let norm = dequantize(&fetch("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let mut w = |n: &str| fetch(&format!("blk.{i}.{n}.weight"));
            let qkv = fuse(vec![w("attn_q")?, w("attn_k")?, w("attn_v")?], format)?;
            let gate_up = fuse(vec![w("ffn_gate")?, w("ffn_up")?], format)?;
            layers.push(Layer {
                qkv,
                wo: convert(w("attn_output")?, format)?,
                gate_up,
                down: convert(w("ffn_down")?, format)?,
                attn_norm: dequantize(&w("attn_norm")?)?,
                ffn_norm: dequantize(&w("ffn_norm")?)?,
            });
        }
        let (cos, sin) = rope_tables(cfg);
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// The token embedding matrix, `(vocab, hidden)` row-major, in f32.
    pub(crate) fn embeddings(&self) -> &[f32] {
        &self.embed
    }

    /// Runs `tokens` (`batch × seq`, row-major) through the model, appending to `cache`, and
    /// writes the requested outputs into `out`.
    pub(crate) fn forward(
        &self,
        cfg: &LlamaConfig,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        want: Outputs,
        out: &mut ForwardOutput,
    ) -> Result<(), ModelError> {
        if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) {
            return Err(ModelError::Input(format!(
                "{} tokens do not form {batch} rows of equal length",
                tokens.len()
            )));
        }
        if cache.batch() != batch {
            return Err(ModelError::Input(format!(
                "cache holds {} rows, input has {batch}",
                cache.batch()
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} out of range (vocabulary {})",
                cfg.vocab_size
            )));
        }
        let seq = tokens.len() / batch;
        let start = cache.len();
        let total = start + seq;
        if total > cfg.context_length {
            return Err(ModelError::ContextFull {
                needed: total,
                context: cfg.context_length,
            });
        }
        let d = cfg.hidden_size;
        let rows = batch * seq;
        let eps = cfg.rms_norm_eps as f32;
        let dims = AttnDims {
            batch,
            seq,
            start,
            heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            capacity: 0,
        };
        cache.reserve(total);
        let dims = AttnDims {
            capacity: cache.capacity(),
            ..dims
        };
        {
            let (s, pad) = cache.scratch_and_padding();
            s.pos.clear();
            for &p in pad {
                s.pos.extend((start..total).map(|j| j.saturating_sub(p)));
            }
            s.x.clear();
            for &t in tokens {
                s.x.extend_from_slice(&self.embed[t as usize * d..][..d]);
            }
        }
        let skip_last_mlp = want.logits == Positions::None
            && (want.keys == Positions::None || want.key_type == KeyType::LastFfnInput);
        out.keys.clear();
        let n_layers = self.layers.len();
        for (li, layer) in self.layers.iter().enumerate() {
            let LayerMut {
                keys: kc,
                values: vc,
                scratch: s,
                pad,
            } = cache.layer_mut(li);
            rms_norm(&s.x, &layer.attn_norm, eps, &mut s.xn);
            layer
                .qkv
                .forward(&s.xn, rows, &mut s.qkv, &mut s.part, &mut s.act)?;
            rope_and_store(&mut s.qkv, &s.pos, &self.cos, &self.sin, dims, kc, vc);
            s.y.resize(rows * d, 0.0);
            attention(&s.qkv, kc, vc, pad, dims, &mut s.scores, &mut s.y);
            s.tmp.resize(rows * d, 0.0);
            layer.wo.forward(&s.y, rows, &mut s.tmp, &mut s.act)?;
            add_in_place(&mut s.x, &s.tmp);
            rms_norm(&s.x, &layer.ffn_norm, eps, &mut s.xn);
            if li + 1 == n_layers {
                if want.key_type == KeyType::LastFfnInput {
                    pick_rows(&s.xn, d, batch, seq, want.keys, &mut out.keys);
                }
                if skip_last_mlp {
                    break;
                }
            }
            let ff = cfg.intermediate_size;
            layer
                .gate_up
                .forward(&s.xn, rows, &mut s.gu, &mut s.part, &mut s.act)?;
            silu_mul(&s.gu, ff, &mut s.ff);
            layer.down.forward(&s.ff, rows, &mut s.tmp, &mut s.act)?;
            add_in_place(&mut s.x, &s.tmp);
        }
        cache.commit(seq);

        out.batch = batch;
        out.vocab = cfg.vocab_size;
        out.hidden = d;
        out.key_positions = positions(want.keys, seq);
        out.logit_positions = positions(want.logits, seq);
        let s = &mut cache.scratch;
        let final_keys = want.keys != Positions::None && want.key_type == KeyType::FinalHidden;
        // The final norm of every row only if some output needs every position.
        let final_rows =
            if want.logits == Positions::All || (final_keys && want.keys == Positions::All) {
                Positions::All
            } else {
                Positions::Last
            };
        if want.logits != Positions::None || final_keys {
            pick_rows(&s.x, d, batch, seq, final_rows, &mut s.head_in);
            rms_norm(&s.head_in, &self.norm, eps, &mut s.fin);
            let from = if final_rows == Positions::All { seq } else { 1 };
            if final_keys {
                pick_rows(&s.fin, d, batch, from, want.keys, &mut out.keys);
            }
            if want.logits != Positions::None {
                pick_rows(&s.fin, d, batch, from, want.logits, &mut s.head_in);
                let m = batch * out.logit_positions;
                out.logits.resize(m * cfg.vocab_size, 0.0);
                self.lm_head
                    .forward(&s.head_in, m, &mut out.logits, &mut s.act)?;
            }
        }
        if want.logits == Positions::None {
            out.logits.clear();
        }
        Ok(())
    }
}

fn positions(p: Positions, seq: usize) -> usize {
    match p {
        Positions::None => 0,
        Positions::Last => 1,
        Positions::All => seq,
    }
}

/// Copies into `dst` the rows of `src` (`batch × seq` rows of `width`) at positions `p`.
fn pick_rows(
    src: &[f32],
    width: usize,
    batch: usize,
    seq: usize,
    p: Positions,
    dst: &mut Vec<f32>,
) {
    dst.clear();
    match p {
        Positions::None => {}
        Positions::All => dst.extend_from_slice(&src[..batch * seq * width]),
        Positions::Last => {
            for b in 0..batch {
                dst.extend_from_slice(&src[((b + 1) * seq - 1) * width..][..width]);
            }
        }
    }
}

/// Rows at least this many are processed in parallel by the elementwise steps.
const PAR_ROWS: usize = 16;

/// `out = x / sqrt(mean(x²) + eps) · w` per row, as candle's `rms_norm`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let d = w.len();
    out.resize(x.len(), 0.0);
    let norm = |(xr, or): (&[f32], &mut [f32])| {
        let sum2: f32 = xr.iter().map(|v| v * v).sum();
        let m = (sum2 / d as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v / m * g;
        }
    };
    if x.len() / d >= PAR_ROWS {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(norm);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(norm);
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `out[r] = silu(gate[r]) · up[r]` for rows laid out `[gate | up]` of `2 · ff` values.
fn silu_mul(gu: &[f32], ff: usize, out: &mut Vec<f32>) {
    let rows = gu.len() / (2 * ff);
    out.resize(rows * ff, 0.0);
    let f = |(g, o): (&[f32], &mut [f32])| {
        let (gate, up) = g.split_at(ff);
        for ((o, &a), &b) in o.iter_mut().zip(gate).zip(up) {
            *o = a / (1.0 + (-a).exp()) * b;
        }
    };
    if rows >= PAR_ROWS {
        gu.par_chunks(2 * ff)
            .zip(out.par_chunks_mut(ff))
            .for_each(f);
    } else {
        gu.chunks(2 * ff).zip(out.chunks_mut(ff)).for_each(f);
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
struct AttnDims {
    batch: usize,
    seq: usize,
    /// Slots already cached before this chunk.
    start: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Slots allocated per (row, head) in the cache.
    capacity: usize,
}

impl AttnDims {
    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Offset of slot `slot` of (row `b`, KV head `g`) in a layer's cache buffer.
    fn slot(&self, b: usize, g: usize, slot: usize) -> usize {
        ((b * self.kv_heads + g) * self.capacity + slot) * self.head_dim
    }
}

/// Rotates the queries and keys of the chunk in place (interleaved pairs, as candle's
/// `rope_i` and llama.cpp's llama RoPE) and writes its keys and values into the cache.
fn rope_and_store(
    qkv: &mut [f32],
    pos: &[usize],
    cos: &[f32],
    sin: &[f32],
    dims: AttnDims,
    kc: &mut [f32],
    vc: &mut [f32],
) {
    let (hd, h, hkv) = (dims.head_dim, dims.heads, dims.kv_heads);
    let half = hd / 2;
    for (r, row) in qkv.chunks_mut(dims.qkv_width()).enumerate() {
        let (c, s) = (&cos[pos[r] * half..][..half], &sin[pos[r] * half..][..half]);
        let (qk, v) = row.split_at_mut((h + hkv) * hd);
        for head in qk.chunks_mut(hd) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c[i] - x1 * s[i];
                pair[1] = x0 * s[i] + x1 * c[i];
            }
        }
        let (b, t) = (r / dims.seq, dims.start + r % dims.seq);
        let k = &qk[h * hd..];
        for g in 0..hkv {
            let at = dims.slot(b, g, t);
            kc[at..at + hd].copy_from_slice(&k[g * hd..][..hd]);
            vc[at..at + hd].copy_from_slice(&v[g * hd..][..hd]);
        }
    }
}

/// Causal attention of the chunk's queries over the cache, into `y` (`rows × hidden`).
///
/// One task per (row, KV head): its query heads share the keys. A query at slot `i` of row `b`
/// sees slots `pad[b]..=i`; a padding query (`i < pad[b]`) sees only itself, so that its
/// softmax stays finite.
fn attention(
    qkv: &[f32],
    kc: &[f32],
    vc: &[f32],
    pad: &[usize],
    dims: AttnDims,
    scores: &mut Vec<f32>,
    y: &mut [f32],
) {
    let tasks = dims.batch * dims.kv_heads;
    let total = dims.start + dims.seq;
    // Long chunks (prefill, datastore building) score blocks of queries with gemm; short ones
    // (decoding) walk the keys directly.
    let blocked = dims.seq >= GEMM_MIN_QUERIES;
    let per_task = if blocked {
        QUERY_BLOCK.min(dims.seq) * total
    } else {
        total
    };
    scores.resize(tasks * per_task, 0.0);
    let y_ptr = SendPtr(y.as_mut_ptr());
    let run = |(task, sc): (usize, &mut [f32])| {
        let (b, g) = (task / dims.kv_heads, task % dims.kv_heads);
        let t = AttnTask {
            qkv,
            keys: &kc[dims.slot(b, g, 0)..],
            values: &vc[dims.slot(b, g, 0)..],
            pad: pad[b],
            dims,
            b,
            g,
            y: &y_ptr,
        };
        // SAFETY: task (b, g) writes only the outputs of its own row and query heads.
        unsafe {
            if blocked {
                t.blocks(sc)
            } else {
                t.direct(sc)
            }
        }
    };
    let work = dims.batch * dims.heads * dims.seq * total * dims.head_dim;
    if tasks > 1 && work >= 1 << 20 {
        scores.par_chunks_mut(per_task).enumerate().for_each(run);
    } else {
        scores.chunks_mut(per_task).enumerate().for_each(run);
    }
}

/// Chunks of at least this many queries use [`AttnTask::blocks`].
const GEMM_MIN_QUERIES: usize = 16;
/// Queries scored at once by [`AttnTask::blocks`] (bounds its scratch to this many rows).
const QUERY_BLOCK: usize = 64;

struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint elements from the tasks of one call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// The attention of one (row `b`, KV head `g`) pair of a chunk.
struct AttnTask<'a> {
    qkv: &'a [f32],
    /// The cached keys and values of (b, g), from slot 0.
    keys: &'a [f32],
    values: &'a [f32],
    /// Row `b`'s left padding.
    pad: usize,
    dims: AttnDims,
    b: usize,
    g: usize,
    /// The attention output, `rows × hidden`.
    y: &'a SendPtr,
}

impl AttnTask<'_> {
    /// Query heads sharing KV head `g`, and the offset of head `head` of row `r` in `y`.
    fn heads(&self) -> std::ops::Range<usize> {
        let n_rep = self.dims.heads / self.dims.kv_heads;
        self.g * n_rep..(self.g + 1) * n_rep
    }

    fn y_at(&self, r: usize, head: usize) -> usize {
        r * self.dims.heads * self.dims.head_dim + head * self.dims.head_dim
    }

    fn scale(&self) -> f32 {
        1.0 / (self.dims.head_dim as f32).sqrt()
    }

    /// The first slot a query at slot `i` sees.
    fn first_visible(&self, i: usize) -> usize {
        if i < self.pad {
            i
        } else {
            self.pad
        }
    }

    /// Walks the visible keys of each query (decoding); dispatches to an AVX2 build.
    ///
    /// # Safety
    /// No other task may write the outputs of row `b`'s query heads of group `g` meanwhile;
    /// `scores` holds at least `start + seq` values.
    unsafe fn direct(&self, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::active() >= crate::simd::Simd::Avx2 {
            // SAFETY: the CPU has AVX2 and FMA; the caller upholds the output contract.
            return unsafe { self.direct_avx2(scores) };
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.direct_body(scores) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn direct_avx2(&self, scores: &mut [f32]) {
        // SAFETY: forwarded from the caller.
        unsafe { self.direct_body(scores) }
    }

    #[inline(always)]
    unsafe fn direct_body(&self, scores: &mut [f32]) {
        let (hd, dims) = (self.dims.head_dim, self.dims);
        let (scale, width) = (self.scale(), dims.qkv_width());
        for s in 0..dims.seq {
            let i = dims.start + s;
            let first = self.first_visible(i);
            let r = self.b * dims.seq + s;
            for head in self.heads() {
                let q = &self.qkv[r * width + head * hd..][..hd];
                let sc = &mut scores[first..=i];
                let mut max = f32::NEG_INFINITY;
                for (j, v) in sc.iter_mut().enumerate() {
                    *v = dot(q, &self.keys[(first + j) * hd..][..hd]) * scale;
                    max = max.max(*v);
                }
                let mut sum = 0f32;
                for v in sc.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                // SAFETY: the caller guarantees this task alone writes these hd outputs.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(self.y.0.add(self.y_at(r, head)), hd) };
                out.fill(0.0);
                let inv = 1.0 / sum;
                for (j, &w) in sc.iter().enumerate() {
                    axpy(out, w * inv, &self.values[(first + j) * hd..][..hd]);
                }
            }
        }
    }

    /// For long chunks: per query head, blocks of queries are scored against the visible keys
    /// with one gemm, masked and normalised in place, and multiplied by the values with a
    /// second gemm.
    ///
    /// # Safety
    /// As [`AttnTask::direct`]; `scores` holds at least `QUERY_BLOCK.min(seq) · (start + seq)`
    /// values.
    unsafe fn blocks(&self, scores: &mut [f32]) {
        let (hd, dims) = (self.dims.head_dim, self.dims);
        let (scale, width, d) = (self.scale(), dims.qkv_width(), dims.heads * hd);
        for head in self.heads() {
            for s0 in (0..dims.seq).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(dims.seq - s0);
                // Keys past the block's last query are invisible to all of it.
                let cols = dims.start + s0 + rows;
                let r0 = self.b * dims.seq + s0;
                let q = &self.qkv[r0 * width + head * hd..];
                assert!(scores.len() >= rows * cols && self.keys.len() >= cols * hd);
                assert!(q.len() > (rows - 1) * width + hd - 1 && self.values.len() >= cols * hd);
                // SAFETY: the asserts bound every index: scores (t, j) at t·cols + j; q (t, e)
                // at t·width + e; keys (e, j) = K[j][e] at j·hd + e.
                unsafe {
                    gemm_into(
                        (rows, cols, hd),
                        (scores.as_mut_ptr(), cols),
                        (q.as_ptr(), width),
                        (self.keys.as_ptr(), 1, hd),
                        scale,
                        gemm::Parallelism::None,
                    )
                };
                for t in 0..rows {
                    let i = dims.start + s0 + t;
                    let first = self.first_visible(i);
                    let row = &mut scores[t * cols..(t + 1) * cols];
                    row[..first].fill(0.0);
                    row[i + 1..].fill(0.0);
                    let vis = &mut row[first..=i];
                    let max = vis.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for v in vis.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let inv = 1.0 / sum;
                    vis.iter_mut().for_each(|v| *v *= inv);
                }
                // SAFETY: y rows r0..r0 + rows, columns head·hd.. + hd belong to this task
                // alone (caller's contract); values (j, e) at j·hd + e with j < cols (asserted).
                unsafe {
                    gemm_into(
                        (rows, hd, cols),
                        (self.y.0.add(self.y_at(r0, head)), d),
                        (scores.as_ptr(), cols),
                        (self.values.as_ptr(), hd, 1),
                        1.0,
                        gemm::Parallelism::None,
                    )
                };
            }
        }
    }
}

/// `dst = scale · lhs · rhs` for an `m × n` result over `k`: `dst` and `lhs` row-major with the
/// given row strides, `rhs` element (t, j) at `t · rs + j · cs` (so a row-major `(n, k)` matrix
/// used transposed is `rs = 1, cs = k`).
///
/// # Safety
/// Every element those strides address must be inside its allocation, and `dst` must not
/// overlap the inputs or be written by anyone else meanwhile.
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_rs): (*const f32, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller; read_dst = false, so dst is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}
