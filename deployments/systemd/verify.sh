#!/usr/bin/env bash
# Checks the unit files with `systemd-analyze verify` (where it exists), against a built
# tideway binary in place of /usr/local/bin/tideway (verify needs the executable to exist).
# Prints "systemd units: N passed, M failed" (or says why it skipped).
#
#   deployments/systemd/verify.sh [TIDEWAY_BIN]     # default target/debug/tideway
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(realpath "${1:-$here/../../target/debug/tideway}")"
if ! command -v systemd-analyze >/dev/null; then
    echo "systemd units: skipped (no systemd-analyze on this machine)"
    exit 0
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
passed=0 failed=0
for unit in "$here"/*.service; do
    name="$(basename "$unit")"
    # A template is checked as its instance for process 0.
    [ "${name%@.service}" != "$name" ] && name="${name%.service}0.service"
    sed "s|/usr/local/bin/tideway|$bin|g" "$unit" >"$scratch/$name"
    if out="$(systemd-analyze verify "$scratch/$name" 2>&1)" && [ -z "$out" ]; then
        passed=$((passed + 1))
    else
        echo "$name: $out"
        failed=$((failed + 1))
    fi
done
echo "systemd units: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
