//! The LMUFormer's layers (`src/lmu_rnn.py` of the reference): the convolutional patch
//! embedding, and a block's LMU token mixer and convolutional FFN, in both variants.

use tideway_kernels::Weight;
use tideway_kernels::matmul::Linear;

use crate::error::LoadError;
use crate::layers::batch_norm::BatchNorm;
use crate::layers::frames::{ConvWindow, FrameConv, Frames, delay_one_frame};
use crate::models::lmuformer::lmu::{LmuCell, LmuCellShape};
use crate::models::lmuformer::{LmuFormerConfig, LmuFormerState, Variant};
use crate::spiking::{Lif, LifLayer, LifRegistry, Membranes};
use crate::state_dict::StateDict;

/// A 1×1 `Conv1d` with bias (`weight` `[out, in, 1]`) as a linear layer.
pub(crate) fn load_pointwise(
    dict: &StateDict,
    prefix: &str,
    inp: usize,
    out: usize,
) -> Result<Linear, LoadError> {
    let w = dict.load(&format!("{prefix}.weight"), &[out, inp, 1])?;
    let w = Weight::from_vec(w.as_slice().to_vec(), &[out, inp]).expect("shape");
    let b = dict.load(&format!("{prefix}.bias"), &[out])?;
    Ok(Linear::from_torch(&w, Some(b)).expect("shapes checked"))
}

pub(crate) fn relu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// `nn.GELU()` (exact, erf form), computed in f64 and rounded.
pub(crate) fn gelu(x: &mut [f32]) {
    for v in x.iter_mut() {
        let z = *v as f64;
        *v = (0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2))) as f32;
    }
}

/// The convolutional patch embedding (`Tokenizer` / `Conv1d4EBMs`).
#[derive(Debug, Clone)]
pub(crate) struct PatchEmbed {
    /// The four k = 3 convolutions of the main path.
    pub(crate) convs: Vec<FrameConv>,
    /// Their BatchNorms (`conv_layers.i.3` / `proj_bn{i}`).
    pub(crate) norms: Vec<BatchNorm>,
    /// Spiking: the LIF after each BatchNorm.
    pub(crate) lifs: Vec<LifLayer>,
    pub(crate) rpe: FrameConv,
}

impl PatchEmbed {
    pub(crate) const CONVS: usize = 5;

    pub(crate) fn load(
        dict: &StateDict,
        c: &LmuFormerConfig,
        registry: &mut LifRegistry,
    ) -> Result<Self, LoadError> {
        let (cin, dim) = (c.in_channels, c.dim);
        let mut convs = Vec::new();
        let mut norms = Vec::new();
        let mut lifs = Vec::new();
        for i in 0..4 {
            let inp = if i == 0 { cin } else { dim };
            let (conv, bn) = match c.variant {
                Variant::Plain => (
                    format!("patch_embed.conv_layers.{i}.0.weight"),
                    format!("patch_embed.conv_layers.{i}.3"),
                ),
                Variant::Spiking => {
                    let suffix = if i == 0 { String::new() } else { i.to_string() };
                    lifs.push(registry.add(format!("patch_embed.proj_lif{suffix}"), c.lif, dim));
                    (
                        format!("patch_embed.proj_conv{suffix}.weight"),
                        format!("patch_embed.proj_bn{suffix}"),
                    )
                }
            };
            convs.push(FrameConv::load(dict, &conv, inp, dim)?);
            norms.push(BatchNorm::load(dict, &bn, dim)?);
        }
        let rpe = FrameConv::load(dict, "patch_embed.rpe_conv.weight", dim, dim)?;
        Ok(PatchEmbed {
            convs,
            norms,
            lifs,
            rpe,
        })
    }

    pub(crate) fn forward(
        &self,
        x: Frames,
        states: &mut [&mut LmuFormerState],
        ends: &[bool],
    ) -> Frames {
        let mut x = x;
        for i in 0..4 {
            let mut windows: Vec<&mut ConvWindow> =
                states.iter_mut().map(|s| &mut s.windows[i]).collect();
            x = self.convs[i].forward(&mut windows, &x, ends);
            match self.lifs.is_empty() {
                // Tokenizer: Conv → ReLU → BN.
                true => {
                    relu(&mut x.data);
                    self.norms[i].apply(&mut x.data);
                }
                // Conv1d4EBMs: BN → LIF after the first three convs; the fourth's BN → LIF
                // feeds only the rpe branch.
                false if i < 3 => {
                    self.norms[i].apply(&mut x.data);
                    let mut m: Vec<&mut Membranes> =
                        states.iter_mut().map(|s| &mut s.membranes).collect();
                    self.lifs[i].fire(&mut m, &mut x);
                }
                false => {}
            }
        }
        // The rpe branch reads x itself (Tokenizer) or LIF(BN(x)) (Conv1d4EBMs).
        let spiking_branch = (!self.lifs.is_empty()).then(|| {
            let mut branch = x.clone();
            self.norms[3].apply(&mut branch.data);
            let mut m: Vec<&mut Membranes> = states.iter_mut().map(|s| &mut s.membranes).collect();
            self.lifs[3].fire(&mut m, &mut branch);
            branch
        });
        let mut windows: Vec<&mut ConvWindow> =
            states.iter_mut().map(|s| &mut s.windows[4]).collect();
        let mut out = self
            .rpe
            .forward(&mut windows, spiking_branch.as_ref().unwrap_or(&x), ends);
        let mut held: Vec<&mut Option<Vec<f32>>> =
            states.iter_mut().map(|s| &mut s.residual).collect();
        let residual = delay_one_frame(&mut held, &x, ends);
        debug_assert_eq!(residual.counts, out.counts);
        for (o, r) in out.data.iter_mut().zip(&residual.data) {
            *o += r;
        }
        out
    }

    pub(crate) fn size_bytes(&self) -> usize {
        self.convs.iter().map(FrameConv::size_bytes).sum::<usize>() + self.rpe.size_bytes()
    }
}

/// `LMU` / `SLMUMs`: [BN → LIF(0.5) →] cell → 1×1 conv → BN.
#[derive(Debug, Clone)]
pub(crate) struct LmuMixer {
    pub(crate) prev: Option<(BatchNorm, LifLayer)>,
    pub(crate) cell: LmuCell,
    pub(crate) proj: Linear,
    pub(crate) proj_bn: BatchNorm,
}

/// `ConvFFN` / `ConvFFNMs`.
#[derive(Debug, Clone)]
pub(crate) enum ChannelMixer {
    Plain {
        fc1: Linear,
        fc1_bn: BatchNorm,
        fc2: Linear,
        fc2_bn: BatchNorm,
    },
    Spiking {
        fc1_bn: BatchNorm,
        fc1_lif: LifLayer,
        fc1: Linear,
        fc2_bn: BatchNorm,
        fc2_lif: LifLayer,
        fc2: Linear,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) mixer: LmuMixer,
    pub(crate) ffn: ChannelMixer,
}

impl Block {
    pub(crate) fn load(
        dict: &StateDict,
        c: &LmuFormerConfig,
        j: usize,
        registry: &mut LifRegistry,
    ) -> Result<Self, LoadError> {
        let (dim, hidden) = (c.dim, c.mlp_hidden);
        let p = format!("block.{j}");
        let spiking = c.variant == Variant::Spiking;
        let prev = if spiking {
            let lif = Lif {
                threshold: 0.5,
                ..c.lif
            };
            Some((
                BatchNorm::load(dict, &format!("{p}.attn.prev_bn"), dim)?,
                registry.add(format!("{p}.attn.prev_lif"), lif, dim),
            ))
        } else {
            None
        };
        let shape = LmuCellShape {
            input: dim,
            hidden: dim,
            memory: if spiking { 2 * dim } else { dim },
            theta: c.theta,
            seq_len: c.seq_len,
        };
        let cell_lif = spiking.then_some((c.lif, &mut *registry));
        let cell = LmuCell::load(dict, &format!("{p}.attn.lmu"), shape, cell_lif)?;
        let mixer = LmuMixer {
            prev,
            cell,
            proj: load_pointwise(dict, &format!("{p}.attn.proj_conv"), dim, dim)?,
            proj_bn: BatchNorm::load(dict, &format!("{p}.attn.proj_bn"), dim)?,
        };
        let m = format!("{p}.mlp");
        let ffn = if spiking {
            ChannelMixer::Spiking {
                fc1_bn: BatchNorm::load(dict, &format!("{m}.fc1_bn"), dim)?,
                fc1_lif: registry.add(format!("{m}.fc1_lif"), c.lif, dim),
                fc1: load_pointwise(dict, &format!("{m}.fc1_conv"), dim, hidden)?,
                fc2_bn: BatchNorm::load(dict, &format!("{m}.fc2_bn"), hidden)?,
                fc2_lif: registry.add(format!("{m}.fc2_lif"), c.lif, hidden),
                fc2: load_pointwise(dict, &format!("{m}.fc2_conv"), hidden, dim)?,
            }
        } else {
            ChannelMixer::Plain {
                fc1: load_pointwise(dict, &format!("{m}.fc1_conv"), dim, hidden)?,
                fc1_bn: BatchNorm::load(dict, &format!("{m}.fc1_bn"), hidden)?,
                fc2: load_pointwise(dict, &format!("{m}.fc2_conv"), hidden, dim)?,
                fc2_bn: BatchNorm::load(dict, &format!("{m}.fc2_bn"), dim)?,
            }
        };
        Ok(Block { mixer, ffn })
    }

    pub(crate) fn forward(&self, j: usize, x: &mut Frames, states: &mut [&mut LmuFormerState]) {
        let mut membranes: Vec<&mut Membranes> = Vec::with_capacity(states.len());
        let mut memories: Vec<&mut Vec<f32>> = Vec::with_capacity(states.len());
        for s in states.iter_mut() {
            let LmuFormerState {
                membranes: m,
                memories: mem,
                ..
            } = &mut **s;
            membranes.push(m);
            memories.push(&mut mem[j]);
        }
        // x += LMU(x)
        let mixer = &self.mixer;
        // SLMUMs feeds the cell LIF(BN(x)); LMU feeds it x itself.
        let spikes = mixer.prev.as_ref().map(|(bn, lif)| {
            let mut input = x.clone();
            bn.apply(&mut input.data);
            lif.fire(&mut membranes, &mut input);
            input
        });
        let h = mixer
            .cell
            .forward(spikes.as_ref().unwrap_or(x), &mut memories, &mut membranes);
        let mut y = h.linear(&mixer.proj);
        mixer.proj_bn.apply(&mut y.data);
        add_into(x, &y);
        // x += FFN(x)
        let y = match &self.ffn {
            ChannelMixer::Plain {
                fc1,
                fc1_bn,
                fc2,
                fc2_bn,
            } => {
                let mut a = x.linear(fc1);
                fc1_bn.apply(&mut a.data);
                gelu(&mut a.data);
                let mut b = a.linear(fc2);
                fc2_bn.apply(&mut b.data);
                relu(&mut b.data);
                b
            }
            ChannelMixer::Spiking {
                fc1_bn,
                fc1_lif,
                fc1,
                fc2_bn,
                fc2_lif,
                fc2,
            } => {
                let mut a = x.clone();
                fc1_bn.apply(&mut a.data);
                fc1_lif.fire(&mut membranes, &mut a);
                let mut b = a.linear(fc1);
                fc2_bn.apply(&mut b.data);
                fc2_lif.fire(&mut membranes, &mut b);
                b.linear(fc2)
            }
        };
        add_into(x, &y);
    }

    /// Every LIF population of the block, in the order a frame meets them.
    pub(crate) fn lifs(&self) -> Vec<&LifLayer> {
        let mut lifs: Vec<&LifLayer> = self.mixer.prev.iter().map(|(_, lif)| lif).collect();
        if let Some(g) = &self.mixer.cell.gates {
            lifs.extend([&g.lif_u, &g.lif_m, &g.lif_h]);
        }
        if let ChannelMixer::Spiking {
            fc1_lif, fc2_lif, ..
        } = &self.ffn
        {
            lifs.extend([fc1_lif, fc2_lif]);
        }
        lifs
    }

    pub(crate) fn size_bytes(&self) -> usize {
        let ffn = match &self.ffn {
            ChannelMixer::Plain { fc1, fc2, .. } | ChannelMixer::Spiking { fc1, fc2, .. } => {
                fc1.size_bytes() + fc2.size_bytes()
            }
        };
        self.mixer.cell.size_bytes() + self.mixer.proj.size_bytes() + ffn
    }
}

pub(crate) fn add_into(x: &mut Frames, y: &Frames) {
    debug_assert_eq!(x.counts, y.counts);
    for (a, b) in x.data.iter_mut().zip(&y.data) {
        *a += b;
    }
}
