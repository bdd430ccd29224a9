//! Tideway's model stages.
//!
//! - [`checkpoint`] — safetensors checkpoints (one file, many files, or a sharded index),
//!   memory-mapped, with typed errors naming the tensor and shapes at fault;
//! - [`mixers`] — the sequence mixers, one module each (`mamba`), with a packed-batch forward
//!   that serves both the chunked (prefill) and the recurrent (step) form;
//! - [`models`] — whole models (embedding, blocks, head) and [`models::load_model`], which reads
//!   `config.json` and picks the model;
//! - [`tensor_parallel`] — tensor-parallel ranks and the Ladder Residual wiring.

pub mod checkpoint;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod layers;
pub mod mixers;
pub mod models;
pub mod spiking;
pub mod state_dict;
pub mod tensor_parallel;
pub mod tokenizers;

pub use error::{ForwardError, InputError, LoadError};
