//! Live migration: a session moves between workers (or processes) at an epoch boundary with
//! no request lost, repeated or reordered. Pure logic, called by the front end.
//!
//! A move of session `s` from worker A to worker T:
//! 1. A's front end takes `s` out of its table after the requests it has run (so everything
//!    of `s` before the move is ahead in the graph), and sends an envelope that collects the
//!    whole state through the stages (each adds its part and frees it); the snapshot stage
//!    hands it to T as a `MoveIn`. A broadcasts `Moved { s, A → T }` and from then on
//!    forwards whatever of `s` still reaches it to T (`Route::Forwarded`), in arrival order.
//! 2. Every worker O that learns of the move routes its later requests of `s` to T
//!    (`Route::Table`), and sends A a `Fence` behind those it routed to A before. Channels
//!    between two workers keep their order, so A forwards O's fence behind O's earlier
//!    requests.
//! 3. T runs nothing of `s` before its state; then A's forwarded requests in A's order, and
//!    O's own requests only after O's fence (they are later than everything O sent to A).
//!    With every worker's fence in, the move is done; only then may `s` move again.
//!
//! Who moves what: a draining worker moves every session it can to the least loaded worker
//! that does not drain; with `--rebalance-every-s`, a worker whose sessions' state exceeds
//! another's by more than two sessions' moves sessions there (load from the differential
//! control plane's per-worker counts).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::super::messages::{Op, Request, Route, SessionKey};

/// This process's side of migration: what the gRPC edge asks of its front ends, and what
/// they report back (for `Admin.Drain` and the metrics).
#[derive(Debug)]
pub struct Migrations {
    /// The process drains: its front ends move their sessions away.
    pub draining: AtomicBool,
    /// Raised with each drain; a front end that has seen it stores it in `acked`.
    pub generation: AtomicU64,
    /// By local worker: the drain generation it has answered, the sessions it still has to
    /// move, and those that cannot move (a GPU's, a tensor-parallel group's, a resampled
    /// audio stream's).
    pub acked: Vec<AtomicU64>,
    pub remaining: Vec<AtomicU64>,
    pub kept: Vec<AtomicU64>,
    /// Move sessions between balanced workers this often (None: only drains move them).
    pub rebalance_every: Option<Duration>,
    pub moved_out: AtomicU64,
    pub moved_in: AtomicU64,
    /// Seconds from a session leaving its old owner to its state taken in at the new one,
    /// summed over `moved_in` moves (wall clocks of two processes: same host, or synced).
    pub seconds: Mutex<f64>,
}

impl Migrations {
    pub fn new(workers: usize, rebalance_every: Option<Duration>) -> Self {
        let counters = || (0..workers).map(|_| AtomicU64::new(0)).collect();
        Migrations {
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            acked: counters(),
            remaining: counters(),
            kept: counters(),
            rebalance_every,
            moved_out: AtomicU64::new(0),
            moved_in: AtomicU64::new(0),
            seconds: Mutex::new(0.0),
        }
    }

    /// Starts (`on`) or stops draining; returns the drain's generation.
    pub fn drain(&self, on: bool) -> u64 {
        self.draining.store(on, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether every local front end has answered drain `generation` and moved every session
    /// it can.
    pub fn drained(&self, generation: u64) -> bool {
        self.acked
            .iter()
            .all(|a| a.load(Ordering::Acquire) >= generation)
            && self
                .remaining
                .iter()
                .all(|r| r.load(Ordering::Acquire) == 0)
    }

    pub fn kept(&self) -> u64 {
        self.kept.iter().map(|k| k.load(Ordering::Relaxed)).sum()
    }

    pub fn record_arrival(&self, seconds: f64) {
        self.moved_in.fetch_add(1, Ordering::Relaxed);
        *self.seconds.lock().unwrap() += seconds.max(0.0);
    }
}

/// What a front end does with a request now.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Run it here, in this order.
    Run(Request),
    /// Send it on to the session's new owner.
    Forward(Request),
}

/// A session moving in, before every worker's fence has reached this worker.
#[derive(Default)]
struct Incoming {
    /// Which of the session's moves this is.
    moves: u32,
    /// Its state has been taken in.
    state: bool,
    /// Workers whose fence came.
    fenced: HashSet<u32>,
    /// What the old owner forwarded before the state came, in its order.
    forwarded: Vec<Request>,
    /// Each origin's own requests, held until its fence.
    held: HashMap<u32, Vec<Request>>,
}

/// One front end's moves: sessions that left it, sessions on their way in.
pub struct Migration {
    /// Workers in the cluster (each sends one fence per move).
    workers: usize,
    /// Sessions that moved away from here: where to, and that move's count.
    moved: HashMap<SessionKey, (u32, u32)>,
    incoming: HashMap<SessionKey, Incoming>,
    /// Sessions whose move here is done, and that move's count: a request routed here by
    /// it runs (a session that ended since is unknown, not on its way).
    arrived: HashMap<SessionKey, u32>,
}

impl Migration {
    pub fn new(workers: usize) -> Self {
        Migration {
            workers,
            moved: HashMap::new(),
            incoming: HashMap::new(),
            arrived: HashMap::new(),
        }
    }

    /// Whether `session` may move now (no move of it is still settling here).
    pub fn settled(&self, session: SessionKey) -> bool {
        !self.incoming.contains_key(&session)
    }

    /// Sessions moving in whose state is here but not yet every worker's fence.
    pub fn settling(&self) -> usize {
        self.incoming.values().filter(|i| i.state).count()
    }

    /// Records that `session` left for worker `to` (its `moves`-th move).
    pub fn gone(&mut self, session: SessionKey, to: u32, moves: u32) {
        self.moved.insert(session, (to, moves));
        self.arrived.remove(&session);
    }

    /// The entry of a move of `session` in (its `moves`-th), made by whichever of its
    /// records comes first.
    fn incoming(&mut self, session: SessionKey, moves: u32) -> &mut Incoming {
        let incoming = self.incoming.entry(session).or_default();
        incoming.moves = incoming.moves.max(moves);
        incoming
    }

    /// Sorts one arriving request (in arrival order) into what runs here now, in order, and
    /// what goes on to a session's new owner; holds what must wait. `live`: whether the
    /// session lives here.
    pub fn accept(&mut self, request: Request, live: bool, next: &mut Vec<Next>) {
        let session = request.session;
        if let Op::MoveIn { moves, .. } = &request.op {
            tracing::debug!(session, moves, "move in");
            self.moved.remove(&session);
            let incoming = self.incoming(session, *moves);
            incoming.state = true;
            let forwarded = std::mem::take(&mut incoming.forwarded);
            next.push(Next::Run(request));
            for request in forwarded {
                self.old_owners_record(request, next);
            }
            return;
        }
        let moves = request.route.moves();
        // Everything from before the session left here follows it; a record of a later move
        // back here waits for that move's state below.
        if let Some(&(to, out)) = self.moved.get(&session)
            && moves <= out
        {
            tracing::debug!(
                session,
                to,
                id = request.id,
                origin = request.origin,
                "forward"
            );
            next.push(Next::Forward(Request {
                route: Route::Forwarded {
                    worker: to,
                    moves: out,
                },
                ..request
            }));
            return;
        }
        match request.route {
            Route::Forwarded { .. } => {
                let incoming = self.incoming(session, moves);
                if incoming.state {
                    self.old_owners_record(request, next);
                } else {
                    incoming.forwarded.push(request);
                }
            }
            Route::Table { .. } if self.incoming.contains_key(&session) => {
                let incoming = self.incoming.get_mut(&session).expect("checked");
                if incoming.state && incoming.fenced.contains(&request.origin) {
                    next.push(Next::Run(request));
                } else {
                    incoming
                        .held
                        .entry(request.origin)
                        .or_default()
                        .push(request);
                }
            }
            // Routed here by a move whose state has not come yet: it waits for it.
            Route::Table { .. }
                if !live && self.arrived.get(&session).is_none_or(|&a| a < moves) =>
            {
                self.incoming(session, moves)
                    .held
                    .entry(request.origin)
                    .or_default()
                    .push(request);
            }
            _ if matches!(request.op, Op::Fence { .. }) => {
                tracing::warn!(session, "a fence for a session that did not move from here");
            }
            _ => next.push(Next::Run(request)),
        }
    }

    /// One of the old owner's forwarded records, after the state: a request runs; a fence
    /// releases its origin's held requests.
    fn old_owners_record(&mut self, request: Request, next: &mut Vec<Next>) {
        let session = request.session;
        let Op::Fence { origin } = request.op else {
            next.push(Next::Run(request));
            return;
        };
        let incoming = self.incoming.get_mut(&session).expect("moving in");
        incoming.fenced.insert(origin);
        if let Some(held) = incoming.held.remove(&origin) {
            next.extend(held.into_iter().map(Next::Run));
        }
        if incoming.fenced.len() >= self.workers {
            tracing::debug!(session, moves = incoming.moves, "move done");
            let moves = incoming.moves;
            self.incoming.remove(&session);
            self.arrived.insert(session, moves);
        }
    }
}

/// Load of one worker, as the control plane counts it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    pub worker: u32,
    pub sessions: u64,
    pub state_bytes: u64,
}

/// The moves worker `me` makes now: each candidate session (key, state bytes), in order, to
/// the least loaded worker that may take it. `drain`: every candidate goes; otherwise only
/// while the move leaves `me` no lighter than its target (state bytes, sessions breaking
/// ties). `loads` holds every worker (`me`'s as it is now: the control plane's figures lag
/// behind a move); `takes(w)` says whether `w` takes sessions.
pub fn plan_moves(
    me: u32,
    drain: bool,
    candidates: &[(SessionKey, u64)],
    loads: &[Load],
    takes: impl Fn(u32) -> bool,
    limit: usize,
) -> Vec<(SessionKey, u32)> {
    let mut loads: Vec<Load> = loads.to_vec();
    let mine = loads.iter().position(|l| l.worker == me);
    let mut moves = Vec::new();
    for &(session, bytes) in candidates {
        if moves.len() >= limit {
            break;
        }
        let Some(target) = loads
            .iter()
            .enumerate()
            .filter(|(_, l)| l.worker != me && takes(l.worker))
            .min_by_key(|(_, l)| (l.state_bytes, l.sessions, l.worker))
            .map(|(i, _)| i)
        else {
            break;
        };
        if !drain {
            let Some(m) = mine else { break };
            let (from, to) = (loads[m], loads[target]);
            if from.sessions == 0 {
                break;
            }
            let after = (from.state_bytes.saturating_sub(bytes), from.sessions - 1);
            let target_after = (to.state_bytes + bytes, to.sessions + 1);
            if after < target_after {
                break;
            }
        }
        if let Some(m) = mine {
            loads[m].state_bytes = loads[m].state_bytes.saturating_sub(bytes);
            loads[m].sessions = loads[m].sessions.saturating_sub(1);
        }
        loads[target].state_bytes += bytes;
        loads[target].sessions += 1;
        moves.push((session, loads[target].worker));
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::messages::StepInput;

    fn step(session: SessionKey, origin: u32, route: Route, n: u32) -> Request {
        Request {
            id: n as u64,
            origin,
            session,
            route,
            op: Op::Step {
                model: 0,
                name: "s".into(),
                owner: String::new(),
                input: StepInput::Tokens(vec![n]),
                start: false,
                end: false,
                last_only: false,
            },
        }
    }

    const TO_1: Route = Route::Forwarded {
        worker: 1,
        moves: 1,
    };
    const TABLE_1: Route = Route::Table {
        worker: 1,
        moves: 1,
    };

    fn fence(session: SessionKey, origin: u32) -> Request {
        Request {
            id: 0,
            origin,
            session,
            route: TO_1,
            op: Op::Fence { origin },
        }
    }

    fn move_in(session: SessionKey) -> Request {
        let snapshot = tideway_operators::state_blob::SessionSnapshot {
            key: session,
            name: "s".into(),
            model: "m".into(),
            fingerprint: String::new(),
            owner: String::new(),
            chunks: 0,
            position: 0,
            last_used_unix: 0.0,
            tensors: Default::default(),
            refused: None,
            prefix: None,
        };
        Request {
            id: 0,
            origin: 0,
            session,
            route: Route::To(1),
            op: Op::MoveIn {
                model: 0,
                snapshot: Box::new(snapshot),
                from: 0,
                moves: 1,
                sent_unix: 0.0,
            },
        }
    }

    fn ran(next: &[Next]) -> Vec<u64> {
        next.iter()
            .filter_map(|n| match n {
                Next::Run(r) if r.id != 0 => Some(r.id),
                _ => None,
            })
            .collect()
    }

    /// Worker 1 takes in session 7 from worker 0, with origins 0, 1 and 2 (3 workers); the
    /// records arrive in an order the channels allow, and run in the session's order.
    #[test]
    fn a_moving_session_runs_its_requests_in_their_order_whatever_arrives_first() {
        let mut m = Migration::new(3);
        let mut next = Vec::new();
        // Origin 2 already routes to the new owner: held (no state yet).
        m.accept(step(7, 2, TABLE_1, 20), false, &mut next);
        // The old owner forwards origin 2's earlier request and origin 0's, then fences.
        m.accept(step(7, 2, TO_1, 10), false, &mut next);
        m.accept(fence(7, 2), false, &mut next);
        m.accept(step(7, 0, TO_1, 11), false, &mut next);
        assert!(next.is_empty(), "nothing runs before the state");
        assert!(!m.settled(7));
        m.accept(move_in(7), false, &mut next);
        assert_eq!(ran(&next), vec![10, 20, 11]);
        next.clear();
        // Origin 0's own requests wait for its fence; origin 2's run at once.
        m.accept(step(7, 0, TABLE_1, 21), true, &mut next);
        m.accept(step(7, 2, TABLE_1, 22), true, &mut next);
        assert_eq!(ran(&next), vec![22]);
        m.accept(fence(7, 0), true, &mut next);
        assert_eq!(ran(&next), vec![22, 21]);
        m.accept(fence(7, 1), true, &mut next);
        assert!(m.settled(7), "every fence in: the move is done");
        // A later request routed here runs, even when the session has ended since.
        next.clear();
        m.accept(step(7, 0, TABLE_1, 23), false, &mut next);
        assert_eq!(ran(&next), vec![23]);
    }

    #[test]
    fn a_session_that_left_has_everything_forwarded_in_arrival_order() {
        let mut m = Migration::new(2);
        m.gone(9, 1, 1);
        let mut next = Vec::new();
        m.accept(step(9, 0, Route::Hash, 1), false, &mut next);
        m.accept(
            Request {
                route: Route::To(0),
                ..fence(9, 0)
            },
            false,
            &mut next,
        );
        m.accept(step(9, 1, Route::Hash, 2), false, &mut next);
        let forwarded: Vec<(u64, Route)> = next
            .iter()
            .map(|n| match n {
                Next::Forward(r) => (r.id, r.route),
                Next::Run(_) => panic!("ran a session that left"),
            })
            .collect();
        assert_eq!(forwarded, vec![(1, TO_1), (0, TO_1), (2, TO_1)]);
        // Other sessions run here.
        next.clear();
        m.accept(step(8, 0, Route::Hash, 3), true, &mut next);
        assert_eq!(ran(&next), vec![3]);
    }

    /// Worker 1 moved session 5 to worker 0 (its 2nd move); now it comes back (its 3rd):
    /// what the tables and the old owner send for the new stay waits for its state instead of
    /// following the old move, while what was on its way before the old move still follows it.
    #[test]
    fn a_session_coming_back_tells_its_new_stay_from_its_old_one() {
        let mut m = Migration::new(2);
        m.gone(5, 0, 2);
        let mut next = Vec::new();
        let old = Route::Table {
            worker: 1,
            moves: 1,
        };
        m.accept(step(5, 0, old, 1), false, &mut next);
        assert!(matches!(&next[..], [Next::Forward(r)] if r.id == 1));
        next.clear();
        let back = Route::Table {
            worker: 1,
            moves: 3,
        };
        let forwarded = Route::Forwarded {
            worker: 1,
            moves: 3,
        };
        m.accept(step(5, 1, back, 3), false, &mut next);
        m.accept(step(5, 0, forwarded, 2), false, &mut next);
        assert!(next.is_empty(), "{next:?}");
        let mut state = move_in(5);
        if let Op::MoveIn { moves, .. } = &mut state.op {
            *moves = 3;
        }
        m.accept(state, false, &mut next);
        assert_eq!(ran(&next), vec![2]);
        let mut f = fence(5, 1);
        f.route = forwarded;
        m.accept(f, true, &mut next);
        assert_eq!(ran(&next), vec![2, 3]);
    }

    fn loads(l: &[(u64, u64)]) -> Vec<Load> {
        l.iter()
            .enumerate()
            .map(|(w, &(sessions, state_bytes))| Load {
                worker: w as u32,
                sessions,
                state_bytes,
            })
            .collect()
    }

    #[test]
    fn a_drain_spreads_every_session_over_the_workers_that_take_them() {
        let candidates: Vec<(SessionKey, u64)> = (0..6).map(|s| (s, 10)).collect();
        let moves = plan_moves(
            1,
            true,
            &candidates,
            &loads(&[(2, 20), (6, 60), (0, 0), (0, 0)]),
            |w| w != 3,
            100,
        );
        let to: Vec<u32> = moves.iter().map(|m| m.1).collect();
        assert_eq!(to, vec![2, 2, 0, 2, 0, 2]);
        // No worker takes sessions: none move.
        assert!(
            plan_moves(
                1,
                true,
                &candidates,
                &loads(&[(0, 0), (6, 60)]),
                |_| false,
                9
            )
            .is_empty()
        );
        // The limit per turn holds.
        assert_eq!(
            plan_moves(
                1,
                true,
                &candidates,
                &loads(&[(0, 0), (6, 60)]),
                |_| true,
                4
            )
            .len(),
            4
        );
    }

    #[test]
    fn a_rebalance_moves_only_while_it_evens_the_load() {
        let candidates: Vec<(SessionKey, u64)> = (0..8).map(|s| (s, 10)).collect();
        let l = loads(&[(8, 80), (2, 20)]);
        let moves = plan_moves(0, false, &candidates, &l, |_| true, 100);
        assert_eq!(moves.len(), 3, "8 and 2 become 5 and 5");
        let l = loads(&[(3, 30), (2, 20)]);
        assert!(plan_moves(0, false, &candidates, &l, |_| true, 100).is_empty());
    }
}
