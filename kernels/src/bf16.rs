//! Linear layers with bf16 weights (`--dtype bf16` on the CPU): `out = x·Wᵀ + b` with `W`
//! rounded to bf16 once, at load, and streamed at half of f32's bytes.
//!
//! Where the CPU has AVX-512 BF16, the products run `vdpbf16ps` (pairs of bf16 products
//! summed into f32 lanes): the activations are rounded to bf16 too, once per call, as
//! PyTorch's bf16 inference rounds them. Elsewhere (AVX2+FMA) each weight is widened to f32
//! in registers and multiplied with the f32 activations. Rows of `W` are padded with zeros to
//! a multiple of 32 so that the kernels never handle a ragged tail.

use std::ops::Range;

use crate::matmul::MatRef;
use crate::skinny::Out;

/// How far ahead (in weights, 16 KiB) the AVX-512 BF16 tile asks for its rows: the rows of
/// the tiles to come, which the hardware prefetcher alone starts too late. `tideway bench
/// --dtype bf16` (mamba-130m, 2026-12-03): batch 1 68.4 → 87.5-89.6 tok/s, batch 8 200 → 302;
/// 2-8 KiB or 32 KiB ahead did less.
const PREFETCH_AHEAD: usize = 8192;

/// Weights per padded row step.
const STEP: usize = 32;

/// `W` (`[n, k]`) in bf16, each row padded to `k_pad` (a multiple of 32) with zeros.
#[derive(Clone, Debug)]
pub struct Bf16Weight {
    pub(crate) bits: std::sync::Arc<[u16]>,
    pub(crate) k_pad: usize,
}

impl Bf16Weight {
    /// Rounds `w` (`[n, k]` f32, row-major) to bf16 (nearest, ties to even).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        let k_pad = k.next_multiple_of(STEP);
        let mut bits = vec![0u16; n * k_pad];
        for (dst, src) in bits.chunks_exact_mut(k_pad).zip(w.chunks_exact(k)) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = half::bf16::from_f32(s).to_bits();
            }
        }
        Bf16Weight {
            bits: bits.into(),
            k_pad,
        }
    }

    pub fn size_bytes(&self) -> usize {
        self.bits.len() * 2
    }

    /// Row `j` widened to f32 (`k` values).
    pub fn row_f32(&self, j: usize, dst: &mut [f32]) {
        let row = &self.bits[j * self.k_pad..];
        for (d, &b) in dst.iter_mut().zip(row) {
            *d = half::bf16::from_bits(b).to_f32();
        }
    }
}

/// Whether the CPU runs the bf16 kernels (AVX2+FMA at least).
pub fn available() -> bool {
    crate::skinny::available()
}

/// Whether the products round the activations to bf16 (AVX-512 BF16) rather than widening
/// the weights.
pub fn rounds_activations() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The activations as the kernel reads them: rounded to bf16 and padded (AVX-512 BF16), or
/// f32 padded with zeros; `[rows, k_pad]`.
pub enum Activations {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
}

/// Prepares `x` for [`block`] against weights padded to `k_pad`.
pub fn prepare(x: MatRef<'_>, k_pad: usize) -> Activations {
    let rows = (0..x.rows).map(|i| &x.data[i * x.row_stride..][..x.cols]);
    if rounds_activations() {
        let mut out = vec![0u16; x.rows * k_pad];
        for (dst, src) in out.chunks_exact_mut(k_pad).zip(rows) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = half::bf16::from_f32(s).to_bits();
            }
        }
        Activations::Bf16(out)
    } else {
        let mut out = vec![0.0f32; x.rows * k_pad];
        for (dst, src) in out.chunks_exact_mut(k_pad).zip(rows) {
            dst[..src.len()].copy_from_slice(src);
        }
        Activations::F32(out)
    }
}

/// Writes `out[i, j]` for every row of `x` (prepared) and the output columns `cols`.
///
/// # Safety
/// [`available`] must be true; `x` must come from [`prepare`] with `w.k_pad`; `out.ptr` must
/// hold `rows × out.n` values with `cols` inside `0..out.n` and `w` holding `out.n` rows; no
/// other thread may write the same columns at the same time.
pub unsafe fn block(
    x: &Activations,
    rows: usize,
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    cols: Range<usize>,
    out: Out,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match x {
            Activations::Bf16(x) => avx512bf16::block(x, rows, w, bias, cols, out),
            Activations::F32(x) => avx2::block(x, rows, w, bias, cols, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, rows, w, bias, cols, out);
        unreachable!("the bf16 kernels need x86-64 (see `available`)");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Bf16Weight, Out, STEP};

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn block(
        x: &[u16],
        rows: usize,
        w: &Bf16Weight,
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        let (k, n) = (w.k_pad, out.n);
        crate::simd::for_each_tile(rows, cols, 4, |i, mr, j, nr| unsafe {
            let (xp, wp) = (x.as_ptr().add(i * k), w.bits.as_ptr().add(j * k));
            let (op, bp) = (out.ptr.add(i * n + j), bias.map(|b| b.as_ptr().add(j)));
            crate::simd::tile_match!(mr, nr, tile, (xp, wp, k, bp, op, n))
        });
    }

    /// `MR` rows of x against `NR_` rows of W, 32 bf16 pairs per step.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn tile<const MR: usize, const NR_: usize>(
        x: *const u16,
        w: *const u16,
        k: usize,
        bias: Option<*const f32>,
        out: *mut f32,
        n: usize,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR_]; MR];
            let mut p = 0;
            while p < k {
                let mut wv = [_mm512_setzero_si512(); NR_];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(w.add(r * k + p).cast());
                    _mm_prefetch::<_MM_HINT_T0>(
                        w.wrapping_add(r * k + p + super::PREFETCH_AHEAD).cast(),
                    );
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(x.add(i * k + p).cast()));
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_dpbf16_ps(*a, xv, std::mem::transmute::<__m512i, __m512bh>(*v));
                    }
                }
                p += STEP;
            }
            for (i, row) in acc.iter().enumerate() {
                for (r, a) in row.iter().enumerate() {
                    let b = bias.map_or(0.0, |b| *b.add(r));
                    *out.add(i * n + r) = _mm512_reduce_add_ps(*a) + b;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Bf16Weight, Out, STEP};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        x: &[f32],
        rows: usize,
        w: &Bf16Weight,
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        let (k, n) = (w.k_pad, out.n);
        crate::simd::for_each_tile(rows, cols, 2, |i, mr, j, nr| unsafe {
            let (xp, wp) = (x.as_ptr().add(i * k), w.bits.as_ptr().add(j * k));
            let (op, bp) = (out.ptr.add(i * n + j), bias.map(|b| b.as_ptr().add(j)));
            crate::simd::tile_match!(mr, nr, tile, (xp, wp, k, bp, op, n))
        });
    }

    /// Eight bf16 weights widened to f32 (a bf16 is the high half of an f32).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn widen(p: *const u16) -> __m256 {
        unsafe {
            let half = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16))
        }
    }

    /// `MR` (≤ 2) rows of f32 x against `NR_` rows of W widened, 8 lanes per step.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const MR: usize, const NR_: usize>(
        x: *const f32,
        w: *const u16,
        k: usize,
        bias: Option<*const f32>,
        out: *mut f32,
        n: usize,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR_]; MR];
            let mut p = 0;
            while p < k {
                for q in (0..STEP).step_by(8) {
                    let mut wv = [_mm256_setzero_ps(); NR_];
                    for (r, v) in wv.iter_mut().enumerate() {
                        *v = widen(w.add(r * k + p + q));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(i * k + p + q));
                        for (a, v) in row.iter_mut().zip(&wv) {
                            *a = _mm256_fmadd_ps(xv, *v, *a);
                        }
                    }
                }
                p += STEP;
            }
            for (i, row) in acc.iter().enumerate() {
                for (r, a) in row.iter().enumerate() {
                    let b = bias.map_or(0.0, |b| *b.add(r));
                    *out.add(i * n + r) = crate::skinny::hsum256(*a) + b;
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Both kernels against f64 products of the values they multiply (bf16 weights; bf16 or
    /// f32 activations), over every tile shape and a `k` that needs padding.
    #[test]
    fn each_kernel_matches_the_product_of_the_rounded_values() {
        let (m, k, n) = (7, 45, 11);
        let x = crate::test_util::pseudo(m * k, 3, -1.0, 1.0);
        let w = crate::test_util::pseudo(n * k, 4, -1.0, 1.0);
        let b = crate::test_util::pseudo(n, 5, -1.0, 1.0);
        let weight = Bf16Weight::from_f32(&w, n, k);
        let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        let view = MatRef::dense(&x, m, k);
        let mut cases = vec![(false, prepare_f32(view, weight.k_pad))];
        if rounds_activations() {
            cases.push((true, prepare(view, weight.k_pad)));
        }
        for (rounded, prepared) in cases {
            let mut out = vec![f32::NAN; m * n];
            let target = Out {
                ptr: out.as_mut_ptr(),
                n,
            };
            // SAFETY: the CPU has the features (checked above and by `available`); the
            // activations were prepared for this weight; `out` holds m × n.
            unsafe {
                block(&prepared, m, &weight, Some(&b), 0..6, target);
                block(&prepared, m, &weight, Some(&b), 6..n, target);
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = b[j] as f64
                        + (0..k)
                            .map(|p| {
                                let xv = x[i * k + p];
                                let xv = if rounded { round(xv) } else { xv as f64 };
                                xv * round(w[j * k + p])
                            })
                            .sum::<f64>();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "rounded {rounded} [{i}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    fn prepare_f32(x: MatRef<'_>, k_pad: usize) -> Activations {
        let mut out = vec![0.0f32; x.rows * k_pad];
        for i in 0..x.rows {
            out[i * k_pad..][..x.cols].copy_from_slice(&x.data[i * x.row_stride..][..x.cols]);
        }
        Activations::F32(out)
    }
}
