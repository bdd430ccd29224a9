//! The `layers(k)` stage: pipeline stage `k` of every model's layers, on the workers the plan
//! gives it. It keeps each session's recurrent state for its layers (keyed by session) and
//! runs each round of a batch as one packed batch per model: one GEMM over every session's
//! rows, per-session recurrences. The first stage embeds token ids or feature frames; an
//! LMUFormer's last stage runs its per-frame head too. A model that runs as one piece (on a
//! GPU, or over a tensor-parallel group) runs whole in the first stage and its outputs pass
//! the later ones untouched.
//!
//! ```ignore
//! let hidden = envelopes.layers(0, plan, models.clone(), board.clone());
//! let hidden = hidden.layers(1, plan, models.clone(), board.clone());
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;

use tideway_operators::layers::frames::Frames;
use tideway_operators::models::SessionState;
use tideway_operators::prune::prefill::PrunedPrefillError;
use tideway_operators::state_tensors::{StateError, StateTensors};
use tideway_operators::tensor_parallel::Residual;
use tideway_operators::{InputError, LogitRows};

use super::super::messages::{OpError, SessionKey};
use super::super::served::{ServedModel, StageModel};
use super::super::stats::StatsBoard;
use super::{Body, Envelope, Plan, StageLogic, rounds, stage_operator};
use crate::feature_model::{FeatureError, FeatureModel, FeatureState};
use crate::language_model::LmState;

/// One session's state in one stage.
enum StageState {
    Part(SessionState),
    Whole(LmState),
    Features(Box<FeatureState>),
}

impl StageModel {
    /// Bytes of one session's state in this piece.
    fn state_bytes(&self) -> usize {
        match self {
            StageModel::Part(m) => m.state_bytes(),
            StageModel::Whole(m) => m.state_bytes(),
            StageModel::Features(m) => m.state_bytes(),
        }
    }
}

impl StageState {
    fn new(piece: &StageModel) -> Result<Self, OpError> {
        Ok(match piece {
            StageModel::Part(m) => StageState::Part(m.new_state()),
            StageModel::Whole(m) => StageState::Whole(m.new_state()?),
            StageModel::Features(m) => StageState::Features(Box::new(m.new_stream()?)),
        })
    }

    /// This stage's state taken from named tensors (an import or a restore).
    fn import(piece: &StageModel, from: &StateTensors) -> Result<Self, OpError> {
        Ok(match piece {
            StageModel::Part(m) => StageState::Part(m.import_state(from).map_err(OpError::State)?),
            StageModel::Whole(m) => {
                StageState::Whole(m.import_state(from).map_err(OpError::State)?)
            }
            StageModel::Features(m) => {
                StageState::Features(Box::new(m.import_state(from).map_err(OpError::State)?))
            }
        })
    }

    /// Writes this stage's part of the session's state as named tensors.
    fn export(&self, piece: &StageModel, out: &mut StateTensors) -> Result<(), OpError> {
        match (piece, self) {
            (StageModel::Part(m), StageState::Part(s)) => {
                m.export_state(s, out);
                Ok(())
            }
            (StageModel::Whole(m), StageState::Whole(s)) => m.export_state(s, out),
            (StageModel::Features(m), StageState::Features(s)) => m.export_state(s, out),
            _ => Err(StateError::Unsupported {
                what: "a state of another kind than its stage's".into(),
            }),
        }
        .map_err(OpError::State)
    }

    /// Tokens consumed (language models) or output frames emitted (feature models).
    fn position(&self) -> u64 {
        (match self {
            StageState::Part(s) => s.position(),
            StageState::Whole(s) => s.position(),
            StageState::Features(s) => s.frames_out(),
        }) as u64
    }
}

/// An envelope of the round with, while it is being computed, its session's state.
struct Slot {
    envelope: Envelope,
    state: Option<StageState>,
    compute: bool,
}

struct LayersLogic {
    stage: usize,
    models: Arc<Vec<ServedModel>>,
    states: HashMap<SessionKey, StageState>,
    /// The first stage reports each batch to the board (as an epoch); every stage reports
    /// the state it holds.
    board: Arc<StatsBoard>,
}

impl StageLogic<Envelope, Envelope> for LayersLogic {
    fn batch(&mut self, envelopes: Vec<Envelope>, out: &mut Vec<Envelope>) {
        let started = Instant::now();
        let count = envelopes.len();
        let mut rows = 0;
        for round in rounds(envelopes) {
            rows += self.run_round(round, out);
        }
        if self.stage == 0 {
            self.board
                .record_epoch(count, started.elapsed(), rows as u64);
        }
    }
}

impl LayersLogic {
    /// Reports `sessions` states of `model` taken (> 0) or freed (< 0).
    fn held(&self, model: u32, sessions: i64) {
        let piece = self.models[model as usize].stages[self.stage].as_ref();
        let bytes = piece.map_or(0, StageModel::state_bytes) as i64;
        self.board
            .add_stage_state(model, self.stage as u32, sessions * bytes);
    }

    /// Frees `key`'s state, if this stage holds one.
    fn free(&mut self, key: SessionKey, model: u32) {
        if let Some(state) = self.states.remove(&key) {
            self.release(model, state);
        }
    }

    /// An ended session's state: back to its model's pool, if it has one.
    fn release(&self, model: u32, state: StageState) {
        self.held(model, -1);
        if let (StageState::Part(state), Some(pool)) =
            (state, self.models[model as usize].reserves.get(self.stage))
        {
            pool.give_back(state);
        }
    }

    /// A new session's state: from its model's pool while that holds one.
    fn fresh_state(&self, served: &ServedModel, piece: &StageModel) -> Result<StageState, OpError> {
        match served.reserves.get(self.stage).and_then(|pool| pool.take()) {
            Some(state) => Ok(StageState::Part(state)),
            None => StageState::new(piece),
        }
    }

    /// Runs a fresh session's prompt pruned, if its model prunes prompts (`tideway_prune`)
    /// and only the prompt's last row is wanted (a generation's prompt): the layers run the
    /// pruned prefill (SPEC-MODELS §6.3), the session goes on from the state they leave, and
    /// the last survivor's row goes on to the head. Returns whether it ran.
    fn prune_prompt(
        &self,
        served: &ServedModel,
        piece: &StageModel,
        envelope: &mut Envelope,
        state: &mut Option<StageState>,
    ) -> bool {
        let (Some(prune), StageModel::Part(model), Some(StageState::Part(_)), Body::Tokens(ids)) =
            (served.prompt_prune(), piece, &*state, &envelope.body)
        else {
            return false;
        };
        if !(envelope.start && envelope.last_only && self.stage == 0) || ids.is_empty() {
            return false;
        }
        envelope.body = match model.prefill_pruned_hidden(ids, prune) {
            Ok(pruned) => {
                let d = model.hidden_size();
                let kept = pruned.survivors.kept.len();
                self.board
                    .count_prompt_tokens(envelope.model, ids.len() as u64, kept as u64);
                *state = Some(StageState::Part(pruned.state));
                Body::Hidden {
                    values: pruned.residual[(kept - 1) * d..].to_vec(),
                    pending: None,
                }
            }
            Err(PrunedPrefillError::Input(e)) => Body::Failed(OpError::Input(e)),
            Err(e) => Body::Failed(OpError::Pruning(e.to_string())),
        };
        true
    }

    /// Runs one round (at most one envelope per session); returns the rows computed.
    fn run_round(&mut self, round: Vec<Envelope>, out: &mut Vec<Envelope>) -> usize {
        let models = self.models.clone();
        let first = self.stage == 0;
        let mut slots: Vec<Slot> = Vec::with_capacity(round.len());
        for mut envelope in round {
            let served = &models[envelope.model as usize];
            let Some(piece) = served.stages.get(self.stage).and_then(Option::as_ref) else {
                // Another stage runs this model (or it ran whole in an earlier one).
                slots.push(Slot {
                    envelope,
                    state: None,
                    compute: false,
                });
                continue;
            };
            let key = envelope.session;
            if matches!(envelope.body, Body::Forget) {
                self.free(key, envelope.model);
            }
            if matches!(envelope.body, Body::Failed(_) | Body::Forget) {
                slots.push(Slot {
                    envelope,
                    state: None,
                    compute: false,
                });
                continue;
            }
            if let Body::State(snapshot) = &mut envelope.body {
                // A restore (start) takes this stage's part; an export or snapshot adds it.
                let result = if envelope.start {
                    self.free(key, envelope.model);
                    StageState::import(piece, &snapshot.tensors).map(|state| {
                        let position = state.position();
                        self.states.insert(key, state);
                        self.held(envelope.model, 1);
                        position
                    })
                } else {
                    let exported = match self.states.get(&key) {
                        Some(state) => state
                            .export(piece, &mut snapshot.tensors)
                            .map(|()| state.position()),
                        None => Err(OpError::UnknownSession {
                            name: envelope.name.clone(),
                        }),
                    };
                    // A session moving away leaves with its state.
                    if envelope.end {
                        self.free(key, envelope.model);
                    }
                    exported
                };
                match result {
                    Ok(position) if first => {
                        snapshot.position = position;
                        envelope.position = position;
                        envelope.position_after = position;
                    }
                    Ok(_) => {}
                    // A snapshot for the store is dropped at the store stage, counted.
                    Err(e) if envelope.id == 0 => snapshot.refused = Some(format!("{e:?}")),
                    Err(e) => envelope.body = Body::Failed(e),
                }
                slots.push(Slot {
                    envelope,
                    state: None,
                    compute: false,
                });
                continue;
            }
            if envelope.start {
                self.free(key, envelope.model);
                match self.fresh_state(served, piece) {
                    Ok(state) => {
                        self.states.insert(key, state);
                        self.held(envelope.model, 1);
                    }
                    Err(e) => envelope.body = Body::Failed(e),
                }
            }
            let state = match self.states.remove(&key) {
                Some(state) => Some(state),
                None if matches!(envelope.body, Body::Failed(_)) => None,
                None => {
                    envelope.body = Body::Failed(OpError::UnknownSession {
                        name: envelope.name.clone(),
                    });
                    None
                }
            };
            if first && let Some(state) = &state {
                envelope.position = state.position();
                envelope.position_after = envelope.position;
            }
            let mut state = state;
            if self.prune_prompt(served, piece, &mut envelope, &mut state) {
                slots.push(Slot {
                    envelope,
                    state,
                    compute: false,
                });
                continue;
            }
            let compute = state.is_some()
                && match &envelope.body {
                    Body::Tokens(t) => !t.is_empty(),
                    Body::Hidden { .. } => true,
                    // A feature stream's end flushes its lookahead.
                    Body::Features(f) => !f.is_empty() || envelope.end,
                    _ => false,
                };
            slots.push(Slot {
                envelope,
                state,
                compute,
            });
        }

        let mut computed = 0;
        for (model, served) in models.iter().enumerate() {
            let Some(piece) = served.stages.get(self.stage).and_then(Option::as_ref) else {
                continue;
            };
            let mut batch: Vec<&mut Slot> = slots
                .iter_mut()
                .filter(|s| s.compute && s.envelope.model == model as u32)
                .collect();
            if batch.is_empty() {
                continue;
            }
            // Tokens or frames in (the first stage's input).
            computed += batch
                .iter()
                .map(|s| match &s.envelope.body {
                    Body::Tokens(t) => t.len(),
                    Body::Features(f) => f.len() / served.in_channels().max(1),
                    _ => 0,
                })
                .sum::<usize>();
            run_batch(piece, &mut batch);
        }

        for mut slot in slots {
            if let Some(state) = slot.state.take() {
                if first {
                    slot.envelope.position_after = state.position();
                }
                match slot.envelope.end {
                    false => {
                        self.states.insert(slot.envelope.session, state);
                    }
                    true => self.release(slot.envelope.model, state),
                }
            }
            out.push(slot.envelope);
        }
        computed
    }
}

/// Runs one model's packed batch through this stage's piece; every slot's body becomes the
/// piece's output (or the batch's error).
fn run_batch(piece: &StageModel, batch: &mut [&mut Slot]) {
    let result = match piece {
        StageModel::Part(model) => run_part(model, batch),
        StageModel::Whole(model) => {
            let mut tokens = Vec::new();
            let mut lens = Vec::new();
            let mut last_only = Vec::new();
            for slot in batch.iter() {
                if let Body::Tokens(t) = &slot.envelope.body {
                    tokens.extend_from_slice(t);
                    lens.push(t.len());
                    last_only.push(slot.envelope.last_only);
                }
            }
            // As the head stage does for a split model: one row of logits for an envelope that
            // asks for its last only (a generation's prompt).
            let rows = LogitRows::LastOf(&last_only);
            let counts = rows.counts(&lens).unwrap_or_default();
            let mut states: Vec<&mut LmState> = batch
                .iter_mut()
                .filter_map(|s| match &mut s.state {
                    Some(StageState::Whole(state)) => Some(state),
                    _ => None,
                })
                .collect();
            model
                .forward_packed_rows(&tokens, &lens, &mut states, rows)
                .map_err(OpError::from)
                .map(|logits| outputs(logits.into_vec(), &counts, model.output_width()))
        }
        StageModel::Features(model) => run_features(model, batch),
    };
    match result {
        Ok(bodies) => {
            for (slot, body) in batch.iter_mut().zip(bodies) {
                slot.envelope.body = body;
            }
        }
        Err(e) => {
            for slot in batch.iter_mut() {
                slot.envelope.body = Body::Failed(e.clone());
            }
        }
    }
}

/// A feature model's part over the batch: feature frames in where it embeds, the previous
/// part's block stream otherwise; per-frame outputs out where it holds the head.
fn run_features(model: &FeatureModel, batch: &mut [&mut Slot]) -> Result<Vec<Body>, OpError> {
    let width = model.input_width();
    let mut data = Vec::new();
    let mut counts = Vec::new();
    let mut ends = Vec::new();
    let mut keep = Vec::new();
    for slot in batch.iter_mut() {
        if let Body::Features(rows) | Body::Hidden { values: rows, .. } = &mut slot.envelope.body {
            counts.push(rows.len() / width);
            data.append(rows);
            ends.push(slot.envelope.end);
            keep.push(std::mem::take(&mut slot.envelope.keep));
        }
    }
    let input = Frames {
        data,
        width,
        counts,
    };
    let mut states: Vec<&mut FeatureState> = batch
        .iter_mut()
        .filter_map(|s| match &mut s.state {
            Some(StageState::Features(state)) => Some(&mut **state),
            _ => None,
        })
        .collect();
    let out = model
        .forward(&mut states, &input, &ends, &keep)
        .map_err(|e| match e {
            FeatureError::Input(e) => OpError::Input(e),
            FeatureError::Device(e) => OpError::Unavailable(e),
        })?;
    let mut bodies = outputs(out.data, &out.counts, out.width);
    for (body, state) in bodies.iter_mut().zip(&mut states) {
        if let Body::Output { skipped, .. } = body {
            *skipped = state.take_skipped();
        }
    }
    if !model.part().head {
        for body in &mut bodies {
            if let Body::Output { values, .. } = body {
                *body = Body::Hidden {
                    values: std::mem::take(values),
                    pending: None,
                };
            }
        }
    }
    Ok(bodies)
}

/// A CPU language model's part over the batch: the embedding where the part starts the
/// model, then its layers; the residual stream goes on, split by session.
fn run_part(
    model: &tideway_operators::models::Model,
    batch: &mut [&mut Slot],
) -> Result<Vec<Body>, OpError> {
    let d = model.hidden_size();
    let mut lens = Vec::with_capacity(batch.len());
    let residual = if model.part().embed {
        let mut tokens = Vec::new();
        for slot in batch.iter() {
            if let Body::Tokens(t) = &slot.envelope.body {
                tokens.extend_from_slice(t);
                lens.push(t.len());
            }
        }
        model.embed(&tokens)?
    } else {
        let mut residual = Residual::default();
        let mut pending = Vec::new();
        for slot in batch.iter_mut() {
            if let Body::Hidden { values, pending: p } = &mut slot.envelope.body {
                lens.push(values.len() / d);
                residual.values.append(values);
                if let Some(p) = p {
                    pending.append(p);
                }
            }
        }
        // Every session's stream stopped after the same sub-block: all or none pending.
        if !pending.is_empty() {
            residual.pending = Some(pending);
        }
        residual
    };
    if lens.len() != batch.len() {
        return Err(OpError::Input(InputError::StageMismatch {
            layers: model.part().layers.clone(),
        }));
    }
    let mut states: Vec<&mut SessionState> = batch
        .iter_mut()
        .filter_map(|s| match &mut s.state {
            Some(StageState::Part(state)) => Some(state),
            _ => None,
        })
        .collect();
    let residual = model.forward_layers(residual, &lens, &mut states)?;
    let mut values = residual.values.into_iter();
    let mut pending = residual.pending.map(Vec::into_iter);
    Ok(lens
        .iter()
        .map(|&len| Body::Hidden {
            values: values.by_ref().take(len * d).collect(),
            pending: pending.as_mut().map(|p| p.by_ref().take(len * d).collect()),
        })
        .collect())
}

/// Splits `[rows, width]` outputs by session (`counts[i]` rows each).
fn outputs(values: Vec<f32>, counts: &[usize], width: usize) -> Vec<Body> {
    let mut rest = values.as_slice();
    counts
        .iter()
        .map(|&rows| {
            let (mine, tail) = rest.split_at(rows * width);
            rest = tail;
            Body::Output {
                rows: rows as u32,
                values: mine.to_vec(),
                skipped: Vec::new(),
            }
        })
        .collect()
}

/// The layers stage on a stream of envelopes.
pub trait Layers<'s> {
    /// Runs pipeline stage `stage` of every model on the workers `plan` gives it; the first
    /// stage reports each batch to `board`, and every stage the state it holds.
    fn layers(
        self,
        stage: usize,
        plan: Plan,
        models: Arc<Vec<ServedModel>>,
        board: Arc<StatsBoard>,
    ) -> StreamVec<'s, u64, Envelope>;
}

impl<'s> Layers<'s> for StreamVec<'s, u64, Envelope> {
    fn layers(
        self,
        stage: usize,
        plan: Plan,
        models: Arc<Vec<ServedModel>>,
        board: Arc<StatsBoard>,
    ) -> StreamVec<'s, u64, Envelope> {
        let logic = LayersLogic {
            stage,
            models,
            states: HashMap::new(),
            board,
        };
        stage_operator(
            self,
            Exchange::new(move |e: &Envelope| plan.stage_worker(stage, e.session, e.owner)),
            &format!("Layers{stage}"),
            logic,
        )
    }
}
