#!/usr/bin/env bash
# The serving tail at 100 and 1000 streams, several servers side by side in one run: each
# configuration's server meets 100 or 1000 new streams offering 30 / 50 / 70% of the measured
# decode capacity (`tideway bench` at batch 32 with the first configuration's binary, measured
# first in this run). Every row has a freshly started server, so it also pays for its
# sessions' first states, as a server that just started and meets its clients does.
#
#   bench/serve_tail.sh MODEL_DIR SECONDS 'LABEL|TIDEWAY [SERVE FLAGS]' ...
#   bench/serve_tail.sh bench/models/mamba-130m-random 20 'before|/tmp/old/tideway' \
#       'after|target/release/tideway' 'after, reserved|target/release/tideway --reserve-sessions 1100'
#
# Prints the capacity, then one table row per configuration and load. "p99 after the starts"
# leaves out the chunks sent in the first period (1/rate), while the streams open and send
# their first chunks: it shows the steady state apart from the start-up transient. The load generator is
# the first configuration's binary; server and load generator share the machine's cores.
set -euo pipefail
model=$1 seconds=$2
shift 2
configs=("$@")
name=$(basename "$model")
source "$(dirname "$0")/server_address.sh"
scratch=$(mktemp -d)
trap 'stop_server; rm -rf "$scratch"' EXIT

read -r client _ <<<"${configs[0]#*|}"
capacity=$("$client" bench --model "$model" --batches 32 --prefill-tokens 8 --seconds 10 --json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["decode"][0]["tokens_per_s"])')
echo "decode capacity (batch 32, $client): $capacity tokens/s"
echo "| server | streams | load | offered tokens/s | chunks/s | p50 ms | p99 ms | max ms | p99 after the starts ms | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for streams in 100 1000; do
    for pct in 30 50 70; do
        for config in "${configs[@]}"; do
            label=${config%%|*}
            read -r -a command <<<"${config#*|}"
            start_server "$scratch/server.log" "${command[0]}" serve --model "$model" --listen 127.0.0.1:0 "${command[@]:1}"
            addr=$(address "$scratch/server.log" "$pid")
            rate=$(python3 -c "print($capacity * $pct / 100 / $streams)")
            "$client" bench serve --addr "$addr" --model "$name" --streams "$streams" --rate "$rate" \
                --seconds "$seconds" --json 2>/dev/null |
                python3 -c '
import json, sys
r = json.load(sys.stdin)[0]
label, streams, pct, offered = sys.argv[1:]
cells = [r["chunks_per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"], r["p99_after_start_ms"]]
print("| %s | %s | %s%% | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %d |" % (label, streams, pct, float(offered), *cells, r["errors"]))
' "$label" "$streams" "$pct" "$(python3 -c "print($capacity * $pct / 100)")"
            stop_server
        done
    done
done
