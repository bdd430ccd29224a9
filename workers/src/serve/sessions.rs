//! The sessions a worker owns and the batched computation of one epoch over them.
//!
//! Pure logic (no timely): the model operator hands every request of an epoch to
//! [`SessionTable::run_epoch`], which answers each one. Requests of one session run in arrival
//! order; across sessions, requests are gathered in rounds (every session's first request,
//! then every session's second …) and each round runs one packed forward per model: one GEMM
//! over all sessions' tokens, per-session recurrences.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tideway_operators::models::{Model, SessionState};

use super::messages::{Op, OpError, Reply, Request, Response, SessionEvent, SessionKey};

/// A model being served.
pub struct ServedModel {
    pub name: String,
    pub model: Model,
}

impl ServedModel {
    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    pub fn width(&self) -> usize {
        self.model.output_width()
    }

    pub fn state_bytes(&self) -> usize {
        self.model.state_bytes()
    }

    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }
}

/// A step request whose session has been taken out of the table for the round.
struct PendingStep {
    id: u64,
    origin: u32,
    key: SessionKey,
    tokens: Vec<u32>,
    session: Session,
    end: bool,
    reply: Option<Result<Reply, OpError>>,
}

struct Session {
    name: String,
    model: u32,
    state: SessionState,
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
                    ref tokens,
                    start,
                    end,
                } => {
                    let models = self.models.clone();
                    let lm = &models[model as usize].model;
                    if let Err(e) = lm.check_tokens(tokens, 0) {
                        responses.push(answer(Err(OpError::Input(e.to_string()))));
                        continue;
                    }
                    let session = if start {
                        // A start on a live session ends the old one first.
                        self.remove(request.session);
                        self.expired.remove(&request.session);
                        self.event(request.session, model, 1, false);
                        Session {
                            name: name.clone(),
                            model,
                            state: lm.new_state(),
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
                    steps.push(PendingStep {
                        id: request.id,
                        origin: request.origin,
                        key: request.session,
                        tokens: tokens.clone(),
                        session,
                        end,
                        reply: None,
                    });
                }
            }
        }

        // One packed forward per model over every session that has tokens.
        for model in 0..self.models.len() as u32 {
            let mut batch: Vec<&mut PendingStep> = steps
                .iter_mut()
                .filter(|s| s.session.model == model && !s.tokens.is_empty())
                .collect();
            if batch.is_empty() {
                continue;
            }
            let lm = &self.models[model as usize].model;
            let tokens: Vec<u32> = batch
                .iter()
                .flat_map(|s| s.tokens.iter().copied())
                .collect();
            let lens: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
            let starts: Vec<u64> = batch
                .iter()
                .map(|s| s.session.state.position() as u64)
                .collect();
            let result = {
                let mut states: Vec<&mut SessionState> =
                    batch.iter_mut().map(|s| &mut s.session.state).collect();
                lm.forward_packed(&tokens, &lens, &mut states)
            };
            let width = lm.output_width();
            let state_bytes = lm.state_bytes() as u64;
            match result {
                Ok(logits) => {
                    self.tokens_processed += tokens.len() as u64;
                    let mut row = 0;
                    for (i, step) in batch.into_iter().enumerate() {
                        let rows = lens[i];
                        step.reply = Some(Ok(Reply {
                            position: starts[i],
                            rows: rows as u32,
                            width: width as u32,
                            logits: logits.data()[row * width..(row + rows) * width].to_vec(),
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
                        step.reply = Some(Err(OpError::Input(e.to_string())));
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
