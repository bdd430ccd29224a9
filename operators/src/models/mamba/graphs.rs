//! Mamba's token graphs for the pruner (SPEC-MODELS §6.3): a mixer's token mixing over a
//! window as explicit matrices per channel ("hidden attention": Ali, Zimerman, Wolf 2024,
//! `AmeenAli/HiddenMambaAttn`), their per-head means, and DeciMamba's ‖Δ_t‖ score.
//!
//! `α_ij = Σ_n C_i[n] · exp(A[c,n] · Σ_{k=j+1..i} Δ_k[c]) · Δ_j[c] · B_j[n]` for j ≤ i, so that
//! the scan's output is `y_i = Σ_j α_ij x'_j + D x'_i` plus what the state carried into the
//! window adds (a term of no window token). The projections come from the whole sequence (the
//! conv reads the tokens before a window), so a window's matrices are exact anywhere in it.

use std::ops::Range;

use rayon::prelude::*;

use tideway_kernels::Weight;
use tideway_kernels::activation::{silu_inplace, softplus_inplace};
use tideway_kernels::conv::causal_conv1d_seq;
use tideway_kernels::matmul::MatRef;

use super::mixer::{MambaMixer, MambaMixerConfig};
use crate::prune::prefill::{TokenGraphs, WindowGraphs};

/// One window's hidden attention, per channel.
pub struct HiddenAttention {
    pub tokens: usize,
    pub channels: usize,
    /// `[channels, tokens, tokens]`, zero above the diagonal.
    pub alpha: Vec<f32>,
    /// What α mixes: the conv's output x′, `[tokens, channels]`.
    pub values: Vec<f32>,
    /// The output gate silu(z), `[tokens, channels]`.
    pub gate: Vec<f32>,
    /// The skip D, `[channels]`.
    pub skip: Vec<f32>,
}

impl HiddenAttention {
    /// The mixer's gated output (out_proj's input), `[tokens, channels]`, from the matrices:
    /// `(Σ_j α_ij x′_j + D x′_i) · silu(z_i)`.
    pub fn mix(&self) -> Vec<f32> {
        let (t, e) = (self.tokens, self.channels);
        let mut out = vec![0.0f32; t * e];
        for c in 0..e {
            let alpha = &self.alpha[c * t * t..(c + 1) * t * t];
            for i in 0..t {
                let mixed: f64 = (0..=i)
                    .map(|j| alpha[i * t + j] as f64 * self.values[j * e + c] as f64)
                    .sum();
                let y = mixed + self.skip[c] as f64 * self.values[i * e + c] as f64;
                out[i * e + c] = (y * self.gate[i * e + c] as f64) as f32;
            }
        }
        out
    }

    /// One graph per head for the pruner, `[heads, tokens, tokens]`: the channels split into
    /// `heads` equal consecutive groups (groups of channels play the heads' part), each the
    /// mean of |α| over its channels.
    pub fn head_graphs(&self, heads: usize) -> Vec<f32> {
        let (t, e) = (self.tokens, self.channels);
        let per = e / heads.max(1);
        let mut out = vec![0.0f32; heads * t * t];
        for h in 0..heads {
            let graph = &mut out[h * t * t..(h + 1) * t * t];
            for c in h * per..(h + 1) * per {
                let alpha = &self.alpha[c * t * t..(c + 1) * t * t];
                for (g, a) in graph.iter_mut().zip(alpha) {
                    *g += a.abs() / per as f32;
                }
            }
        }
        out
    }
}

/// A mixer's projections of a whole sequence from a fresh state: what the graphs are made of.
pub struct MambaGraphs<'m> {
    mixer: &'m MambaMixer,
    tokens: usize,
    /// `[x | z]`, `[T, 2E]`.
    xz: Vec<f32>,
    /// The conv's output x′ (after silu), `[T, E]`.
    values: Vec<f32>,
    /// `[δ | B | C]`, `[T, R + 2N]`.
    dbc: Vec<f32>,
    /// Δ = softplus(dt_proj(δ)), `[T, E]`.
    delta: Vec<f32>,
}

impl MambaMixer {
    /// The projections of `u` (`[T, d_model]`, the mixer's input) from a fresh state (a whole
    /// mixer, not a tensor-parallel rank's part).
    pub fn token_graphs(&self, u: &[f32]) -> MambaGraphs<'_> {
        let MambaMixerConfig {
            d_model,
            d_inner: e,
            d_state: n,
            d_conv: k,
            dt_rank: r,
            ..
        } = self.config;
        let t = u.len() / d_model;
        let mut xz = vec![0.0f32; t * 2 * e];
        self.in_proj.forward(MatRef::dense(u, t, d_model), &mut xz);
        let mut values = vec![0.0f32; t * e];
        let mut conv_window = vec![0.0f32; e * k];
        causal_conv1d_seq(
            MatRef::columns(&xz, t, 2 * e, 0, e),
            self.conv_weight.as_slice(),
            k,
            self.conv_bias.as_ref().map(Weight::as_slice),
            true,
            &mut conv_window,
            &mut values,
        );
        let w = r + 2 * n;
        let mut dbc = vec![0.0f32; t * w];
        self.x_proj.forward(MatRef::dense(&values, t, e), &mut dbc);
        let mut delta = vec![0.0f32; t * e];
        self.dt_proj
            .forward(MatRef::columns(&dbc, t, w, 0, r), &mut delta);
        softplus_inplace(&mut delta);
        MambaGraphs {
            mixer: self,
            tokens: t,
            xz,
            values,
            dbc,
            delta,
        }
    }

    /// DeciMamba's token score (Ben-Kish et al., ICLR 2025), a baseline for the pruner: the
    /// norm over channels of Δ_t, for each token of `u` (`[T, d_model]`).
    pub fn delta_norms(&self, u: &[f32]) -> Vec<f64> {
        self.token_graphs(u).delta_norms_of()
    }

    /// The hidden attention of the whole of `u` (`[T, d_model]`) from a fresh state.
    pub fn hidden_attention(&self, u: &[f32]) -> HiddenAttention {
        let graphs = self.token_graphs(u);
        graphs.attention(0..graphs.tokens)
    }
}

impl MambaGraphs<'_> {
    /// Channel `c`'s α over the tokens `range`, `[n, n]` (n = its length) into `out`. The
    /// decay from token j to token i is built as the product of each step's `exp(A Δ_k)` (each
    /// at most 1, so the product cannot overflow), one exp per token and state index instead
    /// of one per pair.
    fn channel_alpha(&self, c: usize, range: &Range<usize>, out: &mut [f64]) {
        let MambaMixerConfig {
            d_inner: e,
            d_state: ns,
            dt_rank: r,
            ..
        } = self.mixer.config;
        let w = r + 2 * ns;
        let n = range.len();
        let a_t = self.mixer.a_t.as_slice();
        out[..n * n].fill(0.0);
        let mut step = vec![0.0f64; n];
        let mut c_of = vec![0.0f64; n];
        let mut carried = vec![0.0f64; n];
        for s in 0..ns {
            let a = a_t[s * e + c] as f64;
            for (k, (decay, c_k)) in step.iter_mut().zip(&mut c_of).enumerate() {
                let row = range.start + k;
                *decay = (a * self.delta[row * e + c] as f64).exp();
                *c_k = self.dbc[row * w + r + ns + s] as f64;
            }
            // Row i: every earlier token's carried input decays by step i, token i's enters;
            // the loops run along j, so they vectorise.
            for i in 0..n {
                let row = range.start + i;
                for v in &mut carried[..i] {
                    *v *= step[i];
                }
                carried[i] = self.delta[row * e + c] as f64 * self.dbc[row * w + r + s] as f64;
                for (o, v) in out[i * n..=i * n + i].iter_mut().zip(&carried[..=i]) {
                    *o += c_of[i] * v;
                }
            }
        }
    }

    /// The hidden attention of the tokens `range`.
    pub fn attention(&self, range: Range<usize>) -> HiddenAttention {
        let e = self.mixer.config.d_inner;
        let n = range.len();
        let mut alpha = vec![0.0f32; e * n * n];
        let mut channel = vec![0.0f64; n * n];
        for c in 0..e {
            self.channel_alpha(c, &range, &mut channel);
            for (a, v) in alpha[c * n * n..(c + 1) * n * n].iter_mut().zip(&channel) {
                *a = *v as f32;
            }
        }
        let mut gate: Vec<f32> = range
            .clone()
            .flat_map(|i| self.xz[i * 2 * e + e..(i + 1) * 2 * e].to_vec())
            .collect();
        silu_inplace(&mut gate);
        HiddenAttention {
            tokens: n,
            channels: e,
            alpha,
            values: self.values[range.start * e..range.end * e].to_vec(),
            gate,
            skip: self.mixer.d.as_slice().to_vec(),
        }
    }

    fn delta_norms_of(&self) -> Vec<f64> {
        self.delta
            .chunks_exact(self.mixer.config.d_inner)
            .map(|row| row.iter().map(|&d| (d as f64).powi(2)).sum::<f64>().sqrt())
            .collect()
    }
}

/// Heads: the mean |α| of each group of channels; keys: `B_j`, the tokens' input to the state
/// (in the attention reading of Mamba, C is the query, B the key and x′ the value).
impl TokenGraphs for MambaGraphs<'_> {
    fn window_graphs(&self, range: Range<usize>, heads: usize) -> WindowGraphs {
        let MambaMixerConfig {
            d_inner: e,
            d_state: ns,
            dt_rank: r,
            ..
        } = self.mixer.config;
        let n = range.len();
        let per = e / heads;
        // One head per task: each sums its own channels, in order.
        let graphs: Vec<f32> = (0..heads)
            .into_par_iter()
            .flat_map_iter(|h| {
                let mut sum = vec![0.0f64; n * n];
                let mut channel = vec![0.0f64; n * n];
                for c in h * per..(h + 1) * per {
                    self.channel_alpha(c, &range, &mut channel);
                    for (g, v) in sum.iter_mut().zip(&channel) {
                        *g += v.abs();
                    }
                }
                sum.into_iter().map(move |s| (s / per as f64) as f32)
            })
            .collect();
        let w = r + 2 * ns;
        WindowGraphs {
            graphs,
            keys: range
                .flat_map(|i| self.dbc[i * w + r..i * w + r + ns].to_vec())
                .collect(),
            key_width: ns,
        }
    }

    fn delta_norms(&self) -> Option<Vec<f64>> {
        Some(self.delta_norms_of())
    }
}
