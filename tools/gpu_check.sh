#!/usr/bin/env bash
# The GPU check (issue 9), for a machine with an NVIDIA GPU: every language-model fixture on
# the GPU against the CPU path (f32 and bf16 weights, chunked, 16-row, recurrent and packed),
# the LMUFormers, models split over 2 GPU ranks and the ladder fixtures, NCCL's all-reduce on a
# one-rank communicator (host buffers, and device buffers on its own stream), and decode /
# prefill throughput of a 130M-shaped checkpoint against the device's floors with the work a
# decode step issues; then greedy generation of the trained models (`models/shakespeare-*`) on
# the GPU, f32 and bf16 weights, against the CPU's tokens. Prints a markdown report (also
# written to $OUT/gpu-check.md when $OUT is set); exits non-zero when any check failed.
#
#   tools/gpu_check.sh [TIDEWAY_BINARY]
#
# TIDEWAY_DEVICE: the device (default cuda:0; cuda-emulator runs the comparisons alone, to try
# this script on a machine without a GPU).
#
# TIDEWAY_BINARY: a `tideway` built with `cargo build --release --features cuda` (default
# target/release/tideway; built here when missing and cargo exists). Tideway loads libcuda,
# libnvrtc, libcublas and libnccl at run time by name: tools/gpu_libs.sh finds them.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/tideway}"
device="${TIDEWAY_DEVICE:-cuda:0}"
if [ ! -x "$bin" ]; then
    cargo build --release --features cuda -p tideway-workers
fi

. tools/gpu_libs.sh

report="${OUT:-.}/gpu-check.md"
status=0
{
    echo "# tideway gpu-check, $(date -u +%Y-%m-%dT%H:%MZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$bin" gpu-check --device "$device" --fixtures tests/fixtures
} 2>&1 | tee "$report" || status=1

# Greedy generation (`--temperature 0`): the GPU's tokens against the CPU's. f32 must give the
# same tokens; bf16 weights may part from them at a near tie, so the first differing position
# is reported and not failed.
prompt="ROMEO:"
gen() { "$bin" generate --model "$1" --text "$prompt" --max-tokens 64 --temperature 0 --json --device "$2" --dtype "$3" 2>/dev/null | tail -n 1; }
{
    echo
    echo "| model | weights | tokens equal to the CPU's | decode tok/s | CPU decode tok/s |"
    echo "|---|---|---|---:|---:|"
} | tee -a "$report"
for model in models/shakespeare-mamba models/shakespeare-gla; do
    cpu="$(gen "$model" cpu f32)" || { echo "| $model | | CPU generation failed | | |" | tee -a "$report"; status=1; continue; }
    for dtype in f32 bf16; do
        gpu="$(gen "$model" "$device" "$dtype")" || gpu=""
        python3 - "$model" "$dtype" "$cpu" "$gpu" <<'PY' | tee -a "$report" || status=1
import json, sys
model, dtype, cpu, gpu = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
if not gpu:
    print(f"| {model} | {dtype} | GPU generation failed | | |")
    sys.exit(1)
gpu = json.loads(gpu)
a, b = cpu["tokens"], gpu["tokens"]
same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
rate = lambda r: len(r["tokens"]) / r["decode_s"]
verdict = "all %d" % len(a) if a == b else "first %d of %d" % (same, len(a))
print(f"| {model} | {dtype} | {verdict} | {rate(gpu):.0f} | {rate(cpu):.0f} |")
sys.exit(0 if a == b or dtype == "bf16" else 1)
PY
    done
done
exit "$status"
