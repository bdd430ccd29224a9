//! flash-linear-attention language models (`fla/models/*/modeling_*.py`), the wrapper shared
//! by the linear-attention family (`shared/SPEC-MODELS.md` §3.0):
//!
//! ```text
//! h = embed(ids)
//! for each block:  h = h + attn(RMSNorm(h));  h = h + GatedMLP(RMSNorm(h))
//! logits = lm_head(RMSNorm(h))
//! ```
//!
//! Families: GLA (`model_type: gla`), DeltaNet (`delta_net`), Gated DeltaNet
//! (`gated_deltanet`), linear attention (`linear_attn`), RetNet (`retnet`, the GLA mixer with a fixed decay and RoPE). Options Tideway does not implement are refused at load,
//! by name, never ignored.

pub mod config;
pub mod deltanet;
pub mod gated_deltanet;
pub mod gla;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod graphs;
pub mod linear_attn;
pub mod mixer;
pub mod retnet;

use std::ops::Range;

use tideway_kernels::Weight;
use tideway_kernels::norm::rms_norm;
use tideway_kernels::zeroed::zeroed;

use crate::checkpoint::{Checkpoint, Split};
use crate::error::{ForwardError, LoadError};
use crate::layers::lm_ends::EndsLayout;
use crate::layers::mlp::{GatedMlp, mlp_split};
use crate::models::config::ConfigJson;
use crate::models::family::{Checkpointed, LanguageFamily, LayerStates, LmFrame, SessionState};
use crate::models::fla::deltanet::DeltaNetMixer;
use crate::models::fla::gated_deltanet::GatedDeltaNetMixer;
use crate::models::fla::gla::{DecayKind, GlaMixer};
use crate::models::fla::linear_attn::LinearAttnMixer;
pub use crate::models::fla::mixer::FlaLayerState;
use crate::models::fla::mixer::TokenMixer;
use crate::models::{ModelPart, open_sharded};
use crate::prune::prefill::{
    PrefillPrune, PrefillPruneError, PrunedHidden, PrunedPrefillError, Survivors, select,
};
use crate::tensor_parallel::{Group, ResidualStream};
pub use config::{FlaConfig, FlaMixerConfig};

/// The model types of fla's families that Tideway loads.
pub const MODEL_TYPES: &[&str] = &[
    "gla",
    "delta_net",
    "gated_deltanet",
    "retnet",
    "linear_attn",
];

/// How a tensor-parallel rank holds the model's tensors: heads split (their projections
/// column-parallel, `o_proj` row-parallel), the MLP split, the rest whole.
pub fn fla_lm_split(checkpoint: &Checkpoint, name: &str) -> Option<Split> {
    let rest = name.strip_prefix("model.layers.")?.split_once('.')?.1;
    if let Some(mlp) = rest.strip_prefix("mlp.") {
        let prefix = &name[..name.len() - mlp.len()];
        return mlp_split(checkpoint, prefix, mlp);
    }
    let attn = rest.strip_prefix("attn.")?;
    let rows = Some(Split::Rows { segments: 1 });
    match attn {
        "o_proj.weight" => Some(Split::Columns),
        "q_proj.weight" | "k_proj.weight" | "v_proj.weight" | "g_proj.weight" | "b_proj.weight"
        | "a_proj.weight" | "A_log" | "dt_bias" | "gk_proj.1.weight" | "gk_proj.1.bias" => rows,
        _ if ["q_conv1d.", "k_conv1d.", "v_conv1d."]
            .iter()
            .any(|c| attn.starts_with(c)) =>
        {
            rows
        }
        // Per-head-dim norms, the gate's low-rank input half, feature-map layers: shared by
        // every head, so whole on every rank.
        _ => None,
    }
}

/// One session's recurrent state: every layer's matrix state and conv windows.
pub type FlaState = LayerStates<FlaLayerState>;

struct FlaBlock {
    attn_norm: Weight,
    attn: Box<dyn TokenMixer>,
    mlp_norm: Weight,
    mlp: GatedMlp,
}

pub struct FlaLm {
    pub config: FlaConfig,
    /// Blocks `frame.part.layers`, in order.
    blocks: Vec<FlaBlock>,
    frame: LmFrame,
}

impl FlaLm {
    /// Loads the whole model.
    pub fn load(config: FlaConfig, checkpoint: &Checkpoint) -> Result<Self, LoadError> {
        let part = ModelPart::whole(config.num_layers);
        <Self as Checkpointed>::load_part(config, checkpoint, part)
    }
}

/// The rank's configuration (heads divided) and the checkpoint set to read only the rank's
/// slices; the blocks of a part and the ends it holds.
impl Checkpointed for FlaLm {
    type Config = FlaConfig;

    fn open(
        config: &ConfigJson,
        dir: &std::path::Path,
        rank: usize,
        size: usize,
    ) -> Result<(FlaConfig, Checkpoint), LoadError> {
        let fla = FlaConfig::from_config(config)?.for_rank(config, rank, size)?;
        Ok((fla, open_sharded(dir, rank, size, fla_lm_split)?))
    }

    fn config_layers(config: &FlaConfig) -> usize {
        config.num_layers
    }

    fn load_part(
        config: FlaConfig,
        checkpoint: &Checkpoint,
        part: ModelPart,
    ) -> Result<Self, LoadError> {
        let (d, v) = (config.hidden_size, config.vocab_size);
        let blocks = part
            .layers
            .clone()
            .map(|i| {
                let p = format!("model.layers.{i}.");
                let prefix = format!("{p}attn.");
                let attn: Box<dyn TokenMixer> = match &config.mixer {
                    FlaMixerConfig::Gla(c) => {
                        Box::new(GlaMixer::load(checkpoint, &prefix, c.clone())?)
                    }
                    FlaMixerConfig::DeltaNet(c) => {
                        Box::new(DeltaNetMixer::load(checkpoint, &prefix, c.clone())?)
                    }
                    FlaMixerConfig::GatedDeltaNet(c) => {
                        Box::new(GatedDeltaNetMixer::load(checkpoint, &prefix, c.clone())?)
                    }
                    FlaMixerConfig::LinearAttn(c) => {
                        Box::new(LinearAttnMixer::load(checkpoint, &prefix, c.clone())?)
                    }
                };
                Ok(FlaBlock {
                    attn_norm: checkpoint.load(&format!("{p}attn_norm.weight"), &[d])?,
                    attn,
                    mlp_norm: checkpoint.load(&format!("{p}mlp_norm.weight"), &[d])?,
                    mlp: GatedMlp::load(
                        checkpoint,
                        &format!("{p}mlp."),
                        d,
                        config.intermediate_size,
                    )?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let layout = EndsLayout {
            embedding: "model.embeddings.weight",
            norm: "model.norm.weight",
            head: "lm_head.weight",
            tied: config.tie_embeddings || !checkpoint.contains("lm_head.weight"),
            hidden: d,
            vocab: v,
            rows: v,
            norm_eps: config.norm_eps,
        };
        let family = MODEL_TYPES
            .iter()
            .find(|t| **t == config.model_type)
            .copied()
            .unwrap_or("fla");
        let ladder = config.ladder.clone();
        let frame = LmFrame::load(checkpoint, family, layout, config.num_layers, ladder, part)?;
        Ok(FlaLm {
            config,
            blocks,
            frame,
        })
    }
}

impl LanguageFamily for FlaLm {
    fn frame(&self) -> &LmFrame {
        &self.frame
    }

    fn frame_mut(&mut self) -> &mut LmFrame {
        &mut self.frame
    }

    fn new_state(&self) -> SessionState {
        SessionState::new(FlaState {
            layers: self.blocks.iter().map(|b| b.attn.new_state()).collect(),
            position: 0,
        })
    }

    fn state_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.attn.new_state().size_bytes())
            .sum()
    }

    fn layer_weight_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| {
                b.attn_norm.size_bytes()
                    + b.mlp_norm.size_bytes()
                    + b.mlp.size_bytes()
                    + b.attn.weight_bytes()
            })
            .sum()
    }

    /// This part's layers over the packed batch (`segments`: each session's rows of the
    /// stream); `states` hold these layers, and advance by their rows.
    fn forward_layers(
        &self,
        stream: &mut ResidualStream,
        segments: &[Range<usize>],
        states: &mut [&mut SessionState],
        group: &mut Group<'_>,
    ) -> Result<(), ForwardError> {
        let states = &mut SessionState::downcast_all::<FlaState>(states)?[..];
        let d = self.config.hidden_size;
        let m = segments.last().map_or(0, |s| s.end);
        let starts: Vec<usize> = states.iter().map(|s| s.position).collect();
        let eps = self.config.norm_eps;
        let mut normed = zeroed(m * d);
        for (i, block) in self.blocks.iter().enumerate() {
            let ladder = self.frame.ladder_at(i);
            rms_norm(
                stream.read(ladder, group)?,
                d,
                block.attn_norm.as_slice(),
                eps,
                &mut normed,
            );
            let mut delta = stream.output_buffer(m * d);
            let mut layer: Vec<&mut FlaLayerState> =
                states.iter_mut().map(|s| &mut s.layers[i]).collect();
            block
                .attn
                .forward(&normed, segments, &starts, &mut layer, &mut delta);
            stream.push(delta, ladder, group)?;
            rms_norm(
                stream.read(ladder, group)?,
                d,
                block.mlp_norm.as_slice(),
                eps,
                &mut normed,
            );
            let mut delta = stream.output_buffer(m * d);
            block.mlp.forward(&normed, m, &mut delta);
            stream.push(delta, ladder, group)?;
        }
        for (state, segment) in states.iter_mut().zip(segments) {
            state.position += segment.len();
        }
        Ok(())
    }
}

impl FlaLm {
    /// Layer `layer`'s per-head token mixing over its attention input `u` (`[T, D]`, after
    /// the block's norm) as matrices (GLA and RetNet; None for the others).
    pub fn head_attention(&self, layer: usize, u: &[f32]) -> Option<graphs::HeadAttention> {
        let i = layer.checked_sub(self.frame.part.layers.start)?;
        let t = u.len() / self.config.hidden_size;
        Some(self.blocks.get(i)?.attn.head_mixing(u)?.attention(0..t))
    }

    /// Why this placement cannot prune its prefill, if it cannot: the pruner needs every
    /// layer and both ends in one process, plain residual wiring, and token graphs (built for
    /// GLA and RetNet).
    pub fn why_no_pruning(&self) -> Option<String> {
        if self.frame.part != ModelPart::whole(self.config.num_layers) {
            Some("pruning needs the whole model in one place (not a pipeline stage's part)".into())
        } else if self.frame.ladder.iter().any(|&l| l) {
            Some("pruning does not run on ladder-wired layers".into())
        } else if self
            .blocks
            .iter()
            .any(|b| b.attn.head_mixing(&[]).is_none())
        {
            Some(format!(
                "the {} family's token graphs are not built (Mamba's, GLA's, RetNet's, DeltaNet's and Gated DeltaNet's are)",
                self.frame.family
            ))
        } else {
            None
        }
    }

    /// Whether this model can prune its prefill as `prune` says (its layers and heads).
    pub fn check_pruning(&self, prune: &PrefillPrune) -> Result<(), PrefillPruneError> {
        // The model's heads (value heads), which the setting's heads group.
        let heads = match &self.config.mixer {
            FlaMixerConfig::Gla(gla) => gla.num_heads,
            FlaMixerConfig::DeltaNet(delta) => delta.num_heads,
            FlaMixerConfig::GatedDeltaNet(gated) => gated.num_v_heads,
            FlaMixerConfig::LinearAttn(linear) => linear.num_heads,
        };
        let why_not = self.why_no_pruning();
        prune.check_for(self.config.num_layers, heads, why_not.as_deref())
    }

    /// Whether a session can go on from a pruned prompt: RetNet's rotary positions after a
    /// pruning layer count the survivors, while the next token's position counts every
    /// prompt token, so its distances to the survivors would be wrong.
    pub fn why_no_session_pruning(&self) -> Option<&'static str> {
        match &self.config.mixer {
            FlaMixerConfig::Gla(gla) if gla.decay == DecayKind::Retention => Some(
                "a session going on from a pruned prompt (RetNet's rotary positions would count the survivors in the prompt and every token after it)",
            ),
            _ => None,
        }
    }

    /// A fresh prefill of `ids` pruned as `prune` says (SPEC-MODELS §6.3), up to the head:
    /// after each pruning layer only the survivors' rows go on, and each later layer runs
    /// over the survivors from a fresh state (RetNet's positions count the survivors); the
    /// state each layer is left in is the session's.
    pub fn prefill_pruned_hidden(
        &self,
        ids: &[u32],
        prune: &PrefillPrune,
    ) -> Result<PrunedHidden, PrunedPrefillError> {
        self.check_pruning(prune)?;
        let layers = self.config.num_layers;
        let d = self.config.hidden_size;
        let eps = self.config.norm_eps;
        let mut residual = self.frame.ends.embed(ids)?;
        let mut survivors = Survivors::all(ids.len());
        let mut states = FlaState {
            layers: Vec::with_capacity(layers),
            position: ids.len(),
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let rows = survivors.kept.len();
            let mut attn_in = vec![0.0f32; rows * d];
            rms_norm(&residual, d, block.attn_norm.as_slice(), eps, &mut attn_in);
            let mut delta = vec![0.0f32; rows * d];
            let mut state = block.attn.new_state();
            let whole = 0..rows;
            block.attn.forward(
                &attn_in,
                std::slice::from_ref(&whole),
                &[0],
                &mut [&mut state],
                &mut delta,
            );
            states.layers.push(state);
            residual.iter_mut().zip(&delta).for_each(|(r, x)| *r += x);
            let mut mlp_in = vec![0.0f32; rows * d];
            rms_norm(&residual, d, block.mlp_norm.as_slice(), eps, &mut mlp_in);
            block.mlp.forward(&mlp_in, rows, &mut delta);
            residual.iter_mut().zip(&delta).for_each(|(r, x)| *r += x);
            if prune.layers.contains(&i) {
                let heads = block
                    .attn
                    .head_mixing(&attn_in)
                    .expect("checked by why_no_pruning");
                let graphs = graphs::Heads(heads);
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
