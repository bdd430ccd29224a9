//! The `snapshot` stage: after the head, on the worker of each session's last stage. A
//! snapshot for the store (a `State` envelope that no client waits for, filled in by every
//! stage on its way) leaves the graph here for the store's writer thread; a session's end,
//! expiry or fresh start deletes its stored snapshot; a capture of a prompt's state goes into
//! the prefix-state cache ([`super::super::prefix_cache`]); a moving session's state goes back
//! into the graph's input, to its new owner's front end. Everything else goes on to egress.
//! One session's envelopes reach this stage in order, so a deletion never overtakes a
//! snapshot taken before it, nor a snapshot one taken after.
//!
//! ```ignore
//! let outputs = hidden.head(models.clone()).snapshots(config.snapshots.clone());
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::Sender;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;

use super::super::messages::{Op, Request, Route};
use super::super::prefix_cache::PrefixCache;
use super::super::store::{StoreOp, StoreStats};
use super::routes::Routes;
use super::{Body, Envelope, StageLogic, stage_operator};

/// Where a process's snapshots go, and how the front ends are asked for them.
#[derive(Clone, Debug)]
pub struct SnapshotSink {
    /// Each front end snapshots its changed sessions at least this often.
    pub every: Duration,
    pub writer: Sender<StoreOp>,
    pub stats: Arc<StoreStats>,
    /// Raised to ask every front end of the process for its changed sessions now (drain,
    /// shutdown); each answers by storing the generation it has handled in `acked`.
    pub flush: Arc<AtomicU64>,
    /// By local worker.
    pub acked: Arc<Vec<AtomicU64>>,
    /// Snapshots sent into the graph and not yet handed to the writer (this process's).
    pub in_flight: Arc<AtomicI64>,
}

impl SnapshotSink {
    pub fn new(
        every: Duration,
        writer: Sender<StoreOp>,
        stats: Arc<StoreStats>,
        workers: usize,
    ) -> Self {
        SnapshotSink {
            every,
            writer,
            stats,
            flush: Arc::default(),
            acked: Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect()),
            in_flight: Arc::default(),
        }
    }
}

struct SnapshotLogic {
    sink: Option<SnapshotSink>,
    prefix_cache: Option<Arc<PrefixCache>>,
    routes: Routes,
}

impl SnapshotLogic {
    /// A session's end, expiry or fresh start deletes its stored snapshot (a restore keeps
    /// it: the stored state is the one it came from).
    fn deletes(&self, envelope: &Envelope) {
        let Some(sink) = &self.sink else {
            return;
        };
        let failed = matches!(envelope.body, Body::Failed(_));
        let ended = envelope.end && !failed;
        let restarted = envelope.start && !failed && !matches!(envelope.body, Body::State(_));
        if ended || restarted {
            let _ = sink.writer.send(StoreOp::Delete(envelope.session));
        }
    }
}

impl StageLogic<Envelope, Envelope> for SnapshotLogic {
    fn batch(&mut self, envelopes: Vec<Envelope>, out: &mut Vec<Envelope>) {
        for envelope in envelopes {
            // A state on its way out that no client waits for: a snapshot or a capture.
            let Body::State(mut snapshot) = envelope.body else {
                self.deletes(&envelope);
                out.push(envelope);
                continue;
            };
            if envelope.move_to.is_some() && envelope.start {
                // A session that moved in: this store keeps it from now on.
                if let Some(sink) = &self.sink
                    && snapshot.refused.is_none()
                {
                    let _ = sink.writer.send(StoreOp::Put(snapshot.clone()));
                }
                out.push(Envelope {
                    body: Body::State(snapshot),
                    ..envelope
                });
                continue;
            }
            if let Some(to) = envelope.move_to {
                // Its new owner's snapshots keep it from now on.
                if let Some(sink) = &self.sink {
                    let _ = sink.writer.send(StoreOp::Delete(envelope.session));
                }
                if let Some(why) = &snapshot.refused {
                    tracing::error!(session = %snapshot.name, why = %why, "a moving session's state could not be taken");
                }
                let sent_unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.routes.borrow_mut().reinput(Request {
                    id: 0,
                    origin: envelope.owner,
                    session: envelope.session,
                    route: Route::To(to.worker),
                    op: Op::MoveIn {
                        model: envelope.model,
                        snapshot,
                        from: envelope.owner,
                        moves: to.moves,
                        sent_unix,
                    },
                });
                continue;
            }
            if envelope.id != 0 || envelope.start {
                let envelope = Envelope {
                    body: Body::State(snapshot),
                    ..envelope
                };
                out.push(envelope);
                continue;
            }
            match (snapshot.prefix.take(), &self.prefix_cache, &self.sink) {
                (Some(tokens), Some(cache), _) => {
                    if snapshot.refused.is_none() {
                        cache.insert(envelope.model, tokens, *snapshot);
                    }
                }
                (Some(_), None, _) | (None, _, None) => {}
                (None, _, Some(sink)) => {
                    sink.in_flight.fetch_sub(1, Ordering::Relaxed);
                    match &snapshot.refused {
                        Some(why) => {
                            sink.stats.skipped.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(session = %snapshot.name, why = %why, "not snapshotted");
                        }
                        None => {
                            let _ = sink.writer.send(StoreOp::Put(snapshot));
                        }
                    }
                }
            }
        }
    }
}

/// The snapshot stage on a stream of envelopes.
pub trait Snapshots<'s> {
    /// Hands snapshots and deletions to the store's writer (`None`: no store), captured
    /// prefix states to the prefix-state cache, and moving sessions' states to this worker's
    /// input (`routes`); everything else passes.
    fn snapshots(
        self,
        sink: Option<SnapshotSink>,
        prefix_cache: Option<Arc<PrefixCache>>,
        routes: Routes,
    ) -> StreamVec<'s, u64, Envelope>;
}

impl<'s> Snapshots<'s> for StreamVec<'s, u64, Envelope> {
    fn snapshots(
        self,
        sink: Option<SnapshotSink>,
        prefix_cache: Option<Arc<PrefixCache>>,
        routes: Routes,
    ) -> StreamVec<'s, u64, Envelope> {
        let logic = SnapshotLogic {
            sink,
            prefix_cache,
            routes,
        };
        stage_operator(self, Pipeline, "Snapshot", logic)
    }
}
