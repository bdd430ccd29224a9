#!/usr/bin/env bash
# The GPU check (issue 9), for a machine with an NVIDIA GPU: every language-model fixture on
# the GPU against the CPU path (f32 and bf16 weights, chunked, 16-row, recurrent and packed),
# the LMUFormers, models split over 2 GPU ranks and the ladder fixtures, NCCL's all-reduce on a
# one-rank communicator (host buffers, and device buffers on its own stream), and decode /
# prefill throughput of a 130M-shaped checkpoint against the device's floors with the work a
# decode step issues. Prints a markdown report (also written to $OUT/gpu-check.md when $OUT is
# set).
#
#   tools/gpu_check.sh [TIDEWAY_BINARY]
#
# TIDEWAY_BINARY: a `tideway` built with `cargo build --release --features cuda` (default
# target/release/tideway; built here when missing and cargo exists). Tideway loads libcuda,
# libnvrtc, libcublas and libnccl at run time by name: this script finds them (the driver,
# a CUDA toolkit, or pip's nvidia-* wheels) and puts unversioned names on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/tideway}"
if [ ! -x "$bin" ]; then
    cargo build --release --features cuda -p tideway-workers
fi

libs="$(mktemp -d)"
trap 'rm -rf "$libs"' EXIT
search=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64
        /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
for py in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3; do
    if command -v "$py" >/dev/null 2>&1; then
        while IFS= read -r dir; do search+=("$dir"); done < <("$py" - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for d in glob.glob(os.path.join(root, "nvidia", "*", "lib")):
        print(d)
PY
)
    fi
done
for lib in cuda nvrtc nvrtc-builtins cublas cublasLt nccl; do
    found=""
    for dir in "${search[@]}"; do
        for f in "$dir/lib$lib.so" "$dir"/lib"$lib".so.[0-9]*; do
            if [ -e "$f" ]; then found="$f"; break 2; fi
        done
    done
    if [ -n "$found" ]; then
        ln -sf "$found" "$libs/lib$lib.so"
        echo "lib$lib: $found" >&2
    else
        echo "lib$lib: not found (searched ${search[*]})" >&2
    fi
done
export LD_LIBRARY_PATH="$libs:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"

report="${OUT:-.}/gpu-check.md"
{
    echo "# tideway gpu-check, $(date -u +%Y-%m-%dT%H:%MZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$bin" gpu-check --fixtures tests/fixtures
} 2>&1 | tee "$report"
