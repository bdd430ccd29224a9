#!/usr/bin/env bash
# Fuzzes Tideway's loaders with cargo-fuzz (libFuzzer; needs a nightly toolchain, installs
# cargo-fuzz if missing). Each target starts from its committed corpus (fuzz/corpus/TARGET)
# and fails on a crash, a hang (over 10 s for one input) or an allocation over 1 GiB.
#   tools/fuzz.sh                 each target for 20 s (what CI runs)
#   tools/fuzz.sh --runs 1000000  each target for that many inputs
#   tools/fuzz.sh --seconds 300   each target for that long
# Ends with one line per target: "fuzz TARGET: N inputs, no crash".
set -euo pipefail
cd "$(dirname "$0")/.."

mode=(-max_total_time=20)
case "${1:-}" in
    --runs) mode=(-runs="$2") ;;
    --seconds) mode=(-max_total_time="$2") ;;
    "") ;;
    *) echo "usage: tools/fuzz.sh [--runs N | --seconds S]" >&2; exit 2 ;;
esac

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: a nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked -j2
fi

targets=(safetensors_checkpoint config_json tokenizer_json wav pth)
for t in "${targets[@]}"; do
    log="$(mktemp)"
    # Fresh inputs go to a scratch corpus: the committed one stays the seeds.
    work="fuzz/target/corpus-$t"
    mkdir -p "$work"
    cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$work" "fuzz/corpus/$t" -- \
        "${mode[@]}" -timeout=10 -malloc_limit_mb=1024 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || { tail -40 "$log"; echo "fuzz $t: FAILED"; exit 1; }
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
    echo "fuzz $t: ${runs:-?} inputs, no crash"
    rm -f "$log"
done
