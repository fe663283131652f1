#!/usr/bin/env bash
# Installs the unmodified Debian services that tests/tests/real_services.rs runs under
# mk-upgrade: lighttpd, redis-server (+ redis-tools for redis-cli) and python3.
#
# Idempotent and quick when they are present (no apt-get update then). Installing them must
# not leave system services running that would hold ports or otherwise interfere with the
# tests (the tests start their own copies under mk-upgrade):
#   * without systemd as PID 1 (containers, CI): a /usr/sbin/policy-rc.d that answers 101
#     keeps the packages' maintainer scripts from starting their daemons; it is written for
#     the install only and removed afterwards (an existing one is left as it was);
#   * with systemd running: the units are disabled and stopped after the install.
# Prints what it did. Needs root (it is run by .ci/run, as root, on Debian bookworm).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# package -> a file it installs that the tests use
declare -A want=(
    [lighttpd]=/usr/sbin/lighttpd
    [redis-server]=/usr/bin/redis-server
    [redis-tools]=/usr/bin/redis-cli
    [python3]=/usr/bin/python3
)
missing=()
for p in lighttpd redis-server redis-tools python3; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        [ ! -x "${want[$p]}" ]; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "tests/services/install.sh: lighttpd, redis-server, redis-tools, python3 already installed; nothing to do"
else
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/services/install.sh: missing ${missing[*]} and not root: cannot install (the real_services tests will report SKIP)" >&2
        exit 0
    fi
    systemd_running=0
    [ -d /run/systemd/system ] && systemd_running=1
    wrote_policy=0
    if [ "$systemd_running" = 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# written by mk-upgrade tests/services/install.sh for one apt-get install\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        wrote_policy=1
        echo "tests/services/install.sh: wrote /usr/sbin/policy-rc.d (exit 101) so that the packages start no daemon"
    fi
    cleanup() {
        if [ "$wrote_policy" = 1 ]; then
            rm -f /usr/sbin/policy-rc.d
            echo "tests/services/install.sh: removed /usr/sbin/policy-rc.d"
        fi
    }
    trap cleanup EXIT
    echo "tests/services/install.sh: installing ${missing[*]} (apt-get update, then apt-get install)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "tests/services/install.sh: installed ${missing[*]}"
    cleanup
    trap - EXIT
    wrote_policy=0
fi

# Whatever the packages set up must not run behind the tests' backs.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    for u in redis-server lighttpd; do
        if systemctl is-enabled --quiet "$u" 2>/dev/null || systemctl is-active --quiet "$u" 2>/dev/null; then
            systemctl disable --now "$u" >/dev/null 2>&1 || true
            echo "tests/services/install.sh: systemctl disable --now $u"
        fi
    done
fi
# A daemon started by a package script (its pid file names it): stopped through its init
# script, the package's own way, not by a process-name match.
for u in redis-server lighttpd; do
    pidfile=/run/$u.pid
    [ "$u" = redis-server ] && pidfile=/run/redis/redis-server.pid
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && [ -x "/etc/init.d/$u" ]; then
        "/etc/init.d/$u" stop >/dev/null 2>&1 || true
        echo "tests/services/install.sh: stopped the $u daemon the package started"
    fi
done
echo "tests/services/install.sh: $(lighttpd -v 2>&1 | head -n1); $(redis-server --version | cut -d' ' -f1-3); $(/usr/bin/python3 -V)"
