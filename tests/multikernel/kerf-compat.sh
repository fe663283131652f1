#!/usr/bin/env bash
# The multikernel blobs of `mk-upgrade multikernel overlay …` (the very code the
# multikernel platform writes with) against kerf 0.4.0 itself (PyPI kerf-multikernel,
# installed here in a venv): for each request below, kerf's bytes (tests/multikernel/
# kerf_blob.py runs kerf's own commands with its kernel access replaced) and ours must be
# byte-identical. Exit 0: all equal; 1: a difference (both blobs decoded are printed);
# 77: kerf could not be installed (the caller reports SKIP).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${KERF_VENV:-/opt/kerf-venv}"
py="$venv/bin/python"
if ! "$py" -c 'import kerf, libfdt' 2>/dev/null; then
    echo "installing kerf-multikernel 0.4.0 into $venv"
    # pylibfdt has no wheel for every Python: pip builds it (gcc, the Python headers).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q python3-venv python3-dev build-essential >/dev/null 2>&1 || true
    fi
    if ! python3 -m venv "$venv" 2>/dev/null; then
        apt-get install -y -q python3-venv >/dev/null 2>&1 || true
        python3 -m venv "$venv" || { echo "SKIP kerf: python3 -m venv failed"; exit 77; }
    fi
    "$venv/bin/pip" install -q kerf-multikernel==0.4.0 || { echo "SKIP kerf: pip install kerf-multikernel==0.4.0 failed"; exit 77; }
fi
version=$("$py" -c 'import importlib.metadata as m; print(m.version("kerf-multikernel"))')
if [ "$version" != 0.4.0 ]; then
    echo "kerf-multikernel $version installed in $venv, 0.4.0 needed" >&2
    exit 1
fi
# With fault injection, as `cargo test --workspace` builds it (the tests that follow in a
# shared target directory need that build; the overlay code is the same).
cargo build -q -p upgrade-agent --features fault-injection --bins || exit 1
mk="${CARGO_TARGET_DIR:-$root/target}/debug/mk-upgrade"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pass=0
fail=0
# name | kerf request (JSON) | our arguments after `mk-upgrade multikernel overlay`
cases=(
'baseline-1-3-2GB|{"kind":"baseline","cpus":"1-3","memory":"2GB"}|baseline --cpus 1-3 --memory 2GB'
'baseline-0-3-2048MB|{"kind":"baseline","cpus":"0-3","memory":"2048MB","system_apic_ids":[0,1,2,3,4,5,6,7]}|baseline --cpus 0-3 --memory 2GiB'
'baseline-2nodes|{"kind":"baseline","cpus":"1-3","memory":"1GB@1,512MB@0"}|baseline --cpus 1-3 --memory 1GB@1,512MB@0'
'create-id|{"kind":"create","name":"web","id":1,"cpus":"2-3","memory":"512MB"}|create web --id 1 --cpus 2-3 --memory 512MB'
'create-auto-id|{"kind":"create","name":"api","cpus":"2-3","memory":"512MB"}|create api --cpus 2-3 --memory 512MiB'
'create-unsorted-cpus|{"kind":"create","name":"db","id":3,"cpus":"7,4-5","memory":"1GB"}|create db --id 3 --cpus 7,4-5 --memory 1GB'
'create-device|{"kind":"create","name":"db","id":2,"cpus":"4-5","memory":"1GB","devices":["0000:09:00.0"]}|create db --id 2 --cpus 4-5 --memory 1GB --device 0000:09:00.0'
'create-2devices|{"kind":"create","name":"db","id":3,"cpus":"5,4","memory":"1GB","devices":["0000:0a:00.0","0000:09:00.0"]}|create db --id 3 --cpus 5,4 --memory 1GB --device 0000:0a:00.0 --device 0000:09:00.0'
'create-id-511|{"kind":"create","name":"mk-upgrade-511","id":511,"cpus":"1","memory":"128MB"}|create mk-upgrade-511 --id 511 --cpus 1 --memory 128MiB'
'update-cpu-add|{"kind":"update","name":"web","id":1,"instance":{"cpus":"2-3","memory":"512MB"},"cpus":"2-5"}|update web --cpu-add 4-5'
'update-cpu-remove|{"kind":"update","name":"web","id":1,"instance":{"cpus":"2-5","memory":"512MB"},"cpus":"2-3"}|update web --cpu-remove 4-5'
'update-memory-add|{"kind":"update","name":"web","id":1,"instance":{"cpus":"2-3","memory":"512MB"},"memory":"1GB"}|update web --memory-add 0x1e0000000+512MiB'
'update-memory-remove|{"kind":"update","name":"web","id":1,"instance":{"cpus":"2-3","memory":"1GB","regions":[[4294967296,536870912],[8053063680,536870912]]},"memory":"512MB"}|update web --memory-remove 0x1e0000000+512MiB'
'update-memory-remove-2|{"kind":"update","name":"web","id":1,"instance":{"cpus":"2-3","memory":"1280MB","regions":[[4294967296,268435456],[7516192768,536870912],[8053063680,536870912]]},"memory":"256MB"}|update web --memory-remove 0x1e0000000+512MiB --memory-remove 0x1c0000000+512MiB'
'update-devices|{"kind":"update","name":"db","id":2,"instance":{"cpus":"4-5","memory":"1GB","devices":["0000:09:00.0"]},"devices":"0000:0b:00.0,0000:0a:00.0"}|update db --device-remove 0000:09:00.0 --device-add 0000:0b:00.0 --device-add 0000:0a:00.0'
'update-mixed|{"kind":"update","name":"web","id":1,"instance":{"cpus":"2-5","memory":"512MB","devices":["0000:09:00.0"]},"cpus":"2,3,6","memory":"1GB","devices":"none"}|update web --cpu-remove 4-5 --cpu-add 6 --memory-add 0x1e0000000+512MiB --device-remove 0000:09:00.0'
'delete|{"kind":"delete","name":"web","id":1}|delete web'
)
for c in "${cases[@]}"; do
    IFS='|' read -r name req args <<<"$c"
    if ! "$py" "$here/kerf_blob.py" -o "$work/$name.kerf" "$req" 2>"$work/$name.kerf.err"; then
        echo "FAIL $name: kerf refused the request: $(cat "$work/$name.kerf.err")"
        fail=$((fail + 1))
        continue
    fi
    # shellcheck disable=SC2086
    if ! "$mk" multikernel overlay $args -o "$work/$name.ours" 2>"$work/$name.ours.err"; then
        echo "FAIL $name: mk-upgrade refused the request: $(cat "$work/$name.ours.err")"
        fail=$((fail + 1))
        continue
    fi
    if cmp -s "$work/$name.kerf" "$work/$name.ours"; then
        echo "ok   $name ($(stat -c %s "$work/$name.ours") bytes, sha256 $(sha256sum <"$work/$name.ours" | cut -c1-16))"
        pass=$((pass + 1))
    else
        echo "FAIL $name: blobs differ"
        cmp "$work/$name.kerf" "$work/$name.ours" || true
        if command -v dtc >/dev/null; then
            diff <(dtc -I dtb -O dts "$work/$name.kerf" 2>/dev/null) <(dtc -I dtb -O dts "$work/$name.ours" 2>/dev/null) || true
        fi
        fail=$((fail + 1))
    fi
done
echo "kerf $version compatibility: $pass identical, $fail different"
[ "$fail" -eq 0 ]
