//! `tideway`: the Tideway node's command line.
//!
//! - `tideway run`: one sequence offline through a model, outputs to a safetensors file;
//! - `tideway bench`: decode and prefill throughput and peak memory of a model;
//! - `tideway devices`: the CPU and CUDA devices this node can use.

mod bench;
mod bench_serve;
mod devices;
mod run;
mod serve;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over gRPC (tideway.v1, the KServe v2 / Triton protocol, health, reflection).
    Serve(serve::ServeArgs),
    /// Run one sequence through a model and write its outputs to a safetensors file.
    Run(run::RunArgs),
    /// Measure decode and prefill throughput and peak memory of a model.
    Bench(bench::BenchArgs),
    /// List the compute this node can use (CPU threads and SIMD level, CUDA devices).
    Devices,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
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
        Command::Bench(args) => bench::bench(args, threads),
        Command::Devices => devices::devices(threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
