#!/usr/bin/env bash
# Live audio streams into an audio model (the keyword spotter), several servers side by side
# in one run: each configuration's server, freshly started, meets N streams that each send
# 20 ms of 16 kHz audio 50 times a second (a live feed each), for each N.
#
#   bench/serve_audio.sh MODEL_DIR SECONDS STREAMS 'LABEL|TIDEWAY [SERVE FLAGS]' ...
#   bench/serve_audio.sh models/kws 10 1,100,300 'now|target/release/tideway' 'before|/tmp/old/tideway'
#
# Prints one table row per configuration and stream count: the audio answered (seconds a
# second: times real time), the model's output rows (its frames), the chunk latency and the
# errors by status code. The load generator is $CLIENT, or else the first configuration's
# binary (one that has `bench serve --audio-ms`); server and load generator share the
# machine's cores.
set -euo pipefail
model=$1 seconds=$2 streams_list=$3
shift 3
configs=("$@")
name=$(basename "$model")
source "$(dirname "$0")/server_address.sh"
scratch=$(mktemp -d)
trap 'stop_server; rm -rf "$scratch"' EXIT

read -r first _ <<<"${configs[0]#*|}"
client=${CLIENT:-$first}
echo "| server | streams | audio offered s/s | audio answered s/s | output rows/s | p50 ms | p99 ms | max ms | p99 after the starts ms | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
for streams in ${streams_list//,/ }; do
    for config in "${configs[@]}"; do
        label=${config%%|*}
        read -r -a command <<<"${config#*|}"
        start_server "$scratch/server.log" "${command[0]}" serve --model "$model" --listen 127.0.0.1:0 "${command[@]:1}"
        addr=$(address "$scratch/server.log" "$pid")
        if ! "$client" bench serve --addr "$addr" --model "$name" --streams "$streams" --rate 50 \
            --audio-ms 20 --seconds "$seconds" --json >"$scratch/load.json" 2>"$scratch/load.err"; then
            echo "the load generator failed: $(cat "$scratch/load.err")" >&2
            exit 1
        fi
        python3 -c '
import json, sys
label, streams, load = sys.argv[1:]
r = json.load(open(load))[0]
cells = [r["input_per_s"], r["rows_per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"], r["p99_after_start_ms"]]
codes = ", ".join("%s %d" % c for c in r["error_codes"].items()) or "0"
print("| %s | %s | %.1f | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f | %s |" % (label, streams, int(streams) * 0.02 * 50, *cells, codes))
' "$label" "$streams" "$scratch/load.json"
        stop_server
    done
done
