# shellcheck shell=bash
# nix/live-upgrade.sh: the NixOS module's live upgrade on `nixos-rebuild switch`
# (services.mk-upgrade.liveUpgradeOnSwitch; docs/nixos.md "Live upgrade on switch").
#
#   live-upgrade.sh schedule SYSTEM   from the activation script (NIXOS_ACTION set by
#                                     switch-to-configuration): decide, and leave a request
#   live-upgrade.sh run               mk-upgrade-live.service: wait for the switch to end,
#                                     then `mk-upgrade apply --platform luo`
#   live-upgrade.sh booted-initrd     mk-agentd-serve.service's ExecStartPre: the booted
#                                     generation's initrd (with boot.initrd.secrets) for the
#                                     way back
#
# The switch never waits for the upgrade: `schedule` only writes RUN/mk-upgrade/
# live-upgrade.request, which mk-upgrade-live.path turns into a start of
# mk-upgrade-live.service; that unit takes switch-to-configuration's own lock
# (RUN/nixos/switch-to-configuration.lock), so it starts its apply only after the switch
# has finished, and no other switch runs while the kernel is being replaced.
#
# Environment: MK_STATE_DIR (the module's stateDir); PATH with mk-upgrade, jq, coreutils,
# util-linux (flock). MK_LIVE_ROOT (default empty) is put in front of /run and /nix/var so
# that nix/check/run.sh can run this script against scratch trees.
set -euo pipefail

root=${MK_LIVE_ROOT:-}
state=${MK_STATE_DIR:?MK_STATE_DIR is not set}
run_dir=$root/run/mk-upgrade
request=$run_dir/live-upgrade.request
record_dir=$state/nixos-switch
failed=$record_dir/failed.json
attempt=$record_dir/attempt.json
lock=$root/run/nixos/switch-to-configuration.lock
profiles=$root/nix/var/nix/profiles
# How long `run` waits for a switch to end before giving up (seconds; well inside the
# unit's TimeoutStartSec, so that the message and the record are written).
lock_wait=${MK_LIVE_LOCK_WAIT:-1800}

say() { echo "mk-upgrade: $*"; }
warn() { echo "mk-upgrade: $*" >&2; }

# The live-upgrade settings the generation SYSTEM was built with (written by the module
# into its /etc): kernel (store path of the image the signature belongs to), signature,
# insecureAllowUnsigned, extraApplyArgs.
manifest_of() { echo "$1/etc/mk-upgrade/live-upgrade.json"; }

# identity SYSTEM: what a live upgrade to SYSTEM consists of. A failure is remembered under
# it, and not retried until it changes: the kernel, the initrd, the kernel parameters, the
# signature and the apply options (not the toplevel path: an unrelated change to the
# configuration does not make a failed kernel work).
identity() {
    local sys=$1
    {
        readlink -f "$sys/kernel"
        readlink -f "$sys/initrd"
        cat "$sys/kernel-params" 2>/dev/null || true
        echo
        jq -c '{signature, insecureAllowUnsigned, extraApplyArgs}' "$(manifest_of "$sys")"
    } | sha256sum | cut -d' ' -f1
}

# generation_of SYSTEM: the newest number N of the system profile generations
# (system-N-link) pointing at SYSTEM (the last time it became a generation), or nothing.
generation_of() {
    local l n found=
    for l in "$profiles"/system-*-link; do
        [ -e "$l" ] || continue
        n=${l##*/system-}
        n=${n%-link}
        case $n in '' | *[!0-9]*) continue ;; esac
        if [ "$(readlink -f "$l")" = "$1" ] && { [ -z "$found" ] || [ "$n" -gt "$found" ]; }; then
            found=$n
        fi
    done
    echo "$found"
}

newest_generation() {
    local l n max=0
    for l in "$profiles"/system-*-link; do
        [ -e "$l" ] || continue
        n=${l##*/system-}
        n=${n%-link}
        case $n in '' | *[!0-9]*) continue ;; esac
        [ "$n" -gt "$max" ] && max=$n
    done
    echo "$max"
}

# is_boot_default SYSTEM: the system profile (what the boot loader boots by default) points
# at SYSTEM. Not so after `nixos-rebuild test`, for a specialisation (`switch
# --specialisation X` activates .../specialisation/X; the boot default stays the base), or
# for a generation activated without being made the profile's.
is_boot_default() {
    [ "$(readlink -f "$profiles/system" 2>/dev/null || true)" = "$1" ]
}

# remembered ID: why an upgrade under identity ID is not tried again, or nothing. A failure
# the apply reported (failed.json), or an attempt that never reported and left the old
# kernel running (attempt.json: on luo, a new kernel that failed after the kexec and came
# back; or the script killed).
remembered() {
    local id=$1 booted
    if [ -e "$failed" ] && [ "$(jq -r '.identity // empty' "$failed" 2>/dev/null)" = "$id" ]; then
        jq -r '"it failed at \(.at) (exit \(.exit), \(.name)): \(.error)"' "$failed"
        return
    fi
    booted=$(readlink -f "$root/run/booted-system/kernel")
    if [ -e "$attempt" ] && [ "$(jq -r '.identity // empty' "$attempt" 2>/dev/null)" = "$id" ] &&
        [ "$(jq -r '.kernel' "$attempt")" != "$booted" ]; then
        jq -r '"it was attempted at \(.at) and the old kernel still runs (no result came back: see mk-upgrade history)"' "$attempt"
    fi
}

cmd_schedule() {
    local sys=${1:?schedule SYSTEM} action=${NIXOS_ACTION:-} booted new
    sys=$(readlink -f "$sys")
    booted=$(readlink -f "$root/run/booted-system/kernel")
    new=$(readlink -f "$sys/kernel")
    case $action in
        switch) ;;
        test)
            rm -f "$request"
            if [ "$booted" != "$new" ]; then
                say "no live upgrade: 'nixos-rebuild test' activates a generation that is not the boot default, so the running kernel $booted stays (the live upgrade to $new happens on 'nixos-rebuild switch')"
            fi
            return 0
            ;;
        dry-activate)
            # Dry activation changes nothing, not even a pending request.
            [ "$booted" = "$new" ] || say "would schedule a live upgrade $booted -> $new after the switch"
            return 0
            ;;
        *)
            # Boot-time activation (no NIXOS_ACTION): a kernel change waits for a switch.
            return 0
            ;;
    esac
    # An earlier switch's request that has not run yet is void now: this switch decides.
    rm -f "$request"
    [ "$booted" != "$new" ] || return 0
    if ! is_boot_default "$sys"; then
        say "no live upgrade: $sys is not the boot default (a specialisation, or a generation activated without becoming the system profile's); the running kernel $booted stays"
        return 0
    fi
    if [ ! -e "$(manifest_of "$sys")" ]; then
        say "no live upgrade: $sys does not enable services.mk-upgrade.liveUpgradeOnSwitch"
        return 0
    fi
    local id why
    id=$(identity "$sys")
    why=$(remembered "$id")
    if [ -n "$why" ]; then
        warn "live upgrade to $new NOT retried: $why."
        warn "It is tried again when the kernel, initrd, kernel parameters, signature or apply options change, or now with: systemctl start mk-upgrade-live.service"
        return 0
    fi
    mkdir -p "$run_dir"
    chmod 0700 "$run_dir"
    # The script of THIS generation: the unit that the path unit starts may still be the
    # previous generation's (switch-to-configuration reloads units after activation); it
    # hands over to this one once it holds the lock.
    jq -n --arg system "$sys" --arg kernel "$new" --arg booted "$booted" --arg id "$id" \
        --arg script "${MK_LIVE_WRAPPER:-}" --arg at "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        '{system: $system, kernel: $kernel, booted_kernel: $booted, identity: $id, script: $script, scheduled_at: $at}' \
        >"$request.tmp"
    mv -f "$request.tmp" "$request"
    say "live upgrade $booted -> $new scheduled: mk-upgrade-live.service runs it when this switch has finished"
    say "follow it with 'journalctl -fu mk-upgrade-live.service'; the result: 'mk-upgrade history', $record_dir/last-apply.json"
}

# The exit names of docs/cli.md.
exit_name() {
    case $1 in
        0) echo ok ;; 2) echo usage ;; 3) echo io ;; 4) echo corrupt ;; 5) echo untrusted ;;
        6) echo incompatible ;; 7) echo not-a-kernel ;; 8) echo preflight-failed ;;
        9) echo busy ;; 10) echo rolled-back ;; 11) echo capture-failed ;; 12) echo platform ;;
        14) echo nothing-to-do ;; *) echo internal ;;
    esac
}

# not_done ID KERNEL EXIT RESULT ERROR: remember the failure (not retried until ID changes)
# and say that the old kernel keeps everything.
not_done() {
    local id=$1 kernel=$2 rc=$3 result=$4 err=$5 name
    name=$(exit_name "$rc")
    mkdir -p "$record_dir"
    rm -f "$attempt"
    warn "live upgrade to $kernel NOT done: exit $rc ($name), result $result${err:+: $err}"
    warn "the running kernel $(uname -r) keeps every workload; the new generation is the boot default and its kernel takes effect at the next reboot"
    case $rc in
        3 | 9)
            # I/O trouble, or another upgrade in flight: worth trying again at the next switch.
            warn "not remembered (exit $rc may pass): the next switch tries again"
            ;;
        *)
            jq -n --arg id "$id" --arg kernel "$kernel" --argjson exit "$rc" --arg name "$name" \
                --arg result "$result" --arg error "$err" --arg at "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
                '{identity: $id, kernel: $kernel, exit: $exit, name: $name, result: $result, error: $error, at: $at}' \
                >"$failed.tmp"
            mv -f "$failed.tmp" "$failed"
            warn "not retried on later switches until the kernel, initrd, kernel parameters, signature or apply options change (now: systemctl start mk-upgrade-live.service)"
            ;;
    esac
    return 1
}

cmd_run() {
    local sys manual=0
    if [ -n "${MK_LIVE_HANDED_SYSTEM:-}" ]; then
        # Handed over by the previous generation's script, which holds the lock on fd 9.
        sys=$MK_LIVE_HANDED_SYSTEM
    elif [ -e "$request" ]; then
        sys=$(jq -r '.system' "$request")
        local script
        script=$(jq -r '.script // empty' "$request")
        rm -f "$request"
    else
        # Started by hand (`systemctl start mk-upgrade-live.service`): the running
        # configuration; a remembered failure is retried.
        manual=1
        sys=$(readlink -f "$root/run/current-system")
    fi

    if [ -z "${MK_LIVE_HANDED_SYSTEM:-}" ]; then
        # Wait for switch-to-configuration to finish (it holds this lock while it runs),
        # and hold the lock while the kernel is replaced: a switch started meanwhile is
        # refused by switch-to-configuration ("Could not acquire lock") instead of being cut
        # by the kexec. Only this shell holds it: the commands it starts get `9>&-`, so
        # nothing they leave running (a supervisor, on the emulated platform) keeps it.
        if [ -d "${lock%/*}" ] || mkdir -p "${lock%/*}" 2>/dev/null; then
            exec 9>>"$lock"
            if ! flock -w "$lock_wait" 9; then
                warn "no live upgrade: switch-to-configuration still holds $lock after ${lock_wait}s; retry with: systemctl start mk-upgrade-live.service"
                return 1
            fi
        else
            say "no ${lock%/*} (no switch since boot): going on without the switch lock"
        fi
        # The request names the script of the generation that scheduled it; the unit that
        # started may be the previous generation's. Hand over to the new one (it inherits
        # the lock on fd 9).
        if [ -n "${script:-}" ] && [ -x "$script" ] && [ "$script" != "${MK_LIVE_WRAPPER:-}" ]; then
            say "handing over to the switched-to generation's script $script"
            MK_LIVE_HANDED_SYSTEM=$sys exec "$script" run
        fi
    fi

    local current booted new
    current=$(readlink -f "$root/run/current-system")
    if [ "$current" != "$sys" ]; then
        say "no live upgrade to $sys: a later switch activated $current (it schedules its own)"
        return 0
    fi
    if ! is_boot_default "$sys"; then
        warn "no live upgrade: the running configuration $sys is not the boot default ($(readlink -f "$profiles/system" 2>/dev/null || echo none)): after 'nixos-rebuild test', or a specialisation"
        return 1
    fi
    booted=$(readlink -f "$root/run/booted-system/kernel")
    new=$(readlink -f "$sys/kernel")
    if [ "$booted" = "$new" ]; then
        say "the configuration's kernel is the running one ($new): nothing to do"
        return 0
    fi
    local manifest id
    manifest=$(manifest_of "$sys")
    if [ ! -e "$manifest" ]; then
        say "no live upgrade: $sys does not enable services.mk-upgrade.liveUpgradeOnSwitch"
        return 0
    fi
    id=$(identity "$sys")
    if [ "$manual" = 1 ]; then rm -f "$failed" "$attempt"; fi

    # The signature belongs to one kernel image: the one this generation was built with.
    local signed_kernel args=()
    signed_kernel=$(jq -r '.kernel' "$manifest")
    if [ "$(readlink -f "$signed_kernel")" != "$new" ]; then
        not_done "$id" "$new" 5 refused "the generation's signature is for $signed_kernel, not its kernel $new"
        return 1
    fi
    if [ "$(jq -r '.signature // empty' "$manifest")" != "" ]; then
        args+=(--signature "$(jq -r '.signature' "$manifest")")
    elif [ "$(jq -r '.insecureAllowUnsigned' "$manifest")" = true ]; then
        args+=(--insecure-allow-unsigned)
    fi
    mapfile -t extra < <(jq -r '.extraApplyArgs[]?' "$manifest")
    args+=("${extra[@]}")

    # Going back: a generation older than the newest one (`nixos-rebuild switch
    # --rollback`) is allowed to run an older kernel (--allow-downgrade). The version floor
    # still applies: a kernel below the host's floor is refused (exit 6) and takes effect
    # only at the next reboot.
    local gen newest
    gen=$(generation_of "$sys")
    newest=$(newest_generation)
    if [ -n "$gen" ] && [ "$gen" -lt "$newest" ]; then
        say "generation $gen is older than the newest ($newest): going back, --allow-downgrade (the version floor still applies)"
        args+=(--allow-downgrade)
    fi

    # The way back must boot the booted generation with its boot.initrd.secrets.
    if [ -e "$run_dir/booted-initrd.no-secrets" ]; then
        not_done "$id" "$new" 8 refused "the host agent's way back has no boot.initrd.secrets ($(cat "$run_dir/booted-initrd.no-secrets")): a failed upgrade would boot the old kernel without them; fix the secrets and restart mk-agentd-serve.service"
        return 1
    fi

    # The initrd the boot loader would give this generation, with boot.initrd.secrets
    # appended the way the boot loader does it (the store copy has none).
    local initrd
    initrd=$(readlink -f "$sys/initrd")
    mkdir -p "$run_dir"
    chmod 0700 "$run_dir"
    local with_secrets=$run_dir/target-initrd
    rm -f "$with_secrets"
    if [ -e "$sys/append-initrd-secrets" ]; then
        (umask 077 && cp "$initrd" "$with_secrets")
        if ! "$sys/append-initrd-secrets" "$with_secrets" 9>&-; then
            rm -f "$with_secrets"
            not_done "$id" "$new" 8 refused "cannot append boot.initrd.secrets to the initrd ($sys/append-initrd-secrets failed): the new kernel would boot without them"
            return 1
        fi
        initrd=$with_secrets
    fi

    # Remembered before the apply: on luo a success or a failure after the kexec ends this
    # script without a result; if the old kernel still runs at the next switch, the attempt
    # counts as failed (remembered()).
    mkdir -p "$record_dir"
    local out=$record_dir/last-apply.json rc=0
    rm -f "$out" "$out.tmp"
    jq -n --arg id "$id" --arg kernel "$new" --arg at "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        '{identity: $id, kernel: $kernel, at: $at}' >"$attempt.tmp"
    mv -f "$attempt.tmp" "$attempt"
    say "live upgrade $booted -> $new (generation ${gen:-?})"
    mk-upgrade --state-dir "$state" --platform luo apply \
        --kernel "$new" --initrd "$initrd" \
        --cmdline "init=$sys/init $(cat "$sys/kernel-params" 2>/dev/null || true)" \
        "${args[@]}" --json >"$out.tmp" 9>&- || rc=$?
    mv -f "$out.tmp" "$out"
    rm -f "$with_secrets"
    local result err
    result=$(jq -r '.result // "no report"' "$out" 2>/dev/null || echo "no report")
    err=$(jq -r '[.error // empty] + [.checks[]? | select(.ok | not) | "\(.name): \(.detail)"] | join("; ")' "$out" 2>/dev/null || true)
    case $rc in
        0)
            rm -f "$failed" "$attempt"
            say "upgraded live to $(jq -r '.kernel_after' "$out") (record: $out)"
            return 0
            ;;
        14)
            rm -f "$attempt"
            say "nothing to do: $err"
            return 0
            ;;
    esac
    not_done "$id" "$new" "$rc" "$result" "$err"
}

# The booted generation's initrd with its boot.initrd.secrets, for the host agent's way
# back. If the secrets cannot be appended the agent still starts (its workloads must run)
# with the plain initrd, and live upgrades are refused until this is fixed.
cmd_booted_initrd() {
    local booted out=$run_dir/booted-initrd
    booted=$(readlink -f "$root/run/booted-system")
    mkdir -p "$run_dir"
    chmod 0700 "$run_dir"
    rm -f "$out" "$run_dir/booted-initrd.no-secrets"
    (umask 077 && cp "$(readlink -f "$booted/initrd")" "$out")
    if [ -e "$booted/append-initrd-secrets" ] && ! "$booted/append-initrd-secrets" "$out"; then
        (umask 077 && cp "$(readlink -f "$booted/initrd")" "$out")
        echo "$booted/append-initrd-secrets failed at $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$run_dir/booted-initrd.no-secrets"
        warn "cannot append boot.initrd.secrets to the booted generation's initrd: the host agent starts with the plain one, and live upgrades are refused until this is fixed (then restart mk-agentd-serve.service)"
    fi
    return 0
}

case ${1:-} in
    schedule) cmd_schedule "${2:-}" ;;
    run) cmd_run ;;
    booted-initrd) cmd_booted_initrd ;;
    *)
        warn "usage: live-upgrade.sh schedule SYSTEM | run | booted-initrd"
        exit 2
        ;;
esac
