//! The LMUFormer and the spiking LMUFormer (Liu et al., ICLR 2024; `src/lmu_rnn.py` of the
//! reference, variants `lmu_rnn_conv1d` and `slmu_rnn_ms_conv1d`), `shared/SPEC-MODELS.md`
//! §4.2-4.3, streaming frame by frame with constant state per session.
//!
//! Input: feature frames `[frames, in_channels]` (normalised fbank for audio). Output: the
//! head at every frame `[frames, num_classes]`; the clip's class scores are their mean.
//!
//! ```text
//! patch embedding  lmu_rnn_conv1d:      (Conv3 → ReLU → BN) × 4 = x;  x + Conv3(x)
//!                  slmu_rnn_ms_conv1d:  Conv3 → (BN → LIF → Conv3) × 3 = x;  x + Conv3(LIF(BN(x)))
//! block × depths   x += LMU(x)          [BN → LIF(0.5) →] LMU cell → 1×1 conv → BN
//!                  x += FFN(x)          1×1 → BN → GELU → 1×1 → BN → ReLU
//!                                       | BN → LIF → 1×1 → BN → LIF → 1×1 (spiking)
//! head             [BN → LIF →] Linear, per frame; mean over frames
//! ```
//!
//! The patch embedding's k = 3 convolutions are non-causal (one frame of lookahead each, five
//! on the longest path): a stream's outputs trail its input by five frames, and the end of the
//! stream flushes them with the zero padding of the whole-clip convolution
//! (`layers::frames`). Everything after it is causal.
//!
//! Length: ~650 lines: config, both variants' blocks, the streaming and whole-clip forms and the
//! reference's two checkpoint layouts, which share every layer; the LMU cell is in `lmu.rs`.

#[cfg(feature = "cuda")]
pub mod gpu;
pub mod lmu;

use std::collections::BTreeMap;

use tideway_kernels::Weight;
use tideway_kernels::matmul::Linear;

use crate::error::{InputError, LoadError};
use crate::layers::batch_norm::BatchNorm;
use crate::layers::frames::{ConvWindow, FrameConv, Frames, delay_one_frame};
use crate::models::ModelPart;
use crate::models::config::ConfigJson;
use crate::models::lmuformer::lmu::{LmuCell, LmuCellShape};
use crate::spiking::{Lif, LifLayer, LifRegistry, Membranes};
use crate::state_dict::StateDict;
use crate::tokenizers::Frontend;
use crate::tokenizers::audio::AudioFrontend;

/// The two reference variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `lmu_rnn_conv1d`: ReLU/GELU activations.
    Plain,
    /// `slmu_rnn_ms_conv1d`: LIF neurons in place of the activations.
    Spiking,
}

/// `config.json` of an LMUFormer checkpoint (SPEC-MODELS.md §9).
#[derive(Debug, Clone, PartialEq)]
pub struct LmuFormerConfig {
    pub variant: Variant,
    pub dim: usize,
    pub in_channels: usize,
    pub num_classes: usize,
    pub depths: usize,
    pub mlp_hidden: usize,
    pub theta: f64,
    pub seq_len: usize,
    pub lif: Lif,
    /// Class names of the output columns (`labels`), if the config names them.
    pub labels: Option<Vec<String>>,
}

impl LmuFormerConfig {
    pub fn from_config(config: &ConfigJson) -> Result<Self, LoadError> {
        let top = config.top();
        let variant = match top.str_opt("variant")? {
            Some("lmu_rnn_conv1d") => Variant::Plain,
            Some("slmu_rnn_ms_conv1d") => Variant::Spiking,
            Some(other) => {
                return Err(config.unsupported(format!(
                    "LMUFormer variant {other:?} is not supported; supported: \"lmu_rnn_conv1d\", \"slmu_rnn_ms_conv1d\""
                )));
            }
            None => {
                return Err(config.malformed(
                    "missing key \"variant\" (\"lmu_rnn_conv1d\" or \"slmu_rnn_ms_conv1d\")",
                ));
            }
        };
        let dim = top.usize_req("dim")?;
        let mlp_ratio = top.f64_opt("mlp_ratio")?.unwrap_or(4.0);
        if mlp_ratio <= 0.0 {
            return Err(config.malformed("key \"mlp_ratio\" must be positive"));
        }
        let tau = top.f64_opt("lif_tau")?.unwrap_or(2.0);
        if tau <= 0.0 {
            return Err(config.malformed("key \"lif_tau\" must be positive"));
        }
        let num_classes = top.usize_req("num_classes")?;
        let labels = top.str_list_opt("labels")?;
        if let Some(l) = &labels
            && l.len() != num_classes
        {
            return Err(config.malformed(format!(
                "\"labels\" names {} classes but num_classes is {num_classes}",
                l.len()
            )));
        }
        Ok(LmuFormerConfig {
            variant,
            dim,
            labels,
            in_channels: top.usize_req("in_channels")?,
            num_classes,
            depths: top.usize_req("depths")?,
            // int(dim * mlp_ratio), as the reference's Block.
            mlp_hidden: (dim as f64 * mlp_ratio) as usize,
            theta: top.f64_opt("theta")?.unwrap_or(128.0),
            seq_len: top.usize_opt("seq_len")?.unwrap_or(128),
            lif: Lif {
                tau: tau as f32,
                threshold: top.f64_opt("lif_threshold")?.unwrap_or(1.0) as f32,
            },
        })
    }
}

/// A 1×1 `Conv1d` with bias (`weight` `[out, in, 1]`) as a linear layer.
fn load_pointwise(
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

fn relu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// `nn.GELU()` (exact, erf form), computed in f64 and rounded.
fn gelu(x: &mut [f32]) {
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
    const CONVS: usize = 5;

    fn load(
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

    fn forward(&self, x: Frames, states: &mut [&mut LmuFormerState], ends: &[bool]) -> Frames {
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

    fn size_bytes(&self) -> usize {
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
    fn load(
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

    fn forward(&self, j: usize, x: &mut Frames, states: &mut [&mut LmuFormerState]) {
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

    fn size_bytes(&self) -> usize {
        let ffn = match &self.ffn {
            ChannelMixer::Plain { fc1, fc2, .. } | ChannelMixer::Spiking { fc1, fc2, .. } => {
                fc1.size_bytes() + fc2.size_bytes()
            }
        };
        self.mixer.cell.size_bytes() + self.mixer.proj.size_bytes() + ffn
    }
}

fn add_into(x: &mut Frames, y: &Frames) {
    debug_assert_eq!(x.counts, y.counts);
    for (a, b) in x.data.iter_mut().zip(&y.data) {
        *a += b;
    }
}

/// Checks a batch of new frames for streams that have `ended` so far: the width, one count
/// and end flag per stream, finite values, no frames for an ended stream.
pub fn check_frames(
    c: &LmuFormerConfig,
    ended: &[bool],
    input: &Frames,
    ends: &[bool],
) -> Result<(), InputError> {
    if input.width != c.in_channels {
        return Err(InputError::WrongWidth {
            expected: c.in_channels,
            found: input.width,
        });
    }
    if ended.len() != input.counts.len() || ended.len() != ends.len() {
        return Err(InputError::BatchMismatch {
            sessions: ended.len(),
            tokens: input.counts.len(),
        });
    }
    if let Some(i) = input.data.iter().position(|v| !v.is_finite()) {
        return Err(InputError::NonFinite {
            frame: i / c.in_channels,
            channel: i % c.in_channels,
        });
    }
    if ended.iter().zip(&input.counts).any(|(&e, &n)| e && n > 0) {
        return Err(InputError::Ended);
    }
    Ok(())
}

/// One stream's state in one part of the model: the patch embedding's convolution windows and
/// residual frame (the part that embeds), each of its blocks' LMU memory, its LIF membranes,
/// and the running sum for the clip mean (the part with the head). Its size does not depend
/// on the stream's length.
#[derive(Debug, Clone, PartialEq)]
pub struct LmuFormerState {
    windows: Vec<ConvWindow>,
    residual: Option<Vec<f32>>,
    memories: Vec<Vec<f32>>,
    membranes: Membranes,
    output_sum: Vec<f64>,
    frames_out: usize,
    ended: bool,
}

impl LmuFormerState {
    /// Starts recording every neuron's spikes (`[frames, channels]` by reference name).
    pub fn record_spikes(&mut self) {
        self.membranes.log = Some(BTreeMap::new());
    }

    /// The spikes recorded since [`record_spikes`](Self::record_spikes).
    pub fn spikes(&self) -> Option<&BTreeMap<String, Vec<f32>>> {
        self.membranes.log.as_ref()
    }

    /// Bytes of recurrent state (windows, residual, memories, membranes, the clip sum).
    pub fn size_bytes(&self) -> usize {
        self.windows.iter().map(ConvWindow::size_bytes).sum::<usize>()
            // The held residual frame (dim values, like the last window's frames).
            + 4 * self.windows.last().map_or(0, |w| w.size_bytes() / 8)
            + self.memories.iter().map(|m| 4 * m.len()).sum::<usize>()
            + self.membranes.size_bytes()
            + 8 * self.output_sum.len()
    }

    /// Frames that have left this part (the embedding's lookahead is the only delay, so
    /// every part of a stream counts the same).
    pub fn frames_out(&self) -> usize {
        self.frames_out
    }

    /// The mean of the per-frame outputs so far (the clip-level scores at the end).
    pub fn pooled(&self) -> Vec<f32> {
        let n = self.frames_out.max(1) as f64;
        self.output_sum.iter().map(|s| (s / n) as f32).collect()
    }
}

/// The per-frame head: [BN → LIF →] Linear.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) gate: Option<(BatchNorm, LifLayer)>,
    pub(crate) linear: Linear,
}

/// A loaded LMUFormer, or the part of it one pipeline stage runs: blocks `part.layers`, with
/// the patch embedding and the head where the part holds them.
#[derive(Debug, Clone)]
pub struct LmuFormer {
    pub(crate) config: LmuFormerConfig,
    pub(crate) part: ModelPart,
    pub(crate) embed: Option<PatchEmbed>,
    /// Blocks `part.layers`, in order.
    pub(crate) blocks: Vec<Block>,
    pub(crate) head: Option<Head>,
    /// The LIF populations of this part's layers (each session's membranes, by slot).
    pub(crate) neurons: LifRegistry,
    pub(crate) frontend: Option<Frontend>,
}

impl LmuFormer {
    /// The front end of the checkpoint's `config.json` (`frontend`), if it has one.
    pub fn frontend(&self) -> Option<&Frontend> {
        self.frontend.as_ref()
    }

    /// The audio front end, if the model has one.
    pub fn audio_frontend(&self) -> Option<&AudioFrontend> {
        match &self.frontend {
            Some(Frontend::Audio(a)) => Some(a),
            _ => None,
        }
    }

    pub fn set_frontend(&mut self, frontend: Option<Frontend>) {
        self.frontend = frontend;
    }

    /// Loads the whole model.
    pub fn load(config: LmuFormerConfig, dict: &StateDict) -> Result<Self, LoadError> {
        let part = ModelPart::whole(config.depths);
        Self::load_part(config, dict, part)
    }

    /// Loads only `part`: its blocks, and the patch embedding or the head where it holds them.
    pub fn load_part(
        config: LmuFormerConfig,
        dict: &StateDict,
        part: ModelPart,
    ) -> Result<Self, LoadError> {
        let mut neurons = LifRegistry::default();
        let embed = match part.embed {
            true => Some(PatchEmbed::load(dict, &config, &mut neurons)?),
            false => None,
        };
        let blocks = part
            .layers
            .clone()
            .map(|j| Block::load(dict, &config, j, &mut neurons))
            .collect::<Result<Vec<_>, _>>()?;
        let head = match part.head {
            true => {
                let gate = match config.variant {
                    Variant::Spiking => Some((
                        BatchNorm::load(dict, "head_bn", config.dim)?,
                        neurons.add("head_lif", config.lif, config.dim),
                    )),
                    Variant::Plain => None,
                };
                let w = dict.load("head.weight", &[config.num_classes, config.dim])?;
                let b = dict.load("head.bias", &[config.num_classes])?;
                let linear = Linear::from_torch(&w, Some(b)).expect("shapes checked");
                Some(Head { gate, linear })
            }
            false => None,
        };
        Ok(LmuFormer {
            config,
            part,
            embed,
            blocks,
            head,
            neurons,
            frontend: None,
        })
    }

    /// The blocks, embedding and head this model holds.
    pub fn part(&self) -> &ModelPart {
        &self.part
    }

    pub fn config(&self) -> &LmuFormerConfig {
        &self.config
    }

    pub fn in_channels(&self) -> usize {
        self.config.in_channels
    }

    pub fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    /// Frames a stream's outputs trail its input by (the patch embedding's lookahead).
    pub fn lookahead(&self) -> usize {
        PatchEmbed::CONVS
    }

    /// Bytes of the parameters this part holds.
    pub fn weight_bytes(&self) -> usize {
        self.embed.as_ref().map_or(0, PatchEmbed::size_bytes)
            + self.blocks.iter().map(Block::size_bytes).sum::<usize>()
            + self.head.as_ref().map_or(0, |h| h.linear.size_bytes())
    }

    /// A fresh stream's state for this part.
    pub fn new_state(&self) -> LmuFormerState {
        let c = &self.config;
        let mut windows = Vec::new();
        if self.embed.is_some() {
            windows.push(ConvWindow::new(c.in_channels));
            windows.extend((0..4).map(|_| ConvWindow::new(c.dim)));
        }
        let classes = if self.head.is_some() {
            c.num_classes
        } else {
            0
        };
        LmuFormerState {
            windows,
            residual: None,
            memories: self
                .blocks
                .iter()
                .map(|b| vec![0.0; b.mixer.cell.memory_size()])
                .collect(),
            membranes: self.neurons.new_membranes(),
            output_sum: vec![0.0; classes],
            frames_out: 0,
            ended: false,
        }
    }

    /// Bytes of one session's state in this part (constant in the stream's length).
    pub fn state_bytes(&self) -> usize {
        self.new_state().size_bytes()
    }

    /// The width of the frames this part takes: the input features where it embeds, the
    /// model's `dim` otherwise.
    pub fn input_width(&self) -> usize {
        match self.embed {
            Some(_) => self.config.in_channels,
            None => self.config.dim,
        }
    }

    /// Feeds every session its new frames (`input`, packed by session; any count, zero
    /// included) and, where `ends[i]`, ends its stream. The part that embeds takes feature
    /// frames `[rows, in_channels]` and holds back its lookahead; the others take the
    /// previous part's `[rows, dim]`. Returns each session's newly complete frames: the
    /// per-frame outputs `[rows', num_classes]` from the part with the head, the block
    /// stream `[rows', dim]` from the others.
    pub fn forward(
        &self,
        states: &mut [&mut LmuFormerState],
        input: &Frames,
        ends: &[bool],
    ) -> Result<Frames, InputError> {
        let mut x = match &self.embed {
            Some(embed) => {
                let ended: Vec<bool> = states.iter().map(|s| s.ended).collect();
                check_frames(&self.config, &ended, input, ends)?;
                embed.forward(input.clone(), states, ends)
            }
            None => {
                if input.width != self.config.dim {
                    return Err(InputError::StageMismatch {
                        layers: self.part.layers.clone(),
                    });
                }
                if states.len() != input.counts.len() || states.len() != ends.len() {
                    return Err(InputError::BatchMismatch {
                        sessions: states.len(),
                        tokens: input.counts.len(),
                    });
                }
                input.clone()
            }
        };
        for (j, block) in self.blocks.iter().enumerate() {
            block.forward(j, &mut x, states);
        }
        if let Some(head) = &self.head {
            if let Some((bn, lif)) = &head.gate {
                bn.apply(&mut x.data);
                let mut m: Vec<&mut Membranes> =
                    states.iter_mut().map(|s| &mut s.membranes).collect();
                lif.fire(&mut m, &mut x);
            }
            x = x.linear(&head.linear);
            let k = self.config.num_classes;
            for (state, rows) in states.iter_mut().zip(x.ranges()) {
                for row in x.data[rows.start * k..rows.end * k].chunks_exact(k) {
                    for (s, &v) in state.output_sum.iter_mut().zip(row) {
                        *s += v as f64;
                    }
                }
            }
        }
        for ((state, rows), &end) in states.iter_mut().zip(x.ranges()).zip(ends) {
            state.frames_out += rows.len();
            state.ended |= end;
        }
        Ok(x)
    }

    /// A whole clip at once (`[frames, in_channels]`): the per-frame outputs and their mean.
    /// The LMU memory takes its parallel form.
    pub fn run_clip(
        &self,
        state: &mut LmuFormerState,
        frames: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>), InputError> {
        let n = frames.len() / self.config.in_channels;
        let input = Frames {
            data: frames.to_vec(),
            width: self.config.in_channels,
            counts: vec![n],
        };
        let out = self.forward(&mut [state], &input, &[true])?;
        Ok((out.data, state.pooled()))
    }
}
