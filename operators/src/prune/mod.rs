//! The token pruner (../shared/SPEC-MODELS.md §6): which tokens or frames go on to a model's
//! later layers. [`zero_tprune`] is Zero-TPrune's pruning layer as a plain function over
//! per-head token-mixing graphs and keys.

pub mod zero_tprune;
