//! The serving runtime: a timely dataflow of model-stage operators on worker threads (one
//! process, or one process of a cluster), fed from tokio through bounded per-worker queues.
//!
//! ```text
//! gRPC handler --Request--> worker queue --input--> exchange(owner)
//!   --> frontend (lifecycle, tokenizer / audio / sensor carry-over)
//!   --> prune --> exchange(stage 0) --> layers(0) --> exchange(stage 1) --> layers(1) ...
//!   --> layers(K-1) --> head --> exchange(origin worker) --> egress --> the handler's oneshot
//!
//! frontend --SessionEvent--> control_plane (differential: live sessions by (worker, model)) --> broadcast
//!   --> StatsBoard (each process's view of the whole cluster)
//! frontend --Control (a session moved, a worker drains)--> broadcast --> RouteTable (each
//!   worker's), read as requests enter; fences and moving states re-enter the input
//! ```
//!
//! Each worker closes one epoch per tick (default 1 ms), or at once when the graph has nothing
//! in flight (an idle server does not hold a lone request back for the tick): the requests that
//! entered in it go into the graph together, and every stage runs what has reached it as one
//! batched computation (`stages::stage_operator`). Placement is one [`Plan`]: `data` (K = 1:
//! every stage of a session on its owner worker) or a pipeline of K stages of each model's
//! layers, each on its own workers, successive batches overlapping across stages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use timely::CommunicationConfig;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use tokio::sync::oneshot;

use super::control_plane::ControlPlane;
use super::limits::Limits;
use super::messages::{Op, Request, Response, Route, SessionKey};
use super::prefix_cache::PrefixCache;
use super::served::ServedModel;
use super::stages::Plan;
use super::stages::egress::Egress;
use super::stages::frontend::Frontend;
use super::stages::frontend::Movers;
use super::stages::frontend::SnapshotTimer;
use super::stages::head::Head;
use super::stages::layers::Layers;
use super::stages::lifecycle::Lifecycle;
use super::stages::migration::Migrations;
use super::stages::prune::Prune;
use super::stages::routes::{RouteTable, Routing};
use super::stages::snapshot::{SnapshotSink, Snapshots};
use super::stats::StatsBoard;
use super::store::StoreOp;

/// How the runtime is laid out and paced.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Worker threads in this process.
    pub threads: usize,
    /// This process's index and the cluster's addresses (empty: a single process).
    pub process: usize,
    pub hosts: Vec<String>,
    /// Serialise exchanged records even within one process (tests of the wire types).
    pub process_binary: bool,
    /// Epoch length.
    pub tick: Duration,
    /// Close an epoch early once this many tokens entered it on a worker (0: no budget).
    pub epoch_tokens: usize,
    /// Sessions idle for longer are freed.
    pub idle_limit: Duration,
    /// Requests waiting for each worker before the edge answers RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Where each stage runs (the same on every process).
    pub plan: Plan,
    /// What one client may make the server do.
    pub limits: Limits,
    /// Where sessions' snapshots go (`serve --store`); None: no snapshots.
    pub snapshots: Option<SnapshotSink>,
    /// The prefix-state cache (`serve --prefix-cache-mb`), shared by this process's workers.
    pub prefix_cache: Option<Arc<PrefixCache>>,
    /// Move sessions from busier to idler workers this often (`serve --rebalance-every-s`);
    /// None: sessions move only when their process drains.
    pub rebalance_every: Option<Duration>,
}

/// How far the model stage may lag behind a worker's input before admission pauses (also
/// covers clock skew between the nodes of a cluster).
const ADMISSION_SLACK: Duration = Duration::from_secs(2);

/// Why a request could not be handed to the dataflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull { capacity: usize },
    Draining,
    Stopped,
}

type PendingInner = Mutex<HashMap<u64, oneshot::Sender<Response>>>;
type PendingMap = Arc<PendingInner>;

/// This process's pending answers, for `fail_pending` (called from the panic hook).
static PENDING: std::sync::OnceLock<std::sync::Weak<PendingInner>> = std::sync::OnceLock::new();
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Answers every request still in flight with UNAVAILABLE and refuses new ones: the process
/// is about to exit (a worker panicked, typically because a cluster peer was lost).
pub fn fail_pending(reason: &str) {
    STOPPED.store(true, Ordering::SeqCst);
    let Some(pending) = PENDING.get().and_then(|w| w.upgrade()) else {
        return;
    };
    // try_lock: the panic may have happened while this very lock was held.
    if let Ok(mut pending) = pending.try_lock() {
        for (id, tx) in pending.drain() {
            let _ = tx.send(Response {
                id,
                origin: 0,
                result: Err(super::messages::OpError::Unavailable(reason.to_string())),
            });
        }
    }
}

/// The handle the gRPC services hold.
pub struct Engine {
    pub models: Arc<Vec<ServedModel>>,
    pub config: RuntimeConfig,
    pub board: Arc<StatsBoard>,
    /// This process's side of moving sessions (drains, rebalancing).
    pub migrations: Arc<Migrations>,
    senders: Vec<Sender<Request>>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<Option<std::thread::Thread>>>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>,
    first_worker: u32,
    next_id: AtomicU64,
    next_worker: AtomicUsize,
    /// Steps submitted by streams and inference requests (not jobs): a job yields while this
    /// moves.
    interactive_steps: AtomicU64,
    draining: AtomicBool,
    guards: Mutex<Option<timely::communication::initialize::WorkerGuards<()>>>,
    /// Client streams open now (native streams, inference streams, job watches).
    open_streams: Arc<AtomicUsize>,
    /// Set at shutdown, after the drain's grace: open streams end with UNAVAILABLE.
    closing: tokio::sync::watch::Sender<bool>,
}

/// Counts one open client stream while it lives.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Engine {
    /// Starts the worker threads (and, in a cluster, connects to the peers).
    pub fn start(models: Vec<ServedModel>, config: RuntimeConfig) -> Result<Arc<Engine>, String> {
        let models = Arc::new(models);
        let threads = config.threads.max(1);
        let communication = if config.hosts.len() > 1 {
            CommunicationConfig::Cluster {
                threads,
                process: config.process,
                addresses: config.hosts.clone(),
                report: false,
                zerocopy: false,
            }
        } else if config.process_binary {
            CommunicationConfig::ProcessBinary(threads)
        } else if threads == 1 {
            CommunicationConfig::Thread
        } else {
            CommunicationConfig::Process(threads)
        };
        let first_worker = (config.process * threads) as u32;
        let board = Arc::new(StatsBoard::new(
            config.hosts.len().max(1),
            threads,
            models.iter().map(|m| m.name.clone()).collect(),
        ));
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| crossbeam_channel::bounded::<Request>(config.queue_capacity))
            .unzip();
        let receivers = Arc::new(Mutex::new(
            receivers.into_iter().map(Some).collect::<Vec<_>>(),
        ));
        let thread_slots = Arc::new(Mutex::new(vec![None; threads]));
        let pending: PendingMap = Arc::default();
        let _ = PENDING.set(Arc::downgrade(&pending));

        let worker_models = models.clone();
        let worker_slots = thread_slots.clone();
        let worker_pending = pending.clone();
        let worker_board = board.clone();
        let worker_config = config.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let worker_stop = stop.clone();
        let migrations = Arc::new(Migrations::new(threads, config.rebalance_every));
        let worker_migrations = migrations.clone();
        let guards = timely::execute(
            timely::Config {
                communication,
                worker: timely::WorkerConfig::default(),
            },
            move |worker| {
                let global = worker.index();
                let local = global - first_worker as usize;
                let rx = receivers.lock().unwrap()[local]
                    .take()
                    .expect("each worker takes its queue once");
                worker_slots.lock().unwrap()[local] = Some(std::thread::current());
                run_worker(
                    worker,
                    rx,
                    WorkerContext {
                        models: worker_models.clone(),
                        pending: worker_pending.clone(),
                        board: worker_board.clone(),
                        config: worker_config.clone(),
                        reports_board: local == 0,
                        stop: worker_stop.clone(),
                        first_worker,
                        migrations: worker_migrations.clone(),
                    },
                );
            },
        )?;
        Ok(Arc::new(Engine {
            models,
            config,
            board,
            migrations,
            senders,
            stop,
            threads: thread_slots,
            pending,
            first_worker,
            next_id: AtomicU64::new(1),
            next_worker: AtomicUsize::new(0),
            interactive_steps: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            open_streams: Arc::default(),
            closing: tokio::sync::watch::channel(false).0,
            guards: Mutex::new(Some(guards)),
        }))
    }

    pub fn model_index(&self, name: &str) -> Option<u32> {
        self.models
            .iter()
            .position(|m| m.name == name)
            .map(|i| i as u32)
    }

    /// Picks the worker that takes in one client stream's requests (round robin), so that a
    /// stream's requests keep their order.
    pub fn pick_worker(&self) -> usize {
        self.next_worker.fetch_add(1, Ordering::Relaxed) % self.senders.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Refuses new sessions here and moves this process's sessions to the other processes'
    /// workers; returns the drain's generation (for [`Engine::wait_moved`]).
    pub fn drain(&self) -> u64 {
        self.draining.store(true, Ordering::Relaxed);
        let generation = self.migrations.drain(true);
        self.wake_workers();
        generation
    }

    /// Refuses new sessions here, and moves none: the process is about to stop, and in a
    /// cluster its peers stop with it (a session moved now would be lost with them).
    pub fn stop_admitting(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn undrain(&self) {
        self.draining.store(false, Ordering::Relaxed);
        self.migrations.drain(false);
        self.wake_workers();
    }

    fn wake_workers(&self) {
        for t in self.threads.lock().unwrap().iter().flatten() {
            t.unpark();
        }
    }

    /// Waits (at most `timeout`) until this process's front ends have moved every session
    /// they can since drain `generation`; returns whether they have.
    pub fn wait_moved(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.migrations.drained(generation) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Counts a client stream as open until the guard drops.
    pub fn track_stream(&self) -> StreamGuard {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.open_streams.clone())
    }

    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// Resolves when the server closes its streams (shutdown, after the drain's grace).
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|&c| c).await;
        }
    }

    /// Ends every open client stream with UNAVAILABLE.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Hands one operation to the dataflow through local worker `worker`; the receiver
    /// yields its response.
    pub fn submit(
        &self,
        worker: usize,
        session: SessionKey,
        op: Op,
        allow_when_draining: bool,
    ) -> Result<oneshot::Receiver<Response>, SubmitError> {
        if matches!(op, Op::Step { .. }) {
            self.interactive_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.submit_background(worker, session, op, allow_when_draining)
    }

    /// Steps submitted by streams and inference requests so far (jobs' steps not counted).
    pub fn interactive_steps(&self) -> u64 {
        self.interactive_steps.load(Ordering::Relaxed)
    }

    /// [`Engine::submit`] for a job's work, which yields to interactive work and so does
    /// not count as such.
    pub fn submit_background(
        &self,
        worker: usize,
        session: SessionKey,
        op: Op,
        allow_when_draining: bool,
    ) -> Result<oneshot::Receiver<Response>, SubmitError> {
        if STOPPED.load(Ordering::Relaxed) {
            return Err(SubmitError::Stopped);
        }
        if self.is_draining() && !allow_when_draining {
            return Err(SubmitError::Draining);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let request = Request {
            id,
            origin: self.first_worker + worker as u32,
            session,
            // The worker's routing table decides as the request enters the graph.
            route: Route::Hash,
            op,
        };
        match self.senders[worker].try_send(request) {
            Ok(()) => {
                if let Some(t) = &self.threads.lock().unwrap()[worker] {
                    t.unpark();
                }
                Ok(rx)
            }
            Err(e) => {
                self.pending.lock().unwrap().remove(&id);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull {
                        capacity: self.config.queue_capacity,
                    },
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Requests waiting in this process's worker queues.
    pub fn queue_depth(&self) -> usize {
        self.senders.iter().map(|s| s.len()).sum()
    }

    /// Writes every session of this process changed since its last snapshot, and waits until
    /// the store has committed them (at most `timeout`). Without a store, does nothing.
    pub fn flush_snapshots(&self, timeout: Duration) -> Result<(), String> {
        let Some(sink) = &self.config.snapshots else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        let generation = sink.flush.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake_workers();
        // Every front end has sent its snapshots, and every snapshot reached the writer.
        while sink
            .acked
            .iter()
            .any(|a| a.load(Ordering::Acquire) < generation)
            || sink.in_flight.load(Ordering::Acquire) > 0
        {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the snapshots were not all taken within {timeout:?} ({} still in the graph)",
                    sink.in_flight.load(Ordering::Acquire)
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let (done, committed) = std::sync::mpsc::channel();
        sink.writer
            .send(StoreOp::Flush(done))
            .map_err(|_| "the store's writer has stopped".to_string())?;
        committed
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| format!("the store did not commit the snapshots within {timeout:?}"))
    }

    /// Stops the local workers and waits for them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.lock().unwrap().iter().flatten() {
            t.unpark();
        }
        if let Some(guards) = self.guards.lock().unwrap().take() {
            drop(guards.join());
        }
    }
}

/// What one worker thread shares with the rest of its process.
struct WorkerContext {
    models: Arc<Vec<ServedModel>>,
    pending: PendingMap,
    board: Arc<StatsBoard>,
    config: RuntimeConfig,
    /// The one worker per process that applies control-plane updates to the board.
    reports_board: bool,
    stop: Arc<AtomicBool>,
    /// Global index of this process's first worker.
    first_worker: u32,
    migrations: Arc<Migrations>,
}

fn run_worker(worker: &mut timely::worker::Worker, rx: Receiver<Request>, context: WorkerContext) {
    let WorkerContext {
        models,
        pending,
        board,
        config,
        reports_board,
        stop,
        first_worker,
        migrations,
    } = context;
    let index = worker.index() as u32;
    let routes = RouteTable::shared(index);
    let mut input = InputHandleVec::<u64, Request>::new();
    let probe = ProbeHandle::new();
    let plan = config.plan;
    worker.dataflow::<u64, _, _>(|scope| {
        let requests = scope.input_from(&mut input);
        let lifecycle = Lifecycle::new(
            index,
            models.clone(),
            config.idle_limit,
            config.limits.session_limits(config.plan.workers),
        );
        let timer = config
            .snapshots
            .clone()
            .map(|sink| SnapshotTimer::new(sink, (index - first_worker) as usize));
        let movers = Movers {
            routes: routes.clone(),
            migrations: migrations.clone(),
            board: board.clone(),
            local: (index - first_worker) as usize,
            process_workers: first_worker..first_worker + config.threads.max(1) as u32,
        };
        let (envelopes, events, control) =
            requests.frontend(plan, lifecycle, movers, timer, config.prefix_cache.clone());
        control.routes(routes.clone());
        let mut staged = envelopes.prune(models.clone());
        for stage in 0..plan.stages {
            staged = staged.layers(stage, plan, models.clone(), board.clone());
        }
        staged
            .head(models.clone())
            .snapshots(
                config.snapshots.clone(),
                config.prefix_cache.clone(),
                routes.clone(),
            )
            .probe_with(&probe)
            .egress(models.clone(), pending, board.clone());

        events.control_plane(board, reports_board);
    });

    // Epochs are wall-clock time in microseconds, so that workers of every process (which
    // start at different moments) keep their inputs at about the same time and the frontier
    // moves with real time; an epoch closed before its tick (the token budget, or an idle
    // graph) moves on to the wall clock's microsecond, or one past the last epoch, not a
    // tick, so early closes never run a worker's input ahead of the others'.
    let tick = config.tick;
    let wall_epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros()) as u64
    };
    let slack = ADMISSION_SLACK.as_micros().max(1) as u64;
    let mut epoch = wall_epoch();
    input.advance_to(epoch);
    let mut next_tick = Instant::now() + tick;
    let budget = config.epoch_tokens;
    // Tokens and records that entered the open epoch.
    let (mut epoch_tokens, mut epoch_records) = (0usize, 0usize);
    'serve: loop {
        // Fences, forwarded requests and moving sessions' states go first: they belong
        // before anything this worker takes in from now on (see `stages::migration`).
        for r in routes.borrow_mut().take_reinput() {
            input.send(r);
            epoch_records += 1;
        }
        // Flow control (timely has none): admit new requests only while the model stage is
        // at most ADMISSION_SLACK behind this worker's input; otherwise they wait in the
        // bounded queue, which refuses new ones when full.
        if !probe.less_than(&epoch.saturating_sub(slack)) {
            loop {
                match rx.try_recv() {
                    Ok(mut r) => {
                        r.route = routes.borrow().route(r.session);
                        if let Op::Step { input, .. } = &r.op {
                            epoch_tokens += input.weight();
                        }
                        input.send(r);
                        epoch_records += 1;
                        if budget > 0 && epoch_tokens >= budget {
                            // The token budget closes the epoch now.
                            epoch = wall_epoch().max(epoch + 1);
                            input.advance_to(epoch);
                            next_tick = Instant::now() + tick;
                            (epoch_tokens, epoch_records) = (0, 0);
                        }
                    }
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break 'serve,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            break 'serve;
        }
        let now = Instant::now();
        // The tick closes the epoch; so does an idle graph (nothing in flight before the open
        // epoch) as soon as the epoch holds a record: a batch gathers while the one before it
        // runs, and a lone stream's chunk or a lone generation's next token does not wait up
        // to a tick for company that is not coming (`tideway bench generate`, one generation
        // of the trained Mamba: BENCHMARKS.md, "Generation").
        let idle = epoch_records > 0 && !probe.less_than(&epoch);
        if now >= next_tick || idle {
            epoch = wall_epoch().max(epoch + 1);
            input.advance_to(epoch);
            next_tick = now + tick;
            (epoch_tokens, epoch_records) = (0, 0);
        }
        worker.step_or_park(Some(next_tick.saturating_duration_since(Instant::now())));
    }
    drop(input);
    // Let the dataflow finish what is in flight (peers shut down alongside).
    let deadline = Instant::now() + Duration::from_secs(2);
    while worker.step_or_park(Some(Duration::from_millis(1))) && Instant::now() < deadline {}
}
