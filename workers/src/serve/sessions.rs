//! The sessions a worker owns and the batched computation of one epoch over them.
//!
//! Pure logic (no timely): the model operator hands every request of an epoch to
//! [`SessionTable::run_epoch`], which answers each one. Requests of one session run in arrival
//! order; across sessions, requests are gathered in rounds (every session's first request,
//! then every session's second …) and each round runs one packed forward per model: one GEMM
//! over all sessions' tokens (or feature frames), per-session recurrences.
//!
//! Raw input (text, audio samples, sensor frames) goes through the model's front end here, at
//! the session's owner: the tokenizer's carry-over (an unfinished word or character, samples
//! of an unfinished window, frames of an unfinished patch) lives in the session's state.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tideway_operators::ForwardError;
use tideway_operators::layers::frames::Frames;

use tideway_operators::tokenizers::Frontend;
use tideway_operators::tokenizers::audio::AudioStream;
use tideway_operators::tokenizers::sensor::SensorStream;
use tideway_operators::tokenizers::text::{TextStream, TextTokenizer};

use super::messages::{Op, OpError, Reply, Request, Response, SessionEvent, SessionKey, StepInput};
use crate::feature_model::{FeatureError, FeatureModel, FeatureState};
use crate::language_model::{LanguageModel, LmState};

/// What a served model is: a language model (token ids in, logits out; text too with a
/// tokenizer), or a feature model (feature, audio or sensor frames in, per-frame outputs).
pub enum ServedKind {
    Language {
        model: Box<LanguageModel>,
        tokenizer: Option<Box<TextTokenizer>>,
    },
    Features(Box<FeatureModel>),
}

/// A model being served.
pub struct ServedModel {
    pub name: String,
    pub kind: ServedKind,
}

impl ServedModel {
    /// The vocabulary of a language model; 0 for a feature model.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            ServedKind::Language { model, .. } => model.vocab_size(),
            ServedKind::Features(_) => 0,
        }
    }

    pub fn width(&self) -> usize {
        match &self.kind {
            ServedKind::Language { model, .. } => model.output_width(),
            ServedKind::Features(m) => m.num_classes(),
        }
    }

    pub fn state_bytes(&self) -> usize {
        match &self.kind {
            ServedKind::Language { model, .. } => model.state_bytes(),
            ServedKind::Features(m) => m.state_bytes(),
        }
    }

    pub fn weight_bytes(&self) -> usize {
        match &self.kind {
            ServedKind::Language { model, .. } => model.weight_bytes(),
            ServedKind::Features(m) => m.weight_bytes(),
        }
    }

    pub fn family(&self) -> &'static str {
        match &self.kind {
            ServedKind::Language { model, .. } => model.family(),
            ServedKind::Features(m) => match m.config().variant {
                tideway_operators::models::lmuformer::Variant::Plain => "lmuformer",
                tideway_operators::models::lmuformer::Variant::Spiking => "spiking_lmuformer",
            },
        }
    }

    /// The output tensor's name: `logits` or `output`.
    pub fn output_name(&self) -> &'static str {
        match &self.kind {
            ServedKind::Language { .. } => "logits",
            ServedKind::Features(_) => "output",
        }
    }

    pub fn is_language(&self) -> bool {
        matches!(self.kind, ServedKind::Language { .. })
    }

    /// A fresh session's state, or why none can start (a GPU's state pool is full).
    fn new_state(&self) -> Result<SessionData, OpError> {
        Ok(match &self.kind {
            ServedKind::Language { model, .. } => SessionData::Language {
                state: model.new_state().map_err(OpError::Capacity)?,
                text: TextStream::default(),
            },
            ServedKind::Features(m) => SessionData::Features {
                state: Box::new(m.new_stream().map_err(OpError::Capacity)?),
                audio: m.audio_frontend().map(|a| Box::new(a.new_stream())),
                sensor: SensorStream::default(),
            },
        })
    }

    /// The front-end stage: raw input → what the model consumes, with the session's
    /// carry-over. `Tokens` for a language model, feature rows for a feature model.
    fn tokenize(
        &self,
        data: &mut SessionData,
        input: &StepInput,
        end: bool,
    ) -> Result<Work, String> {
        let name = &self.name;
        match (&self.kind, data) {
            (ServedKind::Language { model, tokenizer }, SessionData::Language { text, .. }) => {
                match input {
                    StepInput::Tokens(tokens) => {
                        model.check_tokens(tokens, 0).map_err(|e| e.to_string())?;
                        Ok(Work::Tokens(tokens.clone()))
                    }
                    StepInput::Text(bytes) => {
                        let Some(tokenizer) = tokenizer else {
                            return Err(format!(
                                "model {name:?} has no tokenizer (no tokenizer.json beside its checkpoint): send token ids"
                            ));
                        };
                        let ids = tokenizer
                            .push(text, bytes, end)
                            .map_err(|e| e.to_string())?;
                        model.check_tokens(&ids, 0).map_err(|e| e.to_string())?;
                        Ok(Work::Tokens(ids))
                    }
                    StepInput::Audio { .. } | StepInput::Frames { .. } => Err(format!(
                        "model {name:?} is a language model: it takes token ids (`tokens`) or text, not audio samples or frames"
                    )),
                }
            }
            (ServedKind::Features(m), SessionData::Features { audio, sensor, .. }) => {
                let c = m.in_channels();
                match (input, m.frontend()) {
                    (StepInput::Tokens(t), _) if t.is_empty() => Ok(Work::Features(Vec::new())),
                    (StepInput::Tokens(_) | StepInput::Text(_), _) => Err(format!(
                        "model {name:?} is a feature model: it takes audio samples or frames, not tokens or text"
                    )),
                    (StepInput::Audio { samples, rate }, Some(Frontend::Audio(front))) => {
                        let stream = audio.as_mut().expect("audio models have an audio stream");
                        front
                            .push(stream, samples, *rate, end)
                            .map(Work::Features)
                            .map_err(|e| e.to_string())
                    }
                    (StepInput::Audio { .. }, _) => Err(format!(
                        "model {name:?} has no audio front end (no \"frontend\" of kind \"kaldi_fbank\" in its config.json): send feature frames"
                    )),
                    (StepInput::Frames { values, width }, Some(Frontend::Sensor(front))) => front
                        .push(sensor, values, *width as usize, end)
                        .map(Work::Features)
                        .map_err(|e| e.to_string()),
                    (StepInput::Frames { values, width }, _) => {
                        if *width as usize != c || values.len() % c != 0 {
                            return Err(format!(
                                "frames of {width} values; model {name:?} takes feature frames of {c} values"
                            ));
                        }
                        Ok(Work::Features(values.clone()))
                    }
                }
            }
            _ => Err(format!("the session does not belong to model {name:?}")),
        }
    }
}

/// One session's state: the model's recurrent state and its front end's carry-over.
enum SessionData {
    Language {
        state: LmState,
        text: TextStream,
    },
    Features {
        state: Box<FeatureState>,
        audio: Option<Box<AudioStream>>,
        sensor: SensorStream,
    },
}

impl SessionData {
    /// Tokens consumed (language models) or output frames emitted (feature models).
    fn position(&self) -> usize {
        match self {
            SessionData::Language { state, .. } => state.position(),
            SessionData::Features { state, .. } => state.frames_out(),
        }
    }
}

/// A step's input after the front end.
enum Work {
    Tokens(Vec<u32>),
    /// Feature rows (`[rows, in_channels]`).
    Features(Vec<f32>),
}

impl Work {
    fn is_empty(&self) -> bool {
        match self {
            Work::Tokens(t) => t.is_empty(),
            Work::Features(f) => f.is_empty(),
        }
    }
}

/// A step request whose session has been taken out of the table for the round.
struct PendingStep {
    id: u64,
    origin: u32,
    key: SessionKey,
    work: Work,
    session: Session,
    end: bool,
    reply: Option<Result<Reply, OpError>>,
}

struct Session {
    name: String,
    model: u32,
    state: SessionData,
    last_used: Instant,
}

/// Sessions remembered after expiry, so that a late request is told what happened.
const EXPIRED_MEMORY: usize = 100_000;

pub struct SessionTable {
    worker: u32,
    models: Arc<Vec<ServedModel>>,
    sessions: HashMap<SessionKey, Session>,
    idle_limit: Duration,
    expired: HashMap<SessionKey, (String, f64)>,
    expired_order: VecDeque<SessionKey>,
    /// Changes to the live set since the last `take_events`.
    events: Vec<SessionEvent>,
    pub tokens_processed: u64,
}

impl SessionTable {
    pub fn new(worker: u32, models: Arc<Vec<ServedModel>>, idle_limit: Duration) -> Self {
        SessionTable {
            worker,
            models,
            sessions: HashMap::new(),
            idle_limit,
            expired: HashMap::new(),
            expired_order: VecDeque::new(),
            events: Vec::new(),
            tokens_processed: 0,
        }
    }

    pub fn take_events(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.events)
    }

    fn event(&mut self, session: SessionKey, model: u32, delta: i64, expired: bool) {
        let state_bytes = self.models[model as usize].state_bytes() as u64;
        self.events.push(SessionEvent {
            session,
            worker: self.worker,
            model,
            state_bytes,
            delta,
            expired,
        });
    }

    fn remove(&mut self, key: SessionKey) -> Option<Session> {
        let session = self.sessions.remove(&key)?;
        self.event(key, session.model, -1, false);
        Some(session)
    }

    /// Frees sessions idle for longer than the limit.
    pub fn expire_idle(&mut self, now: Instant) {
        let limit = self.idle_limit;
        let stale: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_used) > limit)
            .map(|(k, _)| *k)
            .collect();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for key in stale {
            let session = self.sessions.remove(&key).expect("listed above");
            self.event(key, session.model, -1, true);
            if self.expired_order.len() >= EXPIRED_MEMORY
                && let Some(old) = self.expired_order.pop_front()
            {
                self.expired.remove(&old);
            }
            self.expired.insert(key, (session.name, unix_now));
            self.expired_order.push_back(key);
        }
    }

    fn missing(&self, key: SessionKey, name: &str) -> OpError {
        match self.expired.get(&key) {
            Some((_, at)) => OpError::Expired {
                name: name.to_string(),
                idle_limit_secs: self.idle_limit.as_secs_f64(),
                expired_unix_secs: *at,
            },
            None => OpError::UnknownSession {
                name: name.to_string(),
            },
        }
    }

    /// Answers every request of one epoch (in the order given within each session).
    pub fn run_epoch(&mut self, requests: Vec<Request>) -> Vec<Response> {
        // Rounds: the r-th request of every session goes into round r.
        let mut seen: HashMap<SessionKey, usize> = HashMap::new();
        let mut rounds: Vec<Vec<Request>> = Vec::new();
        for request in requests {
            let r = seen.entry(request.session).or_insert(0);
            if rounds.len() <= *r {
                rounds.push(Vec::new());
            }
            rounds[*r].push(request);
            *r += 1;
        }
        let mut responses = Vec::new();
        for round in rounds {
            self.run_round(round, &mut responses);
        }
        responses
    }

    fn run_round(&mut self, round: Vec<Request>, responses: &mut Vec<Response>) {
        let now = Instant::now();
        // Requests that compute, with their sessions taken out of the table.
        let mut steps: Vec<PendingStep> = Vec::new();
        for request in round {
            let answer = |result| Response {
                id: request.id,
                origin: request.origin,
                result,
            };
            match request.op {
                Op::Probe { model, ref name } => {
                    let result = match self.sessions.get(&request.session) {
                        Some(s) if s.model == model => {
                            Ok(self.empty_reply(model, s.state.position() as u64, false))
                        }
                        Some(_) => Err(OpError::WrongModel { name: name.clone() }),
                        None => Err(self.missing(request.session, name)),
                    };
                    responses.push(answer(result));
                }
                Op::End { ref name } => {
                    let result = match self.remove(request.session) {
                        Some(s) => Ok(self.empty_reply(s.model, s.state.position() as u64, true)),
                        None => Err(self.missing(request.session, name)),
                    };
                    responses.push(answer(result));
                }
                Op::Step {
                    model,
                    ref name,
                    ref input,
                    start,
                    end,
                } => {
                    let models = self.models.clone();
                    let served = &models[model as usize];
                    let mut session = if start {
                        // A start on a live session ends the old one first.
                        self.remove(request.session);
                        self.expired.remove(&request.session);
                        let state = match served.new_state() {
                            Ok(state) => state,
                            Err(err) => {
                                responses.push(answer(Err(err)));
                                continue;
                            }
                        };
                        self.event(request.session, model, 1, false);
                        Session {
                            name: name.clone(),
                            model,
                            state,
                            last_used: now,
                        }
                    } else {
                        match self.sessions.remove(&request.session) {
                            Some(s) if s.model == model => s,
                            Some(s) => {
                                self.sessions.insert(request.session, s);
                                let err = OpError::WrongModel { name: name.clone() };
                                responses.push(answer(Err(err)));
                                continue;
                            }
                            None => {
                                let err = self.missing(request.session, name);
                                responses.push(answer(Err(err)));
                                continue;
                            }
                        }
                    };
                    let work = match served.tokenize(&mut session.state, input, end) {
                        Ok(work) => work,
                        Err(message) => {
                            self.sessions.insert(request.session, session);
                            responses.push(answer(Err(OpError::Input(message))));
                            continue;
                        }
                    };
                    steps.push(PendingStep {
                        id: request.id,
                        origin: request.origin,
                        key: request.session,
                        work,
                        session,
                        end,
                        reply: None,
                    });
                }
            }
        }

        // One packed forward per model over every session that has input (feature models:
        // and every session that ends, whose lookahead is flushed).
        for model in 0..self.models.len() as u32 {
            let models = self.models.clone();
            let served = &models[model as usize];
            let feature = !served.is_language();
            let mut batch: Vec<&mut PendingStep> = steps
                .iter_mut()
                .filter(|s| s.session.model == model && (!s.work.is_empty() || (feature && s.end)))
                .collect();
            if batch.is_empty() {
                continue;
            }
            let starts: Vec<u64> = batch
                .iter()
                .map(|s| s.session.state.position() as u64)
                .collect();
            let width = served.width();
            let result: Result<(Vec<f32>, Vec<usize>), OpError> = match &served.kind {
                ServedKind::Language { model: lm, .. } => {
                    let tokens: Vec<u32> = batch
                        .iter()
                        .flat_map(|s| match &s.work {
                            Work::Tokens(t) => t.clone(),
                            Work::Features(_) => Vec::new(),
                        })
                        .collect();
                    let lens: Vec<usize> = batch
                        .iter()
                        .map(|s| match &s.work {
                            Work::Tokens(t) => t.len(),
                            Work::Features(_) => 0,
                        })
                        .collect();
                    let mut states: Vec<&mut LmState> = batch
                        .iter_mut()
                        .filter_map(|s| match &mut s.session.state {
                            SessionData::Language { state, .. } => Some(state),
                            SessionData::Features { .. } => None,
                        })
                        .collect();
                    self.tokens_processed += tokens.len() as u64;
                    lm.forward_packed(&tokens, &lens, &mut states)
                        .map(|logits| (logits.into_vec(), lens))
                        .map_err(|e| match e {
                            ForwardError::Input(e) => OpError::Input(e.to_string()),
                            // A tensor-parallel rank or its transport failed, or the GPU.
                            ForwardError::Group(e) => OpError::Unavailable(e.to_string()),
                            ForwardError::Device(e) => OpError::Unavailable(e),
                        })
                }
                ServedKind::Features(m) => {
                    let c = m.in_channels();
                    let mut data = Vec::new();
                    let mut counts = Vec::new();
                    for s in &batch {
                        if let Work::Features(f) = &s.work {
                            data.extend_from_slice(f);
                            counts.push(f.len() / c);
                        }
                    }
                    let ends: Vec<bool> = batch.iter().map(|s| s.end).collect();
                    let input = Frames {
                        data,
                        width: c,
                        counts,
                    };
                    let mut states: Vec<&mut FeatureState> = batch
                        .iter_mut()
                        .filter_map(|s| match &mut s.session.state {
                            SessionData::Features { state, .. } => Some(&mut **state),
                            SessionData::Language { .. } => None,
                        })
                        .collect();
                    self.tokens_processed += input.rows() as u64;
                    m.forward(&mut states, &input, &ends)
                        .map(|out| (out.data, out.counts))
                        .map_err(|e| match e {
                            FeatureError::Input(e) => OpError::Input(e.to_string()),
                            FeatureError::Device(e) => OpError::Unavailable(e),
                        })
                }
            };
            let state_bytes = served.state_bytes() as u64;
            match result {
                Ok((outputs, counts)) => {
                    let mut row = 0;
                    for (i, step) in batch.into_iter().enumerate() {
                        let rows = counts[i];
                        step.reply = Some(Ok(Reply {
                            position: starts[i],
                            rows: rows as u32,
                            width: width as u32,
                            logits: outputs[row * width..(row + rows) * width].to_vec(),
                            position_after: step.session.state.position() as u64,
                            state_bytes,
                            worker: self.worker,
                            ended: step.end,
                        }));
                        row += rows;
                    }
                }
                Err(e) => {
                    for step in batch {
                        step.reply = Some(Err(e.clone()));
                    }
                }
            }
        }

        // Answer every step (a bare start or end computed nothing) and put the sessions back.
        for step in steps {
            let position = step.session.state.position() as u64;
            let result = step
                .reply
                .unwrap_or_else(|| Ok(self.empty_reply(step.session.model, position, step.end)));
            responses.push(Response {
                id: step.id,
                origin: step.origin,
                result,
            });
            if step.end {
                self.event(step.key, step.session.model, -1, false);
            } else {
                let session = Session {
                    last_used: now,
                    ..step.session
                };
                self.sessions.insert(step.key, session);
            }
        }
    }

    fn empty_reply(&self, model: u32, position: u64, ended: bool) -> Reply {
        let served = &self.models[model as usize];
        Reply {
            position,
            rows: 0,
            width: served.width() as u32,
            logits: Vec::new(),
            position_after: position,
            state_bytes: served.state_bytes() as u64,
            worker: self.worker,
            ended,
        }
    }
}
