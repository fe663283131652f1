#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Runs, in order:
#   1. cargo fmt --check
#   2. cargo clippy --all-targets -- -D warnings
#   3. cargo test --workspace (unit, property, integration and CLI tests)
#   4. the end-to-end VM suite tests/vm/run (real kernels under QEMU), unless MK_SKIP_VM=1
# and ends with one summary line "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."

failed=0
passed=0
step() {
    local name=$1
    shift
    echo "==> $name: $*"
    if "$@"; then
        passed=$((passed + 1))
        echo "==> $name: ok"
    else
        failed=$((failed + 1))
        echo "==> $name: FAILED"
    fi
}

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
# Bounded: a hung test must fail the run, not eat CI's whole time budget.
step test timeout --kill-after=30 2400 cargo test --workspace
if [ "${MK_SKIP_VM:-0}" != 1 ] && [ -x tests/vm/run ]; then
    step vm tests/vm/run
fi
echo "test steps: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
