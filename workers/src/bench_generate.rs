//! `tideway bench generate`: generation throughput of a running server. For each count N,
//! N concurrent `Generation.Generate` calls (greedy, no end token, each with its own prompt
//! of `--prompt-tokens` ids) make `--max-tokens` tokens each; the table gives the tokens/s of
//! all of them together, each call's own tokens/s, and the time to its first token.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use tideway_proto::tideway::v1 as pb;

use crate::bench_serve::with_token;

#[derive(Args, Clone)]
pub struct GenerateBenchArgs {
    /// The server's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Model name on the server.
    #[arg(long)]
    model: String,
    /// Concurrent generation counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// New tokens per generation.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Prompt tokens per generation.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Rounds per count (the table gives the median round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Every round sends the first round's prompts again (a server's prefix-state cache then
    /// hits from the second round on); each round's time to first token is printed.
    #[arg(long)]
    repeat_prompts: bool,
    /// Bearer token (a server with `--auth`).
    #[arg(long)]
    token: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Clone)]
struct Round {
    concurrency: usize,
    tokens: u64,
    seconds: f64,
    tokens_per_s: f64,
    per_request_tokens_per_s: f64,
    first_token_p50_ms: f64,
}

pub fn bench_generate(args: GenerateBenchArgs) -> Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) || args.rounds == 0 {
        bail!("--concurrency takes positive counts and --rounds must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", args.addr))?;
        let mut models = with_token(
            channel.clone(),
            args.token.clone(),
            pb::models_client::ModelsClient::with_interceptor,
        );
        let vocab = models
            .describe(pb::DescribeModelRequest { name: args.model.clone() })
            .await
            .with_context(|| format!("model {:?} on {}", args.model, args.addr))?
            .into_inner()
            .vocab_size
            .max(1);
        let mut rows = Vec::new();
        for &n in &args.concurrency {
            let mut rounds = Vec::new();
            for round in 0..args.rounds {
                let r = run_round(&channel, &args, n, vocab, round).await?;
                if args.repeat_prompts {
                    eprintln!(
                        "{n:>3} concurrent, round {round} (same prompts): first token p50 {:.1} ms",
                        r.first_token_p50_ms
                    );
                }
                rounds.push(r);
            }
            rounds.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
            let median = rounds[rounds.len() / 2].clone();
            if !args.json {
                eprintln!(
                    "{n:>3} concurrent: {:>8.1} tokens/s together, {:>7.1} tokens/s each, first token p50 {:.1} ms",
                    median.tokens_per_s, median.per_request_tokens_per_s, median.first_token_p50_ms
                );
            }
            rows.push(median);
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            println!("| concurrent generations | tokens/s (all) | tokens/s (each) | first token p50 ms |");
            println!("|---:|---:|---:|---:|");
            for r in &rows {
                println!(
                    "| {} | {:.1} | {:.1} | {:.1} |",
                    r.concurrency, r.tokens_per_s, r.per_request_tokens_per_s, r.first_token_p50_ms
                );
            }
        }
        Ok(())
    })
}

async fn run_round(
    channel: &tonic::transport::Channel,
    args: &GenerateBenchArgs,
    n: usize,
    vocab: u64,
    round: usize,
) -> Result<Round> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut client = with_token(
            channel.clone(),
            args.token.clone(),
            pb::generation_client::GenerationClient::with_interceptor,
        );
        let seed = if args.repeat_prompts { 0 } else { round * 31 };
        let prompt: Vec<i64> = (0..args.prompt_tokens)
            .map(|j| ((i * 7919 + j * 104_729 + seed) as u64 % vocab) as i64)
            .collect();
        let request = pb::GenerateRequest {
            model: args.model.clone(),
            tokens: prompt,
            max_tokens: args.max_tokens,
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let mut stream = client.generate(request).await?.into_inner();
            let (mut tokens, mut first) = (0u64, None);
            while let Some(r) = stream.message().await? {
                if first.is_none() && !r.tokens.is_empty() {
                    first = Some(begun.elapsed().as_secs_f64());
                }
                tokens += r.tokens.len() as u64;
            }
            Ok::<_, tonic::Status>((tokens, first.unwrap_or(0.0), begun.elapsed().as_secs_f64()))
        }));
    }
    let (mut tokens, mut firsts, mut each) = (0u64, Vec::new(), Vec::new());
    for t in tasks {
        let (n_tokens, first, secs) = t.await?.context("a generation failed")?;
        tokens += n_tokens;
        firsts.push(first);
        each.push(n_tokens as f64 / (secs - first).max(1e-9));
    }
    let seconds = started.elapsed().as_secs_f64();
    firsts.sort_by(f64::total_cmp);
    each.sort_by(f64::total_cmp);
    Ok(Round {
        concurrency: n,
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds,
        per_request_tokens_per_s: each[each.len() / 2],
        first_token_p50_ms: firsts[firsts.len() / 2] * 1e3,
    })
}
