//! Per-layer key/value cache for a batch of sequences, with per-row left padding, plus the
//! scratch buffers of the forward pass that runs over it.
//!
//! Rows of a batch may have prompts of different lengths. Instead of running them one by one,
//! they are left-padded to a common length: row `b` starts with `pad[b]` padding slots, which no
//! real query attends to and which do not count as positions (a row's first real token is at
//! RoPE position 0). So a row computed inside a padded batch gives the same result as the row
//! alone.
//!
//! Keys and values are plain `f32` buffers laid out `(row, kv head, slot, head dim)`, so that the
//! attention of one (row, head) reads one contiguous run of slots. Capacity grows by doubling
//! and new slots are written in place: a decoding step copies only the new column. The forward
//! pass's intermediate buffers live here too, because a cache is what one generation owns: a
//! decoding loop allocates nothing after its first steps.

use super::scratch::Scratch;
use super::ModelError;

/// One layer's view of a [`KvCache`], see [`KvCache::layer_mut`].
pub(crate) struct LayerMut<'a> {
    pub keys: &'a mut [f32],
    pub values: &'a mut [f32],
    pub scratch: &'a mut Scratch,
    pub pad: &'a [usize],
}

/// Keys and values of every layer for `batch` rows, plus each row's left padding.
#[derive(Clone, Debug)]
pub struct KvCache {
    batch: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Slots filled (padding included); the same for every row.
    len: usize,
    /// Slots allocated per (row, head) in every layer.
    capacity: usize,
    pad: Vec<usize>,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pub(crate) scratch: Scratch,
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
            keys: vec![Vec::new(); n_layers],
            values: vec![Vec::new(); n_layers],
            scratch: Scratch::default(),
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

    /// Whether nothing has been run into the cache yet (a fresh or cleared cache).
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

    /// Slots allocated per (row, head); offsets into a layer's buffers use it as stride.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes room for `total` slots in every layer, keeping what is cached.
    pub(crate) fn reserve(&mut self, total: usize) {
        if total <= self.capacity {
            return;
        }
        let new_cap = total.next_power_of_two().max(64);
        let (old_cap, hd, len) = (self.capacity, self.head_dim, self.len);
        let runs = self.batch * self.n_kv_heads;
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut fresh = vec![0f32; runs * new_cap * hd];
            for r in 0..runs {
                fresh[r * new_cap * hd..][..len * hd]
                    .copy_from_slice(&buf[r * old_cap * hd..][..len * hd]);
            }
            *buf = fresh;
        }
        self.capacity = new_cap;
    }

    /// The scratch buffers and each row's left padding, borrowed together.
    pub(crate) fn scratch_and_padding(&mut self) -> (&mut Scratch, &[usize]) {
        (&mut self.scratch, &self.pad)
    }

    /// The keys and values of layer `layer`, `(batch, kv heads, capacity, head dim)`, the
    /// scratch buffers and each row's left padding, borrowed together for one layer of the
    /// forward pass.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> LayerMut<'_> {
        LayerMut {
            keys: &mut self.keys[layer],
            values: &mut self.values[layer],
            scratch: &mut self.scratch,
            pad: &self.pad,
        }
    }

    /// Called once the last layer has written its slots: advances the filled length.
    pub(crate) fn commit(&mut self, new: usize) {
        self.len += new;
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
        let row_size = self.n_kv_heads * self.capacity * self.head_dim;
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            if buf.is_empty() {
                continue;
            }
            let mut fresh = Vec::with_capacity(rows.len() * row_size);
            for &r in rows {
                fresh.extend_from_slice(&buf[r * row_size..(r + 1) * row_size]);
            }
            *buf = fresh;
        }
        self.pad = rows.iter().map(|&r| self.pad[r]).collect();
        self.batch = rows.len();
        Ok(())
    }

    /// Appends the rows of `other` after this cache's rows, so that sequences prefilled apart
    /// decode as one batch (continuous batching, docs/architecture.md §2). The two caches must
    /// come from the same model. Whichever cache holds fewer slots is left-padded to the
    /// other's length: its slots move right and its rows' padding grows by the difference, so
    /// every row keeps its RoPE positions and attends to exactly what it attended to before.
    pub fn append_rows(&mut self, other: &KvCache) -> Result<(), ModelError> {
        if (self.keys.len(), self.n_kv_heads, self.head_dim)
            != (other.keys.len(), other.n_kv_heads, other.head_dim)
        {
            return Err(ModelError::Input(format!(
                "cannot join caches of different models: {} layers × {} kv heads × {} dims and {} × {} × {}",
                self.keys.len(),
                self.n_kv_heads,
                self.head_dim,
                other.keys.len(),
                other.n_kv_heads,
                other.head_dim
            )));
        }
        let len = self.len.max(other.len);
        let cap = if len <= self.capacity {
            self.capacity
        } else {
            len.next_power_of_two().max(64)
        };
        let (hd, heads) = (self.head_dim, self.n_kv_heads);
        let batch = self.batch + other.batch;
        let parts = [(&*self, self.len), (other, other.len)];
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut values = Vec::with_capacity(self.keys.len());
        for layer in 0..self.keys.len() {
            for (dst, pick) in [(&mut keys, 0), (&mut values, 1)] {
                let mut fresh = vec![0f32; batch * heads * cap * hd];
                let mut run = 0;
                for (cache, filled) in parts {
                    let src = if pick == 0 {
                        &cache.keys[layer]
                    } else {
                        &cache.values[layer]
                    };
                    let shift = len - filled;
                    for r in 0..cache.batch * heads {
                        if filled > 0 {
                            fresh[(run + r) * cap * hd + shift * hd..][..filled * hd]
                                .copy_from_slice(&src[r * cache.capacity * hd..][..filled * hd]);
                        }
                    }
                    run += cache.batch * heads;
                }
                dst.push(fresh);
            }
        }
        let mut pad = Vec::with_capacity(batch);
        for (cache, filled) in parts {
            pad.extend(cache.pad.iter().map(|&p| p + (len - filled)));
        }
        self.keys = keys;
        self.values = values;
        self.pad = pad;
        self.batch = batch;
        self.len = len;
        self.capacity = cap;
        Ok(())
    }

    /// Drops the leading slots that are padding in every row (rows that needed them left the
    /// batch), so a long-lived batch does not run into the context length on padding alone.
    pub fn trim_padding(&mut self) {
        let Some(&common) = self.pad.iter().min() else {
            return;
        };
        if common == 0 {
            return;
        }
        let (hd, cap, kept) = (self.head_dim, self.capacity, self.len - common);
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            if buf.is_empty() {
                continue;
            }
            for r in 0..self.batch * self.n_kv_heads {
                let run = r * cap * hd;
                buf.copy_within(run + common * hd..run + self.len * hd, run);
            }
        }
        self.pad.iter_mut().for_each(|p| *p -= common);
        self.len = kept;
    }

    /// Forgets everything, keeping the batch size and the allocated buffers.
    pub fn clear(&mut self) {
        self.len = 0;
        self.pad.iter_mut().for_each(|p| *p = 0);
    }
}
