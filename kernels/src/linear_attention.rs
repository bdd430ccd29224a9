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
use crate::matmul::{Strided, matmul_small};
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

    /// Rows `start..start + rows` as a matrix view for [`matmul_small`].
    pub fn matrix(&self, start: usize, rows: usize) -> Strided<'a> {
        Strided::rows(
            &self.data[(start * self.stride + self.offset).min(self.data.len())..],
            rows,
            self.width,
            self.stride,
        )
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

/// Rows per sub-chunk of the intra-chunk scores (fla's `BC` in `chunk_gla_fwd_intra`): blocks
/// off the diagonal are one product each, the diagonal blocks take exponentials of differences.
const SUB_CHUNK: usize = 16;

/// Scratch of [`gated_chunked`] for chunks of up to `chunk` rows.
struct ChunkScratch {
    /// `scale·q ⊙ e^{G − G_ref}` (and `scale·q ⊙ e^{G}`), `[chunk, dk]`.
    q_decayed: Vec<f32>,
    /// `k ⊙ e^{G_ref − G}`, `[chunk, dk]`.
    k_decayed: Vec<f32>,
    /// Intra-chunk scores `A`, `[chunk, chunk]`, zero above the diagonal.
    scores: Vec<f32>,
    /// One row of products for the diagonal blocks, `[dk]`.
    products: Vec<f32>,
}

dispatch! {
    /// The chunkwise form over rows `0..len` in chunks of `chunk` rows; same contract as
    /// [`gated_recurrent`]. Its products are GEMMs (`matmul_small`): `O = (scale·Q ⊙ e^G) S`,
    /// `O += A V`, `S ← diag(e^{G_C}) S + (K ⊙ e^{G_C − G})ᵀ V`, and the scores `A` in
    /// sub-chunk blocks.
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
    // Inclusive cumulative log decay `G`, `[chunk, dk]`.
    let mut cum = vec![0.0f32; chunk * dk];
    let mut w = ChunkScratch {
        q_decayed: vec![0.0; chunk * dk],
        k_decayed: vec![0.0; chunk * dk],
        scores: vec![0.0; chunk * chunk],
        products: vec![0.0; dk],
    };
    for c0 in (0..len).step_by(chunk) {
        let n = chunk.min(len - c0);
        // G: inclusive cumulative log decay inside the chunk.
        for t in 0..n {
            let (done, rest) = cum.split_at_mut(t * dk);
            let row = &mut rest[..dk];
            match x.g {
                Some(g) => row.copy_from_slice(g.row(c0 + t)),
                None => row.fill(0.0),
            }
            if t > 0 {
                for (c, &p) in row.iter_mut().zip(&done[(t - 1) * dk..]) {
                    *c += p;
                }
            }
        }
        let cum = &cum[..n * dk];
        let v = x.v.matrix(c0, n);
        let o = &mut out[c0 * out_stride..];

        // Inter-chunk: O = (scale·Q ⊙ e^G) S_prev.
        for t in 0..n {
            let (q, g) = (x.q.row(c0 + t), &cum[t * dk..(t + 1) * dk]);
            for ((d, &qi), &gi) in w.q_decayed[t * dk..(t + 1) * dk].iter_mut().zip(q).zip(g) {
                *d = x.scale * qi * exp_fast(gi);
            }
        }
        matmul_small(
            o,
            out_stride,
            false,
            1.0,
            Strided::dense(&w.q_decayed, n, dk),
            Strided::dense(state, dk, dv),
        );

        // Intra-chunk scores A_ts = scale·Σ_i q_ti k_si e^{G_ti − G_si}, s ≤ t.
        intra_chunk_scores(&x, c0, n, cum, &mut w);
        matmul_small(o, out_stride, true, 1.0, Strided::dense(&w.scores, n, n), v);

        // State passing: S ← diag(e^{G_C}) S + (K ⊙ e^{G_C − G})ᵀ V.
        let last = &cum[(n - 1) * dk..n * dk];
        for (row, &gl) in state.chunks_exact_mut(dv).zip(last) {
            let decay = exp_fast(gl);
            row.iter_mut().for_each(|s| *s *= decay);
        }
        for s in 0..n {
            let (k, g) = (x.k.row(c0 + s), &cum[s * dk..(s + 1) * dk]);
            let dst = &mut w.k_decayed[s * dk..(s + 1) * dk];
            for (((d, &ki), &gi), &gl) in dst.iter_mut().zip(k).zip(g).zip(last) {
                *d = ki * exp_fast(gl - gi);
            }
        }
        matmul_small(
            state,
            dv,
            true,
            1.0,
            Strided::dense(&w.k_decayed, n, dk).t(),
            v,
        );
    }
}

/// Fills `w.scores[..n·n]` (row stride `n`) with the causal intra-chunk scores of the chunk
/// starting at row `c0`. For a block of rows `t` starting at `r` and columns `s < r`, the
/// exponent splits at `r`: `e^{G_t − G_s} = e^{G_t − G_r}·e^{G_r − G_s}`, both factors ≤ 1,
/// so the block is one product `(q ⊙ e^{G − G_r})(k ⊙ e^{G_r − G})ᵀ` (fla's
/// `chunk_gla_fwd_A_kernel_intra_sub_inter`); diagonal blocks use the differences directly.
#[inline(always)]
fn intra_chunk_scores(x: &HeadInputs<'_>, c0: usize, n: usize, cum: &[f32], w: &mut ChunkScratch) {
    let dk = x.k.width;
    let scores = &mut w.scores[..n * n];
    scores.fill(0.0);
    for r in (0..n).step_by(SUB_CHUNK) {
        let rows = SUB_CHUNK.min(n - r);
        let g_ref = &cum[r * dk..(r + 1) * dk];
        if r > 0 {
            for t in r..r + rows {
                let (q, g) = (x.q.row(c0 + t), &cum[t * dk..(t + 1) * dk]);
                let dst = &mut w.q_decayed[t * dk..(t + 1) * dk];
                for (((d, &qi), &gi), &gr) in dst.iter_mut().zip(q).zip(g).zip(g_ref) {
                    *d = x.scale * qi * exp_fast(gi - gr);
                }
            }
            for s in 0..r {
                let (k, g) = (x.k.row(c0 + s), &cum[s * dk..(s + 1) * dk]);
                let dst = &mut w.k_decayed[s * dk..(s + 1) * dk];
                for (((d, &ki), &gi), &gr) in dst.iter_mut().zip(k).zip(g).zip(g_ref) {
                    *d = ki * exp_fast(gr - gi);
                }
            }
            matmul_small(
                &mut scores[r * n..],
                n,
                false,
                1.0,
                Strided::dense(&w.q_decayed[r * dk..], rows, dk),
                Strided::dense(&w.k_decayed, r, dk).t(),
            );
        }
        for t in r..r + rows {
            let (q, gt) = (x.q.row(c0 + t), &cum[t * dk..(t + 1) * dk]);
            for s in r..=t {
                let (k, gs) = (x.k.row(c0 + s), &cum[s * dk..(s + 1) * dk]);
                for ((((p, &qi), &ki), &a), &b) in
                    w.products.iter_mut().zip(q).zip(k).zip(gt).zip(gs)
                {
                    *p = qi * ki * exp_fast(a - b);
                }
                scores[t * n + s] = x.scale * lane_sum(&w.products);
            }
        }
    }
}

/// The sum of `x` in 16 independent lanes, so that the loop vectorises (a single running
/// sum is a serial dependency the compiler may not reorder).
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut blocks = x.chunks_exact(16);
    for block in &mut blocks {
        for (l, &v) in lanes.iter_mut().zip(block) {
            *l += v;
        }
    }
    let tail: f32 = blocks.remainder().iter().sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo;

    #[test]
    fn chunked_equals_recurrent_for_any_chunk_and_split() {
        // Small heads, and heads wider than a 16-lane sum across several sub-chunks.
        for (len, dk, dv) in [(45, 6, 5), (150, 20, 33)] {
            chunked_equals_recurrent(len, dk, dv);
        }
    }

    fn chunked_equals_recurrent(len: usize, dk: usize, dv: usize) {
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
