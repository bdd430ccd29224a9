//! Pieces shared by several model families.

pub mod batch_norm;
pub mod frames;
pub mod head_output;
pub mod heads;
pub mod lm_ends;
pub mod mlp;
pub mod qkv;
pub mod segments;
pub mod short_conv;
