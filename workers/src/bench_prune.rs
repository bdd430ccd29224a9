//! `tideway bench prune --model DIR --text FILE`: what pruning a prompt's tokens between layers
//! (SPEC-MODELS §6.3) costs a language model's predictions and saves in prefill time, for each
//! policy (the adapted Zero-TPrune and its baselines) at each keep ratio, beside the unpruned
//! prefill of the same inputs, interleaved round by round.
//!
//! The inputs are consecutive windows of `--tokens` tokens of a held-out text. What is scored
//! is what a pruned prompt is for: the predictions at its last `recent` positions (always
//! kept), against the unpruned model's there (top-1 agreement) and against the text's next
//! tokens (perplexity of both).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tideway_kernels::argmax::argmax;
use tideway_operators::models::load_model;
use tideway_operators::prune::prefill::PrefillPrune;
use tideway_operators::tokenizers::text::TextTokenizer;

#[derive(Args)]
pub struct PruneBenchArgs {
    /// Language model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Held-out text (UTF-8), tokenized by the model's tokenizer.json.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per input.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Inputs: consecutive windows of the text.
    #[arg(long, default_value_t = 2)]
    inputs: usize,
    /// Keep ratios, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.6,0.4,0.2")]
    keep: Vec<f64>,
    /// Policies, comma-separated (zero_tprune, random, stride, decimamba, tor).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "zero_tprune,random,stride,decimamba,tor"
    )]
    policies: Vec<String>,
    /// The rest of the setting, as `--prune` takes it (keep and policy come from the flags
    /// above).
    #[arg(long, default_value = "layers=2,window=128,recent=64")]
    prune: String,
    /// Timed rounds (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    policy: String,
    keep: f64,
    /// Tokens that reached the head, as a fraction of the input.
    kept_fraction: f64,
    /// Of the scored positions, where the pruned model's top-1 equals the unpruned one's.
    top1_agreement: f64,
    perplexity: f64,
    prefill_ms: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    tokens: usize,
    inputs: usize,
    scored_positions: usize,
    setting: String,
    threads: usize,
    unpruned_perplexity: f64,
    unpruned_prefill_ms: f64,
    rows: Vec<Row>,
}

/// Negative log-likelihood of `target` under the logits `row` (natural log).
fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench_prune(args: PruneBenchArgs, threads: usize) -> Result<()> {
    let base: PrefillPrune = args.prune.parse().context("--prune")?;
    if args.rounds == 0 || args.inputs == 0 || base.recent == 0 {
        bail!("--rounds, --inputs and the setting's recent must be at least 1");
    }
    let mut settings = Vec::new();
    for name in &args.policies {
        for &keep in &args.keep {
            let spec = format!("{base},keep={keep},policy={name}");
            let setting: PrefillPrune = spec.parse().with_context(|| format!("policy {name}"))?;
            settings.push(setting);
        }
    }
    let model = load_model(&args.model)
        .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let tokenizer = TextTokenizer::find(&args.model)?
        .with_context(|| format!("no tokenizer.json in {}", args.model.display()))?;
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("cannot read {}", args.text.display()))?;
    let ids = tokenizer.encode(&text)?;
    let need = args.inputs * args.tokens + 1;
    if ids.len() < need {
        bail!(
            "{} holds {} tokens; {} inputs of {} need {need}",
            args.text.display(),
            ids.len(),
            args.inputs,
            args.tokens
        );
    }
    let inputs: Vec<&[u32]> = (0..args.inputs)
        .map(|k| &ids[k * args.tokens..(k + 1) * args.tokens + 1])
        .collect();
    let width = model.output_width();
    let scored = base.recent.min(args.tokens);

    // The unpruned model: its predictions at the scored positions, and its time.
    let mut full_top1 = Vec::new();
    let mut full_nll = 0.0;
    let mut full_ms = Vec::new();
    let mut timed = vec![Vec::new(); settings.len()];
    let mut rows: Vec<Option<Row>> = settings.iter().map(|_| None).collect();
    for round in 0..args.rounds {
        let started = Instant::now();
        for input in &inputs {
            let (prompt, targets) = (&input[..args.tokens], &input[1..]);
            let mut state = model.new_state();
            let logits = model.forward_packed(prompt, &[args.tokens], &mut [&mut state])?;
            if round == 0 {
                let first = args.tokens - scored;
                let rows = logits.data()[first * width..].chunks_exact(width);
                for (row, &target) in rows.zip(&targets[first..]) {
                    full_top1.push(argmax(row));
                    full_nll += nll(row, target);
                }
            }
        }
        full_ms.push(started.elapsed().as_secs_f64() * 1e3 / args.inputs as f64);
        for (k, setting) in settings.iter().enumerate() {
            let started = Instant::now();
            let mut agree = 0usize;
            let mut total_nll = 0.0;
            let mut kept_tokens = 0usize;
            for (n, input) in inputs.iter().enumerate() {
                let (prompt, targets) = (&input[..args.tokens], &input[1..]);
                let pruned = model
                    .prefill_pruned(prompt, setting)
                    .with_context(|| format!("pruning with {setting}"))?;
                if round > 0 {
                    continue;
                }
                kept_tokens += pruned.kept.len();
                let rows_from = pruned.kept.len() - scored;
                for (q, &p) in pruned.kept[rows_from..].iter().enumerate() {
                    let row = &pruned.logits.data()[(rows_from + q) * width..][..width];
                    agree += usize::from(argmax(row) == full_top1[n * scored + q]);
                    total_nll += nll(row, targets[p]);
                }
            }
            timed[k].push(started.elapsed().as_secs_f64() * 1e3 / args.inputs as f64);
            if round == 0 {
                let positions = (scored * args.inputs) as f64;
                rows[k] = Some(Row {
                    policy: setting.policy.name().to_string(),
                    keep: setting.keep,
                    kept_fraction: kept_tokens as f64 / (args.tokens * args.inputs) as f64,
                    top1_agreement: agree as f64 / positions,
                    perplexity: (total_nll / positions).exp(),
                    prefill_ms: 0.0,
                });
            }
            if !args.json {
                eprint!(
                    "\rround {}/{}: {}/{} settings",
                    round + 1,
                    args.rounds,
                    k + 1,
                    settings.len()
                );
            }
        }
    }
    if !args.json {
        eprintln!();
    }
    let rows: Vec<Row> = rows
        .into_iter()
        .zip(timed)
        .map(|(row, times)| Row {
            prefill_ms: median(times),
            ..row.expect("round 0 filled every row")
        })
        .collect();
    let report = Report {
        model: args.model.display().to_string(),
        tokens: args.tokens,
        inputs: args.inputs,
        scored_positions: scored * args.inputs,
        setting: args.prune.clone(),
        threads,
        unpruned_perplexity: (full_nll / (scored * args.inputs) as f64).exp(),
        unpruned_prefill_ms: median(full_ms),
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} inputs of {} tokens, {} threads; setting {}; scored: the last {} positions of each input",
        report.model, report.inputs, report.tokens, threads, report.setting, scored
    );
    println!(
        "unpruned: perplexity {:.3}, prefill {:.1} ms",
        report.unpruned_perplexity, report.unpruned_prefill_ms
    );
    println!("| policy | keep | tokens kept | top-1 agreement | perplexity | prefill ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &report.rows {
        println!(
            "| {} | {} | {:.1}% | {:.1}% | {:.3} | {:.1} |",
            row.policy,
            row.keep,
            100.0 * row.kept_fraction,
            100.0 * row.top1_agreement,
            row.perplexity,
            row.prefill_ms
        );
    }
    Ok(())
}
