//! Gated Linear Attention (Yang et al. 2024; `fla/layers/gla.py`), `shared/SPEC-MODELS.md`
//! §3.1:
//!
//! ```text
//! q, k, v = q_proj(x), k_proj(x), v_proj(x)     (optional short conv + silu each)
//! gk      = logsigmoid(gk_proj(x)) / 16          (low-rank: D → 16 → key_dim, clamped below)
//! S_t     = diag(exp(gk_t)) S_{t-1} + k_t ⊗ v_t,   o_t = S_tᵀ (dk^{-1/2}·q_t)     (per head)
//! o       = o_proj(FusedRMSNormGated(o, g_proj(x)))  (per head; RMSNorm only without gate)
//! ```
//!
//! One-row segments (decode steps) take the recurrent form; longer ones the chunkwise form
//! (chunk 64), as fla switches between `fused_recurrent` and `chunk`.

use std::ops::Range;

use tideway_kernels::activation::{logsigmoid_inplace, silu_inplace};
use tideway_kernels::linear_attention::{HeadInputs, HeadRows, gated_chunked, gated_recurrent};
use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::zeroed::zeroed;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::layers::head_output::{HeadOutput, HeadOutputShape};
use crate::layers::heads::{head_jobs, run_heads};
use crate::layers::qkv::{Qkv, QkvShape};
use crate::models::fla::mixer::{FlaLayerState, TokenMixer, matrices, project};
use crate::models::fla::retnet::{retention_log_decay, rotary};

/// Rows per chunk of the chunkwise form (fla's default).
pub const CHUNK: usize = 64;
/// fla's `gate_logit_normalizer` and low-rank width of `gk_proj` (layer defaults).
const GATE_LOGIT_NORMALIZER: f32 = 16.0;
const GATE_LOW_RANK: usize = 16;

/// Elementwise feature maps fla applies to q and k (`feature_map`, an ACT2FN name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureMap {
    Silu,
    Relu,
    Sigmoid,
}

impl FeatureMap {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "swish" | "silu" => Some(FeatureMap::Silu),
            "relu" => Some(FeatureMap::Relu),
            "sigmoid" => Some(FeatureMap::Sigmoid),
            _ => None,
        }
    }

    fn apply(self, values: &mut [f32]) {
        match self {
            FeatureMap::Silu => silu_inplace(values),
            FeatureMap::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
            FeatureMap::Sigmoid => values
                .iter_mut()
                .for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GlaConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_k_dim: usize,
    pub head_v_dim: usize,
    pub use_short_conv: bool,
    pub conv_size: usize,
    pub conv_bias: bool,
    pub use_output_gate: bool,
    pub feature_map: Option<FeatureMap>,
    pub clamp_min: Option<f32>,
    pub norm_eps: f32,
    /// GLA's data-dependent key gate, or RetNet's fixed per-head decay with RoPE.
    pub decay: DecayKind,
    /// The model's index of this mixer's first head (0; on a tensor-parallel rank, where its
    /// heads start): RetNet's decay depends on it.
    pub first_head: usize,
}

/// Where the log decay of the GLA family comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayKind {
    /// `logsigmoid(gk_proj(x)) / 16` per key channel (GLA).
    KeyGate,
    /// `ln(1 − 2^{−5−h})` for head h, constant over time, with rotary q/k (RetNet,
    /// `fla/layers/multiscale_retention.py`).
    Retention,
}

impl GlaConfig {
    fn key_dim(&self) -> usize {
        self.num_heads * self.head_k_dim
    }
    fn value_dim(&self) -> usize {
        self.num_heads * self.head_v_dim
    }
    fn groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

pub struct GlaMixer {
    pub config: GlaConfig,
    qkv: Qkv,
    /// GLA's low-rank gate projection (`gk_proj.0`, `gk_proj.1`); None for RetNet.
    key_gate: Option<(Linear, Linear)>,
    output: HeadOutput,
}

impl GlaMixer {
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        config: GlaConfig,
    ) -> Result<Self, LoadError> {
        let name = |s: &str| format!("{prefix}{s}");
        let d = config.d_model;
        let g = config.groups();
        let (kd, vd) = (config.key_dim(), config.value_dim());
        let linear = |w: &str, b: Option<&str>, out: usize, inp: usize| {
            checkpoint.load_linear(&name(w), b.map(name).as_deref(), out, inp)
        };
        let norm_name = if checkpoint.contains(&name("g_norm_swish_gate.weight")) {
            "g_norm_swish_gate.weight"
        } else {
            "g_norm.weight"
        };
        Ok(GlaMixer {
            // GLA and RetNet: SiLU inside the short convs, none without them.
            qkv: Qkv::load(
                checkpoint,
                prefix,
                QkvShape {
                    d_model: d,
                    widths: [kd, kd / g, vd / g],
                    short_conv: config.use_short_conv,
                    conv_size: config.conv_size,
                    conv_bias: config.conv_bias,
                    conv_silu: [true; 3],
                    plain_silu: [false; 3],
                },
            )?,
            key_gate: match config.decay {
                DecayKind::KeyGate => Some((
                    linear("gk_proj.0.weight", None, GATE_LOW_RANK, d)?,
                    linear(
                        "gk_proj.1.weight",
                        Some("gk_proj.1.bias"),
                        kd / g,
                        GATE_LOW_RANK,
                    )?,
                )),
                DecayKind::Retention => None,
            },
            output: HeadOutput::load(
                checkpoint,
                prefix,
                norm_name,
                HeadOutputShape {
                    gated: config.use_output_gate,
                    d_model: d,
                    value_dim: vd,
                    head_dim: config.head_v_dim,
                    eps: config.norm_eps,
                },
            )?,
            config,
        })
    }
}

/// A GLA or RetNet layer's inputs to its heads over packed rows.
pub(crate) struct GlaInputs {
    /// `[M, key_dim]`, feature-mapped (and rotated, RetNet).
    pub q: Vec<f32>,
    /// `[M, key_dim / groups]`.
    pub k: Vec<f32>,
    /// `[M, value_dim / groups]`.
    pub v: Vec<f32>,
    /// The log decay: `[M, key_dim / groups]` (GLA) or one row `[key_dim]` read with stride 0
    /// (RetNet).
    pub gk: Vec<f32>,
    pub g_stride: usize,
}

impl GlaMixer {
    /// q, k, v and the log decay of the rows `u` (`[M, D]`; session i's rows `segments[i]`,
    /// the first at position `starts[i]`), advancing the sessions' conv windows.
    pub(crate) fn inputs(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        starts: &[usize],
        states: &mut [&mut FlaLayerState],
    ) -> GlaInputs {
        let c = &self.config;
        let d = c.d_model;
        let m = u.len() / d;
        let g = c.groups();
        let kd = c.key_dim();
        let kkd = kd / g;
        let x = MatRef::dense(u, m, d);
        let [mut q, mut k, v] = project(&self.qkv, x, segments, states);
        let dk = c.head_k_dim;
        // The log decay: per row and key channel (GLA) or one constant row per head (RetNet,
        // read with stride 0).
        let (gk, g_stride) = match &self.key_gate {
            Some((down, up)) => {
                let mut low = vec![0.0f32; m * GATE_LOW_RANK];
                down.forward(x, &mut low);
                let mut gk = vec![0.0f32; m * kkd];
                up.forward(MatRef::dense(&low, m, GATE_LOW_RANK), &mut gk);
                logsigmoid_inplace(&mut gk);
                for v in gk.iter_mut() {
                    let mut l = *v / GATE_LOGIT_NORMALIZER;
                    if let Some(lo) = c.clamp_min {
                        l = l.max(lo);
                    }
                    *v = l;
                }
                (gk, kkd)
            }
            None => (retention_log_decay(c.first_head, c.num_heads, dk), 0),
        };
        if let Some(map) = c.feature_map {
            map.apply(&mut q);
            map.apply(&mut k);
        }
        if c.decay == DecayKind::Retention {
            for (rows, &start) in segments.iter().zip(starts) {
                rotary(&mut q[rows.start * kd..rows.end * kd], kd, dk, start);
                rotary(&mut k[rows.start * kkd..rows.end * kkd], kkd, dk, start);
            }
        }
        GlaInputs {
            q,
            k,
            v,
            gk,
            g_stride,
        }
    }
}

impl TokenMixer for GlaMixer {
    fn new_state(&self) -> FlaLayerState {
        let c = &self.config;
        FlaLayerState::new(&self.qkv, c.num_heads * c.head_k_dim * c.head_v_dim, 0)
    }

    fn weight_bytes(&self) -> usize {
        self.qkv.size_bytes()
            + self
                .key_gate
                .as_ref()
                .map_or(0, |(a, b)| a.size_bytes() + b.size_bytes())
            + self.output.size_bytes()
    }

    fn forward(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        starts: &[usize],
        states: &mut [&mut FlaLayerState],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let d = c.d_model;
        let m = u.len() / d;
        let g = c.groups();
        let (kd, vd) = (c.key_dim(), c.value_dim());
        let (kkd, kvd) = (kd / g, vd / g);
        let x = MatRef::dense(u, m, d);
        let GlaInputs {
            q,
            k,
            v,
            gk,
            g_stride,
        } = self.inputs(u, segments, starts, states);
        let (dk, dv) = (c.head_k_dim, c.head_v_dim);

        // Per session and head: the recurrence (one row) or the chunkwise form.
        let scale = (dk as f32).powf(-0.5);
        let mut o = zeroed(m * vd);
        let jobs = head_jobs(segments, matrices(states), c.num_heads, dk * dv, 0);
        run_heads(jobs, c.num_heads, dv, &mut o, dk * dv, |job, dst| {
            let (rows, h) = (&job.rows, job.head);
            let kv = h / g;
            let inputs = HeadInputs {
                q: HeadRows::segment(&q, rows, kd, h * dk, dk),
                k: HeadRows::segment(&k, rows, kkd, kv * dk, dk),
                v: HeadRows::segment(&v, rows, kvd, kv * dv, dv),
                g: Some(match g_stride {
                    0 => HeadRows {
                        data: &gk,
                        stride: 0,
                        offset: h * dk,
                        width: dk,
                    },
                    _ => HeadRows::segment(&gk, rows, kkd, kv * dk, dk),
                }),
                scale,
            };
            if rows.len() == 1 {
                gated_recurrent(inputs, 1, job.state, dst, dv);
            } else {
                gated_chunked(inputs, rows.len(), CHUNK, job.state, dst, dv);
            }
        });

        // Per-head norm (and swish gate), then o_proj.
        self.output.forward(&o, x, out);
    }

    fn head_mixing<'a>(&'a self, u: &[f32]) -> Option<Box<dyn super::graphs::HeadMixing + 'a>> {
        Some(Box::new(self.token_graphs(u)))
    }
}
