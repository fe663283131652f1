#!/usr/bin/env bash
# mk-upgrade-reboot.sh: kured's --reboot-command, replaced by a live kernel upgrade. Also
# the upgrade step of the system-upgrade-controller Plans (../k8s/suc-upgrade.sh).
#
# kured runs its reboot command as `nsenter -m/proc/1/ns/mnt -- COMMAND`: in the HOST's mount
# namespace, so this script, mk-upgrade and the kernel must be on the host (the mk-agentd
# DaemonSet installs the first two under /var/lib/mk-upgrade/bin; see ../k8s/).
#
#   mk-upgrade-reboot.sh [--kernel IMAGE] [--signature SIG] [--initrd F] [--cmdline S]
#                        [--state-dir D] [--platform P] [--mk-upgrade PATH]
#                        [--sentinel FILE] [--fallback-reboot] [--reboot-command CMD]
#                        [--release R] [--boot-dir DIR]
#                        [--system-profile DIR] [--booted-system DIR]
#
# The running release: the single active instance of `mk-upgrade status --json`, else
# `uname -r`.
#
# The pending kernel (without --kernel), on NixOS (/etc/NIXOS or /run/current-system exists,
# or --system-profile/--booted-system given; --boot-dir forces the /boot layout): the kernel
# of the newest system generation, SYSTEM_PROFILE/kernel (default
# /nix/var/nix/profiles/system/kernel, resolved to its store path), pending when it is not
# BOOTED_SYSTEM/kernel (default /run/booted-system/kernel); its initrd SYSTEM_PROFILE/initrd;
# the command line `init=<generation>/init <SYSTEM_PROFILE/kernel-params>`, what the boot
# loader would boot; its signature IMAGE.sig beside the store image if present, else
# STATE_DIR/signatures/<HASH-NAME>.sig, HASH-NAME being the kernel's store directory (as in
# /nix/store/HASH-linux-6.12.8/bzImage: sign once per built kernel, ship the .sig under that
# name). Elsewhere: the newest BOOT_DIR/vmlinuz-RELEASE (BOOT_DIR: /boot), pending when it is
# newer than the running release; its signature IMAGE.sig, else
# STATE_DIR/signatures/vmlinuz-RELEASE.sig; its initrd BOOT_DIR/initrd.img-RELEASE when
# present; the command line: the running one (/proc/cmdline without BOOT_IMAGE=).
# --release R (the system-upgrade-controller Plan's version): the pending kernel must have
# release R (BOOT_DIR/vmlinuz-R; on NixOS the profile's kernel must be R); when R already
# runs nothing is applied (exit 100).
#
# luo: a successful apply ends in a kexec that kills this script (and kured's pod) before it
# can report. So before every apply it writes STATE_DIR/kured/pending.json (target release,
# kernel, time, boot id, newest history id) and removes it when apply returns. A run that
# finds pending.json is the first one after such a kexec (or after a run killed otherwise):
#   - the target runs: "upgraded by a kexec in a previous run", pending.json and the sentinel
#     are removed, exit 100 (unless a newer kernel is pending by now: that one is applied);
#   - the old kernel runs: the newest `mk-upgrade history --json` record says what happened;
#     pending.json is removed, the sentinel kept, and the script exits with that result's
#     code: 10 rolled back (the usual case: the new kernel failed a check and kexec'd back),
#     8 refused, 12 failed or no record of the attempt. kured retries at its next period.
#
# Exit codes (kured only distinguishes 0 from non-zero; any non-zero makes kured log
# "Unable to reboot node" and exit, and on its restart it uncordons the node and releases
# its lock, then goes on checking the sentinel every --period):
#   (none) with the luo platform a successful apply ends in a kexec: the script never returns
#   100    live upgrade done without a reboot (multikernel/emulated platform); or the pending
#          kernel already runs; or (luo) the kexec of a previous run brought the target up:
#          the sentinel is removed, so kured's restart ends its cycle
#   1-14   mk-upgrade's own code (docs/cli.md): NOT upgraded, the old kernel runs everything
#          (10: by rolling back); the sentinel stays, kured retries at its next period.
#          Also (luo) the outcome of a previous run's kexec that came back on the old kernel:
#          10 rolled back, 8 refused, 12 failed or unknown
#   64     usage, or no pending kernel found; the sentinel stays
# Never a blind reboot: with --fallback-reboot, and only for 8 (pre-flight failed),
# 9 (busy), 10 (rolled back), 11 (capture failed), 12 (platform), it runs the reboot command
# (default `systemctl reboot`), a cold boot into the pending kernel. Verification failures
# (3 io, 4 corrupt, 5 untrusted, 6 incompatible, 7 not a kernel) never reboot: that kernel
# must not boot. jq is used when present (the history of a previous run needs it).
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
boot_dir_set=0
system_profile=/nix/var/nix/profiles/system
booted_system=/run/booted-system
nixos_set=0
want_release=""

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
    --boot-dir) boot_dir=${2-}; boot_dir_set=1; shift 2 || usage_error "--boot-dir needs a value" ;;
    --system-profile) system_profile=${2-}; nixos_set=1; shift 2 || usage_error "--system-profile needs a value" ;;
    --booted-system) booted_system=${2-}; nixos_set=1; shift 2 || usage_error "--booted-system needs a value" ;;
    --release) want_release=${2-}; shift 2 || usage_error "--release needs a value" ;;
    --reboot-command) reboot_command=${2-}; shift 2 || usage_error "--reboot-command needs a value" ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) usage_error "unknown option '$1' (see --help)" ;;
    esac
done
[ -n "$sentinel" ] || usage_error "--sentinel needs a value"

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
global=(--state-dir "$state_dir")
[ -z "$platform" ] || global+=(--platform "$platform")
have_jq=0
command -v jq >/dev/null 2>&1 && have_jq=1

mkdir -p "$state_dir/kured" || usage_error "cannot create $state_dir/kured"
record=$state_dir/kured/last-apply.json
pending=$state_dir/kured/pending.json

# The release of an x86 bzImage: the string its setup header's kernel_version field points
# at (0x20E, relative to 0x200), up to the first space; nothing if FILE is not a bzImage.
image_release() {
    local magic ptr
    magic=$(dd if="$1" bs=1 skip=514 count=4 2>/dev/null) || return 1
    [ "$magic" = HdrS ] || return 1
    ptr=$(od -An -tu2 -j 526 -N 2 "$1" 2>/dev/null | tr -d ' ')
    [ -n "$ptr" ] && [ "$ptr" -gt 0 ] || return 1
    dd if="$1" bs=1 skip=$((512 + ptr)) count=128 2>/dev/null | tr '\0' '\n' | head -n 1 | cut -d ' ' -f 1
}

# The running release: mk-upgrade's single active instance (what an upgrade replaces, on
# every platform), else uname -r.
running_release() {
    local r=""
    if [ "$have_jq" = 1 ]; then
        r=$(timeout 60 "$mk_upgrade" "${global[@]}" status --json 2>/dev/null |
            jq -r '[.instances[]? | select(.state == "active") | .kernel_release // empty]
                   | if length == 1 then .[0] else empty end' 2>/dev/null)
    fi
    [ -n "$r" ] || r=$(uname -r)
    printf '%s\n' "$r"
}

# The newest record of `mk-upgrade history --json` (one line of JSON), or nothing.
newest_history() {
    [ "$have_jq" = 1 ] || return 0
    timeout 60 "$mk_upgrade" "${global[@]}" history --json 2>/dev/null |
        jq -c 'if type == "array" and length > 0 then sort_by(.started_at) | last else empty end' 2>/dev/null
}

# A value of pending.json (written below: one "key": "value" per line).
pending_value() {
    if [ "$have_jq" = 1 ]; then
        jq -r --arg k "$1" '.[$k] // empty' "$pending" 2>/dev/null
    else
        sed -n "s/^  \"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" "$pending" | head -n 1
    fi
}

json_string() { # a JSON string literal of $1 (backslash and double quote escaped)
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

write_pending() { # write_pending TARGET_RELEASE
    local hist_id="" boot_id=""
    [ "$have_jq" = 0 ] || hist_id=$(newest_history | jq -r '.upgrade_id // empty' 2>/dev/null)
    boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)
    {
        echo "{"
        echo "  \"target_release\": $(json_string "$1"),"
        echo "  \"kernel\": $(json_string "$kernel"),"
        echo "  \"platform\": $(json_string "${platform:-auto}"),"
        echo "  \"started_at\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
        echo "  \"boot_id\": $(json_string "$boot_id"),"
        echo "  \"history_last_id\": $(json_string "$hist_id"),"
        echo "  \"pid\": \"$$\""
        echo "}"
    } >"$pending.tmp" || usage_error "cannot write $pending.tmp"
    mv -f "$pending.tmp" "$pending" || usage_error "cannot write $pending"
    # A kexec does not wait for the page cache: make the file and its name durable first.
    sync "$pending" "${pending%/*}" 2>/dev/null || sync
}

nothing_to_do() { # nothing_to_do MESSAGE
    log "$*"
    rm -f "$sentinel"
    log "removed $sentinel; exiting 100 so kured restarts, uncordons this node and releases its lock"
    exit 100
}

not_upgraded() { # not_upgraded CODE: the old kernel runs; maybe the fallback reboot
    local rc=$1
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
}

running=$(running_release)
after_kexec=""

# A previous run that never returned: its apply ended in a kexec (luo), or it was killed.
if [ -f "$pending" ]; then
    target=$(pending_value target_release)
    when=$(pending_value started_at)
    before_id=$(pending_value history_last_id)
    rec=$(newest_history)
    rec_id="" result="" detail=""
    if [ -n "$rec" ]; then
        rec_id=$(jq -r '.upgrade_id // empty' <<<"$rec")
        result=$(jq -r '.result // empty' <<<"$rec")
        detail=$(jq -r '"upgrade \(.upgrade_id // "?"): \(.kind // "apply") \(.kernel_before // "?") -> \(.kernel_after // "?"), result \(.result // "?")\(if .error then ": " + .error else "" end)"' <<<"$rec")
    fi
    [ -z "$rec_id" ] || [ "$rec_id" != "$before_id" ] || { result="" detail="no history record of that attempt"; }
    if [ -n "$target" ] && [ "$target" = "$running" ]; then
        log "upgraded by a kexec in a previous run: $target runs (attempt started $when; ${detail:-no history record})"
        rm -f "$pending"
        after_kexec=$target
    else
        log "the previous run (to ${target:-?}, started $when) did not return and the host runs $running, not ${target:-?}"
        if [ "$have_jq" = 0 ]; then
            detail="jq is not installed: read \`mk-upgrade history\`"
        fi
        rm -f "$pending"
        case "$result" in
        rolled-back)
            log "it rolled back by itself: ${detail}"
            rc=10
            ;;
        refused)
            log "it was refused: ${detail}"
            rc=8
            ;;
        *)
            log "it failed or its outcome is unknown: ${detail:-no history record}"
            rc=12
            ;;
        esac
        log "NOT upgraded: exit $rc; the sentinel $sentinel stays"
        not_upgraded "$rc"
    fi
fi

if [ -n "$want_release" ] && [ "$want_release" = "$running" ]; then
    if [ -n "$after_kexec" ]; then
        nothing_to_do "$want_release runs: upgraded by a kexec in a previous run"
    fi
    nothing_to_do "the requested release $want_release already runs"
fi

layout=boot
if [ "$boot_dir_set" = 0 ] && { [ "$nixos_set" = 1 ] || [ -e /etc/NIXOS ] || [ -e /run/current-system ]; }; then
    layout=nixos
fi

if [ -z "$kernel" ] && [ "$layout" = nixos ]; then
    # NixOS: the newest generation's kernel (what the boot loader boots next) against the
    # booted generation's.
    [ -e "$system_profile/kernel" ] || usage_error "no pending kernel: $system_profile/kernel does not exist (pass --kernel or --system-profile)"
    generation=$(readlink -f "$system_profile")
    kernel=$(readlink -f "$system_profile/kernel")
    booted_kernel=$(readlink -f "$booted_system/kernel" 2>/dev/null || true)
    release=$(image_release "$kernel" || true)
    if [ -n "$want_release" ] && [ "$release" != "$want_release" ]; then
        usage_error "the system profile's kernel $kernel is ${release:-not a bzImage}, not the requested $want_release"
    fi
    if [ "$kernel" = "$booted_kernel" ]; then
        if [ -n "$after_kexec" ]; then
            nothing_to_do "the system profile's kernel is the booted one: upgraded by a kexec in a previous run"
        fi
        nothing_to_do "nothing pending: the system profile's kernel $kernel is the booted one ($booted_system)"
    fi
    log "NixOS: generation $generation, kernel $kernel (booted: ${booted_kernel:-unknown})"
    if [ -z "$initrd" ] && [ -e "$system_profile/initrd" ]; then
        initrd=$(readlink -f "$system_profile/initrd")
    fi
    if [ "$cmdline_set" = 0 ]; then
        cmdline="init=$generation/init"
        if [ -r "$system_profile/kernel-params" ]; then
            params=$(tr '\n' ' ' <"$system_profile/kernel-params" | sed 's/ *$//')
            [ -z "$params" ] || cmdline="$cmdline $params"
        fi
        cmdline_set=1
    fi
    if [ -z "$signature" ] && [ ! -e "$kernel.sig" ]; then
        store_name=${kernel%/*}
        store_name=${store_name##*/}
        [ ! -e "$state_dir/signatures/$store_name.sig" ] || signature=$state_dir/signatures/$store_name.sig
    fi
elif [ -z "$kernel" ]; then
    if [ -n "$want_release" ]; then
        release=$want_release
        [ -f "$boot_dir/vmlinuz-$release" ] || usage_error "no pending kernel: $boot_dir/vmlinuz-$release does not exist"
    else
        # The newest BOOT_DIR/vmlinuz-RELEASE; pending when it is newer than the running one.
        release=$(find "$boot_dir" -maxdepth 1 -name 'vmlinuz-*' -type f 2>/dev/null |
            sed 's|^.*/vmlinuz-||' | sort -V | tail -n 1)
        [ -n "$release" ] || usage_error "no pending kernel: no $boot_dir/vmlinuz-* (pass --kernel)"
        if [ "$release" = "$running" ]; then
            if [ -n "$after_kexec" ]; then
                nothing_to_do "the newest kernel $release runs: upgraded by a kexec in a previous run"
            fi
            nothing_to_do "nothing pending: the newest kernel in $boot_dir, $release, already runs"
        fi
        if [ "$(printf '%s\n%s\n' "$release" "$running" | sort -V | tail -n 1)" = "$running" ]; then
            usage_error "no pending kernel: the newest in $boot_dir, $release, is older than the running $running (pass --kernel)"
        fi
    fi
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

target=$(image_release "$kernel" || true)
if [ -n "$want_release" ] && [ -n "$target" ] && [ "$target" != "$want_release" ]; then
    usage_error "$kernel is release $target, not the requested $want_release"
fi
if [ -n "$target" ] && [ "$target" = "$running" ]; then
    if [ -n "$after_kexec" ]; then
        nothing_to_do "$target runs: upgraded by a kexec in a previous run"
    fi
    nothing_to_do "the pending kernel already runs: $kernel is $target"
fi

args=("${global[@]}" apply --kernel "$kernel" --json)
[ -z "$signature" ] || args+=(--signature "$signature")
[ -z "$initrd" ] || args+=(--initrd "$initrd")
[ -z "$cmdline" ] || args+=(--cmdline "$cmdline")

log "live upgrade to $kernel (release ${target:-?}, running $running; record: $record)"
write_pending "${target:-$kernel}"
log "running: $mk_upgrade ${args[*]}"
rc=0
"$mk_upgrade" "${args[@]}" >"$record.tmp" || rc=$?
# apply returned (no kexec, or a kexec that did not happen): its result is known here.
rm -f "$pending"
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
not_upgraded "$rc"
