//! LLM.int8's outlier columns multiplied in floating point when they are many (the dense
//! pass of [`super::block`]): `Σ_p xo_ip · Q_jp` over every column, `xo` zero off the
//! outlier columns, for a tile of activation rows and weight rows.

use super::{MR_MAX, NR};

/// `dots[i][r] = Σ_p xo_ip · Q_rp` over every column (`xo`: `[rows, k]`, zero off the
/// outlier columns; `w`: `[nr, k]`), in 16 lanes: the form of CPUs without AVX2 and the
/// tests' reference for [`dense_outlier_dots`]'s.
fn dense_outlier_dots_body(xo: &[f32], w: &[i8], k: usize, dots: &mut [[f32; NR]; MR_MAX]) {
    for (i, x) in xo.chunks_exact(k).enumerate() {
        for (r, q) in w.chunks_exact(k).enumerate() {
            let mut lanes = [0.0f32; 16];
            for (xs, qs) in x.chunks_exact(16).zip(q.chunks_exact(16)) {
                for ((l, &a), &b) in lanes.iter_mut().zip(xs).zip(qs) {
                    *l += a * b as f32;
                }
            }
            dots[i][r] = lanes.iter().sum();
        }
    }
}

/// [`dense_outlier_dots_body`] in AVX-512 or AVX2 where the CPU has them. The loop LLVM
/// makes of the body keeps one sum (each add waits on the last) and multiplies before it
/// adds; here each pair of an activation row and a weight row has its own fused
/// multiply-add chain. (On the random 130M checkpoint most of out_proj's columns are
/// outliers, so every out_proj product takes this pass.)
pub(super) fn dense_outlier_dots(xo: &[f32], w: &[i8], k: usize, dots: &mut [[f32; NR]; MR_MAX]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx512() && k.is_multiple_of(16) {
            // SAFETY: the CPU has AVX-512F; `k` is a whole number of 16-lane steps.
            unsafe {
                match w.len() / k {
                    1 => outlier_rows_avx512::<1>(xo, w, k, dots),
                    2 => outlier_rows_avx512::<2>(xo, w, k, dots),
                    3 => outlier_rows_avx512::<3>(xo, w, k, dots),
                    _ => outlier_rows_avx512::<4>(xo, w, k, dots),
                }
            }
            return;
        }
        if crate::cpu::avx2_fma() && k.is_multiple_of(8) {
            // SAFETY: the CPU has AVX2 and FMA; `k` is a whole number of 8-lane steps.
            unsafe { outlier_rows_avx2(xo, w, k, dots) };
            return;
        }
    }
    dense_outlier_dots_body(xo, w, k, dots)
}

/// [`dense_outlier_dots`] in AVX2, `k` a multiple of 8: two rows of `xo` at a time against
/// every row of `w` (at most 2 × 4 accumulators of the 16 registers, beside the widened
/// weights), each 8 weights widened once for both. In the LLVM-vectorised body this pass
/// took 34% of an int8 batch-8 step capped at AVX2, as much as the int8 tiles (39%; `perf`,
/// mamba-130m, 2026-12-06).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn outlier_rows_avx2(xo: &[f32], w: &[i8], k: usize, dots: &mut [[f32; NR]; MR_MAX]) {
    let rows = xo.len() / k;
    let mut i = 0;
    while i < rows {
        let mr = (rows - i).min(2);
        // SAFETY: rows `i..i + mr` of `xo` and every row of `w` hold `k` values, `k` a
        // multiple of 8 (the caller's contract).
        unsafe {
            let nr = w.len() / k;
            crate::simd::tile_match!(mr, nr, outlier_tile_avx2, (xo, i, w, k, dots));
        }
        i += mr;
    }
}

/// `dots[i0 + i][r]` for `MR` rows of `xo` from `i0` and `NR_` rows of `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn outlier_tile_avx2<const MR: usize, const NR_: usize>(
    xo: &[f32],
    i0: usize,
    w: &[i8],
    k: usize,
    dots: &mut [[f32; NR]; MR_MAX],
) {
    use std::arch::x86_64::*;
    debug_assert!(xo.len() >= (i0 + MR) * k && w.len() >= NR_ * k && k.is_multiple_of(8));
    let mut acc = [[_mm256_setzero_ps(); NR_]; MR];
    let mut p = 0;
    while p < k {
        // SAFETY: `p + 8 ≤ k`; the rows hold `k` values (the caller's contract).
        unsafe {
            let mut wv = [_mm256_setzero_ps(); NR_];
            for (r, v) in wv.iter_mut().enumerate() {
                let bytes = _mm_loadl_epi64(w.as_ptr().add(r * k + p).cast());
                *v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xo.as_ptr().add((i0 + i) * k + p));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
        }
        p += 8;
    }
    for (i, row) in acc.iter().enumerate() {
        for (r, a) in row.iter().enumerate() {
            dots[i0 + i][r] = crate::skinny::hsum256(*a);
        }
    }
}

/// `dots[i][r]` for `NR_` rows of `w` (`[NR_, k]`), `k` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn outlier_rows_avx512<const NR_: usize>(
    xo: &[f32],
    w: &[i8],
    k: usize,
    dots: &mut [[f32; NR]; MR_MAX],
) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() >= NR_ * k && xo.len().is_multiple_of(k));
    for (i, x) in xo.chunks_exact(k).enumerate() {
        let mut acc = [_mm512_setzero_ps(); NR_];
        let mut p = 0;
        while p < k {
            // SAFETY: `p + 16 ≤ k`, and `x` and every row of `w` hold `k` values.
            unsafe {
                let xv = _mm512_loadu_ps(x.as_ptr().add(p));
                for (r, a) in acc.iter_mut().enumerate() {
                    let bytes = _mm_loadu_si128(w.as_ptr().add(r * k + p).cast());
                    let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
                    *a = _mm512_fmadd_ps(xv, q, *a);
                }
            }
            p += 16;
        }
        for (d, a) in dots[i].iter_mut().zip(acc) {
            *d = _mm512_reduce_add_ps(a);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The AVX-512 and AVX2 outlier passes against the plain loop that other CPUs run, on
    /// every count of weight rows a tile can have and an odd count of activation rows.
    #[test]
    fn the_outlier_passes_agree() {
        let (mr, k) = (3, 128);
        let xo = crate::test_util::pseudo(mr * k, 21, -9.0, 9.0);
        let w: Vec<i8> = crate::test_util::pseudo(NR * k, 22, -127.0, 127.0)
            .iter()
            .map(|&v| v as i8)
            .collect();
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        for nr in 1..=NR {
            let mut plain = [[0.0f32; NR]; MR_MAX];
            dense_outlier_dots_body(&xo, &w[..nr * k], k, &mut plain);
            let mut fast = vec![[[0.0f32; NR]; MR_MAX]];
            dense_outlier_dots(&xo, &w[..nr * k], k, &mut fast[0]);
            if avx2 {
                let mut dots = [[0.0f32; NR]; MR_MAX];
                // SAFETY: the CPU has AVX2 and FMA; `k` is a multiple of 8.
                unsafe { outlier_rows_avx2(&xo, &w[..nr * k], k, &mut dots) };
                fast.push(dots);
            }
            for (form, dots) in fast.iter().enumerate() {
                for i in 0..mr {
                    for r in 0..nr {
                        let (a, b) = (plain[i][r], dots[i][r]);
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                            "form {form}, [{i}][{r}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
