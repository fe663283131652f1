#!/usr/bin/env bash
# canary.sh: roll a kernel out to a fleet with mk-upgrade, in waves, stopping at the first
# host that does not end upgraded.
#
#   canary.sh --hosts FILE --kernel IMAGE [--batch N] [--ssh "ssh -o ..."] [options]
#
# Wave 1 is the first host alone (the canary); every later wave holds up to N hosts
# (--batch, default 5) upgraded in parallel. After each wave the script reads every host's
# `mk-upgrade apply --json` document; if any host's `result` is not `upgraded` the rollout
# stops there: no host of a later wave is touched. Hosts of the failed wave that were
# started in parallel have finished (upgraded or not) and are listed in the summary; use
# --batch 1 for a strictly one-host-at-a-time rollout.
#
# A host already running the target release (`apply` exit 14, nothing-to-do) counts as
# done, so re-running the same rollout after fixing a host resumes where it stopped.
#
# Transports:
#   --ssh CMD                      run `CMD HOST 'mk-upgrade ... apply --kernel IMAGE --json'`
#                                  (IMAGE and IMAGE.sig must already be on the host, unless
#                                  --push copies them there first)
#   --local-state-dir-prefix DIR   run a local mk-upgrade with --state-dir DIR/HOST
#                                  --platform emulated (EMULATED hosts, for testing)
#
# Exit codes (of this script; the per-host codes are mk-upgrade's, docs/cli.md):
#   0  every host ended upgraded (or was already on the target release)
#   1  the rollout stopped: at least one host ended rolled-back, refused, failed, or could
#      not be reached / gave no JSON document; later waves were not started
#   2  usage: bad option, missing hosts file, missing jq, empty host list
set -euo pipefail

prog=${0##*/}

usage() {
    cat <<EOF
usage: $prog --hosts FILE --kernel IMAGE [options]

  --hosts FILE                  one host per line (its first word); blank lines and '#'
                                comments ignored
  --kernel IMAGE                the kernel image (path on the hosts, or local with --push
                                or --local-state-dir-prefix)
  --batch N                     hosts per wave after the canary (default 5)
  --ssh CMD                     remote shell command, e.g. "ssh -o BatchMode=yes -l root"
                                (default "ssh -o BatchMode=yes")
  --push DIR                    copy IMAGE (and IMAGE.sig if present) to DIR on each host
                                before applying (over the same --ssh command)
  --mk-upgrade PATH             mk-upgrade on the hosts (default: mk-upgrade), or the local
                                binary with --local-state-dir-prefix (default: \$MK_BIN_DIR/
                                mk-upgrade, else mk-upgrade from PATH)
  --apply-arg ARG               extra argument for 'mk-upgrade apply' (repeatable), e.g.
                                --apply-arg --cmdline --apply-arg "console=ttyS0 liveupdate=on"
  --pause SECONDS               wait between waves (soak time; default 0)
  --log-dir DIR                 keep each host's JSON document and stderr there
                                (default: a new temporary directory, printed at the end)
  --summary-json FILE           also write the summary as one JSON document
  --local-state-dir-prefix DIR  test mode: hosts are EMULATED state dirs DIR/HOST
  -h, --help                    this text

exit: 0 all upgraded, 1 rollout stopped at a host not upgraded, 2 usage
EOF
}

die_usage() {
    echo "$prog: $*" >&2
    echo "$prog: see --help" >&2
    exit 2
}

hosts_file=""
kernel=""
batch=5
ssh_cmd="ssh -o BatchMode=yes"
push_dir=""
mk_upgrade=""
apply_args=()
pause=0
log_dir=""
summary_json=""
local_prefix=""

while [ $# -gt 0 ]; do
    case "$1" in
    --hosts) hosts_file=${2-}; shift 2 || die_usage "--hosts needs a value" ;;
    --kernel) kernel=${2-}; shift 2 || die_usage "--kernel needs a value" ;;
    --batch) batch=${2-}; shift 2 || die_usage "--batch needs a value" ;;
    --ssh) ssh_cmd=${2-}; shift 2 || die_usage "--ssh needs a value" ;;
    --push) push_dir=${2-}; shift 2 || die_usage "--push needs a value" ;;
    --mk-upgrade) mk_upgrade=${2-}; shift 2 || die_usage "--mk-upgrade needs a value" ;;
    --apply-arg) apply_args+=("${2-}"); shift 2 || die_usage "--apply-arg needs a value" ;;
    --pause) pause=${2-}; shift 2 || die_usage "--pause needs a value" ;;
    --log-dir) log_dir=${2-}; shift 2 || die_usage "--log-dir needs a value" ;;
    --summary-json) summary_json=${2-}; shift 2 || die_usage "--summary-json needs a value" ;;
    --local-state-dir-prefix) local_prefix=${2-}; shift 2 || die_usage "--local-state-dir-prefix needs a value" ;;
    -h | --help) usage; exit 0 ;;
    *) die_usage "unknown option '$1'" ;;
    esac
done

[ -n "$hosts_file" ] || die_usage "--hosts FILE is required"
[ -n "$kernel" ] || die_usage "--kernel IMAGE is required"
[ -r "$hosts_file" ] || die_usage "hosts file '$hosts_file' is missing or unreadable"
case "$batch" in '' | *[!0-9]* | 0) die_usage "--batch must be a positive integer, got '$batch'" ;; esac
case "$pause" in '' | *[!0-9]*) die_usage "--pause must be a number of seconds, got '$pause'" ;; esac
command -v jq >/dev/null 2>&1 || die_usage "jq is required (apt-get install jq)"

hosts=()
while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    read -r line _ <<<"$line" || true # the first word; the rest of the line is ignored
    if [ -n "$line" ]; then hosts+=("$line"); fi
done <"$hosts_file"
[ ${#hosts[@]} -gt 0 ] || die_usage "hosts file '$hosts_file' lists no host"

if [ -n "$local_prefix" ]; then
    [ -d "$local_prefix" ] || die_usage "--local-state-dir-prefix '$local_prefix' is not a directory"
    [ -r "$kernel" ] || die_usage "kernel image '$kernel' is missing or unreadable"
    [ -z "$push_dir" ] || die_usage "--push makes no sense with --local-state-dir-prefix"
    for h in "${hosts[@]}"; do
        case "$h" in */* | . | ..) die_usage "host name '$h' cannot name a state dir under $local_prefix" ;; esac
    done
    if [ -z "$mk_upgrade" ]; then
        if [ -n "${MK_BIN_DIR-}" ]; then mk_upgrade=$MK_BIN_DIR/mk-upgrade; else mk_upgrade=$(command -v mk-upgrade || true); fi
    fi
    if [ -z "$mk_upgrade" ] || [ ! -x "$mk_upgrade" ]; then die_usage "local mk-upgrade not found (set MK_BIN_DIR or --mk-upgrade)"; fi
else
    [ -n "$mk_upgrade" ] || mk_upgrade=mk-upgrade
    if [ -n "$push_dir" ]; then
        [ -r "$kernel" ] || die_usage "--push: local kernel image '$kernel' is missing or unreadable"
    fi
fi

if [ -z "$log_dir" ]; then
    log_dir=$(mktemp -d "${TMPDIR:-/tmp}/mk-canary.XXXXXX")
else
    mkdir -p "$log_dir"
fi

# The kernel path as the hosts see it.
remote_kernel=$kernel
if [ -n "$push_dir" ]; then
    remote_kernel=$push_dir/${kernel##*/}
fi

# A shell-quoted command line, for the remote shell (printf %q output is read back
# correctly by any POSIX sh for ordinary paths and arguments).
quote() {
    local out="" a
    for a in "$@"; do out+=$(printf '%q ' "$a"); done
    printf '%s' "${out% }"
}

# Copies IMAGE (and IMAGE.sig) to $push_dir on host $1.
push_to() {
    local h=$1 f
    for f in "$kernel" "$kernel.sig"; do
        [ -e "$f" ] || continue
        # shellcheck disable=SC2086 # $ssh_cmd is a command line: split on purpose
        # Written to a temporary name (the remote shell's $$), then renamed.
        $ssh_cmd "$h" "mkdir -p $(quote "$push_dir") && cat > $(quote "$push_dir/${f##*/}").part.\$\$ && mv -f $(quote "$push_dir/${f##*/}").part.\$\$ $(quote "$push_dir/${f##*/}")" <"$f" || return 1
    done
}

# Runs the upgrade on host $1; writes LOG/HOST.json (stdout), LOG/HOST.err, LOG/HOST.rc.
upgrade_host() {
    local h=$1 rc=0
    local out=$log_dir/$h.json err=$log_dir/$h.err
    if [ -n "$local_prefix" ]; then
        "$mk_upgrade" --state-dir "$local_prefix/$h" --platform emulated \
            apply --kernel "$kernel" "${apply_args[@]}" --json >"$out" 2>"$err" </dev/null || rc=$?
    else
        if [ -n "$push_dir" ] && ! push_to "$h" 2>"$err" </dev/null; then
            echo "copying $kernel to $h:$push_dir failed" >>"$err"
            : >"$out"
            echo 255 >"$log_dir/$h.rc"
            return 0
        fi
        # shellcheck disable=SC2086 # $ssh_cmd is a command line: split on purpose
        $ssh_cmd "$h" "$(quote "$mk_upgrade" apply --kernel "$remote_kernel" "${apply_args[@]}" --json)" \
            >"$out" 2>"$err" </dev/null || rc=$?
    fi
    echo "$rc" >"$log_dir/$h.rc"
}

# Classifies host $1 from its logs; prints one TSV line:
# host wave rc result kernel_before kernel_after emulated ok detail
classify() {
    local h=$1 wave=$2 rc result before after emulated ok detail
    rc=$(cat "$log_dir/$h.rc")
    # Exactly one JSON object with a `result` (jq -e alone accepts an empty file).
    if jq -s -e 'length == 1 and (.[0] | type == "object" and has("result"))' "$log_dir/$h.json" >/dev/null 2>&1; then
        result=$(jq -r '.result' "$log_dir/$h.json")
        before=$(jq -r '.kernel_before // "-"' "$log_dir/$h.json")
        after=$(jq -r '.kernel_after // "-"' "$log_dir/$h.json")
        emulated=$(jq -r 'if .emulated == true then "EMULATED" else "-" end' "$log_dir/$h.json")
        detail=$(jq -r '[.error // empty] + [.checks[]? | select(.ok | not) | "\(.name): \(.detail)"]
            + [.workloads[]? | select(.moved | not) | "\(.name): \(.status) \(.detail // "")"] | join("; ")' "$log_dir/$h.json")
    else
        # No JSON document: the host was unreachable (ssh exits 255) or mk-upgrade failed
        # before it could report (the message is on its stderr).
        if [ "$rc" = 255 ]; then result=unreachable; else result=no-report; fi
        before=-; after=-; emulated=-
        detail=$(tail -n 1 "$log_dir/$h.err" 2>/dev/null || true)
    fi
    if [ "$rc" = 0 ] && [ "$result" = upgraded ]; then
        ok=upgraded
    elif [ "$rc" = 14 ]; then
        ok=current # the target release already runs there
    else
        ok=stop
    fi
    detail=$(printf '%s' "$detail" | tr '\t\n' '  ')
    # Tabs are IFS white space for `read`: no field may be empty.
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$h" "$wave" "$rc" "${result:--}" "${before:--}" \
        "${after:--}" "${emulated:--}" "$ok" "${detail:--}"
}

mode="ssh ($ssh_cmd)"
[ -z "$local_prefix" ] || mode="local EMULATED hosts under $local_prefix"
echo "$prog: ${#hosts[@]} host(s), canary then waves of $batch; kernel $kernel; $mode" >&2

results=$log_dir/summary.tsv
: >"$results"
stopped=""
i=0
wave=0
while [ $i -lt ${#hosts[@]} ]; do
    wave=$((wave + 1))
    size=$batch
    [ $wave -gt 1 ] || size=1
    members=("${hosts[@]:i:size}")
    i=$((i + ${#members[@]}))
    if [ $wave -gt 1 ] && [ "$pause" -gt 0 ]; then
        echo "$prog: soaking ${pause}s before wave $wave" >&2
        sleep "$pause"
    fi
    echo "$prog: wave $wave: ${members[*]}" >&2
    pids=()
    for h in "${members[@]}"; do
        upgrade_host "$h" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for h in "${members[@]}"; do
        line=$(classify "$h" "$wave")
        printf '%s\n' "$line" >>"$results"
        IFS=$'\t' read -r _ _ rc result _ after _ ok detail <<<"$line"
        note=""
        [ "$after" = - ] || note=" ($after)"
        [ "$detail" = - ] || note+=": $detail"
        echo "$prog:   $h: exit $rc, $result$note => $ok" >&2
        if [ "$ok" = stop ] && [ -z "$stopped" ]; then stopped=$h; fi
    done
    if [ -n "$stopped" ]; then
        break
    fi
done

untouched=("${hosts[@]:i}")

echo
printf '%-20s %-4s %-4s %-12s %-16s %-16s %-8s %s\n' HOST WAVE EXIT RESULT BEFORE AFTER PLATFORM OUTCOME
while IFS=$'\t' read -r h w rc result before after emulated ok detail; do
    printf '%-20s %-4s %-4s %-12s %-16s %-16s %-8s %s\n' "$h" "$w" "$rc" "$result" "$before" "$after" "$emulated" "$ok"
    [ "$detail" = - ] || printf '    %s\n' "$detail"
done <"$results"
for h in "${untouched[@]}"; do
    printf '%-20s %-4s %-4s %-12s %-16s %-16s %-8s %s\n' "$h" - - - - - - not-started
done

upgraded=$(awk -F'\t' '$8 == "upgraded"' "$results" | wc -l)
current=$(awk -F'\t' '$8 == "current"' "$results" | wc -l)
failed=$(awk -F'\t' '$8 == "stop"' "$results" | wc -l)
echo
if [ -n "$stopped" ]; then
    echo "ROLLOUT STOPPED at $stopped (wave $wave): $upgraded upgraded, $current already current, $failed not upgraded, ${#untouched[@]} not started"
else
    echo "ROLLOUT COMPLETE: $upgraded upgraded, $current already current, ${#hosts[@]} host(s)"
fi
echo "logs: $log_dir"

if [ -n "$summary_json" ]; then
    jq -R -s --arg stopped "$stopped" --arg kernel "$kernel" --argjson untouched \
        "$(printf '%s\n' "${untouched[@]}" | jq -R -s 'split("\n") | map(select(length > 0))')" '
        split("\n") | map(select(length > 0) | split("\t")
          | {host: .[0], wave: (.[1] | tonumber), exit: (.[2] | tonumber), result: .[3],
             kernel_before: .[4], kernel_after: .[5], emulated: (.[6] == "EMULATED"),
             outcome: .[7], detail: (if .[8] == "-" then null else .[8] end)})
        | {kernel: $kernel, complete: ($stopped == ""), stopped_at: (if $stopped == "" then null else $stopped end),
           hosts: ., not_started: $untouched}' "$results" >"$summary_json"
fi

[ -z "$stopped" ] || exit 1
exit 0
