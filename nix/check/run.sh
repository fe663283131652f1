#!/usr/bin/env bash
# nix/check/run.sh: the NixOS module checked without nixpkgs (none is reachable here).
#
#   MK_BIN_DIR=target/debug nix/check/run.sh
#
# 1. `nix-instantiate --parse` of every .nix file under nix/ (syntax, undefined names).
# 2. The stand-in of nixpkgs' lib (nix/check/lib: module system, option types with their
#    checks, merges and coercions, priorities) against its own tests.
# 3. nix/module.nix evaluated by that module system with typed stand-ins of the NixOS
#    options it sets (nix/check/nixos-stub.nix), one case per problem the module must
#    handle: values checked with jq, refusals checked by their message.
# 4. What the evaluation generates, used for real: the trusted-keys directory built by its
#    build script and read by mk-upgrade's StrictModes checks, the workload document
#    validated by the build-time check (mk-upgrade workloads check) and booting an
#    EMULATED machine whose workload then serves; the units rendered to unit files and
#    checked by `systemd-analyze verify`.
# 5. The switch hook (nix/live-upgrade.sh, as the module wraps it) against scratch
#    /run/{booted,current}-system, /nix/var/nix/profiles and switch-lock trees: boot,
#    unchanged kernel, `test`, `switch`, the upgrade waiting for the switch's lock, a
#    failure remembered and not retried by an unrelated switch, a manual retry, success
#    (the apply redirected to the emulated platform), an older generation
#    (--allow-downgrade) and a newest one (refused), a signature for another kernel,
#    boot.initrd.secrets appended to the target and booted initrds, a superseded request.
#
# Needs nix-instantiate (Debian: nix-bin), jq, shellcheck, systemd-analyze, python3, the
# binaries in MK_BIN_DIR and two kernels (MK_TEST_KERNEL_A/B or ../shared/kernels).
# MK_NIX_CHECK_MODULE=FILE evaluates another module.nix (e.g. an older revision) in step 3.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
nixdir=$(cd "$here/.." && pwd)
repo=$(cd "$nixdir/.." && pwd)
: "${MK_BIN_DIR:?set MK_BIN_DIR to the directory holding mk-upgrade, mk-agentd, mk-demo-kv}"
MK_BIN_DIR=$(cd "$MK_BIN_DIR" && pwd)
shared=${MK_SHARED_KERNELS:-$repo/../shared/kernels}
pick_kernel() { # the newest bzImage-*-mk$1 in $shared
    find "$shared" -maxdepth 1 -name "bzImage-*-mk$1" 2>/dev/null | sort -V | tail -1
}
kernel_a=${MK_TEST_KERNEL_A:-$(pick_kernel A)}
kernel_b=${MK_TEST_KERNEL_B:-$(pick_kernel B)}
# What this machine lacks: SKIP (exit 77, tests/run-all.sh counts it as skipped).
for t in nix-instantiate jq shellcheck systemd-analyze python3 flock; do
    command -v "$t" >/dev/null || { echo "SKIP nixos: $t missing (Debian: apt-get install nix-bin jq shellcheck systemd python3 util-linux)"; exit 77; }
done
[ -f "$kernel_a" ] && [ -f "$kernel_b" ] || { echo "SKIP nixos: no test kernels (MK_TEST_KERNEL_A/B or ../shared/kernels)"; exit 77; }
export MK_AGENTD=$MK_BIN_DIR/mk-agentd
unset MK_STATE_DIR MK_PLATFORM MK_WORKLOADS MK_TRUSTED_KEYS NIXOS_ACTION
mk=$MK_BIN_DIR/mk-upgrade

work=$(mktemp -d "${TMPDIR:-/tmp}/mk-nix-check.XXXXXX")
cleanup() {
    "$mk" --state-dir "$work/state" --platform emulated emu down >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

failures=0
passes=0
check() {
    local what=$1
    shift
    if "$@"; then
        echo "  ok   $what"
        passes=$((passes + 1))
    else
        echo "  FAIL $what"
        failures=$((failures + 1))
    fi
}
jqt() { # jqt FILE FILTER: the filter must yield true
    [ "$(jq -r "$2" "$1")" = true ]
}

echo "== 1. parse"
while IFS= read -r f; do
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    check "nix-instantiate --parse ${f#"$repo"/}" bash -c 'nix-instantiate --parse "$1" >/dev/null' _ "$f"
done < <(find "$nixdir" -name '*.nix' | sort)

echo "== 2. the stand-in of nixpkgs' lib"
check "nix/check/lib/run-tests.sh" bash -c "bash '$here/lib/run-tests.sh' >'$work/lib-tests.out' 2>&1"
{ grep -E "FAIL|passed|failed" "$work/lib-tests.out" || true; } | tail -5 | sed 's/^/      | /'

echo "== 3. evaluation of module.nix"
mkdir -p "$work/keys" "$work/img"
"$mk" keys generate --dir "$work/keys" --name release >/dev/null
"$mk" keys generate --dir "$work/keys" --name ci >/dev/null
cp "$kernel_a" "$work/img/bzImage-A"
cp "$kernel_b" "$work/img/bzImage-B"
"$mk" sign "$work/img/bzImage-B" --key "$work/keys/release.key" >/dev/null
"$mk" sign "$work/img/bzImage-A" --key "$work/keys/release.key" >/dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
module_args=()
if [ -n "${MK_NIX_CHECK_MODULE:-}" ]; then
    module_args=(--arg moduleFile "$(realpath "$MK_NIX_CHECK_MODULE")")
fi
eval_case() { # eval_case CASE: JSON in $work/CASE.json, messages in $work/CASE.err
    nix-instantiate --read-write-mode --eval --strict --json "$here/eval.nix" --argstr case "$1" \
        --argstr kvExec "$MK_BIN_DIR/mk-demo-kv" --argstr kvPort "$port" \
        --argstr releaseKey "$(cat "$work/keys/release.pub")" --argstr ciKeyFile "$work/keys/ci.pub" \
        --argstr sigFile "$work/img/bzImage-B.sig" "${module_args[@]}" >"$work/$1.json" 2>"$work/$1.err"
}
refused() { # refused CASE TEXT...: the evaluation fails and its message has every TEXT
    local c=$1
    shift
    if eval_case "$c"; then
        echo "      | $c evaluated, it should not have" >&2
        return 1
    fi
    local t
    for t in "$@"; do
        grep -qF -- "$t" "$work/$c.err" || {
            sed 's/^/      | /' "$work/$c.err" | head -20 >&2
            return 1
        }
    done
}
for c in full minimal emulatedSwitch oldKernel hostSignature hostKey duplicateNames misspelt override split; do
    check "evaluates: $c" eval_case "$c"
done
f=$work/full.json
check "full: no failed assertion, no warning" jqt "$f" '.failedAssertions == [] and .warnings == []'
check "full: trustedKeys list coerced to key-0 and 1-ci" jqt "$f" '.trustedKeyNames == ["1-ci", "key-0"]'
check "full: workloads attrset coerced to a list named by the attribute" jqt "$f" '.workloadNames == ["kv-1"]'
check "full: mk-agentd oneshot, RemainAfterExit, --state-dir, hardened" jqt "$f" \
    '.services."mk-agentd".serviceConfig | .Type == "oneshot" and .RemainAfterExit and (.ExecStart | endswith("/bin/mk-agentd --state-dir /var/lib/mk-upgrade")) and .UMask == "0077" and .ProtectHome == "read-only"'
check "full: mk-agentd after local-fs, before the workload units" jqt "$f" \
    '.services."mk-agentd" | (.after | index("local-fs.target") != null) and .before == ["kv-store.service"]'
check "full: mk-agentd-serve (Type=notify) before the workload units, wanted by them, --initrd of the booted generation" jqt "$f" \
    '.services."mk-agentd-serve" | .serviceConfig.Type == "notify" and .before == ["kv-store.service"] and (.wantedBy | index("kv-store.service") != null) and (.serviceConfig.ExecStart | test("--kernel-image /run/booted-system/kernel --initrd /run/mk-upgrade/booted-initrd$")) and (.serviceConfig.ExecStartPre | endswith(" booted-initrd")) and .restartIfChanged == false and .stopIfChanged == false'
check "full: no unit restarted by kernel changes (the old switch unit is gone)" jqt "$f" \
    '(.services | has("mk-upgrade-switch") | not) and ([.services[].restartTriggers[]] == [])'
check "full: mk-upgrade-live: oneshot, wanted by nothing, never restarted or stopped by a switch" jqt "$f" \
    '.services."mk-upgrade-live" | .serviceConfig.Type == "oneshot" and .wantedBy == [] and .restartIfChanged == false and .stopIfChanged == false and (.serviceConfig.ExecStart | endswith(" run")) and .serviceConfig.ProtectSystem == "strict" and .serviceConfig.ReadWritePaths == ["/var/lib/mk-upgrade", "/run/mk-upgrade", "-/run/nixos"]'
check "full: mk-upgrade-live.path watches the request" jqt "$f" \
    '.paths."mk-upgrade-live" | .pathConfig == {"PathExists": "/run/mk-upgrade/live-upgrade.request", "Unit": "mk-upgrade-live.service"} and .wantedBy == ["multi-user.target"]'
check "full: the activation snippet schedules with \$systemConfig and never fails the activation" jqt "$f" \
    '.activation."mk-upgrade-live" | .supportsDryActivation and (.text | test(" schedule \"\\$systemConfig\" \\|\\| echo "))'
check "full: the generation carries its signature (in the store) and kernel image" jqt "$f" \
    '.environment.etc."mk-upgrade/live-upgrade.json" | startswith("'"$(nix-instantiate --eval -E builtins.storeDir | tr -d '"')"'/")'
manifest=$(jq -r '.environment.etc."mk-upgrade/live-upgrade.json"' "$f" 2>/dev/null || true)
store_dir=$(nix-instantiate --eval -E builtins.storeDir | tr -d '"')
check "full: manifest: kernel = the kernel's bzImage, signature = a store copy of the .sig" jqt "$manifest" \
    '(.kernel | endswith("-linux-6.19.2/bzImage")) and (.signature | startswith("'"$store_dir"'/")) and .insecureAllowUnsigned == false and .extraApplyArgs == []'
check "full: the store copy of the signature is the signature" cmp -s "$(jq -r .signature "$manifest")" "$work/img/bzImage-B.sig"
check "full: liveupdate=on and the six KHO/LUO options =y" jqt "$f" \
    '.kernelParams == ["liveupdate=on"] and (.kernelPatches[0].extraStructuredConfig | keys == ["KEXEC_FILE","KEXEC_HANDOVER","KEXEC_HANDOVER_ENABLE_DEFAULT","LIVEUPDATE","LIVEUPDATE_MEMFD","RELOCATABLE"] and all(.[]; .tristate == "y"))'
check "full: system.requiredKernelConfig lists the luo options" jqt "$f" \
    '.requiredKernelConfig == ["CONFIG_KEXEC_FILE=y","CONFIG_RELOCATABLE=y","CONFIG_KEXEC_HANDOVER=y","CONFIG_LIVEUPDATE=y","CONFIG_LIVEUPDATE_MEMFD=y"]'
check "full: tmpfiles: state dir, /run/mk-upgrade, trusted-keys and workloads.toml links" jqt "$f" \
    '.tmpfiles | length == 4 and .[1] == "d /run/mk-upgrade 0700 root root -" and (.[2] | startswith("L+ /var/lib/mk-upgrade/trusted-keys ")) and (.[3] | startswith("L+ /var/lib/mk-upgrade/workloads.toml "))'
check "full: one build-time check (the workload file)" jqt "$f" '.checks | length == 1'
check "full: MK_STATE_DIR and MK_PLATFORM for interactive use" jqt "$f" \
    '.environment.variables == {"MK_PLATFORM": "luo", "MK_STATE_DIR": "/var/lib/mk-upgrade"}'
f=$work/minimal.json
check "minimal: only mk-agentd, no kernel change, no links, no hook" jqt "$f" \
    '(.services | keys) == ["mk-agentd"] and .kernelParams == [] and .kernelPatches == [] and (.tmpfiles | length) == 2 and .failedAssertions == [] and .activation == {} and .paths == {} and .checks == [] and .requiredKernelConfig == []'
check "emulated + liveUpgradeOnSwitch, no signature: both assertions fail" jqt "$work/emulatedSwitch.json" \
    '(.failedAssertions | length) == 2 and (.failedAssertions[0] | test("emulated")) and (.failedAssertions[1] | test("signatureFile"))'
check "kernelSupport on Linux 6.12: the version assertion fails" jqt "$work/oldKernel.json" \
    '.failedAssertions == ["services.mk-upgrade.kernelSupport needs Linux 6.19 or later (LUO); boot.kernelPackages has 6.12.40."]'
check "signatureFile outside the store: refused (it would not follow the kernel)" jqt "$work/hostSignature.json" \
    '.failedAssertions == ["services.mk-upgrade.signatureFile = \"/var/lib/mk-upgrade/signatures/current.sig\" is outside the store, so it is not part of the generation and would not follow its kernel (nor reach a --target-host): give a path in the configuration, e.g. signatureFile = ./sigs/host-kernel.sig;"]'
check "trusted key as a host path: refused" jqt "$work/hostKey.json" \
    '.failedAssertions | length == 1 and (.[0] | startswith("services.mk-upgrade.trustedKeys.ci = \"/etc/mk-upgrade/ci.pub\" is a path outside the store"))'
check "duplicate workload names: refused" jqt "$work/duplicateNames.json" \
    '.failedAssertions == ["services.mk-upgrade.workloads: workload names must be unique; repeated: kv."]'
check "one workload defined in two modules merges; mkDefault of a whole workload works" jqt "$work/split.json" \
    '.workloadNames == ["kv-1", "kv-2"] and .workloadArgs."kv-1" == ["--capacity", "4MiB"] and .failedAssertions == []'
check "override: plain definitions beat the unit defaults (no mkForce)" jqt "$work/override.json" \
    '.services."mk-agentd".serviceConfig.ProtectHome == false and .services."mk-agentd".serviceConfig.RemainAfterExit == false and .services."mk-upgrade-live".serviceConfig.TimeoutStartSec == "3h" and .services."mk-agentd-serve".serviceConfig.ProtectKernelModules == false'
check "a unit name without .service: refused against services.mk-upgrade.workloadUnits" \
    refused unitWithoutSuffix "services.mk-upgrade.workloadUnits" "kv-store"
check "a key that is neither 64 hex digits nor a path: refused against trustedKeys.ci" \
    refused badKey "services.mk-upgrade.trustedKeys" "not-a-key"
check "a relative workload exec: refused against the workload's exec" \
    refused relativeExec "exec" "mk-demo-kv" "not of type"
check "a misspelt module option: refused, named in full" \
    refused unknownOption "services.mk-upgrade.liveUpgradeOnSwich" "does not exist"
check "no pkgs.mk-upgrade (no overlay): refused, naming it" refused noPackage "mk-upgrade"

echo "== 4. the generated files, used for real"
f=$work/full.json
keys_builder=$(jq -r '.tmpfiles[2] | split(" ") | last' "$f")
workloads_toml=$(jq -r '.tmpfiles[3] | split(" ") | last' "$f")
check_builder=$(jq -r '.checks[0]' "$f")
mkdir -p "$work/state"
check "trusted-keys: the build script runs" env out="$work/state/trusted-keys" bash -e "$keys_builder"
check "trusted-keys: regular files 0444 in a 0555 directory (no links)" bash -c "
    [ \"\$(stat -c %a '$work/state/trusted-keys')\" = 555 ] &&
    [ -z \"\$(find '$work/state/trusted-keys' -mindepth 1 ! -type f)\" ] &&
    [ \"\$(stat -c %a '$work/state/trusted-keys'/*.pub | sort -u)\" = 444 ]"
check "trusted-keys: key-0.pub is the release key, 1-ci.pub the ci key" bash -c "
    cmp -s '$work/state/trusted-keys/key-0.pub' '$work/keys/release.pub' &&
    cmp -s '$work/state/trusted-keys/1-ci.pub' '$work/keys/ci.pub'"
cp "$workloads_toml" "$work/state/workloads.toml"
check "build-time check: passes on the generated workload file" \
    env out="$work/check-out" PATH="$MK_BIN_DIR:$PATH" bash -e "$check_builder"
eval_case misspelt
check "build-time check: fails on a misspelt key, naming it" bash -c "
    ! env out='$work/check-out2' PATH='$MK_BIN_DIR:$PATH' bash -e \"\$(jq -r '.checks[0]' '$work/misspelt.json')\" 2>'$work/misspelt.check' &&
    grep -q 'unknown field .helth.' '$work/misspelt.check'"
check "emu init with the generated workload file and trusted keys" \
    "$mk" --state-dir "$work/state" --platform emulated emu init --kernel "$work/img/bzImage-A" >/dev/null
check "the declared workload serves on port $port" \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$port; printf 'PING\n' >&3; read -r -t 10 r <&3; [ \"\$r\" = PONG ]"
check "trusted-keys: accepted by mk-upgrade's StrictModes checks (apply --dry-run verifies B's signature)" \
    "$mk" --state-dir "$work/state" --platform emulated apply --kernel "$work/img/bzImage-B" --dry-run

# The units as NixOS would write them (one line per list element), Exec* pointed at
# /bin/true (the store scripts here are not executable), checked by systemd-analyze.
mkdir -p "$work/units"
jq -r '.services | to_entries[] | @base64' "$f" | while read -r e; do
    name=$(echo "$e" | base64 -d | jq -r .key)
    echo "$e" | base64 -d | jq -r '
        def v: if type == "boolean" then (if . then "yes" else "no" end) else tostring end;
        def lines(k): if type == "array" then .[] | "\(k)=\(v)" else "\(k)=\(v)" end;
        .value as $u |
        "[Unit]", "Description=\($u.description)",
        ($u.after[] | "After=\(.)"), ($u.before[] | "Before=\(.)"),
        ($u.wants[] | "Wants=\(.)"), ($u.requires[] | "Requires=\(.)"),
        "", "[Service]",
        ($u.environment | to_entries[] | "Environment=\(.key)=\(.value)"),
        ($u.serviceConfig | to_entries[] | .key as $k | .value | lines($k)
            | sub("^(?<k>Exec[A-Za-z]*)=[^ ]*"; "\(.k)=/bin/true"))' >"$work/units/$name.service"
done
for p in $(jq -r '.paths | keys[]' "$f"); do
    jq -r --arg p "$p" '.paths[$p] | "[Unit]", "Description=\(.description)", "", "[Path]",
        (.pathConfig | to_entries[] | "\(.key)=\(.value)")' "$f" >"$work/units/$p.path"
done
# Units the rendered ones refer to, so that verify does not stop at a missing one.
for u in kv-store.service systemd-tmpfiles-setup.service; do
    printf '[Unit]\nDescription=stand-in\n[Service]\nExecStart=/bin/true\n' >"$work/units/$u"
done
printf '[Unit]\nDescription=stand-in\n' >"$work/units/local-fs.target"
check "systemd-analyze verify: the rendered units" bash -c "
    cd '$work/units' && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
        mk-agentd.service mk-agentd-serve.service mk-upgrade-live.service mk-upgrade-live.path \
        >'$work/verify.out' 2>&1 || { cat '$work/verify.out'; false; }
    ! grep -E 'Unknown|Failed to parse|Invalid|ignoring' '$work/verify.out'"

echo "== 5. the switch hook against scratch trees"
live_src=$(jq -r '.services."mk-upgrade-live".serviceConfig.ExecStart | split(" ") | first' "$f")
check "the wrapper runs nix/live-upgrade.sh with MK_STATE_DIR and its own path" bash -c "
    grep -q 'export MK_STATE_DIR=/var/lib/mk-upgrade' '$live_src' && grep -q 'export MK_LIVE_WRAPPER=\"\$0\"' '$live_src' &&
    grep -q '/bin/bash .*live-upgrade.sh \"\$@\"' '$live_src'"
hook_store=$(grep -o '[^ ]*live-upgrade.sh' "$live_src")
check "the store copy of the hook is nix/live-upgrade.sh" cmp -s "$hook_store" "$nixdir/live-upgrade.sh"
check "hook: shellcheck" shellcheck -s bash "$nixdir/live-upgrade.sh"

root=$work/root
mkdir -p "$root/run/nixos" "$root/nix/var/nix/profiles" "$work/gens" "$work/shim"
# mk-upgrade as the hook calls it: SHIM=real runs it unchanged; emulated swaps in the
# emulated platform (this machine has no /dev/liveupdate); refuse answers as mk-upgrade
# does to a downgrade (exit 6: the two test kernels share release 7.3.4, so mk-upgrade's
# own downgrade rule, tested in upgrade-agent/tests/verify_refusals.rs, cannot be met with
# them); every call is recorded.
cat >"$work/shim/mk-upgrade" <<EOF
#!/usr/bin/env bash
printf '%s %s\n' "\$(date +%s.%N)" "\$*" >>"$work/shim.log"
case "\${SHIM:-real}" in
refuse) echo '{"result": "refused", "error": "stand-in: refused as a downgrade"}'; exit 6 ;;
busy) echo '{"result": "error", "error": "stand-in: another upgrade is in flight"}'; exit 9 ;;
vanish) kill -9 "\$PPID"; exit 1 ;; # the luo kexec: the script never sees a result
esac
args=()
prev=
for a in "\$@"; do
    if [ "\$prev" = --initrd ]; then
        # what the apply was given, kept: the hook removes its private copy afterwards
        cp "\$a" "$work/shim-initrd"; stat -c %a "\$a" >"$work/shim-initrd.mode"
    fi
    prev=\$a
    if [ "\${SHIM:-real}" = emulated ] && [ "\$a" = luo ]; then a=emulated; fi
    args+=("\$a")
done
exec "$mk" "\${args[@]}"
EOF
chmod +x "$work/shim/mk-upgrade"
mkgen() { # mkgen NAME KERNEL [secrets]: a generation tree, its manifest from the module's
    local g=$work/gens/$1
    mkdir -p "$g/etc/mk-upgrade"
    ln -sfn "$2" "$g/kernel"
    printf 'initrd of %s\n' "$1" >"$g/initrd"
    printf '#!/bin/sh\n' >"$g/init"
    printf 'console=ttyS0 liveupdate=on' >"$g/kernel-params"
    jq --arg k "$2" --arg s "$2.sig" '.kernel = $k | .signature = $s' "$manifest" >"$g/etc/mk-upgrade/live-upgrade.json"
    if [ "${3:-}" = secrets ]; then
        printf '#!/bin/sh\nprintf "SECRETS of %s\\n" %s >>"$1"\n' "$1" "$1" >"$g/append-initrd-secrets"
        chmod +x "$g/append-initrd-secrets"
    fi
}
mkgen A "$work/img/bzImage-A"
mkgen B "$work/img/bzImage-B"
mkgen B2 "$work/img/bzImage-B" # B's kernel and initrd, another configuration
ln -sfn "$work/gens/B/initrd" "$work/gens/B2/initrd"
setlinks() { # setlinks BOOTED CURRENT PROFILE-GEN GEN=NAME...
    ln -sfn "$work/gens/$1" "$root/run/booted-system"
    ln -sfn "$work/gens/$2" "$root/run/current-system"
    local p=$3
    shift 3
    rm -f "$root/nix/var/nix/profiles"/system*
    local kv
    for kv in "$@"; do ln -sfn "$work/gens/${kv#*=}" "$root/nix/var/nix/profiles/system-${kv%%=*}-link"; done
    ln -sfn "system-$p-link" "$root/nix/var/nix/profiles/system"
}
hook() { # hook NAME ACTION|- ARGS...: output in $work/NAME.out, rc in $rc
    local name=$1 action=$2
    shift 2
    rc=0
    if [ "$action" = - ]; then
        env -u NIXOS_ACTION MK_LIVE_ROOT="$root" MK_STATE_DIR="$work/state" MK_LIVE_LOCK_WAIT=30 \
            PATH="$work/shim:$PATH" bash "$hook_store" "$@" >"$work/$name.out" 2>&1 || rc=$?
    else
        NIXOS_ACTION=$action MK_LIVE_ROOT="$root" MK_STATE_DIR="$work/state" MK_LIVE_LOCK_WAIT=30 \
            PATH="$work/shim:$PATH" bash "$hook_store" "$@" >"$work/$name.out" 2>&1 || rc=$?
    fi
    sed 's/^/      | /' "$work/$name.out"
}
req=$root/run/mk-upgrade/live-upgrade.request
running() { # the emulated machine's active kernel release
    "$mk" --state-dir "$work/state" --platform emulated status --json |
        jq -r '[.instances[] | select(.state == "active") | .kernel_release] | join(",")'
}
release_a=$(running)

setlinks A A 1 1=A
hook boot - schedule "$work/gens/A"
check "boot-time activation (no NIXOS_ACTION), same kernel: nothing, exit 0" bash -c "[ $rc = 0 ] && [ ! -e '$req' ] && [ ! -s '$work/boot.out' ]"
setlinks A B 2 1=A 2=B
hook boot2 - schedule "$work/gens/B"
check "boot-time activation with another kernel: nothing scheduled" bash -c "[ $rc = 0 ] && [ ! -e '$req' ]"
hook same switch schedule "$work/gens/A"
check "switch, kernel unchanged: nothing scheduled, silent" bash -c "[ $rc = 0 ] && [ ! -e '$req' ] && [ ! -s '$work/same.out' ]"
hook test test schedule "$work/gens/B"
check "test, kernel changed: no live upgrade, says why" bash -c "[ $rc = 0 ] && [ ! -e '$req' ] && grep -q \"'nixos-rebuild test' activates a generation that is not the boot default\" '$work/test.out'"
hook dry dry-activate schedule "$work/gens/B"
check "dry-activate: says what it would do, schedules nothing" bash -c "[ $rc = 0 ] && [ ! -e '$req' ] && grep -q 'would schedule a live upgrade' '$work/dry.out'"
hook sw1 switch schedule "$work/gens/B"
check "switch, kernel changed: scheduled at once, exit 0, request 0600-private" bash -c "
    [ $rc = 0 ] && [ -e '$req' ] && grep -q 'scheduled: mk-upgrade-live.service runs it when this switch has finished' '$work/sw1.out' &&
    [ \"\$(stat -c %a '$root/run/mk-upgrade')\" = 700 ] && [ \"\$(jq -r .system '$req')\" = '$work/gens/B' ]"

# The upgrade waits for the switch's lock; as generated (--platform luo) it fails here
# (no /dev/liveupdate): exit 8, remembered.
: >"$work/shim.log"
(flock "$root/run/nixos/switch-to-configuration.lock" sleep 2) &
sleep 0.3
t0=$(date +%s.%N)
hook run1 - run
t_apply=$(head -1 "$work/shim.log" | cut -d' ' -f1)
check "run waited for the switch lock before applying (>= 1.5 s)" python3 -c "import sys; sys.exit(0 if float('$t_apply') - float('$t0') >= 1.5 else 1)"
wait
check "run (luo, no /dev/liveupdate): exit 1, NOT done, exit 8 named, old kernel kept" bash -c "
    [ $rc = 1 ] && grep -q 'NOT done: exit 8 (preflight-failed)' '$work/run1.out' && grep -q 'keeps every workload' '$work/run1.out' && [ ! -e '$req' ]"
check "run: the apply got the generation's kernel, initrd, init= and signature" grep -q -- \
    "--platform luo apply --kernel $work/img/bzImage-B --initrd $work/gens/B/initrd --cmdline init=$work/gens/B/init console=ttyS0 liveupdate=on --signature $work/img/bzImage-B.sig --json" "$work/shim.log"
check "the failure is remembered (failed.json: exit 8, the kernel)" jqt "$work/state/nixos-switch/failed.json" \
    '.exit == 8 and .name == "preflight-failed" and .kernel == "'"$work/img/bzImage-B"'"'
check "the machine still runs $release_a" test "$(running)" = "$release_a"

setlinks A B2 3 1=A 2=B 3=B2
hook sw2 switch schedule "$work/gens/B2"
check "an unrelated switch (same kernel, another configuration): not retried, says how to retry" bash -c "
    [ $rc = 0 ] && [ ! -e '$req' ] && grep -q 'NOT retried' '$work/sw2.out' && grep -q 'systemctl start mk-upgrade-live.service' '$work/sw2.out'"
printf ' quiet' >>"$work/gens/B2/kernel-params"
hook sw3 switch schedule "$work/gens/B2"
check "kernel parameters changed: scheduled again" bash -c "[ $rc = 0 ] && [ -e '$req' ]"
rm -f "$req"

: >"$work/shim.log"
SHIM=emulated hook manual - run
check "manual start (no request): retried, upgraded (apply on the emulated platform), failure forgotten" bash -c "
    [ $rc = 0 ] && grep -q 'upgraded live to' '$work/manual.out' && [ ! -e '$work/state/nixos-switch/failed.json' ]"
release_b=$(running)
check "the machine now runs $release_b (not $release_a), the workload serves" bash -c "
    [ -n '$release_b' ] && [ '$release_b' != '$release_a' ] &&
    exec 3<>/dev/tcp/127.0.0.1/$port && printf 'PING\n' >&3 && read -r -t 10 r <&3 && [ \"\$r\" = PONG ]"
check "the record is kept" jqt "$work/state/nixos-switch/last-apply.json" '.result == "upgraded"'

# Back to A: as the newest generation (a configuration pinned to the older kernel) the
# downgrade is refused; as an older generation (switch --rollback) it is allowed.
setlinks B A 4 1=A 2=B 3=B2 4=A
hook sw4 switch schedule "$work/gens/A"
: >"$work/shim.log"
SHIM=refuse hook run4 - run
check "newest generation with an older kernel: no --allow-downgrade; the refusal (exit 6) reported" bash -c "
    [ $rc = 1 ] && grep -q 'NOT done: exit 6 (incompatible)' '$work/run4.out' && grep -q -- '--kernel $work/img/bzImage-A' '$work/shim.log' && ! grep -q allow-downgrade '$work/shim.log'"
rm -f "$work/state/nixos-switch/failed.json"
setlinks B A 1 1=A 2=B 3=B2
hook sw5 switch schedule "$work/gens/A"
: >"$work/shim.log"
SHIM=emulated hook run5 - run
check "older generation (rollback): --allow-downgrade, upgraded back to $release_a" bash -c "
    [ $rc = 0 ] && grep -q -- '--allow-downgrade' '$work/shim.log' && grep -q 'generation 1 is older than the newest (3)' '$work/run5.out' && grep -q 'upgraded live to' '$work/run5.out'"
check "the machine runs $release_a again" test "$(running)" = "$release_a"

# A signature that belongs to another kernel image.
mkgen C "$work/img/bzImage-B"
jq --arg k "$work/img/bzImage-A" '.kernel = $k' "$work/gens/C/etc/mk-upgrade/live-upgrade.json" >"$work/m.json"
mv "$work/m.json" "$work/gens/C/etc/mk-upgrade/live-upgrade.json"
setlinks A C 5 1=A 5=C
hook sw6 switch schedule "$work/gens/C"
: >"$work/shim.log"
hook run6 - run
check "a manifest whose signature is for another kernel: refused before any apply" bash -c "
    [ $rc = 1 ] && grep -q 'signature is for $work/img/bzImage-A, not its kernel $work/img/bzImage-B' '$work/run6.out' && [ ! -s '$work/shim.log' ]"
rm -f "$work/state/nixos-switch/failed.json"

# boot.initrd.secrets: appended to a private copy, for the target and for the way back.
mkgen S "$work/img/bzImage-B" secrets
mkgen BS "$work/img/bzImage-A" secrets
setlinks BS S 6 1=BS 6=S
hook sw7 switch schedule "$work/gens/S"
: >"$work/shim.log"
hook run7 - run
initrd_used=$(grep -o -- '--initrd [^ ]*' "$work/shim.log" | cut -d' ' -f2)
check "initrd secrets: the apply gets a private 0600 copy with the secrets appended, removed afterwards" bash -c "
    [ '$initrd_used' = '$root/run/mk-upgrade/target-initrd' ] && grep -q 'SECRETS of' '$work/shim-initrd' && grep -q 'initrd of S' '$work/shim-initrd' &&
    [ \"\$(cat '$work/shim-initrd.mode')\" = 600 ] && [ ! -e '$initrd_used' ]"
hook bi - booted-initrd
check "booted-initrd: the booted generation's initrd with its secrets, 0600" bash -c "
    [ $rc = 0 ] && grep -q 'initrd of BS' '$root/run/mk-upgrade/booted-initrd' && grep -q 'SECRETS of' '$root/run/mk-upgrade/booted-initrd' &&
    [ \"\$(stat -c %a '$root/run/mk-upgrade/booted-initrd')\" = 600 ]"
rm -f "$work/state/nixos-switch/failed.json"

# A request overtaken by a later switch.
setlinks A B 2 1=A 2=B
hook sw8 switch schedule "$work/gens/B"
ln -sfn "$work/gens/B2" "$root/run/current-system"
: >"$work/shim.log"
hook run8 - run
check "a request superseded by a later switch: nothing applied, exit 0" bash -c "
    [ $rc = 0 ] && grep -q 'a later switch activated' '$work/run8.out' && [ ! -s '$work/shim.log' ]"
# A manual start while the running configuration is not the boot default (after `test`).
setlinks A B 1 1=A 2=B
hook run9 - run
check "manual start on a generation that is not the boot default: refused" bash -c "
    [ $rc = 1 ] && grep -q 'is not the boot default' '$work/run9.out'"

# Dry activation changes nothing, not even a pending request.
setlinks A B 2 1=A 2=B
hook sw10 switch schedule "$work/gens/B"
hook dry2 dry-activate schedule "$work/gens/A"
check "dry-activate leaves a pending request alone" test -e "$req"
rm -f "$req"
# A specialisation (switch --specialisation X): the boot default stays the base.
mkgen SP "$work/img/bzImage-B"
hook spec switch schedule "$work/gens/SP"
check "a generation that is not the system profile's (specialisation): not scheduled, says why" bash -c "
    [ $rc = 0 ] && [ ! -e '$req' ] && grep -q 'is not the boot default (a specialisation' '$work/spec.out'"
# The luo ending: the script dies with the kexec (here: killed) and no result comes back;
# if the old kernel still runs at the next switch, the attempt counts as a failure.
hook sw11 switch schedule "$work/gens/B"
SHIM=vanish hook run11 - run
check "an apply that never returned leaves its attempt on record" jqt "$work/state/nixos-switch/attempt.json" \
    '.kernel == "'"$work/img/bzImage-B"'"'
hook sw12 switch schedule "$work/gens/B"
check "the next switch, old kernel still running: NOT retried (attempted, no result)" bash -c "
    [ $rc = 0 ] && [ ! -e '$req' ] && grep -q 'NOT retried: it was attempted at' '$work/sw12.out'"
rm -f "$work/state/nixos-switch/attempt.json"
# Another upgrade in flight (exit 9) is not remembered: the next switch tries again.
hook sw13 switch schedule "$work/gens/B"
SHIM=busy hook run13 - run
check "exit 9 (busy): NOT done, not remembered" bash -c "
    [ $rc = 1 ] && grep -q 'not remembered (exit 9 may pass)' '$work/run13.out' && [ ! -e '$work/state/nixos-switch/failed.json' ]"
hook sw14 switch schedule "$work/gens/B"
check "... and the next switch schedules it again" test -e "$req"
rm -f "$req"
# The previous generation's unit started by the request hands over to the new script.
{
    echo '#!/usr/bin/env bash'
    echo "echo \"NEW SCRIPT \$*\" >>'$work/handed.log'"
    echo 'export MK_LIVE_WRAPPER="$0"'
    echo "exec bash '$hook_store' \"\$@\""
} >"$work/newwrap"
chmod +x "$work/newwrap"
MK_LIVE_WRAPPER=$work/newwrap hook sw15 switch schedule "$work/gens/B"
check "the request names the scheduling generation's script" jqt "$req" '.script == "'"$work/newwrap"'"'
(flock "$root/run/nixos/switch-to-configuration.lock" sleep 1) &
sleep 0.2
SHIM=refuse MK_LIVE_WRAPPER=$work/oldwrap hook run15 - run
wait
check "the old generation's unit hands over to it, which applies (the lock is kept, not taken twice)" bash -c "
    grep -q 'handing over to the switched-to generation' '$work/run15.out' && grep -q 'NEW SCRIPT run' '$work/handed.log' &&
    grep -q 'live upgrade .* (generation 2)' '$work/run15.out'"
rm -f "$work/state/nixos-switch/failed.json"
# boot.initrd.secrets that cannot be appended: the agent still starts (plain initrd), live
# upgrades are refused until fixed.
mkgen BF "$work/img/bzImage-A"
printf '#!/bin/sh\necho "secret source missing" >&2\nexit 1\n' >"$work/gens/BF/append-initrd-secrets"
chmod +x "$work/gens/BF/append-initrd-secrets"
setlinks BF B 2 1=BF 2=B
hook bi2 - booted-initrd
check "booted-initrd with failing secrets: exit 0 (the agent starts), plain initrd, marker, warning" bash -c "
    [ $rc = 0 ] && grep -q 'initrd of BF' '$root/run/mk-upgrade/booted-initrd' && [ -e '$root/run/mk-upgrade/booted-initrd.no-secrets' ] &&
    grep -q 'live upgrades are refused until this is fixed' '$work/bi2.out'"
hook sw16 switch schedule "$work/gens/B"
: >"$work/shim.log"
hook run16 - run
check "... and the live upgrade is refused naming the way back, before any apply" bash -c "
    [ $rc = 1 ] && grep -q 'way back has no boot.initrd.secrets' '$work/run16.out' && [ ! -s '$work/shim.log' ]"

echo
total=$((passes + failures))
if [ "$failures" -eq 0 ]; then
    echo "nix/check: all $total checks passed (module system and NixOS options are stand-ins: NOT nixpkgs)"
else
    echo "nix/check: $failures of $total check(s) FAILED"
    exit 1
fi
