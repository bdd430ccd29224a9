//! GLA's and RetNet's token graphs for the pruner (SPEC-MODELS §6.3): per head,
//! `A_ij = scale · Σ_c q_ic k_jc exp(G_ic − G_jc)` for j ≤ i, with G the cumulative log decay
//! (GLA's key gate; RetNet's fixed per-head decay, with RoPE already in q and k), so that the
//! head's output before the norm and gate is `o_i = Σ_j A_ij v_j` from a fresh state
//! (`fused_recurrent_gla` in flash-linear-attention). The projections come from the whole
//! sequence, so a window's matrices are exact anywhere in it.

use std::ops::Range;

use super::gla::{GlaInputs, GlaMixer};
use super::mixer::TokenMixer;
use crate::prune::prefill::{TokenGraphs, WindowGraphs};

/// A window's token mixing in one GLA / RetNet layer, per head.
pub struct HeadAttention {
    pub tokens: usize,
    pub heads: usize,
    pub head_v_dim: usize,
    /// `[heads, tokens, tokens]`, zero above the diagonal.
    pub matrices: Vec<f32>,
    /// Each head's values, `[tokens, heads · head_v_dim]` (shared by a kv group's heads).
    pub values: Vec<f32>,
}

impl HeadAttention {
    /// The heads' outputs `[tokens, heads · head_v_dim]` from the matrices: `o_i = Σ_j A_ij v_j`.
    pub fn mix(&self) -> Vec<f32> {
        let (t, dv) = (self.tokens, self.head_v_dim);
        let width = self.heads * dv;
        let mut out = vec![0.0f32; t * width];
        for h in 0..self.heads {
            let a = &self.matrices[h * t * t..(h + 1) * t * t];
            for i in 0..t {
                for c in 0..dv {
                    let o: f64 = (0..=i)
                        .map(|j| a[i * t + j] as f64 * self.values[j * width + h * dv + c] as f64)
                        .sum();
                    out[i * width + h * dv + c] = o as f32;
                }
            }
        }
        out
    }
}

/// A layer's q, k, v and log decay over a whole sequence, from a fresh state.
pub struct GlaGraphs<'m> {
    mixer: &'m GlaMixer,
    inputs: GlaInputs,
}

impl GlaMixer {
    /// The inputs of `u` (`[T, d_model]`, the mixer's input) from a fresh state.
    pub fn token_graphs(&self, u: &[f32]) -> GlaGraphs<'_> {
        let t = u.len() / self.config.d_model;
        let mut state = self.new_state();
        let whole = 0..t;
        let inputs = self.inputs(u, std::slice::from_ref(&whole), &[0], &mut [&mut state]);
        GlaGraphs {
            mixer: self,
            inputs,
        }
    }

    /// The per-head attention of the whole of `u` from a fresh state.
    pub fn head_attention(&self, u: &[f32]) -> HeadAttention {
        let t = u.len() / self.config.d_model;
        self.token_graphs(u).attention(0..t)
    }
}

impl GlaGraphs<'_> {
    /// Head `h`'s matrix over the tokens `range`, `[n, n]` into `out`.
    fn head_matrix(&self, h: usize, range: &Range<usize>, out: &mut [f64]) {
        let c = &self.mixer.config;
        let (dk, groups) = (c.head_k_dim, c.num_heads / c.num_kv_heads);
        let kd = c.num_heads * dk;
        let kkd = kd / groups;
        let kv = h / groups;
        let GlaInputs {
            q, k, gk, g_stride, ..
        } = &self.inputs;
        let n = range.len();
        // G: the cumulative log decay of each key channel from the window's start.
        let mut cumulative = vec![0.0f64; n * dk];
        let mut sum = vec![0.0f64; dk];
        for (r, row) in range.clone().enumerate() {
            let decay = &gk[row * g_stride + kv * dk..][..dk];
            for (s, &g) in sum.iter_mut().zip(decay) {
                *s += g as f64;
            }
            cumulative[r * dk..(r + 1) * dk].copy_from_slice(&sum);
        }
        let scale = (dk as f64).powf(-0.5);
        out[..n * n].fill(0.0);
        for i in 0..n {
            let qi = &q[(range.start + i) * kd + h * dk..][..dk];
            let gi = &cumulative[i * dk..(i + 1) * dk];
            for j in 0..=i {
                let kj = &k[(range.start + j) * kkd + kv * dk..][..dk];
                let gj = &cumulative[j * dk..(j + 1) * dk];
                let a: f64 = (0..dk)
                    .map(|ch| qi[ch] as f64 * kj[ch] as f64 * (gi[ch] - gj[ch]).exp())
                    .sum();
                out[i * n + j] = scale * a;
            }
        }
    }

    /// Every head's matrix over the tokens `range`, and their values.
    pub fn attention(&self, range: Range<usize>) -> HeadAttention {
        let c = &self.mixer.config;
        let (heads, dv, groups) = (c.num_heads, c.head_v_dim, c.num_heads / c.num_kv_heads);
        let kvd = heads * dv / groups;
        let n = range.len();
        let mut matrices = vec![0.0f32; heads * n * n];
        let mut head = vec![0.0f64; n * n];
        for h in 0..heads {
            self.head_matrix(h, &range, &mut head);
            for (m, v) in matrices[h * n * n..(h + 1) * n * n].iter_mut().zip(&head) {
                *m = *v as f32;
            }
        }
        let values = range
            .flat_map(|row| {
                (0..heads).flat_map(move |h| {
                    let kv = h / groups;
                    self.inputs.v[row * kvd + kv * dv..][..dv].iter().copied()
                })
            })
            .collect();
        HeadAttention {
            tokens: n,
            heads,
            head_v_dim: dv,
            matrices,
            values,
        }
    }
}

/// Heads: the mean |A| of each group of the model's heads; keys: k (all kv heads).
impl TokenGraphs for GlaGraphs<'_> {
    fn window_graphs(&self, range: Range<usize>, heads: usize) -> WindowGraphs {
        let c = &self.mixer.config;
        let per = c.num_heads / heads;
        let n = range.len();
        let mut sums = vec![0.0f64; heads * n * n];
        let mut head = vec![0.0f64; n * n];
        for h in 0..heads * per {
            self.head_matrix(h, &range, &mut head);
            for (s, v) in sums[(h / per) * n * n..][..n * n].iter_mut().zip(&head) {
                *s += v.abs();
            }
        }
        let kkd = c.num_heads * c.head_k_dim / (c.num_heads / c.num_kv_heads);
        WindowGraphs {
            graphs: sums.iter().map(|&s| (s / per as f64) as f32).collect(),
            keys: self.inputs.k[range.start * kkd..range.end * kkd].to_vec(),
            key_width: kkd,
        }
    }

    fn delta_norms(&self) -> Option<Vec<f64>> {
        None
    }
}
