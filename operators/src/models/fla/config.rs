//! fla's model configuration (`config.json` of `GLAForCausalLM`, `DeltaNetForCausalLM`,
//! `GatedDeltaNetForCausalLM`, `RetNetForCausalLM`, `LinearAttentionForCausalLM`): the mixer's
//! options read and checked, fla options Tideway does not implement refused by name, and a
//! tensor-parallel rank's share of the heads.

use super::deltanet::{DeltaNetConfig, QkActivation, QkNorm};
use super::gated_deltanet::GatedDeltaNetConfig;
use super::gla::{DecayKind, FeatureMap, GlaConfig};
use super::linear_attn::{FeatureMapKind, LinearAttnConfig};
use crate::error::LoadError;
use crate::layers::mlp::default_intermediate;
use crate::models::config::ConfigJson;
use crate::tensor_parallel::{ladder_layers, split_count};

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
