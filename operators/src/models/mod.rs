//! Whole models, one folder per family, and [`load_model`], which reads a checkpoint
//! directory's `config.json` and loads the model it describes through the family registry
//! ([`family::FAMILIES`]). [`Model`] and [`SessionState`] give the serving and command layers
//! one interface over every language-model family ([`LanguageFamily`]).

pub mod config;
pub mod family;
pub mod fla;
mod inputs;
pub mod lmuformer;
pub mod mamba;

use std::ops::Range;
use std::path::Path;

use tideway_kernels::Tensor;
use tideway_kernels::cpu::on_compute_pool;
use tideway_kernels::matmul::LinearFormat;

use crate::checkpoint::Checkpoint;
use crate::error::{ForwardError, InputError, LoadError};
use crate::logit_rows::LogitRows;
use crate::prune::prefill::{
    PrefillPrune, PrefillPruneError, PrunedHidden, PrunedPrefill, PrunedPrefillError,
};
use crate::state_tensors::{StateError, StateTensors};
use crate::tensor_parallel::{Group, Residual, ResidualStream, single};
use config::ConfigJson;

pub use family::{FamilyState, LanguageFamily, SessionState, Shard};
pub use fla::{FlaConfig, FlaLm, FlaState};
#[cfg(feature = "cuda")]
pub(crate) use inputs::packed_segments;
pub use inputs::{check_token_ids, prefill_in_chunks, segments};
pub use lmuformer::{LmuFormer, LmuFormerConfig, LmuFormerState};
pub use mamba::{MambaConfig, MambaLm, MambaState};

/// Which part of a model one placement holds: a contiguous range of layers, and whether the
/// embedding (the first piece) and the final norm and head (the last piece) are there. A
/// pipeline stage holds one part; a whole model is the part of every layer with both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPart {
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
}

impl ModelPart {
    pub fn whole(num_layers: usize) -> Self {
        ModelPart {
            layers: 0..num_layers,
            embed: true,
            head: true,
        }
    }

    /// Stage `stage` of `stages` contiguous stages over `num_layers` layers (the first
    /// `num_layers % stages` stages take one layer more; with fewer layers than stages the
    /// last stages hold none and pass the stream on, the last one with the head); None for a
    /// stage out of range.
    pub fn stage(stage: usize, stages: usize, num_layers: usize) -> Option<Self> {
        if stages == 0 || stage >= stages {
            return None;
        }
        let (base, extra) = (num_layers / stages, num_layers % stages);
        let start = stage * base + stage.min(extra);
        let len = base + usize::from(stage < extra);
        Some(ModelPart {
            layers: start..start + len,
            embed: stage == 0,
            head: stage + 1 == stages,
        })
    }
}

/// A loaded language model of any family.
pub struct Model(Box<dyn LanguageFamily>);

impl Model {
    pub fn new(family: Box<dyn LanguageFamily>) -> Self {
        Model(family)
    }

    /// The family's own model type, when it is `T`.
    pub fn as_family<T: LanguageFamily>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = &*self.0;
        any.downcast_ref::<T>()
    }

    pub fn family(&self) -> &'static str {
        self.0.family()
    }

    /// Ids accepted as input: `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }

    /// Width of the output rows (`logits` columns).
    pub fn output_width(&self) -> usize {
        self.0.logits_width()
    }

    pub fn new_state(&self) -> SessionState {
        self.0.new_state()
    }

    /// Writes `state` (of the layers this model holds) as named tensors.
    pub fn export_state(&self, state: &SessionState, out: &mut StateTensors) {
        state.export(self.0.part().layers.start, out)
    }

    /// A session state for the layers this model holds, taken from named tensors (each
    /// checked against a fresh state's size).
    pub fn import_state(&self, from: &StateTensors) -> Result<SessionState, StateError> {
        let mut state = self.new_state();
        state.import(self.0.part().layers.start, from)?;
        Ok(state)
    }

    /// Bytes of one session's state (of the layers this model holds).
    pub fn state_bytes(&self) -> usize {
        self.0.state_bytes()
    }

    pub fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }

    /// A fresh prefill of `ids` with its tokens pruned between layers (SPEC-MODELS §6.3): the
    /// kept positions and their logits.
    pub fn prefill_pruned(
        &self,
        ids: &[u32],
        prune: &PrefillPrune,
    ) -> Result<PrunedPrefill, PrunedPrefillError> {
        let PrunedHidden {
            survivors,
            residual,
            ..
        } = self.prefill_pruned_hidden(ids, prune)?;
        let logits = self.head(Residual {
            values: residual,
            pending: None,
        })?;
        Ok(survivors.finish(logits))
    }

    /// Whether a session of this model can start from a prompt pruned as `prune` says (what
    /// `tideway serve` does with a generation's prompt): the family's token graphs, the
    /// setting's layers and heads, and positions that stay right after pruning.
    pub fn check_session_pruning(&self, prune: &PrefillPrune) -> Result<(), PrefillPruneError> {
        if let Some(mamba) = self.as_family::<MambaLm>() {
            return mamba.check_pruning(prune);
        }
        if let Some(fla) = self.as_family::<FlaLm>() {
            fla.check_pruning(prune)?;
            return match fla.why_no_session_pruning() {
                Some(reason) => Err(PrefillPruneError::BadValue {
                    key: "layers",
                    value: format!("{:?}", prune.layers),
                    allowed: format!("none: this model's prompts cannot be pruned for {reason}"),
                }),
                None => Ok(()),
            };
        }
        Err(PrefillPruneError::Family {
            family: self.family().to_string(),
        })
    }

    /// A fresh prefill of `ids` pruned as `prune` says, up to the head, with the session state
    /// it leaves; the families whose token graphs are built (all of Tideway's language
    /// models) can, another is refused by name.
    pub fn prefill_pruned_hidden(
        &self,
        ids: &[u32],
        prune: &PrefillPrune,
    ) -> Result<PrunedHidden, PrunedPrefillError> {
        if let Some(mamba) = self.as_family::<MambaLm>() {
            return on_compute_pool(|| mamba.prefill_pruned_hidden(ids, prune));
        }
        if let Some(fla) = self.as_family::<FlaLm>() {
            return on_compute_pool(|| fla.prefill_pruned_hidden(ids, prune));
        }
        Err(PrefillPruneError::Family {
            family: self.family().to_string(),
        }
        .into())
    }

    pub fn check_tokens(&self, tokens: &[u32], offset: usize) -> Result<(), InputError> {
        check_token_ids(tokens, self.vocab_size(), offset)
    }

    /// The packed batch: session `i` takes the next `lens[i]` tokens and continues from
    /// `states[i]`; returns logits for every row.
    pub fn forward_packed(
        &self,
        tokens: &[u32],
        lens: &[usize],
        states: &mut [&mut SessionState],
    ) -> Result<Tensor, InputError> {
        self.forward_packed_rows(tokens, lens, states, LogitRows::All)
    }

    /// [`forward_packed`](Self::forward_packed) with the logits of `rows` only (the head runs
    /// over those rows alone).
    pub fn forward_packed_rows(
        &self,
        tokens: &[u32],
        lens: &[usize],
        states: &mut [&mut SessionState],
        rows: LogitRows<'_>,
    ) -> Result<Tensor, InputError> {
        on_compute_pool(|| {
            single(|group| self.forward_in_group(tokens, lens, states, group, rows))
                .map(|logits| logits.unwrap_or_else(|| Tensor::zeros(&[0, self.output_width()])))
        })
    }

    /// [`forward_packed`](Self::forward_packed) on one rank of a tensor-parallel group (the
    /// model loaded by [`load_model_rank`]): each sub-block's partial output is all-reduced as
    /// the wiring says. Every rank must run the same batches in the same order; only ranks
    /// that ask for `logits` run the head, over those rows.
    pub fn forward_in_group(
        &self,
        tokens: &[u32],
        lens: &[usize],
        states: &mut [&mut SessionState],
        group: &mut Group<'_>,
        logits: LogitRows<'_>,
    ) -> Result<Option<Tensor>, ForwardError> {
        let segments = segments(lens, states.len(), tokens.len())?;
        let mut stream = ResidualStream::new(self.0.embed(tokens)?);
        self.0
            .forward_layers(&mut stream, &segments, states, group)?;
        let residual = stream.finish(group)?;
        if logits == LogitRows::None {
            return Ok(None);
        }
        Ok(Some(match logits.subset(lens) {
            Some(keep) => {
                let kept = LogitRows::gather(&residual, self.hidden_size(), &keep);
                self.0.head(&kept)?
            }
            None => self.0.head(&residual)?,
        }))
    }

    /// The layers, embedding and head this model holds.
    pub fn part(&self) -> &ModelPart {
        self.0.part()
    }

    /// Layers of the whole model (a part may hold fewer).
    pub fn num_layers(&self) -> usize {
        self.0.num_layers()
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        self.0.hidden_size()
    }

    /// The first piece: the residual stream's start for `tokens` (`[T, hidden]`).
    pub fn embed(&self, tokens: &[u32]) -> Result<Residual, InputError> {
        Ok(Residual {
            values: self.0.embed(tokens)?,
            pending: None,
        })
    }

    /// This part's layers over a packed batch's residual stream: session `i` owns the next
    /// `lens[i]` rows and continues from `states[i]` (which holds these layers' state).
    pub fn forward_layers(
        &self,
        residual: Residual,
        lens: &[usize],
        states: &mut [&mut SessionState],
    ) -> Result<Residual, InputError> {
        let rows = residual.values.len() / self.hidden_size().max(1);
        let segments = segments(lens, states.len(), rows)?;
        on_compute_pool(|| {
            single(|group| {
                let mut stream = ResidualStream::resume(residual);
                self.0
                    .forward_layers(&mut stream, &segments, states, group)?;
                Ok(stream.suspend(group)?)
            })
        })
    }

    /// The last piece: every output added to the stream, then the final norm and the head.
    pub fn head(&self, residual: Residual) -> Result<Tensor, InputError> {
        let Residual {
            mut values,
            pending,
        } = residual;
        if let Some(pending) = pending {
            values.iter_mut().zip(&pending).for_each(|(r, x)| *r += x);
        }
        on_compute_pool(|| self.0.head(&values))
    }

    /// Which layers are ladder-wired.
    pub fn ladder_layers(&self) -> &[bool] {
        self.0.ladder()
    }

    /// Rewires the model: `ladder[i]` for layer `i` (the same weights with a different
    /// residual wiring, a different function; for measuring the wiring's speed).
    pub fn set_ladder_layers(&mut self, ladder: Vec<bool>) {
        assert_eq!(ladder.len(), self.num_layers(), "one flag per layer");
        self.0.set_ladder(ladder);
    }

    /// The recurrent form: one token for each session.
    pub fn step(
        &self,
        tokens: &[u32],
        states: &mut [&mut SessionState],
    ) -> Result<Tensor, InputError> {
        if tokens.len() != states.len() {
            return Err(InputError::BatchMismatch {
                sessions: states.len(),
                tokens: tokens.len(),
            });
        }
        self.forward_packed(tokens, &vec![1; tokens.len()], states)
    }

    /// The chunked (prefill) form over a whole sequence in chunks of `chunk_len`;
    /// `on_chunk(done, total)` after each chunk.
    pub fn prefill_chunked_with_progress(
        &self,
        tokens: &[u32],
        state: &mut SessionState,
        chunk_len: usize,
        on_chunk: impl FnMut(usize, usize),
    ) -> Result<Tensor, InputError> {
        let (vocab, width) = (self.vocab_size(), self.output_width());
        prefill_in_chunks(tokens, vocab, width, chunk_len, on_chunk, |chunk| {
            self.forward_packed(chunk, &[chunk.len()], &mut [&mut *state])
        })
    }

    pub fn prefill_chunked(
        &self,
        tokens: &[u32],
        state: &mut SessionState,
        chunk_len: usize,
    ) -> Result<Tensor, InputError> {
        self.prefill_chunked_with_progress(tokens, state, chunk_len, |_, _| {})
    }
}

/// Loads the model in `dir` (`config.json` + `*.safetensors`).
pub fn load_model(dir: &Path) -> Result<Model, LoadError> {
    load_shard(
        dir,
        Shard {
            rank: 0,
            size: 1,
            part: None,
            format: LinearFormat::F32,
        },
    )
}

/// Loads the model in `dir` with its linear layers' weights in `format` (`--dtype` on the
/// CPU: f32, bf16 or LLM.int8's int8).
pub fn load_model_as(dir: &Path, format: LinearFormat) -> Result<Model, LoadError> {
    if let Some(why) = format.unsupported_here() {
        return Err(LoadError::Unsupported {
            path: dir.to_path_buf(),
            reason: why,
        });
    }
    load_shard(
        dir,
        Shard {
            rank: 0,
            size: 1,
            part: None,
            format,
        },
    )
}

/// Loads rank `rank`'s shard of the model in `dir` for a tensor-parallel group of `size`
/// (`size` 1: the whole model). Only the rank's slices of split tensors are read.
pub fn load_model_rank(dir: &Path, rank: usize, size: usize) -> Result<Model, LoadError> {
    load_shard(
        dir,
        Shard {
            rank,
            size,
            part: None,
            format: LinearFormat::F32,
        },
    )
}

/// Loads only `part` of the model in `dir` (a pipeline stage): its layers' tensors, and the
/// embedding or the head where the part holds them; nothing else is read.
pub fn load_model_part(dir: &Path, part: ModelPart) -> Result<Model, LoadError> {
    load_shard(
        dir,
        Shard {
            rank: 0,
            size: 1,
            part: Some(part),
            format: LinearFormat::F32,
        },
    )
}

/// Loads `shard` of the language model in `dir` through its family's loader.
pub fn load_shard(dir: &Path, shard: Shard) -> Result<Model, LoadError> {
    assert!(
        shard.rank < shard.size,
        "rank {} of a group of {}",
        shard.rank,
        shard.size
    );
    let config = ConfigJson::read(dir)?;
    match family::family_of(&config)?.load {
        family::Loader::Language(load) => Ok(Model::new(load(&config, dir, shard)?)),
        family::Loader::Features => Err(LoadError::Unsupported {
            path: config.path().to_path_buf(),
            reason: "an LMUFormer takes feature frames, not tokens: run it with `tideway run --input FEATURES.safetensors`, `tideway bench` or `tideway serve`".into(),
        }),
    }
}

/// Layers (blocks) of the model in `dir`, from its configuration alone.
pub fn model_layers(dir: &Path) -> Result<usize, LoadError> {
    let config = ConfigJson::read(dir)?;
    let top = config.top();
    if config.model_type()? == Some("lmuformer") {
        return top.usize_req("depths");
    }
    match top.usize_opt("num_hidden_layers")? {
        Some(n) => Ok(n),
        None => top.usize_req("n_layer"),
    }
}

/// The part `shard` asks for (the whole model when it names none), refused when it is not a
/// part of a model of `num_layers` layers.
pub(crate) fn part_of(
    config: &ConfigJson,
    shard: &Shard,
    num_layers: usize,
) -> Result<ModelPart, LoadError> {
    let part = shard
        .part
        .clone()
        .unwrap_or_else(|| ModelPart::whole(num_layers));
    if part.layers.end > num_layers {
        return Err(config.unsupported(format!(
            "layers {:?} are not a part of a model of {num_layers} layers",
            part.layers
        )));
    }
    Ok(part)
}

/// The checkpoint in `dir`, set to read only rank `rank` of `size`'s slices as `split` says.
pub(crate) fn open_sharded(
    dir: &Path,
    rank: usize,
    size: usize,
    split: fn(&Checkpoint, &str) -> Option<crate::checkpoint::Split>,
) -> Result<Checkpoint, LoadError> {
    let mut checkpoint = Checkpoint::open(dir)?;
    checkpoint.set_shard(Some(crate::checkpoint::TensorShard { rank, size, split }));
    Ok(checkpoint)
}

/// Whether the checkpoint in `dir` is an LMUFormer (`model_type` `"lmuformer"`), a model of
/// feature frames rather than tokens.
pub fn is_lmuformer(dir: &Path) -> Result<bool, LoadError> {
    Ok(ConfigJson::read(dir)?.model_type()? == Some("lmuformer"))
}

/// Loads an LMUFormer checkpoint: `config.json` (SPEC-MODELS.md §9) beside safetensors files
/// or one `torch.save` file with the reference's names.
pub fn load_lmuformer(dir: &Path) -> Result<LmuFormer, LoadError> {
    load_lmuformer_piece(dir, None)
}

/// Loads the part of an LMUFormer checkpoint that one pipeline stage runs (blocks
/// `part.layers`, the patch embedding and head where it holds them).
pub fn load_lmuformer_part(dir: &Path, part: ModelPart) -> Result<LmuFormer, LoadError> {
    load_lmuformer_piece(dir, Some(part))
}

fn load_lmuformer_piece(dir: &Path, part: Option<ModelPart>) -> Result<LmuFormer, LoadError> {
    let config = ConfigJson::read(dir)?;
    match config.model_type()? {
        Some("lmuformer") => {}
        other => {
            return Err(config.malformed(format!(
                "model_type must be \"lmuformer\" for a feature model, found {other:?}"
            )));
        }
    }
    let lmu_config = LmuFormerConfig::from_config(&config)?;
    let frontend = crate::tokenizers::Frontend::load(&config)?;
    if let Some(f) = &frontend
        && f.feature_width() != lmu_config.in_channels
    {
        let what = match f {
            crate::tokenizers::Frontend::Audio(_) => "num_mel_bins is",
            crate::tokenizers::Frontend::Sensor(_) => "feature rows (patch_len × channels) have",
        };
        return Err(config.malformed(format!(
            "frontend {what} {} but the model takes {} input channels",
            f.feature_width(),
            lmu_config.in_channels
        )));
    }
    if let Some(part) = &part
        && part.layers.end > lmu_config.depths
    {
        return Err(config.malformed(format!(
            "blocks {:?} asked for, but the model has {} (\"depths\")",
            part.layers, lmu_config.depths
        )));
    }
    let gate = crate::prune::frames::FrameGate::from_config(&config)?;
    let part = part.unwrap_or_else(|| ModelPart::whole(lmu_config.depths));
    let dict = crate::state_dict::StateDict::open(dir)?;
    let mut model = LmuFormer::load_part(lmu_config, &dict, part)?;
    model.set_frontend(frontend);
    model
        .set_frame_gate(gate)
        .map_err(|reason| config.unsupported(format!("tideway_frame_gate: {reason}")))?;
    Ok(model)
}
