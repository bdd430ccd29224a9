//! `tideway.v1.Jobs`: long sequences through the dataflow in the chunked form. A job is a
//! session that the server drives itself: each chunk is one request (one epoch's batch, packed
//! with whatever streams are running), and the answer to chunk i releases chunk i+1. Progress
//! is published after every chunk; Cancel stops before the next one and frees the state.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use tideway_proto::tideway::v1 as pb;

use super::auth::{Identity, random_id};
use super::engine::Engine;
use super::messages::{Op, StepInput, owned_session_key};
use super::native::tensor_f32;
use super::requests::{LengthLimit, Refuse, answer, check_answer, check_ids};
use super::status::{inbound_error, op_status, shutting_down, submit_status};

const DEFAULT_CHUNK: usize = 256;
/// The longest a job waits between steps for interactive work.
const MAX_JOB_YIELD: Duration = Duration::from_millis(200);
/// The smallest step a job is sized down to (below it the chunked form loses its point).
const MIN_JOB_STEP: usize = 16;
/// What a job's record holds besides its result, in the bytes bound (so that results-less
/// jobs, failed or cancelled, are bounded too).
const JOB_RECORD_BYTES: usize = 1024;

struct Job {
    /// The identity that submitted it: the only one that sees it.
    owner: String,
    status: watch::Receiver<pb::JobStatus>,
    result: Arc<Mutex<Option<pb::JobResult>>>,
    cancel: Arc<AtomicBool>,
    /// When the job ended, and the bytes of its result.
    finished: Arc<Mutex<Option<(Instant, usize)>>>,
}

/// The jobs of this node, in the order they were submitted.
#[derive(Default)]
struct JobTable {
    jobs: HashMap<String, Job>,
    order: VecDeque<String>,
}

impl JobTable {
    /// Drops finished jobs older than `ttl`, then the oldest finished ones while their results
    /// hold more than `max_bytes`. Running jobs stay.
    fn sweep(&mut self, ttl: Duration, max_bytes: usize) {
        let now = Instant::now();
        let mut kept_bytes = 0;
        let mut finished: Vec<(String, Instant, usize)> = Vec::new();
        for id in &self.order {
            if let Some(&(at, bytes)) = self.jobs[id].finished.lock().unwrap().as_ref() {
                finished.push((id.clone(), at, bytes));
                kept_bytes += bytes;
            }
        }
        for (id, at, bytes) in finished {
            if now.duration_since(at) > ttl || kept_bytes > max_bytes {
                self.jobs.remove(&id);
                kept_bytes -= bytes;
            }
        }
        let jobs = &self.jobs;
        self.order.retain(|id| jobs.contains_key(id));
    }
}

pub struct JobsService {
    engine: Arc<Engine>,
    table: Arc<Mutex<JobTable>>,
}

impl JobsService {
    pub fn new(engine: Arc<Engine>) -> Self {
        JobsService {
            engine,
            table: Arc::default(),
        }
    }

    fn sweep(&self, table: &mut JobTable) {
        let limits = &self.engine.config.limits;
        table.sweep(
            Duration::from_secs_f64(limits.job_result_ttl_s),
            limits.max_job_results_bytes,
        );
    }

    /// `f` of job `id`, if `owner` submitted it (another identity's job is as unknown as a
    /// job that does not exist).
    fn job<T>(&self, id: &str, owner: &Identity, f: impl FnOnce(&Job) -> T) -> Result<T, Status> {
        let mut table = self.table.lock().unwrap();
        self.sweep(&mut table);
        let job = table.jobs.get(id).filter(|j| j.owner == owner.name).ok_or_else(|| {
            let limits = &self.engine.config.limits;
            Status::not_found(format!(
                "unknown job {id:?} (jobs live on the node that accepted them; finished ones are kept for {} s and {} bytes of results: --job-result-ttl-s, --max-job-results-bytes)",
                limits.job_result_ttl_s, limits.max_job_results_bytes
            ))
        })?;
        Ok(f(job))
    }

    fn start(
        &self,
        request: pb::JobRequest,
        tokens: Vec<i64>,
        owner: Identity,
    ) -> Result<pb::JobHandle, Status> {
        let engine = self.engine.clone();
        if engine.is_draining() {
            return Err(Status::unavailable(
                "the server is draining: it accepts no new jobs",
            ));
        }
        let model = engine
            .model_index(&request.model)
            .ok_or_else(|| Status::not_found(format!("unknown model {:?}", request.model)))?;
        let served = &engine.models[model as usize];
        if !served.is_language() {
            return Err(Status::invalid_argument(format!(
                "model {:?} is a feature model: jobs run token sequences; stream its audio samples or frames with Streams.Open",
                served.name
            )));
        }
        let limits = &engine.config.limits;
        let all_outputs = request.outputs != pb::JobOutputs::Last as i32;
        let tokens = check_ids(
            &tokens,
            served.vocab_size(),
            LengthLimit::job(limits.max_job_tokens),
        )
        .and_then(|ids| {
            let rows = if all_outputs { ids.len() } else { 1 };
            check_answer(rows, served.width(), limits.max_message_bytes, true)?;
            Ok(ids)
        })
        .map_err(|e| e.refuse(&engine.board))?;
        if tokens.is_empty() {
            return Err(Status::invalid_argument("a job needs at least one token"));
        }
        let id = format!("job-{}", random_id());
        let total = tokens.len() as u64;
        // The server bounds a job's step whatever the client asks (--max-job-chunk), and sizes
        // it by time (--job-step-ms): other sessions wait at most about one step for it, and
        // Cancel is seen between steps.
        let max_step = match request.chunk {
            0 => DEFAULT_CHUNK,
            n => n as usize,
        }
        .min(engine.config.limits.max_job_chunk);
        let step_target = Duration::from_secs_f64(engine.config.limits.job_step_ms / 1e3);
        let last_only = request.outputs == pb::JobOutputs::Last as i32;
        let initial = pb::JobStatus {
            job_id: id.clone(),
            state: pb::JobState::Running as i32,
            done_tokens: 0,
            total_tokens: total,
            ..Default::default()
        };
        let (status_tx, status_rx) = watch::channel(initial.clone());
        let result = Arc::new(Mutex::new(None));
        let cancel = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(Mutex::new(None));
        {
            let mut table = self.table.lock().unwrap();
            self.sweep(&mut table);
            table.order.push_back(id.clone());
            table.jobs.insert(
                id.clone(),
                Job {
                    owner: owner.name.clone(),
                    status: status_rx,
                    result: result.clone(),
                    cancel: cancel.clone(),
                    finished: finished.clone(),
                },
            );
        }
        let name = id.clone();
        tokio::spawn(async move {
            let key = owned_session_key(model, &owner.name, &name);
            let worker = engine.pick_worker();
            let started = Instant::now();
            let width = engine.models[model as usize].width();
            let mut logits: Vec<f32> = Vec::new();
            let mut first_position = 0u64;
            let mut status = initial;
            let mut steps = StepSizer::new(max_step, step_target);
            let mut done = 0usize;
            while done < tokens.len() {
                // A job stopped after its first step ends its session (frees its state).
                let end_session = || async {
                    if done > 0
                        && let Ok(rx) = engine.submit_background(
                            worker,
                            key,
                            Op::End { name: name.clone() },
                            true,
                        )
                    {
                        let _ = answer(rx).await;
                    }
                };
                if cancel.load(Ordering::Relaxed) {
                    end_session().await;
                    status.state = pb::JobState::Cancelled as i32;
                    break;
                }
                let piece = &tokens[done..(done + steps.next()).min(tokens.len())];
                let op = Op::Step {
                    model,
                    name: name.clone(),
                    owner: owner.name.clone(),
                    input: StepInput::Tokens(piece.to_vec()),
                    start: done == 0,
                    end: done + piece.len() == tokens.len(),
                    last_only: false,
                };
                let step_started = Instant::now();
                let interactive = engine.interactive_steps();
                let reply = match engine.submit_background(worker, key, op, true) {
                    Ok(rx) => answer(rx)
                        .await
                        .and_then(|r| r.map_err(|e| op_status(&e, Code::FailedPrecondition))),
                    Err(e) => Err(submit_status(e)),
                };
                match reply {
                    Ok(reply) => {
                        if last_only {
                            let rows = reply.rows as usize;
                            logits = reply.logits[(rows - 1) * width..].to_vec();
                            first_position = reply.position_after - 1;
                        } else {
                            logits.extend_from_slice(&reply.logits);
                        }
                        status.done_tokens = reply.position_after;
                        let took = step_started.elapsed();
                        steps.record(piece.len(), took);
                        done += piece.len();
                        if engine.interactive_steps() != interactive {
                            // Streams or requests sent work during this step: leave the worker
                            // to them as long again, so that a job takes at most about half
                            // of a busy worker (and all of an idle one).
                            tokio::time::sleep(took.min(MAX_JOB_YIELD)).await;
                        }
                    }
                    Err(e) => {
                        status.state = pb::JobState::Failed as i32;
                        status.error = format!("{:?}: {}", e.code(), e.message());
                        end_session().await;
                        break;
                    }
                }
                let secs = started.elapsed().as_secs_f64();
                status.elapsed_s = secs;
                status.tokens_per_s = status.done_tokens as f64 / secs.max(1e-9);
                if status.done_tokens == status.total_tokens {
                    status.state = pb::JobState::Succeeded as i32;
                    let rows = logits.len() / width.max(1);
                    *result.lock().unwrap() = Some(pb::JobResult {
                        job_id: name.clone(),
                        tokens: status.total_tokens,
                        first_position,
                        logits: Some(tensor_f32("logits", &[rows as i64, width as i64], &logits)),
                    });
                }
                let _ = status_tx.send(status.clone());
            }
            status.elapsed_s = started.elapsed().as_secs_f64();
            let bytes = result
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|r| r.logits.as_ref())
                .map_or(0, |t| t.data.len())
                + JOB_RECORD_BYTES;
            *finished.lock().unwrap() = Some((Instant::now(), bytes));
            let _ = status_tx.send(status);
        });
        Ok(pb::JobHandle {
            job_id: id,
            total_tokens: total,
        })
    }
}

/// Sizes a job's steps by time: each aims at `target` of the worker's time, so that sessions
/// sharing the worker wait about that long for it at most. A step's time is measured end to
/// end (queueing included), so a busy worker shrinks the job's steps and an idle one lets
/// them grow, at most twofold per step, up to `max` tokens. A zero target: steps of `max`.
#[derive(Debug)]
struct StepSizer {
    next: usize,
    max: usize,
    target: Duration,
}

impl StepSizer {
    fn new(max: usize, target: Duration) -> Self {
        let next = if target.is_zero() {
            max
        } else {
            MIN_JOB_STEP.min(max)
        };
        StepSizer { next, max, target }
    }

    /// Tokens in the next step.
    fn next(&self) -> usize {
        self.next
    }

    /// A step of `tokens` took `took`.
    fn record(&mut self, tokens: usize, took: Duration) {
        if self.target.is_zero() || tokens == 0 {
            return;
        }
        let per_token = took.as_secs_f64() / tokens as f64;
        let fits = (self.target.as_secs_f64() / per_token.max(1e-12)) as usize;
        let floor = MIN_JOB_STEP.min(self.max);
        self.next = fits.clamp(floor, (tokens * 2).clamp(floor, self.max));
    }
}

fn terminal(state: i32) -> bool {
    state != pb::JobState::Running as i32 && state != pb::JobState::Unspecified as i32
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsService {
    async fn submit(
        &self,
        request: Request<pb::JobRequest>,
    ) -> Result<Response<pb::JobHandle>, Status> {
        let owner = Identity::of(&request);
        let mut request = request.into_inner();
        let tokens = std::mem::take(&mut request.tokens);
        self.start(request, tokens, owner).map(Response::new)
    }

    async fn submit_stream(
        &self,
        request: Request<Streaming<pb::JobUpload>>,
    ) -> Result<Response<pb::JobHandle>, Status> {
        let owner = Identity::of(&request);
        let mut inbound = request.into_inner();
        let mut header = None;
        let mut tokens = Vec::new();
        while let Some(upload) = inbound
            .message()
            .await
            .map_err(|s| inbound_error(&s).unwrap_or(s))?
        {
            match (upload.kind, &header) {
                (Some(pb::job_upload::Kind::Header(mut h)), None) => {
                    tokens.append(&mut h.tokens);
                    header = Some(h);
                }
                (Some(pb::job_upload::Kind::Tokens(mut t)), Some(_)) => {
                    tokens.append(&mut t.tokens)
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "a job upload is one `header` first, then `tokens` messages",
                    ));
                }
            }
            // Refused as soon as it is too long, not after holding all of it.
            LengthLimit::job(self.engine.config.limits.max_job_tokens)
                .check("tokens", tokens.len())
                .map_err(|e| e.refuse(&self.engine.board))?;
        }
        let header = header
            .ok_or_else(|| Status::invalid_argument("empty upload: send a `header` first"))?;
        self.start(header, tokens, owner).map(Response::new)
    }

    type WatchStream = EventStream;

    async fn watch(&self, request: Request<pb::JobRef>) -> Result<Response<EventStream>, Status> {
        let owner = Identity::of(&request);
        let id = request.into_inner().job_id;
        let (mut status, result) =
            self.job(&id, &owner, |j| (j.status.clone(), j.result.clone()))?;
        let engine = self.engine.clone();
        let stream = async_stream(move |tx| async move {
            let _open = engine.track_stream();
            let closing = engine.closing();
            tokio::pin!(closing);
            loop {
                let current = status.borrow_and_update().clone();
                let done = terminal(current.state);
                if tx
                    .send(Ok(pb::JobEvent {
                        kind: Some(pb::job_event::Kind::Progress(current.clone())),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                if done {
                    let finished = result.lock().unwrap().clone();
                    if current.state == pb::JobState::Succeeded as i32
                        && let Some(r) = finished
                    {
                        let event = pb::JobEvent {
                            kind: Some(pb::job_event::Kind::Result(r)),
                        };
                        let _ = tx.send(Ok(event)).await;
                    }
                    return;
                }
                let changed = tokio::select! {
                    changed = status.changed() => changed,
                    _ = &mut closing => {
                        let _ = tx.send(Err(shutting_down())).await;
                        return;
                    }
                };
                if changed.is_err() {
                    // The job task ended; its last status is in the channel.
                    let last = status.borrow().clone();
                    if !terminal(last.state) {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let owner = Identity::of(&request);
        let id = request.into_inner().job_id;
        let status = self.job(&id, &owner, |j| {
            j.cancel.store(true, Ordering::Relaxed);
            j.status.borrow().clone()
        })?;
        Ok(Response::new(status))
    }

    async fn get(&self, request: Request<pb::JobRef>) -> Result<Response<pb::JobStatus>, Status> {
        let owner = Identity::of(&request);
        let id = request.into_inner().job_id;
        self.job(&id, &owner, |j| j.status.borrow().clone())
            .map(Response::new)
    }
}

/// A response stream fed by a task.
fn async_stream<F, Fut>(body: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::JobEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_steps_fit_their_time_target() {
        let target = Duration::from_millis(5);
        let mut steps = StepSizer::new(2048, target);
        assert_eq!(steps.next(), MIN_JOB_STEP);
        // Fast steps: twice as long each time, up to the cap.
        let mut seen = Vec::new();
        for _ in 0..10 {
            let n = steps.next();
            seen.push(n);
            steps.record(n, Duration::from_micros(n as u64));
        }
        assert_eq!(seen, [16, 32, 64, 128, 256, 512, 1024, 2048, 2048, 2048]);
        // 1 ms a token (a busy worker): five tokens would fit, the floor is 16.
        steps.record(2048, Duration::from_millis(2048));
        assert_eq!(steps.next(), MIN_JOB_STEP);
        // 50 µs a token: 100 fit in 5 ms.
        steps.record(16, Duration::from_micros(800));
        assert_eq!(steps.next(), 32);
        steps.record(200, Duration::from_micros(10_000));
        assert_eq!(steps.next(), 100);
        // No target: every step is the cap.
        let fixed = StepSizer::new(64, Duration::ZERO);
        assert_eq!(fixed.next(), 64);
    }
}
