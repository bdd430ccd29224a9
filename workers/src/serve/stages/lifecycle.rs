//! The session lifecycle at a session's owner: which sessions live, of which model, since
//! when; start, end, idle expiry and the errors for a session that is not there. Pure logic
//! (no timely): the front-end operator calls [`Lifecycle::admit`] for every request in arrival
//! order and [`Lifecycle::expire_idle`] between epochs.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tideway_operators::state_tensors::{StateError, StateTensors};

use super::super::messages::{Op, OpError, Request, SessionEvent, SessionKey, StepInput};
use super::super::served::ServedModel;
use super::super::state_blob::SessionSnapshot;
use super::frontend::Carry;
use super::{Body, Envelope, MoveTo};

struct Session {
    name: String,
    model: u32,
    /// The identity that started it.
    owner: String,
    /// The front end's carry-over (an unfinished word, window or patch).
    carry: Carry,
    last_used: Instant,
    /// The same moment on the wall clock (a snapshot carries it, so that a restored
    /// session expires when it would have).
    last_used_unix: f64,
    /// Requests with input taken.
    chunks: u64,
    /// Changed since its last snapshot.
    dirty: bool,
    /// Its state cannot leave this worker (its front end's carry-over cannot be written):
    /// it never moves.
    pinned: bool,
    /// Times it moved between workers.
    moves: u32,
}

/// Sessions remembered after expiry, so that a late request is told what happened.
const EXPIRED_MEMORY: usize = 100_000;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether a request carries no input (a stream's opening start, or a request that asks
/// where its session is): it does not count as a chunk.
fn no_input(input: &StepInput) -> bool {
    match input {
        StepInput::Tokens(t) => t.is_empty(),
        StepInput::Text(t) => t.is_empty(),
        StepInput::Audio { samples, .. } => samples.is_empty(),
        StepInput::Frames { values, .. } => values.is_empty(),
    }
}

pub struct Lifecycle {
    worker: u32,
    models: Arc<Vec<ServedModel>>,
    sessions: HashMap<SessionKey, Session>,
    idle_limit: Duration,
    expired: HashMap<SessionKey, (String, f64)>,
    expired_order: VecDeque<SessionKey>,
    /// Changes to the live set since the last `take_events`.
    events: Vec<SessionEvent>,
    /// Sessions this worker may hold (its share of the server's), and the server's limit.
    max_sessions: usize,
    server_max_sessions: usize,
    /// Live sessions by owner, and what one owner may hold here (its share of the server's
    /// per-client limit) and on the server.
    per_owner: HashMap<String, usize>,
    max_per_owner: usize,
    server_max_per_owner: usize,
}

/// How many sessions a worker's table may hold: its share of the server's limits.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub per_worker: usize,
    pub server: usize,
    pub per_client_per_worker: usize,
    pub per_client: usize,
}

impl Lifecycle {
    /// Whether model `model` prunes its prompts (`tideway_prune`): its sessions' states
    /// after a prompt depend on the whole prompt, so the prefix cache leaves them alone.
    pub fn prunes_prompts(&self, model: u32) -> bool {
        self.models
            .get(model as usize)
            .is_some_and(|m| m.prompt_prune().is_some())
    }

    /// The table of worker `worker`, which holds at most its share of the server's sessions,
    /// and of each client's.
    pub fn new(
        worker: u32,
        models: Arc<Vec<ServedModel>>,
        idle_limit: Duration,
        limits: SessionLimits,
    ) -> Self {
        Lifecycle {
            worker,
            models,
            sessions: HashMap::new(),
            idle_limit,
            expired: HashMap::new(),
            expired_order: VecDeque::new(),
            events: Vec::new(),
            max_sessions: limits.per_worker,
            server_max_sessions: limits.server,
            per_owner: HashMap::new(),
            max_per_owner: limits.per_client_per_worker,
            server_max_per_owner: limits.per_client,
        }
    }

    fn insert_session(&mut self, key: SessionKey, session: Session) {
        *self.per_owner.entry(session.owner.clone()).or_insert(0) += 1;
        if let Some(old) = self.sessions.insert(key, session) {
            self.release(&old.owner);
        }
    }

    fn remove_session(&mut self, key: &SessionKey) -> Option<Session> {
        let session = self.sessions.remove(key)?;
        self.release(&session.owner);
        Some(session)
    }

    fn release(&mut self, owner: &str) {
        if let Some(n) = self.per_owner.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(owner);
            }
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

    /// Why a session may not start here (a limit), if it may not.
    pub fn refuse_start(&self, key: SessionKey, owner: &str) -> Option<OpError> {
        if self.sessions.contains_key(&key) {
            return None;
        }
        if self.sessions.len() >= self.max_sessions {
            return Some(OpError::TooManySessions {
                limit: self.server_max_sessions,
            });
        }
        if self.per_owner.get(owner).copied().unwrap_or(0) >= self.max_per_owner {
            return Some(OpError::TooManyClientSessions {
                limit: self.server_max_per_owner,
                owner: owner.to_string(),
            });
        }
        None
    }

    /// The front end's part of session `key`'s snapshot: what it is and its carry-over
    /// (the stages add theirs on the way).
    fn snapshot_of(
        &self,
        key: SessionKey,
        session: &Session,
    ) -> Result<Box<SessionSnapshot>, StateError> {
        let served = &self.models[session.model as usize];
        let mut tensors = StateTensors::default();
        session.carry.export(&mut tensors)?;
        Ok(Box::new(SessionSnapshot {
            key,
            name: session.name.clone(),
            model: served.name.clone(),
            fingerprint: served.fingerprint.clone(),
            owner: session.owner.clone(),
            chunks: session.chunks,
            position: 0,
            last_used_unix: session.last_used_unix,
            tensors,
            refused: None,
            prefix: None,
        }))
    }

    /// A capture of session `key`'s state after exactly `prefix` (its tokens so far), for the
    /// prefix-state cache: an envelope no client waits for, filled in by the stages.
    pub fn capture(&self, key: SessionKey, prefix: Vec<u32>) -> Option<Envelope> {
        let session = self.sessions.get(&key)?;
        let mut snapshot = self.snapshot_of(key, session).ok()?;
        snapshot.prefix = Some(prefix);
        Some(self.state_envelope(key, session, snapshot))
    }

    /// An envelope no client waits for that carries `session`'s state out through the stages.
    fn state_envelope(
        &self,
        key: SessionKey,
        session: &Session,
        snapshot: Box<SessionSnapshot>,
    ) -> Envelope {
        Envelope {
            model: session.model,
            name: session.name.clone(),
            chunks: session.chunks,
            ..Envelope::bare(0, self.worker, self.worker, key, Body::State(snapshot))
        }
    }

    /// Snapshots (envelopes no client waits for) of every session changed since its last
    /// one (`all`: of every session), and how many sessions cannot be snapshotted (their
    /// front end's carry-over cannot be written, e.g. a resampled audio stream).
    pub fn snapshots(&mut self, all: bool) -> (Vec<Envelope>, usize) {
        let mut out = Vec::new();
        let mut skipped = 0;
        let keys: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| all || s.dirty)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let session = &self.sessions[&key];
            match self.snapshot_of(key, session) {
                Ok(snapshot) => out.push(self.state_envelope(key, session, snapshot)),
                Err(_) => skipped += 1,
            }
            self.sessions.get_mut(&key).expect("listed").dirty = false;
        }
        (out, skipped)
    }

    /// Starts session `envelope.session` of `model` from `snapshot` (replacing a live one):
    /// the envelope takes the state to every stage. `stored`: the snapshot came from this
    /// server's store, which need not write it again.
    fn restore(
        &mut self,
        envelope: &mut Envelope,
        model: u32,
        snapshot: Box<SessionSnapshot>,
        stored: bool,
        now: Instant,
    ) {
        let key = envelope.session;
        envelope.model = model;
        envelope.name = snapshot.name.clone();
        let served = &self.models.clone()[model as usize];
        let carry = match Carry::import(served, &snapshot.tensors) {
            Ok(carry) => carry,
            Err(e) => {
                envelope.body = Body::Failed(OpError::State(e));
                return;
            }
        };
        if let Some(old) = self.remove_session(&key) {
            self.event(key, old.model, -1, false);
        }
        self.expired.remove(&key);
        self.event(key, model, 1, false);
        // Time idle before the snapshot counts towards expiry.
        let idle = (unix_now() - snapshot.last_used_unix).max(0.0);
        self.insert_session(
            key,
            Session {
                name: snapshot.name.clone(),
                model,
                owner: snapshot.owner.clone(),
                carry,
                last_used: now
                    .checked_sub(Duration::from_secs_f64(idle))
                    .unwrap_or(now),
                last_used_unix: snapshot.last_used_unix,
                chunks: snapshot.chunks,
                dirty: !stored,
                pinned: false,
                moves: 0,
            },
        );
        envelope.start = true;
        envelope.chunks = snapshot.chunks;
        envelope.body = Body::State(snapshot);
    }

    pub fn is_live(&self, key: SessionKey) -> bool {
        self.sessions.contains_key(&key)
    }

    pub fn live(&self) -> usize {
        self.sessions.len()
    }

    /// Live sessions and the bytes of their state (as the control plane counts them).
    pub fn load(&self) -> (u64, u64) {
        let bytes = self
            .sessions
            .values()
            .map(|s| self.models[s.model as usize].state_bytes() as u64)
            .sum();
        (self.sessions.len() as u64, bytes)
    }

    /// Sessions that may move now (`settled` says a session's last move is done), with their
    /// state bytes: those of models whose state can leave the worker (on the CPU, not split
    /// over a group) and whose carry-over can be written.
    pub fn movable(&self, settled: impl Fn(SessionKey) -> bool) -> Vec<(SessionKey, u64)> {
        self.sessions
            .iter()
            .filter(|(k, s)| !s.pinned && settled(**k) && self.models[s.model as usize].movable())
            .map(|(k, s)| (*k, self.models[s.model as usize].state_bytes() as u64))
            .collect()
    }

    /// Takes session `key` out to move it to worker `to`: the envelope that collects its
    /// state through the stages (each frees its part), and which of the session's moves this
    /// is. None when it cannot move (it is then pinned here) or is not here.
    pub fn give_away(&mut self, key: SessionKey, to: u32) -> Option<(Envelope, u32)> {
        let session = self.sessions.get(&key)?;
        let snapshot = match self.snapshot_of(key, session) {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::debug!(session = %session.name, why = %e, "cannot move");
                self.sessions.get_mut(&key).expect("looked up").pinned = true;
                return None;
            }
        };
        let mut envelope = self.state_envelope(key, session, snapshot);
        let session = self.remove_session(&key).expect("looked up");
        self.event(key, session.model, -1, false);
        let moves = session.moves + 1;
        envelope.end = true;
        envelope.move_to = Some(MoveTo { worker: to, moves });
        Some((envelope, moves))
    }

    /// Runs a request's lifecycle part and the model's front end: the envelope that goes on
    /// to the stages (carrying an error where the request cannot run).
    pub fn admit(&mut self, request: Request, now: Instant) -> Envelope {
        let key = request.session;
        let mut envelope =
            Envelope::bare(request.id, request.origin, self.worker, key, Body::Probe);
        match request.op {
            Op::Export { model, name } => {
                envelope.model = model;
                envelope.body = match self.sessions.get(&key) {
                    Some(s) if s.model == model => {
                        envelope.chunks = s.chunks;
                        match self.snapshot_of(key, s) {
                            Ok(snapshot) => Body::State(snapshot),
                            Err(e) => Body::Failed(OpError::State(e)),
                        }
                    }
                    Some(_) => Body::Failed(OpError::WrongModel { name: name.clone() }),
                    None => Body::Failed(self.missing(key, &name)),
                };
                envelope.name = name;
            }
            Op::Restore {
                model,
                snapshot,
                stored,
            } => {
                if let Some(e) = self.refuse_start(key, &snapshot.owner) {
                    envelope.model = model;
                    envelope.name = snapshot.name.clone();
                    envelope.body = Body::Failed(e);
                    return envelope;
                }
                self.restore(&mut envelope, model, snapshot, stored, now);
            }
            // A session moving in was counted where it started: no limit refuses it here.
            Op::MoveIn {
                model,
                snapshot,
                moves,
                ..
            } => {
                self.restore(&mut envelope, model, snapshot, false, now);
                if let Body::Failed(e) = &envelope.body {
                    // Its old owner has let it go: nothing else holds it now.
                    tracing::error!(session = %envelope.name, why = ?e, "a session moving in could not be taken in; it is lost");
                }
                if let Some(session) = self.sessions.get_mut(&key) {
                    session.moves = moves;
                    // The snapshot stage stores it at once (its old owner's store dropped it).
                    session.dirty = false;
                    envelope.move_to = Some(MoveTo {
                        worker: self.worker,
                        moves,
                    });
                }
            }
            // Fences stop at the front end (`Migration::accept`); one that got here is stale.
            Op::Fence { .. } => {
                envelope.body = Body::Failed(OpError::UnknownSession {
                    name: String::new(),
                });
            }
            Op::Probe { model, name } => {
                envelope.model = model;
                envelope.body = match self.sessions.get(&key) {
                    Some(s) if s.model == model => {
                        envelope.chunks = s.chunks;
                        Body::Probe
                    }
                    Some(_) => Body::Failed(OpError::WrongModel { name: name.clone() }),
                    None => Body::Failed(self.missing(key, &name)),
                };
                envelope.name = name;
            }
            Op::End { name } => {
                match self.remove_session(&key) {
                    Some(s) => {
                        self.event(key, s.model, -1, false);
                        envelope.model = s.model;
                        envelope.end = true;
                        envelope.body = Body::Probe;
                    }
                    None => envelope.body = Body::Failed(self.missing(key, &name)),
                }
                envelope.name = name;
            }
            Op::Step {
                model,
                name,
                owner,
                input,
                start,
                end,
                last_only,
            } => {
                envelope.model = model;
                envelope.last_only = last_only;
                let served = &self.models.clone()[model as usize];
                if start && let Some(e) = self.refuse_start(key, &owner) {
                    envelope.body = Body::Failed(e);
                    envelope.name = name;
                    return envelope;
                }
                if start {
                    // A start on a live session ends the old one first.
                    if let Some(old) = self.remove_session(&key) {
                        self.event(key, old.model, -1, false);
                    }
                    self.expired.remove(&key);
                    self.event(key, model, 1, false);
                    self.insert_session(
                        key,
                        Session {
                            name: name.clone(),
                            model,
                            owner,
                            carry: Carry::new(served),
                            last_used: now,
                            last_used_unix: unix_now(),
                            chunks: 0,
                            dirty: true,
                            pinned: false,
                            moves: 0,
                        },
                    );
                }
                let session = match self.sessions.get_mut(&key) {
                    Some(s) if s.model == model => s,
                    Some(_) => {
                        envelope.body = Body::Failed(OpError::WrongModel { name: name.clone() });
                        envelope.name = name;
                        return envelope;
                    }
                    None => {
                        envelope.body = Body::Failed(self.missing(key, &name));
                        envelope.name = name;
                        return envelope;
                    }
                };
                session.last_used = now;
                session.last_used_unix = unix_now();
                session.dirty = true;
                envelope.start = start;
                envelope.body = match session.carry.push(served, &input, end) {
                    Ok(body) => {
                        if !no_input(&input) {
                            session.chunks += 1;
                        }
                        body
                    }
                    // The session stays as it was (a start stays started).
                    Err(e) => Body::Failed(OpError::Frontend(e)),
                };
                envelope.chunks = session.chunks;
                if end && !matches!(envelope.body, Body::Failed(_)) {
                    envelope.end = true;
                    self.remove_session(&key);
                    self.event(key, model, -1, false);
                }
                envelope.name = name;
            }
        }
        envelope
    }

    /// Frees sessions idle for longer than the limit: one `Forget` envelope each, so that
    /// every stage drops its part of the state.
    pub fn expire_idle(&mut self, now: Instant) -> Vec<Envelope> {
        let limit = self.idle_limit;
        let stale: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_used) > limit)
            .map(|(k, _)| *k)
            .collect();
        let unix_now = unix_now();
        let mut forgets = Vec::new();
        for key in stale {
            let session = self.remove_session(&key).expect("listed above");
            self.event(key, session.model, -1, true);
            if self.expired_order.len() >= EXPIRED_MEMORY
                && let Some(old) = self.expired_order.pop_front()
            {
                self.expired.remove(&old);
            }
            forgets.push(Envelope {
                model: session.model,
                name: session.name.clone(),
                end: true,
                ..Envelope::bare(0, self.worker, self.worker, key, Body::Forget)
            });
            self.expired.insert(key, (session.name, unix_now));
            self.expired_order.push_back(key);
        }
        forgets
    }
}
