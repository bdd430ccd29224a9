#!/usr/bin/env bash
# Fuzzes Tideway's loaders and request decoders with cargo-fuzz (libFuzzer; installs cargo-fuzz
# if missing). Each target starts from its committed corpus (fuzz/corpus/TARGET) and fails on
# a crash, a hang (over 10 s for one input) or an allocation over 1 GiB.
#   tools/fuzz.sh                      each target for 20 s
#   tools/fuzz.sh --runs 1000000       each target for that many inputs
#   tools/fuzz.sh --seconds 300        each target for that long
#   tools/fuzz.sh --dev --seconds 10   built without optimisation (builds in about half the
#                                      time, runs slower): what CI runs (tools/test-all.sh)
# Uses the nightly toolchain where there is one, else the stable one with RUSTC_BOOTSTRAP=1
# (cargo-fuzz needs -Z flags for the sanitizer; stable ships the same sanitizer runtimes).
# Ends with one line per target: "fuzz TARGET: N inputs, no crash".
set -euo pipefail
cd "$(dirname "$0")/.."

mode=(-max_total_time=20)
build=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) mode=(-runs="$2"); shift 2 ;;
        --seconds) mode=(-max_total_time="$2"); shift 2 ;;
        --dev) build=(--dev); shift ;;
        *) echo "usage: tools/fuzz.sh [--dev] [--runs N | --seconds S]" >&2; exit 2 ;;
    esac
done

if rustup run nightly rustc --version >/dev/null 2>&1; then
    cargo=(cargo +nightly)
else
    echo "fuzz: no nightly toolchain; using the stable one with RUSTC_BOOTSTRAP=1" >&2
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked -j2
fi

targets=(safetensors_checkpoint config_json tokenizer_json wav pth kserve_request stream_chunk state_blob)
# One build for every target (cargo fuzz run would build each one again).
CARGO_BUILD_JOBS=2 "${cargo[@]}" fuzz build --fuzz-dir fuzz "${build[@]}"
# The targets' scratch files (fuzz/fuzz_targets/common.rs: std::env::temp_dir()) and the logs
# go to a directory of this run, removed at its end: libFuzzer exits without the targets'
# destructors, so they cannot clean up after themselves.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"
for t in "${targets[@]}"; do
    log="$(mktemp)"
    # Fresh inputs go to a scratch corpus: the committed one stays the seeds.
    work="fuzz/target/corpus-$t"
    mkdir -p "$work"
    "${cargo[@]}" fuzz run --fuzz-dir fuzz "${build[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        "${mode[@]}" -timeout=10 -malloc_limit_mb=1024 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || { tail -40 "$log"; echo "fuzz $t: FAILED"; exit 1; }
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
    echo "fuzz $t: ${runs:-?} inputs, no crash"
    rm -f "$log"
done
