//! flash-linear-attention language models on a GPU: GLA, RetNet, DeltaNet, Gated DeltaNet and
//! linear attention with its feature maps
//! (`shared/SPEC-MODELS.md` §3; the CPU model in `models/fla/mod.rs` and its mixers beside it are the
//! reference). Products through cuBLAS; short convs, gates, norms, RoPE and the recurrences
//! through `kernels/cuda/fla.cu`; every session's matrix states and conv windows live in a
//! device-resident pool of slots.
//!
//! The recurrences run the recurrent form for every row (a prefill chunk walks its rows in
//! order), which is exact but leaves most of the GPU idle on one long sequence; the chunkwise
//! forms are the next step for long jobs.
//!
//! Length: ~1500 lines because all five fla mixers' GPU forwards (GLA, RetNet, DeltaNet, Gated
//! DeltaNet, linear attention) and their shared pieces sit here; it should split one file per
//! mixer like the CPU mixers beside it (not done yet).

use tideway_kernels::Tensor;
use tideway_kernels::gpu::{
    Arg, DevMat, DeviceBuffer, DeviceLinear, DeviceMatrix, Gpu, GpuError, MAX_CONV, MAX_DK, MAX_DV,
    Scratch, WeightDtype,
};

use crate::LogitRows;
use crate::checkpoint::Checkpoint;
use crate::gpu::tensor_parallel::{DeviceGroup, DeviceResidualStream};
use crate::gpu::{
    ChunkedScan, DeviceBatch, FinalLayers, GpuFamily, GpuLanguageFamily, GpuModelError, GpuSession,
    ScanLayout, SlotPool, zero_slot,
};
use crate::models::fla::deltanet::{DeltaNetConfig, QkActivation, QkNorm};
use crate::models::fla::gated_deltanet::GatedDeltaNetConfig;
use crate::models::fla::gla::{DecayKind, FeatureMap, GlaConfig};
use crate::models::fla::linear_attn::{DPFP_NU, FeatureMapKind, LinearAttnConfig};
use crate::models::fla::retnet::retention_log_decay;
use crate::models::fla::{FlaConfig, FlaMixerConfig};
use crate::models::packed_segments;

/// fla's `gate_logit_normalizer` and low-rank width of GLA's `gk_proj`.
const GATE_LOGIT_NORMALIZER: f32 = 16.0;
const GATE_LOW_RANK: usize = 16;

/// `activate` kernel kinds.
const SILU: i32 = 0;
const RELU: i32 = 1;
const SIGMOID: i32 = 2;
const ELU_PLUS_ONE: i32 = 3;

fn up(gpu: &Gpu, values: &[f32]) -> Result<DeviceBuffer<f32>, GpuError> {
    gpu.upload(values)
}

/// A weight loader bound to one checkpoint, GPU and dtype.
struct Loader<'a> {
    checkpoint: &'a Checkpoint,
    gpu: &'a Gpu,
    dtype: WeightDtype,
}

impl Loader<'_> {
    fn vector(&self, name: &str, len: usize) -> Result<DeviceBuffer<f32>, GpuModelError> {
        Ok(up(
            self.gpu,
            self.checkpoint.load(name, &[len])?.as_slice(),
        )?)
    }

    fn linear(
        &self,
        name: &str,
        bias: Option<&str>,
        out: usize,
        inp: usize,
    ) -> Result<DeviceLinear, GpuModelError> {
        let w = self.checkpoint.load(name, &[out, inp])?;
        let b = bias.map(|b| self.checkpoint.load(b, &[out])).transpose()?;
        let layer = DeviceLinear::upload(
            self.gpu,
            w.as_slice(),
            b.as_ref().map(|b| b.as_slice()),
            out,
            inp,
            self.dtype,
        )?;
        self.checkpoint.release(name);
        Ok(layer)
    }
}

/// fla's ShortConvolution weights.
struct Conv {
    weight: DeviceBuffer<f32>,
    bias: Option<DeviceBuffer<f32>>,
}

/// The q/k/v input end (`layers/qkv.rs`).
struct Qkv {
    projections: [DeviceLinear; 3],
    convs: Option<[Conv; 3]>,
    widths: [usize; 3],
    conv_size: usize,
    /// SiLU in each conv (with convs) or on each projection (without).
    silu: [bool; 3],
}

impl Qkv {
    #[allow(clippy::too_many_arguments)]
    fn load(
        l: &Loader<'_>,
        prefix: &str,
        d: usize,
        widths: [usize; 3],
        short_conv: bool,
        conv_size: usize,
        conv_bias: bool,
        silu: [bool; 3],
    ) -> Result<Self, GpuModelError> {
        if short_conv && conv_size > MAX_CONV {
            return Err(GpuError::Unsupported(format!(
                "short convs up to {MAX_CONV} taps run on the GPU; this model has {conv_size}"
            ))
            .into());
        }
        let names = ["q", "k", "v"];
        let projection = |i: usize| {
            l.linear(
                &format!("{prefix}{}_proj.weight", names[i]),
                None,
                widths[i],
                d,
            )
        };
        let conv = |i: usize| -> Result<Conv, GpuModelError> {
            let name = format!("{prefix}{}_conv1d", names[i]);
            let w = l
                .checkpoint
                .load(&format!("{name}.weight"), &[widths[i], 1, conv_size])?;
            Ok(Conv {
                weight: up(l.gpu, w.as_slice())?,
                bias: match conv_bias {
                    true => Some(l.vector(&format!("{name}.bias"), widths[i])?),
                    false => None,
                },
            })
        };
        Ok(Qkv {
            projections: [projection(0)?, projection(1)?, projection(2)?],
            convs: match short_conv {
                true => Some([conv(0)?, conv(1)?, conv(2)?]),
                false => None,
            },
            widths,
            conv_size,
            silu,
        })
    }

    fn size_bytes(&self) -> usize {
        self.projections
            .iter()
            .map(DeviceLinear::size_bytes)
            .sum::<usize>()
            + self.convs.as_ref().map_or(0, |c| {
                c.iter()
                    .map(|c| 4 * (c.weight.len() + c.bias.as_ref().map_or(0, |b| b.len())))
                    .sum()
            })
    }

    /// Floats of one session's conv windows for q, k, v.
    fn window_sizes(&self) -> [usize; 3] {
        match self.convs {
            Some(_) => self.widths.map(|w| w * self.conv_size),
            None => [0; 3],
        }
    }

    /// q, k, v for the batch's rows of `x`.
    fn forward(
        &self,
        gpu: &Gpu,
        x: DevMat,
        batch: &DeviceBatch,
        windows: &[DeviceBuffer<f32>],
        scratch: &mut Scratch,
    ) -> Result<[DeviceBuffer<f32>; 3], GpuError> {
        let m = x.rows;
        let mut out: [Option<DeviceBuffer<f32>>; 3] = [None, None, None];
        for i in 0..3 {
            let width = self.widths[i];
            let values = gpu.zeros(m * width)?;
            match &self.convs {
                Some(convs) => {
                    let projected = gpu.zeros(m * width)?;
                    self.projections[i].forward(gpu, x, gpu.ptr(&projected), scratch)?;
                    let conv = &convs[i];
                    let bias = conv.bias.as_ref().map_or(0, |b| gpu.ptr(b));
                    gpu.launch_per_channel(
                        "short_conv",
                        width,
                        batch.segments,
                        &[
                            Arg::Ptr(gpu.ptr(&projected)),
                            Arg::I32(width as i32),
                            Arg::I32(width as i32),
                            Arg::I32(self.conv_size as i32),
                            Arg::Ptr(gpu.ptr(&conv.weight)),
                            Arg::Ptr(bias),
                            Arg::I32(conv.bias.is_some() as i32),
                            Arg::Ptr(gpu.ptr(&windows[i])),
                            Arg::Ptr(batch.starts),
                            Arg::Ptr(batch.lens),
                            Arg::Ptr(batch.slots),
                            Arg::I32(batch.segments as i32),
                            Arg::I32(self.silu[i] as i32),
                            Arg::Ptr(gpu.ptr(&values)),
                        ],
                    )?;
                }
                None => {
                    self.projections[i].forward(gpu, x, gpu.ptr(&values), scratch)?;
                    if self.silu[i] {
                        activate(gpu, &values, m * width, SILU)?;
                    }
                }
            }
            out[i] = Some(values);
        }
        Ok(out.map(|b| b.expect("each of q, k, v computed")))
    }
}

fn activate(gpu: &Gpu, x: &DeviceBuffer<f32>, n: usize, kind: i32) -> Result<(), GpuError> {
    gpu.launch_elementwise(
        "activate",
        n,
        &[Arg::Ptr(gpu.ptr(x)), Arg::I64(n as i64), Arg::I32(kind)],
    )
}

/// Per-head normalisation of `[rows, dh]` rows (0: l2, 1: sum).
fn head_normalize(
    gpu: &Gpu,
    x: &DeviceBuffer<f32>,
    rows: usize,
    dh: usize,
    mode: i32,
) -> Result<(), GpuError> {
    gpu.launch_elementwise(
        "head_normalize",
        rows,
        &[
            Arg::Ptr(gpu.ptr(x)),
            Arg::I64(rows as i64),
            Arg::I32(dh as i32),
            Arg::I32(mode),
        ],
    )
}

/// The output end (`layers/head_output.rs`): per-head RMSNorm (with the swish gate), o_proj.
struct HeadOutput {
    gate: Option<DeviceLinear>,
    norm: DeviceBuffer<f32>,
    eps: f32,
    head_dim: usize,
    o_proj: DeviceLinear,
}

impl HeadOutput {
    #[allow(clippy::too_many_arguments)]
    fn load(
        l: &Loader<'_>,
        prefix: &str,
        norm_name: &str,
        gated: bool,
        d: usize,
        value_dim: usize,
        head_dim: usize,
        eps: f32,
    ) -> Result<Self, GpuModelError> {
        Ok(HeadOutput {
            gate: match gated {
                true => Some(l.linear(&format!("{prefix}g_proj.weight"), None, value_dim, d)?),
                false => None,
            },
            norm: l.vector(&format!("{prefix}{norm_name}"), head_dim)?,
            eps,
            head_dim,
            o_proj: l.linear(&format!("{prefix}o_proj.weight"), None, d, value_dim)?,
        })
    }

    fn size_bytes(&self) -> usize {
        self.gate.as_ref().map_or(0, DeviceLinear::size_bytes)
            + 4 * self.norm.len()
            + self.o_proj.size_bytes()
    }

    /// `out = o_proj(norm(o) (⊙ swish(g_proj(x))))`, `o`: `[M, value_dim]`.
    fn forward(
        &self,
        gpu: &Gpu,
        o: &DeviceBuffer<f32>,
        x: DevMat,
        out: u64,
        scratch: &mut Scratch,
    ) -> Result<(), GpuError> {
        let value_dim = self.o_proj.in_features;
        let m = x.rows;
        let normed = gpu.zeros(m * value_dim)?;
        let rows = m * value_dim / self.head_dim;
        gpu.rms_norm(
            gpu.ptr(o),
            gpu.ptr(&self.norm),
            rows,
            self.head_dim,
            self.eps,
            gpu.ptr(&normed),
        )?;
        if let Some(g_proj) = &self.gate {
            let gate = gpu.zeros(m * value_dim)?;
            g_proj.forward(gpu, x, gpu.ptr(&gate), scratch)?;
            let n = m * value_dim;
            gpu.launch_elementwise(
                "silu_mul",
                n,
                &[
                    Arg::Ptr(gpu.ptr(&normed)),
                    Arg::Ptr(gpu.ptr(&gate)),
                    Arg::I64(n as i64),
                    Arg::I32(1),
                ],
            )?;
        }
        self.o_proj
            .forward(gpu, DevMat::dense(gpu, &normed, m, value_dim), out, scratch)
    }
}

/// fla's GatedMLP: `down(silu(gate(x)) ⊙ up(x))`.
struct Mlp {
    gate: DeviceLinear,
    up: DeviceLinear,
    down: DeviceLinear,
    intermediate: usize,
}

impl Mlp {
    fn load(l: &Loader<'_>, prefix: &str, d: usize, i: usize) -> Result<Self, GpuModelError> {
        let name = |s: &str| format!("{prefix}{s}");
        let (gate, up) = if l.checkpoint.contains(&name("up_proj.weight")) {
            (
                l.linear(&name("gate_proj.weight"), None, i, d)?,
                l.linear(&name("up_proj.weight"), None, i, d)?,
            )
        } else {
            // Checkpoints before fla b48ca31d: one fused gate_proj [2I, D] (gate, then up).
            let fused = l.checkpoint.load(&name("gate_proj.weight"), &[2 * i, d])?;
            let (g, u) = fused.as_slice().split_at(i * d);
            (
                DeviceLinear::upload(l.gpu, g, None, i, d, l.dtype)?,
                DeviceLinear::upload(l.gpu, u, None, i, d, l.dtype)?,
            )
        };
        Ok(Mlp {
            gate,
            up,
            down: l.linear(&name("down_proj.weight"), None, d, i)?,
            intermediate: i,
        })
    }

    fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down.size_bytes()
    }

    fn forward(
        &self,
        gpu: &Gpu,
        x: DevMat,
        out: u64,
        scratch: &mut Scratch,
    ) -> Result<(), GpuError> {
        let (m, i) = (x.rows, self.intermediate);
        let g = gpu.zeros(m * i)?;
        let u = gpu.zeros(m * i)?;
        self.gate.forward(gpu, x, gpu.ptr(&g), scratch)?;
        self.up.forward(gpu, x, gpu.ptr(&u), scratch)?;
        gpu.launch_elementwise(
            "silu_mul",
            m * i,
            &[
                Arg::Ptr(gpu.ptr(&g)),
                Arg::Ptr(gpu.ptr(&u)),
                Arg::I64((m * i) as i64),
                Arg::I32(0),
            ],
        )?;
        self.down
            .forward(gpu, DevMat::dense(gpu, &g, m, i), out, scratch)
    }
}

enum Mixer {
    Gla {
        config: GlaConfig,
        qkv: Qkv,
        /// GLA's low-rank key gate; None for RetNet.
        key_gate: Option<(DeviceLinear, DeviceLinear)>,
        /// RetNet's per-head log decay `[H·dk]`.
        retention: Option<DeviceBuffer<f32>>,
        output: HeadOutput,
    },
    Delta {
        config: DeltaNetConfig,
        qkv: Qkv,
        b_proj: Option<DeviceLinear>,
        output: HeadOutput,
    },
    LinearAttn {
        config: LinearAttnConfig,
        qkv: Qkv,
        map_q: FeatureLayers,
        map_k: FeatureLayers,
        output: HeadOutput,
    },
    GatedDelta {
        config: GatedDeltaNetConfig,
        qkv: Qkv,
        a_proj: DeviceLinear,
        b_proj: DeviceLinear,
        neg_a: DeviceBuffer<f32>,
        dt_bias: DeviceBuffer<f32>,
        output: HeadOutput,
    },
}

fn check_heads(dk: usize, dv: usize) -> Result<(), GpuModelError> {
    if dk > MAX_DK || dv > MAX_DV {
        return Err(GpuError::Unsupported(format!(
            "heads up to {MAX_DK} key and {MAX_DV} value channels run on the GPU; this model has {dk} and {dv}"
        ))
        .into());
    }
    Ok(())
}

impl Mixer {
    fn load(l: &Loader<'_>, prefix: &str, config: &FlaMixerConfig) -> Result<Self, GpuModelError> {
        Ok(match config {
            FlaMixerConfig::Gla(c) => {
                check_heads(c.head_k_dim, c.head_v_dim)?;
                let g = c.num_heads / c.num_kv_heads;
                let (kd, vd) = (c.num_heads * c.head_k_dim, c.num_heads * c.head_v_dim);
                let norm_name = if l
                    .checkpoint
                    .contains(&format!("{prefix}g_norm_swish_gate.weight"))
                {
                    "g_norm_swish_gate.weight"
                } else {
                    "g_norm.weight"
                };
                Mixer::Gla {
                    qkv: Qkv::load(
                        l,
                        prefix,
                        c.d_model,
                        [kd, kd / g, vd / g],
                        c.use_short_conv,
                        c.conv_size,
                        c.conv_bias,
                        [c.use_short_conv; 3],
                    )?,
                    key_gate: match c.decay {
                        DecayKind::KeyGate => Some((
                            l.linear(
                                &format!("{prefix}gk_proj.0.weight"),
                                None,
                                GATE_LOW_RANK,
                                c.d_model,
                            )?,
                            l.linear(
                                &format!("{prefix}gk_proj.1.weight"),
                                Some(&format!("{prefix}gk_proj.1.bias")),
                                kd / g,
                                GATE_LOW_RANK,
                            )?,
                        )),
                        DecayKind::Retention => None,
                    },
                    retention: match c.decay {
                        DecayKind::Retention => Some(up(
                            l.gpu,
                            &retention_log_decay(c.first_head, c.num_heads, c.head_k_dim),
                        )?),
                        DecayKind::KeyGate => None,
                    },
                    output: HeadOutput::load(
                        l,
                        prefix,
                        norm_name,
                        c.use_output_gate,
                        c.d_model,
                        vd,
                        c.head_v_dim,
                        c.norm_eps,
                    )?,
                    config: c.clone(),
                }
            }
            FlaMixerConfig::DeltaNet(c) => {
                check_heads(c.head_k_dim, c.head_v_dim)?;
                let (kd, vd) = (c.num_heads * c.head_k_dim, c.num_heads * c.head_v_dim);
                let qk_silu = c.qk_activation == QkActivation::Silu;
                Mixer::Delta {
                    qkv: Qkv::load(
                        l,
                        prefix,
                        c.d_model,
                        [kd, kd, vd],
                        c.use_short_conv,
                        c.conv_size,
                        c.conv_bias,
                        [qk_silu, qk_silu, true],
                    )?,
                    b_proj: match c.use_beta {
                        true => Some(l.linear(
                            &format!("{prefix}b_proj.weight"),
                            None,
                            c.num_heads,
                            c.d_model,
                        )?),
                        false => None,
                    },
                    output: HeadOutput::load(
                        l,
                        prefix,
                        "o_norm.weight",
                        c.use_gate,
                        c.d_model,
                        vd,
                        c.head_v_dim,
                        c.norm_eps,
                    )?,
                    config: c.clone(),
                }
            }
            FlaMixerConfig::GatedDeltaNet(c) => {
                check_heads(c.head_k_dim, c.head_v_dim)?;
                let (kd, vd, hv) = (
                    c.num_heads * c.head_k_dim,
                    c.num_v_heads * c.head_v_dim,
                    c.num_v_heads,
                );
                let a_log = l.checkpoint.load(&format!("{prefix}A_log"), &[hv])?;
                let neg_a: Vec<f32> = a_log.as_slice().iter().map(|a| -a.exp()).collect();
                Mixer::GatedDelta {
                    qkv: Qkv::load(
                        l,
                        prefix,
                        c.d_model,
                        [kd, kd, vd],
                        c.use_short_conv,
                        c.conv_size,
                        c.conv_bias,
                        [true; 3],
                    )?,
                    a_proj: l.linear(&format!("{prefix}a_proj.weight"), None, hv, c.d_model)?,
                    b_proj: l.linear(&format!("{prefix}b_proj.weight"), None, hv, c.d_model)?,
                    neg_a: up(l.gpu, &neg_a)?,
                    dt_bias: l.vector(&format!("{prefix}dt_bias"), hv)?,
                    output: HeadOutput::load(
                        l,
                        prefix,
                        "o_norm.weight",
                        c.use_gate,
                        c.d_model,
                        vd,
                        c.head_v_dim,
                        c.norm_eps,
                    )?,
                    config: c.clone(),
                }
            }
            FlaMixerConfig::LinearAttn(c) => {
                let f = c.feature_map.width(c.head_k_dim);
                check_heads(f, c.head_v_dim)?;
                let g = c.num_heads / c.num_kv_heads;
                let (kd, vd) = (c.num_heads * c.head_k_dim, c.num_heads * c.head_v_dim);
                Mixer::LinearAttn {
                    qkv: Qkv::load(
                        l,
                        prefix,
                        c.d_model,
                        [kd, kd / g, vd / g],
                        false,
                        0,
                        false,
                        [false; 3],
                    )?,
                    map_q: FeatureLayers::load(l, prefix, "q", c)?,
                    map_k: FeatureLayers::load(l, prefix, "k", c)?,
                    output: HeadOutput::load(
                        l,
                        prefix,
                        "norm.weight",
                        false,
                        c.d_model,
                        vd,
                        c.head_v_dim,
                        c.norm_eps,
                    )?,
                    config: c.clone(),
                }
            }
        })
    }

    fn qkv(&self) -> &Qkv {
        match self {
            Mixer::Gla { qkv, .. }
            | Mixer::Delta { qkv, .. }
            | Mixer::LinearAttn { qkv, .. }
            | Mixer::GatedDelta { qkv, .. } => qkv,
        }
    }

    fn output(&self) -> &HeadOutput {
        match self {
            Mixer::Gla { output, .. }
            | Mixer::Delta { output, .. }
            | Mixer::LinearAttn { output, .. }
            | Mixer::GatedDelta { output, .. } => output,
        }
    }

    /// (heads of the state, key width, value width) of one session's matrix state.
    fn state_shape(&self) -> (usize, usize, usize) {
        match self {
            Mixer::Gla { config: c, .. } => (c.num_heads, c.head_k_dim, c.head_v_dim),
            Mixer::Delta { config: c, .. } => (c.num_heads, c.head_k_dim, c.head_v_dim),
            Mixer::GatedDelta { config: c, .. } => (c.num_v_heads, c.head_k_dim, c.head_v_dim),
            Mixer::LinearAttn { config: c, .. } => {
                (c.num_heads, c.feature_map.width(c.head_k_dim), c.head_v_dim)
            }
        }
    }

    /// Floats of one session's extra state in this layer: linear attention's normaliser z.
    fn extra_state(&self) -> usize {
        match self {
            Mixer::LinearAttn { config: c, .. } if c.normalize => {
                c.num_heads * c.feature_map.width(c.head_k_dim)
            }
            _ => 0,
        }
    }

    fn size_bytes(&self) -> usize {
        self.qkv().size_bytes()
            + self.output().size_bytes()
            + match self {
                Mixer::Gla {
                    key_gate,
                    retention,
                    ..
                } => {
                    key_gate
                        .as_ref()
                        .map_or(0, |(a, b)| a.size_bytes() + b.size_bytes())
                        + retention.as_ref().map_or(0, |r| 4 * r.len())
                }
                Mixer::Delta { b_proj, .. } => b_proj.as_ref().map_or(0, DeviceLinear::size_bytes),
                Mixer::LinearAttn { map_q, map_k, .. } => map_q.size_bytes() + map_k.size_bytes(),
                Mixer::GatedDelta {
                    a_proj,
                    b_proj,
                    neg_a,
                    dt_bias,
                    ..
                } => a_proj.size_bytes() + b_proj.size_bytes() + 4 * (neg_a.len() + dt_bias.len()),
            }
    }

    /// The mixer over the batch's rows of `x` into `out` (`[M, D]`).
    fn forward(
        &self,
        gpu: &Gpu,
        x: DevMat,
        batch: &DeviceBatch,
        pool: &LayerPool,
        out: u64,
        scratch: &mut Scratch,
    ) -> Result<(), GpuError> {
        let m = x.rows;
        let [q, k, v] = self.qkv().forward(gpu, x, batch, &pool.conv, scratch)?;
        let (heads, dk, dv) = self.state_shape();
        let o = gpu.zeros(m * heads * dv)?;
        match self {
            Mixer::Gla {
                config: c,
                key_gate,
                retention,
                ..
            } => {
                let g = c.num_heads / c.num_kv_heads;
                let (kd, kkd, kvd) = (c.num_heads * dk, c.num_heads * dk / g, c.num_heads * dv / g);
                // The key gate's buffer must outlive the launch that reads its address.
                let key_gate_values = match key_gate {
                    Some((down, up_proj)) => {
                        let low = gpu.zeros(m * GATE_LOW_RANK)?;
                        down.forward(gpu, x, gpu.ptr(&low), scratch)?;
                        let gk = gpu.zeros(m * kkd)?;
                        up_proj.forward(
                            gpu,
                            DevMat::dense(gpu, &low, m, GATE_LOW_RANK),
                            gpu.ptr(&gk),
                            scratch,
                        )?;
                        gpu.launch_elementwise(
                            "gla_gate",
                            m * kkd,
                            &[
                                Arg::Ptr(gpu.ptr(&gk)),
                                Arg::I64((m * kkd) as i64),
                                Arg::F32(GATE_LOGIT_NORMALIZER),
                                Arg::I32(c.clamp_min.is_some() as i32),
                                Arg::F32(c.clamp_min.unwrap_or(0.0)),
                            ],
                        )?;
                        Some(gk)
                    }
                    None => None,
                };
                let (gk, g_ld) = match (&key_gate_values, retention) {
                    (Some(gk), _) => (gpu.ptr(gk), kkd as i32),
                    (None, Some(decay)) => (gpu.ptr(decay), 0),
                    (None, None) => (0, -1),
                };
                if let Some(map) = c.feature_map {
                    let kind = match map {
                        FeatureMap::Silu => SILU,
                        FeatureMap::Relu => RELU,
                        FeatureMap::Sigmoid => SIGMOID,
                    };
                    activate(gpu, &q, m * kd, kind)?;
                    activate(gpu, &k, m * kkd, kind)?;
                }
                if c.decay == DecayKind::Retention {
                    for (buf, width) in [(&q, kd), (&k, kkd)] {
                        gpu.launch_elementwise(
                            "rotary",
                            m * width / 2,
                            &[
                                Arg::Ptr(gpu.ptr(buf)),
                                Arg::I32(m as i32),
                                Arg::I32(width as i32),
                                Arg::I32(dk as i32),
                                Arg::Ptr(batch.positions),
                            ],
                        )?;
                    }
                }
                gla_scan(
                    gpu,
                    &GlaScan {
                        q: gpu.ptr(&q),
                        q_ld: kd,
                        k: gpu.ptr(&k),
                        k_ld: kkd,
                        v: gpu.ptr(&v),
                        v_ld: kvd,
                        g: gk,
                        g_ld,
                        dk,
                        dv,
                        heads,
                        groups: g,
                        scale: (dk as f32).powf(-0.5),
                        o: gpu.ptr(&o),
                    },
                    batch,
                    pool,
                )?;
            }
            Mixer::Delta {
                config: c, b_proj, ..
            } => {
                let kd = heads * dk;
                for values in [&q, &k] {
                    match c.qk_activation {
                        QkActivation::Silu | QkActivation::Identity => {}
                        QkActivation::Relu => activate(gpu, values, m * kd, RELU)?,
                        QkActivation::EluPlusOne => activate(gpu, values, m * kd, ELU_PLUS_ONE)?,
                    }
                    let mode = match c.qk_norm {
                        QkNorm::L2 => 0,
                        QkNorm::Sum => 1,
                    };
                    head_normalize(gpu, values, m * heads, dk, mode)?;
                }
                let neg = if c.allow_neg_eigval { 2.0 } else { 1.0 };
                let beta = match b_proj {
                    Some(b) => {
                        let beta = gpu.zeros(m * heads)?;
                        b.forward(gpu, x, gpu.ptr(&beta), scratch)?;
                        sigmoid_scale(gpu, &beta, m * heads, neg)?;
                        beta
                    }
                    None => gpu.upload(&vec![neg; m * heads])?,
                };
                delta(
                    gpu,
                    [&q, &k, &v],
                    &beta,
                    None,
                    (heads, dk, dv, 1),
                    batch,
                    pool,
                    &o,
                )?;
            }
            Mixer::LinearAttn {
                config: c,
                map_q,
                map_k,
                ..
            } => {
                let g = c.num_heads / c.num_kv_heads;
                let f = dk;
                let dkh = c.head_k_dim;
                let qf = map_q.apply(gpu, q, m * heads, dkh, c.feature_map, scratch)?;
                let kf = map_k.apply(gpu, k, m * heads / g, dkh, c.feature_map, scratch)?;
                for (values, rows, on) in
                    [(&qf, m * heads, c.norm_q), (&kf, m * heads / g, c.norm_k)]
                {
                    if on {
                        gpu.launch_elementwise(
                            "sum_normalize",
                            rows,
                            &[
                                Arg::Ptr(gpu.ptr(values)),
                                Arg::I64(rows as i64),
                                Arg::I32(f as i32),
                            ],
                        )?;
                    }
                }
                let (q_ld, k_ld, v_ld) = (heads * f, heads / g * f, heads * dv / g);
                let scale = (f as f32).powf(-0.5);
                gla_scan(
                    gpu,
                    &GlaScan {
                        q: gpu.ptr(&qf),
                        q_ld,
                        k: gpu.ptr(&kf),
                        k_ld,
                        v: gpu.ptr(&v),
                        v_ld,
                        g: 0,
                        g_ld: -1,
                        dk: f,
                        dv,
                        heads,
                        groups: g,
                        scale,
                        o: gpu.ptr(&o),
                    },
                    batch,
                    pool,
                )?;
                if c.normalize {
                    gpu.launch_grid(
                        "linear_attn_normalize",
                        (heads as u32, batch.segments as u32),
                        1,
                        &[
                            Arg::Ptr(gpu.ptr(&o)),
                            Arg::Ptr(gpu.ptr(&qf)),
                            Arg::I32(q_ld as i32),
                            Arg::Ptr(gpu.ptr(&kf)),
                            Arg::I32(k_ld as i32),
                            Arg::Ptr(gpu.ptr(&pool.extra)),
                            Arg::I32(f as i32),
                            Arg::I32(dv as i32),
                            Arg::I32(heads as i32),
                            Arg::I32(g as i32),
                            Arg::F32(scale),
                            Arg::Ptr(batch.starts),
                            Arg::Ptr(batch.lens),
                            Arg::Ptr(batch.slots),
                        ],
                    )?;
                }
            }
            Mixer::GatedDelta {
                config: c,
                a_proj,
                b_proj,
                neg_a,
                dt_bias,
                ..
            } => {
                let h = c.num_heads;
                for values in [&q, &k] {
                    head_normalize(gpu, values, m * h, dk, 0)?;
                }
                let beta = gpu.zeros(m * heads)?;
                b_proj.forward(gpu, x, gpu.ptr(&beta), scratch)?;
                let neg = if c.allow_neg_eigval { 2.0 } else { 1.0 };
                sigmoid_scale(gpu, &beta, m * heads, neg)?;
                let g = gpu.zeros(m * heads)?;
                a_proj.forward(gpu, x, gpu.ptr(&g), scratch)?;
                gpu.launch_elementwise(
                    "gdn_log_decay",
                    m * heads,
                    &[
                        Arg::Ptr(gpu.ptr(&g)),
                        Arg::I32(m as i32),
                        Arg::I32(heads as i32),
                        Arg::Ptr(gpu.ptr(neg_a)),
                        Arg::Ptr(gpu.ptr(dt_bias)),
                    ],
                )?;
                let groups = heads / h;
                let shape = (heads, dk, dv, groups);
                delta(gpu, [&q, &k, &v], &beta, Some(&g), shape, batch, pool, &o)?;
            }
        }
        self.output().forward(gpu, &o, x, out, scratch)
    }
}

/// The operands of a gated-linear-attention recurrence (see `gla_recurrent` in fla.cu).
struct GlaScan {
    q: u64,
    q_ld: usize,
    k: u64,
    k_ld: usize,
    v: u64,
    v_ld: usize,
    /// Log decay: per row (`g_ld` > 0), one row (0), or none (< 0).
    g: u64,
    g_ld: i32,
    dk: usize,
    dv: usize,
    heads: usize,
    groups: usize,
    scale: f32,
    o: u64,
}

/// The GLA recurrence over the batch: for one long sequence in time chunks (pass A
/// `gla_chunk_ends`, pass B the carry, pass C the recurrence per chunk from its carried state),
/// else every session's rows in order.
fn gla_scan(gpu: &Gpu, x: &GlaScan, batch: &DeviceBatch, pool: &LayerPool) -> Result<(), GpuError> {
    let elements = x.heads * x.dk * x.dv;
    let chunked = match batch.long_sequence() {
        Some((rows, slot)) => {
            let len = batch.scan_chunk;
            let chunks = rows.len().div_ceil(len);
            let s_end = gpu.zeros(chunks * elements)?;
            let p_end = gpu.zeros(chunks * elements)?;
            gpu.launch_grid(
                "gla_chunk_ends",
                (elements.div_ceil(128) as u32, chunks as u32),
                128,
                &[
                    Arg::Ptr(x.k),
                    Arg::I32(x.k_ld as i32),
                    Arg::Ptr(x.v),
                    Arg::I32(x.v_ld as i32),
                    Arg::Ptr(x.g),
                    Arg::I32(x.g_ld),
                    Arg::I32(x.dk as i32),
                    Arg::I32(x.dv as i32),
                    Arg::I32(x.heads as i32),
                    Arg::I32(x.groups as i32),
                    Arg::I32(rows.start as i32),
                    Arg::I32(rows.len() as i32),
                    Arg::I32(len as i32),
                    Arg::Ptr(gpu.ptr(&s_end)),
                    Arg::Ptr(gpu.ptr(&p_end)),
                ],
            )?;
            let state = gpu.ptr(&pool.s);
            Some(ChunkedScan::carry(
                gpu,
                (&s_end, &p_end),
                elements,
                state,
                slot,
                rows,
                len,
            )?)
        }
        _ => None,
    };
    let ScanLayout {
        state,
        starts,
        lens,
        slots,
        count,
    } = batch.scan_layout(gpu, chunked.as_ref(), gpu.ptr(&pool.s));
    // One thread per state element: blocks of `tile` value columns × dk key channels.
    let tile = (256 / x.dk).clamp(1, x.dv);
    gpu.launch_grid(
        "gla_recurrent",
        ((x.heads * x.dv.div_ceil(tile)) as u32, count as u32),
        (tile * x.dk) as u32,
        &[
            Arg::Ptr(x.q),
            Arg::I32(x.q_ld as i32),
            Arg::Ptr(x.k),
            Arg::I32(x.k_ld as i32),
            Arg::Ptr(x.v),
            Arg::I32(x.v_ld as i32),
            Arg::Ptr(x.g),
            Arg::I32(x.g_ld),
            Arg::I32(x.dk as i32),
            Arg::I32(x.dv as i32),
            Arg::I32(x.heads as i32),
            Arg::I32(x.groups as i32),
            Arg::F32(x.scale),
            Arg::Ptr(state),
            Arg::Ptr(starts),
            Arg::Ptr(lens),
            Arg::Ptr(slots),
            Arg::Ptr(x.o),
        ],
    )
}

fn sigmoid_scale(gpu: &Gpu, x: &DeviceBuffer<f32>, n: usize, scale: f32) -> Result<(), GpuError> {
    gpu.launch_elementwise(
        "sigmoid_scale",
        n,
        &[Arg::Ptr(gpu.ptr(x)), Arg::I64(n as i64), Arg::F32(scale)],
    )
}

/// The delta-rule recurrence for every (value head, session).
#[allow(clippy::too_many_arguments)]
fn delta(
    gpu: &Gpu,
    [q, k, v]: [&DeviceBuffer<f32>; 3],
    beta: &DeviceBuffer<f32>,
    g: Option<&DeviceBuffer<f32>>,
    (vheads, dk, dv, groups): (usize, usize, usize, usize),
    batch: &DeviceBatch,
    pool: &LayerPool,
    o: &DeviceBuffer<f32>,
) -> Result<(), GpuError> {
    let qk_ld = vheads / groups * dk;
    let v_ld = vheads * dv;
    // The rule's inputs both kernels read after the keys and values: β, the optional decay,
    // and the head shapes.
    let rule = [
        Arg::Ptr(gpu.ptr(beta)),
        Arg::Ptr(g.map_or(0, |g| gpu.ptr(g))),
        Arg::I32(g.is_some() as i32),
        Arg::I32(dk as i32),
        Arg::I32(dv as i32),
        Arg::I32(vheads as i32),
        Arg::I32(groups as i32),
    ];
    let (k_v, v_v) = (
        [Arg::Ptr(gpu.ptr(k)), Arg::I32(qk_ld as i32)],
        [Arg::Ptr(gpu.ptr(v)), Arg::I32(v_ld as i32)],
    );
    // One long sequence: the delta rule in time chunks (see delta_chunk_ends).
    let chunked = match batch.long_sequence() {
        Some((rows, slot)) => {
            let len = batch.scan_chunk;
            let chunks = rows.len().div_ceil(len);
            let w = dv + dk;
            let ends = gpu.zeros(chunks * vheads * dk * w)?;
            let tile = (256 / dk).clamp(1, w);
            gpu.launch_grid(
                "delta_chunk_ends",
                ((vheads * w.div_ceil(tile)) as u32, chunks as u32),
                (tile * dk) as u32,
                &[
                    &k_v[..],
                    &v_v,
                    &rule,
                    &[
                        Arg::I32(rows.start as i32),
                        Arg::I32(rows.len() as i32),
                        Arg::I32(len as i32),
                        Arg::Ptr(gpu.ptr(&ends)),
                    ],
                ]
                .concat(),
            )?;
            let carried = gpu.zeros(chunks * vheads * dk * dv)?;
            gpu.launch_grid(
                "delta_chunk_carry",
                ((vheads * dv) as u32, 1),
                (dk.div_ceil(32) * 32) as u32,
                &[
                    Arg::Ptr(gpu.ptr(&ends)),
                    Arg::I32(chunks as i32),
                    Arg::I32(dk as i32),
                    Arg::I32(dv as i32),
                    Arg::I32(vheads as i32),
                    Arg::Ptr(gpu.ptr(&pool.s)),
                    Arg::I32(slot as i32),
                    Arg::Ptr(gpu.ptr(&carried)),
                ],
            )?;
            Some(ChunkedScan::segments(gpu, carried, rows, len)?)
        }
        _ => None,
    };
    let ScanLayout {
        state,
        starts,
        lens,
        slots,
        count,
    } = batch.scan_layout(gpu, chunked.as_ref(), gpu.ptr(&pool.s));
    let tile = (256 / dk).clamp(1, dv);
    gpu.launch_grid(
        "delta_recurrent",
        ((vheads * dv.div_ceil(tile)) as u32, count as u32),
        (tile * dk) as u32,
        &[
            &[Arg::Ptr(gpu.ptr(q))][..],
            &k_v,
            &v_v,
            &rule,
            &[
                Arg::F32((dk as f32).powf(-0.5)),
                Arg::Ptr(state),
                Arg::Ptr(starts),
                Arg::Ptr(lens),
                Arg::Ptr(slots),
                Arg::Ptr(gpu.ptr(o)),
            ],
        ]
        .concat(),
    )
}

/// The learned part of linear attention's feature map, shared by every head.
enum FeatureLayers {
    None,
    One(DeviceLinear),
    Two(DeviceLinear, DeviceLinear),
}

impl FeatureLayers {
    /// `feature_map_{which}.*` (`k` reads the `q` layers when they are tied and saved once).
    fn load(
        l: &Loader<'_>,
        prefix: &str,
        which: &str,
        c: &LinearAttnConfig,
    ) -> Result<Self, GpuModelError> {
        let has = |w: &str, layer: &str| {
            l.checkpoint
                .contains(&format!("{prefix}feature_map_{w}.{layer}.weight"))
        };
        let which = if has(which, "layer1") || has(which, "layer") {
            which
        } else {
            "q"
        };
        let dk = c.head_k_dim;
        let layer = |name: &str| {
            let w = format!("{prefix}feature_map_{which}.{name}.weight");
            let b = format!("{prefix}feature_map_{which}.{name}.bias");
            let bias = l.checkpoint.contains(&b).then_some(b);
            l.linear(&w, bias.as_deref(), dk, dk)
        };
        Ok(match c.feature_map {
            FeatureMapKind::ElementwiseProduct => {
                FeatureLayers::Two(layer("layer1")?, layer("layer2")?)
            }
            FeatureMapKind::Hedgehog | FeatureMapKind::T2r => FeatureLayers::One(layer("layer")?),
            _ => FeatureLayers::None,
        })
    }

    fn size_bytes(&self) -> usize {
        match self {
            FeatureLayers::None => 0,
            FeatureLayers::One(a) => a.size_bytes(),
            FeatureLayers::Two(a, b) => a.size_bytes() + b.size_bytes(),
        }
    }

    /// φ over `rows` rows of `dk`-wide heads of `x` (consumed), giving `[rows, f]`.
    fn apply(
        &self,
        gpu: &Gpu,
        x: DeviceBuffer<f32>,
        rows: usize,
        dk: usize,
        kind: FeatureMapKind,
        scratch: &mut Scratch,
    ) -> Result<DeviceBuffer<f32>, GpuError> {
        let project = |l: &DeviceLinear, scratch: &mut Scratch| -> Result<_, GpuError> {
            let y = gpu.zeros(rows * dk)?;
            l.forward(gpu, DevMat::dense(gpu, &x, rows, dk), gpu.ptr(&y), scratch)?;
            Ok(y)
        };
        let rows_arg = Arg::I64(rows as i64);
        Ok(match (kind, self) {
            (FeatureMapKind::ElementwiseProduct, FeatureLayers::Two(a, b)) => {
                let (y, z) = (project(a, scratch)?, project(b, scratch)?);
                let n = rows * dk;
                gpu.launch_elementwise(
                    "mul_inplace",
                    n,
                    &[
                        Arg::Ptr(gpu.ptr(&y)),
                        Arg::Ptr(gpu.ptr(&z)),
                        Arg::I64(n as i64),
                    ],
                )?;
                y
            }
            (FeatureMapKind::Hedgehog, FeatureLayers::One(l)) => {
                let y = project(l, scratch)?;
                let out = gpu.zeros(rows * 2 * dk)?;
                gpu.launch_elementwise(
                    "hedgehog",
                    rows,
                    &[
                        Arg::Ptr(gpu.ptr(&y)),
                        rows_arg,
                        Arg::I32(dk as i32),
                        Arg::Ptr(gpu.ptr(&out)),
                    ],
                )?;
                out
            }
            (FeatureMapKind::T2r, FeatureLayers::One(l)) => {
                let y = project(l, scratch)?;
                activate(gpu, &y, rows * dk, RELU)?;
                y
            }
            (FeatureMapKind::Dpfp, _) => {
                let out = gpu.zeros(rows * 2 * dk * DPFP_NU)?;
                gpu.launch_elementwise(
                    "dpfp",
                    rows,
                    &[
                        Arg::Ptr(gpu.ptr(&x)),
                        rows_arg,
                        Arg::I32(dk as i32),
                        Arg::I32(DPFP_NU as i32),
                        Arg::Ptr(gpu.ptr(&out)),
                    ],
                )?;
                out
            }
            (FeatureMapKind::Elu, _) => {
                activate(gpu, &x, rows * dk, ELU_PLUS_ONE)?;
                x
            }
            (FeatureMapKind::Relu, _) => {
                activate(gpu, &x, rows * dk, RELU)?;
                x
            }
            _ => x,
        })
    }
}

struct Block {
    attn_norm: DeviceBuffer<f32>,
    attn: Mixer,
    mlp_norm: DeviceBuffer<f32>,
    mlp: Mlp,
}

/// One layer's state pool: conv windows for q, k, v (`[slots, C, K]`, empty buffers without
/// convs) and the matrix states `[slots, heads, dk, dv]`.
struct LayerPool {
    conv: Vec<DeviceBuffer<f32>>,
    s: DeviceBuffer<f32>,
    /// Linear attention's normaliser z, `[slots, heads, f]` (one float without it).
    extra: DeviceBuffer<f32>,
    /// Floats per slot of each conv pool, of the matrix state and of `extra`.
    conv_per_slot: [usize; 3],
    s_per_slot: usize,
    extra_per_slot: usize,
}

pub struct GpuFlaLm {
    pub config: FlaConfig,
    pub dtype: WeightDtype,
    gpu: Gpu,
    embedding: DeviceMatrix,
    lm_head: Option<DeviceLinear>,
    blocks: Vec<Block>,
    norm: DeviceBuffer<f32>,
    pools: Vec<LayerPool>,
    slots: SlotPool,
    scratch: Scratch,
    /// Rows per time chunk of the GLA recurrence for one long sequence.
    scan_chunk: usize,
}

impl GpuFamily for GpuFlaLm {
    type Cpu = crate::models::fla::FlaLm;

    fn load(
        config: FlaConfig,
        checkpoint: &Checkpoint,
        gpu: Gpu,
        dtype: WeightDtype,
        max_sessions: usize,
    ) -> Result<Self, GpuModelError> {
        let (d, v) = (config.hidden_size, config.vocab_size);
        let l = Loader {
            checkpoint,
            gpu: &gpu,
            dtype,
        };
        let mut blocks = Vec::new();
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}.");
            blocks.push(Block {
                attn_norm: l.vector(&format!("{p}attn_norm.weight"), d)?,
                attn: Mixer::load(&l, &format!("{p}attn."), &config.mixer)?,
                mlp_norm: l.vector(&format!("{p}mlp_norm.weight"), d)?,
                mlp: Mlp::load(&l, &format!("{p}mlp."), d, config.intermediate_size)?,
            });
        }
        let norm = l.vector("model.norm.weight", d)?;
        let tied = config.tie_embeddings || !checkpoint.contains("lm_head.weight");
        let embedding = DeviceMatrix::upload(
            &gpu,
            checkpoint
                .load("model.embeddings.weight", &[v, d])?
                .as_slice(),
            dtype,
        )?;
        let lm_head = match tied {
            true => None,
            false => Some(l.linear("lm_head.weight", None, v, d)?),
        };
        let conv_per_slot = blocks
            .first()
            .map_or([0; 3], |b| b.attn.qkv().window_sizes());
        let (heads, dk, dv) = blocks.first().map_or((0, 0, 0), |b| b.attn.state_shape());
        let s_per_slot = heads * dk * dv;
        let extra_per_slot = blocks.first().map_or(0, |b| b.attn.extra_state());
        let per_session = 4
            * config.num_layers
            * (s_per_slot + extra_per_slot + conv_per_slot.iter().sum::<usize>());
        let activations = 4 * 1024 * (8 * d + 4 * config.intermediate_size + v);
        let pool = SlotPool::sized(&gpu, max_sessions, per_session, activations)?;
        let pools = (0..config.num_layers)
            .map(|_| {
                Ok(LayerPool {
                    conv: conv_per_slot
                        .iter()
                        .map(|&c| gpu.zeros(pool.slots * c))
                        .collect::<Result<_, GpuError>>()?,
                    s: gpu.zeros(pool.slots * s_per_slot)?,
                    extra: gpu.zeros(pool.slots * extra_per_slot)?,
                    conv_per_slot,
                    s_per_slot,
                    extra_per_slot,
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        Ok(GpuFlaLm {
            config,
            dtype,
            gpu,
            embedding,
            lm_head,
            blocks,
            norm,
            pools,
            slots: pool,
            scratch: Scratch::default(),
            scan_chunk: 64,
        })
    }
}

impl GpuLanguageFamily for GpuFlaLm {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn logits_width(&self) -> usize {
        self.config.vocab_size
    }

    fn ladder(&self) -> &[bool] {
        &self.config.ladder
    }

    fn ladder_mut(&mut self) -> &mut Vec<bool> {
        &mut self.config.ladder
    }

    fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Rows per time chunk when one long sequence runs the GLA recurrence in chunks.
    fn set_scan_chunk(&mut self, rows: usize) {
        self.scan_chunk = rows.max(1);
    }

    fn family(&self) -> &'static str {
        match self.config.model_type.as_str() {
            "gla" => "gla",
            "retnet" => "retnet",
            "delta_net" => "delta_net",
            "gated_deltanet" => "gated_deltanet",
            _ => "fla",
        }
    }

    fn session_capacity(&self) -> usize {
        self.slots.slots
    }

    fn state_bytes(&self) -> usize {
        self.pools
            .iter()
            .map(|p| 4 * (p.s_per_slot + p.extra_per_slot + p.conv_per_slot.iter().sum::<usize>()))
            .sum()
    }

    fn weight_bytes(&self) -> usize {
        self.embedding.size_bytes()
            + self.lm_head.as_ref().map_or(0, DeviceLinear::size_bytes)
            + 4 * self.norm.len()
            + self
                .blocks
                .iter()
                .map(|b| {
                    4 * (b.attn_norm.len() + b.mlp_norm.len())
                        + b.attn.size_bytes()
                        + b.mlp.size_bytes()
                })
                .sum::<usize>()
    }

    /// A fresh session: a free slot, its state zeroed.
    fn new_session(&mut self) -> Result<GpuSession, GpuModelError> {
        let session = self.slots.take()?;
        for pool in &mut self.pools {
            for (buf, &per) in pool.conv.iter_mut().zip(&pool.conv_per_slot) {
                if per > 0 {
                    zero_slot(&self.gpu, buf, session.slot, per)?;
                }
            }
            zero_slot(&self.gpu, &mut pool.s, session.slot, pool.s_per_slot)?;
            if pool.extra_per_slot > 0 {
                zero_slot(
                    &self.gpu,
                    &mut pool.extra,
                    session.slot,
                    pool.extra_per_slot,
                )?;
            }
        }
        Ok(session)
    }

    /// The packed batch (see `FlaLm::forward_packed`) on one rank of a tensor-parallel group
    /// (a group of one: the whole model; see `FlaLm::forward_in_group`): the attention and MLP outputs are partial sums the group
    /// all-reduces, overlapped with the next sub-block where the layer is ladder-wired.
    fn forward_in_group(
        &mut self,
        tokens: &[u32],
        lens: &[usize],
        sessions: &mut [&mut GpuSession],
        group: &mut DeviceGroup<'_>,
        logits: LogitRows<'_>,
    ) -> Result<Option<Tensor>, GpuModelError> {
        let segments = packed_segments(tokens, lens, sessions.len(), self.config.vocab_size)?;
        let (d, v, eps) = (
            self.config.hidden_size,
            self.config.vocab_size,
            self.config.norm_eps,
        );
        let m = tokens.len();
        let gpu = &self.gpu;
        let mut batch = DeviceBatch::upload(gpu, &segments, sessions)?;
        batch.scan_chunk = self.scan_chunk;
        let ids = gpu.upload(tokens)?;
        let h = gpu.zeros(m * d)?;
        let normed = gpu.zeros(m * d)?;
        let p = |b: &DeviceBuffer<f32>| gpu.ptr(b);
        gpu.embed_rows(&self.embedding, gpu.ptr(&ids), m, d, p(&h))?;
        let mut stream = DeviceResidualStream::new(h);
        for (i, (block, pool)) in self.blocks.iter().zip(&self.pools).enumerate() {
            let ladder = self.config.ladder[i];
            let s = &mut self.scratch;
            let read = p(stream.read(ladder, gpu, group)?);
            gpu.rms_norm(read, p(&block.attn_norm), m, d, eps, p(&normed))?;
            let x = DevMat::dense(gpu, &normed, m, d);
            let delta = stream.output(gpu)?;
            block.attn.forward(gpu, x, &batch, pool, p(&delta), s)?;
            stream.push(delta, ladder, gpu, group)?;
            let read = p(stream.read(ladder, gpu, group)?);
            gpu.rms_norm(read, p(&block.mlp_norm), m, d, eps, p(&normed))?;
            let delta = stream.output(gpu)?;
            block.mlp.forward(gpu, x, p(&delta), s)?;
            stream.push(delta, ladder, gpu, group)?;
        }
        FinalLayers {
            norm: &self.norm,
            eps,
            lm_head: self.lm_head.as_ref(),
            embedding: &self.embedding,
            width: v,
            normed: &normed,
            scratch: &mut self.scratch,
        }
        .finish(gpu, stream, group, sessions, lens, logits)
    }
}
