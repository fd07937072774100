//! The llama forward pass, written from candle's public pieces so that it can return what
//! `candle_transformers::models::quantized_llama::ModelWeights` keeps private: the hidden state
//! at any position (the retrieval key) and logits at chosen positions only, for a batch of rows
//! with per-row positions.
//!
//! It computes the same function as `ModelWeights` (checked by the tests), with changes that
//! only affect speed: the Q, K, V projections and the gate and up projections are each fused
//! into one matrix (one pass over the activations instead of three or two); grouped-query
//! attention is done by viewing the query heads of one KV head as extra query rows (no copy of
//! K and V per query head); the LM head and even the last MLP are skipped when the caller asks
//! only for keys; and with [`WeightFormat::Q8_0`] the matrices run on our own 8-bit kernel
//! ([`super::quant`]).

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::config::LlamaConfig;
use super::kv_cache::KvCache;
use super::quant::{Q4_1Linear, Q8Linear, BLOCK};
use super::{ModelError, WeightFormat};
use crate::fingerprint::KeyType;

/// A weight matrix `(out, in)` applied to the last dimension of its input.
enum Linear {
    Candle(QMatMul),
    Q8(Q8Linear),
    Q4_1(Q4_1Linear),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Linear::Candle(m) => Ok(m.forward(x)?),
            Linear::Q8(l) => run_quant(x, l.out_features(), |x, m, out| l.forward(x, m, out)),
            Linear::Q4_1(l) => run_quant(x, l.out_features(), |x, m, out| l.forward(x, m, out)),
        }
    }
}

/// Applies one of our quantised kernels to the rows of `x`.
fn run_quant(
    x: &Tensor,
    n: usize,
    f: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Tensor, ModelError> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let dims = x.dims();
    let k = *dims.last().expect("at least 1-D");
    let m = x.elem_count() / k;
    let mut out = vec![0f32; m * n];
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(ModelError::Input("only the CPU device is supported".into()));
        };
        let o = layout.start_offset();
        f(&cpu.as_slice::<f32>()?[o..o + m * k], m, &mut out);
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("at least 1-D") = n;
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
}

/// Several projections of the same input (Q, K, V; gate, up), fused into one matrix when
/// their storage allows it, else kept apart.
struct Proj {
    parts: Vec<Linear>,
    sizes: Vec<usize>,
}

impl Proj {
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        if self.parts.len() == 1 && self.sizes.len() > 1 {
            let y = self.parts[0].forward(x)?;
            let mut at = 0;
            let mut out = Vec::with_capacity(self.sizes.len());
            for &n in &self.sizes {
                out.push(y.narrow(candle_core::D::Minus1, at, n)?);
                at += n;
            }
            Ok(out)
        } else {
            self.parts.iter().map(|p| p.forward(x)).collect()
        }
    }
}

pub(crate) struct Layer {
    attn_norm: RmsNorm,
    qkv: Proj,
    wo: Linear,
    ffn_norm: RmsNorm,
    gate_up: Proj,
    down: Linear,
}

pub(crate) struct Weights {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// RoPE tables, `(context, head_dim / 2)`.
    cos: Tensor,
    sin: Tensor,
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
    pub logits: Positions,
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
    pub batch: usize,
    pub logit_positions: usize,
    pub key_positions: usize,
    pub vocab: usize,
    pub hidden: usize,
    pub logits: Vec<f32>,
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

fn convert(q: QTensor, format: WeightFormat) -> Result<Linear, ModelError> {
    let dev = Device::Cpu;
    let k = in_features(&q);
    Ok(match (format, q.dtype()) {
        (WeightFormat::F32, _) => Linear::Candle(QMatMul::Tensor(q.dequantize(&dev)?)),
        (WeightFormat::Native, GgmlDType::Q4_1) if k.is_multiple_of(BLOCK) => {
            let (n, k) = q.shape().dims2()?;
            Linear::Q4_1(Q4_1Linear::from_ggml(&q.data()?, n, k))
        }
        // Q8_0 stored: re-quantising its dequantised values gives back the same blocks.
        (WeightFormat::Q8_0, _) | (WeightFormat::Native, GgmlDType::Q8_0)
            if k.is_multiple_of(BLOCK) =>
        {
            let (n, k) = q.shape().dims2()?;
            let w: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            Linear::Q8(Q8Linear::from_f32(&w, n, k))
        }
        _ => Linear::Candle(QMatMul::from_qtensor(q)?),
    })
}

/// Fuses `parts` (same input size) into one matrix if their storage allows it.
fn fuse(parts: Vec<QTensor>, format: WeightFormat) -> Result<Proj, ModelError> {
    let dev = Device::Cpu;
    let sizes: Vec<usize> = parts.iter().map(|q| q.shape().dims()[0]).collect();
    let k = in_features(&parts[0]);
    let n: usize = sizes.iter().sum();
    let same_k = parts
        .iter()
        .all(|q| q.shape().rank() == 2 && in_features(q) == k);
    let one = match format {
        _ if !same_k => None,
        WeightFormat::F32 => {
            let ts = parts
                .iter()
                .map(|q| q.dequantize(&dev))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Linear::Candle(QMatMul::Tensor(Tensor::cat(&ts, 0)?)))
        }
        WeightFormat::Q8_0 if k.is_multiple_of(BLOCK) => {
            let mut w = Vec::with_capacity(n * k);
            for q in &parts {
                w.extend(q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?);
            }
            Some(Linear::Q8(Q8Linear::from_f32(&w, n, k)))
        }
        WeightFormat::Q8_0 => None,
        WeightFormat::Native => {
            // Quantised rows are whole blocks: concatenating the raw bytes stacks the rows.
            let dtype = parts[0].dtype();
            if parts.iter().all(|q| q.dtype() == dtype) && k.is_multiple_of(dtype.block_size()) {
                let mut bytes = Vec::new();
                for q in &parts {
                    bytes.extend_from_slice(&q.data()?);
                }
                let storage = QStorage::from_data(Cow::Owned(bytes), &dev, dtype)?;
                Some(convert(QTensor::new(storage, (n, k))?, format)?)
            } else {
                None
            }
        }
    };
    Ok(match one {
        Some(l) => Proj {
            parts: vec![l],
            sizes,
        },
        None => Proj {
            parts: parts
                .into_iter()
                .map(|q| convert(q, format))
                .collect::<Result<_, _>>()?,
            sizes,
        },
    })
}

fn rope_tables(cfg: &LlamaConfig) -> Result<(Tensor, Tensor), ModelError> {
    let half = cfg.head_dim / 2;
    let theta: Vec<f32> = (0..cfg.head_dim)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_base.powf(i as f32 / cfg.head_dim as f32))
        .collect();
    let theta = Tensor::from_vec(theta, (1, half), &Device::Cpu)?;
    let n = cfg.context_length.max(1);
    let pos = Tensor::arange(0u32, n as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let angles = pos.matmul(&theta)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl Weights {
    /// Reads and converts every tensor. `fetch(name)` returns the tensor as stored.
    pub(crate) fn load(
        cfg: &LlamaConfig,
        format: WeightFormat,
        mut fetch: impl FnMut(&str) -> Result<QTensor, ModelError>,
        has: impl Fn(&str) -> bool,
    ) -> Result<Self, ModelError> {
        let dev = Device::Cpu;
        let eps = cfg.rms_norm_eps;
        let embed_q = fetch("token_embd.weight")?;
        let embed = embed_q.dequantize(&dev)?;
        let lm_head = if has("output.weight") {
            convert(fetch("output.weight")?, format)?
        } else if format == WeightFormat::F32 {
            Linear::Candle(QMatMul::Tensor(embed.clone()))
        } else {
            convert(embed_q, format)?
        };
        let norm = RmsNorm::from_qtensor(fetch("output_norm.weight")?, eps)?;
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
                attn_norm: RmsNorm::from_qtensor(w("attn_norm")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(w("ffn_norm")?, eps)?,
            });
        }
        let (cos, sin) = rope_tables(cfg)?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        })
    }

    /// The token embedding matrix, `(vocab, hidden)`, in f32.
    pub(crate) fn embeddings(&self) -> &Tensor {
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
        let dev = Device::Cpu;
        let (h, hkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let n_rep = h / hkv;
        let padded = cache.has_padding();

        // RoPE tables for this chunk: shared when no row is padded, per row otherwise.
        let (cos, sin) = if padded {
            let mut pos = Vec::with_capacity(batch * seq);
            for b in 0..batch {
                let p = cache.left_padding()[b];
                pos.extend((start..total).map(|j| j.saturating_sub(p) as u32));
            }
            let idx = Tensor::from_vec(pos, batch * seq, &dev)?;
            let half = hd / 2;
            (
                self.cos
                    .index_select(&idx, 0)?
                    .reshape((batch, seq, half))?,
                self.sin
                    .index_select(&idx, 0)?
                    .reshape((batch, seq, half))?,
            )
        } else {
            (
                self.cos.narrow(0, start, seq)?,
                self.sin.narrow(0, start, seq)?,
            )
        };

        // Additive mask `(batch|1, 1, 1, seq, total)`: causal, padding slots hidden from real
        // queries; a padding query sees itself so that its softmax stays finite.
        let mask = if seq > 1 || padded {
            let rows = if padded { batch } else { 1 };
            let mut m = vec![0f32; rows * seq * total];
            for b in 0..rows {
                let p = cache.left_padding()[b];
                for q in 0..seq {
                    let i = start + q;
                    let row = &mut m[(b * seq + q) * total..(b * seq + q + 1) * total];
                    for (j, v) in row.iter_mut().enumerate() {
                        let visible = j == i || (j < i && j >= p);
                        if !visible {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            Some(Tensor::from_vec(m, (rows, 1, 1, seq, total), &dev)?)
        } else {
            None
        };

        let ids = Tensor::from_slice(tokens, (batch, seq), &dev)?;
        let mut x = candle_nn::Embedding::new(self.embed.clone(), cfg.hidden_size).forward(&ids)?;
        let skip_last_mlp = want.logits == Positions::None
            && (want.keys == Positions::None || want.key_type == KeyType::LastFfnInput);
        let mut key: Option<Tensor> = None;
        let scale = 1.0 / (hd as f64).sqrt();
        let n_layers = self.layers.len();
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let xn = layer.attn_norm.forward(&x)?;
            let qkv = layer.qkv.forward(&xn)?;
            let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
            let q = q
                .reshape((batch, seq, h, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = k
                .reshape((batch, seq, hkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v
                .reshape((batch, seq, hkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            let (k_all, v_all) = cache.append(li, &k, &v)?;
            // Query heads h·n_rep .. (h+1)·n_rep - 1 share KV head h: view them as one group.
            let q = q.reshape((batch, hkv, n_rep * seq, hd))?;
            let att = (q.matmul(&k_all.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att
                    .reshape((batch, hkv, n_rep, seq, total))?
                    .broadcast_add(m)?
                    .reshape((batch, hkv, n_rep * seq, total))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v_all.contiguous()?)?;
            let y = y.reshape((batch, h, seq, hd))?.transpose(1, 2)?.reshape((
                batch,
                seq,
                cfg.hidden_size,
            ))?;
            let x1 = (layer.wo.forward(&y)? + residual)?;
            let hn = layer.ffn_norm.forward(&x1)?;
            if li + 1 == n_layers {
                if want.key_type == KeyType::LastFfnInput {
                    key = Some(hn.clone());
                }
                if skip_last_mlp {
                    x = x1;
                    break;
                }
            }
            let gu = layer.gate_up.forward(&hn)?;
            let mlp = layer
                .down
                .forward(&(candle_nn::ops::silu(&gu[0])? * &gu[1])?)?;
            x = (mlp + x1)?;
        }
        cache.commit(seq);

        out.batch = batch;
        out.vocab = cfg.vocab_size;
        out.hidden = cfg.hidden_size;
        let need_final = want.logits != Positions::None
            || (want.keys != Positions::None && want.key_type == KeyType::FinalHidden);
        let final_h = if need_final {
            Some(self.norm.forward(&x)?)
        } else {
            None
        };
        let pick = |t: &Tensor, p: Positions| -> Result<Tensor, ModelError> {
            Ok(match p {
                Positions::Last => t.narrow(1, seq - 1, 1)?,
                _ => t.clone(),
            })
        };
        out.key_positions = positions(want.keys, seq);
        if want.keys != Positions::None {
            let k = match want.key_type {
                KeyType::LastFfnInput => key.as_ref().expect("captured at the last layer"),
                KeyType::FinalHidden => final_h.as_ref().expect("computed above"),
            };
            copy_into(&pick(k, want.keys)?, &mut out.keys)?;
        } else {
            out.keys.clear();
        }
        out.logit_positions = positions(want.logits, seq);
        if want.logits != Positions::None {
            let f = pick(final_h.as_ref().expect("computed above"), want.logits)?;
            let logits = self.lm_head.forward(&f.contiguous()?)?;
            copy_into(&logits, &mut out.logits)?;
        } else {
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

/// Copies an f32 tensor into `dst`, reusing its allocation.
fn copy_into(t: &Tensor, dst: &mut Vec<f32>) -> Result<(), ModelError> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let n = t.elem_count();
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Input("only the CPU device is supported".into()));
    };
    let src = cpu.as_slice::<f32>()?;
    let o = layout.start_offset();
    dst.clear();
    dst.extend_from_slice(&src[o..o + n]);
    Ok(())
}
