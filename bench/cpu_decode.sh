#!/usr/bin/env bash
# CPU decode and prefill of a checkpoint beside its peers, in one run (issue 20): Tideway
# (`tideway bench`), the machine's floors measured now (kernels/examples/floors.rs: read
# bandwidth, sgemm, and the FMA units' register-only peak beside them; PyTorch's sgemm at the
# same product, bench/torch_sgemm.py, beside its sgemm) and, for a Mamba,
# llama.cpp on the same weights as GGUF f32, f16 and q8_0 (llama-batched-bench) and HF
# transformers (bench/hf_mamba_bench.py); for a GLA or DeltaNet, fla's classes with fla's
# reference functions (bench/fla_cpu_bench.py). ROUNDS interleaved rounds (the Tideway
# builds in reverse order in even rounds); prints the medians as a table and each build's
# rounds. Every tool runs with all cores (`nproc`).
#
#   bench/cpu_decode.sh [MODEL_DIR] [ROUNDS] [TIDEWAY[@DTYPE[:CAP]]...]
#
# MODEL_DIR defaults to bench/models/mamba-130m-random (bench/make_mamba130m.py). TIDEWAY is
# one or more tideway binaries to compare, each with its `--dtype` (f32 if left out) and its
# kernels' cap (`TIDEWAY_SIMD=CAP` for that run alone: `@bf16:avx512` is bf16 without AMX),
# each measured in every round: e.g. a build of the previous commit beside this one's at f32,
# bf16 and int8. Default: target/release/tideway (built here) at f32, bf16 and int8.
# HF_BF16=1 runs HF transformers a second time in bf16 (PyTorch's CPU matmuls in bf16 go
# through oneDNN, which takes AMX where the CPU has it).
# llama.cpp 0.3.36's Mamba crashes (SIGSEGV) at batch 8 and 32 with f16 and q8_0 weights on
# this machine (at 2-4 it ran): those cells stay empty.
# Decode: after a 16-token prompt, 32 new tokens per sequence at batch 1, 8 and 32
# (BATCHES=2,3,4 in the environment picks others, for every tool); prefill: one 512-token
# sequence. Raw outputs go to bench/out/cpu_decode-DATE/.
#
# TIDEWAY_SIMD=avx2 in the environment measures a CPU without AVX-512 on one that has it:
# Tideway's kernels capped at AVX2 (kernels/src/cpu.rs), llama.cpp built for AVX2
# (bench/llama_cpp.sh), PyTorch's own kernels, MKL and oneDNN capped by their variables, the
# floors' FMA peak in AVX2. The gemm crate (Tideway's products of more than 64 rows where there
# are no AVX-512 panels, and the floors' reference sgemm) leaves AVX-512 out only when built
# without its x86-v4 feature: pass such a build's tideway, and its floors example as FLOORS
# (BENCHMARKS.md has the commands). TIDEWAY_SIMD=avxvnni does the same for a CPU with AVX-VNNI
# (Alder Lake and later Intel cores): llama.cpp built with it too, PyTorch as for avx2 (its f32
# products do not use it).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-bench/models/mamba-130m-random} rounds=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
threads=$(nproc)
venv=.venv
batches=${BATCHES:-1,8,32}
if [ "${TIDEWAY_SIMD:-}" = avx2 ] || [ "${TIDEWAY_SIMD:-}" = avxvnni ]; then
    export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
fi
floors=${FLOORS:-target/release/examples/floors}
family=$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/config.json"))["model_type"])' "$model")
ggufs=()
if [ "$family" = mamba ]; then
    source bench/llama_cpp.sh
    llama_build llama-batched-bench
    for type in f32 f16 q8_0; do ggufs+=("$(llama_gguf "$model" "$type")"); done
fi
if [ $# -eq 0 ]; then
    cargo build --release -p tideway-workers -j"$threads" 2>/dev/null
    set -- target/release/tideway@f32 target/release/tideway@bf16 target/release/tideway@int8
fi
[ -n "${FLOORS:-}" ] || cargo build --release -p tideway-kernels --example floors 2>/dev/null
# The bytes a batch-1 step reads: every tensor of the checkpoint but an untied embedding table,
# of which a step reads one row (GLA's and DeltaNet's checkpoints keep one beside lm_head).
weight_bytes=$("$venv/bin/python" - "$model" <<'EOF'
import json, struct, sys
model = sys.argv[1]
config = json.load(open(model + "/config.json"))
with open(model + "/model.safetensors", "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
read = sum(sizes.values())
if not config.get("tie_word_embeddings", True):
    read -= sum(v for k, v in sizes.items() if k.endswith(("embeddings.weight", "embed_tokens.weight")))
print(read)
EOF
)
out=bench/out/cpu_decode-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"

for round in $(seq "$rounds"); do
    echo "== round $round of $rounds" >&2
    "$floors" "$weight_bytes" >"$out/r$round-floors.txt"
    # A third sgemm at the same product, from a library Tideway does not build on (MKL).
    "$venv/bin/python" bench/torch_sgemm.py --threads "$threads" >"$out/r$round-torch-sgemm.txt"
    # The builds in the given order in odd rounds and reversed in even ones: on this VM the
    # one run second in every round read lower in most of them (BENCHMARKS.md, 2026-12-03
    # night), a bias that alternating cancels over pairs of rounds.
    order=$(seq 0 $(($# - 1)))
    [ $((round % 2)) -eq 0 ] && order=$(seq $(($# - 1)) -1 0)
    runs=("$@")
    for i in $order; do
        run=${runs[$i]}
        tideway=${run%@*} dtype=f32 cap=${TIDEWAY_SIMD:-}
        [ "$run" != "$tideway" ] && dtype=${run##*@}
        if [ "${dtype#*:}" != "$dtype" ]; then cap=${dtype#*:} dtype=${dtype%%:*}; fi
        env ${cap:+TIDEWAY_SIMD="$cap"} "$tideway" bench --model "$model" --batches "$batches" --prefill-tokens 512 \
            --threads "$threads" --dtype "$dtype" --json 2>/dev/null >"$out/r$round-tideway$i.json"
    done
    for gguf in ${ggufs[@]+"${ggufs[@]}"}; do
        name=$(basename "$gguf" .gguf)
        # One batch size per call, so that a crash at one leaves the others measured.
        : >"$out/r$round-$name-decode.txt"
        for b in ${batches//,/ }; do
            /usr/bin/time -f "peak_rss_kb %M" "$llama_bin/llama-batched-bench" -m "$gguf" \
                -c 2048 -b 2048 -ub 512 -npp 16 -ntg 32 -npl "$b" -t "$threads" \
                >>"$out/r$round-$name-decode.txt" 2>>"$out/r$round-$name-decode.err" || true
        done
        "$llama_bin/llama-batched-bench" -m "$gguf" -c 1024 -b 512 -ub 512 \
            -npp 512 -ntg 1 -npl 1 -t "$threads" >"$out/r$round-$name-prefill.txt" 2>/dev/null || true
    done
    if [ "$family" = mamba ]; then
        "$venv/bin/python" bench/hf_mamba_bench.py "$model" --threads "$threads" --json \
            --batches "$batches" 2>/dev/null >"$out/r$round-hf.json"
        if [ "${HF_BF16:-}" = 1 ]; then
            "$venv/bin/python" bench/hf_mamba_bench.py "$model" --threads "$threads" --json \
                --batches "$batches" --dtype bf16 2>/dev/null >"$out/r$round-hf-bf16.json"
        fi
    else
        "$venv/bin/python" bench/fla_cpu_bench.py "$model" --threads "$threads" --json \
            --batches "$batches" 2>/dev/null >"$out/r$round-fla.json"
    fi
done

"$venv/bin/python" - "$out" "$rounds" "$batches" "$#" "$@" <<'PY'
import json, re, statistics, sys
from pathlib import Path
out, rounds, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
batches = [int(b) for b in sys.argv[3].split(",")]
runs = sys.argv[5:5 + n]
med = statistics.median
cols = {}  # column -> {row: [values over rounds]}
def put(col, row, value):
    cols.setdefault(col, {}).setdefault(row, []).append(value)
for r in range(1, rounds + 1):
    floors = (out / f"r{r}-floors.txt").read_text()
    bw = float(re.search(r"decode floor ([\d.]+)", floors).group(1))
    compute = float(re.search(r"compute floor ([\d.]+)", floors).group(1))
    peak = re.search(r"FMA peak ([\d.]+) GFLOP/s -> arithmetic floor ([\d.]+)", floors)
    if peak:
        put("peak", "GFLOP/s", float(peak.group(1)))
        put("peak", "tok/s", float(peak.group(2)))
    # The sgemms the floor is chosen from (the faster of the gemm crate and Tideway's
    # `Linear`) and PyTorch's beside them, and the FLOPs a token takes (the floor's rate over
    # its tok/s), to put the prefill beside each.
    rate = float(re.search(r"sgemm ([\d.]+) GFLOP/s", floors).group(1))
    put("sgemm", "the floor", rate)
    put("sgemm", "GFLOP a token", rate / compute)
    sources = re.search(r"gemm crate ([\d.]+) GFLOP/s, Tideway's Linear ([\d.]+)", floors)
    if sources:
        put("sgemm", "gemm crate", float(sources.group(1)))
        put("sgemm", "Tideway's Linear", float(sources.group(2)))
    torch_sgemm = out / f"r{r}-torch-sgemm.txt"
    if torch_sgemm.exists():
        found = re.search(r"torch sgemm ([\d.]+) GFLOP/s \((.*)\)", torch_sgemm.read_text())
        if found:
            put("sgemm", "PyTorch", float(found.group(1)))
            torch_build = found.group(2)
    for b in batches:
        put("floor", f"decode b{b}", min(b * bw, compute))
    put("floor", "prefill 512", compute)
    for i in range(n):
        t = json.loads((out / f"r{r}-tideway{i}.json").read_text())
        binary, _, dtype = runs[i].partition("@")
        col = f"Tideway {dtype or 'f32'} [{i}]"
        for d in t["decode"]:
            put(col, f"decode b{d['batch']}", d["tokens_per_s"])
        for p in t["prefill"]:
            put(col, f"prefill {p['tokens']}", p["tokens_per_s"])
        put(col, "peak RSS MiB", t["peak_rss_bytes"] / 2**20)
    for q in ["f32", "f16", "q8_0"]:
        found = next(out.glob(f"r{r}-*-{q}-decode.txt"), None)
        if found is None:
            continue
        name = found.name[len(f"r{r}-"):-len("-decode.txt")]
        col = f"llama.cpp {q}"
        for line in (out / f"r{r}-{name}-decode.txt").read_text().splitlines():
            f = [x.strip() for x in line.strip().strip("|").split("|")]
            if len(f) >= 10 and f[2].isdigit():
                put(col, f"decode b{int(f[2])}", float(f[7]))
        for line in (out / f"r{r}-{name}-prefill.txt").read_text().splitlines():
            f = [x.strip() for x in line.strip().strip("|").split("|")]
            if len(f) >= 10 and f[0] == "512":
                put(col, "prefill 512", float(f[5]))
        rss = re.findall(r"peak_rss_kb (\d+)", (out / f"r{r}-{name}-decode.err").read_text())
        if rss:
            put(col, "peak RSS MiB", int(rss[0]) / 1024)
    for peer, label in (("hf", "HF"), ("hf-bf16", "HF bf16"), ("fla", "fla (reference functions)")):
        path = out / f"r{r}-{peer}.json"
        if not path.exists():
            continue
        h = json.loads(path.read_text())
        for d in h["decode"]:
            put(label, f"decode b{d['batch']}", d["tokens_per_s"])
        put(label, "prefill 512", h["prefill"]["tokens_per_s"])
        put(label, "peak RSS MiB", h["peak_rss_bytes"] / 2**20)
rows = [f"decode b{b}" for b in batches] + ["prefill 512", "peak RSS MiB"]
names = [c for c in cols if c not in ("floor", "peak", "sgemm")] + ["floor"]
for i, run in enumerate(runs):
    print(f"[{i}] {run}")
print(f"medians of {rounds} interleaved rounds (tok/s; floors from this run's bandwidth and sgemm)")
print("| tok/s | " + " | ".join(names) + " |")
print("|---|" + "---:|" * len(names))
for row in rows:
    cells = [f"{med(cols[c][row]):.1f}" if row in cols[c] else "" for c in names]
    print(f"| {row} | " + " | ".join(cells) + " |")
# The arithmetic's own peak (register-only multiply-adds, floors.rs), above the sgemm floor
# (the next line's rounds): how much of that floor any product could still gain.
if "peak" in cols:
    p = cols["peak"]
    rounds_of = lambda key: " / ".join(f"{v:.1f}" for v in p[key])
    print(f"FMA peak {med(p['GFLOP/s']):.1f} GFLOP/s (rounds {rounds_of('GFLOP/s')}), "
          f"arithmetic floor {med(p['tok/s']):.1f} tok/s")
# Each sgemm's rounds, and each f32 Tideway prefill as a share of the floor each sgemm would
# give (its GFLOP/s over a token's GFLOP, round by round, then the median): the floor is the
# fastest of the sgemms that floors.rs runs, PyTorch's (MKL) is shown beside it.
g = cols["sgemm"]
sgemms = [s for s in ("the floor", "gemm crate", "Tideway's Linear", "PyTorch") if s in g]
print("sgemm GFLOP/s by round: " + "; ".join(
    f"{s} " + " / ".join(f"{v:.1f}" for v in g[s]) for s in sgemms)
    + (f" (PyTorch: {torch_build})" if "PyTorch" in g else ""))
for c in names:
    if c.startswith("Tideway f32") and "prefill 512" in cols[c]:
        prefill = cols[c]["prefill 512"]
        shares = {s: med([p * f / v for p, f, v in zip(prefill, g["GFLOP a token"], g[s])])
                  for s in sgemms}
        print(f"{c} prefill 512 as a share of the floor from each sgemm: " + ", ".join(
            f"{s} {v:.2f}" for s, v in shares.items()))
# Each Tideway run's rounds, to see how far they swung (the medians hide it).
print("rounds (tok/s, round 1 / 2 / ...; even rounds ran the builds in reverse order)")
for c in names:
    if c.startswith("Tideway"):
        print(f"{c}: " + "; ".join(
            f"{row} " + " / ".join(f"{v:.1f}" for v in cols[c][row])
            for row in rows[:-1] if row in cols[c]))
PY
echo "raw outputs: $out"
