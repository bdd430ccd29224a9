//! `tideway serve`: the node. A timely-dataflow runtime ([`engine`]) behind gRPC: the native
//! `tideway.v1` API ([`native`]), the KServe v2 / Triton inference protocol ([`inference`]),
//! `grpc.health.v1` and server reflection.

pub mod engine;
pub mod inference;
pub mod jobs;
pub mod messages;
pub mod metrics;
pub mod native;
pub mod sessions;
pub mod stats;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;

use tideway_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tideway_proto::tideway::v1::admin_server::AdminServer;
use tideway_proto::tideway::v1::jobs_server::JobsServer;
use tideway_proto::tideway::v1::models_server::ModelsServer;
use tideway_proto::tideway::v1::streams_server::StreamsServer;

use crate::device::Device;
use crate::feature_model::FeatureModel;
use crate::language_model::LanguageModel;
use crate::tensor_parallel::ParallelArgs;
use engine::{Engine, RuntimeConfig};
use sessions::{ServedKind, ServedModel};
use tideway_operators::models::{is_lmuformer, load_lmuformer};
use tideway_operators::tokenizers::text::TextTokenizer;

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
    /// Cluster: a file with one `host:port` per line, one line per process.
    #[arg(long, requires = "process")]
    hosts: Option<PathBuf>,
    /// Cluster: this process's line in --hosts (from 0).
    #[arg(long, requires = "hosts")]
    process: Option<usize>,
    /// Epoch length in milliseconds: requests arriving within one epoch run as one batch.
    #[arg(long, default_value_t = 1.0)]
    tick_ms: f64,
    /// Close an epoch early once this many tokens entered it on a worker (0: only the tick
    /// closes epochs). Bounds the batch, and so the latency of one epoch, under bursts.
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
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_message_bytes: usize,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Where models run: cpu, or cuda:N (a build with --features cuda), or cuda-emulator.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Weight storage on a GPU: f32, or bf16 with f32 accumulation.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::run::WeightStorage,
    /// Most sessions a GPU's device-resident state pool holds (fewer if its free memory
    /// holds fewer; ModelInfo reports the number).
    #[arg(long, default_value_t = 4096)]
    gpu_sessions: usize,
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
    let mut models = Vec::new();
    if args.models.is_empty() {
        // No --model: the embedded default (the keyword spotter of `tideway demo`).
        let dir = crate::default_model::materialize()?;
        models.push(load_served(
            crate::default_model::NAME.to_string(),
            &dir,
            &Placement::of(&args)?,
        )?);
    }
    for arg in &args.models {
        let (name, dir) = parse_model_arg(arg)?;
        if models.iter().any(|m: &ServedModel| m.name == name) {
            bail!("two models are named {name:?}: name them with NAME=DIR");
        }
        models.push(load_served(name, &dir, &Placement::of(&args)?)?);
    }
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
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.tick_ms) || !positive(args.idle_timeout_s) {
        bail!("--tick-ms and --idle-timeout-s must be positive");
    }
    let config = RuntimeConfig {
        threads: args.workers.max(1),
        process,
        hosts,
        process_binary: args.process_binary,
        tick: Duration::from_secs_f64(args.tick_ms / 1e3),
        epoch_tokens: args.epoch_tokens,
        idle_limit: Duration::from_secs_f64(args.idle_timeout_s),
        queue_capacity: args.queue_capacity.max(1),
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
        eprintln!(
            "tideway metrics on http://{}/metrics",
            listener.local_addr()?
        );
        runtime.spawn(metrics::serve_metrics(engine.clone(), listener));
    }
    eprintln!("tideway listening on {local}");
    let result = runtime.block_on(serve_grpc(engine.clone(), listener, args.max_message_bytes));
    engine.shutdown();
    result
}

/// Where a language model runs: split over a tensor-parallel group, or on a device.
pub struct Placement {
    parallel: ParallelArgs,
    device: Device,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dtype: crate::run::WeightStorage,
    gpu_sessions: usize,
}

impl Placement {
    fn of(args: &ServeArgs) -> Result<Self> {
        if args.device == Device::Cpu && args.dtype != crate::run::WeightStorage::F32 {
            bail!("--dtype bf16 is for --device cuda:N; the CPU path keeps f32 weights");
        }
        Ok(Placement {
            parallel: args.parallel.clone(),
            device: args.device,
            dtype: args.dtype,
            gpu_sessions: args.gpu_sessions,
        })
    }

    fn cpu() -> Self {
        Placement {
            parallel: ParallelArgs::default(),
            device: Device::Cpu,
            dtype: crate::run::WeightStorage::F32,
            gpu_sessions: 0,
        }
    }

    fn load(&self, dir: &std::path::Path) -> Result<LanguageModel> {
        match self.device {
            Device::Cpu => LanguageModel::load(dir, &self.parallel),
            #[cfg(feature = "cuda")]
            device => {
                let dtype = match self.dtype {
                    crate::run::WeightStorage::F32 => tideway_kernels::gpu::WeightDtype::F32,
                    crate::run::WeightStorage::Bf16 => tideway_kernels::gpu::WeightDtype::Bf16,
                };
                LanguageModel::load_gpu(
                    dir,
                    device,
                    dtype,
                    self.gpu_sessions.max(1),
                    &self.parallel,
                    crate::tensor_parallel::Wiring::Config,
                )
            }
            #[cfg(not(feature = "cuda"))]
            device => bail!(
                "--device {device}: this tideway was built without CUDA support; build it with `cargo build --release --features cuda`"
            ),
        }
    }
}

/// Loads one model to serve: a feature model (LMUFormer) or a language model (split over a
/// tensor-parallel group with `--tensor-parallel`, or on a GPU with `--device`) with the
/// `tokenizer.json` beside it, if any.
fn load_served(name: String, dir: &std::path::Path, placement: &Placement) -> Result<ServedModel> {
    let context = || format!("cannot load model {name:?} from {}", dir.display());
    let kind = if is_lmuformer(dir).with_context(context)? {
        // Feature models run whole (no tensor parallelism), on the CPU or the --device GPU.
        let model = load_lmuformer(dir).with_context(context)?;
        ServedKind::Features(Box::new(
            FeatureModel::place(model, placement.device, placement.gpu_sessions.max(1))
                .with_context(context)?,
        ))
    } else {
        ServedKind::Language {
            model: Box::new(placement.load(dir).with_context(context)?),
            tokenizer: TextTokenizer::find(dir)
                .with_context(context)?
                .map(Box::new),
        }
    };
    let served = ServedModel { name, kind };
    match &served.kind {
        ServedKind::Language { model, .. } => tracing::info!(
            model = %served.name,
            dir = %dir.display(),
            family = served.family(),
            tensor_parallel = model.ranks(),
            device = %model.device(),
            session_capacity = model.session_capacity().map_or("host memory".to_string(), |n| n.to_string()),
            "loaded"
        ),
        ServedKind::Features(model) => tracing::info!(
            model = %served.name,
            dir = %dir.display(),
            family = served.family(),
            device = %model.device(),
            session_capacity = model.session_capacity().map_or("host memory".to_string(), |n| n.to_string()),
            "loaded"
        ),
    }
    Ok(served)
}

/// Starts a server inside this process on a free loopback port (for `tideway demo`): the
/// same engine and gRPC services as `tideway serve`, one process, `workers` timely workers.
/// Returns the address; the server runs until the process exits.
pub fn start_in_process(models: Vec<(String, PathBuf)>, workers: usize) -> Result<SocketAddr> {
    let served = models
        .into_iter()
        .map(|(name, dir)| load_served(name, &dir, &Placement::cpu()))
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
        let _ = runtime.block_on(serve_grpc(engine, listener, 256 << 20));
    });
    rx.recv()
        .map_err(|_| anyhow::anyhow!("the in-process server stopped before it listened"))?
}

async fn serve_grpc(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    max_message: usize,
) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GrpcInferenceServiceServer<inference::InferenceService>>()
        .await;
    health_reporter
        .set_serving::<StreamsServer<native::StreamsService>>()
        .await;
    // The empty service name stands for the server as a whole.
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tideway_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;

    macro_rules! limits {
        ($server:expr) => {
            $server
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Deflate)
        };
    }
    let inference = limits!(GrpcInferenceServiceServer::new(
        inference::InferenceService::new(engine.clone())
    ));
    let streams = limits!(StreamsServer::new(native::StreamsService {
        engine: engine.clone(),
    }));
    let models = ModelsServer::new(native::ModelsService {
        engine: engine.clone(),
    });
    let jobs = limits!(JobsServer::new(jobs::JobsService::new(engine.clone())));
    let admin = AdminServer::new(native::AdminService {
        engine: engine.clone(),
    });
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("tideway: shutting down");
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(inference)
        .add_service(streams)
        .add_service(models)
        .add_service(jobs)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server failed")
}
