//! `tideway run`: one sequence, offline.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use safetensors::tensor::{Dtype, TensorView};
use tideway_kernels::Tensor;
use tideway_operators::InputError;
use tideway_operators::models::{Model, load_model};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The chunkwise-parallel (prefill) form: whole chunks of the sequence at once.
    Chunked,
    /// The recurrent form: one step per token, as a stream is served.
    Recurrent,
}

#[derive(Args)]
pub struct RunArgs {
    /// Checkpoint directory (config.json + *.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Input token ids, comma-separated (e.g. 1,2,3).
    #[arg(long)]
    tokens: String,
    /// Output safetensors file (tensor `logits`, f32, [T, vocab]).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "chunked")]
    mode: Mode,
    /// Tokens per chunk in chunked mode.
    #[arg(long, default_value_t = tideway_operators::models::mamba::DEFAULT_PREFILL_CHUNK)]
    chunk: usize,
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let model = load_model(&args.model)
        .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let tokens = parse_tokens(&args.tokens, model.vocab_size())?;
    let logits = match args.mode {
        Mode::Chunked => run_chunked(&model, &tokens, args.chunk)?,
        Mode::Recurrent => run_recurrent(&model, &tokens)?,
    };
    write_tensors(&args.out, &[("logits", &logits)])
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}

/// Parses `1,2,3` into ids below `vocab`.
pub fn parse_tokens(text: &str, vocab: usize) -> Result<Vec<u32>> {
    if text.trim().is_empty() {
        return Err(InputError::Empty).context("--tokens");
    }
    let mut tokens = Vec::new();
    for (position, part) in text.split(',').map(str::trim).enumerate() {
        let id: u64 = part.parse().map_err(|_| {
            anyhow::anyhow!(
                "--tokens: {part:?} at position {position} is not a token id (a non-negative integer; ids are comma-separated, e.g. 1,2,3)"
            )
        })?;
        if id >= vocab as u64 {
            return Err(InputError::TokenOutOfRange {
                token: id,
                position,
                vocab,
            })
            .context("--tokens");
        }
        tokens.push(id as u32);
    }
    Ok(tokens)
}

/// Progress on stderr for long inputs, at most once a second.
struct Progress {
    start: Instant,
    last: Instant,
    enabled: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        let now = Instant::now();
        Progress {
            start: now,
            last: now,
            enabled: total >= 4096,
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        if !self.enabled || (done < total && self.last.elapsed().as_secs_f64() < 1.0) {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64();
        eprintln!(
            "{done}/{total} tokens ({:.0}%), {:.1} tokens/s",
            100.0 * done as f64 / total as f64,
            done as f64 / secs.max(1e-9)
        );
    }
}

fn run_chunked(lm: &Model, tokens: &[u32], chunk: usize) -> Result<Tensor> {
    let mut state = lm.new_state();
    let mut progress = Progress::new(tokens.len());
    Ok(lm.prefill_chunked_with_progress(tokens, &mut state, chunk, |d, t| progress.update(d, t))?)
}

fn run_recurrent(lm: &Model, tokens: &[u32]) -> Result<Tensor> {
    let mut state = lm.new_state();
    let mut progress = Progress::new(tokens.len());
    let mut logits = Tensor::zeros(&[0, lm.output_width()]);
    for (i, &token) in tokens.iter().enumerate() {
        let row = lm.step(&[token], &mut [&mut state])?;
        logits.append_rows(&row)?;
        progress.update(i + 1, tokens.len());
    }
    Ok(logits)
}

/// Writes f32 tensors to a safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            Ok((
                name.to_string(),
                TensorView::new(Dtype::F32, t.shape().to_vec(), b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // safetensors' error repeats its cause in its message: keep one copy.
    safetensors::serialize_to_file(views, None, path).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
