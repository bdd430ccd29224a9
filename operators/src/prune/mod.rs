//! The token pruner (../shared/SPEC-MODELS.md §6): which tokens or frames go on to a model's
//! later layers. [`zero_tprune`] is Zero-TPrune's pruning layer as a plain function over
//! per-head token-mixing graphs and keys; [`baselines`] are the selections it is measured
//! against; [`frames`] gates a stream's frames.

pub mod baselines;
pub mod frames;
pub mod zero_tprune;
