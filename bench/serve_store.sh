#!/usr/bin/env bash
# What session snapshots cost (`serve --store`), in one run:
#  1. `tideway bench store`: snapshot and restore of N sessions of the model, in-process;
#  2. recovery: the store of (1) left in place, `tideway serve --store` started on it and
#     timed from exec to "listening" (model load + restore of every session);
#  3. the effect on latency under load: `tideway bench serve` (STREAMS streams at RATE chunks/s)
#     against a server without a store and one with `--store` (snapshots every second),
#     each alone on the machine with its load generator.
#
#   bench/serve_store.sh TIDEWAY MODEL_DIR [SESSIONS] [STREAMS] [RATE] [SECONDS]
set -euo pipefail
bin=$1 model=$2 sessions=${3:-1000} streams=${4:-100} rate=${5:-10} seconds=${6:-20}
name=$(basename "$model")
scratch=$(mktemp -d)
pid=
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
trap 'stop; rm -rf "$scratch"' EXIT

source "$(dirname "$0")/server_address.sh"

echo "== 1. snapshot and restore of $sessions sessions ($name)"
"$bin" bench store --model "$model" --sessions "$sessions" --store "$scratch/store" 2>/dev/null

echo "== 2. recovery: serve on the store of (1)"
start=$(date +%s.%N)
"$bin" serve --model "$model" --listen 127.0.0.1:0 --store "$scratch/store" >"$scratch/recover.log" 2>&1 &
pid=$!
address "$scratch/recover.log" >/dev/null
end=$(date +%s.%N)
grep "tideway: restored" "$scratch/recover.log"
awk -v s="$start" -v e="$end" 'BEGIN { printf "exec to listening: %.0f ms\n", (e - s) * 1000 }'
stop

for store in none every-1s; do
    echo "== 3. $streams streams at $rate chunks/s, store: $store"
    extra=()
    [ "$store" = every-1s ] && extra=(--store "$scratch/load-store" --snapshot-every-s 1)
    "$bin" serve --model "$model" --listen 127.0.0.1:0 "${extra[@]}" >"$scratch/load.log" 2>&1 &
    pid=$!
    addr=$(address "$scratch/load.log")
    "$bin" bench serve --addr "$addr" --model "$name" --streams "$streams" --rate "$rate" --seconds "$seconds" 2>/dev/null
    stop
done
