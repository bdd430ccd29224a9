//! Pieces shared by several model families.

pub mod mlp;
pub mod short_conv;
