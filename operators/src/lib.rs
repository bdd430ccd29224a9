//! Tideway's model stages.
//!
//! - [`checkpoint`] — safetensors checkpoints (one file, many files, or a sharded index),
//!   memory-mapped, with typed errors naming the tensor and shapes at fault;
//! - [`models`] — one folder per family (`mamba/`, `fla/`, `lmuformer/`): its config, CPU model,
//!   mixers (each with a packed-batch forward serving both the chunked and the recurrent
//!   form) and GPU model side by side; [`models::load_model`] reads `config.json` and picks
//!   the family;
//! - [`generate`] — sampling, streamed detokenization and stop conditions for text generation;
//! - [`layers`], [`spiking`] — layers the families share;
//! - `gpu` (with `--features cuda`) — what the GPU models share (slot pools, batch layouts,
//!   the GPU model enum);
//! - [`state_tensors`], [`state_blob`] — a session's state as named tensors, and as one
//!   checked blob with what it belongs to (snapshots, export, import);
//! - [`tensor_parallel`] — tensor-parallel ranks and the Ladder Residual wiring;
//! - [`prune`] — the token pruner (Zero-TPrune's pruning layer over token-mixing graphs).

pub mod checkpoint;
pub mod error;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod layers;
pub mod logit_rows;
pub mod models;
mod pickle_lengths;
pub mod prune;
pub mod spiking;
pub mod state_blob;
pub mod state_dict;
pub mod state_tensors;
pub mod tensor_parallel;
pub mod tokenizers;

pub use error::{ForwardError, InputError, LoadError, ModelPiece};
pub use logit_rows::LogitRows;
