#!/usr/bin/env bash
# Well-behaved streams beside one hostile client (issue 16): a server with two client
# identities (`--auth`), N streams of one identity measured quiet, then again while the other
# identity attacks (`tideway bench serve --hostile`: giant requests, a gzip bomb, a long job, a
# session flood; each attack alone with --attacks). Server, streams and attacker share the
# machine's cores.
#
#   bench/serve_hostile.sh TIDEWAY MODEL_DIR [STREAMS] [RATE] [SECONDS] [ATTACKS] [SERVE FLAGS...]
#
# Prints the `tideway bench serve` table (quiet and hostile rows), the p99 ratio, what each
# attack got back, and the server's peak resident memory.
set -euo pipefail
source "$(dirname "$0")/server_address.sh"
tideway=$1 model=$2 streams=${3:-100} rate=${4:-10} seconds=${5:-10}
attacks=${6:-giant,bomb,job,flood}
shift $(( $# < 6 ? $# : 6 ))
name=$(basename "$model")
scratch=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$scratch"' EXIT

good=good-streams-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
bad=hostile-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s streams client\n%s mallory client\n' "$good" "$bad" >"$scratch/auth"

"$tideway" serve --model "$model" --listen 127.0.0.1:0 --auth "$scratch/auth" "$@" \
    >"$scratch/log" 2>&1 &
server=$!
addr=$(address "$scratch/log" "$server")

"$tideway" bench serve --addr "$addr" --model "$name" --streams "$streams" --rate "$rate" \
    --seconds "$seconds" --token "$good" --hostile --hostile-token "$bad" --attacks "$attacks"
echo "server peak RSS: $(grep VmHWM /proc/$server/status | awk '{printf "%.1f MiB", $2 / 1024}')"
