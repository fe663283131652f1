#!/usr/bin/env bash
# nix/check/lib/run-tests.sh: self-tests of the nixpkgs-lib stand-in (default.nix), from
# tests.nix. Prints "ok"/"FAIL" per case and a closing "N passed, M failed" line; exits 0
# when every case passes, 1 otherwise (2: cannot run).
#
#   bash nix/check/lib/run-tests.sh                  # all cases, against the stand-in
#   bash nix/check/lib/run-tests.sh PATTERN          # only cases whose name matches PATTERN (grep -E)
#   bash nix/check/lib/run-tests.sh --lib-expr 'import /path/to/nixpkgs/lib' [PATTERN]
#                                                    # the same expectations against another lib
#
# values.*: evaluated with `nix-instantiate --eval --strict --json`, compared in Nix.
# failures.*: each evaluated in its own process (builtins.tryEval does not catch every
# error); it must fail and stderr, with Nix's "error: " prefix and its indentation of
# continuation lines removed, must contain every expected substring.
# Cases marked `store = true` import a module file written with builtins.toFile, so they
# run with --read-write-mode (as nix/check/run.sh does).
# Needs nix-instantiate (Nix >= 2.8) and jq.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tests=$here/tests.nix
libargs=()
if [ "${1:-}" = --lib-expr ]; then
    [ $# -ge 2 ] || { echo "run-tests.sh: --lib-expr needs an expression" >&2; exit 2; }
    libargs=(--arg lib "$2")
    shift 2
fi
pattern=${1:-}
for t in nix-instantiate jq; do
    command -v "$t" >/dev/null || { echo "run-tests.sh: $t missing" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/nix-lib-tests.XXXXXX")
trap 'rm -rf "$work"' EXIT

inst() { nix-instantiate --eval --strict "${libargs[@]}" "$@"; }

if ! inst --json "$tests" -A names >"$work/names.json" 2>"$work/names.err"; then
    echo "run-tests.sh: cannot list the cases:" >&2
    cat "$work/names.err" >&2
    exit 2
fi
inst --json "$tests" -A errors >"$work/errors.json" 2>"$work/errors.err" || {
    echo "run-tests.sh: cannot read the expected errors:" >&2
    cat "$work/errors.err" >&2
    exit 2
}

selected() { # selected KIND: the names of that kind matching the pattern
    jq -r ".$1[]" "$work/names.json" | { if [ -n "$pattern" ]; then grep -E -- "$pattern"; else cat; fi; } || true
}
modeFor() { # --read-write-mode for the cases that write to the store
    if jq -e --arg n "$1" '.store | index($n) != null' "$work/names.json" >/dev/null; then
        echo --read-write-mode
    fi
}

passed=0
failed=0
pass() { echo "ok   $1"; passed=$((passed + 1)); }
fail() {
    echo "FAIL $1"
    shift
    [ $# -gt 0 ] && printf '%s\n' "$@" | sed 's/^/       | /'
    failed=$((failed + 1))
}

echo "== values"
while IFS= read -r name; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2046 # modeFor prints nothing or one word
    if inst --json $(modeFor "$name") "$tests" -A "results.$name" >"$work/out" 2>"$work/err"; then
        if [ "$(jq -r .ok "$work/out")" = true ]; then
            pass "$name"
        else
            fail "$name" "expected:" "$(jq -r .expected "$work/out")" "actual:" "$(jq -r .actual "$work/out")"
        fi
    else
        fail "$name" "evaluation failed:" "$(cat "$work/err")"
    fi
done < <(selected values)

echo "== failures"
while IFS= read -r name; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2046
    if inst $(modeFor "$name") "$tests" -A "failures.$name.expr" >"$work/out" 2>"$work/err"; then
        fail "$name" "evaluation succeeded, an error was expected; value:" "$(head -c 2000 "$work/out")"
        continue
    fi
    # Nix 2.x prints "error: " before the message and indents its further lines by 7.
    message=$(sed -e '1s/^error: //' -e 's/^       //' "$work/err")
    missing=()
    count=$(jq --arg n "$name" '.[$n] | length' "$work/errors.json")
    for ((i = 0; i < count; i++)); do
        needle=$(jq -r --arg n "$name" ".[\$n][$i]" "$work/errors.json")
        [[ $message == *"$needle"* ]] || missing+=("$needle")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        pass "$name"
    else
        fail "$name" "expected in the error:" "${missing[@]}" "actual error:" "$message"
    fi
done < <(selected failures)

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
