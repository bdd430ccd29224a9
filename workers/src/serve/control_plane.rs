//! The control plane: the collection of live sessions (session, owner worker, model, state
//! bytes), maintained by differential dataflow from the front ends' start / end / expiry
//! events and counted by (worker, model) incrementally; expiries are a second, growing
//! collection. The counts are broadcast so that every process's [`StatsBoard`] sees the whole
//! cluster (Admin.Stats, the metrics, and the load that drains and rebalancing move sessions
//! by).
//!
//! ```ignore
//! events.control_plane(board.clone(), local == 0);
//! ```

use std::sync::Arc;

use differential_dataflow::AsCollection;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Broadcast;

use super::messages::SessionEvent;
use super::stats::{BoardKey, StatsBoard};

/// The control plane on the front ends' stream of session events.
pub trait ControlPlane<'s> {
    /// Counts live and expired sessions by (worker, model) and applies the counts to `board`
    /// (`reports_board`: on one worker per process).
    fn control_plane(self, board: Arc<StatsBoard>, reports_board: bool);
}

impl<'s> ControlPlane<'s> for StreamVec<'s, u64, SessionEvent> {
    fn control_plane(self, board: Arc<StatsBoard>, reports_board: bool) {
        let events = self;
        type SessionRow = (u64, u32, u32, u64, u8);
        let changes: StreamVec<'_, u64, (SessionRow, u64, isize)> =
            events.unary(Pipeline, "SessionChanges", |_cap, _info| {
                move |input, output| {
                    input.for_each_stamp(
                        |cap, data: std::slice::IterMut<'_, Vec<SessionEvent>>| {
                            let Some(&time) = cap.least() else {
                                return;
                            };
                            let mut session = output.session(&cap);
                            for batch in data {
                                for e in batch.drain(..) {
                                    let row = (e.session, e.worker, e.model, e.state_bytes, 0);
                                    session.give((row, time, e.delta as isize));
                                    if e.expired {
                                        let expired =
                                            (e.session, e.worker, e.model, e.state_bytes, 1);
                                        session.give((expired, time, 1isize));
                                    }
                                }
                            }
                        },
                    );
                }
            });
        let by_worker_and_model =
            changes
                .as_collection()
                .map(|(_session, worker, model, bytes, kind)| -> BoardKey {
                    (worker, model, bytes, kind)
                });
        by_worker_and_model.count().inner.broadcast().sink(
            Pipeline,
            "StatsBoard",
            move |(input, _frontier)| {
                input.for_each_stamp(|_cap, data| {
                    if !reports_board {
                        return;
                    }
                    for batch in data {
                        for ((key, count), _time, diff) in batch.drain(..) {
                            board.apply(key, count, diff);
                        }
                    }
                });
            },
        );
    }
}
