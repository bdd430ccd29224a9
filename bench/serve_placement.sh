#!/usr/bin/env bash
# Serving throughput and latency by placement, side by side in one run: `data` placement of a
# baseline binary and of this one (same model, same load), then `--pipeline 2` over two
# processes on loopback. Each server runs alone on the machine with its load generator.
#
#   bench/serve_placement.sh BASELINE_TIDEWAY NEW_TIDEWAY MODEL_DIR [SECONDS]
#
# Prints one `tideway bench serve` table per configuration: 1 stream at 10 chunks/s (latency
# at no load: the pipeline's extra hop), 100 streams at 0.5 chunks/s (50 tokens/s offered) and
# 1000 streams at 0.1 chunks/s (100 tokens/s), and each server process's resident memory.
set -euo pipefail
baseline=$1 new=$2 model=$3 seconds=${4:-20}
name=$(basename "$model")
scratch=$(mktemp -d)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$scratch"' EXIT

source "$(dirname "$0")/server_address.sh"

load() {
    local addr=$1
    "$new" bench serve --addr "$addr" --model "$name" --streams 1 --rate 10 --seconds "$seconds"
    "$new" bench serve --addr "$addr" --model "$name" --streams 100 --rate 0.5 --seconds "$seconds"
    "$new" bench serve --addr "$addr" --model "$name" --streams 1000 --rate 0.1 --seconds "$seconds"
}

rss() { for p in "${pids[@]}"; do awk '/VmRSS/ {printf "process %s RSS %.1f MiB\n", '"$p"', $2/1024}' "/proc/$p/status"; done; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for label in baseline new; do
    bin=$baseline; [ "$label" = new ] && bin=$new
    echo "== data placement, $label ($bin), 1 worker"
    "$bin" serve --model "$model" --listen 127.0.0.1:0 >"$scratch/$label.log" 2>&1 &
    pids+=($!)
    addr=$(address "$scratch/$label.log")
    rss
    load "$addr"
    stop
done

echo "== pipeline 2 over 2 processes (one worker each), new"
hosts="$scratch/hosts"
printf '127.0.0.1:%s\n127.0.0.1:%s\n' "$(free_port)" "$(free_port)" >"$hosts"
for p in 1 0; do
    "$new" serve --model "$model" --listen 127.0.0.1:0 --pipeline 2 --hosts "$hosts" --process $p >"$scratch/p$p.log" 2>&1 &
    pids+=($!)
done
addr=$(address "$scratch/p0.log")
address "$scratch/p1.log" >/dev/null
rss
load "$addr"
stop
