//! `tideway`: the Tideway node's command line.
//!
//! - `tideway run`: one sequence offline through a model, outputs to a safetensors file;
//! - `tideway generate`: text from a language model, printed as it is made;
//! - `tideway bench`: decode and prefill throughput and peak memory of a model;
//! - `tideway devices`: the CPU and CUDA devices this node can use;
//! - `tideway demo` / `tideway stream`: keyword spotting on a live audio stream over gRPC.

/// `eprintln!` in one write: the status lines that scripts and tests read. A supervisor's
/// processes share one stderr, and `eprintln!` writes a line in pieces (one write a formatted
/// part, stderr being unbuffered), so two processes' lines could interleave mid-line.
macro_rules! status_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($arg)*));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

mod bench;
mod bench_feed;
mod bench_frames;
mod bench_generate;
mod bench_hostile;
mod bench_migrate;
mod bench_prune;
mod bench_serve;
mod bench_store;
mod default_model;
mod demo;
mod detect;
mod device;
mod devices;
mod feature_model;
mod generate;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod gpu_tensor_parallel;
mod language_model;
mod run;
mod serve;
#[cfg(unix)]
mod supervise;
mod tensor_parallel;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tideway",
    version,
    about = "Serve and run linear-time sequence models"
)]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Log lines on stderr: text (colours only on a terminal), or one JSON object per line
    /// for log collectors. TIDEWAY_LOG filters them (default `info`).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over gRPC (tideway.v1, the KServe v2 / Triton protocol, health, reflection).
    Serve(serve::ServeArgs),
    /// Run one sequence through a model and write its outputs to a safetensors file.
    Run(run::RunArgs),
    /// Generate text from a language model, printed as it is made (`--temperature 0`: greedy).
    Generate(generate::GenerateArgs),
    /// Measure decode and prefill throughput and peak memory of a model.
    Bench(bench::BenchArgs),
    /// List the compute this node can use (CPU threads and SIMD level, CUDA devices).
    Devices,
    /// Keyword spotting on a live audio stream: a server in this process with the embedded
    /// default model, the bundled clip streamed to it over gRPC, detections as they happen.
    Demo(demo::DemoArgs),
    /// Stream a WAV file to a running server (`tideway serve`) and print what it detects.
    Stream(demo::StreamArgs),
    /// Run this host's processes of a cluster (`tideway serve --hosts … --process I`) and
    /// restart them together when one exits (timely cannot lose a process and go on).
    #[cfg(unix)]
    Supervise(supervise::SuperviseArgs),
    /// One follower rank of a tensor-parallel group whose leader (`--tensor-parallel N
    /// --tp-transport processes`) is another process; started by the leader on one machine,
    /// or by hand on another host.
    TpRank(tensor_parallel::RankArgs),
    /// Check the GPU path: every language-model fixture on the GPU against the CPU path (f32
    /// and bf16 weights, both forms, packed sessions), NCCL, and decode / prefill throughput
    /// against the device's floors (a build with --features cuda).
    #[cfg(feature = "cuda")]
    GpuCheck(gpu::GpuCheckArgs),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
}

/// Keeps freed activation buffers in the heap instead of returning them to the kernel.
///
/// glibc serves allocations over its (adaptive) mmap threshold with fresh mappings and unmaps
/// them on free, so every layer's multi-megabyte activations were page-faulted and zeroed by
/// the kernel again on each forward (~5% of prefill time in perf, and DeltaNet's batch-32
/// decode 532 → 670 tok/s without it). Peak memory is unchanged in kind: the buffers were live
/// at the same time anyway; the heap now keeps them for the next forward.
///
/// And one heap (arena) for every thread, unless `GLIBC_TUNABLES` sets `arena_max`: with one
/// arena per thread, a server's gRPC threads grew their own heaps, page by fresh page, for the
/// first answers of new streams (their encode buffers), while the memory that loading and the
/// model stages had freed sat unused in other arenas. A first write of fresh memory costs this
/// project's VM 2.3 s per GB, and 1000 new streams' first answers came to ~0.2 GB in the first
/// seconds of a load (BENCHMARKS.md, "Serving at 100 and 1000 streams"); with one arena they
/// reuse freed memory and the server takes no page faults after its start. Decode and prefill
/// allocate per batch, not per token, so the arena's lock is not contended.
fn keep_freed_activations_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arena_max_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
        // SAFETY: mallopt only tunes glibc's allocator; it is called before any other thread
        // starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            if !arena_max_set {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
    }
}

fn main() -> ExitCode {
    keep_freed_activations_in_heap();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // A bad `TIDEWAY_SIMD` is an error here, not a panic in the first kernel.
    if let Err(e) = tideway_kernels::cpu::simd_cap() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Tensor-parallel ranks started as processes share this machine's cores.
    let processes = match &cli.command {
        Command::Run(a) => a.parallel.local_processes(),
        Command::Generate(a) => a.parallel.local_processes(),
        Command::Bench(a) => a.parallel.local_processes(),
        Command::Serve(a) => a.parallel.local_processes(),
        _ => 1,
    };
    let threads = cli.threads.unwrap_or_else(|| {
        (std::thread::available_parallelism().map_or(1, |n| n.get()) / processes).max(1)
    });
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        eprintln!("error: cannot start {threads} compute threads: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Run(args) => run::run(args),
        Command::Generate(args) => generate::generate(args),
        Command::Bench(args) => bench::bench(args, threads),
        Command::Devices => devices::devices(threads),
        Command::Demo(args) => demo::demo(args),
        Command::Stream(args) => demo::stream(args),
        #[cfg(unix)]
        Command::Supervise(args) => supervise::supervise(args),
        Command::TpRank(args) => tensor_parallel::run_rank(args),
        #[cfg(feature = "cuda")]
        Command::GpuCheck(args) => gpu::gpu_check(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
