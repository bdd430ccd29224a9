//! `tideway run`: one sequence, offline.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use safetensors::tensor::{Dtype, TensorView};
use tideway_kernels::Tensor;
use tideway_operators::InputError;
use tideway_operators::layers::frames::Frames;
use tideway_operators::models::config::ConfigJson;
use tideway_operators::models::{is_lmuformer, load_lmuformer, load_model_as};
use tideway_operators::prune::prefill::PrefillPrune;
use tideway_operators::tokenizers::Frontend;
use tideway_operators::tokenizers::audio::read_wav;
use tideway_operators::tokenizers::sensor::SensorStream;
use tideway_operators::tokenizers::text::TextTokenizer;

use crate::device::{Device, WeightStorage};
use crate::language_model::LanguageModel;
use crate::tensor_parallel::ParallelArgs;

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
    /// Input token ids, comma-separated (e.g. 1,2,3), for a language model.
    #[arg(long, required_unless_present_any = ["input", "audio", "text"], conflicts_with_all = ["input", "audio", "text"])]
    tokens: Option<String>,
    /// Input text for a language model with a tokenizer.json beside its checkpoint (encoded
    /// without special tokens).
    #[arg(long, conflicts_with_all = ["input", "audio"])]
    text: Option<String>,
    /// Input feature frames for a feature model (LMUFormer): a safetensors file with tensor
    /// `input`, f32, [frames, in_channels]; for a model with a sensor front end, its raw
    /// frames [frames, channels] (standardised and patched by the front end, whose
    /// `features` are written too).
    #[arg(long, conflicts_with = "audio")]
    input: Option<PathBuf>,
    /// A WAV recording for a model with an audio front end (`frontend` in its config.json):
    /// PCM or float, any channel count (mixed down) and sample rate (resampled). The front
    /// end's normalised features are written too (`features`, [frames, mel]).
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Output safetensors file: `logits` (f32, `[T, vocab]`) for a language model; `output`
    /// (f32, `[frames, classes]`) and `pooled` (`[classes]`) for a feature model.
    #[arg(long)]
    out: PathBuf,
    /// Also write every spiking neuron's spike train (`spikes.<neuron>`, [frames, channels]).
    #[arg(long)]
    record_spikes: bool,
    #[arg(long, value_enum, default_value = "chunked")]
    mode: Mode,
    /// Tokens per chunk in chunked mode.
    #[arg(long, default_value_t = tideway_operators::models::mamba::DEFAULT_PREFILL_CHUNK)]
    chunk: usize,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Where the model runs: cpu, or cuda:N (a build with --features cuda; Mamba so far).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// A language model's weights: on a GPU f32, or bf16 with f32 accumulation; on the CPU the
    /// linear layers in f32, bf16 or int8 (LLM.int8).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightStorage,
    /// Prune the input's tokens between layers (a language model of any family, whole, on the
    /// CPU), e.g. `layers=2,keep=0.5,window=128,recent=16`; keys: layers (joined by '+'),
    /// keep, window, recent, heads, similar, iterations, policy (zero_tprune, random, stride,
    /// decimamba, tor), seed. `logits` then holds the kept positions' rows and `kept` (int64)
    /// their positions. Without the flag, a `tideway_prune` block in config.json sets it;
    /// `off` ignores that block.
    #[arg(long, conflicts_with_all = ["input", "audio"])]
    prune: Option<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let feature_model = is_lmuformer(&args.model)
        .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    if feature_model {
        if args.parallel.tensor_parallel > 1 {
            bail!(
                "{} is a feature model (LMUFormer), which runs whole: --tensor-parallel splits language models",
                args.model.display()
            );
        }
        if args.dtype != WeightStorage::F32 {
            bail!("--dtype is for language models; LMUFormers keep f32 weights");
        }
        return run_features(&args);
    }
    if args.tokens.is_none() && args.text.is_none() {
        bail!(
            "{} is a language model: give its input with --tokens or --text (--input and --audio are for feature models)",
            args.model.display()
        );
    }
    let prune = match args.prune.as_deref() {
        Some("off") => None,
        Some(spec) => Some(spec.parse::<PrefillPrune>().context("--prune")?),
        None => PrefillPrune::from_config(&ConfigJson::read(&args.model)?)?,
    };
    if let Some(prune) = &prune {
        return run_pruned(&args, prune);
    }
    let model = load_language_model(&args)?;
    let tokens = input_tokens(&args, model.vocab_size())?;
    let logits = match args.mode {
        Mode::Chunked => run_chunked(&model, &tokens, args.chunk)?,
        Mode::Recurrent => run_recurrent(&model, &tokens)?,
    };
    write_tensors(&args.out, &[("logits", &logits)])
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}

/// A prefill pruned between layers: the kept positions' logits and the positions.
fn run_pruned(args: &RunArgs, prune: &PrefillPrune) -> Result<()> {
    if args.device != Device::Cpu || args.parallel.tensor_parallel > 1 {
        bail!("--prune runs a whole language model on the CPU (no --device, no --tensor-parallel)");
    }
    let model = load_model_as(&args.model, args.dtype.cpu())
        .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let tokens = input_tokens(args, model.vocab_size())?;
    let pruned = model.prefill_pruned(&tokens, prune).context("--prune")?;
    write_with_positions(
        &args.out,
        &[("logits", &pruned.logits)],
        Some(("kept", &pruned.kept)),
    )
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "kept {} of {} tokens ({:.1}%), after each pruning layer: {:?}",
        pruned.kept.len(),
        tokens.len(),
        100.0 * pruned.kept.len() as f64 / tokens.len() as f64,
        pruned.survivors
    );
    Ok(())
}

/// The ids of `--tokens` or of `--text` (through the model's tokenizer.json).
fn input_tokens(args: &RunArgs, vocab: usize) -> Result<Vec<u32>> {
    Ok(match (&args.tokens, &args.text) {
        (Some(tokens), _) => parse_tokens(tokens, vocab)?,
        (None, Some(text)) => {
            let Some(tokenizer) = TextTokenizer::find(&args.model)? else {
                bail!(
                    "{} has no tokenizer.json: give token ids with --tokens",
                    args.model.display()
                );
            };
            let ids = tokenizer.encode(text).context("--text")?;
            if ids.is_empty() {
                return Err(InputError::Empty).context("--text");
            }
            // Ids beyond the model's vocabulary are refused by the model like --tokens.
            ids
        }
        (None, None) => unreachable!("checked by run"),
    })
}

/// The language model of `--model`: on the CPU (whole or split), or on `--device`.
fn load_language_model(args: &RunArgs) -> Result<LanguageModel> {
    LanguageModel::load_placed(
        &args.model,
        args.device,
        args.dtype,
        1,
        &args.parallel,
        crate::tensor_parallel::Wiring::Config,
    )
}

#[cfg(feature = "cuda")]
fn run_features_on_gpu(
    model: &tideway_operators::models::LmuFormer,
    device: Device,
    frames: &[f32],
    mode: Mode,
) -> Result<(Vec<f32>, Vec<f32>)> {
    crate::gpu::run_feature_frames(model, device, frames, mode == Mode::Recurrent)
}

#[cfg(not(feature = "cuda"))]
fn run_features_on_gpu(
    _: &tideway_operators::models::LmuFormer,
    device: Device,
    _: &[f32],
    _: Mode,
) -> Result<(Vec<f32>, Vec<f32>)> {
    bail!(
        "--device {device}: this tideway was built without CUDA support; build it with `cargo build --release --features cuda`"
    )
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

fn run_chunked(lm: &LanguageModel, tokens: &[u32], chunk: usize) -> Result<Tensor> {
    let mut state = lm.new_state().map_err(anyhow::Error::msg)?;
    let mut progress = Progress::new(tokens.len());
    Ok(lm.prefill_chunked_with_progress(tokens, &mut state, chunk, |d, t| progress.update(d, t))?)
}

fn run_recurrent(lm: &LanguageModel, tokens: &[u32]) -> Result<Tensor> {
    let mut state = lm.new_state().map_err(anyhow::Error::msg)?;
    let mut progress = Progress::new(tokens.len());
    let mut logits = Tensor::zeros(&[0, lm.output_width()]);
    for (i, &token) in tokens.iter().enumerate() {
        let row = lm.step(&[token], &mut [&mut state])?;
        logits.append_rows(&row)?;
        progress.update(i + 1, tokens.len());
    }
    Ok(logits)
}

/// An LMUFormer over the feature frames of `--input`.
fn run_features(args: &RunArgs) -> Result<()> {
    if args.input.is_none() && args.audio.is_none() {
        bail!(
            "{} is a feature model (LMUFormer): give its frames with --input FEATURES.safetensors (tensor `input`, [frames, channels]) or a recording with --audio FILE.wav",
            args.model.display()
        );
    }
    let model = load_lmuformer(&args.model)
        .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let channels = model.in_channels();
    let mut extra: Vec<(String, Tensor)> = Vec::new();
    let frames = if let Some(wav) = &args.audio {
        let Some(frontend) = model.audio_frontend() else {
            bail!(
                "{} has no audio front end (no \"frontend\" of kind \"kaldi_fbank\" in its config.json); give its features with --input",
                args.model.display()
            );
        };
        let audio = read_wav(wav)?;
        let features = frontend
            .features(&audio)
            .with_context(|| format!("{}", wav.display()))?;
        let rows = features.len() / channels;
        if rows == 0 {
            bail!(
                "{}: {} samples at {} Hz are shorter than one 25 ms frame",
                wav.display(),
                audio.samples.len(),
                audio.sample_rate
            );
        }
        extra.push((
            "features".into(),
            Tensor::from_vec(features.clone(), &[rows, channels])?,
        ));
        features
    } else {
        let input_path = args.input.as_ref().expect("checked above");
        let (frames, shape) = read_f32_tensor(input_path, "input")?;
        if let Some(Frontend::Sensor(sensor)) = model.frontend() {
            // Raw sensor frames through the model's front end (standardised, patched).
            let &[_, width] = shape.as_slice() else {
                bail!(
                    "{}: tensor `input` has shape {shape:?}; expected [frames, {}] sensor frames",
                    input_path.display(),
                    sensor.channels()
                );
            };
            let features = sensor
                .push(&mut SensorStream::default(), &frames, width, true)
                .with_context(|| format!("{}", input_path.display()))?;
            let rows = features.len() / channels;
            if rows == 0 {
                bail!(
                    "{}: {} frames make no whole patch of the model's sensor front end",
                    input_path.display(),
                    shape[0]
                );
            }
            extra.push((
                "features".into(),
                Tensor::from_vec(features.clone(), &[rows, channels])?,
            ));
            features
        } else {
            let &[rows, width] = shape.as_slice() else {
                bail!(
                    "{}: tensor `input` has shape {shape:?}; expected [frames, {channels}]",
                    input_path.display()
                );
            };
            if width != channels || rows == 0 {
                bail!(
                    "{}: tensor `input` has shape {shape:?}; the model takes [frames ≥ 1, {channels}]",
                    input_path.display()
                );
            }
            frames
        }
    };
    let rows = frames.len() / channels;
    if args.device != Device::Cpu {
        if args.record_spikes {
            bail!("--record-spikes runs on the CPU: leave out --device");
        }
        let (output, pooled) = run_features_on_gpu(&model, args.device, &frames, args.mode)?;
        let classes = model.num_classes();
        let output = Tensor::from_vec(output, &[rows, classes])?;
        let pooled = Tensor::from_vec(pooled, &[classes])?;
        let mut tensors: Vec<(String, Tensor)> =
            vec![("output".into(), output), ("pooled".into(), pooled)];
        tensors.extend(extra);
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        return write_tensors(&args.out, &refs)
            .with_context(|| format!("cannot write {}", args.out.display()));
    }
    let mut state = model.new_state();
    if args.record_spikes {
        state.record_spikes();
    }
    let output = match args.mode {
        Mode::Chunked => model.run_clip(&mut state, &frames)?.0,
        Mode::Recurrent => {
            let mut output = Vec::new();
            for (t, frame) in frames.chunks_exact(channels).enumerate() {
                let input = Frames {
                    data: frame.to_vec(),
                    width: channels,
                    counts: vec![1],
                };
                let last = t + 1 == rows;
                output.extend(model.forward(&mut [&mut state], &input, &[false])?.data);
                if last {
                    let end = Frames {
                        data: Vec::new(),
                        width: channels,
                        counts: vec![0],
                    };
                    output.extend(model.forward(&mut [&mut state], &end, &[true])?.data);
                }
            }
            output
        }
    };
    let classes = model.num_classes();
    let output = Tensor::from_vec(output, &[rows, classes])?;
    let pooled = Tensor::from_vec(state.pooled(), &[classes])?;
    let mut tensors: Vec<(String, Tensor)> =
        vec![("output".into(), output), ("pooled".into(), pooled)];
    tensors.extend(extra);
    if let Some(spikes) = state.spikes() {
        for (name, values) in spikes {
            let width = values.len() / rows;
            tensors.push((
                format!("spikes.{name}"),
                Tensor::from_vec(values.clone(), &[rows, width])?,
            ));
        }
    }
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_tensors(&args.out, &refs).with_context(|| format!("cannot write {}", args.out.display()))
}

/// Reads the f32 tensor `name` of a safetensors file.
pub fn read_f32_tensor(path: &Path, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let view = file
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("{}: no tensor `{name}`", path.display()))?;
    if view.dtype() != Dtype::F32 {
        bail!(
            "{}: tensor `{name}` has dtype {:?}; expected F32",
            path.display(),
            view.dtype()
        );
    }
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((values, view.shape().to_vec()))
}

/// Writes f32 tensors to a safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    write_with_positions(path, tensors, None)
}

/// [`write_tensors`], and a 1-D int64 tensor of positions if given (`name`, values).
fn write_with_positions(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    positions: Option<(&str, &[usize])>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            Ok((
                name.to_string(),
                TensorView::new(Dtype::F32, t.shape().to_vec(), b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let position_bytes: Vec<u8> = positions.map_or(Vec::new(), |(_, p)| {
        p.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect()
    });
    if let Some((name, p)) = positions {
        views.push((
            name.to_string(),
            TensorView::new(Dtype::I64, vec![p.len()], &position_bytes)?,
        ));
    }
    // safetensors' error repeats its cause in its message: keep one copy.
    safetensors::serialize_to_file(views, None, path).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
