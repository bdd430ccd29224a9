//! The matrix exponential in f64, for discretising continuous-time state-space models by
//! zero-order hold (`exp([[A, B], [0, 0]]·dt) = [[Ā, B̄], [0, I]]`, as
//! `scipy.signal.cont2discrete(method="zoh")` computes it).
//!
//! Scaling and squaring with a Taylor polynomial: `e^A = (e^{A/2^s})^{2^s}` with `s` chosen so
//! that `‖A/2^s‖₁ ≤ 1/4`, where 14 Taylor terms leave a truncation error below 1e-18 relative.
//! Products go through `gemm` (f64).

use gemm::Parallelism;

/// `a · b` for dense row-major `n × n` f64 matrices.
pub fn matmul_square_f64(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut dst = vec![0.0; n * n];
    square_product(a, b, &mut dst, n);
    dst
}

/// `dst = a · b` for dense row-major `n × n` matrices.
fn square_product(a: &[f64], b: &[f64], dst: &mut [f64], n: usize) {
    assert!(a.len() == n * n && b.len() == n * n && dst.len() == n * n);
    // SAFETY: the three slices hold n × n values each and `dst` is a unique borrow.
    unsafe {
        gemm::gemm(
            n,
            n,
            n,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            n as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// `e^A` of a dense row-major `n × n` matrix.
pub fn expm(a: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n);
    let norm = (0..n)
        .map(|j| (0..n).map(|i| a[i * n + j].abs()).sum::<f64>())
        .fold(0.0, f64::max);
    let mut squarings = 0;
    while norm / 2f64.powi(squarings) > 0.25 {
        squarings += 1;
    }
    let scale = 2f64.powi(-squarings);
    let scaled: Vec<f64> = a.iter().map(|v| v * scale).collect();
    // Horner: I + X(I + X/2(I + X/3(... (I + X/14)))).
    let identity = |m: &mut [f64]| {
        for i in 0..n {
            m[i * n + i] += 1.0;
        }
    };
    let mut acc = vec![0.0; n * n];
    identity(&mut acc);
    let mut tmp = vec![0.0; n * n];
    for k in (1..=14).rev() {
        square_product(&scaled, &acc, &mut tmp, n);
        tmp.iter_mut().for_each(|v| *v /= k as f64);
        identity(&mut tmp);
        std::mem::swap(&mut acc, &mut tmp);
    }
    for _ in 0..squarings {
        square_product(&acc, &acc, &mut tmp, n);
        std::mem::swap(&mut acc, &mut tmp);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_generator_gives_cos_sin() {
        // e^{[[0, -t], [t, 0]]} = [[cos t, -sin t], [sin t, cos t]], over a norm that needs squarings.
        let t = 37.5f64;
        let e = expm(&[0.0, -t, t, 0.0], 2);
        let want = [t.cos(), -t.sin(), t.sin(), t.cos()];
        for (a, b) in e.iter().zip(want) {
            assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        }
    }

    #[test]
    fn nilpotent_block_gives_zero_order_hold() {
        // [[a, b], [0, 0]] → [[e^a, b(e^a − 1)/a], [0, 1]]: the scalar ZOH of ẋ = a x + b u.
        let (a, b) = (-0.7f64, 2.0f64);
        let e = expm(&[a, b, 0.0, 0.0], 2);
        assert!((e[0] - a.exp()).abs() < 1e-14);
        assert!((e[1] - b * (a.exp() - 1.0) / a).abs() < 1e-14);
        assert!((e[3] - 1.0).abs() < 1e-14 && e[2].abs() < 1e-14);
    }
}
