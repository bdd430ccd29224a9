# Sourced by the serving benchmarks: `address LOG [PID]` waits (up to 2 minutes) until the
# `tideway serve` logging to LOG listens and prints its gRPC address, or exits with the log
# (at once if the server PID has exited).
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
