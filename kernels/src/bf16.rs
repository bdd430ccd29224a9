//! Linear layers with bf16 weights (`--dtype bf16` on the CPU) where the CPU lacks AVX-512
//! BF16: `out = x·Wᵀ + b` with `W` rounded to bf16 once, at load, in PyTorch's layout, and
//! streamed at half of f32's bytes; each weight is widened to f32 in registers (AVX2+FMA)
//! and multiplied with the f32 activations. Rows of `W` are padded with zeros to a multiple
//! of 32 so that the kernel never handles a ragged tail. More than 64 rows of activations (a
//! prefill chunk) take `W` widened to f32 a block at a time and multiplied by gemm instead
//! ([`block_widened`]).
//!
//! With AVX-512 BF16 the weights are packed in panels instead and the activations rounded
//! to bf16 too, as PyTorch's bf16 inference rounds them ([`crate::panels`]).

use std::ops::Range;

use crate::huge_pages::HugeBuffer;
use crate::matmul::MatRef;
use crate::skinny::Out;

/// Weights per padded row step.
const STEP: usize = 32;

/// How far ahead of its reads a tile asks for each of its weight rows, for its first tile of
/// activation rows (the others find the rows in L1): 2 KiB. A mamba-130m step
/// (`TIDEWAY_SIMD=avx2 tideway bench --dtype bf16 --batches 1,8,32`, three rounds alternated
/// with the build before, the Xeon VM, 2026-12-06): batch 1 59.8 / 60.1 / 61.1 → 93.7 / 86.9 /
/// 95.0 tok/s, batch 8 233.6 / 232.2 / 240.7 → 317.2 / 309.4 / 326.8, batch 32 +11%. (1 KiB
/// ahead read 79-81 at batch 1 and 4 KiB 80, in a build that asked on every tile of rows.)
const AHEAD_BYTES: usize = 2048;

/// How far ahead [`avx2::whole_rows`] (one weight row against 6-8 rows of activations) asks
/// for the row's lines into L2 as well: 32 KiB, as f32's (`skinny::WHOLE_ROWS_AHEAD`). A
/// mamba-130m step (`TIDEWAY_SIMD=avx2 tideway bench --dtype bf16 --batches 6,8`, the Xeon
/// VM, 2026-12-06, three rounds alternated with none): batch 8 336.7 / 347.5 / 367.9 → 372.6
/// / 387.2 / 412.7 tok/s, batch 6 312.9 / 305.3 / 302.9 → 334.8 / 355.9 / 340.5. (Measured
/// with the requests in the inlined `tile::<rows, 1>`; as `whole_rows`, its own function,
/// the same speed: batch 8 369.0-403.2 before, 376.7-394.6 after, three rounds, 13:30 UTC.)
const L2_AHEAD_BYTES: usize = 32 << 10;

/// `W` (`[n, k]`) in bf16, each row padded to `k_pad` (a multiple of 32) with zeros.
#[derive(Clone, Debug)]
pub struct Bf16Weight {
    pub(crate) bits: std::sync::Arc<HugeBuffer<u16>>,
    pub(crate) k_pad: usize,
}

impl Bf16Weight {
    /// Rounds `w` (`[n, k]` f32, row-major) to bf16 (nearest, ties to even).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        let k_pad = k.next_multiple_of(STEP);
        let mut bits = HugeBuffer::<u16>::packed(n * k_pad);
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

/// Rows of `W` widened to f32 at a time by [`block_widened`]: 128 rows, 384 KiB at mamba-130m's
/// `k` of 768, a block that gemm packs once for all the activation rows and that stays in L2.
const WIDEN_ROWS: usize = 128;

/// [`block`] for many rows of `x` (a prefill chunk): `W`'s rows `cols`, `WIDEN_ROWS` (128) at a
/// time, widened to f32 once and multiplied by gemm (on this thread) with the activations as
/// they are. The same values as [`block`]'s (each bf16 widened exactly, f32 products and
/// sums), summed in gemm's order. [`block`] widens every weight again for each pair of rows;
/// a 512-token mamba-130m prefill on AVX2 ran at ~0.65 of f32's (BENCHMARKS.md, 2026-12-06).
///
/// # Safety
/// `out.ptr` must hold `x.rows × out.n` values with `cols` inside `0..out.n` and `w` holding
/// `out.n` rows of `x.cols` inputs; no other thread may write the same columns at the same
/// time.
pub unsafe fn block_widened(
    x: MatRef<'_>,
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    cols: Range<usize>,
    out: Out,
) {
    let k = x.cols;
    let mut wide = vec![0.0f32; WIDEN_ROWS.min(cols.len()) * k];
    for start in cols.clone().step_by(WIDEN_ROWS) {
        let rows = start..(start + WIDEN_ROWS).min(cols.end);
        for (j, dst) in rows.clone().zip(wide.chunks_exact_mut(k)) {
            widen_row(&w.bits[j * w.k_pad..][..k], dst);
        }
        // SAFETY: the caller's contract: these columns of `out`'s rows are this thread's.
        unsafe {
            if let Some(b) = bias {
                for i in 0..x.rows {
                    let dst =
                        std::slice::from_raw_parts_mut(out.ptr.add(i * out.n + start), rows.len());
                    dst.copy_from_slice(&b[rows.clone()]);
                }
            }
            crate::matmul::gemm_rows(
                x,
                wide.as_ptr(),
                rows.len(),
                (out.ptr.add(start), out.n),
                bias.is_some(),
                gemm::Parallelism::None,
            );
        }
    }
}

/// `bits` (bf16) widened to f32 into `dst`: a bf16 is the high half of an f32.
#[inline(always)]
fn widen_row_body(bits: &[u16], dst: &mut [f32]) {
    for (d, &b) in dst.iter_mut().zip(bits) {
        *d = f32::from_bits(u32::from(b) << 16);
    }
}

crate::simd::dispatch! { fn widen_row(bits: &[u16], dst: &mut [f32]) => widen_row_body }

/// `x` padded with zeros to `k_pad` columns, `[rows, k_pad]`, as [`block`] reads it.
pub fn widen_input(x: MatRef<'_>, k_pad: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.rows * k_pad];
    for i in 0..x.rows {
        out[i * k_pad..][..x.cols].copy_from_slice(&x.data[i * x.row_stride..][..x.cols]);
    }
    out
}

/// Writes `out[i, j]` for every row of `x` (`rows` of them, from [`widen_input`]) and the
/// output columns `cols`.
///
/// # Safety
/// [`available`] must be true; `x` must come from [`widen_input`] with `w.k_pad`; `out.ptr` must
/// hold `rows × out.n` values with `cols` inside `0..out.n` and `w` holding `out.n` rows; no
/// other thread may write the same columns at the same time.
pub unsafe fn block(
    x: &[f32],
    rows: usize,
    w: &Bf16Weight,
    bias: Option<&[f32]>,
    cols: Range<usize>,
    out: Out,
) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx2::block(x, rows, w, bias, cols, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, rows, w, bias, cols, out);
        unreachable!("the bf16 kernels need x86-64 (see `available`)");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{AHEAD_BYTES, Bf16Weight, L2_AHEAD_BYTES, Out, STEP};

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
        // As f32's row kernel: 6-8 rows at once against one weight row, `W` in one stream.
        // A mamba-130m step (`TIDEWAY_SIMD=avx2 tideway bench --dtype bf16 --batches 6,8`, the
        // Xeon VM, 2026-12-06, three rounds alternated with two rows a tile): batch 8 308.4 /
        // 302.8 / 312.3 → 360.1 / 348.0 / 365.9 tok/s, batch 6 275.7 / 257.3 / 266.5 → 306.0 /
        // 309.4 / 303.4.
        if crate::skinny::WHOLE_ROWS.contains(&rows) {
            // SAFETY: the caller's contract.
            unsafe {
                match rows {
                    6 => whole_rows::<6>(x, w, bias, cols, out),
                    7 => whole_rows::<7>(x, w, bias, cols, out),
                    _ => whole_rows::<8>(x, w, bias, cols, out),
                }
            }
            return;
        }
        let end = cols.end;
        crate::simd::for_each_tile(rows, cols, 2, |i, mr, j, nr| unsafe {
            let (xp, wp) = (x.as_ptr().add(i * k), w.bits.as_ptr().add(j * k));
            let (op, bp) = (out.ptr.add(i * n + j), bias.map(|b| b.as_ptr().add(j)));
            let ahead = if i == 0 { AHEAD_BYTES } else { 0 };
            crate::simd::prefetch_next_group(w.bits.as_ptr(), k, (rows, 2, i), (j, nr, end));
            crate::simd::tile_match!(mr, nr, tile, (xp, wp, k, bp, op, n, ahead))
        });
    }

    /// All `MR` rows of `x` (`skinny::WHOLE_ROWS`) against each weight row of `cols` in turn:
    /// `MR` accumulators; one padded step (32 weights, 64 bytes of the row) a turn of the
    /// loop, asking for the row's line [`AHEAD_BYTES`] on into L1 and [`L2_AHEAD_BYTES`] on
    /// into L2. A function of its own, not inlined, as `skinny::avx2::whole_rows` is: the
    /// f32 form inlined into its caller ran at speeds that changed from build to build.
    #[target_feature(enable = "avx2,fma")]
    #[inline(never)]
    unsafe fn whole_rows<const MR: usize>(
        x: &[f32],
        w: &Bf16Weight,
        bias: Option<&[f32]>,
        cols: Range<usize>,
        out: Out,
    ) {
        let k = w.k_pad;
        let rows: [*const f32; MR] = std::array::from_fn(|i| x[i * k..].as_ptr());
        for j in cols {
            // SAFETY: the caller's contract: `W`'s row `j` holds `k` (a multiple of `STEP`)
            // values and column `j` of `out`'s `MR` rows is this block's.
            unsafe {
                let wr = w.bits.as_ptr().add(j * k);
                let mut acc = [_mm256_setzero_ps(); MR];
                let mut p = 0;
                while p < k {
                    let line = wr.wrapping_add(p);
                    crate::simd::prefetch(line.wrapping_byte_add(AHEAD_BYTES));
                    crate::simd::prefetch_l2(line.wrapping_byte_add(L2_AHEAD_BYTES));
                    for q in (0..STEP).step_by(8) {
                        let wv = widen(wr.add(p + q));
                        for (a, row) in acc.iter_mut().zip(&rows) {
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(p + q)), wv, *a);
                        }
                    }
                    p += STEP;
                }
                for (i, a) in acc.iter().enumerate() {
                    let sum = crate::skinny::hsum256(*a);
                    *out.ptr.add(i * out.n + j) = sum + bias.map_or(0.0, |b| b[j]);
                }
            }
        }
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

    /// `MR` (≤ 2) rows of f32 x against `NR_` (≤ 4) rows of W widened, 8 lanes per step: at
    /// most 8 accumulators. Each step (64 bytes of each weight row) asks for
    /// the line `ahead` bytes on.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const MR: usize, const NR_: usize>(
        x: *const f32,
        w: *const u16,
        k: usize,
        bias: Option<*const f32>,
        out: *mut f32,
        n: usize,
        ahead: usize,
    ) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR_]; MR];
            let mut p = 0;
            while p < k {
                crate::simd::prefetch_rows(w, NR_, k, p, ahead);
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

    /// Against the f64 product of the f32 activations and the rounded weights, over every
    /// tile shape and a `k` that needs padding.
    #[test]
    fn the_kernel_matches_the_product_of_the_rounded_weights() {
        if !available() {
            return;
        }
        let (k, n) = (45, 11);
        let mut w = crate::test_util::pseudo(n * k, 4, -1.0, 1.0);
        let b = crate::test_util::pseudo(n, 5, -1.0, 1.0);
        let weight = Bf16Weight::from_f32(&w, n, k);
        for v in &mut w {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        // Rows two at a time, and `skinny::WHOLE_ROWS` at once.
        for m in [1, 2, 5, 6, 7, 8, 9] {
            let x = crate::test_util::pseudo(m * k, 3, -1.0, 1.0);
            let input = widen_input(MatRef::dense(&x, m, k), weight.k_pad);
            let mut out = vec![f32::NAN; m * n];
            let target = Out {
                ptr: out.as_mut_ptr(),
                n,
            };
            // SAFETY: the CPU has the features (`available`); the activations were widened
            // for this weight; `out` holds m × n and the two blocks write their own columns.
            unsafe {
                block(&input, m, &weight, Some(&b), 0..6, target);
                block(&input, m, &weight, Some(&b), 6..n, target);
            }
            let name = format!("bf16, {m} rows");
            crate::test_util::assert_linear_matches_f64(&out, &x, k, &w, &b, (m, k, n), &name);
        }
    }

    /// The widened blocks through gemm: against the same f64 product, with a row stride
    /// wider than `k`, a `k` that the weight pads, more columns than one widened block and
    /// column shares that start inside one, with the bias and without.
    #[test]
    fn widened_blocks_match_the_product_of_the_rounded_weights() {
        let (m, k, n) = (70, 45, 300);
        let stride = k + 3;
        let x = crate::test_util::pseudo(m * stride, 6, -1.0, 1.0);
        let mut w = crate::test_util::pseudo(n * k, 7, -1.0, 1.0);
        let b = crate::test_util::pseudo(n, 8, -1.0, 1.0);
        let weight = Bf16Weight::from_f32(&w, n, k);
        let view = MatRef {
            data: &x,
            rows: m,
            cols: k,
            row_stride: stride,
        };
        for v in &mut w {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        for bias in [Some(&b[..]), None] {
            let mut out = vec![f32::NAN; m * n];
            let target = Out {
                ptr: out.as_mut_ptr(),
                n,
            };
            // SAFETY: `out` holds m × n; the two blocks write their own columns.
            unsafe {
                block_widened(view, &weight, bias, 0..150, target);
                block_widened(view, &weight, bias, 150..n, target);
            }
            let zeros = vec![0.0; n];
            let want_bias = bias.unwrap_or(&zeros);
            crate::test_util::assert_linear_matches_f64(
                &out,
                &x,
                stride,
                &w,
                want_bias,
                (m, k, n),
                "bf16 widened",
            );
        }
    }
}
