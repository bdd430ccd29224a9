#!/usr/bin/env bash
# Generation throughput of a trained Mamba at 1, 8 and 32 concurrent generations, in one run
# on this machine (issue 17): Tideway's server (`tideway bench generate`: N concurrent
# Generate calls, greedy, PROMPT prompt ids, NEW new tokens each), llama.cpp on the same
# weights converted to GGUF f32 (llama-batched-bench: N parallel sequences), and HF
# transformers' batched `generate` (bench/hf_generate_bench.py).
#
#   bench/generate.sh [MODEL_DIR] [NEW] [PROMPT] [TIDEWAY...]
#
# TIDEWAY is one or more tideway binaries, each serving in turn (e.g. the previous commit's
# build beside this one's); default: target/release/tideway, built here. llama.cpp is built and
# the model converted by bench/llama_cpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/server_address.sh
model=${1:-models/shakespeare-mamba} new=${2:-128} prompt=${3:-16}
shift $(( $# < 3 ? $# : 3 ))
threads=$(nproc)
venv=.venv
source bench/llama_cpp.sh
llama_build llama-batched-bench
gguf=$(llama_gguf "$model" f32)

if [ $# -eq 0 ]; then
    cargo build --release -p tideway-workers -j"$threads" 2>/dev/null
    set -- target/release/tideway
fi
scratch=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$scratch"' EXIT
for tideway in "$@"; do
    "$tideway" serve --model "m=$model" --listen 127.0.0.1:0 >"$scratch/log" 2>&1 &
    server=$!
    addr=$(address "$scratch/log" "$server")
    echo "== Tideway $tideway (tideway serve, $threads threads): Generate, $prompt prompt + $new new tokens each"
    "$tideway" bench generate --addr "$addr" --model m --concurrency 1,8,32 \
        --max-tokens "$new" --prompt-tokens "$prompt"
    kill "$server"; wait "$server" 2>/dev/null || true; server=
done

echo "== llama.cpp $(git -C "$llama" rev-parse --short HEAD 2>/dev/null || echo "(llama-cpp-python 0.3.36)") f32, llama-batched-bench"
"$llama_bin/llama-batched-bench" -m "$gguf" -c $(( 32 * (prompt + new) + 64 )) -b 2048 -ub 512 \
    -npp "$prompt" -ntg "$new" -npl 1,8,32 -t "$threads" 2>/dev/null | grep -E '^\|'

echo "== HF transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)') generate"
"$venv/bin/python" bench/hf_generate_bench.py "$model" --batches 1,8,32 --new "$new" --prompt "$prompt" \
    --threads "$threads" | grep -v '^\['
