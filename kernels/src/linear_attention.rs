//! Gated linear attention recurrences (the GLA family of flash-linear-attention: GLA, RetNet /
//! simple GLA, plain linear attention), one head at a time.
//!
//! Per head, with a per-key-channel log decay `g_t ∈ R^{dk}` (≤ 0; all zeros for plain
//! linear attention), state `S ∈ R^{dk×dv}` and `scale` applied to q
//! (`fla/ops/gla/naive.py`, `shared/SPEC-MODELS.md` §3.1):
//!
//! ```text
//! S_t = diag(exp(g_t)) S_{t-1} + k_t ⊗ v_t          o_t = S_tᵀ (scale·q_t)
//! ```
//!
//! The chunkwise form (§3.1) gives the same outputs for a whole chunk at once: with `G_t` the
//! inclusive cumulative sum of `g` inside the chunk,
//! `o_t = scale·(q_t ⊙ e^{G_t})ᵀ S_prev + Σ_{s≤t} [scale·Σ_k q_tk k_sk e^{G_tk−G_sk}] v_s` and
//! `S ← diag(e^{G_C}) S_prev + Σ_s (k_s ⊙ e^{G_C−G_s}) ⊗ v_s`. Every exponent is a difference
//! `G_t − G_s` with s ≤ t, so it is ≤ 0 and never overflows (never `e^{G_t}·e^{−G_s}`).

use crate::activation::exp_fast;
use crate::simd::dispatch;

/// Rows of one head inside a packed `[rows, width]` activation: row `t` is
/// `data[t·stride + offset ..][..width]`.
#[derive(Clone, Copy, Debug)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub offset: usize,
    pub width: usize,
}

impl<'a> HeadRows<'a> {
    /// One head's columns (`offset..offset + width`) of rows `rows` of a packed
    /// `[M, stride]` activation; row 0 of the view is `rows.start`.
    pub fn segment(
        data: &'a [f32],
        rows: &std::ops::Range<usize>,
        stride: usize,
        offset: usize,
        width: usize,
    ) -> Self {
        HeadRows {
            data: &data[rows.start * stride..rows.end * stride],
            stride,
            offset,
            width,
        }
    }

    #[inline]
    pub fn row(&self, t: usize) -> &'a [f32] {
        &self.data[t * self.stride + self.offset..][..self.width]
    }
}

/// One head's inputs for rows `0..len` of a segment. `g` is `None` when there is no decay.
#[derive(Clone, Copy, Debug)]
pub struct HeadInputs<'a> {
    pub q: HeadRows<'a>,
    pub k: HeadRows<'a>,
    pub v: HeadRows<'a>,
    pub g: Option<HeadRows<'a>>,
    pub scale: f32,
}

dispatch! {
    /// The recurrent form over rows `0..len`: updates `state` (`[dk, dv]`) and writes `out`
    /// rows (`out[t·out_stride ..][..dv]`).
    pub fn gated_recurrent(
        x: HeadInputs<'_>,
        len: usize,
        state: &mut [f32],
        out: &mut [f32],
        out_stride: usize,
    ) => gated_recurrent_body
}

#[inline(always)]
fn gated_recurrent_body(
    x: HeadInputs<'_>,
    len: usize,
    state: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let (dk, dv) = (x.k.width, x.v.width);
    assert_eq!(state.len(), dk * dv);
    for t in 0..len {
        let (q, k, v) = (x.q.row(t), x.k.row(t), x.v.row(t));
        let o = &mut out[t * out_stride..][..dv];
        o.fill(0.0);
        for i in 0..dk {
            let row = &mut state[i * dv..(i + 1) * dv];
            let decay = x.g.map_or(1.0, |g| exp_fast(g.row(t)[i]));
            let (ki, qi) = (k[i], x.scale * q[i]);
            for j in 0..dv {
                let s = decay.mul_add(row[j], ki * v[j]);
                row[j] = s;
                o[j] = qi.mul_add(s, o[j]);
            }
        }
    }
}

dispatch! {
    /// The chunkwise form over rows `0..len` in chunks of `chunk` rows; same contract as
    /// [`gated_recurrent`].
    pub fn gated_chunked(
        x: HeadInputs<'_>,
        len: usize,
        chunk: usize,
        state: &mut [f32],
        out: &mut [f32],
        out_stride: usize,
    ) => gated_chunked_body
}

#[inline(always)]
fn gated_chunked_body(
    x: HeadInputs<'_>,
    len: usize,
    chunk: usize,
    state: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let (dk, dv) = (x.k.width, x.v.width);
    assert_eq!(state.len(), dk * dv);
    let chunk = chunk.max(1);
    let mut cum = vec![0.0f32; chunk * dk];
    let mut qg = vec![0.0f32; dk];
    let mut a = vec![0.0f32; chunk];
    let mut next = vec![0.0f32; dk * dv];
    for c0 in (0..len).step_by(chunk) {
        let n = chunk.min(len - c0);
        // G: inclusive cumulative log decay inside the chunk.
        for t in 0..n {
            for i in 0..dk {
                let g = x.g.map_or(0.0, |g| g.row(c0 + t)[i]);
                cum[t * dk + i] = if t == 0 { g } else { cum[(t - 1) * dk + i] + g };
            }
        }
        for t in 0..n {
            let q = x.q.row(c0 + t);
            let gt = &cum[t * dk..(t + 1) * dk];
            // Inter-chunk: scale·(q_t ⊙ e^{G_t})ᵀ S_prev.
            for i in 0..dk {
                qg[i] = x.scale * q[i] * exp_fast(gt[i]);
            }
            let o = &mut out[(c0 + t) * out_stride..][..dv];
            o.fill(0.0);
            for i in 0..dk {
                let row = &state[i * dv..(i + 1) * dv];
                for j in 0..dv {
                    o[j] = qg[i].mul_add(row[j], o[j]);
                }
            }
            // Intra-chunk: A_ts = scale·Σ_k q_tk k_sk e^{G_tk − G_sk}, s ≤ t.
            for s in 0..=t {
                let k = x.k.row(c0 + s);
                let gs = &cum[s * dk..(s + 1) * dk];
                let mut acc = 0.0f32;
                for i in 0..dk {
                    acc = (q[i] * k[i]).mul_add(exp_fast(gt[i] - gs[i]), acc);
                }
                a[s] = x.scale * acc;
            }
            for (s, &weight) in a[..=t].iter().enumerate() {
                let v = x.v.row(c0 + s);
                for j in 0..dv {
                    o[j] = weight.mul_add(v[j], o[j]);
                }
            }
        }
        // State passing: S ← diag(e^{G_C}) S + Σ_s (k_s ⊙ e^{G_C − G_s}) ⊗ v_s.
        let last = &cum[(n - 1) * dk..n * dk];
        for i in 0..dk {
            let decay = exp_fast(last[i]);
            let row = &mut next[i * dv..(i + 1) * dv];
            for (r, &s) in row.iter_mut().zip(&state[i * dv..(i + 1) * dv]) {
                *r = decay * s;
            }
        }
        for s in 0..n {
            let (k, v) = (x.k.row(c0 + s), x.v.row(c0 + s));
            let gs = &cum[s * dk..(s + 1) * dk];
            for i in 0..dk {
                let w = k[i] * exp_fast(last[i] - gs[i]);
                let row = &mut next[i * dv..(i + 1) * dv];
                for j in 0..dv {
                    row[j] = w.mul_add(v[j], row[j]);
                }
            }
        }
        state.copy_from_slice(&next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo;

    #[test]
    fn chunked_equals_recurrent_for_any_chunk_and_split() {
        let (len, dk, dv) = (45, 6, 5);
        let q = pseudo(len * dk, 1, -1.0, 1.0);
        let k = pseudo(len * dk, 2, -1.0, 1.0);
        let v = pseudo(len * dv, 3, -1.0, 1.0);
        // Strong decays: a naive e^{G_t}·e^{-G_s} would overflow across a chunk.
        let g = pseudo(len * dk, 4, -6.0, -0.01);
        fn rows(data: &[f32], width: usize) -> HeadRows<'_> {
            HeadRows {
                data,
                stride: width,
                offset: 0,
                width,
            }
        }
        let inputs = HeadInputs {
            q: rows(&q, dk),
            k: rows(&k, dk),
            v: rows(&v, dv),
            g: Some(rows(&g, dk)),
            scale: 0.4,
        };
        let init = pseudo(dk * dv, 5, -0.5, 0.5);
        let mut s_rec = init.clone();
        let mut o_rec = vec![0.0; len * dv];
        gated_recurrent(inputs, len, &mut s_rec, &mut o_rec, dv);
        for chunk in [1, 4, 16, 64] {
            let mut s = init.clone();
            let mut o = vec![0.0; len * dv];
            gated_chunked(inputs, len, chunk, &mut s, &mut o, dv);
            for (a, b) in o.iter().zip(&o_rec) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "chunk {chunk}: {a} vs {b}"
                );
            }
            for (a, b) in s.iter().zip(&s_rec) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "chunk {chunk} state"
                );
            }
            assert!(o.iter().all(|x| x.is_finite()));
        }
    }
}
