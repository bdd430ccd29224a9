"""The near-minimax polynomial fit shared by the generators of the kernels' polynomials
(`fit_log1p.py`, `fit_exp2.py`): least squares on the given nodes, reweighted (iteratively
reweighted least squares, 300 rounds) so that the relative error comes out even over them.
"""

import numpy as np


def near_minimax(nodes, target, degree, value=None, exact=None):
    """P's coefficients, highest degree first and rounded to f32, with P(nodes) fitted to
    `target`; the weights follow the relative error of `value(nodes, P(nodes))` against
    `exact` (by default P itself against `target`)."""
    value = value or (lambda _, p: p)
    exact = target if exact is None else exact
    powers = np.vstack([nodes**i for i in range(degree + 1)]).T
    weight = np.ones_like(nodes)
    for _ in range(300):
        coeffs, *_ = np.linalg.lstsq(powers * weight[:, None], target * weight, rcond=None)
        err = np.abs(value(nodes, powers @ coeffs) / exact - 1)
        weight *= 1 + err / err.max()
    return coeffs[::-1].astype(np.float32)


def print_rust_const(name, coeffs):
    """The coefficients as the Rust constant `name` takes them (`repr` of each f32's value:
    the shortest decimal that reads back as the same f32)."""
    print(f"pub const {name}: [f32; {len(coeffs)}] = [")
    for c in coeffs:
        print(f"    {float(c)!r},")
    print("];")
