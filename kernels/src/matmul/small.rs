//! Small products over strided views (a transposed operand is its strides swapped), on the
//! calling thread: the per-head products of the chunkwise kernels ([`crate::delta_rule`]).

use gemm::Parallelism;

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
