//! The Mamba (v1) language model: embedding, `num_layers` pre-norm residual blocks around the
//! selective-SSM mixer, a final RMSNorm and the LM head (`shared/SPEC-MODELS.md` §1.4;
//! `MambaForCausalLM` in HF transformers, `MambaLMHeadModel` in state-spaces/mamba).
//!
//! ```text
//! r = embed(ids)
//! for each block:  r = r + mixer(rms_norm(r))
//! logits = rms_norm_f(r) · lm_headᵀ
//! ```
//!
//! Both checkpoint layouts load (§1.5): HF transformers (`backbone.embeddings`,
//! `hidden_size`/`num_hidden_layers`/`state_size`… keys, pre-padded vocab) and the original
//! state-spaces one (`backbone.embedding`, `d_model`/`n_layer`/`ssm_cfg`, vocab padded to
//! `pad_vocab_size_multiple`). A tied head (`lm_head.weight` absent or tied) reuses the
//! embedding.

#[cfg(feature = "cuda")]
pub mod gpu;
pub mod graphs;
pub mod mixer;

use std::ops::Range;

use tideway_kernels::Weight;
use tideway_kernels::norm::rms_norm;

use crate::checkpoint::{Checkpoint, Split};
use crate::error::{ForwardError, LoadError};
use crate::layers::lm_ends::EndsLayout;
use crate::models::config::ConfigJson;
use crate::models::family::{Checkpointed, LanguageFamily, LayerStates, LmFrame, SessionState};
use crate::models::mamba::mixer::{
    MambaLayerState, MambaMixer, MambaMixerConfig, MixerScratch, mamba_split,
};
use crate::models::{ModelPart, open_sharded};
use crate::prune::prefill::{
    PrefillPrune, PrefillPruneError, PrunedHidden, PrunedPrefillError, Survivors, select,
};
use crate::tensor_parallel::{Group, ResidualStream, ladder_layers, single, split_count};

/// Rows per chunk when a long sequence is prefilled: bounds the activations of one pass
/// (`chunk × 2E` floats per layer) while keeping the GEMMs large. 512 since gemm packs the
/// weights on every call (`kernels/src/matmul.rs`): at 512 rows the packing costs half of
/// what it did at 256 (BENCHMARKS.md, issue 20).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Which public layout the checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MambaLayout {
    /// HF transformers `MambaForCausalLM`.
    HfTransformers,
    /// state-spaces/mamba `MambaLMHeadModel`.
    StateSpaces,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MambaConfig {
    pub layout: MambaLayout,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Ids accepted as input: `0..vocab_size` (the config's `vocab_size`).
    pub vocab_size: usize,
    /// Rows of the embedding and of the logits (`vocab_size` padded in the original layout).
    pub padded_vocab_size: usize,
    pub norm_eps: f32,
    pub tie_embeddings: bool,
    pub mixer: MambaMixerConfig,
    /// Name of the embedding tensor in this checkpoint.
    pub embedding_name: String,
    /// Ladder-wired layers (`ladder_layers`, `shared/SPEC-MODELS.md` §5), one flag per layer.
    pub ladder: Vec<bool>,
}

impl MambaConfig {
    /// Reads either layout's `config.json`; the checkpoint answers what the config leaves open
    /// (whether `in_proj` has a bias, which embedding name is used).
    pub fn from_config(config: &ConfigJson, checkpoint: &Checkpoint) -> Result<Self, LoadError> {
        let top = config.top();
        let layout = if config.model_type()?.is_some() {
            MambaLayout::HfTransformers
        } else {
            MambaLayout::StateSpaces
        };
        let embedding_name = ["backbone.embeddings.weight", "backbone.embedding.weight"]
            .into_iter()
            .find(|n| checkpoint.contains(n))
            .unwrap_or(match layout {
                MambaLayout::HfTransformers => "backbone.embeddings.weight",
                MambaLayout::StateSpaces => "backbone.embedding.weight",
            })
            .to_string();
        let has_in_proj_bias = checkpoint.contains("backbone.layers.0.mixer.in_proj.bias");
        match layout {
            MambaLayout::HfTransformers => {
                if let Some(act) = top.str_opt("hidden_act")?
                    && act != "silu"
                {
                    return Err(config.unsupported(format!(
                        "hidden_act {act:?} is not supported; Mamba uses \"silu\""
                    )));
                }
                let hidden = top.usize_req("hidden_size")?;
                let expand = top.whole_opt("expand")?.unwrap_or(2);
                let vocab = top.usize_req("vocab_size")?;
                let num_layers = top.usize_req("num_hidden_layers")?;
                Ok(MambaConfig {
                    layout,
                    hidden_size: hidden,
                    num_layers,
                    ladder: ladder_layers(config, num_layers)?,
                    vocab_size: vocab,
                    padded_vocab_size: vocab,
                    norm_eps: top.f64_opt("layer_norm_epsilon")?.unwrap_or(1e-5) as f32,
                    tie_embeddings: top.bool_opt("tie_word_embeddings")?.unwrap_or(true),
                    mixer: MambaMixerConfig {
                        d_model: hidden,
                        d_inner: top
                            .usize_opt("intermediate_size")?
                            .unwrap_or(expand * hidden),
                        d_state: top.usize_opt("state_size")?.unwrap_or(16),
                        d_conv: top.usize_opt("conv_kernel")?.unwrap_or(4),
                        dt_rank: top
                            .usize_or_auto("time_step_rank")?
                            .unwrap_or(hidden.div_ceil(16)),
                        // HF's default for a missing use_bias changed across versions: the
                        // checkpoint itself says whether the bias is there.
                        bias: top.bool_opt("use_bias")?.unwrap_or(has_in_proj_bias),
                        conv_bias: top.bool_opt("use_conv_bias")?.unwrap_or(true),
                    },
                    embedding_name,
                })
            }
            MambaLayout::StateSpaces => {
                let ssm = config.section("ssm_cfg")?;
                if let Some(layer) = ssm.str_opt("layer")?
                    && layer != "Mamba1"
                {
                    return Err(config.unsupported(format!(
                        "ssm_cfg.layer {layer:?} is not supported; this loader reads \"Mamba1\""
                    )));
                }
                if top.bool_opt("rms_norm")? == Some(false) {
                    return Err(config.unsupported(
                        "rms_norm false (LayerNorm blocks) is not supported; Mamba checkpoints use RMSNorm",
                    ));
                }
                if top.count_opt("d_intermediate")?.unwrap_or(0) != 0 {
                    return Err(config.unsupported(
                        "d_intermediate > 0 (an MLP in every block) is not supported; Mamba-1 LMs have none",
                    ));
                }
                let hidden = top.usize_req("d_model")?;
                let vocab = top.usize_req("vocab_size")?;
                let multiple = top.usize_opt("pad_vocab_size_multiple")?.unwrap_or(8);
                let expand = ssm.whole_opt("expand")?.unwrap_or(2);
                let num_layers = top.usize_req("n_layer")?;
                Ok(MambaConfig {
                    layout,
                    hidden_size: hidden,
                    num_layers,
                    ladder: ladder_layers(config, num_layers)?,
                    vocab_size: vocab,
                    padded_vocab_size: vocab.div_ceil(multiple) * multiple,
                    norm_eps: 1e-5,
                    tie_embeddings: top.bool_opt("tie_embeddings")?.unwrap_or(true),
                    mixer: MambaMixerConfig {
                        d_model: hidden,
                        d_inner: expand * hidden,
                        d_state: ssm.usize_opt("d_state")?.unwrap_or(16),
                        d_conv: ssm.usize_opt("d_conv")?.unwrap_or(4),
                        dt_rank: ssm.usize_or_auto("dt_rank")?.unwrap_or(hidden.div_ceil(16)),
                        bias: ssm.bool_opt("bias")?.unwrap_or(false),
                        conv_bias: ssm.bool_opt("conv_bias")?.unwrap_or(true),
                    },
                    embedding_name,
                })
            }
        }
    }
}

impl MambaConfig {
    /// The configuration of one of `size` tensor-parallel ranks: each holds `d_inner / size`
    /// channels of every mixer.
    pub fn for_rank(&self, config: &ConfigJson, size: usize) -> Result<Self, LoadError> {
        let mut rank = self.clone();
        rank.mixer.d_inner = split_count(
            config,
            "the mixer's channels (d_inner)",
            self.mixer.d_inner,
            size,
        )?;
        Ok(rank)
    }
}

/// How a tensor-parallel rank holds the model's tensors: mixers sharded, the rest whole.
pub fn mamba_lm_split(_: &Checkpoint, name: &str) -> Option<Split> {
    let rest = name.strip_prefix("backbone.layers.")?.split_once('.')?.1;
    mamba_split(rest.strip_prefix("mixer.")?)
}

/// One session's recurrent state: every layer's conv window and SSM state.
pub type MambaState = LayerStates<MambaLayerState>;

struct MambaBlock {
    norm: Weight,
    mixer: MambaMixer,
}

pub struct MambaLm {
    pub config: MambaConfig,
    /// Blocks `frame.part.layers`, in order.
    blocks: Vec<MambaBlock>,
    frame: LmFrame,
}

impl MambaLm {
    /// Loads the whole model.
    pub fn load(config: MambaConfig, checkpoint: &Checkpoint) -> Result<Self, LoadError> {
        let part = ModelPart::whole(config.num_layers);
        <Self as Checkpointed>::load_part(config, checkpoint, part)
    }

    /// Why this placement cannot prune its prefill, if it cannot: the pruner needs every
    /// layer and both ends in one process, and plain residual wiring.
    pub fn why_no_pruning(&self) -> Option<&'static str> {
        if self.frame.part != ModelPart::whole(self.config.num_layers) {
            Some("pruning needs the whole model in one place (not a pipeline stage's part)")
        } else if self.config.ladder.iter().any(|&l| l) {
            Some("pruning does not run on ladder-wired layers")
        } else {
            None
        }
    }

    /// Whether this model can prune its prefill as `prune` says (its layers and channels).
    pub fn check_pruning(&self, prune: &PrefillPrune) -> Result<(), PrefillPruneError> {
        let layers = self.config.num_layers;
        prune.check_for(layers, self.config.mixer.d_inner, self.why_no_pruning())
    }

    /// A fresh prefill of `ids` pruned as `prune` says (SPEC-MODELS §6.3), up to the head:
    /// after each pruning layer only the survivors' rows of the residual stream go on, and
    /// each later mixer scans the survivors from a fresh state, as if the pruned tokens had
    /// never been there; the state each mixer is left in is the session's.
    pub fn prefill_pruned_hidden(
        &self,
        ids: &[u32],
        prune: &PrefillPrune,
    ) -> Result<PrunedHidden, PrunedPrefillError> {
        self.check_pruning(prune)?;
        let layers = self.config.num_layers;
        let d = self.config.hidden_size;
        let mut residual = self.frame.ends.embed(ids)?;
        let mut survivors = Survivors::all(ids.len());
        let mut states = MambaState {
            layers: Vec::with_capacity(layers),
            position: ids.len(),
        };
        let mut scratch = MixerScratch::default();
        for (i, block) in self.blocks.iter().enumerate() {
            let rows = survivors.kept.len();
            let mut normed = vec![0.0f32; rows * d];
            rms_norm(
                &residual,
                d,
                block.norm.as_slice(),
                self.config.norm_eps,
                &mut normed,
            );
            let mut mixed = vec![0.0f32; rows * d];
            let mut state = block.mixer.new_state();
            single(|group| {
                let whole = 0..rows;
                block.mixer.forward(
                    &normed,
                    std::slice::from_ref(&whole),
                    &mut [&mut state],
                    group,
                    &mut scratch,
                    &mut mixed,
                )?;
                Ok(())
            })?;
            states.layers.push(state);
            residual.iter_mut().zip(&mixed).for_each(|(r, m)| *r += m);
            if prune.layers.contains(&i) {
                let graphs = block.mixer.token_graphs(&normed);
                let chosen = select(prune, i, layers, rows, &residual, d, &graphs)?;
                survivors.keep(&chosen, &mut residual, d);
            }
        }
        Ok(PrunedHidden {
            survivors,
            residual,
            state: SessionState::new(states),
        })
    }
}

/// The rank's configuration (heads divided) and the checkpoint set to read only the rank's
/// slices; the blocks of a part and the ends it holds.
impl Checkpointed for MambaLm {
    type Config = MambaConfig;

    fn open(
        config: &ConfigJson,
        dir: &std::path::Path,
        rank: usize,
        size: usize,
    ) -> Result<(MambaConfig, Checkpoint), LoadError> {
        let checkpoint = open_sharded(dir, rank, size, mamba_lm_split)?;
        let mamba = MambaConfig::from_config(config, &checkpoint)?.for_rank(config, size)?;
        Ok((mamba, checkpoint))
    }

    fn config_layers(config: &MambaConfig) -> usize {
        config.num_layers
    }

    fn load_part(
        config: MambaConfig,
        checkpoint: &Checkpoint,
        part: ModelPart,
    ) -> Result<Self, LoadError> {
        let d = config.hidden_size;
        let blocks = part
            .layers
            .clone()
            .map(|i| {
                let prefix = format!("backbone.layers.{i}.");
                Ok(MambaBlock {
                    norm: checkpoint.load(&format!("{prefix}norm.weight"), &[d])?,
                    mixer: MambaMixer::load(checkpoint, &format!("{prefix}mixer."), config.mixer)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let layout = EndsLayout {
            embedding: &config.embedding_name,
            norm: "backbone.norm_f.weight",
            head: "lm_head.weight",
            tied: config.tie_embeddings,
            hidden: d,
            vocab: config.vocab_size,
            rows: config.padded_vocab_size,
            norm_eps: config.norm_eps,
        };
        let ladder = config.ladder.clone();
        let frame = LmFrame::load(checkpoint, "mamba", layout, config.num_layers, ladder, part)?;
        Ok(MambaLm {
            config,
            blocks,
            frame,
        })
    }
}

impl LanguageFamily for MambaLm {
    fn frame(&self) -> &LmFrame {
        &self.frame
    }

    fn frame_mut(&mut self) -> &mut LmFrame {
        &mut self.frame
    }

    fn new_state(&self) -> SessionState {
        SessionState::new(MambaState {
            layers: self.blocks.iter().map(|b| b.mixer.new_state()).collect(),
            position: 0,
        })
    }

    fn state_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.mixer.state_bytes()).sum()
    }

    fn layer_weight_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.norm.size_bytes() + b.mixer.weight_bytes())
            .sum()
    }

    fn forward_layers(
        &self,
        stream: &mut ResidualStream,
        segments: &[Range<usize>],
        states: &mut [&mut SessionState],
        group: &mut Group<'_>,
    ) -> Result<(), ForwardError> {
        let mut states = SessionState::downcast_all::<MambaState>(states)?;
        let d = self.config.hidden_size;
        let m = segments.last().map_or(0, |s| s.end);
        let mut normed = vec![0.0f32; m * d];
        let mut scratch = MixerScratch::default();
        for (i, block) in self.blocks.iter().enumerate() {
            let ladder = self.frame.ladder_at(i);
            let eps = self.config.norm_eps;
            rms_norm(
                stream.read(ladder, group)?,
                d,
                block.norm.as_slice(),
                eps,
                &mut normed,
            );
            let mut layer_states: Vec<&mut MambaLayerState> =
                states.iter_mut().map(|s| &mut s.layers[i]).collect();
            let mut mixed = stream.output_buffer(m * d);
            block.mixer.forward(
                &normed,
                segments,
                &mut layer_states,
                group,
                &mut scratch,
                &mut mixed,
            )?;
            stream.push(mixed, ladder, group)?;
        }
        for (state, segment) in states.iter_mut().zip(segments) {
            state.position += segment.len();
        }
        Ok(())
    }
}
