//! Squared L2 distance between an f32 query and stored key rows (f32 or f16).
//!
//! This is the innermost loop of every search, exact or HNSW, so it gets hand-written SIMD:
//! on x86-64 with AVX2 + FMA (+ F16C for f16 keys) the kernels below keep four 8-lane
//! accumulators busy; the CPU features are detected at run time (std caches the answer), so
//! one binary runs everywhere and other targets use the scalar code. F16 keys are widened with
//! F16C's `vcvtph2ps` inside the loop: a scalar f16 path measured ~15× slower (DESIGN §4),
//! which would throw away the bandwidth saving that is the point of f16 keys.
//!
//! All kernels accumulate in f32. The scalar and SIMD paths sum in different orders, so they
//! may differ in the last bits; nothing relies on bit-equality between them.

use half::f16;

/// Scalar reference: Σ (q_i − x_i)².
#[inline]
pub fn l2_f32_scalar(q: &[f32], x: &[f32]) -> f32 {
    debug_assert_eq!(q.len(), x.len());
    let mut acc = [0f32; 8];
    let chunks = q.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            let d = q[c * 8 + l] - x[c * 8 + l];
            acc[l] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..q.len() {
        let d = q[i] - x[i];
        s += d * d;
    }
    s
}

/// Scalar reference for f16 keys.
#[inline]
pub fn l2_f16_scalar(q: &[f32], x: &[f16]) -> f32 {
    debug_assert_eq!(q.len(), x.len());
    let mut s = 0f32;
    for (a, b) in q.iter().zip(x) {
        let d = a - b.to_f32();
        s += d * d;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `q.len() == x.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn l2_f32(q: &[f32], x: &[f32]) -> f32 {
        let n = q.len().min(x.len());
        let qp = q.as_ptr();
        let xp = x.as_ptr();
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut a2 = _mm256_setzero_ps();
        let mut a3 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(xp.add(i)));
            let d1 = _mm256_sub_ps(
                _mm256_loadu_ps(qp.add(i + 8)),
                _mm256_loadu_ps(xp.add(i + 8)),
            );
            let d2 = _mm256_sub_ps(
                _mm256_loadu_ps(qp.add(i + 16)),
                _mm256_loadu_ps(xp.add(i + 16)),
            );
            let d3 = _mm256_sub_ps(
                _mm256_loadu_ps(qp.add(i + 24)),
                _mm256_loadu_ps(xp.add(i + 24)),
            );
            a0 = _mm256_fmadd_ps(d0, d0, a0);
            a1 = _mm256_fmadd_ps(d1, d1, a1);
            a2 = _mm256_fmadd_ps(d2, d2, a2);
            a3 = _mm256_fmadd_ps(d3, d3, a3);
            i += 32;
        }
        while i + 8 <= n {
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(xp.add(i)));
            a0 = _mm256_fmadd_ps(d0, d0, a0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        while i < n {
            let d = *qp.add(i) - *xp.add(i);
            s += d * d;
            i += 1;
        }
        s
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `q.len() == x.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn l2_f16(q: &[f32], x: &[f16]) -> f32 {
        let n = q.len().min(x.len());
        let qp = q.as_ptr();
        let xp = x.as_ptr() as *const u16;
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut a2 = _mm256_setzero_ps();
        let mut a3 = _mm256_setzero_ps();
        let mut i = 0;
        macro_rules! step {
            ($acc:ident, $off:expr) => {{
                let k = _mm256_cvtph_ps(_mm_loadu_si128(xp.add(i + $off) as *const __m128i));
                let d = _mm256_sub_ps(_mm256_loadu_ps(qp.add(i + $off)), k);
                $acc = _mm256_fmadd_ps(d, d, $acc);
            }};
        }
        while i + 32 <= n {
            step!(a0, 0);
            step!(a1, 8);
            step!(a2, 16);
            step!(a3, 24);
            i += 32;
        }
        while i + 8 <= n {
            step!(a0, 0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        while i < n {
            let d = *qp.add(i) - (*x.as_ptr().add(i)).to_f32();
            s += d * d;
            i += 1;
        }
        s
    }

    /// Distances from `q` to each of the consecutive rows in `rows` (row length `q.len()`).
    ///
    /// # Safety
    /// AVX2 + FMA; `rows.len() == out.len() * q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn l2_rows_f32(q: &[f32], rows: &[f32], out: &mut [f32]) {
        let d = q.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = l2_f32(q, rows.get_unchecked(r * d..(r + 1) * d));
        }
    }

    /// # Safety
    /// AVX2 + FMA + F16C; `rows.len() == out.len() * q.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn l2_rows_f16(q: &[f32], rows: &[f16], out: &mut [f32]) {
        let d = q.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = l2_f16(q, rows.get_unchecked(r * d..(r + 1) * d));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2_fma_f16c() -> bool {
    has_avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
}

/// Which kernel the running CPU gets, for logs and benchmark reports.
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma_f16c() {
            return "avx2+fma+f16c";
        }
        if has_avx2_fma() {
            return "avx2+fma (f16 scalar)";
        }
    }
    "scalar"
}

/// Squared L2 between an f32 query and an f32 row of the same length.
#[inline]
pub fn l2_f32(q: &[f32], x: &[f32]) -> f32 {
    assert_eq!(q.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features checked above; lengths equal.
        return unsafe { x86::l2_f32(q, x) };
    }
    l2_f32_scalar(q, x)
}

/// Squared L2 between an f32 query and an f16 row of the same length.
#[inline]
pub fn l2_f16(q: &[f32], x: &[f16]) -> f32 {
    assert_eq!(q.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: features checked above; lengths equal.
        return unsafe { x86::l2_f16(q, x) };
    }
    l2_f16_scalar(q, x)
}

/// Distances from `q` to `out.len()` consecutive f32 rows.
pub fn l2_rows_f32(q: &[f32], rows: &[f32], out: &mut [f32]) {
    assert_eq!(rows.len(), out.len() * q.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: features checked above; length relation asserted.
        unsafe { x86::l2_rows_f32(q, rows, out) };
        return;
    }
    let d = q.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = l2_f32_scalar(q, &rows[r * d..(r + 1) * d]);
    }
}

/// Distances from `q` to `out.len()` consecutive f16 rows.
pub fn l2_rows_f16(q: &[f32], rows: &[f16], out: &mut [f32]) {
    assert_eq!(rows.len(), out.len() * q.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: features checked above; length relation asserted.
        unsafe { x86::l2_rows_f16(q, rows, out) };
        return;
    }
    let d = q.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = l2_f16_scalar(q, &rows[r * d..(r + 1) * d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], x: &[f32]) -> f64 {
        q.iter()
            .zip(x)
            .map(|(a, b)| {
                let d = *a as f64 - *b as f64;
                d * d
            })
            .sum()
    }

    #[test]
    fn simd_kernels_match_f64_reference_for_every_tail_length() {
        for d in [1usize, 7, 8, 9, 31, 32, 33, 64, 100, 576] {
            let q: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let x: Vec<f32> = (0..d).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7).collect();
            let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let xw: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
            let want = naive(&q, &x);
            let want_h = naive(&q, &xw);
            let tol = |w: f64| 1e-5 * w.max(1.0);
            assert!((l2_f32(&q, &x) as f64 - want).abs() < tol(want), "d={d}");
            assert!((l2_f32_scalar(&q, &x) as f64 - want).abs() < tol(want));
            assert!(
                (l2_f16(&q, &xh) as f64 - want_h).abs() < tol(want_h),
                "d={d}"
            );
            assert!((l2_f16_scalar(&q, &xh) as f64 - want_h).abs() < tol(want_h));
            let rows: Vec<f32> = x.iter().chain(q.iter()).copied().collect();
            let mut out = [0f32; 2];
            l2_rows_f32(&q, &rows, &mut out);
            assert!((out[0] as f64 - want).abs() < tol(want));
            assert_eq!(out[1], 0.0);
            let rows_h: Vec<f16> = xh.iter().chain(xh.iter()).copied().collect();
            l2_rows_f16(&q, &rows_h, &mut out);
            assert!((out[1] as f64 - want_h).abs() < tol(want_h));
        }
    }
}
