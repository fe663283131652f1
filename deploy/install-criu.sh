#!/usr/bin/env bash
# Installs CRIU (checkpoint/restore in user space), which `mode = "checkpoint"` workloads
# need, as /usr/local/sbin/criu, on a Debian bookworm (or later) machine, without touching
# its libc: CRIU is built here from Debian's own source package of a newer suite, against
# the base system's libraries.
#
# Why built: bookworm's criu 3.17 fails `criu check` on current kernels; trixie's 4.1.1
# cannot dump a process with a TCP socket on Linux 6.18 ("Can't get 1:16 opt"); sid's binary
# package would pull in a newer libc. 4.2.1 built from source passes `criu check` on 6.18.
#
# What it does (idempotent; quick when a good criu is there):
#   1. nothing, if `criu --version` (PATH or /usr/local/sbin) says >= MK_CRIU_MIN (4.2);
#   2. a cached build (MK_CRIU_CACHE, default /var/cache/mk-upgrade/criu) of the pinned
#      version is installed if present;
#   3. otherwise: a deb-src entry for sid (source packages only: no binary package can come
#      from sid), the build dependencies from the base suite, `apt-get source
#      --download-only criu`, the upstream tarball checked against the SHA-256 the signed
#      source index lists for it, `make criu`, install, cache.
# Exit status: 0 installed (or already there), 1 failed (the reason on stderr).
#
# Environment: MK_CRIU_VERSION (default 4.2.1: the upstream version built), MK_CRIU_MIN
# (default 4.2), MK_CRIU_CACHE, MK_CRIU_PREFIX (default /usr/local).
set -euo pipefail

VERSION="${MK_CRIU_VERSION:-4.2.1}"
MIN="${MK_CRIU_MIN:-4.2}"
CACHE="${MK_CRIU_CACHE:-/var/cache/mk-upgrade/criu}"
PREFIX="${MK_CRIU_PREFIX:-/usr/local}"
DEST="$PREFIX/sbin/criu"

log() { printf '[install-criu] %s\n' "$*" >&2; }
die() { printf '[install-criu] error: %s\n' "$*" >&2; exit 1; }

# version_ge A B: A >= B (dotted numbers).
version_ge() { [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" == "$2" ]]; }
criu_version() { "$1" --version 2>/dev/null | awk '/^Version:/ { print $2; exit }'; }

for c in "$(command -v criu || true)" "$DEST"; do
    [[ -n "$c" && -x "$c" ]] || continue
    v="$(criu_version "$c")"
    if [[ -n "$v" ]] && version_ge "$v" "$MIN"; then
        log "criu $v at $c (>= $MIN): nothing to do"
        exit 0
    fi
    log "criu ${v:-of unknown version} at $c is older than $MIN: building $VERSION"
done

[[ $EUID -eq 0 ]] || die "run as root (it installs packages and $DEST)"
export DEBIAN_FRONTEND=noninteractive

install_binary() {
    install -D -m 0755 "$1" "$DEST"
    log "installed criu $(criu_version "$DEST") as $DEST"
}

# The build's runtime libraries (the cached binary links against them too).
RUNTIME_LIBS=(libbsd0 libgnutls30 libnftables1 libprotobuf-c1 libnl-3-200 libnet1 libuuid1 nftables)
BUILD_DEPS=(dpkg-dev gcc make pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
    libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler
    protobuf-compiler uuid-dev python3-protobuf libaio-dev)

apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if [[ -x "$CACHE/$VERSION/criu" ]]; then
    apt_install "${RUNTIME_LIBS[@]}"
    if "$CACHE/$VERSION/criu" --version >/dev/null 2>&1; then
        log "using the cached build $CACHE/$VERSION/criu"
        install_binary "$CACHE/$VERSION/criu"
        exit 0
    fi
    log "the cached build does not run here; building again"
fi

start=$(date +%s)
apt_install "${BUILD_DEPS[@]}" "${RUNTIME_LIBS[@]}"
SRC_LIST=/etc/apt/sources.list.d/mk-upgrade-sid-src.sources
if [[ ! -f "$SRC_LIST" ]]; then
    log "adding $SRC_LIST (deb-src only: source packages of sid, never binaries)"
    cat > "$SRC_LIST" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
apt-get update -qq
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# The Debian packaging tarball is not needed (upstream's Makefile builds criu): a missing one
# on a partial mirror is not an error as long as the .dsc and the upstream tarball came.
apt-get source --download-only "criu" >/dev/null 2>&1 || true
dsc="$(ls criu_*.dsc 2>/dev/null | head -n1)"
[[ -n "$dsc" ]] || die "apt-get source criu fetched no .dsc (is deb.debian.org reachable?)"
orig="criu_${VERSION}.orig.tar.xz"
[[ -f "$orig" ]] || die "$dsc does not provide $orig (sid has $(grep -m1 '^Version:' "$dsc")); set MK_CRIU_VERSION"
want="$(awk -v f="$orig" '/^Checksums-Sha256:/ { s = 1; next } /^[^ ]/ { s = 0 } s && $3 == f { print $1 }' "$dsc")"
got="$(sha256sum "$orig" | cut -d' ' -f1)"
[[ -n "$want" && "$want" == "$got" ]] || die "$orig: SHA-256 $got does not match the source index ($want)"
log "$orig: SHA-256 matches the signed source index"
tar xf "$orig"
cd "criu-$VERSION"
log "building criu $VERSION ($(nproc) jobs)"
make -j"$(nproc)" criu >"$work/make.log" 2>&1 || { tail -20 "$work/make.log" >&2; die "make criu failed"; }
mkdir -p "$CACHE/$VERSION"
install -m 0755 criu/criu "$CACHE/$VERSION/criu"
install_binary criu/criu
log "built in $(($(date +%s) - start)) s"
if ! "$DEST" check >/dev/null 2>&1; then
    log "warning: \`criu check\` fails on this kernel ($(uname -r)); checkpoint mode will be refused by \`mk-upgrade check\`"
fi
