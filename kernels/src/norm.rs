//! RMSNorm (Zhang & Sennrich 2019) as Mamba uses it: `y = x · rsqrt(mean(x²) + ε) · w`,
//! the mean taken over the last dimension (`rms_norm_ref` in state-spaces/mamba,
//! `MambaRMSNorm` in HF transformers).

use rayon::prelude::*;

use crate::simd::dispatch;

/// Rows from which [`rms_norm`] splits its rows over the pool (a prefill chunk's, not a
/// decode step's: 32 rows take ~6 µs, about a hand-off of the pool), in tasks of
/// [`ROWS_PER_TASK`].
const PARALLEL_MIN_ROWS: usize = 128;
const ROWS_PER_TASK: usize = 32;

/// Normalises each row of `x` (`[rows, d]`) into `out`.
pub fn rms_norm(x: &[f32], d: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(weight.len(), d);
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % d.max(1), 0);
    if d > 0 && x.len() / d >= PARALLEL_MIN_ROWS && rayon::current_num_threads() > 1 {
        // Each row on its own: the same bits however the rows are shared.
        x.par_chunks(ROWS_PER_TASK * d)
            .zip(out.par_chunks_mut(ROWS_PER_TASK * d))
            .for_each(|(x, out)| rms_norm_rows(x, d, weight, eps, out));
    } else {
        rms_norm_rows(x, d, weight, eps, out);
    }
}

dispatch! {
    fn rms_norm_rows(x: &[f32], d: usize, weight: &[f32], eps: f32, out: &mut [f32])
        => rms_norm_body
}

#[inline(always)]
fn rms_norm_body(x: &[f32], d: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let scale = (1.0 / (sum_of_squares(row) / d as f64 + eps as f64).sqrt()) as f32;
        for ((o, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// `Σ v²` over `row` in f64: the reference sums in f32 in its own order; a wider sum keeps us
/// nearest the exact value, which the tolerance is measured against. Eight running sums (a
/// vector's lanes) rather than one: one sum is a chain of dependent adds, ~1 µs a 768-wide
/// row, 0.9 ms of a batch-32 mamba-130m step (2026-12-04).
#[inline(always)]
fn sum_of_squares(row: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += (v as f64) * (v as f64);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Values a task of [`l2_normalize`] takes (16 Ki, 64 KB: a few µs) and the fewest values it
/// splits over the pool: a prefill chunk's q or k (512 rows of a 130m-shaped DeltaNet is 393 Ki
/// values), not a decode step's.
const L2_VALUES_PER_TASK: usize = 1 << 14;

/// fla's `l2norm` (`fla/modules/norm/l2norm.py`), in place: each row of `width` values times
/// `1 / sqrt(Σx² + 1e-6)`, the sum in sixteen f32 lanes. DeltaNet's q and k are 2·H rows a
/// token; summed in one chain of f32 adds on the calling thread they were 0.7% of
/// a 512-token DeltaNet prefill, with the pool's other thread idle (perf, 2026-12-05).
pub fn l2_normalize(x: &mut [f32], width: usize) {
    assert_eq!(x.len() % width.max(1), 0);
    if width == 0 {
        return;
    }
    let task = L2_VALUES_PER_TASK.div_ceil(width) * width;
    if x.len() >= 4 * task && rayon::current_num_threads() > 1 {
        x.par_chunks_mut(task)
            .for_each(|rows| l2_normalize_rows(rows, width));
    } else {
        l2_normalize_rows(x, width);
    }
}

dispatch! {
    fn l2_normalize_rows(x: &mut [f32], width: usize) => l2_normalize_body
}

#[inline(always)]
fn l2_normalize_body(x: &mut [f32], width: usize) {
    for row in x.chunks_exact_mut(width) {
        // fla multiplies by `1 / sqrt(Σx² + ε)` (`fla/modules/norm/l2norm.py`): a
        // multiplication, not a division, per value. It sums in f32, as here, in 16 lanes.
        let rstd = 1.0 / (sum_of_squares_f32(row) + 1e-6).sqrt();
        row.iter_mut().for_each(|v| *v *= rstd);
    }
}

/// `Σ v²` over `row` in sixteen f32 running sums (a vector's lanes), added at the end.
#[inline(always)]
fn sum_of_squares_f32(row: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| v * v).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = v.mul_add(v, *lane);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// fla's `FusedRMSNormGated` with the swish gate: `y = rms_norm(x)·w ⊙ g·σ(g)` per row of `d`
/// (norm first, then gate; `fla/modules/fused_norm_gate.py`).
pub fn rms_norm_gated(
    x: &[f32],
    gate: &[f32],
    d: usize,
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    assert_eq!(x.len(), gate.len());
    rms_norm(x, d, weight, eps, out);
    // Vectorised and over the pool: a scalar loop with libm's `expf` on the calling thread
    // took ~1.1% of a 512-token GLA prefill (perf, 2026-12-05).
    crate::activation::mul_silu_inplace(out, gate);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows long enough for the eight running sums and a tail, against the sum in exact
    /// order (f64 both: the orders may differ in the last bits of the f64, not of the f32).
    #[test]
    fn long_rows_match_a_plain_sum() {
        for d in [1usize, 7, 8, 9, 768, 1023] {
            let x: Vec<f32> = (0..3 * d)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / d as f32).collect();
            let mut out = vec![0.0f32; x.len()];
            rms_norm(&x, d, &w, 1e-5, &mut out);
            for (row, got) in x.chunks(d).zip(out.chunks(d)) {
                let sum: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
                let scale = (1.0 / (sum / d as f64 + 1e-5f64).sqrt()) as f32;
                for ((&v, &w), &g) in row.iter().zip(&w).zip(got) {
                    assert_eq!(g, v * scale * w, "d = {d}");
                }
            }
        }
    }

    /// Each row times its reciprocal norm, fla's 1e-6 inside the root, against a sum in f64;
    /// enough rows to go over the pool.
    #[test]
    fn l2_rows_have_unit_norm() {
        for width in [1usize, 7, 64, 100] {
            let rows = 8 * L2_VALUES_PER_TASK / width + 3;
            let x: Vec<f32> = (0..rows * width)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let mut got = x.clone();
            l2_normalize(&mut got, width);
            for (row, got) in x.chunks(width).zip(got.chunks(width)) {
                let sum: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
                let rstd = (1.0 / (sum + 1e-6).sqrt()) as f32;
                for (&v, &g) in row.iter().zip(got) {
                    let want = v * rstd;
                    assert!(
                        (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "width {width}"
                    );
                }
            }
        }
    }

    #[test]
    fn normalises_rows() {
        let x = [3.0f32, 4.0, -1.0, 1.0];
        let w = [1.0f32, 2.0];
        let mut out = [0.0f32; 4];
        rms_norm(&x, 2, &w, 0.0, &mut out);
        let s = (12.5f32).sqrt();
        let want = [3.0 / s, 8.0 / s, -1.0, 2.0];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }
}
