//! An 8-bit linear layer for the decoding path: Q8_0 weights times Q8 activations, with an
//! AVX2 kernel chosen at run time and a portable fallback.
//!
//! candle's Q8_0 CPU kernel converts both f16 block scales on every block of every dot product,
//! which makes it compute-bound at about a fifth of what the hardware does; the default model's
//! Q4_1 kernel is scalar. Here the weights are re-laid out once at load time (int8 quants and
//! f32 scales in separate arrays, rows contiguous), activations are quantised once per call,
//! and output rows are split across threads. Quantisation is ggml's Q8_0 (blocks of 32, scale
//! = max |x| / 127 rounded to f16 for weights), so the weights equal those of candle's Q8_0
//! conversion exactly.

use half::f16;
use rayon::prelude::*;

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
        assert!(k % BLOCK == 0 && w.len() == n * k, "{n}×{k} with {} values", w.len());
        let nb = k / BLOCK;
        let mut qs = vec![0i8; n * k];
        let mut scales = vec![0f32; n * nb];
        for ((wb, qb), s) in w.chunks(BLOCK).zip(qs.chunks_mut(BLOCK)).zip(scales.iter_mut()) {
            // ggml stores the scale as f16; the quants are computed with the f32 scale.
            *s = f16::from_f32(quantize_block(wb, qb)).to_f32();
        }
        debug_assert_eq!(scales.len(), n * nb);
        Self { n, k, qs, scales }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// `out[i][j] = Σ_k x[i][k] · w[j][k]` for `m` rows of `x` (`m × k`); `out` is `m × n`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() == m * k && out.len() == m * n);
        let nb = k / BLOCK;
        let mut xq = vec![0i8; m * k];
        let mut xd = vec![0f32; m * nb];
        for ((xb, qb), d) in x.chunks(BLOCK).zip(xq.chunks_mut(BLOCK)).zip(xd.iter_mut()) {
            *d = quantize_block(xb, qb);
        }
        let dot = kernel();
        // Work items: ranges of output rows (weights), each against every activation row, so
        // a weight row is read from memory once per call.
        const ROWS: usize = 16;
        let out_ptr = SendPtr(out.as_mut_ptr());
        let items = n.div_ceil(ROWS);
        let work = |item: usize| {
            let _ = &out_ptr;
            let lo = item * ROWS;
            let hi = (lo + ROWS).min(n);
            // Activation rows in chunks that stay in L1 next to the item's weight rows.
            const CHUNK: usize = 16;
            for i0 in (0..m).step_by(CHUNK) {
                for j in lo..hi {
                    let w = &self.qs[j * k..(j + 1) * k];
                    let ws = &self.scales[j * nb..(j + 1) * nb];
                    for i in i0..(i0 + CHUNK).min(m) {
                        let v = dot(w, ws, &xq[i * k..(i + 1) * k], &xd[i * nb..(i + 1) * nb]);
                        // SAFETY: element (i, j) is written by the one item that owns row j.
                        unsafe { *out_ptr.0.add(i * n + j) = v };
                    }
                }
            }
        };
        if n * m * k < 1 << 16 {
            (0..items).for_each(work);
        } else {
            (0..items).into_par_iter().for_each(work);
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint elements from the rayon workers of one call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

type DotFn = fn(&[i8], &[f32], &[i8], &[f32]) -> f32;

fn kernel() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        if *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }) {
            return |w, ws, x, xs| unsafe { avx2::dot(w, ws, x, xs) };
        }
    }
    dot_scalar
}

/// Portable reference: Σ_blocks ws·xs·Σ w·x.
pub fn dot_scalar(w: &[i8], ws: &[f32], x: &[i8], xs: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, (wb, xb)) in w.chunks(BLOCK).zip(x.chunks(BLOCK)).enumerate() {
        let s: i32 = wb.iter().zip(xb).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
        acc += ws[b] * xs[b] * s as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BLOCK;
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
        let acc = _mm256_add_ps(acc0, acc1);
        let hi = _mm256_extractf128_ps(acc, 1);
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
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
    fn the_kernel_equals_the_scalar_reference() {
        for nb in [1, 2, 3, 18, 48] {
            let k = nb * BLOCK;
            let w = Q8Linear::from_f32(&data(k, 1), 1, k);
            let x = Q8Linear::from_f32(&data(k, 2), 1, k);
            let want = dot_scalar(&w.qs, &w.scales, &x.qs, &x.scales);
            let got = kernel()(&w.qs, &w.scales, &x.qs, &x.scales);
            assert!((want - got).abs() <= 1e-4 * want.abs().max(1.0), "{nb}: {want} vs {got}");
        }
        // Extreme values: |q| = 127 everywhere must not overflow the pairwise i16 sums.
        let k = 64;
        let w = Q8Linear::from_f32(&vec![-1.0; k], 1, k);
        let x = Q8Linear::from_f32(&vec![-1.0; k], 1, k);
        let got = kernel()(&w.qs, &w.scales, &x.qs, &x.scales);
        assert!((got - k as f32).abs() < 1e-2, "{got}");
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
                assert!((exact - got).abs() < 0.02 * (k as f32).sqrt(), "({i},{j}) {exact} vs {got}");
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
