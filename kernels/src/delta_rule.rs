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

use crate::linear_attention::HeadRows;
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
    let mut t_mat = vec![0.0f32; c * c];
    let mut a = vec![0.0f32; c * c];
    let mut w = vec![0.0f32; c * dk];
    let mut u = vec![0.0f32; c * dv];
    let mut lam = vec![0.0f32; c];
    for c0 in (0..len).step_by(c) {
        let n = c.min(len - c0);
        let k = |t: usize| x.k.row(c0 + t);
        let beta = |t: usize| x.beta.row(c0 + t)[0];
        // Λ: inclusive cumulative log decay in the chunk; Γ_ts = e^{Λ_t − Λ_s} (s ≤ t).
        for t in 0..n {
            let g = x.g.map_or(0.0, |g| g.row(c0 + t)[0]);
            lam[t] = if t == 0 { g } else { lam[t - 1] + g };
        }
        // A = StrictLower((K_β Kᵀ) ⊙ Γ); T = (I + A)⁻¹ by forward substitution (unit lower).
        for i in 0..n {
            for j in 0..i {
                let dot: f32 = k(i).iter().zip(k(j)).map(|(a, b)| a * b).sum();
                a[i * c + j] = beta(i) * dot * (lam[i] - lam[j]).exp();
            }
        }
        for i in 0..n {
            for j in 0..=i {
                let mut v = if i == j { 1.0 } else { 0.0 };
                for m in j..i {
                    v -= a[i * c + m] * t_mat[m * c + j];
                }
                t_mat[i * c + j] = v;
            }
        }
        // W = T (K_β ⊙ e^Λ), U = T V_β, then U' = U − W S.
        for i in 0..n {
            let wi = &mut w[i * dk..(i + 1) * dk];
            wi.fill(0.0);
            let ui = &mut u[i * dv..(i + 1) * dv];
            ui.fill(0.0);
            for j in 0..=i {
                let tb = t_mat[i * c + j] * beta(j);
                let tbw = tb * lam[j].exp();
                for (wv, kv) in wi.iter_mut().zip(k(j)) {
                    *wv = tbw.mul_add(*kv, *wv);
                }
                for (uv, vv) in ui.iter_mut().zip(x.v.row(c0 + j)) {
                    *uv = tb.mul_add(*vv, *uv);
                }
            }
            for (p, &wp) in wi.iter().enumerate() {
                let row = &state[p * dv..(p + 1) * dv];
                for jj in 0..dv {
                    ui[jj] = (-wp).mul_add(row[jj], ui[jj]);
                }
            }
        }
        // O = (Q ⊙ e^Λ) S + (Q Kᵀ ⊙ Γ ⊙ M_incl) U'.
        for i in 0..n {
            let q = x.q.row(c0 + i);
            let o = &mut out[(c0 + i) * out_stride..][..dv];
            o.fill(0.0);
            let qdecay = x.scale * lam[i].exp();
            for p in 0..dk {
                let qp = qdecay * q[p];
                let row = &state[p * dv..(p + 1) * dv];
                for jj in 0..dv {
                    o[jj] = qp.mul_add(row[jj], o[jj]);
                }
            }
            for j in 0..=i {
                let qk: f32 = q.iter().zip(k(j)).map(|(a, b)| a * b).sum::<f32>()
                    * x.scale
                    * (lam[i] - lam[j]).exp();
                let uj = &u[j * dv..(j + 1) * dv];
                for jj in 0..dv {
                    o[jj] = qk.mul_add(uj[jj], o[jj]);
                }
            }
        }
        // S ← e^{Λ_C} S + (K ⊙ e^{Λ_C − Λ})ᵀ U'.
        let last = lam[n - 1];
        let total = last.exp();
        state.iter_mut().for_each(|s| *s *= total);
        for j in 0..n {
            let kj = k(j);
            let uj = &u[j * dv..(j + 1) * dv];
            let wj = (last - lam[j]).exp();
            for p in 0..dk {
                let row = &mut state[p * dv..(p + 1) * dv];
                let kp = wj * kj[p];
                for jj in 0..dv {
                    row[jj] = kp.mul_add(uj[jj], row[jj]);
                }
            }
        }
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
        let (len, dk, dv) = (70, 6, 5);
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
