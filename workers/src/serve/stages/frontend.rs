//! The `frontend` stage: at each session's owner, the session lifecycle and the model's front
//! end — text to token ids, audio samples to normalised fbank frames, sensor frames to
//! patches — with each session's carry-over (an unfinished word or character, samples of an
//! unfinished window, frames of an unfinished patch).
//!
//! ```ignore
//! let (envelopes, events) = requests.frontend(plan, lifecycle);
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::OkErr;

use tideway_operators::InputError;
use tideway_operators::state_tensors::{StateError, StateTensors};
use tideway_operators::tokenizers::Frontend as FrontendKind;
use tideway_operators::tokenizers::audio::{AudioError, AudioStream};
use tideway_operators::tokenizers::sensor::{SensorError, SensorStream};
use tideway_operators::tokenizers::text::{TextError, TextStream};

use super::super::messages::{Op, Request, SessionEvent, StepInput};
use super::super::prefix_cache::PrefixCache;
use super::super::served::{ServedKind, ServedModel};
use super::lifecycle::Lifecycle;
use super::snapshot::SnapshotSink;
use super::{Body, Envelope, Plan, StageLogic, stage_operator};

/// A session's front-end carry-over.
pub enum Carry {
    Text(TextStream),
    Features {
        audio: Option<Box<AudioStream>>,
        sensor: SensorStream,
    },
}

/// Why a front end refused a chunk: the input does not fit the model, or its tokenizer or
/// audio / sensor front end refused it. Each message says what the model takes.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum FrontendError {
    #[error(
        "model {model:?} has no tokenizer (no tokenizer.json beside its checkpoint): send token ids"
    )]
    NoTokenizer { model: String },
    #[error(
        "model {model:?} is a language model: it takes token ids (`tokens`) or text, not audio samples or frames"
    )]
    NotLanguageInput { model: String },
    #[error(
        "model {model:?} is a feature model: it takes audio samples or frames, not tokens or text"
    )]
    NotFeatureInput { model: String },
    #[error(
        "model {model:?} has no audio front end (no \"frontend\" of kind \"kaldi_fbank\" in its config.json): send feature frames"
    )]
    NoAudioFrontend { model: String },
    #[error("frames of {width} values; model {model:?} takes feature frames of {expected} values")]
    FrameWidth {
        model: String,
        width: u32,
        expected: usize,
    },
    #[error("the session does not belong to model {model:?}")]
    OtherModel { model: String },
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Tokens(#[from] InputError),
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error(transparent)]
    Sensor(#[from] SensorError),
}

impl Carry {
    pub fn new(served: &ServedModel) -> Self {
        match &served.kind {
            ServedKind::Language { .. } => Carry::Text(TextStream::default()),
            ServedKind::Features(m) => Carry::Features {
                audio: m.audio_frontend().map(|a| Box::new(a.new_stream())),
                sensor: SensorStream::default(),
            },
        }
    }

    /// Writes the carry-over as named tensors (`frontend.*`).
    pub fn export(&self, out: &mut StateTensors) -> Result<(), StateError> {
        match self {
            Carry::Text(text) => text.export(out),
            Carry::Features { audio, sensor } => {
                if let Some(audio) = audio {
                    audio.export(out)?;
                }
                sensor.export(out);
            }
        }
        Ok(())
    }

    /// The carry-over [`export`](Self::export) wrote, for a session of `served`.
    pub fn import(served: &ServedModel, from: &StateTensors) -> Result<Self, StateError> {
        Ok(match &served.kind {
            ServedKind::Language { .. } => Carry::Text(TextStream::import(from)?),
            ServedKind::Features(m) => Carry::Features {
                audio: match m.audio_frontend() {
                    Some(_) => Some(Box::new(AudioStream::import(from)?)),
                    None => None,
                },
                sensor: SensorStream::import(from)?,
            },
        })
    }

    /// Raw input → what the model consumes: [`Body::Tokens`] for a language model, feature
    /// rows for a feature model. Token ids were checked against the vocabulary at the edge.
    pub fn push(
        &mut self,
        served: &ServedModel,
        input: &StepInput,
        end: bool,
    ) -> Result<Body, FrontendError> {
        let model = || served.name.clone();
        match (&served.kind, self) {
            (ServedKind::Language { tokenizer, info }, Carry::Text(text)) => match input {
                StepInput::Tokens(tokens) => Ok(Body::Tokens(tokens.clone())),
                StepInput::Text(bytes) => {
                    let Some(tokenizer) = tokenizer else {
                        return Err(FrontendError::NoTokenizer { model: model() });
                    };
                    let ids = tokenizer.push(text, bytes, end)?;
                    tideway_operators::models::check_token_ids(&ids, info.vocab_size, 0)?;
                    Ok(Body::Tokens(ids))
                }
                StepInput::Audio { .. } | StepInput::Frames { .. } => {
                    Err(FrontendError::NotLanguageInput { model: model() })
                }
            },
            (ServedKind::Features(m), Carry::Features { audio, sensor }) => {
                let c = m.in_channels();
                match (input, m.frontend()) {
                    (StepInput::Tokens(t), _) if t.is_empty() => Ok(Body::Features(Vec::new())),
                    (StepInput::Tokens(_) | StepInput::Text(_), _) => {
                        Err(FrontendError::NotFeatureInput { model: model() })
                    }
                    (StepInput::Audio { samples, rate }, Some(FrontendKind::Audio(front))) => {
                        let stream = audio.as_mut().expect("audio models have an audio stream");
                        Ok(Body::Features(front.push(stream, samples, *rate, end)?))
                    }
                    (StepInput::Audio { .. }, _) => {
                        Err(FrontendError::NoAudioFrontend { model: model() })
                    }
                    (StepInput::Frames { values, width }, Some(FrontendKind::Sensor(front))) => Ok(
                        Body::Features(front.push(sensor, values, *width as usize, end)?),
                    ),
                    (StepInput::Frames { values, width }, _) => {
                        if *width as usize != c || values.len() % c != 0 {
                            return Err(FrontendError::FrameWidth {
                                model: model(),
                                width: *width,
                                expected: c,
                            });
                        }
                        Ok(Body::Features(values.clone()))
                    }
                }
            }
            _ => Err(FrontendError::OtherModel { model: model() }),
        }
    }
}

/// What the front end emits: envelopes for the stages, and changes to the live set for the
/// control plane.
#[derive(Clone, Debug)]
enum FrontendOut {
    Envelope(Envelope),
    Event(SessionEvent),
}

/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

struct FrontendLogic {
    lifecycle: Lifecycle,
    last_sweep: Instant,
    snapshots: Option<SnapshotTimer>,
    prefix_cache: Option<Arc<PrefixCache>>,
}

impl FrontendLogic {
    /// Admits `request`; a generation's prompt goes through the prefix-state cache: on a
    /// hit, a restore of the cached state and a step of the rest; on a miss, the prompt but
    /// its last token, a capture of the state there, then the last token (whose step answers
    /// the request).
    fn admit(&mut self, request: Request, now: Instant, out: &mut Vec<FrontendOut>) {
        let cache = match (&self.prefix_cache, &request.op) {
            (
                Some(cache),
                Op::Step {
                    input: StepInput::Tokens(tokens),
                    start: true,
                    end: false,
                    last_only: true,
                    owner,
                    ..
                },
            ) if tokens.len() >= 2
                && self
                    .lifecycle
                    .refuse_start(request.session, owner)
                    .is_none() =>
            {
                cache.clone()
            }
            _ => {
                out.push(FrontendOut::Envelope(self.lifecycle.admit(request, now)));
                return;
            }
        };
        let Request {
            id,
            origin,
            session,
            op,
        } = request;
        let Op::Step {
            model,
            name,
            owner,
            input: StepInput::Tokens(tokens),
            ..
        } = op
        else {
            unreachable!("matched above");
        };
        let step = |tokens: &[u32], start: bool, id: u64| Request {
            id,
            origin,
            session,
            op: Op::Step {
                model,
                name: name.clone(),
                owner: owner.clone(),
                input: StepInput::Tokens(tokens.to_vec()),
                start,
                end: false,
                last_only: true,
            },
        };
        let last = tokens.len() - 1;
        match cache.lookup(model, &tokens, last) {
            Some((len, mut snapshot)) => {
                snapshot.key = session;
                snapshot.name = name.clone();
                snapshot.owner = owner.clone();
                snapshot.last_used_unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let restore = Request {
                    id: 0,
                    origin,
                    session,
                    op: Op::Restore {
                        model,
                        snapshot: Box::new(snapshot),
                        stored: false,
                    },
                };
                out.push(FrontendOut::Envelope(self.lifecycle.admit(restore, now)));
                let rest = step(&tokens[len..], false, id);
                out.push(FrontendOut::Envelope(self.lifecycle.admit(rest, now)));
            }
            None => {
                let prefix = step(&tokens[..last], true, 0);
                out.push(FrontendOut::Envelope(self.lifecycle.admit(prefix, now)));
                if let Some(capture) = self.lifecycle.capture(session, tokens[..last].to_vec()) {
                    out.push(FrontendOut::Envelope(capture));
                }
                let rest = step(&tokens[last..], false, id);
                out.push(FrontendOut::Envelope(self.lifecycle.admit(rest, now)));
            }
        }
    }
}

/// When this front end snapshots its changed sessions: on a period, and when its process
/// asks (a flush generation it has not answered).
pub struct SnapshotTimer {
    pub sink: SnapshotSink,
    /// This worker's index in its process.
    pub local: usize,
    last: Instant,
    answered: u64,
}

impl SnapshotTimer {
    pub fn new(sink: SnapshotSink, local: usize) -> Self {
        SnapshotTimer {
            sink,
            local,
            last: Instant::now(),
            answered: 0,
        }
    }
}

impl StageLogic<Request, FrontendOut> for FrontendLogic {
    fn batch(&mut self, requests: Vec<Request>, out: &mut Vec<FrontendOut>) {
        let now = Instant::now();
        for request in requests {
            self.admit(request, now, out);
        }
        out.extend(
            self.lifecycle
                .take_events()
                .into_iter()
                .map(FrontendOut::Event),
        );
    }

    fn idle(&mut self, out: &mut Vec<FrontendOut>) {
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            let forgets = self.lifecycle.expire_idle(self.last_sweep);
            out.extend(forgets.into_iter().map(FrontendOut::Envelope));
            out.extend(
                self.lifecycle
                    .take_events()
                    .into_iter()
                    .map(FrontendOut::Event),
            );
        }
        let Some(timer) = &mut self.snapshots else {
            return;
        };
        let asked = timer.sink.flush.load(Ordering::Acquire);
        if asked == timer.answered && timer.last.elapsed() < timer.sink.every {
            return;
        }
        timer.last = Instant::now();
        let (envelopes, skipped) = self.lifecycle.snapshots(false);
        let sink = &timer.sink;
        sink.stats
            .skipped
            .fetch_add(skipped as u64, Ordering::Relaxed);
        sink.in_flight
            .fetch_add(envelopes.len() as i64, Ordering::Relaxed);
        out.extend(envelopes.into_iter().map(FrontendOut::Envelope));
        timer.answered = asked;
        sink.acked[timer.local].store(asked, Ordering::Release);
    }
}

/// The front-end stage on a stream of requests.
pub trait Frontend<'s> {
    /// Routes each request to its session's owner, runs the lifecycle and the front end
    /// there; returns the envelopes for the next stage and the live-set changes.
    fn frontend(
        self,
        plan: Plan,
        lifecycle: Lifecycle,
        snapshots: Option<SnapshotTimer>,
        prefix_cache: Option<Arc<PrefixCache>>,
    ) -> (
        StreamVec<'s, u64, Envelope>,
        StreamVec<'s, u64, SessionEvent>,
    );
}

impl<'s> Frontend<'s> for StreamVec<'s, u64, Request> {
    fn frontend(
        self,
        plan: Plan,
        lifecycle: Lifecycle,
        snapshots: Option<SnapshotTimer>,
        prefix_cache: Option<Arc<PrefixCache>>,
    ) -> (
        StreamVec<'s, u64, Envelope>,
        StreamVec<'s, u64, SessionEvent>,
    ) {
        let logic = FrontendLogic {
            lifecycle,
            last_sweep: Instant::now(),
            snapshots,
            prefix_cache,
        };
        let out = stage_operator(
            self,
            Exchange::new(move |r: &Request| plan.owner(r.session)),
            "Frontend",
            logic,
        );
        out.ok_err(|o| match o {
            FrontendOut::Envelope(e) => Ok(e),
            FrontendOut::Event(e) => Err(e),
        })
    }
}
