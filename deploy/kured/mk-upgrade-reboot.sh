#!/usr/bin/env bash
# mk-upgrade-reboot.sh: kured's --reboot-command, replaced by a live kernel upgrade.
#
# kured runs its reboot command as `nsenter -m/proc/1/ns/mnt -- COMMAND`: in the HOST's mount
# namespace, so this script, mk-upgrade and the kernel must be on the host (the mk-agentd
# DaemonSet installs the first two under /var/lib/mk-upgrade/bin; see ../k8s/).
#
#   mk-upgrade-reboot.sh [--kernel IMAGE] [--signature SIG] [--initrd F] [--cmdline S]
#                        [--state-dir D] [--platform P] [--mk-upgrade PATH]
#                        [--sentinel FILE] [--fallback-reboot] [--reboot-command CMD]
#                        [--boot-dir DIR]
#
# The pending kernel (default): the newest BOOT_DIR/vmlinuz-* (BOOT_DIR: /boot) whose
# release is not the running one; its signature IMAGE.sig, else
# STATE_DIR/signatures/BASENAME.sig; its initrd BOOT_DIR/initrd.img-RELEASE when present; the command line: the running one (/proc/cmdline
# without BOOT_IMAGE=).
#
# Exit codes (kured only distinguishes 0 from non-zero; any non-zero makes kured log
# "Unable to reboot node" and exit, and on its restart it uncordons the node and releases
# its lock, then goes on checking the sentinel every --period):
#   (none) with the luo platform a successful apply ends in a kexec: the script never returns
#   100    live upgrade done without a reboot (multikernel/emulated platform), or the pending
#          kernel already runs: the sentinel is removed, so kured's restart ends its cycle
#   1-14   mk-upgrade's own code (docs/cli.md): NOT upgraded, the old kernel runs everything
#          (10: by rolling back); the sentinel stays, kured retries at its next period
#   64     usage, or no pending kernel found; the sentinel stays
# Never a blind reboot: with --fallback-reboot, and only for 8 (pre-flight failed),
# 9 (busy), 10 (rolled back), 11 (capture failed), 12 (platform), it runs the reboot command
# (default `systemctl reboot`), a cold boot into the pending kernel. Verification failures
# (3 io, 4 corrupt, 5 untrusted, 6 incompatible, 7 not a kernel) never reboot: that kernel
# must not boot.
set -uo pipefail

prog=${0##*/}
kernel=""
signature=""
initrd=""
cmdline=""
cmdline_set=0
state_dir=${MK_STATE_DIR:-/var/lib/mk-upgrade}
platform=""
mk_upgrade=""
sentinel=/var/run/reboot-required
fallback=0
reboot_command="systemctl reboot"
boot_dir=/boot

log() { echo "$prog: $*" >&2; }
usage_error() {
    log "$*"
    exit 64
}

while [ $# -gt 0 ]; do
    case "$1" in
    --kernel) kernel=${2-}; shift 2 || usage_error "--kernel needs a value" ;;
    --signature) signature=${2-}; shift 2 || usage_error "--signature needs a value" ;;
    --initrd) initrd=${2-}; shift 2 || usage_error "--initrd needs a value" ;;
    --cmdline) cmdline=${2-}; cmdline_set=1; shift 2 || usage_error "--cmdline needs a value" ;;
    --state-dir) state_dir=${2-}; shift 2 || usage_error "--state-dir needs a value" ;;
    --platform) platform=${2-}; shift 2 || usage_error "--platform needs a value" ;;
    --mk-upgrade) mk_upgrade=${2-}; shift 2 || usage_error "--mk-upgrade needs a value" ;;
    --sentinel) sentinel=${2-}; shift 2 || usage_error "--sentinel needs a value" ;;
    --fallback-reboot) fallback=1; shift ;;
    --boot-dir) boot_dir=${2-}; shift 2 || usage_error "--boot-dir needs a value" ;;
    --reboot-command) reboot_command=${2-}; shift 2 || usage_error "--reboot-command needs a value" ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) usage_error "unknown option '$1' (see --help)" ;;
    esac
done

if [ -z "$mk_upgrade" ]; then
    if [ -x "$state_dir/bin/mk-upgrade" ]; then
        mk_upgrade=$state_dir/bin/mk-upgrade
    else
        mk_upgrade=$(command -v mk-upgrade || true)
    fi
fi
if [ -z "$mk_upgrade" ] || [ ! -x "$mk_upgrade" ]; then
    usage_error "mk-upgrade not found (looked in $state_dir/bin and PATH; pass --mk-upgrade)"
fi

# The pending kernel: the newest BOOT_DIR/vmlinuz-RELEASE that is not the running release.
if [ -z "$kernel" ]; then
    running=$(uname -r)
    release=$(find "$boot_dir" -maxdepth 1 -name 'vmlinuz-*' -type f 2>/dev/null |
        sed 's|^.*/vmlinuz-||' | grep -vxF "$running" | sort -V | tail -n 1)
    [ -n "$release" ] || usage_error "no pending kernel: no $boot_dir/vmlinuz-* other than the running $running (pass --kernel)"
    kernel=$boot_dir/vmlinuz-$release
    if [ -z "$initrd" ] && [ -f "$boot_dir/initrd.img-$release" ]; then
        initrd=$boot_dir/initrd.img-$release
    fi
fi
[ -r "$kernel" ] || usage_error "kernel image $kernel is missing or unreadable"
if [ -z "$signature" ] && [ ! -e "$kernel.sig" ] && [ -e "$state_dir/signatures/${kernel##*/}.sig" ]; then
    signature=$state_dir/signatures/${kernel##*/}.sig
fi
if [ "$cmdline_set" = 0 ] && [ -r /proc/cmdline ]; then
    # The running command line, as `kexec --reuse-cmdline` does, without the boot loader's
    # BOOT_IMAGE= (it names the old image).
    cmdline=$(tr ' ' '\n' </proc/cmdline | grep -v '^BOOT_IMAGE=' | tr '\n' ' ' | sed 's/ *$//')
fi

args=(--state-dir "$state_dir")
[ -z "$platform" ] || args+=(--platform "$platform")
args+=(apply --kernel "$kernel" --json)
[ -z "$signature" ] || args+=(--signature "$signature")
[ -z "$initrd" ] || args+=(--initrd "$initrd")
[ -z "$cmdline" ] || args+=(--cmdline "$cmdline")

mkdir -p "$state_dir/kured"
record=$state_dir/kured/last-apply.json
log "live upgrade to $kernel (record: $record)"
log "running: $mk_upgrade ${args[*]}"
rc=0
"$mk_upgrade" "${args[@]}" >"$record.tmp" || rc=$?
mv -f "$record.tmp" "$record"
summary=$(jq -r '"result \(.result // "?")\(if .kernel_after then ", kernel \(.kernel_after)" else "" end)"
    + ([.error // empty] + [.checks[]? | select(.ok | not) | "\(.name): \(.detail)"] | if length > 0 then ": " + join("; ") else "" end)' \
    "$record" 2>/dev/null || echo "no JSON report")

case "$rc" in
0 | 14)
    if [ "$rc" = 0 ]; then
        log "upgraded live without a reboot: $summary"
    else
        log "the pending kernel already runs: $summary"
    fi
    rm -f "$sentinel"
    log "removed $sentinel; exiting 100 so kured restarts, uncordons this node and releases its lock"
    exit 100
    ;;
esac

log "NOT upgraded: mk-upgrade exit $rc, $summary"
case "$rc" in
8 | 9 | 10 | 11 | 12)
    if [ "$fallback" = 1 ]; then
        log "--fallback-reboot: the old kernel is intact; cold reboot with '$reboot_command'"
        # shellcheck disable=SC2086 # a command line: split on purpose
        exec $reboot_command
    fi
    ;;
esac
log "no reboot; the running kernel keeps every workload; kured retries at its next period"
exit "$rc"
