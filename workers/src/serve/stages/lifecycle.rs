//! The session lifecycle at a session's owner: which sessions live, of which model, since
//! when; start, end, idle expiry and the errors for a session that is not there. Pure logic
//! (no timely): the front-end operator calls [`Lifecycle::admit`] for every request in arrival
//! order and [`Lifecycle::expire_idle`] between epochs.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::super::messages::{Op, OpError, Request, SessionEvent, SessionKey};
use super::super::served::ServedModel;
use super::frontend::Carry;
use super::{Body, Envelope};

struct Session {
    name: String,
    model: u32,
    /// The identity that started it.
    owner: String,
    /// The front end's carry-over (an unfinished word, window or patch).
    carry: Carry,
    last_used: Instant,
}

/// Sessions remembered after expiry, so that a late request is told what happened.
const EXPIRED_MEMORY: usize = 100_000;

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

    /// Runs a request's lifecycle part and the model's front end: the envelope that goes on
    /// to the stages (carrying an error where the request cannot run).
    pub fn admit(&mut self, request: Request, now: Instant) -> Envelope {
        let key = request.session;
        let mut envelope = Envelope {
            id: request.id,
            origin: request.origin,
            session: key,
            model: 0,
            name: String::new(),
            owner: self.worker,
            start: false,
            end: false,
            last_only: false,
            position: 0,
            position_after: 0,
            body: Body::Probe,
        };
        match request.op {
            Op::Probe { model, name } => {
                envelope.model = model;
                envelope.body = match self.sessions.get(&key) {
                    Some(s) if s.model == model => Body::Probe,
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
                if start
                    && !self.sessions.contains_key(&key)
                    && self.sessions.len() >= self.max_sessions
                {
                    envelope.body = Body::Failed(OpError::TooManySessions {
                        limit: self.server_max_sessions,
                    });
                    envelope.name = name;
                    return envelope;
                }
                if start
                    && !self.sessions.contains_key(&key)
                    && self.per_owner.get(&owner).copied().unwrap_or(0) >= self.max_per_owner
                {
                    envelope.body = Body::Failed(OpError::TooManyClientSessions {
                        limit: self.server_max_per_owner,
                        owner,
                    });
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
                envelope.start = start;
                envelope.body = match session.carry.push(served, &input, end) {
                    Ok(body) => body,
                    // The session stays as it was (a start stays started).
                    Err(e) => Body::Failed(OpError::Frontend(e)),
                };
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
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
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
                id: 0,
                origin: self.worker,
                session: key,
                model: session.model,
                name: session.name.clone(),
                owner: self.worker,
                start: false,
                end: true,
                last_only: false,
                position: 0,
                position_after: 0,
                body: Body::Forget,
            });
            self.expired.insert(key, (session.name, unix_now));
            self.expired_order.push_back(key);
        }
        forgets
    }
}
