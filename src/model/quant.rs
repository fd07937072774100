//! Quantised linear layers for decoding: Q8_0 and Q4_1 weights times Q8 activations, with AVX2
//! and AVX-512 (VNNI) kernels chosen at run time ([`crate::simd`]) and portable fallbacks.
//!
//! candle's Q4_1 CPU kernel is scalar and its Q8_0 kernel converts both f16 block scales on
//! every block of every dot product. Decoding one token reads every weight once, so it is bound
//! by memory bandwidth and by these per-block costs: here the weights are re-laid out once at
//! load time (quants and f32 scales in separate arrays, rows contiguous), activations are
//! quantised once per call, and output rows are split across threads. Q4_1 weights are used as
//! stored in the file (the same values llama.cpp runs), reading 0.625 bytes per weight; Q8_0 is
//! ggml's (blocks of 32, scale = max |x| / 127 rounded to f16), so converted weights equal
//! candle's Q8_0 conversion exactly.

use half::f16;
use rayon::prelude::*;

use crate::simd::{self, Simd};

/// Elements per quantisation block.
pub const BLOCK: usize = 32;

/// A `n × k` weight matrix in Q8_0, `k` a multiple of 32.
pub struct Q8Linear {
    n: usize,
    k: usize,
    qs: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantises one block: returns the scale used to encode (f32) and writes the quants.
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    d
}

impl Q8Linear {
    /// Quantises a row-major `n × k` f32 matrix.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(BLOCK) && w.len() == n * k,
            "{n}×{k} with {} values",
            w.len()
        );
        let nb = k / BLOCK;
        let mut qs = vec![0i8; n * k];
        let mut scales = vec![0f32; n * nb];
        for ((wb, qb), s) in w
            .chunks(BLOCK)
            .zip(qs.chunks_mut(BLOCK))
            .zip(scales.iter_mut())
        {
            // ggml stores the scale as f16; the quants are computed with the f32 scale.
            *s = f16::from_f32(quantize_block(wb, qb)).to_f32();
        }
        debug_assert_eq!(scales.len(), n * nb);
        Self { n, k, qs, scales }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// `out[i][j] = Σ_k x[i][k] · w[j][k]` for `m` rows of `x` (`m × k`); `out` is `m × n`.
    #[cfg(test)]
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let mut act = Activations::default();
        act.quantize(x, m, self.k);
        self.forward_quantized(&act, out);
    }

    /// `out = x · wᵀ` on activations already quantised (and reused across calls).
    pub fn forward_quantized(&self, act: &Activations, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let m = act.rows_for(n, k);
        let nb = k / BLOCK;
        let dot = kernel_q8();
        run(n, m, k, out, |j, i| {
            dot(
                &self.qs[j * k..(j + 1) * k],
                &self.scales[j * nb..(j + 1) * nb],
                act.row(i),
                act.scales(i),
            )
        });
    }
}

/// A `n × k` weight matrix in ggml's Q4_1 (blocks of 32: scale d, minimum m, 4-bit quants).
pub struct Q4_1Linear {
    n: usize,
    k: usize,
    /// Per block 16 bytes: value j in the low nibble of byte j, value j + 16 in its high nibble.
    nibbles: Vec<u8>,
    d: Vec<f32>,
    min: Vec<f32>,
}

/// Bytes of one ggml Q4_1 block: f16 d, f16 m, 16 bytes of quants.
const Q4_1_BYTES: usize = 20;

impl Q4_1Linear {
    /// From the raw bytes of a ggml Q4_1 tensor of `n` rows of `k` values.
    pub fn from_ggml(bytes: &[u8], n: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && bytes.len() == n * k / BLOCK * Q4_1_BYTES);
        let blocks = n * k / BLOCK;
        let mut nibbles = Vec::with_capacity(blocks * 16);
        let mut d = Vec::with_capacity(blocks);
        let mut min = Vec::with_capacity(blocks);
        for b in bytes.chunks(Q4_1_BYTES) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            min.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            nibbles.extend_from_slice(&b[4..20]);
        }
        Self {
            n,
            k,
            nibbles,
            d,
            min,
        }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Same contract as [`Q8Linear::forward`].
    #[cfg(test)]
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let mut act = Activations::default();
        act.quantize(x, m, self.k);
        self.forward_quantized(&act, out);
    }

    /// Same contract as [`Q8Linear::forward_quantized`].
    pub fn forward_quantized(&self, act: &Activations, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let m = act.rows_for(n, k);
        let nb = k / BLOCK;
        let dot = kernel_q4_1();
        run(n, m, k, out, |j, i| {
            let blocks = j * nb..(j + 1) * nb;
            dot(
                &self.nibbles[j * nb * 16..(j + 1) * nb * 16],
                &self.d[blocks.clone()],
                &self.min[blocks],
                act.row(i),
                act.scales(i),
                act.sums(i),
            )
        });
    }
}

/// Activations quantised to Q8 per block of 32, with each block's scale and scaled sum. The
/// buffers are kept between calls, so a decoding loop quantises without allocating.
#[derive(Clone, Debug, Default)]
pub struct Activations {
    m: usize,
    k: usize,
    qs: Vec<i8>,
    scales: Vec<f32>,
    /// `scale · Σ q` per block, for the Q4_1 minimum term.
    sums: Vec<f32>,
}

impl Activations {
    /// Number of rows, after checking that they are `k` wide (the input of an `n × k` matrix).
    fn rows_for(&self, n: usize, k: usize) -> usize {
        assert_eq!(
            self.k, k,
            "activations of width {} for a {n}×{k} matrix",
            self.k
        );
        self.m
    }

    /// Quantises the `m × k` row-major `x`, reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        assert!(k.is_multiple_of(BLOCK) && x.len() == m * k);
        self.m = m;
        self.k = k;
        self.qs.resize(m * k, 0);
        self.scales.resize(m * k / BLOCK, 0.0);
        self.sums.resize(m * k / BLOCK, 0.0);
        for (((xb, qb), d), s) in x
            .chunks(BLOCK)
            .zip(self.qs.chunks_mut(BLOCK))
            .zip(self.scales.iter_mut())
            .zip(self.sums.iter_mut())
        {
            // As ggml's Q8_0/Q8_1 activations: quants from the f32 scale, scale and scaled
            // sum stored as f16, so that results match candle's and llama.cpp's kernels.
            let scale = quantize_block(xb, qb);
            *d = f16::from_f32(scale).to_f32();
            *s = f16::from_f32(scale * qb.iter().map(|&q| i32::from(q)).sum::<i32>() as f32)
                .to_f32();
        }
    }

    fn row(&self, i: usize) -> &[i8] {
        &self.qs[i * self.k..(i + 1) * self.k]
    }

    fn scales(&self, i: usize) -> &[f32] {
        let nb = self.k / BLOCK;
        &self.scales[i * nb..(i + 1) * nb]
    }

    fn sums(&self, i: usize) -> &[f32] {
        let nb = self.k / BLOCK;
        &self.sums[i * nb..(i + 1) * nb]
    }
}

/// Fills `out` (`m × n`) with `dot(j, i)`, output rows split across threads in tiles so that a
/// weight row is read from memory once per call and activation rows stay in L1.
fn run(n: usize, m: usize, k: usize, out: &mut [f32], dot: impl Fn(usize, usize) -> f32 + Sync) {
    assert_eq!(out.len(), m * n);
    const ROWS: usize = 16;
    const CHUNK: usize = 16;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let work = |item: usize| {
        let _ = &out_ptr;
        let lo = item * ROWS;
        let hi = (lo + ROWS).min(n);
        for i0 in (0..m).step_by(CHUNK) {
            for j in lo..hi {
                for i in i0..(i0 + CHUNK).min(m) {
                    // SAFETY: element (i, j) is written by the one item that owns row j.
                    unsafe { *out_ptr.0.add(i * n + j) = dot(j, i) };
                }
            }
        }
    };
    let items = n.div_ceil(ROWS);
    if n * m * k < 1 << 16 {
        (0..items).for_each(work);
    } else {
        (0..items).into_par_iter().for_each(work);
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint elements from the rayon workers of one call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

type DotQ8 = fn(&[i8], &[f32], &[i8], &[f32]) -> f32;
type DotQ4_1 = fn(&[u8], &[f32], &[f32], &[i8], &[f32], &[f32]) -> f32;

fn kernel_q8() -> DotQ8 {
    kernel_q8_at(simd::active())
}

fn kernel_q4_1() -> DotQ4_1 {
    kernel_q4_1_at(simd::active())
}

/// The Q8 · Q8 dot product of build `s`, which the CPU must run.
fn kernel_q8_at(s: Simd) -> DotQ8 {
    debug_assert!(s.supported());
    match s {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `simd` hands out only builds the CPU runs.
        Simd::Avx512 => |w, ws, x, xs| unsafe { avx512::dot(w, ws, x, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Simd::Avx2 => |w, ws, x, xs| unsafe { avx2::dot(w, ws, x, xs) },
        _ => dot_scalar,
    }
}

/// The Q4_1 · Q8 dot product of build `s`, which the CPU must run.
fn kernel_q4_1_at(s: Simd) -> DotQ4_1 {
    debug_assert!(s.supported());
    match s {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `simd` hands out only builds the CPU runs.
        Simd::Avx512 => |w, d, mn, x, xs, xsum| unsafe { avx512::dot_q4_1(w, d, mn, x, xs, xsum) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Simd::Avx2 => |w, d, mn, x, xs, xsum| unsafe { avx2::dot_q4_1(w, d, mn, x, xs, xsum) },
        _ => dot_q4_1_scalar,
    }
}

/// Whether the arguments of a Q4_1 · Q8 dot product describe the same `nb` blocks.
#[cfg(target_arch = "x86_64")]
fn q4_1_lengths_agree(w: &[u8], mn: &[f32], x: &[i8], xs: &[f32], xsum: &[f32], nb: usize) -> bool {
    w.len() == nb * 16
        && x.len() == nb * BLOCK
        && xs.len() == nb
        && mn.len() == nb
        && xsum.len() == nb
}

/// Portable reference for Q4_1 · Q8: Σ_blocks d·xs·Σ q·x + min·(xs·Σ x).
pub fn dot_q4_1_scalar(w: &[u8], d: &[f32], mn: &[f32], x: &[i8], xs: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, (wb, xb)) in w.chunks(16).zip(x.chunks(BLOCK)).enumerate() {
        let mut s = 0i32;
        for j in 0..16 {
            s += i32::from(wb[j] & 0x0F) * i32::from(xb[j]);
            s += i32::from(wb[j] >> 4) * i32::from(xb[j + 16]);
        }
        acc += d[b] * xs[b] * s as f32 + mn[b] * xsum[b];
    }
    acc
}

/// Portable reference: Σ_blocks ws·xs·Σ w·x.
pub fn dot_scalar(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, (wb, xb)) in w.chunks(BLOCK).zip(x.chunks(BLOCK)).enumerate() {
        let s: i32 = wb
            .iter()
            .zip(xb)
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        acc += ws[b] * xs[b] * s as f32;
    }
    acc
}

/// Blocks of a Q4_1 row whose scale products are computed together before their dot products.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 64;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, CHUNK};
    use std::arch::x86_64::*;

    /// One Q8·Q8 dot product. ggml's sign trick makes `maddubs` (unsigned × signed) exact:
    /// |w| · (x with w's sign), pairs summed to i16 without overflow since |w|, |x| ≤ 127.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
        let nb = ws.len();
        debug_assert!(w.len() == nb * BLOCK && x.len() == nb * BLOCK && xs.len() == nb);
        let ones = _mm256_set1_epi16(1);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let wp = w.as_ptr() as *const __m256i;
        let xp = x.as_ptr() as *const __m256i;
        let mut b = 0;
        while b + 1 < nb {
            let (p0, p1) = unsafe {
                let w0 = _mm256_loadu_si256(wp.add(b));
                let x0 = _mm256_loadu_si256(xp.add(b));
                let w1 = _mm256_loadu_si256(wp.add(b + 1));
                let x1 = _mm256_loadu_si256(xp.add(b + 1));
                let p0 = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)),
                    ones,
                );
                let p1 = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1)),
                    ones,
                );
                (p0, p1)
            };
            let d0 = _mm256_set1_ps(ws[b] * xs[b]);
            let d1 = _mm256_set1_ps(ws[b + 1] * xs[b + 1]);
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
            acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
            b += 2;
        }
        if b < nb {
            let p = unsafe {
                let w0 = _mm256_loadu_si256(wp.add(b));
                let x0 = _mm256_loadu_si256(xp.add(b));
                _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)),
                    ones,
                )
            };
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ws[b] * xs[b]), _mm256_cvtepi32_ps(p), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn hsum(acc: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(acc, 1);
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Block `b` of a Q4_1 · Q8 product: (broadcast scale, the block's integer dot as f32s).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn q4_1_block(
        wp: *const __m128i,
        xp: *const __m256i,
        b: usize,
        scale: &f32,
        low: __m256i,
        ones: __m256i,
    ) -> (__m256, __m256) {
        // SAFETY: the caller passes a block index inside both arrays.
        unsafe {
            let v = _mm_loadu_si128(wp.add(b));
            let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
            let xv = _mm256_loadu_si256(xp.add(b));
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
            (_mm256_broadcast_ss(scale), _mm256_cvtepi32_ps(p))
        }
    }

    /// Per block of `c0..c0 + len`: `ds[t] = d · xs` (the scale products), and the minimum
    /// term Σ min · xsum added to `min_acc` eight blocks at a time and to `min_tail` for the
    /// rest. Shared by the AVX-512 kernel, so that both sum alike.
    ///
    /// # Safety
    /// AVX2 + FMA; `c0 + len` within every array, `ds` holds `len` values.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk_scales(
        d: &[f32],
        mn: &[f32],
        xs: &[f32],
        xsum: &[f32],
        c0: usize,
        len: usize,
        ds: *mut f32,
        min_acc: &mut __m256,
        min_tail: &mut f32,
    ) {
        let mut t = 0;
        while t + 8 <= len {
            let at = c0 + t;
            unsafe {
                let dv = _mm256_loadu_ps(d.as_ptr().add(at));
                let sv = _mm256_loadu_ps(xs.as_ptr().add(at));
                _mm256_storeu_ps(ds.add(t), _mm256_mul_ps(dv, sv));
                let mv = _mm256_loadu_ps(mn.as_ptr().add(at));
                let uv = _mm256_loadu_ps(xsum.as_ptr().add(at));
                *min_acc = _mm256_fmadd_ps(mv, uv, *min_acc);
            }
            t += 8;
        }
        for t in t..len {
            // SAFETY: t < len, inside `ds` and the arrays (caller's contract).
            unsafe { *ds.add(t) = d[c0 + t] * xs[c0 + t] };
            *min_tail += mn[c0 + t] * xsum[c0 + t];
        }
    }

    /// One Q4_1 · Q8 dot product. The 4-bit quants are unsigned, so `maddubs` takes them
    /// directly (|q·x| pairs ≤ 2·15·127, no overflow). Decoding runs this once per weight row,
    /// so it is written for throughput: the per-block scale products and the minimum term
    /// (Σ min·xsum) are computed 8 blocks at a time up front, and four accumulators keep the
    /// FMA latency chain off the critical path.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1(
        w: &[u8],
        d: &[f32],
        mn: &[f32],
        x: &[i8],
        xs: &[f32],
        xsum: &[f32],
    ) -> f32 {
        let nb = d.len();
        debug_assert!(super::q4_1_lengths_agree(w, mn, x, xs, xsum, nb));
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut min_acc = _mm256_setzero_ps();
        let mut min_tail = 0f32;
        // Written before it is read, chunk by chunk; not zeroed (rows are short, calls many).
        let mut ds = std::mem::MaybeUninit::<[f32; CHUNK]>::uninit();
        let ds = ds.as_mut_ptr() as *mut f32;
        let wp = w.as_ptr() as *const __m128i;
        let xp = x.as_ptr() as *const __m256i;
        let mut c0 = 0;
        while c0 < nb {
            let len = CHUNK.min(nb - c0);
            // SAFETY: c0 + len ≤ nb, the length of every per-block array; ds holds CHUNK.
            unsafe { chunk_scales(d, mn, xs, xsum, c0, len, ds, &mut min_acc, &mut min_tail) };
            let mut t = 0;
            while t + 4 <= len {
                for (lane, a) in acc.iter_mut().enumerate() {
                    let (sc, p) =
                        unsafe { q4_1_block(wp, xp, c0 + t + lane, &*ds.add(t + lane), low, ones) };
                    *a = _mm256_fmadd_ps(sc, p, *a);
                }
                t += 4;
            }
            for t in t..len {
                let (sc, p) = unsafe { q4_1_block(wp, xp, c0 + t, &*ds.add(t), low, ones) };
                acc[0] = _mm256_fmadd_ps(sc, p, acc[0]);
            }
            c0 += len;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(sum) + hsum(min_acc) + min_tail
    }
}

/// The AVX-512 (VNNI) builds of the two dot products. Each 512-bit accumulator holds two of the
/// AVX2 kernel's 256-bit ones (lanes 0–7 the first, 8–15 the second), every block's integer dot
/// is exact in both, and each lane sees the same fused multiply-adds in the same order, so the
/// results are bit-identical to the AVX2 kernel's (the tests check it) with half the
/// instructions: `vpdpbusd` replaces `maddubs` + `madd`, and two blocks go through each.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::{chunk_scales, hsum};
    use super::{BLOCK, CHUNK};
    use std::arch::x86_64::*;

    /// `[a; 8]` in the low half, `[b; 8]` in the high half.
    #[inline(always)]
    unsafe fn pair(a: f32, b: f32) -> __m512 {
        _mm512_insertf32x8::<1>(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b))
    }

    /// The four 8-lane accumulators two 16-lane ones stand for, added as the AVX2 kernel adds
    /// its own.
    #[inline(always)]
    unsafe fn lo(z: __m512) -> __m256 {
        _mm512_castps512_ps256(z)
    }

    #[inline(always)]
    unsafe fn hi(z: __m512) -> __m256 {
        _mm512_extractf32x8_ps::<1>(z)
    }

    /// One Q8 · Q8 dot product (as [`super::avx2::dot`]: the sign trick, then unsigned × signed
    /// bytes summed four at a time into i32 lanes).
    ///
    /// # Safety
    /// AVX-512 F, BW, VL, DQ, VNNI and AVX2, FMA; the lengths of [`super::avx2::dot`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")]
    pub unsafe fn dot(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
        let nb = ws.len();
        debug_assert!(w.len() == nb * BLOCK && x.len() == nb * BLOCK && xs.len() == nb);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // Even blocks in the low half, odd in the high: the AVX2 kernel's acc0 and acc1.
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 1 < nb {
            unsafe {
                let w2 = _mm512_loadu_si512(wp.add(b * BLOCK) as *const _);
                let x2 = _mm512_loadu_si512(xp.add(b * BLOCK) as *const _);
                // x with w's sign (where w < 0, −x; where w = 0 the product is 0 anyway).
                let neg = _mm512_movepi8_mask(w2);
                let sx = _mm512_mask_sub_epi8(x2, neg, _mm512_setzero_si512(), x2);
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w2), sx);
                let sc = pair(ws[b] * xs[b], ws[b + 1] * xs[b + 1]);
                acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc);
            }
            b += 2;
        }
        let (mut acc0, acc1) = unsafe { (lo(acc), hi(acc)) };
        if b < nb {
            unsafe {
                let w0 = _mm256_loadu_si256(wp.add(b * BLOCK) as *const __m256i);
                let x0 = _mm256_loadu_si256(xp.add(b * BLOCK) as *const __m256i);
                let p = _mm256_dpbusd_epi32(
                    _mm256_setzero_si256(),
                    _mm256_sign_epi8(w0, w0),
                    _mm256_sign_epi8(x0, w0),
                );
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(ws[b] * xs[b]), _mm256_cvtepi32_ps(p), acc0);
            }
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// Blocks `b` and `b + 1` of a Q4_1 row as 64 unsigned quants, in the activations' order.
    #[inline(always)]
    unsafe fn nibbles2(wp: *const u8, b: usize, low: __m512i) -> __m512i {
        unsafe {
            let v = _mm256_loadu_si256(wp.add(b * 16) as *const __m256i);
            // 128-bit lanes [v_b, v_b+1, v_b >> 4, v_b+1 >> 4], then reordered to
            // [v_b, v_b >> 4, v_b+1, v_b+1 >> 4]: each block's low nibbles, then its high ones.
            let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4));
            _mm512_and_si512(_mm512_shuffle_i64x2::<0b11_01_10_00>(z, z), low)
        }
    }

    /// One Q4_1 · Q8 dot product, in [`super::avx2::dot_q4_1`]'s order: four accumulators over
    /// blocks t, t + 1, t + 2, t + 3 (here the first two in one register, the last two in the
    /// other), the chunk's remaining blocks into the first.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL, DQ, VNNI and AVX2, FMA; the lengths of [`super::avx2::dot_q4_1`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")]
    pub unsafe fn dot_q4_1(
        w: &[u8],
        d: &[f32],
        mn: &[f32],
        x: &[i8],
        xs: &[f32],
        xsum: &[f32],
    ) -> f32 {
        let nb = d.len();
        debug_assert!(super::q4_1_lengths_agree(w, mn, x, xs, xsum, nb));
        let low = _mm512_set1_epi8(0x0F);
        // Lane i takes element i / 8 (blocks t, t + 1), or 2 + i / 8 (blocks t + 2, t + 3).
        let halves01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let halves23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
        let (mut z01, mut z23) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut min_acc = _mm256_setzero_ps();
        let mut min_tail = 0f32;
        let mut ds = std::mem::MaybeUninit::<[f32; CHUNK]>::uninit();
        let ds = ds.as_mut_ptr() as *mut f32;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut c0 = 0;
        while c0 < nb {
            let len = CHUNK.min(nb - c0);
            // SAFETY: c0 + len ≤ nb, the length of every per-block array; ds holds CHUNK.
            unsafe { chunk_scales(d, mn, xs, xsum, c0, len, ds, &mut min_acc, &mut min_tail) };
            let mut t = 0;
            while t + 4 <= len {
                let b = c0 + t;
                unsafe {
                    let p01 = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        nibbles2(wp, b, low),
                        _mm512_loadu_si512(xp.add(b * BLOCK) as *const _),
                    );
                    let p23 = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        nibbles2(wp, b + 2, low),
                        _mm512_loadu_si512(xp.add((b + 2) * BLOCK) as *const _),
                    );
                    // The four scale products, each broadcast over its block's 8 lanes.
                    let sc = _mm512_castps128_ps512(_mm_loadu_ps(ds.add(t)));
                    let sc01 = _mm512_permutexvar_ps(halves01, sc);
                    let sc23 = _mm512_permutexvar_ps(halves23, sc);
                    z01 = _mm512_fmadd_ps(sc01, _mm512_cvtepi32_ps(p01), z01);
                    z23 = _mm512_fmadd_ps(sc23, _mm512_cvtepi32_ps(p23), z23);
                }
                t += 4;
            }
            if t < len {
                unsafe {
                    let mut acc0 = lo(z01);
                    for t in t..len {
                        let b = c0 + t;
                        let v = _mm_loadu_si128(wp.add(b * 16) as *const __m128i);
                        let q = _mm256_and_si256(
                            _mm256_set_m128i(_mm_srli_epi16(v, 4), v),
                            _mm256_set1_epi8(0x0F),
                        );
                        let xv = _mm256_loadu_si256(xp.add(b * BLOCK) as *const __m256i);
                        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv);
                        acc0 = _mm256_fmadd_ps(
                            _mm256_broadcast_ss(&*ds.add(t)),
                            _mm256_cvtepi32_ps(p),
                            acc0,
                        );
                    }
                    z01 = _mm512_insertf32x8::<0>(z01, acc0);
                }
            }
            c0 += len;
        }
        let sum = unsafe {
            _mm256_add_ps(
                _mm256_add_ps(lo(z01), hi(z01)),
                _mm256_add_ps(lo(z23), hi(z23)),
            )
        };
        hsum(sum) + hsum(min_acc) + min_tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_build_equals_the_scalar_reference() {
        for s in simd::supported() {
            for nb in [1, 2, 3, 5, 18, 48] {
                let k = nb * BLOCK;
                let w = Q8Linear::from_f32(&data(k, 1), 1, k);
                let x = Q8Linear::from_f32(&data(k, 2), 1, k);
                let want = dot_scalar(&w.qs, &w.scales, &x.qs, &x.scales);
                let got = kernel_q8_at(s)(&w.qs, &w.scales, &x.qs, &x.scales);
                assert!(
                    (want - got).abs() <= 1e-4 * want.abs().max(1.0),
                    "{s} {nb}: {want} vs {got}"
                );
            }
            // Extreme values: |q| = 127 everywhere must not overflow the pairwise i16 sums.
            let k = 96;
            let w = Q8Linear::from_f32(&vec![-1.0; k], 1, k);
            let x = Q8Linear::from_f32(&vec![-1.0; k], 1, k);
            let got = kernel_q8_at(s)(&w.qs, &w.scales, &x.qs, &x.scales);
            // (The scale is rounded to f16: ~1.2e-4 relative.)
            assert!((got - k as f32).abs() < 2e-4 * k as f32, "{s}: {got}");
        }
    }

    #[test]
    fn the_avx512_kernels_return_the_avx2_kernels_bits() {
        if !Simd::Avx512.supported() {
            eprintln!("skipped: this CPU has no AVX-512 ({})", simd::detected());
            return;
        }
        let (q8_2, q8_5) = (kernel_q8_at(Simd::Avx2), kernel_q8_at(Simd::Avx512));
        let (q4_2, q4_5) = (kernel_q4_1_at(Simd::Avx2), kernel_q4_1_at(Simd::Avx512));
        // Block counts around every boundary of both kernels: odd and even, a group of four
        // and its remainders, a chunk of 64 and past it.
        for nb in [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 18, 48, 63, 64, 65, 70, 131] {
            for seed in 0..4 {
                let k = nb * BLOCK;
                let w = Q8Linear::from_f32(&data(k, 10 + seed), 1, k);
                let mut act = Activations::default();
                act.quantize(&data(k, 20 + seed), 1, k);
                let (a, b) = (
                    q8_2(&w.qs, &w.scales, act.row(0), act.scales(0)),
                    q8_5(&w.qs, &w.scales, act.row(0), act.scales(0)),
                );
                assert_eq!(a.to_bits(), b.to_bits(), "q8 nb={nb}: {a} vs {b}");
                let lin = Q4_1Linear::from_ggml(&q4_1_bytes(&data(k, 30 + seed)), 1, k);
                let args = (&lin.nibbles[..], &lin.d[..], &lin.min[..]);
                let (a, b) = (
                    q4_2(
                        args.0,
                        args.1,
                        args.2,
                        act.row(0),
                        act.scales(0),
                        act.sums(0),
                    ),
                    q4_5(
                        args.0,
                        args.1,
                        args.2,
                        act.row(0),
                        act.scales(0),
                        act.sums(0),
                    ),
                );
                assert_eq!(a.to_bits(), b.to_bits(), "q4_1 nb={nb}: {a} vs {b}");
            }
        }
    }

    /// ggml Q4_1 bytes of a row-major `n × k` matrix (reference quantiser).
    fn q4_1_bytes(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in w.chunks(BLOCK) {
            let lo = b.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (hi - lo) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(lo).to_le_bytes());
            for j in 0..16 {
                let q = |v: f32| (((v - lo) * id + 0.5) as u8).min(15);
                out.push(q(b[j]) | (q(b[j + 16]) << 4));
            }
        }
        out
    }

    #[test]
    fn q4_1_kernel_equals_the_scalar_reference_and_the_dequantised_product() {
        let (n, k, m) = (40, 18 * BLOCK, 3);
        let w = data(n * k, 7);
        let lin = Q4_1Linear::from_ggml(&q4_1_bytes(&w), n, k);
        let x = data(m * k, 8);
        let mut act = Activations::default();
        act.quantize(&x, m, k);
        let nb = k / BLOCK;
        for (s, j) in simd::supported().flat_map(|s| [(s, 0), (s, 17), (s, n - 1)]) {
            let args = (
                &lin.nibbles[j * nb * 16..(j + 1) * nb * 16],
                &lin.d[j * nb..(j + 1) * nb],
                &lin.min[j * nb..(j + 1) * nb],
            );
            let want = dot_q4_1_scalar(
                args.0,
                args.1,
                args.2,
                act.row(1),
                act.scales(1),
                act.sums(1),
            );
            let got = kernel_q4_1_at(s)(
                args.0,
                args.1,
                args.2,
                act.row(1),
                act.scales(1),
                act.sums(1),
            );
            assert!(
                (want - got).abs() <= 1e-4 * want.abs().max(1.0),
                "{s}: {want} vs {got}"
            );
        }
        let mut out = vec![0f32; m * n];
        lin.forward(&x, m, &mut out);
        for i in 0..m {
            for j in 0..n {
                // Dequantised weights times exact activations.
                let mut exact = 0f32;
                for b in 0..nb {
                    for t in 0..BLOCK {
                        let byte = lin.nibbles[(j * nb + b) * 16 + t % 16];
                        let q = if t < 16 { byte & 0x0F } else { byte >> 4 };
                        let wv = lin.d[j * nb + b] * f32::from(q) + lin.min[j * nb + b];
                        exact += wv * x[i * k + b * BLOCK + t];
                    }
                }
                let got = out[i * n + j];
                assert!(
                    (exact - got).abs() < 0.05 * (k as f32).sqrt(),
                    "({i},{j}) {exact} vs {got}"
                );
            }
        }
    }

    #[test]
    fn q4_1_and_q8_0_match_candles_kernels_on_the_same_weights() {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        use candle_core::{Device, Module, Tensor};
        let (n, k, m) = (48, 18 * BLOCK, 4);
        let w = Tensor::from_vec(data(n * k, 11), (n, k), &Device::Cpu).unwrap();
        let x = data(m * k, 12);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let mut ours = vec![0f32; m * n];
            if dtype == GgmlDType::Q4_1 {
                Q4_1Linear::from_ggml(&q.data().unwrap(), n, k).forward(&x, m, &mut ours);
            } else {
                let deq: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                Q8Linear::from_f32(&deq, n, k).forward(&x, m, &mut ours);
            }
            let theirs: Vec<f32> = QMatMul::from_qtensor(q)
                .unwrap()
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let d = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Equal up to the f16 rounding of the activations' block sums (candle rounds the
            // sum before scaling it, ggml after): ~1e-4 relative on outputs of magnitude ~8.
            assert!(d < 3e-3, "{dtype:?}: {d}");
        }
    }

    #[test]
    fn forward_approximates_the_f32_product() {
        let (n, k, m) = (70, 96, 5);
        let w = data(n * k, 3);
        let x = data(m * k, 4);
        let lin = Q8Linear::from_f32(&w, n, k);
        let mut out = vec![0f32; m * n];
        lin.forward(&x, m, &mut out);
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                let got = out[i * n + j];
                assert!(
                    (exact - got).abs() < 0.02 * (k as f32).sqrt(),
                    "({i},{j}) {exact} vs {got}"
                );
            }
        }
        // Large enough to take the parallel path: same as row by row.
        let (n, k, m) = (512, 256, 3);
        let lin = Q8Linear::from_f32(&data(n * k, 5), n, k);
        let x = data(m * k, 6);
        let mut all = vec![0f32; m * n];
        lin.forward(&x, m, &mut all);
        for i in 0..m {
            let mut one = vec![0f32; n];
            lin.forward(&x[i * k..(i + 1) * k], 1, &mut one);
            assert_eq!(&all[i * n..(i + 1) * n], &one[..]);
        }
    }
}
