//! `nn.BatchNorm1d` in inference form: `y = (x − μ)/√(σ² + ε)·γ + β` per channel, folded as
//! PyTorch's CPU kernel folds it (`α = γ/√(σ² + ε)`, `β' = β − μ·α`, `y = x·α + β'`).

use crate::error::LoadError;
use crate::state_dict::StateDict;

/// PyTorch's default `eps`.
const EPS: f32 = 1e-5;

#[derive(Debug, Clone)]
pub struct BatchNorm {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl BatchNorm {
    /// `{prefix}.weight`, `.bias`, `.running_mean`, `.running_var`, each `[channels]`.
    pub fn load(dict: &StateDict, prefix: &str, channels: usize) -> Result<Self, LoadError> {
        let get = |field: &str| dict.load(&format!("{prefix}.{field}"), &[channels]);
        let (gamma, beta) = (get("weight")?, get("bias")?);
        let (mean, var) = (get("running_mean")?, get("running_var")?);
        let mut scale = Vec::with_capacity(channels);
        let mut shift = Vec::with_capacity(channels);
        for c in 0..channels {
            let invstd = 1.0 / (var.as_slice()[c] + EPS).sqrt();
            let alpha = gamma.as_slice()[c] * invstd;
            scale.push(alpha);
            shift.push(beta.as_slice()[c] - mean.as_slice()[c] * alpha);
        }
        Ok(BatchNorm { scale, shift })
    }

    /// The folded per-channel `(α, β')`.
    pub fn folded(&self) -> (&[f32], &[f32]) {
        (&self.scale, &self.shift)
    }

    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// Normalises every `channels`-wide row of `x` in place.
    pub fn apply(&self, x: &mut [f32]) {
        for row in x.chunks_exact_mut(self.scale.len()) {
            for ((v, &a), &b) in row.iter_mut().zip(&self.scale).zip(&self.shift) {
                *v = *v * a + b;
            }
        }
    }
}
