//! Tideway's numeric kernels.
//!
//! Everything computes in f32. Weights may arrive as bf16/f16 and are widened once, when
//! they are loaded ([`Weight`]). The weights of matrix products are copied out in PyTorch's
//! layout ([`matmul::Linear`]); other f32 weights are read in place from the memory-mapped
//! checkpoint.
//!
//! One module per kernel family:
//! - [`tensor`] — the owned [`Tensor`] and the read-only [`Weight`] storage;
//! - [`matmul`] — `y = x·Wᵀ + b`: f32 packed in [`panels`] on AVX-512, elsewhere
//!   [`skinny`]'s SIMD kernel for a few rows and the `gemm` crate for more (multi-threaded);
//!   with bf16 weights ([`bf16`]) or LLM.int8's int8 ([`int8`]);
//! - [`norm`] — RMSNorm;
//! - [`activation`] — SiLU, softplus and a vectorisable `exp`;
//! - [`argmax`] — the first largest value's index (greedy decoding);
//! - [`conv`] — causal depthwise conv1d over a sequence or one step over a rolling window;
//! - [`scan`] — the Mamba selective-scan recurrence over packed batches of sessions;
//! - [`cpu`] — what the CPU offers the kernels (SIMD level), and running a model's step on
//!   the compute pool;
//! - [`state_buffer`] — sessions' recurrent state packed on huge pages;
//! - [`collective`] — all-reduce across a tensor-parallel group (threads, TCP ring);
//! - `cuda` (feature `cuda`): CUDA devices through cudarc; `gpu`: the GPU path (NVRTC-compiled
//!   kernels from `kernels/cuda/`, cuBLAS products, f32/bf16 weights); `nccl`: the all-reduce
//!   over NCCL.

pub mod activation;
pub mod argmax;
pub mod bf16;
pub mod collective;
pub mod conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod delta_rule;
pub mod expm;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod huge_pages;
pub mod int8;
pub mod linear_attention;
pub mod matmul;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod norm;
pub mod panels;
pub mod scan;
mod simd;
pub mod skinny;
pub mod state_buffer;
pub mod tensor;
pub mod zeroed;

#[cfg(test)]
mod test_util;

pub use state_buffer::StateBuffer;
pub use tensor::{ShapeError, Tensor, Weight};
