//! The `tideway.v1` services: `Streams`, `Models`, `Admin`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use pb::stream_request::Kind as InKind;
use pb::stream_response::Kind as OutKind;
use tideway_operators::generate::{FinishReason, Generation};
use tideway_proto::decode;
use tideway_proto::tideway::v1 as pb;

use super::auth::{Identity, random_id};
use super::engine::Engine;
use super::generation::{SessionRef, continuation, continue_generating};
use super::messages::{self, Op, StepInput, owned_session_key};
use super::outbound;
use super::requests::{Refuse, TensorSpec, answer, tensor_specs};
use super::served::ServedKind;
use super::state_io::{export_state, imported_state};
use super::status::{inbound_error, op_status, shutting_down, submit_status};

/// How long a drain waits for its sessions' snapshots to be committed.
const DRAIN_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a drain waits for its sessions to move to other processes.
const DRAIN_MOVES: std::time::Duration = std::time::Duration::from_secs(60);

/// Chunks of one stream that may be in the dataflow at once: the stream's credit. A client
/// that sends faster waits (HTTP/2 flow control), and its slowness is its own.
const STREAM_CREDIT: usize = 8;

pub fn tensor_f32(name: &str, shape: &[i64], values: &[f32]) -> pb::Tensor {
    pb::Tensor {
        name: name.to_string(),
        datatype: "FP32".into(),
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub struct StreamsService {
    pub engine: Arc<Engine>,
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::StreamResponse, Status>> + Send>>;

fn out(kind: OutKind) -> Result<pb::StreamResponse, Status> {
    Ok(pb::StreamResponse { kind: Some(kind) })
}

#[tonic::async_trait]
impl pb::streams_server::Streams for StreamsService {
    type OpenStream = OutStream;

    async fn export_state(
        &self,
        request: Request<pb::ExportStateRequest>,
    ) -> Result<Response<pb::ExportStateResponse>, Status> {
        export_state(&self.engine, request).await.map(Response::new)
    }

    async fn open(
        &self,
        request: Request<Streaming<pb::StreamRequest>>,
    ) -> Result<Response<OutStream>, Status> {
        let engine = self.engine.clone();
        let owner = Identity::of(&request);
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty stream: the first message must be `start`")
        })?;
        let Some(InKind::Start(start)) = first.kind else {
            return Err(Status::failed_precondition(
                "a chunk without a start: the first message of a stream must be `start` (naming the model), then `chunk`s",
            ));
        };
        let model = engine.model_index(&start.model).ok_or_else(|| {
            Status::not_found(format!(
                "unknown model {:?}; served models: {}",
                start.model,
                engine
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let served = &engine.models[model as usize];
        let output_name = served.output_name();
        for wanted in &start.outputs {
            if wanted != output_name {
                return Err(Status::invalid_argument(format!(
                    "unknown output {wanted:?}; model {:?} has one output, {output_name:?}",
                    start.model
                )));
            }
        }
        let worker = engine.pick_worker();
        let resumed = !start.resume_session_id.is_empty();
        let name = if resumed {
            start.resume_session_id.clone()
        } else {
            random_id()
        };
        let key = owned_session_key(model, &owner.name, &name);
        let op = if resumed {
            if !start.state.is_empty() {
                return Err(Status::invalid_argument(
                    "a start gives resume_session_id (a live session) or state (a new session from an exported state), not both",
                ));
            }
            Op::Probe {
                model,
                name: name.clone(),
            }
        } else if !start.state.is_empty() {
            let snapshot = imported_state(served, &start.state, key, &name, &owner.name)?;
            Op::Restore {
                model,
                snapshot,
                stored: false,
            }
        } else {
            Op::Step {
                model,
                name: name.clone(),
                owner: owner.name.clone(),
                input: StepInput::Tokens(Vec::new()),
                start: true,
                end: false,
                last_only: false,
            }
        };
        let opened = engine
            .submit(worker, key, op, false)
            .map_err(submit_status)?;
        let opened = answer(opened)
            .await?
            .map_err(|e| op_status(&e, Code::NotFound))?;

        let (tx, rx) = outbound::channel(
            engine.config.limits.max_stream_buffer_bytes,
            STREAM_CREDIT * 2,
        );
        let _ = tx
            .send(out(OutKind::Opened(pb::StreamOpened {
                session_id: name.clone(),
                position: opened.position_after,
                resumed,
                state_bytes: opened.state_bytes,
                chunks: opened.chunks,
            })))
            .await;
        let keep = start.keep;
        tokio::spawn(async move {
            let _open = engine.track_stream();
            let closing = engine.closing();
            tokio::pin!(closing);
            let (order_tx, mut order_rx) = mpsc::channel::<Order>(STREAM_CREDIT);
            // Answers go out in the order the chunks came in.
            let writer_tx = tx.clone();
            let writer_engine = engine.clone();
            let session = SessionRef {
                worker,
                key,
                model,
                name: name.clone(),
                owner: owner.name.clone(),
            };
            let writer = tokio::spawn(async move {
                let engine = writer_engine;
                // The session's position after the last answer (the summary's), not the
                // answer itself: a stream holds no outputs once they are sent.
                let mut last_position = None;
                let mut tokens = 0u64;
                while let Some(order) = order_rx.recv().await {
                    let (rx, continuation) = match order {
                        Order::Answer(rx) => (rx, None),
                        Order::Continue { rx, generation } => (rx, Some(*generation)),
                    };
                    match answer(rx).await {
                        Ok(Ok(mut reply)) => {
                            tokens += reply.rows as u64;
                            let shape = [reply.rows as i64, reply.width as i64];
                            let output = pb::StreamOutput {
                                position: reply.position,
                                outputs: vec![tensor_f32(output_name, &shape, &reply.logits)],
                                skipped: std::mem::take(&mut reply.skipped),
                            };
                            // Once encoded, the outputs go (a stream holds none between its
                            // chunks), but for a continuation's last row.
                            let mut logits = std::mem::take(&mut reply.logits);
                            let row = continuation.is_some().then(|| {
                                logits.drain(..logits.len().saturating_sub(reply.width as usize));
                                logits
                            });
                            let position = reply.position_after;
                            if writer_tx.send(out(OutKind::Output(output))).await.is_err() {
                                return (Some(position), tokens, WriterEnd::ClientGone);
                            }
                            if let (Some((mut generation, prompt_tokens, done)), Some(row)) =
                                (continuation, row)
                            {
                                let stopped = continue_generating(
                                    &engine,
                                    &session,
                                    &mut generation,
                                    (row, position),
                                    prompt_tokens,
                                    &writer_tx,
                                )
                                .await;
                                let _ = done.send(());
                                match stopped.finish {
                                    None => {
                                        return (
                                            Some(reply.position_after),
                                            tokens,
                                            WriterEnd::Refused,
                                        );
                                    }
                                    Some(FinishReason::Cancelled) => {
                                        return (
                                            Some(reply.position_after),
                                            tokens,
                                            WriterEnd::ClientGone,
                                        );
                                    }
                                    Some(_) => {}
                                }
                                if let Some(after) = stopped.position_after {
                                    tokens += after - reply.position_after;
                                    reply.position_after = after;
                                }
                            }
                            last_position = Some(reply.position_after);
                        }
                        Ok(Err(e)) => {
                            let _ = writer_tx
                                .send(Err(op_status(&e, Code::FailedPrecondition)))
                                .await;
                            return (last_position, tokens, WriterEnd::Refused);
                        }
                        Err(status) => {
                            let _ = writer_tx.send(Err(status)).await;
                            return (last_position, tokens, WriterEnd::Refused);
                        }
                    }
                }
                (last_position, tokens, WriterEnd::Done)
            });

            let mut ended = false;
            let mut disconnected = false;
            // The server answered with an error (the stream's end is its, not the client's).
            let mut refused = false;
            // The server is shutting down: with a store, the session outlives it.
            let mut closed_by_server = false;
            loop {
                // A client that goes away shows as a closed response channel (tonic drops it
                // when the call is reset) or as an error on the inbound side.
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = tx.closed() => {
                        disconnected = true;
                        break;
                    }
                    _ = &mut closing => {
                        refused = true;
                        closed_by_server = true;
                        let _ = tx.send(Err(shutting_down())).await;
                        break;
                    }
                };
                let message = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        match inbound_error(&status) {
                            Some(answer) => {
                                refused = true;
                                let _ = tx.send(Err(answer)).await;
                            }
                            None => disconnected = true,
                        }
                        break;
                    }
                };
                let chunk = match message.kind {
                    Some(InKind::Chunk(chunk)) => chunk,
                    _ => {
                        refused = true;
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "only the first message may be `start`; then send `chunk`s",
                            )))
                            .await;
                        break;
                    }
                };
                let input = match chunk_input(&engine, model, &chunk) {
                    Ok(input) => input,
                    Err(status) => {
                        refused = true;
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let continuation = match chunk.generate.clone().map(|g| {
                    continuation(&engine, model, *g, &input).map(|generation| {
                        let prompt_tokens = input.weight();
                        let (done_tx, done_rx) = oneshot::channel();
                        ((generation, prompt_tokens, done_tx), done_rx)
                    })
                }) {
                    Some(Err(status)) => {
                        refused = true;
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    Some(Ok(c)) => Some(c),
                    None => None,
                };
                let end = chunk.end && !keep;
                let op = Op::Step {
                    model,
                    name: name.clone(),
                    owner: owner.name.clone(),
                    input,
                    start: false,
                    end,
                    last_only: false,
                };
                match engine.submit(worker, key, op, true) {
                    Ok(rx) => {
                        let (order, done) = match continuation {
                            Some((generation, done)) => {
                                let generation = Box::new(generation);
                                (Order::Continue { rx, generation }, Some(done))
                            }
                            None => (Order::Answer(rx), None),
                        };
                        if order_tx.send(order).await.is_err() {
                            break;
                        }
                        // The session generates before it takes the next chunk.
                        if let Some(done) = done {
                            let _ = done.await;
                        }
                    }
                    Err(e) => {
                        refused = true;
                        let _ = tx.send(Err(submit_status(e))).await;
                        break;
                    }
                }
                if chunk.end {
                    ended = end;
                    break;
                }
            }
            drop(order_tx);
            let (last_position, tokens, writer_end) =
                writer.await.unwrap_or((None, 0, WriterEnd::ClientGone));
            let refused = refused || writer_end == WriterEnd::Refused;
            // A stream the server refused ends because of the refusal, not the client.
            if !refused && (disconnected || writer_end == WriterEnd::ClientGone || tx.is_closed()) {
                engine.board.disconnects.fetch_add(1, Ordering::Relaxed);
            }
            let clean = writer_end == WriterEnd::Done;
            // The session's state is freed when the stream ends, unless the client kept it.
            let mut state_kept = keep;
            if !ended
                && !keep
                && (!closed_by_server || engine.config.snapshots.is_none())
                && let Ok(rx) = engine.submit(worker, key, Op::End { name: name.clone() }, true)
            {
                let _ = answer(rx).await;
                state_kept = false;
            }
            if clean && !refused && !disconnected {
                let position = last_position.unwrap_or(opened.position_after);
                let summary = out(OutKind::Summary(pb::StreamSummary {
                    session_id: name,
                    tokens,
                    position,
                    state_kept,
                }));
                if tx.send(summary).await.is_err() {
                    engine.board.disconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }
}

/// What the stream's writer answers next, in chunk order.
enum Order {
    Answer(oneshot::Receiver<messages::Response>),
    /// A chunk that asks to continue from here: its answer, then the generation (with the
    /// prompt's token count), then `done`.
    Continue {
        rx: oneshot::Receiver<messages::Response>,
        generation: Box<(Generation, usize, oneshot::Sender<()>)>,
    },
}

/// How a stream's writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterEnd {
    /// Every answer went out.
    Done,
    /// The client stopped reading (its call is gone).
    ClientGone,
    /// The server answered with an error.
    Refused,
}

/// A chunk's input, decoded and checked at the edge (`tideway_proto::decode::native`).
fn chunk_input(engine: &Engine, model: u32, chunk: &pb::StreamChunk) -> Result<StepInput, Status> {
    let limits = engine.config.limits.requests();
    engine.models[model as usize]
        .with_inputs(|inputs| decode::native::chunk_input(chunk, inputs, &limits))
        .map_err(|e| e.refuse(&engine.board))
}

pub fn model_info(engine: &Engine, index: usize) -> pb::ModelInfo {
    let m = &engine.models[index];
    let (inputs, outputs) = tensor_specs(m);
    let spec = |t: TensorSpec| pb::TensorSpec {
        name: t.name.into(),
        datatype: t.datatype.into(),
        shape: t.shape,
    };
    pb::ModelInfo {
        name: m.name.clone(),
        family: m.family().into(),
        inputs: inputs.into_iter().map(spec).collect(),
        outputs: outputs.into_iter().map(spec).collect(),
        state_bytes_per_session: m.state_bytes() as u64,
        weight_bytes: m.weight_bytes() as u64,
        vocab_size: m.vocab_size() as u64,
        labels: match &m.kind {
            ServedKind::Features(f) => f.config().labels.clone().unwrap_or_default(),
            ServedKind::Language { .. } => Vec::new(),
        },
        session_capacity: m.session_capacity().unwrap_or(0) as u64,
        device: m.device().to_string(),
        pruning: match &m.kind {
            ServedKind::Features(f) => f.frame_gate.as_ref().map(|g| g.to_string()),
            ServedKind::Language { info, .. } => {
                info.prune.as_ref().map(|p| format!("prompts: {p}"))
            }
        }
        .unwrap_or_default(),
    }
}

pub struct ModelsService {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl pb::models_server::Models for ModelsService {
    async fn list(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = (0..self.engine.models.len())
            .map(|i| model_info(&self.engine, i))
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn describe(
        &self,
        request: Request<pb::DescribeModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let name = request.into_inner().name;
        let index = self
            .engine
            .model_index(&name)
            .ok_or_else(|| Status::not_found(format!("unknown model {name:?}")))?;
        Ok(Response::new(model_info(&self.engine, index as usize)))
    }
}

pub struct AdminService {
    pub engine: Arc<Engine>,
    /// The health service's reporter (None in tests without one).
    pub health: Option<tonic_health::server::HealthReporter>,
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        Identity::of(&request).require_admin("Admin.Stats")?;
        let board = &self.engine.board;
        let snap = board.snapshot();
        let threads = board.threads as u32;
        Ok(Response::new(pb::StatsResponse {
            processes: board.processes as u32,
            workers: (board.processes * board.threads) as u32,
            live_sessions: snap.live,
            expired_sessions: snap.expired,
            per_worker: snap
                .per_worker
                .iter()
                .map(|&(worker, live, bytes)| pb::WorkerStats {
                    worker,
                    process: worker / threads,
                    live_sessions: live,
                    state_bytes: bytes,
                })
                .collect(),
            per_model: snap
                .per_model
                .iter()
                .enumerate()
                .map(|(i, &live)| pb::ModelStats {
                    name: board.model_names[i].clone(),
                    live_sessions: live,
                })
                .collect(),
            draining: self.engine.is_draining(),
            tokens_processed: board.tokens.load(Ordering::Relaxed),
        }))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Identity::of(&request).require_admin("Admin.Drain")?;
        let started = std::time::Instant::now();
        let moved_before = self.engine.migrations.moved_out.load(Ordering::Relaxed);
        let generation = self.engine.drain();
        self.set_health(tonic_health::ServingStatus::NotServing)
            .await;
        // A drained node's sessions are on other nodes, or in its store (with --store),
        // before it answers.
        let engine = self.engine.clone();
        let moved_all =
            tokio::task::spawn_blocking(move || engine.wait_moved(generation, DRAIN_MOVES))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        if !moved_all {
            tracing::warn!("the drain's sessions did not all move within {DRAIN_MOVES:?}");
        }
        let seconds = started.elapsed().as_secs_f64();
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.flush_snapshots(DRAIN_FLUSH))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::unavailable)?;
        let migrations = &self.engine.migrations;
        Ok(Response::new(pb::DrainResponse {
            live_sessions: self.engine.board.snapshot().live,
            moved_sessions: migrations.moved_out.load(Ordering::Relaxed) - moved_before,
            kept_sessions: migrations.kept(),
            seconds,
        }))
    }

    async fn undrain(
        &self,
        request: Request<pb::UndrainRequest>,
    ) -> Result<Response<pb::UndrainResponse>, Status> {
        Identity::of(&request).require_admin("Admin.Undrain")?;
        self.engine.undrain();
        self.set_health(tonic_health::ServingStatus::Serving).await;
        Ok(Response::new(pb::UndrainResponse {
            live_sessions: self.engine.board.snapshot().live,
        }))
    }
}

impl AdminService {
    /// What `grpc.health.v1` answers for the server and its serving services.
    async fn set_health(&self, status: tonic_health::ServingStatus) {
        if let Some(health) = &self.health {
            for service in SERVING_SERVICES {
                health.set_service_status(*service, status).await;
            }
        }
    }
}

/// The services health reports on: the server as a whole (""), and the two that serve
/// sessions.
pub const SERVING_SERVICES: &[&str] = &["", "inference.GRPCInferenceService", "tideway.v1.Streams"];
