//! The delta rule (DeltaNet, Yang et al. 2024; `fla/ops/delta_rule`), one head at a time,
//! `shared/SPEC-MODELS.md` §3.2:
//!
//! ```text
//! v'_t = β_t (v_t − S_{t-1}ᵀ k_t);   S_t = S_{t-1} + k_t ⊗ v'_t;   o_t = S_tᵀ (scale·q_t)
//! ```
//!
//! With a per-row log decay `g_t ≤ 0` (Gated DeltaNet, §3.3) the state first decays,
//! `S ← e^{g_t} S`, then takes the same update; without one, `g = 0`.
//!
//! The chunkwise form uses the WY (UT) representation: per chunk, with `K_β = diag(β)K`,
//! `T = (I + StrictLower(K_β Kᵀ))⁻¹` by forward substitution, `W = T K_β`, `U = T V_β`; then
//! `U' = U − W S`, `O = Q S + (Q Kᵀ ⊙ M_incl) U'`, `S ← S + Kᵀ U'` (`delta_rule_chunkwise`).

use crate::activation::exp_fast;
use crate::linear_attention::HeadRows;
use crate::matmul::{Strided, matmul_small};
use crate::simd::dispatch;

/// One head's inputs: q, k (`dk` wide), v (`dv` wide), β and the optional log decay `g`
/// (one value per row each).
#[derive(Clone, Copy, Debug)]
pub struct DeltaInputs<'a> {
    pub q: HeadRows<'a>,
    pub k: HeadRows<'a>,
    pub v: HeadRows<'a>,
    pub beta: HeadRows<'a>,
    pub g: Option<HeadRows<'a>>,
    pub scale: f32,
}

dispatch! {
    /// The recurrent form over rows `0..len`; updates `state` (`[dk, dv]`), writes `out` rows.
    pub fn delta_recurrent(
        x: DeltaInputs<'_>,
        len: usize,
        state: &mut [f32],
        out: &mut [f32],
        out_stride: usize,
    ) => delta_recurrent_body
}

#[inline(always)]
fn delta_recurrent_body(
    x: DeltaInputs<'_>,
    len: usize,
    state: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let (dk, dv) = (x.k.width, x.v.width);
    assert_eq!(state.len(), dk * dv);
    let mut u = vec![0.0f32; dv];
    for t in 0..len {
        let (q, k, v, beta) = (x.q.row(t), x.k.row(t), x.v.row(t), x.beta.row(t)[0]);
        if let Some(g) = x.g {
            let decay = g.row(t)[0].exp();
            state.iter_mut().for_each(|s| *s *= decay);
        }
        // u = β (v − Sᵀ k)
        u.copy_from_slice(v);
        for i in 0..dk {
            let row = &state[i * dv..(i + 1) * dv];
            for j in 0..dv {
                u[j] = (-k[i]).mul_add(row[j], u[j]);
            }
        }
        u.iter_mut().for_each(|x| *x *= beta);
        let o = &mut out[t * out_stride..][..dv];
        o.fill(0.0);
        for i in 0..dk {
            let row = &mut state[i * dv..(i + 1) * dv];
            let qi = x.scale * q[i];
            for j in 0..dv {
                let s = k[i].mul_add(u[j], row[j]);
                row[j] = s;
                o[j] = qi.mul_add(s, o[j]);
            }
        }
    }
}

dispatch! {
    /// The chunkwise (WY) form over rows `0..len` in chunks of `chunk`; same contract as
    /// [`delta_recurrent`].
    pub fn delta_chunked(
        x: DeltaInputs<'_>,
        len: usize,
        chunk: usize,
        state: &mut [f32],
        out: &mut [f32],
        out_stride: usize,
    ) => delta_chunked_body
}

#[inline(always)]
fn delta_chunked_body(
    x: DeltaInputs<'_>,
    len: usize,
    chunk: usize,
    state: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let (dk, dv) = (x.k.width, x.v.width);
    assert_eq!(state.len(), dk * dv);
    let c = chunk.max(1);
    let mut lam = vec![0.0f32; c];
    let mut a = vec![0.0f32; c * c];
    let mut t_mat = vec![0.0f32; c * c];
    let mut k_scaled = vec![0.0f32; c * dk];
    let mut v_scaled = vec![0.0f32; c * dv];
    let mut w = vec![0.0f32; c * dk];
    let mut u = vec![0.0f32; c * dv];
    for c0 in (0..len).step_by(c) {
        let n = c.min(len - c0);
        let (k, q) = (x.k.matrix(c0, n), x.q.matrix(c0, n));
        let beta = |t: usize| x.beta.row(c0 + t)[0];
        // Λ: inclusive cumulative log decay in the chunk; Γ_ts = e^{Λ_t − Λ_s} (s ≤ t).
        for t in 0..n {
            let g = x.g.map_or(0.0, |g| g.row(c0 + t)[0]);
            lam[t] = if t == 0 { g } else { lam[t - 1] + g };
        }
        // A = StrictLower(diag(β)(K Kᵀ) ⊙ Γ).
        let a = &mut a[..n * n];
        matmul_small(a, n, false, 1.0, k, k.t());
        for i in 0..n {
            let row = &mut a[i * n..(i + 1) * n];
            for (j, value) in row.iter_mut().enumerate() {
                *value = if j < i {
                    beta(i) * *value * exp_fast(lam[i] - lam[j])
                } else {
                    0.0
                };
            }
        }
        // T = (I + A)⁻¹ by forward substitution, a row at a time:
        // T_i = e_i − Σ_{m<i} A_im T_m (rows of T are zero right of the diagonal).
        let t_mat = &mut t_mat[..n * n];
        t_mat.fill(0.0);
        for i in 0..n {
            let (done, rest) = t_mat.split_at_mut(i * n);
            let row = &mut rest[..n];
            row[i] = 1.0;
            for m in 0..i {
                let coeff = a[i * n + m];
                for (r, &tm) in row[..=m].iter_mut().zip(&done[m * n..=m * n + m]) {
                    *r = (-coeff).mul_add(tm, *r);
                }
            }
        }
        // W = T (K_β ⊙ e^Λ), U = T V_β, then U' = U − W S.
        for t in 0..n {
            let (b, decay) = (beta(t), exp_fast(lam[t]));
            for (d, &kv) in k_scaled[t * dk..(t + 1) * dk]
                .iter_mut()
                .zip(x.k.row(c0 + t))
            {
                *d = b * decay * kv;
            }
            for (d, &vv) in v_scaled[t * dv..(t + 1) * dv]
                .iter_mut()
                .zip(x.v.row(c0 + t))
            {
                *d = b * vv;
            }
        }
        let t_view = Strided::dense(t_mat, n, n);
        matmul_small(
            &mut w,
            dk,
            false,
            1.0,
            t_view,
            Strided::dense(&k_scaled, n, dk),
        );
        matmul_small(
            &mut u,
            dv,
            false,
            1.0,
            t_view,
            Strided::dense(&v_scaled, n, dv),
        );
        let s_view = Strided::dense(state, dk, dv);
        matmul_small(&mut u, dv, true, -1.0, Strided::dense(&w, n, dk), s_view);
        // O = (scale·Q ⊙ e^Λ) S + (scale·Q Kᵀ ⊙ Γ ⊙ M_incl) U'.
        for t in 0..n {
            let decay = x.scale * exp_fast(lam[t]);
            for (d, &qv) in k_scaled[t * dk..(t + 1) * dk]
                .iter_mut()
                .zip(x.q.row(c0 + t))
            {
                *d = decay * qv;
            }
        }
        let o = &mut out[c0 * out_stride..];
        matmul_small(
            o,
            out_stride,
            false,
            1.0,
            Strided::dense(&k_scaled, n, dk),
            s_view,
        );
        let scores = a;
        matmul_small(scores, n, false, 1.0, q, k.t());
        for i in 0..n {
            let row = &mut scores[i * n..(i + 1) * n];
            for (j, value) in row.iter_mut().enumerate() {
                *value = if j <= i {
                    x.scale * *value * exp_fast(lam[i] - lam[j])
                } else {
                    0.0
                };
            }
        }
        let u_view = Strided::dense(&u, n, dv);
        matmul_small(
            o,
            out_stride,
            true,
            1.0,
            Strided::dense(scores, n, n),
            u_view,
        );
        // S ← e^{Λ_C} S + (K ⊙ e^{Λ_C − Λ})ᵀ U'.
        let last = lam[n - 1];
        let total = exp_fast(last);
        state.iter_mut().for_each(|s| *s *= total);
        for t in 0..n {
            let decay = exp_fast(last - lam[t]);
            for (d, &kv) in k_scaled[t * dk..(t + 1) * dk]
                .iter_mut()
                .zip(x.k.row(c0 + t))
            {
                *d = decay * kv;
            }
        }
        let k_decayed = Strided::dense(&k_scaled, n, dk).t();
        matmul_small(state, dv, true, 1.0, k_decayed, u_view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo;

    fn rows(data: &[f32], width: usize) -> HeadRows<'_> {
        HeadRows {
            data,
            stride: width,
            offset: 0,
            width,
        }
    }

    fn l2_rows(mut x: Vec<f32>, width: usize) -> Vec<f32> {
        for row in x.chunks_mut(width) {
            let n = (row.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
            row.iter_mut().for_each(|v| *v /= n);
        }
        x
    }

    #[test]
    fn chunked_equals_recurrent_with_and_without_decay() {
        for (len, dk, dv) in [(70, 6, 5), (150, 20, 33)] {
            chunked_equals_recurrent(len, dk, dv);
        }
    }

    fn chunked_equals_recurrent(len: usize, dk: usize, dv: usize) {
        let q = l2_rows(pseudo(len * dk, 1, -1.0, 1.0), dk);
        let k = l2_rows(pseudo(len * dk, 2, -1.0, 1.0), dk);
        let v = pseudo(len * dv, 3, -1.0, 1.0);
        let beta = pseudo(len, 4, 0.0, 2.0);
        // Strong decays: exponents must stay differences within the chunk.
        let g = pseudo(len, 6, -3.0, -0.01);
        for gate in [None, Some(rows(&g, 1))] {
            let inputs = DeltaInputs {
                q: rows(&q, dk),
                k: rows(&k, dk),
                v: rows(&v, dv),
                beta: rows(&beta, 1),
                g: gate,
                scale: 0.4,
            };
            let init = pseudo(dk * dv, 5, -0.5, 0.5);
            let mut s_rec = init.clone();
            let mut o_rec = vec![0.0; len * dv];
            delta_recurrent(inputs, len, &mut s_rec, &mut o_rec, dv);
            for chunk in [1, 3, 16, 64] {
                let mut s = init.clone();
                let mut o = vec![0.0; len * dv];
                delta_chunked(inputs, len, chunk, &mut s, &mut o, dv);
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
            }
        }
    }
}
