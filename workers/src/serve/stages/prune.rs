//! The `prune` stage: per session, which frames go on through the model's layers
//! (shared/SPEC-MODELS.md §6.3, frame pruning for feeds). For a feature model whose config.json
//! has a `tideway_frame_gate`, it decides on each input frame with the session's gate state
//! (the last kept frame and the counts) and writes the decisions into the envelope's `keep`;
//! the layers stage applies them (`LmuFormer::forward_decided`: a skipped frame is a frame of
//! no input to the blocks and the head). Other models' envelopes pass untouched.
//!
//! The gate state is part of the session's state: an export, a snapshot or a move takes it
//! out (`prune.frames.*` of the state blob), a restore puts it back.
//!
//! ```ignore
//! let decided = envelopes.prune(models);
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use tideway_operators::prune::frames::{FrameGate, FrameGateState};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;

use super::{Body, Envelope, StageLogic, stage_operator};
use crate::serve::messages::SessionKey;
use crate::serve::served::{ServedKind, ServedModel};

/// The prune stage on a stream of envelopes (at each session's owner, after the front end).
pub trait Prune<'s> {
    /// Decides which of each gated session's frames go on.
    fn prune(self, models: Arc<Vec<ServedModel>>) -> StreamVec<'s, u64, Envelope>;
}

impl<'s> Prune<'s> for StreamVec<'s, u64, Envelope> {
    fn prune(self, models: Arc<Vec<ServedModel>>) -> StreamVec<'s, u64, Envelope> {
        let logic = PruneLogic {
            models,
            gates: HashMap::new(),
        };
        stage_operator(self, Pipeline, "Prune", logic)
    }
}

struct PruneLogic {
    models: Arc<Vec<ServedModel>>,
    /// Each gated session's gate state.
    gates: HashMap<SessionKey, FrameGateState>,
}

impl PruneLogic {
    /// The gate of model `model` and its frames' width, if it gates frames.
    fn gate(&self, model: u32) -> Option<(&FrameGate, usize)> {
        match &self.models.get(model as usize)?.kind {
            ServedKind::Features(info) => Some((info.frame_gate.as_ref()?, info.in_channels())),
            ServedKind::Language { .. } => None,
        }
    }

    fn decide(&mut self, envelope: &mut Envelope) {
        let key = envelope.session;
        let Some((gate, width)) = self.gate(envelope.model) else {
            return;
        };
        let gate = gate.clone();
        match &mut envelope.body {
            Body::State(snapshot) if envelope.start => {
                // A restore: a state from before the model gated its frames starts afresh.
                let state = FrameGateState::import(&snapshot.tensors).unwrap_or_default();
                self.gates.insert(key, state);
            }
            Body::State(snapshot) => {
                if let Some(state) = self.gates.get(&key) {
                    state.export(&mut snapshot.tensors);
                }
                // A session moving away leaves with its state.
                if envelope.end {
                    self.gates.remove(&key);
                }
            }
            Body::Features(frames) => {
                if envelope.start {
                    self.gates.remove(&key);
                }
                let state = self.gates.entry(key).or_default();
                envelope.keep = gate.mask(state, frames, width);
                if envelope.end {
                    self.gates.remove(&key);
                }
            }
            Body::Forget => {
                self.gates.remove(&key);
            }
            _ if envelope.end => {
                self.gates.remove(&key);
            }
            _ => {}
        }
    }
}

impl StageLogic<Envelope, Envelope> for PruneLogic {
    fn batch(&mut self, envelopes: Vec<Envelope>, out: &mut Vec<Envelope>) {
        for mut envelope in envelopes {
            self.decide(&mut envelope);
            out.push(envelope);
        }
    }
}
