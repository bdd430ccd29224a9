//! The fla families' token graphs for the pruner (SPEC-MODELS §6.3): per head, a matrix A with
//! the head's output before the norm and gate `o_i = Σ_j A_ij v_j` from a fresh state.
//! GLA and RetNet: `A_ij = scale · Σ_c q_ic k_jc exp(G_ic − G_jc)` for j ≤ i, with G the
//! cumulative log decay (GLA's key gate; RetNet's fixed per-head decay, with RoPE already in q
//! and k; `fused_recurrent_gla` in flash-linear-attention). DeltaNet and Gated DeltaNet: the
//! chunk form's UT transform ([`DeltaHeads`]). Linear attention: feature-map products
//! ([`LinearHeads`]). The projections come from the whole sequence, so
//! a window's matrices are exact anywhere in it.

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

/// A layer's heads over a sequence, as the pruner reads them: each (value) head's token
/// mixing over a window as a matrix, what it mixes, and the tokens' keys.
pub trait HeadMixing {
    /// (Value) heads.
    fn heads(&self) -> usize;
    fn head_v_dim(&self) -> usize;
    /// Head `h`'s matrix over the tokens `range`, `[n, n]` into `out`.
    fn head_matrix(&self, h: usize, range: &Range<usize>, out: &mut [f64]);
    /// Head `h`'s values at token `row`.
    fn head_values(&self, h: usize, row: usize) -> &[f32];
    /// The keys of the tokens `range` (`[n, width]`) and their width.
    fn keys(&self, range: Range<usize>) -> (Vec<f32>, usize);

    /// Every head's matrix over the tokens `range`, and their values.
    fn attention(&self, range: Range<usize>) -> HeadAttention {
        let (heads, dv) = (self.heads(), self.head_v_dim());
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
            .flat_map(|row| (0..heads).flat_map(move |h| self.head_values(h, row).to_vec()))
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

/// The pruner's view of a layer's heads: `groups` graphs, each the mean |A| of its consecutive
/// heads, and the tokens' keys.
pub struct Heads<'a>(pub Box<dyn HeadMixing + 'a>);

impl TokenGraphs for Heads<'_> {
    fn window_graphs(&self, range: Range<usize>, groups: usize) -> WindowGraphs {
        let per = self.0.heads() / groups;
        let n = range.len();
        let mut sums = vec![0.0f64; groups * n * n];
        let mut head = vec![0.0f64; n * n];
        for h in 0..groups * per {
            self.0.head_matrix(h, &range, &mut head);
            for (s, v) in sums[(h / per) * n * n..][..n * n].iter_mut().zip(&head) {
                *s += v.abs();
            }
        }
        let (keys, key_width) = self.0.keys(range);
        WindowGraphs {
            graphs: sums.iter().map(|&s| (s / per as f64) as f32).collect(),
            keys,
            key_width,
        }
    }

    fn delta_norms(&self) -> Option<Vec<f64>> {
        None
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
        let whole = 0..t;
        let mut state = self.new_state();
        let inputs = self.inputs(u, std::slice::from_ref(&whole), &[0], &mut [&mut state]);
        GlaGraphs {
            mixer: self,
            inputs,
        }
    }
}

impl HeadMixing for GlaGraphs<'_> {
    fn heads(&self) -> usize {
        self.mixer.config.num_heads
    }

    fn head_v_dim(&self) -> usize {
        self.mixer.config.head_v_dim
    }

    fn head_values(&self, h: usize, row: usize) -> &[f32] {
        let c = &self.mixer.config;
        let (dv, groups) = (c.head_v_dim, c.num_heads / c.num_kv_heads);
        let kvd = c.num_heads * dv / groups;
        &self.inputs.v[row * kvd + (h / groups) * dv..][..dv]
    }

    fn keys(&self, range: Range<usize>) -> (Vec<f32>, usize) {
        let c = &self.mixer.config;
        let kkd = c.num_heads * c.head_k_dim / (c.num_heads / c.num_kv_heads);
        (
            self.inputs.k[range.start * kkd..range.end * kkd].to_vec(),
            kkd,
        )
    }

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
}

/// DeltaNet's and Gated DeltaNet's heads' inputs over a sequence (q, k L2- or L1-normalised).
/// Their token mixing over a window from a fresh state is the chunk form's
/// `A = scale · (Q Kᵀ ⊙ Γ ⊙ M) (I + L)⁻¹ diag(β)` per value head, with M the inclusive causal
/// mask, Γ_ij = exp(G_i − G_j) (Gated DeltaNet's cumulative log decay; 1 for DeltaNet) and
/// `L_ij = β_i (k_i · k_j) Γ_ij` for j < i (the UT transform: `u = (I + L)⁻¹ diag(β) v` are
/// the delta rule's corrected values, `o_i = scale Σ_{j≤i} Γ_ij (q_i · k_j) u_j`).
pub struct DeltaHeads {
    /// `[M, qk_heads · dk]`.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    /// `[M, v_heads · dv]`.
    pub v: Vec<f32>,
    /// `[M, v_heads]`.
    pub beta: Vec<f32>,
    /// The log decay `[M, v_heads]` (Gated DeltaNet).
    pub g: Option<Vec<f32>>,
    pub qk_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

impl HeadMixing for DeltaHeads {
    fn heads(&self) -> usize {
        self.v_heads
    }

    fn head_v_dim(&self) -> usize {
        self.dv
    }

    fn head_values(&self, h: usize, row: usize) -> &[f32] {
        &self.v[row * self.v_heads * self.dv + h * self.dv..][..self.dv]
    }

    fn keys(&self, range: Range<usize>) -> (Vec<f32>, usize) {
        let kd = self.qk_heads * self.dk;
        (self.k[range.start * kd..range.end * kd].to_vec(), kd)
    }

    fn head_matrix(&self, h: usize, range: &Range<usize>, out: &mut [f64]) {
        let (dk, hv) = (self.dk, self.v_heads);
        let qk = h / (hv / self.qk_heads);
        let kd = self.qk_heads * dk;
        let n = range.len();
        let row = |x: &[f32], i: usize| -> Vec<f64> {
            x[(range.start + i) * kd + qk * dk..][..dk]
                .iter()
                .map(|&v| v as f64)
                .collect()
        };
        let q: Vec<Vec<f64>> = (0..n).map(|i| row(&self.q, i)).collect();
        let k: Vec<Vec<f64>> = (0..n).map(|i| row(&self.k, i)).collect();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut cumulative = vec![0.0f64; n];
        let mut sum = 0.0;
        for (i, c) in cumulative.iter_mut().enumerate() {
            if let Some(g) = &self.g {
                sum += g[(range.start + i) * hv + h] as f64;
            }
            *c = sum;
        }
        let decay = |i: usize, j: usize| (cumulative[i] - cumulative[j]).exp();
        let beta: Vec<f64> = (0..n)
            .map(|i| self.beta[(range.start + i) * hv + h] as f64)
            .collect();
        // T = (I + L)⁻¹ diag(β), lower triangular, by forward substitution per column.
        let mut t = vec![0.0f64; n * n];
        for c in 0..n {
            t[c * n + c] = beta[c];
            for i in c + 1..n {
                let s: f64 = (c..i)
                    .map(|j| beta[i] * dot(&k[i], &k[j]) * decay(i, j) * t[j * n + c])
                    .sum();
                t[i * n + c] = -s;
            }
        }
        // A = scale · P T, P_ij = Γ_ij (q_i · k_j) for j ≤ i.
        let scale = (dk as f64).powf(-0.5);
        let p: Vec<f64> = (0..n * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                if j > i {
                    0.0
                } else {
                    decay(i, j) * dot(&q[i], &k[j])
                }
            })
            .collect();
        out[..n * n].fill(0.0);
        for i in 0..n {
            for j in 0..=i {
                out[i * n + j] = scale * (j..=i).map(|l| p[i * n + l] * t[l * n + j]).sum::<f64>();
            }
        }
    }
}

/// Linear attention's heads' inputs over a sequence: `A_ij = scale · φ(q_i) · φ(k_j)` for
/// j ≤ i (scale = f^-1/2 over the feature width f), divided by `Σ_{j≤i} A_ij + 1e-10` where the
/// layer normalises (fla's `do_feature_map_norm`).
pub struct LinearHeads {
    /// `[M, heads · f]`, feature-mapped (and normalised where the layer does).
    pub q: Vec<f32>,
    /// `[M, heads / groups · f]`.
    pub k: Vec<f32>,
    /// `[M, heads / groups · dv]`.
    pub v: Vec<f32>,
    pub heads: usize,
    pub groups: usize,
    pub feature_width: usize,
    pub dv: usize,
    pub normalize: bool,
}

impl HeadMixing for LinearHeads {
    fn heads(&self) -> usize {
        self.heads
    }

    fn head_v_dim(&self) -> usize {
        self.dv
    }

    fn head_values(&self, h: usize, row: usize) -> &[f32] {
        let vw = self.heads / self.groups * self.dv;
        &self.v[row * vw + (h / self.groups) * self.dv..][..self.dv]
    }

    fn keys(&self, range: Range<usize>) -> (Vec<f32>, usize) {
        let kw = self.heads / self.groups * self.feature_width;
        (self.k[range.start * kw..range.end * kw].to_vec(), kw)
    }

    fn head_matrix(&self, h: usize, range: &Range<usize>, out: &mut [f64]) {
        let f = self.feature_width;
        let (qw, kw) = (self.heads * f, self.heads / self.groups * f);
        let kv = h / self.groups;
        let n = range.len();
        let scale = (f as f64).powf(-0.5);
        out[..n * n].fill(0.0);
        for i in 0..n {
            let qi = &self.q[(range.start + i) * qw + h * f..][..f];
            for j in 0..=i {
                let kj = &self.k[(range.start + j) * kw + kv * f..][..f];
                let a: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                out[i * n + j] = scale * a;
            }
            if self.normalize {
                let z: f64 = out[i * n..i * n + i + 1].iter().sum::<f64>() + 1e-10;
                out[i * n..i * n + i + 1].iter_mut().for_each(|a| *a /= z);
            }
        }
    }
}
