//! Matrix products through the `gemm` crate.
//!
//! The one product a model layer needs is PyTorch's `nn.Linear`: `y = x·Wᵀ + b` with `W`
//! stored row-major as `[out, in]`. Rows of `x` may be strided (a column slice of a wider
//! activation, e.g. the `dt` part of `x_proj`'s output).

use gemm::Parallelism;

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
            data: &data[start..],
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

/// `out[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N])`, overwriting `out`.
///
/// Panics when the slices are too short for the stated shapes (a programming error, never
/// user input: loaders check checkpoint shapes before any product runs).
pub fn linear(x: MatRef<'_>, w: &[f32], n: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    x.check();
    let (m, k) = (x.rows, x.cols);
    assert_eq!(w.len(), n * k, "weight is not [{n}, {k}]");
    assert!(out.len() >= m * n, "output is shorter than [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    let out = &mut out[..m * n];
    let read_dst = match bias {
        Some(b) => {
            assert_eq!(b.len(), n, "bias is not [{n}]");
            for row in out.chunks_exact_mut(n) {
                row.copy_from_slice(b);
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
    let parallelism = if m * n * k >= PARALLEL_MIN_FLOPS && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // gemm computes dst = alpha·dst + beta·lhs·rhs over strided matrices. Here lhs = x
    // (M×K, row stride `row_stride`), rhs = Wᵀ (K×N: element (k, n) sits at w[n·K + k]).
    // SAFETY: the asserts above keep every index the strides reach inside the slices, and
    // `out` does not alias the inputs (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            x.data.as_ptr(),
            1,
            x.row_stride as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_naive_product_with_bias_and_strides() {
        for &(m, k, n) in &[(1, 7, 5), (3, 64, 33), (65, 70, 129), (1, 768, 300)] {
            let stride = k + 3;
            let x = pseudo(m * stride, 1);
            let w = pseudo(n * k, 2);
            let b = pseudo(n, 3);
            let mut out = vec![f32::NAN; m * n];
            linear(
                MatRef {
                    data: &x,
                    rows: m,
                    cols: k,
                    row_stride: stride,
                },
                &w,
                n,
                Some(&b),
                &mut out,
            );
            let want = naive(&x, m, k, stride, &w, n);
            for i in 0..m * n {
                let expect = want[i] + b[i % n];
                assert!(
                    (out[i] - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                    "({m},{k},{n})[{i}]: {} vs {expect}",
                    out[i]
                );
            }
            let mut plain = vec![f32::NAN; m * n];
            linear(
                MatRef::columns(&x, m, stride, 0, k),
                &w,
                n,
                None,
                &mut plain,
            );
            for i in 0..m * n {
                assert!((plain[i] - want[i]).abs() <= 1e-4 * (1.0 + want[i].abs()));
            }
        }
    }
}
