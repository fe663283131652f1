#!/usr/bin/env bash
# The project's test command (README: "Two commands"). Runs, in order:
#   1. fmt     cargo fmt --check
#   2. clippy  cargo clippy --all-targets -- -D warnings
#   3. deny    cargo deny check licenses bans sources (deny.toml), when cargo-deny is installed
#   4. test    cargo test --workspace (unit, property, integration and CLI tests)
#   5. kerf    tests/multikernel/kerf-compat.sh: the multikernel blobs byte-identical to
#              kerf 0.4.0's (kerf installed from PyPI into a venv; SKIP if it cannot be)
#   6. kured, k8s-validate, ansible: the fleet engines' scripts (deploy/kured/test-reboot-wrapper.sh,
#              deploy/k8s/validate.sh, deploy/ansible/test-ansible.sh; the last two install
#              their validators from PyPI, SKIP if they cannot)
#   7. vm      the end-to-end VM suite tests/vm/run (real kernels under QEMU), unless MK_SKIP_VM=1
#   8. nixos   nix/check/run.sh: the NixOS module evaluated by a stand-in of nixpkgs' module
#              system, its generated files and its switch hook used for real (after the VM
#              step, on the same kernel pair as kured/ansible; SKIP without nix-instantiate)
# A step that cannot run here prints "SKIP <step>: <reason>" and counts as skipped, never as
# passed. So do tests inside a step that need something this host lacks: cargo counts them
# as "ignored" (each one prints "SKIP <test>: <reason>"), the VM suite as "skipped"; their
# total is printed after the test step and again in the summary.
# The last line is "N passed, M failed, K skipped" (steps); the exit status is non-zero if
# any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

passed=0
failed=0
skipped=0
results=()
step() {
    local name=$1
    shift
    echo "==> $name: $*"
    if "$@"; then
        passed=$((passed + 1))
        results+=("$name: ok")
        echo "==> $name: ok"
    else
        failed=$((failed + 1))
        results+=("$name: FAILED")
        echo "==> $name: FAILED"
    fi
}
skip_step() {
    skipped=$((skipped + 1))
    results+=("SKIP $1: $2")
    echo "==> SKIP $1: $2"
}

# Sum of the numbers before " <word>;" on cargo's "test result:" lines in a log, e.g.
# "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...".
sum_results() {
    sed -n "s/^test result: .* \([0-9][0-9]*\) $2;.*/\1/p" "$1" | awk '{ s += $1 } END { print s + 0 }'
}

cargo_test() {
    # Bounded: a hung test must fail the run, not eat CI's whole time budget. --no-fail-fast:
    # every test binary runs, so the counts below cover the whole workspace.
    timeout --kill-after=30 2400 cargo test --workspace --no-fail-fast 2>&1 | tee "$logs/test.log"
}

vm_suite() {
    tests/vm/run 2>&1 | tee "$logs/vm.log"
}

step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
if cargo deny --version >/dev/null 2>&1; then
    # Not "advisories": its database is fetched from github.com, which the project's
    # machines cannot reach (see deny.toml).
    step deny cargo deny check --hide-inclusion-graph licenses bans sources
else
    skip_step deny "cargo-deny is not installed (cargo install --locked cargo-deny; .ci/run does)"
fi

step test cargo_test
test_passed=$(sum_results "$logs/test.log" passed)
test_skipped=$(sum_results "$logs/test.log" ignored)
echo "==> test: $test_passed tests passed, $test_skipped skipped (cargo's \"ignored\", listed in the summary)"
results[-1]+=" ($test_passed tests passed, $test_skipped skipped)"

# A script step: exit 0 passed, 77 skipped (its "SKIP <name>: <reason>" line), else failed;
# its last output line goes to the summary.
script_step() {
    local name=$1
    shift
    echo "==> $name: $*"
    "$@" 2>&1 | tee "$logs/$name.log"
    case ${PIPESTATUS[0]} in
    0)
        passed=$((passed + 1))
        results+=("$name: ok ($(tail -1 "$logs/$name.log"))")
        echo "==> $name: ok"
        ;;
    77) skip_step "$name" "$(grep -m1 "^SKIP $name" "$logs/$name.log" | cut -c$((8 + ${#name}))-)" ;;
    *)
        failed=$((failed + 1))
        results+=("$name: FAILED ($(tail -1 "$logs/$name.log"))")
        echo "==> $name: FAILED"
        ;;
    esac
}

bins=${CARGO_TARGET_DIR:-target}/debug
script_step kerf bash tests/multikernel/kerf-compat.sh
script_step k8s-validate bash deploy/k8s/validate.sh

vm_skipped=0
if [ "${MK_SKIP_VM:-0}" = 1 ]; then
    skip_step vm "MK_SKIP_VM=1"
elif [ ! -x tests/vm/run ]; then
    skip_step vm "tests/vm/run is missing or not executable"
else
    step vm vm_suite
    # The suite's own last line: "N passed, M failed, K skipped" (scenarios).
    vm_skipped=$(grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$logs/vm.log" |
        tail -n1 | awk '{ print $5 + 0 }')
    vm_skipped=${vm_skipped:-0}
    results[-1]+=" ($vm_skipped scenarios skipped)"
fi

# The fleet engines' scripts run emulated hosts on a pair of bzImages (any pair: no kernel
# boots there): MK_TEST_KERNEL_A/B, else ../shared/kernels, else the kernels the VM suite
# built or found (the local cache). After the VM step, so a fresh machine has them.
newest_kernel() {
    for d in "${MK_SHARED_KERNELS:-../shared/kernels}" "${MK_KERNEL_CACHE:-/var/cache/mk-upgrade/kernels}"/*; do
        find "$d" -maxdepth 1 -name "bzImage-*-$1" 2>/dev/null
    done | sort -V | tail -n 1
}
kernel_a=${MK_TEST_KERNEL_A:-$(newest_kernel mkA)}
kernel_b=${MK_TEST_KERNEL_B:-$(newest_kernel mkB)}
if [ -n "$kernel_a" ] && [ -n "$kernel_b" ]; then
    export MK_TEST_KERNEL_A=$kernel_a MK_TEST_KERNEL_B=$kernel_b
    script_step kured env MK_BIN_DIR="$bins" bash deploy/kured/test-reboot-wrapper.sh
    script_step ansible env MK_BIN_DIR="$bins" bash deploy/ansible/test-ansible.sh
    script_step nixos env MK_BIN_DIR="$bins" bash nix/check/run.sh
else
    skip_step kured "no test kernels (MK_TEST_KERNEL_A/B, ../shared/kernels or the VM suite's cache)"
    skip_step ansible "no test kernels (MK_TEST_KERNEL_A/B, ../shared/kernels or the VM suite's cache)"
    skip_step nixos "no test kernels (MK_TEST_KERNEL_A/B, ../shared/kernels or the VM suite's cache)"
fi

echo "--- tests/run-all.sh summary"
printf '%s\n' "${results[@]}"
echo "skipped tests: $((test_skipped + vm_skipped)) (cargo test $test_skipped, VM suite $vm_skipped)"
# Each with its reason: cargo's "test <name> ... ignored, <reason>" lines (a test that lacked
# something also printed "SKIP <name>: <reason>" above), the VM suite's "SKIP" lines.
{
    grep -E '^test .* \.\.\. ignored' "$logs/test.log" | sed 's/  */ /g'
    grep -hE '^SKIP ' "$logs/vm.log" 2>/dev/null | sort -u
} | sed 's/^/  /'
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
