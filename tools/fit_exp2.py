"""Fits the polynomial behind `exp2_decay` (kernels/src/activation.rs), the selective scan's
decays: 2^f = 1 + f * P(f) for f in [-1/2, 1/2], P of degree 4, its relative error made even
over the interval (iteratively reweighted least squares on Chebyshev nodes, a near-minimax
fit), its coefficients rounded to f32. Prints them highest degree first, as the Rust constant
takes them, and the largest relative error of 2^t over t in [-126, 0] evaluated as the kernel
does in float32 (t - round(t), Horner's rule with fused multiply-adds, scaled by 2^round(t)).

    .venv/bin/python tools/fit_exp2.py
"""

import numpy as np

from near_minimax import near_minimax, print_rust_const

DEGREE = 4


def fit() -> np.ndarray:
    f = 0.5 * np.cos(np.linspace(0, np.pi, 40001))
    safe = np.where(f == 0, 1, f)
    target = np.where(f == 0, np.log(2), np.expm1(f * np.log(2)) / safe)
    # Even in the relative error of 2^f = 1 + f·P(f) itself.
    return near_minimax(f, target, DEGREE, value=lambda f, p: 1 + f * p, exact=np.exp2(f))


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to f32 (the product of two f32 is exact in f64)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c).astype(np.float32)


def exp2_decay(coeffs: np.ndarray, t: np.ndarray) -> np.ndarray:
    n = np.round(t).astype(np.float32)  # ties to even, as the kernels round
    f = (t - n).astype(np.float32)
    p = np.full_like(f, coeffs[0])
    for c in coeffs[1:]:
        p = fma(p, f, np.float64(c))
    y = fma(f, p, np.float64(1.0))
    return (y.astype(np.float64) * np.exp2(n.astype(np.float64))).astype(np.float32)


def main() -> None:
    coeffs = fit()
    print_rust_const("POLY", coeffs)
    t = np.arange(-126.0, 0.0, 0.00073).astype(np.float32)
    got = exp2_decay(coeffs, t)
    worst = np.max(np.abs(got / np.exp2(t.astype(np.float64)) - 1))
    print(f"2^t, t in [-126, 0]: worst relative error {worst:.3g}")


if __name__ == "__main__":
    main()
