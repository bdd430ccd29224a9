//! Linear layers in int8 (`--dtype int8` on the CPU) as LLM.int8 computes them (Dettmers et
//! al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", 2022, §3):
//!
//! - weights: per output row, absmax scaling, `sw_j = max_p |W_jp| / 127`, `Q_jp =
//!   round(W_jp / sw_j)` (nearest, ties to even), once at load;
//! - activations: the columns `C` where any row has `|x_ip| ≥ 6` (the outlier features) stay
//!   in floating point; the rest, per row, `sx_i = max_{p∉C} |x_ip| / 127`, `q_ip =
//!   round(x_ip / sx_i)` (0 on `C`);
//! - `out_ij = sx_i · sw_j · Σ_p q_ip Q_jp` (int32 accumulation) `+ Σ_{p∈C} x_ip · (Q_jp ·
//!   sw_j)` `+ b_j`: the outlier columns multiply the dequantized weights, as bitsandbytes'
//!   `MatMul8bitLt` does.
//!
//! `tools/gen_int8_fixtures.py` computes the same in numpy for the tests. Where the CPU has
//! AVX-512 VNNI the weights are packed in panels and the products run there
//! ([`crate::panels`], with this module's quantizers); elsewhere, here, in AVX2 against
//! `W`'s rows (`vpmaddubsw` on `|q|` and `sign(q) · Q`, which cannot saturate since every
//! value is within ±127, or AVX-VNNI's `vpdpbusd` on the same where the CPU has it), rows
//! padded with zeros to a multiple of 64 bytes.

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use crate::huge_pages::HugeBuffer;
use crate::matmul::MatRef;
use crate::skinny::Out;
use dense_outliers::dense_outlier_dots;

mod dense_outliers;

/// LLM.int8's outlier threshold: activation columns with a magnitude at least this stay in
/// floating point.
pub const OUTLIER_THRESHOLD: f32 = 6.0;

/// Bytes per padded row step.
const STEP: usize = 64;

/// `W` (`[n, k]`) quantized per row, each row padded to `k_pad` with zeros.
#[derive(Clone, Debug)]
pub struct Int8Weight {
    pub(crate) q: Arc<HugeBuffer<i8>>,
    pub(crate) scale: Arc<[f32]>,
    pub(crate) k_pad: usize,
}

impl Int8Weight {
    /// Quantizes `w` (`[n, k]` f32, row-major).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        let k_pad = k.next_multiple_of(STEP);
        let mut q = HugeBuffer::<i8>::packed(n * k_pad);
        let mut scale = vec![0.0f32; n];
        for j in 0..n {
            let row = &w[j * k..(j + 1) * k];
            let s = weight_scale(row);
            scale[j] = s;
            for (d, &v) in q[j * k_pad..][..k].iter_mut().zip(row) {
                *d = quantize_weight(v, s);
            }
        }
        Int8Weight {
            q: q.into(),
            scale: scale.into(),
            k_pad,
        }
    }

    pub fn size_bytes(&self) -> usize {
        self.q.len() + self.scale.len() * 4
    }

    /// Row `j` as quantized, `k_pad` values (zeros past `k`) (the tests' reference reads it).
    #[cfg(test)]
    pub(crate) fn row(&self, j: usize) -> &[i8] {
        &self.q[j * self.k_pad..(j + 1) * self.k_pad]
    }

    /// Row `j` dequantized (`Q_jp · sw_j`, `k` values).
    pub fn row_f32(&self, j: usize, dst: &mut [f32]) {
        let s = self.scale[j];
        for (d, &q) in dst.iter_mut().zip(&self.q[j * self.k_pad..]) {
            *d = q as f32 * s;
        }
    }
}

/// `sw_j` of a weight row: its absmax over 127.
pub(crate) fn weight_scale(row: &[f32]) -> f32 {
    row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0
}

/// `Q_jp = round(W_jp / sw_j)` (nearest, ties to even); 0 in a row of zeros. (`|W_jp /
/// sw_j| ≤ 127`, well inside `round_to_even`'s range; `round_ties_even` here was a libm call
/// per weight, a quarter of an int8 load's time.)
pub(crate) fn quantize_weight(v: f32, scale: f32) -> i8 {
    if scale > 0.0 {
        round_to_even(v / scale).clamp(-127.0, 127.0) as i8
    } else {
        0
    }
}

/// The activations of one call, quantized for [`block`] or the panel kernel.
pub struct Int8Activations {
    /// `[rows, k_pad]`, 0 on the outlier columns and the padding.
    pub(crate) q: Vec<i8>,
    /// `sx_i` per row.
    pub(crate) scale: Vec<f32>,
    /// The outlier columns `C`, ascending.
    pub(crate) outliers: Vec<usize>,
    /// `x_ip` for `p ∈ C`: `[rows, |C|]` when they are few, or `[rows, k_pad]` with zeros
    /// off `C` when they are many (then a vector pass over every column is cheaper than
    /// visiting each outlier).
    pub(crate) outlier_values: Vec<f32>,
    pub(crate) dense: bool,
    pub(crate) k_pad: usize,
}

/// Outlier columns above this share of the width take the dense pass.
const DENSE_OUTLIERS: usize = 64;

impl Int8Activations {
    /// The outlier columns LLM.int8 keeps in floating point.
    pub fn outliers(&self) -> &[usize] {
        &self.outliers
    }

    /// Whether the rows `rows` quantized to zeros alone (each row's scale is 0: every
    /// column is an outlier or zero), so that their int8 product adds exactly nothing.
    pub(crate) fn no_inliers(&self, rows: Range<usize>) -> bool {
        self.scale[rows].iter().all(|&s| s == 0.0)
    }
}

/// Quantizes `x` against weights padded to `k_pad`.
pub fn quantize(x: MatRef<'_>, k_pad: usize) -> Int8Activations {
    quantize_as(x, k_pad, true)
}

/// As [`quantize`], with the outlier values always `[rows, |C|]`: the panel kernel multiplies
/// the outlier columns one by one however many they are.
pub(crate) fn quantize_compact(x: MatRef<'_>, k_pad: usize) -> Int8Activations {
    quantize_as(x, k_pad, false)
}

fn quantize_as(x: MatRef<'_>, k_pad: usize, dense_when_many: bool) -> Int8Activations {
    let k = x.cols;
    let row = |i: usize| &x.data[i * x.row_stride..][..k];
    // A prefill chunk's rows are quantized on the pool, where a single thread would leave the
    // others waiting before the product (a tenth of an int8 prefill's time, `perf`).
    let parallel = x.rows >= 2 * QUANTIZE_ROWS_PER_TASK && rayon::current_num_threads() > 1;
    // Each column's largest magnitude, a row at a time (a pass that vectorises; a NaN is
    // never an outlier, as `NaN ≥ 6` is false).
    let column_max = if parallel {
        (0..x.rows)
            .into_par_iter()
            .with_min_len(QUANTIZE_ROWS_PER_TASK)
            .fold(
                || vec![0.0f32; k],
                |mut max, i| {
                    column_abs_max(&mut max, row(i));
                    max
                },
            )
            .reduce_with(|mut a, b| {
                column_abs_max(&mut a, &b);
                a
            })
            .unwrap_or_else(|| vec![0.0; k])
    } else {
        let mut max = vec![0.0f32; k];
        for i in 0..x.rows {
            column_abs_max(&mut max, row(i));
        }
        max
    };
    let is_outlier: Vec<bool> = column_max.iter().map(|&m| m >= OUTLIER_THRESHOLD).collect();
    let outliers: Vec<usize> = (0..k).filter(|&p| is_outlier[p]).collect();
    let dense = dense_when_many && outliers.len() * DENSE_OUTLIERS > k;
    let mut q = vec![0i8; x.rows * k_pad];
    let mut scale = vec![0.0f32; x.rows];
    let per_row = if dense { k_pad } else { outliers.len() };
    let mut outlier_values = vec![0.0f32; x.rows * per_row];
    // Row i: its scale, its quantized values, its outlier values.
    let quantize_one = |i: usize, q: &mut [i8], s: &mut f32| {
        let values = row(i);
        *s = inlier_abs_max(values, &is_outlier) / 127.0;
        if *s > 0.0 {
            quantize_row(values, &is_outlier, *s, &mut q[..k]);
        }
    };
    let keep_outliers = |i: usize, dst: &mut [f32]| {
        let values = row(i);
        if dense {
            for &p in &outliers {
                dst[p] = values[p];
            }
        } else {
            for (d, &p) in dst.iter_mut().zip(&outliers) {
                *d = values[p];
            }
        }
    };
    // (`max(1)`: a `k_pad` or `per_row` of 0 leaves nothing to write, and zero-length
    // chunks would panic.)
    if parallel {
        let rows = q.par_chunks_mut(k_pad.max(1)).zip(scale.par_iter_mut());
        rows.enumerate()
            .with_min_len(QUANTIZE_ROWS_PER_TASK)
            .for_each(|(i, (q, s))| quantize_one(i, q, s));
        let values = outlier_values.par_chunks_mut(per_row.max(1)).enumerate();
        values
            .with_min_len(QUANTIZE_ROWS_PER_TASK)
            .for_each(|(i, dst)| keep_outliers(i, dst));
    } else {
        let rows = q.chunks_mut(k_pad.max(1)).zip(scale.iter_mut());
        rows.enumerate()
            .for_each(|(i, (q, s))| quantize_one(i, q, s));
        let values = outlier_values.chunks_mut(per_row.max(1)).enumerate();
        values.for_each(|(i, dst)| keep_outliers(i, dst));
    }
    Int8Activations {
        q,
        scale,
        outliers,
        outlier_values,
        dense,
        k_pad,
    }
}

/// Rows of activations per task when the pool quantizes them (`quantize`): a few per share,
/// each a few microseconds of work at the mamba-130m widths.
const QUANTIZE_ROWS_PER_TASK: usize = 16;

/// `max[p] = max(max[p], |row[p]|)`.
#[inline(always)]
fn column_abs_max_body(max: &mut [f32], row: &[f32]) {
    for (m, v) in max.iter_mut().zip(row) {
        *m = m.max(v.abs());
    }
}

/// The largest `|values[p]|` off the outlier columns, in 16 lanes that vectorise.
#[inline(always)]
fn inlier_abs_max_body(values: &[f32], is_outlier: &[bool]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = values.chunks_exact(16).zip(is_outlier.chunks_exact(16));
    for (v, o) in &mut chunks {
        for ((l, v), o) in lanes.iter_mut().zip(v).zip(o) {
            *l = l.max(if *o { 0.0 } else { v.abs() });
        }
    }
    let tail = values.len() / 16 * 16;
    let rest = values[tail..].iter().zip(&is_outlier[tail..]);
    let rest = rest.fold(0.0f32, |m, (v, o)| m.max(if *o { 0.0 } else { v.abs() }));
    lanes.iter().fold(rest, |m, &l| m.max(l))
}

/// `q[p] = round(values[p] / s)` (ties to even, within ±127), 0 on the outlier columns.
#[inline(always)]
fn quantize_row_body(values: &[f32], is_outlier: &[bool], s: f32, q: &mut [i8]) {
    for ((d, &v), &o) in q.iter_mut().zip(values).zip(is_outlier) {
        let r = round_to_even(v / s).clamp(-127.0, 127.0) as i8;
        *d = if o { 0 } else { r };
    }
}

crate::simd::dispatch! { fn column_abs_max(max: &mut [f32], row: &[f32]) => column_abs_max_body }
crate::simd::dispatch! {
    fn inlier_abs_max(values: &[f32], is_outlier: &[bool]) -> f32 => inlier_abs_max_body
}
crate::simd::dispatch! {
    fn quantize_row(values: &[f32], is_outlier: &[bool], s: f32, q: &mut [i8]) => quantize_row_body
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2²²` (adding and taking off
/// 1.5·2²³ leaves no fraction bits in f32, and IEEE addition rounds ties to even): the same
/// as `round_ties_even`, which is a libm call on some targets.
fn round_to_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Whether the int8 kernels run here (AVX2 at least; [`crate::cpu::simd_level`]).
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

/// Writes `out[i, j]` for every row of `x` and the output columns `cols`.
///
/// # Safety
/// [`available`] must be true; `x` must come from [`quantize`] with `w.k_pad`; `out.ptr`
/// must hold `rows × out.n` values with `cols` inside `0..out.n` and `w` holding `out.n` rows;
/// no other thread may write the same columns at the same time.
pub unsafe fn block(
    x: &Int8Activations,
    w: &Int8Weight,
    bias: Option<&[f32]>,
    cols: Range<usize>,
    out: Out,
) {
    debug_assert_eq!(x.k_pad, w.k_pad);
    let mut dots = [[0i32; NR]; MR_MAX];
    let mut outlier_dots = [[0.0f32; NR]; MR_MAX];
    let k = w.k_pad;
    #[cfg(target_arch = "x86_64")]
    let vnni = crate::cpu::avx_vnni();
    crate::simd::for_each_tile(x.scale.len(), cols, MR_MAX, |i, mr, j, nr| {
        // SAFETY: AVX2 (the caller's contract), AVX-VNNI where `vnni`; the tile lies inside
        // `x` and `w`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let (xp, wp) = (x.q.as_ptr().add(i * k), w.q.as_ptr().add(j * k));
            let ahead = if i == 0 { AHEAD_BYTES } else { 0 };
            if vnni {
                crate::simd::tile_match!(mr, nr, avx_vnni_tile, (xp, wp, k, &mut dots, ahead));
            } else {
                crate::simd::tile_match!(mr, nr, avx2_tile, (xp, wp, k, &mut dots, ahead));
            }
        }
        if x.dense {
            dense_outlier_dots(
                &x.outlier_values[i * k..(i + mr) * k],
                &w.q[j * k..(j + nr) * k],
                k,
                &mut outlier_dots,
            );
        }
        for (a, dot_row) in dots.iter().enumerate().take(mr) {
            let row = i + a;
            for (r, &dot) in dot_row.iter().enumerate().take(nr) {
                let col = j + r;
                let sw = w.scale[col];
                let quantized = (dot as f64 * x.scale[row] as f64 * sw as f64) as f32;
                let outlier = if x.dense {
                    outlier_dots[a][r] * sw
                } else {
                    let count = x.outliers.len();
                    let values = &x.outlier_values[row * count..][..count];
                    let q_row = &w.q[col * k..];
                    x.outliers
                        .iter()
                        .zip(values)
                        .map(|(&p, &v)| v * (q_row[p] as f32 * sw))
                        .sum()
                };
                let b = bias.map_or(0.0, |b| b[col]);
                // SAFETY: (row, col) is inside `out` (the caller's contract).
                unsafe { *out.ptr.add(row * out.n + col) = quantized + outlier + b };
            }
        }
    });
}

/// Rows of `W` per tile, and rows of x.
const NR: usize = 4;
const MR_MAX: usize = 4;

/// How far ahead of its reads a tile asks for each of its weight rows, for its first tile of
/// activation rows (the others find the rows in L1): 4 KiB. A mamba-130m step
/// (`TIDEWAY_SIMD=avx2 tideway bench --dtype int8 --batches 1,8,32`, three rounds alternated
/// with the build before, the Xeon VM, 2026-12-06): batch 1 103.3 / 103.9 / 103.8 → 130.9 /
/// 130.1 / 137.1 tok/s, batch 8 231.8 / 231.1 / 237.0 → 276.8 / 268.9 / 293.2, batch 32 +5%.
/// (2 and 8 KiB ahead did about as well as 4, in a build that asked on every tile of rows.)
const AHEAD_BYTES: usize = 4096;

/// `MR` rows of x against `NR_` rows of W in AVX2: `vpmaddubsw(|q|, sign(q) · Q)` pairs,
/// widened and summed in 32 bits ([`tile_body`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_tile<const MR: usize, const NR_: usize>(
    x: *const i8,
    w: *const i8,
    k: usize,
    dots: &mut [[i32; NR]; MR_MAX],
    ahead: usize,
) {
    // SAFETY: as this function's.
    unsafe { tile_body::<MR, NR_, false>(x, w, k, dots, ahead) }
}

/// [`avx2_tile`] with AVX-VNNI (Alder Lake and later Intel cores, Zen 5): `vpdpbusd` sums
/// four of `|q| · sign(q) · Q` into each 32-bit lane, one instruction where AVX2 takes three.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn avx_vnni_tile<const MR: usize, const NR_: usize>(
    x: *const i8,
    w: *const i8,
    k: usize,
    dots: &mut [[i32; NR]; MR_MAX],
    ahead: usize,
) {
    // SAFETY: as this function's.
    unsafe { tile_body::<MR, NR_, true>(x, w, k, dots, ahead) }
}

/// `MR` rows of x against `NR_` rows of W, 32 bytes a vector: each weight vector takes the
/// sign of the activations' (`vpsignb`) against their magnitudes, unsigned, as `vpmaddubsw`
/// and `vpdpbusd` want them; a product pair is at most 2 · 127² < 2¹⁵, so `vpmaddubsw`'s
/// 16-bit sums never saturate, and both forms give the exact integer sums. Each step (64
/// bytes of each weight row) asks for the line `ahead` bytes on.
///
/// # Safety
/// AVX2, and AVX-VNNI where `VNNI`; `x` holds `MR` rows and `w` `NR_` rows of `k` bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_body<const MR: usize, const NR_: usize, const VNNI: bool>(
    x: *const i8,
    w: *const i8,
    k: usize,
    dots: &mut [[i32; NR]; MR_MAX],
    ahead: usize,
) {
    use std::arch::x86_64::*;
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); NR_]; MR];
        let mut p = 0;
        while p < k {
            crate::simd::prefetch_rows(w, NR_, k, p, ahead);
            for half in [0, 32] {
                let mut wv = [_mm256_setzero_si256(); NR_];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_si256(w.add(r * k + p + half).cast());
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(x.add(i * k + p + half).cast());
                    let magnitude = _mm256_abs_epi8(xv);
                    for (a, v) in row.iter_mut().zip(&wv) {
                        let signed = _mm256_sign_epi8(*v, xv);
                        *a = if VNNI {
                            _mm256_dpbusd_avx_epi32(*a, magnitude, signed)
                        } else {
                            let pairs = _mm256_maddubs_epi16(magnitude, signed);
                            _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones))
                        };
                    }
                }
            }
            p += STEP;
        }
        for (i, row) in acc.iter().enumerate() {
            for (r, a) in row.iter().enumerate() {
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *a);
                dots[i][r] = lanes.iter().sum();
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The AVX2 kernel against LLM.int8's math in i64 and f64, with outlier columns, every
    /// tile shape and a `k` that needs padding. (The panel kernel, which AVX-512 VNNI CPUs
    /// run instead, has its own test in `crate::panels`.)
    #[test]
    fn the_kernel_computes_llm_int8s_product() {
        if !available() {
            return;
        }
        // Two outlier columns in 70 take the dense pass; in 300, the sparse one.
        for k in [70, 300] {
            let (m, n) = (6, 9);
            let mut x = crate::test_util::pseudo(m * k, 11, -2.0, 2.0);
            x[2 * k + 5] = 7.5; // column 5 becomes an outlier
            x[4 * k + 33] = -6.0; // and column 33 (the threshold is inclusive)
            let w = crate::test_util::pseudo(n * k, 12, -0.5, 0.5);
            let b = crate::test_util::pseudo(n, 13, -1.0, 1.0);
            let weight = Int8Weight::from_f32(&w, n, k);
            let acts = quantize(MatRef::dense(&x, m, k), weight.k_pad);
            assert_eq!(acts.outliers(), &[5, 33]);
            assert_eq!(acts.dense, k == 70);
            let mut out = vec![f32::NAN; m * n];
            let target = Out {
                ptr: out.as_mut_ptr(),
                n,
            };
            // SAFETY: AVX2 is there (`available`); `out` holds m × n, the blocks write their
            // own columns.
            unsafe {
                block(&acts, &weight, Some(&b), 0..5, target);
                block(&acts, &weight, Some(&b), 5..n, target);
            }
            let what = format!("k {k}");
            crate::test_util::assert_llm_int8(&out, &x, &acts, &weight, &b, (m, k, n), &what);
        }
    }

    /// The pool's quantization (a prefill chunk's rows) gives every value the one thread's
    /// does: the scales, the quantized rows, the outliers and their values, few and many.
    #[test]
    fn quantizing_on_the_pool_changes_nothing() {
        let (m, k) = (100, 70);
        for outliers in [
            &[][..],
            &[3usize][..],
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 69][..],
        ] {
            let mut x = crate::test_util::pseudo(m * k, 31, -3.0, 3.0);
            for (r, &p) in outliers.iter().enumerate() {
                x[(17 * r % m) * k + p] = 8.0;
            }
            x[5 * k..6 * k].fill(0.0); // a row of zeros has scale 0
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
                pool.unwrap()
                    .install(|| quantize(MatRef::dense(&x, m, k), 72))
            };
            let (one, two) = (on(1), on(2));
            assert_eq!(one.outliers, outliers);
            assert_eq!(one.outliers, two.outliers);
            assert_eq!(one.dense, two.dense);
            assert_eq!(one.q, two.q);
            assert_eq!(one.scale, two.scale);
            assert_eq!(one.outlier_values, two.outlier_values);
            assert_eq!(one.scale[5], 0.0);
            assert!(one.q[..k].iter().any(|&v| v != 0));
        }
    }
}
