//! `tideway generate`: text from a language model, printed as it is made.
//!
//! The prompt runs in the chunked (prefill) form, then one recurrent step per new token; the
//! per-step work after the logits (sampling, streamed detokenization, stop conditions) is
//! `tideway_operators::generate`, the same the server's generating sessions run.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use tideway_operators::generate::{self, Generation, GenerationParams, SamplingParams};
use tideway_operators::tokenizers::text::TextTokenizer;

use crate::device::{Device, WeightStorage};
use crate::language_model::LanguageModel;
use crate::run::parse_tokens;
use crate::tensor_parallel::ParallelArgs;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json + *.safetensors, and tokenizer.json for text).
    #[arg(long)]
    model: PathBuf,
    /// The prompt as text (the model's tokenizer.json encodes it).
    #[arg(long, required_unless_present = "tokens", conflicts_with = "tokens")]
    text: Option<String>,
    /// The prompt as token ids, comma-separated.
    #[arg(long)]
    tokens: Option<String>,
    /// New tokens at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (the likeliest token every step).
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep the k likeliest tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the likeliest tokens whose probabilities sum to this, in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the likeliest one, in [0, 1].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalise tokens of the prompt and the output (CTRL's penalty; 1 is off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Subtracted from the logits of tokens already generated (0 is off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Seed of the sampler (the same seed gives the same text); default: from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable; the stop string is not printed).
    #[arg(long)]
    stop: Vec<String>,
    /// Stop after this token id (repeatable).
    #[arg(long)]
    stop_token: Vec<u32>,
    /// Go on past the model's end-of-sequence token (config.json's eos_token_id).
    #[arg(long)]
    ignore_eos: bool,
    /// Print, as the last line, one JSON object: tokens, text, finish_reason and timings.
    #[arg(long)]
    json: bool,
    /// Tokens per chunk of the prompt's prefill.
    #[arg(long, default_value_t = tideway_operators::models::mamba::DEFAULT_PREFILL_CHUNK)]
    chunk: usize,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Where the model runs: cpu, or cuda:N (a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// The model's weights: on a GPU f32, or bf16 with f32 accumulation; on the CPU the linear
    /// layers in f32, bf16 or int8 (LLM.int8).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightStorage,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let dir = &args.model;
    if tideway_operators::models::is_lmuformer(dir)
        .with_context(|| format!("cannot load model from {}", dir.display()))?
    {
        bail!(
            "{} is a feature model (LMUFormer): only language models generate",
            dir.display()
        );
    }
    let tokenizer = TextTokenizer::find(dir)?;
    if args.text.is_some() && tokenizer.is_none() {
        bail!(
            "{} has no tokenizer.json: give the prompt as --tokens",
            dir.display()
        );
    }
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            seed: args.seed.unwrap_or_else(clock_seed),
        },
        max_new_tokens: args.max_tokens,
        stop_token_ids: args.stop_token.clone(),
        stop_strings: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    let eos = generate::end_tokens(dir)?;
    let load_start = Instant::now();
    let model = LanguageModel::load_placed(
        dir,
        args.device,
        args.dtype,
        1,
        &args.parallel,
        crate::tensor_parallel::Wiring::Config,
    )?;
    let load_s = load_start.elapsed().as_secs_f64();
    let vocab = model.vocab_size();
    let prompt = match (&args.tokens, &args.text, &tokenizer) {
        (Some(tokens), _, _) => parse_tokens(tokens, vocab)?,
        (None, Some(text), Some(tokenizer)) => tokenizer.encode(text).context("--text")?,
        _ => unreachable!("clap requires --text or --tokens; --text was checked above"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
        bail!("prompt token {id} is not in the model's vocabulary of {vocab}");
    }
    if let Some(&id) = params
        .stop_token_ids
        .iter()
        .find(|&&id| id as usize >= vocab)
    {
        bail!("--stop-token {id} is not in the model's vocabulary of {vocab}");
    }
    let mut generation = Generation::new(params, &prompt, &eos, tokenizer.as_ref())?;

    let mut state = model.new_state().map_err(anyhow::Error::msg)?;
    let prefill_start = Instant::now();
    // The prompt's last row of logits alone: the next token is all generation reads.
    let mut row = model.prefill_last_logits(&prompt, &mut state, args.chunk, |_, _| {})?;
    let prefill_s = prefill_start.elapsed().as_secs_f64();

    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    let decode_start = Instant::now();
    let finish = loop {
        let step = generation.step(&row, tokenizer.as_ref())?;
        // Without a tokenizer the ids are what there is to show.
        match tokenizer {
            Some(_) => write!(out, "{}", step.text)?,
            None => write!(out, "{} ", step.token)?,
        }
        out.flush()?;
        text.push_str(&step.text);
        if let Some(reason) = step.finished {
            break reason;
        }
        row = model
            .step(&[step.token], &mut [&mut state])?
            .row(0)
            .to_vec();
    };
    let decode_s = decode_start.elapsed().as_secs_f64();
    let tokens = generation.tokens();
    let tokens_per_s = tokens.len() as f64 / decode_s.max(1e-9);
    writeln!(out)?;
    eprintln!(
        "{} tokens ({}) in {decode_s:.2} s: {tokens_per_s:.1} tokens/s; prompt {} tokens in {prefill_s:.2} s",
        tokens.len(),
        finish.as_str(),
        prompt.len()
    );
    if args.json {
        let summary = serde_json::json!({
            "tokens": tokens,
            "text": tokenizer.as_ref().map(|_| text),
            "finish_reason": finish.as_str(),
            "prompt_tokens": prompt.len(),
            "seed": generation.params().sampling.seed,
            "load_s": load_s,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "tokens_per_s": tokens_per_s,
        });
        writeln!(out, "{summary}")?;
    }
    Ok(())
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
