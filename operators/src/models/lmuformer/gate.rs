//! Frame pruning inside the LMUFormer (SPEC-MODELS §6.3, last paragraph): a [`FrameGate`]
//! decides on each input frame; a skipped frame still goes through the patch embedding (its
//! convolutions read their neighbours) but not through the blocks and the head. For them it is
//! a frame of no input: every LIF membrane decays (`H = V + (0 − V)/τ`, which never fires),
//! and the LMU memory advances with `u = 0` (`m_t = Ā m_{t−1}`). The pooled scores leave it
//! out; its output row repeats the last kept frame's (zeros before any), so a stream's rows
//! still line up with its frames.
//!
//! The decision is made on the (normalised) input frame when it arrives and applied when the
//! embedding hands that frame on (after its lookahead), so the pending decisions are part of
//! the stream's state. The model decides itself ([`GateMode::Own`]), or a served model takes
//! the decisions the serving graph's prune stage made ([`GateMode::Decided`]), which then
//! holds the gate's own state.

use std::collections::VecDeque;

use crate::layers::frames::Frames;
use crate::models::lmuformer::{LmuFormer, LmuFormerState};
use crate::prune::frames::{FrameGate, FrameGateState};
use crate::spiking::{LifLayer, Membranes};
use crate::state_tensors::{StateError, StateTensors, StateValue};

/// Who decides which frames a gated model skips.
#[derive(Debug, Clone, PartialEq)]
pub enum GateMode {
    /// The model, with this gate.
    Own(FrameGate),
    /// The caller, frame by frame ([`LmuFormer::forward_decided`]).
    Decided,
}

/// One stream's frame gate: the gate's state (where the model decides), the decisions not
/// yet applied, and the last output row (what a skipped frame's row repeats).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamGate {
    pub frames: Option<FrameGateState>,
    pending: VecDeque<bool>,
    last_output: Option<Vec<f32>>,
}

impl StreamGate {
    pub(crate) fn new(mode: &GateMode) -> Self {
        StreamGate {
            frames: matches!(mode, GateMode::Own(_)).then(FrameGateState::default),
            ..StreamGate::default()
        }
    }

    pub(crate) fn size_bytes(&self) -> usize {
        self.pending.len() + 4 * self.last_output.as_ref().map_or(0, Vec::len)
    }

    pub(crate) fn export(&self, out: &mut StateTensors) {
        if let Some(frames) = &self.frames {
            frames.export(out);
        }
        out.put(
            "prune.frames.pending",
            StateValue::U64(self.pending.iter().map(|&k| k as u64).collect()),
        );
        if let Some(row) = &self.last_output {
            out.put_f32("prune.frames.last_output", row);
        }
    }

    pub(crate) fn import(mode: &GateMode, from: &StateTensors) -> Result<Self, StateError> {
        let pending = match from.0.get("prune.frames.pending") {
            Some(StateValue::U64(p)) => p.iter().map(|&k| k != 0).collect(),
            _ => {
                return Err(StateError::Missing {
                    name: "prune.frames.pending".into(),
                });
            }
        };
        let last_output = match from.contains("prune.frames.last_output") {
            true => Some(from.f32s("prune.frames.last_output")?.to_vec()),
            false => None,
        };
        let frames = match mode {
            GateMode::Own(_) => Some(FrameGateState::import(from)?),
            GateMode::Decided => None,
        };
        Ok(StreamGate {
            frames,
            pending,
            last_output,
        })
    }
}

impl LifLayer {
    /// `frames` frames of no input: the membranes decay as the charge with X = 0 computes it
    /// (below threshold, so nothing fires); a spike log records zeros.
    pub(crate) fn rest(&self, membranes: &mut Membranes, frames: usize) {
        let values = &mut membranes.values[self.slot];
        for _ in 0..frames {
            for v in values.iter_mut() {
                *v += (0.0 - *v) / self.lif.tau;
            }
        }
        if let Some(log) = &mut membranes.log {
            log.entry(self.name.clone())
                .or_default()
                .extend(std::iter::repeat_n(0.0, frames * self.channels));
        }
    }
}

impl LmuFormer {
    /// Gates this model's streams with `gate` (None: every frame goes on, as before). Only a
    /// whole model can: the gate decides at the embedding and skips the blocks and the head.
    pub fn set_frame_gate(&mut self, gate: Option<FrameGate>) -> Result<(), String> {
        if gate.is_some() && (self.embed.is_none() || self.head.is_none()) {
            return Err("frame pruning needs the whole model in one place (the embedding decides, the blocks and the head skip)".into());
        }
        self.frame_gate = gate.map(GateMode::Own);
        Ok(())
    }

    /// The gate, where the model decides itself.
    pub fn frame_gate(&self) -> Option<&FrameGate> {
        match &self.frame_gate {
            Some(GateMode::Own(gate)) => Some(gate),
            _ => None,
        }
    }

    /// Whether the model skips frames (deciding itself or told).
    pub fn gates_frames(&self) -> bool {
        self.frame_gate.is_some()
    }

    /// Hands the gate's decisions to the caller (the serving graph's prune stage): from now
    /// on the model takes them with [`forward_decided`](Self::forward_decided), and its
    /// streams' states leave the gate's own state to the caller. Returns the gate.
    pub fn decide_frames_elsewhere(&mut self) -> Option<FrameGate> {
        match self.frame_gate.take() {
            Some(GateMode::Own(gate)) => {
                self.frame_gate = Some(GateMode::Decided);
                Some(gate)
            }
            other => {
                self.frame_gate = other;
                None
            }
        }
    }

    /// Queues every session's decisions on its new input frames (`[rows, in_channels]`,
    /// packed): `keep`'s, or the model's own gate's.
    pub(crate) fn gate_inputs(
        &self,
        states: &mut [&mut LmuFormerState],
        input: &Frames,
        keep: Option<&[Vec<bool>]>,
    ) {
        let Some(mode) = &self.frame_gate else {
            return;
        };
        for (i, (state, rows)) in states.iter_mut().zip(input.ranges()).enumerate() {
            let stream = state
                .gate
                .get_or_insert_with(|| Box::new(StreamGate::new(mode)));
            let mask = match (keep, mode) {
                (Some(keep), _) => keep.get(i).cloned().unwrap_or_default(),
                (None, GateMode::Own(gate)) => {
                    let frames = &input.data[rows.start * input.width..rows.end * input.width];
                    let state = stream.frames.get_or_insert_with(FrameGateState::default);
                    gate.mask(state, frames, input.width)
                }
                // Told, but no decisions came: every frame goes on.
                (None, GateMode::Decided) => Vec::new(),
            };
            // Frames without a decision go on.
            let missing = rows.len().saturating_sub(mask.len());
            stream.pending.extend(mask.into_iter().take(rows.len()));
            stream.pending.extend(std::iter::repeat_n(true, missing));
        }
    }

    /// The blocks and the head over the embedding's output `x`, each session's rows taken or
    /// skipped as its pending decisions say. Returns every row (a skipped one repeats).
    pub(crate) fn forward_gated(&self, states: &mut [&mut LmuFormerState], x: Frames) -> Frames {
        let width = self.config.num_classes;
        let mut data = Vec::with_capacity(x.rows() * width);
        for (state, rows) in states.iter_mut().zip(x.ranges()) {
            state.last_skipped.clear();
            let mut t = rows.start;
            while t < rows.end {
                let stream = state.gate.get_or_insert_with(Box::default);
                let keep = stream.pending.pop_front().unwrap_or(true);
                // The run of frames with the same decision.
                let mut end = t + 1;
                while end < rows.end && stream.pending.front().copied().unwrap_or(true) == keep {
                    stream.pending.pop_front();
                    end += 1;
                }
                state
                    .last_skipped
                    .extend(std::iter::repeat_n(!keep, end - t));
                if keep {
                    let run = Frames {
                        data: x.data[t * x.width..end * x.width].to_vec(),
                        width: x.width,
                        counts: vec![end - t],
                    };
                    let out = self.blocks_and_head(&mut [&mut **state], run);
                    let stream = state.gate.as_mut().expect("made above");
                    stream.last_output = Some(out.data[out.data.len() - width..].to_vec());
                    data.extend_from_slice(&out.data);
                } else {
                    self.rest(state, end - t);
                    let stream = state.gate.as_ref().expect("made above");
                    let row = stream
                        .last_output
                        .clone()
                        .unwrap_or_else(|| vec![0.0; width]);
                    for _ in t..end {
                        data.extend_from_slice(&row);
                    }
                }
                t = end;
            }
        }
        Frames {
            data,
            width,
            counts: x.counts,
        }
    }

    /// `frames` skipped frames for the blocks and the head: the LMU memories advance with
    /// u = 0 and every LIF membrane decays.
    fn rest(&self, state: &mut LmuFormerState, frames: usize) {
        for (block, memory) in self.blocks.iter().zip(&mut state.memories) {
            for _ in 0..frames {
                block.mixer.cell.memory.step(memory, &[0.0]);
            }
            for lif in block.lifs() {
                lif.rest(&mut state.membranes, frames);
            }
        }
        if let Some((_, lif)) = self.head.as_ref().and_then(|h| h.gate.as_ref()) {
            lif.rest(&mut state.membranes, frames);
        }
    }
}
