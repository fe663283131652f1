#!/usr/bin/env bash
# test-reboot-wrapper.sh: runs mk-upgrade-reboot.sh (kured's reboot command) and
# ../k8s/suc-upgrade.sh (the system-upgrade-controller step) against one EMULATED host on
# this machine. Neither kured nor the controller is run: this checks the wrapper's decisions
# (what it applies, its exit code, the sentinel, the fallback reboot, the /boot and NixOS
# layouts, and what a run after a luo kexec reports).
#
#   MK_BIN_DIR=target/debug deploy/kured/test-reboot-wrapper.sh
#
# Kernels: MK_TEST_KERNEL_A/B, else the newest ../shared/kernels/bzImage-*-mkA and -mkB
# beside the repository; their releases are read from their headers. A kexec is simulated
# by a stand-in mk-upgrade whose apply is followed by SIGKILL of the wrapper, as a kexec
# ends kured's pod; a kexec back (rolled back by itself) by `apply --inject health-fail`
# (builds with fault injection, as `cargo test` makes; without it a stand-in history record).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
wrapper=$here/mk-upgrade-reboot.sh
suc=$repo/deploy/k8s/suc-upgrade.sh
: "${MK_BIN_DIR:?set MK_BIN_DIR to the directory holding mk-upgrade, mk-agentd, mk-demo-kv}"
MK_BIN_DIR=$(cd "$MK_BIN_DIR" && pwd)
shared=${MK_SHARED_KERNELS:-$repo/../shared/kernels}
newest() { find "$shared" -maxdepth 1 -name "bzImage-*-$1" 2>/dev/null | sort -V | tail -n 1; }
kernel_a=${MK_TEST_KERNEL_A:-$(newest mkA)}
kernel_b=${MK_TEST_KERNEL_B:-$(newest mkB)}
for k in "$kernel_a" "$kernel_b"; do
    if [ -z "$k" ] || [ ! -r "$k" ]; then echo "test-reboot-wrapper: kernel '$k' missing (set MK_TEST_KERNEL_A/B)" >&2; exit 2; fi
done
# The release in a bzImage's setup header (as mk-upgrade reads it).
release_of() {
    python3 - "$1" <<'EOF'
import struct, sys
b = open(sys.argv[1], "rb").read(0x4000)
assert b[0x202:0x206] == b"HdrS", "not a bzImage"
p = 0x200 + struct.unpack_from("<H", b, 0x20E)[0]
print(b[p:p + 128].split(b"\0")[0].split(b" ")[0].decode())
EOF
}
rel_a=$(release_of "$kernel_a")
rel_b=$(release_of "$kernel_b")
[ "$rel_a" != "$rel_b" ] || { echo "test-reboot-wrapper: kernels A and B are both $rel_a" >&2; exit 2; }
export MK_AGENTD=$MK_BIN_DIR/mk-agentd
unset MK_STATE_DIR MK_PLATFORM MK_WORKLOADS MK_TRUSTED_KEYS SYSTEM_UPGRADE_PLAN_LATEST_VERSION
mk=$MK_BIN_DIR/mk-upgrade

work=$(mktemp -d "${TMPDIR:-/tmp}/mk-kured-test.XXXXXX")
state=$work/state
trap '"$mk" --state-dir "$state" --platform emulated emu down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

failures=0
checks=0
check() {
    local what=$1
    shift
    checks=$((checks + 1))
    if "$@"; then echo "  ok   $what"; else echo "  FAIL $what"; failures=$((failures + 1)); fi
}
running() {
    "$mk" --state-dir "$state" --platform emulated status --json |
        jq -r '[.instances[] | select(.state == "active") | .kernel_release] | join(",")'
}
history_count() { "$mk" --state-dir "$state" --platform emulated history --json | jq length; }
rollback_to_a() { # the host back on A (mk-upgrade rollback), for the next scenario
    "$mk" --state-dir "$state" --platform emulated rollback --json >/dev/null || true
    [ "$(running)" = "$rel_a" ] || { echo "setup: rollback to $rel_a failed (runs $(running))" >&2; exit 2; }
}
run_wrapper() { # run_wrapper ARGS... -> rc, output shown indented
    rc=0
    "$wrapper" --state-dir "$state" --platform emulated --mk-upgrade "$mk" \
        --sentinel "$work/reboot-required" --reboot-command "touch $work/rebooted" "$@" \
        >"$work/out" 2>&1 || rc=$?
    sed 's/^/      | /' "$work/out"
}
run_suc() { # run_suc ARGS... -> rc (suc-upgrade.sh, its sentinel in STATE)
    rc=0
    "$suc" --state-dir "$state" --platform emulated --mk-upgrade "$mk" \
        --reboot-command "touch $work/rebooted" "$@" >"$work/out" 2>&1 || rc=$?
    sed 's/^/      | /' "$work/out"
}
serves() {
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$port; printf 'PING\n' >&3; read -r -t 10 r <&3; [ \"\$r\" = PONG ]"
}

# One emulated host on kernel A with one kv workload; a boot dir holding A and B (signed
# into STATE/signatures/, as a host would receive them), plus B's initrd.
mkdir -p "$state/trusted-keys" "$state/signatures" "$work/boot" "$work/keys"
"$mk" keys generate --dir "$work/keys" --name release >/dev/null
"$mk" keys generate --dir "$work/keys" --name other >/dev/null
cp "$work/keys/release.pub" "$state/trusted-keys/"
cp "$kernel_a" "$work/boot/vmlinuz-$rel_a"
cp "$kernel_b" "$work/boot/vmlinuz-$rel_b"
: >"$work/boot/initrd.img-$rel_b"
"$mk" sign "$work/boot/vmlinuz-$rel_b" --key "$work/keys/release.key" --out "$state/signatures/vmlinuz-$rel_b.sig" >/dev/null
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
"$mk" --state-dir "$state" --platform emulated emu init --kernel "$work/boot/vmlinuz-$rel_a" >/dev/null
echo "setup: emulated host on $(running), kv on port $port; kernels $rel_a and $rel_b"

echo "== 1. pending kernel found in the boot dir, signature in STATE/signatures: live upgrade"
touch "$work/reboot-required"
run_wrapper --boot-dir "$work/boot"
check "exit 100 (upgraded without a reboot)" test "$rc" = 100
check "picked vmlinuz-$rel_b" grep -q "live upgrade to $work/boot/vmlinuz-$rel_b" "$work/out"
check "with its signature from STATE/signatures and its initrd" \
    grep -q -- "--signature $state/signatures/vmlinuz-$rel_b.sig --initrd $work/boot/initrd.img-$rel_b" "$work/out"
check "the host runs $rel_b" test "$(running)" = "$rel_b"
check "sentinel removed" test ! -e "$work/reboot-required"
check "record kept: result upgraded" test "$(jq -r .result "$state/kured/last-apply.json")" = upgraded
check "pending.json removed once apply returned" test ! -e "$state/kured/pending.json"
check "no reboot" test ! -e "$work/rebooted"

echo "== 2. the same again: the pending kernel already runs"
touch "$work/reboot-required"
run_wrapper --kernel "$work/boot/vmlinuz-$rel_b" --signature "$state/signatures/vmlinuz-$rel_b.sig"
check "exit 100 (nothing pending)" test "$rc" = 100
check "sentinel removed" test ! -e "$work/reboot-required"
touch "$work/reboot-required"
run_wrapper --boot-dir "$work/boot"
check "boot dir whose newest kernel runs: exit 100, sentinel removed" test "$rc" = 100 -a ! -e "$work/reboot-required"

echo "== 3. an image signed by an untrusted key, with --fallback-reboot: refused, never rebooted"
touch "$work/reboot-required"
"$mk" sign "$work/boot/vmlinuz-$rel_a" --key "$work/keys/other.key" >/dev/null
run_wrapper --kernel "$work/boot/vmlinuz-$rel_a" --fallback-reboot
check "exit 5 (untrusted)" test "$rc" = 5
check "sentinel kept (kured retries)" test -e "$work/reboot-required"
check "no reboot" test ! -e "$work/rebooted"
check "the host still runs $rel_b" test "$(running)" = "$rel_b"

echo "== 4. pre-flight failure (--platform luo, no /dev/liveupdate here)"
"$mk" sign "$work/boot/vmlinuz-$rel_a" --key "$work/keys/release.key" >/dev/null
rc=0
"$wrapper" --state-dir "$state" --platform luo --mk-upgrade "$mk" --sentinel "$work/reboot-required" \
    --reboot-command "touch $work/rebooted" --kernel "$work/boot/vmlinuz-$rel_a" >"$work/out" 2>&1 || rc=$?
sed 's/^/      | /' "$work/out"
check "without --fallback-reboot: exit 8, no reboot" test "$rc" = 8 -a ! -e "$work/rebooted"
rc=0
"$wrapper" --state-dir "$state" --platform luo --mk-upgrade "$mk" --sentinel "$work/reboot-required" \
    --reboot-command "touch $work/rebooted" --kernel "$work/boot/vmlinuz-$rel_a" --fallback-reboot >"$work/out" 2>&1 || rc=$?
sed 's/^/      | /' "$work/out"
check "with --fallback-reboot: the reboot command ran (exit 0 of the stand-in)" test "$rc" = 0 -a -e "$work/rebooted"
check "no pending.json left behind by a returning apply" test ! -e "$state/kured/pending.json"

echo "== 5. usage"
rm -f "$work/rebooted"
run_wrapper --kernel "$work/nope"
check "missing kernel: exit 64" test "$rc" = 64
mkdir -p "$work/empty-boot"
run_wrapper --boot-dir "$work/empty-boot"
check "no pending kernel in the boot dir: exit 64" test "$rc" = 64
check "the kv workload still serves" serves

echo "== 6. NixOS layout: the system profile's kernel against the booted generation's"
# A scratch store: two kernels, an initrd, two generations; the profile (as nix makes it,
# relative links) on the new one, /run/booted-system on the old one.
st=$work/nix/store
mkdir -p "$st/1b1b-linux-$rel_b" "$st/2b2b-initrd-linux-$rel_b" "$st/3b3b-nixos-system-host-b" \
    "$st/1a1a-linux-$rel_a" "$st/3a3a-nixos-system-host-a" "$work/nix/var/nix/profiles" "$work/run"
cp "$kernel_b" "$st/1b1b-linux-$rel_b/bzImage"
cp "$kernel_a" "$st/1a1a-linux-$rel_a/bzImage"
: >"$st/2b2b-initrd-linux-$rel_b/initrd"
ln -s "../1b1b-linux-$rel_b/bzImage" "$st/3b3b-nixos-system-host-b/kernel"
ln -s "../2b2b-initrd-linux-$rel_b/initrd" "$st/3b3b-nixos-system-host-b/initrd"
printf 'loglevel=4 liveupdate=on' >"$st/3b3b-nixos-system-host-b/kernel-params"
: >"$st/3b3b-nixos-system-host-b/init"
ln -s "../1a1a-linux-$rel_a/bzImage" "$st/3a3a-nixos-system-host-a/kernel"
printf 'loglevel=4' >"$st/3a3a-nixos-system-host-a/kernel-params"
ln -s ../../../store/3b3b-nixos-system-host-b "$work/nix/var/nix/profiles/system-2-link"
ln -s system-2-link "$work/nix/var/nix/profiles/system"
ln -s "$st/3a3a-nixos-system-host-a" "$work/run/booted-system"
"$mk" sign "$st/1b1b-linux-$rel_b/bzImage" --key "$work/keys/release.key" \
    --out "$state/signatures/1b1b-linux-$rel_b.sig" >/dev/null
nixos=(--system-profile "$work/nix/var/nix/profiles/system" --booted-system "$work/run/booted-system")
rollback_to_a
touch "$work/reboot-required"
run_wrapper "${nixos[@]}"
check "exit 100 (upgraded)" test "$rc" = 100
check "the profile's kernel, by its store path" grep -q -- "apply --kernel $st/1b1b-linux-$rel_b/bzImage " "$work/out"
check "its signature STATE/signatures/<store dir>.sig, its initrd" \
    grep -q -- "--signature $state/signatures/1b1b-linux-$rel_b.sig --initrd $st/2b2b-initrd-linux-$rel_b/initrd" "$work/out"
check "the command line: init=<generation>/init + kernel-params" \
    grep -q -- "--cmdline init=$st/3b3b-nixos-system-host-b/init loglevel=4 liveupdate=on\$" "$work/out"
check "the host runs $rel_b, sentinel removed" test "$(running)" = "$rel_b" -a ! -e "$work/reboot-required"
n=$(history_count)
ln -sfn "$st/3b3b-nixos-system-host-b" "$work/run/booted-system"
touch "$work/reboot-required"
run_wrapper "${nixos[@]}"
check "profile kernel = booted kernel: exit 100, nothing applied" \
    test "$rc" = 100 -a "$(history_count)" = "$n" -a ! -e "$work/reboot-required"
check "it says nothing is pending" grep -q "nothing pending" "$work/out"
ln -sfn "$st/3a3a-nixos-system-host-a" "$work/run/booted-system"
touch "$work/reboot-required"
run_wrapper "${nixos[@]}" --release 9.9.9-nope
check "--release other than the profile's kernel: exit 64, sentinel kept" test "$rc" = 64 -a -e "$work/reboot-required"

# A stand-in mk-upgrade: its apply (the real one, with MK_SHIM_INJECT as --inject) is
# followed by SIGKILL of its caller, as a luo kexec ends the script and kured's pod.
cat >"$work/mk-kexec" <<EOF
#!/usr/bin/env bash
case " \$* " in *" apply "*) ;; *) exec "$mk" "\$@" ;; esac
rc=0
"$mk" "\$@" \${MK_SHIM_INJECT:+--inject "\$MK_SHIM_INJECT"} || rc=\$?
echo "\$rc" >"$work/shim-apply-rc"
kill -KILL "\$PPID"
EOF
# A stand-in whose history adds the record in $work/stand-in-record.json, if present.
cat >"$work/mk-history" <<EOF
#!/usr/bin/env bash
case " \$* " in
*" history "*) if [ -f "$work/stand-in-record.json" ]; then
    "$mk" "\$@" | jq -c --slurpfile r "$work/stand-in-record.json" '. + \$r'; exit; fi ;;
esac
exec "$mk" "\$@"
EOF
chmod +x "$work/mk-kexec" "$work/mk-history"

echo "== 7. luo: the apply ends in a kexec (the script is killed), the next run reports it"
rollback_to_a
touch "$work/reboot-required"
run_wrapper --boot-dir "$work/boot" --mk-upgrade "$work/mk-kexec"
check "the first run never returns (killed: 137)" test "$rc" = 137
check "pending.json names the target $rel_b" test "$(jq -r .target_release "$state/kured/pending.json" 2>/dev/null)" = "$rel_b"
check "sentinel still there; the host now runs $rel_b" test -e "$work/reboot-required" -a "$(running)" = "$rel_b"
n=$(history_count)
run_wrapper --boot-dir "$work/boot"
check "the next run: exit 100" test "$rc" = 100
check "it says: upgraded by a kexec in a previous run" grep -q "upgraded by a kexec in a previous run" "$work/out"
check "sentinel and pending.json removed, nothing applied again" \
    test ! -e "$work/reboot-required" -a ! -e "$state/kured/pending.json" -a "$(history_count)" = "$n"

echo "== 8. luo: the kexec came back on the old kernel (rolled back by itself)"
rollback_to_a
touch "$work/reboot-required"
rm -f "$work/shim-apply-rc" "$work/stand-in-record.json"
MK_SHIM_INJECT=health-fail run_wrapper --boot-dir "$work/boot" --mk-upgrade "$work/mk-kexec"
if [ "$(cat "$work/shim-apply-rc" 2>/dev/null)" = 2 ]; then
    echo "  note: this mk-upgrade has no fault injection: the rolled-back record is a stand-in"
    jq -n --arg a "$rel_a" --arg b "$rel_b" --arg t "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        '{upgrade_id: "stand-in", kind: "apply", result: "rolled-back", kernel_before: $a,
          kernel_after: $b, started_at: $t, error: "stand-in record (no fault injection)"}' \
        >"$work/stand-in-record.json"
fi
check "the first run never returns (killed: 137), pending.json names $rel_b" \
    test "$rc" = 137 -a "$(jq -r .target_release "$state/kured/pending.json" 2>/dev/null)" = "$rel_b"
check "the host runs the old kernel $rel_a" test "$(running)" = "$rel_a"
n=$(history_count)
run_wrapper --boot-dir "$work/boot" --mk-upgrade "$work/mk-history"
check "the next run: exit 10 (rolled back)" test "$rc" = 10
check "it reports the history record" grep -q "rolled back by itself: upgrade .*-> $rel_b, result rolled-back" "$work/out"
check "sentinel kept, pending.json removed, nothing applied" \
    test -e "$work/reboot-required" -a ! -e "$state/kured/pending.json" -a "$(history_count)" = "$n"
rm -f "$work/stand-in-record.json"
run_wrapper --boot-dir "$work/boot"
check "kured's next period retries: exit 100, the host runs $rel_b" test "$rc" = 100 -a "$(running)" = "$rel_b"

echo "== 9. system-upgrade-controller step (deploy/k8s/suc-upgrade.sh): exit 100 becomes 0"
n=$(history_count)
run_suc --release "$rel_b" --boot-dir "$work/boot"
check "the Plan's version already runs: exit 0, nothing applied" test "$rc" = 0 -a "$(history_count)" = "$n"
rollback_to_a
SYSTEM_UPGRADE_PLAN_LATEST_VERSION=$rel_b run_suc --boot-dir "$work/boot"
check "version from SYSTEM_UPGRADE_PLAN_LATEST_VERSION: exit 0, the host runs $rel_b" test "$rc" = 0 -a "$(running)" = "$rel_b"
rollback_to_a
run_suc --release "$rel_b" --boot-dir "$work/boot" --mk-upgrade "$work/mk-kexec"
check "luo: the job's pod dies with the kexec (137)" test "$rc" = 137
run_suc --release "$rel_b" --boot-dir "$work/boot"
check "the re-run job sees $rel_b current: exit 0" test "$rc" = 0 -a ! -e "$state/kured/pending.json"
run_suc --release 9.9.9-nope --boot-dir "$work/boot"
check "a release with no kernel: exit 64 (the job fails and is retried)" test "$rc" = 64
run_suc --boot-dir "$work/boot"
check "no version at all: exit 64" test "$rc" = 64
check "no reboot" test ! -e "$work/rebooted"
check "the kv workload still serves" serves

echo
if [ "$failures" -eq 0 ]; then
    echo "test-reboot-wrapper: all $checks checks passed"
    echo "$checks passed, 0 failed"
else
    echo "test-reboot-wrapper: $failures of $checks check(s) FAILED"
    echo "$((checks - failures)) passed, $failures failed"
    exit 1
fi
