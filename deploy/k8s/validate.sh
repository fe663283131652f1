#!/usr/bin/env bash
# validate.sh: validates the Kubernetes manifests of deploy/k8s and deploy/kured against
# their schemas (validate.py says what each file is checked against), then proves the check
# bites: broken copies of them, written to a temporary directory, must each be rejected for
# the expected reason.
#
#   deploy/k8s/validate.sh [FILE...]        default: deploy/k8s/*.yaml deploy/kured/*.yaml
#
# Kubernetes schemas: kubernetes-validate (PyPI, pinned; it brings jsonschema and PyYAML),
# installed into a venv (K8S_VALIDATE_VENV, default /opt/k8s-validate-venv, else
# ~/.cache/mk-upgrade/k8s-validate-venv), strict, for each of K8S_VERSIONS (default
# "1.29.0 1.37.0"). The system-upgrade-controller Plan: schemas/upgrade.cattle.io_plan_v1.json
# with jsonschema.
# Exit: 0 every file valid and every broken copy rejected; 1 otherwise; 77 the validator
# could not be installed ("SKIP k8s-validate: <reason>").
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
deploy=$(cd "$here/.." && pwd)
kv_version=1.37.0
versions=${K8S_VERSIONS:-1.29.0 1.37.0}
venv=${K8S_VALIDATE_VENV:-}
if [ -z "$venv" ]; then
    venv=/opt/k8s-validate-venv
    if [ ! -d "$venv" ] && ! { mkdir -p "$venv" 2>/dev/null && rmdir "$venv"; }; then
        venv=${HOME:-/tmp}/.cache/mk-upgrade/k8s-validate-venv
    fi
fi
py=$venv/bin/python
installed() {
    "$py" -c 'import importlib.metadata as m, jsonschema, yaml, kubernetes_validate
assert m.version("kubernetes-validate") == "'"$kv_version"'"' 2>/dev/null
}
if ! installed; then
    echo "installing kubernetes-validate $kv_version into $venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get install -y -q python3-venv >/dev/null 2>&1 || true
        fi
        python3 -m venv "$venv" >/dev/null 2>&1 || { echo "SKIP k8s-validate: python3 -m venv $venv failed"; exit 77; }
    fi
    "$venv/bin/pip" install -q "kubernetes-validate==$kv_version" ||
        { echo "SKIP k8s-validate: pip install kubernetes-validate==$kv_version failed"; exit 77; }
    installed || { echo "SKIP k8s-validate: kubernetes-validate $kv_version not importable from $venv"; exit 77; }
fi

if [ $# -gt 0 ]; then
    files=("$@")
else
    files=("$deploy"/k8s/*.yaml "$deploy"/kured/*.yaml)
fi
vargs=()
for v in $versions; do vargs+=(--k8s-version "$v"); done

echo "== manifests (Kubernetes ${versions// /, }; Plan: schemas/upgrade.cattle.io_plan_v1.json)"
"$py" "$here/validate.py" "${vargs[@]}" "${files[@]}" | tee "${TMPDIR:-/tmp}/k8s-validate.$$.log"
rc_files=${PIPESTATUS[0]}
ok_files=$(sed -n 's/^validate: \([0-9]*\) file(s) ok, \([0-9]*\) failed$/\1/p' "${TMPDIR:-/tmp}/k8s-validate.$$.log")
bad_files=$(sed -n 's/^validate: \([0-9]*\) file(s) ok, \([0-9]*\) failed$/\2/p' "${TMPDIR:-/tmp}/k8s-validate.$$.log")
echo "== broken copies must be rejected"
"$py" "$here/validate.py" "${vargs[@]}" --self-test "$deploy" | tee "${TMPDIR:-/tmp}/k8s-validate.$$.log"
rc_self=${PIPESTATUS[0]}
ok_self=$(sed -n 's/^self-test: \([0-9]*\) broken copies rejected as expected, \([0-9]*\) not$/\1/p' "${TMPDIR:-/tmp}/k8s-validate.$$.log")
bad_self=$(sed -n 's/^self-test: \([0-9]*\) broken copies rejected as expected, \([0-9]*\) not$/\2/p' "${TMPDIR:-/tmp}/k8s-validate.$$.log")
rm -f "${TMPDIR:-/tmp}/k8s-validate.$$.log"

passed=$((${ok_files:-0} + ${ok_self:-0}))
failed=$((${bad_files:-0} + ${bad_self:-0}))
if [ "$rc_files" != 0 ] || [ "$rc_self" != 0 ]; then
    [ "$failed" -gt 0 ] || failed=1
fi
echo "k8s-validate: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
