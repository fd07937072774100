//! Squared L2 distance between an f32 query and stored key rows (f32 or f16).
//!
//! This is the innermost loop of every search, exact or HNSW, so it gets hand-written SIMD:
//! on x86-64 with AVX2 + FMA (+ F16C for f16 keys) the kernels below keep four 8-lane
//! accumulators busy; the CPU features are detected at run time (std caches the answer), so
//! one binary runs everywhere and other targets use the scalar code. F16 keys are widened with
//! F16C's `vcvtph2ps` inside the loop: a scalar f16 conversion costs far more than reading the
//! row, which would throw away the bandwidth saving that is the point of f16 keys
//! (docs/architecture.md §4; the figure is in docs/performance.md).
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

    use super::QUERY_GROUP;

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

    /// Loads 8 key scalars at `p` as f32.
    trait Lanes: Copy {
        unsafe fn load8(p: *const Self) -> __m256;
        fn widen(self) -> f32;
    }
    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self
        }
    }
    impl Lanes for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    /// Distances from `QUERY_GROUP` queries (rows of `qs`, each `d` wide) to each row of
    /// `rows`, written as `out[r * stride + j]`: each key vector is loaded (and widened) once
    /// for all the queries, which is what makes a batch cheaper than its rows one by one.
    #[inline(always)]
    unsafe fn group<K: Lanes>(qs: *const f32, d: usize, rows: &[K], out: *mut f32, stride: usize) {
        let n = rows.len() / d;
        let q: [*const f32; QUERY_GROUP] = std::array::from_fn(|j| qs.wrapping_add(j * d));
        for r in 0..n {
            let x = rows.as_ptr().add(r * d);
            // The single-query kernel's order exactly (four accumulators over 32-scalar
            // steps, then 8-scalar steps into the first, then the tail), so that a row's
            // distance is bit-identical whichever kernel computed it.
            let mut a = [[_mm256_setzero_ps(); 4]; QUERY_GROUP];
            let mut i = 0;
            while i + 32 <= d {
                let k = [
                    K::load8(x.add(i)),
                    K::load8(x.add(i + 8)),
                    K::load8(x.add(i + 16)),
                    K::load8(x.add(i + 24)),
                ];
                for j in 0..QUERY_GROUP {
                    for l in 0..4 {
                        let diff = _mm256_sub_ps(_mm256_loadu_ps(q[j].add(i + 8 * l)), k[l]);
                        a[j][l] = _mm256_fmadd_ps(diff, diff, a[j][l]);
                    }
                }
                i += 32;
            }
            while i + 8 <= d {
                let k0 = K::load8(x.add(i));
                for j in 0..QUERY_GROUP {
                    let diff = _mm256_sub_ps(_mm256_loadu_ps(q[j].add(i)), k0);
                    a[j][0] = _mm256_fmadd_ps(diff, diff, a[j][0]);
                }
                i += 8;
            }
            for j in 0..QUERY_GROUP {
                let [a0, a1, a2, a3] = a[j];
                let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
                for t in i..d {
                    let diff = *q[j].add(t) - (*x.add(t)).widen();
                    s += diff * diff;
                }
                *out.add(r * stride + j) = s;
            }
        }
    }

    /// # Safety
    /// AVX2 + FMA; `qs.len() == QUERY_GROUP * d`, `out.len() >= (rows.len() / d - 1) * stride
    /// + QUERY_GROUP`, `stride >= QUERY_GROUP`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group_f32(qs: &[f32], d: usize, rows: &[f32], out: &mut [f32], stride: usize) {
        group(qs.as_ptr(), d, rows, out.as_mut_ptr(), stride)
    }

    /// # Safety
    /// AVX2 + FMA + F16C; as [`group_f32`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_f16(qs: &[f32], d: usize, rows: &[f16], out: &mut [f32], stride: usize) {
        group(qs.as_ptr(), d, rows, out.as_mut_ptr(), stride)
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

/// Queries a multi-query kernel call takes at once: each key vector loaded and widened serves
/// this many queries. Two, because each query keeps the single-query kernel's four
/// accumulators (for bit-identical sums) and more would not fit in the 16 vector registers.
pub const QUERY_GROUP: usize = 2;

/// Distances from each of the `qs.len() / d` queries to each of the consecutive f32 `rows`,
/// written row-major as `out[r * m + j]` (row `r`, query `j`, `m` queries).
pub fn l2_rows_multi_f32(qs: &[f32], d: usize, rows: &[f32], out: &mut [f32]) {
    multi(qs, d, rows, out, l2_rows_f32, |_q, _r, _o, _s| {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: features checked; `multi` passes a group of QUERY_GROUP queries and an
            // `out` of the asserted shape.
            unsafe { x86::group_f32(_q, d, _r, _o, _s) };
            return true;
        }
        false
    });
}

/// [`l2_rows_multi_f32`] for f16 rows.
pub fn l2_rows_multi_f16(qs: &[f32], d: usize, rows: &[f16], out: &mut [f32]) {
    multi(qs, d, rows, out, l2_rows_f16, |_q, _r, _o, _s| {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            // SAFETY: as in `l2_rows_multi_f32`, with F16C checked.
            unsafe { x86::group_f16(_q, d, _r, _o, _s) };
            return true;
        }
        false
    });
}

/// Splits the queries into groups of [`QUERY_GROUP`] for `group` (which returns false when the
/// CPU has no multi-query kernel); the rest, and every query on such a CPU, go one at a time
/// through `single` into a small column buffer.
fn multi<K>(
    qs: &[f32],
    d: usize,
    rows: &[K],
    out: &mut [f32],
    single: fn(&[f32], &[K], &mut [f32]),
    group: impl Fn(&[f32], &[K], &mut [f32], usize) -> bool,
) {
    assert!(d > 0 && qs.len().is_multiple_of(d) && rows.len().is_multiple_of(d));
    let m = qs.len() / d;
    let n = rows.len() / d;
    assert_eq!(out.len(), n * m);
    if n == 0 {
        return;
    }
    let mut j = 0;
    while j + QUERY_GROUP <= m && group(&qs[j * d..(j + QUERY_GROUP) * d], rows, &mut out[j..], m) {
        j += QUERY_GROUP;
    }
    const COLUMN: usize = 64;
    let mut col = [0f32; COLUMN];
    for jj in j..m {
        let q = &qs[jj * d..(jj + 1) * d];
        for r0 in (0..n).step_by(COLUMN) {
            let len = (n - r0).min(COLUMN);
            single(q, &rows[r0 * d..(r0 + len) * d], &mut col[..len]);
            for (t, &v) in col[..len].iter().enumerate() {
                out[(r0 + t) * m + jj] = v;
            }
        }
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

    #[test]
    fn multi_query_kernels_match_one_query_at_a_time() {
        for d in [1usize, 8, 15, 16, 33, 576] {
            for m in [1usize, 3, 4, 5, 8, 9] {
                let n = 70;
                let qs: Vec<f32> = (0..m * d)
                    .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
                    .collect();
                let rows: Vec<f32> = (0..n * d)
                    .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.7)
                    .collect();
                let rows_h: Vec<f16> = rows.iter().map(|&v| f16::from_f32(v)).collect();
                let mut out = vec![0f32; n * m];
                let mut out_h = vec![0f32; n * m];
                l2_rows_multi_f32(&qs, d, &rows, &mut out);
                l2_rows_multi_f16(&qs, d, &rows_h, &mut out_h);
                for r in 0..n {
                    for j in 0..m {
                        let q = &qs[j * d..(j + 1) * d];
                        let want = l2_f32(q, &rows[r * d..(r + 1) * d]);
                        let want_h = l2_f16(q, &rows_h[r * d..(r + 1) * d]);
                        // Bit-identical: a row's neighbours must not depend on its batch.
                        assert_eq!(out[r * m + j].to_bits(), want.to_bits(), "d={d} m={m}");
                        assert_eq!(out_h[r * m + j].to_bits(), want_h.to_bits(), "d={d} m={m}");
                    }
                }
            }
        }
    }
}
