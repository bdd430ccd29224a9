//! The output end of fla's attention layers: a per-head RMSNorm over `head_v_dim` — fused
//! with a swish gate `g_proj(x)` when the layer has one (`FusedRMSNormGated`, norm first) —
//! then `o_proj` (`shared/SPEC-MODELS.md` §3.0).

use tideway_kernels::Weight;
use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::norm::{rms_norm, rms_norm_gated};
use tideway_kernels::zeroed::zeroed;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;

/// Shapes and options of a [`HeadOutput`].
#[derive(Debug, Clone, Copy)]
pub struct HeadOutputShape {
    /// Whether the layer has the swish output gate `g_proj`.
    pub gated: bool,
    pub d_model: usize,
    pub value_dim: usize,
    pub head_dim: usize,
    pub eps: f32,
}

pub struct HeadOutput {
    gate: Option<Linear>,
    norm: Weight,
    eps: f32,
    head_dim: usize,
    o_proj: Linear,
}

impl HeadOutput {
    /// Loads `{prefix}{norm_name}` (`[head_dim]`), `{prefix}o_proj.weight` and, when `shape.gated`,
    /// `{prefix}g_proj.weight`.
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        norm_name: &str,
        shape: HeadOutputShape,
    ) -> Result<Self, LoadError> {
        let HeadOutputShape {
            gated,
            d_model,
            value_dim,
            head_dim,
            eps,
        } = shape;
        let name = |s: &str| format!("{prefix}{s}");
        Ok(HeadOutput {
            gate: if gated {
                Some(checkpoint.load_linear(&name("g_proj.weight"), None, value_dim, d_model)?)
            } else {
                None
            },
            norm: checkpoint.load(&name(norm_name), &[head_dim])?,
            eps,
            head_dim,
            o_proj: checkpoint.load_linear(&name("o_proj.weight"), None, d_model, value_dim)?,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.gate.as_ref().map_or(0, Linear::size_bytes)
            + self.norm.size_bytes()
            + self.o_proj.size_bytes()
    }

    /// `out[M, D] = o_proj(norm(o) (⊙ swish(g_proj(x))))`, with `o` `[M, value_dim]`.
    pub fn forward(&self, o: &[f32], x: MatRef<'_>, out: &mut [f32]) {
        let value_dim = self.o_proj.in_features();
        let m = o.len() / value_dim;
        let mut normed = zeroed(o.len());
        match &self.gate {
            Some(g_proj) => {
                let gate = g_proj.forward_new(x);
                rms_norm_gated(
                    o,
                    &gate,
                    self.head_dim,
                    self.norm.as_slice(),
                    self.eps,
                    &mut normed,
                );
            }
            None => rms_norm(
                o,
                self.head_dim,
                self.norm.as_slice(),
                self.eps,
                &mut normed,
            ),
        }
        self.o_proj
            .forward(MatRef::dense(&normed, m, value_dim), out);
    }
}
