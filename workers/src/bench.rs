//! `tideway bench --model DIR`: decode tokens/s at several batch sizes (each session at its
//! own position), prefill tokens/s, and peak memory. `--json` prints one JSON object.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tideway_operators::models::{Model, SessionState, is_lmuformer, load_model};

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
}

#[derive(Serialize)]
struct DecodeResult {
    batch: usize,
    steps: usize,
    tokens_per_s: f64,
    step_ms: f64,
}

#[derive(Serialize)]
struct PrefillResult {
    tokens: usize,
    runs: usize,
    tokens_per_s: f64,
    seconds: f64,
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    family: &'static str,
    threads: usize,
    load_s: f64,
    weight_bytes: usize,
    state_bytes_per_session: usize,
    decode: Vec<DecodeResult>,
    prefill: Vec<PrefillResult>,
    peak_rss_bytes: Option<u64>,
}

/// Deterministic pseudo-random ids (xorshift64), so runs are comparable.
fn token_ids(count: usize, vocab: usize, seed: u64) -> Vec<u32> {
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
}

pub fn bench(args: BenchArgs, threads: usize) -> Result<()> {
    if let Some(BenchTarget::Serve(serve_args)) = args.target {
        return crate::bench_serve::bench_serve(serve_args);
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
    if args.prefill_tokens.is_empty() || args.prefill_tokens.contains(&0) || args.chunk == 0 {
        bail!("--prefill-tokens and --chunk must be at least 1");
    }
    let started = Instant::now();
    let model = load_model(&model_dir)
        .with_context(|| format!("cannot load model from {}", model_dir.display()))?;
    let load_s = started.elapsed().as_secs_f64();
    let lm = &model;
    let min_time = Duration::from_secs_f64(args.seconds);
    let say = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    say(format!(
        "model {} ({}), {threads} threads, weights {:.1} MiB, state {:.1} KiB/session, loaded in {load_s:.2}s",
        model_dir.display(),
        model.family(),
        lm.weight_bytes() as f64 / (1 << 20) as f64,
        lm.state_bytes() as f64 / 1024.0
    ));

    let mut decode = Vec::new();
    for &batch in &batches {
        let result = bench_decode(lm, batch, min_time)?;
        say(format!(
            "decode batch {batch:>3}: {:>9.1} tokens/s ({:.2} ms/step, {} steps)",
            result.tokens_per_s, result.step_ms, result.steps
        ));
        decode.push(result);
    }
    let mut prefill = Vec::new();
    for &tokens in &args.prefill_tokens {
        let result = bench_prefill(lm, tokens, args.chunk, min_time)?;
        say(format!(
            "prefill {} tokens: {:.1} tokens/s ({:.3} s per run, {} runs)",
            result.tokens, result.tokens_per_s, result.seconds, result.runs
        ));
        prefill.push(result);
    }
    let report = BenchReport {
        model: model_dir.display().to_string(),
        family: model.family(),
        threads,
        load_s,
        weight_bytes: lm.weight_bytes(),
        state_bytes_per_session: lm.state_bytes(),
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

/// `batch` sessions at different positions (prompts of 8..15 tokens), then timed steps.
fn bench_decode(lm: &Model, batch: usize, min_time: Duration) -> Result<DecodeResult> {
    let vocab = lm.vocab_size();
    let mut states: Vec<SessionState> = (0..batch).map(|_| lm.new_state()).collect();
    let lens: Vec<usize> = (0..batch).map(|i| 8 + i % 8).collect();
    let prompt = token_ids(lens.iter().sum(), vocab, 1);
    {
        let mut refs: Vec<&mut SessionState> = states.iter_mut().collect();
        lm.forward_packed(&prompt, &lens, &mut refs)?;
    }
    let mut refs: Vec<&mut SessionState> = states.iter_mut().collect();
    let mut next = token_ids(batch, vocab, 2);
    for _ in 0..2 {
        lm.step(&next, &mut refs)?;
    }
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
    Ok(DecodeResult {
        batch,
        steps,
        tokens_per_s: (batch * steps) as f64 / secs,
        step_ms: 1e3 * secs / steps as f64,
    })
}

fn bench_prefill(
    lm: &Model,
    tokens: usize,
    chunk: usize,
    min_time: Duration,
) -> Result<PrefillResult> {
    let ids = token_ids(tokens, lm.vocab_size(), 3);
    lm.prefill_chunked(&ids[..tokens.min(32)], &mut lm.new_state(), chunk)?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < min_time && times.len() < 20) {
        let t0 = Instant::now();
        lm.prefill_chunked(&ids, &mut lm.new_state(), chunk)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(PrefillResult {
        tokens,
        runs: times.len(),
        tokens_per_s: tokens as f64 / median,
        seconds: median,
    })
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// The process's peak resident set (VmHWM), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn print_table(r: &BenchReport) {
    println!("| measurement | tokens/s | detail |");
    println!("|---|---:|---|");
    for d in &r.decode {
        println!(
            "| decode, batch {} | {:.1} | {:.2} ms/step |",
            d.batch, d.tokens_per_s, d.step_ms
        );
    }
    for p in &r.prefill {
        println!(
            "| prefill, {} tokens | {:.1} | {:.3} s/run |",
            p.tokens, p.tokens_per_s, p.seconds
        );
    }
    match r.peak_rss_bytes {
        Some(b) => println!(
            "| peak memory (RSS) | | {:.1} MiB |",
            b as f64 / (1 << 20) as f64
        ),
        None => println!("| peak memory (RSS) | | not available on this OS |"),
    }
}
