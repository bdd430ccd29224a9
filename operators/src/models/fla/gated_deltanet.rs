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
use tideway_kernels::activation::{sigmoid, softplus};
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

pub struct GatedDeltaNetMixer {
    pub config: GatedDeltaNetConfig,
    qkv: Qkv,
    a_proj: Linear,
    b_proj: Linear,
    /// `−exp(A_log)`, per value head.
    neg_a: Vec<f32>,
    dt_bias: Weight,
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
        let a_log = checkpoint.load(&name("A_log"), &[hv])?;
        Ok(GatedDeltaNetMixer {
            // SiLU on q, k and v, in the convs or on the projections.
            qkv: Qkv::load(
                checkpoint,
                prefix,
                QkvShape {
                    d_model: d,
                    widths: [kd, kd, vd],
                    short_conv: c.use_short_conv,
                    conv_size: c.conv_size,
                    conv_bias: c.conv_bias,
                    conv_silu: [true; 3],
                    plain_silu: [true; 3],
                },
            )?,
            a_proj: linear("a_proj.weight", hv, d)?,
            b_proj: linear("b_proj.weight", hv, d)?,
            neg_a: a_log.as_slice().iter().map(|a| -a.exp()).collect(),
            dt_bias: checkpoint.load(&name("dt_bias"), &[hv])?,
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

impl GatedDeltaNetMixer {
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
        let (h, hv, dk) = (c.num_heads, c.num_v_heads, c.head_k_dim);
        let x = MatRef::dense(u, m, d);
        let [mut q, mut k, v] = project(&self.qkv, x, segments, states);
        for values in [&mut q, &mut k] {
            l2_normalize(values, dk);
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

        DeltaHeads {
            q,
            k,
            v,
            beta,
            g: Some(g),
            qk_heads: h,
            v_heads: hv,
            dk,
            dv: c.head_v_dim,
        }
    }
}

impl TokenMixer for GatedDeltaNetMixer {
    fn new_state(&self) -> FlaLayerState {
        let c = &self.config;
        FlaLayerState::new(&self.qkv, c.num_v_heads * c.head_k_dim * c.head_v_dim, 0)
    }

    fn weight_bytes(&self) -> usize {
        [&self.a_proj, &self.b_proj]
            .iter()
            .map(|l| l.size_bytes())
            .sum::<usize>()
            + self.qkv.size_bytes()
            + self.output.size_bytes()
            + self.dt_bias.size_bytes()
            + 4 * self.neg_a.len()
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
        let (h, hv, dk, dv) = (c.num_heads, c.num_v_heads, c.head_k_dim, c.head_v_dim);
        let (kd, vd) = (h * dk, hv * dv);
        let x = MatRef::dense(u, m, d);
        let DeltaHeads {
            q, k, v, beta, g, ..
        } = self.inputs(u, segments, states);
        let g = g.expect("Gated DeltaNet decays");

        let scale = (dk as f32).powf(-0.5);
        let groups = hv / h;
        let mut o = zeroed(m * vd);
        let jobs = head_jobs(segments, matrices(states), hv, dk * dv, 0);
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
