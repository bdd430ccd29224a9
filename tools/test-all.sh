#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, fixture and end-to-end tests), then the Python
# end-to-end tests with real clients (tritonclient[grpc]) against the built binary, then every
# fuzz target for a bounded time from its committed corpus (tools/fuzz.sh, FUZZING.md).
# Installs what it needs: a Python venv under .venv-test (ignored by git).
# Ends with one line: "all tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# Python venv for the client tests.
venv=.venv-test
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        echo "python3 -m venv failed; installing python3-venv" >&2
        apt-get update -qq && apt-get install -y -qq python3-venv python3-pip
        python3 -m venv "$venv"
    fi
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt

status=0
cargo test --workspace -j2 2>&1 | tee -a "$log" || status=$?
if [ "$status" -eq 0 ]; then
    # The paths of CPUs without AVX-512 (the AVX2 kernels, the portable ones compiled for
    # AVX2), whatever this machine has: the kernels' tests and the models' fixture tests again
    # with the kernels capped at AVX2 (`TIDEWAY_SIMD`, kernels/src/cpu.rs); on a CPU with AMX,
    # a third time capped at AVX-512 (the bf16 and int8 paths of CPUs without it). The binaries the
    # workspace run built, each run from its package's folder as cargo runs it: `cargo test -p`
    # of the two packages alone would resolve their features apart and build much of the tree
    # again.
    cargo test --workspace -j2 --no-run --message-format=json 2>/dev/null |
        "$venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and m["manifest_path"].endswith(("/kernels/Cargo.toml", "/operators/Cargo.toml")):
        print(m["manifest_path"][: -len("/Cargo.toml")], m["executable"])' >"$log.simd"
    [ -s "$log.simd" ] || { echo "no kernels or operators test binaries found" | tee -a "$log"; status=1; }
    caps=avx2
    if grep -qw amx_bf16 /proc/cpuinfo; then caps="avx2 avx512"; fi
    for cap in $caps; do
        while read -r dir exe; do
            echo "TIDEWAY_SIMD=$cap $exe" | tee -a "$log"
            (cd "$dir" && TIDEWAY_SIMD=$cap "$exe") 2>&1 | tee -a "$log" || status=$?
        done <"$log.simd"
    done
    rm -f "$log.simd"
fi
if [ "$status" -eq 0 ]; then
    # The GPU path (feature cuda) builds on every run without a GPU: NVRTC (pip's
    # nvidia-cuda-nvrtc-cu12) compiles its CUDA kernels, and the GPU models run their whole
    # code path on the kernels' host emulator against the CPU models; the device itself is
    # tools/gpu_check.sh's.
    "$venv/bin/pip" install -q --disable-pip-version-check nvidia-cuda-nvrtc-cu12
    nvrtc_lib="$("$venv/bin/python" -c 'import os, nvidia.cuda_nvrtc as m; print(os.path.join(list(m.__path__)[0], "lib"))')"
    { cargo build --workspace --features cuda -j2 &&
      LD_LIBRARY_PATH="$nvrtc_lib" TIDEWAY_REQUIRE_NVRTC=1 cargo test -p tideway-kernels -p tideway-workers --features cuda --lib --bins -j2 &&
      cargo test -p tideway-operators --features cuda --test gpu_emulated --test gpu_tensor_parallel -j2 &&
      cargo test -p tideway-workers --features cuda --test gpu_serve -j2; } 2>&1 | tee -a "$log" || status=$?
fi
if [ "$status" -eq 0 ]; then
    # The systemd units of deployments/systemd, where systemd-analyze exists.
    deployments/systemd/verify.sh target/debug/tideway 2>&1 | tee -a "$log" || status=$?
fi
if [ "$status" -eq 0 ]; then
    TIDEWAY_BIN="$PWD/target/debug/tideway" "$venv/bin/python" -m pytest -q tests/python 2>&1 | tee -a "$log" || status=$?
fi
if [ "$status" -eq 0 ]; then
    # 10 s per target, built without optimisation (about half the build time of a release
    # fuzz build; the long runs of FUZZING.md use the release build).
    tools/fuzz.sh --dev --seconds 10 2>&1 | tee -a "$log" || status=$?
fi

awk '
  /^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  /^[0-9]+ (passed|failed)/ || / passed in | failed in / {
      for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  /^fuzz [a-z_]+: [0-9?]+ inputs, no crash$/ { p += 1 }
  /^systemd units: [0-9]+ passed, [0-9]+ failed$/ { p += $3; f += $5 }
  /^fuzz [a-z_]+: FAILED$/ { f += 1 }
  END { printf "all tests: %d passed, %d failed\n", p, f; if (p == 0) exit 1 }' "$log"
exit "$status"
