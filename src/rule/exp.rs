//! e^x over a vocabulary: the passes of the dense rule and of the skip decision that normalise
//! logits (log-sum-exp), weigh the nucleus, and measure the mass of the leaning tokens.
//!
//! Each of those passes evaluates e^x for every one of V ≈ 49k tokens per row; with libm's
//! `exp` in f64 they cost a few hundred microseconds each, the larger part of a dense row's
//! millisecond. Here e^x is a degree-6 polynomial after range reduction (Cephes' `expf`,
//! about 1 ulp in f32), evaluated 8 or 16 lanes at a time in the AVX2 and AVX-512 builds of
//! [`crate::simd`]. Every build evaluates the same fused multiply-adds in the same order
//! (the scalar build through `f32::mul_add`), and sums keep 32 partial sums in the same lanes,
//! added in f64 in a fixed order, so all builds return bit-identical results on every machine.
//! The partial sums of ~V/32 positive terms lose about √(V/32) ulp (~1e-6 relative), far
//! below what a log-probability in f32 resolves.

use crate::simd::{self, Simd};

/// Below this, e^x is flushed to zero (e^-87 ≈ 1.6e-38, the smallest normal f32 is 1.2e-38);
/// −∞, a masked token, lands here.
const FLUSH_BELOW: f32 = -87.0;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two, so that x − n·ln 2 is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial, highest order first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// Lanes of the partial sums every build keeps (four AVX2 registers, two AVX-512 ones).
const PARTIALS: usize = 32;

/// e^x for x ≤ 0 (the shifted logits this module sees; a rounding error above 0 is fine), as
/// every build computes it.
#[inline]
pub fn exp_le0(x: f32) -> f32 {
    if x < FLUSH_BELOW {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The largest entry (−∞ for an empty slice), in 16 independent lanes: a single running
/// maximum is a chain of dependent compares, latency- rather than throughput-bound, and the
/// compiler does not split `f32::max` folds itself (their NaN rule forbids it; the rule's
/// inputs have no NaN, [`super::check_logits`]).
pub fn max(z: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let blocks = z.chunks_exact(16);
    let tail = blocks.remainder();
    for block in blocks {
        for (m, &x) in m.iter_mut().zip(block) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut best = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in tail {
        best = best.max(x);
    }
    best
}

/// `Σ e^(z_i − shift)` for `shift` ≥ every `z_i` (−∞ entries add nothing).
pub fn sum_exp(z: &[f32], shift: f32) -> f64 {
    sum_exp_at(simd::active(), z, shift)
}

/// `out_i = e^(z_i − shift)` for `shift` ≥ every `z_i`; `out.len() == z.len()`.
pub fn exp_into(z: &[f32], shift: f32, out: &mut [f32]) {
    exp_into_at(simd::active(), z, shift, out)
}

fn reduce(partials: &[f32; PARTIALS]) -> f64 {
    partials.iter().map(|&p| p as f64).sum()
}

fn sum_exp_at(s: Simd, z: &[f32], shift: f32) -> f64 {
    let mut partials = [0f32; PARTIALS];
    let body = z.len() / PARTIALS * PARTIALS;
    match s {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `simd` hands out only builds the CPU runs; `body` ≤ z.len() and a multiple
        // of PARTIALS.
        Simd::Avx512 => unsafe { x86::sum_avx512(&z[..body], shift, &mut partials) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Simd::Avx2 => unsafe { x86::sum_avx2(&z[..body], shift, &mut partials) },
        _ => {
            for block in z[..body].chunks_exact(PARTIALS) {
                for (p, &x) in partials.iter_mut().zip(block) {
                    *p += exp_le0(x - shift);
                }
            }
        }
    }
    for (p, &x) in partials.iter_mut().zip(&z[body..]) {
        *p += exp_le0(x - shift);
    }
    reduce(&partials)
}

fn exp_into_at(s: Simd, z: &[f32], shift: f32, out: &mut [f32]) {
    assert_eq!(z.len(), out.len());
    let body = z.len() / PARTIALS * PARTIALS;
    match s {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `sum_exp_at`; `out` is as long as `z`.
        Simd::Avx512 => unsafe { x86::exp_avx512(&z[..body], shift, &mut out[..body]) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Simd::Avx2 => unsafe { x86::exp_avx2(&z[..body], shift, &mut out[..body]) },
        _ => {
            for (o, &x) in out[..body].iter_mut().zip(&z[..body]) {
                *o = exp_le0(x - shift);
            }
        }
    }
    for (o, &x) in out[body..].iter_mut().zip(&z[body..]) {
        *o = exp_le0(x - shift);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{FLUSH_BELOW, LN2_HI, LN2_LO, LOG2E, P, PARTIALS};

    /// [`super::exp_le0`] on 8 lanes: the same operations, lane by lane.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        unsafe {
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            );
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
            let mut p = _mm256_set1_ps(P[0]);
            for c in &P[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(
                _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            )));
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(FLUSH_BELOW));
            _mm256_and_ps(_mm256_mul_ps(y, pow2), keep)
        }
    }

    /// [`super::exp_le0`] on 16 lanes.
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        unsafe {
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
            );
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
            let mut p = _mm512_set1_ps(P[0]);
            for c in &P[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            let y = _mm512_add_ps(
                _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            )));
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(FLUSH_BELOW));
            _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, pow2))
        }
    }

    /// # Safety
    /// AVX2 + FMA; `z.len()` a multiple of [`PARTIALS`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_avx2(z: &[f32], shift: f32, partials: &mut [f32; PARTIALS]) {
        let s = _mm256_set1_ps(shift);
        let mut a = [_mm256_setzero_ps(); 4];
        for block in z.chunks_exact(PARTIALS) {
            for (l, acc) in a.iter_mut().enumerate() {
                // SAFETY: 8 lanes at 8·l inside a block of 32.
                let x = unsafe { _mm256_sub_ps(_mm256_loadu_ps(block.as_ptr().add(8 * l)), s) };
                *acc = _mm256_add_ps(*acc, unsafe { exp8(x) });
            }
        }
        for (l, acc) in a.iter().enumerate() {
            // SAFETY: 8 lanes at 8·l inside the 32 partials.
            unsafe { _mm256_storeu_ps(partials.as_mut_ptr().add(8 * l), *acc) };
        }
    }

    /// # Safety
    /// AVX-512 F and AVX2 + FMA; `z.len()` a multiple of [`PARTIALS`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn sum_avx512(z: &[f32], shift: f32, partials: &mut [f32; PARTIALS]) {
        let s = _mm512_set1_ps(shift);
        let mut a = [_mm512_setzero_ps(); 2];
        for block in z.chunks_exact(PARTIALS) {
            for (l, acc) in a.iter_mut().enumerate() {
                // SAFETY: 16 lanes at 16·l inside a block of 32.
                let x = unsafe { _mm512_sub_ps(_mm512_loadu_ps(block.as_ptr().add(16 * l)), s) };
                *acc = _mm512_add_ps(*acc, unsafe { exp16(x) });
            }
        }
        for (l, acc) in a.iter().enumerate() {
            // SAFETY: 16 lanes at 16·l inside the 32 partials.
            unsafe { _mm512_storeu_ps(partials.as_mut_ptr().add(16 * l), *acc) };
        }
    }

    /// # Safety
    /// AVX2 + FMA; `z.len() == out.len()`, a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_avx2(z: &[f32], shift: f32, out: &mut [f32]) {
        let s = _mm256_set1_ps(shift);
        for (o, x) in out.chunks_exact_mut(8).zip(z.chunks_exact(8)) {
            // SAFETY: 8 values in each chunk.
            unsafe {
                let v = exp8(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr()), s));
                _mm256_storeu_ps(o.as_mut_ptr(), v);
            }
        }
    }

    /// # Safety
    /// AVX-512 F and AVX2 + FMA; `z.len() == out.len()`, a multiple of 16.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn exp_avx512(z: &[f32], shift: f32, out: &mut [f32]) {
        let s = _mm512_set1_ps(shift);
        for (o, x) in out.chunks_exact_mut(16).zip(z.chunks_exact(16)) {
            // SAFETY: 16 values in each chunk.
            unsafe {
                let v = exp16(_mm512_sub_ps(_mm512_loadu_ps(x.as_ptr()), s));
                _mm512_storeu_ps(o.as_mut_ptr(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503);
                (h % 10_000) as f32 / 400.0 - 20.0
            })
            .collect()
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_flushes_what_underflows() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_le0(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.000_73;
        }
        // 2 ulp in f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_le0(0.0), 1.0);
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_le0(-88.0), 0.0);
        assert!(exp_le0(-86.9) > 0.0);
    }

    #[test]
    fn every_build_returns_the_same_bits() {
        for n in [0usize, 1, 7, 8, 16, 31, 32, 33, 100, 1000, 49_152, 49_157] {
            let mut z = logits(n, n as u32);
            if n > 3 {
                z[3] = f32::NEG_INFINITY;
            }
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let shift = if max.is_finite() { max } else { 0.0 };
            let want_sum = sum_exp_at(Simd::Scalar, &z, shift);
            let mut want = vec![0f32; n];
            exp_into_at(Simd::Scalar, &z, shift, &mut want);
            for (w, &x) in want.iter().zip(&z) {
                assert_eq!(w.to_bits(), exp_le0(x - shift).to_bits());
            }
            for s in simd::supported() {
                let got = sum_exp_at(s, &z, shift);
                assert_eq!(got.to_bits(), want_sum.to_bits(), "{s} n={n}");
                let mut out = vec![0f32; n];
                exp_into_at(s, &z, shift, &mut out);
                let same = out
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{s} n={n}");
            }
        }
    }

    #[test]
    fn max_is_the_largest_entry() {
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NEG_INFINITY; 40]), f32::NEG_INFINITY);
        for n in [1usize, 15, 16, 17, 100, 49_152] {
            let z = logits(n, 9);
            for at in [0, n / 2, n - 1] {
                let mut z = z.clone();
                z[at] = 30.0;
                assert_eq!(max(&z), 30.0, "n={n} at={at}");
            }
        }
    }

    #[test]
    fn the_sum_is_close_to_the_f64_sum() {
        for seed in 0..5 {
            let z = logits(49_152, seed);
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want: f64 = z.iter().map(|&x| ((x - max) as f64).exp()).sum();
            let got = sum_exp(&z, max);
            assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
        }
    }
}
