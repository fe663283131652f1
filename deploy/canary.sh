#!/usr/bin/env bash
# canary.sh: RETIRED. `mk-upgrade rollout --plan PLAN.toml` replaces it (docs/fleet.md): ssh
# with BatchMode/ConnectTimeout/ServerAlive, per-host timeouts, bakes that re-check every
# host, gates, rollback on abort, a rollout lock, luo-aware completion, JUnit and Markdown
# reports. This thin wrapper keeps old invocations working by writing the equivalent plan:
#
#   canary.sh --hosts FILE --kernel IMAGE [--batch N] [--pause SECONDS] [--push DIR]
#             [--mk-upgrade PATH] [--local-state-dir-prefix DIR] [--summary-json FILE]
#
# --hosts: one host per line (first word; '#' comments and blank lines ignored): ssh hosts,
# or with --local-state-dir-prefix DIR emulated hosts local:DIR/HOST. --batch N (default 5):
# waves of N after a canary of 1. --pause S: the bake after each wave. --push DIR: where
# ssh hosts receive IMAGE and IMAGE.sig. --ssh and --apply-arg are no longer taken here:
# write a plan (ssh = "...", apply_args = [...]).
# Exit: 0 every host upgraded or already current; 1 the rollout stopped; 2 usage.
set -euo pipefail
prog=${0##*/}
usage() { echo "$prog: $*; see the header of $0 and docs/fleet.md" >&2; exit 2; }
hosts="" kernel="" batch=5 pause=0 push="" mk="" prefix="" summary=""
while [ $# -gt 0 ]; do
    case "$1" in
    --hosts) hosts=${2-}; shift 2 || usage "--hosts needs a value" ;;
    --kernel) kernel=${2-}; shift 2 || usage "--kernel needs a value" ;;
    --batch) batch=${2-}; shift 2 || usage "--batch needs a value" ;;
    --pause) pause=${2-}; shift 2 || usage "--pause needs a value" ;;
    --push) push=${2-}; shift 2 || usage "--push needs a value" ;;
    --mk-upgrade) mk=${2-}; shift 2 || usage "--mk-upgrade needs a value" ;;
    --local-state-dir-prefix) prefix=${2-}; shift 2 || usage "needs a value" ;;
    --summary-json) summary=${2-}; shift 2 || usage "--summary-json needs a value" ;;
    --ssh | --apply-arg | --log-dir) usage "$1 is retired: write a plan for mk-upgrade rollout" ;;
    *) usage "unknown option '$1'" ;;
    esac
done
[ -r "$hosts" ] || usage "--hosts FILE is required and must be readable"
[ -n "$kernel" ] || usage "--kernel IMAGE is required"
case "$batch" in '' | *[!0-9]* | 0) usage "--batch must be a positive number" ;; esac
case "$pause" in '' | *[!0-9]*) usage "--pause must be whole seconds" ;; esac
q() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
mapfile -t names < <(sed 's/#.*//' "$hosts" | awk 'NF { print $1 }')
[ "${#names[@]}" -gt 0 ] || usage "$hosts lists no host"
plan=$(mktemp --suffix=.toml)
trap 'rm -f "$plan" "$plan.lock"' EXIT
{
    printf 'hosts = ['
    sep=""
    for h in "${names[@]}"; do
        if [ -n "$prefix" ]; then printf '%s%s' "$sep" "$(q "local:$prefix/$h")"; else printf '%s%s' "$sep" "$(q "ssh://$h")"; fi
        sep=", "
    done
    printf ']\nkernel = %s\ncanary = 1\nwaves = [' "$(q "$(realpath "$kernel")")"
    left=$((${#names[@]} - 1)) sep=""
    while [ "$left" -gt 0 ]; do printf '%s%d' "$sep" "$batch"; sep=", "; left=$((left - batch)); done
    printf ']\nbake = "%ss"\nrollback_on_abort = false\n' "$pause"
    [ -n "$prefix" ] && printf 'platform = "emulated"\n'
    [ -n "$push" ] && printf 'remote_dir = %s\n' "$(q "$push")"
    [ -n "$mk" ] && [ -z "$prefix" ] && printf 'mk_upgrade = %s\n' "$(q "$mk")"
    true
} >"$plan"
bin=${mk:-${MK_BIN_DIR:+$MK_BIN_DIR/mk-upgrade}}
bin=${bin:-mk-upgrade}
if [ -n "$summary" ]; then
    "$bin" rollout --plan "$plan" --json >"$summary" && exit 0 || exit 1
fi
"$bin" rollout --plan "$plan" && exit 0 || exit 1
