"""Writes tests/fixtures/int8/linear.safetensors: LLM.int8 products computed in numpy, for the
test of Tideway's int8 linear layers (kernels/src/int8/, `--dtype int8`).

The math is LLM.int8's (Dettmers et al. 2022, section 3.2, "mixed-precision decomposition"),
as bitsandbytes' `MatMul8bitLt` runs it for inference with threshold 6:
  - weights, per output row j: sw_j = max_p |W_jp| / 127, Q_jp = round(W_jp / sw_j) (float32
    division, nearest with ties to even, as torch.round and CUDA's __float2int_rn);
  - outlier columns C: every p with |x_ip| >= 6 for some row i;
  - activations, per row i, without C: sx_i = max_{p not in C} |x_ip| / 127,
    q_ip = round(x_ip / sx_i), 0 on C;
  - out_ij = sx_i * sw_j * sum_p q_ip Q_jp (exact integer sum)
             + sum_{p in C} x_ip * (Q_jp * sw_j)   (the dequantized weight, float32)
             + b_j.
Each case stores x, W, b and out, and the quantizer's sw, q, sx and C for diagnosis.

    .venv/bin/python tools/gen_int8_fixtures.py
"""

import pathlib

import numpy as np
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "int8" / "linear.safetensors"
THRESHOLD = np.float32(6.0)

# (name, rows, in, out, outlier columns planted (row, column, value))
CASES = [
    ("decode_1", 1, 768, 128, []),
    ("decode_1_outlier", 1, 1536, 80, [(0, 17, 9.5)]),
    ("batch_8", 8, 768, 200, [(3, 5, -7.25), (6, 700, 6.0)]),
    ("batch_33_ragged", 33, 301, 129, [(0, 0, 12.0), (32, 300, -6.5)]),
    ("prefill_80", 80, 512, 160, [(10, 400, 8.0), (79, 3, -20.0), (40, 400, 6.5)]),
    # Many outlier columns over many tiles of rows (the panel kernel widens them once: rows
    # and outputs enough that a 2-thread pool gives each share all the rows), and every
    # column an outlier (no int8 part at all: the random 130M's out_proj).
    ("prefill_100_many", 100, 384, 300, [(p % 100, p, 7.0 - 14.0 * (p % 2)) for p in range(0, 384, 3)]),
    ("prefill_64_every", 64, 96, 200, [(p % 64, p, 6.0 + p % 5) for p in range(96)]),
]


def llm_int8(x, w, b):
    x = x.astype(np.float32)
    w = w.astype(np.float32)
    sw = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    safe_sw = np.where(sw > 0, sw, np.float32(1))
    wq = np.clip(np.rint(w / safe_sw[:, None]), -127, 127).astype(np.int8)
    wq[sw == 0] = 0
    outliers = np.nonzero((np.abs(x) >= THRESHOLD).any(axis=0))[0]
    inliers = x.copy()
    inliers[:, outliers] = 0
    sx = (np.abs(inliers).max(axis=1) / np.float32(127)).astype(np.float32)
    safe_sx = np.where(sx > 0, sx, np.float32(1))
    xq = np.clip(np.rint(inliers / safe_sx[:, None]), -127, 127).astype(np.int8)
    xq[sx == 0] = 0
    dots = xq.astype(np.int64) @ wq.astype(np.int64).T
    out = dots.astype(np.float64) * sx.astype(np.float64)[:, None] * sw.astype(np.float64)[None, :]
    dequant = (wq[:, outliers].astype(np.float32) * sw[:, None]).astype(np.float64)
    out += x[:, outliers].astype(np.float64) @ dequant.T
    out += b.astype(np.float64)[None, :]
    return out.astype(np.float32), wq, sw, xq, sx, outliers


def main():
    rng = np.random.default_rng(20)
    tensors = {}
    for name, m, k, n, planted in CASES:
        # Activations like a residual stream's (mostly small, a few large features) and
        # weights like a trained layer's (a few large entries per row).
        x = (rng.standard_normal((m, k)) * 1.2).astype(np.float32)
        x = np.clip(x, -5.9, 5.9)
        for i, p, v in planted:
            x[i, p] = v
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        w[rng.integers(0, n, 8), rng.integers(0, k, 8)] *= 20
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        out, wq, sw, xq, sx, outliers = llm_int8(x, w, b)
        for key, value in dict(x=x, w=w, b=b, out=out, sw=sw, xq=xq, sx=sx,
                               outliers=outliers.astype(np.int64)).items():
            tensors[f"{name}.{key}"] = np.ascontiguousarray(value)
        print(f"{name}: [{m}, {k}] x [{n}, {k}]^T, outlier columns {list(outliers)}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
