#!/usr/bin/env bash
# suc-upgrade.sh: the upgrade step of the system-upgrade-controller Plans
# (system-upgrade-plan.yaml), on the HOST (the mk-agentd DaemonSet installs it beside
# mk-upgrade-reboot.sh in /var/lib/mk-upgrade/bin). It runs mk-upgrade-reboot.sh for the
# Plan's version and turns its exit codes into the Job's:
#
#   suc-upgrade.sh [--release R] [mk-upgrade-reboot.sh options...]
#
# R: the kernel release to run, default $SYSTEM_UPGRADE_PLAN_LATEST_VERSION (the controller
# puts the Plan's resolved version there). The kernel must already be on the node:
# /boot/vmlinuz-R, or on NixOS the system profile's kernel (see mk-upgrade-reboot.sh).
# No sentinel: the script's sentinel is STATE_DIR/suc/upgrade-requested (--sentinel overrides).
#
# Exit codes (the controller marks the node done only when the Job completes, i.e. exit 0;
# a failed pod is retried by the Job up to its backoffLimit, and a failed Job is created
# again after its TTL):
#   0    R runs: upgraded live (the script's 100), or already current. On luo a successful
#        apply ends in a kexec that kills the Job's pod (it never exits); the Job's next pod
#        runs on the new kernel, finds R current (the script reports the previous run's
#        kexec from STATE_DIR/kured/pending.json) and exits 0
#   1    the script ran its reboot command (--fallback-reboot): not done until R runs; the
#        Job's next pod, after the reboot, finds R current
#   *    the script's code (docs/cli.md; 10: rolled back, also after a kexec that came back
#        on the old kernel; 64: no kernel of release R on the node): NOT upgraded, the old
#        kernel runs everything
set -uo pipefail

prog=${0##*/}
here=$(cd "$(dirname "$0")" && pwd)
script=${MK_REBOOT_SCRIPT:-$here/mk-upgrade-reboot.sh}
[ -x "$script" ] || script=$here/../kured/mk-upgrade-reboot.sh # in a source checkout
release=${SYSTEM_UPGRADE_PLAN_LATEST_VERSION:-}
state_dir=${MK_STATE_DIR:-/var/lib/mk-upgrade}
args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --release) release=${2-}; shift 2 || { echo "$prog: --release needs a value" >&2; exit 64; } ;;
    --state-dir) state_dir=${2-}; args+=("$1" "${2-}"); shift 2 || { echo "$prog: --state-dir needs a value" >&2; exit 64; } ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
    esac
done
if [ -z "$release" ]; then
    echo "$prog: no kernel release: pass --release or set SYSTEM_UPGRADE_PLAN_LATEST_VERSION (the Plan's version)" >&2
    exit 64
fi
mkdir -p "$state_dir/suc" || exit 64
sentinel=$state_dir/suc/upgrade-requested
: >"$sentinel"
echo "$prog: node ${SYSTEM_UPGRADE_NODE_NAME:-$(uname -n)}: plan ${SYSTEM_UPGRADE_PLAN_NAME:-?} wants kernel $release" >&2
rc=0
"$script" --sentinel "$sentinel" --release "$release" "${args[@]}" || rc=$?
case "$rc" in
100)
    echo "$prog: $release runs: the job succeeds" >&2
    exit 0
    ;;
0)
    echo "$prog: the reboot command ran: not done until $release runs; exiting 1 so the job runs again after the reboot" >&2
    exit 1
    ;;
esac
echo "$prog: NOT upgraded to $release (exit $rc): the job fails and is retried" >&2
exit "$rc"
