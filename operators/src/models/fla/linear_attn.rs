//! Plain linear attention (Katharopoulos et al. 2020; fla `LinearAttention`,
//! `fla/layers/linear_attn.py`), `shared/SPEC-MODELS.md` §3.5:
//!
//! ```text
//! q, k, v = q_proj(x), k_proj(x), v_proj(x)      (no short conv, no gate)
//! q, k    = φ_q(q), φ_k(k) per head              (feature maps below; may change the width)
//! q, k   ← q / (Σq + 1e-4), k / (Σk + 1e-4)      (norm_q / norm_k)
//! S_t = S_{t-1} + k_t ⊗ v_t,  o_t = S_tᵀ (scale·q_t),  scale = (feature dim)^{-1/2}
//! o_t ← o_t / (scale·q_t · z_t + 1e-10), z_t = z_{t-1} + k_t     (norm_feature_map)
//! o = o_proj(RMSNorm_per_head(o))
//! ```
//!
//! Feature maps (`fla/modules/feature_map.py`): elementwise_product `(W₁x+b₁)⊙(W₂x+b₂)`,
//! hedgehog `softmax([2(Wx+b), −2(Wx+b)])`, t2r `relu(Wx)`, dpfp (ν = 4), elu+1, relu,
//! identity.

use std::ops::Range;

use tideway_kernels::linear_attention::{HeadInputs, HeadRows, gated_chunked, gated_recurrent};
use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::zeroed::zeroed;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::layers::head_output::{HeadOutput, HeadOutputShape};
use crate::layers::heads::{head_jobs, run_heads};
use crate::layers::qkv::{Qkv, QkvShape};
use crate::models::fla::graphs::{HeadMixing, LinearHeads};
use crate::models::fla::mixer::{FlaLayerState, TokenMixer, matrices, project};

pub const CHUNK: usize = 64;
/// DPFP's ν: the products of `r` with its rolls by 1..=ν.
pub const DPFP_NU: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureMapKind {
    ElementwiseProduct,
    Hedgehog,
    T2r,
    Dpfp,
    Elu,
    Relu,
    Identity,
}

impl FeatureMapKind {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "elementwise_product" => FeatureMapKind::ElementwiseProduct,
            "hedgehog" => FeatureMapKind::Hedgehog,
            "t2r" => FeatureMapKind::T2r,
            "dpfp" => FeatureMapKind::Dpfp,
            "elu" => FeatureMapKind::Elu,
            "relu" => FeatureMapKind::Relu,
            "identity" => FeatureMapKind::Identity,
            _ => return None,
        })
    }

    /// Width of φ(x) for a head of width `dk`.
    pub fn width(self, dk: usize) -> usize {
        match self {
            FeatureMapKind::Hedgehog => 2 * dk,
            FeatureMapKind::Dpfp => 2 * dk * DPFP_NU,
            _ => dk,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinearAttnConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_k_dim: usize,
    pub head_v_dim: usize,
    pub feature_map: FeatureMapKind,
    pub norm_q: bool,
    pub norm_k: bool,
    pub normalize: bool,
    pub norm_eps: f32,
}

/// The learned part of a feature map, shared by every head.
enum FeatureLayers {
    None,
    One(Linear),
    Two(Linear, Linear),
}

pub struct LinearAttnMixer {
    pub config: LinearAttnConfig,
    qkv: Qkv,
    map_q: FeatureLayers,
    map_k: FeatureLayers,
    output: HeadOutput,
}

impl LinearAttnMixer {
    pub fn load(
        checkpoint: &Checkpoint,
        prefix: &str,
        config: LinearAttnConfig,
    ) -> Result<Self, LoadError> {
        let name = |s: &str| format!("{prefix}{s}");
        let c = &config;
        let g = c.num_heads / c.num_kv_heads;
        let (d, kd, vd, dk) = (
            c.d_model,
            c.num_heads * c.head_k_dim,
            c.num_heads * c.head_v_dim,
            c.head_k_dim,
        );
        // With tie_feature_map_qk the k map is the q map (saved once).
        let layers = |which: &str| -> Result<FeatureLayers, LoadError> {
            let which = if checkpoint.contains(&name(&format!("feature_map_{which}.layer1.weight")))
                || checkpoint.contains(&name(&format!("feature_map_{which}.layer.weight")))
            {
                which
            } else {
                "q"
            };
            let with_bias = |l: &str| {
                let w = name(&format!("feature_map_{which}.{l}.weight"));
                let b = name(&format!("feature_map_{which}.{l}.bias"));
                let bias = checkpoint.contains(&b).then_some(b);
                checkpoint.load_linear(&w, bias.as_deref(), dk, dk)
            };
            Ok(match c.feature_map {
                FeatureMapKind::ElementwiseProduct => {
                    FeatureLayers::Two(with_bias("layer1")?, with_bias("layer2")?)
                }
                FeatureMapKind::Hedgehog | FeatureMapKind::T2r => {
                    FeatureLayers::One(with_bias("layer")?)
                }
                _ => FeatureLayers::None,
            })
        };
        Ok(LinearAttnMixer {
            qkv: Qkv::load(
                checkpoint,
                prefix,
                QkvShape {
                    d_model: d,
                    widths: [kd, kd / g, vd / g],
                    short_conv: false,
                    conv_size: 0,
                    conv_bias: false,
                    conv_silu: [false; 3],
                    plain_silu: [false; 3],
                },
            )?,
            map_q: layers("q")?,
            map_k: layers("k")?,
            output: HeadOutput::load(
                checkpoint,
                prefix,
                "norm.weight",
                HeadOutputShape {
                    gated: false,
                    d_model: d,
                    value_dim: vd,
                    head_dim: c.head_v_dim,
                    eps: c.norm_eps,
                },
            )?,
            config,
        })
    }

    fn feature_width(&self) -> usize {
        self.config.feature_map.width(self.config.head_k_dim)
    }

    /// φ over rows of `dk`-wide heads (`x`: `[rows, dk]`), giving `[rows, f]`.
    fn feature(&self, layers: &FeatureLayers, x: &[f32]) -> Vec<f32> {
        let dk = self.config.head_k_dim;
        let rows = x.len() / dk;
        let f = self.feature_width();
        let project = |l: &Linear| {
            let mut y = vec![0.0f32; rows * dk];
            l.forward(MatRef::dense(x, rows, dk), &mut y);
            y
        };
        match (self.config.feature_map, layers) {
            (FeatureMapKind::ElementwiseProduct, FeatureLayers::Two(a, b)) => {
                let (mut y, z) = (project(a), project(b));
                y.iter_mut().zip(&z).for_each(|(p, q)| *p *= q);
                y
            }
            (FeatureMapKind::Hedgehog, FeatureLayers::One(l)) => {
                let y = project(l);
                let mut out = vec![0.0f32; rows * f];
                for (src, dst) in y.chunks(dk).zip(out.chunks_mut(f)) {
                    // softmax([2y, −2y]) in f64 for a stable sum.
                    let max = src.iter().map(|v| (2.0 * v).abs()).fold(0.0f32, f32::max);
                    let mut sum = 0.0f64;
                    for (i, &v) in src.iter().enumerate() {
                        let (a, b) = ((2.0 * v - max).exp(), (-2.0 * v - max).exp());
                        dst[i] = a;
                        dst[i + dk] = b;
                        sum += a as f64 + b as f64;
                    }
                    dst.iter_mut().for_each(|v| *v = (*v as f64 / sum) as f32);
                }
                out
            }
            (FeatureMapKind::T2r, FeatureLayers::One(l)) => {
                let mut y = project(l);
                y.iter_mut().for_each(|v| *v = v.max(0.0));
                y
            }
            (FeatureMapKind::Dpfp, _) => {
                let w = 2 * dk;
                let mut out = vec![0.0f32; rows * f];
                let mut r = vec![0.0f32; w];
                for (src, dst) in x.chunks(dk).zip(out.chunks_mut(f)) {
                    for i in 0..dk {
                        r[i] = src[i].max(0.0);
                        r[i + dk] = (-src[i]).max(0.0);
                    }
                    // cat_j(r) ⊙ cat_j(roll(r, j)), j = 1..=ν; roll(r, j)[i] = r[(i − j) mod w].
                    for j in 1..=DPFP_NU {
                        for i in 0..w {
                            dst[(j - 1) * w + i] = r[i] * r[(i + w - j) % w];
                        }
                    }
                }
                out
            }
            (FeatureMapKind::Elu, _) => x
                .iter()
                .map(|&v| if v > 0.0 { v + 1.0 } else { v.exp() })
                .collect(),
            (FeatureMapKind::Relu, _) => x.iter().map(|v| v.max(0.0)).collect(),
            _ => x.to_vec(),
        }
    }
}

impl TokenMixer for LinearAttnMixer {
    fn new_state(&self) -> FlaLayerState {
        let c = &self.config;
        let f = self.feature_width();
        // z only with the normalised feature map.
        let z = if c.normalize { c.num_heads * f } else { 0 };
        FlaLayerState::new(&self.qkv, c.num_heads * f * c.head_v_dim, z)
    }

    fn weight_bytes(&self) -> usize {
        let layers = |l: &FeatureLayers| match l {
            FeatureLayers::None => 0,
            FeatureLayers::One(a) => a.size_bytes(),
            FeatureLayers::Two(a, b) => a.size_bytes() + b.size_bytes(),
        };
        self.qkv.size_bytes() + layers(&self.map_q) + layers(&self.map_k) + self.output.size_bytes()
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
        let g = c.num_heads / c.num_kv_heads;
        let (h, dv) = (c.num_heads, c.head_v_dim);
        let vd = h * dv;
        let x = MatRef::dense(u, m, d);
        let f = self.feature_width();
        let LinearHeads { q, k, v, .. } = self.inputs(u, segments, states);
        let (qw, kw, vw) = (h * f, h / g * f, vd / g);
        let scale = (f as f32).powf(-0.5);
        let mut o = zeroed(m * vd);
        let jobs = head_jobs(segments, matrices(states), h, f * dv, f);
        run_heads(jobs, h, dv, &mut o, f * dv, |job, dst| {
            let (rows, head) = (&job.rows, job.head);
            let kv = head / g;
            let inputs = HeadInputs {
                q: HeadRows::segment(&q, rows, qw, head * f, f),
                k: HeadRows::segment(&k, rows, kw, kv * f, f),
                v: HeadRows::segment(&v, rows, vw, kv * dv, dv),
                g: None,
                scale,
            };
            if rows.len() == 1 {
                gated_recurrent(inputs, 1, job.state, dst, dv);
            } else {
                gated_chunked(inputs, rows.len(), CHUNK, job.state, dst, dv);
            }
            if c.normalize {
                // z_t = z_{t-1} + k_t; o_t /= scale·q_t·z_t + 1e-10.
                let z = &mut *job.extra;
                for (t, out_row) in dst.chunks_exact_mut(dv).enumerate() {
                    let (qt, kt) = (inputs.q.row(t), inputs.k.row(t));
                    z.iter_mut().zip(kt).for_each(|(a, b)| *a += b);
                    let denom: f32 = qt
                        .iter()
                        .zip(z.iter())
                        .map(|(a, b)| scale * a * b)
                        .sum::<f32>()
                        + 1e-10;
                    out_row.iter_mut().for_each(|v| *v /= denom);
                }
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

impl LinearAttnMixer {
    /// The heads' feature-mapped q and k and the values of the rows `u` (`[M, D]`, session
    /// i's rows `segments[i]`), advancing the sessions' conv windows.
    pub(crate) fn inputs(
        &self,
        u: &[f32],
        segments: &[Range<usize>],
        states: &mut [&mut FlaLayerState],
    ) -> LinearHeads {
        let c = &self.config;
        let m = u.len() / c.d_model;
        let x = MatRef::dense(u, m, c.d_model);
        let [q, k, v] = project(&self.qkv, x, segments, states);
        let f = self.feature_width();
        let mut q = self.feature(&self.map_q, &q);
        let mut k = self.feature(&self.map_k, &k);
        for (values, on) in [(&mut q, c.norm_q), (&mut k, c.norm_k)] {
            if on {
                for row in values.chunks_mut(f) {
                    let sum: f32 = row.iter().sum::<f32>() + 1e-4;
                    row.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
        LinearHeads {
            q,
            k,
            v,
            heads: c.num_heads,
            groups: c.num_heads / c.num_kv_heads,
            feature_width: f,
            dv: c.head_v_dim,
            normalize: c.normalize,
        }
    }
}

impl std::fmt::Debug for LinearAttnMixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinearAttnMixer({:?})", self.config)
    }
}
