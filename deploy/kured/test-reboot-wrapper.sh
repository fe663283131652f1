#!/usr/bin/env bash
# test-reboot-wrapper.sh: runs mk-upgrade-reboot.sh (kured's reboot command) against one
# EMULATED host on this machine. kured itself is not run: this checks the wrapper's
# decisions (what it applies, its exit code, the sentinel, the fallback reboot).
#
#   MK_BIN_DIR=target/debug deploy/kured/test-reboot-wrapper.sh
#
# Kernels: MK_TEST_KERNEL_A/B, else ../shared/kernels beside the repository.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
wrapper=$here/mk-upgrade-reboot.sh
: "${MK_BIN_DIR:?set MK_BIN_DIR to the directory holding mk-upgrade, mk-agentd, mk-demo-kv}"
MK_BIN_DIR=$(cd "$MK_BIN_DIR" && pwd)
shared=${MK_SHARED_KERNELS:-$repo/../shared/kernels}
kernel_a=${MK_TEST_KERNEL_A:-$shared/bzImage-7.2.13-mkA}
kernel_b=${MK_TEST_KERNEL_B:-$shared/bzImage-7.2.13-mkB}
for k in "$kernel_a" "$kernel_b"; do
    [ -r "$k" ] || { echo "test-reboot-wrapper: kernel $k missing (set MK_TEST_KERNEL_A/B)" >&2; exit 2; }
done
export MK_AGENTD=$MK_BIN_DIR/mk-agentd
unset MK_STATE_DIR MK_PLATFORM MK_WORKLOADS MK_TRUSTED_KEYS
mk=$MK_BIN_DIR/mk-upgrade

work=$(mktemp -d "${TMPDIR:-/tmp}/mk-kured-test.XXXXXX")
state=$work/state
trap '"$mk" --state-dir "$state" --platform emulated emu down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

failures=0
check() {
    local what=$1
    shift
    if "$@"; then echo "  ok   $what"; else echo "  FAIL $what"; failures=$((failures + 1)); fi
}
running() {
    "$mk" --state-dir "$state" --platform emulated status --json |
        jq -r '[.instances[] | select(.state == "active") | .kernel_release] | join(",")'
}
run_wrapper() { # run_wrapper ARGS... -> rc, output shown indented
    rc=0
    "$wrapper" --state-dir "$state" --platform emulated --mk-upgrade "$mk" \
        --sentinel "$work/reboot-required" --reboot-command "touch $work/rebooted" "$@" \
        >"$work/out" 2>&1 || rc=$?
    sed 's/^/      | /' "$work/out"
}

# One emulated host on kernel A with one kv workload; a boot dir holding A and B (signed
# into STATE/signatures/, as a host would receive them), plus B's initrd.
mkdir -p "$state/trusted-keys" "$state/signatures" "$work/boot" "$work/keys"
"$mk" keys generate --dir "$work/keys" --name release >/dev/null
"$mk" keys generate --dir "$work/keys" --name other >/dev/null
cp "$work/keys/release.pub" "$state/trusted-keys/"
cp "$kernel_a" "$work/boot/vmlinuz-7.2.13-mkA"
cp "$kernel_b" "$work/boot/vmlinuz-7.2.13-mkB"
: >"$work/boot/initrd.img-7.2.13-mkB"
"$mk" sign "$work/boot/vmlinuz-7.2.13-mkB" --key "$work/keys/release.key" --out "$state/signatures/vmlinuz-7.2.13-mkB.sig" >/dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$state/workloads.toml" <<EOF
[[workload]]
name = "kv"
exec = "$MK_BIN_DIR/mk-demo-kv"
args = ["--capacity", "2MiB"]
[[workload.memfd]]
name = "kv-data"
[[workload.listen]]
name = "listen"
addr = "127.0.0.1:$port"
[workload.health]
kind = "http"
addr = "127.0.0.1:$port"
timeout_ms = 5000
EOF
"$mk" --state-dir "$state" --platform emulated emu init --kernel "$work/boot/vmlinuz-7.2.13-mkA" >/dev/null
echo "setup: emulated host on $(running), kv on port $port"

echo "== 1. pending kernel found in the boot dir, signature in STATE/signatures: live upgrade"
touch "$work/reboot-required"
run_wrapper --boot-dir "$work/boot"
check "exit 100 (upgraded without a reboot)" test "$rc" = 100
check "picked vmlinuz-7.2.13-mkB" grep -q "live upgrade to $work/boot/vmlinuz-7.2.13-mkB" "$work/out"
check "with its signature from STATE/signatures and its initrd" \
    grep -q -- "--signature $state/signatures/vmlinuz-7.2.13-mkB.sig --initrd $work/boot/initrd.img-7.2.13-mkB" "$work/out"
check "the host runs 7.2.13-mkB" test "$(running)" = 7.2.13-mkB
check "sentinel removed" test ! -e "$work/reboot-required"
check "record kept: result upgraded" test "$(jq -r .result "$state/kured/last-apply.json")" = upgraded
check "no reboot" test ! -e "$work/rebooted"

echo "== 2. the same again: the pending kernel already runs"
touch "$work/reboot-required"
run_wrapper --kernel "$work/boot/vmlinuz-7.2.13-mkB" --signature "$state/signatures/vmlinuz-7.2.13-mkB.sig"
check "exit 100 (nothing pending)" test "$rc" = 100
check "sentinel removed" test ! -e "$work/reboot-required"

echo "== 3. an image signed by an untrusted key, with --fallback-reboot: refused, never rebooted"
touch "$work/reboot-required"
"$mk" sign "$work/boot/vmlinuz-7.2.13-mkA" --key "$work/keys/other.key" >/dev/null
run_wrapper --kernel "$work/boot/vmlinuz-7.2.13-mkA" --fallback-reboot
check "exit 5 (untrusted)" test "$rc" = 5
check "sentinel kept (kured retries)" test -e "$work/reboot-required"
check "no reboot" test ! -e "$work/rebooted"
check "the host still runs 7.2.13-mkB" test "$(running)" = 7.2.13-mkB

echo "== 4. pre-flight failure (--platform luo, no /dev/liveupdate here)"
"$mk" sign "$work/boot/vmlinuz-7.2.13-mkA" --key "$work/keys/release.key" >/dev/null
rc=0
"$wrapper" --state-dir "$state" --platform luo --mk-upgrade "$mk" --sentinel "$work/reboot-required" \
    --reboot-command "touch $work/rebooted" --kernel "$work/boot/vmlinuz-7.2.13-mkA" >"$work/out" 2>&1 || rc=$?
sed 's/^/      | /' "$work/out"
check "without --fallback-reboot: exit 8, no reboot" test "$rc" = 8 -a ! -e "$work/rebooted"
rc=0
"$wrapper" --state-dir "$state" --platform luo --mk-upgrade "$mk" --sentinel "$work/reboot-required" \
    --reboot-command "touch $work/rebooted" --kernel "$work/boot/vmlinuz-7.2.13-mkA" --fallback-reboot >"$work/out" 2>&1 || rc=$?
sed 's/^/      | /' "$work/out"
check "with --fallback-reboot: the reboot command ran (exit 0 of the stand-in)" test "$rc" = 0 -a -e "$work/rebooted"

echo "== 5. usage"
rm -f "$work/rebooted"
run_wrapper --kernel "$work/nope"
check "missing kernel: exit 64" test "$rc" = 64
mkdir -p "$work/empty-boot"
run_wrapper --boot-dir "$work/empty-boot"
check "no pending kernel in the boot dir: exit 64" test "$rc" = 64
check "the kv workload still serves" \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$port; printf 'PING\n' >&3; read -r -t 10 r <&3; [ \"\$r\" = PONG ]"

echo
if [ "$failures" -eq 0 ]; then
    echo "test-reboot-wrapper: all checks passed"
else
    echo "test-reboot-wrapper: $failures check(s) FAILED"
    exit 1
fi
