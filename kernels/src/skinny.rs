//! Products of a few rows with a weight matrix in PyTorch's layout: `out[i, j] = b[j] +
//! Σ_p x[i, p]·W[j, p]` for the 1-64 rows of decoding, in hand-written AVX-512 or AVX2+FMA
//! chosen at run time. f32 layers take it on CPUs without AVX-512 (with AVX-512 they are
//! packed in panels, [`crate::panels`]).
//!
//! At batch 1 a linear layer reads each weight once and does one multiply-add with it, so
//! its speed is the memory's: the kernel must stream `W` at the bandwidth limit. Each tile
//! reads a few whole rows of `W` front to back (sequential streams the prefetchers follow)
//! against up to four rows of `x` held in L1, and the caller splits `W`'s rows over the
//! threads, so every thread streams its own contiguous share. gemm's matrix-vector path,
//! which this replaces for few rows, reads `Wᵀ` column blocks that jump a page each row.

use std::ops::Range;

use crate::matmul::MatRef;

/// Rows of `x` up to which the skinny kernel runs. `examples/linear_shapes.rs` at the
/// mamba-130m shapes (2026-12-02): it beats gemm (which packs `W` on every call) up to 64 rows
/// on every projection but the LM head, which it loses from 64 rows (36 ms against 27), yet
/// a decode step of 64 rows is faster with it overall; at 256 rows (prefill chunks) gemm
/// wins everywhere.
pub const MAX_ROWS: usize = 64;

/// Whether the hand-written kernel runs here (AVX-512, or AVX2 with FMA:
/// [`crate::cpu::simd_level`]).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where a block's results go: `out` holds `[x.rows, n]` row-major, and concurrent blocks
/// write disjoint column ranges of it.
#[derive(Clone, Copy)]
pub struct Out {
    pub ptr: *mut f32,
    pub n: usize,
}

// SAFETY: blocks given the same `Out` write disjoint cells (the caller's contract on
// `block`), so sharing the pointer across the pool's threads is sound.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Writes `out[i, j]` for every row `i` of `x` and the output columns `cols`: `w` holds `W`
/// (`[n, k]` row-major), `bias` `[n]` if any.
///
/// # Safety
/// [`available`] must be true; `out.ptr` must hold `x.rows × out.n` values, `cols` must lie
/// in `0..out.n`, `w` must hold `out.n × x.cols` values, and no other thread may write the
/// same columns at the same time.
pub unsafe fn block(x: MatRef<'_>, w: &[f32], bias: Option<&[f32]>, cols: Range<usize>, out: Out) {
    let k = x.cols;
    debug_assert!(w.len() >= cols.end * k);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if crate::cpu::avx512() {
            avx512::block(x, w, bias, cols, out);
        } else {
            avx2::block(x, w, bias, cols, out);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, w, bias, cols, out, k);
        unreachable!("the skinny kernel needs x86-64 (see `available`)");
    }
}

/// Rows of `W` per tile: each is one sequential stream.
const NR: usize = 4;

/// Runs `$tile::<MR, NR>` over every tile of a block (`$mr_max`: the widest x tile the
/// instruction set's registers hold).
macro_rules! tiles {
    ($x:ident, $w:ident, $bias:ident, $cols:ident, $out:ident, $mr_max:literal, $tile:ident) => {{
        let (k, s, n) = ($x.cols, $x.row_stride, $out.n);
        crate::simd::for_each_tile($x.rows, $cols, $mr_max, |i, mr, j, nr| unsafe {
            let xp = $x.data.as_ptr().add(i * s);
            let wp = $w.as_ptr().add(j * k);
            let op = $out.ptr.add(i * n + j);
            let bp = $bias.map(|b| b.as_ptr().add(j));
            crate::simd::tile_match!(mr, nr, $tile, (xp, s, wp, k, bp, op, n));
        })
    }};
}

/// The sum of a vector's 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::Out;
    use crate::matmul::MatRef;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        x: MatRef<'_>,
        w: &[f32],
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        let mut cols = cols;
        if x.rows == 1 {
            // One row (batch-1 decode): eight weight rows a tile, eight streams in flight.
            let (k, n) = (x.cols, out.n);
            while cols.len() >= WIDE {
                let j = cols.start;
                unsafe {
                    let bp = bias.map(|b| b.as_ptr().add(j));
                    tile::<1, WIDE>(
                        x.data.as_ptr(),
                        0,
                        w.as_ptr().add(j * k),
                        k,
                        bp,
                        out.ptr.add(j),
                        n,
                    );
                }
                cols.start += WIDE;
            }
        }
        tiles!(x, w, bias, cols, out, 4, tile)
    }

    /// Weight rows of a one-row tile.
    const WIDE: usize = 8;

    /// `MR` rows of x against `NR_` rows of W: `MR × NR_` accumulators of 16 lanes (at most
    /// 16 of the 32 registers, beside the weight vectors and one x vector).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const MR: usize, const NR_: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        k: usize,
        bias: Option<*const f32>,
        out: *mut f32,
        n: usize,
    ) {
        debug_assert!(MR * NR_ <= 16);
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR_]; MR];
            let full = k - k % 16;
            let mut p = 0;
            while p < full {
                let mut wv = [_mm512_setzero_ps(); NR_];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(w.add(r * k + p));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(i * x_stride + p));
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
                p += 16;
            }
            if p < k {
                let mask: __mmask16 = ((1u32 << (k - p)) - 1) as u16;
                let mut wv = [_mm512_setzero_ps(); NR_];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, w.add(r * k + p));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(i * x_stride + p));
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
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

    use super::{NR, Out};
    use crate::matmul::MatRef;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        x: MatRef<'_>,
        w: &[f32],
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        tiles!(x, w, bias, cols, out, 2, tile)
    }

    /// `MR` (≤ 2) rows of x against `NR` rows of W in 8 lanes: at most 8 accumulators of the
    /// 16 registers, beside the weight vectors and one x vector. The last `k % 8` products
    /// run in scalar.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const MR: usize, const NR_: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        k: usize,
        bias: Option<*const f32>,
        out: *mut f32,
        n: usize,
    ) {
        debug_assert!(NR_ <= NR);
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR_]; MR];
            let full = k - k % 8;
            let mut p = 0;
            while p < full {
                let mut wv = [_mm256_setzero_ps(); NR_];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(w.add(r * k + p));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(i * x_stride + p));
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, *v, *a);
                    }
                }
                p += 8;
            }
            for (i, row) in acc.iter().enumerate() {
                for (r, a) in row.iter().enumerate() {
                    // The lanes' sum, then the scalar tail.
                    let mut sum = super::hsum256(*a);
                    for q in full..k {
                        sum += *x.add(i * x_stride + q) * *w.add(r * k + q);
                    }
                    *out.add(i * n + r) = sum + bias.map_or(0.0, |b| *b.add(r));
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Each instruction set's kernel on its own (the dispatch runs only the best one here),
    /// against a product in f64, over every tile shape and a ragged `k`.
    #[test]
    fn each_instruction_sets_kernel_matches_the_naive_product() {
        let (m, k, n) = (7, 37, 11);
        let stride = k + 2;
        let x = crate::test_util::pseudo(m * stride, 7, -1.0, 1.0);
        let w = crate::test_util::pseudo(n * k, 8, -1.0, 1.0);
        let b = crate::test_util::pseudo(n, 9, -1.0, 1.0);
        let view = MatRef {
            data: &x,
            rows: m,
            cols: k,
            row_stride: stride,
        };
        type Kernel = unsafe fn(MatRef<'_>, &[f32], Option<&[f32]>, Range<usize>, Out);
        let mut kernels: Vec<(&str, Kernel)> = Vec::new();
        if std::is_x86_feature_detected!("avx512f") {
            kernels.push(("avx512", avx512::block));
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            kernels.push(("avx2", avx2::block));
        }
        for (name, kernel) in kernels {
            let mut out = vec![f32::NAN; m * n];
            let target = Out {
                ptr: out.as_mut_ptr(),
                n,
            };
            // Two column blocks, as two threads would take them.
            // SAFETY: the CPU has the kernel's features; `out` holds m × n, `w` n × k.
            unsafe {
                kernel(view, &w, Some(&b), 0..5, target);
                kernel(view, &w, Some(&b), 5..n, target);
            }
            crate::test_util::assert_linear_matches_f64(&out, &x, stride, &w, &b, (m, k, n), name);
        }
    }
}
