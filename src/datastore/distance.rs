//! Squared L2 distance between an f32 query and stored key rows (f32 or f16).
//!
//! This is the innermost loop of every search, exact or HNSW, so it gets hand-written SIMD in
//! two x86-64 builds, chosen once per process by [`crate::simd`]: AVX2 + FMA + F16C, four 8-lane
//! accumulators; and AVX-512, whose two 16-lane accumulators are the AVX2 build's four laid side
//! by side, so that the same lanes see the same fused multiply-adds in the same order and both
//! builds return bit-identical distances (the tests check it; a store's neighbours do not depend
//! on the machine). Other targets, and `GOODTRIEVER_SIMD=scalar`, use the scalar code. F16 keys
//! are widened with `vcvtph2ps` inside the loop: a scalar f16 conversion costs far more than
//! reading the row, which would throw away the bandwidth saving that is the point of f16 keys
//! (docs/architecture.md §4; the figure is in docs/performance.md).
//!
//! All kernels accumulate in f32. The scalar and SIMD paths sum in different orders, so they
//! may differ in the last bits; a process uses one build throughout, so nothing mixes them.

use half::f16;

use crate::simd::{self, Simd};

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

/// A stored key scalar the kernels read: f32 or f16.
pub(crate) trait KeyScalar: Copy + Send + Sync + 'static {
    /// The scalar reference distance for rows of this type.
    fn l2_scalar(q: &[f32], x: &[Self]) -> f32;
    /// Widens one value.
    fn widen(self) -> f32;
}

impl KeyScalar for f32 {
    #[inline]
    fn l2_scalar(q: &[f32], x: &[f32]) -> f32 {
        l2_f32_scalar(q, x)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KeyScalar for f16 {
    #[inline]
    fn l2_scalar(q: &[f32], x: &[f16]) -> f32 {
        l2_f16_scalar(q, x)
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    use super::KeyScalar;

    /// Loads key scalars at `p` as f32 lanes.
    pub(super) trait Lanes: KeyScalar {
        /// 8 values. The caller's CPU has AVX2 and F16C.
        unsafe fn load8(p: *const Self) -> __m256;
        /// 16 values. The caller's CPU has AVX-512 F.
        unsafe fn load16(p: *const Self) -> __m512;
    }
    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
    }
    impl Lanes for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The end every kernel shares, so that all of them sum alike: 8-scalar steps from `i`
    /// into the first accumulator, the four accumulators added pairwise, then the scalar tail.
    #[inline(always)]
    unsafe fn finish<K: Lanes>(
        a: [__m256; 4],
        q: *const f32,
        x: *const K,
        i: usize,
        n: usize,
    ) -> f32 {
        let [mut a0, a1, a2, a3] = a;
        let mut i = i;
        unsafe {
            while i + 8 <= n {
                let d = _mm256_sub_ps(_mm256_loadu_ps(q.add(i)), K::load8(x.add(i)));
                a0 = _mm256_fmadd_ps(d, d, a0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            while i < n {
                let d = *q.add(i) - (*x.add(i)).widen();
                s += d * d;
                i += 1;
            }
            s
        }
    }

    /// AVX2: four 8-lane accumulators over 32-scalar steps.
    #[inline(always)]
    unsafe fn l2_8<K: Lanes>(q: *const f32, x: *const K, n: usize) -> f32 {
        unsafe {
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (l, acc) in a.iter_mut().enumerate() {
                    let d = _mm256_sub_ps(
                        _mm256_loadu_ps(q.add(i + 8 * l)),
                        K::load8(x.add(i + 8 * l)),
                    );
                    *acc = _mm256_fmadd_ps(d, d, *acc);
                }
                i += 32;
            }
            finish(a, q, x, i, n)
        }
    }

    /// AVX-512: the same four accumulators as two 16-lane ones (lanes 0–7 of the first are
    /// the AVX2 kernel's first, lanes 8–15 its second, and so on).
    #[inline(always)]
    unsafe fn l2_16<K: Lanes>(q: *const f32, x: *const K, n: usize) -> f32 {
        unsafe {
            let (mut z0, mut z1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 32 <= n {
                let d0 = _mm512_sub_ps(_mm512_loadu_ps(q.add(i)), K::load16(x.add(i)));
                let d1 = _mm512_sub_ps(_mm512_loadu_ps(q.add(i + 16)), K::load16(x.add(i + 16)));
                z0 = _mm512_fmadd_ps(d0, d0, z0);
                z1 = _mm512_fmadd_ps(d1, d1, z1);
                i += 32;
            }
            finish(split(z0, z1), q, x, i, n)
        }
    }

    /// Two 16-lane accumulators as the four 8-lane ones they stand for.
    #[inline(always)]
    unsafe fn split(z0: __m512, z1: __m512) -> [__m256; 4] {
        [
            _mm512_castps512_ps256(z0),
            _mm512_extractf32x8_ps::<1>(z0),
            _mm512_castps512_ps256(z1),
            _mm512_extractf32x8_ps::<1>(z1),
        ]
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `q.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn l2_avx2<K: Lanes>(q: &[f32], x: &[K]) -> f32 {
        unsafe { l2_8(q.as_ptr(), x.as_ptr(), q.len().min(x.len())) }
    }

    /// # Safety
    /// The CPU has AVX-512 F, DQ and AVX2, FMA, F16C; `q.len() == x.len()`.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
    pub unsafe fn l2_avx512<K: Lanes>(q: &[f32], x: &[K]) -> f32 {
        unsafe { l2_16(q.as_ptr(), x.as_ptr(), q.len().min(x.len())) }
    }

    /// Distances from `q` to each of the consecutive rows in `rows` (row length `q.len()`).
    ///
    /// # Safety
    /// As [`l2_avx2`]; `rows.len() == out.len() * q.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_avx2<K: Lanes>(q: &[f32], rows: &[K], out: &mut [f32]) {
        let d = q.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = unsafe { l2_8(q.as_ptr(), rows.as_ptr().add(r * d), d) };
        }
    }

    /// # Safety
    /// As [`l2_avx512`]; `rows.len() == out.len() * q.len()`.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
    pub unsafe fn rows_avx512<K: Lanes>(q: &[f32], rows: &[K], out: &mut [f32]) {
        let d = q.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = unsafe { l2_16(q.as_ptr(), rows.as_ptr().add(r * d), d) };
        }
    }

    /// Distances from `G` queries (rows of `qs`, each `d` wide) to each row of `rows`, written
    /// as `out[r * stride + j]`: each key vector is loaded (and widened) once for all the
    /// queries, which is what makes a batch cheaper than its rows one by one. Each query keeps
    /// the single-query kernel's accumulators and order, so a row's distance is bit-identical
    /// whichever kernel computed it.
    ///
    /// # Safety
    /// AVX2, FMA, F16C; `qs.len() == G * d`, `out.len() >= (rows.len() / d - 1) * stride + G`,
    /// `stride >= G`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2<K: Lanes, const G: usize>(
        qs: &[f32],
        d: usize,
        rows: &[K],
        out: &mut [f32],
        stride: usize,
    ) {
        let q: [*const f32; G] = std::array::from_fn(|j| qs.as_ptr().wrapping_add(j * d));
        let out = out.as_mut_ptr();
        for r in 0..rows.len() / d {
            unsafe {
                let x = rows.as_ptr().add(r * d);
                let mut a = [[_mm256_setzero_ps(); 4]; G];
                let mut i = 0;
                while i + 32 <= d {
                    let k = [
                        K::load8(x.add(i)),
                        K::load8(x.add(i + 8)),
                        K::load8(x.add(i + 16)),
                        K::load8(x.add(i + 24)),
                    ];
                    for j in 0..G {
                        for l in 0..4 {
                            let diff = _mm256_sub_ps(_mm256_loadu_ps(q[j].add(i + 8 * l)), k[l]);
                            a[j][l] = _mm256_fmadd_ps(diff, diff, a[j][l]);
                        }
                    }
                    i += 32;
                }
                for j in 0..G {
                    *out.add(r * stride + j) = finish(a[j], q[j], x, i, d);
                }
            }
        }
    }

    /// [`group_avx2`] on AVX-512 (32 vector registers: room for twice the queries).
    ///
    /// # Safety
    /// AVX-512 F, DQ and AVX2, FMA, F16C; shapes as [`group_avx2`].
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
    pub unsafe fn group_avx512<K: Lanes, const G: usize>(
        qs: &[f32],
        d: usize,
        rows: &[K],
        out: &mut [f32],
        stride: usize,
    ) {
        let q: [*const f32; G] = std::array::from_fn(|j| qs.as_ptr().wrapping_add(j * d));
        let out = out.as_mut_ptr();
        for r in 0..rows.len() / d {
            unsafe {
                let x = rows.as_ptr().add(r * d);
                let mut z = [[_mm512_setzero_ps(); 2]; G];
                let mut i = 0;
                while i + 32 <= d {
                    let k0 = K::load16(x.add(i));
                    let k1 = K::load16(x.add(i + 16));
                    for j in 0..G {
                        let d0 = _mm512_sub_ps(_mm512_loadu_ps(q[j].add(i)), k0);
                        let d1 = _mm512_sub_ps(_mm512_loadu_ps(q[j].add(i + 16)), k1);
                        z[j][0] = _mm512_fmadd_ps(d0, d0, z[j][0]);
                        z[j][1] = _mm512_fmadd_ps(d1, d1, z[j][1]);
                    }
                    i += 32;
                }
                for j in 0..G {
                    *out.add(r * stride + j) = finish(split(z[j][0], z[j][1]), q[j], x, i, d);
                }
            }
        }
    }
}

/// Which kernel the running process uses, for logs and benchmark reports.
pub fn kernel_name() -> &'static str {
    match simd::active() {
        Simd::Avx512 => "avx512 (f+dq, fma, f16c)",
        Simd::Avx2 => "avx2+fma+f16c",
        Simd::Scalar => "scalar",
    }
}

/// `x86::l2_*` for the build `s`.
#[inline]
fn l2_at<K: Kernel>(s: Simd, q: &[f32], x: &[K]) -> f32 {
    assert_eq!(q.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    match s {
        // SAFETY: `simd` hands out only builds the CPU runs (the tests pass only supported
        // ones); lengths asserted equal.
        Simd::Avx512 => return unsafe { x86::l2_avx512(q, x) },
        Simd::Avx2 => return unsafe { x86::l2_avx2(q, x) },
        Simd::Scalar => {}
    }
    let _ = s;
    K::l2_scalar(q, x)
}

#[inline]
fn rows_at<K: Kernel>(s: Simd, q: &[f32], rows: &[K], out: &mut [f32]) {
    assert_eq!(rows.len(), out.len() * q.len());
    #[cfg(target_arch = "x86_64")]
    match s {
        // SAFETY: as in `l2_at`; the length relation is asserted.
        Simd::Avx512 => return unsafe { x86::rows_avx512(q, rows, out) },
        Simd::Avx2 => return unsafe { x86::rows_avx2(q, rows, out) },
        Simd::Scalar => {}
    }
    let _ = s;
    let d = q.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = K::l2_scalar(q, &rows[r * d..(r + 1) * d]);
    }
}

/// A key type with kernels in every build.
#[cfg(target_arch = "x86_64")]
trait Kernel: x86::Lanes {}
#[cfg(target_arch = "x86_64")]
impl<K: x86::Lanes> Kernel for K {}
#[cfg(not(target_arch = "x86_64"))]
trait Kernel: KeyScalar {}
#[cfg(not(target_arch = "x86_64"))]
impl<K: KeyScalar> Kernel for K {}

/// Squared L2 between an f32 query and an f32 row of the same length.
#[inline]
pub fn l2_f32(q: &[f32], x: &[f32]) -> f32 {
    l2_at(simd::active(), q, x)
}

/// Squared L2 between an f32 query and an f16 row of the same length.
#[inline]
pub fn l2_f16(q: &[f32], x: &[f16]) -> f32 {
    l2_at(simd::active(), q, x)
}

/// Distances from `q` to `out.len()` consecutive f32 rows.
pub fn l2_rows_f32(q: &[f32], rows: &[f32], out: &mut [f32]) {
    rows_at(simd::active(), q, rows, out)
}

/// Distances from `q` to `out.len()` consecutive f16 rows.
pub fn l2_rows_f16(q: &[f32], rows: &[f16], out: &mut [f32]) {
    rows_at(simd::active(), q, rows, out)
}

/// Queries the narrowest multi-query kernel takes at once: each key vector loaded and widened
/// serves this many queries. Two, because each query keeps the single-query kernel's four
/// accumulators (for bit-identical sums) and more would not fit in AVX2's 16 vector registers;
/// the AVX-512 kernel, with 32, takes [`WIDE_GROUP`].
pub const QUERY_GROUP: usize = 2;

/// Queries the AVX-512 multi-query kernel takes at once.
pub const WIDE_GROUP: usize = 4;

/// Distances from each of the `qs.len() / d` queries to each of the consecutive f32 `rows`,
/// written row-major as `out[r * m + j]` (row `r`, query `j`, `m` queries).
pub fn l2_rows_multi_f32(qs: &[f32], d: usize, rows: &[f32], out: &mut [f32]) {
    multi_at(simd::active(), qs, d, rows, out)
}

/// [`l2_rows_multi_f32`] for f16 rows.
pub fn l2_rows_multi_f16(qs: &[f32], d: usize, rows: &[f16], out: &mut [f32]) {
    multi_at(simd::active(), qs, d, rows, out)
}

/// Splits the queries into groups for the widest multi-query kernel the build has, then pairs;
/// the rest, and every query on the scalar build, go one at a time into a small column buffer.
fn multi_at<K: Kernel>(s: Simd, qs: &[f32], d: usize, rows: &[K], out: &mut [f32]) {
    assert!(d > 0 && qs.len().is_multiple_of(d) && rows.len().is_multiple_of(d));
    let m = qs.len() / d;
    let n = rows.len() / d;
    assert_eq!(out.len(), n * m);
    if n == 0 {
        return;
    }
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if s == Simd::Avx512 {
            while j + WIDE_GROUP <= m {
                let group = &qs[j * d..(j + WIDE_GROUP) * d];
                // SAFETY: AVX-512 is supported (as in `l2_at`); a group of WIDE_GROUP queries,
                // and `out[j..]` holds (n - 1) * m + WIDE_GROUP values since j + WIDE_GROUP ≤ m.
                unsafe { x86::group_avx512::<K, WIDE_GROUP>(group, d, rows, &mut out[j..], m) };
                j += WIDE_GROUP;
            }
        }
        if s >= Simd::Avx2 {
            while j + QUERY_GROUP <= m {
                let group = &qs[j * d..(j + QUERY_GROUP) * d];
                // SAFETY: as above, for QUERY_GROUP queries on AVX2.
                unsafe { x86::group_avx2::<K, QUERY_GROUP>(group, d, rows, &mut out[j..], m) };
                j += QUERY_GROUP;
            }
        }
    }
    const COLUMN: usize = 64;
    let mut col = [0f32; COLUMN];
    for jj in j..m {
        let q = &qs[jj * d..(jj + 1) * d];
        for r0 in (0..n).step_by(COLUMN) {
            let len = (n - r0).min(COLUMN);
            rows_at(s, q, &rows[r0 * d..(r0 + len) * d], &mut col[..len]);
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

    fn data(n: usize, mul: usize, m: usize, off: f32, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * mul % m) as f32 - off) * scale)
            .collect()
    }

    const DIMS: [usize; 12] = [1, 7, 8, 9, 16, 31, 32, 33, 47, 64, 100, 576];

    #[test]
    fn every_build_matches_the_f64_reference_for_every_tail_length() {
        for s in simd::supported() {
            for d in DIMS {
                let q = data(d, 37, 11, 5.0, 0.3);
                let x = data(d, 13, 7, 3.0, 0.7);
                let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                let xw: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
                let (want, want_h) = (naive(&q, &x), naive(&q, &xw));
                let tol = |w: f64| 1e-5 * w.max(1.0);
                let got = l2_at(s, &q, &x) as f64;
                assert!((got - want).abs() < tol(want), "{s} d={d}: {got} vs {want}");
                let got_h = l2_at(s, &q, &xh) as f64;
                assert!((got_h - want_h).abs() < tol(want_h), "{s} d={d}");
                let rows: Vec<f32> = x.iter().chain(q.iter()).copied().collect();
                let mut out = [0f32; 2];
                rows_at(s, &q, &rows, &mut out);
                assert_eq!(out[0].to_bits(), (got as f32).to_bits(), "{s} d={d}");
                assert_eq!(out[1], 0.0);
                let rows_h: Vec<f16> = xh.iter().chain(xh.iter()).copied().collect();
                rows_at(s, &q, &rows_h, &mut out);
                assert_eq!(out[1].to_bits(), (got_h as f32).to_bits(), "{s} d={d}");
            }
        }
        assert!((l2_f32_scalar(&[1.0, 2.0], &[0.0, 0.0]) - 5.0).abs() < 1e-6);
    }

    #[test]
    fn the_avx512_build_returns_the_avx2_builds_bits() {
        // Both sum each lane in the same order, so a store's neighbours do not depend on the
        // machine. Skipped (and said) where the CPU lacks either build.
        if !Simd::Avx512.supported() {
            eprintln!("skipped: this CPU has no AVX-512 ({})", simd::detected());
            return;
        }
        for d in DIMS {
            for seed in 0..20usize {
                let q = data(d, 37 + seed, 11 + seed, 5.0, 0.3 + seed as f32);
                let x = data(d, 13 + 2 * seed, 7 + seed, 3.0, 0.7);
                let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                let (a, b) = (l2_at(Simd::Avx2, &q, &x), l2_at(Simd::Avx512, &q, &x));
                assert_eq!(a.to_bits(), b.to_bits(), "f32 d={d} seed={seed}");
                let (a, b) = (l2_at(Simd::Avx2, &q, &xh), l2_at(Simd::Avx512, &q, &xh));
                assert_eq!(a.to_bits(), b.to_bits(), "f16 d={d} seed={seed}");
            }
        }
    }

    #[test]
    fn multi_query_kernels_match_one_query_at_a_time_in_every_build() {
        for s in simd::supported() {
            for d in [1usize, 8, 15, 16, 33, 576] {
                for m in [1usize, 2, 3, 4, 5, 6, 7, 8, 9] {
                    let n = 70;
                    let qs = data(m * d, 37, 11, 5.0, 0.3);
                    let rows = data(n * d, 13, 7, 3.0, 0.7);
                    let rows_h: Vec<f16> = rows.iter().map(|&v| f16::from_f32(v)).collect();
                    let mut out = vec![0f32; n * m];
                    let mut out_h = vec![0f32; n * m];
                    multi_at(s, &qs, d, &rows, &mut out);
                    multi_at(s, &qs, d, &rows_h, &mut out_h);
                    for r in 0..n {
                        for j in 0..m {
                            let q = &qs[j * d..(j + 1) * d];
                            let want = l2_at(s, q, &rows[r * d..(r + 1) * d]);
                            let want_h = l2_at(s, q, &rows_h[r * d..(r + 1) * d]);
                            // Bit-identical: a row's neighbours must not depend on its batch.
                            assert_eq!(out[r * m + j].to_bits(), want.to_bits(), "{s} d={d} m={m}");
                            assert_eq!(
                                out_h[r * m + j].to_bits(),
                                want_h.to_bits(),
                                "{s} d={d} m={m}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_public_kernels_use_the_active_build() {
        let q = data(100, 37, 11, 5.0, 0.3);
        let x = data(100, 13, 7, 3.0, 0.7);
        let s = simd::active();
        assert_eq!(l2_f32(&q, &x).to_bits(), l2_at(s, &q, &x).to_bits());
        assert!(kernel_name().starts_with(s.name()));
    }
}
