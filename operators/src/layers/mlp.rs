//! fla's `GatedMLP` (`fla/modules/mlp.py`): `down(silu(gate(x)) ⊙ up(x))`, no biases
//! (`shared/SPEC-MODELS.md` §3.0).

use tideway_kernels::Weight;
use tideway_kernels::activation::silu_mul_inplace;
use tideway_kernels::matmul::{Linear, MatRef};

use crate::checkpoint::Checkpoint;
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
    /// are the gate, `[I, 2I)` the up projection. (The whole MLP is its one shard.)
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self, LoadError> {
        Self::load_shard(checkpoint, prefix, hidden, intermediate, 0, 1)
    }

    /// Rank `rank` of `tp` tensor-parallel shards (Megatron-style): the gate and up
    /// projections column-parallel (rows `[rank·I/tp, (rank+1)·I/tp)` of their `[I, D]`
    /// weights), the down projection row-parallel (the same columns of its `[D, I]` weight).
    /// A shard's `forward` gives a partial output; the sum over the group (an all-reduce) is
    /// the full MLP's. Only the shard's blocks are read from the checkpoint.
    pub fn load_shard(
        checkpoint: &Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        rank: usize,
        tp: usize,
    ) -> Result<Self, LoadError> {
        if tp == 0 || rank >= tp || !intermediate.is_multiple_of(tp) {
            return Err(LoadError::Unsupported {
                path: checkpoint.dir().to_path_buf(),
                reason: format!(
                    "the MLP width {intermediate} does not split into {tp} tensor-parallel shards (rank {rank})"
                ),
            });
        }
        let name = |s: &str| format!("{prefix}{s}");
        let part = intermediate / tp;
        let mine = rank * part..(rank + 1) * part;
        let linear = |w: Weight| Linear::from_torch(&w, None).expect("2-D weight");
        let (gate, up) = if checkpoint.contains(&name("up_proj.weight")) {
            let full = [intermediate, hidden];
            (
                linear(checkpoint.load_block(
                    &name("gate_proj.weight"),
                    full,
                    mine.clone(),
                    0..hidden,
                )?),
                linear(checkpoint.load_block(
                    &name("up_proj.weight"),
                    full,
                    mine.clone(),
                    0..hidden,
                )?),
            )
        } else {
            let full = [2 * intermediate, hidden];
            let up_rows = intermediate + mine.start..intermediate + mine.end;
            (
                linear(checkpoint.load_block(
                    &name("gate_proj.weight"),
                    full,
                    mine.clone(),
                    0..hidden,
                )?),
                linear(checkpoint.load_block(
                    &name("gate_proj.weight"),
                    full,
                    up_rows,
                    0..hidden,
                )?),
            )
        };
        let down = linear(checkpoint.load_block(
            &name("down_proj.weight"),
            [hidden, intermediate],
            0..hidden,
            mine,
        )?);
        // The layers hold their own copies: drop the file pages from resident memory.
        for w in ["gate_proj.weight", "up_proj.weight", "down_proj.weight"] {
            checkpoint.release(&name(w));
        }
        Ok(GatedMlp {
            gate,
            up,
            down,
            intermediate: part,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down.size_bytes()
    }

    /// `out[M, D] = down(silu(gate(x)) ⊙ up(x))`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let d = self.gate.in_features();
        let i = self.intermediate;
        let mut g = vec![0.0f32; m * i];
        let mut u = vec![0.0f32; m * i];
        self.gate.forward(MatRef::dense(x, m, d), &mut g);
        self.up.forward(MatRef::dense(x, m, d), &mut u);
        silu_mul_inplace(&mut g, &u);
        self.down.forward(MatRef::dense(&g, m, i), out);
    }
}

/// fla's default MLP width: `256·ceil(int(D·ratio·2/3) / 256)`.
pub fn default_intermediate(hidden: usize, ratio: usize) -> usize {
    let raw = hidden * ratio * 2 / 3;
    raw.div_ceil(256) * 256
}
