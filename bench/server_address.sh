# Sourced by the serving benchmarks: `address LOG [PID]` waits (up to 2 minutes) until the
# `tideway serve` logging to LOG listens and prints its gRPC address, or exits with the log
# (at once if the server PID has exited). `start_server LOG COMMAND...` starts a server in the
# background, its pid in `pid`; `stop_server` ends it, if one runs.
address() {
    for _ in $(seq 1200); do
        if grep -q "tideway listening on" "$1"; then
            grep "tideway listening on" "$1" | sed 's/tideway listening on //'
            return
        fi
        if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    echo "server did not start: $(cat "$1")" >&2
    exit 1
}

pid=
start_server() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    pid=$!
}
stop_server() {
    [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
    pid=
}
