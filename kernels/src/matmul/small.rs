//! Small products over strided views (a transposed operand is its strides swapped), on the
//! calling thread: the per-head products of the chunkwise kernels ([`crate::delta_rule`],
//! [`crate::linear_attention`]).

use crate::simd::dispatch;

/// A read-only matrix view with arbitrary strides: element `(r, c)` is
/// `data[r·row_stride + c·col_stride]`. Transposing is swapping the strides.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Strided<'a> {
    /// A dense row-major `[rows, cols]` matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Strided {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// `rows` rows of a row-major matrix whose rows are `row_stride` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Strided {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Strided {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Panics unless every element lies inside `data`.
    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "strided view runs past its data");
        }
    }
}

/// `dst = (accumulate ? dst : 0) + alpha · a · b` on the calling thread, with `dst` row-major
/// and its rows `dst_stride` apart. For the small per-head products of the chunkwise kernels,
/// which already run one (session, head) per pool thread.
///
/// Hand-written rather than the gemm crate's: gemm allocates its packing buffers on every
/// call, and with one malloc arena for the process (`tideway`'s `main`) the pool's threads
/// queued on its lock. A 512-token DeltaNet prefill makes ~37 000 of these products; a head's
/// took 0.43 ms there against 0.19 ms with an arena per thread (2026-12-05).
///
/// Each entry is the sum over `k` in ascending order, one multiply-add at a time, then
/// `alpha` times it is added to (or written over) `dst`.
pub fn matmul_small(
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    alpha: f32,
    a: Strided<'_>,
    b: Strided<'_>,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ: {k} vs {}", b.rows);
    a.check();
    b.check();
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst_stride || m == 1);
    assert!(
        dst.len() >= (m - 1) * dst_stride + n,
        "output is shorter than [{m}, {n}]"
    );
    let out = Out {
        dst,
        stride: dst_stride,
        accumulate,
        alpha,
    };
    if b.col_stride == 1 {
        rows_times_rows(out, a, b);
        return;
    }
    // A transposed `b` (its rows not contiguous): copied into dense rows first, k × n values
    // beside the product's m × k × n multiply-adds. The copy's buffer is the thread's own.
    DENSE_B.with(|buffer| {
        let mut dense = buffer.borrow_mut();
        dense.resize(k * n, 0.0);
        transpose_into(b, &mut dense);
        rows_times_rows(out, a, Strided::dense(&dense, k, n));
    });
}

thread_local! {
    /// [`matmul_small`]'s dense copy of a transposed `b`, kept for the thread's next one.
    static DENSE_B: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Strided<'_> {
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_stride + c * self.col_stride]
    }
}

/// `dense[r·n + c] = b(r, c)` for a `b` of `n` columns.
fn transpose_into(b: Strided<'_>, dense: &mut [f32]) {
    let n = b.cols;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::transpose_into(b, dense) };
    }
    for (r, row) in dense.chunks_exact_mut(n).enumerate() {
        for (c, value) in row.iter_mut().enumerate() {
            *value = b.at(r, c);
        }
    }
}

/// Where a product's entries go: `dst[i·stride + j] (+)= alpha · sum`.
struct Out<'a> {
    dst: &'a mut [f32],
    stride: usize,
    accumulate: bool,
    alpha: f32,
}

impl Out<'_> {
    /// Entries `(i, j..j + 16)`.
    #[inline(always)]
    fn put_lanes(&mut self, i: usize, j: usize, sums: &[f32; LANES]) {
        let entries: &mut [f32; LANES] = (&mut self.dst[i * self.stride + j..][..LANES])
            .try_into()
            .expect("16");
        for (entry, &sum) in entries.iter_mut().zip(sums) {
            let value = self.alpha * sum;
            *entry = if self.accumulate {
                *entry + value
            } else {
                value
            };
        }
    }

    #[inline(always)]
    fn put(&mut self, i: usize, j: usize, sum: f32) {
        let entry = &mut self.dst[i * self.stride + j];
        let value = self.alpha * sum;
        *entry = if self.accumulate {
            *entry + value
        } else {
            value
        };
    }
}

/// `sum += a · b`, lane by lane (one vector multiply-add).
#[inline(always)]
fn madd(sum: &mut [f32; LANES], a: f32, b: &[f32; LANES]) {
    for (s, &b) in sum.iter_mut().zip(b) {
        *s = a.mul_add(b, *s);
    }
}

/// Lanes of a vector register (AVX-512's f32 lanes; two AVX2 registers).
const LANES: usize = 16;

dispatch! {
    /// `a · b` with `b`'s rows contiguous, into `out`.
    fn rows_times_rows(out: Out<'_>, a: Strided<'_>, b: Strided<'_>) => rows_times_rows_body
}

/// Columns in blocks of 64, 32, then 16 (4, 2, 1 vectors), rows in groups that keep 16 or 8
/// sums in registers ([`blocks`]), then the rows left over one at a time in the same vectors;
/// the last columns that fill no block one entry at a time.
///
/// The rows left over took the entry-at-a-time loop before, along `b`'s columns: the LMU's
/// one- and two-row products (`LmuMemory::parallel`, 128 × 128) were a quarter of a server's
/// time under 300 live audio streams (`perf`, 2026-12-07).
#[inline(always)]
fn rows_times_rows_body(mut out: Out<'_>, a: Strided<'_>, b: Strided<'_>) {
    // The blocks load 16 consecutive entries of a row of `b` at once.
    assert_eq!(b.col_stride, 1, "b's rows must be contiguous");
    let (m, n) = (a.rows, b.cols);
    let mut j0 = 0;
    while j0 < n {
        let (width, rows_done) = match n - j0 {
            w if w >= 4 * LANES => {
                let grouped = blocks::<4, 4>(&mut out, a, b, j0, 0);
                (4 * LANES, blocks::<1, 4>(&mut out, a, b, j0, grouped))
            }
            w if w >= 2 * LANES => {
                let grouped = blocks::<8, 2>(&mut out, a, b, j0, 0);
                (2 * LANES, blocks::<1, 2>(&mut out, a, b, j0, grouped))
            }
            w if w >= LANES => {
                let grouped = blocks::<8, 1>(&mut out, a, b, j0, 0);
                (LANES, blocks::<1, 1>(&mut out, a, b, j0, grouped))
            }
            w => (w, 0),
        };
        for i in rows_done..m {
            for j in j0..j0 + width {
                let sum = (0..a.cols).fold(0.0f32, |s, p| a.at(i, p).mul_add(b.at(p, j), s));
                out.put(i, j, sum);
            }
        }
        j0 += width;
    }
}

/// Columns `j0..j0 + V·16` of every whole group of `R` rows from row `first` on; returns the
/// end of the rows done.
#[inline(always)]
fn blocks<const R: usize, const V: usize>(
    out: &mut Out<'_>,
    a: Strided<'_>,
    b: Strided<'_>,
    j0: usize,
    first: usize,
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::blocks::<R, V>(out, a, b, j0, first) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::blocks::<R, V>(out, a, b, j0, first) };
    }
    portable_blocks::<R, V>(out, a, b, j0, first)
}

/// [`blocks`] in plain Rust, for CPUs without AVX-512: the same multiply-adds in the same
/// order, so the same bits.
#[inline(always)]
fn portable_blocks<const R: usize, const V: usize>(
    out: &mut Out<'_>,
    a: Strided<'_>,
    b: Strided<'_>,
    j0: usize,
    first: usize,
) -> usize {
    let groups = (a.rows - first) / R;
    for group in 0..groups {
        let i0 = first + group * R;
        let mut sums = [[[0.0f32; LANES]; V]; R];
        for p in 0..a.cols {
            let b_row = &b.data[p * b.row_stride + j0..][..V * LANES];
            let b_vectors: [[f32; LANES]; V] =
                std::array::from_fn(|v| b_row[v * LANES..][..LANES].try_into().expect("16"));
            for (r, row_sums) in sums.iter_mut().enumerate() {
                let a_value = a.at(i0 + r, p);
                for (vector, b_vector) in row_sums.iter_mut().zip(&b_vectors) {
                    madd(vector, a_value, b_vector);
                }
            }
        }
        for (r, row_sums) in sums.iter().enumerate() {
            for (v, vector) in row_sums.iter().enumerate() {
                out.put_lanes(i0 + r, j0 + v * LANES, vector);
            }
        }
    }
    first + groups * R
}

/// Asserts that columns `cols` of `b`'s first `k` rows lie inside `b.data`, as the SIMD
/// blocks' unchecked loads need (every `a` entry is checked by the caller's `check`).
#[cfg(target_arch = "x86_64")]
fn assert_rows_inside(b: Strided<'_>, k: usize, cols: std::ops::Range<usize>) {
    assert!(k == 0 || (k - 1) * b.row_stride + cols.end <= b.data.len());
}

/// The blocks in AVX-512 registers: LLVM keeps the portable body's `R × V` sums on the stack
/// (a 16-row DeltaNet chunk's products took 3× as long as in registers).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{LANES, Out, Strided};

    /// [`super::transpose_into`] with each 16 entries of a row of the copy gathered at once
    /// (element by element, the copies of a 16-row DeltaNet chunk's two transposed products
    /// were a fifth of its time).
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_into(b: Strided<'_>, dense: &mut [f32]) {
        let (k, n) = (b.rows, b.cols);
        assert!(dense.len() >= k * n);
        let whole = n / LANES * LANES;
        let offsets = (i32::try_from(b.col_stride * LANES)).ok().map(|_| {
            let lanes: [i32; LANES] = std::array::from_fn(|l| (l * b.col_stride) as i32);
            // SAFETY: `lanes` holds 16 i32.
            unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
        });
        for r in 0..k {
            let row = &mut dense[r * n..(r + 1) * n];
            let mut c = 0;
            if let Some(offsets) = offsets {
                while c < whole {
                    // SAFETY: entries (r, c..c + 16) lie inside `b.data` (the caller checked the
                    // view), at these offsets from entry (r, c); the store is inside `row`.
                    unsafe {
                        let base = b.data.as_ptr().add(r * b.row_stride + c * b.col_stride);
                        let values = _mm512_i32gather_ps::<4>(offsets, base.cast());
                        _mm512_storeu_ps(row.as_mut_ptr().add(c), values);
                    }
                    c += LANES;
                }
            }
            for (c, value) in row.iter_mut().enumerate().skip(c) {
                *value = b.at(r, c);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn blocks<const R: usize, const V: usize>(
        out: &mut Out<'_>,
        a: Strided<'_>,
        b: Strided<'_>,
        j0: usize,
        first: usize,
    ) -> usize {
        let groups = (a.rows - first) / R;
        let k = a.cols;
        super::assert_rows_inside(b, k, j0..j0 + V * LANES);
        for group in 0..groups {
            let i0 = first + group * R;
            let mut sums = [[_mm512_setzero_ps(); V]; R];
            for p in 0..k {
                // SAFETY: row p's columns j0..j0 + V·16 are inside `b.data` (asserted above).
                let b_vectors: [__m512; V] = std::array::from_fn(|v| unsafe {
                    _mm512_loadu_ps(b.data.as_ptr().add(p * b.row_stride + j0 + v * LANES))
                });
                for (r, row_sums) in sums.iter_mut().enumerate() {
                    let a_value = _mm512_set1_ps(a.at(i0 + r, p));
                    for (sum, &b_vector) in row_sums.iter_mut().zip(&b_vectors) {
                        *sum = _mm512_fmadd_ps(a_value, b_vector, *sum);
                    }
                }
            }
            for (r, row_sums) in sums.iter().enumerate() {
                for (v, &sum) in row_sums.iter().enumerate() {
                    let mut lanes = [0.0f32; LANES];
                    // SAFETY: `lanes` holds 16 floats.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sum) };
                    out.put_lanes(i0 + r, j0 + v * LANES, &lanes);
                }
            }
        }
        first + groups * R
    }
}

/// The blocks in AVX2 registers, four rows (one for `R` = 1) and 16 columns (two registers)
/// at a time: 8 sums beside the two vectors of `b` and one of `a`, where the portable body's
/// `R × V` sums (up to 32 AVX2 registers' worth) live on the stack. Each entry's
/// multiply-adds are the portable body's, in its order. A 512-token GLA or DeltaNet prefill
/// capped at AVX2 spent 14-15% in the portable blocks (`perf`, 2026-12-06).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LANES, Out, Strided};

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn blocks<const R: usize, const V: usize>(
        out: &mut Out<'_>,
        a: Strided<'_>,
        b: Strided<'_>,
        j0: usize,
        first: usize,
    ) -> usize {
        const {
            assert!(
                R == 1 || R.is_multiple_of(4),
                "one row, or whole blocks of four"
            )
        };
        let end = first + (a.rows - first) / R * R;
        super::assert_rows_inside(b, a.cols, j0..j0 + V * LANES);
        if R == 1 {
            for i0 in first..end {
                block::<1>(out, a, b, i0, j0..j0 + V * LANES);
            }
        } else {
            for i0 in (first..end).step_by(4) {
                block::<4>(out, a, b, i0, j0..j0 + V * LANES);
            }
        }
        end
    }

    /// Rows `i0..i0 + S` over `columns`, 16 at a time.
    #[target_feature(enable = "avx2,fma")]
    fn block<const S: usize>(
        out: &mut Out<'_>,
        a: Strided<'_>,
        b: Strided<'_>,
        i0: usize,
        columns: std::ops::Range<usize>,
    ) {
        for j in columns.step_by(LANES) {
            let mut sums = [[_mm256_setzero_ps(); 2]; S];
            for p in 0..a.cols {
                // SAFETY: row p's columns j..j + 16 are inside `b.data` (the caller asserted
                // its columns).
                let b_vectors: [__m256; 2] = std::array::from_fn(|half| unsafe {
                    _mm256_loadu_ps(b.data.as_ptr().add(p * b.row_stride + j + 8 * half))
                });
                for (r, row_sums) in sums.iter_mut().enumerate() {
                    let a_value = _mm256_set1_ps(a.at(i0 + r, p));
                    for (sum, &b_vector) in row_sums.iter_mut().zip(&b_vectors) {
                        *sum = _mm256_fmadd_ps(a_value, b_vector, *sum);
                    }
                }
            }
            for (r, row_sums) in sums.iter().enumerate() {
                let mut lanes = [0.0f32; LANES];
                // SAFETY: `lanes` holds 16 floats, two vectors' worth.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), row_sums[0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), row_sums[1]);
                }
                out.put_lanes(i0 + r, j, &lanes);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::test_util::pseudo;

    /// The AVX-512 and AVX2 blocks and the portable ones, bit for bit, in each block shape
    /// [`rows_times_rows_body`] takes (the groups of rows from row 0, the rows left over one
    /// at a time from row 8), with a row stride wider than the block.
    #[test]
    fn the_simd_blocks_give_the_portable_bits() {
        let (m, k, n) = (16, 21, 80);
        let a = pseudo(m * k, 1, -1.0, 1.0);
        let b = pseudo(k * n, 2, -1.0, 1.0);
        let (a, b) = (Strided::dense(&a, m, k), Strided::dense(&b, k, n));
        type Blocks = fn(&mut Out<'_>, Strided<'_>, Strided<'_>, usize, usize) -> usize;
        let run = |blocks: Blocks, first: usize| {
            let mut dst = pseudo(m * n, 3, -1.0, 1.0);
            let mut out = Out {
                dst: &mut dst,
                stride: n,
                accumulate: true,
                alpha: -0.5,
            };
            assert_eq!(blocks(&mut out, a, b, 16, first), m);
            dst.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        // SAFETY (each SIMD entry): called only where the CPU has the features (below).
        let shapes: [(usize, [Blocks; 3]); 6] = [
            (
                0,
                [
                    portable_blocks::<4, 4>,
                    |o, a, b, j, f| unsafe { avx512::blocks::<4, 4>(o, a, b, j, f) },
                    |o, a, b, j, f| unsafe { avx2::blocks::<4, 4>(o, a, b, j, f) },
                ],
            ),
            (
                0,
                [
                    portable_blocks::<8, 2>,
                    |o, a, b, j, f| unsafe { avx512::blocks::<8, 2>(o, a, b, j, f) },
                    |o, a, b, j, f| unsafe { avx2::blocks::<8, 2>(o, a, b, j, f) },
                ],
            ),
            (
                0,
                [
                    portable_blocks::<8, 1>,
                    |o, a, b, j, f| unsafe { avx512::blocks::<8, 1>(o, a, b, j, f) },
                    |o, a, b, j, f| unsafe { avx2::blocks::<8, 1>(o, a, b, j, f) },
                ],
            ),
            (
                8,
                [
                    portable_blocks::<1, 4>,
                    |o, a, b, j, f| unsafe { avx512::blocks::<1, 4>(o, a, b, j, f) },
                    |o, a, b, j, f| unsafe { avx2::blocks::<1, 4>(o, a, b, j, f) },
                ],
            ),
            (
                8,
                [
                    portable_blocks::<1, 2>,
                    |o, a, b, j, f| unsafe { avx512::blocks::<1, 2>(o, a, b, j, f) },
                    |o, a, b, j, f| unsafe { avx2::blocks::<1, 2>(o, a, b, j, f) },
                ],
            ),
            (
                8,
                [
                    portable_blocks::<1, 1>,
                    |o, a, b, j, f| unsafe { avx512::blocks::<1, 1>(o, a, b, j, f) },
                    |o, a, b, j, f| unsafe { avx2::blocks::<1, 1>(o, a, b, j, f) },
                ],
            ),
        ];
        let avx512 = std::is_x86_feature_detected!("avx512f");
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        for (shape, (first, [portable, on_avx512, on_avx2])) in shapes.into_iter().enumerate() {
            let want = run(portable, first);
            if avx512 {
                assert_eq!(run(on_avx512, first), want, "AVX-512, shape {shape}");
            }
            if avx2 {
                assert_eq!(run(on_avx2, first), want, "AVX2, shape {shape}");
            }
        }
    }

    /// A row left over from the groups of rows gets the bits of the entry-at-a-time sum it
    /// took before: `k` multiply-adds in ascending order from 0, then `alpha` and the
    /// accumulation (what `LmuMemory::parallel`'s one-row products give the LMU's state).
    #[test]
    fn a_row_left_over_sums_as_one_entry_at_a_time() {
        let (m, k, n) = (5, 37, 64 + 32 + 16 + 3);
        let a = pseudo(m * k, 4, -1.0, 1.0);
        let b = pseudo(k * n, 5, -1.0, 1.0);
        let before = pseudo(m * n, 6, -1.0, 1.0);
        let mut dst = before.clone();
        matmul_small(
            &mut dst,
            n,
            true,
            0.75,
            Strided::dense(&a, m, k),
            Strided::dense(&b, k, n),
        );
        for i in 0..m {
            for j in 0..n {
                let sum = (0..k).fold(0.0f32, |s, p| a[i * k + p].mul_add(b[p * n + j], s));
                let want = before[i * n + j] + 0.75 * sum;
                assert_eq!(dst[i * n + j].to_bits(), want.to_bits(), "({i}, {j})");
            }
        }
    }
}
