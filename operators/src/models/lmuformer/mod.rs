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
//! The patch embedding and the blocks are in `blocks.rs`, the LMU cell in `lmu.rs`.

pub mod blocks;
pub mod gate;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod lmu;

use std::collections::BTreeMap;

pub(crate) use blocks::{Block, PatchEmbed};

use tideway_kernels::cpu::on_compute_pool;
use tideway_kernels::matmul::Linear;

use crate::error::{InputError, LoadError};
use crate::layers::batch_norm::BatchNorm;
use crate::layers::frames::{ConvWindow, Frames};
use crate::models::ModelPart;
use crate::models::config::ConfigJson;
use crate::spiking::{Lif, LifLayer, LifRegistry, Membranes};
use crate::state_dict::StateDict;
use crate::state_tensors::{StateError, StateTensors, StateValue};
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
    /// Frames in `output_sum` (all of them unless a frame gate skipped some).
    frames_pooled: usize,
    ended: bool,
    /// The frame gate's state, where the model gates its frames (`gate.rs`).
    gate: Option<Box<gate::StreamGate>>,
    /// Which rows of the last `forward`'s output the gate skipped (empty: none).
    last_skipped: Vec<bool>,
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
            + self.gate.as_ref().map_or(0, |g| g.size_bytes())
    }

    /// Frames that have left this part (the embedding's lookahead is the only delay, so
    /// every part of a stream counts the same).
    pub fn frames_out(&self) -> usize {
        self.frames_out
    }

    /// Which rows of the last `forward`'s output for this stream the frame gate skipped (each
    /// repeats the last kept row); empty when none was.
    pub fn take_skipped(&mut self) -> Vec<bool> {
        std::mem::take(&mut self.last_skipped)
    }

    /// The frame gate's counts (frames seen, kept), where the model gates its frames.
    pub fn gate_counts(&self) -> Option<(u64, u64)> {
        let frames = self.gate.as_ref()?.frames.as_ref()?;
        Some((frames.seen, frames.kept))
    }

    /// The mean of the per-frame outputs so far (the clip-level scores at the end); frames a
    /// gate skipped are left out.
    pub fn pooled(&self) -> Vec<f32> {
        let n = self.frames_pooled.max(1) as f64;
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
    /// Frame pruning (`gate.rs`); None: every frame goes through every layer.
    pub(crate) frame_gate: Option<gate::GateMode>,
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
            frame_gate: None,
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
            frames_pooled: 0,
            ended: false,
            gate: self
                .frame_gate
                .as_ref()
                .map(|mode| Box::new(gate::StreamGate::new(mode))),
            last_skipped: Vec::new(),
        }
    }

    /// Writes `state` as named tensors, placement-free: the embedding's windows and held
    /// frame, blocks by their index in the whole model, membranes by their population's
    /// name in the reference, the head's running sum; and the frames emitted.
    pub fn export_state(&self, state: &LmuFormerState, out: &mut StateTensors) {
        for (j, window) in state.windows.iter().enumerate() {
            window.export(&format!("embed.window.{j}"), out);
        }
        if let Some(residual) = &state.residual {
            out.put_f32("embed.residual", residual);
        }
        for (i, memory) in state.memories.iter().enumerate() {
            out.put_f32(
                format!("blocks.{}.memory", self.part.layers.start + i),
                memory,
            );
        }
        for (name, values) in self.neurons.names().iter().zip(&state.membranes.values) {
            out.put_f32(format!("lif.{name}"), values);
        }
        if self.head.is_some() {
            out.put("head.output_sum", StateValue::F64(state.output_sum.clone()));
        }
        out.put_u64("frames_out", state.frames_out as u64);
        out.put_u64("frames_pooled", state.frames_pooled as u64);
        out.put_u64("ended", state.ended as u64);
        if let Some(gate) = &state.gate {
            gate.export(out);
        }
    }

    /// A stream state for this part taken from named tensors (each checked against a fresh
    /// state's size).
    pub fn import_state(&self, from: &StateTensors) -> Result<LmuFormerState, StateError> {
        let mut state = self.new_state();
        for (j, window) in state.windows.iter_mut().enumerate() {
            window.import(&format!("embed.window.{j}"), from)?;
        }
        if self.embed.is_some() && from.contains("embed.residual") {
            let mut residual = vec![0.0; self.config.dim];
            from.take_f32("embed.residual", &mut residual)?;
            state.residual = Some(residual);
        }
        for (i, memory) in state.memories.iter_mut().enumerate() {
            from.take_f32(
                &format!("blocks.{}.memory", self.part.layers.start + i),
                memory,
            )?;
        }
        for (name, values) in self.neurons.names().iter().zip(&mut state.membranes.values) {
            from.take_f32(&format!("lif.{name}"), values)?;
        }
        if self.head.is_some() {
            from.take_f64("head.output_sum", &mut state.output_sum)?;
        }
        state.frames_out = from.u64("frames_out")? as usize;
        // A state written before frame pruning pooled every frame.
        state.frames_pooled = match from.contains("frames_pooled") {
            true => from.u64("frames_pooled")? as usize,
            false => state.frames_out,
        };
        state.ended = from.u64("ended")? != 0;
        if let Some(mode) = &self.frame_gate
            && from.contains("prune.frames.pending")
        {
            state.gate = Some(Box::new(gate::StreamGate::import(mode, from)?));
        }
        Ok(state)
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
        self.forward_with(states, input, ends, None)
    }

    /// [`forward`](Self::forward) with each input frame's gate decision made elsewhere
    /// (`keep[i]`: session i's frames; the serving graph's prune stage), for a model whose
    /// gate [`decide_frames_elsewhere`](Self::decide_frames_elsewhere) handed over.
    pub fn forward_decided(
        &self,
        states: &mut [&mut LmuFormerState],
        input: &Frames,
        ends: &[bool],
        keep: &[Vec<bool>],
    ) -> Result<Frames, InputError> {
        self.forward_with(states, input, ends, Some(keep))
    }

    /// A step whose products split over the pool runs on the compute pool, as a language
    /// model's (`Model::forward_packed_rows`): its products then hand their shares to the
    /// pool's threads from inside it, one hand-off a step instead of two wake-ups a product
    /// from the caller's thread (a server's timely worker). 500 live feeds of the keyword
    /// spotter on two cores: p99 50.0 → 12.9 ms (BENCHMARKS.md, 2026-12-07). A step too small
    /// for its widest product (the LMU memory's, `2·dim` square when spiking, or the FFN's) to
    /// split stays on the caller's thread: the hand-off alone cost a lone stream's one-frame
    /// step two thirds of its rate (`tideway bench`, kws, 130k → 40k frames/s).
    fn forward_with(
        &self,
        states: &mut [&mut LmuFormerState],
        input: &Frames,
        ends: &[bool],
        keep: Option<&[Vec<bool>]>,
    ) -> Result<Frames, InputError> {
        let dim = self.config.dim;
        let widest = (2 * dim * 2 * dim).max(dim * self.config.mlp_hidden);
        if Linear::parallel(input.rows(), widest, 1) {
            on_compute_pool(|| self.forward_here(states, input, ends, keep))
        } else {
            self.forward_here(states, input, ends, keep)
        }
    }

    fn forward_here(
        &self,
        states: &mut [&mut LmuFormerState],
        input: &Frames,
        ends: &[bool],
        keep: Option<&[Vec<bool>]>,
    ) -> Result<Frames, InputError> {
        let x = match &self.embed {
            Some(embed) => {
                let ended: Vec<bool> = states.iter().map(|s| s.ended).collect();
                check_frames(&self.config, &ended, input, ends)?;
                self.gate_inputs(states, input, keep);
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
        let x = match self.frame_gate {
            Some(_) => self.forward_gated(states, x),
            None => self.blocks_and_head(states, x),
        };
        for ((state, rows), &end) in states.iter_mut().zip(x.ranges()).zip(ends) {
            state.frames_out += rows.len();
            state.ended |= end;
        }
        Ok(x)
    }

    /// This part's blocks and head (where it holds it) over `x`, every row.
    fn blocks_and_head(&self, states: &mut [&mut LmuFormerState], mut x: Frames) -> Frames {
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
                state.frames_pooled += rows.len();
            }
        }
        x
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
