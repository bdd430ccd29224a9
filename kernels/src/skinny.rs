//! Products of a few rows with a weight matrix in PyTorch's layout: `out[i, j] = b[j] +
//! Σ_p x[i, p]·W[j, p]` for the 1-64 rows of decoding, in hand-written AVX2+FMA. f32 layers
//! take it on CPUs without AVX-512 (with AVX-512 they are packed in panels,
//! [`crate::panels`]).
//!
//! At batch 1 a linear layer reads each weight once and does one multiply-add with it, so
//! its speed is the memory's: the kernel must stream `W` at the bandwidth limit. Each tile
//! reads a few whole rows of `W` front to back (sequential streams, each line also asked for
//! [`AHEAD_BYTES`] ahead) against up to two rows of `x` held in L1, and the caller splits
//! `W`'s rows over the threads, so every thread streams its own contiguous share. gemm's
//! matrix-vector path, which this replaces for few rows, reads `Wᵀ` column blocks that jump a
//! page each row.

use std::ops::Range;

use crate::matmul::MatRef;

/// Rows of `x` up to which the skinny kernel runs. `examples/linear_shapes.rs` at the
/// mamba-130m shapes (2026-12-02): it beats gemm (which packs `W` on every call) up to 64 rows
/// on every projection but the LM head, which it loses from 64 rows (36 ms against 27), yet
/// a decode step of 64 rows is faster with it overall; at 256 rows (prefill chunks) gemm
/// wins everywhere.
pub const MAX_ROWS: usize = 64;

/// Whether the hand-written kernel runs here (AVX2 with FMA, or more:
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
        avx2::block(x, w, bias, cols, out);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, w, bias, cols, out, k);
        unreachable!("the skinny kernel needs x86-64 (see `available`)");
    }
}

/// Rows of `W` per tile: each is one sequential stream.
const NR: usize = 4;

/// How far ahead of its reads a tile asks for each of its weight rows, for its first tile
/// of activation rows (the others find the rows in L1): 4 KiB. A mamba-130m step
/// (`TIDEWAY_SIMD=avx2 tideway bench --batches 1,8,32`, f32, three rounds alternated with the
/// build before, the Xeon VM, 2026-12-06): batch 1 53.1 / 52.9 / 53.7 → 55.4 / 55.5 / 56.5
/// tok/s, batches 8 and 32 the same within the noise. (2 KiB ahead did worse at batch 1,
/// 49.5-50.4, and 8 KiB as well as 4, in a build that asked on every tile of rows.)
const AHEAD_BYTES: usize = 4096;

/// Rows of `x` that a tile takes all at once, against one weight row (`tile::<rows, 1>`),
/// instead of two at a time against four weight rows. With two at a time, the first tile of
/// rows reads the weight rows from memory and the others from L1, so the memory waits while
/// they compute; one weight row against every row reads `W` in one stream, each weight once.
/// A mamba-130m step (`TIDEWAY_SIMD=avx2 tideway bench --batches 6,8`, f32, the Xeon VM,
/// 2026-12-06, three rounds alternated with two rows a tile): batch 8 249.2 / 249.5 / 254.2 →
/// 273.1 / 283.0 / 284.9 tok/s, batch 6 212.6 / 223.4 / 221.0 → 223.2 / 231.4 / 229.9. The
/// products alone (`ROWS=3,…,8,16,32 examples/linear_shapes f32 cold`): slower at 3-5 rows
/// (`in_proj` 0.37-0.43 → 0.45-0.47 ms), 16 and 32; at 8 rows `in_proj` 0.48-0.49 → 0.32-0.34
/// ms and `out_proj` 0.26-0.28 → 0.21, `lm_head` 8.2-8.4 → 8.9 ms (BENCHMARKS.md).
pub(crate) const WHOLE_ROWS: std::ops::RangeInclusive<usize> = 6..=8;

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
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{AHEAD_BYTES, NR, Out, WHOLE_ROWS};
    use crate::matmul::MatRef;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        x: MatRef<'_>,
        w: &[f32],
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        let (k, s, n) = (x.cols, x.row_stride, out.n);
        if WHOLE_ROWS.contains(&x.rows) {
            let xp = x.data.as_ptr();
            for j in cols {
                // SAFETY: the caller's contract: row `j` of `W` and column `j` of `out` are
                // this block's.
                unsafe {
                    let (wp, op) = (w.as_ptr().add(j * k), out.ptr.add(j));
                    let bp = bias.map(|b| b.as_ptr().add(j));
                    let ahead = AHEAD_BYTES;
                    match x.rows {
                        6 => tile::<6, 1>(xp, s, wp, k, bp, op, n, ahead),
                        7 => tile::<7, 1>(xp, s, wp, k, bp, op, n, ahead),
                        _ => tile::<8, 1>(xp, s, wp, k, bp, op, n, ahead),
                    }
                }
            }
            return;
        }
        crate::simd::for_each_tile(x.rows, cols, 2, |i, mr, j, nr| unsafe {
            let xp = x.data.as_ptr().add(i * s);
            let wp = w.as_ptr().add(j * k);
            let op = out.ptr.add(i * n + j);
            let bp = bias.map(|b| b.as_ptr().add(j));
            let ahead = if i == 0 { AHEAD_BYTES } else { 0 };
            crate::simd::tile_match!(mr, nr, tile, (xp, s, wp, k, bp, op, n, ahead));
        })
    }

    /// `MR` rows of x against `NR_` rows of W in 8 lanes: at most 8 accumulators (`MR × NR_`:
    /// 2 × 4, or up to 8 × 1) of the 16 registers, beside the weight vectors and one x vector.
    /// The last `k % 8` products run in scalar. Each 64 bytes of the weight rows ask for the
    /// line `ahead` bytes on.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const MR: usize, const NR_: usize>(
        x: *const f32,
        x_stride: usize,
        w: *const f32,
        k: usize,
        bias: Option<*const f32>,
        out: *mut f32,
        n: usize,
        ahead: usize,
    ) {
        debug_assert!(NR_ <= NR && MR * NR_ <= 8);
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR_]; MR];
            let full = k - k % 8;
            let mut p = 0;
            while p < full {
                if p % 16 == 0 {
                    crate::simd::prefetch_rows(w, NR_, k, p, ahead);
                }
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

    /// Against a product in f64, over every tile shape (row counts taken two at a time, and
    /// the [`WHOLE_ROWS`] taken at once) and a ragged `k`.
    #[test]
    fn the_kernel_matches_the_naive_product() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let (k, n) = (37, 11);
        let stride = k + 2;
        for m in [1, 2, 5, 6, 7, 8, 9] {
            let x = crate::test_util::pseudo(m * stride, 7, -1.0, 1.0);
            let w = crate::test_util::pseudo(n * k, 8, -1.0, 1.0);
            let b = crate::test_util::pseudo(n, 9, -1.0, 1.0);
            let view = MatRef {
                data: &x,
                rows: m,
                cols: k,
                row_stride: stride,
            };
            let mut out = vec![f32::NAN; m * n];
            let target = Out {
                ptr: out.as_mut_ptr(),
                n,
            };
            // Two column blocks, as two threads would take them.
            // SAFETY: the CPU has the kernel's features; `out` holds m × n, `w` n × k.
            unsafe {
                avx2::block(view, &w, Some(&b), 0..5, target);
                avx2::block(view, &w, Some(&b), 5..n, target);
            }
            let name = format!("avx2, {m} rows");
            crate::test_util::assert_linear_matches_f64(&out, &x, stride, &w, &b, (m, k, n), &name);
        }
    }
}
