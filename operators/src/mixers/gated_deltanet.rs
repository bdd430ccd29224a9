//! Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025; `fla/layers/gated_deltanet.py`),
//! `shared/SPEC-MODELS.md` §3.3:
//!
//! ```text
//! q, k, v = ShortConv_silu(q_proj x), …(k), …(v)      (silu(proj) without short convs)
//! q, k ← L2-normalised per head (eps 1e-6 inside the sqrt), q ← dk^{-1/2}·q
//! β    = σ(b_proj x) (×2 with allow_neg_eigval)
//! g    = −exp(A_log) · softplus(a_proj x + dt_bias)     (log decay per value head)
//! S ← e^{g} S;  v' = β (v − Sᵀ k);  S ← S + k ⊗ v';  o = Sᵀ q     (kernels::delta_rule)
//! o = o_norm(o) (FusedRMSNormGated with swish(g_proj x) when use_gate) → o_proj
//! ```
//!
//! Grouped value attention: with `num_v_heads` = HV > H, value head j reads q/k head
//! j / (HV/H).

use std::ops::Range;

use tideway_kernels::Weight;
use tideway_kernels::activation::{sigmoid, silu_inplace, softplus};
use tideway_kernels::delta_rule::{DeltaInputs, delta_chunked, delta_recurrent};
use tideway_kernels::linear_attention::HeadRows;
use tideway_kernels::matmul::{Linear, MatRef};

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::layers::head_output::{HeadOutput, HeadOutputShape};
use crate::layers::heads::{head_jobs, run_heads};
use crate::layers::short_conv::ShortConv;

pub const CHUNK: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct GatedDeltaNetConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub num_v_heads: usize,
    pub head_k_dim: usize,
    pub head_v_dim: usize,
    pub use_short_conv: bool,
    pub conv_size: usize,
    pub conv_bias: bool,
    pub allow_neg_eigval: bool,
    pub use_gate: bool,
    pub norm_eps: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatedDeltaNetLayerState {
    /// Conv windows for q, k, v (empty without short convs).
    pub conv: [Vec<f32>; 3],
    /// `S`, `[HV, dk, dv]`.
    pub s: Vec<f32>,
}

pub struct GatedDeltaNetMixer {
    pub config: GatedDeltaNetConfig,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    a_proj: Linear,
    b_proj: Linear,
    /// `−exp(A_log)`, per value head.
    neg_a: Vec<f32>,
    dt_bias: Weight,
    convs: Option<[ShortConv; 3]>,
    output: HeadOutput,
}

impl GatedDeltaNetMixer {
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        config: GatedDeltaNetConfig,
    ) -> Result<Self, LoadError> {
        let name = |s: &str| format!("{prefix}{s}");
        let c = &config;
        let (d, kd, vd, hv) = (
            c.d_model,
            c.num_heads * c.head_k_dim,
            c.num_v_heads * c.head_v_dim,
            c.num_v_heads,
        );
        let linear =
            |w: &str, out: usize, inp: usize| checkpoint.load_linear(&name(w), None, out, inp);
        let conv = |which: &str, channels: usize| {
            ShortConv::load(
                checkpoint,
                &name(&format!("{which}_conv1d")),
                channels,
                c.conv_size,
                c.conv_bias,
                true,
            )
        };
        let a_log = checkpoint.load(&name("A_log"), &[hv])?;
        Ok(GatedDeltaNetMixer {
            q_proj: linear("q_proj.weight", kd, d)?,
            k_proj: linear("k_proj.weight", kd, d)?,
            v_proj: linear("v_proj.weight", vd, d)?,
            a_proj: linear("a_proj.weight", hv, d)?,
            b_proj: linear("b_proj.weight", hv, d)?,
            neg_a: a_log.as_slice().iter().map(|a| -a.exp()).collect(),
            dt_bias: checkpoint.load(&name("dt_bias"), &[hv])?,
            convs: if c.use_short_conv {
                Some([conv("q", kd)?, conv("k", kd)?, conv("v", vd)?])
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

    pub fn new_state(&self) -> GatedDeltaNetLayerState {
        let c = &self.config;
        let window = |ch: usize| {
            if c.use_short_conv {
                vec![0.0; ch * c.conv_size]
            } else {
                Vec::new()
            }
        };
        let (kd, vd) = (c.num_heads * c.head_k_dim, c.num_v_heads * c.head_v_dim);
        GatedDeltaNetLayerState {
            conv: [window(kd), window(kd), window(vd)],
            s: vec![0.0; c.num_v_heads * c.head_k_dim * c.head_v_dim],
        }
    }

    pub fn state_bytes(&self) -> usize {
        let s = self.new_state();
        4 * (s.s.len() + s.conv.iter().map(Vec::len).sum::<usize>())
    }

    pub fn weight_bytes(&self) -> usize {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.a_proj,
            &self.b_proj,
        ]
        .iter()
        .map(|l| l.size_bytes())
        .sum::<usize>()
            + self
                .convs
                .as_ref()
                .map_or(0, |c| c.iter().map(ShortConv::size_bytes).sum())
            + self.output.size_bytes()
            + self.dt_bias.size_bytes()
            + 4 * self.neg_a.len()
    }

    pub fn forward(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        states: &mut [&mut GatedDeltaNetLayerState],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let d = c.d_model;
        let m = u.len() / d;
        let (h, hv, dk, dv) = (c.num_heads, c.num_v_heads, c.head_k_dim, c.head_v_dim);
        let (kd, vd) = (h * dk, hv * dv);
        let x = MatRef::dense(u, m, d);
        let mut q = vec![0.0f32; m * kd];
        let mut k = vec![0.0f32; m * kd];
        let mut v = vec![0.0f32; m * vd];
        self.q_proj.forward(x, &mut q);
        self.k_proj.forward(x, &mut k);
        self.v_proj.forward(x, &mut v);
        match &self.convs {
            Some(convs) => {
                for (which, (values, conv)) in
                    [&mut q, &mut k, &mut v].into_iter().zip(convs).enumerate()
                {
                    let mut windows: Vec<&mut Vec<f32>> =
                        states.iter_mut().map(|s| &mut s.conv[which]).collect();
                    conv.forward(values, segments, &mut windows);
                }
            }
            None => {
                for values in [&mut q, &mut k, &mut v] {
                    silu_inplace(values);
                }
            }
        }
        for values in [&mut q, &mut k] {
            for row in values.chunks_mut(dk) {
                let norm = (row.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
        let mut beta = vec![0.0f32; m * hv];
        self.b_proj.forward(x, &mut beta);
        let neg = if c.allow_neg_eigval { 2.0 } else { 1.0 };
        beta.iter_mut().for_each(|b| *b = neg * sigmoid(*b));
        let mut g = vec![0.0f32; m * hv];
        self.a_proj.forward(x, &mut g);
        let dt_bias = self.dt_bias.as_slice();
        for row in g.chunks_mut(hv) {
            for (j, val) in row.iter_mut().enumerate() {
                *val = self.neg_a[j] * softplus(*val + dt_bias[j]);
            }
        }

        let scale = (dk as f32).powf(-0.5);
        let groups = hv / h;
        let mut o = vec![0.0f32; m * vd];
        let jobs = head_jobs(
            segments,
            states
                .iter_mut()
                .map(|s| (&mut s.s[..], <&mut [f32]>::default()))
                .collect(),
            hv,
            dk * dv,
            0,
        );
        run_heads(jobs, hv, dv, &mut o, dk * dv, |job, dst| {
            let (rows, vh) = (&job.rows, job.head);
            let qk_head = vh / groups;
            let inputs = DeltaInputs {
                q: HeadRows::segment(&q, rows, kd, qk_head * dk, dk),
                k: HeadRows::segment(&k, rows, kd, qk_head * dk, dk),
                v: HeadRows::segment(&v, rows, vd, vh * dv, dv),
                beta: HeadRows::segment(&beta, rows, hv, vh, 1),
                g: Some(HeadRows::segment(&g, rows, hv, vh, 1)),
                scale,
            };
            if rows.len() == 1 {
                delta_recurrent(inputs, 1, job.state, dst, dv);
            } else {
                delta_chunked(inputs, rows.len(), CHUNK, job.state, dst, dv);
            }
        });

        self.output.forward(&o, x, out);
    }
}
