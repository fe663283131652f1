# shellcheck shell=bash
# Shared helpers for build-kernel.sh and get-test-kernels.sh. Sourced, not executed.
# Everything is logged to stderr; stdout is reserved for the two kernel paths.

MK_KP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MK_REPO_ROOT="$(cd "$MK_KP_DIR/.." && pwd)"
# CI runs in a fresh clone with shared/ beside it: <parent>/main + <parent>/shared.
MK_SHARED_KERNELS="${MK_SHARED_KERNELS:-$MK_REPO_ROOT/../shared/kernels}"
MK_KERNEL_CACHE="${MK_KERNEL_CACHE:-/var/cache/mk-upgrade/kernels}"
# Fragments are merged in this order (later wins).
MK_FRAGMENTS=("$MK_KP_DIR/configs/kho-luo.config" "$MK_KP_DIR/configs/test-vm.config"
    "$MK_KP_DIR/configs/criu.config")
# The lowest kernel with LUO (/dev/liveupdate) in mainline.
MK_MIN_KERNEL="6.19"

mk_log() { printf '[mk-kernel] %s\n' "$*" >&2; }
mk_die() { printf '[mk-kernel] error: %s\n' "$*" >&2; exit 1; }

# sha256 of the fragments (in merge order), first 12 hex digits: the cache key's config half.
mk_fragment_hash() {
    cat "${MK_FRAGMENTS[@]}" | sha256sum | cut -c1-12
}

# Prints "A\nB" when MK_TEST_KERNEL_A/B are set and readable.
mk_find_env() {
    [[ -n "${MK_TEST_KERNEL_A:-}" || -n "${MK_TEST_KERNEL_B:-}" ]] || return 1
    [[ -r "${MK_TEST_KERNEL_A:-}" ]] || mk_die "MK_TEST_KERNEL_A='${MK_TEST_KERNEL_A:-}' is not a readable file (set both MK_TEST_KERNEL_A and MK_TEST_KERNEL_B, or neither)"
    [[ -r "${MK_TEST_KERNEL_B:-}" ]] || mk_die "MK_TEST_KERNEL_B='${MK_TEST_KERNEL_B:-}' is not a readable file (set both MK_TEST_KERNEL_A and MK_TEST_KERNEL_B, or neither)"
    mk_log "using prebuilt kernels from MK_TEST_KERNEL_A/B"
    printf '%s\n%s\n' "$MK_TEST_KERNEL_A" "$MK_TEST_KERNEL_B"
}

# mk_config_lacks <config>: prints the fragments' `CONFIG_X=y` options the full kernel config
# file <config> does not set (none: it covers them all).
mk_config_lacks() {
    local opt
    while IFS= read -r opt; do
        grep -qx -- "$opt" "$1" || printf '%s\n' "${opt%%=*}"
    done < <(cat "${MK_FRAGMENTS[@]}" | grep -E '^CONFIG_[A-Z0-9_]+=y$' | sort -u)
}

# Prints "A\nB" from ../shared/kernels when present, its SHA256SUMS verify and its kernel
# config (full-mkA.config or config-*-mkA, when there is one) sets every option of the
# fragments: prebuilt kernels from before an option was added are not used.
mk_find_shared() {
    local dir="$MK_SHARED_KERNELS" a b
    [[ -f "$dir/SHA256SUMS" ]] || return 1
    a="$(ls "$dir"/bzImage-*-mkA 2>/dev/null | head -n1)"
    b="$(ls "$dir"/bzImage-*-mkB 2>/dev/null | head -n1)"
    [[ -n "$a" && -n "$b" ]] || { mk_log "shared kernels: no bzImage-*-mkA/-mkB in $dir"; return 1; }
    if ! (cd "$dir" && sha256sum --check --quiet --strict SHA256SUMS >&2); then
        mk_log "shared kernels: SHA256SUMS in $dir do not match; ignoring them"
        return 1
    fi
    local cfg lacking
    cfg="$(ls "$dir"/full-mkA.config "$dir"/config-*-mkA 2>/dev/null | head -n1)"
    if [[ -n "$cfg" ]]; then
        lacking="$(mk_config_lacks "$cfg" | tr '\n' ' ')"
        if [[ -n "$lacking" ]]; then
            mk_log "shared kernels: $(basename "$cfg") lacks ${lacking}(set by kernel-patches/configs/); not using them"
            return 1
        fi
    else
        mk_log "shared kernels: no kernel config beside them; the fragments' options are not checked"
    fi
    mk_log "using shared prebuilt kernels from $(cd "$dir" && pwd) (SHA256SUMS ok)"
    printf '%s\n%s\n' "$(cd "$dir" && pwd)/$(basename "$a")" "$(cd "$dir" && pwd)/$(basename "$b")"
}

# Prints "A\nB" from the local cache: newest <source-version>-<fragment-hash> entry whose
# SHA256SUMS verify. Works without apt (no need to know the source version up front).
mk_find_cache() {
    local hash d a b
    hash="$(mk_fragment_hash)"
    [[ -d "$MK_KERNEL_CACHE" ]] || return 1
    while IFS= read -r d; do
        [[ -f "$d/SHA256SUMS" ]] || continue
        a="$(ls "$d"/bzImage-*-mkA 2>/dev/null | head -n1)"
        b="$(ls "$d"/bzImage-*-mkB 2>/dev/null | head -n1)"
        [[ -n "$a" && -n "$b" ]] || continue
        (cd "$d" && sha256sum --check --quiet --strict SHA256SUMS >&2) || continue
        mk_log "using cached kernels from $d"
        printf '%s\n%s\n' "$a" "$b"
        return 0
    done < <(ls -d "$MK_KERNEL_CACHE"/*-"$hash" 2>/dev/null | sort -V -r)
    return 1
}
