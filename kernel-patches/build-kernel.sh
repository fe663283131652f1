#!/usr/bin/env bash
# Build (or find) the two KHO/LUO test kernels: one Linux tree, two bzImages that differ only
# in CONFIG_LOCALVERSION (-mkA / -mkB), so `uname -r` tells which kernel a VM runs.
#
# usage: kernel-patches/build-kernel.sh [--force] [--rebuild]
#   (no flag)  MK_TEST_KERNEL_A/B -> ../shared/kernels (SHA256SUMS checked) -> local cache -> build
#   --force    skip MK_TEST_KERNEL_A/B and ../shared/kernels: use the local cache or build
#   --rebuild  like --force, and rebuild even if the local cache has this source+fragment key
# Prints two lines on stdout: the path of kernel A, then kernel B. Logs go to stderr.
#
# Environment:
#   MK_KERNEL_CACHE   cache root (default /var/cache/mk-upgrade/kernels); entries are
#                     <debian-source-version>-<sha256(fragments)[:12]>/bzImage-<release>
#   MK_KERNEL_WORK    where the source is unpacked and built (default /var/tmp/mk-upgrade/kbuild)
#   MK_KERNEL_JOBS    make -j (default: number of CPUs)
#   MK_KERNEL_NICE    nice level for make (default 10; use 19 on a shared machine)
#   MK_DEBIAN_MIRROR  Debian mirror URL; default: derived from this machine's apt sources
#   MK_KERNEL_SUITES  suites searched for linux-source-* (default "sid trixie-backports")
#   MK_TEST_KERNEL_A, MK_TEST_KERNEL_B   prebuilt kernels to use instead of building
set -euo pipefail
# shellcheck source=kernel-patches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=0
rebuild=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --rebuild) force=1; rebuild=1 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) mk_die "unknown argument '$arg' (see --help)" ;;
    esac
done

if [[ $force -eq 0 ]]; then
    mk_find_env && exit 0
    mk_find_shared && exit 0
fi
if [[ $rebuild -eq 0 ]]; then
    mk_find_cache && exit 0
fi

SUDO=""
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || mk_die "building needs root (apt-get install) and sudo is not installed"
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
JOBS="${MK_KERNEL_JOBS:-$(nproc)}"
NICE="${MK_KERNEL_NICE:-10}"
SUITES="${MK_KERNEL_SUITES:-sid trixie-backports}"
WORK="${MK_KERNEL_WORK:-/var/tmp/mk-upgrade/kbuild}"
t_start=$(date +%s)

# --- 1. a Debian mirror, taken from this machine's apt sources --------------------------------
# Both one-line (sources.list, *.list) and deb822 (*.sources) formats. The first URI whose path
# ends in /debian (not debian-security, not a third-party repository) is the mirror.
mk_apt_mirror() {
    if [[ -n "${MK_DEBIAN_MIRROR:-}" ]]; then echo "$MK_DEBIAN_MIRROR"; return; fi
    local f uri
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        # deb [opts] URI suite components...
        while read -r uri; do
            [[ "$uri" =~ /debian/?$ ]] && { echo "${uri%/}"; return; }
        done < <(sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' "$f")
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        while read -r uri; do
            [[ "$uri" =~ /debian/?$ ]] && { echo "${uri%/}"; return; }
        done < <(sed -E -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n')
    done
    return 1
}
# The keyring the existing Debian source trusts (deb822 Signed-By), else Debian's default one.
mk_apt_keyring() {
    local k
    k="$(sed -E -n 's/^Signed-By:[[:space:]]*(\/.*debian-archive-keyring\.gpg)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)"
    echo "${k:-/usr/share/keyrings/debian-archive-keyring.gpg}"
}

mirror="$(mk_apt_mirror)" || mk_die "no Debian mirror found in /etc/apt/sources.list* (no URI ending in /debian); set MK_DEBIAN_MIRROR=<url>"
keyring="$(mk_apt_keyring)"
mk_log "Debian mirror from this machine's apt sources: $mirror (suites: $SUITES)"

# --- 2. add the kernel-source suites with pin priority 1 ---------------------------------------
# Priority 1 (< 100): a package from these suites is installed only if no version of it is
# installed, i.e. only when asked for by name. Nothing already installed is upgraded from them.
src_file=/etc/apt/sources.list.d/mk-kernel-source.sources
pin_file=/etc/apt/preferences.d/mk-kernel-source.pref
{
    echo "# Added by mk-upgrade kernel-patches/build-kernel.sh: linux-source-* for the KHO/LUO test kernels."
    echo "Types: deb"
    echo "URIs: $mirror"
    echo "Suites: $SUITES"
    echo "Components: main"
    echo "Signed-By: $keyring"
} | $SUDO tee "$src_file.new" >/dev/null
{
    echo "# Added by mk-upgrade kernel-patches/build-kernel.sh: never upgrade anything from these suites."
    for s in $SUITES; do
        printf 'Package: *\nPin: release n=%s\nPin-Priority: 1\n\n' "$s"
    done
} | $SUDO tee "$pin_file.new" >/dev/null
$SUDO mv "$pin_file.new" "$pin_file"
$SUDO mv "$src_file.new" "$src_file"

mk_log "apt-get update"
$SUDO apt-get update -q >&2 || mk_die "apt-get update failed (see above); the kernel source suites ($SUITES) at $mirror must be reachable"

# --- 3. newest linux-source-X.Y >= 6.19 ---------------------------------------------------------
pkg=""
while read -r name; do
    ver="${name#linux-source-}"
    # Skip those below the LUO minimum.
    [[ "$(printf '%s\n%s\n' "$MK_MIN_KERNEL" "$ver" | sort -V | head -n1)" == "$MK_MIN_KERNEL" ]] || continue
    cand="$(apt-cache policy "$name" | sed -n 's/^[[:space:]]*Candidate:[[:space:]]*//p')"
    [[ -n "$cand" && "$cand" != "(none)" ]] || continue
    pkg="$name"
done < <(apt-cache pkgnames linux-source- | grep -E '^linux-source-[0-9]+\.[0-9]+$' | sort -V)
[[ -n "$pkg" ]] || mk_die "no linux-source-X.Y >= $MK_MIN_KERNEL in the apt lists (suites: $SUITES at $mirror)"
mk_log "kernel source package: $pkg ($(apt-cache policy "$pkg" | sed -n 's/^[[:space:]]*Candidate:[[:space:]]*//p'))"

mk_log "apt-get install $pkg and build tools"
$SUDO apt-get install -y -q --no-install-recommends "$pkg" \
    make gcc libc6-dev flex bison bc libelf-dev libssl-dev xz-utils lz4 perl >&2 \
    || mk_die "apt-get install $pkg failed (see above)"
srcver="$(dpkg-query -W -f='${Version}' "$pkg")"
t_apt=$(date +%s)

# --- 4. cache key ---------------------------------------------------------------------------
hash="$(mk_fragment_hash)"
key="$srcver-$hash"
out="$MK_KERNEL_CACHE/$key"
if [[ $rebuild -eq 0 && -f "$out/SHA256SUMS" ]] && (cd "$out" && sha256sum --check --quiet --strict SHA256SUMS >&2); then
    mk_log "cache hit: $out"
    printf '%s\n%s\n' "$(ls "$out"/bzImage-*-mkA)" "$(ls "$out"/bzImage-*-mkB)"
    exit 0
fi

# --- 5. unpack the tree once per source version --------------------------------------------------
tarball="$(ls /usr/src/"$pkg".tar.* 2>/dev/null | head -n1)"
[[ -n "$tarball" ]] || mk_die "$pkg is installed but /usr/src/$pkg.tar.* is missing"
src="$WORK/src-$srcver"
if [[ ! -f "$src/.mk-unpacked" ]]; then
    mk_log "unpacking $tarball into $src"
    rm -rf "$src"
    mkdir -p "$src"
    tar -xf "$tarball" -C "$src" --strip-components=1
    touch "$src/.mk-unpacked"
fi
t_unpack=$(date +%s)

# --- 6. configure: tinyconfig + fragments, then verify every requested option survived ----------
build="$WORK/build-$srcver-$hash"
mkdir -p "$build"
kmake() { nice -n "$NICE" make -C "$src" O="$build" ARCH=x86_64 \
    KBUILD_BUILD_USER=mk-upgrade KBUILD_BUILD_HOST=kernel-patches "$@"; }
mk_log "configuring in $build (tinyconfig + ${MK_FRAGMENTS[*]##*/})"
kmake -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "${MK_FRAGMENTS[@]}" >&2
kmake -s olddefconfig >&2
missing=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]]; then
        grep -qxF "$line" "$build/.config" || missing+=("$line")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set$ ]]; then
        grep -q "^${BASH_REMATCH[1]}=" "$build/.config" && missing+=("$line")
    fi
done < <(cat "${MK_FRAGMENTS[@]}")
if [[ ${#missing[@]} -gt 0 ]]; then
    mk_die "after olddefconfig these fragment options did not stick (unmet dependency or renamed in $srcver): ${missing[*]}"
fi

# --- 7. two images from one tree: only LOCALVERSION differs ---------------------------------------
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
declare -A took
for tag in A B; do
    "$src/scripts/config" --file "$build/.config" --set-str LOCALVERSION "-mk$tag" --disable LOCALVERSION_AUTO
    kmake -s olddefconfig >&2
    t0=$(date +%s)
    mk_log "make -j$JOBS bzImage (-mk$tag, nice $NICE)"
    kmake -j"$JOBS" bzImage >&2
    took[$tag]=$(( $(date +%s) - t0 ))
    release="$(kmake -s kernelrelease)"
    cp "$build/arch/x86/boot/bzImage" "$tmp/bzImage-$release"
    cp "$build/.config" "$tmp/config-$release"
    mk_log "built bzImage-$release in ${took[$tag]} s"
done
(cd "$tmp" && sha256sum bzImage-* > SHA256SUMS)
{
    echo "source_package=$pkg"
    echo "source_version=$srcver"
    echo "fragment_sha256_12=$hash"
    echo "mirror=$mirror"
    echo "jobs=$JOBS nice=$NICE"
    echo "apt_seconds=$((t_apt - t_start))"
    echo "unpack_seconds=$((t_unpack - t_apt))"
    echo "build_A_seconds=${took[A]}"
    echo "build_B_seconds=${took[B]}"
    echo "total_seconds=$(( $(date +%s) - t_start ))"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$tmp/BUILD-INFO"
rm -rf "$out"
mv "$tmp" "$out"
mk_log "cached in $out: $(tr '\n' ' ' < "$out/BUILD-INFO")"
printf '%s\n%s\n' "$(ls "$out"/bzImage-*-mkA)" "$(ls "$out"/bzImage-*-mkB)"
