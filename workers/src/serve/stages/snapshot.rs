//! The `snapshot` stage: after the head, on the worker of each session's last stage. A
//! snapshot for the store (a `State` envelope that no client waits for, filled in by every
//! stage on its way) leaves the graph here for the store's writer thread; a session's end,
//! expiry or fresh start deletes its stored snapshot. Everything else goes on to egress.
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

use super::super::store::{StoreOp, StoreStats};
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
}

impl StageLogic<Envelope, Envelope> for SnapshotLogic {
    fn batch(&mut self, envelopes: Vec<Envelope>, out: &mut Vec<Envelope>) {
        let Some(sink) = &self.sink else {
            out.extend(envelopes);
            return;
        };
        for envelope in envelopes {
            match envelope.body {
                Body::State(snapshot) if envelope.id == 0 => {
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
                ref body => {
                    let ended = envelope.end && !matches!(body, Body::Failed(_));
                    // A fresh start replaces whatever was stored under its key (a restore
                    // keeps it: the stored state is the one it came from).
                    let restarted =
                        envelope.start && !matches!(body, Body::Failed(_) | Body::State(_));
                    if ended || restarted {
                        let _ = sink.writer.send(StoreOp::Delete(envelope.session));
                    }
                    out.push(envelope);
                }
            }
        }
    }
}

/// The snapshot stage on a stream of envelopes.
pub trait Snapshots<'s> {
    /// Hands snapshots and deletions to the store's writer (`None`: no store; everything
    /// passes).
    fn snapshots(self, sink: Option<SnapshotSink>) -> StreamVec<'s, u64, Envelope>;
}

impl<'s> Snapshots<'s> for StreamVec<'s, u64, Envelope> {
    fn snapshots(self, sink: Option<SnapshotSink>) -> StreamVec<'s, u64, Envelope> {
        stage_operator(self, Pipeline, "Snapshot", SnapshotLogic { sink })
    }
}
