//! Elementwise activations: SiLU, softplus, and an `exp` and `ln(1 + v)` that vectorise.
//!
//! The slice functions run through runtime SIMD dispatch and split large slices over the
//! rayon pool: at a prefill chunk they touch `chunk × 3E` values per layer, which as scalar
//! libm calls cost more than the layer's GEMMs.

use rayon::prelude::*;

use crate::simd::dispatch;

/// The constants of `exp_fast`, shared with the kernels that compute it in intrinsics
/// (`scan/avx512.rs`), which must give the same bits.
pub(crate) mod exp_consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 split in two for Cody–Waite: `n·LN2_HI` is exact for the `n` that occur.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5·2²³: adding and subtracting it rounds to the nearest integer (|v| < 2²²).
    pub const ROUND: f32 = 12_582_912.0;
    /// The clamp: below, eˣ underflows; above, it overflows.
    pub const MIN: f32 = -87.336_55;
    pub const MAX: f32 = 88.376_26;
    /// Cephes `expf`'s polynomial, highest degree first (Horner's order).
    pub const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5e-1,
    ];
}

/// `eˣ` for f32 by Cody–Waite range reduction and a degree-5 minimax polynomial (the Cephes
/// `expf` coefficients), written without branches so that loops calling it vectorise.
/// Relative error ≤ 2 ulp on [-87, 88]; inputs outside clamp to the ends (≈ 0 and ≈ 1.6e38).
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    use exp_consts::*;
    let x = x.clamp(MIN, MAX);
    let shifted = x.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * two_to_rounded(shifted)
}

/// 2ⁿ for `shifted = n + ROUND` (`n` an integer in [-126, 127]), built from its exponent
/// bits: `shifted` holds n in its low mantissa bits (its bits are 0x4B40_0000 + n), so integer
/// ops alone give 2ⁿ.
#[inline(always)]
fn two_to_rounded(shifted: f32) -> f32 {
    f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// The constants of [`exp2_decay`], shared with the scan's AVX-512 kernel (the same bits).
pub(crate) mod exp2_consts {
    pub use super::exp_consts::ROUND;
    /// Below, 2ᵗ leaves the normal range; the clamp keeps `n` ≥ -126.
    pub const MIN: f32 = -126.0;
    /// 2ᶠ ≈ 1 + f·P(f) on [-½, ½], P of degree 4 highest degree first: a near-minimax fit
    /// rounded to f32 (`tools/fit_exp2.py`, which prints these and the error bound below).
    /// Cephes `exp2f`'s P of degree 5 is within 7.9e-8 where this is within 1.6e-7, a
    /// multiply-add fewer for each of the scan's cells (one of ~14 on the multiply pipes):
    /// `examples/scan_step.rs` 512 rows of one session, one thread, alternated (2026-12-05)
    /// 0.286-0.301 → 0.268-0.278 ns a cell; 32 sessions' steps, whose states stream from
    /// memory, 4.67-5.03 → 4.42-4.81 ms (within the noise).
    // The fit's own value near ln 2 (3 ulp below `LN_2` in f32), not the constant.
    #[allow(clippy::approx_constant)]
    pub const POLY: [f32; 5] = [
        1.326_473e-3,
        9.671_513e-3,
        5.550_733_6e-2,
        2.402_224_2e-1,
        6.931_47e-1,
    ];
}

/// `2ᵗ` for `t ≤ 0`, the selective scan's decays `exp(Δ·A) = 2^(Δ·log₂e·A)` (Δ ≥ 0 out of
/// softplus, `A = −exp(A_log)` < 0): the Cephes `exp2f` reduction and a polynomial of degree
/// 5 (`exp2_consts::POLY`), branch-free. Against [`exp_fast`] it skips the Cody–Waite
/// reduction (`t − round(t)` is exact) and the upper clamp, four of the ~15 operations on the
/// multiply pipes that bound the scan. Relative error ≤ 1.7e-7 on [-126, 0]; below, 2⁻¹²⁶;
/// above 0 (never a decay), 1; NaN, 2⁻¹²⁶.
#[inline(always)]
pub fn exp2_decay(t: f32) -> f32 {
    use exp2_consts::*;
    // `max` first: a NaN becomes MIN, as `vmaxps` with the NaN first does (`clamp` would
    // keep the NaN).
    #[allow(clippy::manual_clamp)]
    let t = t.max(MIN).min(0.0);
    let shifted = t + ROUND;
    let n = shifted - ROUND;
    let f = t - n;
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p.mul_add(f, *c);
    }
    let y = f.mul_add(p, 1.0);
    y * two_to_rounded(shifted)
}

/// `x·σ(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// `ln(1 + v)·v⁻¹` ≈ P(v) on [0, 1], highest degree first: a near-minimax fit of degree 8
/// rounded to f32 (`tools/fit_log1p.py`, which prints these). In f32, `v·P(v)` is within
/// 2.1e-7 of `ln(1 + v)`, relatively, over (0, 1].
pub(crate) const LOG1P_POLY: [f32; 9] = [
    0.005_232_695,
    -0.029_505_242,
    0.078_225_96,
    -0.136_632_46,
    0.191_060_07,
    -0.248_429_82,
    0.333_190_98,
    -0.499_994_93,
    0.999_999_94,
];

/// `ln(1 + v)` for `v` in [0, 1]: `v·P(v)` ([`LOG1P_POLY`]), no division and no branch, so
/// that loops calling it vectorise.
#[inline(always)]
fn ln_1p_unit(v: f32) -> f32 {
    let mut p = LOG1P_POLY[0];
    for c in &LOG1P_POLY[1..] {
        p = p.mul_add(v, *c);
    }
    p * v
}

/// `log(1 + eˣ)` as `max(x, 0) + ln(1 + e^{−|x|})`: no overflow, and above PyTorch's (and the
/// Mamba CUDA kernel's) threshold of 20 it is `x` itself (`e^{−20}` is below half of `x`'s
/// ulp). Within 3.2e-7 relative of the exact value (the polynomial's 2e-7 and `exp_fast`'s
/// 2 ulp). As `ln(1 + eˣ)` with a vectorised `ln` it took a division (Goldberg's `ln(w)·u/(w −
/// 1)`) and two selects: 15% of a 512-token prefill's scan, which takes Δ out of it.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    x.max(0.0) + ln_1p_unit(exp_fast(-x.abs()))
}

/// `log σ(x) = -softplus(-x)`, stable for large |x| (PyTorch's `F.logsigmoid`).
#[inline(always)]
pub fn logsigmoid(x: f32) -> f32 {
    // min(x, 0) - log1p(exp(-|x|))
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// `logsigmoid` over a slice, vectorised (`min(x, 0) − ln(1 + e^{−|x|})`).
pub fn logsigmoid_inplace(values: &mut [f32]) {
    logsigmoid_simd(values);
}

#[inline(always)]
fn logsigmoid_body(values: &mut [f32]) {
    for v in values {
        *v = v.min(0.0) - ln_1p_unit(exp_fast(-v.abs()));
    }
}

dispatch! { fn logsigmoid_simd(values: &mut [f32]) => logsigmoid_body }

/// `σ(x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Values per parallel task: below this a slice is done on the calling thread.
const PARALLEL_CHUNK: usize = 16 * 1024;

#[inline(always)]
fn silu_body(values: &mut [f32]) {
    for v in values {
        *v = silu(*v);
    }
}

#[inline(always)]
fn softplus_body(values: &mut [f32]) {
    for v in values {
        *v = softplus(*v);
    }
}

#[inline(always)]
fn softplus_into_body(values: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(values) {
        *o = softplus(*v);
    }
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

dispatch! {
    /// [`silu`] over a slice on the calling thread (for a kernel's own share of a batch).
    pub fn silu_slice(values: &mut [f32]) => silu_body
}
#[inline(always)]
fn mul_silu_body(values: &mut [f32], gate: &[f32]) {
    for (v, g) in values.iter_mut().zip(gate) {
        *v *= silu(*g);
    }
}

dispatch! { fn silu_mul_simd(gate: &mut [f32], up: &[f32]) => silu_mul_body }
dispatch! { fn mul_silu_simd(values: &mut [f32], gate: &[f32]) => mul_silu_body }

/// `kernel(a, b)` over matching chunks of `a` and `b`, on the pool where they are long.
fn zip_chunks(a: &mut [f32], b: &[f32], kernel: fn(&mut [f32], &[f32])) {
    assert_eq!(a.len(), b.len());
    if a.len() <= PARALLEL_CHUNK {
        kernel(a, b);
    } else {
        a.par_chunks_mut(PARALLEL_CHUNK)
            .zip(b.par_chunks(PARALLEL_CHUNK))
            .for_each(|(a, b)| kernel(a, b));
    }
}

/// `gate ← silu(gate) ⊙ up` (the SwiGLU of gated MLPs).
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) {
    zip_chunks(gate, up, silu_mul_simd);
}

/// `values ← values ⊙ silu(gate)` (a swish-gated output).
pub fn mul_silu_inplace(values: &mut [f32], gate: &[f32]) {
    zip_chunks(values, gate, mul_silu_simd);
}
dispatch! {
    /// [`softplus`] over a slice on the calling thread (for a kernel's own share of a batch).
    pub(crate) fn softplus_slice(values: &mut [f32]) => softplus_body
}
dispatch! {
    /// [`softplus`] of `values` into `out` (as long), on the calling thread: one pass where
    /// a copy and [`softplus_slice`] take two.
    pub(crate) fn softplus_into(values: &[f32], out: &mut [f32]) => softplus_into_body
}

pub fn silu_inplace(values: &mut [f32]) {
    if values.len() <= PARALLEL_CHUNK {
        silu_slice(values);
    } else {
        values.par_chunks_mut(PARALLEL_CHUNK).for_each(silu_slice);
    }
}

pub fn softplus_inplace(values: &mut [f32]) {
    if values.len() <= PARALLEL_CHUNK {
        softplus_slice(values);
    } else {
        values
            .par_chunks_mut(PARALLEL_CHUNK)
            .for_each(softplus_slice);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest relative error of `f` against `reference` (in f64) from `from` to `to` in
    /// steps of `step`.
    fn worst_relative_error(
        (from, to, step): (f32, f32, f32),
        f: impl Fn(f32) -> f32,
        reference: impl Fn(f64) -> f64,
    ) -> f64 {
        let mut worst = 0.0f64;
        let mut x = from;
        while x <= to {
            let (got, want) = (f(x) as f64, reference(x as f64));
            worst = worst.max(((got - want) / want).abs());
            x += step;
        }
        worst
    }

    #[test]
    fn exp_fast_is_close_to_libm() {
        let worst = worst_relative_error((-87.0, 88.0, 0.001_37), exp_fast, f64::exp);
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1000.0) < 1e-37);
    }

    #[test]
    fn exp2_decay_is_close_to_libm() {
        let worst = worst_relative_error((-126.0, 0.0, 0.000_73), exp2_decay, f64::exp2);
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp2_decay(0.0), 1.0);
        assert_eq!(exp2_decay(-3.0), 0.125);
        for (t, want) in [
            (-1000.0, 2f32.powi(-126)),
            (5.0, 1.0),
            (f32::NAN, 2f32.powi(-126)),
        ] {
            assert_eq!(exp2_decay(t), want, "{t}");
        }
    }

    #[test]
    fn logsigmoid_is_stable() {
        for &x in &[-200.0f32, -30.0, -1.0, 0.0, 2.5, 40.0] {
            let want = -((-(x as f64)).exp().ln_1p());
            assert!(
                (logsigmoid(x) as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}"
            );
        }
    }

    #[test]
    fn ln_1p_unit_is_close_to_libm() {
        // (0, 1] in 2²⁰ steps, and the ends: the fit's bound is 2.1e-7 (tools/fit_log1p.py).
        let steps = 1 << 20;
        let mut worst = 0.0f64;
        for i in 0..=steps {
            let v = i as f32 / steps as f32;
            let (got, want) = (ln_1p_unit(v) as f64, (v as f64).ln_1p());
            worst = worst.max((got - want).abs() / want.max(1e-30));
        }
        for v in [1e-30f32, 1e-12, 3e-8] {
            let want = (v as f64).ln_1p();
            worst = worst.max((ln_1p_unit(v) as f64 - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn mul_silu_gates_each_value_by_the_definition() {
        // Over the pool in chunks, the last one short.
        let n = 3 * PARALLEL_CHUNK + 5;
        let gate: Vec<f32> = (0..n).map(|i| -30.0 + (i % 6001) as f32 * 0.01).collect();
        let before: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.5).collect();
        let mut values = before.clone();
        mul_silu_inplace(&mut values, &gate);
        for ((&got, &v), &g) in values.iter().zip(&before).zip(&gate) {
            let g = g as f64;
            let want = v as f64 * g / (1.0 + (-g).exp());
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                "{v}·silu({g}) = {got} vs {want}"
            );
        }
    }

    #[test]
    fn softplus_and_silu_match_their_definitions() {
        let mut xs: Vec<f32> = vec![-100.0, -30.0, -3.0, -0.1, 0.0, 0.7, 5.0, 19.9, 20.1, 50.0];
        xs.extend((0..40_000).map(|i| -40.0 + i as f32 * 0.0015));
        let mut sp = xs.clone();
        softplus_inplace(&mut sp);
        let mut si = xs.clone();
        silu_inplace(&mut si);
        for (i, &x) in xs.iter().enumerate() {
            let want_sp = if x > 20.0 {
                x as f64
            } else {
                (x as f64).exp().ln_1p()
            };
            assert!(
                (sp[i] as f64 - want_sp).abs() <= 1e-6 * want_sp.abs() + 1e-30,
                "softplus({x}) = {} vs {want_sp}",
                sp[i]
            );
            let want_silu = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!(
                (si[i] as f64 - want_silu).abs() <= 1e-6 * want_silu.abs() + 1e-30,
                "silu({x}) = {} vs {want_silu}",
                si[i]
            );
        }
    }
}
