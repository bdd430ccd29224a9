//! The selective-scan recurrence of Mamba (Gu & Dao 2023, Algorithm 2; `selective_scan_ref`
//! in state-spaces/mamba, `MambaMixer.slow_forward` in HF transformers), fused with the skip
//! term and the output gate:
//!
//! ```text
//! h_t = exp(Δ_t·A) ⊙ h_{t-1} + (Δ_t·x_t)·B_t        (per channel c: h ∈ R^N)
//! y_t = ⟨h_t, C_t⟩ + D·x_t
//! y_t ← y_t · silu(z_t)
//! ```
//!
//! The kernel runs over a *packed* batch: the rows of many sessions back to back, each session
//! a segment of consecutive rows with its own state. A decode step is a batch of one-row
//! segments; a prefill chunk is one long segment. Work is split over (segment, channel block)
//! pairs, which are independent, and run on the rayon pool.

use std::ops::Range;

use rayon::prelude::*;

use crate::activation::{exp_fast, silu};
use crate::matmul::MatRef;
use crate::simd::dispatch;

/// Per-layer constants of the SSM.
#[derive(Clone, Copy, Debug)]
pub struct SsmParams<'a> {
    /// `A = -exp(A_log)`, `[E, N]`.
    pub a: &'a [f32],
    /// Skip weights `D`, `[E]`.
    pub d: &'a [f32],
    /// Channels `E`.
    pub channels: usize,
    /// State size `N`.
    pub state_size: usize,
}

/// The per-row inputs of a packed batch of `M` rows.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a> {
    /// Conv output after SiLU, `[M, E]`.
    pub x: &'a [f32],
    /// `Δ` after softplus, `[M, E]`.
    pub delta: &'a [f32],
    /// `B_t`, `M × N` (usually columns of `x_proj`'s output).
    pub b: MatRef<'a>,
    /// `C_t`, `M × N`.
    pub c: MatRef<'a>,
    /// The gate `z`, `M × E` (the second half of `in_proj`'s output).
    pub z: MatRef<'a>,
}

/// One session's rows in the packed batch and its SSM state (`[E, N]`, updated in place).
pub struct ScanSegment<'s> {
    pub rows: Range<usize>,
    pub state: &'s mut [f32],
}

/// Runs the recurrence for every segment and writes the gated output `y` (`[M, E]`).
pub fn selective_scan(
    params: SsmParams<'_>,
    inputs: ScanInputs<'_>,
    segments: &mut [ScanSegment<'_>],
    y: &mut [f32],
) {
    let (e, n) = (params.channels, params.state_size);
    assert_eq!(params.a.len(), e * n);
    assert_eq!(params.d.len(), e);
    let m = segments.iter().map(|s| s.rows.end).max().unwrap_or(0);
    assert!(inputs.x.len() >= m * e && inputs.delta.len() >= m * e && y.len() >= m * e);
    for mat in [inputs.b, inputs.c] {
        assert!(mat.rows >= m && mat.cols == n);
    }
    assert!(inputs.z.rows >= m && inputs.z.cols == e);

    // Enough (segment, channel block) jobs to keep every thread busy, in blocks of whole
    // SIMD widths so that channel blocks do not split cache lines of `y` needlessly.
    let threads = rayon::current_num_threads();
    let blocks_per_segment = (4 * threads).div_ceil(segments.len().max(1)).max(1);
    let block = e
        .div_ceil(blocks_per_segment)
        .next_multiple_of(16)
        .min(e)
        .max(1);

    let y_ptr = SendPtr(y.as_mut_ptr());
    let mut jobs = Vec::new();
    for seg in segments.iter_mut() {
        assert_eq!(seg.state.len(), e * n, "SSM state is not [{e}, {n}]");
        for (i, state) in seg.state.chunks_mut(block * n).enumerate() {
            let c0 = i * block;
            jobs.push(BlockJob {
                rows: seg.rows.clone(),
                channels: c0..c0 + state.len() / n,
                state,
            });
        }
    }
    let run = |job: &mut BlockJob<'_>| scan_block(&params, &inputs, job, y_ptr);
    if jobs.len() == 1 || m * e * n < 1 << 14 {
        jobs.iter_mut().for_each(run);
    } else {
        jobs.par_iter_mut().for_each(run);
    }
}

struct BlockJob<'s> {
    rows: Range<usize>,
    channels: Range<usize>,
    state: &'s mut [f32],
}

/// A raw pointer to `y` that jobs on other threads write through. Each job writes only the
/// (rows, channels) cells of its own segment and channel block, and those never overlap.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: see the type's comment: writes through it are disjoint, and `selective_scan` holds
// the unique borrow of `y` until every job has finished.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

dispatch! {
    fn scan_block(
        params: &SsmParams<'_>,
        inputs: &ScanInputs<'_>,
        job: &mut BlockJob<'_>,
        y: SendPtr,
    ) => scan_block_body
}

const LANES: usize = 16;

#[inline(always)]
fn scan_block_body(
    params: &SsmParams<'_>,
    inputs: &ScanInputs<'_>,
    job: &mut BlockJob<'_>,
    y: SendPtr,
) {
    let (e, n) = (params.channels, params.state_size);
    let c0 = job.channels.start;
    for row in job.rows.clone() {
        let b_t = &inputs.b.data[row * inputs.b.row_stride..][..n];
        let c_t = &inputs.c.data[row * inputs.c.row_stride..][..n];
        let z_row = &inputs.z.data[row * inputs.z.row_stride..][..e];
        for ch in job.channels.clone() {
            let dt = inputs.delta[row * e + ch];
            let xv = inputs.x[row * e + ch];
            let dtx = dt * xv;
            let a = &params.a[ch * n..][..n];
            let h = &mut job.state[(ch - c0) * n..][..n];
            let mut lanes = [0.0f32; LANES];
            let whole = n - n % LANES;
            for i0 in (0..whole).step_by(LANES) {
                for l in 0..LANES {
                    let i = i0 + l;
                    let hv = exp_fast(dt * a[i]).mul_add(h[i], dtx * b_t[i]);
                    h[i] = hv;
                    lanes[l] = hv.mul_add(c_t[i], lanes[l]);
                }
            }
            let mut acc = 0.0f32;
            for i in whole..n {
                let hv = exp_fast(dt * a[i]).mul_add(h[i], dtx * b_t[i]);
                h[i] = hv;
                acc = hv.mul_add(c_t[i], acc);
            }
            acc += lanes.iter().sum::<f32>();
            let out = params.d[ch].mul_add(xv, acc) * silu(z_row[ch]);
            // SAFETY: (row, ch) is inside this job's segment rows and channel block, which no
            // other job writes, and `row * e + ch < M·E <= y.len()` (checked by the caller).
            unsafe { *y.0.add(row * e + ch) = out };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recurrence written out in f64, one step at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f32],
        d: &[f32],
        e: usize,
        n: usize,
        x: &[f32],
        delta: &[f32],
        b: &[f32],
        c: &[f32],
        z: &[f32],
        rows: usize,
        h: &mut [f64],
    ) -> Vec<f32> {
        let mut y = vec![0.0; rows * e];
        for t in 0..rows {
            for ch in 0..e {
                let dt = delta[t * e + ch] as f64;
                let xv = x[t * e + ch] as f64;
                let mut acc = 0.0;
                for i in 0..n {
                    let hv = (dt * a[ch * n + i] as f64).exp() * h[ch * n + i]
                        + dt * b[t * n + i] as f64 * xv;
                    h[ch * n + i] = hv;
                    acc += hv * c[t * n + i] as f64;
                }
                let zv = z[t * e + ch] as f64;
                y[t * e + ch] = ((acc + d[ch] as f64 * xv) * zv / (1.0 + (-zv).exp())) as f32;
            }
        }
        y
    }

    fn pseudo(len: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    #[test]
    fn packed_segments_match_reference_run_alone() {
        for &(e, n) in &[(5usize, 3usize), (40, 16), (70, 21)] {
            let lens = [7usize, 1, 12, 1, 3];
            let m: usize = lens.iter().sum();
            let a: Vec<f32> = pseudo(e * n, 1, 0.1, 3.0).iter().map(|v| -v).collect();
            let d = pseudo(e, 2, -1.0, 1.0);
            let x = pseudo(m * e, 3, -2.0, 2.0);
            let delta = pseudo(m * e, 4, 0.001, 1.5);
            let b = pseudo(m * n, 5, -1.0, 1.0);
            let c = pseudo(m * n, 6, -1.0, 1.0);
            let z = pseudo(m * e, 7, -3.0, 3.0);
            let init: Vec<Vec<f32>> = (0..lens.len())
                .map(|i| pseudo(e * n, 10 + i as u64, -0.5, 0.5))
                .collect();

            let mut states = init.clone();
            let mut starts = vec![0];
            for l in lens {
                starts.push(starts.last().unwrap() + l);
            }
            let mut segments: Vec<ScanSegment<'_>> = states
                .iter_mut()
                .enumerate()
                .map(|(i, s)| ScanSegment {
                    rows: starts[i]..starts[i + 1],
                    state: s,
                })
                .collect();
            let mut y = vec![f32::NAN; m * e];
            selective_scan(
                SsmParams {
                    a: &a,
                    d: &d,
                    channels: e,
                    state_size: n,
                },
                ScanInputs {
                    x: &x,
                    delta: &delta,
                    b: MatRef::dense(&b, m, n),
                    c: MatRef::dense(&c, m, n),
                    z: MatRef::dense(&z, m, e),
                },
                &mut segments,
                &mut y,
            );
            for (i, len) in lens.iter().enumerate() {
                let r = starts[i]..starts[i + 1];
                let mut h: Vec<f64> = init[i].iter().map(|&v| v as f64).collect();
                let want = reference(
                    &a,
                    &d,
                    e,
                    n,
                    &x[r.start * e..],
                    &delta[r.start * e..],
                    &b[r.start * n..],
                    &c[r.start * n..],
                    &z[r.start * e..],
                    *len,
                    &mut h,
                );
                for (k, w) in want.iter().enumerate() {
                    let got = y[r.start * e + k];
                    assert!(
                        (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "e={e} n={n} seg {i}: {got} vs {w}"
                    );
                }
                for (got, w) in states[i].iter().zip(&h) {
                    assert!((*got as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()));
                }
            }
        }
    }
}
