//! fla's `GatedMLP` (`fla/modules/mlp.py`): `down(silu(gate(x)) ⊙ up(x))`, no biases
//! (`shared/SPEC-MODELS.md` §3.0).

use tideway_kernels::Weight;
use tideway_kernels::activation::silu_mul_inplace;
use tideway_kernels::matmul::{Linear, MatRef};

use crate::checkpoint::{Checkpoint, Split};
use crate::error::LoadError;

pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    intermediate: usize,
}

impl GatedMlp {
    /// Loads `{prefix}gate_proj`, `up_proj`, `down_proj`. Checkpoints written before fla
    /// b48ca31d (2025-02) have no `up_proj` and a fused `gate_proj [2I, D]`: rows `[0, I)`
    /// are the gate, `[I, 2I)` the up projection.
    ///
    /// On a tensor-parallel rank `intermediate` is the rank's share `I/tp`: gate and up are
    /// column-parallel, down row-parallel ([`mlp_split`]), so `forward` gives a partial output
    /// whose sum over the group is the whole MLP's.
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self, LoadError> {
        let name = |s: &str| format!("{prefix}{s}");
        let (gate, up) = if checkpoint.contains(&name("up_proj.weight")) {
            (
                checkpoint.load_linear(&name("gate_proj.weight"), None, intermediate, hidden)?,
                checkpoint.load_linear(&name("up_proj.weight"), None, intermediate, hidden)?,
            )
        } else {
            let fused = checkpoint.load(&name("gate_proj.weight"), &[2 * intermediate, hidden])?;
            let half = |rows: std::ops::Range<usize>| {
                let w = Weight::from_vec(
                    fused.as_slice()[rows.start * hidden..rows.end * hidden].to_vec(),
                    &[rows.len(), hidden],
                )
                .expect("half of the fused weight");
                Linear::from_torch_as(&w, None, checkpoint.linear_format()).expect("2-D weight")
            };
            let pair = (half(0..intermediate), half(intermediate..2 * intermediate));
            drop(fused);
            checkpoint.release(&name("gate_proj.weight"));
            pair
        };
        Ok(GatedMlp {
            gate,
            up,
            down: checkpoint.load_linear(&name("down_proj.weight"), None, hidden, intermediate)?,
            intermediate,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down.size_bytes()
    }

    /// `out[M, D] = down(silu(gate(x)) ⊙ up(x))`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let d = self.gate.in_features();
        let i = self.intermediate;
        // `forward_new`: written once, by the products (zeroed buffers would cost a pass over
        // both: 8 MB a layer for a 512-row chunk of a 130m-shaped model).
        let mut g = self.gate.forward_new(MatRef::dense(x, m, d));
        let u = self.up.forward_new(MatRef::dense(x, m, d));
        silu_mul_inplace(&mut g, &u);
        self.down.forward(MatRef::dense(&g, m, i), out);
    }
}

/// How a tensor-parallel rank holds an MLP's weights (`name` relative to the MLP).
pub fn mlp_split(checkpoint: &Checkpoint, prefix: &str, name: &str) -> Option<Split> {
    match name {
        "up_proj.weight" => Some(Split::Rows { segments: 1 }),
        // The fused [gate; up] of older checkpoints: each rank takes its rows of both halves.
        "gate_proj.weight" if checkpoint.contains(&format!("{prefix}up_proj.weight")) => {
            Some(Split::Rows { segments: 1 })
        }
        "gate_proj.weight" => Some(Split::Rows { segments: 2 }),
        "down_proj.weight" => Some(Split::Columns),
        _ => None,
    }
}

/// fla's default MLP width: `256·ceil(int(D·ratio·2/3) / 256)`.
pub fn default_intermediate(hidden: usize, ratio: usize) -> usize {
    let raw = hidden * ratio * 2 / 3;
    raw.div_ceil(256) * 256
}
