//! 7-bit codes of a segment's keys, for an HNSW walk that reads half the bytes of f16 keys
//! and computes its distances with integer dot products; the candidates it finds are then
//! re-ranked with exact distances (docs/architecture.md §4, "The quantised walk").
//!
//! Each dimension d gets its own range over the segment's rows, [lo_d, lo_d + 127·s_d], and a
//! key x is stored as codes c_d = round((x_d − lo_d) / s_d) ∈ 0..=127, so x̂ = lo + s ⊙ c. The
//! walk's distance to a query q is
//!
//! ```text
//! d̃(q, x) = ‖q‖² + ‖x‖² − 2 q·x̂ = (‖q‖² − 2 q·lo) + ‖x‖² − 2 Σ_d (q_d s_d) c_d
//! ```
//!
//! with ‖x‖² exact (kept per row, from the stored key) and u = q ⊙ s quantised once per query
//! to i8 with one scale σ, so that the sum is σ·Σ a_d c_d over integers. Seven bits, not
//! eight, because `maddubs` (unsigned × signed byte pairs summed into i16) saturates above
//! 32767: 2 × 127 × 127 = 32258 fits. Every build (scalar, AVX2, AVX-512 VNNI) computes the
//! same integer exactly, so the walk visits the same rows on every machine.
//!
//! The codes are derived from the keys, never stored: a segment computes them the first time a
//! quantised walk needs them (a parallel pass over its keys, ~1 s per million rows of 576
//! dimensions on two cores), so the on-disk format, its checksums and `verify` are untouched,
//! and a store can never open with codes that disagree with its keys.

use rayon::prelude::*;

use super::keys::KeyRows;
use crate::simd::{self, Simd};

/// The largest code: 7 bits (see the module comment).
pub const CODE_MAX: u8 = 127;
/// The largest magnitude of a quantised query scalar.
const QUERY_MAX: f32 = 127.0;
/// Rows per parallel task while encoding.
const ENCODE_CHUNK: usize = 1024;

/// A segment's keys as 7-bit codes, with each row's exact squared norm.
#[derive(Debug)]
pub struct KeyCodes {
    dim: usize,
    lo: Vec<f32>,
    step: Vec<f32>,
    /// rows × dim codes, row-major.
    codes: Vec<u8>,
    /// ‖x_r‖², computed in f32 from the stored key.
    norms: Vec<f32>,
}

/// A query prepared for one walk: borrowed from the caller's buffer, so a warm walk allocates
/// nothing.
#[derive(Clone, Copy, Debug)]
pub struct CodedQuery<'a> {
    /// round(q_d s_d / σ), in −127..=127.
    scaled: &'a [i8],
    sigma: f32,
    /// ‖q‖² − 2 q·lo.
    base: f32,
}

impl KeyCodes {
    /// Encodes `rows` keys of width `dim`.
    pub fn encode(keys: KeyRows<'_>, rows: usize, dim: usize) -> Self {
        let chunks = rows.div_ceil(ENCODE_CHUNK);
        let (lo, hi) = (0..chunks)
            .into_par_iter()
            .map(|c| {
                let mut lo = vec![f32::INFINITY; dim];
                let mut hi = vec![f32::NEG_INFINITY; dim];
                let mut row = Vec::with_capacity(dim);
                for r in c * ENCODE_CHUNK..((c + 1) * ENCODE_CHUNK).min(rows) {
                    keys.row_f32(r, dim, &mut row);
                    for ((l, h), &v) in lo.iter_mut().zip(&mut hi).zip(&row) {
                        *l = l.min(v);
                        *h = h.max(v);
                    }
                }
                (lo, hi)
            })
            .reduce(
                || (vec![f32::INFINITY; dim], vec![f32::NEG_INFINITY; dim]),
                |(mut lo, mut hi), (l2, h2)| {
                    for d in 0..dim {
                        lo[d] = lo[d].min(l2[d]);
                        hi[d] = hi[d].max(h2[d]);
                    }
                    (lo, hi)
                },
            );
        let (lo, step): (Vec<f32>, Vec<f32>) = lo
            .iter()
            .zip(&hi)
            .map(|(&l, &h)| {
                if l.is_finite() && h.is_finite() && h > l {
                    (l, (h - l) / CODE_MAX as f32)
                } else {
                    // A constant dimension (or none at all): every code is 0 and x̂_d = lo_d.
                    (if l.is_finite() { l } else { 0.0 }, 0.0)
                }
            })
            .unzip();
        let mut codes = vec![0u8; rows * dim];
        let mut norms = vec![0f32; rows];
        codes
            .par_chunks_mut(ENCODE_CHUNK * dim.max(1))
            .zip(norms.par_chunks_mut(ENCODE_CHUNK))
            .enumerate()
            .for_each(|(c, (codes, norms))| {
                let mut row = Vec::with_capacity(dim);
                for (i, norm) in norms.iter_mut().enumerate() {
                    keys.row_f32(c * ENCODE_CHUNK + i, dim, &mut row);
                    let out = &mut codes[i * dim..(i + 1) * dim];
                    let mut n = 0f32;
                    for d in 0..dim {
                        let v = row[d];
                        n += v * v;
                        out[d] = code(v, lo[d], step[d]);
                    }
                    *norm = n;
                }
            });
        KeyCodes {
            dim,
            lo,
            step,
            codes,
            norms,
        }
    }

    /// Number of encoded rows.
    pub fn rows(&self) -> usize {
        self.norms.len()
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.norms.len() + self.lo.len() + self.step.len())
    }

    /// Prepares `q` for [`Self::dist`], writing its quantised form into `buf`.
    pub fn prepare<'a>(&self, q: &[f32], buf: &'a mut Vec<i8>) -> CodedQuery<'a> {
        debug_assert_eq!(q.len(), self.dim);
        let mut base = 0f32;
        let mut top = 0f32;
        for ((&v, &lo), &step) in q.iter().zip(&self.lo).zip(&self.step) {
            base += v * v - 2.0 * v * lo;
            top = top.max((v * step).abs());
        }
        let sigma = if top > 0.0 { top / QUERY_MAX } else { 1.0 };
        buf.clear();
        buf.extend(
            q.iter()
                .zip(&self.step)
                .map(|(&v, &s)| (v * s / sigma).round().clamp(-QUERY_MAX, QUERY_MAX) as i8),
        );
        CodedQuery {
            scaled: buf,
            sigma,
            base,
        }
    }

    /// The walk's approximate squared L2 from a prepared query to row `row`.
    #[inline]
    pub fn dist(&self, q: &CodedQuery<'_>, row: usize) -> f32 {
        let c = &self.codes[row * self.dim..(row + 1) * self.dim];
        q.base + self.norms[row] - 2.0 * q.sigma * dot(q.scaled, c) as f32
    }

    /// Asks for row `row`'s codes to be brought into cache.
    #[inline]
    pub fn prefetch(&self, row: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let ptr = self.codes.as_ptr().wrapping_add(row * self.dim) as *const i8;
            for l in 0..self.dim.div_ceil(64).min(4) {
                // SAFETY: prefetch is a hint and never faults, even on an invalid address.
                unsafe { _mm_prefetch(ptr.wrapping_add(l * 64), _MM_HINT_T0) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = row;
    }
}

#[inline]
fn code(v: f32, lo: f32, step: f32) -> u8 {
    if step > 0.0 {
        // NaN (a non-finite key, which verify reports) lands on 0 through the saturating cast.
        ((v - lo) / step).round().clamp(0.0, CODE_MAX as f32) as u8
    } else {
        0
    }
}

/// Σ a_i c_i over i8 × 7-bit codes, exact.
#[inline]
pub fn dot(a: &[i8], c: &[u8]) -> i32 {
    debug_assert_eq!(a.len(), c.len());
    match simd::active() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `active` only returns builds this CPU runs.
        Simd::Avx512 => unsafe { x86::dot_avx512(a, c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Simd::Avx2 => unsafe { x86::dot_avx2(a, c) },
        _ => dot_scalar(a, c),
    }
}

/// The portable reference.
pub fn dot_scalar(a: &[i8], c: &[u8]) -> i32 {
    a.iter().zip(c).map(|(&a, &c)| a as i32 * c as i32).sum()
}

/// Both x86 builds sum exact integers, so they return the scalar reference's value.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256i) -> i32 {
        unsafe {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// 32 byte pairs: `maddubs` (codes unsigned, query signed; no saturation with 7-bit codes)
    /// then `madd` against ones, into eight i32 lanes.
    #[inline(always)]
    unsafe fn pairs32(a: *const i8, c: *const u8) -> __m256i {
        unsafe {
            let p = _mm256_maddubs_epi16(
                _mm256_loadu_si256(c as *const __m256i),
                _mm256_loadu_si256(a as *const __m256i),
            );
            _mm256_madd_epi16(p, _mm256_set1_epi16(1))
        }
    }

    /// # Safety
    /// The CPU has AVX2; `a.len() == c.len()`; every code is at most 127.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_avx2(a: &[i8], c: &[u8]) -> i32 {
        let n = a.len().min(c.len());
        let (pa, pc) = (a.as_ptr(), c.as_ptr());
        let mut i = 0;
        unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            while i + 64 <= n {
                s0 = _mm256_add_epi32(s0, pairs32(pa.add(i), pc.add(i)));
                s1 = _mm256_add_epi32(s1, pairs32(pa.add(i + 32), pc.add(i + 32)));
                i += 64;
            }
            if i + 32 <= n {
                s0 = _mm256_add_epi32(s0, pairs32(pa.add(i), pc.add(i)));
                i += 32;
            }
            hsum(_mm256_add_epi32(s0, s1)) + super::dot_scalar(&a[i..n], &c[i..n])
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI, and AVX2; `a.len() == c.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
    pub unsafe fn dot_avx512(a: &[i8], c: &[u8]) -> i32 {
        let n = a.len().min(c.len());
        let (pa, pc) = (a.as_ptr(), c.as_ptr());
        let mut i = 0;
        unsafe {
            let mut s = _mm512_setzero_si512();
            while i + 64 <= n {
                s = _mm512_dpbusd_epi32(
                    s,
                    _mm512_loadu_si512(pc.add(i) as *const __m512i),
                    _mm512_loadu_si512(pa.add(i) as *const __m512i),
                );
                i += 64;
            }
            let mut t = _mm512_reduce_add_epi32(s);
            if i + 32 <= n {
                t += hsum(pairs32(pa.add(i), pc.add(i)));
                i += 32;
            }
            t + super::dot_scalar(&a[i..n], &c[i..n])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn every_build_returns_the_exact_integer_dot_on_every_tail() {
        let mut seed = 7;
        for n in [0usize, 1, 31, 32, 33, 63, 64, 65, 127, 576, 577, 1000] {
            // The extremes as well as random values: saturation would show at ±127 × 127.
            let a: Vec<i8> = (0..n)
                .map(|i| match i % 5 {
                    0 => 127,
                    1 => -127,
                    _ => (lcg(&mut seed) * 127.0) as i8,
                })
                .collect();
            let c: Vec<u8> = (0..n)
                .map(|i| {
                    if i % 3 == 0 {
                        CODE_MAX
                    } else {
                        ((lcg(&mut seed) + 1.0) * 63.0) as u8
                    }
                })
                .collect();
            let want: i64 = a.iter().zip(&c).map(|(&a, &c)| a as i64 * c as i64).sum();
            assert_eq!(dot_scalar(&a, &c) as i64, want, "scalar, n = {n}");
            #[cfg(target_arch = "x86_64")]
            for s in simd::supported() {
                // SAFETY: `supported` lists only builds this CPU runs.
                let got = unsafe {
                    match s {
                        Simd::Avx512 => x86::dot_avx512(&a, &c),
                        Simd::Avx2 => x86::dot_avx2(&a, &c),
                        Simd::Scalar => dot_scalar(&a, &c),
                    }
                };
                assert_eq!(got as i64, want, "{s}, n = {n}");
            }
        }
    }

    fn random_keys(rows: usize, dim: usize, seed: &mut u64) -> Vec<f16> {
        (0..rows * dim)
            // Dimensions of different spreads, as hidden states have.
            .map(|i| f16::from_f32(lcg(seed) * (1 + i % dim % 7) as f32))
            .collect()
    }

    #[test]
    fn codes_span_each_dimension_and_the_walk_distance_tracks_the_exact_one() {
        let (rows, dim) = (500, 40);
        let mut seed = 3;
        let keys = random_keys(rows, dim, &mut seed);
        let kr = KeyRows::F16(&keys);
        let codes = KeyCodes::encode(kr, rows, dim);
        assert_eq!(codes.rows(), rows);
        assert!(codes.codes.iter().all(|&c| c <= CODE_MAX));
        for d in 0..dim {
            let col = || (0..rows).map(|r| codes.codes[r * dim + d]);
            assert_eq!(col().min(), Some(0), "dimension {d} does not reach 0");
            assert_eq!(
                col().max(),
                Some(CODE_MAX),
                "dimension {d} does not reach 127"
            );
        }
        let mut buf = Vec::new();
        let mut worst = 0f32;
        for _ in 0..20 {
            let q: Vec<f32> = (0..dim).map(|_| lcg(&mut seed) * 3.0).collect();
            let cq = codes.prepare(&q, &mut buf);
            for r in 0..rows {
                let exact = kr.dist(&q, r);
                worst = worst.max((codes.dist(&cq, r) - exact).abs() / exact.max(1.0));
            }
        }
        // One code step of every dimension is under 1% of its range: the walk's distances
        // stay within a few percent of the exact ones.
        assert!(worst < 0.05, "relative error {worst}");
    }

    #[test]
    fn constant_dimensions_and_empty_segments_encode() {
        let keys = vec![1.5f32; 3 * 4];
        let codes = KeyCodes::encode(KeyRows::F32(&keys), 3, 4);
        assert!(codes.codes.iter().all(|&c| c == 0));
        let mut buf = Vec::new();
        let q = [1.5f32; 4];
        let cq = codes.prepare(&q, &mut buf);
        assert!(codes.dist(&cq, 2).abs() < 1e-4);
        let empty = KeyCodes::encode(KeyRows::F32(&[]), 0, 4);
        assert_eq!(empty.rows(), 0);
    }
}
