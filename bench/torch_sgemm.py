"""The sgemm of PyTorch's CPU build (MKL where PyTorch has it) at the product `floors` times
(kernels/examples/floors.rs: a [512, 768] × [768, 3072] product, a prefill chunk through
mamba-130m's in_proj), best of 10: a third sgemm beside the gemm crate and Tideway's `Linear`,
from a library that Tideway does not build on, for bench/cpu_decode.sh's summary.

    python bench/torch_sgemm.py --threads N
"""

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    m, k, n = 512, 768, 3072
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator)
    w = torch.randn(n, k, generator=generator)
    out = torch.empty(m, n)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        torch.matmul(x, w.T, out=out)
        best = min(best, time.perf_counter() - start)
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    # PyTorch's own kernels' instruction set (ATEN_CPU_CAPABILITY caps it; MKL's cap is
    # MKL_ENABLE_INSTRUCTIONS, which it does not report).
    isa = torch.backends.cpu.get_cpu_capability()
    print(
        f"torch sgemm {2 * m * k * n / best / 1e9:.1f} GFLOP/s "
        f"(torch {torch.__version__}, {blas}, {isa}, {args.threads} threads, {m}x{k}x{n}, "
        "best of 10)"
    )


if __name__ == "__main__":
    main()
