//! The routing table: where each session that moved lives now, and which workers drain. Every
//! worker keeps a copy, fed by the front ends' control records broadcast to all workers; the
//! worker's input reads it as each request enters the graph (`Route::Table`). A worker that
//! learns of a move answers with a fence to the session's old owner, on the same channel as its
//! earlier requests (see [`super::migration`] for why that keeps a session's order).
//!
//! ```ignore
//! let routes = RouteTable::shared(index);
//! control.routes(routes.clone());
//! ```

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Broadcast;

use super::super::messages::{Op, Request, Route, SessionKey};

/// A change to the routing table, made by the front end that owns the session or the worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Session `session` moved from worker `from` to worker `to` (its `moves`-th move).
    Moved {
        session: SessionKey,
        from: u32,
        to: u32,
        moves: u32,
    },
    /// Worker `worker` drains (no session moves to it) or takes sessions again.
    Draining { worker: u32, on: bool },
}

/// One worker's copy of the table, and the requests it puts back into the graph's input.
pub struct RouteTable {
    /// This worker's global index.
    me: u32,
    /// Where each session that moved lives, and its moves so far.
    owners: HashMap<SessionKey, (u32, u32)>,
    draining: BTreeSet<u32>,
    /// Requests to enter the graph at this worker's next turn: fences, forwarded requests,
    /// states on their way to a session's new owner.
    reinput: Vec<Request>,
}

/// A worker's table, shared by its operators and its input loop (one thread).
pub type Routes = Rc<RefCell<RouteTable>>;

impl RouteTable {
    pub fn shared(me: u32) -> Routes {
        Rc::new(RefCell::new(RouteTable {
            me,
            owners: HashMap::new(),
            draining: BTreeSet::new(),
            reinput: Vec::new(),
        }))
    }

    /// How a request of `session` entering at this worker finds its owner.
    pub fn route(&self, session: SessionKey) -> Route {
        match self.owners.get(&session) {
            Some(&(worker, moves)) => Route::Table { worker, moves },
            None => Route::Hash,
        }
    }

    /// Whether worker `worker` drains (takes no sessions moved).
    pub fn drains(&self, worker: u32) -> bool {
        self.draining.contains(&worker)
    }

    /// Queues `request` to enter the graph at this worker's next turn.
    pub fn reinput(&mut self, request: Request) {
        self.reinput.push(request);
    }

    pub fn take_reinput(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.reinput)
    }

    /// Applies one control record. A move's fence goes to the old owner behind every request
    /// this worker routed there; the ones after it go to the new owner.
    pub fn apply(&mut self, control: Control) {
        match control {
            Control::Moved {
                session,
                from,
                to,
                moves,
            } => {
                // Moves of one session reach every worker in order (the next starts only
                // once every worker's fence for this one is in): a later one always wins.
                self.owners.insert(session, (to, moves));
                self.reinput.push(Request {
                    id: 0,
                    origin: self.me,
                    session,
                    route: Route::To(from),
                    op: Op::Fence { origin: self.me },
                });
            }
            Control::Draining { worker, on: true } => {
                self.draining.insert(worker);
            }
            Control::Draining { worker, on: false } => {
                self.draining.remove(&worker);
            }
        }
    }
}

/// The routing table's feed on a stream of control records.
pub trait Routing<'s> {
    /// Broadcasts every record to every worker, which applies it to its copy of the table.
    fn routes(self, table: Routes);
}

impl<'s> Routing<'s> for StreamVec<'s, u64, Control> {
    fn routes(self, table: Routes) {
        self.broadcast()
            .sink(Pipeline, "Routes", move |(input, _frontier)| {
                input.for_each(|_cap, data| {
                    let mut table = table.borrow_mut();
                    for control in data.drain(..) {
                        table.apply(control);
                    }
                });
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_routes_later_requests_to_the_new_owner_behind_a_fence_to_the_old() {
        let table = RouteTable::shared(3);
        assert_eq!(table.borrow().route(42), Route::Hash);
        table.borrow_mut().apply(Control::Moved {
            session: 42,
            from: 0,
            to: 1,
            moves: 1,
        });
        assert_eq!(
            table.borrow().route(42),
            Route::Table {
                worker: 1,
                moves: 1
            }
        );
        let fences = table.borrow_mut().take_reinput();
        assert_eq!(fences.len(), 1);
        assert_eq!(fences[0].route, Route::To(0));
        assert_eq!(fences[0].op, Op::Fence { origin: 3 });
        assert!(table.borrow_mut().take_reinput().is_empty());
        table.borrow_mut().apply(Control::Draining {
            worker: 2,
            on: true,
        });
        assert!(table.borrow().drains(2) && !table.borrow().drains(1));
        table.borrow_mut().apply(Control::Draining {
            worker: 2,
            on: false,
        });
        assert!(!table.borrow().drains(2));
    }
}
