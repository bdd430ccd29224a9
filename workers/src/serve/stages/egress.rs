//! The `egress` stage: each envelope goes back to the worker that took its request in, which
//! answers the waiting gRPC handler (records of an expiry, which no one waits for, end here).
//!
//! ```ignore
//! outputs.egress(models.clone(), pending.clone(), board.clone());
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use tokio::sync::oneshot;

use super::super::messages::{Reply, Response};
use super::super::served::ServedModel;
use super::super::stats::StatsBoard;
use super::{Body, Envelope};

/// The answers this process's handlers wait for, by request id.
pub type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// An envelope at the end of the graph, as the answer to its request.
fn response(envelope: Envelope, served: &ServedModel) -> Response {
    let reply = |rows: u32, logits: Vec<f32>, skipped: Vec<bool>| Reply {
        position: envelope.position,
        rows,
        width: served.width() as u32,
        logits,
        position_after: envelope.position_after,
        state_bytes: served.state_bytes() as u64,
        worker: envelope.owner,
        ended: envelope.end,
        chunks: envelope.chunks,
        state: None,
        skipped,
    };
    let result = match envelope.body {
        Body::Failed(e) => Err(e),
        Body::Output {
            rows,
            values,
            skipped,
        } => Ok(reply(rows, values, skipped)),
        // An export's answer (a restore's state was taken in: a bare reply).
        Body::State(snapshot) if !envelope.start => Ok(Reply {
            state: Some(snapshot),
            ..reply(0, Vec::new(), Vec::new())
        }),
        // A bare start, end or probe, or input the front end held back.
        _ => Ok(reply(0, Vec::new(), Vec::new())),
    };
    Response {
        id: envelope.id,
        origin: envelope.origin,
        result,
    }
}

/// The egress stage on a stream of envelopes.
pub trait Egress<'s> {
    /// Answers each envelope's handler; counts refusals by a server limit on `board`.
    fn egress(self, models: Arc<Vec<ServedModel>>, pending: Pending, board: Arc<StatsBoard>);
}

impl<'s> Egress<'s> for StreamVec<'s, u64, Envelope> {
    fn egress(self, models: Arc<Vec<ServedModel>>, pending: Pending, board: Arc<StatsBoard>) {
        self.sink(
            Exchange::new(|e: &Envelope| e.origin as u64),
            "Egress",
            move |(input, _frontier)| {
                input.for_each_stamp(|_cap, data| {
                    let mut pending = pending.lock().unwrap();
                    for batch in data {
                        for envelope in batch.drain(..) {
                            if envelope.id == 0 {
                                continue;
                            }
                            if let Body::Failed(e) = &envelope.body
                                && let Some(limit) = e.limit()
                            {
                                board.count_limit(limit);
                            }
                            let served = &models[envelope.model as usize];
                            if let Body::Output { rows, skipped, .. } = &envelope.body
                                && !served.is_language()
                            {
                                let gated = skipped.iter().filter(|&&s| s).count() as u64;
                                board.count_frames(envelope.model, *rows as u64, gated);
                            }
                            if let Some(tx) = pending.remove(&envelope.id) {
                                // The client may have gone: nothing to do then.
                                let _ = tx.send(response(envelope, served));
                            }
                        }
                    }
                });
            },
        );
    }
}
