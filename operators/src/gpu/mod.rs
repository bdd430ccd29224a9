//! Models on a GPU (feature `cuda`): the same checkpoints and math as the CPU models, with
//! weights (f32 or bf16) and every session's recurrent state resident on the device.
//!
//! The CPU models are the reference: `tideway gpu-check` compares the two on the committed
//! fixtures. So far the Mamba family runs here; the others stay on the CPU.

pub mod mamba;

pub use mamba::{GpuMambaLm, GpuModelError, GpuSession, load_gpu_model};
