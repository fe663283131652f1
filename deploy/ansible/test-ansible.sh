#!/usr/bin/env bash
# test-ansible.sh: runs the mk_upgrade role (site.yml) with ansible-core from PyPI against
# THREE emulated hosts on this machine (`ansible_connection=local`, one state dir each, each
# with its own mk-demo-kv workload). No kernel boots: the hosts are EMULATED.
#
#   MK_BIN_DIR=target/debug deploy/ansible/test-ansible.sh
#
# MK_BIN_DIR: mk-upgrade, mk-agentd, mk-demo-kv (default: target/debug of the repository).
# Kernels: MK_TEST_KERNEL_A/B, else the bzImage-*-mkA/-mkB pair in ../shared/kernels beside
# the repository. ansible-core goes into MK_ANSIBLE_VENV (default /opt/ansible-venv, reused
# when it holds the pinned version). Exit 0 all checks passed, 1 some failed, 2 setup
# failed, 77 ansible-core could not be installed (prints "SKIP ansible: ...").
# MK_KEEP_WORK=1 keeps the work directory (logs, inventories) for a look afterwards.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
started=$(date +%s)

die() { echo "test-ansible: $*" >&2; exit 2; }

# --- ansible-core from PyPI, in a venv ------------------------------------------------------
venv=${MK_ANSIBLE_VENV:-/opt/ansible-venv}
pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "python3 not found"
case $pyver in
    3.10) core_default=2.17.14 ;; # the last series for a 3.10 controller
    3.1[1-3]) core_default=2.19.14 ;;
    3.[0-9]) echo "SKIP ansible: python $pyver is too old for ansible-core (3.10+)"; exit 77 ;;
    *) core_default=2.19.14 ;;
esac
core=${MK_ANSIBLE_CORE_VERSION:-$core_default}
have=$("$venv/bin/python3" -c 'import ansible.release as r; print(r.__version__)' 2>/dev/null || true)
if [ "$have" != "$core" ]; then
    echo "setup: installing ansible-core==$core into $venv (python $pyver)"
    if ! { [ -x "$venv/bin/python3" ] || python3 -m venv "$venv"; } >"${TMPDIR:-/tmp}/ansible-venv.log" 2>&1 ||
        ! "$venv/bin/pip" install -q "ansible-core==$core" >>"${TMPDIR:-/tmp}/ansible-venv.log" 2>&1; then
        echo "SKIP ansible: pip install ansible-core==$core into $venv failed: $(tail -n 1 "${TMPDIR:-/tmp}/ansible-venv.log")"
        exit 77
    fi
fi
playbook=$venv/bin/ansible-playbook
[ -x "$playbook" ] || { echo "SKIP ansible: $playbook missing after install"; exit 77; }
version=$("$playbook" --version 2>&1) || { echo "SKIP ansible: $playbook --version fails: $version"; exit 77; }
echo "setup: ${version%%$'\n'*}, python $pyver"

# --- binaries, kernels ----------------------------------------------------------------------
MK_BIN_DIR=${MK_BIN_DIR:-$repo/target/debug}
MK_BIN_DIR=$(cd "$MK_BIN_DIR" 2>/dev/null && pwd) || die "MK_BIN_DIR ($MK_BIN_DIR) missing: build the binaries or set MK_BIN_DIR"
for b in mk-upgrade mk-agentd mk-demo-kv; do
    [ -x "$MK_BIN_DIR/$b" ] || die "$MK_BIN_DIR/$b missing"
done
export MK_AGENTD=$MK_BIN_DIR/mk-agentd
unset MK_STATE_DIR MK_PLATFORM MK_WORKLOADS MK_TRUSTED_KEYS RUST_LOG
mk=$MK_BIN_DIR/mk-upgrade
command -v jq >/dev/null || die "jq is needed"

shared=${MK_SHARED_KERNELS:-$repo/../shared/kernels}
kernel_a=${MK_TEST_KERNEL_A:-$(ls "$shared"/bzImage-*-mkA 2>/dev/null | sort -V | tail -n 1)}
kernel_b=${MK_TEST_KERNEL_B:-$(ls "$shared"/bzImage-*-mkB 2>/dev/null | sort -V | tail -n 1)}
for k in "$kernel_a" "$kernel_b"; do
    [ -n "$k" ] && [ -r "$k" ] || die "kernel ${k:-bzImage-*-mkA/B} missing (set MK_TEST_KERNEL_A/B or MK_SHARED_KERNELS)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/mk-ansible-test.XXXXXX")
hosts=(h1 h2 h3)
down_all() {
    for h in "${hosts[@]}"; do
        [ -d "$work/$h/state" ] && "$mk" --state-dir "$work/$h/state" --platform emulated emu down >/dev/null 2>&1
    done
    return 0
}
cleanup() {
    down_all
    if [ "${MK_KEEP_WORK:-0}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0
failed=0
check() {
    local what=$1
    shift
    if "$@"; then
        echo "  ok   $what"
        passed=$((passed + 1))
    else
        echo "  FAIL $what"
        failed=$((failed + 1))
    fi
}

mkdir -p "$work/kernels" "$work/keys" "$work/ansible-tmp" "$work/async"
cp "$kernel_a" "$kernel_b" "$work/kernels/" || die "copying the kernels"
chmod 0644 "$work/kernels"/*
kernel_a=$work/kernels/$(basename "$kernel_a")
kernel_b=$work/kernels/$(basename "$kernel_b")
release_of() { python3 "$here/roles/mk_upgrade/files/kernel-release.py" "$1"; }
rel_a=$(release_of "$kernel_a") || die "cannot read the release of $kernel_a"
rel_b=$(release_of "$kernel_b") || die "cannot read the release of $kernel_b"
"$mk" keys generate --dir "$work/keys" --name release >"$work/keys/release.out" || die "keys generate"
"$mk" keys generate --dir "$work/keys" --name other >/dev/null || die "keys generate"
release_key_id=$(awk '/^key id:/ {print $3}' "$work/keys/release.out")
"$mk" sign "$kernel_b" --key "$work/keys/release.key" >/dev/null || die "sign $kernel_b"

# Three hosts on kernel A, one kv workload each on its own loopback port.
read -r -a ports < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
declare -A port
for i in 0 1 2; do
    h=${hosts[$i]}
    port[$h]=${ports[$i]}
    st=$work/$h/state
    mkdir -p "$st/trusted-keys"
    cp "$work/keys/release.pub" "$st/trusted-keys/"
    cat >"$st/workloads.toml" <<EOF
[[workload]]
name = "kv-$h"
exec = "$MK_BIN_DIR/mk-demo-kv"
args = ["--capacity", "2MiB"]
[[workload.memfd]]
name = "kv-data"
[[workload.listen]]
name = "listen"
addr = "127.0.0.1:${port[$h]}"
[workload.health]
kind = "http"
addr = "127.0.0.1:${port[$h]}"
timeout_ms = 5000
EOF
    "$mk" --state-dir "$st" --platform emulated emu init --kernel "$kernel_a" >"$work/$h/init.out" 2>&1 ||
        die "emu init $h: $(cat "$work/$h/init.out")"
done

kv() { # kv HOST LINE -> the reply line (retried while a workload moves)
    local p=${port[$1]} n reply
    for n in $(seq 1 50); do
        if exec 3<>"/dev/tcp/127.0.0.1/$p" 2>/dev/null; then
            printf '%s\n' "$2" >&3
            reply=
            read -r -t 10 reply <&3
            exec 3<&- 3>&-
            printf '%s\n' "${reply%$'\r'}"
            return 0
        fi
        sleep 0.1
    done
    return 1
}
for h in "${hosts[@]}"; do
    [ "$(kv "$h" "SET k v-$h")" = "OK 1" ] || die "SET on $h failed"
done
status() { "$mk" --state-dir "$work/$1/state" --platform emulated status --json; }
running() { status "$1" | jq -r '[.instances[] | select(.state == "active") | .kernel_release] | join(",")'; }
history_len() { "$mk" --state-dir "$work/$1/state" --platform emulated history --json | jq length; }
serves() { [ "$(kv "$1" "GET k")" = "VALUE v-$1" ]; }
all_on() { # all_on RELEASE HOSTS...
    local r=$1 h
    shift
    for h in "$@"; do [ "$(running "$h")" = "$r" ] || { echo "      $h runs $(running "$h")"; return 1; }; done
}
all_serve() { local h; for h in "$@"; do serves "$h" || { echo "      $h: GET k -> $(kv "$h" "GET k")"; return 1; }; done; }
echo "setup: ${hosts[*]} on $rel_a (EMULATED), kv on ports ${ports[*]}; target $rel_b signed by key $release_key_id"

# A stand-in for mk-upgrade on a luo host: `apply` goes on in the background while a
# "kexec" takes the client: the host's boot id changes, and the client and its Ansible job
# (the module and async_wrapper's job process, by their pids) die without a word, leaving
# the job's results file at "started" for ever, as after a real kexec.
mkdir -p "$work/luo-sim"
cat /proc/sys/kernel/random/uuid >"$work/h1/boot_id"
cat >"$work/luo-sim/mk-upgrade" <<EOF
#!/usr/bin/env bash
for a in "\$@"; do
    if [ "\$a" = apply ]; then
        setsid "$mk" "\$@" >"$work/luo-sim/apply.out" 2>&1 </dev/null &
        sleep 0.2
        cat /proc/sys/kernel/random/uuid >"$work/h1/boot_id"
        module=\$PPID
        job=\$(ps -o ppid= -p "\$module" | tr -d ' ')
        ps -o pid=,args= -p "\$module,\$job" >"$work/luo-sim/killed"
        grep -q async_wrapper "$work/luo-sim/killed" || job=
        kill -KILL "\$module" \$job "\$\$"
    fi
done
exec "$mk" "\$@"
EOF
chmod +x "$work/luo-sim/mk-upgrade"

# --- ansible --------------------------------------------------------------------------------
cat >"$work/ansible.cfg" <<EOF
[defaults]
nocolor = true
retry_files_enabled = false
host_key_checking = false
local_tmp = $work/ansible-tmp
remote_tmp = $work/ansible-remote-tmp
interpreter_python = $venv/bin/python3
forks = 10
EOF
export ANSIBLE_CONFIG=$work/ansible.cfg ANSIBLE_ASYNC_DIR=$work/async ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0

inventory() { # inventory FILE [HOST=VAR=VALUE]...: the three hosts, overrides per host
    local f=$1 h
    shift
    {
        echo "mk_upgrade:"
        echo "  hosts:"
        for h in "${hosts[@]}"; do
            echo "    $h:"
            echo "      mk_upgrade_state_dir: \"$work/$h/state\""
            local o
            for o in "$@"; do
                [ "${o%%=*}" = "$h" ] && { o=${o#*=}; echo "      ${o%%=*}: \"${o#*=}\""; }
            done
        done
        cat <<EOF
  vars:
    ansible_connection: local
    ansible_python_interpreter: "$venv/bin/python3"
    mk_upgrade_become: false
    mk_upgrade_platform: emulated
    mk_upgrade_copy: false
    mk_upgrade_bin: "$mk"
    mk_upgrade_poll_interval: 1
    mk_upgrade_record_grace: 10
    mk_upgrade_host_timeout: 120
    mk_upgrade_environment:
      MK_AGENTD: "$MK_AGENTD"
EOF
    } >"$f"
}
play() { # play NAME INVENTORY [ARGS...]: runs site.yml, output in $work/NAME.log, rc in $rc
    local name=$1 inv=$2 t0
    shift 2
    t0=$(date +%s%N)
    rc=0
    "$playbook" -i "$inv" "$here/site.yml" -e "mk_upgrade_kernel=$kernel_b" "$@" >"$work/$name.log" 2>&1 || rc=$?
    log=$work/$name.log
    play_ms=$((($(date +%s%N) - t0) / 1000000))
    echo "  (ansible-playbook $name: exit $rc in $play_ms ms)"
}
show_log() { sed 's/^/      | /' "$log"; }
batches() { grep -oE '"mk_upgrade batch: [^"]*"' "$log" | sed -E 's/"mk_upgrade batch: ([^"]*)"/\1/' | paste -sd '|'; }
recap() { # recap HOST KEY -> the number in PLAY RECAP
    grep -E "^$1 +: " "$log" | tail -n 1 | grep -oE "$2=[0-9]+" | cut -d= -f2
}
recap_all() { # recap_all KEY VALUE HOSTS...
    local k=$1 v=$2 h
    shift 2
    for h in "$@"; do [ "$(recap "$h" "$k")" = "$v" ] || { echo "      $h: $k=$(recap "$h" "$k")"; return 1; }; done
}
upgraded_in_order() { # the last upgrade of each host ends before the next host's begins
    local prev_end=0 h id first last
    for h in "$@"; do
        id=$("$mk" --state-dir "$work/$h/state" --platform emulated history --json | jq -r 'last | .upgrade_id')
        first=$(jq -s --arg id "$id" '[.[] | select(.upgrade_id == $id) | .ts_ms] | min' "$work/$h/state/events.jsonl")
        last=$(jq -s --arg id "$id" '[.[] | select(.upgrade_id == $id) | .ts_ms] | max' "$work/$h/state/events.jsonl")
        [ "$first" != null ] && [ "$first" -gt "$prev_end" ] || { echo "      $h began at $first, before $prev_end"; return 1; }
        prev_end=$last
    done
}

# h3 receives the kernel and its signature in an incoming directory (mk_upgrade_copy), as
# a remote host would; h1 and h2 read them at the controller's path.
inventory "$work/inventory.yml" "h3=mk_upgrade_copy=true" "h3=mk_upgrade_remote_dir=$work/h3/incoming"
reported() { # reported WHAT HOSTS...: the role's report line of each host starts so
    local what=$1 h
    shift
    for h in "$@"; do grep -qF "mk_upgrade: $h $what" "$log" || { echo "      no 'mk_upgrade: $h $what'"; return 1; }; done
}
hist_of_all() { local h; for h in "${hosts[@]}"; do history_len "$h"; done | paste -sd ,; }

echo "== (0) --check: what would change, nothing changes"
hist_before=$(hist_of_all)
play check "$work/inventory.yml" --check
[ "$rc" = 0 ] || show_log
check "(0) ansible-playbook --check exits 0" test "$rc" = 0
check "(0) the role reports each host would upgrade from $rel_a" reported "would-upgrade $rel_b (check mode: would upgrade from $rel_a)" h1 h2 h3
check "(0) all three still run $rel_a, no upgrade record, nothing copied" \
    eval 'all_on "$rel_a" h1 h2 h3 && [ "$(hist_of_all)" = "$hist_before" ] && [ ! -e "$work/h3/incoming" ]'

echo "== (a) upgrade the three hosts to $rel_b in serial batches (canary first)"
play a "$work/inventory.yml"
[ "$rc" = 0 ] || show_log
check "(a) ansible-playbook exits 0" test "$rc" = 0
check "(a) all three run $rel_b" all_on "$rel_b" h1 h2 h3
check "(a) each still serves the value written before (GET k)" all_serve h1 h2 h3
check "(a) batches in order, the canary alone first: $(batches)" test "$(batches)" = "h1|h2|h3"
check "(a) each upgrade ended before the next host's began (events.jsonl)" upgraded_in_order h1 h2 h3
a_recap() { # h3 also changed its incoming directory and files
    recap_all failed 0 h1 h2 h3 && recap_all changed 1 h1 h2 && [ "$(recap h3 changed)" -ge 1 ]
}
check "(a) each host changed, none failed (PLAY RECAP)" a_recap
check "(a) the role reports each host upgraded" reported "upgraded $rel_b (from $rel_a" h1 h2 h3
copied() {
    local k=$work/h3/incoming/$(basename "$kernel_b")
    [ "$(stat -c %a "$work/h3/incoming")" = 700 ] && [ "$(stat -c %a "$k")" = 600 ] &&
        [ "$(stat -c %a "$k.sig")" = 600 ] && cmp -s "$k" "$kernel_b" && cmp -s "$k.sig" "$kernel_b.sig"
}
check "(a) h3 received the kernel and its signature (0600 files, 0700 directory)" copied

echo "== (b) the same again: every host is current"
hist_before=$(hist_of_all)
play b "$work/inventory.yml"
[ "$rc" = 0 ] || show_log
check "(b) ansible-playbook exits 0" test "$rc" = 0
b_recap() { recap_all changed 0 h1 h2 h3 && recap_all failed 0 h1 h2 h3; }
check "(b) nothing changed, nothing failed (PLAY RECAP)" b_recap
check "(b) the role reports each host current" reported "current $rel_b" h1 h2 h3
check "(b) no new upgrade record on any host" eval '[ "$(hist_of_all)" = "$hist_before" ]'

echo "== (c) h2 trusts only another key; batches [2, 100%], max_fail_percentage 0"
echo "       (h1: a simulated kexec takes the apply client and its job, the boot id changes)"
for h in "${hosts[@]}"; do
    "$mk" --state-dir "$work/$h/state" --platform emulated rollback --json >"$work/$h/rollback.json" 2>&1
done
all_on "$rel_a" h1 h2 h3 || die "rolling the hosts back to $rel_a failed: $(cat "$work"/h*/rollback.json)"
rm "$work/h2/state/trusted-keys/release.pub"
cp "$work/keys/other.pub" "$work/h2/state/trusted-keys/"
h3_hist=$(history_len h3)
inventory "$work/inventory-c.yml" "h1=mk_upgrade_bin=$work/luo-sim/mk-upgrade" "h1=mk_upgrade_boot_id_file=$work/h1/boot_id"
play c "$work/inventory-c.yml" -e '{"mk_upgrade_serial": [2, "100%"]}'
check "(c) ansible-playbook exits non-zero ($rc)" test "$rc" != 0
check "(c) the play stopped after the first batch: $(batches)" test "$(batches)" = "h1 h2"
check "(c) h2's failure names the untrusted key $release_key_id" \
    grep -qE "mk_upgrade: h2 not upgraded to $rel_b: refused: exit 5, result refused: .*signed by key $release_key_id, which is not in the trusted-keys" "$log"
c_h2() { all_on "$rel_a" h2 && all_serve h2; }
c_h3() { all_on "$rel_a" h3 && all_serve h3 && [ "$(history_len h3)" = "$h3_hist" ]; }
c_recap() { [ "$(recap h1 changed)" = 1 ] && [ "$(recap h1 failed)" = 0 ] && [ "$(recap h2 failed)" = 1 ] && [ -z "$(recap h3 ok)" ]; }
check "(c) h2 still runs $rel_a and serves its value" c_h2
check "(c) h3 untouched: on $rel_a, no new record, serves its value" c_h3
check "(c) PLAY RECAP: h1 changed, h2 failed, h3 never played" c_recap
echo "== (e) luo-awareness (same run): a simulated kexec took h1's apply client and job"
check "(e) the kexec killed the client's Ansible job (async_wrapper)" grep -q async_wrapper "$work/luo-sim/killed"
check "(e) noticed by the new boot id, not by the host timeout (120 s): run took $play_ms ms" test "$play_ms" -lt 60000
check "(e) h1 reconnected and was upgraded from its history record" \
    grep -qE "mk_upgrade: h1 upgraded $rel_b \\(from $rel_a, upgrade [0-9a-f]+, reconnected\\)" "$log"
e_h1() { all_on "$rel_b" h1 && all_serve h1; }
check "(e) h1 runs $rel_b and serves its value" e_h1
if [ "$failed" -gt 0 ]; then show_log; fi

echo "== (d) halt every emulated machine"
down_all
halted() {
    local h
    for h in "${hosts[@]}"; do
        [ "$("$mk" --state-dir "$work/$h/state" --platform emulated emu ls --json | jq length)" = 0 ] || return 1
    done
    ! pgrep -f -- "$work/h" >/dev/null
}
check "(d) emu down: no instance, no process of the hosts left" halted

echo
echo "duration: $(($(date +%s) - started)) s"
echo "ansible role: $passed checks passed, $failed failed"
[ "$failed" -eq 0 ]
