//! `tideway bench --model DIR`: decode tokens/s at several batch sizes (each session at its
//! own position), prefill tokens/s, and peak memory. `--json` prints one JSON object.
//!
//! With `--tensor-parallel N` the model runs split over N ranks, and each measurement also
//! reports how long rank 0 waited on all-reduces; `--wirings standard,ladder` measures the
//! same checkpoint with the standard and the ladder residual wiring, and the summary says
//! how much of the standard wiring's all-reduce wait the ladder hides.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tideway_kernels::argmax::argmax;
use tideway_operators::models::is_lmuformer;

use crate::language_model::{LanguageModel, LmState};
use crate::tensor_parallel::{CommStats, ParallelArgs, Transport, Wiring};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: Option<BenchTarget>,
    /// Checkpoint directory (config.json + *.safetensors).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Decode batch sizes (concurrent sessions), comma-separated [default: 1,8,32 for a
    /// language model, 1,64,1024 streams for a feature model].
    #[arg(long, value_delimiter = ',')]
    batches: Option<Vec<usize>>,
    /// Sequence lengths of the prefill measurements, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    prefill_tokens: Vec<usize>,
    /// Prefill chunk length.
    #[arg(long, default_value_t = tideway_operators::models::mamba::DEFAULT_PREFILL_CHUNK)]
    chunk: usize,
    /// Minimum seconds spent on each measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Where the language model runs: cpu, cuda:N (a build with --features cuda), or
    /// cuda-emulator (correctness only: its timings mean nothing).
    #[arg(long, default_value = "cpu")]
    device: crate::device::Device,
    /// Language models' weights: on a GPU f32, or bf16 with f32 accumulation; on the CPU the
    /// linear layers in f32, bf16 or int8 (LLM.int8).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::device::WeightStorage,
    /// Residual wirings to measure, comma-separated: config (as config.json says), standard,
    /// ladder (every layer). The same weights, so the same work, wired differently.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "config")]
    wirings: Vec<Wiring>,
}

#[derive(Serialize)]
struct DecodeResult {
    wiring: &'static str,
    batch: usize,
    steps: usize,
    tokens_per_s: f64,
    step_ms: f64,
    /// Rank 0's time blocked on all-reduces per step (0 without tensor parallelism).
    allreduce_wait_ms: f64,
    allreduces_per_step: f64,
}

#[derive(Serialize)]
struct PrefillResult {
    wiring: &'static str,
    tokens: usize,
    runs: usize,
    tokens_per_s: f64,
    seconds: f64,
    /// Rank 0's time blocked on all-reduces per run.
    allreduce_wait_s: f64,
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    family: &'static str,
    threads: usize,
    tensor_parallel: usize,
    transport: Option<Transport>,
    load_s: f64,
    weight_bytes: usize,
    state_bytes_per_session: usize,
    decode: Vec<DecodeResult>,
    prefill: Vec<PrefillResult>,
    peak_rss_bytes: Option<u64>,
}

/// The model as `--device` and `--tensor-parallel` place it.
fn load(
    args: &BenchArgs,
    dir: &std::path::Path,
    wiring: Wiring,
    batches: &[usize],
) -> Result<LanguageModel> {
    // A GPU's pool: room for the largest decode batch and the prefill sessions.
    let sessions = batches.iter().copied().max().unwrap_or(1) + 2;
    LanguageModel::load_placed(
        dir,
        args.device,
        args.dtype,
        sessions,
        &args.parallel,
        wiring,
    )
}

/// Deterministic pseudo-random ids (xorshift64), so runs are comparable.
pub(crate) fn token_ids(count: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

#[derive(clap::Subcommand)]
pub enum BenchTarget {
    /// Load-test a running `tideway serve` through its gRPC API.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// Generation throughput of a running `tideway serve` at several concurrencies.
    Generate(crate::bench_generate::GenerateBenchArgs),
    /// What session snapshots cost (`serve --store`): snapshot and restore of N sessions.
    Store(crate::bench_store::StoreBenchArgs),
    /// What live migration costs: a two-process cluster drains each process in turn.
    Migrate(crate::bench_migrate::MigrateBenchArgs),
    /// What pruning a prompt's tokens between layers costs its predictions and saves in time.
    Prune(crate::bench_prune::PruneBenchArgs),
}

pub fn bench(args: BenchArgs, threads: usize) -> Result<()> {
    match args.target {
        Some(BenchTarget::Serve(serve_args)) => return crate::bench_serve::bench_serve(serve_args),
        Some(BenchTarget::Store(store_args)) => return crate::bench_store::bench_store(store_args),
        Some(BenchTarget::Migrate(migrate_args)) => {
            return crate::bench_migrate::bench_migrate(migrate_args);
        }
        Some(BenchTarget::Generate(generate_args)) => {
            return crate::bench_generate::bench_generate(generate_args);
        }
        Some(BenchTarget::Prune(prune_args)) => {
            return crate::bench_prune::bench_prune(prune_args, threads);
        }
        None => {}
    }
    let Some(model_dir) = args.model.clone() else {
        bail!("--model DIR is required (or `tideway bench serve …` to load-test a server)");
    };
    if let Some(b) = &args.batches
        && (b.is_empty() || b.contains(&0))
    {
        bail!("--batches takes positive batch sizes, e.g. 1,8,32");
    }
    let feature_model = is_lmuformer(&model_dir)
        .with_context(|| format!("cannot load model from {}", model_dir.display()))?;
    if feature_model {
        let batches = args.batches.clone().unwrap_or_else(|| vec![1, 64, 1024]);
        let min_time = Duration::from_secs_f64(args.seconds);
        return crate::bench_frames::bench_frames(
            &model_dir, &batches, min_time, threads, args.json,
        );
    }
    let batches = args.batches.clone().unwrap_or_else(|| vec![1, 8, 32]);
    if args.wirings.is_empty() {
        bail!("--wirings takes config, standard or ladder");
    }
    if args.prefill_tokens.is_empty() || args.prefill_tokens.contains(&0) || args.chunk == 0 {
        bail!("--prefill-tokens and --chunk must be at least 1");
    }
    let min_time = Duration::from_secs_f64(args.seconds);
    let say = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    let tp = args.parallel.tensor_parallel;
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    let mut loaded = None;
    for &wiring in &args.wirings {
        let started = Instant::now();
        let lm = load(&args, &model_dir, wiring, &batches)?;
        let load_s = started.elapsed().as_secs_f64();
        say(format!(
            "model {} ({}), {threads} threads{}, {} wiring, weights {:.1} MiB{}, state {:.1} KiB/session, loaded in {load_s:.2}s",
            model_dir.display(),
            lm.family(),
            match tp {
                1 => String::new(),
                n => format!(
                    " per rank, {n} tensor-parallel ranks ({:?})",
                    args.parallel.tp_transport
                ),
            },
            wiring.name(),
            lm.weight_bytes() as f64 / (1 << 20) as f64,
            if tp > 1 { " per rank" } else { "" },
            lm.state_bytes() as f64 / 1024.0
        ));
        for &batch in &batches {
            let result = bench_decode(&lm, wiring, batch, min_time)?;
            say(format!(
                "decode batch {batch:>3}: {:>9.1} tokens/s ({:.2} ms/step, {} steps){}",
                result.tokens_per_s,
                result.step_ms,
                result.steps,
                wait_note(tp, result.allreduce_wait_ms, result.step_ms)
            ));
            decode.push(result);
        }
        for &tokens in &args.prefill_tokens {
            let result = bench_prefill(&lm, wiring, tokens, args.chunk, min_time)?;
            say(format!(
                "prefill {} tokens: {:.1} tokens/s ({:.3} s per run, {} runs){}",
                result.tokens,
                result.tokens_per_s,
                result.seconds,
                result.runs,
                wait_note(tp, 1e3 * result.allreduce_wait_s, 1e3 * result.seconds)
            ));
            prefill.push(result);
        }
        loaded = Some((lm.family(), load_s, lm.weight_bytes(), lm.state_bytes()));
    }
    let (family, load_s, weight_bytes, state_bytes) = loaded.expect("at least one wiring");
    let report = BenchReport {
        model: model_dir.display().to_string(),
        family,
        threads,
        tensor_parallel: tp,
        transport: (tp > 1).then_some(args.parallel.tp_transport),
        load_s,
        weight_bytes,
        state_bytes_per_session: state_bytes,
        decode,
        prefill,
        peak_rss_bytes: peak_rss_bytes(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn wait_note(tp: usize, wait_ms: f64, total_ms: f64) -> String {
    match tp {
        1 => String::new(),
        _ => format!(
            ", all-reduce wait {wait_ms:.3} ms ({:.0}%)",
            100.0 * wait_ms / total_ms.max(1e-12)
        ),
    }
}

/// Communication between two snapshots.
fn comm_between(before: CommStats, after: CommStats) -> CommStats {
    CommStats {
        forwards: after.forwards - before.forwards,
        waited: after.waited - before.waited,
        reductions: after.reductions - before.reductions,
        reduced_floats: after.reduced_floats - before.reduced_floats,
    }
}

/// `batch` sessions at different positions (prompts of 8..15 tokens), then timed steps.
fn bench_decode(
    lm: &LanguageModel,
    wiring: Wiring,
    batch: usize,
    min_time: Duration,
) -> Result<DecodeResult> {
    let vocab = lm.vocab_size();
    let mut states: Vec<LmState> = (0..batch)
        .map(|_| lm.new_state())
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let lens: Vec<usize> = (0..batch).map(|i| 8 + i % 8).collect();
    let prompt = token_ids(lens.iter().sum(), vocab, 1);
    {
        let mut refs: Vec<&mut LmState> = states.iter_mut().collect();
        lm.forward_packed(&prompt, &lens, &mut refs)?;
    }
    let mut refs: Vec<&mut LmState> = states.iter_mut().collect();
    let mut next = token_ids(batch, vocab, 2);
    for _ in 0..2 {
        lm.step(&next, &mut refs)?;
    }
    let before = lm.comm_stats();
    let start = Instant::now();
    let mut steps = 0;
    while steps < 5 || start.elapsed() < min_time {
        let logits = lm.step(&next, &mut refs)?;
        // Greedy next tokens keep the input data-dependent, as real decoding is.
        for (i, t) in next.iter_mut().enumerate() {
            *t = argmax(logits.row(i)).min(vocab - 1) as u32;
        }
        steps += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let comm = comm_between(before, lm.comm_stats());
    Ok(DecodeResult {
        wiring: wiring.name(),
        batch,
        steps,
        tokens_per_s: (batch * steps) as f64 / secs,
        step_ms: 1e3 * secs / steps as f64,
        allreduce_wait_ms: 1e3 * comm.waited.as_secs_f64() / steps as f64,
        allreduces_per_step: comm.reductions as f64 / steps as f64,
    })
}

fn bench_prefill(
    lm: &LanguageModel,
    wiring: Wiring,
    tokens: usize,
    chunk: usize,
    min_time: Duration,
) -> Result<PrefillResult> {
    let ids = token_ids(tokens, lm.vocab_size(), 3);
    lm.prefill_chunked_with_progress(
        &ids[..tokens.min(32)],
        &mut lm.new_state().map_err(anyhow::Error::msg)?,
        chunk,
        |_, _| {},
    )?;
    let mut times = Vec::new();
    let mut waits = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < min_time && times.len() < 20) {
        let before = lm.comm_stats();
        let t0 = Instant::now();
        let mut state = lm.new_state().map_err(anyhow::Error::msg)?;
        lm.prefill_chunked_with_progress(&ids, &mut state, chunk, |_, _| {})?;
        times.push(t0.elapsed().as_secs_f64());
        waits.push(comm_between(before, lm.comm_stats()).waited.as_secs_f64());
    }
    // The median run, and its wait.
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|&a, &b| times[a].total_cmp(&times[b]));
    let median = order[order.len() / 2];
    Ok(PrefillResult {
        wiring: wiring.name(),
        tokens,
        runs: times.len(),
        tokens_per_s: tokens as f64 / times[median],
        seconds: times[median],
        allreduce_wait_s: waits[median],
    })
}

/// The process's peak resident set (VmHWM), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn print_table(r: &BenchReport) {
    let tp = r.tensor_parallel > 1;
    let wirings: Vec<&str> = {
        let mut w: Vec<&str> = r.decode.iter().map(|d| d.wiring).collect();
        w.extend(r.prefill.iter().map(|p| p.wiring));
        w.dedup();
        w
    };
    let wiring_column = wirings.len() > 1 || tp;
    let head = |extra: &str| {
        if wiring_column {
            println!("| measurement | wiring | tokens/s | detail |{extra}");
            println!("|---|---|---:|---|{}", if tp { "---:|" } else { "" });
        } else {
            println!("| measurement | tokens/s | detail |");
            println!("|---|---:|---|");
        }
    };
    head(if tp {
        " all-reduce wait (rank 0) |"
    } else {
        ""
    });
    let row = |what: String, wiring: &str, rate: f64, detail: String, wait: String| {
        if wiring_column {
            let wait = if tp {
                format!(" {wait} |")
            } else {
                String::new()
            };
            println!("| {what} | {wiring} | {rate:.1} | {detail} |{wait}");
        } else {
            println!("| {what} | {rate:.1} | {detail} |");
        }
    };
    for d in &r.decode {
        row(
            format!("decode, batch {}", d.batch),
            d.wiring,
            d.tokens_per_s,
            format!("{:.2} ms/step", d.step_ms),
            format!(
                "{:.3} ms/step ({:.0}%, {:.0} all-reduces)",
                d.allreduce_wait_ms,
                100.0 * d.allreduce_wait_ms / d.step_ms,
                d.allreduces_per_step
            ),
        );
    }
    for p in &r.prefill {
        row(
            format!("prefill, {} tokens", p.tokens),
            p.wiring,
            p.tokens_per_s,
            format!("{:.3} s/run", p.seconds),
            format!(
                "{:.3} s/run ({:.0}%)",
                p.allreduce_wait_s,
                100.0 * p.allreduce_wait_s / p.seconds
            ),
        );
    }
    match r.peak_rss_bytes {
        Some(b) => println!(
            "| peak memory (RSS{}) | {}| {:.1} MiB |",
            if tp { ", rank 0" } else { "" },
            if wiring_column { "| " } else { "" },
            b as f64 / (1 << 20) as f64
        ),
        None => println!("| peak memory (RSS) | | not available on this OS |"),
    }
    // The ladder's gain: the same measurement with both wirings.
    if tp {
        for d in r.decode.iter().filter(|d| d.wiring == "ladder") {
            if let Some(s) = r
                .decode
                .iter()
                .find(|s| s.wiring == "standard" && s.batch == d.batch)
            {
                println!(
                    "decode batch {}: ladder {:.2} ms/step vs standard {:.2} ({:+.1}%); all-reduce wait {:.3} → {:.3} ms/step: the ladder hides {:.0}% of it",
                    d.batch,
                    d.step_ms,
                    s.step_ms,
                    100.0 * (s.step_ms / d.step_ms - 1.0),
                    s.allreduce_wait_ms,
                    d.allreduce_wait_ms,
                    100.0 * (1.0 - d.allreduce_wait_ms / s.allreduce_wait_ms.max(1e-12))
                );
            }
        }
        for p in r.prefill.iter().filter(|p| p.wiring == "ladder") {
            if let Some(s) = r
                .prefill
                .iter()
                .find(|s| s.wiring == "standard" && s.tokens == p.tokens)
            {
                println!(
                    "prefill {} tokens: ladder {:.1} tokens/s vs standard {:.1} ({:+.1}%); all-reduce wait {:.3} → {:.3} s/run: the ladder hides {:.0}% of it",
                    p.tokens,
                    p.tokens_per_s,
                    s.tokens_per_s,
                    100.0 * (p.tokens_per_s / s.tokens_per_s - 1.0),
                    s.allreduce_wait_s,
                    p.allreduce_wait_s,
                    100.0 * (1.0 - p.allreduce_wait_s / s.allreduce_wait_s.max(1e-12))
                );
            }
        }
    }
}
