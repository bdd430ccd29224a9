//! RMSNorm (Zhang & Sennrich 2019) as Mamba uses it: `y = x · rsqrt(mean(x²) + ε) · w`,
//! the mean taken over the last dimension (`rms_norm_ref` in state-spaces/mamba,
//! `MambaRMSNorm` in HF transformers).

/// Normalises each row of `x` (`[rows, d]`) into `out`.
pub fn rms_norm(x: &[f32], d: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(weight.len(), d);
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % d.max(1), 0);
    for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        // Accumulate in f64: the reference sums in f32 on its own order; a wider sum keeps us
        // nearest the exact value, which is what the tolerance is measured against.
        let sum_sq: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = (1.0 / (sum_sq / d as f64 + eps as f64).sqrt()) as f32;
        for ((o, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
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
    for (o, &g) in out.iter_mut().zip(gate) {
        *o *= g / (1.0 + (-g).exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
