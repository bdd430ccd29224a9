//! Sequence mixers, one module per family. Each has a config, weights with a loader, a
//! per-session state, and a packed-batch `forward` that runs every session's new rows in one
//! batched computation (one GEMM over all rows, then per-session recurrences).

pub mod deltanet;
pub mod gated_deltanet;
pub mod gla;
pub mod linear_attn;
pub mod lmu;
pub mod mamba;
pub mod retnet;
