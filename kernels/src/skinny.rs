//! Products of a few rows with a weight matrix in PyTorch's layout: `out[i, j] = b[j] +
//! Σ_p x[i, p]·W[j, p]` for the 1-64 rows of decoding, in hand-written AVX2+FMA. f32 layers
//! take it on CPUs without AVX-512 (with AVX-512 they are packed in panels,
//! [`crate::panels`]).
//!
//! At batch 1 a linear layer reads each weight once and does one multiply-add with it, so
//! its speed is the memory's: the kernel must stream `W` at the bandwidth limit. Each tile
//! reads a few whole rows of `W` front to back (sequential streams, each line also asked for
//! [`AHEAD_BYTES`] ahead) against up to two rows of `x` held in L1, or one row of `W` against
//! all of [`WHOLE_ROWS`] rows, and the caller splits `W`'s rows over the threads, so every
//! thread streams its own contiguous share. With 9 rows or more, the tiles after the first
//! against a group of weight rows ask for the next group (`simd::prefetch_next_group`).
//! gemm's matrix-vector path, which this replaces for few rows, reads `Wᵀ` column blocks
//! that jump a page each row.

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

/// Rows of `x` that a tile takes all at once, against one weight row ([`avx2::whole_rows`]),
/// instead of two at a time against four weight rows. With two at a time, the first tile of
/// rows reads the weight rows from memory and the others from L1, so the memory waits while
/// they compute; one weight row against every row reads `W` in one stream, each weight once.
/// A mamba-130m step (`TIDEWAY_SIMD=avx2 tideway bench --batches 6,8`, f32, the Xeon VM,
/// 2026-12-06, three rounds alternated with two rows a tile and no lines asked for ahead):
/// batch 8 255.5 / 249.3 / 257.9 → 313.0 / 297.1 / 298.3 tok/s, batch 6 216.6 / 211.6 /
/// 216.0 → 262.4 / 252.2 / 259.8. At 3-5 rows, 16 and 32 the products alone ran slower this
/// way (`ROWS=… examples/linear_shapes f32 cold`; BENCHMARKS.md).
pub(crate) const WHOLE_ROWS: std::ops::RangeInclusive<usize> = 6..=8;

/// How far ahead [`avx2::whole_rows`] asks for its weight row's lines: 2 KiB into L1 and 32
/// KiB into L2. The products alone at 8 rows (`ROWS=8 examples/linear_shapes f32 cold`, the
/// same hour), ms for `in_proj` / `out_proj` / `lm_head`: two rows a tile 0.47-0.52 / 0.24-0.25
/// / 8.1-8.7; one stream with nothing asked for 0.55-0.57 / 0.35-0.36 / 10.6-12.2; 4 KiB into
/// L1 0.38-0.40 / 0.24-0.33 / 8.5-9.1; 2 KiB 0.33-0.47 / 0.23-0.26 / 8.4-8.6; 8 or 16 KiB
/// 0.39-0.63 / 0.27-0.37 / 7.4-7.9; 2 KiB into L1 and 32 KiB into L2 0.33 / 0.23 / 6.6-6.8
/// (16 KiB into L2 about the same).
const WHOLE_ROWS_AHEAD: (usize, usize) = (2 << 10, 32 << 10);

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

    use super::{AHEAD_BYTES, NR, Out, WHOLE_ROWS, WHOLE_ROWS_AHEAD};
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
            // SAFETY: the caller's contract.
            unsafe {
                match x.rows {
                    6 => whole_rows::<6>(x, w, bias, cols, out),
                    7 => whole_rows::<7>(x, w, bias, cols, out),
                    _ => whole_rows::<8>(x, w, bias, cols, out),
                }
            }
            return;
        }
        let end = cols.end;
        crate::simd::for_each_tile(x.rows, cols, 2, |i, mr, j, nr| unsafe {
            let xp = x.data.as_ptr().add(i * s);
            let wp = w.as_ptr().add(j * k);
            let op = out.ptr.add(i * n + j);
            let bp = bias.map(|b| b.as_ptr().add(j));
            let ahead = if i == 0 { AHEAD_BYTES } else { 0 };
            crate::simd::prefetch_next_group(w.as_ptr(), k, (x.rows, 2, i), (j, nr, end));
            crate::simd::tile_match!(mr, nr, tile, (xp, s, wp, k, bp, op, n, ahead));
        })
    }

    /// All `MR` rows of `x` ([`WHOLE_ROWS`]) against each weight row of `cols` in turn: `MR`
    /// accumulators; two 8-lane steps (64 bytes of the weight row) a turn of the loop, each
    /// asking for the lines [`WHOLE_ROWS_AHEAD`] on. A function of its own, not inlined: as
    /// `tile::<8, 1>` inlined into `block`, the same inner loop (`objdump`) ran `in_proj` at 8
    /// rows in 0.32-0.35 ms in one build and 0.46-0.63 in another (BENCHMARKS.md, "The
    /// row-layout kernels' weights asked for ahead"); not understood.
    #[target_feature(enable = "avx2,fma")]
    #[inline(never)]
    unsafe fn whole_rows<const MR: usize>(
        x: MatRef<'_>,
        w: &[f32],
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        let k = x.cols;
        let rows: [*const f32; MR] = std::array::from_fn(|i| x.data[i * x.row_stride..].as_ptr());
        let (pairs, full) = (k - k % 16, k - k % 8);
        for j in cols {
            // SAFETY: the caller's contract: `W`'s row `j` holds `k` values and column `j` of
            // `out`'s `MR` rows is this block's.
            unsafe {
                let wr = w.as_ptr().add(j * k);
                let mut acc = [_mm256_setzero_ps(); MR];
                let mut p = 0;
                while p < pairs {
                    let line = wr.wrapping_add(p);
                    crate::simd::prefetch(line.wrapping_byte_add(WHOLE_ROWS_AHEAD.0));
                    crate::simd::prefetch_l2(line.wrapping_byte_add(WHOLE_ROWS_AHEAD.1));
                    let (w0, w1) = (_mm256_loadu_ps(wr.add(p)), _mm256_loadu_ps(wr.add(p + 8)));
                    for (a, row) in acc.iter_mut().zip(&rows) {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(p)), w0, *a);
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(p + 8)), w1, *a);
                    }
                    p += 16;
                }
                if p < full {
                    let w0 = _mm256_loadu_ps(wr.add(p));
                    for (a, row) in acc.iter_mut().zip(&rows) {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(p)), w0, *a);
                    }
                }
                for (i, (a, row)) in acc.iter().zip(&rows).enumerate() {
                    let mut sum = super::hsum256(*a);
                    for q in full..k {
                        sum += *row.add(q) * *wr.add(q);
                    }
                    *out.ptr.add(i * out.n + j) = sum + bias.map_or(0.0, |b| b[j]);
                }
            }
        }
    }

    /// `MR` (≤ 2) rows of x against `NR_` rows of W in 8 lanes: at most 8 accumulators of the
    /// 16 registers, beside the weight vectors and one x vector.
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
        debug_assert!(NR_ <= NR);
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR_]; MR];
            let full = k - k % 8;
            let step = |acc: &mut [[__m256; NR_]; MR], p: usize| {
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
            };
            // Two steps (64 bytes of each weight row) a turn; the loop that asks for lines
            // ahead apart from the one that does not, so neither tests `ahead` a step. A
            // mamba-130m step capped at AVX2 (three rounds alternated with one step a turn,
            // 2026-12-06): batch 16 346.2-349.5 → 354.8-361.6 tok/s, batch 32 424.0-451.0 →
            // 450.9-460.9, batch 1 the same; in_proj alone at 32 rows, weights in cache
            // (`examples/linear_shapes f32`), 162.3 → 183.4 GFLOP/s.
            let pairs = k - k % 16;
            let mut p = 0;
            if ahead > 0 {
                while p < pairs {
                    crate::simd::prefetch_rows(w, NR_, k, p, ahead);
                    step(&mut acc, p);
                    step(&mut acc, p + 8);
                    p += 16;
                }
            } else {
                while p < pairs {
                    step(&mut acc, p);
                    step(&mut acc, p + 8);
                    p += 16;
                }
            }
            if p < full {
                crate::simd::prefetch_rows(w, NR_, k, p, ahead);
                step(&mut acc, p);
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
    /// the [`WHOLE_ROWS`] taken at once) and a `k` with a single 8-lane step and a scalar tail
    /// after its pairs of steps.
    #[test]
    fn the_kernel_matches_the_naive_product() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let (k, n) = (45, 11);
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
