#!/usr/bin/env bash
# nix/check/run.sh: what can be checked of nix/ without nixpkgs.
#
#   MK_BIN_DIR=target/debug nix/check/run.sh
#
# 1. `nix-instantiate --parse` of every nix/*.nix (syntax, and undefined variables: the
#    module binds every name lexically, no `with`).
# 2. nix/check/stub-eval.nix: module.nix evaluated against a stand-in lib/pkgs (NOT the NixOS
#    module system: no type checks, no coercions) for four cases; the resulting units,
#    tmpfiles rules, kernel settings and assertions are checked with jq.
# 3. The generated files, used for real: the workload document (rendered to TOML here;
#    nixpkgs renders it with remarshal) and the trusted-keys directory boot an EMULATED
#    machine with `mk-upgrade emu init`; the on-switch script is shellchecked and run with
#    /run/{booted,current}-system, the state dir and PATH redirected to a scratch tree:
#    (a) kernel unchanged: exit 0, nothing done; (b) kernel changed, as generated
#    (--platform luo; this machine has no /dev/liveupdate): apply refuses, the script exits
#    1 saying the old kernel keeps running; (c) the same with --platform emulated swapped
#    in: the upgrade happens, exit 0; (d) again: mk-upgrade says the kernel already runs
#    (14), exit 0.
# Needs nix-instantiate (Debian: nix-bin), jq, shellcheck, python3, the binaries in
# MK_BIN_DIR and the prebuilt kernels (MK_TEST_KERNEL_A/B or ../shared/kernels).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
nixdir=$(cd "$here/.." && pwd)
repo=$(cd "$nixdir/.." && pwd)
: "${MK_BIN_DIR:?set MK_BIN_DIR to the directory holding mk-upgrade, mk-agentd, mk-demo-kv}"
MK_BIN_DIR=$(cd "$MK_BIN_DIR" && pwd)
shared=${MK_SHARED_KERNELS:-$repo/../shared/kernels}
kernel_a=${MK_TEST_KERNEL_A:-$shared/bzImage-7.2.13-mkA}
kernel_b=${MK_TEST_KERNEL_B:-$shared/bzImage-7.2.13-mkB}
for t in nix-instantiate jq shellcheck python3; do
    command -v "$t" >/dev/null || { echo "nix/check: $t missing" >&2; exit 2; }
done
export MK_AGENTD=$MK_BIN_DIR/mk-agentd
unset MK_STATE_DIR MK_PLATFORM MK_WORKLOADS MK_TRUSTED_KEYS
mk=$MK_BIN_DIR/mk-upgrade

work=$(mktemp -d "${TMPDIR:-/tmp}/mk-nix-check.XXXXXX")
cleanup() {
    "$mk" --state-dir "$work/state" --platform emulated emu down >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

failures=0
check() {
    local what=$1
    shift
    if "$@"; then echo "  ok   $what"; else echo "  FAIL $what"; failures=$((failures + 1)); fi
}
jqt() { # jqt FILE FILTER: the filter must yield true
    [ "$(jq -r "$2" "$1")" = true ]
}

echo "== 1. parse"
for f in "$nixdir"/*.nix "$here"/*.nix; do
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    check "nix-instantiate --parse ${f#"$repo"/}" bash -c 'nix-instantiate --parse "$1" >/dev/null' _ "$f"
done

echo "== 2. stub evaluation of module.nix"
mkdir -p "$work/keys"
"$mk" keys generate --dir "$work/keys" --name release >/dev/null
"$mk" keys generate --dir "$work/keys" --name ci >/dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
eval_case() {
    nix-instantiate --read-write-mode --eval --strict --json "$here/stub-eval.nix" --argstr case "$1" \
        --argstr kvExec "$MK_BIN_DIR/mk-demo-kv" --argstr kvPort "$port" \
        --argstr releaseKey "$(cat "$work/keys/release.pub")" --argstr ciKey "$work/keys/ci.pub" \
        --argstr sigFile "$work/img/bzImage-B.sig" >"$work/$1.json"
}
for c in full minimal emulatedSwitch oldKernel; do
    check "evaluates: $c" eval_case "$c"
done
f=$work/full.json
check "full: no failed assertion, no warning" jqt "$f" '.failedAssertions == [] and .warnings == []'
check "full: mk-agentd oneshot, RemainAfterExit, --state-dir" jqt "$f" \
    '.services."mk-agentd".serviceConfig | .Type == "oneshot" and .RemainAfterExit and (.ExecStart | endswith("/bin/mk-agentd --state-dir /var/lib/mk-upgrade"))'
check "full: mk-agentd after local-fs, before the workload units" jqt "$f" \
    '.services."mk-agentd" | (.after | index("local-fs.target") != null) and .before == ["kv-store.service"]'
check "full: mk-upgrade-switch restarted when the kernel changes" jqt "$f" \
    '.services."mk-upgrade-switch".restartTriggers == ["/nix/store/00000000000000000000000000000000-linux-6.19.2"]'
check "full: liveupdate=on and the six KHO/LUO options =y" jqt "$f" \
    '.kernelParams == ["liveupdate=on"] and (.kernelPatches[0].extraStructuredConfig | keys == ["KEXEC_FILE","KEXEC_HANDOVER","KEXEC_HANDOVER_ENABLE_DEFAULT","LIVEUPDATE","LIVEUPDATE_MEMFD","RELOCATABLE"] and all(.[]; .tristate == "y"))'
check "full: tmpfiles: state dir, trusted-keys and workloads.toml links" jqt "$f" \
    '.tmpfiles | length == 3 and (.[1] | startswith("L+ /var/lib/mk-upgrade/trusted-keys ")) and (.[2] | startswith("L+ /var/lib/mk-upgrade/workloads.toml "))'
check "full: MK_STATE_DIR and MK_PLATFORM for interactive use" jqt "$f" \
    '.environment.variables == {"MK_PLATFORM": "luo", "MK_STATE_DIR": "/var/lib/mk-upgrade"}'
f=$work/minimal.json
check "minimal: only mk-agentd, no kernel change, no links" jqt "$f" \
    '(.services | keys) == ["mk-agentd"] and .kernelParams == [] and .kernelPatches == [] and (.tmpfiles | length) == 1 and .failedAssertions == []'
f=$work/emulatedSwitch.json
check "emulated + liveUpgradeOnSwitch, no signature: both assertions fail" jqt "$f" \
    '(.failedAssertions | length) == 2 and (.failedAssertions[0] | test("emulated")) and (.failedAssertions[1] | test("signatureFile"))'
f=$work/oldKernel.json
check "kernelSupport on Linux 6.12: the version assertion fails" jqt "$f" \
    '.failedAssertions == ["services.mk-upgrade.kernelSupport needs Linux 6.19 or later (LUO); boot.kernelPackages has 6.12.40."]'

echo "== 3. the generated files, used by mk-upgrade"
f=$work/full.json
keys_json=$(jq -r '.tmpfiles[1] | split(" ") | last' "$f")
workloads_json=$(jq -r '.tmpfiles[2] | split(" ") | last' "$f")
script=$(jq -r '.services."mk-upgrade-switch".serviceConfig.ExecStart' "$f")

# The state dir as the tmpfiles rules would make it: trusted-keys/ with the link farm's
# entries, workloads.toml rendered from the generated document.
mkdir -p "$work/state/trusted-keys" "$work/img"
jq -r '.[] | "\(.name)\t\(.path)"' "$keys_json" | while IFS=$'\t' read -r name path; do
    ln -s "$path" "$work/state/trusted-keys/$name"
done
check "trusted-keys: release.pub (from the key string) and ci.pub (a host path)" \
    test "$(cat "$work/state/trusted-keys/release.pub")" = "$(cat "$work/keys/release.pub")" -a -e "$work/state/trusted-keys/ci.pub"
python3 - "$workloads_json" "$work/state/workloads.toml" <<'EOF'
# JSON -> TOML for the shapes a workload document has (tables, arrays of tables, strings,
# integers, booleans, arrays of scalars).
import json, sys

def scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(scalar(x) for x in v) + "]"
    raise SystemExit(f"unsupported value {v!r}")

def table(path, d, out):
    subs = []
    for k, v in d.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            subs.append((k, v))
        else:
            out.append(f"{k} = {scalar(v)}")
    for k, v in subs:
        p = f"{path}.{k}" if path else k
        if isinstance(v, dict):
            out.append(f"\n[{p}]")
            table(p, v, out)
        else:
            for item in v:
                out.append(f"\n[[{p}]]")
                table(p, item, out)

out = []
table("", json.load(open(sys.argv[1])), out)
open(sys.argv[2], "w").write("\n".join(out).lstrip() + "\n")
EOF
cp "$kernel_a" "$work/img/bzImage-A"
cp "$kernel_b" "$work/img/bzImage-B"
"$mk" sign "$work/img/bzImage-B" --key "$work/keys/release.key" >/dev/null
check "emu init with the generated workload file and trusted keys" \
    "$mk" --state-dir "$work/state" --platform emulated emu init --kernel "$work/img/bzImage-A" >/dev/null
check "the declared workload serves on port $port" \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$port; printf 'PING\n' >&3; read -r -t 10 r <&3; [ \"\$r\" = PONG ]"

check "on-switch script: shellcheck" shellcheck -s bash "$script"
# A fake NixOS generation tree: kernel, initrd, init, kernel-params.
mkgen() { # mkgen DIR KERNEL
    mkdir -p "$1"
    ln -sfn "$2" "$1/kernel"
    : >"$1/initrd"
    printf '#!/bin/sh\n' >"$1/init"
    printf 'console=ttyS0 liveupdate=on' >"$1/kernel-params"
}
mkgen "$work/run/booted-system" "$work/img/bzImage-A"
mkgen "$work/run/current-system" "$work/img/bzImage-A"
redirect() { # the generated script with /run, the state dir and PATH moved to the scratch tree
    sed -e "s|/run/booted-system|$work/run/booted-system|g" \
        -e "s|/run/current-system|$work/run/current-system|g" \
        -e "s|^state=.*|state=$work/state|" \
        -e "s|^PATH=.*|PATH=$MK_BIN_DIR:/usr/bin:/bin|" "$script"
}
redirect >"$work/switch.sh"
redirect | sed -e 's/--platform luo/--platform emulated/' >"$work/switch-emulated.sh"
run_switch() { # run_switch SCRIPT NAME -> rc, output in $work/NAME.out
    rc=0
    bash "$1" >"$work/$2.out" 2>&1 || rc=$?
    sed 's/^/      | /' "$work/$2.out"
}

run_switch "$work/switch.sh" a
check "(a) kernel unchanged: exit 0, nothing to do" test "$rc" = 0
check "(a) says so" grep -q "nothing to do" "$work/a.out"

mkgen "$work/run/current-system" "$work/img/bzImage-B"
run_switch "$work/switch.sh" b
check "(b) --platform luo without /dev/liveupdate: exit 1" test "$rc" = 1
check "(b) names exit 8 and the kept kernel" grep -q "exit 8 (preflight-failed)" "$work/b.out"
check "(b) the machine still runs 7.2.13-mkA" test "$("$mk" --state-dir "$work/state" --platform emulated status --json |
    jq -r '[.instances[] | select(.state == "active") | .kernel_release] | join(",")')" = 7.2.13-mkA

run_switch "$work/switch-emulated.sh" c
check "(c) emulated: exit 0, upgraded live to 7.2.13-mkB" test "$rc" = 0
check "(c) says so" grep -q "upgraded live to 7.2.13-mkB" "$work/c.out"
check "(c) the record was kept" jqt "$work/state/nixos-switch/last-apply.json" '.result == "upgraded" and .emulated'
check "(c) the workload still serves" \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$port; printf 'PING\n' >&3; read -r -t 10 r <&3; [ \"\$r\" = PONG ]"

run_switch "$work/switch-emulated.sh" d
check "(d) the kernel already runs: exit 0 (mk-upgrade exit 14)" test "$rc" = 0
check "(d) says nothing to do" grep -q "nothing to do" "$work/d.out"

echo
if [ "$failures" -eq 0 ]; then
    echo "nix/check: all checks passed (syntax + stub evaluation; NOT evaluated against nixpkgs)"
else
    echo "nix/check: $failures check(s) FAILED"
    exit 1
fi
