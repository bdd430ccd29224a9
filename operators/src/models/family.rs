//! The model trait every CPU language-model family implements once, its per-session state,
//! and the registry that maps config.json's `model_type` to the family that loads it.
//!
//! A model is run in pieces so that a pipeline can cut it anywhere between layers: `embed`
//! (the first piece) starts the residual stream, `forward_layers` runs the layers the loaded
//! part holds over a packed batch, `head` (the last piece) gives the logits. A family is one
//! folder under `models/` (config, CPU model, mixers, GPU model) plus one line in
//! [`FAMILIES`].

use std::any::Any;
use std::fmt::Debug;
use std::ops::Range;
use std::path::Path;

use tideway_kernels::Tensor;
use tideway_kernels::matmul::LinearFormat;

use crate::checkpoint::Checkpoint;
use crate::error::{ForwardError, InputError, LoadError};
use crate::layers::lm_ends::{EndsLayout, LmEnds};
use crate::models::config::ConfigJson;
use crate::models::{ModelPart, fla, mamba, part_of};
use crate::state_tensors::{LayerFields, StateError, StateTensors, export_layers, import_layers};
use crate::tensor_parallel::{Group, ResidualStream};

/// What every family's language model keeps besides its blocks: its name and widths, the part
/// it was loaded for, its ladder wiring, and the embedding and the final norm and head (where
/// the part holds them). A family hands it to [`LanguageFamily::frame`], which answers the
/// trait's accessors.
pub struct LmFrame {
    pub family: &'static str,
    pub num_layers: usize,
    /// The layers, embedding and head this placement holds.
    pub part: ModelPart,
    /// Which layers of the whole model are ladder-wired.
    pub ladder: Vec<bool>,
    pub ends: LmEnds,
}

impl LmFrame {
    /// Loads the ends that `part` holds, as `layout` names them.
    pub fn load(
        checkpoint: &Checkpoint,
        family: &'static str,
        layout: EndsLayout<'_>,
        num_layers: usize,
        ladder: Vec<bool>,
        part: ModelPart,
    ) -> Result<Self, LoadError> {
        Ok(LmFrame {
            family,
            num_layers,
            ends: LmEnds::load(checkpoint, layout, &part)?,
            part,
            ladder,
        })
    }

    /// Whether the part's `i`-th layer is ladder-wired.
    pub fn ladder_at(&self, i: usize) -> bool {
        self.ladder[self.part.layers.start + i]
    }
}

/// A language model of one family, loaded for one placement (a tensor-parallel rank's shard
/// of a part of its layers). A family implements the layers; its [`LmFrame`] answers the rest.
pub trait LanguageFamily: Any + Send + Sync {
    /// The name, widths, part, ladder and ends the family loaded.
    fn frame(&self) -> &LmFrame;
    fn frame_mut(&mut self) -> &mut LmFrame;
    /// A fresh session's state for the part's layers.
    fn new_state(&self) -> SessionState;
    /// Bytes of one session's state for the part's layers.
    fn state_bytes(&self) -> usize;
    /// Bytes of the parameters of the part's layers (the ends are counted by the frame).
    fn layer_weight_bytes(&self) -> usize;
    /// The part's layers over a packed batch (`segments`: each session's rows of the stream);
    /// `states` advance by their rows.
    fn forward_layers(
        &self,
        stream: &mut ResidualStream,
        segments: &[Range<usize>],
        states: &mut [&mut SessionState],
        group: &mut Group<'_>,
    ) -> Result<(), ForwardError>;

    /// The family's name as `ModelInfo` reports it (config.json's `model_type`).
    fn family(&self) -> &'static str {
        self.frame().family
    }
    /// Ids accepted as input: `0..vocab_size`.
    fn vocab_size(&self) -> usize {
        self.frame().ends.vocab_size()
    }
    /// Columns of the logits (a padded vocabulary may be wider).
    fn logits_width(&self) -> usize {
        self.frame().ends.logits_width()
    }
    /// Width of the residual stream.
    fn hidden_size(&self) -> usize {
        self.frame().ends.hidden_size()
    }
    /// Layers of the whole model (the part may hold fewer).
    fn num_layers(&self) -> usize {
        self.frame().num_layers
    }
    /// The layers, embedding and head this placement holds.
    fn part(&self) -> &ModelPart {
        &self.frame().part
    }
    /// Which layers of the whole model are ladder-wired.
    fn ladder(&self) -> &[bool] {
        &self.frame().ladder
    }
    fn set_ladder(&mut self, ladder: Vec<bool>) {
        self.frame_mut().ladder = ladder;
    }
    /// Bytes of the parameters this placement holds.
    fn weight_bytes(&self) -> usize {
        self.frame().ends.weight_bytes() + self.layer_weight_bytes()
    }
    /// The first piece: the embedding rows of `tokens` (`[T, hidden]`).
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, InputError> {
        self.frame().ends.embed(tokens)
    }
    /// The last piece: the final norm and the head over the settled stream (`[T, hidden]`).
    fn head(&self, residual: &[f32]) -> Result<Tensor, InputError> {
        self.frame().ends.head(residual)
    }
}

/// A family's state of one session, as the serving layers hold it without knowing the family.
pub trait FamilyState: Any + Send + Debug + CloneState {
    /// Tokens consumed so far.
    fn position(&self) -> usize;
    /// Writes the state of the layers it holds (the part's first is layer `first` of the
    /// whole model) and the position.
    fn export(&self, first: usize, out: &mut StateTensors);
    /// Takes the state of the layers it holds, and the position, from `from`.
    fn import(&mut self, first: usize, from: &StateTensors) -> Result<(), StateError>;
    /// Back to a fresh state (zeros, position 0), keeping its memory.
    fn reset(&mut self);
}

/// One session's recurrent state in a family whose layers each keep an `L`: the state of every
/// layer the part holds, and how many tokens the session has consumed. Constant in size
/// whatever the sequence length.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStates<L> {
    pub layers: Vec<L>,
    pub position: usize,
}

impl<L: Debug + Clone + Send + LayerFields + 'static> FamilyState for LayerStates<L> {
    fn position(&self) -> usize {
        self.position
    }

    fn export(&self, first: usize, out: &mut StateTensors) {
        export_layers(&self.layers, first, out);
        out.put_u64("position", self.position as u64);
    }

    fn import(&mut self, first: usize, from: &StateTensors) -> Result<(), StateError> {
        import_layers(&mut self.layers, first, from)?;
        self.position = from.u64("position")? as usize;
        Ok(())
    }

    fn reset(&mut self) {
        for layer in &mut self.layers {
            for (_, values) in layer.fields_mut() {
                values.fill(0.0);
            }
        }
        self.position = 0;
    }
}

/// Copies a state behind the trait object (a family's state is `Clone`).
pub trait CloneState {
    fn clone_state(&self) -> Box<dyn FamilyState>;
}

impl<T: FamilyState + Clone> CloneState for T {
    fn clone_state(&self) -> Box<dyn FamilyState> {
        Box::new(self.clone())
    }
}

/// One session's recurrent state for the family (and part) that made it.
#[derive(Debug)]
pub struct SessionState(Box<dyn FamilyState>);

impl Clone for SessionState {
    fn clone(&self) -> Self {
        SessionState(self.0.clone_state())
    }
}

impl SessionState {
    pub fn new(state: impl FamilyState) -> Self {
        SessionState(Box::new(state))
    }

    /// Tokens consumed so far.
    pub fn position(&self) -> usize {
        self.0.position()
    }

    /// Writes the state (of layers `first..`) as named tensors.
    pub fn export(&self, first: usize, out: &mut StateTensors) {
        self.0.export(first, out)
    }

    /// Takes the state (of layers `first..`) from named tensors.
    pub fn import(&mut self, first: usize, from: &StateTensors) -> Result<(), StateError> {
        self.0.import(first, from)
    }

    /// Back to a fresh state (zeros, position 0), keeping its memory: a pool of states hands
    /// it to the next session.
    pub fn reset(&mut self) {
        self.0.reset()
    }

    /// The state as the family's own type `S`, if that is its family's.
    pub fn downcast_ref<S: FamilyState>(&self) -> Option<&S> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref::<S>()
    }

    /// Every state as the family's own type `S`, or [`InputError::WrongState`] if one was made
    /// by another family.
    pub fn downcast_all<'s, S: FamilyState>(
        states: &'s mut [&mut SessionState],
    ) -> Result<Vec<&'s mut S>, InputError> {
        states
            .iter_mut()
            .map(|s| {
                let any: &mut dyn Any = &mut *s.0;
                any.downcast_mut::<S>().ok_or(InputError::WrongState)
            })
            .collect()
    }
}

/// How a family loads: the `model_type` values it answers to, its loader, and its GPU
/// model's loader (feature `cuda`; None where the family's GPU model is not a language model
/// behind this registry).
pub struct Family {
    pub model_types: &'static [&'static str],
    pub load: Loader,
    #[cfg(feature = "cuda")]
    pub load_gpu: Option<GpuLoader>,
}

/// A family's GPU loader.
#[cfg(feature = "cuda")]
pub type GpuLoader = fn(
    config: &ConfigJson,
    dir: &Path,
    placement: crate::gpu::GpuPlacement,
) -> Result<crate::gpu::GpuModel, crate::gpu::GpuModelError>;

/// A family's loader: a language model (a rank's shard of a part), or a feature model, which
/// has its own loader (`load_lmuformer`) and front end.
pub enum Loader {
    Language(LanguageLoader),
    Features,
}

/// The checkpoint side of a CPU language-model family: how a tensor-parallel rank opens its
/// shard of the checkpoint (the rank's configuration, and the checkpoint set to read only its
/// slices; the GPU model opens it the same way), and how a part of the model loads from it.
pub trait Checkpointed: LanguageFamily + Sized {
    type Config;
    fn open(
        config: &ConfigJson,
        dir: &Path,
        rank: usize,
        size: usize,
    ) -> Result<(Self::Config, Checkpoint), LoadError>;
    /// Layers of the whole model, from its configuration.
    fn config_layers(config: &Self::Config) -> usize;
    fn load_part(
        config: Self::Config,
        checkpoint: &Checkpoint,
        part: ModelPart,
    ) -> Result<Self, LoadError>;
}

/// The registry's loader of family `F`: `shard` of the checkpoint in `dir`.
pub fn load_family<F: Checkpointed>(
    config: &ConfigJson,
    dir: &Path,
    shard: Shard,
) -> Result<Box<dyn LanguageFamily>, LoadError> {
    let (family_config, mut checkpoint) = F::open(config, dir, shard.rank, shard.size)?;
    checkpoint.set_linear_format(shard.format);
    let part = part_of(config, &shard, F::config_layers(&family_config))?;
    Ok(Box::new(F::load_part(family_config, &checkpoint, part)?))
}

/// A language-model family's loader: `shard` of the checkpoint in `dir` whose configuration
/// is `config`.
pub type LanguageLoader =
    fn(config: &ConfigJson, dir: &Path, shard: Shard) -> Result<Box<dyn LanguageFamily>, LoadError>;

/// Which slice of a model a placement loads: rank `rank` of a tensor-parallel group of
/// `size`, holding `part`, with its linear layers' weights in `format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
    pub part: Option<ModelPart>,
    /// How the linear layers keep their weights (`--dtype` on the CPU).
    pub format: LinearFormat,
}

/// The families Tideway loads. A new family is one folder plus one line here.
pub const FAMILIES: &[Family] = &[
    Family {
        model_types: &["mamba"],
        load: Loader::Language(load_family::<mamba::MambaLm>),
        #[cfg(feature = "cuda")]
        load_gpu: Some(crate::gpu::load_gpu_family::<mamba::gpu::GpuMambaLm>),
    },
    Family {
        model_types: fla::MODEL_TYPES,
        load: Loader::Language(load_family::<fla::FlaLm>),
        #[cfg(feature = "cuda")]
        load_gpu: Some(crate::gpu::load_gpu_family::<fla::gpu::GpuFlaLm>),
    },
    // The LMUFormer's GPU model takes the CPU model's parameters (`GpuLmuFormer::upload`).
    Family {
        model_types: &["lmuformer"],
        load: Loader::Features,
        #[cfg(feature = "cuda")]
        load_gpu: None,
    },
];

/// The family that loads the checkpoint whose configuration is `config`.
pub fn family_of(config: &ConfigJson) -> Result<&'static Family, LoadError> {
    let model_type = match config.model_type()? {
        Some(t) => t,
        // The original state-spaces Mamba checkpoints carry a minimal config without it.
        None if config.has("d_model") && config.has("n_layer") => "mamba",
        None => {
            return Err(config.malformed(
                "no \"model_type\" key (and not a state-spaces Mamba config with \"d_model\" and \"n_layer\")",
            ));
        }
    };
    FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&model_type))
        .ok_or_else(|| LoadError::UnknownModelType {
            path: config.path().to_path_buf(),
            model_type: model_type.to_string(),
        })
}
