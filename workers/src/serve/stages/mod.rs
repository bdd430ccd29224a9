//! The model stages of the serving dataflow, one timely operator per file, and the records
//! that flow between them.
//!
//! ```text
//! requests --exchange(owner)--> frontend --> prune --exchange(stage 0)--> layers(0)
//!   --exchange(stage 1)--> layers(1) ... layers(K-1) --> head --> snapshot
//!   --exchange(origin)--> egress
//! frontend --control--> broadcast --> routes (each worker's routing table)
//! ```
//!
//! Every request becomes one [`Envelope`] that passes every stage in order, so that each
//! stage sees the session start, its inputs and its end, and keeps only its own part of the
//! session's state (the front end's carry-over, a stage's layers' recurrent state), keyed by
//! session. A stage transforms the envelope's [`Body`] (raw input → tokens → residual stream
//! → outputs) or hands it on untouched (an error, a probe, a stage that is not its model's).
//! The [`Plan`] says which worker runs each stage of a session.

pub mod egress;
pub mod frontend;
pub mod head;
pub mod layers;
pub mod lifecycle;
pub mod migration;
pub mod prune;
pub mod routes;
pub mod snapshot;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::ParallelizationContract;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;

use super::messages::{OpError, SessionKey};
use super::state_blob::SessionSnapshot;

/// One request on its way through the stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The request's id at its origin; 0 for a record no one waits for (an expiry).
    pub id: u64,
    /// Global index of the worker that took the request in (egress answers there).
    pub origin: u32,
    pub session: SessionKey,
    pub model: u32,
    pub name: String,
    /// Global index of the worker whose front end owns the session.
    pub owner: u32,
    /// The session starts here (every stage makes fresh state for it).
    pub start: bool,
    /// The session ends after this request (every stage frees its state after it).
    pub end: bool,
    /// Only the last row of the output is wanted (the head computes no other).
    pub last_only: bool,
    /// Session position before and after this request (set by the first layers stage).
    pub position: u64,
    pub position_after: u64,
    /// Requests with input the session has taken, this one included (set by the front end).
    pub chunks: u64,
    /// The session moves to this worker (its `moves`-th move). Leaving (not a start): the
    /// envelope carries its whole state out (each stage adds its part and frees it) and
    /// leaves the graph at the snapshot stage for its new owner's front end. Arriving (a
    /// start): each stage takes its part, and the snapshot stage stores the state.
    pub move_to: Option<MoveTo>,
    /// The prune stage's decision on each input frame of a `Features` body (false: skipped
    /// by the model's frame gate); empty: every frame goes on.
    pub keep: Vec<bool>,
    pub body: Body,
}

impl Envelope {
    /// An envelope of `session`, taken in at worker `origin` and owned by worker `owner`,
    /// carrying `body`, with nothing else set yet (model 0, no name, not a start or an end).
    pub fn bare(id: u64, origin: u32, owner: u32, session: SessionKey, body: Body) -> Self {
        Envelope {
            id,
            origin,
            session,
            model: 0,
            name: String::new(),
            owner,
            start: false,
            end: false,
            last_only: false,
            position: 0,
            position_after: 0,
            chunks: 0,
            move_to: None,
            keep: Vec::new(),
            body,
        }
    }
}

/// Where a moving session goes, and which of its moves this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveTo {
    pub worker: u32,
    pub moves: u32,
}

/// What an envelope carries at this point of the graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// Token ids (a language model's input after the front end).
    Tokens(Vec<u32>),
    /// Feature rows `[rows, in_channels]` (a feature model's input after the front end).
    Features(Vec<f32>),
    /// The residual stream between layer stages (`[rows, hidden]`) and the last sub-block's
    /// output not yet added to it (ladder wiring).
    Hidden {
        values: Vec<f32>,
        pending: Option<Vec<f32>>,
    },
    /// The model's outputs (`[rows, width]`: logits or per-frame outputs).
    Output {
        rows: u32,
        values: Vec<f32>,
        /// Rows a frame gate skipped (each repeats the last kept row); empty: none.
        skipped: Vec<bool>,
    },
    /// Asks where the session is (a resume).
    Probe,
    /// The session's state: on its way out (an export, or a snapshot for the store: each
    /// stage adds its part), or in (a restore: each stage takes its part).
    State(Box<SessionSnapshot>),
    /// The session was freed without a request (idle expiry): stages drop their state.
    Forget,
    /// Answered with an error; later stages hand it on to egress.
    Failed(OpError),
}

/// Where each stage of a session runs: `data` placement (one stage: everything on the
/// session's owner) or a pipeline of `stages` stages, each on its own `workers / stages`
/// workers (a stage's lane is picked by session).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Workers of the whole cluster.
    pub workers: usize,
    /// Pipeline stages of every model's layers (1: data placement).
    pub stages: usize,
}

impl Plan {
    /// A plan, or why the workers do not split into that many stages.
    pub fn new(workers: usize, stages: usize) -> Result<Self, String> {
        if stages == 0 || workers == 0 || !workers.is_multiple_of(stages) {
            return Err(format!(
                "--pipeline {stages} needs a number of workers (all processes together) that it divides; there are {workers}"
            ));
        }
        Ok(Plan { workers, stages })
    }

    /// The worker that runs pipeline stage `stage` (its layers) for `session`, whose front
    /// end runs on worker `owner`: data placement keeps every stage there (so a session
    /// that moves takes all its stages along); a pipeline's lanes are picked by session.
    pub fn stage_worker(&self, stage: usize, session: SessionKey, owner: u32) -> u64 {
        if self.stages == 1 {
            return owner as u64;
        }
        let lanes = (self.workers / self.stages) as u64;
        stage as u64 * lanes + session % lanes
    }

    /// The stage a worker runs (data placement: every worker runs the one stage).
    pub fn stage_of(&self, worker: usize) -> usize {
        worker / (self.workers / self.stages)
    }
}

/// A batch's envelopes in rounds: round `r` holds the `r`-th envelope of every session
/// (in arrival order), so that one session's requests run in order while each round batches
/// every session.
pub fn rounds(envelopes: Vec<Envelope>) -> Vec<Vec<Envelope>> {
    let mut seen: HashMap<SessionKey, usize> = HashMap::new();
    let mut rounds: Vec<Vec<Envelope>> = Vec::new();
    for envelope in envelopes {
        let r = seen.entry(envelope.session).or_insert(0);
        if rounds.len() <= *r {
            rounds.push(Vec::new());
        }
        rounds[*r].push(envelope);
        *r += 1;
    }
    rounds
}

/// What a stage does with each batch of records, and between batches.
pub trait StageLogic<I, O> {
    /// Every record that arrived since the last call, in arrival order (so one session's
    /// records keep their order); outputs go to `out`.
    fn batch(&mut self, records: Vec<I>, out: &mut Vec<O>);

    /// Called on every activation (about once per tick): time-driven work such as expiry.
    /// Outputs go out at the input frontier.
    fn idle(&mut self, _out: &mut Vec<O>) {}
}

/// The operator every stage is built on: on each activation it runs every record that has
/// arrived (routed by `pact`) as one batch and emits the outputs at the latest time among
/// them.
///
/// Why not wait for each epoch to close (the frontier) before running it: on one worker the
/// stages run one after another in a step, and a frontier only moves between steps, so every
/// stage that waited would add a whole step — a forward of the layers — to each request's
/// latency (measured: 3× the single-operator engine's p50 at 100 streams). Records arrive in
/// batches anyway: an epoch's requests enter together when it closes (at its tick, or at once
/// on an idle worker: `engine`), and a stage hands on a batch's outputs at once, so the batch
/// that the first stage gathers stays whole downstream, and under load whatever queued during a
/// forward runs as the next batch.
pub fn stage_operator<'s, I, O, P, L>(
    stream: StreamVec<'s, u64, I>,
    pact: P,
    name: &str,
    mut logic: L,
) -> StreamVec<'s, u64, O>
where
    I: Clone + 'static,
    O: Clone + 'static,
    P: ParallelizationContract<u64, Vec<I>>,
    L: StageLogic<I, O> + 'static,
{
    let stage = name.to_string();
    stream.unary_frontier::<CapacityContainerBuilder<Vec<O>>, _, _, _>(
        pact,
        name,
        move |capability, _info| {
            // Held at the input frontier so that `idle` can emit.
            let mut idle_cap = Some(capability);
            // The latest time this operator has emitted at, held while the frontier is behind
            // it: no output goes out at an earlier time, because the operators between
            // stages (timely's `map`, `ok_err`) order each activation's messages by time,
            // and one session's records must keep their order (a snapshot after its step).
            let mut recent: Option<Capability<u64>> = None;
            let mut out = Vec::new();
            move |(input, frontier), output| {
                let mut ready: Vec<I> = Vec::new();
                let mut latest: Option<Capability<u64>> = None;
                // In arrival order: `for_each_stamp` would sort the messages by time.
                input.for_each(|cap, data| {
                    // Records sent under no capability make no progress claim: none of
                    // ours are, but such a message has no time to answer at.
                    let Some(retained) = cap.retain_least(0) else {
                        return;
                    };
                    if latest.as_ref().is_none_or(|l| l.time() < retained.time()) {
                        latest = Some(retained);
                    }
                    ready.append(data);
                });
                if let Some(cap) = latest {
                    let cap = match recent.take() {
                        Some(r) if r.time() > cap.time() => r,
                        _ => cap,
                    };
                    let (count, started) = (ready.len(), std::time::Instant::now());
                    logic.batch(ready, &mut out);
                    tracing::trace!(
                        stage = %stage,
                        records = count,
                        time = *cap.time(),
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "batch ran"
                    );
                    if !out.is_empty() {
                        output.session(&cap).give_iterator(out.drain(..));
                    }
                    recent = Some(cap);
                }
                match frontier.frontier().first() {
                    Some(&now) => {
                        if let Some(cap) = idle_cap.as_mut() {
                            cap.downgrade(&now);
                        }
                        if recent.as_ref().is_some_and(|r| *r.time() <= now) {
                            recent = None;
                        }
                    }
                    None => {
                        idle_cap = None;
                        recent = None;
                    }
                }
                let at = match (&recent, &idle_cap) {
                    (Some(r), _) => Some(r),
                    (None, Some(i)) => Some(i),
                    (None, None) => None,
                };
                if let Some(cap) = at {
                    logic.idle(&mut out);
                    if !out.is_empty() {
                        output.session(cap).give_iterator(out.drain(..));
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_gives_every_stage_its_own_workers() {
        let plan = Plan::new(4, 2).unwrap();
        for session in 0..64u64 {
            let first = plan.stage_worker(0, session, 0);
            let second = plan.stage_worker(1, session, 0);
            assert!(first < 2 && (2..4).contains(&second));
            assert_eq!(plan.stage_of(first as usize), 0);
            assert_eq!(plan.stage_of(second as usize), 1);
        }
        let data = Plan::new(3, 1).unwrap();
        assert_eq!(data.stage_worker(0, 7, 2), 2);
        assert!(Plan::new(3, 2).unwrap_err().contains("divides"));
    }

    #[test]
    fn rounds_keep_each_sessions_order() {
        let envelope = |session, id| Envelope::bare(id, 0, 0, session, Body::Probe);
        let r = rounds(vec![
            envelope(1, 1),
            envelope(2, 2),
            envelope(1, 3),
            envelope(1, 4),
        ]);
        let ids: Vec<Vec<u64>> = r.iter().map(|r| r.iter().map(|e| e.id).collect()).collect();
        assert_eq!(ids, vec![vec![1, 2], vec![3], vec![4]]);
    }
}
