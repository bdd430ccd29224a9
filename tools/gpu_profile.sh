#!/usr/bin/env bash
# Where the GPU's decode steps and prefills spend their time, on the 130M-shaped Mamba
# checkpoint that `tideway gpu-check` writes (issue 9: what keeps batch-1 decode and prefill
# off the H200's floors). Three parts, each printed as a markdown table:
#   1. `tideway bench --device cuda:0` at several prefill chunk lengths (does prefill scale with
#      the chunk, i.e. is it bound by the kernels that walk a chunk's rows in order?);
#   2. Nsight Compute (`ncu`, one metric: each launch's device time) over 16 greedy tokens of
#      `tideway generate`, summed per kernel: device time per step against its wall time;
#   3. the same over a 4096-token prompt's prefill.
# Raw ncu CSVs go to $OUT (or ./gpu-profile) for a closer look.
#
#   tools/gpu_profile.sh [TIDEWAY_BINARY]        (a `--features cuda` release build)
#
# TIDEWAY_DTYPE: the weights (default bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/tideway}"
dtype="${TIDEWAY_DTYPE:-bf16}"
out="${OUT:-gpu-profile}"
mkdir -p "$out"
. tools/gpu_libs.sh

scratch=/tmp/tideway-gpu-check
model="$scratch/mamba-130m-random"
if [ ! -f "$model/config.json" ]; then
    # gpu-check writes the checkpoint (and checks the fixtures on the way: ~20 s on an H200).
    "$bin" gpu-check --scratch "$scratch" --seconds 0.2 > "$out/gpu-check.log" 2>&1
fi
bench() { "$bin" bench --model "$model" --device cuda:0 --dtype "$dtype" "$@" 2>/dev/null; }

echo "| chunk | decode b1 tok/s | decode b64 tok/s | prefill 4096 tok/s |"
echo "|---:|---:|---:|---:|"
for chunk in 256 1024 4096; do
    bench --batches 1,64 --prefill-tokens 4096 --chunk "$chunk" --seconds 1 --json > "$out/bench-$chunk.json"
    python3 - "$chunk" "$out/bench-$chunk.json" <<'PY'
import json, sys
text = open(sys.argv[2]).read()
r = json.loads(text[text.index("{"):])
d = {x["batch"]: x["tokens_per_s"] for x in r["decode"]}
p = r["prefill"][0]["tokens_per_s"]
print(f"| {sys.argv[1]} | {d.get(1, 0):.0f} | {d.get(64, 0):.0f} | {p:.0f} |")
PY
done

ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1 || true)"
if [ -z "$ncu" ]; then
    echo "ncu: not found"
    exit 1
fi
# Wall time first (no profiler): 64 greedy tokens after a 3-token prompt; a 4096-token prompt
# in 1024-token chunks with one new token.
prompt="$(python3 -c 'print(",".join(str((i * 7 + 3) % 50000) for i in range(4096)))')"
gen() { "$bin" generate --model "$model" --device cuda:0 --dtype "$dtype" --temperature 0 --ignore-eos --json "$@"; }
gen --tokens 1,2,3 --max-tokens 64 2>/dev/null | tail -n 1 > "$out/gen-decode.json"
gen --tokens "$prompt" --chunk 1024 --max-tokens 1 2>/dev/null | tail -n 1 > "$out/gen-prefill.json"
# Then each launch's device time under ncu, with no clock or cache control (the card's clocks
# as they are, caches warm as in a real run): 16 tokens (the prompt's forward and 15 steps),
# and the 4096-token prefill (4 chunks).
profile() {
    local name="$1"; shift
    timeout 200 "$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum \
        --launch-count 6000 --csv --page raw "$bin" generate --model "$model" --device cuda:0 \
        --dtype "$dtype" --temperature 0 --ignore-eos "$@" > "$out/ncu-$name.csv" 2> "$out/ncu-$name.log" \
        || echo "ncu $name: exit $?"
}
profile decode --tokens 1,2,3 --max-tokens 16
profile prefill --tokens "$prompt" --chunk 1024 --max-tokens 1
python3 - "$out" <<'PY'
import csv, json, sys, collections
out = sys.argv[1]
decode = json.load(open(f"{out}/gen-decode.json"))
prefill = json.load(open(f"{out}/gen-prefill.json"))
wall = {
    "decode": (16, "forward", 1e6 * decode["decode_s"] / (len(decode["tokens"]) - 1)),
    "prefill": (1, "4096-token prefill", 1e6 * prefill["prefill_s"]),
}
for name, (per, unit, wall_us) in wall.items():
    rows = list(csv.reader(open(f"{out}/ncu-{name}.csv", errors="replace")))
    head = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if head is None:
        print(f"ncu {name}: no launches recorded (see {out}/ncu-{name}.log)")
        continue
    cols = rows[head]
    k, t = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(rows[head + 1][t], 1e-3)
    total = collections.Counter()
    count = collections.Counter()
    for r in rows[head + 1:]:
        if len(r) <= t or not r[0].strip().isdigit():
            continue
        total[r[k][:60]] += float(r[t].replace(",", "")) * scale
        count[r[k][:60]] += 1
    all_us = sum(total.values())
    print(f"\n{name}: {sum(count.values())} launches; device time {all_us / per:.0f} µs per "
          f"{unit}, wall time {wall_us:.0f} µs per {unit} (without the profiler)")
    print("| kernel | launches | µs total | share |")
    print("|---|---:|---:|---:|")
    for kernel, us in total.most_common(12):
        print(f"| {kernel} | {count[kernel]} | {us:.0f} | {100 * us / all_us:.1f}% |")
PY
