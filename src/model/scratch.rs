//! The forward pass's intermediate buffers. A [`KvCache`] owns one (a cache is what one
//! generation owns, so a decoding loop allocates nothing after its first steps) and the
//! forward pass in [`llama`](super::llama) fills it; here, so that neither of those two
//! modules has to import the other for it.
//!
//! [`KvCache`]: super::KvCache

use super::quant::Activations;

/// Intermediate buffers of the forward pass, kept in the [`KvCache`](super::KvCache) between
/// calls.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scratch {
    /// Residual stream, `rows × hidden`.
    pub(super) x: Vec<f32>,
    /// Normalised residual stream.
    pub(super) xn: Vec<f32>,
    /// Fused Q, K, V projections, `rows × (hidden + 2 · kv width)`.
    pub(super) qkv: Vec<f32>,
    /// Attention output, `rows × hidden`.
    pub(super) y: Vec<f32>,
    /// Output of a projection before it is added to the residual stream.
    pub(super) tmp: Vec<f32>,
    /// Unfused projections' outputs before they are laid side by side.
    pub(super) part: Vec<f32>,
    /// Fused gate and up projections, `rows × 2 · intermediate`.
    pub(super) gu: Vec<f32>,
    /// SiLU(gate) · up, `rows × intermediate`.
    pub(super) ff: Vec<f32>,
    /// Final-norm output of the rows that need it.
    pub(super) fin: Vec<f32>,
    /// Rows gathered for the LM head.
    pub(super) head_in: Vec<f32>,
    /// RoPE position of each row of the chunk.
    pub(super) pos: Vec<usize>,
    /// Attention scores, one run of slots per parallel task.
    pub(super) scores: Vec<f32>,
    pub(super) act: Activations,
}
