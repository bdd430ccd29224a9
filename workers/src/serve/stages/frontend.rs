//! The `frontend` stage: at each session's owner, the session lifecycle and the model's front
//! end — text to token ids, audio samples to normalised fbank frames, sensor frames to
//! patches — with each session's carry-over (an unfinished word or character, samples of an
//! unfinished window, frames of an unfinished patch).
//!
//! It is also where sessions move (`migration`): it forwards, holds and takes in moving
//! sessions' requests, and moves its own sessions away when its process drains or its load
//! exceeds another worker's.
//!
//! ```ignore
//! let (envelopes, events, control) = requests.frontend(plan, lifecycle, movers, None, None);
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

use super::super::messages::{Op, Request, Route, SessionEvent, StepInput};
use super::super::prefix_cache::PrefixCache;
use super::super::served::{ServedKind, ServedModel};
use super::super::stats::StatsBoard;
use super::lifecycle::Lifecycle;
use super::migration::{Load, Migration, Migrations, Next, plan_moves};
use super::routes::{Control, Routes};
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

/// What the front end emits: envelopes for the stages, changes to the live set for the
/// control plane, and changes to the routing table.
#[derive(Clone, Debug)]
enum FrontendOut {
    Envelope(Envelope),
    Event(SessionEvent),
    Control(Control),
}

/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// A draining worker moves at most this many sessions per turn (about one per tick), so
/// that the requests of the sessions it still holds keep their latency.
const MOVES_PER_TURN: usize = 64;

/// How long a drain looks for a worker to move sessions to before it keeps them.
const NO_TARGET_GRACE: Duration = Duration::from_secs(2);

/// What a front end needs to move sessions: its worker's routing table, its process's
/// counters, the control plane's load figures, and where the process's workers are.
pub struct Movers {
    pub routes: Routes,
    pub migrations: Arc<Migrations>,
    pub board: Arc<StatsBoard>,
    /// This worker's index in its process, and the global indices of the process's workers.
    pub local: usize,
    pub process_workers: std::ops::Range<u32>,
}

struct FrontendLogic {
    /// This worker's global index.
    me: u32,
    plan: Plan,
    lifecycle: Lifecycle,
    last_sweep: Instant,
    snapshots: Option<SnapshotTimer>,
    prefix_cache: Option<Arc<PrefixCache>>,
    migration: Migration,
    movers: Movers,
    /// The drain state this worker last announced, and when it last rebalanced.
    announced_draining: bool,
    last_rebalance: Instant,
    /// Since when a drain has found no worker to move sessions to.
    no_target_since: Option<Instant>,
}

impl FrontendLogic {
    /// Runs one request that the migration logic released, in order.
    fn run(&mut self, request: Request, now: Instant, out: &mut Vec<FrontendOut>) {
        if let Op::MoveIn { sent_unix, .. } = &request.op {
            let unix_now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.movers.migrations.record_arrival(unix_now - sent_unix);
            out.push(FrontendOut::Envelope(self.lifecycle.admit(request, now)));
            return;
        }
        self.admit(request, now, out);
    }

    /// Moves sessions away when the process drains or (on its period) when this worker
    /// carries more than another; reports to the process's counters.
    fn migrate(&mut self, out: &mut Vec<FrontendOut>) {
        let movers = &self.movers;
        let counters = &movers.migrations;
        let draining = counters.draining.load(Ordering::Acquire);
        let generation = counters.generation.load(Ordering::Acquire);
        if draining != self.announced_draining {
            self.announced_draining = draining;
            out.push(FrontendOut::Control(Control::Draining {
                worker: self.me,
                on: draining,
            }));
        }
        let rebalance = counters
            .rebalance_every
            .is_some_and(|every| self.last_rebalance.elapsed() >= every);
        let local = movers.local;
        // A pipeline's stages are placed by session, not by owner: its sessions stay.
        if self.plan.stages != 1 || !(draining || rebalance) {
            let kept = if draining { self.lifecycle.live() } else { 0 };
            counters.kept[local].store(kept as u64, Ordering::Relaxed);
            counters.remaining[local].store(0, Ordering::Release);
            counters.acked[local].store(generation, Ordering::Release);
            return;
        }
        if rebalance {
            self.last_rebalance = Instant::now();
        }
        let migration = &self.migration;
        let candidates = self.lifecycle.movable(|s| migration.settled(s));
        let me = self.me;
        let (live, held_bytes) = self.lifecycle.load();
        let loads: Vec<Load> = movers
            .board
            .snapshot()
            .per_worker
            .iter()
            .map(|&(worker, sessions, state_bytes)| match worker == me {
                // The control plane's count of this worker lags behind its own moves.
                true => Load {
                    worker,
                    sessions: live,
                    state_bytes: held_bytes,
                },
                false => Load {
                    worker,
                    sessions,
                    state_bytes,
                },
            })
            .collect();
        let routes = movers.routes.borrow();
        let takes =
            |w: u32| !(routes.drains(w) || (draining && movers.process_workers.contains(&w)));
        let any_target = (0..self.plan.workers as u32).any(|w| w != self.me && takes(w));
        let moves = plan_moves(
            self.me,
            draining,
            &candidates,
            &loads,
            takes,
            MOVES_PER_TURN,
        );
        drop(routes);
        let mut moved = 0;
        for (session, to) in moves {
            if let Some((envelope, moves)) = self.lifecycle.give_away(session, to) {
                tracing::debug!(session, from = self.me, to, moves, "move out");
                self.migration.gone(session, to, moves);
                out.push(FrontendOut::Envelope(envelope));
                out.push(FrontendOut::Control(Control::Moved {
                    session,
                    from: self.me,
                    to,
                    moves,
                }));
                moved += 1;
            }
        }
        counters.moved_out.fetch_add(moved, Ordering::Relaxed);
        out.extend(
            self.lifecycle
                .take_events()
                .into_iter()
                .map(FrontendOut::Event),
        );
        // Another process's worker may only look drained (its undrain is on its way): wait
        // a moment before keeping the sessions here.
        let other_processes = self.plan.workers > movers.process_workers.len();
        let waiting = draining
            && !any_target
            && other_processes
            && self
                .no_target_since
                .get_or_insert_with(Instant::now)
                .elapsed()
                < NO_TARGET_GRACE;
        if any_target || !draining {
            self.no_target_since = None;
        }
        let (remaining, kept) = match draining {
            true if any_target || waiting => {
                // Sessions still settling here move once settled: not done yet either.
                let left = candidates.len() as u64 - moved + self.migration.settling() as u64;
                (left, (self.lifecycle.live() as u64).saturating_sub(left))
            }
            true => (0, self.lifecycle.live() as u64),
            false => (0, 0),
        };
        counters.kept[local].store(kept, Ordering::Relaxed);
        counters.remaining[local].store(remaining, Ordering::Release);
        counters.acked[local].store(generation, Ordering::Release);
    }

    /// Admits `request`; a generation's prompt goes through the prefix-state cache: on a
    /// hit, a restore of the cached state and a step of the rest; on a miss, the prompt but
    /// its last token, a capture of the state there, then the last token (whose step answers
    /// the request). A model that prunes its prompts is not cached: a pruned prefix's state
    /// is not the state a longer prompt's pruning reaches there.
    fn admit(&mut self, request: Request, now: Instant, out: &mut Vec<FrontendOut>) {
        let cache = match (&self.prefix_cache, &request.op) {
            (
                Some(cache),
                Op::Step {
                    model,
                    input: StepInput::Tokens(tokens),
                    start: true,
                    end: false,
                    last_only: true,
                    owner,
                    ..
                },
            ) if tokens.len() >= 2
                && !self.lifecycle.prunes_prompts(*model)
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
            ..
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
            route: Route::Hash,
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
                    route: Route::Hash,
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
        let mut next = Vec::new();
        for request in requests {
            let live = self.lifecycle.is_live(request.session);
            self.migration.accept(request, live, &mut next);
            for n in next.drain(..) {
                match n {
                    Next::Run(request) => self.run(request, now, out),
                    Next::Forward(request) => self.movers.routes.borrow_mut().reinput(request),
                }
            }
        }
        out.extend(
            self.lifecycle
                .take_events()
                .into_iter()
                .map(FrontendOut::Event),
        );
    }

    fn idle(&mut self, out: &mut Vec<FrontendOut>) {
        self.migrate(out);
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
    /// there; returns the envelopes for the next stage, the live-set changes, and the
    /// routing table's changes.
    fn frontend(
        self,
        plan: Plan,
        lifecycle: Lifecycle,
        movers: Movers,
        snapshots: Option<SnapshotTimer>,
        prefix_cache: Option<Arc<PrefixCache>>,
    ) -> (
        StreamVec<'s, u64, Envelope>,
        StreamVec<'s, u64, SessionEvent>,
        StreamVec<'s, u64, Control>,
    );
}

impl<'s> Frontend<'s> for StreamVec<'s, u64, Request> {
    fn frontend(
        self,
        plan: Plan,
        lifecycle: Lifecycle,
        movers: Movers,
        snapshots: Option<SnapshotTimer>,
        prefix_cache: Option<Arc<PrefixCache>>,
    ) -> (
        StreamVec<'s, u64, Envelope>,
        StreamVec<'s, u64, SessionEvent>,
        StreamVec<'s, u64, Control>,
    ) {
        let logic = FrontendLogic {
            me: movers.process_workers.start + movers.local as u32,
            plan,
            lifecycle,
            last_sweep: Instant::now(),
            snapshots,
            prefix_cache,
            migration: Migration::new(plan.workers),
            movers,
            announced_draining: false,
            last_rebalance: Instant::now(),
            no_target_since: None,
        };
        let workers = plan.workers;
        let out = stage_operator(
            self,
            Exchange::new(move |r: &Request| r.route.worker(r.session, workers)),
            "Frontend",
            logic,
        );
        type Rest = Result<SessionEvent, Control>;
        let (envelopes, rest): (_, StreamVec<'s, u64, Rest>) = out.ok_err(|o| match o {
            FrontendOut::Envelope(e) => Ok(e),
            FrontendOut::Event(e) => Err(Ok(e)),
            FrontendOut::Control(c) => Err(Err(c)),
        });
        let (events, control) = rest.ok_err(|r| r);
        (envelopes, events, control)
    }
}
