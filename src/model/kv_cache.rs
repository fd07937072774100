//! Per-layer key/value cache for a batch of sequences, with per-row left padding.
//!
//! Rows of a batch may have prompts of different lengths. Instead of running them one by one,
//! they are left-padded to a common length: row `b` starts with `pad[b]` padding slots, which no
//! real query attends to and which do not count as positions (a row's first real token is at
//! RoPE position 0). So a row computed inside a padded batch gives the same result as the row
//! alone.
//!
//! Buffers are preallocated and grown by doubling, and new keys/values are written in place,
//! so that a decoding step copies only the new column instead of the whole cache.

use candle_core::{DType, Device, Tensor};

use super::ModelError;

/// Keys and values of every layer for `batch` rows, plus each row's left padding.
#[derive(Clone, Debug)]
pub struct KvCache {
    batch: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Slots filled (padding included); the same for every row.
    len: usize,
    capacity: usize,
    pad: Vec<usize>,
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub(crate) fn new(batch: usize, n_layers: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            batch,
            n_kv_heads,
            head_dim,
            len: 0,
            capacity: 0,
            pad: vec![0; batch],
            layers: vec![None; n_layers],
        }
    }

    /// Number of rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Number of slots filled in every row, padding included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Leading padding slots of each row.
    pub fn left_padding(&self) -> &[usize] {
        &self.pad
    }

    /// Number of real tokens of row `row` so far (its next RoPE position).
    pub fn row_len(&self, row: usize) -> usize {
        self.len.saturating_sub(self.pad[row])
    }

    /// Declares that the first `pad[b]` tokens of row `b` in the next forward call are
    /// padding. Only allowed while the cache is empty: padding is always on the left.
    pub fn set_left_padding(&mut self, pad: &[usize]) -> Result<(), ModelError> {
        if !self.is_empty() {
            return Err(ModelError::Input(
                "left padding can only be set on an empty cache".into(),
            ));
        }
        if pad.len() != self.batch {
            return Err(ModelError::Input(format!(
                "{} padding lengths for a batch of {}",
                pad.len(),
                self.batch
            )));
        }
        self.pad.copy_from_slice(pad);
        Ok(())
    }

    pub(crate) fn has_padding(&self) -> bool {
        self.pad.iter().any(|&p| p > 0)
    }

    /// Appends `k`, `v` (each `(batch, kv_heads, new, head_dim)`) to layer `layer` and returns
    /// views of everything cached for that layer.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let new = k.dim(2)?;
        let needed = self.len + new;
        let fits = match &self.layers[layer] {
            Some((kb, _)) => kb.dim(2)? >= needed,
            None => false,
        };
        if !fits {
            self.grow(layer, needed, k.device(), k.dtype())?;
        }
        let (kb, vb) = self.layers[layer].as_ref().expect("allocated above");
        kb.slice_set(k, 2, self.len)?;
        vb.slice_set(v, 2, self.len)?;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }

    /// Called once the last layer has appended: advances the filled length.
    pub(crate) fn commit(&mut self, new: usize) {
        self.len += new;
    }

    fn grow(
        &mut self,
        layer: usize,
        needed: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<(), ModelError> {
        // All layers share one capacity; a layer allocated before the capacity last changed is
        // enlarged lazily when its turn comes.
        if needed > self.capacity {
            self.capacity = needed.next_power_of_two().max(64);
        }
        let shape = (self.batch, self.n_kv_heads, self.capacity, self.head_dim);
        let fresh = || Tensor::zeros(shape, dtype, device);
        let (k, v) = (fresh()?, fresh()?);
        if let Some((ok, ov)) = &self.layers[layer] {
            k.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            v.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
        }
        self.layers[layer] = Some((k, v));
        Ok(())
    }

    /// Keeps only the rows listed in `rows`, in that order; a row may be listed several times
    /// (a prompt prefilled once and then sampled N ways is expanded with `[0; N]`).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<(), ModelError> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(ModelError::Input(format!(
                "row {bad} out of range for a batch of {}",
                self.batch
            )));
        }
        if rows.is_empty() {
            return Err(ModelError::Input("a cache needs at least one row".into()));
        }
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        for layer in self.layers.iter_mut() {
            if let Some((k, v)) = layer.take() {
                let idx = Tensor::new(ids.as_slice(), k.device())?;
                *layer = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        self.pad = rows.iter().map(|&r| self.pad[r]).collect();
        self.batch = rows.len();
        Ok(())
    }

    /// Forgets everything, keeping the batch size and the allocated buffers.
    pub fn clear(&mut self) {
        self.len = 0;
        self.pad.iter_mut().for_each(|p| *p = 0);
    }
}
