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

/// The chunk the models take for [`delta_chunked`]. Five of a chunk's eight products grow
/// with its length `C` (`C²·d` each) and three do not (`C·d²`), so a token costs `5·C·d + 3·d²`
/// multiply-adds: at d = 64, 32 Ki for fla's 64 (a GPU's tile), 17 Ki for 16. One thread, the
/// 144 heads of a 512-token prefill of a 130m-shaped DeltaNet (2026-12-05, `matmul_small`'s
/// own blocks): chunks of 64 49.7 ms, 32 37.0, 16 31.6, 8 97.5 (its 8-column products fill no
/// vector block); with a decay, 64 57.5 and 16 39.6 ms.
pub const CHUNK_ROWS: usize = 16;

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
    // `u` on the stack for heads up to RECURRENT_STACK_DV wide: a decode step runs a job for
    // each (session, head), and an allocation a job took malloc's lock, which the pool's
    // threads share (`tideway` keeps one arena). Passed to the rows' loop as an argument of
    // its own, which LLVM knows no other slice aliases: chosen in place (`if` between the
    // stack and a `Vec`), the loops were no longer vectorised and a batch-32 DeltaNet step
    // lost a quarter of its speed.
    if dv <= RECURRENT_STACK_DV {
        recurrent_rows(
            x,
            len,
            state,
            out,
            out_stride,
            &mut [0.0; RECURRENT_STACK_DV][..dv],
        );
    } else {
        recurrent_rows(x, len, state, out, out_stride, &mut vec![0.0; dv]);
    }
}

/// Rows `0..len` of [`delta_recurrent`], with `u` (`dv` values) to work in.
#[inline(always)]
fn recurrent_rows(
    x: DeltaInputs<'_>,
    len: usize,
    state: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
    u: &mut [f32],
) {
    let (dk, dv) = (x.k.width, x.v.width);
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

/// Widest head whose `u` [`delta_recurrent`] keeps on the stack (1 KiB).
const RECURRENT_STACK_DV: usize = 256;

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
    // Without a decay (DeltaNet) every e^{…} below is e⁰, which `exp_fast` gives as exactly
    // 1.0: those factors are left out, with the same bits. They were ~10% of the kernel.
    let decays = x.g.is_some();
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
            let (below, rest) = a[i * n..(i + 1) * n].split_at_mut(i);
            if decays {
                for (j, value) in below.iter_mut().enumerate() {
                    *value = beta(i) * *value * exp_fast(lam[i] - lam[j]);
                }
            } else {
                below.iter_mut().for_each(|value| *value *= beta(i));
            }
            rest.fill(0.0);
        }
        let t_mat = &mut t_mat[..n * n];
        invert_unit_lower(a, n, t_mat);
        // W = T (K_β ⊙ e^Λ), U = T V_β, then U' = U − W S.
        for t in 0..n {
            let b = beta(t);
            let b_decayed = if decays { b * exp_fast(lam[t]) } else { b };
            for (d, &kv) in k_scaled[t * dk..(t + 1) * dk]
                .iter_mut()
                .zip(x.k.row(c0 + t))
            {
                *d = b_decayed * kv;
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
            let decay = if decays {
                x.scale * exp_fast(lam[t])
            } else {
                x.scale
            };
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
            let (upto, after) = scores[i * n..(i + 1) * n].split_at_mut(i + 1);
            if decays {
                for (j, value) in upto.iter_mut().enumerate() {
                    *value = x.scale * *value * exp_fast(lam[i] - lam[j]);
                }
            } else {
                upto.iter_mut().for_each(|value| *value *= x.scale);
            }
            after.fill(0.0);
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
        if !decays {
            matmul_small(state, dv, true, 1.0, k.t(), u_view);
            continue;
        }
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

/// `t = (I + a)⁻¹` for a strictly lower triangular `a` (`[n, n]`), by forward substitution:
/// `T_i = e_i − Σ_{m<i} A_im T_m`, each entry's terms summed in ascending `m`.
///
/// Row `m` of `T` is zero right of its diagonal, so columns `j0..j0 + 16` take terms from rows
/// `m ≥ j0` only, and each block of 16 columns is solved on its own: four rows at a time, their
/// sums over the rows above in registers (four independent chains of multiply-adds; one row's
/// chain alone waits on each add's latency), then the terms among the four. A term of a row
/// `m` left of a column (`−A_im · 0`) leaves that entry as it is, so each entry gets the same
/// operations in the same order as entry by entry: the same bits. Entry by entry, with a load
/// and a store of the row for each term, this was a third of the kernel.
#[inline(always)]
fn invert_unit_lower(a: &[f32], n: usize, t: &mut [f32]) {
    const LANES: usize = 16;
    const ROWS: usize = 4;
    t.fill(0.0);
    for i in 0..n {
        t[i * n + i] = 1.0;
    }
    let block_of = |t: &[f32], row: usize, j0: usize| -> [f32; LANES] {
        t[row * n + j0..][..LANES].try_into().expect("16 lanes")
    };
    for j0 in (0..n).step_by(LANES) {
        let width = LANES.min(n - j0);
        let mut i = j0;
        while i < n {
            if width == LANES && i + ROWS <= n {
                let mut sums: [[f32; LANES]; ROWS] =
                    std::array::from_fn(|q| block_of(t, i + q, j0));
                for m in j0..i {
                    let tm = block_of(t, m, j0);
                    for (q, sum) in sums.iter_mut().enumerate() {
                        let coeff = -a[(i + q) * n + m];
                        for (s, &v) in sum.iter_mut().zip(&tm) {
                            *s = coeff.mul_add(v, *s);
                        }
                    }
                }
                for q in 1..ROWS {
                    for p in 0..q {
                        let coeff = -a[(i + q) * n + i + p];
                        let above = sums[p];
                        for (s, &v) in sums[q].iter_mut().zip(&above) {
                            *s = coeff.mul_add(v, *s);
                        }
                    }
                }
                for (q, sum) in sums.iter().enumerate() {
                    t[(i + q) * n + j0..][..LANES].copy_from_slice(sum);
                }
                i += ROWS;
            } else {
                // A last partial block of columns, or the last rows: one row at a time.
                let (done, rest) = t.split_at_mut(i * n);
                let row = &mut rest[j0..j0 + width];
                for m in j0..i {
                    let coeff = -a[i * n + m];
                    for (s, &v) in row.iter_mut().zip(&done[m * n + j0..][..width]) {
                        *s = coeff.mul_add(v, *s);
                    }
                }
                i += 1;
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
        // The last is wider than the recurrent form keeps on the stack.
        for (len, dk, dv) in [(70, 6, 5), (150, 20, 33), (20, 3, RECURRENT_STACK_DV + 44)] {
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

    /// The blocked substitution against the entry-by-entry one (each row updated for every
    /// row above it), bit for bit: square sizes with whole and partial 16-column blocks and
    /// 4-row groups.
    #[test]
    fn blocked_inverse_gives_the_entry_by_entry_bits() {
        for n in [1, 3, 5, 16, 22, 64, 70] {
            let mut a = pseudo(n * n, 7, -0.5, 0.5);
            for i in 0..n {
                a[i * n + i..(i + 1) * n].fill(0.0);
            }
            let mut expected = vec![0.0f32; n * n];
            for i in 0..n {
                expected[i * n + i] = 1.0;
                for m in 0..i {
                    for j in 0..=m {
                        expected[i * n + j] =
                            (-a[i * n + m]).mul_add(expected[m * n + j], expected[i * n + j]);
                    }
                }
            }
            let mut t = vec![f32::NAN; n * n];
            invert_unit_lower(&a, n, &mut t);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&t), bits(&expected), "n = {n}");
        }
    }

    /// Without a decay the kernel leaves out the factors e⁰; a decay of zeros takes them:
    /// the same bits.
    #[test]
    fn no_decay_gives_the_bits_of_a_zero_decay() {
        let (len, dk, dv) = (150, 20, 33);
        let q = l2_rows(pseudo(len * dk, 1, -1.0, 1.0), dk);
        let k = l2_rows(pseudo(len * dk, 2, -1.0, 1.0), dk);
        let v = pseudo(len * dv, 3, -1.0, 1.0);
        let beta = pseudo(len, 4, 0.0, 2.0);
        let zeros = vec![0.0f32; len];
        let run = |g: Option<HeadRows<'_>>| {
            let inputs = DeltaInputs {
                q: rows(&q, dk),
                k: rows(&k, dk),
                v: rows(&v, dv),
                beta: rows(&beta, 1),
                g,
                scale: 0.4,
            };
            let mut s = pseudo(dk * dv, 5, -0.5, 0.5);
            let mut o = vec![0.0; len * dv];
            delta_chunked(inputs, len, 64, &mut s, &mut o, dv);
            o.iter().chain(&s).map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(None), run(Some(rows(&zeros, 1))));
    }
}
