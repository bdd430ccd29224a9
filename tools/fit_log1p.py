"""Fits the polynomial behind `ln_1p_unit` (kernels/src/activation.rs): ln(1 + v) = v * P(v)
for v in [0, 1], P of degree 8, its relative error made even over the interval (iteratively
reweighted least squares on Chebyshev nodes, a near-minimax fit), its coefficients rounded
to f32. Prints them highest degree first, as the Rust constant takes them, and the largest
relative error of ln(1 + v) and of softplus(x) = max(x, 0) + ln(1 + e^-|x|) evaluated in
float32 with Horner's rule (e^-|x| rounded correctly: the kernels' own exp adds its <= 2 ulp).

    .venv/bin/python tools/fit_log1p.py
"""

import numpy as np

from near_minimax import near_minimax, print_rust_const

DEGREE = 8


def fit() -> np.ndarray:
    v = (1 - np.cos(np.linspace(0, np.pi, 40001))) / 2
    safe = np.where(v == 0, 1, v)
    target = np.where(v == 0, 1.0, np.log1p(v) / safe)
    return near_minimax(v, target, DEGREE)


def horner(coeffs: np.ndarray, v: np.ndarray) -> np.ndarray:
    p = np.full_like(v, coeffs[0])
    for c in coeffs[1:]:
        p = (p * v + c).astype(np.float32)
    return p


def main() -> None:
    coeffs = fit()
    print_rust_const("LOG1P_POLY", coeffs)
    v = np.linspace(0, 1, 1_000_001).astype(np.float32)[1:]
    ln1p = (horner(coeffs, v) * v).astype(np.float32)
    worst = np.max(np.abs(ln1p / np.log1p(v.astype(np.float64)) - 1))
    print(f"ln(1 + v), v in (0, 1]: worst relative error {worst:.3g}")
    x = np.linspace(-40, 40, 800_001).astype(np.float32)
    e = np.exp(-np.abs(x.astype(np.float64))).astype(np.float32)
    softplus = (np.maximum(x, 0) + horner(coeffs, e) * e).astype(np.float32)
    want = np.logaddexp(0, x.astype(np.float64))
    worst = np.max(np.abs(softplus / want - 1))
    print(f"softplus(x), x in [-40, 40]: worst relative error {worst:.3g}")


if __name__ == "__main__":
    main()
