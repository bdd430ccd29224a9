//! The token pruner (../shared/SPEC-MODELS.md §6): which tokens or frames go on to a model's
//! later layers. [`zero_tprune`] is Zero-TPrune's pruning layer as a plain function over
//! per-head token-mixing graphs and keys; [`baselines`] are the selections it is measured
//! against; [`prefill`] prunes a prompt's tokens between layers; [`frames`] gates a stream's
//! frames.

pub mod baselines;
pub mod frames;
pub mod prefill;
pub mod zero_tprune;

/// Cosine similarity of two vectors in f64 (0 when either is all zeros): the S stage's measure
/// of near-duplicate keys and the frame gate's of repeated frames.
pub(crate) fn cosine(u: &[f32], v: &[f32]) -> f64 {
    let (mut dot, mut nu, mut nv) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in u.iter().zip(v) {
        let (a, b) = (a as f64, b as f64);
        dot += a * b;
        nu += a * a;
        nv += b * b;
    }
    if nu == 0.0 || nv == 0.0 {
        return 0.0;
    }
    dot / (nu.sqrt() * nv.sqrt())
}
