//! The models a node serves: what every process knows of each (name, kind, widths, front end,
//! for the gRPC edge and the front-end stage) and the pieces of it that this process runs, by
//! pipeline stage ([`StageModel`]), loaded for the placement that one plan decides.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tideway_operators::models::config::ConfigJson;
use tideway_operators::models::lmuformer::LmuFormerConfig;
use tideway_operators::models::{
    Model, ModelPart, Shard, is_lmuformer, load_lmuformer, load_lmuformer_part, load_model_part,
    load_shard, model_layers,
};
use tideway_operators::prune::frames::FrameGate;
use tideway_operators::prune::prefill::PrefillPrune;
use tideway_operators::tokenizers::Frontend;
use tideway_operators::tokenizers::audio::{AudioFrontend, AudioLimits};
use tideway_operators::tokenizers::text::TextTokenizer;

use tideway_proto::decode::{InputKind, ModelInputs, RateCheck};

use super::stages::Plan;
use super::state_pool::StatePool;
use crate::device::Device;
use crate::feature_model::FeatureModel;
use crate::language_model::LanguageModel;
use crate::tensor_parallel::ParallelArgs;

/// What the edge and the front end read of a language model, wherever its pieces run.
#[derive(Debug, Clone)]
pub struct LmInfo {
    pub family: &'static str,
    pub vocab_size: usize,
    pub output_width: usize,
    /// Bytes of one session's state over all its layers (and ranks).
    pub state_bytes: usize,
    /// Bytes of the parameters this process holds.
    pub weight_bytes: usize,
    pub device: Device,
    /// Sessions that fit (a GPU's state pool); None where host memory is the limit.
    pub session_capacity: Option<usize>,
    /// End-of-sequence tokens (config.json's eos_token_id): a generation stops at them.
    pub end_tokens: Vec<u32>,
    /// Prompt pruning (`tideway_prune` in config.json), if the model applies it: a session's
    /// first step, where only its last row is wanted (a generation's prompt), runs pruned.
    pub prune: Option<PrefillPrune>,
}

/// What the edge and the front end read of a feature model (LMUFormer), wherever its pieces
/// run: its configuration and front end come from `config.json` alone.
#[derive(Debug, Clone)]
pub struct FeatureInfo {
    pub config: LmuFormerConfig,
    pub frontend: Option<Frontend>,
    /// Bytes of one stream's state over all its parts.
    pub state_bytes: usize,
    /// Bytes of the parameters this process holds.
    pub weight_bytes: usize,
    pub device: Device,
    /// Streams that fit (a GPU's state pool); None where host memory is the limit.
    pub session_capacity: Option<usize>,
    /// Frame pruning (`tideway_frame_gate` in config.json), if the model applies it.
    pub frame_gate: Option<FrameGate>,
}

impl FeatureInfo {
    pub fn config(&self) -> &LmuFormerConfig {
        &self.config
    }

    pub fn frontend(&self) -> Option<&Frontend> {
        self.frontend.as_ref()
    }

    pub fn audio_frontend(&self) -> Option<&AudioFrontend> {
        match &self.frontend {
            Some(Frontend::Audio(a)) => Some(a),
            _ => None,
        }
    }

    /// Feature rows' width.
    pub fn in_channels(&self) -> usize {
        self.config.in_channels
    }
}

/// What a served model is: a language model (token ids in, logits out; text too with a
/// tokenizer), or a feature model (feature, audio or sensor frames in, per-frame outputs).
pub enum ServedKind {
    Language {
        info: LmInfo,
        tokenizer: Option<Box<TextTokenizer>>,
    },
    Features(Box<FeatureInfo>),
}

/// What one pipeline stage of a model runs in this process.
pub enum StageModel {
    /// A CPU language model's layers `part.layers`, with the embedding (first stage) and the
    /// final norm and head (last stage) where the part holds them.
    Part(Box<Model>),
    /// A language model that runs as one piece in the first stage: on a GPU, or split over a
    /// tensor-parallel group.
    Whole(Box<LanguageModel>),
    /// A feature model's (LMUFormer's) blocks `part().layers`, with the patch embedding
    /// (first stage) and the per-frame head (last stage: it keeps per-stream state, the
    /// spiking head's membranes and the clip sum, so it runs here rather than in `head`). On
    /// a GPU the model runs whole in the first stage.
    Features(Arc<FeatureModel>),
}

/// A model being served.
pub struct ServedModel {
    pub name: String,
    pub kind: ServedKind,
    /// By pipeline stage: what this process runs of the model there (None: another process
    /// runs that stage, or the model runs whole in an earlier one).
    pub stages: Vec<Option<StageModel>>,
    /// By pipeline stage: the pool of session states of this process's CPU language model
    /// part (`--reserve-sessions`; empty without it).
    pub reserves: Vec<StatePool>,
    /// Identifies the checkpoint ([`model_fingerprint`]): a session state continues only on
    /// the model that made it.
    pub fingerprint: String,
}

/// A checkpoint's identity: CRC-32 and total length of its files' names and bytes (weights,
/// config, tokenizer; not its model card), in name order. Read once at load (CRC-32 runs at
/// several GB/s).
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    files.sort();
    let mut crc = crc32fast::Hasher::new();
    let mut total = 0u64;
    for path in files {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        crc.update(path.file_name().unwrap_or_default().as_encoded_bytes());
        crc.update(&bytes);
        total += bytes.len() as u64;
    }
    Ok(format!("{:08x}-{total}", crc.finalize()))
}

impl ServedModel {
    /// The prompt pruning a language model applies (`tideway_prune`), if any.
    pub fn prompt_prune(&self) -> Option<&PrefillPrune> {
        match &self.kind {
            ServedKind::Language { info, .. } => info.prune.as_ref(),
            ServedKind::Features(_) => None,
        }
    }

    /// The vocabulary of a language model; 0 for a feature model.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            ServedKind::Language { info, .. } => info.vocab_size,
            ServedKind::Features(_) => 0,
        }
    }

    pub fn width(&self) -> usize {
        match &self.kind {
            ServedKind::Language { info, .. } => info.output_width,
            ServedKind::Features(m) => m.config.num_classes,
        }
    }

    pub fn state_bytes(&self) -> usize {
        match &self.kind {
            ServedKind::Language { info, .. } => info.state_bytes,
            ServedKind::Features(m) => m.state_bytes,
        }
    }

    pub fn weight_bytes(&self) -> usize {
        match &self.kind {
            ServedKind::Language { info, .. } => info.weight_bytes,
            ServedKind::Features(m) => m.weight_bytes,
        }
    }

    pub fn family(&self) -> &'static str {
        match &self.kind {
            ServedKind::Language { info, .. } => info.family,
            ServedKind::Features(m) => match m.config.variant {
                tideway_operators::models::lmuformer::Variant::Plain => "lmuformer",
                tideway_operators::models::lmuformer::Variant::Spiking => "spiking_lmuformer",
            },
        }
    }

    pub fn device(&self) -> Device {
        match &self.kind {
            ServedKind::Language { info, .. } => info.device,
            ServedKind::Features(m) => m.device,
        }
    }

    /// Whether a session's state can leave its worker (to another worker, process or the
    /// store): on the CPU and not split over a tensor-parallel group.
    pub fn movable(&self) -> bool {
        self.device() == Device::Cpu
            && self
                .stages
                .iter()
                .flatten()
                .all(|s| !matches!(s, StageModel::Whole(_)))
    }

    pub fn session_capacity(&self) -> Option<usize> {
        match &self.kind {
            ServedKind::Language { info, .. } => info.session_capacity,
            ServedKind::Features(m) => m.session_capacity,
        }
    }

    /// The output tensor's name: `logits` or `output`.
    pub fn output_name(&self) -> &'static str {
        match &self.kind {
            ServedKind::Language { .. } => "logits",
            ServedKind::Features(_) => "output",
        }
    }

    /// Runs `f` with what this model takes, for the request decoders: its vocabulary and
    /// answer width, or its audio front end's sample-rate check.
    pub fn with_inputs<R>(&self, f: impl FnOnce(&ModelInputs) -> R) -> R {
        match &self.kind {
            ServedKind::Language { .. } => f(&ModelInputs {
                name: &self.name,
                kind: InputKind::Language {
                    vocab: self.vocab_size(),
                    width: self.width(),
                },
            }),
            ServedKind::Features(info) => {
                let check = info.audio_frontend().map(|audio| {
                    move |rate: u64| audio.check_rate(rate).map_err(|e| e.to_string())
                });
                f(&ModelInputs {
                    name: &self.name,
                    kind: InputKind::Features {
                        check_rate: check.as_ref().map(|c| c as RateCheck),
                    },
                })
            }
        }
    }

    pub fn is_language(&self) -> bool {
        matches!(self.kind, ServedKind::Language { .. })
    }

    /// Feature rows' width (feature models), for counting rows.
    pub fn in_channels(&self) -> usize {
        match &self.kind {
            ServedKind::Language { .. } => 1,
            ServedKind::Features(m) => m.in_channels(),
        }
    }
}

/// Where models run: one plan for every model of the node, from the command line.
pub struct Placement {
    pub parallel: ParallelArgs,
    pub device: Device,
    pub dtype: crate::device::WeightStorage,
    pub gpu_sessions: usize,
    /// Session states made at start for each CPU language model part (`--reserve-sessions`).
    pub reserve_sessions: usize,
    pub plan: Plan,
    /// The pipeline stages this process's workers run.
    pub local_stages: std::ops::Range<usize>,
    /// What audio the models' front ends accept.
    pub audio: AudioLimits,
    /// Bytes of undecided text a stream may hold.
    pub max_held_text: usize,
}

impl Placement {
    /// One process on the CPU, data placement (`tideway demo`).
    pub fn cpu(workers: usize) -> Self {
        Placement {
            parallel: ParallelArgs::default(),
            device: Device::Cpu,
            dtype: crate::device::WeightStorage::F32,
            gpu_sessions: 0,
            reserve_sessions: 0,
            plan: Plan::new(workers.max(1), 1).expect("one stage divides any count"),
            local_stages: 0..1,
            audio: AudioLimits::default(),
            max_held_text: tideway_operators::tokenizers::text::DEFAULT_MAX_HELD_TEXT,
        }
    }

    /// Whether a language model runs as one piece (GPU, tensor-parallel group) rather than
    /// as CPU parts that the pipeline can split.
    fn whole_language_models(&self) -> bool {
        self.device != Device::Cpu || self.parallel.tensor_parallel != 1
    }

    /// Loads what this process runs of the model in `dir`, named `name`.
    pub fn load(&self, name: String, dir: &Path) -> Result<ServedModel> {
        let context = || format!("cannot load model {name:?} from {}", dir.display());
        let stages = self.plan.stages;
        let mut pieces: Vec<Option<StageModel>> = (0..stages).map(|_| None).collect();
        let mut reserves: Vec<StatePool> = (0..stages).map(|_| StatePool::default()).collect();
        let kind = if is_lmuformer(dir).with_context(context)? {
            ServedKind::Features(Box::new(
                self.load_features(dir, &mut pieces).with_context(context)?,
            ))
        } else {
            // A generation's prompt is pruned (`stages/layers.rs`), which needs every layer
            // and both ends in one CPU piece.
            let prune = PrefillPrune::from_config(&ConfigJson::read(dir).with_context(context)?)
                .with_context(context)?;
            if let Some(prune) = &prune
                && (self.whole_language_models() || stages > 1)
            {
                bail!(
                    "cannot load model {name:?} from {}: its config.json's tideway_prune ({prune}) prunes prompts of a model that runs whole on the CPU in one stage (not on a GPU, over a tensor-parallel group or split by --pipeline); remove the block to serve it so",
                    dir.display()
                );
            }
            let tokenizer = TextTokenizer::find(dir)
                .with_context(context)?
                .map(|mut t| {
                    t.set_max_held(self.max_held_text);
                    Box::new(t)
                });
            let info = if self.whole_language_models() {
                if stages > 1 {
                    bail!(
                        "--pipeline splits models on the CPU without tensor parallelism; a model on a GPU or over a tensor-parallel group runs whole (leave out --pipeline)"
                    );
                }
                let model = LanguageModel::load_placed(
                    dir,
                    self.device,
                    self.dtype,
                    self.gpu_sessions,
                    &self.parallel,
                    crate::tensor_parallel::Wiring::Config,
                )
                .with_context(context)?;
                let info = LmInfo {
                    family: model.family(),
                    vocab_size: model.vocab_size(),
                    output_width: model.output_width(),
                    state_bytes: model.state_bytes(),
                    weight_bytes: model.weight_bytes(),
                    device: model.device(),
                    session_capacity: model.session_capacity(),
                    end_tokens: Vec::new(),
                    prune: None,
                };
                pieces[0] = Some(StageModel::Whole(Box::new(model)));
                info
            } else {
                let mut info = None;
                let mut weight_bytes = 0;
                let num_layers = model_layers(dir).with_context(context)?;
                for stage in self.local_stages.clone() {
                    let part = ModelPart::stage(stage, stages, num_layers).with_context(|| {
                        format!(
                            "cannot split model {name:?} ({num_layers} layers) into {stages} pipeline stages"
                        )
                    })?;
                    let model = load_shard(
                        dir,
                        Shard {
                            rank: 0,
                            size: 1,
                            part: Some(part),
                            format: self.dtype.cpu(),
                        },
                    )
                    .with_context(context)?;
                    weight_bytes += model.weight_bytes();
                    reserves[stage] = StatePool::reserve(&model, self.reserve_sessions, &name);
                    if info.is_none() {
                        info = Some(LmInfo {
                            family: model.family(),
                            vocab_size: model.vocab_size(),
                            output_width: model.output_width(),
                            state_bytes: session_state_bytes(dir, num_layers)
                                .with_context(context)?,
                            weight_bytes: 0,
                            device: Device::Cpu,
                            session_capacity: None,
                            end_tokens: Vec::new(),
                            prune: None,
                        });
                    }
                    pieces[stage] = Some(StageModel::Part(Box::new(model)));
                }
                let mut info = info.context("this process runs no stage of the model")?;
                info.weight_bytes = weight_bytes;
                if let (Some(prune), Some(StageModel::Part(model))) = (&prune, &pieces[0]) {
                    model
                        .check_session_pruning(prune)
                        .with_context(|| format!("{}/config.json: tideway_prune", dir.display()))
                        .with_context(context)?;
                    info.prune = Some(prune.clone());
                }
                info
            };
            let mut info = info;
            info.end_tokens = tideway_operators::generate::end_tokens(dir).with_context(context)?;
            ServedKind::Language { info, tokenizer }
        };
        let served = ServedModel {
            name,
            kind,
            stages: pieces,
            reserves,
            fingerprint: model_fingerprint(dir)?,
        };
        tracing::info!(
            model = %served.name,
            dir = %dir.display(),
            family = served.family(),
            device = %served.device(),
            stages = ?self.local_stages,
            weight_bytes = served.weight_bytes(),
            session_capacity = served.session_capacity().map_or("host memory".to_string(), |n| n.to_string()),
            "loaded"
        );
        Ok(served)
    }
}

impl Placement {
    /// Loads this process's pieces of the feature model in `dir` into `pieces`: on the CPU
    /// each local stage's part of the blocks, on a GPU the whole model in the first stage.
    fn load_features(&self, dir: &Path, pieces: &mut [Option<StageModel>]) -> Result<FeatureInfo> {
        let stages = self.plan.stages;
        let config = ConfigJson::read(dir)?;
        let mut frontend = Frontend::load(&config)?;
        if let Some(Frontend::Audio(audio)) = &mut frontend {
            audio.set_limits(self.audio);
        }
        let mut info = FeatureInfo {
            config: LmuFormerConfig::from_config(&config)?,
            frontend,
            state_bytes: 0,
            weight_bytes: 0,
            device: self.device,
            session_capacity: None,
            frame_gate: FrameGate::from_config(&config)?,
        };
        let depths = info.config.depths;
        if self.device != Device::Cpu {
            if stages > 1 {
                bail!(
                    "--pipeline splits models on the CPU; a model on a GPU runs whole (leave out --pipeline)"
                );
            }
            let mut model = load_lmuformer(dir)?;
            model.decide_frames_elsewhere();
            let model = FeatureModel::place(model, self.device, self.gpu_sessions.max(1))?;
            info.state_bytes = model.state_bytes();
            info.weight_bytes = model.weight_bytes();
            info.device = model.device();
            info.session_capacity = model.session_capacity();
            pieces[0] = Some(StageModel::Features(Arc::new(model)));
            return Ok(info);
        }
        for (stage, piece) in pieces.iter_mut().enumerate() {
            let part = ModelPart::stage(stage, stages, depths)
                .with_context(|| format!("cannot split {depths} blocks into {stages} stages"))?;
            let mut model = load_lmuformer_part(dir, part)?;
            // The prune stage decides which frames go on (`stages/prune.rs`).
            model.decide_frames_elsewhere();
            // A stream's state over every part; the parts other processes run are loaded to
            // measure theirs, then dropped (feature models are small).
            info.state_bytes += model.state_bytes();
            if self.local_stages.contains(&stage) {
                info.weight_bytes += model.weight_bytes();
                *piece = Some(StageModel::Features(Arc::new(FeatureModel::place(
                    model,
                    Device::Cpu,
                    1,
                )?)));
            }
        }
        Ok(info)
    }
}

/// Bytes of one session's state over the model's `num_layers` layers, wherever they run:
/// every layer of a family holds the same state, so one layer (read from the mapped
/// checkpoint, then dropped) gives it.
fn session_state_bytes(dir: &Path, num_layers: usize) -> Result<usize> {
    let one = ModelPart {
        layers: 0..1,
        embed: false,
        head: false,
    };
    Ok(load_model_part(dir, one)?.state_bytes() * num_layers)
}
