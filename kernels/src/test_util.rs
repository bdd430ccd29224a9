//! Helpers shared by the kernels' unit tests.

/// Deterministic pseudo-random values in `[lo, hi)` (xorshift64).
pub fn pseudo(len: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
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

/// Asserts `out` (`[m, n]`) equals `b + x·Wᵀ` computed in f64 within 1e-5 relative, plus
/// 1e-7 of `Σ_p |x_p·w_p|` (an f32 sum's rounding errors grow with the magnitudes it adds,
/// Higham, "Accuracy and Stability of Numerical Algorithms", §3.1: a `k` of thousands needs
/// it): `x` is `[m, k]` in rows `stride` apart, `w` `[n, k]` (PyTorch's layout), `b` `[n]`.
pub fn assert_linear_matches_f64(
    out: &[f32],
    x: &[f32],
    stride: usize,
    w: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    what: &str,
) {
    for i in 0..m {
        for j in 0..n {
            let products = (0..k).map(|p| x[i * stride + p] as f64 * w[j * k + p] as f64);
            let want: f64 = b[j] as f64 + products.clone().sum::<f64>();
            let magnitude: f64 = products.map(f64::abs).sum();
            let got = out[i * n + j] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()) + 1e-7 * magnitude,
                "{what} [{i}, {j}]: {got} vs {want}"
            );
        }
    }
}

/// Asserts `out` (`[m, n]`) equals LLM.int8's product computed in i64 and f64 from the
/// quantizers' values (checked on their own against numpy, `operators/tests/int8_linear.rs`),
/// `out_ij = sx_i·sw_j·Σ_p q_ip·Q_jp + Σ_{p∈C} x_ip·Q_jp·sw_j + b_j`, within 1e-5 relative,
/// plus 1e-7 of `Σ_{p∈C} |x_ip·Q_jp·sw_j|`: the integer sums are exact, but the outlier
/// columns' f32 sum errs with the magnitudes it adds, as in [`assert_linear_matches_f64`]
/// (every column an outlier: the whole product in f32). `x` `[m, k]` dense.
pub fn assert_llm_int8(
    out: &[f32],
    x: &[f32],
    acts: &crate::int8::Int8Activations,
    w: &crate::int8::Int8Weight,
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    what: &str,
) {
    assert_eq!(out.len(), m * n);
    for i in 0..m {
        for j in 0..n {
            let q = &acts.q[i * acts.k_pad..][..k];
            let dot: i64 = q
                .iter()
                .zip(w.row(j))
                .map(|(&a, &b)| a as i64 * b as i64)
                .sum();
            let sw = w.scale[j] as f64;
            let outliers = acts
                .outliers
                .iter()
                .map(|&p| x[i * k + p] as f64 * w.row(j)[p] as f64 * sw);
            let magnitude: f64 = outliers.clone().map(f64::abs).sum();
            let want = dot as f64 * acts.scale[i] as f64 * sw + outliers.sum::<f64>() + b[j] as f64;
            let got = out[i * n + j] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()) + 1e-7 * magnitude,
                "{what} [{i}, {j}]: {got} vs {want}"
            );
        }
    }
}
