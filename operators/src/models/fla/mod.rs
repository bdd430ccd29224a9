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

pub mod deltanet;
pub mod gated_deltanet;
pub mod gla;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod linear_attn;
pub mod retnet;

use std::ops::Range;

use tideway_kernels::Tensor;
use tideway_kernels::Weight;
use tideway_kernels::norm::rms_norm;

use crate::checkpoint::{Checkpoint, Split};
use crate::error::{ForwardError, InputError, LoadError};
use crate::layers::lm_ends::{EndsLayout, LmEnds};
use crate::layers::mlp::{GatedMlp, default_intermediate, mlp_split};
use crate::models::config::ConfigJson;
use crate::models::family::{FamilyState, LanguageFamily, SessionState, Shard};
use crate::models::fla::deltanet::{
    DeltaNetConfig, DeltaNetLayerState, DeltaNetMixer, QkActivation, QkNorm,
};
use crate::models::fla::gated_deltanet::{
    GatedDeltaNetConfig, GatedDeltaNetLayerState, GatedDeltaNetMixer,
};
use crate::models::fla::gla::{DecayKind, FeatureMap, GlaConfig, GlaLayerState, GlaMixer};
use crate::models::fla::linear_attn::{
    FeatureMapKind, LinearAttnConfig, LinearAttnLayerState, LinearAttnMixer,
};
use crate::models::{ModelPart, open_sharded, part_of};
use crate::tensor_parallel::{Group, ResidualStream, ladder_layers, split_count};

#[derive(Debug, Clone, PartialEq)]
pub enum FlaMixerConfig {
    Gla(GlaConfig),
    DeltaNet(DeltaNetConfig),
    GatedDeltaNet(GatedDeltaNetConfig),
    LinearAttn(LinearAttnConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub intermediate_size: usize,
    pub norm_eps: f32,
    pub tie_embeddings: bool,
    pub mixer: FlaMixerConfig,
    /// Ladder-wired layers (`ladder_layers`, `shared/SPEC-MODELS.md` §5), one flag per layer.
    pub ladder: Vec<bool>,
}

impl FlaConfig {
    pub fn from_config(config: &ConfigJson) -> Result<Self, LoadError> {
        let top = config.top();
        let model_type = config.model_type()?.unwrap_or_default().to_string();
        // Options that change the computation and that Tideway does not implement.
        for key in ["attn", "attnres_block_size"] {
            if top.has(key) {
                return Err(config.unsupported(format!(
                    "option {key:?} is set (hybrid softmax-attention layers / attention residuals); Tideway serves pure linear-attention stacks"
                )));
            }
        }
        if let Some(act) = top.str_opt("hidden_act")?
            && act != "swish"
            && act != "silu"
        {
            return Err(config.unsupported(format!(
                "hidden_act {act:?}: the MLP and output gate support \"swish\""
            )));
        }
        if top.bool_opt("elementwise_affine")? == Some(false) {
            return Err(config
                .unsupported("elementwise_affine false (norms without weights) is not supported"));
        }
        let hidden = top.usize_req("hidden_size")?;
        let ratio = top.whole_opt("hidden_ratio")?.unwrap_or(4);
        let norm_eps = match top.f64_opt("norm_eps")? {
            Some(e) => e,
            None => top.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        } as f32;
        let mixer = match model_type.as_str() {
            "gla" => {
                if top.bool_opt("use_gk")? == Some(false) || top.bool_opt("use_gv")? == Some(true) {
                    return Err(config.unsupported(
                        "use_gk false / use_gv true: Tideway's GLA implements the key gate (use_gk) only",
                    ));
                }
                let (heads, kv_heads) = head_counts(config, 4)?;
                let dim = |key: &str, default: f64| {
                    expanded_head_dim(config, hidden, heads, key, default)
                };
                let feature_map = gla_feature_map(config)?;
                FlaMixerConfig::Gla(GlaConfig {
                    d_model: hidden,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_k_dim: dim("expand_k", 0.5)?,
                    head_v_dim: dim("expand_v", 1.0)?,
                    use_short_conv: top.bool_opt("use_short_conv")?.unwrap_or(false),
                    conv_size: top.usize_opt("conv_size")?.unwrap_or(4),
                    conv_bias: top.bool_opt("conv_bias")?.unwrap_or(false),
                    use_output_gate: top.bool_opt("use_output_gate")?.unwrap_or(true),
                    feature_map,
                    clamp_min: top.f64_opt("clamp_min")?.map(|v| v as f32),
                    norm_eps,
                    decay: DecayKind::KeyGate,
                    first_head: 0,
                })
            }
            "delta_net" => {
                let heads = top.usize_opt("num_heads")?.unwrap_or(16);
                let dim = |key: &str, default: f64| {
                    expanded_head_dim(config, hidden, heads, key, default)
                };
                let qk_activation = match top.str_opt("qk_activation")?.unwrap_or("silu") {
                    "silu" => QkActivation::Silu,
                    "relu" => QkActivation::Relu,
                    "elu" => QkActivation::EluPlusOne,
                    "identity" => QkActivation::Identity,
                    other => {
                        return Err(config.unsupported(format!(
                            "qk_activation {other:?}; supported: silu, relu, elu, identity"
                        )));
                    }
                };
                let qk_norm = match top.str_opt("qk_norm")?.unwrap_or("l2") {
                    "l2" => QkNorm::L2,
                    "sum" => QkNorm::Sum,
                    other => {
                        return Err(
                            config.unsupported(format!("qk_norm {other:?}; supported: l2, sum"))
                        );
                    }
                };
                FlaMixerConfig::DeltaNet(DeltaNetConfig {
                    d_model: hidden,
                    num_heads: heads,
                    head_k_dim: dim("expand_k", 1.0)?,
                    head_v_dim: dim("expand_v", 1.0)?,
                    use_short_conv: top.bool_opt("use_short_conv")?.unwrap_or(true),
                    conv_size: top.usize_opt("conv_size")?.unwrap_or(4),
                    conv_bias: top.bool_opt("conv_bias")?.unwrap_or(false),
                    qk_activation,
                    qk_norm,
                    use_beta: top.bool_opt("use_beta")?.unwrap_or(true),
                    allow_neg_eigval: top.bool_opt("allow_neg_eigval")?.unwrap_or(false),
                    use_gate: top.bool_opt("use_gate")?.unwrap_or(false),
                    norm_eps,
                })
            }
            "retnet" => {
                let (heads, kv_heads) = head_counts(config, 8)?;
                let dim = |key: &str, default: f64| {
                    expanded_head_dim(config, hidden, heads, key, default)
                };
                let feature_map = gla_feature_map(config)?;
                FlaMixerConfig::Gla(GlaConfig {
                    d_model: hidden,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_k_dim: dim("expand_k", 1.0)?,
                    head_v_dim: dim("expand_v", 2.0)?,
                    // fla's RetNet block builds MultiScaleRetention without the config's
                    // use_short_conv / conv_size (modeling_retnet.py): the reference never
                    // has short convs, whatever the config says, and neither do we.
                    use_short_conv: false,
                    conv_size: 4,
                    conv_bias: false,
                    use_output_gate: top.bool_opt("use_output_gate")?.unwrap_or(true),
                    feature_map,
                    clamp_min: None,
                    norm_eps,
                    decay: DecayKind::Retention,
                    first_head: 0,
                })
            }
            "linear_attn" => {
                let (heads, kv_heads) = head_counts(config, 4)?;
                let dim = |key: &str, default: f64| {
                    expanded_head_dim(config, hidden, heads, key, default)
                };
                let map = top.str_opt("feature_map")?.unwrap_or("elementwise_product");
                let feature_map = FeatureMapKind::parse(map).ok_or_else(|| {
                    config.unsupported(format!(
                        "feature_map {map:?}; supported: elementwise_product, hedgehog, t2r, dpfp, elu, relu, identity"
                    ))
                })?;
                FlaMixerConfig::LinearAttn(LinearAttnConfig {
                    d_model: hidden,
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_k_dim: dim("expand_k", 1.0)?,
                    head_v_dim: dim("expand_v", 1.0)?,
                    feature_map,
                    norm_q: top.bool_opt("norm_q")?.unwrap_or(false),
                    norm_k: top.bool_opt("norm_k")?.unwrap_or(false),
                    normalize: top.bool_opt("norm_feature_map")?.unwrap_or(false),
                    norm_eps,
                })
            }
            "gated_deltanet" => {
                let heads = top.usize_opt("num_heads")?.unwrap_or(6);
                let v_heads = top.usize_opt("num_v_heads")?.unwrap_or(heads);
                if v_heads < heads || !v_heads.is_multiple_of(heads) {
                    return Err(config.malformed(format!(
                        "num_v_heads {v_heads} must be a multiple of num_heads {heads}"
                    )));
                }
                let head_dim = top.usize_opt("head_dim")?.unwrap_or(256);
                let dv = head_dim as f64 * top.f64_opt("expand_v")?.unwrap_or(2.0);
                if (dv - dv.round()).abs() > 1e-6 || dv < 1.0 {
                    return Err(config
                        .malformed(format!("head_dim × expand_v = {dv} must be a whole number")));
                }
                FlaMixerConfig::GatedDeltaNet(GatedDeltaNetConfig {
                    d_model: hidden,
                    num_heads: heads,
                    num_v_heads: v_heads,
                    head_k_dim: head_dim,
                    head_v_dim: dv.round() as usize,
                    use_short_conv: top.bool_opt("use_short_conv")?.unwrap_or(true),
                    conv_size: top.usize_opt("conv_size")?.unwrap_or(4),
                    conv_bias: top.bool_opt("conv_bias")?.unwrap_or(false),
                    allow_neg_eigval: top.bool_opt("allow_neg_eigval")?.unwrap_or(false),
                    use_gate: top.bool_opt("use_gate")?.unwrap_or(true),
                    norm_eps,
                })
            }
            other => {
                return Err(LoadError::UnknownModelType {
                    path: config.path().to_path_buf(),
                    model_type: other.to_string(),
                });
            }
        };
        let num_layers = top.usize_req("num_hidden_layers")?;
        Ok(FlaConfig {
            model_type,
            hidden_size: hidden,
            num_layers,
            ladder: ladder_layers(config, num_layers)?,
            vocab_size: top.usize_req("vocab_size")?,
            intermediate_size: top
                .usize_opt("intermediate_size")?
                .unwrap_or_else(|| default_intermediate(hidden, ratio)),
            norm_eps,
            tie_embeddings: top.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            mixer,
        })
    }
}

impl FlaConfig {
    /// The configuration of rank `rank` of `size` tensor-parallel ranks: each holds
    /// `1/size` of the heads (and of the key/value heads) and of the MLP's width.
    pub fn for_rank(
        &self,
        config: &ConfigJson,
        rank: usize,
        size: usize,
    ) -> Result<Self, LoadError> {
        let split = |what: &str, n: usize| split_count(config, what, n, size);
        let mut c = self.clone();
        c.intermediate_size = split("the MLP width (intermediate_size)", self.intermediate_size)?;
        match &mut c.mixer {
            FlaMixerConfig::Gla(m) => {
                m.num_heads = split("num_heads", m.num_heads)?;
                m.num_kv_heads = split("num_kv_heads", m.num_kv_heads)?;
                m.first_head = rank * m.num_heads;
            }
            FlaMixerConfig::DeltaNet(m) => m.num_heads = split("num_heads", m.num_heads)?,
            FlaMixerConfig::GatedDeltaNet(m) => {
                m.num_heads = split("num_heads", m.num_heads)?;
                m.num_v_heads = split("num_v_heads", m.num_v_heads)?;
            }
            FlaMixerConfig::LinearAttn(m) => {
                m.num_heads = split("num_heads", m.num_heads)?;
                m.num_kv_heads = split("num_kv_heads", m.num_kv_heads)?;
            }
        }
        Ok(c)
    }
}

/// The model types of fla's families that Tideway loads.
pub const MODEL_TYPES: &[&str] = &[
    "gla",
    "delta_net",
    "gated_deltanet",
    "retnet",
    "linear_attn",
];

/// Opens rank `rank` of `size` of the fla checkpoint in `dir`: the rank's configuration
/// (heads divided), and the checkpoint set to read only the rank's slices (the CPU and GPU
/// loaders start here).
pub fn open(
    config: &ConfigJson,
    dir: &std::path::Path,
    rank: usize,
    size: usize,
) -> Result<(FlaConfig, Checkpoint), LoadError> {
    let fla = FlaConfig::from_config(config)?.for_rank(config, rank, size)?;
    Ok((fla, open_sharded(dir, rank, size, fla_lm_split)?))
}

/// The registry's loader: `shard` of the fla checkpoint in `dir`.
pub fn load(
    config: &ConfigJson,
    dir: &std::path::Path,
    shard: Shard,
) -> Result<Box<dyn LanguageFamily>, LoadError> {
    let (fla, checkpoint) = open(config, dir, shard.rank, shard.size)?;
    let part = part_of(config, &shard, fla.num_layers)?;
    Ok(Box::new(FlaLm::load_part(fla, &checkpoint, part)?))
}

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

enum FlaMixer {
    Gla(GlaMixer),
    DeltaNet(DeltaNetMixer),
    GatedDeltaNet(GatedDeltaNetMixer),
    LinearAttn(LinearAttnMixer),
}

/// One session's state in one layer.
#[derive(Debug, Clone, PartialEq)]
pub enum FlaLayerState {
    Gla(GlaLayerState),
    DeltaNet(DeltaNetLayerState),
    GatedDeltaNet(GatedDeltaNetLayerState),
    LinearAttn(LinearAttnLayerState),
}

/// One session's recurrent state: every layer's matrix state and conv windows.
#[derive(Debug, Clone, PartialEq)]
pub struct FlaState {
    pub layers: Vec<FlaLayerState>,
    pub position: usize,
}

struct FlaBlock {
    attn_norm: Weight,
    attn: FlaMixer,
    mlp_norm: Weight,
    mlp: GatedMlp,
}

pub struct FlaLm {
    pub config: FlaConfig,
    /// The layers, embedding and head this placement holds.
    part: ModelPart,
    /// Blocks `part.layers`, in order.
    blocks: Vec<FlaBlock>,
    /// The embedding and the final norm and head, where the part holds them.
    ends: LmEnds,
}

impl FlaLm {
    /// Loads the whole model.
    pub fn load(config: FlaConfig, checkpoint: &Checkpoint) -> Result<Self, LoadError> {
        let part = ModelPart::whole(config.num_layers);
        Self::load_part(config, checkpoint, part)
    }

    /// Loads only `part`: its blocks, and the embedding or the head where it holds them.
    pub fn load_part(
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
                let attn = match &config.mixer {
                    FlaMixerConfig::Gla(c) => {
                        FlaMixer::Gla(GlaMixer::load(checkpoint, &format!("{p}attn."), c.clone())?)
                    }
                    FlaMixerConfig::DeltaNet(c) => FlaMixer::DeltaNet(DeltaNetMixer::load(
                        checkpoint,
                        &format!("{p}attn."),
                        c.clone(),
                    )?),
                    FlaMixerConfig::GatedDeltaNet(c) => FlaMixer::GatedDeltaNet(
                        GatedDeltaNetMixer::load(checkpoint, &format!("{p}attn."), c.clone())?,
                    ),
                    FlaMixerConfig::LinearAttn(c) => FlaMixer::LinearAttn(LinearAttnMixer::load(
                        checkpoint,
                        &format!("{p}attn."),
                        c.clone(),
                    )?),
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
        let ends = LmEnds::load(checkpoint, layout, &part)?;
        Ok(FlaLm {
            config,
            part,
            blocks,
            ends,
        })
    }
}

fn head_counts(config: &ConfigJson, default_heads: usize) -> Result<(usize, usize), LoadError> {
    let top = config.top();
    let heads = top.usize_opt("num_heads")?.unwrap_or(default_heads);
    let kv_heads = top.usize_opt("num_kv_heads")?.unwrap_or(heads);
    if !heads.is_multiple_of(kv_heads) {
        return Err(config.malformed(format!(
            "num_heads {heads} is not a multiple of num_kv_heads {kv_heads}"
        )));
    }
    Ok((heads, kv_heads))
}

/// Per-head width `hidden_size × config[key] / heads` (fla's `expand_k` / `expand_v`), which
/// must come out whole.
fn expanded_head_dim(
    config: &ConfigJson,
    hidden: usize,
    heads: usize,
    key: &str,
    default: f64,
) -> Result<usize, LoadError> {
    let d = hidden as f64 * config.top().f64_opt(key)?.unwrap_or(default);
    if (d - d.round()).abs() > 1e-6 || !(d.round() as usize).is_multiple_of(heads) {
        return Err(config.malformed(format!(
            "hidden_size × {key} = {d} must be a whole multiple of num_heads {heads}"
        )));
    }
    Ok(d.round() as usize / heads)
}

/// The optional elementwise `feature_map` of GLA and RetNet.
fn gla_feature_map(config: &ConfigJson) -> Result<Option<FeatureMap>, LoadError> {
    match config.top().str_opt("feature_map")? {
        None => Ok(None),
        Some(name) => FeatureMap::parse(name).map(Some).ok_or_else(|| {
            config.unsupported(format!(
                "feature_map {name:?}; supported: swish, relu, sigmoid"
            ))
        }),
    }
}

impl FamilyState for FlaState {
    fn position(&self) -> usize {
        self.position
    }
}

impl LanguageFamily for FlaLm {
    fn family(&self) -> &'static str {
        MODEL_TYPES
            .iter()
            .find(|t| **t == self.config.model_type)
            .copied()
            .unwrap_or("fla")
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn logits_width(&self) -> usize {
        self.ends.logits_width()
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn num_layers(&self) -> usize {
        self.config.num_layers
    }

    fn part(&self) -> &ModelPart {
        &self.part
    }

    fn ladder(&self) -> &[bool] {
        &self.config.ladder
    }

    fn set_ladder(&mut self, ladder: Vec<bool>) {
        self.config.ladder = ladder;
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, InputError> {
        self.ends.embed(tokens)
    }

    fn head(&self, residual: &[f32]) -> Result<Tensor, InputError> {
        self.ends.head(residual)
    }

    fn new_state(&self) -> SessionState {
        SessionState::new(FlaState {
            layers: self
                .blocks
                .iter()
                .map(|b| match &b.attn {
                    FlaMixer::Gla(m) => FlaLayerState::Gla(m.new_state()),
                    FlaMixer::DeltaNet(m) => FlaLayerState::DeltaNet(m.new_state()),
                    FlaMixer::GatedDeltaNet(m) => FlaLayerState::GatedDeltaNet(m.new_state()),
                    FlaMixer::LinearAttn(m) => FlaLayerState::LinearAttn(m.new_state()),
                })
                .collect(),
            position: 0,
        })
    }

    fn state_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| match &b.attn {
                FlaMixer::Gla(m) => m.state_bytes(),
                FlaMixer::DeltaNet(m) => m.state_bytes(),
                FlaMixer::GatedDeltaNet(m) => m.state_bytes(),
                FlaMixer::LinearAttn(m) => m.state_bytes(),
            })
            .sum()
    }

    fn weight_bytes(&self) -> usize {
        self.ends.weight_bytes()
            + self
                .blocks
                .iter()
                .map(|b| {
                    b.attn_norm.size_bytes()
                        + b.mlp_norm.size_bytes()
                        + b.mlp.size_bytes()
                        + match &b.attn {
                            FlaMixer::Gla(m) => m.weight_bytes(),
                            FlaMixer::DeltaNet(m) => m.weight_bytes(),
                            FlaMixer::GatedDeltaNet(m) => m.weight_bytes(),
                            FlaMixer::LinearAttn(m) => m.weight_bytes(),
                        }
                })
                .sum::<usize>()
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
        let mut normed = vec![0.0f32; m * d];
        for (i, block) in self.blocks.iter().enumerate() {
            let ladder = self.config.ladder[self.part.layers.start + i];
            rms_norm(
                stream.read(ladder, group)?,
                d,
                block.attn_norm.as_slice(),
                eps,
                &mut normed,
            );
            let mut delta = vec![0.0f32; m * d];
            fn layer_states<'s, T>(
                states: &'s mut [&mut FlaState],
                i: usize,
                pick: fn(&mut FlaLayerState) -> Option<&mut T>,
            ) -> Result<Vec<&'s mut T>, InputError> {
                states
                    .iter_mut()
                    .map(|s| pick(&mut s.layers[i]).ok_or(InputError::WrongState))
                    .collect()
            }
            match &block.attn {
                FlaMixer::Gla(mixer) => {
                    let mut layer = layer_states(states, i, |l| match l {
                        FlaLayerState::Gla(l) => Some(l),
                        _ => None,
                    })?;
                    mixer.forward(&normed, segments, &starts, &mut layer, &mut delta);
                }
                FlaMixer::DeltaNet(mixer) => {
                    let mut layer = layer_states(states, i, |l| match l {
                        FlaLayerState::DeltaNet(l) => Some(l),
                        _ => None,
                    })?;
                    mixer.forward(&normed, segments, &mut layer, &mut delta);
                }
                FlaMixer::GatedDeltaNet(mixer) => {
                    let mut layer = layer_states(states, i, |l| match l {
                        FlaLayerState::GatedDeltaNet(l) => Some(l),
                        _ => None,
                    })?;
                    mixer.forward(&normed, segments, &mut layer, &mut delta);
                }
                FlaMixer::LinearAttn(mixer) => {
                    let mut layer = layer_states(states, i, |l| match l {
                        FlaLayerState::LinearAttn(l) => Some(l),
                        _ => None,
                    })?;
                    mixer.forward(&normed, segments, &mut layer, &mut delta);
                }
            }
            stream.push(delta, ladder, group)?;
            rms_norm(
                stream.read(ladder, group)?,
                d,
                block.mlp_norm.as_slice(),
                eps,
                &mut normed,
            );
            let mut delta = vec![0.0f32; m * d];
            block.mlp.forward(&normed, m, &mut delta);
            stream.push(delta, ladder, group)?;
        }
        for (state, segment) in states.iter_mut().zip(segments) {
            state.position += segment.len();
        }
        Ok(())
    }
}
