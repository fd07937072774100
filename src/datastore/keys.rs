//! Typed views of key rows, borrowed from a memory map or from the caller.
//!
//! Search code is written once over [`KeyRows`] and dispatches on the dtype per call, not per
//! row, so the inner loops see plain `&[f32]` or `&[f16]` slices.

use half::f16;

use super::distance;

/// Row-major N×D key input for `Datastore::append`.
///
/// Borrowed, not owned, so a caller appends straight from its own buffers (a model's hidden
/// states, a memory-mapped `.npy`); either dtype goes into a store of either dtype, converted
/// when the segment's `keys.bin` is encoded.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    /// f32 scalars, N·D of them.
    F32(&'a [f32]),
    /// f16 scalars, N·D of them.
    F16(&'a [f16]),
}

impl Keys<'_> {
    /// Number of scalars (N·D).
    pub fn len(&self) -> usize {
        match self {
            Keys::F32(k) => k.len(),
            Keys::F16(k) => k.len(),
        }
    }

    /// Whether there are no scalars at all (an append of zero rows).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get_f32(&self, i: usize) -> f32 {
        match self {
            Keys::F32(k) => k[i],
            Keys::F16(k) => k[i].to_f32(),
        }
    }
}

/// Stored key rows of one segment (N×D), viewed in place.
#[derive(Clone, Copy, Debug)]
pub enum KeyRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl KeyRows<'_> {
    /// Squared L2 from `q` to row `row` (of width `q.len()`).
    #[inline]
    pub fn dist(&self, q: &[f32], row: usize) -> f32 {
        let d = q.len();
        match self {
            KeyRows::F32(k) => distance::l2_f32(q, &k[row * d..(row + 1) * d]),
            KeyRows::F16(k) => distance::l2_f16(q, &k[row * d..(row + 1) * d]),
        }
    }

    /// Distances from `q` to rows `start..start + out.len()`.
    #[inline]
    pub fn dist_block(&self, q: &[f32], start: usize, out: &mut [f32]) {
        let d = q.len();
        let range = start * d..(start + out.len()) * d;
        match self {
            KeyRows::F32(k) => distance::l2_rows_f32(q, &k[range], out),
            KeyRows::F16(k) => distance::l2_rows_f16(q, &k[range], out),
        }
    }

    /// Distances from each of the `qs.len() / d` queries to rows `start..start + n`, where
    /// `out.len() == n × queries`, row-major (`out[r × queries + j]`).
    #[inline]
    pub fn dist_block_multi(&self, qs: &[f32], d: usize, start: usize, out: &mut [f32]) {
        let n = out.len() / (qs.len() / d);
        let range = start * d..(start + n) * d;
        match self {
            KeyRows::F32(k) => distance::l2_rows_multi_f32(qs, d, &k[range], out),
            KeyRows::F16(k) => distance::l2_rows_multi_f16(qs, d, &k[range], out),
        }
    }

    /// Row `row` widened to f32.
    pub fn row_f32(&self, row: usize, d: usize, out: &mut Vec<f32>) {
        out.clear();
        match self {
            KeyRows::F32(k) => out.extend_from_slice(&k[row * d..(row + 1) * d]),
            KeyRows::F16(k) => out.extend(k[row * d..(row + 1) * d].iter().map(|v| v.to_f32())),
        }
    }

    /// Index of the first non-finite scalar, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            KeyRows::F32(k) => k.iter().position(|v| !v.is_finite()),
            KeyRows::F16(k) => k.iter().position(|v| !v.is_finite()),
        }
    }

    /// Asks for row `row` (of width `d`) ahead of its distance.
    #[inline]
    pub fn prefetch(&self, row: usize, d: usize) {
        let (ptr, bytes) = match self {
            KeyRows::F32(k) => (k.as_ptr().wrapping_add(row * d) as *const u8, d * 4),
            KeyRows::F16(k) => (k.as_ptr().wrapping_add(row * d) as *const u8, d * 2),
        };
        // The whole row, not its first lines: the walk visits rows in no order the hardware
        // prefetcher can follow, so each line not asked for here is a miss the distance
        // kernel waits on. On a 1M-row store (1.15 GB of f16 keys, beyond any cache) the
        // walk's p50 fell by about a third against the first 4 of a row's 18 lines
        // (docs/performance.md, "Prefetching whole rows in the graph walk").
        for l in 0..bytes.div_ceil(64) {
            prefetch_line(ptr.wrapping_add(l * 64));
        }
    }
}

/// Asks the cache for the line holding `at`. A hint: it never faults, even on an address
/// outside any allocation, and is a no-op off x86-64.
#[inline(always)]
pub(crate) fn prefetch_line<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch is a hint and never faults, even on an invalid address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(at as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}
