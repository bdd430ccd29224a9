//! Matrix products: PyTorch's `nn.Linear` (`y = x·Wᵀ + b`, `W` stored `[out, in]` as the
//! checkpoints store it) and the small strided products of the chunkwise kernels.
//!
//! Where the CPU has AVX-512, [`Linear`] packs an f32 `W` once, at load, in panels of 64
//! outputs and runs [`crate::panels`]'s kernel for every number of rows; so do bf16 and
//! int8 weights where the CPU has AVX-512 BF16 and VNNI. Elsewhere it keeps
//! PyTorch's layout: a few rows (decoding: 1-64) run the hand-written kernel of
//! [`crate::skinny`], which streams each thread's share of `W`'s rows, and more rows run
//! through the `gemm` crate, whose packing of `W` is then a small share of the work. bf16
//! weights elsewhere and int8 weights keep rows ([`crate::bf16`], [`crate::int8`]). `examples/linear_shapes.rs`
//! measures them. Rows of `x` may be strided (a column slice of a wider activation, e.g. the
//! `dt` part of `x_proj`'s output). Every layout keeps `W` on huge pages where the OS gives
//! them ([`crate::huge_pages`]): a decode step streams all of it.

use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::bf16::Bf16Weight;
use crate::huge_pages::HugeBuffer;
use crate::int8::Int8Weight;
use crate::panels::{PanelFormat, PanelInput, PanelWeight};
use crate::skinny;
use crate::tensor::{ShapeError, Weight};

/// Below this many multiply-adds a product runs on the calling thread: handing out shares
/// costs more than it saves. (With the pool kept awake through a step, `cpu::on_compute_pool`,
/// a one-row `dt_proj` of mamba-130m, 74k, is worth splitting: f32 batch 1 +7%, 2026-12-03.)
const PARALLEL_MIN_FLOPS: usize = 1 << 16;

/// Most parts a one-row product too narrow for its columns splits its inputs into
/// ([`Linear::by_steps`]), and the fewest steps of the panels a part takes. mamba-130m's
/// `x_proj` at batch 1 (80 outputs: column shares of 64 and 16), weights from memory, two
/// threads (2026-12-05, Xeon, a temporary example, alternated): 23.1 µs whole → 16.0 in two
/// parts; `tideway bench --batches 1` f32 56.9 → 57.3 tok/s (8 pairs), bf16 +1-3% (3 pairs).
const STEP_PARTS_MAX: usize = 4;
const STEP_PART_MIN: usize = 256;

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

/// How a [`Linear`] keeps `W` on the CPU (`--dtype`): f32 as the checkpoint has it, bf16
/// ([`crate::bf16`]) or int8 as LLM.int8 quantizes it ([`crate::int8`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinearFormat {
    #[default]
    F32,
    Bf16,
    Int8,
}

impl std::str::FromStr for LinearFormat {
    type Err = String;

    /// `f32`, `bf16` or `int8` (the examples' argument; the CLI has its own `--dtype`).
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "f32" => Ok(LinearFormat::F32),
            "bf16" => Ok(LinearFormat::Bf16),
            "int8" => Ok(LinearFormat::Int8),
            other => Err(format!("{other}: f32, bf16 or int8")),
        }
    }
}

impl LinearFormat {
    /// Why this CPU cannot run the format's kernels, if it cannot (bf16 and int8 need AVX2).
    pub fn unsupported_here(self) -> Option<String> {
        let ok = match self {
            LinearFormat::F32 => true,
            LinearFormat::Bf16 => crate::bf16::available(),
            LinearFormat::Int8 => crate::int8::available(),
        };
        (!ok).then(|| {
            format!(
                "{self:?} weights on the CPU need AVX2 (the kernels use {} here); use f32",
                crate::cpu::simd_level()
            )
        })
    }
}

#[derive(Clone, Debug)]
enum Stored {
    /// f32 in PyTorch's layout: the skinny kernel for a few rows, gemm for more (CPUs
    /// without AVX-512).
    F32(Arc<HugeBuffer<f32>>),
    /// f32 (AVX-512), bf16 (AVX-512 BF16) or int8 (AVX-512 VNNI) packed in panels of 64
    /// outputs: one kernel for every row count.
    Panels(PanelWeight),
    /// bf16 in PyTorch's layout, widened in registers (CPUs with AVX2 but not AVX-512 BF16);
    /// for more than 64 rows widened a block at a time and multiplied by gemm.
    Bf16(Bf16Weight),
    /// int8 in PyTorch's layout (CPUs with AVX2 but not AVX-512 VNNI).
    Int8(Int8Weight),
}

/// A linear layer `y = x·Wᵀ + b` with `W` in PyTorch's layout (`[out, in]`), in f32, bf16 or
/// int8.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Stored,
    bias: Option<Weight>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// From PyTorch's layout: `weight` `[out, in]`, `bias` `[out]`, kept in f32. The weight is
    /// copied out of the checkpoint (whose pages are then released).
    pub fn from_torch(weight: &Weight, bias: Option<Weight>) -> Result<Self, ShapeError> {
        Self::from_torch_as(weight, bias, LinearFormat::F32)
    }

    /// As [`from_torch`](Self::from_torch), with `W` kept in `format` (the bias stays f32).
    pub fn from_torch_as(
        weight: &Weight,
        bias: Option<Weight>,
        format: LinearFormat,
    ) -> Result<Self, ShapeError> {
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
        let values = weight.as_slice();
        let weight = match format {
            LinearFormat::F32 if crate::panels::available(PanelFormat::F32) => {
                Stored::Panels(PanelWeight::from_torch(values, out_features, in_features))
            }
            LinearFormat::F32 => Stored::F32(Arc::new(HugeBuffer::packed_copy_of(values))),
            LinearFormat::Bf16 if crate::panels::available(PanelFormat::Bf16) => Stored::Panels(
                PanelWeight::from_torch_bf16(values, out_features, in_features),
            ),
            LinearFormat::Bf16 => {
                Stored::Bf16(Bf16Weight::from_f32(values, out_features, in_features))
            }
            LinearFormat::Int8 if crate::panels::available(PanelFormat::Int8) => Stored::Panels(
                PanelWeight::from_torch_int8(values, out_features, in_features),
            ),
            LinearFormat::Int8 => {
                Stored::Int8(Int8Weight::from_f32(values, out_features, in_features))
            }
        };
        Ok(Linear {
            weight,
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

    pub fn format(&self) -> LinearFormat {
        match &self.weight {
            Stored::F32(_) => LinearFormat::F32,
            Stored::Panels(w) => match w.format() {
                PanelFormat::F32 => LinearFormat::F32,
                PanelFormat::Bf16 => LinearFormat::Bf16,
                PanelFormat::Int8 => LinearFormat::Int8,
            },
            Stored::Bf16(_) => LinearFormat::Bf16,
            Stored::Int8(_) => LinearFormat::Int8,
        }
    }

    /// Bytes of the weight as kept (int8: with its scales) and the bias.
    pub fn size_bytes(&self) -> usize {
        let weight = match &self.weight {
            Stored::F32(w) => std::mem::size_of_val(&***w),
            Stored::Panels(w) => w.size_bytes(),
            Stored::Bf16(w) => w.size_bytes(),
            Stored::Int8(w) => w.size_bytes(),
        };
        weight + self.bias.as_ref().map_or(0, Weight::size_bytes)
    }

    /// PyTorch's layout: `W` `[out, in]` row-major in f32 (bf16 and int8 weights widened and
    /// dequantized), and the bias (for uploading the layer to a device).
    pub fn to_torch(&self) -> (Vec<f32>, Option<Vec<f32>>) {
        let w = match &self.weight {
            Stored::F32(w) => w.to_vec(),
            _ => {
                let mut w = vec![0.0f32; self.out_features * self.in_features];
                for (j, row) in w.chunks_exact_mut(self.in_features.max(1)).enumerate() {
                    self.torch_weight_row(j, row);
                }
                w
            }
        };
        (w, self.bias.as_ref().map(|b| b.as_slice().to_vec()))
    }

    /// Copies row `j` of PyTorch's `W` (`[in]` values, as kept: bf16 widened, int8
    /// dequantized) into `dst`: a tied embedding reads its rows from the LM head this way
    /// instead of keeping a second copy.
    pub fn torch_weight_row(&self, j: usize, dst: &mut [f32]) {
        assert!(j < self.out_features && dst.len() == self.in_features);
        match &self.weight {
            Stored::F32(w) => dst.copy_from_slice(&w[j * self.in_features..][..self.in_features]),
            Stored::Panels(w) => w.row_f32(j, dst),
            Stored::Bf16(w) => w.row_f32(j, dst),
            Stored::Int8(w) => w.row_f32(j, dst),
        }
    }

    /// The panel kernel's product of `x` into `target`, every one of whose `M × out`
    /// values it writes before it reads any (a product in several blocks of `k` reads back
    /// only what its first block wrote), so `target` may hold anything, even memory never
    /// initialised.
    ///
    /// # Safety
    /// `target.ptr` points at `x.rows × w`'s outputs values that no one else reads or writes
    /// meanwhile (`target.n` the outputs); `x` has `w`'s inputs as columns, and rows and
    /// outputs are not zero.
    unsafe fn forward_panels(
        w: &PanelWeight,
        x: MatRef<'_>,
        bias: Option<&[f32]>,
        big: bool,
        target: skinny::Out,
    ) {
        let (m, n) = (x.rows, target.n);
        let x = PanelInput::for_weight(x, w);
        if let Some(parts) = step_parts(w, m, n).filter(|_| big) {
            // SAFETY: as below; one row, `n` outputs.
            return unsafe { Self::by_steps(&x, w, bias, parts, target) };
        }
        // SAFETY: panel layers exist only where the CPU runs their format's kernel
        // (`from_torch_as`); `x` was prepared for `w`; `target` holds m × n (the caller's
        // contract), and each block gets its own rows and columns, the columns starting at a
        // panel.
        shares::by_tiles(m, n, big, x.row_align(), |rows, cols| unsafe {
            crate::panels::block(&x, w, bias, rows, cols, target)
        });
    }

    /// One row of `w`'s product in `parts` parts of its inputs on the pool's threads: part 0
    /// into `target` with the bias, the others into outputs of their own, added in order after.
    ///
    /// # Safety
    /// As [`Self::forward_panels`]'s, for one row; `parts` from [`step_parts`].
    unsafe fn by_steps(
        x: &PanelInput<'_>,
        w: &PanelWeight,
        bias: Option<&[f32]>,
        parts: usize,
        target: skinny::Out,
    ) {
        let (n, steps) = (target.n, w.steps());
        let mut partials = [0.0f32; (STEP_PARTS_MAX - 1) * 2 * crate::panels::PANEL];
        let base = partials.as_mut_ptr();
        let outs: [skinny::Out; STEP_PARTS_MAX] = std::array::from_fn(|p| match p {
            0 => target,
            _ => skinny::Out {
                ptr: base.wrapping_add((p - 1) * n),
                n,
            },
        });
        (0..parts).into_par_iter().for_each(|p| {
            let part = p * steps / parts..(p + 1) * steps / parts;
            let bias = bias.filter(|_| p == 0);
            // SAFETY: the caller's contract for `target`; `partials` holds `n` ≤ 2 panels of
            // outputs for each other part (`step_parts`), each written by its part alone.
            unsafe {
                let walk = crate::panels::one_row_walk();
                crate::panels::block_steps(x, w, bias, 0..1, (0..n, part), outs[p], walk)
            }
        });
        // SAFETY: `target` holds the row's `n` outputs, all written by part 0.
        let out = unsafe { std::slice::from_raw_parts_mut(target.ptr, n) };
        for part in partials.chunks_exact(n).take(parts - 1) {
            out.iter_mut().zip(part).for_each(|(o, v)| *o += v);
        }
    }

    /// `(M, in, out)` of a product of `x`, which must have `in` columns.
    fn shapes(&self, x: MatRef<'_>) -> (usize, usize, usize) {
        x.check();
        let (m, k, n) = (x.rows, self.in_features, self.out_features);
        assert_eq!(
            x.cols, k,
            "input has {} columns, the layer takes {k}",
            x.cols
        );
        (m, k, n)
    }

    /// Whether an `M × in × out` product runs on the pool's threads (a model's step can ask
    /// this of its widest product before it enters the pool at all).
    pub fn parallel(m: usize, k: usize, n: usize) -> bool {
        m * n * k >= PARALLEL_MIN_FLOPS && rayon::current_num_threads() > 1
    }

    /// `x[M, in] · Wᵀ (+ b)` in a new `[M, out]` buffer. Where the panel kernel runs, it is
    /// written once, by the product: [`Self::forward`] into a zeroed buffer writes it twice,
    /// and a 512-token prefill's logits are 103 MB (mamba-130m), whose zeros took ~8 ms.
    pub fn forward_new(&self, x: MatRef<'_>) -> Vec<f32> {
        let (m, k, n) = self.shapes(x);
        match &self.weight {
            Stored::Panels(w) if m > 0 && k > 0 && n > 0 => {
                let mut out = Vec::with_capacity(m * n);
                let big = Self::parallel(m, k, n);
                let target = skinny::Out {
                    ptr: out.as_mut_ptr(),
                    n,
                };
                let bias = self.bias.as_ref().map(Weight::as_slice);
                // SAFETY: `out` has room for m × n values and is this function's alone; the
                // shapes are checked above; the product writes all m × n values
                // (`forward_panels`), so they are initialised when the length covers them.
                unsafe {
                    Self::forward_panels(w, x, bias, big, target);
                    out.set_len(m * n);
                }
                out
            }
            _ => {
                let mut out = vec![0.0f32; m * n];
                self.forward(x, &mut out);
                out
            }
        }
    }

    /// `out[M, out] = x[M, in] · Wᵀ (+ b)`, overwriting `out`.
    ///
    /// Panics when the shapes disagree (a programming error, never user input: loaders check
    /// checkpoint shapes before any product runs).
    pub fn forward(&self, x: MatRef<'_>, out: &mut [f32]) {
        let (m, k, n) = self.shapes(x);
        assert!(out.len() >= m * n, "output is shorter than [{m}, {n}]");
        let out = &mut out[..m * n];
        if m == 0 || n == 0 {
            return;
        }
        let bias = self.bias.as_ref().map(Weight::as_slice);
        if k == 0 {
            for row in out.chunks_exact_mut(n) {
                match bias {
                    Some(b) => row.copy_from_slice(b),
                    None => row.fill(0.0),
                }
            }
            return;
        }
        let big = Self::parallel(m, k, n);
        let target = skinny::Out {
            ptr: out.as_mut_ptr(),
            n,
        };
        let w = match &self.weight {
            Stored::F32(w) => w,
            Stored::Bf16(w) if m > skinny::MAX_ROWS => {
                // SAFETY: `out` holds m × n and each block gets its own columns; `w` holds
                // the layer's n rows of k inputs.
                shares::by_columns(n, 16, big, |cols| unsafe {
                    crate::bf16::block_widened(x, w, bias, cols, target)
                });
                return;
            }
            Stored::Bf16(w) => {
                let x = crate::bf16::widen_input(x, w.k_pad);
                // SAFETY: bf16 layers exist only where the CPU runs the kernel
                // (`LinearFormat::unsupported_here`); `x` was prepared for `w`; `out` holds
                // m × n and each block gets its own columns.
                shares::by_columns(n, 16, big, |cols| unsafe {
                    crate::bf16::block(&x, m, w, bias, cols, target)
                });
                return;
            }
            Stored::Int8(w) => {
                let x = crate::int8::quantize(x, w.k_pad);
                // SAFETY: as for bf16.
                shares::by_columns(n, 16, big, |cols| unsafe {
                    crate::int8::block(&x, w, bias, cols, target)
                });
                return;
            }
            Stored::Panels(w) => {
                // SAFETY: `target` holds m × n values (`out`, a unique borrow).
                unsafe { Self::forward_panels(w, x, bias, big, target) };
                return;
            }
        };
        if m <= skinny::MAX_ROWS && skinny::available() {
            // SAFETY: `available` said the CPU runs the kernel; `out` holds m × n, `w` n × k
            // (the layer's own shapes), and each block gets its own columns.
            shares::by_columns(n, 16, big, |cols| unsafe {
                skinny::block(x, w, bias, cols, target)
            });
            return;
        }
        let read_dst = match bias {
            Some(b) => {
                for row in out.chunks_exact_mut(n) {
                    row.copy_from_slice(b);
                }
                true
            }
            None => false,
        };
        let parallelism = if big {
            Parallelism::Rayon(rayon::current_num_threads())
        } else {
            Parallelism::None
        };
        // gemm packs W on every call, which costs a share that shrinks as the rows grow.
        // SAFETY: `x` holds m × k (checked by `MatRef::check`), `w` n × k and `out` m × n;
        // `out` is a unique borrow, so it cannot alias the inputs.
        unsafe {
            gemm_rows(
                x,
                w.as_ptr(),
                n,
                (out.as_mut_ptr(), n),
                read_dst,
                parallelism,
            )
        };
    }
}

/// `out[i, j] (+)= Σ_p x[i, p]·W[j, p]` by the gemm crate for the `n` rows of `W` (`[n,
/// x.cols]`, row-major) at `w`, `out`'s rows `out_stride` apart, added to what `out` holds
/// where `read_dst`. gemm computes `dst = alpha·dst + beta·lhs·rhs` over strided matrices
/// (column stride first): here `outᵀ = W·xᵀ`, with lhs = `W` as stored, rhs = `xᵀ` and dst =
/// `outᵀ`, by swapped strides.
///
/// # Safety
/// `w` holds `n × x.cols` values and `out` `x.rows` rows of `n` values, `out_stride` apart,
/// written by no one else meanwhile and aliasing neither input.
pub(crate) unsafe fn gemm_rows(
    x: MatRef<'_>,
    w: *const f32,
    n: usize,
    (out, out_stride): (*mut f32, usize),
    read_dst: bool,
    parallelism: Parallelism,
) {
    unsafe {
        gemm::gemm(
            n,
            x.rows,
            x.cols,
            out,
            out_stride as isize,
            1,
            read_dst,
            w,
            1,
            x.cols as isize,
            x.data.as_ptr(),
            x.row_stride as isize,
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

/// The parts [`Linear::by_steps`] splits an `m`-row product over `w` into: one row of f32 or
/// bf16 weights whose `n` outputs, at most two panels, are fewer than a panel a thread (their
/// column shares would leave threads idle), in a part a thread of at least [`STEP_PART_MIN`]
/// steps; `None` where the columns split as usual.
fn step_parts(w: &PanelWeight, m: usize, n: usize) -> Option<usize> {
    let (threads, panel) = (rayon::current_num_threads(), crate::panels::PANEL);
    let narrow = n < panel * threads && n <= 2 * panel;
    if m != 1 || !narrow || w.format() == PanelFormat::Int8 {
        return None;
    }
    let parts = threads.min(STEP_PARTS_MAX).min(w.steps() / STEP_PART_MIN);
    (parts >= 2).then_some(parts)
}

mod shares;
mod small;
pub use small::{Strided, matmul_small};

#[cfg(test)]
mod tests;
