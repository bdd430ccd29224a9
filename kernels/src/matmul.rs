//! Matrix products through the `gemm` crate.
//!
//! The one product a model layer needs is PyTorch's `nn.Linear`: `y = x·Wᵀ + b`, with `W`
//! stored `[out, in]` in checkpoints. [`Linear`] transposes `W` once, at load, to `[in, out]`:
//! with that layout gemm runs its microkernel straight on the weights instead of repacking
//! them on every call, which is what dominates at the small batch sizes of decoding (measured
//! with `examples/linear_shapes.rs`: 4-20× faster for 2-32 rows). Rows of `x` may be strided
//! (a column slice of a wider activation, e.g. the `dt` part of `x_proj`'s output).

use gemm::Parallelism;
use rayon::prelude::*;

use crate::tensor::{ShapeError, Weight};

/// Below this many multiply-adds a product runs on the calling thread: waking the pool
/// costs more than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// A row-major matrix view whose rows may be further apart than its width.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense `[rows, cols]` matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }

    /// Columns `start..start + cols` of a dense matrix `rows × width`.
    pub fn columns(data: &'a [f32], rows: usize, width: usize, start: usize, cols: usize) -> Self {
        MatRef {
            data: &data[start.min(data.len())..],
            rows,
            cols,
            row_stride: width,
        }
    }

    fn check(&self) {
        assert!(self.cols <= self.row_stride || self.rows <= 1);
        if self.rows > 0 {
            assert!(self.data.len() >= (self.rows - 1) * self.row_stride + self.cols);
        }
    }
}

/// A linear layer `y = x·Wᵀ + b` with `W` kept transposed (`[in, out]`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `Wᵀ`, `[in_features, out_features]`.
    weight_t: Weight,
    bias: Option<Weight>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// From PyTorch's layout: `weight` `[out, in]`, `bias` `[out]`.
    pub fn from_torch(weight: &Weight, bias: Option<Weight>) -> Result<Self, ShapeError> {
        let shape = weight.shape();
        let mismatch = || ShapeError {
            shape: shape.to_vec(),
            expected: 2,
            found: shape.len(),
        };
        let &[out_features, in_features] = shape else {
            return Err(mismatch());
        };
        if let Some(b) = &bias
            && b.len() != out_features
        {
            return Err(ShapeError {
                shape: vec![out_features],
                expected: out_features,
                found: b.len(),
            });
        }
        let weight_t = Weight::from_vec(
            transpose(weight.as_slice(), out_features, in_features),
            &[in_features, out_features],
        )?;
        Ok(Linear {
            weight_t,
            bias,
            in_features,
            out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn size_bytes(&self) -> usize {
        self.weight_t.size_bytes() + self.bias.as_ref().map_or(0, Weight::size_bytes)
    }

    /// PyTorch's layout again: `W` `[out, in]` row-major, and the bias (for uploading the
    /// layer to a device).
    pub fn to_torch(&self) -> (Vec<f32>, Option<Vec<f32>>) {
        let w = transpose(
            self.weight_t.as_slice(),
            self.in_features,
            self.out_features,
        );
        (w, self.bias.as_ref().map(|b| b.as_slice().to_vec()))
    }

    /// Copies row `j` of PyTorch's `W` (`[in]` values) into `dst`: a tied embedding reads its
    /// rows from the LM head this way instead of keeping a second copy.
    pub fn torch_weight_row(&self, j: usize, dst: &mut [f32]) {
        assert!(j < self.out_features && dst.len() == self.in_features);
        let wt = self.weight_t.as_slice();
        for (i, d) in dst.iter_mut().enumerate() {
            *d = wt[i * self.out_features + j];
        }
    }

    /// `out[M, out] = x[M, in] · Wᵀ (+ b)`, overwriting `out`.
    ///
    /// Panics when the shapes disagree (a programming error, never user input: loaders check
    /// checkpoint shapes before any product runs).
    pub fn forward(&self, x: MatRef<'_>, out: &mut [f32]) {
        x.check();
        let (m, k, n) = (x.rows, self.in_features, self.out_features);
        assert_eq!(
            x.cols, k,
            "input has {} columns, the layer takes {k}",
            x.cols
        );
        assert!(out.len() >= m * n, "output is shorter than [{m}, {n}]");
        let out = &mut out[..m * n];
        if m == 0 || n == 0 {
            return;
        }
        let read_dst = match &self.bias {
            Some(b) => {
                for row in out.chunks_exact_mut(n) {
                    row.copy_from_slice(b.as_slice());
                }
                true
            }
            None => false,
        };
        if k == 0 {
            if !read_dst {
                out.fill(0.0);
            }
            return;
        }
        let wt = self.weight_t.as_slice();
        let threads = rayon::current_num_threads();
        let big = m * n * k >= PARALLEL_MIN_FLOPS && threads > 1;
        if m == 1 && big {
            // gemm's matrix-vector path runs on one thread; a single row is bandwidth-bound,
            // so split the output columns over the pool and let each thread stream its share
            // of the weights.
            let block = n.div_ceil(4 * threads).next_multiple_of(16);
            out.par_chunks_mut(block).enumerate().for_each(|(i, dst)| {
                let n0 = i * block;
                // SAFETY: as in `product`, for the column block n0..n0 + dst.len() of Wᵀ.
                unsafe { product(x, &wt[n0..], n, dst, dst.len(), read_dst, Parallelism::None) };
            });
        } else {
            let parallelism = if big {
                Parallelism::Rayon(threads)
            } else {
                Parallelism::None
            };
            // SAFETY: see `product`.
            unsafe { product(x, wt, n, out, n, read_dst, parallelism) };
        }
    }
}

/// `dst[M, cols] (+)= x[M, K] · wt[K, cols]`, where `wt`'s rows are `wt_stride` apart and `dst`
/// is dense.
///
/// # Safety
/// `x` must hold `M × K` (checked by `MatRef::check`), `wt` at least `(K-1)·wt_stride + cols`
/// values and `dst` `M × cols`; `dst` must not alias the inputs.
unsafe fn product(
    x: MatRef<'_>,
    wt: &[f32],
    wt_stride: usize,
    dst: &mut [f32],
    cols: usize,
    read_dst: bool,
    parallelism: Parallelism,
) {
    let (m, k) = (x.rows, x.cols);
    debug_assert!(wt.len() >= (k - 1) * wt_stride + cols);
    debug_assert!(dst.len() >= m * cols);
    // gemm computes dst = alpha·dst + beta·lhs·rhs over strided matrices (column stride
    // first): lhs = x (row stride `row_stride`), rhs = Wᵀ (row stride `wt_stride`).
    unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            dst.as_mut_ptr(),
            1,
            cols as isize,
            read_dst,
            x.data.as_ptr(),
            1,
            x.row_stride as isize,
            wt.as_ptr(),
            1,
            wt_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

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
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_stride..][..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the three views were checked to lie inside their slices, and `dst` is a unique
    // borrow, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// `[rows, cols]` → `[cols, rows]`, in cache-sized tiles.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut dst = vec![0.0f32; rows * cols];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        crate::test_util::pseudo(n, seed, -1.0, 1.0)
    }

    fn naive(x: &[f32], m: usize, k: usize, stride: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    y[i * n + j] += x[i * stride + p] as f64 * w[j * k + p] as f64;
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn matches_naive_product_with_bias_and_strides() {
        // Shapes on both sides of the threading threshold, one row (the split path) included.
        for &(m, k, n) in &[
            (1, 7, 5),
            (3, 64, 33),
            (65, 70, 129),
            (1, 768, 1000),
            (2, 300, 900),
        ] {
            let stride = k + 3;
            let x = pseudo(m * stride, 1);
            let w = pseudo(n * k, 2);
            let b = pseudo(n, 3);
            let weight = Weight::from_vec(w.clone(), &[n, k]).unwrap();
            let want = naive(&x, m, k, stride, &w, n);
            let view = MatRef {
                data: &x,
                rows: m,
                cols: k,
                row_stride: stride,
            };

            let with_bias =
                Linear::from_torch(&weight, Some(Weight::from_vec(b.clone(), &[n]).unwrap()))
                    .unwrap();
            let mut out = vec![f32::NAN; m * n];
            with_bias.forward(view, &mut out);
            for i in 0..m * n {
                let expect = want[i] + b[i % n];
                assert!(
                    (out[i] - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                    "({m},{k},{n})[{i}]: {} vs {expect}",
                    out[i]
                );
            }
            let plain = Linear::from_torch(&weight, None).unwrap();
            let mut out = vec![f32::NAN; m * n];
            plain.forward(MatRef::columns(&x, m, stride, 0, k), &mut out);
            for i in 0..m * n {
                assert!((out[i] - want[i]).abs() <= 1e-4 * (1.0 + want[i].abs()));
            }
            let mut row = vec![0.0; k];
            plain.torch_weight_row(n - 1, &mut row);
            assert_eq!(row, &w[(n - 1) * k..]);
        }
    }

    #[test]
    fn small_product_over_strided_and_transposed_views() {
        let (m, k, n) = (5, 7, 6);
        let a = pseudo(k * m, 4); // stored transposed: [k, m]
        let b = pseudo(k * (n + 2), 5); // [k, n] inside rows of n + 2
        let mut dst = pseudo(m * (n + 1), 6);
        let before = dst.clone();
        let a_view = Strided::dense(&a, k, m).t();
        let b_view = Strided::rows(&b, k, n, n + 2);
        matmul_small(&mut dst, n + 1, true, -0.5, a_view, b_view);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| a[p * m + i] as f64 * b[p * (n + 2) + j] as f64)
                    .sum();
                let want = before[i * (n + 1) + j] as f64 - 0.5 * dot;
                let got = dst[i * (n + 1) + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
            // The padding column between rows is untouched.
            assert_eq!(dst[i * (n + 1) + n], before[i * (n + 1) + n]);
        }
        matmul_small(&mut dst, n + 1, false, 2.0, a_view, b_view);
        let dot: f64 = (0..k)
            .map(|p| a[p * m] as f64 * b[p * (n + 2)] as f64)
            .sum();
        assert!((dst[0] as f64 - 2.0 * dot).abs() <= 1e-5);
    }

    #[test]
    fn rejects_bias_of_wrong_length() {
        let w = Weight::from_vec(vec![0.0; 6], &[3, 2]).unwrap();
        let b = Weight::from_vec(vec![0.0; 2], &[2]).unwrap();
        assert!(Linear::from_torch(&w, Some(b)).is_err());
    }
}
