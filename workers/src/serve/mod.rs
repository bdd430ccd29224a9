//! `tideway serve`: the node. A timely-dataflow runtime ([`engine`]) behind gRPC: the native
//! `tideway.v1` API ([`native`]), the KServe v2 / Triton inference protocol ([`inference`]),
//! `grpc.health.v1` and server reflection.

pub mod auth;
pub mod control_plane;
pub mod engine;
pub mod generation;
pub mod grpc_metrics;
pub mod inference;
pub mod inference_generate;
pub mod jobs;
pub mod limits;
pub mod messages;
pub mod metrics;
pub mod native;
pub mod outbound;
pub mod prefix_cache;
pub mod recovery;
pub mod refusals;
pub mod requests;
pub mod served;
pub mod stages;
pub use tideway_operators::state_blob;
pub mod state_io;
pub mod state_pool;
pub mod stats;
pub mod status;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;

use tideway_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tideway_proto::tideway::v1::admin_server::AdminServer;
use tideway_proto::tideway::v1::generation_server::GenerationServer;
use tideway_proto::tideway::v1::jobs_server::JobsServer;
use tideway_proto::tideway::v1::models_server::ModelsServer;
use tideway_proto::tideway::v1::streams_server::StreamsServer;

use crate::device::Device;
use crate::tensor_parallel::ParallelArgs;
use auth::{Authenticate, Tokens};
use engine::{Engine, RuntimeConfig};
use grpc_metrics::ErrorMetricsLayer;
use limits::Limits;
use prefix_cache::PrefixCache;
use served::{Placement, ServedModel};
use stages::Plan;
use stages::snapshot::SnapshotSink;
use store::SessionStore;
use tls::{Tls, TlsArgs};
use tonic::service::interceptor::InterceptedService;

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve: `DIR` (named after the directory) or `NAME=DIR`. Repeatable.
    #[arg(long = "model", value_name = "[NAME=]DIR")]
    models: Vec<String>,
    /// gRPC address. Port 0 picks a free port (the address is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: String,
    /// Timely worker threads in this process (every process of a cluster uses the same).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Placement: 1 runs every stage of a session on its owner worker (data placement); K > 1
    /// splits each model's layers into K contiguous pipeline stages, each on its own workers
    /// (of all processes: K must divide them), activations exchanged between them.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Cluster: a file with one `host:port` per line, one line per process.
    #[arg(long, requires = "process")]
    hosts: Option<PathBuf>,
    /// Cluster: this process's line in --hosts (from 0).
    #[arg(long, requires = "hosts")]
    process: Option<usize>,
    /// Epoch length in milliseconds: requests arriving within one epoch run as one batch. A
    /// worker with nothing in flight closes its epoch at once instead: batches gather while
    /// the one before them runs.
    #[arg(long, default_value_t = 1.0)]
    tick_ms: f64,
    /// Close an epoch early once this many tokens entered it on a worker (0: only the tick, or
    /// an idle worker, closes epochs). Bounds the batch, and so the latency of one epoch, under
    /// bursts.
    #[arg(long, default_value_t = 0)]
    epoch_tokens: usize,
    /// Seconds a session may stay idle before its state is freed. Streaming feeds pause
    /// (a silent microphone, a sensor that reports on change), so the default is generous.
    #[arg(long, default_value_t = 300.0)]
    idle_timeout_s: f64,
    /// Requests waiting per worker before new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 4096)]
    queue_capacity: usize,
    /// Serve Prometheus metrics on this address (path /metrics). Port 0 picks a free port.
    #[arg(long)]
    metrics: Option<String>,
    #[command(flatten)]
    pub limits: Limits,
    /// Bearer tokens: a file of `TOKEN IDENTITY ROLE` lines (role client or admin). Every call
    /// then needs `authorization: Bearer TOKEN`; sessions and jobs belong to the identity that
    /// made them; Admin calls need the admin role. Without it, every call is one anonymous
    /// identity, admin from loopback only.
    #[arg(long, value_name = "FILE")]
    auth: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    /// On SIGINT or SIGTERM: seconds to drain (new work refused, health NOT_SERVING) while
    /// open streams finish; then the rest end with UNAVAILABLE and the process exits.
    #[arg(long, default_value_t = 10.0)]
    shutdown_grace_s: f64,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Where models run: cpu, or cuda:N (a build with --features cuda), or cuda-emulator.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Language models' weights: on a GPU f32, or bf16 with f32 accumulation; on the CPU the
    /// linear layers in f32, bf16 or int8 (LLM.int8). Feature models keep f32.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::device::WeightStorage,
    /// Most sessions a GPU's device-resident state pool holds (fewer if its free memory
    /// holds fewer; ModelInfo reports the number).
    #[arg(long, default_value_t = 4096)]
    gpu_sessions: usize,
    /// Session states made at start, before listening, for each CPU language model (per
    /// process): the first N sessions take them. A fresh state's memory otherwise costs a page
    /// fault per 4 KiB when a session first writes it, which a burst of new sessions pays all
    /// at once (on a virtual machine, seconds for a thousand 130M-Mamba sessions).
    #[arg(long, default_value_t = 0)]
    reserve_sessions: usize,
    /// Keep every session's state in an embedded, crash-safe database in DIR (one file per
    /// process): snapshots of changed sessions on a period, on drain and at shutdown. At
    /// start, every session the store holds is restored; a resuming client is told the
    /// position and the chunks it resumed from.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Seconds between snapshots of a changed session (with --store).
    #[arg(long, alias = "snapshot-every", default_value_t = 1.0)]
    snapshot_every_s: f64,
    /// MiB of language-model state kept by prompt prefix (0: off): a generation whose prompt
    /// starts with a cached prefix (exact tokens) starts from its state and runs only the
    /// rest; least recently used entries go first.
    #[arg(long, default_value_t = 0)]
    prefix_cache_mb: usize,
    /// Seconds between rebalancing rounds (0: off): a worker whose sessions' state exceeds
    /// another's by more than a session's moves sessions there, live, with no request lost
    /// or reordered (data placement only). Drains move sessions whatever this says.
    #[arg(long, default_value_t = 0.0)]
    rebalance_every_s: f64,
    /// Serialise records exchanged between workers of this process as a cluster would
    /// (exercises the wire format on one machine).
    #[arg(long, hide = true)]
    process_binary: bool,
}

fn parse_model_arg(arg: &str) -> Result<(String, PathBuf)> {
    let (name, dir) = match arg.split_once('=') {
        Some((name, dir)) if !name.is_empty() => (name.to_string(), PathBuf::from(dir)),
        _ => {
            let dir = PathBuf::from(arg);
            let name = dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .with_context(|| {
                    format!("--model {arg}: cannot name the model after its directory")
                })?;
            (name, dir)
        }
    };
    Ok((name, dir))
}

pub fn serve(args: ServeArgs) -> Result<()> {
    // Read first: a bad token file stops the server before it loads anything.
    let authenticate = Authenticate::new(args.auth.as_deref().map(Tokens::load).transpose()?);
    let tls = Tls::load(&args.tls)?;
    let (hosts, process) = match (&args.hosts, args.process) {
        (Some(file), Some(process)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --hosts {}", file.display()))?;
            let hosts: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            if process >= hosts.len() {
                bail!(
                    "--process {process} is out of range: {} lists {} processes (0..={})",
                    file.display(),
                    hosts.len(),
                    hosts.len().saturating_sub(1)
                );
            }
            (hosts, process)
        }
        _ => (Vec::new(), 0),
    };
    let threads = args.workers.max(1);
    let placement = placement(&args, threads, hosts.len().max(1), process)?;
    let mut models = Vec::new();
    if args.models.is_empty() {
        // No --model: the embedded default (the keyword spotter of `tideway demo`).
        let dir = crate::default_model::materialize()?;
        models.push(placement.load(crate::default_model::NAME.to_string(), &dir)?);
    }
    for arg in &args.models {
        let (name, dir) = parse_model_arg(arg)?;
        if models.iter().any(|m: &ServedModel| m.name == name) {
            bail!("two models are named {name:?}: name them with NAME=DIR");
        }
        models.push(placement.load(name, &dir)?);
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.tick_ms) || !positive(args.idle_timeout_s) || !positive(args.snapshot_every_s)
    {
        bail!("--tick-ms, --idle-timeout-s and --snapshot-every-s must be positive");
    }
    if !(args.rebalance_every_s.is_finite() && args.rebalance_every_s >= 0.0) {
        bail!(
            "--rebalance-every-s {} must be 0 (off) or a positive number of seconds",
            args.rebalance_every_s
        );
    }
    let store = args
        .store
        .as_deref()
        .map(|dir| SessionStore::open(dir, process))
        .transpose()?;
    let snapshots = store.as_ref().map(|store| {
        SnapshotSink::new(
            Duration::from_secs_f64(args.snapshot_every_s),
            store.start_writer(),
            store.stats.clone(),
            threads,
        )
    });
    let config = RuntimeConfig {
        threads,
        process,
        hosts,
        process_binary: args.process_binary,
        tick: Duration::from_secs_f64(args.tick_ms / 1e3),
        epoch_tokens: args.epoch_tokens,
        idle_limit: Duration::from_secs_f64(args.idle_timeout_s),
        queue_capacity: args.queue_capacity.max(1),
        plan: placement.plan,
        limits: args.limits.clone(),
        snapshots,
        prefix_cache: (args.prefix_cache_mb > 0)
            .then(|| Arc::new(PrefixCache::new(args.prefix_cache_mb << 20))),
        rebalance_every: (args.rebalance_every_s > 0.0)
            .then(|| Duration::from_secs_f64(args.rebalance_every_s)),
    };

    // A worker that panics would leave its peers hung (timely cannot lose a worker, and a
    // lost peer makes the others panic): answer what is in flight with UNAVAILABLE, give the
    // answers a moment to leave, and exit so that the cluster restarts as a whole.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        engine::fail_pending(
            "this node lost a peer of its cluster (or a worker failed) and is restarting; retry",
        );
        std::thread::sleep(Duration::from_millis(300));
        std::process::exit(101);
    }));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&args.listen))
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local: SocketAddr = listener.local_addr()?;
    let metrics_listener = match &args.metrics {
        Some(addr) => Some(
            runtime
                .block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("cannot listen on --metrics {addr}"))?,
        ),
        None => None,
    };
    let engine = Engine::start(models, config)
        .map_err(|e| anyhow::anyhow!("cannot start the workers: {e}"))?;
    if let Some(listener) = metrics_listener {
        status_line!(
            "tideway metrics on http://{}/metrics",
            listener.local_addr()?
        );
        runtime.spawn(metrics::serve_metrics(engine.clone(), listener));
    }
    if let Some(store) = &store {
        let restored = runtime.block_on(recovery::restore(&engine, store))?;
        status_line!(
            "tideway: restored {} sessions from {} in {:.1} ms ({} bytes; {} expired while down; {} set aside)",
            restored.sessions,
            store.path().display(),
            restored.millis,
            restored.bytes,
            restored.expired,
            restored.refused.len()
        );
        for (key, why) in &restored.refused {
            status_line!(
                "tideway: session {key:016x} not restored (kept aside in the store): {why}"
            );
        }
    }
    status_line!("tideway listening on {local}");
    let result = runtime.block_on(serve_grpc(
        engine.clone(),
        listener,
        &args.limits,
        authenticate,
        tls,
        Duration::from_secs_f64(args.shutdown_grace_s.max(0.0)),
    ));
    engine.shutdown();
    result
}

/// The one plan of where every model's stages run, from the command line: the pipeline over
/// the workers of all `processes`, and the stages this `process` runs.
fn placement(
    args: &ServeArgs,
    threads: usize,
    processes: usize,
    process: usize,
) -> Result<Placement> {
    let plan = Plan::new(threads * processes, args.pipeline).map_err(anyhow::Error::msg)?;
    let first = plan.stage_of(process * threads);
    let last = plan.stage_of(process * threads + threads - 1);
    args.limits.check().map_err(anyhow::Error::msg)?;
    Ok(Placement {
        parallel: args.parallel.clone(),
        device: args.device,
        dtype: args.dtype,
        gpu_sessions: args.gpu_sessions,
        reserve_sessions: args.reserve_sessions,
        plan,
        local_stages: first..last + 1,
        audio: args.limits.audio(),
        max_held_text: args.limits.max_held_text_bytes,
    })
}

/// Starts a server inside this process on a free loopback port (for `tideway demo`): the
/// same engine and gRPC services as `tideway serve`, one process, `workers` timely workers.
/// Returns the address; the server runs until the process exits.
pub fn start_in_process(models: Vec<(String, PathBuf)>, workers: usize) -> Result<SocketAddr> {
    let placement = Placement::cpu(workers);
    let served = models
        .into_iter()
        .map(|(name, dir)| placement.load(name, &dir))
        .collect::<Result<Vec<_>>>()?;
    let config = RuntimeConfig {
        threads: workers.max(1),
        process: 0,
        hosts: Vec::new(),
        process_binary: false,
        tick: Duration::from_millis(1),
        epoch_tokens: 0,
        idle_limit: Duration::from_secs(300),
        queue_capacity: 4096,
        plan: placement.plan,
        limits: Limits::default(),
        snapshots: None,
        prefix_cache: None,
        rebalance_every: None,
    };
    let engine = Engine::start(served, config)
        .map_err(|e| anyhow::anyhow!("cannot start the workers: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("cannot start the async runtime: {e}")));
                return;
            }
        };
        let listener = match runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("cannot listen on 127.0.0.1: {e}")));
                return;
            }
        };
        let _ = tx.send(listener.local_addr().map_err(anyhow::Error::from));
        let _ = runtime.block_on(serve_grpc(
            engine,
            listener,
            &Limits::default(),
            Authenticate::default(),
            None,
            Duration::ZERO,
        ));
    });
    rx.recv()
        .map_err(|_| anyhow::anyhow!("the in-process server stopped before it listened"))?
}

/// Waits for SIGINT or SIGTERM, then drains: new work is refused and health says
/// NOT_SERVING while open streams have `grace` to finish; the rest end with UNAVAILABLE.
/// Resolving lets the gRPC server close its connections; ones that linger do not hold the
/// process more than a few seconds.
async fn graceful_shutdown(
    engine: Arc<Engine>,
    health: tonic_health::server::HealthReporter,
    grace: Duration,
) {
    let signal = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    };
    status_line!(
        "tideway: {signal}: draining for up to {:.1} s ({} open streams)",
        grace.as_secs_f64(),
        engine.open_streams()
    );
    engine.stop_admitting();
    for service in native::SERVING_SERVICES {
        health
            .set_service_status(*service, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let deadline = tokio::time::Instant::now() + grace;
    while engine.open_streams() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = engine.open_streams();
    if open > 0 {
        status_line!("tideway: closing {open} open streams with UNAVAILABLE");
    }
    engine.close_streams();
    if engine.config.snapshots.is_some() {
        // Streams closed by the shutdown keep their sessions (a store restores them); let
        // their last chunks finish, then write every changed session.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let flushing = engine.clone();
        match tokio::task::spawn_blocking(move || flushing.flush_snapshots(Duration::from_secs(10)))
            .await
        {
            Ok(Ok(())) => status_line!("tideway: snapshots written"),
            Ok(Err(e)) => status_line!("tideway: snapshots not all written: {e}"),
            Err(e) => status_line!("tideway: snapshots not all written: {e}"),
        }
    }
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        status_line!("tideway: connections still open 5 s after the drain; exiting");
        std::process::exit(0);
    });
    status_line!("tideway: shutting down");
}

async fn serve_grpc(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    limits: &Limits,
    authenticate: Authenticate,
    tls: Option<Arc<Tls>>,
    grace: Duration,
) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // The empty service name stands for the server as a whole.
    for service in native::SERVING_SERVICES {
        health_reporter
            .set_service_status(*service, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tideway_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;

    macro_rules! limits {
        ($server:expr) => {
            $server
                .max_decoding_message_size(limits.max_request_bytes)
                .max_encoding_message_size(limits.max_message_bytes)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Deflate)
        };
    }
    // Every service that reads or makes sessions, jobs or server state needs an identity;
    // health and reflection answer anyone.
    let inference = InterceptedService::new(
        limits!(GrpcInferenceServiceServer::new(
            inference::InferenceService::new(engine.clone())
        )),
        authenticate.clone(),
    );
    let streams = InterceptedService::new(
        limits!(StreamsServer::new(native::StreamsService {
            engine: engine.clone(),
        })),
        authenticate.clone(),
    );
    let generation = InterceptedService::new(
        limits!(GenerationServer::new(generation::GenerationService {
            engine: engine.clone(),
        })),
        authenticate.clone(),
    );
    let models = InterceptedService::new(
        ModelsServer::new(native::ModelsService {
            engine: engine.clone(),
        }),
        authenticate.clone(),
    );
    let jobs = InterceptedService::new(
        limits!(JobsServer::new(jobs::JobsService::new(engine.clone()))),
        authenticate.clone(),
    );
    let admin = InterceptedService::new(
        AdminServer::new(native::AdminService {
            engine: engine.clone(),
            health: Some(health_reporter.clone()),
        }),
        authenticate.clone(),
    );
    let shutdown = graceful_shutdown(engine.clone(), health_reporter.clone(), grace);
    let router = tonic::transport::Server::builder()
        .layer(ErrorMetricsLayer::new(engine.board.clone()))
        .layer(refusals::RefusalLayer(refusals::RefusalBudget::new(
            limits.refusals_per_s,
            limits.refusal_burst,
        )))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inference)
        .add_service(streams)
        .add_service(generation)
        .add_service(models)
        .add_service(jobs)
        .add_service(admin);
    match tls {
        Some(tls) => {
            tls.reload_on_hangup()?;
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
        None => {
            // No Nagle delay: a streamed token is a small write that must leave at once (with
            // it, the first response of a Generate call waited ~40 ms for a delayed ACK).
            let incoming = TcpListenerStream::new(listener).map(|stream| {
                let stream = stream?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
    .context("gRPC server failed")
}
