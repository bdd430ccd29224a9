//! Pieces shared by several model families.

pub mod mlp;
