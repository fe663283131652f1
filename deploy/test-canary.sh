#!/usr/bin/env bash
# test-canary.sh: runs deploy/canary.sh against three EMULATED hosts on this machine and
# checks what it did.
#
#   MK_BIN_DIR=target/debug deploy/test-canary.sh
#
# Each "host" is an mk-upgrade state directory with its own emulated machine
# (`mk-upgrade emu init`), a trusted release key and one mk-demo-kv workload on a free
# loopback port with an http health check (as in tests/src/lib.rs). Kernels: the prebuilt
# bzImages 7.2.13-mkA and 7.2.13-mkB from MK_TEST_KERNEL_A/MK_TEST_KERNEL_B, else
# ../shared/kernels beside the repository.
#
# Scenarios:
#   1. canary + a parallel wave of 2, local transport: every host ends upgraded to mkB,
#      each workload still serves the value written before;
#   2. host 2 trusts another key: the rollout (--batch 1) stops at host 2 (exit 5,
#      refused), host 1 is on mkA, host 3 untouched (still mkB, no new history entry);
#   3. host 2 fixed, same command again: host 1 counts as current (exit 14), 2 and 3 upgrade;
#   4. the ssh transport with --push, through a stand-in ssh that runs the command
#      locally (quoting of a push dir with a space in it), all three back to mkB;
#   5. usage errors exit 2.
# Needs root or a delegated cgroup v2 for freezing (else the emulator uses SIGSTOP), jq,
# python3 (to pick free ports). Exit 0 when every check passed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
canary=$here/canary.sh

: "${MK_BIN_DIR:?set MK_BIN_DIR to the directory holding mk-upgrade, mk-agentd, mk-demo-kv}"
MK_BIN_DIR=$(cd "$MK_BIN_DIR" && pwd)
for b in mk-upgrade mk-agentd mk-demo-kv; do
    [ -x "$MK_BIN_DIR/$b" ] || { echo "test-canary: $MK_BIN_DIR/$b missing (cargo build -p upgrade-agent --bins)" >&2; exit 2; }
done
command -v jq >/dev/null || { echo "test-canary: jq missing (apt-get install jq)" >&2; exit 2; }
shared=${MK_SHARED_KERNELS:-$repo/../shared/kernels}
kernel_a=${MK_TEST_KERNEL_A:-$shared/bzImage-7.2.13-mkA}
kernel_b=${MK_TEST_KERNEL_B:-$shared/bzImage-7.2.13-mkB}
for k in "$kernel_a" "$kernel_b"; do
    [ -r "$k" ] || { echo "test-canary: kernel $k missing (set MK_TEST_KERNEL_A/B)" >&2; exit 2; }
done

export MK_AGENTD=$MK_BIN_DIR/mk-agentd
unset MK_STATE_DIR MK_PLATFORM MK_WORKLOADS MK_TRUSTED_KEYS
mk=$MK_BIN_DIR/mk-upgrade

work=$(mktemp -d "${TMPDIR:-/tmp}/mk-canary-test.XXXXXX")
hosts=(host-1 host-2 host-3)

failures=0
check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then
        echo "  ok   $what"
    else
        echo "  FAIL $what"
        failures=$((failures + 1))
    fi
}

cleanup() {
    for h in "${hosts[@]}"; do
        if [ -d "$work/hosts/$h" ]; then
            "$mk" --state-dir "$work/hosts/$h" --platform emulated emu down >/dev/null 2>&1 || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

# --- setup --------------------------------------------------------------------------------
mkdir -p "$work/hosts" "$work/img" "$work/keys"
cp "$kernel_a" "$work/img/bzImage-A"
cp "$kernel_b" "$work/img/bzImage-B"
"$mk" keys generate --dir "$work/keys" --name release >/dev/null
"$mk" keys generate --dir "$work/keys" --name other >/dev/null
"$mk" sign "$work/img/bzImage-A" --key "$work/keys/release.key" >/dev/null
"$mk" sign "$work/img/bzImage-B" --key "$work/keys/release.key" >/dev/null

read -r -a ports <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"

printf '%s\n' "# three emulated hosts" "${hosts[@]}" >"$work/hosts.txt"

kv() { # kv PORT LINE -> reply line
    local reply
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf '%s\n' "$2" >&3
    IFS= read -r -t 10 reply <&3 || reply="(no reply)"
    exec 3>&-
    printf '%s' "$reply"
}

state_of() { # state_of HOST -> "kernel_release of the active instance"
    "$mk" --state-dir "$work/hosts/$1" --platform emulated status --json |
        jq -r '[.instances[] | select(.state == "active") | .kernel_release] | join(",")'
}

history_len() {
    "$mk" --state-dir "$work/hosts/$1" --platform emulated history --json | jq 'length'
}

for n in 0 1 2; do
    h=${hosts[$n]}
    d=$work/hosts/$h
    mkdir -p "$d/trusted-keys"
    cp "$work/keys/release.pub" "$d/trusted-keys/"
    cat >"$d/workloads.toml" <<EOF
[[workload]]
name = "kv-$h"
exec = "$MK_BIN_DIR/mk-demo-kv"
args = ["--capacity", "2MiB"]
[[workload.memfd]]
name = "kv-data"
[[workload.listen]]
name = "listen"
addr = "127.0.0.1:${ports[$n]}"
[workload.health]
kind = "http"
addr = "127.0.0.1:${ports[$n]}"
timeout_ms = 5000
EOF
    "$mk" --state-dir "$d" --platform emulated emu init --kernel "$work/img/bzImage-A" >/dev/null
    reply=$(kv "${ports[$n]}" "SET before-$h value-$h")
    case "$reply" in OK*) ;; *) echo "test-canary: SET on $h answered '$reply'" >&2; exit 1 ;; esac
done
echo "setup: 3 emulated hosts on 7.2.13-mkA, ports ${ports[*]}, work dir $work"

run_canary() { # run_canary LOGNAME ARGS... ; sets rc, prints the output
    local name=$1
    shift
    rc=0
    "$canary" "$@" >"$work/$name.out" 2>"$work/$name.err" || rc=$?
    echo "--- canary output (exit $rc): stderr, then stdout ---"
    cat "$work/$name.err" "$work/$name.out"
    echo "---"
}

# --- 1. everything upgrades ---------------------------------------------------------------
echo
echo "== 1. canary + wave of 2 (parallel), local EMULATED hosts, kernel mkB"
run_canary run1 --hosts "$work/hosts.txt" --kernel "$work/img/bzImage-B" --batch 2 \
    --local-state-dir-prefix "$work/hosts" --log-dir "$work/log1" --summary-json "$work/run1.json"
check "exit 0" test "$rc" = 0
check "summary: complete, 3 upgraded" test "$(jq -c '[.complete, ([.hosts[] | select(.outcome == "upgraded")] | length)]' "$work/run1.json")" = '[true,3]'
check "waves: host-1 alone, then host-2 and host-3" test "$(jq -c '[.hosts[].wave]' "$work/run1.json")" = '[1,2,2]'
check "every host reported EMULATED" test "$(jq '[.hosts[] | select(.emulated)] | length' "$work/run1.json")" = 3
for n in 0 1 2; do
    h=${hosts[$n]}
    check "$h runs 7.2.13-mkB" test "$(state_of "$h")" = 7.2.13-mkB
    check "$h still serves its value" test "$(kv "${ports[$n]}" "GET before-$h")" = "VALUE value-$h"
done

# --- 2. host 2 refuses: the rollout stops there --------------------------------------------
echo
echo "== 2. host-2 trusts only another key; --batch 1; kernel mkA"
rm "$work/hosts/host-2/trusted-keys/release.pub"
cp "$work/keys/other.pub" "$work/hosts/host-2/trusted-keys/"
h3_history=$(history_len host-3)
run_canary run2 --hosts "$work/hosts.txt" --kernel "$work/img/bzImage-A" --batch 1 \
    --local-state-dir-prefix "$work/hosts" --log-dir "$work/log2" --summary-json "$work/run2.json"
check "exit 1 (stopped)" test "$rc" = 1
check "stopped at host-2" test "$(jq -r '.stopped_at' "$work/run2.json")" = host-2
check "host-1 upgraded" test "$(jq -r '.hosts[0].outcome' "$work/run2.json")" = upgraded
check "host-2: exit 5, result refused" test "$(jq -c '[.hosts[1].exit, .hosts[1].result]' "$work/run2.json")" = '[5,"refused"]'
check "host-3 not started" test "$(jq -c '.not_started' "$work/run2.json")" = '["host-3"]'
check "output says ROLLOUT STOPPED at host-2" grep -q "ROLLOUT STOPPED at host-2" "$work/run2.out"
check "host-1 runs 7.2.13-mkA" test "$(state_of host-1)" = 7.2.13-mkA
check "host-2 still runs 7.2.13-mkB" test "$(state_of host-2)" = 7.2.13-mkB
check "host-3 untouched: still 7.2.13-mkB" test "$(state_of host-3)" = 7.2.13-mkB
check "host-3 untouched: no new history entry" test "$(history_len host-3)" = "$h3_history"
check "host-2 still serves its value" test "$(kv "${ports[1]}" "GET before-host-2")" = "VALUE value-host-2"

# --- 3. fixed host 2, same command: resumes ------------------------------------------------
echo
echo "== 3. host-2 fixed; the same rollout again"
rm "$work/hosts/host-2/trusted-keys/other.pub"
cp "$work/keys/release.pub" "$work/hosts/host-2/trusted-keys/"
run_canary run3 --hosts "$work/hosts.txt" --kernel "$work/img/bzImage-A" --batch 1 \
    --local-state-dir-prefix "$work/hosts" --log-dir "$work/log3" --summary-json "$work/run3.json"
check "exit 0" test "$rc" = 0
check "host-1 current (exit 14), host-2 and host-3 upgraded" \
    test "$(jq -c '[.hosts[] | [.exit, .outcome]]' "$work/run3.json")" = '[[14,"current"],[0,"upgraded"],[0,"upgraded"]]'
for n in 0 1 2; do
    check "${hosts[$n]} runs 7.2.13-mkA" test "$(state_of "${hosts[$n]}")" = 7.2.13-mkA
done

# --- 4. the ssh transport, with --push -----------------------------------------------------
echo
echo "== 4. --ssh (a stand-in that runs the remote command locally) with --push to a dir with a space"
cat >"$work/fake-ssh" <<EOF
#!/usr/bin/env bash
# stand-in for ssh: \$1 is the host, \$2 the remote command line (run by sh, as sshd does)
host=\$1; shift
if [ ! -d "$work/hosts/\$host" ]; then
    echo "ssh: Could not resolve hostname \$host: Name or service not known" >&2
    exit 255
fi
export MK_STATE_DIR="$work/hosts/\$host" MK_PLATFORM=emulated PATH="$MK_BIN_DIR:\$PATH"
exec sh -c "\$*"
EOF
chmod +x "$work/fake-ssh"
run_canary run4 --hosts "$work/hosts.txt" --kernel "$work/img/bzImage-B" --batch 3 \
    --ssh "$work/fake-ssh" --push "$work/in coming" --log-dir "$work/log4" --summary-json "$work/run4.json"
check "exit 0" test "$rc" = 0
check "image and signature pushed" test -f "$work/in coming/bzImage-B" -a -f "$work/in coming/bzImage-B.sig"
check "pushed image identical" cmp -s "$work/in coming/bzImage-B" "$work/img/bzImage-B"
for n in 0 1 2; do
    check "${hosts[$n]} runs 7.2.13-mkB" test "$(state_of "${hosts[$n]}")" = 7.2.13-mkB
    check "${hosts[$n]} still serves its value" test "$(kv "${ports[$n]}" "GET before-${hosts[$n]}")" = "VALUE value-${hosts[$n]}"
done

echo
echo "== 4b. an unreachable host stops the rollout"
printf '%s\n' host-1 no-such-host host-3 >"$work/hosts-bad.txt"
run_canary run4b --hosts "$work/hosts-bad.txt" --kernel "$work/img/bzImage-A" --batch 1 \
    --ssh "$work/fake-ssh" --push "$work/in coming" --log-dir "$work/log4b" --summary-json "$work/run4b.json"
check "exit 1" test "$rc" = 1
check "no-such-host: exit 255, unreachable" test "$(jq -c '[.hosts[1].exit, .hosts[1].result]' "$work/run4b.json")" = '[255,"unreachable"]'
check "host-3 not started" test "$(jq -c '.not_started' "$work/run4b.json")" = '["host-3"]'
check "host-3 untouched: still 7.2.13-mkB" test "$(state_of host-3)" = 7.2.13-mkB

# --- 5. usage ------------------------------------------------------------------------------
echo
echo "== 5. usage errors"
rc=0; "$canary" --hosts "$work/hosts.txt" >/dev/null 2>&1 || rc=$?
check "no --kernel: exit 2" test "$rc" = 2
rc=0; "$canary" --hosts "$work/nope" --kernel "$work/img/bzImage-B" >/dev/null 2>&1 || rc=$?
check "missing hosts file: exit 2" test "$rc" = 2
rc=0; "$canary" --hosts "$work/hosts.txt" --kernel "$work/img/bzImage-B" --batch 0 >/dev/null 2>&1 || rc=$?
check "--batch 0: exit 2" test "$rc" = 2

echo
if [ "$failures" -eq 0 ]; then
    echo "test-canary: all checks passed"
else
    echo "test-canary: $failures check(s) FAILED"
    exit 1
fi
