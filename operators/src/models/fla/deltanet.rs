//! DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule";
//! `fla/layers/delta_net.py`), `shared/SPEC-MODELS.md` §3.2:
//!
//! ```text
//! q, k = ShortConv(q_proj x), ShortConv(k_proj x)   (silu in the conv iff qk_activation = silu,
//!                                                    else relu / elu+1 / identity after it)
//! v    = ShortConv_silu(v_proj x)
//! q, k ← L2-normalised per head (qk_norm l2, eps 1e-6 inside the sqrt) or L1 (qk_norm sum)
//! β    = σ(b_proj x) (×2 with allow_neg_eigval; 1 without use_beta)
//! delta rule (kernels::delta_rule), o = o_norm(o) (·swish(g_proj x) with use_gate) → o_proj
//! ```

use std::ops::Range;

use tideway_kernels::activation::sigmoid;
use tideway_kernels::delta_rule::{CHUNK_ROWS, DeltaInputs, delta_chunked, delta_recurrent};
use tideway_kernels::linear_attention::HeadRows;
use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::norm::l2_normalize;
use tideway_kernels::zeroed::zeroed;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::layers::head_output::{HeadOutput, HeadOutputShape};
use crate::layers::heads::{head_jobs, run_heads};
use crate::layers::qkv::{Qkv, QkvShape};
use crate::models::fla::graphs::{DeltaHeads, HeadMixing};
use crate::models::fla::mixer::{FlaLayerState, TokenMixer, matrices, project};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkActivation {
    Silu,
    Relu,
    EluPlusOne,
    Identity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    L2,
    Sum,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeltaNetConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub head_k_dim: usize,
    pub head_v_dim: usize,
    pub use_short_conv: bool,
    pub conv_size: usize,
    pub conv_bias: bool,
    pub qk_activation: QkActivation,
    pub qk_norm: QkNorm,
    pub use_beta: bool,
    pub allow_neg_eigval: bool,
    pub use_gate: bool,
    pub norm_eps: f32,
}

pub struct DeltaNetMixer {
    pub config: DeltaNetConfig,
    qkv: Qkv,
    b_proj: Option<Linear>,
    output: HeadOutput,
}

impl DeltaNetMixer {
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        config: DeltaNetConfig,
    ) -> Result<Self, LoadError> {
        let name = |s: &str| format!("{prefix}{s}");
        let c = &config;
        let (d, kd, vd) = (
            c.d_model,
            c.num_heads * c.head_k_dim,
            c.num_heads * c.head_v_dim,
        );
        let linear =
            |w: &str, out: usize, inp: usize| checkpoint.load_linear(&name(w), None, out, inp);
        let qk_silu = c.qk_activation == QkActivation::Silu;
        Ok(DeltaNetMixer {
            // SiLU in the q/k convs iff qk_activation is silu; v always (with or without convs).
            qkv: Qkv::load(
                checkpoint,
                prefix,
                QkvShape {
                    d_model: d,
                    widths: [kd, kd, vd],
                    short_conv: c.use_short_conv,
                    conv_size: c.conv_size,
                    conv_bias: c.conv_bias,
                    conv_silu: [qk_silu, qk_silu, true],
                    plain_silu: [qk_silu, qk_silu, true],
                },
            )?,
            b_proj: if c.use_beta {
                Some(linear("b_proj.weight", c.num_heads, d)?)
            } else {
                None
            },
            output: HeadOutput::load(
                checkpoint,
                prefix,
                "o_norm.weight",
                HeadOutputShape {
                    gated: c.use_gate,
                    d_model: d,
                    value_dim: vd,
                    head_dim: c.head_v_dim,
                    eps: c.norm_eps,
                },
            )?,
            config,
        })
    }
}

impl DeltaNetMixer {
    /// The heads' inputs of the rows `u` (`[M, D]`, session i's rows `segments[i]`),
    /// advancing the sessions' conv windows.
    pub(crate) fn inputs(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        states: &mut [&mut FlaLayerState],
    ) -> DeltaHeads {
        let c = &self.config;
        let d = c.d_model;
        let m = u.len() / d;
        let (h, dk) = (c.num_heads, c.head_k_dim);
        let x = MatRef::dense(u, m, d);
        let [mut q, mut k, v] = project(&self.qkv, x, segments, states);
        for values in [&mut q, &mut k] {
            match c.qk_activation {
                QkActivation::Silu | QkActivation::Identity => {}
                QkActivation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
                QkActivation::EluPlusOne => values
                    .iter_mut()
                    .for_each(|v| *v = if *v > 0.0 { *v + 1.0 } else { v.exp() }),
            }
            match c.qk_norm {
                QkNorm::L2 => l2_normalize(values, dk),
                // F.normalize(p=1, eps=1e-6): x / max(Σ|x|, 1e-6).
                QkNorm::Sum => {
                    for row in values.chunks_mut(dk) {
                        let norm = row.iter().map(|v| v.abs()).sum::<f32>().max(1e-6);
                        row.iter_mut().for_each(|v| *v /= norm);
                    }
                }
            }
        }
        let mut beta = vec![1.0f32; m * h];
        if let Some(b_proj) = &self.b_proj {
            b_proj.forward(x, &mut beta);
            beta.iter_mut().for_each(|b| *b = sigmoid(*b));
        }
        if c.allow_neg_eigval {
            beta.iter_mut().for_each(|b| *b *= 2.0);
        }
        DeltaHeads {
            q,
            k,
            v,
            beta,
            g: None,
            qk_heads: h,
            v_heads: h,
            dk,
            dv: c.head_v_dim,
        }
    }
}

impl TokenMixer for DeltaNetMixer {
    fn new_state(&self) -> FlaLayerState {
        let c = &self.config;
        FlaLayerState::new(&self.qkv, c.num_heads * c.head_k_dim * c.head_v_dim, 0)
    }

    fn weight_bytes(&self) -> usize {
        self.qkv.size_bytes()
            + self.b_proj.as_ref().map_or(0, Linear::size_bytes)
            + self.output.size_bytes()
    }

    fn forward(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        _starts: &[usize],
        states: &mut [&mut FlaLayerState],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let d = c.d_model;
        let m = u.len() / d;
        let (h, dk, dv) = (c.num_heads, c.head_k_dim, c.head_v_dim);
        let (kd, vd) = (h * dk, h * dv);
        let x = MatRef::dense(u, m, d);
        let DeltaHeads { q, k, v, beta, .. } = self.inputs(u, segments, states);

        let scale = (dk as f32).powf(-0.5);
        let mut o = zeroed(m * vd);
        let jobs = head_jobs(segments, matrices(states), h, dk * dv, 0);
        run_heads(jobs, h, dv, &mut o, dk * dv, |job, dst| {
            let (rows, head) = (&job.rows, job.head);
            let inputs = DeltaInputs {
                q: HeadRows::segment(&q, rows, kd, head * dk, dk),
                k: HeadRows::segment(&k, rows, kd, head * dk, dk),
                v: HeadRows::segment(&v, rows, vd, head * dv, dv),
                beta: HeadRows::segment(&beta, rows, h, head, 1),
                g: None,
                scale,
            };
            if rows.len() == 1 {
                delta_recurrent(inputs, 1, job.state, dst, dv);
            } else {
                delta_chunked(inputs, rows.len(), CHUNK_ROWS, job.state, dst, dv);
            }
        });

        self.output.forward(&o, x, out);
    }

    fn head_mixing<'a>(&'a self, u: &[f32]) -> Option<Box<dyn HeadMixing + 'a>> {
        let whole = 0..u.len() / self.config.d_model;
        let inputs = self.inputs(
            u,
            std::slice::from_ref(&whole),
            &mut [&mut self.new_state()],
        );
        Some(Box::new(inputs))
    }
}
