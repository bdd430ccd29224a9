//! Prefill pruning (../shared/SPEC-MODELS.md §6.3): after each chosen layer, only the tokens a
//! policy keeps go on to the later layers (their recurrences run over the survivors, as in
//! DeciMamba). This file holds the setting ([`PrefillPrune`], read from a `--prune` spec or a
//! config.json block, bad ones refused by name) and the choice of survivors over a layer's
//! tokens ([`select`]); a family supplies its layer's token graphs through [`TokenGraphs`].
//!
//! ```
//! use tideway_operators::prune::prefill::{PrefillPrune, Policy};
//! let prune: PrefillPrune = "layers=2,keep=0.5,window=64,recent=8".parse().unwrap();
//! assert_eq!(prune.policy, Policy::ZeroTPrune);
//! assert!("keep=1.5".parse::<PrefillPrune>().unwrap_err().to_string().contains("keep"));
//! ```
//!
//! Windows: a layer's tokens are cut into consecutive windows of `window` tokens (the last may
//! be shorter), and each keeps `⌈keep · len⌉` of its own (never fewer than its protected ones):
//! the graphs are `O(window²)` per head, so a 4k-token prompt is pruned window by window.
//! Protected: the sequence's first token and its `recent` last ones (§6.3).

use std::ops::Range;
use std::str::FromStr;

use serde_json::Value;

use super::baselines::{random, stride, top_scores, tor_importance};
use super::zero_tprune::{PruneError, ZeroTPrune, default_iterations, zero_tprune};
use crate::error::LoadError;
use crate::models::config::ConfigJson;

/// Which tokens survive a pruning layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Zero-TPrune's I′ → S → I over the layer's token graphs, causal form (§6.3).
    ZeroTPrune,
    /// A seeded uniform choice.
    Random,
    /// Evenly spaced tokens.
    Stride,
    /// DeciMamba's score ‖Δ_t‖ (Ben-Kish et al., ICLR 2025); Mamba only.
    DeciMamba,
    /// ToR's importance `Σ_d max(h_td, 0)` of the layer's output (Zhan et al., EMNLP 2024).
    Tor,
}

impl Policy {
    pub const NAMES: &'static str = "zero_tprune, random, stride, decimamba, tor";

    pub fn name(self) -> &'static str {
        match self {
            Policy::ZeroTPrune => "zero_tprune",
            Policy::Random => "random",
            Policy::Stride => "stride",
            Policy::DeciMamba => "decimamba",
            Policy::Tor => "tor",
        }
    }
}

/// How a model prunes its prefill. Off unless configured.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillPrune {
    /// Layers after which tokens are pruned (0-based, ascending, each before the last layer).
    pub layers: Vec<usize>,
    /// Fraction of each window's tokens kept at each pruning layer, in (0, 1].
    pub keep: f64,
    /// Tokens per graph window, ≥ 2.
    pub window: usize,
    /// The input's most recent tokens, always kept (as is its first token).
    pub recent: usize,
    /// Groups of channels (Mamba) or of the model's (value) heads (fla families) that play the
    /// heads' part; must divide them.
    pub heads: usize,
    /// Fraction of a window the S stage may drop as near-duplicates, in [0, 0.5].
    pub similar: f64,
    /// WPR iterations of the I stage; `None`: the paper's count for the layer
    /// ([`default_iterations`]) capped at 5 — a causal graph drains its mass into the first
    /// token over many iterations (§6.3: "at most a few").
    pub iterations: Option<usize>,
    pub policy: Policy,
    /// Seed of the random policy (each window and layer draws from its own stream).
    pub seed: u64,
}

impl Default for PrefillPrune {
    fn default() -> Self {
        PrefillPrune {
            layers: vec![1],
            keep: 0.5,
            window: 128,
            recent: 16,
            heads: 4,
            similar: 0.1,
            iterations: None,
            policy: Policy::ZeroTPrune,
            seed: 0,
        }
    }
}

/// A pruning setting that cannot be used, named by its key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrefillPruneError {
    #[error(
        "unknown prune setting {key:?}; the settings are {}",
        PrefillPrune::KEYS
    )]
    UnknownKey { key: String },
    #[error("prune setting {key} = {value:?} is not allowed: {allowed}")]
    BadValue {
        key: &'static str,
        value: String,
        allowed: String,
    },
    #[error("prune setting {item:?} is not KEY=VALUE")]
    NotKeyValue { item: String },
    #[error("the {family} family cannot prune its prefill yet: its token graphs are not built")]
    Family { family: String },
}

impl PrefillPrune {
    pub const KEYS: &'static str =
        "layers, keep, window, recent, heads, similar, iterations, policy, seed";

    /// Sets `key` from its text, checking the value on its own (a model checks the rest:
    /// [`PrefillPrune::check_for`]).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), PrefillPruneError> {
        let bad = |key: &'static str, allowed: &str| PrefillPruneError::BadValue {
            key,
            value: value.to_string(),
            allowed: allowed.to_string(),
        };
        match key {
            "layers" => {
                let layers: Option<Vec<usize>> =
                    value.split('+').map(|l| l.trim().parse().ok()).collect();
                match layers {
                    Some(l) if !l.is_empty() && l.windows(2).all(|w| w[0] < w[1]) => {
                        self.layers = l
                    }
                    _ => return Err(bad("layers", "layer indices joined by '+', ascending")),
                }
            }
            "keep" => match value.parse::<f64>() {
                Ok(k) if k > 0.0 && k <= 1.0 => self.keep = k,
                _ => return Err(bad("keep", "a fraction in (0, 1]")),
            },
            "window" => match value.parse::<usize>() {
                Ok(w) if w >= 2 => self.window = w,
                _ => return Err(bad("window", "a whole number of tokens, at least 2")),
            },
            "recent" => match value.parse::<usize>() {
                Ok(r) => self.recent = r,
                _ => return Err(bad("recent", "a whole number of tokens")),
            },
            "heads" => match value.parse::<usize>() {
                Ok(h) if h >= 1 => self.heads = h,
                _ => return Err(bad("heads", "a whole number, at least 1")),
            },
            "similar" => match value.parse::<f64>() {
                Ok(s) if (0.0..=0.5).contains(&s) => self.similar = s,
                _ => return Err(bad("similar", "a fraction in [0, 0.5]")),
            },
            "iterations" => match value.parse::<usize>() {
                Ok(i) if i >= 1 => self.iterations = Some(i),
                _ => return Err(bad("iterations", "a whole number, at least 1")),
            },
            "policy" => {
                self.policy = match value {
                    "zero_tprune" => Policy::ZeroTPrune,
                    "random" => Policy::Random,
                    "stride" => Policy::Stride,
                    "decimamba" => Policy::DeciMamba,
                    "tor" => Policy::Tor,
                    _ => return Err(bad("policy", &format!("one of {}", Policy::NAMES))),
                }
            }
            "seed" => match value.parse::<u64>() {
                Ok(s) => self.seed = s,
                _ => return Err(bad("seed", "a whole number")),
            },
            other => {
                return Err(PrefillPruneError::UnknownKey {
                    key: other.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks the setting against a model of `layers` layers and `channels` channels per
    /// layer (the heads divide them), and whether the model can prune at all (`why_not`).
    pub fn check_for(
        &self,
        layers: usize,
        channels: usize,
        why_not: Option<&str>,
    ) -> Result<(), PrefillPruneError> {
        let bad = |key: &'static str, value: String, allowed: String| {
            Err(PrefillPruneError::BadValue {
                key,
                value,
                allowed,
            })
        };
        if let Some(reason) = why_not {
            return bad("layers", format!("{:?}", self.layers), reason.to_string());
        }
        if let Some(&l) = self.layers.iter().find(|&&l| l + 1 >= layers) {
            return bad(
                "layers",
                l.to_string(),
                format!(
                    "a layer before the model's last ({} layers: 0..={})",
                    layers,
                    layers.saturating_sub(2)
                ),
            );
        }
        if !channels.is_multiple_of(self.heads) {
            return bad(
                "heads",
                self.heads.to_string(),
                format!(
                    "a divisor of the layer's {channels} channels (Mamba) or heads (GLA, RetNet)"
                ),
            );
        }
        Ok(())
    }

    /// The I stage's iterations at `layer` of `layers`.
    pub fn iterations_at(&self, layer: usize, layers: usize) -> usize {
        self.iterations
            .unwrap_or_else(|| default_iterations(layer, layers).min(5))
    }
}

impl PrefillPrune {
    /// The `tideway_prune` object of a model's config.json (`--prune`'s keys, JSON values:
    /// `"layers": [2, 5]`, `"keep": 0.5`) over the default; absent (or null): no pruning.
    pub fn from_config(config: &ConfigJson) -> Result<Option<PrefillPrune>, LoadError> {
        const BLOCK: &str = "tideway_prune";
        let Some(block) = config.raw(BLOCK).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let Some(map) = block.as_object() else {
            return Err(config.malformed(format!("key \"{BLOCK}\" must be an object")));
        };
        let mut prune = PrefillPrune::default();
        for (key, value) in map {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Array(items) => {
                    let parts: Option<Vec<String>> = items
                        .iter()
                        .map(|i| i.as_u64().map(|l| l.to_string()))
                        .collect();
                    parts.map(|p| p.join("+")).unwrap_or_default()
                }
                _ => String::new(),
            };
            prune
                .set(key, &text)
                .map_err(|e| config.malformed(format!("key \"{BLOCK}.{key}\": {e}")))?;
        }
        Ok(Some(prune))
    }
}

/// `KEY=VALUE,KEY=VALUE…` over [`PrefillPrune::default`].
impl FromStr for PrefillPrune {
    type Err = PrefillPruneError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut prune = PrefillPrune::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) =
                item.split_once('=')
                    .ok_or_else(|| PrefillPruneError::NotKeyValue {
                        item: item.to_string(),
                    })?;
            prune.set(key.trim(), value.trim())?;
        }
        Ok(prune)
    }
}

impl std::fmt::Display for PrefillPrune {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layers: Vec<String> = self.layers.iter().map(usize::to_string).collect();
        write!(
            f,
            "layers={},keep={},window={},recent={},heads={},similar={},policy={}",
            layers.join("+"),
            self.keep,
            self.window,
            self.recent,
            self.heads,
            self.similar,
            self.policy.name()
        )?;
        if let Some(i) = self.iterations {
            write!(f, ",iterations={i}")?;
        }
        if self.policy == Policy::Random {
            write!(f, ",seed={}", self.seed)?;
        }
        Ok(())
    }
}

/// Why a pruned prefill did not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrunedPrefillError {
    #[error(transparent)]
    Input(#[from] crate::error::InputError),
    #[error(transparent)]
    Setting(#[from] PrefillPruneError),
    #[error(transparent)]
    Prune(#[from] PruneError),
}

/// A prefill whose tokens were pruned between layers: the input positions that reached the
/// head (ascending), the tokens left after each pruning layer (in the order of
/// [`PrefillPrune::layers`]), and the kept positions' logits (`[kept, width]`).
#[derive(Debug, Clone)]
pub struct PrunedPrefill {
    pub kept: Vec<usize>,
    pub survivors: Vec<usize>,
    pub logits: tideway_kernels::Tensor,
}

/// A pruned prefill stopped before the head: the survivors' rows of the residual stream
/// (`[kept, hidden]`) and the state the layers left, from which a session goes on.
#[derive(Debug)]
pub struct PrunedHidden {
    pub survivors: Survivors,
    pub residual: Vec<f32>,
    pub state: crate::models::SessionState,
}

/// The tokens still going on through a pruned prefill, in input positions, and how many were
/// left after each pruning layer.
#[derive(Debug, Clone, Default)]
pub struct Survivors {
    pub kept: Vec<usize>,
    pub counts: Vec<usize>,
}

impl Survivors {
    /// Every one of `tokens` tokens.
    pub fn all(tokens: usize) -> Self {
        Survivors {
            kept: (0..tokens).collect(),
            counts: Vec::new(),
        }
    }

    /// Keeps the rows `chosen` (ascending, of the current survivors) of the residual stream
    /// `residual` (`[rows, hidden]`).
    pub fn keep(&mut self, chosen: &[usize], residual: &mut Vec<f32>, hidden: usize) {
        let mut rows = Vec::with_capacity(chosen.len() * hidden);
        for &r in chosen {
            rows.extend_from_slice(&residual[r * hidden..][..hidden]);
        }
        *residual = rows;
        self.kept = chosen.iter().map(|&r| self.kept[r]).collect();
        self.counts.push(self.kept.len());
    }

    /// The prefill's result, with the head's logits of the survivors.
    pub fn finish(self, logits: tideway_kernels::Tensor) -> PrunedPrefill {
        PrunedPrefill {
            kept: self.kept,
            survivors: self.counts,
            logits,
        }
    }
}

/// A window's token graphs, for Zero-TPrune.
pub struct WindowGraphs {
    /// `[heads, n, n]`, row i: token i's weights over the tokens j ≤ i it mixes in.
    pub graphs: Vec<f32>,
    /// `[n, key_width]`: what the S stage compares.
    pub keys: Vec<f32>,
    pub key_width: usize,
}

/// What a family's layer offers the pruner over its tokens (SPEC §6.3's graph providers).
pub trait TokenGraphs {
    /// The graphs of the tokens `range` (of the layer's input), in `heads` heads.
    fn window_graphs(&self, range: Range<usize>, heads: usize) -> WindowGraphs;
    /// DeciMamba's score per token, where the family has one.
    fn delta_norms(&self) -> Option<Vec<f64>>;
}

/// The survivors of pruning layer `layer` (of `layers`) over its `tokens` tokens, ascending:
/// `output` is the layer's output (`[tokens, hidden]`: ToR's importance reads it).
pub fn select(
    prune: &PrefillPrune,
    layer: usize,
    layers: usize,
    tokens: usize,
    output: &[f32],
    hidden: usize,
    graphs: &dyn TokenGraphs,
) -> Result<Vec<usize>, PruneError> {
    let whole_scores = match prune.policy {
        Policy::DeciMamba => graphs.delta_norms(),
        Policy::Tor => Some(tor_importance(output, hidden)),
        _ => None,
    };
    let recent_from = tokens.saturating_sub(prune.recent);
    let mut kept = Vec::with_capacity(tokens);
    for (w, start) in (0..tokens).step_by(prune.window).enumerate() {
        let range = start..(start + prune.window).min(tokens);
        let n = range.len();
        let protected: Vec<usize> = range
            .clone()
            .filter(|&i| i == 0 || i >= recent_from)
            .map(|i| i - start)
            .collect();
        let keep = ((prune.keep * n as f64).ceil() as usize).max(protected.len());
        let chosen = if keep >= n {
            (0..n).collect()
        } else {
            match prune.policy {
                Policy::ZeroTPrune => {
                    let window = graphs.window_graphs(range.clone(), prune.heads);
                    let config = ZeroTPrune {
                        causal: true,
                        iterations: prune.iterations_at(layer, layers),
                        keep,
                        drop_similar: ((prune.similar * n as f64) as usize).min(n - keep),
                        protected,
                        ..ZeroTPrune::default()
                    };
                    zero_tprune(
                        &window.graphs,
                        prune.heads,
                        &window.keys,
                        window.key_width,
                        &config,
                    )?
                    .kept
                }
                Policy::Random => {
                    let seed = prune.seed ^ ((layer as u64) << 32) ^ w as u64;
                    random(n, keep, &protected, seed)
                }
                Policy::Stride => stride(n, keep, &protected),
                Policy::DeciMamba | Policy::Tor => match &whole_scores {
                    Some(scores) => top_scores(&scores[range.clone()], keep, &protected),
                    None => return Err(PruneError::NoScore),
                },
            }
        };
        kept.extend(chosen.into_iter().map(|i| i + start));
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_bad_ones_are_refused_by_name() {
        let p: PrefillPrune = "layers=1+3,keep=0.25,window=32,recent=4,policy=stride"
            .parse()
            .unwrap();
        assert_eq!(p.layers, vec![1, 3]);
        assert_eq!(p.policy, Policy::Stride);
        assert_eq!(p.to_string().parse::<PrefillPrune>().unwrap(), p);
        for (spec, key) in [
            ("keep=0", "keep"),
            ("keep=x", "keep"),
            ("layers=3+1", "layers"),
            ("window=1", "window"),
            ("similar=0.6", "similar"),
            ("policy=magic", "policy"),
            ("heads=0", "heads"),
        ] {
            let e = spec.parse::<PrefillPrune>().unwrap_err().to_string();
            assert!(e.contains(key), "{spec}: {e}");
        }
        let e = "depth=3".parse::<PrefillPrune>().unwrap_err().to_string();
        assert!(e.contains("\"depth\"") && e.contains("layers, keep"), "{e}");
        let e = "keep".parse::<PrefillPrune>().unwrap_err().to_string();
        assert!(e.contains("KEY=VALUE"), "{e}");
        // Against a model: 4 layers (the last, 3, cannot prune), 8 channels.
        assert!(
            p.check_for(4, 8, None)
                .unwrap_err()
                .to_string()
                .contains("0..=2")
        );
        let three: PrefillPrune = "layers=2,heads=3".parse().unwrap();
        assert!(
            three
                .check_for(4, 8, None)
                .unwrap_err()
                .to_string()
                .contains("heads")
        );
        let why = three
            .check_for(4, 6, Some("not with ladder wiring"))
            .unwrap_err();
        assert!(why.to_string().contains("ladder"));
        assert!(three.check_for(4, 6, None).is_ok());
    }

    #[test]
    fn a_config_block_sets_the_same_keys_and_bad_ones_are_refused_by_name() {
        let parse = |text: &str| {
            let config = ConfigJson::parse("m/config.json".into(), text).unwrap();
            PrefillPrune::from_config(&config)
        };
        assert_eq!(parse(r#"{"model_type": "mamba"}"#).unwrap(), None);
        let p = parse(r#"{"tideway_prune": {"layers": [2, 5], "keep": 0.4, "policy": "tor"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(p, "layers=2+5,keep=0.4,policy=tor".parse().unwrap());
        for (text, names) in [
            (r#"{"tideway_prune": {"keep": 2}}"#, "tideway_prune.keep"),
            (
                r#"{"tideway_prune": {"layers": "x"}}"#,
                "tideway_prune.layers",
            ),
            (r#"{"tideway_prune": {"speed": 1}}"#, "\"speed\""),
            (r#"{"tideway_prune": 3}"#, "must be an object"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(names) && e.contains("m/config.json"),
                "{text}: {e}"
            );
        }
    }

    struct Uniform;

    impl TokenGraphs for Uniform {
        fn window_graphs(&self, range: Range<usize>, heads: usize) -> WindowGraphs {
            let n = range.len();
            let mut graphs = vec![0.0f32; heads * n * n];
            for h in 0..heads {
                for i in 0..n {
                    for j in 0..=i {
                        graphs[(h * n + i) * n + j] = 1.0 / (i + 1) as f32;
                    }
                }
            }
            WindowGraphs {
                graphs,
                keys: (0..n).map(|i| i as f32).collect(),
                key_width: 1,
            }
        }

        fn delta_norms(&self) -> Option<Vec<f64>> {
            None
        }
    }

    #[test]
    fn every_window_keeps_its_share_and_the_protected_tokens() {
        let prune: PrefillPrune = "keep=0.5,window=10,recent=3,layers=0".parse().unwrap();
        for policy in [
            Policy::ZeroTPrune,
            Policy::Random,
            Policy::Stride,
            Policy::Tor,
        ] {
            let prune = PrefillPrune {
                policy,
                ..prune.clone()
            };
            let output: Vec<f32> = (0..25 * 2).map(|v| (v % 7) as f32 - 3.0).collect();
            let kept = select(&prune, 0, 4, 25, &output, 2, &Uniform).unwrap();
            // Windows 0..10, 10..20, 20..25 keep 5, 5 and 3 (of which 22, 23, 24 are recent).
            assert_eq!(kept.len(), 13, "{policy:?}: {kept:?}");
            assert!(kept.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(kept.iter().filter(|&&i| i < 10).count(), 5);
            assert!(
                kept.contains(&0) && kept.ends_with(&[22, 23, 24]),
                "{kept:?}"
            );
        }
        let decimamba = PrefillPrune {
            policy: Policy::DeciMamba,
            ..prune
        };
        assert_eq!(
            select(&decimamba, 0, 4, 25, &[0.0; 50], 2, &Uniform),
            Err(PruneError::NoScore)
        );
    }
}
